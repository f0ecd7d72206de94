use std::io;
use std::path::PathBuf;

/// Errors of this crate; each names the file or field involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 hierarchy is mounted (read {mounts}): VMs are identified by their cgroup v2 id, so pure cgroup v1 hosts are not supported; boot with a hybrid or unified hierarchy")]
    NoUnified { mounts: PathBuf },
    #[error("cgroup path {0:?} must be relative, non-empty and without '.' or '..'")]
    BadPath(String),
    #[error("cgroup {path} does not exist")]
    Missing { path: PathBuf },
    #[error("invalid limit: field {field}: {reason}")]
    Limit { field: &'static str, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot parse {what}")]
    Parse { path: PathBuf, what: String },
}

impl CgroupError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> CgroupError {
        let path = path.into();
        move |source| CgroupError::Io { op, path, source }
    }
}
