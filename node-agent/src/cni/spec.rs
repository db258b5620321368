//! The parts of the CNI specification the plugin speaks (versions 0.3.1,
//! 0.4.0 and 1.0.0, as container runtimes still write all three): the
//! `CNI_*` environment, `CNI_ARGS`, the network configuration on stdin, the
//! result and the error document.
//!
//! Parsing takes the environment as a map, not from the process, so tests can
//! pass exactly what a container runtime would.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The newest spec version we speak: of VERSION's answer and of errors
/// before the configuration is read.
pub const CNI_VERSION: &str = "1.0.0";
/// Versions whose configuration we accept; results and errors are written in
/// the configuration's version ([`CniResult::in_version`]).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0"];

/// Whether `version` (one of [`SUPPORTED_VERSIONS`]) has `CHECK`, which
/// came with 0.4.0.
pub fn has_check(version: &str) -> bool {
    version != "0.3.1"
}

/// Well-known error codes of the spec (section "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub enum ErrorCode {
    /// 1: incompatible CNI version.
    IncompatibleVersion,
    /// 2: unsupported field in network configuration.
    UnsupportedField,
    /// 3: container unknown or does not exist.
    UnknownContainer,
    /// 4: invalid necessary environment variables.
    InvalidEnvironment,
    /// 5: I/O failure.
    Io,
    /// 6: failed to decode content.
    Decode,
    /// 7: invalid network config.
    InvalidNetworkConfig,
    /// 11: try again later.
    TryAgainLater,
    /// 100+: plugin-specific (here: the agent failed to set up the pod).
    Plugin(u32),
}

impl From<ErrorCode> for u32 {
    fn from(c: ErrorCode) -> u32 {
        match c {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::Plugin(n) => n,
        }
    }
}

impl TryFrom<u32> for ErrorCode {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        Ok(match n {
            1 => Self::IncompatibleVersion,
            2 => Self::UnsupportedField,
            3 => Self::UnknownContainer,
            4 => Self::InvalidEnvironment,
            5 => Self::Io,
            6 => Self::Decode,
            7 => Self::InvalidNetworkConfig,
            11 => Self::TryAgainLater,
            n if n >= 100 => Self::Plugin(n),
            n => return Err(format!("reserved CNI error code {n}")),
        })
    }
}

/// Plugin-specific code: the agent failed while setting up or tearing down
/// the pod network (netlink, datapath, IPAM exhausted...).
pub const CODE_AGENT_FAILURE: ErrorCode = ErrorCode::Plugin(100);

/// The error document a plugin prints on stdout when it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("cni error {}: {msg}{}", u32::from(*code), if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    /// Spec version.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Error code.
    pub code: ErrorCode,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with `code`, `msg` and `details`.
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: CNI_VERSION.into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// A CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach it; must succeed when already detached.
    Del,
    /// Verify an attachment.
    Check,
    /// Report supported versions.
    Version,
}

/// The `CNI_*` variables, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (not needed for VERSION).
    pub container_id: String,
    /// `CNI_NETNS`; may be empty for DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: CniArgs,
}

/// The keys of `CNI_ARGS` the plugin understands; others are ignored (as
/// with `IgnoreUnknown=1`, which kubelet always sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_UID`.
    pub pod_uid: Option<String>,
    /// `MESH_LABELS=app=web,tier=fe`.
    pub labels: BTreeMap<String, String>,
}

impl CniEnv {
    /// Parses the CNI variables from `env`.
    ///
    /// # Errors
    ///
    /// Code 4 naming every invalid or missing variable.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, CniError> {
        let mut bad = Vec::new();
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let command = match get("CNI_COMMAND") {
            Some("ADD") => Some(Command::Add),
            Some("DEL") => Some(Command::Del),
            Some("CHECK") => Some(Command::Check),
            Some("VERSION") => Some(Command::Version),
            Some(other) => {
                bad.push(format!(
                    "CNI_COMMAND={other:?} (must be ADD, DEL, CHECK or VERSION)"
                ));
                None
            }
            None => {
                bad.push("CNI_COMMAND is missing".to_owned());
                None
            }
        };
        let needs_container = !matches!(command, Some(Command::Version) | None);
        let container_id = get("CNI_CONTAINERID").unwrap_or_default().to_owned();
        if needs_container {
            if container_id.is_empty() {
                bad.push("CNI_CONTAINERID is missing".into());
            } else if !container_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            {
                bad.push(format!(
                    "CNI_CONTAINERID={container_id:?} (only letters, digits, '_', '.', '-')"
                ));
            }
        }
        let netns = get("CNI_NETNS").map(PathBuf::from);
        if matches!(command, Some(Command::Add | Command::Check)) {
            match &netns {
                None => bad.push("CNI_NETNS is missing".into()),
                Some(p) if !p.is_absolute() => {
                    bad.push(format!("CNI_NETNS={p:?} (must be an absolute path)"));
                }
                Some(_) => {}
            }
        }
        let ifname = get("CNI_IFNAME").unwrap_or_default().to_owned();
        if needs_container {
            if let Err(why) = validate_ifname(&ifname) {
                bad.push(format!("CNI_IFNAME={ifname:?} ({why})"));
            }
        }
        let args = match CniArgs::parse(get("CNI_ARGS").unwrap_or_default()) {
            Ok(a) => a,
            Err(why) => {
                bad.push(format!("CNI_ARGS: {why}"));
                CniArgs::default()
            }
        };
        match command {
            Some(command) if bad.is_empty() => Ok(Self {
                command,
                container_id,
                netns,
                ifname,
                args,
            }),
            _ => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                "invalid CNI environment variables",
                bad.join("; "),
            )),
        }
    }
}

