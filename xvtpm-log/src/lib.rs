//! Logging a peer cannot turn against the host.
//!
//! Guests, vTPM processes and local users can make our daemons log as fast as they
//! can send. Two things keep that bounded, and every crate uses the same ones:
//!
//! - **Rate limits per call site.** Every log line a peer can trigger goes through
//!   [`guest_warn!`], [`guest_info!`], [`guest_error!`] or [`guest_debug!`]: a burst of [`BURST`] lines
//!   per [`WINDOW_SECS`] per call site, then only a count of what was suppressed
//!   (reported as `suppressed=N` on the next line that gets through). A line no peer
//!   can trigger says so with [`host_warn!`] & co. (not limited); clippy.toml disallows
//!   the raw `tracing`/`log` macros, so the daemons use only these two families.
//! - **A size-capped log file.** [`CappedLog`] keeps a log file and one predecessor
//!   (`<file>.1`) each at most a given size, so a log never fills the file system
//!   that also holds sealed state.
//!
//! And one way to print an error: [`report`] puts an error and its `source()` chain on one
//! line with each cause once, for every binary's `error:` line.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

#[doc(hidden)]
pub use tracing as __tracing;

/// Lines allowed per window and call site.
pub const BURST: u64 = 5;
/// Window length in seconds.
pub const WINDOW_SECS: u64 = 10;

/// Seconds since the first use in this process (monotonic: a clock step does not
/// reopen or freeze a window).
fn now_secs() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs()
}

/// One limiter per call site; `const`-constructible for use in statics.
pub struct RateLimiter {
    /// (window number << 20) | lines logged in this window (saturating at 2^20 - 1).
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimiter {
    /// A fresh limiter.
    pub const fn new() -> Self {
        RateLimiter { state: AtomicU64::new(u64::MAX), suppressed: AtomicU64::new(0) }
    }

    /// Returns `Some(suppressed_since_last)` if a line may be logged now.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_secs())
    }

    fn check_at(&self, now_secs: u64) -> Option<u64> {
        let window = now_secs / WINDOW_SECS;
        let cur = self.state.load(Ordering::Relaxed);
        let (w, n) = (cur >> 20, cur & 0xFFFFF);
        let (next, allowed) = if w != window { ((window << 20) | 1, true) } else { ((w << 20) | (n + 1).min(0xFFFFF), n < BURST) };
        // A lost race only miscounts one line; that is acceptable for logs.
        self.state.store(next, Ordering::Relaxed);
        if allowed {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `guest_warn!(field = value, .., "message")`: a `tracing::warn!` rate-limited per
/// call site. For every line a guest, a vTPM or a local peer can trigger.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::__limited!(WARN, $($arg)+) };
}

/// As [`guest_warn!`], at `info` level.
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)+) => { $crate::__limited!(INFO, $($arg)+) };
}

/// As [`guest_warn!`], at `error` level.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::__limited!(ERROR, $($arg)+) };
}

/// As [`guest_warn!`], at `debug` level.
#[macro_export]
macro_rules! guest_debug {
    ($($arg:tt)+) => { $crate::__limited!(DEBUG, $($arg)+) };
}

/// `host_warn!(field = value, .., "message")`: a plain `tracing::warn!`, not rate-limited,
/// for a line no peer can trigger (startup, shutdown, an administrator's command, the
/// failure of our own resources). The name is the reviewer's marker: clippy.toml disallows
/// the raw `tracing` macros, so every log line in the daemons is either `guest_*!` or
/// `host_*!`, and a `host_*!` a peer can reach is a bug.
#[macro_export]
macro_rules! host_warn {
    ($($arg:tt)+) => { $crate::__tracing::event!($crate::__tracing::Level::WARN, $($arg)+) };
}

/// As [`host_warn!`], at `info` level.
#[macro_export]
macro_rules! host_info {
    ($($arg:tt)+) => { $crate::__tracing::event!($crate::__tracing::Level::INFO, $($arg)+) };
}

/// As [`host_warn!`], at `error` level.
#[macro_export]
macro_rules! host_error {
    ($($arg:tt)+) => { $crate::__tracing::event!($crate::__tracing::Level::ERROR, $($arg)+) };
}

/// As [`host_warn!`], at `debug` level.
#[macro_export]
macro_rules! host_debug {
    ($($arg:tt)+) => { $crate::__tracing::event!($crate::__tracing::Level::DEBUG, $($arg)+) };
}

// Both families expand to `tracing::event!`, which clippy.toml does not list: clippy's
// `disallowed_macros` also flags a disallowed macro reached through another crate's macro,
// and it honours an `allow` for the `tracing` macros only at crate level.
#[doc(hidden)]
#[macro_export]
macro_rules! __limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::RateLimiter = $crate::RateLimiter::new();
        if let Some(suppressed) = LIMIT.check() {
            $crate::__tracing::event!($crate::__tracing::Level::$level, suppressed, $($arg)+);
        }
    }};
}

/// Default cap of one log file: the current file and its predecessor together stay
/// under twice this.
pub const LOG_MAX_BYTES: u64 = 1 << 20;

/// A log file of bounded size: when the next record would take it past `max` bytes it is
/// renamed to `<file>.1` (replacing the previous one) and a new file is started.
pub struct CappedLog {
    state: Mutex<LogState>,
}

