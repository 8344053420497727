//! Local mode: each vTPM is a `vtpm-domain` process on this host serving
//! swtpm's protocol (for QEMU/KVM guests, tpm2-tools and tests).
//!
//! Layout:
//! - `<state-dir>/vtpms/<uuid>/state.xvts` — the sealed state (vtpm-domain writes it);
//! - `<state-dir>/vtpms/<uuid>/vtpm.log` — its log (never holds key material or command
//!   bytes), kept with one predecessor `vtpm.log.1`, each at most 1 MiB;
//! - `<state-dir>/vtpms/<uuid>/access.json` — how it is reached (listeners, consumer),
//!   recorded at create and reused by every start;
//! - `<run-dir>/vtpms/<uuid>/tpm.sock`, `tpm.sock.ctrl` — its data and control sockets
//!   (the default listeners): the directory is mode 0700 and owned by the consumer (root
//!   if none), under `<run-dir>/vtpms` which only root may write; the sockets are mode
//!   0600 and the vTPM accepts only root and the consumer (`SO_PEERCRED`);
//! - `<state-dir>/vtpms/<uuid>/creating` — present from before the manager makes the identity
//!   until the vTPM has written its first state;
//! - `<state-dir>/pool/` — vTPMs made ahead of demand, which `vtpm create` claims ([`pool`]);
//! - `<run-dir>/vtpms/<uuid>.json` — the running process (pid, ports, sockets);
//! - `<run-dir>/vtpms/<uuid>.quote` — its host deep-quote socket (root only, mode 0600), where
//!   the attestation service asks for a deep quote without the guest;
//! - `<run-dir>/<name>`, `<run-dir>/<name>.ctrl` — for a vTPM created with `--name`: symlinks
//!   to its data and control sockets (the `swtpm:path=` TCTI's pair), made at create, put back
//!   by every start (a reboot empties the run directory), kept while it is stopped (connecting
//!   then fails as with the socket itself) and removed by destroy.
//!
//! The listeners and the name are recorded in `access.json` at create; a TCP listener given
//! with port 0 is recorded with the port the vTPM got, so every start binds the same port
//! (and fails, naming it, if something else took it meanwhile).
//!
//! Every step that can fail after the manager created an identity is rolled
//! back, so a failed `create` leaves no identity, no state and no process. If the rollback
//! itself cannot happen (the manager or xl-vtpm was killed), the `creating` marker stays:
//! `vtpm start` and `vtpm list` then report the identity as never completely created
//! (`incomplete`), and `vtpm destroy` removes it.

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

#[path = "pool.rs"]
pub mod pool;

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
    /// Data-channel Unix socket (the control socket is the same path + `.ctrl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The uid allowed besides root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_uid: Option<u32>,
    /// The process's start time ([`xvtpm_fsutil::start_time`]): with `pid` it names the one
    /// process this record is about, so a later process on a recycled pid is not taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    /// The process started its TPM from a saved volatile state (`vtpm stop --suspend`): the
    /// TPM runs as it was suspended, PCRs included.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

impl Runtime {
    /// The swtpm TCTI string that reaches this process: its first TCP pair (at the address it
    /// listens on), else its Unix data socket; `None` if it has neither (Xen, control only).
    pub fn tcti(&self) -> Option<String> {
        if let Some((data, _)) = self.tcp_ports.first() {
            let ip = self
                .listen
                .iter()
                .find_map(|l| l.parse::<vtpm_proto::listen::Listen>().ok().and_then(|l| match l {
                    vtpm_proto::listen::Listen::TcpPair(a) => Some(a.ip()),
                    _ => None,
                }))
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            return Some(format!("swtpm:host={ip},port={data}"));
        }
        self.socket.as_ref().map(|p| format!("swtpm:path={}", p.display()))
    }

    /// Whether the recorded process still runs (the same instance, not a holder of its recycled pid).
    pub fn alive(&self) -> bool {
        match self.start_time {
            Some(t) => xvtpm_fsutil::instance_alive(self.pid, t),
            None => pid_alive(self.pid),
        }
    }
}

/// How a vTPM is reached, recorded at create and reused by `start`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Access {
    /// Listener specs given at create; empty means the default Unix sockets.
    #[serde(default)]
    pub listen: Vec<String>,
    /// The uid that uses the vTPM (e.g. QEMU's), besides root.
    #[serde(default)]
    pub consumer_uid: Option<u32>,
    /// The name given at create (`--name`): stable endpoints `<run-dir>/<name>{,.ctrl}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A vTPM's host deep-quote socket under `run_dir` (`vtpm-domain --quote-socket`): root only,
/// mode 0600, in `<run-dir>/vtpms`, which only root may write; xvtpm-attestd asks for deep
/// quotes there.
pub fn quote_socket(run_dir: &Path, uuid: &Uuid) -> PathBuf {
    run_dir.join("vtpms").join(format!("{}.quote", uuid.hyphenated()))
}

