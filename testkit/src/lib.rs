//! Test helpers shared by every crate of the workspace (used as a dev-dependency only).
//!
//! # One real swtpm per test
//!
//! [`Swtpm::start`] spawns its own `swtpm socket --tpm2` process with a private state directory
//! and a free TCP port pair on 127.0.0.1. Tests never share a TPM, because:
//!
//! * TPM state (PCRs, transient objects, sessions, NV, owner seeds) would otherwise leak between
//!   tests, and the outcome would depend on test order and on `cargo test`'s parallelism;
//! * swtpm serves one client connection at a time, so a shared instance would serialise tests;
//! * a TPM without a resource manager has only ~3 transient object slots: one test leaking a
//!   handle must not break the next.
//!
//! Starting swtpm costs a few tens of milliseconds, which is cheap compared with the TPM
//! operations the tests run. Talk to it with the TCTI string [`Swtpm::tcti`]
//! (`swtpm:host=127.0.0.1,port=P`; never `mssim:` — that TCTI speaks the Microsoft simulator's
//! platform protocol to port P+1, which swtpm does not understand).
//!
//! # Logs are kept
//!
//! swtpm writes its log (level 20) and its stdout/stderr into the state directory. If the test
//! thread is panicking when the [`Swtpm`] is dropped, the log is printed to stderr and the
//! directory is **kept** (its path is printed); set `XVTPM_KEEP_TEST_DIRS=1` to keep it always.
//!
//! # Process handling
//!
//! The process is stopped by PID (SIGTERM, then SIGKILL after 2 s) on drop — never by name, so
//! parallel tests and other swtpm instances on the machine are left alone.
//!
//! # One real PostgreSQL cluster per test
//!
//! [`pg::PgCluster::start`] runs a private PostgreSQL server (a copy of a once-per-machine
//! `initdb` template) on a Unix socket in its own temporary directory, as the `postgres` user
//! when the test runs as root; see the [`pg`] module.
//!
//! # Workspace binaries
//!
//! [`bin_path`] finds binaries of the workspace (`vtpm-domain`, `vtpmmgr`, `xl-vtpm`, …) next to
//! the running test executable (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).

#![forbid(unsafe_code)]

pub mod delay;
pub mod pg;
pub mod qmp;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long to wait for swtpm to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Attempts at finding a free port pair that swtpm can actually bind.
const PORT_ATTEMPTS: usize = 20;

/// Lines of the swtpm log printed when a test panics (the full log is kept on disk).
const PANIC_LOG_LINES: usize = 150;
/// `CMD_GET_CAPABILITY` of swtpm's control channel.
const CMD_GET_CAPABILITY: u32 = 0x0000_0001;

/// A fresh temporary directory (removed on drop), prefix `xvtpm-test-`.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xvtpm-test-")
        .tempdir()
        .expect("create temporary directory")
}

/// Path of workspace binary `name`, next to the running test executable.
///
/// `current_exe()` is `target/<profile>/deps/<test>-<hash>`; binaries live in
/// `target/<profile>/`. Panics with a hint when the binary has not been built (integration
/// tests of another package do not build it automatically: run e.g.
/// `cargo build -p vtpm-domain` first, or `cargo test --workspace`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a parent")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "binary {name:?} not found at {}; build it first (cargo build --bins / cargo test --workspace)",
        p.display()
    );
    p
}

/// A running `swtpm socket --tpm2` instance owned by one test.
pub struct Swtpm {
    child: Option<Child>,
    pid: u32,
    port: u16,
    state: Option<tempfile::TempDir>,
    state_path: PathBuf,
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swtpm")
            .field("pid", &self.pid)
            .field("port", &self.port)
            .field("state_dir", &self.state_path)
            .finish()
    }
}

impl Swtpm {
    /// Starts a new swtpm with a fresh state directory on a free port pair.
    /// Panics (with the swtpm log) if it cannot be started.
    pub fn start() -> Swtpm {
        let state = tempdir();
        let state_path = state.path().to_path_buf();
        let mut s = Swtpm {
            child: None,
            pid: 0,
            port: 0,
            state: Some(state),
            state_path,
        };
        s.spawn_any_port();
        s
    }

