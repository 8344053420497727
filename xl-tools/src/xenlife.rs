//! Guest and vTPM live and die together (Xen).
//!
//! `xl-vtpm create guest.cfg` reads an ordinary xl.cfg, binds the guest to
//! its vTPM in the registry (a vTPM is never attached to another guest),
//! makes sure the vTPM identity exists in the manager, starts the guest's
//! vTPM backend *before* the guest (libxl waits only 10 s for a backend to
//! reach InitWait), then runs `xl create` with the resolved `vtpm=` line.
//! Any failure rolls back what this invocation did: no half-created pair.
//!
//! Backend placement follows the guest's `vtpm=` line:
//! - `backend=0` (or no backend): **dom0-process mode**, the guest's vTPM is a
//!   `vtpm-domain` process in dom0 serving tpmif for exactly that guest; its
//!   manager link is the local per-vTPM socket. In the registry its "vTPM
//!   domain" is the logical name `vtpm-<guest>` with domid 0.
//! - `backend=NAME`: **domain mode**, the vTPM runs as the only program of its
//!   own Xen domain `NAME` ([`crate::vtpmdom`]), made on first use (new disk,
//!   new TPM) and booted again from its disk later; its manager link is tpmif
//!   to vtpmmgr in dom0. The registry records that domain and its domid.
//!
//! With `model=` in the `vtpm=` line (an HVM guest; [`crate::hvm`], docs/hvm.md) the guest gets
//! no tpmif device: its device model emulates a TIS TPM served by the same kind of dom0
//! `vtpm-domain` process, on its default Unix sockets, and the config handed to xl carries
//! QEMU's arguments in `device_model_args_hvm` instead of the `vtpm=` line.
//!
//! `xl-vtpm watch` couples lifetimes: on every `@releaseDomain` it looks for
//! running pairs whose guest is gone. While xl's monitor process for the
//! guest still runs, xl is rebuilding it (a reboot) and the vTPM stays; once
//! the monitor is gone the guest was destroyed or powered off, and its vTPM
//! process is stopped and the pair marked stopped (see `await_reboot`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vtpm_proto::mgr::AdminRequest;

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, NOT_FOUND, REFUSED, USAGE};
use crate::local::Local;
use crate::registry::{NewPair, ObservedDomain, Registry, Row, State};
use crate::xlcfg::{VtpmSpec, XlConfig};

/// How long a vanished guest's xl monitor may take to exit after a destroy.
pub const MONITOR_SETTLE: Duration = Duration::from_millis(200);

/// Longest wait for a rebooting guest whose xl monitor is still running.
pub const REBOOT_MAX: Duration = Duration::from_secs(60);

/// Where xl's monitor processes write their log: `xl` daemonizes each monitor with its stdout
/// and stderr on `XEN_LOG_DIR/xl-<domain name>.log`.
pub const XEN_LOG_DIR: &str = "/var/log/xen";

/// Whether an xl monitor process for guest `name` is alive: the `xl create <cfg>` that made it,
/// or the monitor that took it over after a move — `xl restore` (its name) or `xl
/// migrate-receive` (`<name>--incoming`, the name it received the guest under). Those are found
/// by the log file xl gives every monitor (see [`XEN_LOG_DIR`]), as their command lines do not
/// name the guest.
pub fn xl_monitor_alive(name: &str, cfg: &Path) -> bool {
    xl_monitor_alive_in(name, cfg, Path::new(XEN_LOG_DIR))
}

/// [`xl_monitor_alive`] with the log directory given (tests).
pub fn xl_monitor_alive_in(name: &str, cfg: &Path, log_dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else { return false };
    let want = cfg.as_os_str().as_encoded_bytes();
    let logs = [log_dir.join(format!("xl-{name}.log")), log_dir.join(format!("xl-{name}{INCOMING}.log"))];
    rd.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { return false };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { return false };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
        if !args.first().is_some_and(|a| a.ends_with(b"xl")) {
            return false;
        }
        let creates = args.iter().any(|a| *a == b"create") && args.last() == Some(&want);
        // A monitor's stdout and stderr are its log (an xl command run by hand writes to a terminal).
        let monitors = || [1, 2].iter().any(|fd| std::fs::read_link(e.path().join(format!("fd/{fd}"))).is_ok_and(|t| logs.contains(&t)));
        (creates || monitors()) && xvtpm_fsutil::pid_alive(pid)
    })
}

/// Where a non-live move (`xl-vtpm migrate --non-live`) keeps the saved guest of vTPM `uuid`
/// between `xl save` and `xl restore`: `STATE/migrate-save/UUID.xlsave`.
pub fn save_file(state_dir: &Path, uuid: &Uuid) -> PathBuf {
    state_dir.join("migrate-save").join(format!("{uuid}.xlsave"))
}

/// What the source of a move to another host keeps until the guest resumed there (the offer,
/// the destination; `crosshost`), beside the saved guest.
pub fn move_record(state_dir: &Path, uuid: &Uuid) -> PathBuf {
    state_dir.join("migrate-save").join(format!("{uuid}.move.json"))
}

/// The suffix `xl migrate-receive` gives a guest it receives until the move completes.
pub const INCOMING: &str = "--incoming";
/// The suffix `xl migrate` gives the sending guest once the receiver has it, until it is destroyed.
pub const MIGRATED_AWAY: &str = "--migratedaway";

/// What the watcher sees of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A domain of its name runs, with this domid.
    Present(u32),
    /// The guest is being moved on this host: a domain carries it under xl's move names
    /// (`NAME--incoming`, `NAME--migratedaway`), or its memory is in `xl-vtpm migrate`'s save
    /// file between `xl save` and `xl restore`. Its vTPM must keep running.
    Moving,
    /// No domain is, or carries, the guest.
    Absent,
}

/// Looks guest `name` up in the domains running now (`present`: name → domid); `saved`: whether
/// its `xl-vtpm migrate --non-live` save file exists.
pub fn seen(name: &str, present: &BTreeMap<String, u32>, saved: bool) -> Seen {
    if let Some(&d) = present.get(name) {
        return Seen::Present(d);
    }
    let carried = [INCOMING, MIGRATED_AWAY].iter().any(|sfx| present.contains_key(&format!("{name}{sfx}")));
    if carried || saved { Seen::Moving } else { Seen::Absent }
}

/// What `xl-vtpm create` did, or (`--dry-run`) would do.
#[derive(Debug)]
pub enum Created {
    /// The guest and its vTPM run.
    Done(Row),
    /// Every check passed; nothing was created.
    Plan(Plan),
}