/// Removes a stopped vTPM's host deep-quote socket: only a socket owned by root (a symlink is
/// not followed, and anything else at that path is left alone).
pub fn remove_quote_socket(p: &Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket() && m.uid() == 0) {
        let _ = fs::remove_file(p);
    }
}

/// Name of the data socket in a vTPM's socket directory; the control socket is
/// `tpm.sock.ctrl`, the pair the tpm2-tss `swtpm:path=` TCTI expects.
pub const DATA_SOCKET: &str = "tpm.sock";

/// Options of a new vTPM.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    /// A TPM 1.2 instead of TPM 2.0.
    pub tpm12: bool,
    /// An ECC P-256 endorsement key instead of RSA-2048.
    pub ek_ecc: bool,
    /// The uid that may use the vTPM besides root.
    pub consumer_uid: Option<u32>,
    /// A name for its stable endpoints (see the module docs); checked by [`check_name`].
    pub name: Option<String>,
    /// Claim a vTPM made ahead of demand when the pool has one ([`pool`]; `vtpm create`
    /// without `--no-pool`). Only [`Local::create_or_claim`] looks at it.
    pub pool: bool,
}

/// The `schema` of a vTPM object in `--json` output (docs/json.md).
pub const VTPM_SCHEMA: &str = "xvtpm.vtpm/1";

fn vtpm_schema() -> String {
    VTPM_SCHEMA.into()
}

/// One vTPM: the object `vtpm create|start|show --json` print and `vtpm list --json` prints an
/// array of (docs/json.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// [`VTPM_SCHEMA`].
    #[serde(default = "vtpm_schema")]
    pub schema: String,
    /// Manager's record.
    #[serde(flatten)]
    pub info: VtpmInfo,
    /// "running", "stopped", "pooled" (made ahead of demand, never started: [`pool`]), or
    /// "incomplete" (its creation was interrupted before its first state).
    pub state: String,
    /// `vtpm create`: "pool" if it claimed a vTPM made ahead of demand, "new" if it
    /// manufactured one; `null` in every other command's output (one shape per object).
    #[serde(default)]
    pub created_from: Option<pool::CreatePath>,
    /// The name given at create, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Runtime record when running.
    pub runtime: Option<Runtime>,
    /// The state file.
    pub state_file: PathBuf,
    /// While it runs with a data channel: the swtpm TCTI string for tpm2-tools
    /// (`swtpm:path=…` or `swtpm:host=<its address>,port=…`); otherwise `None`.
    pub tcti: Option<String>,
    /// Domain mode: the vTPM domain's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_name: Option<String>,
    /// Domain mode: the running vTPM domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainRuntime>,
}

