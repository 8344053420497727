//! One manager per state and run directory: an exclusive `flock` on `vtpmmgr.lock` in each,
//! held for the life of the process (the kernel releases it when the process dies, `kill -9`
//! included). A second instance refuses before it touches the physical TPM, the store or any
//! socket, and names the pid of the first.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file in each directory.
pub const LOCK_FILE: &str = "vtpmmgr.lock";

/// Why the directories could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another manager holds the lock.
    #[error(
        "another vtpmmgr (pid {pid}) already owns {dir} (lock {lock}); only one manager may serve a state and run directory. \
         Stop that one first, or give this one other --state-dir/--run-dir"
    )]
    Held {
        /// The directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// The holder's pid as it recorded it ("unknown" if unreadable).
        pid: String,
    },
    /// Creating or locking failed.
    #[error("locking {path}: {source}")]
    Io {
        /// The lock file or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The held locks; dropping it releases them.
#[derive(Debug)]
pub struct InstanceLock {
    _held: Vec<Flock<File>>,
}

fn lock_dir(dir: &Path) -> Result<Flock<File>, LockError> {
    std::fs::create_dir_all(dir).map_err(|source| LockError::Io { path: dir.into(), source })?;
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io { path: path.clone(), source };
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io)?;
    let mut f = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            let pid = if pid.is_empty() { "unknown".to_string() } else { pid.to_string() };
            return Err(LockError::Held { dir: dir.into(), lock: path, pid });
        }
        Err((_, e)) => return Err(io(e.into())),
    };
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    writeln!(f, "{}", std::process::id()).map_err(io)?;
    Ok(f)
}

/// Locks `state_dir` and `run_dir` (once if they are the same directory), creating them if needed.
pub fn acquire(state_dir: &Path, run_dir: &Path) -> Result<InstanceLock, LockError> {
    let first = lock_dir(state_dir)?;
    let same = match (state_dir.canonicalize(), run_dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let mut held = vec![first];
    if !same {
        held.push(lock_dir(run_dir)?);
    }
    Ok(InstanceLock { _held: held })
}
