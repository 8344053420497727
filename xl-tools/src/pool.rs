//! The pool: complete TPM 2.0 vTPMs made ahead of demand, so that `xl-vtpm vtpm create`
//! costs a start instead of a manufacture (the RSA EK's prime search and the EK certificate's
//! store write and CA signature happen at `vtpm pool fill`, off the create's path).
//!
//! A pooled vTPM is an ordinary vTPM that was never started: its identity is in the manager's
//! store with its EK binding, its first state is sealed in `<state-dir>/vtpms/<uuid>/`, and
//! its EK certificate (issued by its group's CA) is in its NV. It has no access record, no
//! socket and was never attached to anything but the `vtpm-domain --manufacture-only` process
//! that made it, which binds no listener. A claim keeps the vTPM's UUID, group and EK: nothing
//! certified is re-labelled.
//!
//! Layout under `<state-dir>/pool/` (every file mode 0600, written with temp + fsync + rename
//! + directory fsync):
//! - `<group-uuid>-<rsa|ecc>/<uuid>` — a ready entry: the vTPM is complete and unclaimed.
//!   Written only after `vtpm-domain --manufacture-only` exited 0 (state written, identity
//!   durable with its EK certificate) and the `creating` marker is gone. This file is the only
//!   thing that makes a vTPM claimable.
//! - `making/<uuid>.<pid>.<start>` — a fill making `<uuid>` (the filler's pid and start time):
//!   written before the manager reserves the identity, removed after the ready entry exists.
//! - `claimed/<uuid>.<pid>.<start>` — a claim in progress (the claimer's pid and start time):
//!   the ready entry renamed here, removed once the claimed vTPM runs.
//! - `size/<group-uuid>-<rsa|ecc>` — the pool size the administrator set (`vtpm pool size N`,
//!   a decimal number; absent = 0 = no automatic refill). After each create of that group and
//!   EK, and after `pool size`, a background `vtpm pool fill --background` (nice 19, one at a
//!   time under `fill.lock`) tops the pool up to it; its errors go to `fill.log`.
//!
//! **A claim is one `rename(2)`** of the ready entry into `claimed/`, on one file system: of
//! two concurrent claimers exactly one succeeds, the other gets `ENOENT` and tries the next
//! entry (or falls back to manufacturing). Both directories are fsynced before the vTPM is
//! started, so a claim is durable before the create answers.
//!
//! A fill or claim killed half-way leaves its `making/` or `claimed/` file with a dead owner:
//! the next `pool fill` and `pool drain` destroy that vTPM (identity, state, process) and the
//! file. A half-made vTPM has no ready entry, so it can never be claimed meanwhile.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, GroupInfo, VTPM_GID, VtpmInfo};

use super::{Access, CreateOpts, Local, READY_TIMEOUT, Runtime, tail, vtpm_uid};
use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, NOT_FOUND, REFUSED, USAGE};

/// The largest pool size per group and EK kind (`vtpm pool size`).
pub const MAX_POOL_SIZE: usize = 1024;

/// `<state-dir>/pool/fill.log` is started afresh beyond this size.
const FILL_LOG_MAX: u64 = 1 << 20;

/// The `schema` of `vtpm pool status --json` (docs/json.md).
pub const POOL_SCHEMA: &str = "xvtpm.pool/1";

/// How `vtpm create` got its vTPM (the `created_from` field of its `--json` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CreatePath {
    /// Claimed from the pool: made ahead of demand, started now.
    Pool,
    /// Manufactured now (the pool had no vTPM of this group and EK, or was not asked).
    New,
}

/// Ready vTPMs of one group and EK kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolCount {
    /// Group UUID.
    pub group: Uuid,
    /// Group name (if the manager still has the group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
    /// "rsa" or "ecc".
    pub ek: String,
    /// Ready, unclaimed vTPMs.
    pub ready: usize,
    /// The pool size set with `vtpm pool size` (0: no automatic refill).
    #[serde(default)]
    pub size: usize,
}