/// A running vTPM domain (`<run-dir>/vtpms/<uuid>.domain.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainRuntime {
    /// vTPM UUID.
    pub uuid: Uuid,
    /// Domain name.
    pub name: String,
    /// Domain id.
    pub domid: u32,
    /// The block device given to the domain.
    pub disk_device: PathBuf,
    /// The loop device xl-vtpm attached (detached at stop).
    pub loop_device: Option<PathBuf>,
    /// The generated xl config.
    pub config: PathBuf,
    /// The TPM started from a suspend's saved volatile state (it runs as it was).
    #[serde(default)]
    pub resumed: bool,
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
    /// The marker of a creation that has not finished (see the module docs).
    fn creating_marker(&self, uuid: &Uuid) -> PathBuf {
        self.vtpm_dir(uuid).join("creating")
    }

    /// Whether `uuid`'s creation was interrupted before its first state was written.
    pub fn incomplete(&self, uuid: &Uuid) -> bool {
        self.creating_marker(uuid).exists() && !self.state_file(uuid).exists()
    }

    fn runtime_file(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join("vtpms").join(format!("{uuid}.json"))
    }
    fn access_file(&self, uuid: &Uuid) -> PathBuf {
        self.vtpm_dir(uuid).join("access.json")
    }
    /// The directory of a vTPM's default Unix sockets.
    pub fn socket_dir(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join("vtpms").join(uuid.to_string())
    }

    /// The access recorded at create (the defaults for a vTPM made before it was recorded).
    pub fn access(&self, uuid: &Uuid) -> Access {
        fs::read(self.access_file(uuid)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Makes `<run-dir>/vtpms/<uuid>/` for the default sockets: mode 0700, owned by the
    /// consumer (or root), in a parent only root can write.
    fn prepare_socket_dir(&self, uuid: &Uuid, consumer: Option<u32>) -> Result<PathBuf, CliError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let fail = |what: &Path, e: std::io::Error| CliError::caused(FAILURE, what.display().to_string(), e);
        let vtpms = self.run_dir.join("vtpms");
        fs::DirBuilder::new().recursive(true).mode(0o755).create(&vtpms).map_err(|e| fail(&vtpms, e))?;
        let me = nix::unistd::geteuid().as_raw();
        for d in [&self.run_dir, &vtpms] {
            let m = fs::symlink_metadata(d).map_err(|e| fail(d, e))?;
            if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
                return Err(CliError::new(
                    FAILURE,
                    format!(
                        "{} must be a directory owned by uid {me} that no one else may write (it is uid {}, mode {:o}): \
                         vTPM sockets live under it; fix its owner and mode",
                        d.display(),
                        m.uid(),
                        m.mode() & 0o7777
                    ),
                ));
            }
        }
        let dir = self.socket_dir(uuid);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(CliError::new(FAILURE, format!("{} is not a directory; remove it", dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| fail(&dir, e))?
            }
            Err(e) => return Err(fail(&dir, e)),
        }
        std::os::unix::fs::chown(&dir, Some(consumer.unwrap_or(me)), None).map_err(|e| fail(&dir, e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(|e| fail(&dir, e))?;
        // sun_path holds 107 bytes; the control socket's is the longest.
        let longest = dir.join(format!("{DATA_SOCKET}.ctrl"));
        if longest.as_os_str().len() > 107 {
            return Err(CliError::new(
                FAILURE,
                format!("{} is too long for a Unix socket (max 107 bytes); use a shorter --run-dir", longest.display()),
            ));
        }
        Ok(dir)
    }

    /// The runtime record of a vTPM whose process is alive.
    pub fn runtime(&self, uuid: &Uuid) -> Option<Runtime> {
        let bytes = fs::read(self.runtime_file(uuid)).ok()?;
        let rt: Runtime = serde_json::from_slice(&bytes).ok()?;
        rt.alive().then_some(rt)
    }

    fn find(&self, admin: &mut Admin, uuid: &Uuid) -> Result<VtpmInfo, CliError> {
        match admin.call(&AdminRequest::VtpmShow { uuid: *uuid })? {
            AdminReply::Vtpm(v) => Ok(v),
            other => Err(CliError::new(FAILURE, format!("unexpected reply {other:?}"))),
        }
    }

    /// What `create` checks before anything is made: the listeners and the name.
    fn check_create(&self, listen: &[String], opts: &CreateOpts) -> Result<(), CliError> {
        check_listen(listen)?;
        if let Some(name) = &opts.name {
            check_name(name)?;
            if let Some(other) = self.named(name) {
                return Err(CliError::new(REFUSED, format!("a vTPM named {name:?} exists ({other}); choose another name")));
            }
            for p in self.name_links(name) {
                if fs::symlink_metadata(&p).is_ok_and(|m| !m.file_type().is_symlink()) {
                    return Err(CliError::new(REFUSED, format!("--name {name:?}: {} exists and is not a vTPM's link; choose another name", p.display())));
                }
            }
        }
        Ok(())
    }

    /// Creates a vTPM identity in the manager and starts its process, which
    /// manufactures the TPM (EK included) and writes its first sealed state.
    ///
    /// `listen` empty: the default Unix sockets (see the module docs). `listen` and the
    /// consumer are recorded and reused by [`Local::start`].
    pub fn create(&self, admin: &mut Admin, group: Option<String>, uuid: Option<Uuid>, listen: &[String], opts: &CreateOpts) -> Result<Runtime, CliError> {
        self.check_create(listen, opts)?;
        let uuid = uuid.unwrap_or_else(Uuid::new_v4);
        // The marker goes down before the identity exists, so no kill can leave an identity
        // without it. An existing directory is another vTPM's (the manager refuses below).
        let dir = self.vtpm_dir(&uuid);
        let marked = !dir.exists();
        if marked {
            let marker = self.creating_marker(&uuid);
            fs::create_dir_all(&dir)
                .and_then(|()| xvtpm_fsutil::write_atomic(&marker, b"creation started; the vTPM has not written its first state yet\n", 0o600))
                .map_err(|e| CliError::caused(FAILURE, format!("writing {}", marker.display()), e))?;
        }
        // A TPM 2.0 vTPM's identity is written with its EK certificate (one store write, one
        // rollback-counter increment for the whole create); a TPM 1.2 has no EK certificate.
        let req = if opts.tpm12 { AdminRequest::VtpmCreate { group, uuid: Some(uuid) } } else { AdminRequest::VtpmReserve { group, uuid: Some(uuid) } };
        let info = match admin.call(&req) {
            Ok(AdminReply::Vtpm(v)) => v,
            other => {
                // Without an answer the identity may exist: keep the marker for `vtpm destroy`.
                if marked && !matches!(&other, Err(e) if e.code == crate::exit::NO_MANAGER) {
                    let _ = fs::remove_dir_all(&dir);
                }
                return Err(other.err().unwrap_or_else(|| CliError::new(FAILURE, "unexpected reply to VtpmCreate")));
            }
        };
        let access = Access { listen: listen.to_vec(), consumer_uid: opts.consumer_uid, name: opts.name.clone() };
        let started = self
            .record_access(&uuid, &access)
            .and_then(|()| self.spawn(admin, &info, &access, Some(opts), None))
            .and_then(|rt| self.settle(&uuid, &access, &rt).map(|()| rt));
        match started {
            Ok(rt) => {
                let _ = fs::remove_file(self.creating_marker(&uuid));
                Ok(rt)
            }
            Err(e) => {
                // Roll back: no identity, no state, no process, no links.
                let _ = self.stop(admin, &uuid, Duration::from_secs(5));
                self.remove_name_links(opts.name.as_deref(), &uuid);
                let _ = admin.call(&AdminRequest::VtpmDetach { uuid });
                let _ = fs::remove_dir_all(self.socket_dir(&uuid));
                match admin.call(&AdminRequest::VtpmDel { uuid }) {
                    Ok(_) => {
                        let _ = fs::remove_dir_all(&dir);
                        Err(e)
                    }
                    // A reserved identity the manager forgot (it restarted): nothing to remove.
                    Err(d) if d.code == crate::exit::NOT_FOUND && !opts.tpm12 => {
                        let _ = fs::remove_dir_all(&dir);
                        Err(e)
                    }
                    Err(d) => Err(CliError::new(
                        e.code,
                        format!("{}\nThe half-made identity could not be removed ({}); remove it with `xl-vtpm vtpm destroy {uuid}`", e.text(), d.text()),
                    )),
                }
            }
        }
    }

    /// A vTPM that arrived from another host (its access record stayed there): records that its
    /// default sockets serve `consumer` besides root, unless this host has a record already.
    pub fn record_arrived_access(&self, uuid: &Uuid, consumer: Option<u32>) -> Result<(), CliError> {
        if self.access_file(uuid).exists() {
            return Ok(());
        }
        self.record_access(uuid, &Access { consumer_uid: consumer, ..Default::default() })
    }

    fn record_access(&self, uuid: &Uuid, access: &Access) -> Result<(), CliError> {
        let dir = self.vtpm_dir(uuid);
        fs::create_dir_all(&dir).map_err(|e| CliError::caused(FAILURE, format!("creating {}", dir.display()), e))?;
        let bytes = serde_json::to_vec_pretty(access).expect("serialisable");
        xvtpm_fsutil::write_atomic(&self.access_file(uuid), &bytes, 0o600)
            .map_err(|e| CliError::caused(FAILURE, format!("writing {}", self.access_file(uuid).display()), e))
    }

    /// Starts the process of an existing vTPM, reachable as recorded at create
    /// (`listen`, if not empty, replaces the recorded listeners for this run).
    pub fn start(&self, admin: &mut Admin, uuid: &Uuid, listen: &[String]) -> Result<Runtime, CliError> {
        let info = self.find(admin, uuid)?;
        if let Some(rt) = self.runtime(uuid) {
            return Err(CliError::new(REFUSED, format!("vTPM {uuid} is already running as process {}", rt.pid)));
        }
        self.refuse_pooled(uuid)?;
        check_listen(listen)?;
        if self.incomplete(uuid) {
            return Err(CliError::new(
                FAILURE,
                format!(
                    "vTPM {uuid} was never completely created: its creation was interrupted before it wrote its first state, so there is no state file to restore. \
                     Remove it with `xl-vtpm vtpm destroy {uuid}` and create a new vTPM"
                ),
            ));
        }
        let recorded = self.access(uuid);
        let mut access = recorded.clone();
        if !listen.is_empty() {
            access.listen = listen.to_vec();
        }
        let rt = self.spawn(admin, &info, &access, None, None)?;
        // A listener given for this run only is not recorded; the name's links follow this run's sockets.
        let settled = if listen.is_empty() { self.settle(uuid, &recorded, &rt) } else { self.link_name(recorded.name.as_deref(), &rt) };
        if let Err(e) = settled {
            let _ = self.stop(admin, uuid, Duration::from_secs(5));
            return Err(e);
        }
        // Killed after its first state write: the creation did complete.
        let _ = fs::remove_file(self.creating_marker(uuid));
        Ok(rt)
    }

    /// Starts an existing vTPM for one QEMU instance the way libvirt runs swtpm: on QEMU's
    /// control socket `ctrl` only (the data channel arrives through `CMD_SET_DATAFD`, and the
    /// vTPM saves and exits when QEMU hangs up, as `swtpm --terminate` does), served to root and
    /// `consumer` (QEMU's uid) for this run, and without a TPM2_Startup of its own: the
    /// firmware sends it, and an incoming migration or `virsh restore` brings the TPM's running
    /// state, which a Startup of the vTPM's own would make look older than its state file.
    /// Nothing is recorded: the next plain `vtpm start` uses the listeners given at create.
    ///
    /// `listener` is the control socket, already bound at `ctrl` by the caller (libvirt gives
    /// swtpm 1 s to make it appear); the vTPM gets it as its stdin (`--ctrl-listener-stdin`).
    pub fn start_for_qemu(
        &self,
        admin: &mut Admin,
        uuid: &Uuid,
        ctrl: &Path,
        listener: std::os::unix::net::UnixListener,
        consumer: Option<u32>,
    ) -> Result<Runtime, CliError> {
        let info = self.find(admin, uuid)?;
        if let Some(rt) = self.runtime(uuid) {
            return Err(CliError::new(REFUSED, format!("vTPM {uuid} is already running as process {}; one vTPM serves one QEMU", rt.pid)));
        }
        self.refuse_pooled(uuid)?;
        let listen = vec![format!("ctrl:{}", ctrl.display())];
        check_listen(&listen)?;
        if self.incomplete(uuid) {
            return Err(CliError::new(
                FAILURE,
                format!("vTPM {uuid} was never completely created (no state file); remove it with `xl-vtpm vtpm destroy {uuid}`"),
            ));
        }
        let access = Access { listen, consumer_uid: consumer, name: None };
        self.spawn(admin, &info, &access, None, Some(std::os::fd::OwnedFd::from(listener)))
    }

    /// After a start with the recorded listeners: records the ports a TCP listener with port 0
    /// got (so the next start binds them again) and points the name's links at the sockets.
    fn settle(&self, uuid: &Uuid, access: &Access, rt: &Runtime) -> Result<(), CliError> {
        let pinned = pin_ports(&access.listen, &rt.tcp_ports);
        if pinned != access.listen {
            self.record_access(uuid, &Access { listen: pinned, ..access.clone() })?;
        }
        self.link_name(access.name.as_deref(), rt)
    }

    /// The vTPM whose recorded name is `name`.
    pub fn named(&self, name: &str) -> Option<Uuid> {
        fs::read_dir(self.state_dir.join("vtpms"))
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()))
            .find(|u| self.access(u).name.as_deref() == Some(name))
    }

    /// A vTPM argument: its UUID, or the name it was created with.
    pub fn resolve(&self, arg: &str) -> Result<Uuid, CliError> {
        match Uuid::parse_str(arg) {
            Ok(u) => Ok(u),
            Err(_) if check_name(arg).is_ok() => {
                self.named(arg).ok_or_else(|| CliError::new(NOT_FOUND, format!("no vTPM named {arg:?}; see `xl-vtpm vtpm list`")))
            }
            Err(_) => parse_uuid(arg, "vTPM"),
        }
    }

    /// `<run-dir>/<name>` (data) and `<run-dir>/<name>.ctrl` (control).
    fn name_links(&self, name: &str) -> [PathBuf; 2] {
        [self.run_dir.join(name), self.run_dir.join(format!("{name}.ctrl"))]
    }

    /// Points `name`'s links at the data and control sockets `rt` listens on (atomically: a
    /// new link renamed over the old one); removes a link whose kind of socket it lacks.
    fn link_name(&self, name: Option<&str>, rt: &Runtime) -> Result<(), CliError> {
        let Some(name) = name else { return Ok(()) };
        let spec = |kind: &str| rt.listen.iter().find_map(|l| l.strip_prefix(kind)).map(PathBuf::from);
        for (link, target) in self.name_links(name).into_iter().zip([spec("data:"), spec("ctrl:")]) {
            let fail = |e: std::io::Error| CliError::caused(FAILURE, format!("linking {} to the vTPM's socket", link.display()), e);
            match fs::symlink_metadata(&link) {
                Ok(m) if !m.file_type().is_symlink() => {
                    return Err(CliError::new(FAILURE, format!("{} exists and is not a link to a vTPM socket; remove it", link.display())));
                }
                _ => {}
            }
            match target {
                Some(t) => {
                    let tmp = self.run_dir.join(format!(".{name}.link.tmp"));
                    let _ = fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(&t, &tmp).map_err(fail)?;
                    fs::rename(&tmp, &link).map_err(fail)?;
                }
                None => match fs::remove_file(&link) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
                    _ => {}
                },
            }
        }
        Ok(())
    }

    /// Removes `name`'s links (only links, and only into this vTPM's sockets or paths it listened on).
    fn remove_name_links(&self, name: Option<&str>, uuid: &Uuid) {
        let Some(name) = name else { return };
        let listened: Vec<PathBuf> =
            self.access(uuid).listen.iter().filter_map(|l| l.strip_prefix("data:").or_else(|| l.strip_prefix("ctrl:"))).map(PathBuf::from).collect();
        let ours = |t: &Path| t.starts_with(self.socket_dir(uuid)) || listened.iter().any(|p| p == t);
        for link in self.name_links(name) {
            if fs::read_link(&link).is_ok_and(|t| ours(&t)) {
                let _ = fs::remove_file(&link);
            }
        }
    }

    /// Starts the vTPM process. `qemu_ctrl`: the libvirt/QEMU layout of [`Local::start_for_qemu`]
    /// (no Startup of its own, its bound control listener given as stdin).
    fn spawn(
        &self,
        admin: &mut Admin,
        info: &VtpmInfo,
        access: &Access,
        create: Option<&CreateOpts>,
        qemu_ctrl: Option<std::os::fd::OwnedFd>,
    ) -> Result<Runtime, CliError> {
        let uuid = info.uuid;
        let dir = self.vtpm_dir(&uuid);
        fs::create_dir_all(&dir).map_err(|e| CliError::caused(FAILURE, format!("creating {}", dir.display()), e))?;
        fs::create_dir_all(self.run_dir.join("vtpms")).map_err(|e| CliError::caused(FAILURE, "creating run dir", e))?;
        let (listen, socket) = if access.listen.is_empty() {
            let data = self.prepare_socket_dir(&uuid, access.consumer_uid)?.join(DATA_SOCKET);
            let ctrl = format!("{}.ctrl", data.display());
            (vec![format!("data:{}", data.display()), format!("ctrl:{ctrl}")], Some(data))
        } else {
            let data = access.listen.iter().find_map(|l| l.strip_prefix("data:")).map(PathBuf::from);
            (access.listen.clone(), data)
        };
        let log = dir.join("vtpm.log");
        // Until vtpm-domain opens its capped log (--log-file), early errors go here too.
        use std::os::unix::fs::OpenOptionsExt;
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log)
            .map_err(|e| CliError::caused(FAILURE, format!("opening {}", log.display()), e))?;
        // A log made by an older xl-vtpm may be wider.
        let _ = log_file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let mut cmd = Command::new(&self.vtpm_domain);
        cmd.arg("--uuid").arg(uuid.to_string());
        cmd.arg("--state").arg(self.state_file(&uuid));
        cmd.arg("--mgr-socket").arg(&info.socket);
        cmd.arg("--log-file").arg(&log);
        cmd.arg("--quote-socket").arg(quote_socket(&self.run_dir, &uuid));
        for l in &listen {
            cmd.arg("--listen").arg(l);
        }
        if let Some(uid) = access.consumer_uid {
            cmd.arg("--consumer-uid").arg(uid.to_string());
        }
        if self.sandbox {
            let uid = vtpm_uid(&self.state_dir.join("vtpms"), &dir, &uuid)?;
            cmd.arg("--uid").arg(uid.to_string()).arg("--gid").arg(VTPM_GID.to_string());
        } else {
            cmd.arg("--no-sandbox");
        }
        let stdin = match qemu_ctrl {
            Some(listener) => {
                cmd.arg("--startup").arg("none").arg("--ctrl-listener-stdin");
                Stdio::from(listener)
            }
            None => Stdio::null(),
        };
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
        cmd.process_group(0).stdin(stdin).stdout(Stdio::piped()).stderr(log_file);
        let mut child = cmd.spawn().map_err(|e| {
            CliError::caused(FAILURE, format!("cannot run {}", self.vtpm_domain.display()), e).fix("install vtpm-domain or pass --vtpm-domain PATH")
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
        // The child is not reaped yet, so its pid still names it.
        let resumed = ready["resumed"] == true;
        let rt = Runtime { uuid, pid, tcp_ports, listen, log, socket, consumer_uid: access.consumer_uid, start_time: xvtpm_fsutil::start_time(pid), resumed };
        let bytes = serde_json::to_vec_pretty(&rt).expect("serialisable");
        xvtpm_fsutil::write_atomic(&self.runtime_file(&uuid), &bytes, 0o600)
            .map_err(|e| CliError::caused(FAILURE, "writing runtime record", e))?;
        // The child keeps running after we exit; reap nothing.
        std::mem::forget(child);
        Ok(rt)
    }

    /// Stops a vTPM's process (SIGTERM, then SIGKILL after `grace`).
    /// Returns whether a process was running.
    pub fn stop(&self, admin: &mut Admin, uuid: &Uuid, grace: Duration) -> Result<bool, CliError> {
        self.find(admin, uuid)?;
        let was = self.runtime(uuid).map(|rt| self.signal_and_wait(&rt, nix::sys::signal::Signal::SIGTERM, grace)).is_some();
        self.stopped(admin, uuid)?;
        Ok(was)
    }

    /// Suspends a running vTPM: its process saves the running TPM's volatile state (PCRs,
    /// loaded objects, sessions) into its state file and ends (SIGUSR1), so the next start —
    /// here, or on the host its identity moves to — resumes the TPM as it was, once. A process
    /// that does not end within `grace`, or ends without writing its state file, is killed
    /// and reported: its permanent state is on disk as always, its volatile state is lost.
    pub fn suspend(&self, admin: &mut Admin, uuid: &Uuid, grace: Duration) -> Result<(), CliError> {
        self.find(admin, uuid)?;
        let rt = self.runtime(uuid).ok_or_else(|| CliError::new(REFUSED, format!("vTPM {uuid} does not run: there is no running TPM to suspend")))?;
        let stamp = |p: &Path| fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok()));
        let file = self.state_file(uuid);
        let before = stamp(&file);
        let ended = self.signal_and_wait(&rt, nix::sys::signal::Signal::SIGUSR1, grace);
        let written = stamp(&file) != before;
        self.stopped(admin, uuid)?;
        match (ended, written) {
            (true, true) => Ok(()),
            (false, _) => Err(CliError::new(
                FAILURE,
                format!("vTPM {uuid} (process {}) did not suspend within {} s and was killed: its PCRs are lost, its permanent state is on disk", rt.pid, grace.as_secs()),
            )),
            (true, false) => Err(CliError::new(
                FAILURE,
                format!("vTPM {uuid} (process {}) ended without saving its running state to {} (see its log): its PCRs are lost, its permanent state is on disk", rt.pid, file.display()),
            )),
        }
    }

    /// Sends `sig` to the vTPM's process and waits up to `grace` for it to end; SIGKILL after
    /// that. Returns whether it ended by itself.
    fn signal_and_wait(&self, rt: &Runtime, sig: nix::sys::signal::Signal, grace: Duration) -> bool {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(rt.pid as i32);
        let _ = kill(pid, sig);
        let deadline = Instant::now() + grace;
        while rt.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if rt.alive() {
            let _ = kill(pid, Signal::SIGKILL);
            return false;
        }
        true
    }

    /// Forgets a stopped vTPM's runtime: its record, sockets and attachment.
    fn stopped(&self, admin: &mut Admin, uuid: &Uuid) -> Result<(), CliError> {
        let _ = fs::remove_file(self.runtime_file(uuid));
        let _ = fs::remove_dir_all(self.socket_dir(uuid));
        remove_quote_socket(&quote_socket(&self.run_dir, uuid));
        admin.call(&AdminRequest::VtpmDetach { uuid: *uuid })?;
        Ok(())
    }

    /// Stops a vTPM, deletes its identity and its state. Irreversible.
    pub fn destroy(&self, admin: &mut Admin, uuid: &Uuid) -> Result<(), CliError> {
        self.unpool(uuid);
        self.stop(admin, uuid, Duration::from_secs(5))?;
        admin.call(&AdminRequest::VtpmDel { uuid: *uuid })?;
        self.remove_name_links(self.access(uuid).name.as_deref(), uuid);
        let dir = self.vtpm_dir(uuid);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| CliError::caused(FAILURE, format!("removing {}", dir.display()), e))?;
        }
        Ok(())
    }

    /// All vTPMs with their runtime state.
    pub fn list(&self, admin: &mut Admin) -> Result<Vec<Row>, CliError> {
        let vtpms = admin.list_vtpms()?;
        Ok(vtpms.into_iter().map(|info| self.row(info)).collect())
    }

    /// One vTPM with its runtime state.
    pub fn show(&self, admin: &mut Admin, uuid: &Uuid) -> Result<Row, CliError> {
        Ok(self.row(self.find(admin, uuid)?))
    }

    fn row(&self, info: VtpmInfo) -> Row {
        let runtime = self.runtime(&info.uuid);
        let tcti = runtime.as_ref().and_then(Runtime::tcti);
        Row {
            schema: vtpm_schema(),
            state: match (&runtime, self.incomplete(&info.uuid)) {
                (Some(_), _) => "running",
                (None, true) => "incomplete",
                (None, false) if self.pooled(&info.uuid) => "pooled",
                (None, false) => "stopped",
            }
            .into(),
            created_from: None,
            name: self.access(&info.uuid).name,
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
    let fail = |what: &str, p: &Path, e: std::io::Error| CliError::caused(FAILURE, format!("{what} {}", p.display()), e);
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
    Uuid::parse_str(arg).map_err(|e| CliError::caused(crate::exit::USAGE, format!("{what} {arg:?} is not a UUID"), e).fix("see `xl-vtpm vtpm list`"))
}

/// Checks every `--listen` spec before anything is created, so that a vTPM is never
/// manufactured (identity, EK certificate, the physical TPM's counter) only for its process to
/// fail to listen: the syntax (the forms vtpm-domain accepts; TCP on loopback only, since the
/// vTPM maps each connection to the local uid that made it), that a Unix socket's directory
/// exists, and that a fixed TCP port pair (data PORT, control PORT+1) is free now.
pub fn check_listen(listen: &[String]) -> Result<(), CliError> {
    use vtpm_proto::listen::Listen;
    let usage = |m: String| CliError::new(crate::exit::USAGE, m);
    for l in listen {
        match l.parse::<Listen>().map_err(usage)? {
            Listen::TcpPair(a) if a.port() != 0 => {
                let ctrl = a.port().checked_add(1).ok_or_else(|| {
                    usage(format!("--listen {l:?}: the control channel takes PORT+1; pick a port below 65535 (or 0 to pick a free pair)"))
                })?;
                for (port, what) in [(a.port(), "data"), (ctrl, "control")] {
                    let addr = std::net::SocketAddr::new(a.ip(), port);
                    if let Err(e) = std::net::TcpListener::bind(addr) {
                        let at = format!("--listen {l:?}: {addr} (the {what} channel)");
                        let fix = "pick another port, or port 0 to pick a free pair";
                        return Err(match e.kind() {
                            std::io::ErrorKind::AddrInUse => usage(format!("{at} is in use by another program; {fix}")),
                            std::io::ErrorKind::AddrNotAvailable => usage(format!("{at} is not an address of this host; {fix}")),
                            _ => CliError::caused(crate::exit::USAGE, format!("{at} cannot be bound"), e).fix(fix),
                        });
                    }
                }
            }
            Listen::UnixData(p) | Listen::UnixCtrl(p) => {
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                if !dir.is_dir() {
                    return Err(usage(format!("--listen {l:?}: directory {} does not exist; create it first", dir.display())));
                }
                // sun_path holds 107 bytes; QEMU's control socket is the data path + ".ctrl".
                if p.as_os_str().len() > 107 {
                    return Err(usage(format!("--listen {l:?}: {} is longer than a Unix socket path may be (107 bytes)", p.display())));
                }
            }
            Listen::TcpPair(_) | Listen::Xen(_) => {}
        }
    }
    Ok(())
}

/// Names that are the run directory's own entries.
const RESERVED_NAMES: [&str; 3] = ["vtpm", "vtpms", "guests"];

/// A vTPM name (`--name`): 1–64 of `[A-Za-z0-9_-]`, starting with a letter or digit, not one
/// of the run directory's own entries, not a UUID (commands take either). No dot: `<name>` and `<name>.ctrl` never meet the
/// manager's files (`admin.sock`, `vtpmmgr.lock`, …) or another name's links.
pub fn check_name(name: &str) -> Result<(), CliError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !RESERVED_NAMES.contains(&name)
        && Uuid::parse_str(name).is_err();
    if ok {
        Ok(())
    } else {
        Err(CliError::new(
            crate::exit::USAGE,
            format!("--name {name:?}: 1 to 64 letters, digits, '_' or '-', starting with a letter or digit, not a UUID, and not one of {RESERVED_NAMES:?}"),
        ))
    }
}