impl CniArgs {
    /// Parses `K=V;K=V` as the spec defines `CNI_ARGS`.
    ///
    /// # Errors
    ///
    /// A description of the first malformed pair or label.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not KEY=VALUE"))?;
            match k {
                "K8S_POD_NAMESPACE" => out.pod_namespace = Some(v.to_owned()),
                "K8S_POD_NAME" => out.pod_name = Some(v.to_owned()),
                "K8S_POD_UID" => out.pod_uid = Some(v.to_owned()),
                "MESH_LABELS" => out.labels = parse_labels(v)?,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Parses `app=web,tier=fe` into labels.
///
/// # Errors
///
/// A description of the first malformed label.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("label {item:?} is not key=value"))?;
        validate_label(k, v)?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

/// Kubernetes label syntax, loosely: keys of `[A-Za-z0-9._/-]` up to 317
/// characters (prefix/name), values of `[A-Za-z0-9._-]` up to 63. `;` and `=`
/// are excluded because they delimit labels in identity strings.
///
/// # Errors
///
/// Why the label is refused.
pub fn validate_label(k: &str, v: &str) -> Result<(), String> {
    let key_ok = !k.is_empty()
        && k.len() <= 317
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if !key_ok {
        return Err(format!("label key {k:?} is not a valid label key"));
    }
    let val_ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !val_ok {
        return Err(format!("label {k}={v:?} has an invalid value"));
    }
    Ok(())
}

fn validate_ifname(n: &str) -> Result<(), &'static str> {
    if n.is_empty() {
        return Err("missing");
    }
    if n.len() > 15 {
        return Err("longer than 15 bytes");
    }
    if n == "."
        || n == ".."
        || n.bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err("not a valid interface name");
    }
    Ok(())
}

/// The network configuration on stdin. Unknown fields are ignored (runtimes
/// add their own), but the ones we read are checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version of the configuration.
    pub cni_version: String,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Plugin type (`mesh-cni`).
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The agent's CNI socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Per-invocation data from the runtime.
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// The result of the previous ADD (CHECK and DEL).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

/// `runtimeConfig`: we read `labels`, a map from label key to value, as an
/// alternative to `MESH_LABELS` in `CNI_ARGS`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The default agent socket, equal to the agent's `--cni-socket` default.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/mesh/cni.sock";

impl NetConf {
    /// Parses and checks the configuration.
    ///
    /// # Errors
    ///
    /// Code 6 when the bytes are not the expected JSON, 1 for an unsupported
    /// version, 7 for invalid values.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "failed to decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "the configuration is version {:?}; mesh-cni speaks {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let mut bad = Vec::new();
        if conf.name.is_empty() {
            bad.push("name is missing".to_owned());
        }
        if conf.plugin_type.is_empty() {
            bad.push("type is missing".to_owned());
        }
        if let Some(p) = &conf.agent_socket {
            if !p.is_absolute() {
                bad.push(format!("agentSocket {p:?} is not an absolute path"));
            }
        }
        for (k, v) in &conf.runtime_config.labels {
            if let Err(e) = validate_label(k, v) {
                bad.push(format!("runtimeConfig.labels: {e}"));
            }
        }
        if !bad.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "invalid network configuration",
                bad.join("; "),
            ));
        }
        Ok(conf)
    }

    /// The agent socket to talk to.
    pub fn socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET))
    }
}

/// The VERSION result.
#[derive(Debug, Clone, Serialize)]
pub struct VersionResult {
    /// Our version.
    #[serde(rename = "cniVersion")]
    pub cni_version: &'static str,
    /// Versions we accept.
    #[serde(rename = "supportedVersions")]
    pub supported_versions: &'static [&'static str],
}

impl Default for VersionResult {
    fn default() -> Self {
        Self {
            cni_version: CNI_VERSION,
            supported_versions: SUPPORTED_VERSIONS,
        }
    }
}

/// A 1.0.0 ADD result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Spec version.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Host-side and container-side interfaces.
    pub interfaces: Vec<Interface>,
    /// Assigned addresses.
    pub ips: Vec<IpConfig>,
    /// Routes in the container.
    pub routes: Vec<Route>,
    /// No DNS is configured by this plugin.
    pub dns: serde_json::Map<String, serde_json::Value>,
}