    /// Starts a new swtpm whose state was first *manufactured* with
    /// `swtpm_setup --tpm2 --create-ek-cert`: it holds EKs (RSA-2048 at `0x81010001`) and EK
    /// certificates at the TCG NV indices (`0x01c00002` for the RSA EK), issued by `ca` — a
    /// private swtpm local CA that plays the TPM vendor's CA in tests.
    pub fn start_manufactured(ca: &LocalCa) -> Swtpm {
        let state = tempdir();
        let state_path = state.path().to_path_buf();
        ca.manufacture(&state_path);
        let mut s = Swtpm { child: None, pid: 0, port: 0, state: Some(state), state_path };
        s.spawn_any_port();
        s
    }

    /// TCTI configuration string for tss-esapi / tpm2-tools: `swtpm:host=127.0.0.1,port=P`.
    /// May change after [`Swtpm::restart`].
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// TPM command port (the control channel is `port() + 1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Control channel port.
    pub fn ctrl_port(&self) -> u16 {
        self.port + 1
    }

    /// PID of the swtpm process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// swtpm's state directory (`--tpmstate dir=`), also holding the logs.
    pub fn state_dir(&self) -> &Path {
        &self.state_path
    }

    /// swtpm's log file.
    pub fn log_path(&self) -> PathBuf {
        self.state_path.join("swtpm.log")
    }

    /// The log plus swtpm's captured stdout/stderr (empty strings if missing).
    pub fn log(&self) -> String {
        self.log_tail(usize::MAX)
    }

    /// The last `lines` lines of the log, plus swtpm's captured stdout/stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let log = read(self.log_path());
        let all: Vec<&str> = log.lines().collect();
        let skip = all.len().saturating_sub(lines);
        format!(
            "--- swtpm.log ({} of {} lines) ---\n{}\n--- swtpm stdout/stderr ---\n{}",
            all.len() - skip,
            all.len(),
            all[skip..].join("\n"),
            read(self.state_path.join("swtpm.out"))
        )
    }

    /// Stops swtpm (SIGTERM; SIGKILL after 2 s) and starts it again on the same state
    /// directory, like a host reboot: permanent state (seeds, NV) survives, PCRs are reset and
    /// transient objects and sessions are gone. Reuses the same ports when possible; re-read
    /// [`Swtpm::tcti`] afterwards.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        if self.try_spawn(port).is_err() {
            self.spawn_any_port();
        }
    }

    /// Stops the process (idempotent).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(self.pid as i32);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = kill(pid, Signal::SIGTERM);
            let t = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if t.elapsed() >= TERM_GRACE => {
                        let _ = kill(pid, Signal::SIGKILL);
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        } else {
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.state_path.join("swtpm.pid"));
    }

    fn spawn_any_port(&mut self) {
        let mut last_err = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let Some(port) = free_port_pair() else {
                continue;
            };
            match self.try_spawn(port) {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
        }
        panic!(
            "could not start swtpm after {PORT_ATTEMPTS} attempts: {last_err}\n{}",
            self.log()
        );
    }

    fn try_spawn(&mut self, port: u16) -> Result<(), String> {
        let dir = &self.state_path;
        let pid_file = dir.join("swtpm.pid");
        let _ = std::fs::remove_file(&pid_file);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("swtpm.out"))
            .map_err(|e| format!("open swtpm.out: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.display()))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--log")
            .arg(format!("file={},level=20", dir.join("swtpm.log").display()))
            .arg("--pid")
            .arg(format!("file={}", pid_file.display()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn swtpm (is it installed?): {e}"))?;
        let pid = child.id();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("swtpm on port {port} exited early: {status}"));
            }
            if pid_file.is_file() && ctrl_ready(port + 1) && data_port_open(port) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = child.wait();
                return Err(format!(
                    "swtpm on port {port} not ready after {READY_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child = Some(child);
        self.pid = pid;
        self.port = port;
        Ok(())
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
        let keep = std::env::var_os("XVTPM_KEEP_TEST_DIRS").is_some_and(|v| v != "0");
        if std::thread::panicking() {
            // Level-20 logs hex-dump every command: print the tail, keep the whole file.
            eprintln!(
                "==== swtpm (port {}) state dir {} ====\n{}",
                self.port,
                self.state_path.display(),
                self.log_tail(PANIC_LOG_LINES)
            );
        }
        if (keep || std::thread::panicking())
            && let Some(d) = self.state.take()
        {
            let p = d.keep();
            eprintln!("swtpm state kept in {}", p.display());
        }
    }
}

/// A port P such that P and P+1 were both free a moment ago (the OS-assigned ephemeral P).
fn free_port_pair() -> Option<u16> {
    let l = TcpListener::bind("127.0.0.1:0").ok()?;
    let port = l.local_addr().ok()?.port();
    if port == u16::MAX {
        return None;
    }
    let l2 = TcpListener::bind(("127.0.0.1", port + 1)).ok()?;
    drop((l, l2));
    Some(port)
}

fn data_port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Sends CMD_GET_CAPABILITY on the control channel and expects a TPM_SUCCESS result.
fn ctrl_ready(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(&CMD_GET_CAPABILITY.to_be_bytes()).is_err() {
        return false;
    }
    // Response: u32 result code, then the capability bitmap.
    let mut res = [0u8; 4];
    s.read_exact(&mut res).is_ok() && res == [0, 0, 0, 0]
}

/// A private swtpm local CA (`swtpm_localca`) in its own temporary directory: the stand-in for a
/// TPM vendor's EK CA. Its root certificate exists after the first [`Swtpm::start_manufactured`]
/// (swtpm_localca makes the root and an intermediate on first use).
pub struct LocalCa {
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("dir", &self.dir.path()).finish()
    }
}

