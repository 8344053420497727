//! Crash-safe file replacement; process identity (pid + start time) from `/proc`.
//!
//! Both the vTPM's sealed state and the manager's store are replaced, never
//! edited in place: write a temporary file in the same directory, fsync it,
//! rename it over the target, fsync the directory. A crash or `kill -9` at
//! any point leaves either the old or the new contents (POSIX rename is
//! atomic within a file system; the directory fsync makes the rename durable).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `data` atomically and durably; the new file has
/// mode `mode` (e.g. 0o600 for anything secret-adjacent).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temporary files a killed writer may have left next to `path`.
pub fn remove_stale_temps(path: &Path) {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return };
    let prefix = format!(".{name}.tmp.");
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Whether process `pid` is alive: it exists in /proc and is not a zombie.
/// (A killed vTPM whose parent has exited may linger as a zombie under an
/// init that does not reap; it serves nothing and must count as gone.)
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state field follows the parenthesised command name, which may itself contain ") ".
        Ok(s) => s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// A process's start time (clock ticks since boot, `/proc/PID/stat` field 22): with the pid it
/// names one process instance for good, so a recycled pid is not mistaken for an earlier process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name (which may itself contain ") ").
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process instance `(pid, start)` (see [`start_time`]) is alive: `pid` is alive
/// ([`pid_alive`]) and is still the process that started at `start`, not a later one that
/// obtained the same pid.
pub fn instance_alive(pid: u32, start: u64) -> bool {
    // One read of /proc/PID/stat: state (not a zombie) and start time.
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some((_, rest)) = stat.rsplit_once(") ") else { return false };
    !rest.starts_with('Z') && rest.split_whitespace().nth(19).and_then(|t| t.parse().ok()) == Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_and_sets_mode() {
        let dir = std::env::temp_dir().join(format!("fsutil-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(dir.join(".f.tmp.999"), b"x").unwrap();
        remove_stale_temps(&p);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_instance_is_alive_and_another_start_time_is_not() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(instance_alive(me, t));
        assert!(!instance_alive(me, t + 1));
    }
}
