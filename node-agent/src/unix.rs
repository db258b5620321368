//! Unix socket helpers shared by the CNI and status servers.

use std::{fs, io, os::unix::fs::PermissionsExt, path::Path};

use tokio::net::UnixListener;

/// Binds a unix socket at `path`, replacing a stale socket file of an
/// earlier run, creating the parent directory, and restricting it to the
/// owner (the plugin and meshctl run as root).
///
/// # Errors
///
/// When the directory, the stale file or the bind fails.
pub(crate) fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