impl CniResult {
    /// This result as spec `version` (one of [`SUPPORTED_VERSIONS`]) writes
    /// it: before 1.0.0 every IP names its family (`"version": "4"`) and
    /// interfaces carry no MTU.
    pub fn in_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_owned();
        if version != "1.0.0" {
            for ip in &mut self.ips {
                // Pod addresses are IPv4 (the agent's IPAM is IPv4-only).
                ip.version = Some("4".to_owned());
            }
            for interface in &mut self.interfaces {
                interface.mtu = None;
            }
        }
        self
    }
}

/// An interface of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC address, `aa:bb:...`.
    pub mac: String,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Namespace path for container interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"` before 1.0.0, which dropped the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Address with prefix.
    pub address: Ipv4Net,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    pub interface: usize,
}

/// A route of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: Ipv4Net,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

/// An environment map from pairs (tests).
#[cfg(test)]
pub(crate) fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_env_with_k8s_args_and_labels() {
        let e = CniEnv::from_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;MESH_LABELS=app=web,tier=fe",
            ),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args.pod_namespace.as_deref(), Some("default"));
        assert_eq!(e.args.pod_name.as_deref(), Some("web-1"));
        assert_eq!(e.args.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(e.args.labels.get("tier").map(String::as_str), Some("fe"));
    }

    #[test]
    fn invalid_env_names_every_variable_with_code_4() {
        let err = CniEnv::from_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "a/very/long/interface"),
            ("CNI_ARGS", "MESH_LABELS=app=we b"),
        ]))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        for v in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"] {
            assert!(err.details.contains(v), "{v} not named in {}", err.details);
        }
        let err = CniEnv::from_env(&env(&[("CNI_COMMAND", "EXPLODE")])).unwrap_err();
        assert!(err.details.contains("EXPLODE"), "{}", err.details);
    }

    #[test]
    fn del_without_netns_and_version_without_container() {
        let e = CniEnv::from_env(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(e.netns, None);
        assert!(CniEnv::from_env(&env(&[("CNI_COMMAND", "VERSION")])).is_ok());
    }

    #[test]
    fn netconf_codes() {
        let ok = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"mesh","type":"mesh-cni","agentSocket":"/run/x.sock","runtimeConfig":{"labels":{"app":"db"}},"capabilities":{"portMappings":true}}"#,
        )
        .unwrap();
        assert_eq!(ok.socket(), PathBuf::from("/run/x.sock"));
        assert_eq!(ok.runtime_config.labels["app"], "db");

        let e = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::Decode);
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"m","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::IncompatibleVersion);
        let e = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"","type":"t","agentSocket":"rel.sock"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidNetworkConfig);
        assert!(e.details.contains("name") && e.details.contains("agentSocket"));
    }

    #[test]
    fn results_in_each_supported_version() {
        for version in SUPPORTED_VERSIONS {
            let conf = format!(r#"{{"cniVersion":"{version}","name":"mesh","type":"mesh-cni"}}"#);
            assert_eq!(
                NetConf::parse(conf.as_bytes()).unwrap().cni_version,
                *version
            );
        }
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"m","type":"t"}"#).unwrap_err();
        assert_eq!(
            e.details,
            "the configuration is version \"0.2.0\"; mesh-cni speaks 0.3.1, 0.4.0, 1.0.0"
        );
        let result = CniResult {
            cni_version: CNI_VERSION.into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: Some(1450),
                sandbox: Some("/run/netns/p".into()),
            }],
            ips: vec![IpConfig {
                version: None,
                address: "10.1.1.2/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: 0,
            }],
            routes: vec![],
            dns: serde_json::Map::new(),
        };
        let v1 = serde_json::to_value(result.clone().in_version("1.0.0")).unwrap();
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert_eq!(
            v1["ips"][0],
            serde_json::json!({"address": "10.1.1.2/32", "gateway": "169.254.1.1", "interface": 0})
        );
        assert_eq!(v1["interfaces"][0]["mtu"], 1450);
        for old in ["0.3.1", "0.4.0"] {
            let v = serde_json::to_value(result.clone().in_version(old)).unwrap();
            assert_eq!(v["cniVersion"], old);
            assert_eq!(
                v["ips"][0],
                serde_json::json!({"version": "4", "address": "10.1.1.2/32", "gateway": "169.254.1.1", "interface": 0})
            );
            assert!(v["interfaces"][0].get("mtu").is_none(), "{v}");
        }
        assert!(!has_check("0.3.1") && has_check("0.4.0") && has_check("1.0.0"));
    }

    #[test]
    fn error_document_has_the_spec_shape() {
        let e = CniError::new(ErrorCode::TryAgainLater, "agent not ready", "");
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.0.0","code":11,"msg":"agent not ready"})
        );
        let back: CniError = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        assert!(serde_json::from_value::<CniError>(
            serde_json::json!({"cniVersion":"1.0.0","code":42,"msg":"x"})
        )
        .is_err());
    }
}