/// `vtpm pool status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolStatus {
    /// [`POOL_SCHEMA`].
    pub schema: String,
    /// Ready vTPMs per group and EK kind.
    pub ready: Vec<PoolCount>,
    /// vTPMs a running fill is making now.
    pub making: usize,
    /// Claims a running `vtpm create` is finishing now.
    pub claiming: usize,
    /// vTPMs a killed fill or claim left half-made (never claimable); the next
    /// `vtpm pool fill` or `vtpm pool drain` destroys them.
    pub abandoned: usize,
}

fn ek_name(ecc: bool) -> &'static str {
    if ecc { "ecc" } else { "rsa" }
}

/// `<uuid>.<pid>.<start>` of this process.
fn owned_name(uuid: &Uuid) -> String {
    let me = std::process::id();
    format!("{uuid}.{me}.{}", xvtpm_fsutil::start_time(me).unwrap_or(0))
}

/// (uuid, owner alive) of a `making/` or `claimed/` file name.
fn parse_owned(name: &str) -> Option<(Uuid, bool)> {
    let mut it = name.splitn(3, '.');
    let uuid = it.next()?.parse().ok()?;
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    Some((uuid, xvtpm_fsutil::instance_alive(pid, start)))
}

/// The ready entries in `dir` (files named by a UUID; not a write's temporary file).
fn ready_in(dir: &Path) -> usize {
    fs::read_dir(dir).map(|rd| rd.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<Uuid>().is_ok())).count()).unwrap_or(0)
}

fn io_fail(what: &Path, e: std::io::Error) -> CliError {
    CliError::caused(FAILURE, what.display().to_string(), e)
}

fn fsync_dir(d: &Path) -> Result<(), CliError> {
    fs::File::open(d).and_then(|f| f.sync_all()).map_err(|e| io_fail(d, e))
}

fn mkdir(d: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(d).map_err(|e| io_fail(d, e))
}

impl Local {
    /// `<state-dir>/pool`.
    pub fn pool_dir(&self) -> PathBuf {
        self.state_dir.join("pool")
    }

    fn ready_dir(&self, group: &Uuid, ecc: bool) -> PathBuf {
        self.pool_dir().join(format!("{group}-{}", ek_name(ecc)))
    }

