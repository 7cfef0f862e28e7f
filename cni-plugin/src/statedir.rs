//! Durable files under the state directory: one `flock`ed lock file per network, writes
//! that are either wholly there or not at all (temporary file, fsync, rename, fsync of the
//! directory), and removals that survive a crash.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A state directory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// A file system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, StateDirError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateDirError + 'a {
    move |source| StateDirError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// An exclusive lock on a network's state, held until dropped (or until the process dies:
/// the kernel releases `flock` locks with the file descriptor, so a killed plugin never
/// leaves the network locked).
#[derive(Debug)]
pub struct Lock {
    _file: Flock<File>,
}

/// Creates `dir` (and parents) if needed.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))
}

/// Takes the exclusive lock `dir/lock`, waiting for other plugin processes.
pub fn lock(dir: &Path) -> Result<Lock> {
    ensure_dir(dir)?;
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    let file =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| StateDirError::Io {
            op: "locking",
            path: path.clone(),
            source: io::Error::from(errno),
        })?;
    Ok(Lock { _file: file })
}

/// Writes `path` so that after a crash it holds either its old or its new content: the
/// bytes go to `.NAME.PID.tmp` beside it, are fsynced, renamed over `path`, and the
/// directory is fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    sync_dir(dir)
}

/// Removes `path` durably; a missing file is not an error. Returns whether it existed.
pub fn remove_durably(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path.parent().unwrap_or(Path::new(".")))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

/// Whether `name` is a temporary file [`write_atomically`] leaves behind when killed.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Reads `path`; `None` when it does not exist.
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["state.json"]);
        assert!(remove_durably(&p).unwrap());
        assert!(!remove_durably(&p).unwrap());
        assert_eq!(read_if_exists(&p).unwrap(), None);
    }

    #[test]
    fn the_lock_is_exclusive_between_open_file_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let f = File::open(dir.path().join("lock")).unwrap();
        assert!(Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err());
        drop(held);
        let f = File::open(dir.path().join("lock")).unwrap();
        assert!(Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok());
    }

    #[test]
    fn temporaries_are_recognised() {
        assert!(is_temporary(".ipam.json.123.tmp"));
        assert!(!is_temporary("ipam.json"));
    }
}
