//! The end-to-end fixture: a [`Stack`] is one real swtpm (the physical TPM),
//! one real `vtpmmgr serve`, and the `xl-vtpm` CLI to create and run real
//! `vtpm-domain` processes (libtpms). Nothing is mocked.
//!
//! On drop every process the stack started is killed by PID; if the test is
//! panicking, the manager's log and every vTPM's log are printed first (the
//! swtpm log is printed by [`testkit::Swtpm`]).

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{Swtpm, bin_path};
use uuid::Uuid;

/// A running local stack.
pub struct Stack {
    /// The "physical" TPM.
    pub swtpm: Swtpm,
    /// Working directory (state, run, logs).
    pub dir: tempfile::TempDir,
    mgr: Option<Child>,
    opts: Options,
    proxy: Option<testkit::delay::DelayProxy>,
    /// The CA that issued the physical TPM's EK certificates (with [`Options::ek_cert`]).
    pub ek_ca: Option<testkit::LocalCa>,
}

/// How to run the stack.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Put a delaying proxy (this much per TPM command) between the manager
    /// and swtpm, to model a discrete TPM.
    pub tpm_delay: Option<Duration>,
    /// Extra arguments for `vtpmmgr serve`.
    pub mgr_args: Vec<String>,
    /// Manufacture the physical TPM with EK certificates from a private local CA
    /// ([`Stack::ek_ca`], standing in for the TPM vendor's CA).
    pub ek_cert: bool,
}

/// A vTPM as `xl-vtpm vtpm show --json` reports it.
#[derive(Debug, Clone)]
pub struct VtpmHandle {
    /// UUID.
    pub uuid: Uuid,
    /// Process id (when running).
    pub pid: Option<u32>,
    /// TCP data port (when running on TCP).
    pub port: Option<u16>,
    /// Unix data socket (when running on the default Unix sockets; control: + `.ctrl`).
    pub socket: Option<PathBuf>,
    /// The state file.
    pub state_file: PathBuf,
}

impl VtpmHandle {
    /// TCTI string for tpm2-tools / tss-esapi (TCP if it listens there, else its Unix socket).
    pub fn tcti(&self) -> String {
        match (self.port, &self.socket) {
            (Some(p), _) => format!("swtpm:host=127.0.0.1,port={p}"),
            (None, Some(s)) => format!("swtpm:path={}", s.display()),
            (None, None) => panic!("vTPM is not running"),
        }
    }

    /// One raw command on a fresh data connection (TCP or Unix), and its response.
    pub fn command(&self, packet: &[u8]) -> Vec<u8> {
        match (self.port, &self.socket) {
            (Some(p), _) => raw_command(p, packet),
            (None, Some(path)) => {
                let mut s = std::os::unix::net::UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(packet).unwrap();
                read_response(&mut s)
            }
            (None, None) => panic!("vTPM is not running"),
        }
    }
}

/// The explicit TCP listener the fixture's vTPMs use (raw-socket tests speak TCP).
pub const TCP_LISTEN: [&str; 2] = ["--listen", "tcp:127.0.0.1:0"];

impl Stack {
    /// swtpm + a provisioned manager.
    pub fn start() -> Stack {
        let s = Stack::start_unprovisioned();
        let out = s.xl(&["mgr", "provision", "--yes", "--pcrs", "0-7"]);
        assert!(out.status.success(), "provision failed: {}", String::from_utf8_lossy(&out.stderr));
        s
    }

    /// swtpm + a manager that has not been provisioned.
    pub fn start_unprovisioned() -> Stack {
        Stack::start_unprovisioned_with(Options::default())
    }

    /// swtpm + a provisioned manager run with `opts`.
    pub fn start_with(opts: Options) -> Stack {
        let s = Stack::start_unprovisioned_with(opts);
        let out = s.xl(&["mgr", "provision", "--yes", "--pcrs", "0-7"]);
        assert!(out.status.success(), "provision failed: {}", String::from_utf8_lossy(&out.stderr));
        s
    }

    /// swtpm + an unprovisioned manager run with `opts`.
    pub fn start_unprovisioned_with(opts: Options) -> Stack {
        let ek_ca = opts.ek_cert.then(testkit::LocalCa::new);
        let swtpm = match &ek_ca {
            Some(ca) => Swtpm::start_manufactured(ca),
            None => Swtpm::start(),
        };
        let dir = testkit::tempdir();
        let proxy = opts.tpm_delay.map(|d| testkit::delay::DelayProxy::start(swtpm.port(), d));
        let mut s = Stack { swtpm, dir, mgr: None, opts, proxy, ek_ca };
        s.start_manager();
        s
    }

    /// TPM commands the manager sent through the delay proxy so far (needs `tpm_delay`).
    pub fn tpm_commands(&self) -> u64 {
        self.proxy.as_ref().expect("a stack with tpm_delay").commands()
    }