/// What `xl-vtpm create --dry-run` would do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// The guest's name.
    pub guest_name: String,
    /// The guest's UUID (from its config, the registry, or new).
    pub guest_uuid: Uuid,
    /// Its vTPM's UUID.
    pub vtpm_uuid: Uuid,
    /// Whether the manager already has that vTPM (it would be started, not manufactured).
    pub vtpm_exists: bool,
    /// Where the vTPM would run: "0" (a process in dom0) or its own domain's name.
    pub vtpm_backend: String,
    /// The group of a new vTPM (the default group if none).
    pub group: Option<String>,
    /// `model=`: the TPM the HVM guest's device model would emulate (absent: a tpmif device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emulated_tpm: Option<&'static str>,
}

/// The xenstore directory where dom0-process vTPMs serve tpmif.
pub const DOM0_BACKEND_ROOT: &str = "/local/domain/0/backend/vtpm";

/// Xen lifecycle context.
pub struct Xen {
    /// Local-mode paths (vtpm-domain processes, state).
    pub local: Local,
    /// The `xl` binary.
    pub xl: PathBuf,
    /// The `losetup` binary (disk images of vTPM domains).
    pub losetup: PathBuf,
    /// How a new vTPM domain is made (kernel, ramdisk, memory).
    pub vtpmdom: VtpmDomDefaults,
    /// The registry (`--registry`); `None`: the SQLite file `registry.sqlite` in the state
    /// directory.
    pub registry: Option<crate::registry::Location>,
    /// This host's name in the registry (`--host`; activation records, per-host checks).
    pub host: String,
}

/// Kernel, ramdisk and memory of vTPM domains that `xl-vtpm create` makes.
#[derive(Debug, Clone)]
pub struct VtpmDomDefaults {
    /// PV kernel.
    pub kernel: PathBuf,
    /// Initramfs with vtpm-domain as /init.
    pub ramdisk: PathBuf,
    /// Memory (MiB) from `XVTPM_VTPMDOM_MEMORY`; `None`: what the image says
    /// ([`crate::vtpmdom::default_memory_mib`]).
    pub memory_mib: Option<String>,
}

/// Where a guest's vTPM runs, from its `vtpm=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// `backend=0` (or none): a vtpm-domain process in dom0.
    Dom0Process,
    /// `backend=NAME`: a vTPM domain of that name (made or started by xl-vtpm).
    Domain(String),
}

impl Placement {
    /// From a `vtpm=` backend value.
    pub fn of_backend(backend: &str) -> Placement {
        match backend {
            "" | "0" | "Domain-0" => Placement::Dom0Process,
            name => Placement::Domain(name.to_string()),
        }
    }
}

fn fail(code: i32, m: impl Into<String>) -> CliError {
    CliError::new(code, m)
}

/// A registry error as the CLI reports it.
pub fn reg_err(e: crate::registry::RegistryError) -> CliError {
    use crate::registry::RegistryError as E;
    let code = match &e {
        E::Sqlite(_) | E::Postgres(_) | E::CommitUnknown(_) | E::Connect { .. } | E::Io { .. } => FAILURE,
        E::BadLocation { .. } | E::BadHost(_) => USAGE,
        _ => REFUSED,
    };
    CliError::caused(code, "", e)
}

/// The vTPM "domain" name recorded for a guest in dom0-process mode.
pub fn vtpm_domain_name(guest: &str) -> String {
    format!("vtpm-{guest}")
}

