//! Local mode: each vTPM is a `vtpm-domain` process on this host serving
//! swtpm's protocol (for QEMU/KVM guests, tpm2-tools and tests).
//!
//! Layout:
//! - `<state-dir>/vtpms/<uuid>/state.xvts` — the sealed state (vtpm-domain writes it);
//! - `<state-dir>/vtpms/<uuid>/vtpm.log` — its log (never holds key material or command bytes);
//! - `<run-dir>/vtpms/<uuid>.json` — the running process (pid, ports).
//!
//! Every step that can fail after the manager created an identity is rolled
//! back, so a failed `create` leaves no identity, no state and no process.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, VTPM_GID, VTPM_UID_COUNT, VTPM_UID_FIRST, VtpmInfo};

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, NOT_FOUND, REFUSED};

/// Paths and binaries of local mode.
#[derive(Debug, Clone)]
pub struct Local {
    /// Persistent state directory.
    pub state_dir: PathBuf,
    /// Runtime directory (manager sockets, runtime records).
    pub run_dir: PathBuf,
    /// The vtpm-domain binary.
    pub vtpm_domain: PathBuf,
    /// Run each vTPM as its own uid with no-new-privileges and seccomp (see [`vtpm_uid`]);
    /// `false` only for debugging (`--no-sandbox`).
    pub sandbox: bool,
}

/// A running vTPM process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Runtime {
    /// vTPM UUID.
    pub uuid: Uuid,
    /// Process id.
    pub pid: u32,
    /// (data, control) TCP ports, if listening on TCP.
    pub tcp_ports: Vec<(u16, u16)>,
    /// Listener specs it was started with.
    pub listen: Vec<String>,
    /// Its log file.
    pub log: PathBuf,
}

/// Options of a new vTPM.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    /// A TPM 1.2 instead of TPM 2.0.
    pub tpm12: bool,
    /// An ECC P-256 endorsement key instead of RSA-2048.
    pub ek_ecc: bool,
}

/// One row of `vtpm list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Manager's record.
    #[serde(flatten)]
    pub info: VtpmInfo,
    /// "running" or "stopped".
    pub state: String,
    /// Runtime record when running.
    pub runtime: Option<Runtime>,
    /// The state file.
    pub state_file: PathBuf,
    /// The swtpm TCTI string for tpm2-tools, when on TCP.
    pub tcti: Option<String>,
    /// Domain mode: the vTPM domain's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_name: Option<String>,
    /// Domain mode: the running vTPM domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<crate::vtpmdom::DomainRuntime>,
}

/// How long a new vTPM may take to answer "ready".
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

use xvtpm_fsutil::pid_alive;

impl Local {
    /// The directory of one vTPM's persistent files.
    pub fn vtpm_dir(&self, uuid: &Uuid) -> PathBuf {
        self.state_dir.join("vtpms").join(uuid.to_string())
    }
    /// The sealed state file of a vTPM.
    pub fn state_file(&self, uuid: &Uuid) -> PathBuf {
        self.vtpm_dir(uuid).join("state.xvts")
    }
    fn runtime_file(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join("vtpms").join(format!("{uuid}.json"))
    }

    /// The runtime record of a vTPM whose process is alive.
    pub fn runtime(&self, uuid: &Uuid) -> Option<Runtime> {
        let bytes = fs::read(self.runtime_file(uuid)).ok()?;
        let rt: Runtime = serde_json::from_slice(&bytes).ok()?;
        pid_alive(rt.pid).then_some(rt)
    }

    fn find(&self, admin: &mut Admin, uuid: &Uuid) -> Result<VtpmInfo, CliError> {
        match admin.call(&AdminRequest::VtpmShow { uuid: *uuid })? {
            AdminReply::Vtpm(v) => Ok(v),
            other => Err(CliError::new(FAILURE, format!("unexpected reply {other:?}"))),
        }
    }

    /// Creates a vTPM identity in the manager and starts its process, which
    /// manufactures the TPM (EK included) and writes its first sealed state.
    pub fn create(&self, admin: &mut Admin, group: Option<String>, uuid: Option<Uuid>, listen: &[String], opts: &CreateOpts) -> Result<Runtime, CliError> {
        let info = match admin.call(&AdminRequest::VtpmCreate { group, uuid })? {
            AdminReply::Vtpm(v) => v,
            other => return Err(CliError::new(FAILURE, format!("unexpected reply {other:?}"))),
        };
        match self.spawn(admin, &info, listen, Some(opts)) {
            Ok(rt) => Ok(rt),
            Err(e) => {
                // Roll back: no identity, no state, no process.
                let _ = admin.call(&AdminRequest::VtpmDetach { uuid: info.uuid });
                let _ = admin.call(&AdminRequest::VtpmDel { uuid: info.uuid });
                let _ = fs::remove_dir_all(self.vtpm_dir(&info.uuid));
                Err(e)
            }
        }
    }

