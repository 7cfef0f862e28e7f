//! A container's network namespace (`CNI_NETNS`): opened once, checked to be a network
//! namespace other than the plugin's own, and entered only by a dedicated thread that
//! calls `setns(2)` and then does the work (so the plugin's own threads never move).

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Network namespace failures.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist (the container is gone).
    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),
    /// The path is not a network namespace.
    #[error("{0} is not a network namespace")]
    NotANetns(PathBuf),
    /// The path is the plugin's own network namespace.
    #[error("{0} is the plugin's own network namespace")]
    Own(PathBuf),
    /// Opening or inspecting it failed.
    #[error("opening network namespace {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `setns(2)` failed.
    #[error("entering network namespace {path}: {source}")]
    Enter {
        /// The path.
        path: PathBuf,
        /// The error.
        source: nix::Error,
    },
    /// The thread working inside the namespace panicked.
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Opens `path` (a bind mount under /run/netns or a /proc/PID/ns/net link).
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let open_err = |source: io::Error| NetnsError::Open {
            path: path.to_owned(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NetnsError::NotFound(path.to_owned()))
            }
            Err(e) => return Err(open_err(e)),
        };
        let fs = fstatfs(&file)
            .map_err(|e| open_err(io::Error::from(e)))?
            .filesystem_type();
        if fs != NSFS_MAGIC {
            return Err(NetnsError::NotANetns(path.to_owned()));
        }
        let target = file.metadata().map_err(open_err)?;
        let own = std::fs::metadata("/proc/thread-self/ns/net").map_err(open_err)?;
        if (target.dev(), target.ino()) == (own.dev(), own.ino()) {
            return Err(NetnsError::Own(path.to_owned()));
        }
        Ok(Netns {
            path: path.to_owned(),
            file,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor, for `IFLA_NET_NS_FD` (valid while `self` lives).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let fd: BorrowedFd<'_> = self.file.as_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: self.path.clone(),
                    source,
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(NetnsError::Panicked(self.path.clone())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_is_not_found_and_a_plain_file_is_no_netns() {
        assert!(matches!(
            Netns::open(Path::new("/nonexistent/weir-netns")),
            Err(NetnsError::NotFound(_))
        ));
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Netns::open(f.path()),
            Err(NetnsError::NotANetns(_))
        ));
    }

    #[test]
    fn the_plugins_own_namespace_is_refused() {
        assert!(matches!(
            Netns::open(Path::new("/proc/self/ns/net")),
            Err(NetnsError::Own(_))
        ));
    }
}
