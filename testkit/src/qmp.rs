//! QEMU's machine protocol (QMP) over a Unix socket, for the tests that drive a real QEMU.
//!
//! [`Qmp::connect`] waits for QEMU's socket (failing at once, with QEMU's log, if QEMU exits
//! first), reads the greeting and leaves capabilities negotiation; [`Qmp::execute`] sends one
//! command and returns its `return` value, skipping the events QEMU sends in between.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// One QMP connection.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    log: PathBuf,
}

impl Qmp {
    /// Connects to the QMP socket `path` of `qemu`, waiting at most `wait` for it; `log` is
    /// QEMU's log, printed when QEMU exits or the connection is lost.
    pub fn connect(path: &Path, qemu: &mut Child, log: &Path, wait: Duration) -> Qmp {
        let log_text = || std::fs::read_to_string(log).unwrap_or_default();
        let deadline = Instant::now() + wait;
        let s = loop {
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            if let Some(st) = qemu.try_wait().unwrap() {
                panic!("qemu exited at start ({st}):\n{}", log_text());
            }
            assert!(Instant::now() < deadline, "no QMP socket from qemu in {wait:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        s.set_read_timeout(Some(wait)).unwrap();
        let mut q = Qmp { r: BufReader::new(s.try_clone().unwrap()), w: s, log: log.to_path_buf() };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.execute("qmp_capabilities");
        q
    }

    /// The next message (a reply or an event).
    pub fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        let read = self.r.read_line(&mut l);
        if !matches!(read, Ok(n) if n > 0) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("QMP connection lost ({read:?}): qemu died?\n{log}");
        }
        serde_json::from_str(&l).expect("QMP json")
    }

    /// Sends `cmd` without waiting for an answer (`quit`: QEMU may close the socket first).
    pub fn send(&mut self, cmd: &str) {
        let _ = writeln!(self.w, "{}", serde_json::json!({ "execute": cmd }));
    }

    /// Runs `cmd` without arguments; its `return` value.
    pub fn execute(&mut self, cmd: &str) -> serde_json::Value {
        self.execute_with(cmd, serde_json::json!({}))
    }

    /// Runs `cmd` with `args`; its `return` value (an `error` answer fails the test).
    pub fn execute_with(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        if let Err(e) = writeln!(self.w, "{}", serde_json::json!({ "execute": cmd, "arguments": args })) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("QMP {cmd}: cannot send ({e}): qemu died?\n{log}");
        }
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {cmd}: {v}");
        }
    }
}