    /// The ready-entry directories: (group, ecc, path).
    fn ready_dirs(&self) -> Vec<(Uuid, bool, PathBuf)> {
        let Ok(rd) = fs::read_dir(self.pool_dir()) else { return vec![] };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (g, ek) = name.rsplit_once('-')?;
                let ecc = match ek {
                    "rsa" => false,
                    "ecc" => true,
                    _ => return None,
                };
                Some((g.parse().ok()?, ecc, e.path()))
            })
            .collect()
    }

    /// The files of `making/` or `claimed/`: (path, uuid, owner alive).
    fn owned_entries(&self, sub: &str) -> Vec<(PathBuf, Uuid, bool)> {
        let Ok(rd) = fs::read_dir(self.pool_dir().join(sub)) else { return vec![] };
        rd.flatten()
            .filter_map(|e| {
                let (uuid, alive) = parse_owned(e.file_name().to_str()?)?;
                Some((e.path(), uuid, alive))
            })
            .collect()
    }

    /// Whether `uuid` is in the pool: ready and unclaimed, or being made by a fill.
    pub fn pooled(&self, uuid: &Uuid) -> bool {
        let name = uuid.to_string();
        self.ready_dirs().iter().any(|(_, _, d)| d.join(&name).exists()) || self.owned_entries("making").iter().any(|(_, u, _)| u == uuid)
    }

    /// Whether `uuid` has a claim file: a create is starting it now (`Some(true)`), or a create
    /// that claimed it was killed before it answered (`Some(false)`; the next sweep destroys it).
    fn claiming(&self, uuid: &Uuid) -> Option<bool> {
        self.owned_entries("claimed").into_iter().find(|(_, u, _)| u == uuid).map(|(_, _, alive)| alive)
    }

    /// The group named `group` (name or UUID; the default group if `None`).
    fn pool_group(admin: &mut Admin, group: Option<&str>) -> Result<GroupInfo, CliError> {
        let groups = match admin.call(&AdminRequest::GroupList)? {
            AdminReply::Groups { groups } => groups,
            other => return Err(CliError::new(FAILURE, format!("unexpected reply {other:?}"))),
        };
        match group {
            // The manager's default group is its first.
            None => groups.into_iter().next().ok_or_else(|| CliError::new(FAILURE, "the manager has no group; provision it first (`xl-vtpm mgr provision`)")),
            Some(g) => groups
                .into_iter()
                .find(|i| i.name == g || i.uuid.to_string() == g)
                .ok_or_else(|| CliError::new(NOT_FOUND, format!("no group {g:?}; see `xl-vtpm mgr group list`"))),
        }
    }

    /// `vtpm pool status`.
    pub fn pool_status(&self, admin: &mut Admin) -> Result<PoolStatus, CliError> {
        let groups = match admin.call(&AdminRequest::GroupList)? {
            AdminReply::Groups { groups } => groups,
            _ => vec![],
        };
        let mut ready: Vec<PoolCount> = self
            .ready_dirs()
            .into_iter()
            .map(|(g, ecc, d)| PoolCount {
                group: g,
                group_name: groups.iter().find(|i| i.uuid == g).map(|i| i.name.clone()),
                ek: ek_name(ecc).into(),
                ready: ready_in(&d),
                size: self.pool_size(&g, ecc),
            })
            .collect();
        for (g, ecc, n) in self.sizes() {
            if !ready.iter().any(|c| c.group == g && c.ek == ek_name(ecc)) {
                ready.push(PoolCount { group: g, group_name: groups.iter().find(|i| i.uuid == g).map(|i| i.name.clone()), ek: ek_name(ecc).into(), ready: 0, size: n });
            }
        }
        ready.sort_by(|a, b| (a.group, &a.ek).cmp(&(b.group, &b.ek)));
        let making = self.owned_entries("making");
        let claimed = self.owned_entries("claimed");
        Ok(PoolStatus {
            schema: POOL_SCHEMA.into(),
            ready,
            making: making.iter().filter(|e| e.2).count(),
            claiming: claimed.iter().filter(|e| e.2).count(),
            abandoned: making.iter().chain(&claimed).filter(|e| !e.2).count(),
        })
    }

    /// `vtpm pool fill`: makes `count` vTPMs of `group` (or as many as it takes to have `min`
    /// ready), each complete before it becomes claimable. Destroys what a killed fill or claim
    /// left first. Returns the UUIDs made.
    pub fn pool_fill(&self, admin: &mut Admin, group: Option<&str>, ecc: bool, count: Option<usize>, min: Option<usize>) -> Result<Vec<Uuid>, CliError> {
        let g = Self::pool_group(admin, group)?;
        self.pool_sweep(admin)?;
        let have = ready_in(&self.ready_dir(&g.uuid, ecc));
        let n = match (count, min) {
            (Some(c), None) => c,
            (None, Some(m)) => m.saturating_sub(have),
            _ => return Err(CliError::new(USAGE, "give --count N (make N more) or --min N (top up to N ready)")),
        };
        if n > 1024 {
            return Err(CliError::new(USAGE, format!("{n} vTPMs at once is too many (at most 1024 per fill)")));
        }
        let mut made = Vec::with_capacity(n);
        for _ in 0..n {
            made.push(self.pool_make_one(admin, &g, ecc)?);
        }
        Ok(made)
    }

    /// Makes one pooled vTPM; on failure leaves nothing (or, if killed, a `making/` file that
    /// the next sweep resolves).
    fn pool_make_one(&self, admin: &mut Admin, g: &GroupInfo, ecc: bool) -> Result<Uuid, CliError> {
        let uuid = Uuid::new_v4();
        let making_dir = self.pool_dir().join("making");
        mkdir(&making_dir)?;
        let making = making_dir.join(owned_name(&uuid));
        xvtpm_fsutil::write_atomic(&making, b"", 0o600).map_err(|e| io_fail(&making, e))?;
        let dir = self.vtpm_dir(&uuid);
        let marker = self.creating_marker(&uuid);
        fs::create_dir_all(&dir)
            .and_then(|()| xvtpm_fsutil::write_atomic(&marker, b"made for the pool; the vTPM has not written its first state yet\n", 0o600))
            .map_err(|e| io_fail(&marker, e))?;
        // Without the manager's word that the identity is gone, the `making/` file stays: once
        // this process has ended, the next sweep removes what is left.
        let undo = |admin: &mut Admin, e: CliError| {
            let _ = admin.call(&AdminRequest::VtpmDetach { uuid });
            match admin.call(&AdminRequest::VtpmDel { uuid }) {
                Ok(_) => {}
                Err(d) if d.code == NOT_FOUND => {}
                Err(d) => return CliError::new(e.code, format!("{}\nvTPM {uuid} could not be removed yet ({}); the next `xl-vtpm vtpm pool fill` or `pool drain` removes it", e.text(), d.text())),
            }
            let _ = fs::remove_dir_all(self.vtpm_dir(&uuid));
            let _ = fs::remove_file(&making);
            e
        };
        let info = match admin.call(&AdminRequest::VtpmReserve { group: Some(g.uuid.to_string()), uuid: Some(uuid) }) {
            Ok(AdminReply::Vtpm(v)) => v,
            Ok(other) => return Err(undo(admin, CliError::new(FAILURE, format!("unexpected reply {other:?}")))),
            Err(e) => return Err(undo(admin, e)),
        };
        self.pool_manufacture(admin, &info, ecc).map_err(|e| undo(admin, e))?;
        let _ = admin.call(&AdminRequest::VtpmDetach { uuid });
        fs::remove_file(&marker).map_err(|e| undo(admin, io_fail(&marker, e)))?;
        // The commit point: from here on the vTPM is claimable.
        let ready_dir = self.ready_dir(&g.uuid, ecc);
        mkdir(&ready_dir)?;
        let entry = ready_dir.join(uuid.to_string());
        xvtpm_fsutil::write_atomic(&entry, b"", 0o600).map_err(|e| undo(admin, io_fail(&entry, e)))?;
        let _ = fs::remove_file(&making);
        Ok(uuid)
    }

    /// Runs `vtpm-domain --create --manufacture-only` for `info` until it exits.
    fn pool_manufacture(&self, admin: &mut Admin, info: &VtpmInfo, ecc: bool) -> Result<(), CliError> {
        let uuid = info.uuid;
        let dir = self.vtpm_dir(&uuid);
        let log = dir.join("vtpm.log");
        use std::os::unix::fs::OpenOptionsExt;
        let log_file = fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&log).map_err(|e| io_fail(&log, e))?;
        let mut cmd = Command::new(&self.vtpm_domain);
        cmd.arg("--uuid").arg(uuid.to_string());
        cmd.arg("--state").arg(self.state_file(&uuid));
        cmd.arg("--mgr-socket").arg(&info.socket);
        cmd.arg("--log-file").arg(&log);
        cmd.arg("--create").arg("--manufacture-only");
        if ecc {
            cmd.arg("--ek").arg("ecc");
        }
        if self.sandbox {
            // The uid is chosen now, so the claim's start finds it already given.
            let uid = vtpm_uid(&self.state_dir.join("vtpms"), &dir, &uuid)?;
            cmd.arg("--uid").arg(uid.to_string()).arg("--gid").arg(VTPM_GID.to_string());
        } else {
            cmd.arg("--no-sandbox");
        }
        use std::os::unix::process::CommandExt;
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log_file);
        let mut child = cmd
            .spawn()
            .map_err(|e| CliError::caused(FAILURE, format!("cannot run {}", self.vtpm_domain.display()), e).fix("install vtpm-domain or pass --vtpm-domain PATH"))?;
        let kill = |child: &mut std::process::Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        if let Err(e) = admin.call(&AdminRequest::VtpmAttach { uuid, pid: child.id() }) {
            kill(&mut child);
            return Err(e);
        }
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        let _ = BufReader::new(std::io::Read::take(stdout, 4096)).read_line(&mut line);
        let deadline = Instant::now() + READY_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                _ => break None,
            }
        };
        let done: Option<serde_json::Value> = serde_json::from_str(&line).ok();
        match (status, done) {
            (Some(s), Some(v)) if s.success() && v["manufactured"] == true => Ok(()),
            (status, _) => {
                if status.is_none() {
                    kill(&mut child);
                }
                Err(CliError::new(FAILURE, format!("vTPM {uuid} was not manufactured; last lines of {}:\n{}", log.display(), tail(&log, 15))))
            }
        }
    }

    /// Destroys what killed fills and claims left (their owner is dead); leaves a vTPM that
    /// reached the ready state in the pool.
    fn pool_sweep(&self, admin: &mut Admin) -> Result<usize, CliError> {
        let mut n = 0;
        for (path, uuid, alive) in self.owned_entries("making") {
            if alive {
                continue;
            }
            if !self.ready_dirs().iter().any(|(_, _, d)| d.join(uuid.to_string()).exists()) {
                // Left for a later sweep if it cannot be removed now (the status counts it).
                if self.pool_destroy(admin, &uuid).is_err() {
                    continue;
                }
                n += 1;
            }
            let _ = fs::remove_file(path);
        }
        for (path, uuid, alive) in self.owned_entries("claimed") {
            if !alive && self.pool_destroy(admin, &uuid).is_ok() {
                let _ = fs::remove_file(path);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Stops and destroys `uuid` whatever state its making or claim reached.
    fn pool_destroy(&self, admin: &mut Admin, uuid: &Uuid) -> Result<(), CliError> {
        use nix::sys::signal::{Signal, kill};
        // The process the claim started, or the `--manufacture-only` one a killed fill left
        // running (the manager names it while it lives).
        let pid = match (self.runtime(uuid), admin.call(&AdminRequest::VtpmShow { uuid: *uuid })) {
            (Some(rt), _) => Some(rt.pid),
            (None, Ok(AdminReply::Vtpm(v))) => v.attached_pid,
            _ => None,
        };
        if let Some(pid) = pid {
            let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while xvtpm_fsutil::pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.remove_name_links(self.access(uuid).name.as_deref(), uuid);
        let _ = fs::remove_file(self.runtime_file(uuid));
        let _ = fs::remove_dir_all(self.socket_dir(uuid));
        let _ = admin.call(&AdminRequest::VtpmDetach { uuid: *uuid });
        match admin.call(&AdminRequest::VtpmDel { uuid: *uuid }) {
            Ok(_) => {}
            Err(e) if e.code == NOT_FOUND => {}
            Err(e) => return Err(CliError::caused(e.code, format!("removing the half-made pool vTPM {uuid}"), e)),
        }
        let dir = self.vtpm_dir(uuid);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io_fail(&dir, e))?;
        }
        Ok(())
    }

    /// Takes one ready vTPM of `group` and EK kind out of the pool: the `rename(2)` that makes
    /// it this process's, made durable. `None` if the pool has none.
    fn pool_claim(&self, admin: &mut Admin, g: &GroupInfo, ecc: bool) -> Result<Option<(VtpmInfo, PathBuf)>, CliError> {
        let ready = self.ready_dir(&g.uuid, ecc);
        let Ok(rd) = fs::read_dir(&ready) else { return Ok(None) };
        let claimed_dir = self.pool_dir().join("claimed");
        mkdir(&claimed_dir)?;
        for e in rd.flatten() {
            let Some(uuid) = e.file_name().to_str().and_then(|n| n.parse::<Uuid>().ok()) else { continue };
            let claim = claimed_dir.join(owned_name(&uuid));
            match fs::rename(e.path(), &claim) {
                Ok(()) => {}
                // Another create claimed it first.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_fail(&e.path(), err)),
            }
            fsync_dir(&claimed_dir)?;
            fsync_dir(&ready)?;
            let info = match admin.call(&AdminRequest::VtpmShow { uuid })? {
                AdminReply::Vtpm(v) => v,
                other => return Err(CliError::new(FAILURE, format!("unexpected reply {other:?}"))),
            };
            if info.group != g.uuid {
                return Err(CliError::new(FAILURE, format!("pool entry {} names vTPM {uuid} of group {}, not {}; run `xl-vtpm vtpm pool drain`", e.path().display(), info.group, g.uuid)));
            }
            // A pooled vTPM was never given to anyone: it has no access record (written at its
            // claim) and no process. An entry naming a vTPM that has either (a pool directory
            // restored from a backup, a copied file) would hand one vTPM — one EK — to a second
            // consumer: the entry is dropped, the vTPM left alone, and the next entry tried.
            if self.access_file(&uuid).exists() || info.attached_pid.is_some() || self.runtime(&uuid).is_some() {
                let _ = fs::remove_file(&claim);
                let _ = fsync_dir(&claimed_dir);
                xvtpm_log::host_warn!(vtpm = %uuid, entry = %e.path().display(), "dropped a pool entry naming a vTPM that was already claimed or runs; the vTPM is left as it is");
                continue;
            }
            return Ok(Some((info, claim)));
        }
        Ok(None)
    }

    /// `vtpm create` that claims a pooled vTPM when one of its group and EK kind is ready
    /// (and `opts.pool`, no `--uuid`, TPM 2.0), and manufactures one otherwise.
    pub fn create_or_claim(&self, admin: &mut Admin, group: Option<String>, uuid: Option<Uuid>, listen: &[String], opts: &CreateOpts) -> Result<(Runtime, CreatePath), CliError> {
        if !(opts.pool && uuid.is_none() && !opts.tpm12 && self.pool_dir().exists()) {
            return self.create(admin, group, uuid, listen, opts).map(|rt| (rt, CreatePath::New));
        }
        // Everything `create` checks, before anything is claimed.
        self.check_create(listen, opts)?;
        let g = Self::pool_group(admin, group.as_deref())?;
        let made = match self.pool_claim(admin, &g, opts.ek_ecc)? {
            Some((info, claim)) => self.start_claimed(admin, &info, &claim, listen, opts).map(|rt| (rt, CreatePath::Pool)),
            None => self.create(admin, group, None, listen, opts).map(|rt| (rt, CreatePath::New)),
        }?;
        // The create is done; the refill is not its business (best effort, off its path).
        if let Err(e) = self.pool_refill_in_background(&g.uuid, opts.ek_ecc) {
            xvtpm_log::host_warn!(group = %g.uuid, "the pool was not refilled in the background: {}", e.text());
        }
        Ok(made)
    }

    fn start_claimed(&self, admin: &mut Admin, info: &VtpmInfo, claim: &Path, listen: &[String], opts: &CreateOpts) -> Result<Runtime, CliError> {
        let uuid = info.uuid;
        let access = Access { listen: listen.to_vec(), consumer_uid: opts.consumer_uid, name: opts.name.clone() };
        let started = self
            .record_access(&uuid, &access)
            .and_then(|()| self.spawn(admin, info, &access, None, None))
            .and_then(|rt| self.settle(&uuid, &access, &rt).map(|()| rt));
        match started {
            Ok(rt) => {
                let _ = fs::remove_file(claim);
                Ok(rt)
            }
            Err(e) => {
                // As a failed create: no identity, no state, no process, no links.
                match self.pool_destroy(admin, &uuid) {
                    Ok(()) => {
                        let _ = fs::remove_file(claim);
                        Err(e)
                    }
                    Err(d) => Err(CliError::new(
                        e.code,
                        format!("{}\nThe claimed vTPM could not be removed ({}); `xl-vtpm vtpm pool drain` removes it", e.text(), d.text()),
                    )),
                }
            }
        }
    }

    /// `vtpm pool drain`: destroys every ready vTPM (of `group`, if given) and what killed
    /// fills and claims left. Returns the number destroyed.
    pub fn pool_drain(&self, admin: &mut Admin, group: Option<&str>) -> Result<usize, CliError> {
        let only = group.map(|g| Self::pool_group(admin, Some(g))).transpose()?.map(|g| g.uuid);
        let mut n = self.pool_sweep(admin)?;
        let claimed_dir = self.pool_dir().join("claimed");
        for (g, _, d) in self.ready_dirs() {
            if only.is_some_and(|o| o != g) {
                continue;
            }
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let Some(uuid) = e.file_name().to_str().and_then(|n| n.parse::<Uuid>().ok()) else { continue };
                mkdir(&claimed_dir)?;
                let claim = claimed_dir.join(owned_name(&uuid));
                match fs::rename(e.path(), &claim) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(io_fail(&e.path(), err)),
                }
                self.pool_destroy(admin, &uuid)?;
                let _ = fs::remove_file(&claim);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Takes `uuid` out of the pool (its ready entry), so no create claims it: `vtpm destroy`.
    pub(super) fn unpool(&self, uuid: &Uuid) {
        let name = uuid.to_string();
        for (_, _, d) in self.ready_dirs() {
            let _ = fs::remove_file(d.join(&name));
        }
    }

    /// Refuses to start a pooled vTPM: only a claim (`vtpm create`) takes it out of the pool.
    pub(super) fn refuse_pooled(&self, uuid: &Uuid) -> Result<(), CliError> {
        // A claimed vTPM is the claiming create's alone: started by anyone else, it would serve
        // someone the create never answered to, and a dead claim's sweep would destroy it in use.
        match self.claiming(uuid) {
            Some(true) => return Err(CliError::new(REFUSED, format!("vTPM {uuid} is being claimed from the pool by a running `xl-vtpm vtpm create`"))),
            Some(false) => {
                return Err(CliError::new(
                    REFUSED,
                    format!("vTPM {uuid} was claimed from the pool by a `vtpm create` that was killed before it answered; nobody was given it. `xl-vtpm vtpm pool fill` or `pool drain` destroys it"),
                ));
            }
            None => {}
        }
        if self.pooled(uuid) {
            return Err(CliError::new(
                REFUSED,
                format!("vTPM {uuid} is in the pool (made ahead of demand, never started): `xl-vtpm vtpm create` claims it, `xl-vtpm vtpm pool drain` removes it"),
            ));
        }
        Ok(())
    }

    /// `<state-dir>/pool/size/<group>-<ek>`.
    fn size_file(&self, group: &Uuid, ecc: bool) -> PathBuf {
        self.pool_dir().join("size").join(format!("{group}-{}", ek_name(ecc)))
    }

    /// The pool size set for `group` and EK kind (0 if none).
    pub fn pool_size(&self, group: &Uuid, ecc: bool) -> usize {
        // A hostile or torn file reads as 0 (no refill), never as a huge number.
        let mut buf = [0u8; 16];
        let n = fs::File::open(self.size_file(group, ecc)).and_then(|mut f| std::io::Read::read(&mut f, &mut buf)).unwrap_or(0);
        std::str::from_utf8(&buf[..n]).ok().and_then(|t| t.trim().parse::<usize>().ok()).filter(|&n| n <= MAX_POOL_SIZE).unwrap_or(0)
    }

    /// Every pool size set: (group, ecc, size).
    fn sizes(&self) -> Vec<(Uuid, bool, usize)> {
        let Ok(rd) = fs::read_dir(self.pool_dir().join("size")) else { return vec![] };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (g, ek) = name.rsplit_once('-')?;
                let ecc = match ek {
                    "rsa" => false,
                    "ecc" => true,
                    _ => return None,
                };
                let g: Uuid = g.parse().ok()?;
                Some((g, ecc, self.pool_size(&g, ecc)))
            })
            .collect()
    }

    /// `vtpm pool size N`: keeps `n` ready vTPMs of `group` and EK kind, refilled in the
    /// background after each create (0: no automatic refill, the pool only shrinks). Starts a
    /// background fill at once. Returns the group.
    pub fn pool_set_size(&self, admin: &mut Admin, group: Option<&str>, ecc: bool, n: usize) -> Result<GroupInfo, CliError> {
        if n > MAX_POOL_SIZE {
            return Err(CliError::new(USAGE, format!("a pool of {n} is too large (at most {MAX_POOL_SIZE} per group and EK)")));
        }
        let g = Self::pool_group(admin, group)?;
        let f = self.size_file(&g.uuid, ecc);
        if n == 0 {
            match fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_fail(&f, e)),
                _ => {}
            }
        } else {
            mkdir(f.parent().expect("has a parent"))?;
            xvtpm_fsutil::write_atomic(&f, format!("{n}\n").as_bytes(), 0o600).map_err(|e| io_fail(&f, e))?;
            self.pool_refill_in_background(&g.uuid, ecc)?;
        }
        Ok(g)
    }

    /// Starts `xl-vtpm vtpm pool fill --background` for `group` and EK kind if a pool size is
    /// set and the pool is below it: detached (own process group, no stdin/stdout, stderr to
    /// `<state-dir>/pool/fill.log`), not waited for. Returns its pid, if one was started.
    pub fn pool_refill_in_background(&self, group: &Uuid, ecc: bool) -> Result<Option<u32>, CliError> {
        let size = self.pool_size(group, ecc);
        if size == 0 || ready_in(&self.ready_dir(group, ecc)) >= size {
            return Ok(None);
        }
        let exe = std::env::current_exe().map_err(|e| CliError::caused(FAILURE, "finding xl-vtpm's own executable", e))?;
        let log = self.pool_dir().join("fill.log");
        use std::os::unix::fs::OpenOptionsExt;
        // Kept small: a long-failing refill must not fill the disk.
        let too_big = fs::metadata(&log).is_ok_and(|m| m.len() > FILL_LOG_MAX);
        let log_file = fs::OpenOptions::new().create(true).append(!too_big).write(true).truncate(too_big).mode(0o600).open(&log).map_err(|e| io_fail(&log, e))?;
        let mut cmd = Command::new(exe);
        cmd.arg("--state-dir").arg(&self.state_dir).arg("--run-dir").arg(&self.run_dir).arg("--vtpm-domain").arg(&self.vtpm_domain);
        if !self.sandbox {
            cmd.arg("--no-sandbox");
        }
        cmd.args(["vtpm", "pool", "fill", "--background", "--group", &group.to_string(), "--ek", ek_name(ecc)]);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
        let child = cmd.spawn().map_err(|e| CliError::caused(FAILURE, "starting the background pool fill", e))?;
        // Not waited for: it outlives this process (and is reaped by init).
        Ok(Some(child.id()))
    }

    /// `vtpm pool fill --background`: at the lowest CPU priority, one at a time (an exclusive
    /// `flock` on `<state-dir>/pool/fill.lock`; later ones wait their turn), makes vTPMs of
    /// `group` and EK kind until the pool holds its set size, counting again after each one (a
    /// claim meanwhile is refilled too). Returns the UUIDs made.
    pub fn pool_fill_background(&self, admin: &mut Admin, group: Option<&str>, ecc: bool) -> Result<Vec<Uuid>, CliError> {
        // Niceness is inherited: the vtpm-domain making each vTPM (the RSA prime search) runs
        // at nice 19 too, behind every running vTPM and create.
        let _ = rustix::process::setpriority_process(None, 19);
        let g = Self::pool_group(admin, group)?;
        mkdir(&self.pool_dir())?;
        let path = self.pool_dir().join("fill.lock");
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).map_err(|e| io_fail(&path, e))?;
        let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| io_fail(&path, e.into()))?;
        self.pool_sweep(admin)?;
        let mut made = vec![];
        while made.len() < MAX_POOL_SIZE && ready_in(&self.ready_dir(&g.uuid, ecc)) < self.pool_size(&g.uuid, ecc) {
            made.push(self.pool_make_one(admin, &g, ecc)?);
        }
        Ok(made)
    }
}
