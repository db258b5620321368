//! The remote-cluster config directory: one Cilium-format etcd config per
//! cluster, polled and compared by content.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use api::ClusterName;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Context, EtcdSource};

/// A running cluster task and the config it runs with.
struct Running {
    content: Vec<u8>,
    task: Option<JoinHandle<()>>,
}

/// Watches the remote-cluster config directory until dropped; see the
/// module docs.
pub async fn watch_config_dir(ctx: Context, dir: PathBuf, period: Duration) {
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned_missing = false;
    loop {
        tick.tick().await;
        let files = match scan(&dir) {
            Ok(f) => {
                warned_missing = false;
                f
            }
            Err(e) => {
                if !warned_missing {
                    warn!(dir = %dir.display(), error = %e, "cannot read the clustermesh config directory; treating it as empty");
                    warned_missing = true;
                }
                BTreeMap::new()
            }
        };
        let gone: Vec<String> = running
            .keys()
            .filter(|k| !files.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = running.remove(&name) {
                if let Some(t) = r.task {
                    t.abort();
                }
            }
            info!(cluster = %name, "config removed; draining the cluster");
            ctx.mesh.remove(&name);
            ctx.hub.remove_cluster(&name);
        }
        for (name, content) in files {
            if running.get(&name).is_some_and(|r| r.content == content) {
                continue;
            }
            let restart = running.remove(&name);
            if let Some(t) = restart.and_then(|r| r.task) {
                info!(cluster = %name, "config changed; reconnecting");
                t.abort();
            }
            let task = match remote_cluster_name(&ctx, &name) {
                Err(reason) => {
                    warn!(cluster = %name, reason = %reason, "cluster config refused");
                    ctx.set_status(&name, |s| {
                        s.connected = false;
                        s.ready = false;
                        s.status = reason;
                    });
                    None
                }
                Ok(cluster) => {
                    info!(cluster = %name, "cluster config found; connecting");
                    let source = EtcdSource::File(dir.join(&name));
                    Some(ctx.spawn_cluster(cluster, source, false))
                }
            };
            running.insert(name, Running { content, task });
        }
    }
}

/// The cluster a config file names, or why it is refused.
fn remote_cluster_name(ctx: &Context, name: &str) -> Result<ClusterName, String> {
    let cluster = ClusterName::new(name)
        .map_err(|e| format!("file name {name:?} is not a valid cluster name: {e}"))?;
    if cluster == ctx.local_name {
        return Err(format!(
            "cluster {name} has the local cluster's name; refusing to connect to it as a remote cluster"
        ));
    }
    Ok(cluster)
}

/// The config files in `dir`: name → content. Names with a `.` (dotfiles and
/// the certificate files Cilium's layout keeps beside each config) and
/// directories are skipped; symlinks are followed.
fn scan(dir: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.contains('.') {
            continue;
        }
        let path = entry.path();
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        // A file vanishing between listing and reading counts as removed.
        if let Ok(content) = std::fs::read(&path) {
            out.insert(name, content);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_skips_dotfiles_certificates_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("c2"), "endpoints: []").unwrap();
        std::fs::write(tmp.path().join(".hidden"), "x").unwrap();
        for companion in [
            "c2.etcd-client.crt",
            "c2.etcd-client.key",
            "c2.etcd-client-ca.crt",
        ] {
            std::fs::write(tmp.path().join(companion), "-----BEGIN").unwrap();
        }
        std::fs::create_dir(tmp.path().join("..data")).unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        let files = scan(tmp.path()).unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["c2"]);
    }
}