    /// The TCTI the manager uses (through the delay proxy, if any).
    pub fn mgr_tcti(&self) -> String {
        self.proxy.as_ref().map(|p| p.tcti()).unwrap_or_else(|| self.swtpm.tcti())
    }

    /// The runtime directory.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn mgr_log_path(&self) -> PathBuf {
        self.dir.path().join("vtpmmgr.log")
    }

    /// The manager's log so far.
    pub fn mgr_log(&self) -> String {
        std::fs::read_to_string(self.mgr_log_path()).unwrap_or_default()
    }

    /// Starts `vtpmmgr serve`; waits until its admin socket answers.
    /// Returns false (and reaps it) if the manager exited instead.
    pub fn try_start_manager(&mut self) -> bool {
        let _ = std::fs::remove_file(self.run_dir().join("admin.sock"));
        let mut child = self.mgr_command().spawn().expect("spawn vtpmmgr");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if std::os::unix::net::UnixStream::connect(self.run_dir().join("admin.sock")).is_ok() {
                self.mgr = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("vtpmmgr did not come up in 20 s:\n{}", self.mgr_log());
    }

    /// The `vtpmmgr serve` command of this stack (its log appended to [`mgr_log`](Self::mgr_log)).
    pub fn mgr_command(&self) -> Command {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.mgr_log_path()).unwrap();
        let mut c = Command::new(bin_path("vtpmmgr"));
        c.arg("--tcti")
            .arg(self.mgr_tcti())
            .arg("--state-dir")
            .arg(self.state_dir().join("mgr"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("serve")
            .args(&self.opts.mgr_args)
            .env("XVTPM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        c
    }

    /// The running manager's pid.
    pub fn mgr_pid(&self) -> Option<u32> {
        self.mgr.as_ref().map(|c| c.id())
    }

    /// Kills the manager with SIGKILL and reaps it.
    pub fn kill9_manager(&mut self) {
        if let Some(mut c) = self.mgr.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the manager and asserts it came up.
    pub fn start_manager(&mut self) {
        assert!(self.try_start_manager(), "vtpmmgr exited at start:\n{}", self.mgr_log());
    }

    /// Stops the manager (SIGTERM, wait).
    pub fn stop_manager(&mut self) {
        if let Some(mut c) = self.mgr.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Runs `xl-vtpm` with this stack's directories.
    pub fn xl(&self, args: &[&str]) -> Output {
        Command::new(bin_path("xl-vtpm"))
            .args(args)
            .env("XVTPM_RUN_DIR", self.run_dir())
            .env("XVTPM_STATE_DIR", self.state_dir())
            .env("XVTPM_VTPM_DOMAIN", bin_path("vtpm-domain"))
            .stdin(Stdio::null())
            .output()
            .expect("run xl-vtpm")
    }

    /// Runs `xl-vtpm ... --json` and parses stdout, asserting success.
    pub fn xl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.xl(&a);
        assert!(
            out.status.success(),
            "xl-vtpm {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    /// The handle of `xl-vtpm vtpm create|start|show --json` output (a vTPM object, docs/json.md).
    pub fn handle(v: &serde_json::Value) -> VtpmHandle {
        VtpmHandle {
            uuid: v["uuid"].as_str().unwrap().parse().unwrap(),
            pid: v["runtime"]["pid"].as_u64().map(|p| p as u32),
            port: v["runtime"]["tcp_ports"][0][0].as_u64().map(|p| p as u16),
            socket: v["runtime"]["socket"].as_str().map(PathBuf::from),
            state_file: v["state_file"].as_str().unwrap().into(),
        }
    }

    /// Creates and starts a vTPM listening on loopback TCP ([`TCP_LISTEN`]; root may
    /// connect), recorded so that [`Stack::start_vtpm`] keeps it there.
    pub fn create_vtpm(&self) -> VtpmHandle {
        Self::handle(&self.xl_json(&["vtpm", "create", TCP_LISTEN[0], TCP_LISTEN[1]]))
    }

    /// Creates and starts a vTPM with `xl-vtpm vtpm create ARGS` (no `--listen`: the
    /// default Unix sockets).
    pub fn create_vtpm_with(&self, args: &[&str]) -> VtpmHandle {
        let mut a = vec!["vtpm", "create"];
        a.extend_from_slice(args);
        Self::handle(&self.xl_json(&a))
    }

    /// Starts a stopped vTPM.
    pub fn start_vtpm(&self, uuid: &Uuid) -> VtpmHandle {
        Self::handle(&self.xl_json(&["vtpm", "start", &uuid.to_string()]))
    }

    /// Stops a vTPM.
    pub fn stop_vtpm(&self, uuid: &Uuid) {
        self.xl_json(&["vtpm", "stop", &uuid.to_string()]);
    }

    /// The log of a vTPM.
    pub fn vtpm_log(&self, uuid: &Uuid) -> String {
        std::fs::read_to_string(self.state_dir().join("vtpms").join(uuid.to_string()).join("vtpm.log")).unwrap_or_default()
    }

    fn running_pids(&self) -> Vec<u32> {
        let mut pids = vec![];
        if let Ok(rd) = std::fs::read_dir(self.run_dir().join("vtpms")) {
            for e in rd.flatten() {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(e.path()).unwrap_or_default())
                    && let Some(p) = v["pid"].as_u64() {
                        pids.push(p as u32);
                    }
            }
        }
        pids
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== vtpmmgr log =====\n{}", self.mgr_log());
            if let Ok(rd) = std::fs::read_dir(self.state_dir().join("vtpms")) {
                for e in rd.flatten() {
                    let log = std::fs::read_to_string(e.path().join("vtpm.log")).unwrap_or_default();
                    eprintln!("===== vtpm {} log (last 40 lines) =====", e.file_name().to_string_lossy());
                    let lines: Vec<&str> = log.lines().collect();
                    eprintln!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
                }
            }
        }
        for pid in self.running_pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(mut c) = self.mgr.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends one raw packet on a fresh data connection and reads one response
/// (header first, then the declared size).
pub fn raw_command(port: u16, packet: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect data port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(packet).unwrap();
    read_response(&mut s)
}

/// Reads one TPM response from a stream.
pub fn read_response(s: &mut impl Read) -> Vec<u8> {
    try_read_response(s).expect("reading a TPM response")
}

/// Reads one TPM response, or the I/O error (e.g. the vTPM was killed).
pub fn try_read_response(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut hdr = [0u8; 10];
    s.read_exact(&mut hdr)?;
    let size = u32::from_be_bytes(hdr[2..6].try_into().unwrap()) as usize;
    assert!((10..=4096).contains(&size), "response size {size}");
    let mut rsp = hdr.to_vec();
    rsp.resize(size, 0);
    s.read_exact(&mut rsp[10..])?;
    Ok(rsp)
}

/// The response code of a response.
pub fn rc(rsp: &[u8]) -> u32 {
    tpm_wire::response_code(rsp).expect("a response has a 10-byte header")
}

pub use tpm_wire::{tpm2_get_random as get_random, tpm2_read_public as read_public};

/// Runs a tpm2-tools command against `tcti`, asserting success; returns stdout.
pub fn tpm2(tcti: &str, args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).env("TPM2TOOLS_TCTI", tcti).output().expect("run tpm2-tools");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `pid` no longer names a live process.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !xvtpm_fsutil::pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// True if `p` exists.
pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// One manager-protocol request over a manager socket (a vTPM's own socket or the admin
/// socket) and its decoded reply, as a raw client would speak it.
pub fn mgr_call<Req: serde::Serialize, Rep: for<'de> serde::Deserialize<'de>>(path: &Path, req: &Req) -> Rep {
    try_mgr_call(path, req).unwrap_or_else(|e| panic!("manager call on {}: {e}", path.display()))
}

/// [`mgr_call`] that reports a failure to connect or a connection the manager closed (e.g. a
/// socket it is unbinding) as an error instead of panicking.
pub fn try_mgr_call<Req: serde::Serialize, Rep: for<'de> serde::Deserialize<'de>>(path: &Path, req: &Req) -> std::io::Result<Rep> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    Ok(vtpm_proto::mgr_io::call(&mut s, req)?)
}

/// The real uid and gid of `pid`.
pub fn ids(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// Sets the soft RLIMIT_NOFILE of `pid`. `prlimit` runs as the vTPM's own uid and gid (root
/// would need CAP_SYS_RESOURCE for another uid's process, which a container may not grant);
/// the hard limit stays, so the soft one can be raised back.
pub fn set_nofile(pid: u32, n: u64) {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = ids(pid);
    let st = Command::new("prlimit").uid(uid).gid(gid).arg("--pid").arg(pid.to_string()).arg(format!("--nofile={n}:")).status().unwrap();
    assert!(st.success(), "prlimit --pid {pid} --nofile={n}:");
}

/// Writes a host PCR policy file for `xl-vtpm verify --host-pcrs-policy` (`{"0": "hex", …}`)
/// holding exactly the host PCR values bundle `b` carries (SHA-256 bank).
pub fn write_host_policy(path: &Path, b: &vtpm_proto::evidence::Bundle) {
    let pcrs: Vec<u32> = b.host_pcrs.selection.iter().flat_map(|sel| sel.indices().collect::<Vec<_>>()).collect();
    let m: serde_json::Map<String, serde_json::Value> = pcrs
        .iter()
        .zip(&b.host_pcrs.values)
        .map(|(i, v)| (i.to_string(), serde_json::Value::String(v.iter().map(|x| format!("{x:02x}")).collect())))
        .collect();
    std::fs::write(path, serde_json::to_vec(&m).unwrap()).unwrap();
}
