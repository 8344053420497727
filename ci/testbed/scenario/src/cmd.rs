//! Running a program with a time limit. The child gets its own process group; when the limit
//! (the caller's, cut to what the phase and the scenario have left) runs out, the whole group is
//! killed with SIGKILL. Output goes to files (not pipes): `xl create` and `xl-vtpm` leave daemons
//! behind that would hold a pipe open.

use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::runner::Cx;

/// What a finished (or killed) command left.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code as a shell reports it: the code, 128+signal, 124 when the limit killed it,
    /// 127 when it could not be started.
    pub rc: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.rc == 0
    }
    /// stdout followed by stderr (one file when the command merged them).
    pub fn all(&self) -> String {
        let mut s = self.stdout.clone();
        s.push_str(&self.stderr);
        s
    }
    /// The last `n` lines of stdout + stderr.
    pub fn tail(&self, n: usize) -> String {
        tail_lines(&self.all(), n)
    }
    /// The last `n` lines joined by spaces (one-line reasons).
    pub fn tail1(&self, n: usize) -> String {
        tail_lines(&self.all(), n).replace('\n', " ")
    }
    /// `WHAT exited RC: <last 3 lines>` (a failed step's reason).
    pub fn failed(&self, what: &str) -> String {
        format!("{what} exited {}: {}", self.rc, self.tail1(3))
    }
}

pub fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A command to run. `save` keeps its output in a named file (the log dump at the end
/// collects `/tmp/xl-*.out`); `merge` sends stderr to the same file as stdout.
pub struct Cmd {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    limit: Duration,
    save: Option<PathBuf>,
    save_err: Option<PathBuf>,
    merge: bool,
    inherit: bool,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Cmd {
    pub fn new<S: AsRef<str>>(argv: &[S]) -> Self {
        Cmd {
            argv: argv.iter().map(|a| a.as_ref().to_string()).collect(),
            env: Vec::new(),
            limit: Duration::from_secs(60),
            save: None,
            save_err: None,
            merge: true,
            inherit: false,
        }
    }
    /// `Cmd::new` from a space-separated line (no quoting: for fixed argument lists).
    pub fn sh(line: &str) -> Self {
        let v: Vec<&str> = line.split_whitespace().collect();
        Self::new(&v)
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn secs(mut self, s: u64) -> Self {
        self.limit = Duration::from_secs(s);
        self
    }
    /// stdout and stderr into `path`.
    pub fn save(mut self, path: &str) -> Self {
        self.save = Some(path.into());
        self
    }
    /// stdout into `out`, stderr into `err`.
    pub fn save_split(mut self, out: &str, err: &str) -> Self {
        self.save = Some(out.into());
        self.save_err = Some(err.into());
        self.merge = false;
        self
    }
    /// stderr kept apart from stdout (`Output::stdout` is what the program printed on stdout).
    pub fn split(mut self) -> Self {
        self.merge = false;
        self
    }

    /// Output straight onto the scenario's own stdout (live on the console); `Output` then has none.
    pub fn inherit(mut self) -> Self {
        self.inherit = true;
        self
    }

    /// Runs it under the context's deadlines.
    pub fn run(self, cx: &Cx) -> Output {
        let (limit, cut) = cx.limit(self.limit);
        let out = self.run_for(limit);
        if out.timed_out && cut {
            cx.note_overrun(&format!(
                "{} killed after {:.1} s",
                self.argv.join(" "),
                out.elapsed.as_secs_f64()
            ));
        }
        out
    }

    /// Runs it under the context's deadlines; if it still runs after `after`, `watch` is called
    /// once, beside it, with the time it has run (a snapshot of what it waits for).
    pub fn run_watched(
        self,
        cx: &Cx,
        after: Duration,
        watch: impl FnOnce(Duration) + Send,
    ) -> Output {
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let t = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    if t.elapsed() >= after {
                        watch(t.elapsed());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let o = self.run(cx);
            done.store(true, Ordering::Relaxed);
            o
        })
    }

    /// Runs it with exactly `limit` (no context: unit tests, the launcher).
    pub fn run_for(&self, limit: Duration) -> Output {
        let t0 = Instant::now();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = std::env::temp_dir().join(format!("xvtpm-testbed-{}-{n}", std::process::id()));
        let out_path = self
            .save
            .clone()
            .unwrap_or_else(|| tmp.with_extension("out"));
        let err_path = if self.merge {
            None
        } else {
            Some(
                self.save_err
                    .clone()
                    .unwrap_or_else(|| tmp.with_extension("err")),
            )
        };
        let spawn = || -> std::io::Result<std::process::Child> {
            let f = fs::File::create(&out_path)?;
            let e = match &err_path {
                Some(p) => fs::File::create(p)?,
                None => f.try_clone()?,
            };
            let mut c = Command::new(&self.argv[0]);
            c.args(&self.argv[1..])
                .stdin(Stdio::null())
                .process_group(0);
            if self.inherit {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                c.stdout(Stdio::inherit()).stderr(Stdio::inherit());
            } else {
                c.stdout(f).stderr(e);
            }
            for (k, v) in &self.env {
                c.env(k, v);
            }
            c.spawn()
        };
        let mut child = match spawn() {
            Ok(c) => c,
            Err(e) => {
                return Output {
                    rc: 127,
                    stdout: String::new(),
                    stderr: format!("{}: cannot run: {e}\n", self.argv[0]),
                    timed_out: false,
                    elapsed: t0.elapsed(),
                };
            }
        };
        let end = t0 + limit;
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(_) => break None,
            }
            if Instant::now() >= end {
                timed_out = true;
                kill_group(child.id());
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rc = if timed_out {
            124
        } else {
            match status {
                Some(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
                None => 255,
            }
        };
        let read = |p: &PathBuf| {
            String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).replace('\r', "")
        };
        let stdout = read(&out_path);
        let stderr = err_path.as_ref().map(read).unwrap_or_default();
        if self.save.is_none() {
            let _ = fs::remove_file(&out_path);
        }
        if let (Some(p), None) = (&err_path, &self.save_err) {
            let _ = fs::remove_file(p);
        }
        Output {
            rc,
            stdout,
            stderr,
            timed_out,
            elapsed: t0.elapsed(),
        }
    }
}

/// SIGKILL to the process group `pid` leads (the children `Cmd` starts lead their own).
pub fn kill_group(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// A signal to one process (no group).
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), sig);
    }
}

