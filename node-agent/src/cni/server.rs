//! The agent's side of the CNI socket: accept, read one request, let the
//! [`PodManager`] do the work, answer, close.

use std::{future::Future, path::Path, sync::Arc};

use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn, Instrument};

use super::{
    protocol::{read_request, AgentRequest, AgentResponse},
    spec::{CniError, ErrorCode},
};
use crate::{pod::PodManager, unix::bind_unix};

/// Serves the CNI socket at `path` until `shutdown` completes.
///
/// # Errors
///
/// When the socket cannot be bound.
pub async fn serve(
    path: &Path,
    pods: Arc<PodManager>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let listener: UnixListener = bind_unix(path)?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let pods = pods.clone();
                    tokio::spawn(handle(stream, pods).in_current_span());
                }
                Err(e) => warn!(error = %e, "accepting on the CNI socket"),
            },
        }
    }
}

async fn handle(mut stream: UnixStream, pods: Arc<PodManager>) {
    let response = match read_request(&mut stream).await {
        Err(e) => AgentResponse::from(CniError::new(
            ErrorCode::Io,
            "reading the request",
            e.to_string(),
        )),
        Ok((body, netns)) => match serde_json::from_slice::<AgentRequest>(&body) {
            Err(e) => AgentResponse::from(CniError::new(
                ErrorCode::Decode,
                "cannot decode the plugin request",
                e.to_string(),
            )),
            Ok(req) => {
                let span = tracing::info_span!(
                    "cni",
                    command = ?req.command,
                    container = %req.container_id,
                );
                match pods.handle(&req, netns.as_ref()).instrument(span).await {
                    Ok(attachment) => AgentResponse::Ok { attachment },
                    Err(e) => {
                        warn!(error = %e, container = %req.container_id, "CNI request failed");
                        AgentResponse::from(e.to_cni())
                    }
                }
            }
        },
    };
    let bytes = serde_json::to_vec(&response).unwrap_or_default();
    if let Err(e) = stream.write_all(&bytes).await {
        debug!(error = %e, "plugin went away before the answer");
    }
    let _ = stream.shutdown().await;
}