impl Default for LocalCa {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalCa {
    /// An empty CA directory with the swtpm_setup / swtpm_localca configuration files.
    pub fn new() -> LocalCa {
        let dir = tempdir();
        let d = dir.path();
        std::fs::create_dir(d.join("ca")).expect("mkdir ca");
        let ca = d.join("ca");
        std::fs::write(
            d.join("swtpm-localca.conf"),
            format!(
                "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
                ca.display()
            ),
        )
        .expect("write swtpm-localca.conf");
        std::fs::write(d.join("swtpm-localca.options"), "--platform-manufacturer xvtpm-test\n--platform-version 2.1\n--platform-model swtpm\n")
            .expect("write swtpm-localca.options");
        std::fs::write(
            d.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {0}/swtpm-localca.conf\ncreate_certs_tool_options = {0}/swtpm-localca.options\nactive_pcr_banks = sha256\n",
                d.display()
            ),
        )
        .expect("write swtpm_setup.conf");
        LocalCa { dir }
    }

    /// The root CA certificate (PEM): the trust anchor a verifier is given (`--ek-ca`).
    pub fn root_cert(&self) -> PathBuf {
        self.dir.path().join("ca/swtpm-localca-rootca-cert.pem")
    }

    /// The intermediate (issuing) CA certificate (PEM) between the root and EK certificates.
    pub fn intermediate_cert(&self) -> PathBuf {
        self.dir.path().join("ca/issuercert.pem")
    }

    /// Runs `swtpm_setup --tpm2 --create-ek-cert` on `state_dir`.
    fn manufacture(&self, state_dir: &Path) {
        let out = Command::new("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(state_dir)
            .arg("--create-ek-cert")
            .arg("--overwrite")
            .arg("--config")
            .arg(self.dir.path().join("swtpm_setup.conf"))
            .arg("--logfile")
            .arg(state_dir.join("swtpm_setup.log"))
            .stdin(Stdio::null())
            .output()
            .expect("run swtpm_setup (is swtpm-tools installed?)");
        assert!(
            out.status.success(),
            "swtpm_setup failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(state_dir.join("swtpm_setup.log")).unwrap_or_default()
        );
        assert!(self.root_cert().is_file(), "swtpm_localca made no root certificate");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_stop_restart() {
        let mut t = Swtpm::start();
        assert!(t.tcti().starts_with("swtpm:host=127.0.0.1,port="));
        assert!(t.state_dir().is_dir());
        let pid = t.pid();
        t.restart();
        assert_ne!(pid, t.pid());
        assert!(data_port_open(t.port()));
        let dir = t.state_dir().to_path_buf();
        drop(t);
        assert!(!dir.exists(), "state dir removed on drop");
    }

    #[test]
    fn manufactured_swtpm_has_an_rsa_ek_certificate_from_the_local_ca() {
        let ca = LocalCa::new();
        let t = Swtpm::start_manufactured(&ca);
        let out = Command::new("tpm2_nvread")
            .args(["0x1c00002", "-o"])
            .arg(t.state_dir().join("ek.der"))
            .env("TPM2TOOLS_TCTI", t.tcti())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let der = std::fs::read(t.state_dir().join("ek.der")).unwrap();
        assert_eq!(der[0], 0x30, "a DER certificate");
        assert!(ca.intermediate_cert().is_file());
    }

    #[test]
    fn two_instances_do_not_collide() {
        let a = Swtpm::start();
        let b = Swtpm::start();
        assert_ne!(a.port(), b.port());
    }
}