impl Xen {
    pub(crate) fn domains(&self) -> crate::vtpmdom::Domains<'_> {
        crate::vtpmdom::Domains { local: &self.local, xl: self.xl.clone(), losetup: self.losetup.clone() }
    }

    /// Whether vTPM `uuid` runs (its process, or its domain).
    pub fn vtpm_running(&self, uuid: &Uuid) -> bool {
        self.local.runtime(uuid).is_some() || self.domains().runtime(uuid).is_some()
    }

    /// Stops vTPM `uuid` however it runs (its state stays). Returns whether it was running.
    pub fn stop_vtpm(&self, admin: &mut Admin, uuid: &Uuid) -> Result<bool, CliError> {
        let d = self.domains();
        if d.spec(uuid)?.is_some() {
            d.stop(admin, uuid, crate::vtpmdom::SHUTDOWN_GRACE)
        } else {
            self.local.stop(admin, uuid, Duration::from_secs(5))
        }
    }

    /// The registry a transfer records its move in: the one given with `--registry`, or this
    /// host's SQLite file if it exists or `create` (a move named with `--to-host`); `None`
    /// otherwise (nothing to record).
    pub fn transfer_registry(&self, create: bool) -> Result<Option<Registry>, CliError> {
        if self.registry.is_none() && !create && !self.local.state_dir.join("registry.sqlite").exists() {
            return Ok(None);
        }
        self.registry().map(Some)
    }

    /// The registry this toolstack uses (`--registry`, else the SQLite file in the state dir).
    pub fn open_registry(&self) -> Result<Registry, CliError> {
        self.registry()
    }

    fn registry(&self) -> Result<Registry, CliError> {
        crate::registry::check_host(&self.host).map_err(|e| CliError::caused(USAGE, "", e))?;
        let location = match &self.registry {
            Some(l) => l.clone(),
            None => {
                std::fs::create_dir_all(&self.local.state_dir).map_err(|e| CliError::caused(FAILURE, self.local.state_dir.display().to_string(), e))?;
                crate::registry::Location::Sqlite(self.local.state_dir.join("registry.sqlite"))
            }
        };
        Registry::connect(&location, &self.host).map_err(reg_err)
    }

    fn xl(&self, args: &[&str]) -> Result<String, CliError> {
        let out = Command::new(&self.xl)
            .args(args)
            .output()
            .map_err(|e| CliError::caused(FAILURE, format!("cannot run {}", self.xl.display()), e).fix("is this dom0 with the Xen tools installed?"))?;
        if !out.status.success() {
            return Err(fail(
                FAILURE,
                format!("xl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Running domains (`xl list -v`: name, id, …, uuid).
    pub fn observed(&self) -> Result<Vec<ObservedDomain>, CliError> {
        let text = self.xl(&["list", "-v"])?;
        Ok(parse_xl_list(&text))
    }

    fn domid_of(&self, name: &str) -> Option<u32> {
        self.xl(&["domid", name]).ok().and_then(|s| s.trim().parse().ok())
    }

    /// Whether this is a Xen host whose xenstore a guest's vTPM backend can reach, and whose
    /// `xl` runs: checked before `xl-vtpm create` makes anything.
    pub fn check_xen(&self) -> Result<(), CliError> {
        let xenstore: Vec<PathBuf> = match std::env::var_os("XENSTORED_PATH") {
            Some(p) => vec![PathBuf::from(p)],
            None => vec![PathBuf::from("/run/xenstored/socket"), PathBuf::from("/dev/xen/xenbus")],
        };
        if !xenstore.iter().any(|p| p.exists()) {
            let paths: Vec<String> = xenstore.iter().map(|p| p.display().to_string()).collect();
            return Err(fail(
                FAILURE,
                format!(
                    "Xen is not running on this host (no xenstore at {}): `xl-vtpm create` makes a Xen guest and runs in dom0 of a Xen host; \
                     for a vTPM without Xen (QEMU/KVM, tpm2-tools) use `xl-vtpm vtpm create`",
                    paths.join(" or ")
                ),
            ));
        }
        self.xl(&["info"]).map(|_| ())
    }

    /// `xl-vtpm create`: every check first (config, Xen present, registry binding, guest not
    /// running), then the vTPM, then the guest. With `dry_run`, stops after the checks and
    /// says what it would do; nothing is created (not even an empty registry).
    pub fn create(&self, admin: &mut Admin, cfg_path: &Path, group: Option<String>, dry_run: bool) -> Result<Created, CliError> {
        let mut cfg = XlConfig::parse_file(cfg_path).map_err(|e| CliError::caused(USAGE, "", e))?;
        let name = cfg
            .name()
            .map(str::to_string)
            .ok_or_else(|| fail(USAGE, format!("{}: `name` is missing; every guest needs a name", cfg_path.display())))?;
        let specs = cfg.vtpms();
        if specs.len() > 1 {
            return Err(fail(USAGE, format!("{}: vtpm= lists {} devices; a guest has one TPM", cfg_path.display(), specs.len())));
        }
        let placement = specs.first().map_or(Placement::Dom0Process, |s| Placement::of_backend(&s.backend));
        // `model=`: the device model emulates the TPM; its uid is the vTPM's consumer.
        let emulated = match specs.first().and_then(|s| s.model) {
            Some(model) => {
                let consumer = crate::hvm::check(&cfg, &crate::hvm::lookup_user).map_err(|e| CliError::caused(USAGE, cfg_path.display().to_string(), e))?;
                let acpi = crate::hvm::acpi_firmware(&cfg, model).map_err(|e| CliError::caused(USAGE, cfg_path.display().to_string(), e))?;
                Some(Emulated { model, consumer, acpi })
            }
            None => None,
        };
        if let Placement::Domain(d) = &placement {
            crate::vtpmdom::check_name(d).map_err(|e| CliError::caused(USAGE, format!("{}: vtpm= backend", cfg_path.display()), e))?;
            if *d == name {
                return Err(fail(USAGE, format!("{}: vtpm= backend={d:?} is the guest itself; name the vTPM domain (e.g. backend=vtpm-{name})", cfg_path.display())));
            }
        }
        self.check_xen()?;
        let reg_file = self.local.state_dir.join("registry.sqlite");
        let mut reg = if dry_run && !reg_file.exists() { None } else { Some(self.registry()?) };
        // Without `uuid=`, the name identifies the guest: a guest created before
        // under this name keeps its UUID (and so its vTPM).
        let guest_uuid = match cfg.uuid() {
            Some(u) => u,
            None => {
                let known = match &reg {
                    Some(r) => r.get_by_name(&name).map_err(reg_err)?.map(|r| r.guest_uuid),
                    None => None,
                };
                let u = known.unwrap_or_else(Uuid::new_v4);
                cfg.set("uuid", u.to_string()).map_err(|e| CliError::caused(USAGE, "", e))?;
                u
            }
        };
        let bound = match &reg {
            Some(r) => r.get_by_guest(guest_uuid).map_err(reg_err)?,
            None => None,
        };
        let vtpm_uuid = match (specs.first().and_then(|s| s.uuid), &bound) {
            (Some(u), _) => u,
            (None, Some(row)) => row.vtpm_uuid,
            (None, None) => Uuid::new_v4(),
        };
        if let Some(r) = &reg {
            r.check_attach(vtpm_uuid, guest_uuid).map_err(reg_err)?;
        }
        if emulated.is_some() {
            crate::hvm::check_socket_path(&self.device_model_socket(&vtpm_uuid)).map_err(|e| fail(USAGE, e))?;
        }
        if let Some(domid) = self.domid_of(&name) {
            return Err(fail(REFUSED, format!("guest {name} is already running (domid {domid})")));
        }
        if dry_run {
            let vtpm_exists = match admin.call(&AdminRequest::VtpmShow { uuid: vtpm_uuid }) {
                Ok(_) => true,
                Err(e) if e.code == NOT_FOUND => false,
                Err(e) => return Err(e),
            };
            return Ok(Created::Plan(Plan {
                guest_name: name,
                guest_uuid,
                vtpm_uuid,
                vtpm_exists,
                vtpm_backend: match &placement {
                    Placement::Dom0Process => "0".into(),
                    Placement::Domain(d) => d.clone(),
                },
                group,
                emulated_tpm: emulated.as_ref().map(|e| e.model.as_str()),
            }));
        }
        let reg = reg.as_mut().expect("opened unless dry-run");
        let id = reg
            .begin_create(&NewPair {
                guest_uuid,
                guest_name: name.clone(),
                vtpm_uuid,
                vtpm_domain: match &placement {
                    Placement::Dom0Process => vtpm_domain_name(&name),
                    Placement::Domain(d) => d.clone(),
                },
                group: group.clone(),
            })
            .map_err(reg_err)?;
        let mut undo = Undo { new_row: bound.is_none(), id, identity_created: false, started: false, uuid: vtpm_uuid };
        let result = self.create_steps(admin, reg, &mut cfg, &name, vtpm_uuid, &placement, emulated.as_ref(), group, &mut undo);
        match result {
            Ok(row) => Ok(Created::Done(row)),
            Err(e) => {
                self.rollback(admin, reg, &undo);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_steps(
        &self,
        admin: &mut Admin,
        reg: &mut Registry,
        cfg: &mut XlConfig,
        name: &str,
        vtpm_uuid: Uuid,
        placement: &Placement,
        emulated: Option<&Emulated>,
        group: Option<String>,
        undo: &mut Undo,
    ) -> Result<Row, CliError> {
        let (identity_created, started, vtpm_domid) = match placement {
            Placement::Dom0Process if emulated.is_some() => {
                let consumer = emulated.and_then(|e| e.consumer);
                let (c, s) = self.ensure_vtpm_for_device_model(admin, vtpm_uuid, group, consumer)?;
                (c, s, 0)
            }
            Placement::Dom0Process => {
                let (c, s) = self.ensure_vtpm_process(admin, vtpm_uuid, group)?;
                (c, s, 0)
            }
            Placement::Domain(d) => self.ensure_vtpm_domain(admin, vtpm_uuid, d, group)?,
        };
        undo.identity_created = identity_created;
        undo.started = started;
        reg.set_domids(undo.id, None, Some(vtpm_domid)).map_err(reg_err)?;
        let backend = match placement {
            Placement::Dom0Process => "0".to_string(),
            Placement::Domain(d) => d.clone(),
        };
        let dir = self.local.run_dir.join("guests");
        std::fs::create_dir_all(&dir).map_err(|e| CliError::caused(FAILURE, dir.display().to_string(), e))?;
        match emulated {
            Some(e) => {
                // The guest's ACPI tables for its TPM (CRB): libxl reads the file at each build
                // of the domain, a reboot's included, so it stays beside the guest's config.
                let acpi_file = match &e.acpi {
                    Some(tables) => {
                        let f = dir.join(format!("{name}.acpi"));
                        xvtpm_fsutil::write_atomic(&f, tables, 0o600).map_err(|err| CliError::caused(FAILURE, f.display().to_string(), err))?;
                        Some(f)
                    }
                    None => None,
                };
                crate::hvm::apply(cfg, &self.device_model_socket(&vtpm_uuid), e.model, acpi_file.as_deref()).map_err(|m| CliError::caused(FAILURE, "", m))?;
            }
            None => cfg.set_vtpms(&[VtpmSpec { backend, uuid: Some(vtpm_uuid), model: None }]),
        }
        let path = dir.join(format!("{name}.cfg"));
        xvtpm_fsutil::write_atomic(&path, cfg.render().as_bytes(), 0o600).map_err(|e| CliError::caused(FAILURE, path.display().to_string(), e))?;
        self.xl(&["create", path.to_str().unwrap_or_default()])?;
        let domid = self.domid_of(name).ok_or_else(|| fail(FAILURE, format!("xl create succeeded but guest {name} has no domid")))?;
        reg.mark_running(undo.id, domid, vtpm_domid).map_err(reg_err)?;
        reg.get(undo.id).map_err(reg_err)?.ok_or_else(|| fail(FAILURE, "registry row vanished"))
    }

    /// Makes sure vTPM `uuid` exists and runs in its own domain `name` (ready before it
    /// returns). A new vTPM gets a new domain and disk. Returns (identity created now,
    /// domain started now, the vTPM domain's domid).
    pub fn ensure_vtpm_domain(&self, admin: &mut Admin, uuid: Uuid, name: &str, group: Option<String>) -> Result<(bool, bool, u32), CliError> {
        let d = self.domains();
        if let Some(rt) = d.runtime(&uuid) {
            if rt.name != name {
                return Err(fail(REFUSED, format!("vTPM {uuid} runs in domain {}, not {name:?}; fix the guest's vtpm= backend", rt.name)));
            }
            return Ok((false, false, rt.domid));
        }
        let wait = crate::vtpmdom::DEFAULT_READY_WAIT;
        match admin.call(&AdminRequest::VtpmShow { uuid }) {
            Ok(_) => {
                let spec = d.spec(&uuid)?.ok_or_else(|| {
                    fail(REFUSED, format!("vTPM {uuid} runs as a dom0 process (backend=0), not in a domain; keep backend=0 in the guest's vtpm= line"))
                })?;
                if spec.name != name {
                    return Err(fail(REFUSED, format!("vTPM {uuid} belongs to vTPM domain {:?}, not {name:?}; fix the guest's vtpm= backend", spec.name)));
                }
                let rt = d.start(admin, &uuid, wait)?;
                Ok((false, true, rt.domid))
            }
            Err(e) if e.code == NOT_FOUND => {
                let opts = crate::vtpmdom::DomainOpts {
                    name: name.to_string(),
                    kernel: self.vtpmdom.kernel.clone(),
                    ramdisk: self.vtpmdom.ramdisk.clone(),
                    memory_mib: crate::vtpmdom::default_memory_mib(self.vtpmdom.memory_mib.as_deref(), &self.vtpmdom.ramdisk)?,
                    disk: None,
                    ready_wait: wait,
                };
                let rt = d.create(admin, group, Some(uuid), &opts, vec!["--ek".into(), "rsa".into()])?;
                Ok((true, true, rt.domid))
            }
            Err(e) => Err(e),
        }
    }

    /// The control socket an HVM guest's device model connects to: vTPM `uuid`'s default one.
    pub(crate) fn device_model_socket(&self, uuid: &Uuid) -> PathBuf {
        self.local.socket_dir(uuid).join(format!("{}.ctrl", crate::local::DATA_SOCKET))
    }

    /// Makes sure vTPM `uuid` exists in the manager and runs as a dom0 process on its default
    /// Unix sockets, served to root and `consumer` (the uid of the HVM guest's device model,
    /// `None`: root), for the device model to connect to. A vTPM made or running with other
    /// listeners or for another uid is refused, naming them: it serves someone else.
    /// Returns (identity created now, process started now).
    pub fn ensure_vtpm_for_device_model(&self, admin: &mut Admin, uuid: Uuid, group: Option<String>, consumer: Option<u32>) -> Result<(bool, bool), CliError> {
        let who = |c: Option<u32>| c.map_or("root only".to_string(), |u| format!("uid {u}"));
        let data = self.local.socket_dir(&uuid).join(crate::local::DATA_SOCKET);
        if let Some(rt) = self.local.runtime(&uuid) {
            if rt.socket.as_deref() != Some(data.as_path()) || rt.consumer_uid != consumer {
                return Err(fail(
                    REFUSED,
                    format!(
                        "vTPM {uuid} already runs (process {}) on {:?} for {}, but the guest's device model needs it on {} for {}; \
                         stop it (`xl-vtpm vtpm stop {uuid}`) and create the guest again",
                        rt.pid,
                        rt.listen,
                        who(rt.consumer_uid),
                        data.display(),
                        who(consumer)
                    ),
                ));
            }
            return Ok((false, false));
        }
        match admin.call(&AdminRequest::VtpmShow { uuid }) {
            Ok(_) => {
                let access = self.local.access(&uuid);
                if !access.listen.is_empty() || access.consumer_uid != consumer {
                    return Err(fail(
                        REFUSED,
                        format!(
                            "vTPM {uuid} was made to be reached on {} by {}; the guest's device model (run as {}) needs its default sockets for that uid: \
                             set device_model_user to the vTPM's user, or give the guest another vTPM",
                            if access.listen.is_empty() { "its default sockets".to_string() } else { access.listen.join(", ") },
                            who(access.consumer_uid),
                            who(consumer)
                        ),
                    ));
                }
                self.local.start(admin, &uuid, &[])?;
                Ok((false, true))
            }
            Err(e) if e.code == NOT_FOUND => {
                let opts = crate::local::CreateOpts { consumer_uid: consumer, ..Default::default() };
                self.local.create(admin, group, Some(uuid), &[], &opts)?;
                Ok((true, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure vTPM `uuid` exists in the manager and its dom0 tpmif
    /// backend process runs (ready, i.e. watching, before it returns).
    /// Returns (identity created now, process started now).
    pub fn ensure_vtpm_process(&self, admin: &mut Admin, uuid: Uuid, group: Option<String>) -> Result<(bool, bool), CliError> {
        if self.local.runtime(&uuid).is_some() {
            return Ok((false, false));
        }
        let listen = vec![format!("xen:{DOM0_BACKEND_ROOT}")];
        match admin.call(&AdminRequest::VtpmShow { uuid }) {
            Ok(_) => {
                self.local.start(admin, &uuid, &listen)?;
                Ok((false, true))
            }
            Err(e) if e.code == NOT_FOUND => {
                self.local.create(admin, group, Some(uuid), &listen, &Default::default())?;
                Ok((true, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Executes a libvirt hook decision (`xl-vtpm libvirt-hook`). `admin`: the manager,
    /// connected here when an action first needs it (a guest without a vTPM, or one arriving
    /// with its vTPM, needs none).
    pub fn run_hook_action(&self, admin: &mut Option<Admin>, action: &crate::libvirt_hook::Action) -> Result<(), CliError> {
        use crate::libvirt_hook::Action as A;
        use crate::libvirt_migrate::{Incoming, MigrateConfig};
        let run_dir = self.local.run_dir.clone();
        let mgr = |slot: &mut Option<Admin>| -> Result<(), CliError> {
            if slot.is_none() {
                *slot = Some(Admin::connect(&run_dir)?);
            }
            Ok(())
        };
        let reg = &mut self.registry()?;
        match action {
            A::EnsureVtpmRunning { guest_name, guest_uuid, request } => {
                let bound = reg.get_by_guest(*guest_uuid).map_err(reg_err)?;
                // An incoming migration that takes its vTPM along: the vTPM arrives at
                // `started` (a vTPM made here would be a new identity).
                if let Some(mut m) = Incoming::find(&run_dir, guest_name)
                    && bound.as_ref().is_some_and(|r| r.vtpm_uuid == m.vtpm)
                {
                    m.prepared = true;
                    return m.save(&run_dir);
                }
                mgr(admin)?;
                let admin = admin.as_mut().expect("connected");
                let vtpm = request.uuid.or(bound.as_ref().map(|r| r.vtpm_uuid)).unwrap_or_else(Uuid::new_v4);
                reg.check_attach(vtpm, *guest_uuid).map_err(reg_err)?;
                let id = match bound {
                    Some(r) if r.state != State::Stopped => r.id,
                    _ => reg
                        .begin_create(&NewPair {
                            guest_uuid: *guest_uuid,
                            guest_name: guest_name.clone(),
                            vtpm_uuid: vtpm,
                            vtpm_domain: vtpm_domain_name(guest_name),
                            group: request.group.clone(),
                        })
                        .map_err(reg_err)?,
                };
                self.ensure_vtpm_process(admin, vtpm, request.group.clone())?;
                reg.set_domids(id, None, Some(0)).map_err(reg_err)
            }
            A::AttachVtpm { guest_name, guest_uuid, guest_domid } => {
                let row = reg.get_by_guest(*guest_uuid).map_err(reg_err)?.ok_or_else(|| fail(NOT_FOUND, format!("guest {guest_name} has no vTPM pair; the prepare hook did not run")))?;
                let domid = guest_domid.or_else(|| self.domid_of(guest_name)).ok_or_else(|| fail(FAILURE, format!("guest {guest_name} has no domid")))?;
                if let Some(m) = Incoming::find(&run_dir, guest_name).filter(|m| m.prepared && m.vtpm == row.vtpm_uuid) {
                    return self.pull_vtpm(&m, domid);
                }
                self.xl(&["vtpm-attach", &domid.to_string(), "backend=0", &format!("uuid={}", row.vtpm_uuid)])?;
                reg.mark_running(row.id, domid, 0).map_err(reg_err)
            }
            A::StopVtpm { guest_name, guest_uuid } => {
                // An incoming migration that ended here (failed, or its vTPM arrived): its note goes.
                Incoming::remove(&run_dir, guest_name);
                let Some(row) = reg.get_by_guest(*guest_uuid).map_err(reg_err)? else { return Ok(()) };
                // Held by another host: the guest moved there with its vTPM (this is the source
                // after a libvirt migration), or never came here (a failed incoming one).
                if row.active_on.as_deref().is_some_and(|h| h != self.host) || (row.active_on.is_none() && row.host != self.host) {
                    return Ok(());
                }
                if matches!(row.state, State::Running | State::Creating) {
                    reg.begin_destroy(row.id).map_err(reg_err)?;
                }
                mgr(admin)?;
                self.stop_vtpm(admin.as_mut().expect("connected"), &row.vtpm_uuid)?;
                if reg.get(row.id).map_err(reg_err)?.is_some_and(|r| r.state == State::Destroying) {
                    reg.mark_stopped(row.id).map_err(reg_err)?;
                }
                Ok(())
            }
            A::Verify { guest_name, guest_uuid } => {
                let row = reg.get_by_guest(*guest_uuid).map_err(reg_err)?;
                match row {
                    Some(r) if self.local.runtime(&r.vtpm_uuid).is_none() => {
                        Err(fail(FAILURE, format!("guest {guest_name}: its vTPM {} is not running", r.vtpm_uuid)))
                    }
                    _ => Ok(()),
                }
            }
            A::CheckIncoming { guest_name } => match reg.get_by_name(guest_name).map_err(reg_err)? {
                None => Ok(()),
                Some(r) => {
                    let held = r.active_on.clone().filter(|h| *h != self.host && r.state == State::Running);
                    let config = MigrateConfig::load()?;
                    match (held, config) {
                        // The source checks this host and makes its offer now, while the guest
                        // runs there: a refusal here is clean.
                        (Some(from), Some(cfg)) => {
                            let m = Incoming::new(guest_name, r.vtpm_uuid, &from);
                            self.handoff(&cfg, &m, None).map_err(|e| {
                                fail(e.code, format!("incoming migration of guest {guest_name} refused: host {from} does not hand vTPM {} to this host: {}", r.vtpm_uuid, e.text()))
                            })?;
                            m.save(&run_dir)
                        }
                        (held, config) => {
                            let how = match (held, config) {
                                (Some(_), None) => format!(
                                    "; to let vTPMs follow libvirt migrations, write {} on the hosts (docs/libvirt.md)",
                                    MigrateConfig::path().display()
                                ),
                                _ => String::new(),
                            };
                            Err(fail(
                                REFUSED,
                                format!(
                                    "incoming migration of guest {guest_name} refused: the registry binds it to vTPM {} (host {}, {:?}), whose state is sealed to that host's TPM and cannot follow a libvirt migration{how}; shut the guest down and start it here",
                                    r.vtpm_uuid,
                                    r.active_on.as_deref().unwrap_or(&r.host),
                                    r.state
                                ),
                            ))
                        }
                    }
                }
            },
            A::RefuseMigration { guest_name, reason } => Err(fail(REFUSED, format!("incoming migration of guest {guest_name} refused: {reason}"))),
        }
    }

    /// The destination's `started` of a libvirt migration that takes the vTPM along: runs the
    /// source's handoff (`m.from_host`) through the transport, which moves the identity here,
    /// starts the vTPM and attaches it to the paused domain `domid`. Once the vTPM left the
    /// source ([`crate::exit::MOVE_UNFINISHED`]) the guest belongs here: the hook then succeeds
    /// (libvirt unpauses the guest here) and says how to finish the move.
    fn pull_vtpm(&self, m: &crate::libvirt_migrate::Incoming, domid: u32) -> Result<(), CliError> {
        let cfg = crate::libvirt_migrate::MigrateConfig::load()?
            .ok_or_else(|| fail(REFUSED, format!("guest {} arrives with its vTPM, but {} is gone", m.guest, crate::libvirt_migrate::MigrateConfig::path().display())))?;
        let t = std::time::Instant::now();
        crate::libvirt_migrate::Incoming::remove(&self.local.run_dir, &m.guest);
        match self.handoff(&cfg, m, Some(domid)) {
            Ok(report) => {
                eprintln!("xl-vtpm libvirt-hook: guest {} (domain {domid}) took its vTPM {} from host {} in {} ms: {report}", m.guest, m.vtpm, m.from_host, t.elapsed().as_millis());
                Ok(())
            }
            Err(e) if e.code == crate::exit::MOVE_UNFINISHED => {
                eprintln!(
                    "xl-vtpm libvirt-hook: ERROR: guest {} (domain {domid}) stays here without its TPM: {}; on host {}: `xl-vtpm migrate {} {} --finish` with the checks of its {}",
                    m.guest,
                    e.text(),
                    m.from_host,
                    m.guest,
                    self.host,
                    crate::libvirt_migrate::MigrateConfig::path().display()
                );
                Ok(())
            }
            Err(e) => Err(fail(e.code, format!("guest {} cannot take its vTPM {} from host {}: {}; libvirt cancels the migration, and the guest resumes there", m.guest, m.vtpm, m.from_host, e.text()))),
        }
    }

    /// Runs the source's `xl-vtpm libvirt-handoff` for `m` through the transport (`--prepare`
    /// without `domid`). Returns its report (stdout); its failure carries its exit code and its
    /// own error line as the cause (the lines before it are its progress, forwarded to stderr).
    fn handoff(&self, cfg: &crate::libvirt_migrate::MigrateConfig, m: &crate::libvirt_migrate::Incoming, domid: Option<u32>) -> Result<String, CliError> {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        let line = cfg.handoff_line(&m.from_host, &m.guest, &self.host, domid)?;
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", &line])
            // its own process group: a timeout ends the transport too, not only the shell
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| CliError::caused(FAILURE, format!("cannot run the handoff ({line})"), e))?;
        // What the peer says is read up to a cap (the rest drained), on threads, so a stream
        // that fills its pipe cannot stall the wait below.
        let capped = |r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut r = r;
                let mut buf = Vec::new();
                let _ = (&mut r).take(crate::libvirt_migrate::MAX_HANDOFF_OUTPUT).read_to_end(&mut buf);
                let _ = std::io::copy(&mut r, &mut std::io::sink());
                buf
            })
        };
        let out = capped(Box::new(child.stdout.take().expect("piped")));
        let err = capped(Box::new(child.stderr.take().expect("piped")));
        // `--prepare` runs inside libvirt's Prepare: an unreachable source must not hold it.
        let within = std::time::Duration::from_secs(cfg.prepare_timeout_s);
        let deadline = domid.is_none().then(|| std::time::Instant::now() + within);
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if deadline.is_some_and(|d| std::time::Instant::now() >= d) => {
                    if let Ok(pid) = i32::try_from(child.id()) {
                        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(
                        FAILURE,
                        format!("host {} did not answer within {} s (`{line}`; prepare_timeout_s in the configuration)", m.from_host, within.as_secs()),
                    ));
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Err(e) => return Err(CliError::caused(FAILURE, format!("waiting for the handoff ({line})"), e)),
            }
        };
        let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
        let said = String::from_utf8_lossy(&stderr);
        let mut lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        if status.success() {
            lines.iter().for_each(|l| eprintln!("{l}"));
            return Ok(String::from_utf8_lossy(&stdout).trim().to_string());
        }
        let cause = lines.pop().unwrap_or("(it said nothing)").trim();
        let cause = cause.strip_prefix("xl-vtpm: error: ").unwrap_or(cause).to_string();
        lines.iter().for_each(|l| eprintln!("{l}"));
        let code = status.code().unwrap_or(FAILURE);
        Err(fail(if code == 0 { FAILURE } else { code }, format!("{cause} (`{line}` exit {code})")))
    }

    fn rollback(&self, admin: &mut Admin, reg: &mut Registry, undo: &Undo) {
        if undo.started {
            let _ = self.stop_vtpm(admin, &undo.uuid);
        }
        if undo.identity_created {
            let _ = self.local.destroy(admin, &undo.uuid);
        }
        let _ = reg.begin_destroy(undo.id).and_then(|_| reg.mark_stopped(undo.id));
        if undo.new_row {
            let _ = reg.remove(undo.id);
        }
    }

    /// The registry's pair of guest `name`, or the refusal naming `xl-vtpm list`.
    pub(crate) fn row_by_name(&self, reg: &Registry, name: &str) -> Result<Row, CliError> {
        reg.get_by_name(name)
            .map_err(reg_err)?
            .ok_or_else(|| fail(NOT_FOUND, format!("no guest {name:?} in the registry; see `xl-vtpm list`")))
    }

    /// `xl-vtpm destroy|shutdown`: stops the guest, then its vTPM.
    pub fn stop_pair(&self, admin: &mut Admin, name: &str, how: Stop) -> Result<(), CliError> {
        let reg = &mut self.registry()?;
        let row = self.row_by_name(reg, name)?;
        if row.state == State::Running || row.state == State::Creating {
            reg.begin_destroy(row.id).map_err(reg_err)?;
        }
        if self.domid_of(name).is_some() {
            match how {
                Stop::Destroy => self.xl(&["destroy", name]).map(|_| ())?,
                Stop::Shutdown => self.xl(&["shutdown", "-w", name]).map(|_| ())?,
            }
        }
        self.stop_vtpm(admin, &row.vtpm_uuid)?;
        if reg.get(row.id).map_err(reg_err)?.is_some_and(|r| r.state == State::Destroying) {
            reg.mark_stopped(row.id).map_err(reg_err)?;
        }
        Ok(())
    }

    /// `xl-vtpm registry remove`: forgets a stopped pair.
    pub fn forget(&self, name: &str) -> Result<(), CliError> {
        let reg = &mut self.registry()?;
        let row = self.row_by_name(reg, name)?;
        reg.remove(row.id).map_err(reg_err)
    }

    /// `xl-vtpm reboot`: the guest reboots, its vTPM stays.
    pub fn reboot(&self, name: &str) -> Result<(), CliError> {
        self.xl(&["reboot", name]).map(|_| ())
    }

    /// Registry rows with what is observed now.
    pub fn list(&self) -> Result<Vec<serde_json::Value>, CliError> {
        let reg = self.registry()?;
        let observed = self.observed().unwrap_or_default();
        let rows = reg.list().map_err(reg_err)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                // Another host's pair: nothing observed here says anything about it.
                let here = r.host == reg.host();
                let guest = observed.iter().find(|o| here && o.name == r.guest_name).map(|o| o.domid);
                let vtpm = self.local.runtime(&r.vtpm_uuid).map(|rt| rt.pid);
                let vtpm_dom = self.domains().runtime(&r.vtpm_uuid).map(|rt| rt.domid);
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["guest_running_domid"] = serde_json::json!(guest);
                v["vtpm_pid"] = serde_json::json!(vtpm);
                v["vtpm_running_domid"] = serde_json::json!(vtpm_dom);
                v
            })
            .collect())
    }

    /// Domains as the registry expects to see them: real domains plus a
    /// synthetic `vtpm-<guest>` entry for every running dom0 vTPM process.
    fn observed_with_vtpms(&self, reg: &Registry) -> Result<Vec<ObservedDomain>, CliError> {
        let mut obs = self.observed()?;
        for r in reg.list().map_err(reg_err)?.into_iter().filter(|r| r.host == reg.host()) {
            if self.local.runtime(&r.vtpm_uuid).is_some() {
                obs.push(ObservedDomain { name: r.vtpm_domain.clone(), uuid: r.vtpm_uuid, domid: 0 });
            }
        }
        Ok(obs)
    }

    /// `xl-vtpm registry check [--repair] [--all-hosts]`: reports drift of this host's pairs
    /// (and repairs it); with `all_hosts`, also what the registry shows of other hosts' pairs
    /// (never repaired from here: only their host sees their domains).
    pub fn check(&self, admin: &mut Admin, repair: bool, all_hosts: bool) -> Result<Vec<String>, CliError> {
        let reg = &mut self.registry()?;
        let obs = self.observed_with_vtpms(reg)?;
        let mgr: Vec<Uuid> = admin.list_vtpms()?.into_iter().map(|v| v.uuid).collect();
        let drift = if all_hosts {
            reg.check_all_hosts(&obs, Some(&mgr), Default::default())
        } else {
            reg.check(&obs, Some(&mgr), Default::default())
        }
        .map_err(reg_err)?;
        // A pooled vTPM belongs to no guest by design: it waits for a `vtpm create` to claim it.
        let drift: Vec<_> = drift.into_iter().filter(|d| !matches!(d, crate::registry::Drift::UnregisteredManagerVtpm { vtpm } if self.local.pooled(vtpm))).collect();
        let mut report: Vec<String> = drift.iter().map(|d| format!("drift: {d}")).collect();
        if let Ok(p) = self.local.pool_status(admin) {
            let ready: usize = p.ready.iter().map(|c| c.ready).sum();
            if ready + p.making + p.claiming + p.abandoned > 0 {
                report.push(format!(
                    "pool: {ready} ready vTPM(s) (not drift: claimed by `vtpm create`), {} being made, {} being claimed, {} left by a killed fill or claim (`xl-vtpm vtpm pool drain` removes them)",
                    p.making, p.claiming, p.abandoned
                ));
            }
        }
        if repair {
            for action in crate::registry::repair(&drift, Some(&mgr)) {
                use crate::registry::RepairAction as A;
                let done = match &action {
                    A::DestroyDomain { name, domid, .. } if name.starts_with("vtpm-") && *domid == 0 => {
                        let row = reg.list().map_err(reg_err)?.into_iter().find(|r| &r.vtpm_domain == name);
                        match row {
                            Some(r) => self.stop_vtpm(admin, &r.vtpm_uuid).map(|_| true),
                            None => Ok(false),
                        }
                    }
                    A::DestroyDomain { name, domid, .. } => {
                        if self.domid_of(name) == Some(*domid) {
                            self.xl(&["destroy", &domid.to_string()]).map(|_| true)
                        } else {
                            Ok(false)
                        }
                    }
                    other => reg.apply(other).map_err(reg_err),
                };
                report.push(format!("repair: {action:?} → {}", if done.unwrap_or(false) { "done" } else { "not applied" }));
            }
        }
        Ok(report)
    }

    /// One pass of the watcher: stop the vTPM of every running pair whose
    /// guest is gone (unless xl is rebooting it, see `await_reboot`).
    pub fn reap_once(&self, admin: &mut Admin) -> Result<Vec<String>, CliError> {
        let reg = &mut self.registry()?;
        let mut done = vec![];
        let running: Vec<Row> = reg.list().map_err(reg_err)?.into_iter().filter(|r| r.state == State::Running && r.host == reg.host()).collect();
        if running.is_empty() {
            return Ok(done);
        }
        let obs = self.observed()?;
        let present: BTreeMap<String, u32> = obs.iter().map(|o| (o.name.clone(), o.domid)).collect();
        for r in running {
            let saved = save_file(&self.local.state_dir, &r.vtpm_uuid).exists();
            match seen(&r.guest_name, &present, saved) {
                Seen::Present(domid) => {
                    if Some(domid) != r.guest_domid {
                        reg.mark_running(r.id, domid, r.vtpm_domid.unwrap_or(0)).map_err(reg_err)?;
                        let how = if saved { "restored by a move" } else { "rebooted" };
                        done.push(format!("{}: {how} as domid {domid}; vTPM kept", r.guest_name));
                    }
                    continue;
                }
                // `xl-vtpm migrate` records the new domain once the move is done.
                Seen::Moving => continue,
                Seen::Absent => {}
            }
            let back = self.await_reboot(&r.guest_name);
            match back {
                Some(d) => {
                    reg.mark_running(r.id, d, r.vtpm_domid.unwrap_or(0)).map_err(reg_err)?;
                    done.push(format!("{}: rebooted as domid {d}; vTPM kept", r.guest_name));
                }
                None => {
                    reg.begin_destroy(r.id).map_err(reg_err)?;
                    self.stop_vtpm(admin, &r.vtpm_uuid)?;
                    reg.mark_stopped(r.id).map_err(reg_err)?;
                    done.push(format!("{}: guest gone; vTPM {} stopped", r.guest_name, r.vtpm_uuid));
                }
            }
        }
        Ok(done)
    }

    /// After a guest vanished: is it coming back (a reboot)? `xl create`
    /// leaves a monitor process that restarts the domain on reboot and exits
    /// when the domain is destroyed or powered off. So: the guest is back →
    /// reboot; the monitor is gone → destroyed (answer at once); the monitor
    /// still runs after [`MONITOR_SETTLE`] → a reboot is being built (slow under
    /// emulation), wait up to [`REBOOT_MAX`] for the domain. The monitor
    /// needs a moment to exit after a destroy, so its absence counts only
    /// after [`MONITOR_SETTLE`].
    fn await_reboot(&self, name: &str) -> Option<u32> {
        let cfg = self.local.run_dir.join("guests").join(format!("{name}.cfg"));
        let start = Instant::now();
        loop {
            if let Some(d) = self.domid_of(name) {
                return Some(d);
            }
            let monitor = xl_monitor_alive(name, &cfg);
            let waited = start.elapsed();
            if !monitor && waited >= MONITOR_SETTLE {
                return None;
            }
            if waited >= REBOOT_MAX {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `xl-vtpm watch`: runs [`Self::reap_once`] on every `@releaseDomain`
    /// (and every `poll` as a safety net) until killed.
    pub fn watch(&self, run_dir: &Path, poll: Duration) -> Result<(), CliError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::caused(FAILURE, "", e))?;
        rt.block_on(async {
            use xen_platform::xenstore::Xenstore;
            let (xs, mut events) = xen_platform::xenstore::XsClient::open().await.map_err(|e| CliError::caused(FAILURE, "", e))?;
            xs.watch("@releaseDomain").await.map_err(|e| CliError::caused(FAILURE, "watching @releaseDomain", e))?;
            println!("{}", serde_json::json!({"watching": "@releaseDomain"}));
            loop {
                let _ = tokio::time::timeout(poll, events.next()).await;
                // A fresh admin connection per pass: the manager may have restarted.
                match Admin::connect(run_dir) {
                    // On its own thread: the PostgreSQL client runs its own runtime, which
                    // cannot start inside this one.
                    Ok(mut admin) => match std::thread::scope(|s| s.spawn(|| self.reap_once(&mut admin)).join())
                        .unwrap_or_else(|_| Err(fail(FAILURE, "the registry pass panicked")))
                    {
                        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                        Err(e) => eprintln!("xl-vtpm watch: {}", e.text()),
                    },
                    Err(e) if e.code == crate::exit::NO_MANAGER => eprintln!("xl-vtpm watch: {}", e.text()),
                    Err(e) => return Err(e),
                }
            }
        })
    }
}

/// How to stop a guest.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// `xl destroy`.
    Destroy,
    /// `xl shutdown -w`.
    Shutdown,
}

/// `model=`: the TPM an HVM guest's device model emulates, the uid it runs as, and the
/// `acpi_firmware` tables the guest needs to find it (CRB).
#[derive(Debug, Clone)]
struct Emulated {
    model: crate::xlcfg::TpmModel,
    consumer: Option<u32>,
    acpi: Option<Vec<u8>>,
}

struct Undo {
    new_row: bool,
    id: i64,
    identity_created: bool,
    started: bool,
    uuid: Uuid,
}

/// Parses `xl list -v` (Name ID Mem VCPUs State Time(s) UUID …).
pub fn parse_xl_list(text: &str) -> Vec<ObservedDomain> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let name = (*cols.first()?).to_string();
            let domid = cols.get(1)?.parse().ok()?;
            let uuid = cols.get(6).and_then(|u| Uuid::parse_str(u).ok()).unwrap_or(Uuid::nil());
            Some(ObservedDomain { name, uuid, domid })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that looks like an xl monitor: argv[0] `xl`, the given arguments, stdout on `log`.
    fn fake_monitor(args: &[&str], log: &Path) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new("/bin/sh")
            .arg0("xl")
            .arg("-c")
            .arg("read x")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(out)
            .spawn()
            .unwrap();
        // `spawn` returns once the child has begun its exec, which can be before the kernel has
        // set up its new argument area: until then /proc/PID/cmdline reads empty. A real monitor
        // lives for the guest's life; the test waits as long as that window lasts.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"xl\0")) {
            assert!(std::time::Instant::now() < deadline, "the fake monitor never showed its arguments");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child
    }

    #[test]
    fn a_restored_or_received_guest_s_monitor_is_found_by_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("g1.cfg");
        // `xl restore -p FILE` names neither the guest nor its config, nor does `xl migrate-receive`.
        let mut restored = fake_monitor(&["restore", "-p", "/var/lib/xvtpm/migrate-save/x.xlsave"], &dir.path().join("xl-g1.log"));
        let mut received = fake_monitor(&["migrate-receive"], &dir.path().join("xl-g2--incoming.log"));
        let mut other = fake_monitor(&["restore", "-p", "/tmp/y"], &dir.path().join("xl-g3x.log"));
        let found = |n: &str| xl_monitor_alive_in(n, &cfg, dir.path());
        let seen = (found("g1"), found("g2"), found("g3"));
        for c in [&mut restored, &mut received, &mut other] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        assert_eq!(seen, (true, true, false));
        assert!(!found("g1"), "a dead monitor is not alive");
    }

    #[test]
    fn a_created_guest_s_monitor_is_found_by_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("g1.cfg");
        let mut c = fake_monitor(&["create", cfg.to_str().unwrap()], &dir.path().join("unrelated.log"));
        let alive = xl_monitor_alive_in("g1", &cfg, dir.path());
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(alive);
    }

    #[test]
    fn a_guest_in_a_move_is_not_gone() {
        let present: BTreeMap<String, u32> = [("g1".to_string(), 3), ("g2--incoming".to_string(), 7), ("g3--migratedaway".to_string(), 4)].into();
        assert_eq!(seen("g1", &present, false), Seen::Present(3));
        assert_eq!(seen("g2", &present, false), Seen::Moving, "xl migrate-receive holds it");
        assert_eq!(seen("g3", &present, false), Seen::Moving, "the sender after the receiver took it");
        assert_eq!(seen("g4", &present, true), Seen::Moving, "between xl save and xl restore");
        assert_eq!(seen("g4", &present, false), Seen::Absent);
        assert_eq!(seen("g", &present, false), Seen::Absent, "no prefix matches");
    }

    #[test]
    fn xl_list_verbose() {
        let t = "Name                                        ID   Mem VCPUs\tState\tTime(s)   UUID                            Reason-Code\tSecurity Label\n\
Domain-0                                     0   384     2     r-----      12.3 00000000-0000-0000-0000-000000000000        -                -\n\
guest1                                       3   128     1     -b----       1.0 0b6e9d3a-1111-4222-8333-944455556666        -                -\n";
        let d = parse_xl_list(t);
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].name.as_str(), d[1].domid), ("guest1", 3));
        assert_eq!(d[1].uuid.to_string(), "0b6e9d3a-1111-4222-8333-944455556666");
        assert!(parse_xl_list("").is_empty());
    }
}
