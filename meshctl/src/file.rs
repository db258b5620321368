//! The error of a file operation: what was done, to which file, and why.

use std::path::{Path, PathBuf};

/// A file operation failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}")]
pub struct FileError {
    /// What was done (`read`, `write`, `create`, `remove`, …).
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// A `map_err` adapter: `fs::read(p).map_err(FileError::at("read", p))`.
    pub fn at<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl Fn(std::io::Error) -> Self + Copy + 'a {
        move |source| Self {
            action,
            path: path.to_owned(),
            source,
        }
    }
}