/// Stops a child we started: SIGTERM, up to `secs` (cut to the deadlines) to exit, then SIGKILL;
/// false if it needed the SIGKILL.
pub fn stop_child(cx: &Cx, child: &mut std::process::Child, secs: u64) -> bool {
    signal(child.id(), Signal::SIGTERM);
    let ok = cx.wait_until(secs, || !matches!(child.try_wait(), Ok(None)));
    if !ok {
        kill_child(child);
    }
    ok
}

/// SIGKILL to a child we started, and reaps it.
pub fn kill_child(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The process exists and is not a zombie.
pub fn pid_up(pid: Option<u32>) -> bool {
    let Some(pid) = pid else { return false };
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match s.rfind(") ") {
            Some(i) => !s[i + 2..].starts_with('Z'),
            None => true,
        },
        Err(_) => false,
    }
}

/// `prefix` in front of every line of `text`, printed: `[prefix] line`.
pub fn show(prefix: &str, text: &str) {
    for l in text.lines() {
        println!("[{prefix}] {l}");
    }
}

/// The same for the last `n` lines.
pub fn show_tail(prefix: &str, text: &str, n: usize) {
    show(prefix, &tail_lines(text, n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Runner;

    #[test]
    fn the_watch_sees_a_command_that_is_still_running_and_not_one_that_ended() {
        let r = Runner::new(Duration::from_secs(600));
        let seen = std::sync::Mutex::new(None);
        let o = Cmd::new(&["sh", "-c", "sleep 1; echo done"])
            .secs(30)
            .run_watched(&r.cx, Duration::from_millis(200), |t| {
                *seen.lock().unwrap() = Some(t);
            });
        assert_eq!((o.rc, o.stdout.as_str()), (0, "done\n"));
        assert!(
            seen.lock()
                .unwrap()
                .is_some_and(|t| t >= Duration::from_millis(200))
        );
        let quick = std::sync::atomic::AtomicBool::new(false);
        let o = Cmd::new(&["true"]).run_watched(&r.cx, Duration::from_secs(20), |_| {
            quick.store(true, Ordering::Relaxed);
        });
        assert!(o.ok() && !quick.load(Ordering::Relaxed));
    }

    #[test]
    fn stop_child_ends_a_child_that_ignores_sigterm() {
        let r = Runner::new(Duration::from_secs(600));
        let mut polite = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(stop_child(&r.cx, &mut polite, 10));
        let mut deaf = Command::new("sh")
            .args([
                "-c",
                "trap '' TERM; echo ready; while :; do sleep 0.1; done",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(deaf.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(!stop_child(&r.cx, &mut deaf, 1));
        assert!(!pid_up(Some(deaf.id())));
    }
}