    /// Starts the process of an existing vTPM.
    pub fn start(&self, admin: &mut Admin, uuid: &Uuid, listen: &[String]) -> Result<Runtime, CliError> {
        let info = self.find(admin, uuid)?;
        if let Some(rt) = self.runtime(uuid) {
            return Err(CliError::new(REFUSED, format!("vTPM {uuid} is already running as process {}", rt.pid)));
        }
        self.spawn(admin, &info, listen, None)
    }

    fn spawn(&self, admin: &mut Admin, info: &VtpmInfo, listen: &[String], create: Option<&CreateOpts>) -> Result<Runtime, CliError> {
        let uuid = info.uuid;
        let dir = self.vtpm_dir(&uuid);
        fs::create_dir_all(&dir).map_err(|e| CliError::new(FAILURE, format!("creating {}: {e}", dir.display())))?;
        fs::create_dir_all(self.run_dir.join("vtpms")).map_err(|e| CliError::new(FAILURE, format!("creating run dir: {e}")))?;
        let log = dir.join("vtpm.log");
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| CliError::new(FAILURE, format!("opening {}: {e}", log.display())))?;
        let mut cmd = Command::new(&self.vtpm_domain);
        cmd.arg("--uuid").arg(uuid.to_string());
        cmd.arg("--state").arg(self.state_file(&uuid));
        cmd.arg("--mgr-socket").arg(&info.socket);
        for l in listen {
            cmd.arg("--listen").arg(l);
        }
        if self.sandbox {
            let uid = vtpm_uid(&self.state_dir.join("vtpms"), &dir, &uuid)?;
            cmd.arg("--uid").arg(uid.to_string()).arg("--gid").arg(VTPM_GID.to_string());
        } else {
            cmd.arg("--no-sandbox");
        }
        if let Some(o) = create {
            cmd.arg("--create");
            if o.tpm12 {
                cmd.arg("--tpm12");
            }
            if o.ek_ecc {
                cmd.arg("--ek").arg("ecc");
            }
        }
        // Own process group: a Ctrl-C in the admin's terminal must not kill vTPMs.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log_file);
        let mut child = cmd.spawn().map_err(|e| {
            CliError::new(FAILURE, format!("cannot run {}: {e} (install vtpm-domain or pass --vtpm-domain PATH)", self.vtpm_domain.display()))
        })?;
        let pid = child.id();
        let kill = |child: &mut std::process::Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        if let Err(e) = admin.call(&AdminRequest::VtpmAttach { uuid, pid }) {
            kill(&mut child);
            return Err(e);
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => break Some(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => break None,
            }
        };
        let ready: Option<serde_json::Value> = line.as_deref().and_then(|l| serde_json::from_str(l).ok());
        let Some(ready) = ready.filter(|v| v["ready"] == true) else {
            kill(&mut child);
            let _ = admin.call(&AdminRequest::VtpmDetach { uuid });
            return Err(CliError::new(
                FAILURE,
                format!("vTPM {uuid} did not start; last lines of {}:\n{}", log.display(), tail(&log, 15)),
            ));
        };
        let tcp_ports: Vec<(u16, u16)> = serde_json::from_value(ready["tcp_ports"].clone()).unwrap_or_default();
        let rt = Runtime { uuid, pid, tcp_ports, listen: listen.to_vec(), log };
        let bytes = serde_json::to_vec_pretty(&rt).expect("serialisable");
        xvtpm_fsutil::write_atomic(&self.runtime_file(&uuid), &bytes, 0o644)
            .map_err(|e| CliError::new(FAILURE, format!("writing runtime record: {e}")))?;
        // The child keeps running after we exit; reap nothing.
        std::mem::forget(child);
        Ok(rt)
    }

    /// Stops a vTPM's process (SIGTERM, then SIGKILL after `grace`).
    /// Returns whether a process was running.
    pub fn stop(&self, admin: &mut Admin, uuid: &Uuid, grace: Duration) -> Result<bool, CliError> {
        self.find(admin, uuid)?;
        let was = match self.runtime(uuid) {
            Some(rt) => {
                use nix::sys::signal::{Signal, kill};
                use nix::unistd::Pid;
                let pid = Pid::from_raw(rt.pid as i32);
                let _ = kill(pid, Signal::SIGTERM);
                let deadline = Instant::now() + grace;
                while pid_alive(rt.pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if pid_alive(rt.pid) {
                    let _ = kill(pid, Signal::SIGKILL);
                }
                true
            }
            None => false,
        };
        let _ = fs::remove_file(self.runtime_file(uuid));
        admin.call(&AdminRequest::VtpmDetach { uuid: *uuid })?;
        Ok(was)
    }

    /// Stops a vTPM, deletes its identity and its state. Irreversible.
    pub fn destroy(&self, admin: &mut Admin, uuid: &Uuid) -> Result<(), CliError> {
        self.stop(admin, uuid, Duration::from_secs(5))?;
        admin.call(&AdminRequest::VtpmDel { uuid: *uuid })?;
        let dir = self.vtpm_dir(uuid);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| CliError::new(FAILURE, format!("removing {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    /// All vTPMs with their runtime state.
    pub fn list(&self, admin: &mut Admin) -> Result<Vec<Row>, CliError> {
        let vtpms = match admin.call(&AdminRequest::VtpmList)? {
            AdminReply::Vtpms { vtpms } => vtpms,
            other => return Err(CliError::new(FAILURE, format!("unexpected reply {other:?}"))),
        };
        Ok(vtpms.into_iter().map(|info| self.row(info)).collect())
    }

    /// One vTPM with its runtime state.
    pub fn show(&self, admin: &mut Admin, uuid: &Uuid) -> Result<Row, CliError> {
        Ok(self.row(self.find(admin, uuid)?))
    }

    fn row(&self, info: VtpmInfo) -> Row {
        let runtime = self.runtime(&info.uuid);
        let tcti = runtime
            .as_ref()
            .and_then(|r| r.tcp_ports.first())
            .map(|(d, _)| format!("swtpm:host=127.0.0.1,port={d}"));
        Row {
            state: if runtime.is_some() { "running" } else { "stopped" }.into(),
            state_file: self.state_file(&info.uuid),
            runtime,
            tcti,
            info,
            domain_name: None,
            domain: None,
        }
    }
}

/// The uid vTPM `uuid` runs as: the owner of its state directory `dir` if that is a vTPM uid
/// (so it stays the same for the vTPM's life), otherwise the first uid unused by the other
/// directories under `vtpms`, probing from a point the UUID picks. The directory (mode 0700)
/// and its state file are then given to that uid and [`VTPM_GID`]: the vTPM replaces its
/// state file by rename in that directory after it has dropped root.
pub fn vtpm_uid(vtpms: &Path, dir: &Path, uuid: &Uuid) -> Result<u32, CliError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fail = |what: &str, p: &Path, e: std::io::Error| CliError::new(FAILURE, format!("{what} {}: {e}", p.display()));
    let in_range = |u: u32| (VTPM_UID_FIRST..VTPM_UID_FIRST + VTPM_UID_COUNT).contains(&u);
    let owner = fs::metadata(dir).map_err(|e| fail("reading", dir, e))?.uid();
    let uid = if in_range(owner) {
        owner
    } else {
        let used: std::collections::HashSet<u32> = fs::read_dir(vtpms)
            .map_err(|e| fail("listing", vtpms, e))?
            .flatten()
            .filter(|e| e.path() != dir)
            .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
            .filter(|&u| in_range(u))
            .collect();
        let b = uuid.as_bytes();
        let start = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % VTPM_UID_COUNT;
        (0..VTPM_UID_COUNT)
            .map(|i| VTPM_UID_FIRST + (start + i) % VTPM_UID_COUNT)
            .find(|u| !used.contains(u))
            .ok_or_else(|| CliError::new(FAILURE, format!("all {VTPM_UID_COUNT} vTPM uids are in use under {}", vtpms.display())))?
    };
    let give = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(VTPM_GID)).map_err(|e| fail("giving to the vTPM's uid", p, e));
    give(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| fail("setting the mode of", dir, e))?;
    let state = dir.join("state.xvts");
    if state.exists() {
        give(&state)?;
    }
    Ok(uid)
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Parses a UUID argument, naming the argument on error.
pub fn parse_uuid(arg: &str, what: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(arg).map_err(|e| CliError::new(crate::exit::USAGE, format!("{what} {arg:?} is not a UUID ({e}); see `xl-vtpm vtpm list`")))
}

/// Errors for a missing vTPM.
pub fn not_found(uuid: &Uuid) -> CliError {
    CliError::new(NOT_FOUND, format!("no vTPM {uuid}; see `xl-vtpm vtpm list`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Needs root (chown), as `make test` runs.
    #[test]
    fn vtpm_uids_are_stable_distinct_and_probe_past_collisions() {
        let root = std::env::temp_dir().join(format!("xvtpm-uid-{}-{:?}", std::process::id(), std::time::Instant::now()));
        let vtpms = root.join("vtpms");
        // Two UUIDs that pick the same starting uid (same first four bytes).
        let a: Uuid = "11223344-0000-4000-8000-000000000001".parse().unwrap();
        let b: Uuid = "11223344-0000-4000-8000-000000000002".parse().unwrap();
        let (da, db) = (vtpms.join(a.to_string()), vtpms.join(b.to_string()));
        fs::create_dir_all(&da).unwrap();
        fs::create_dir_all(&db).unwrap();
        fs::write(da.join("state.xvts"), b"sealed").unwrap();
        let ua = vtpm_uid(&vtpms, &da, &a).unwrap();
        let ub = vtpm_uid(&vtpms, &db, &b).unwrap();
        assert_eq!(ub, if ua + 1 == VTPM_UID_FIRST + VTPM_UID_COUNT { VTPM_UID_FIRST } else { ua + 1 }, "a collision takes the next free uid");
        assert_eq!(vtpm_uid(&vtpms, &da, &a).unwrap(), ua, "a vTPM keeps its uid");
        let (m, f) = (fs::metadata(&da).unwrap(), fs::metadata(da.join("state.xvts")).unwrap());
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (ua, VTPM_GID, 0o700));
        assert_eq!((f.uid(), f.gid()), (ua, VTPM_GID));
        fs::remove_dir_all(&root).unwrap();
    }
}
