//! Every process the harness starts is recorded here (and in a PID file that
//! `scripts/bench.sh` reads if the harness itself dies) and killed by PID on
//! drop, also when a benchmark fails.
//!
//! The harness makes itself a child subreaper, so `vtpm-domain` processes that
//! `xl-vtpm` spawns and leaves behind become our children when `xl-vtpm`
//! exits: we can reap them and know for sure when they are gone.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Marks this process as a child subreaper (orphaned descendants are
/// re-parented to us instead of to PID 1).
pub fn become_subreaper() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// The processes started by the harness.
pub struct Procs {
    pidfile: PathBuf,
    children: Vec<Child>,
    /// PIDs we did not spawn directly (vtpm-domain via xl-vtpm), still running.
    adopted: Vec<u32>,
}

impl Procs {
    /// Starts an empty set; PIDs are appended to `pidfile`.
    pub fn new(pidfile: &Path) -> Procs {
        Procs {
            pidfile: pidfile.to_path_buf(),
            children: vec![],
            adopted: vec![],
        }
    }

    fn record(&self, pid: u32) {
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.pidfile)
        {
            let _ = writeln!(f, "{pid}");
        }
    }

    /// Spawns `cmd` and records it.
    pub fn spawn(&mut self, cmd: &mut Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let pid = child.id();
        self.record(pid);
        self.children.push(child);
        Ok(pid)
    }

    /// Spawns `cmd` with stdout piped and records it; returns the PID and the pipe.
    pub fn spawn_piped(&mut self, cmd: &mut Command) -> Result<(u32, std::process::ChildStdout)> {
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let pid = child.id();
        self.record(pid);
        let out = child.stdout.take().expect("stdout is piped");
        self.children.push(child);
        Ok((pid, out))
    }

    /// Records a process started on our behalf (e.g. by xl-vtpm).
    pub fn adopt(&mut self, pid: u32) {
        self.record(pid);
        self.adopted.push(pid);
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; reaps.
    pub fn stop(&mut self, pid: u32, grace: Duration) {
        let p = Pid::from_raw(pid as i32);
        let _ = kill(p, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            if self.reaped_or_gone(pid) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = kill(p, Signal::SIGKILL);
                let _ = waitpid(p, None);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.children.retain(|c| c.id() != pid);
        self.adopted.retain(|&a| a != pid);
    }

    fn reaped_or_gone(&mut self, pid: u32) -> bool {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => false,
            Ok(_) => true,
            // ECHILD: not our child (anymore); check /proc.
            Err(_) => !Path::new(&format!("/proc/{pid}")).exists(),
        }
    }

    /// Stops several processes in parallel: SIGTERM to all, then wait.
    pub fn stop_many(&mut self, pids: &[u32], grace: Duration) {
        for &pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        for &pid in pids {
            self.stop(pid, grace);
        }
    }

    /// Stops everything still running.
    pub fn stop_all(&mut self) {
        let mut pids: Vec<u32> = self.adopted.clone();
        pids.extend(self.children.iter().map(|c| c.id()));
        self.stop_many(&pids, Duration::from_secs(2));
        reap_orphans();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Reaps any exited orphans re-parented to us.
pub fn reap_orphans() {
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if matches!(s, nix::sys::wait::WaitStatus::StillAlive) {
            break;
        }
    }
}

/// A free TCP port P on 127.0.0.1 with P+1 free too (swtpm's data/control pair).
pub fn free_port_pair() -> Result<u16> {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let p = l.local_addr()?.port();
        if p == u16::MAX {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port pair")
}

/// Connects to 127.0.0.1:`port`, retrying every 200 µs until `timeout`.
pub fn connect_retry(port: u16, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => bail!("port {port} did not answer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}