struct LogState {
    path: PathBuf,
    file: File,
    written: u64,
    max: u64,
    follow_stderr: bool,
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

impl CappedLog {
    /// Appends to `path` (created mode 0600). With `follow_stderr`, file descriptor 2
    /// is pointed at the current file too (now and after every rotation), so panics
    /// and fatal errors written to stderr land in the same capped file.
    pub fn open(path: &Path, max: u64, follow_stderr: bool) -> io::Result<Arc<CappedLog>> {
        let file = open_log(path)?;
        let written = file.metadata()?.len();
        let st = LogState { path: path.to_path_buf(), file, written, max: max.max(1024), follow_stderr };
        if follow_stderr {
            st.point_stderr()?;
        }
        Ok(Arc::new(CappedLog { state: Mutex::new(st) }))
    }

    /// A writer for `tracing_subscriber::fmt().with_writer(move || log.writer())`.
    pub fn writer(self: &Arc<Self>) -> LogWriter {
        LogWriter(self.clone())
    }
}

impl LogState {
    fn point_stderr(&self) -> io::Result<()> {
        nix::unistd::dup2(self.file.as_raw_fd(), 2).map(|_| ()).map_err(io::Error::from)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = open_log(&self.path)?;
        self.written = 0;
        if self.follow_stderr {
            self.point_stderr()?;
        }
        Ok(())
    }
}

/// One handle on a [`CappedLog`]; each `write` is one record.
pub struct LogWriter(Arc<CappedLog>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        // Bytes written to fd 2 directly (not through us) also count.
        if let Ok(m) = st.file.metadata() {
            st.written = st.written.max(m.len());
        }
        if st.written > 0 && st.written + buf.len() as u64 > st.max && st.rotate().is_err() {
            // Cannot rotate (e.g. the directory is read-only): drop the line rather than grow.
            return Ok(buf.len());
        }
        let take = buf.len().min((st.max - st.written.min(st.max)) as usize);
        st.file.write_all(&buf[..take])?;
        st.written += take as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An error and its causes (`source()`, outermost first) on one line, joined by `": "`, each
/// cause once: a cause whose text the line already holds (an outer message that quotes its
/// source, as thiserror's `{source}` does, or a context repeating a library's message) or
/// whose text is empty is skipped. Every binary prints its `error:` line with this, so a
/// typed error can keep its cause as a `#[source]` and still read as one sentence.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !s.is_empty() && !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message that quotes its source (thiserror's `"…: {source}"`) above a plain one.
    #[derive(Debug)]
    struct Quoting(std::io::Error);
    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "state file /x cannot be opened: {}; it was left untouched", self.0)
        }
    }
    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    /// A context above it.
    #[derive(Debug)]
    struct Context(&'static str, Box<dyn std::error::Error + 'static>);
    impl std::fmt::Display for Context {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Context {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.1)
        }
    }

    #[test]
    fn report_names_each_cause_once() {
        let io = || std::io::Error::other("bad magic");
        let e = Context("opening the vTPM", Box::new(Quoting(io())));
        assert_eq!(report(&e), "opening the vTPM: state file /x cannot be opened: bad magic; it was left untouched");
        // A cause the message does not quote is still named, in order.
        let e = Context("binding listeners", Box::new(Context("/run/x.sock", Box::new(io()))));
        assert_eq!(report(&e), "binding listeners: /run/x.sock: bad magic");
        // An empty message adds no separator.
        let e = Context("", Box::new(io()));
        assert_eq!(report(&e), "bad magic");
    }

    #[test]
    fn bursts_then_suppresses_then_reports_the_count() {
        let l = RateLimiter::new();
        let allowed: Vec<Option<u64>> = (0..100).map(|_| l.check_at(7)).collect();
        assert_eq!(allowed.iter().filter(|a| a.is_some()).count() as u64, BURST);
        assert_eq!(allowed[0], Some(0));
        // The next window lets a line through and reports what was suppressed.
        assert_eq!(l.check_at(7 + WINDOW_SECS), Some(100 - BURST));
        assert_eq!(l.check_at(7 + WINDOW_SECS), Some(0));
    }

    #[test]
    fn the_macros_limit_per_call_site() {
        for _ in 0..1000 {
            guest_warn!(n = 1, "a");
            guest_info!("b");
            guest_error!(error = %"x", "c");
            guest_debug!("d");
            host_warn!(n = 2, "e");
            host_info!("f");
            host_error!(error = %"y", "g");
            host_debug!("h");
        }
    }

    #[test]
    fn capped_log_rotates_and_never_exceeds_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vtpm.log");
        std::fs::write(&path, vec![b'x'; 3000]).unwrap();
        let log = CappedLog::open(&path, 4096, false).unwrap();
        let mut w = log.writer();
        let line = [b'y'; 100];
        for _ in 0..10_000 {
            w.write_all(&line).unwrap();
            let cur = std::fs::metadata(&path).unwrap().len();
            assert!(cur <= 4096, "current log {cur} bytes");
        }
        let old = std::fs::metadata(dir.path().join("vtpm.log.1")).unwrap().len();
        assert!(old <= 4096 && old > 4096 - 100, "previous log {old} bytes");
        // Only the two files exist: nothing else accumulates.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A record larger than the cap is cut, not written whole.
        w.write_all(&vec![b'z'; 10_000]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
    }
}
