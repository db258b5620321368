//! The `mesh-cni` plugin: turns one CNI invocation into one request to the
//! agent and the agent's answer into the CNI result or error document.
//!
//! The plugin is deliberately thin and synchronous: everything that needs the
//! datapath, IPAM state or the apiserver happens in the long-lived agent, so
//! a plugin killed by the runtime's timeout cannot leave half-written state
//! of its own.

use std::{
    collections::HashMap,
    io::{self, Read},
    os::{fd::BorrowedFd, unix::net::UnixStream},
    path::Path,
    time::Duration,
};

use super::{
    protocol::{send_request, AgentRequest, AgentResponse, PodCommand, MAX_MESSAGE},
    spec::{self, CniEnv, CniError, Command, ErrorCode, NetConf, VersionResult},
};

/// How long the plugin waits for the agent (below kubelet's 4-minute
/// runtime timeout, above a slow apiserver round trip).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one invocation: `env` holds the process environment, `stdin` the
/// network configuration. Returns the JSON to print on stdout.
///
/// # Errors
///
/// The [`CniError`] to print on stdout (the binary then exits non-zero).
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Result<String, CniError> {
    let cni = CniEnv::from_env(env)?;
    if cni.command == Command::Version {
        return Ok(to_json(&VersionResult::default()));
    }
    let conf = NetConf::parse(stdin)?;
    // Results and errors from here on speak the configuration's version.
    let version = conf.cni_version.clone();
    invoke(cni, &conf).map_err(|mut e| {
        e.cni_version.clone_from(&version);
        e
    })
}

/// ADD, DEL or CHECK, once the environment and configuration are read.
fn invoke(cni: CniEnv, conf: &NetConf) -> Result<String, CniError> {
    if cni.command == Command::Check && !spec::has_check(&conf.cni_version) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            "CHECK is not part of this CNI version",
            format!(
                "the configuration is version {}; CHECK came with 0.4.0",
                conf.cni_version
            ),
        ));
    }
    let mut labels = cni.args.labels.clone();
    labels.extend(conf.runtime_config.labels.clone());
    let command = match cni.command {
        Command::Add => PodCommand::Add,
        Command::Del => PodCommand::Del,
        Command::Check => PodCommand::Check,
        Command::Version => unreachable!("handled above"),
    };
    let request = AgentRequest {
        command,
        pod_namespace: cni
            .args
            .pod_namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod_name: cni
            .args
            .pod_name
            .clone()
            .unwrap_or_else(|| cni.container_id.clone()),
        pod_uid: cni.args.pod_uid.clone(),
        container_id: cni.container_id,
        netns: cni.netns,
        ifname: cni.ifname,
        labels,
    };
    // The namespace goes to the agent as a descriptor (module docs of
    // `protocol`); one that cannot be opened (a DEL after the namespace went)
    // is named by its path only, and the agent says what it makes of that.
    let netns = request
        .netns
        .as_deref()
        .and_then(|p| std::fs::File::open(p).ok());
    let netns_fd = netns.as_ref().map(std::os::fd::AsFd::as_fd);
    match call_agent(&conf.socket(), &request, netns_fd)? {
        AgentResponse::Ok { attachment } => match (command, attachment) {
            (PodCommand::Add, Some(a)) => Ok(to_json(&a.to_result().in_version(&conf.cni_version))),
            (PodCommand::Add, None) => Err(CniError::new(
                spec::CODE_AGENT_FAILURE,
                "agent returned no attachment for ADD",
                "",
            )),
            // DEL and CHECK print nothing on success.
            _ => Ok(String::new()),
        },
        AgentResponse::Error { code, msg, details } => Err(CniError::new(code, msg, details)),
    }
}

/// Sends `request` to the agent at `socket` and reads its answer.
///
/// # Errors
///
/// Code 11 (try again later) when the agent is not there or not answering
/// (it may be starting), 5 on I/O failure mid-way, 6 on an unreadable answer.
pub fn call_agent(
    socket: &Path,
    request: &AgentRequest,
    netns: Option<BorrowedFd<'_>>,
) -> Result<AgentResponse, CniError> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        let code = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ErrorCode::TryAgainLater,
            _ => ErrorCode::Io,
        };
        CniError::new(
            code,
            "cannot reach the node agent",
            format!("{}: {e}", socket.display()),
        )
    })?;
    let io_err = |what: &str, e: io::Error| {
        let code = if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ErrorCode::TryAgainLater
        } else {
            ErrorCode::Io
        };
        CniError::new(code, format!("node agent {what} failed"), e.to_string())
    };
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(AGENT_TIMEOUT)))
        .map_err(|e| io_err("socket setup", e))?;
    let body = serde_json::to_vec(request).map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            "cannot encode the agent request",
            e.to_string(),
        )
    })?;
    send_request(&stream, &body, netns)
        .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
        .map_err(|e| io_err("request", e))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_MESSAGE)
        .read_to_end(&mut answer)
        .map_err(|e| io_err("response", e))?;
    serde_json::from_slice(&answer).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            "cannot decode the node agent's answer",
            e.to_string(),
        )
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serializing our own plain structs cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::spec::env;

    #[test]
    fn version_needs_no_config_and_no_agent() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), b"").unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0"])
        );
    }

    #[test]
    fn errors_speak_the_configuration_version_and_check_needs_0_4_0() {
        let check = env(&[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let conf = br#"{"cniVersion":"0.3.1","name":"mesh","type":"mesh-cni","agentSocket":"/nonexistent/a.sock"}"#;
        let err = run(&check, conf).unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion, "{err}");
        assert_eq!(err.cni_version, "0.3.1");
        let conf = br#"{"cniVersion":"0.4.0","name":"mesh","type":"mesh-cni","agentSocket":"/nonexistent/a.sock"}"#;
        let err = run(&check, conf).unwrap_err();
        assert_eq!(err.code, ErrorCode::TryAgainLater, "{err}");
        assert_eq!(err.cni_version, "0.4.0", "an error in the config's version");
    }

    #[test]
    fn missing_agent_is_try_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"mesh","type":"mesh-cni","agentSocket":"{}"}}"#,
            dir.path().join("absent.sock").display()
        );
        let err = run(
            &env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ]),
            conf.as_bytes(),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TryAgainLater, "{err}");
    }
}
