//! The HTTP endpoints of the mesh's daemons (the clustermesh-apiserver's
//! `/healthz`, `/readyz`, `/metrics`; the node agent's `/metrics`): one small
//! hyper server and the Prometheus text encoding of [`prometheus_client`].
//!
//! Metrics are computed at scrape time from the daemon's own state
//! snapshot: the handler builds a [`Registry`] from the snapshot and
//! [`Reply::metrics`] encodes it (Prometheus text format 0.0.4). Names follow
//! Prometheus' conventions: a namespace prefix per daemon (`mesh_agent_`,
//! `mesh_apiserver_`), base units (`_seconds`), and counters get their
//! `_total` suffix from the encoder.
//!
//! ```no_run
//! use telemetry::{prometheus_client::{metrics::gauge::Gauge, registry::Registry}, Reply};
//! # async fn run(listener: tokio::net::TcpListener) {
//! telemetry::serve(listener, |path: String| async move {
//!     match path.as_str() {
//!         "/metrics" => {
//!             let mut registry = Registry::with_prefix("mesh_example");
//!             let up: Gauge = Gauge::default();
//!             up.set(1);
//!             registry.register("up", "Whether it runs.", up);
//!             Reply::metrics(&registry)
//!         }
//!         _ => Reply::not_found(),
//!     }
//! }, std::future::pending())
//! .await;
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

pub use prometheus_client;
use prometheus_client::registry::Registry;

/// What a handler answers to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    /// A plain-text reply.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// 404 for a path the daemon does not serve.
    pub fn not_found() -> Self {
        Self::text(404, "not found\n")
    }

    /// `registry` in the Prometheus text format.
    pub fn metrics(registry: &Registry) -> Self {
        Self {
            status: 200,
            content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body: encode(registry),
        }
    }
}

/// `registry` in the Prometheus text format (0.0.4).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; the encoder has no other error.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// Serves HTTP/1.1 on `listener` until `shutdown`: every request is answered
/// by `handler` with the request's path. Accept and connection errors are
/// logged at debug level (a scraper that goes away is no news).
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(String) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(error = %e, "accepting an HTTP connection failed");
                    continue;
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let reply = handler(req.uri().path().to_owned());
                async move { Ok::<_, Infallible>(response(reply.await)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "HTTP connection failed");
            }
        });
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;

    use super::*;

    #[test]
    fn counters_get_total_and_labels_are_escaped() {
        let mut registry = Registry::with_prefix("mesh_test");
        let errors: Counter = Counter::default();
        errors.inc_by(3);
        registry.register("errors", "Failed writes.", errors);
        let ready = Family::<Vec<(String, String)>, Gauge>::default();
        ready
            .get_or_create(&vec![("cluster".to_owned(), "c\"2".to_owned())])
            .set(1);
        registry.register("cluster_ready", "Whether the cluster is ready.", ready);
        let text = encode(&registry);
        assert!(
            text.contains("# TYPE mesh_test_errors_total counter\nmesh_test_errors_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("mesh_test_cluster_ready{cluster=\"c\\\"2\"} 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn serves_the_handlers_replies() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            |path: String| async move {
                match path.as_str() {
                    "/healthz" => Reply::text(200, "ok\n"),
                    _ => Reply::not_found(),
                }
            },
            std::future::pending(),
        ));
        for (path, status) in [("/healthz", "200 OK"), ("/nope", "404 Not Found")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                s.read_to_string(&mut out),
            )
            .await
            .expect("a reply within 5 s")
            .unwrap();
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status}")),
                "{path}: {out}"
            );
        }
        server.abort();
    }
}