/// `listen` with each TCP listener's port 0 replaced by the data port it got (`tcp_ports`,
/// one pair per TCP listener in order).
pub fn pin_ports(listen: &[String], tcp_ports: &[(u16, u16)]) -> Vec<String> {
    let mut ports = tcp_ports.iter();
    listen
        .iter()
        .map(|l| match l.strip_prefix("tcp:").and_then(|a| a.parse::<std::net::SocketAddr>().ok()) {
            Some(mut a) => match ports.next() {
                Some(&(data, _)) if a.port() == 0 => {
                    a.set_port(data);
                    format!("tcp:{a}")
                }
                _ => l.clone(),
            },
            None => l.clone(),
        })
        .collect()
}

/// A user name or numeric uid (`--consumer`).
pub fn parse_user(arg: &str) -> Result<u32, CliError> {
    if let Ok(uid) = arg.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(arg) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(CliError::new(crate::exit::USAGE, format!("--consumer {arg:?}: no such user (give a user name or a numeric uid)"))),
        Err(e) => Err(CliError::caused(FAILURE, format!("--consumer {arg:?}: looking up the user"), e)),
    }
}

/// Errors for a missing vTPM.
pub fn not_found(uuid: &Uuid) -> CliError {
    CliError::new(NOT_FOUND, format!("no vTPM {uuid}; see `xl-vtpm vtpm list`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn port_zero_is_pinned_to_the_port_got_and_nothing_else_changes() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pin_ports(&l(&["data:/d", "tcp:127.0.0.1:0", "tcp:[::1]:0", "tcp:127.0.0.1:2321"]), &[(40000, 40001), (40002, 40003), (2321, 2322)]),
            l(&["data:/d", "tcp:127.0.0.1:40000", "tcp:[::1]:40002", "tcp:127.0.0.1:2321"])
        );
        assert_eq!(pin_ports(&l(&["xen:backend/vtpm"]), &[]), l(&["xen:backend/vtpm"]));
    }

    #[test]
    fn names_cannot_meet_the_run_directory_entries() {
        for good in ["web1", "A_b-9", &"x".repeat(64)] {
            check_name(good).unwrap();
        }
        for bad in ["", "vtpms", "vtpm", "guests", "admin.sock", "../x", "a/b", "-x", "_x", &"x".repeat(65), "é", "11223344-0000-4000-8000-000000000001"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

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
