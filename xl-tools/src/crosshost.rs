//! `xl-vtpm migrate GUEST HOST` to another host, and `xl-vtpm migrate-receive`, its other end.
//!
//! The guest moves with xl (`xl migrate`, or `xl save` + `xl restore` with `--non-live`) and
//! its vTPM's identity with the transfer (docs/migration.md): the destination's manager proves
//! its TPM and host state before anything moves, the state key leaves this host only sealed to a
//! key in the destination's TPM, and exactly one copy is ever live. The vTPM process here is
//! *suspended* once the guest has left (`SIGUSR1`: the running TPM's volatile state — PCRs,
//! loaded objects, sessions — is saved into its state file), so the state file that travels
//! carries the running TPM and the destination's vTPM resumes it, as a real platform resumes
//! its TPM after a suspend.
//!
//! Like `xl migrate`, this runs the receiver on the destination through a transport:
//! `sh -c "<ssh> <HOST> <receiver>"` (default `ssh HOST xl-vtpm migrate-receive`), and speaks to
//! it over its stdin/stdout in the manager's framing (4-byte length, JSON). The receiver relays
//! the destination manager's part of the transfer (only those requests) to its own manager, and
//! does the Xen steps there: it restores a `--non-live` guest, starts the vTPM from the
//! imported state, attaches the device to the incoming domain (paused), writes the resume
//! marker, unpauses it and records it in the registry. The incoming domain is made without its
//! vTPM device (`xl migrate -C`, `xl restore CONFIG`), which is attached once the vTPM runs
//! there: the vTPM cannot serve on the destination before it stops here, and the guest's
//! memory moves first.
//!
//! Steps, each failure point's state and its recovery: docs/migration.md, "To another host".

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, Failure, Refusal};

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, NO_MANAGER, NOT_FOUND, REFUSED, USAGE};
use crate::guestmig::{BACKEND_WAIT, GuestMigrated, RECONNECT_WAIT, fail, wait_backend, wait_connected, xl_said};
use crate::xs::xs_write;
use crate::registry::State;
use crate::xenlife::{DOM0_BACKEND_ROOT, INCOMING, Xen, move_record, reg_err, save_file};

/// The receiver protocol's version; `migrate-receive` refuses another.
pub const RECEIVE_PROTOCOL: u32 = 4;
/// The largest saved guest a receiver accepts (the disk's free space is checked too).
pub const MAX_SAVE: u64 = 1 << 40;
/// How long the suspended vTPM process may take to save its state and end.
pub const SUSPEND_GRACE: Duration = Duration::from_secs(10);

/// A receiver's own requests (the destination manager's transfer requests travel as they are).
/// Fields: `guest` the guest's name, `vtpm` its vTPM, `from_domid` its domain on the source.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub enum RecvRequest {
    /// The protocol; answered with the destination's registry host name.
    RecvHello { protocol: u32 },
    /// A guest will arrive: its xl config (as created here, vTPM included). The receiver checks
    /// no domain has the name there and that its registry has the pair.
    /// `source_boot`: the source dom0's boot id; equal to the receiver's, the two ends share
    /// one Xen (two managers on one host, as the testbed runs them) and the guest's domain there
    /// is the source's own, `from_domid`, which the move takes away.
    /// `hvm`: an HVM guest whose device model emulates its TPM; `config` has no TPM then (the
    /// receiver gives the device model its own vTPM socket).
    /// `vtpm_domain`: the vTPM runs in its own domain (the config's `vtpm = [ "backend=NAME" ]`);
    /// the receiver makes it a vTPM domain of that name there, on a new disk.
    RecvIncoming { guest: String, vtpm: Uuid, config: String, source_boot: String, from_domid: u32, hvm: Option<HvmTpm>, vtpm_domain: Option<VtpmDomainMove> },
    /// `--non-live`: `size` bytes of `xl save` output follow the `RecvOk`; then `xl restore -p`
    /// (answered `RecvRestored`) — for an HVM guest only once its vTPM runs there (the device
    /// model loads the TPM's state as it starts): the file is kept (answered `RecvStaged`).
    RecvRestore { guest: String, vtpm: Uuid, size: u64 },
    /// The vTPM's identity is there: start it, attach it to the guest's domain (HVM: restore
    /// the staged guest, its device model on the vTPM), resume the guest.
    RecvResume { guest: String, vtpm: Uuid, from_domid: u32, keep_tpm: bool },
    /// The move ended before the guest left: forget what `RecvIncoming` wrote.
    RecvAbandon { guest: String, vtpm: Uuid },
    /// A guest that libvirt moved here (`virsh migrate`): it is domain `domid` there, paused
    /// until libvirt's Finish unpauses it; its vTPM follows (docs/libvirt.md). The receiver
    /// checks the domain and the registry's pair; `RecvResume` then starts the vTPM and attaches
    /// it, and leaves the unpause to libvirt.
    RecvArrived { guest: String, vtpm: Uuid, domid: u32, source_boot: String },
    /// `--finish` of a move cut short: is the guest here (paused, as it arrived, or resumed)?
    /// If so the receiver takes it as arrived, for `RecvResume`. `vtpm_domain` as in
    /// `RecvIncoming`.
    RecvAdopt { guest: String, vtpm: Uuid, vtpm_domain: Option<VtpmDomainMove> },
}

/// This dom0's boot id (`/proc/sys/kernel/random/boot_id`): two ends with the same one run on
/// one Xen.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// A receiver's answers to [`RecvRequest`]: `RecvHello` names the destination's registry
/// host, `RecvRestored`/`RecvResumed` the guest's new domain there.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub enum RecvReply {
    RecvHello { protocol: u32, host: String },
    RecvOk,
    RecvRestored { domid: u32, restore_ms: u64 },
    /// HVM: the saved guest is there, kept until the resume.
    RecvStaged,
    /// `tpm_kept`: the vTPM there started from the state the suspend saved (the resume
    /// marker was written: the guest's TPM runs as it was), or (HVM) the device model loaded
    /// the TPM's state from the saved guest. `restore_ms`: HVM, the `xl restore` of the resume.
    /// `vtpm_domain`: the vTPM domain there, when the vTPM runs in its own domain.
    RecvResumed { domid: u32, vtpm_pid: u32, reconnect_ms: Option<u64>, tpm_kept: bool, restore_ms: u64, vtpm_domain: Option<(String, u32)> },
    /// The guest's domain there, if it arrived; `staged`: its saved memory is there (HVM).
    RecvAdopted { domid: Option<u32>, staged: bool },
    RecvError { code: i32, message: String },
}

/// An HVM guest's emulated TPM, as the receiver gives it to the device model there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HvmTpm {
    /// `tis` or `crb`.
    pub model: String,
    /// The `acpi_firmware` tables the guest was created with (hex; CRB's).
    pub acpi: Option<String>,
}

/// A vTPM that runs in its own domain, as the receiver makes that domain there: its name (the
/// guest's config names it as its vTPM's backend), nothing else: kernel, ramdisk and memory are
/// the destination's own (`XVTPM_VTPMDOM_KERNEL`, `XVTPM_VTPMDOM_RAMDISK`, `XVTPM_VTPMDOM_MEMORY`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VtpmDomainMove {
    /// The vTPM domain's name.
    pub name: String,
}

/// The destination manager's requests a receiver relays: a move's destination side, nothing else.
fn relayed(req: &AdminRequest) -> bool {
    matches!(
        req,
        AdminRequest::Status
            | AdminRequest::Enrollment
            | AdminRequest::TransferOffer { .. }
            | AdminRequest::TransferImport { .. }
            | AdminRequest::TransferReceipt { .. }
            | AdminRequest::TransferCancel { .. }
    )
}

/// The trust anchors and policy the destination is checked against.
pub struct Checks {
    /// TPM vendor roots (`--ek-ca`), PEM or hex DER as [`crate::transfer::read_certs`] gives.
    pub roots: Vec<String>,
    /// Intermediates of the destination's EK certificate.
    pub intermediates: Vec<String>,
    /// The host PCRs the destination must have.
    pub policy: BTreeMap<u8, String>,
    /// The group the vTPM joins there.
    pub group: Option<String>,
}

impl Checks {
    /// The checks a libvirt migration's destination must pass, from this host's configuration
    /// (certificates and policy read now).
    pub fn of_libvirt(cfg: &crate::libvirt_migrate::MigrateConfig) -> Result<Checks, CliError> {
        Ok(Checks {
            roots: crate::transfer::read_certs(&cfg.ek_ca, "ek_ca")?,
            intermediates: crate::transfer::read_certs(&cfg.ek_intermediate, "ek_intermediate")?,
            policy: crate::transfer::read_policy(&cfg.host_pcrs_policy)?,
            group: cfg.group.clone(),
        })
    }
}

/// A host name as a transport argument: no shell metacharacters.
fn check_host(host: &str) -> Result<(), CliError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host.chars().all(|c| c.is_ascii_alphanumeric() || "._-:@[]".contains(c));
    if ok { Ok(()) } else { Err(fail(USAGE, format!("{host:?} is not a host name (letters, digits, . _ - : @ [ ])"))) }
}

/// A guest name as xl takes it.
fn check_guest(name: &str) -> Result<(), CliError> {
    let ok = !name.is_empty() && name.len() <= 64 && !name.starts_with('-') && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok { Ok(()) } else { Err(fail(USAGE, format!("{name:?} is not a guest name this receiver accepts"))) }
}

/// The receiver process and the conversation with it.
struct Remote {
    child: Child,
    /// `None` once closed (its stdin closed: the receiver ends).
    link: Option<Admin>,
}

/// The receiver's stdin and stdout as one stream.
struct Pipes {
    r: std::process::ChildStdout,
    w: std::process::ChildStdin,
}

impl Read for Pipes {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(b)
    }
}

impl Write for Pipes {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.w.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

impl Remote {
    fn spawn(ssh: &str, host: &str, receiver: &str) -> Result<Remote, CliError> {
        let line = format!("{ssh} {host} {receiver}");
        let mut child = Command::new("/bin/sh")
            .args(["-c", &line])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| CliError::caused(FAILURE, format!("cannot run the receiver ({line})"), e))?;
        let (r, w) = (child.stdout.take().expect("piped"), child.stdin.take().expect("piped"));
        Ok(Remote { child, link: Some(Admin::over(Box::new(Pipes { r, w }))) })
    }

    /// The receiver on `host` through the transport (`ssh`, default `ssh`), its protocol checked;
    /// with the destination's registry host name.
    fn open(ssh: Option<&str>, host: &str, receiver: &str) -> Result<(Remote, String), CliError> {
        let mut rx = Remote::spawn(ssh.unwrap_or("ssh"), host, receiver)?;
        match rx.ask(&RecvRequest::RecvHello { protocol: RECEIVE_PROTOCOL })? {
            RecvReply::RecvHello { protocol, host: there } if protocol == RECEIVE_PROTOCOL => Ok((rx, there)),
            other => Err(fail(FAILURE, format!("the receiver on {host} answered {other:?}; it must be xl-vtpm migrate-receive of this release"))),
        }
    }

    fn ask(&mut self, req: &RecvRequest) -> Result<RecvReply, CliError> {
        match self.link().exchange(req)? {
            RecvReply::RecvError { code, message } => Err(fail(code, format!("the destination: {message}"))),
            r => Ok(r),
        }
    }

    fn link(&mut self) -> &mut Admin {
        self.link.as_mut().expect("the receiver link is open until the Remote is dropped")
    }

    fn ok(&mut self, req: &RecvRequest) -> Result<(), CliError> {
        match self.ask(req)? {
            RecvReply::RecvOk => Ok(()),
            other => Err(fail(FAILURE, format!("unexpected answer from the receiver: {other:?}"))),
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Closing its stdin ends the receiver; give it a moment, then end the transport.
        self.link = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the cross-host move adds to [`GuestMigrated`].
#[derive(Debug, Serialize)]
pub struct CrossHost {
    /// The destination's name in the registry.
    pub to_host: String,
    /// The transfer's offer.
    pub offer_id: Uuid,
    /// Challenge and offer, made while the guest still ran (ms).
    pub prepare_ms: u64,
    /// From the guest leaving this host until the identity was committed (suspend, export,
    /// import, commit; ms).
    pub transfer_ms: u64,
    /// The running TPM travelled (the suspend saved it): PCRs kept.
    pub tpm_kept: bool,
    /// `--non-live`: bytes of guest memory sent.
    pub saved_bytes: u64,
}

/// What the source keeps of a move to another host until the guest resumed there, so that a
/// move cut short can be finished (`xl-vtpm migrate GUEST HOST --finish`):
/// `<state-dir>/migrate-save/<vTPM>.move.json`, 0600, beside the saved guest of a `--non-live`
/// move (which is kept until the resume too).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MoveRecord {
    guest: String,
    host: String,
    to_host: String,
    vtpm: Uuid,
    from_domid: u32,
    non_live: bool,
    offer: vtpm_proto::transfer::Offer,
    /// An HVM guest: its vTPM is stopped, not suspended (the TPM's state is in the saved guest).
    #[serde(default)]
    hvm: bool,
    /// The vTPM runs in its own domain, of this name: it is suspended, and its disk's newest
    /// state leaves.
    #[serde(default)]
    vtpm_domain: Option<String>,
}

/// vTPM `uuid`'s move record in `state_dir`, if one is there and reads as one.
fn read_record(state_dir: &Path, uuid: &Uuid) -> Option<MoveRecord> {
    let b = std::fs::read(move_record(state_dir, uuid)).ok()?;
    serde_json::from_slice::<MoveRecord>(&b).ok().filter(|r| r.vtpm == *uuid)
}

/// Withdraws the offer of `earlier`, a move record whose vTPM runs here — no move is behind it,
/// so its offer was never used (a libvirt migration that ended between `migrate begin` and
/// `started`, an earlier `--prepare`, a run killed before its guest left) — before a new offer is
/// made, so that unused offers do not pile up in a destination's store (its manager keeps a few
/// open at most). On `rx`'s host (`to_host`) directly; on another, the log names the command.
fn withdraw_unused(rx: &mut Remote, earlier: Option<&MoveRecord>, name: &str, to_host: &str) {
    let Some(r) = earlier else { return };
    let offer = r.offer.offer_id;
    if r.to_host != to_host {
        xvtpm_log::host_warn!(
            guest = %name, %offer, to = %r.to_host,
            "an unused transfer offer stays open on {}: withdraw it there with `xl-vtpm vtpm transfer cancel {offer} --out FILE`", r.to_host
        );
        return;
    }
    match crate::transfer::cancel(rx.link(), offer) {
        Ok(_) => xvtpm_log::host_info!(guest = %name, %offer, to = %to_host, "an unused transfer offer withdrawn"),
        Err(e) => xvtpm_log::host_warn!(guest = %name, %offer, to = %to_host, "the unused transfer offer could not be withdrawn: {}", e.text()),
    }
}

fn write_record(state_dir: &Path, rec: &MoveRecord) -> Result<(), CliError> {
    let path = move_record(state_dir, &rec.vtpm);
    let dir = path.parent().expect("a parent");
    std::fs::DirBuilder::new().recursive(true).create(dir).map_err(|e| CliError::caused(FAILURE, dir.display().to_string(), e))?;
    let body = serde_json::to_vec_pretty(rec).map_err(|e| CliError::caused(FAILURE, "the move record", e))?;
    xvtpm_fsutil::write_atomic(&path, &body, 0o600).map_err(|e| CliError::caused(FAILURE, path.display().to_string(), e))
}

/// What [`Xen::complete_move`] reports.
struct Completed {
    domid: u32,
    pid: u32,
    reconnect_ms: Option<u64>,
    transfer_ms: u64,
    tpm_kept: bool,
    offer_id: Uuid,
    /// HVM: the `xl restore` there (at the resume).
    restore_ms: u64,
    /// The vTPM domain there (name, domid).
    vtpm_domain: Option<(String, u32)>,
}

/// How the guest left this host: `xl migrate`'s time, or `xl save`'s and the receiver's
/// `xl restore`'s (all 0 for a `--finish`, which did neither).
#[derive(Default)]
struct Left {
    xl_ms: u64,
    save_ms: u64,
    restore_ms: u64,
    saved_bytes: u64,
}

impl Completed {
    /// The report of move `rec`, completed.
    fn report(&self, rec: &MoveRecord, left: &Left, prepare_ms: u64, t0: Instant) -> (GuestMigrated, CrossHost) {
        let moved = GuestMigrated {
            guest_name: rec.guest.clone(),
            from_domid: rec.from_domid,
            to_domid: self.domid,
            vtpm_uuid: rec.vtpm,
            vtpm_pid: self.pid,
            vtpm_restarted: !self.tpm_kept,
            xl_migrate_ms: left.xl_ms,
            non_live: rec.non_live,
            xl_save_ms: left.save_ms,
            xl_restore_ms: left.restore_ms.max(self.restore_ms),
            reconnect_ms: self.reconnect_ms,
            total_ms: t0.elapsed().as_millis() as u64,
            hvm: rec.hvm,
            source_device_model_ended_ms: None,
            vtpm_domain: self.vtpm_domain.as_ref().map(|(n, _)| n.clone()),
        };
        (moved, CrossHost { to_host: rec.to_host.clone(), offer_id: self.offer_id, prepare_ms, transfer_ms: self.transfer_ms, tpm_kept: self.tpm_kept, saved_bytes: left.saved_bytes })
    }
}

impl Xen {
    /// `xl-vtpm migrate NAME HOST` for a HOST that is not this one.
    #[allow(clippy::too_many_arguments)]
    pub fn migrate_guest_to(
        &self,
        admin: &mut Admin,
        name: &str,
        host: &str,
        ssh: Option<&str>,
        receiver: &str,
        non_live: bool,
        checks: &Checks,
    ) -> Result<(GuestMigrated, CrossHost), CliError> {
        let t0 = Instant::now();
        check_host(host)?;
        let mut reg = self.open_registry()?;
        let row = self.row_by_name(&reg, name)?;
        if row.state != State::Running {
            return Err(fail(REFUSED, format!("guest {name} is not running (registry state {:?})", row.state)));
        }
        let uuid = row.vtpm_uuid;
        let old = row.guest_domid.ok_or_else(|| fail(FAILURE, format!("the registry has no domid for guest {name}")))?;
        if self.xl_domid(name) != Some(old) {
            return Err(fail(REFUSED, format!("guest {name} is not domain {old}, as the registry says; see `xl list`")));
        }
        // Its vTPM: a dom0 process, or its own domain (then it serves a tpmif device).
        let rt = self.local.runtime(&uuid);
        let vdom = match &rt {
            Some(_) => None,
            None => match (self.domains().runtime(&uuid), self.domains().spec(&uuid)?) {
                (Some(d), Some(spec)) => Some((VtpmDomainMove { name: spec.name }, d.domid)),
                _ => return Err(fail(REFUSED, format!("guest {name}'s vTPM {uuid} does not run: start it (`xl-vtpm vtpm start {uuid}`); nothing moved"))),
            },
        };
        // An HVM guest's vTPM serves its device model; a PV/PVH guest's, its tpmif device.
        let hvm = rt.as_ref().is_some_and(|rt| crate::guestmig::serves_device_model(Some(&rt.listen), &[], || None));
        let device = match &vdom {
            Some((_, vd)) => crate::guestmig::wait_backend(&format!("/local/domain/{vd}/backend/vtpm"), old, &uuid, Duration::ZERO).is_ok(),
            None => crate::guestmig::tpmif_device(old) == Some(true),
        };
        if !hvm && !device {
            return Err(fail(REFUSED, format!("guest {name} has no tpmif vTPM device, and its vTPM {uuid} serves no device model; nothing moved")));
        }
        if hvm && !non_live {
            return Err(fail(
                REFUSED,
                format!(
                    "guest {name} is an HVM guest: its device model loads the TPM's state as it starts, before a live move could hand the vTPM's identity \
                     to {host}; move it with --non-live; nothing moved"
                ),
            ));
        }
        let cfg_path = self.local.run_dir.join("guests").join(format!("{name}.cfg"));
        let mut config = std::fs::read_to_string(&cfg_path)
            .map_err(|e| CliError::caused(FAILURE, format!("guest {name}'s config {} (written by `xl-vtpm create`)", cfg_path.display()), e))?;
        let mut plain = crate::xlcfg::XlConfig::parse(&config).map_err(|e| CliError::caused(FAILURE, cfg_path.display().to_string(), e))?;
        plain.set_vtpms(&[]);
        // HVM: the config goes without this host's vTPM socket and ACPI file; the tables go along.
        let hvm_tpm = if hvm {
            let acpi_file = self.local.run_dir.join("guests").join(format!("{name}.acpi"));
            let model = crate::hvm::strip(&mut plain, &self.device_model_socket(&uuid), &acpi_file)
                .map_err(|e| CliError::caused(FAILURE, cfg_path.display().to_string(), e))?
                .ok_or_else(|| fail(FAILURE, format!("{}: no TPM arguments for vTPM {uuid}'s socket in device_model_args_hvm", cfg_path.display())))?;
            let acpi = match model {
                crate::xlcfg::TpmModel::Crb => Some(hex::encode(
                    crate::guest::read_capped(&acpi_file, crate::hvm::MAX_ACPI_FIRMWARE + 4096, "the guest's ACPI tables")?,
                )),
                crate::xlcfg::TpmModel::Tis => None,
            };
            config = plain.render();
            Some(HvmTpm { model: model.as_str().into(), acpi })
        } else {
            None
        };

        // The destination: its receiver, its name, its manager; then the identity's first
        // steps while the guest still runs (the RSA key generation of the offer takes seconds
        // on a discrete TPM).
        let (mut rx, to_host) = Remote::open(ssh, host, receiver)?;
        if to_host == self.host {
            return Err(fail(USAGE, format!("{host} is this host ({to_host} in the registry): move on this host with `xl-vtpm migrate {name} localhost`")));
        }
        let vtpm_domain = vdom.map(|(v, _)| v);
        rx.ok(&RecvRequest::RecvIncoming { guest: name.into(), vtpm: uuid, config: config.clone(), source_boot: boot_id(), from_domid: old, hvm: hvm_tpm, vtpm_domain: vtpm_domain.clone() })?;
        let vtpm_domain = vtpm_domain.map(|v| v.name);
        withdraw_unused(&mut rx, read_record(&self.local.state_dir, &uuid).as_ref(), name, &to_host);
        let tp = Instant::now();
        let offer = crate::transfer::prepare(admin, rx.link(), uuid, checks.group.as_deref(), &checks.roots, checks.intermediates.clone(), &checks.policy)?;
        let offer_id = offer.offer_id;
        let abandon = |rx: &mut Remote, e: CliError| -> CliError {
            let _ = crate::transfer::cancel(rx.link(), offer_id);
            let _ = rx.ok(&RecvRequest::RecvAbandon { guest: name.into(), vtpm: uuid });
            e
        };
        // Every check the export will make, now: a destination whose PCRs miss the policy (or
        // whose offer fails any other check) is refused while the guest still runs here.
        if let Err(e) = crate::transfer::verify(admin, uuid, &offer, &checks.roots, &checks.policy) {
            let e = fail(e.code, format!("{}; nothing moved", e.text()));
            return Err(abandon(&mut rx, e));
        }
        let prepare_ms = tp.elapsed().as_millis() as u64;
        let rec = MoveRecord { guest: name.into(), host: host.into(), to_host: to_host.clone(), vtpm: uuid, from_domid: old, non_live, offer: offer.clone(), hvm, vtpm_domain };
        if let Err(e) = write_record(&self.local.state_dir, &rec) {
            return Err(abandon(&mut rx, e));
        }
        let record = move_record(&self.local.state_dir, &uuid);
        let abandon = |rx: &mut Remote, e: CliError| -> CliError {
            let _ = std::fs::remove_file(&record);
            abandon(rx, e)
        };

        // The guest leaves.
        let mut left = Left::default();
        let file = save_file(&self.local.state_dir, &uuid);
        if non_live {
            // HVM: the device model that saves the TPM's state (the vTPM stops once it ended).
            let source_dm = if hvm { crate::guestmig::device_model(old) } else { None };
            left.save_ms = match self.save_guest(name, old, &file) {
                Ok(ms) => ms,
                Err(e) => return Err(abandon(&mut rx, e)),
            };
            if let Some(dm) = source_dm {
                crate::guestmig::wait_device_model_end(dm);
            }
            match send_saved(&mut rx, name, uuid, &file) {
                Ok((_, ms, n)) => {
                    left.restore_ms = ms;
                    left.saved_bytes = n;
                }
                Err(e) => {
                    // The guest is only in FILE, its vTPM untouched here: restore it here (a
                    // receiver that restored it destroys its copy when the conversation ends,
                    // the vTPM's identity being here).
                    let e = abandon(&mut rx, e);
                    drop(rx);
                    let back = self.migrate_guest(admin, name, None, None, true, false);
                    return Err(match back {
                        Ok(_) => fail(e.code, format!("{}; guest {name} was restored on this host with its vTPM (PCRs kept)", e.text())),
                        Err(b) => fail(e.code, format!("{}; restoring guest {name} here failed too: {}", e.text(), b.text())),
                    });
                }
            }
        } else {
            let plain_path = self.local.run_dir.join("guests").join(format!("{name}.migrate.cfg"));
            xvtpm_fsutil::write_atomic(&plain_path, plain.render().as_bytes(), 0o600).map_err(|e| CliError::caused(FAILURE, plain_path.display().to_string(), e))?;
            let mut args: Vec<String> = vec!["migrate".into(), "-p".into(), "-C".into(), plain_path.display().to_string()];
            if let Some(s) = ssh {
                args.extend(["-s".into(), s.into()]);
            }
            args.extend([name.into(), host.into()]);
            let t = Instant::now();
            let out = Command::new(&self.xl).args(&args).output().map_err(|e| fail(FAILURE, format!("cannot run {} ({e})", self.xl.display())));
            let _ = std::fs::remove_file(&plain_path);
            let out = match out {
                Ok(o) => o,
                Err(e) => return Err(abandon(&mut rx, e)),
            };
            left.xl_ms = t.elapsed().as_millis() as u64;
            // (The guest's name may exist again at once when HOST is this very Xen, as in the
            // testbed; the source domain is what must be gone.)
            // (A domain of that name here that runs is the guest made anew by its on_reboot: it
            // rebooted during the migration, and nothing moved.)
            let now = self.xl_domid(name);
            if let Some(d) = now.filter(|&d| d != old && self.domain_paused(d) == Some(false)) {
                let e = self.rebooted(name, old, d, &format!("during xl migrate to {host} (exit {}; xl said: {})", out.status.code().unwrap_or(-1), xl_said(&out)));
                return Err(abandon(&mut rx, e));
            }
            if now == Some(old) {
                let e = fail(
                    FAILURE,
                    format!(
                        "xl migrate did not move {name} (exit {}): check `xl list` here and on {host}; xl said: {}",
                        out.status.code().unwrap_or(-1),
                        xl_said(&out)
                    ),
                );
                return Err(abandon(&mut rx, e));
            }
        }

        // The guest has left: its vTPM here has answered its last command.
        let done = self.complete_move(admin, &mut rx, &mut reg, rec.clone(), checks)?;
        self.forget_guest_files(name);
        Ok(done.report(&rec, &left, prepare_ms, t0))
    }
}

impl Xen {
    /// The steps after the guest left (or, with `--finish`, from wherever a move cut short
    /// stopped): the vTPM here suspended, its identity moved (each step again only if it was not
    /// done: an export for the same offer is made again, an import done already gives its
    /// receipt, a commit is idempotent; an offer whose challenge expired is withdrawn and a new
    /// one made), the registry's move, and the resume there. The move record and the saved guest
    /// are removed once the guest runs there.
    fn complete_move(&self, admin: &mut Admin, rx: &mut Remote, reg: &mut crate::registry::Registry, mut rec: MoveRecord, checks: &Checks) -> Result<Completed, CliError> {
        let (name, host, to_host, uuid) = (rec.guest.clone(), rec.host.clone(), rec.to_host.clone(), rec.vtpm);
        let tt = Instant::now();
        let hvm = rec.hvm;
        let moved_paused = |what: &str| {
            let where_ = if hvm { "has left: its saved memory is kept" } else { "is paused" };
            format!(
                "guest {name} {where_} on {host} (registry host {to_host}) without its TPM: {what}; its memory has moved. Once the cause is fixed, \
                 `xl-vtpm migrate {name} {host} --finish` (with the same checks) completes the move"
            )
        };
        let domains = self.domains();
        let tpm_kept = match self.local.runtime(&uuid) {
            // A vTPM domain is suspended: its shutdown saves the running TPM's volatile state on
            // its disk, beside the permanent state (a `--finish` finds it ended already).
            None if rec.vtpm_domain.is_some() => {
                let asked = match domains.runtime(&uuid) {
                    Some(_) => domains
                        .suspend(admin, &uuid, crate::vtpmdom::SHUTDOWN_GRACE)
                        .map_err(|e| fail(e.code, moved_paused(&format!("suspending vTPM {uuid}'s domain here: {}", e.text()))))?,
                    None => true,
                };
                // Its disk's newest state is what leaves (once it was committed there, a
                // `--finish` finds no description here and skips this).
                if domains.spec(&uuid)?.is_some() && !self.local.state_file(&uuid).exists() {
                    domains.export_state(&uuid).map_err(|e| fail(e.code, moved_paused(&e.text())))?;
                }
                asked
            }
            None => true,
            // HVM: the TPM's state left in the saved guest (the device model fetched it; its
            // CMD_SHUTDOWN powered the TPM off): the process ends, writing nothing more.
            Some(_) if rec.hvm => {
                self.local.stop(admin, &uuid, SUSPEND_GRACE).map_err(|e| fail(e.code, moved_paused(&format!("stopping vTPM {uuid} here: {}", e.text()))))?;
                true
            }
            Some(_) => match self.local.suspend(admin, &uuid, SUSPEND_GRACE) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("xl-vtpm: warning: vTPM {uuid}: {}; the move goes on: the guest's TPM restarts from its permanent state (PCRs reset)", e.text());
                    false
                }
            },
        };
        let identity = |e: CliError| fail(e.code, moved_paused(&format!("moving vTPM {uuid}'s identity: {}", e.text())));
        // (Committed before, a vTPM domain's description is here still only if `--finish` got
        // here: its extracted state is refused as retired, and the move goes on.)
        let offer = move_identity(admin, &self.local, rx.link(), reg, &name, &to_host, uuid, rec.offer.clone(), checks).map_err(identity)?;
        if rec.vtpm_domain.is_some() {
            domains.forget_moved(&uuid).map_err(|e| fail(e.code, format!("vTPM {uuid}'s identity moved to {to_host}, but {}", e.text())))?;
        }
        if offer.offer_id != rec.offer.offer_id {
            rec.offer = offer;
            write_record(&self.local.state_dir, &rec).map_err(identity)?;
        }
        let transfer_ms = tt.elapsed().as_millis() as u64;
        let (domid, pid, reconnect_ms, tpm_kept, restore_ms, vtpm_domain) = match rx.ask(&RecvRequest::RecvResume { guest: name.clone(), vtpm: uuid, from_domid: rec.from_domid, keep_tpm: tpm_kept }) {
            Ok(RecvReply::RecvResumed { domid, vtpm_pid, reconnect_ms, tpm_kept, restore_ms, vtpm_domain }) => (domid, vtpm_pid, reconnect_ms, tpm_kept, restore_ms, vtpm_domain),
            Ok(other) => return Err(fail(FAILURE, moved_paused(&format!("the receiver answered {other:?}")))),
            Err(e) => return Err(fail(e.code, moved_paused(&e.text()))),
        };
        let _ = std::fs::remove_file(save_file(&self.local.state_dir, &uuid));
        let _ = std::fs::remove_file(move_record(&self.local.state_dir, &uuid));
        Ok(Completed { domid, pid, reconnect_ms, transfer_ms, tpm_kept, offer_id: rec.offer.offer_id, restore_ms, vtpm_domain })
    }

    /// Starts vTPM `vtpm` (unless it runs) on its default sockets for the device model of the HVM
    /// guest configured in `cfg_path` (its uid as `xl-vtpm create` resolves it; recorded as the
    /// vTPM's consumer on this host if no access record is here, as for a vTPM that arrived).
    fn serve_device_model_of(&self, admin: &mut Admin, vtpm: Uuid, cfg_path: &Path) -> Result<(), CliError> {
        let text = std::fs::read_to_string(cfg_path).map_err(|e| CliError::caused(FAILURE, format!("the guest's config {}", cfg_path.display()), e))?;
        let cfg = crate::xlcfg::XlConfig::parse(&text).map_err(|e| CliError::caused(FAILURE, cfg_path.display().to_string(), e))?;
        let consumer = crate::hvm::dm_uid(&cfg, &crate::hvm::lookup_user).map_err(|e| fail(REFUSED, format!("{}: {e}", cfg_path.display())))?;
        self.local.record_arrived_access(&vtpm, consumer)?;
        self.ensure_vtpm_for_device_model(admin, vtpm, None, consumer).map(drop)
    }

    /// The guest runs on the other host: its config here (and an HVM guest's ACPI tables) go.
    fn forget_guest_files(&self, name: &str) {
        let dir = self.local.run_dir.join("guests");
        for f in [format!("{name}.cfg"), format!("{name}.acpi")] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }

    /// `xl-vtpm migrate NAME HOST --finish`: completes a move to another host that was cut short
    /// (its move record is here). The guest arrived there: the steps after it left, from where
    /// they stopped. It did not (a `--non-live` move cut before its restore there): the offer is
    /// withdrawn and the guest restored here from its saved memory, its vTPM untouched.
    pub fn finish_move_to(&self, admin: &mut Admin, name: &str, host: &str, ssh: Option<&str>, receiver: &str, checks: &Checks) -> Result<(GuestMigrated, CrossHost), CliError> {
        let t0 = Instant::now();
        check_host(host)?;
        let mut reg = self.open_registry()?;
        let row = self.row_by_name(&reg, name)?;
        let path = move_record(&self.local.state_dir, &row.vtpm_uuid);
        let rec: MoveRecord = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CliError::caused(FAILURE, path.display().to_string(), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(REFUSED, format!("no move of guest {name} to another host was cut short here ({} does not exist)", path.display())));
            }
            Err(e) => return Err(CliError::caused(FAILURE, path.display().to_string(), e)),
        };
        if rec.guest != name || rec.host != host {
            return Err(fail(USAGE, format!("the move cut short here took guest {} to {}: finish it with `xl-vtpm migrate {} {} --finish`", rec.guest, rec.host, rec.guest, rec.host)));
        }
        let (mut rx, there) = Remote::open(ssh, host, receiver)?;
        if there != rec.to_host {
            return Err(fail(FAILURE, format!("the receiver on {host} is registry host {there}, not the host {} the move went to", rec.to_host)));
        }
        let arrived = match rx.ask(&RecvRequest::RecvAdopt { guest: name.into(), vtpm: rec.vtpm, vtpm_domain: rec.vtpm_domain.clone().map(|name| VtpmDomainMove { name }) })? {
            RecvReply::RecvAdopted { domid, staged } => domid.is_some() || staged,
            other => return Err(fail(FAILURE, format!("unexpected answer from the receiver: {other:?}"))),
        };
        let file = save_file(&self.local.state_dir, &rec.vtpm);
        if !arrived {
            // It never arrived there: withdraw the offer; the guest is here (it never left) or in
            // its saved memory.
            let offer_id = rec.offer.offer_id;
            if let Ok(c) = crate::transfer::cancel(rx.link(), offer_id) {
                let _ = crate::transfer::abort(admin, rec.vtpm, c);
            }
            let _ = reg.abort_move(rec.vtpm, Some(offer_id));
            // The move released the pair here (after the suspend): it runs here again.
            if let Some(r) = reg.get_by_name(name).map_err(reg_err)?
                && r.state == State::Stopped
            {
                reg.mark_running(r.id, rec.from_domid, 0).map_err(reg_err)?;
            }
            drop(rx);
            let _ = std::fs::remove_file(&path);
            if self.xl_domid(name) == Some(rec.from_domid) {
                return Err(fail(REFUSED, format!("guest {name} never left: it runs here as domain {}; the offer was withdrawn, nothing moved", rec.from_domid)));
            }
            if !file.exists() {
                return Err(fail(FAILURE, format!("guest {name} is neither on {host} nor here, and no saved memory of it is here ({}): check `xl list` on both", file.display())));
            }
            if rec.vtpm_domain.is_some() && self.domains().runtime(&rec.vtpm).is_none() {
                // The move shut its vTPM domain down: it boots again from its disk (the state
                // extracted for the export goes: the disk is where it lives).
                let _ = std::fs::remove_file(self.local.state_file(&rec.vtpm));
                self.domains().start(admin, &rec.vtpm, crate::vtpmdom::DEFAULT_READY_WAIT)?;
            }
            if rec.hvm && self.local.runtime(&rec.vtpm).is_none() {
                // Its device model loads the TPM's state from the saved guest: the vTPM (stopped
                // by the move) serves it again first.
                self.serve_device_model_of(admin, rec.vtpm, &self.local.run_dir.join("guests").join(format!("{name}.cfg")))?;
            }
            let back = self.migrate_guest(admin, name, None, None, true, false)?;
            return Err(fail(
                FAILURE,
                format!("guest {name} never arrived on {host}: it was restored here from its saved memory as domain {}, with its vTPM; nothing moved", back.to_domid),
            ));
        }
        let done = self.complete_move(admin, &mut rx, &mut reg, rec.clone(), checks)?;
        self.forget_guest_files(name);
        Ok(done.report(&rec, &Left::default(), 0, t0))
    }
}

/// What `xl-vtpm libvirt-handoff` did: `--prepare` checked the destination and made its offer;
/// the move reports as `xl-vtpm migrate`.
#[allow(clippy::large_enum_variant)]
pub enum Handoff {
    /// The destination passed this host's checks; its offer waits for the move.
    Prepared {
        /// The destination's name in the registry.
        to_host: String,
        /// The offer.
        offer_id: Uuid,
        /// Challenge, offer and checks (ms).
        prepare_ms: u64,
    },
    /// The vTPM moved.
    Moved(GuestMigrated, CrossHost),
}

impl Xen {
    /// `xl-vtpm libvirt-handoff NAME HOST --prepare | --domid D`: the source's part of a libvirt
    /// migration that takes the guest's vTPM along (crate::libvirt_migrate), run by the
    /// destination's hooks through the transport, against this host's own `checks`.
    ///
    /// `--prepare` (`dest_domid` `None`, the destination's `migrate begin`, the guest still runs
    /// here): HOST's manager proves its TPM and PCRs and makes its offer, kept in the move record
    /// here — a destination that fails a check is refused before anything moves.
    ///
    /// `--domid D` (the destination's `started`): libvirt moved the guest, which is suspended here
    /// (its domain not yet destroyed) and paused on HOST as domain D. The steps are `xl-vtpm
    /// migrate`'s after the guest left, with the prepared offer (or a new one): HOST's receiver is
    /// told of the arrived domain, the vTPM here is suspended, its identity sealed to HOST's TPM
    /// and committed there, and the vTPM started there and attached to the paused domain
    /// (libvirt's Finish unpauses it). A failure once the vTPM was suspended here is
    /// [`crate::exit::MOVE_UNFINISHED`]: the guest belongs there, and `xl-vtpm migrate NAME HOST
    /// --finish` completes the move. Refused while the guest still runs here, or when its vTPM is
    /// not a dom0 process serving tpmif (the only placement the libvirt hook makes).
    #[allow(clippy::too_many_arguments)]
    pub fn handoff_to(&self, admin: &mut Admin, name: &str, host: &str, dest_domid: Option<u32>, ssh: &str, receiver: &str, checks: &Checks) -> Result<Handoff, CliError> {
        let t0 = Instant::now();
        check_host(host)?;
        check_guest(name)?;
        let mut reg = self.open_registry()?;
        let row = self.row_by_name(&reg, name)?;
        if row.state != State::Running || row.active_on.as_deref() != Some(self.host.as_str()) {
            return Err(fail(REFUSED, format!("guest {name}'s vTPM is not running on this host (registry state {:?} on {}); nothing moved", row.state, row.active_on.as_deref().unwrap_or(&row.host))));
        }
        let uuid = row.vtpm_uuid;
        let old = row.guest_domid.ok_or_else(|| fail(FAILURE, format!("the registry has no domid for guest {name}")))?;
        let state = Command::new(&self.xl).arg("list").output().ok().and_then(|o| crate::guestmig::xl_list_state(&String::from_utf8_lossy(&o.stdout), old));
        let Some(state) = state else {
            return Err(fail(REFUSED, format!("guest {name}'s domain {old} is not here: libvirt destroyed it, or it never was; nothing moved (`xl-vtpm list`)")));
        };
        // At the move the guest must have left: libvirt suspended its domain here (xl's `s`).
        if dest_domid.is_some() && !state.contains('s') {
            return Err(fail(REFUSED, format!("guest {name} (domain {old}) is still here, state {state}: its vTPM follows only a guest that libvirt suspended here; nothing moved")));
        }
        if self.local.runtime(&uuid).is_none() || crate::guestmig::tpmif_device(old) != Some(true) {
            return Err(fail(REFUSED, format!("guest {name}'s vTPM {uuid} is not a dom0 process serving its tpmif device here; nothing moved")));
        }
        let (mut rx, to_host) = Remote::open(Some(ssh), host, receiver)?;
        if to_host == self.host {
            return Err(fail(USAGE, format!("{host} is this host ({to_host} in the registry)")));
        }
        // The offer `--prepare` made for this move, if its record is here.
        let earlier = read_record(&self.local.state_dir, &uuid);
        let fits = |r: &MoveRecord| r.guest == name && r.to_host == to_host && r.from_domid == old && !r.non_live && !r.hvm && r.vtpm_domain.is_none();
        let prepared = earlier.clone().filter(|r| dest_domid.is_some() && fits(r));
        if prepared.is_none() {
            withdraw_unused(&mut rx, earlier.as_ref(), name, &to_host);
        }
        if let Some(d) = dest_domid {
            rx.ok(&RecvRequest::RecvArrived { guest: name.into(), vtpm: uuid, domid: d, source_boot: boot_id() })?;
        }
        let tp = Instant::now();
        let offer = match prepared {
            Some(r) => r.offer,
            None => {
                let offer = crate::transfer::prepare(admin, rx.link(), uuid, checks.group.as_deref(), &checks.roots, checks.intermediates.clone(), &checks.policy)?;
                if let Err(e) = crate::transfer::verify(admin, uuid, &offer, &checks.roots, &checks.policy) {
                    let _ = crate::transfer::cancel(rx.link(), offer.offer_id);
                    return Err(fail(e.code, format!("{}; nothing moved", e.text())));
                }
                offer
            }
        };
        let prepare_ms = tp.elapsed().as_millis() as u64;
        let rec = MoveRecord { guest: name.into(), host: host.into(), to_host: to_host.clone(), vtpm: uuid, from_domid: old, non_live: false, offer: offer.clone(), hvm: false, vtpm_domain: None };
        if let Err(e) = write_record(&self.local.state_dir, &rec) {
            let _ = crate::transfer::cancel(rx.link(), offer.offer_id);
            return Err(e);
        }
        if dest_domid.is_none() {
            return Ok(Handoff::Prepared { to_host, offer_id: offer.offer_id, prepare_ms });
        }
        let done = self.complete_move(admin, &mut rx, &mut reg, rec.clone(), checks).map(|c| c.report(&rec, &Left::default(), prepare_ms, t0)).map_err(|e| {
            fail(crate::exit::MOVE_UNFINISHED, format!("{} (libvirt resumes the guest there without its TPM)", e.text()))
        })?;
        // The vTPM process here has ended: libvirt's destroy of the suspended domain need not wait
        // for it to close the device.
        crate::guestmig::close_ended_backends(old);
        Ok(Handoff::Moved(done.0, done.1))
    }
}

/// Moves the identity of stopped vTPM `uuid` (guest `guest`'s) to the destination `dst` with
/// `offer`, from wherever an earlier run stopped, and records the move in `reg`: the pair is
/// released here and the move opened (unless the registry names `to_host` already), the
/// export made (again: for the same offer the manager makes it again), imported (or, imported
/// already, its receipt asked for), committed (idempotent), and the registry's commit point. An
/// export refused because the vTPM was committed already skips to the registry; one refused
/// because the offer's challenge expired (a `--finish` long after) withdraws that offer, returns
/// the vTPM here and makes a new one, once. Returns the offer used.
#[allow(clippy::too_many_arguments)]
pub fn move_identity(
    src: &mut Admin,
    local: &crate::local::Local,
    dst: &mut Admin,
    reg: &mut crate::registry::Registry,
    guest: &str,
    to_host: &str,
    uuid: Uuid,
    mut offer: vtpm_proto::transfer::Offer,
    checks: &Checks,
) -> Result<vtpm_proto::transfer::Offer, CliError> {
    if let Some(row) = reg.get_by_name(guest).map_err(reg_err)?
        && row.host != to_host
    {
        if row.state != State::Stopped {
            reg.mark_stopped(row.id).map_err(reg_err)?;
        }
        reg.begin_move(uuid, to_host, offer.offer_id).map_err(reg_err)?;
    }
    let mut renewed = false;
    let receipt = loop {
        // Committed by an earlier run (the commit removed the state file here): the destination's
        // receipt shows it, and the commit again is a no-op.
        if !local.state_file(&uuid).exists() {
            break Some(crate::transfer::receipt(dst, uuid)?);
        }
        match crate::transfer::export(src, local, uuid, offer.clone(), &checks.roots, &checks.policy, to_host.to_string()) {
            Ok(pkg) => match crate::transfer::import(dst, pkg) {
                Ok(r) => break Some(r),
                Err(e) if e.refusal() == Some(Refusal::AlreadyImported) => break Some(crate::transfer::receipt(dst, uuid)?),
                Err(e) => return Err(e),
            },
            Err(e) if e.refusal() == Some(Refusal::Retired) => break None,
            Err(e) if e.refusal() == Some(Refusal::ChallengeExpired) && !renewed => {
                renewed = true;
                let cancelled = crate::transfer::cancel(dst, offer.offer_id)?;
                let _ = crate::transfer::abort(src, uuid, cancelled);
                let _ = reg.abort_move(uuid, Some(offer.offer_id));
                offer = crate::transfer::prepare(src, dst, uuid, checks.group.as_deref(), &checks.roots, checks.intermediates.clone(), &checks.policy)?;
                reg.begin_move(uuid, to_host, offer.offer_id).map_err(reg_err)?;
            }
            Err(e) => return Err(e),
        }
    };
    if let Some(r) = receipt {
        crate::transfer::commit(src, local, uuid, r)?;
    }
    crate::transfer::registry_commit(reg, uuid, offer.offer_id)?;
    Ok(offer)
}

/// `--non-live`: sends the saved guest to the receiver, which restores it paused. Returns the
/// new domid, `xl restore`'s time and the bytes sent.
fn send_saved(rx: &mut Remote, guest: &str, vtpm: Uuid, file: &Path) -> Result<(u32, u64, u64), CliError> {
    let mut f = std::fs::File::open(file).map_err(|e| CliError::caused(FAILURE, file.display().to_string(), e))?;
    let size = f.metadata().map_err(|e| CliError::caused(FAILURE, file.display().to_string(), e))?.len();
    rx.ok(&RecvRequest::RecvRestore { guest: guest.into(), vtpm, size })?;
    let sent = std::io::copy(&mut (&mut f).take(size), rx.link().raw()).map_err(|e| CliError::caused(NO_MANAGER, "sending the saved guest to the receiver", e))?;
    rx.link().raw().flush().map_err(|e| CliError::caused(NO_MANAGER, "sending the saved guest to the receiver", e))?;
    if sent != size {
        return Err(fail(FAILURE, format!("{} shrank while it was sent ({sent} of {size} bytes)", file.display())));
    }
    match rx.link().receive::<RecvReply>()? {
        RecvReply::RecvRestored { domid, restore_ms } => Ok((domid, restore_ms, size)),
        RecvReply::RecvStaged => Ok((0, 0, size)),
        RecvReply::RecvError { code, message } => Err(fail(code, format!("the destination: {message}"))),
        other => Err(fail(FAILURE, format!("unexpected answer from the receiver: {other:?}"))),
    }
}

/// `xl-vtpm migrate-receive`: the destination's end of a move (run by the source through its
/// transport, e.g. `ssh HOST xl-vtpm migrate-receive`). Serves one move on stdin/stdout and ends
/// when the source closes it. Nothing but answers goes to stdout: what it and the programs it
/// runs print goes to stderr (the transport carries it back to the source's terminal).
pub fn receive(xen: &Xen) -> Result<(), CliError> {
    use std::os::fd::AsFd;
    let out = std::io::stdout().as_fd().try_clone_to_owned().map_err(|e| CliError::caused(FAILURE, "stdout", e))?;
    nix::unistd::dup2(2, 1).map_err(|e| CliError::caused(FAILURE, "stdout", std::io::Error::from(e)))?;
    let mut out = std::fs::File::from(out);
    let mut input = std::io::stdin().lock();
    let mut admin: Option<Admin> = None;
    let mut rx = Receiver { xen, incoming: None, lock: None, imported: false };
    loop {
        let body = match vtpm_proto::mgr_io::read_frame(&mut input) {
            Ok(Some(b)) => b,
            Ok(None) => {
                rx.abandon();
                return Ok(());
            }
            Err(e) => {
                rx.abandon();
                return Err(CliError::caused(FAILURE, "the source's request", e));
            }
        };
        let wrote = if let Ok(req) = vtpm_proto::mgr::decode::<RecvRequest>(&body) {
            let reply = rx.handle(req, &mut input, &mut out).unwrap_or_else(|e| RecvReply::RecvError { code: e.code, message: e.text() });
            vtpm_proto::mgr_io::write_msg(&mut out, &reply)
        } else {
            let reply = match vtpm_proto::mgr::decode::<AdminRequest>(&body) {
                Ok(req) if relayed(&req) => {
                    let a = match admin.as_mut() {
                        Some(a) => Ok(a),
                        None => Admin::connect(&xen.local.run_dir).map(|a| admin.insert(a)),
                    };
                    let reply = a.and_then(|a| a.forward(&req)).unwrap_or_else(|e| error_reply(e.code, e.text()));
                    if matches!((&req, &reply), (AdminRequest::TransferImport { .. }, AdminReply::TransferImported { .. })) {
                        rx.imported = true;
                    }
                    reply
                }
                Ok(_) => error_reply(REFUSED, "a move's receiver relays only the destination's transfer requests".into()),
                Err(e) => error_reply(USAGE, format!("a malformed request: {e}")),
            };
            vtpm_proto::mgr_io::write_msg(&mut out, &reply)
        };
        if let Err(e) = wrote.and_then(|()| out.flush().map_err(vtpm_proto::mgr_io::WireError::Io)) {
            // The source is gone (killed, or the transport cut) before it heard the answer: the
            // move ends here as at the end of its input.
            rx.abandon();
            return Err(CliError::caused(FAILURE, "answering the source", e));
        }
    }
}

/// A relayed request's failure on the receiver's side, as the manager would word it.
fn error_reply(code: i32, message: String) -> AdminReply {
    use vtpm_proto::mgr::ErrorCode;
    let code = match code {
        NOT_FOUND => ErrorCode::NotFound,
        REFUSED => ErrorCode::Refused,
        USAGE => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    AdminReply::Error(Failure::new(code, message))
}

/// A guest announced by `RecvIncoming` and not yet resumed.
struct Incoming {
    guest: String,
    vtpm: Uuid,
    /// Its config without the vTPM device (the incoming domain's).
    plain: std::path::PathBuf,
    /// Its config as created (kept for this host's `xl-vtpm` once it runs here).
    full: std::path::PathBuf,
    /// A domain was made here for it.
    arrived: bool,
    /// The domain this receiver restored (`--non-live`), while it is not resumed: the source
    /// still holds the guest's saved memory, so if the conversation ends before the vTPM's
    /// identity arrived here this copy is destroyed (the source restores its own).
    restored: Option<u32>,
    /// An HVM guest (its device model emulates the TPM): restored only at the resume.
    hvm: bool,
    /// Its vTPM runs in its own domain, made here at the resume.
    vtpm_domain: Option<VtpmDomainMove>,
    /// libvirt moved it here as this domain (`RecvArrived`): libvirt unpauses it.
    libvirt: Option<u32>,
}

struct Receiver<'a> {
    xen: &'a Xen,
    incoming: Option<Incoming>,
    /// The guest's move lock here (guest, lock), held while this receiver serves its move.
    lock: Option<(String, nix::fcntl::Flock<std::fs::File>)>,
    /// This conversation's import succeeded: the vTPM's identity for this move is here. (A
    /// copy of the identity retired here by an earlier move is not it.)
    imported: bool,
}

/// How long a receiver waits for another receiver of the same guest (one whose source was cut
/// off and that is still cleaning up) to end.
const LOCK_WAIT: Duration = Duration::from_secs(30);

impl Receiver<'_> {
    fn expect(&self, guest: &str, vtpm: Uuid) -> Result<&Incoming, CliError> {
        match &self.incoming {
            Some(i) if i.guest == guest && i.vtpm == vtpm => Ok(i),
            _ => Err(fail(USAGE, format!("no move of guest {guest} with vTPM {vtpm} was announced (RecvIncoming)"))),
        }
    }

    /// The end of a conversation (or `RecvAbandon`): forgets an announced guest that never
    /// arrived, and destroys a copy this receiver restored but was never told to resume while
    /// the vTPM's identity is not here — the source keeps the guest's saved memory until the
    /// resume, and restores it there.
    fn abandon(&mut self) {
        let Some(i) = self.incoming.take() else { return };
        // HVM: once the identity is here the guest is only here — in its saved memory, or in
        // a domain whose device model loaded the TPM's state (after which that saved memory's
        // state is a replay the vTPM refuses): nothing of it is destroyed.
        if i.hvm && i.arrived && (self.imported || self.xen.local.state_file(&i.vtpm).exists()) {
            let at = match i.restored {
                Some(d) => format!("paused as domain {d}"),
                None => format!("as its saved memory {}", save_file(&self.xen.local.state_dir, &i.vtpm).display()),
            };
            eprintln!(
                "xl-vtpm migrate-receive: guest {} stays here {at}: its vTPM's identity arrived; the source's `xl-vtpm migrate {} HOST --finish` resumes it",
                i.guest, i.guest
            );
            return;
        }
        if let Some(domid) = i.restored {
            if self.imported {
                eprintln!(
                    "xl-vtpm migrate-receive: guest {} (domain {domid}) stays paused here as {}{INCOMING}: its vTPM's identity arrived; the source's `xl-vtpm migrate {} HOST --finish` resumes it",
                    i.guest, i.guest, i.guest
                );
                return;
            }
            let destroyed = Command::new(&self.xen.xl).args(["destroy", &domid.to_string()]).output().is_ok_and(|o| o.status.success());
            eprintln!(
                "xl-vtpm migrate-receive: the move of guest {} ended before its vTPM's identity arrived: its copy here (domain {domid}) {}; the source keeps the guest",
                i.guest,
                if destroyed { "destroyed" } else { "could NOT be destroyed: destroy it (`xl destroy`)" }
            );
        } else if i.arrived && !i.hvm {
            return;
        }
        let _ = std::fs::remove_file(&i.plain);
        let _ = std::fs::remove_file(&i.full);
        let _ = std::fs::remove_file(save_file(&self.xen.local.state_dir, &i.vtpm));
        if i.hvm {
            let _ = std::fs::remove_file(self.xen.local.run_dir.join("guests").join(format!("{}.acpi", i.guest)));
        }
    }

    /// Takes guest `guest`'s move lock here (`<run-dir>/guests/<guest>.move.lock`): one receiver
    /// per guest at a time, so a `--finish` never adopts a copy that the receiver of the cut-off
    /// move is still deciding about.
    fn lock(&mut self, guest: &str) -> Result<(), CliError> {
        use nix::fcntl::{Flock, FlockArg};
        if self.lock.as_ref().is_some_and(|(g, _)| g == guest) {
            return Ok(());
        }
        let dir = self.xen.local.run_dir.join("guests");
        std::fs::create_dir_all(&dir).map_err(|e| CliError::caused(FAILURE, dir.display().to_string(), e))?;
        let path = dir.join(format!("{guest}.move.lock"));
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| CliError::caused(FAILURE, path.display().to_string(), e))?;
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => {
                    self.lock = Some((guest.to_string(), l));
                    return Ok(());
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Err(_) => return Err(fail(REFUSED, format!("another move of guest {guest} is being served here ({} is locked)", path.display()))),
            }
        }
    }

    /// This receiver takes guest `guest` with vTPM `vtpm` (`RecvAdopt`, `RecvArrived`): one
    /// guest per receiver, the guest's move lock, and this host's registry binding the two.
    fn claim(&mut self, guest: &str, vtpm: Uuid) -> Result<(), CliError> {
        check_guest(guest)?;
        if self.incoming.is_some() {
            return Err(fail(REFUSED, "a receiver takes one guest"));
        }
        self.lock(guest)?;
        match self.xen.open_registry()?.get_by_name(guest).map_err(reg_err)? {
            Some(r) if r.vtpm_uuid == vtpm => Ok(()),
            _ => Err(fail(REFUSED, format!("this host's registry does not bind guest {guest} to vTPM {vtpm}: hosts that move guests between them share one registry; nothing moved"))),
        }
    }

    /// The domain of a guest that arrived here: as restored (`GUEST--incoming`) or resumed.
    fn arrived_domid(&self, guest: &str) -> Option<(u32, bool)> {
        self.xen.xl_domid(&format!("{guest}{INCOMING}")).map(|d| (d, true)).or_else(|| self.xen.xl_domid(guest).map(|d| (d, false)))
    }

    /// `RecvResume` of an HVM guest: its vTPM (imported here) starts on its default sockets for
    /// the device model, `xl restore -p` makes the domain from the staged saved guest (the device
    /// model loads the TPM's state blobs, sealed to the vTPM, as it starts), the TPM is checked
    /// to answer, and the guest is renamed, unpaused and recorded. A domain restored by an
    /// earlier receiver (a `--finish`) is taken as it is. A failed restore keeps the saved guest
    /// here for the next `--finish`.
    fn resume_hvm(&mut self, guest: &str, vtpm: Uuid, plain: &Path) -> Result<RecvReply, CliError> {
        let xen = self.xen;
        let file = save_file(&xen.local.state_dir, &vtpm);
        let mut admin = Admin::connect(&xen.local.run_dir)?;
        let kept = |code: i32, what: String| fail(code, format!("guest {guest} is not restored here: {what}; its saved memory is kept in {} for `xl-vtpm migrate {guest} HOST --finish` on the source", file.display()));
        xen.serve_device_model_of(&mut admin, vtpm, plain).map_err(|e| kept(e.code, format!("starting its vTPM {vtpm}: {}", e.text())))?;
        let mut restore_ms = 0;
        let (domid, incoming) = match self.arrived_domid(guest) {
            Some(d) => d,
            None => {
                if !file.exists() {
                    return Err(fail(FAILURE, format!("no saved guest {guest} is here ({}): the source's `--finish` restores it there", file.display())));
                }
                let t = Instant::now();
                let out = Command::new(&xen.xl)
                    .args(["restore", "-p", &plain.display().to_string(), &file.display().to_string()])
                    .stdout(Stdio::null())
                    .output()
                    .map_err(|e| kept(FAILURE, format!("cannot run {} ({e})", xen.xl.display())))?;
                restore_ms = t.elapsed().as_millis() as u64;
                let incoming = format!("{guest}{INCOMING}");
                match xen.xl_domid(&incoming).filter(|_| out.status.success()) {
                    Some(d) => (d, true),
                    None => {
                        if let Some(d) = xen.xl_domid(&incoming) {
                            let _ = Command::new(&xen.xl).args(["destroy", &d.to_string()]).output();
                        }
                        return Err(kept(FAILURE, format!("xl restore failed (exit {}): {}", out.status.code().unwrap_or(-1), xl_said(&out))));
                    }
                }
            }
        };
        if let Some(i) = self.incoming.as_mut() {
            i.restored = Some(domid);
        }
        let paused = |what: String| fail(FAILURE, format!("guest {guest} is paused here as domain {domid}: {what}"));
        let rt = xen.local.runtime(&vtpm).ok_or_else(|| paused(format!("its vTPM {vtpm} no longer runs")))?;
        let sock = rt.socket.clone().ok_or_else(|| paused(format!("its vTPM {vtpm} has no data socket")))?;
        crate::guestmig::tpm_answers(&sock).map_err(|e| paused(format!("its TPM does not answer: {e}")))?;
        if incoming {
            xen.xl_run(&["rename", &domid.to_string(), guest]).map_err(|e| paused(e.text()))?;
        }
        xen.xl_run(&["unpause", &domid.to_string()]).map_err(|e| paused(e.text()))?;
        let _ = std::fs::remove_file(plain);
        let _ = std::fs::remove_file(&file);
        let reg = &mut xen.open_registry()?;
        let row = reg.get_by_name(guest).map_err(reg_err)?.ok_or_else(|| fail(FAILURE, format!("guest {guest} runs here as domain {domid}, but the registry lost its pair")))?;
        reg.mark_running(row.id, domid, 0).map_err(|e| {
            fail(FAILURE, format!("guest {guest} runs here as domain {domid} with its vTPM, but the registry was not updated: {}; run `xl-vtpm registry check`", reg_err(e).text()))
        })?;
        self.incoming = None;
        Ok(RecvReply::RecvResumed { domid, vtpm_pid: rt.pid, reconnect_ms: None, tpm_kept: true, restore_ms, vtpm_domain: None })
    }

    /// Answers `req`; `RecvRestore` also answers `RecvOk` on `out` before it reads the bytes
    /// that follow it.
    fn handle(&mut self, req: RecvRequest, input: &mut impl Read, out: &mut impl Write) -> Result<RecvReply, CliError> {
        let xen = self.xen;
        match req {
            RecvRequest::RecvHello { protocol } => {
                if protocol != RECEIVE_PROTOCOL {
                    return Err(fail(REFUSED, format!("this xl-vtpm speaks receive protocol {RECEIVE_PROTOCOL}, the source {protocol}: run the same release on both hosts")));
                }
                crate::registry::check_host(&xen.host).map_err(|e| CliError::caused(USAGE, "--host", e))?;
                Ok(RecvReply::RecvHello { protocol, host: xen.host.clone() })
            }
            RecvRequest::RecvIncoming { guest, vtpm, config, source_boot, from_domid, hvm, vtpm_domain } => {
                check_guest(&guest)?;
                if self.incoming.is_some() {
                    return Err(fail(REFUSED, "a receiver takes one guest"));
                }
                self.lock(&guest)?;
                if let Some(d) = xen.xl_domid(&guest)
                    && !(d == from_domid && !source_boot.is_empty() && source_boot == boot_id())
                {
                    return Err(fail(REFUSED, format!("a domain named {guest} runs here already (domain {d}); nothing moved")));
                }
                let reg = &mut xen.open_registry()?;
                match reg.get_by_name(&guest).map_err(reg_err)? {
                    Some(r) if r.vtpm_uuid == vtpm => {}
                    Some(r) => return Err(fail(REFUSED, format!("this host's registry binds guest {guest} to vTPM {}, not {vtpm}; nothing moved", r.vtpm_uuid))),
                    None => {
                        return Err(fail(
                            REFUSED,
                            format!("this host's registry has no guest {guest}: hosts that move guests between them share one registry (`--registry postgres://…`); nothing moved"),
                        ));
                    }
                }
                let mut plain = crate::xlcfg::XlConfig::parse(&config).map_err(|e| CliError::caused(USAGE, "the guest's config", e))?;
                if plain.name() != Some(guest.as_str()) {
                    return Err(fail(USAGE, format!("the config sent names another guest than {guest}")));
                }
                // A vTPM in its own domain: that domain is made here, from this host's kernel
                // and ramdisk, once the identity arrived; its name must be free (but for the
                // source's own domain, when both ends share one Xen: the move shuts it down).
                if let Some(v) = &vtpm_domain {
                    crate::vtpmdom::check_name(&v.name).map_err(|e| CliError::caused(USAGE, "the vTPM domain's name", e))?;
                    if hvm.is_some() {
                        return Err(fail(USAGE, "an HVM guest's TPM is its device model's: it has no vTPM domain"));
                    }
                    for (what, p) in [("kernel", &xen.vtpmdom.kernel), ("ramdisk", &xen.vtpmdom.ramdisk)] {
                        if !p.is_file() {
                            return Err(fail(REFUSED, format!("this host has no vTPM domain {what} ({}: XVTPM_VTPMDOM_{}); nothing moved", p.display(), what.to_uppercase())));
                        }
                    }
                    let one_xen = !source_boot.is_empty() && source_boot == boot_id();
                    if !one_xen && xen.xl_domid(&v.name).is_some() {
                        return Err(fail(REFUSED, format!("a domain named {} (the guest's vTPM domain) runs here already; nothing moved", v.name)));
                    }
                    crate::vtpmdom::serving_manager(&mut Admin::connect(&xen.local.run_dir)?).map_err(|e| fail(e.code, format!("{}; nothing moved", e.text())))?;
                }
                plain.set_vtpms(&[]);
                let dir = xen.local.run_dir.join("guests");
                std::fs::create_dir_all(&dir).map_err(|e| CliError::caused(FAILURE, dir.display().to_string(), e))?;
                let mut full = plain.clone();
                // HVM: its device model gets this host's socket of the vTPM (and the guest its
                // ACPI tables for it), as `xl-vtpm create` gives them; checked as at create.
                if let Some(h) = &hvm {
                    let model = match h.model.as_str() {
                        "tis" => crate::xlcfg::TpmModel::Tis,
                        "crb" => crate::xlcfg::TpmModel::Crb,
                        m => return Err(fail(USAGE, format!("an emulated TPM model {m:?} this receiver does not know"))),
                    };
                    let ctrl = xen.device_model_socket(&vtpm);
                    crate::hvm::check_socket_path(&ctrl).map_err(|e| fail(REFUSED, format!("{e}; nothing moved")))?;
                    crate::hvm::check(&plain, &crate::hvm::lookup_user).map_err(|e| fail(REFUSED, format!("guest {guest} cannot have its TPM here: {e}; nothing moved")))?;
                    let acpi_file = match &h.acpi {
                        Some(tables) => {
                            let bytes = hex::decode(tables).map_err(|e| fail(USAGE, format!("the guest's ACPI tables: {e}")))?;
                            let f = dir.join(format!("{guest}.acpi"));
                            xvtpm_fsutil::write_atomic(&f, &bytes, 0o600).map_err(|e| CliError::caused(FAILURE, f.display().to_string(), e))?;
                            Some(f)
                        }
                        None => None,
                    };
                    for c in [&mut plain, &mut full] {
                        crate::hvm::apply(c, &ctrl, model, acpi_file.as_deref()).map_err(|e| CliError::caused(FAILURE, "the guest's config", e))?;
                    }
                }
                // Restored as `GUEST--incoming` (as `xl migrate-receive` names its incoming
                // domain), renamed only at the resume.
                plain.set("name", format!("{guest}{INCOMING}")).map_err(|e| CliError::caused(USAGE, "the guest's config", e))?;
                let full_path = dir.join(format!("{guest}.cfg"));
                let plain_path = dir.join(format!("{guest}.incoming.cfg"));
                xvtpm_fsutil::write_atomic(&plain_path, plain.render().as_bytes(), 0o600).map_err(|e| CliError::caused(FAILURE, plain_path.display().to_string(), e))?;
                let full_text = if hvm.is_some() { full.render() } else { config };
                xvtpm_fsutil::write_atomic(&full_path, full_text.as_bytes(), 0o600).map_err(|e| CliError::caused(FAILURE, full_path.display().to_string(), e))?;
                self.incoming = Some(Incoming { guest, vtpm, plain: plain_path, full: full_path, arrived: false, restored: None, hvm: hvm.is_some(), vtpm_domain, libvirt: None });
                Ok(RecvReply::RecvOk)
            }
            RecvRequest::RecvRestore { guest, vtpm, size } => {
                let (plain, hvm) = self.expect(&guest, vtpm).map(|i| (i.plain.clone(), i.hvm))?;
                let file = save_file(&xen.local.state_dir, &vtpm);
                if size > MAX_SAVE {
                    return Err(fail(REFUSED, format!("a saved guest of {size} bytes is over this receiver's limit of {MAX_SAVE}")));
                }
                crate::guestmig::prepare_save_file(&file).map_err(|e| fail(REFUSED, format!("{e}; nothing moved")))?;
                // A filesystem that keeps no count (ramfs: no blocks at all) cannot be checked.
                let free = nix::sys::statvfs::statvfs(&file)
                    .ok()
                    .filter(|v| v.blocks() > 0)
                    .map_or(u64::MAX, |v| v.blocks_available().saturating_mul(v.fragment_size()));
                if free < size {
                    let _ = std::fs::remove_file(&file);
                    return Err(fail(REFUSED, format!("{} has {free} bytes free, the saved guest needs {size}; nothing moved", file.display())));
                }
                receive_saved(input, out, &file, size)?;
                if hvm {
                    if let Some(i) = self.incoming.as_mut() {
                        i.arrived = true;
                    }
                    return Ok(RecvReply::RecvStaged);
                }
                let t = Instant::now();
                let out = Command::new(&xen.xl)
                    .args(["restore", "-p", &plain.display().to_string(), &file.display().to_string()])
                    .stdout(Stdio::null())
                    .output()
                    .map_err(|e| {
                        let _ = std::fs::remove_file(&file);
                        fail(FAILURE, format!("cannot run {} ({e}); nothing of {guest} runs here", xen.xl.display()))
                    })?;
                let ms = t.elapsed().as_millis() as u64;
                let incoming = format!("{guest}{INCOMING}");
                let Some(domid) = xen.xl_domid(&incoming).filter(|_| out.status.success()) else {
                    let _ = std::fs::remove_file(&file);
                    if let Some(d) = xen.xl_domid(&incoming) {
                        let _ = Command::new(&xen.xl).args(["destroy", &d.to_string()]).output();
                    }
                    return Err(fail(FAILURE, format!("xl restore of {guest} failed (exit {}): {}; nothing of it runs here", out.status.code().unwrap_or(-1), xl_said(&out))));
                };
                let _ = std::fs::remove_file(&file);
                if let Some(i) = self.incoming.as_mut() {
                    i.arrived = true;
                    i.restored = Some(domid);
                }
                Ok(RecvReply::RecvRestored { domid, restore_ms: ms })
            }
            RecvRequest::RecvResume { guest, vtpm, from_domid, keep_tpm } => {
                let (plain, hvm, vdom, libvirt) = self.expect(&guest, vtpm).map(|i| (i.plain.clone(), i.hvm, i.vtpm_domain.clone(), i.libvirt))?;
                if let Some(i) = self.incoming.as_mut() {
                    i.arrived = true;
                }
                if hvm {
                    return self.resume_hvm(&guest, vtpm, &plain);
                }
                let (domid, incoming) = self.arrived_domid(&guest).ok_or_else(|| fail(FAILURE, format!("no domain {guest} arrived here")))?;
                if libvirt.is_some_and(|d| d != domid) {
                    return Err(fail(REFUSED, format!("guest {guest} is domain {domid} here, not the domain {} libvirt announced", libvirt.unwrap_or_default())));
                }
                let mut admin = Admin::connect(&xen.local.run_dir)?;
                let paused = |what: String| fail(FAILURE, format!("guest {guest} is paused here as domain {domid}: {what}"));
                // Its vTPM: a dom0 process started from the imported state file, or a vTPM
                // domain booted from a new disk holding it (each step skipped when an earlier
                // receiver did it: a `--finish`).
                let (pid, kept, backend, root, vtpm_domain) = match &vdom {
                    None => {
                        xen.ensure_vtpm_process(&mut admin, vtpm, None).map_err(|e| paused(format!("starting its vTPM {vtpm}: {}", e.text())))?;
                        let rt = xen.local.runtime(&vtpm);
                        // The TPM runs as it was suspended only if this vTPM started from the
                        // saved state; otherwise the connection is a boot (PCRs reset), whatever
                        // the source hoped.
                        let kept = keep_tpm && rt.as_ref().is_some_and(|r| r.resumed);
                        (rt.as_ref().map_or(0, |r| r.pid), kept, 0, DOM0_BACKEND_ROOT.to_string(), None)
                    }
                    Some(v) => {
                        let domains = xen.domains();
                        let rt = match domains.runtime(&vtpm) {
                            Some(rt) => rt,
                            None => {
                                let memory = crate::vtpmdom::default_memory_mib(xen.vtpmdom.memory_mib.as_deref(), &xen.vtpmdom.ramdisk).map_err(|e| paused(e.text()))?;
                                domains
                                    .adopt_imported(&vtpm, &v.name, &xen.vtpmdom.kernel, &xen.vtpmdom.ramdisk, memory)
                                    .map_err(|e| paused(format!("making its vTPM domain: {}", e.text())))?;
                                domains
                                    .start(&mut admin, &vtpm, crate::vtpmdom::DEFAULT_READY_WAIT)
                                    .map_err(|e| paused(format!("starting its vTPM domain {}: {}", v.name, e.text())))?
                            }
                        };
                        // As for a process: the TPM runs as it was only if the domain started
                        // from the suspend's saved state.
                        (0, keep_tpm && rt.resumed, rt.domid, format!("/local/domain/{}/backend/vtpm", rt.domid), Some((rt.name, rt.domid)))
                    }
                };
                if wait_backend(&root, domid, &vtpm, Duration::ZERO).is_err() {
                    xen.xl_run(&["vtpm-attach", &domid.to_string(), &format!("backend={backend}"), &format!("uuid={vtpm}")]).map_err(|e| paused(e.text()))?;
                }
                let dev = wait_backend(&root, domid, &vtpm, BACKEND_WAIT).map_err(|e| paused(format!("its vTPM does not serve its device: {e}")))?;
                let connected = wait_connected(&dev, Duration::ZERO);
                if kept && !connected {
                    xs_write(&format!("{dev}/{}", xen_platform::xenbus::RESUME_MARKER), &from_domid.to_string())
                        .map_err(|e| paused(format!("writing the resume marker: {e}")))?;
                }
                // libvirt's Finish unpauses its guest (an unpause now would make its own fail).
                if libvirt.is_none() {
                    if incoming {
                        xen.xl_run(&["rename", &domid.to_string(), &guest]).map_err(|e| paused(e.text()))?;
                    }
                    // (A `--finish` of a libvirt migration: libvirt unpaused it already.)
                    if xen.domain_paused(domid) != Some(false) {
                        xen.xl_run(&["unpause", &domid.to_string()]).map_err(|e| paused(e.text()))?;
                    }
                }
                let t = Instant::now();
                let _ = std::fs::remove_file(&plain);
                let reg = &mut xen.open_registry()?;
                let row = reg.get_by_name(&guest).map_err(reg_err)?.ok_or_else(|| fail(FAILURE, format!("guest {guest} runs here as domain {domid}, but the registry lost its pair")))?;
                reg.mark_running(row.id, domid, backend).map_err(|e| {
                    fail(FAILURE, format!("guest {guest} runs here as domain {domid} with its vTPM, but the registry was not updated: {}; run `xl-vtpm registry check`", reg_err(e).text()))
                })?;
                let reconnect_ms = match libvirt {
                    None => wait_connected(&dev, RECONNECT_WAIT).then(|| t.elapsed().as_millis() as u64),
                    Some(_) => None,
                };
                self.incoming = None;
                Ok(RecvReply::RecvResumed { domid, vtpm_pid: pid, reconnect_ms, tpm_kept: kept, restore_ms: 0, vtpm_domain })
            }
            RecvRequest::RecvAdopt { guest, vtpm, vtpm_domain } => {
                self.claim(&guest, vtpm)?;
                let dir = xen.local.run_dir.join("guests");
                let found = self.arrived_domid(&guest);
                let plain = dir.join(format!("{guest}.incoming.cfg"));
                // An HVM guest whose saved memory is here, not yet restored (its vTPM's identity
                // arrived, or is on its way).
                let hvm = std::fs::read_to_string(&plain).ok().and_then(|c| crate::xlcfg::XlConfig::parse(&c).ok()).is_some_and(|c| crate::hvm::serves(&c, &xen.device_model_socket(&vtpm)).is_some());
                let staged = hvm && found.is_none() && save_file(&xen.local.state_dir, &vtpm).exists();
                self.incoming = (found.is_some() || staged).then(|| Incoming { guest: guest.clone(), vtpm, plain, full: dir.join(format!("{guest}.cfg")), arrived: true, restored: None, hvm, vtpm_domain, libvirt: None });
                Ok(RecvReply::RecvAdopted { domid: found.map(|(d, _)| d), staged })
            }
            RecvRequest::RecvArrived { guest, vtpm, domid, source_boot } => {
                if !source_boot.is_empty() && source_boot == boot_id() {
                    return Err(fail(REFUSED, "libvirt moves guests between hosts: the source runs on this very Xen"));
                }
                self.claim(&guest, vtpm)?;
                if xen.xl_domid(&guest) != Some(domid) || xen.domain_paused(domid) != Some(true) {
                    return Err(fail(REFUSED, format!("guest {guest} is not the paused domain {domid} here that libvirt's incoming migration makes; nothing moved")));
                }
                let dir = xen.local.run_dir.join("guests");
                self.incoming = Some(Incoming {
                    guest: guest.clone(),
                    vtpm,
                    plain: dir.join(format!("{guest}.incoming.cfg")),
                    full: dir.join(format!("{guest}.cfg")),
                    arrived: true,
                    restored: None,
                    hvm: false,
                    vtpm_domain: None,
                    libvirt: Some(domid),
                });
                Ok(RecvReply::RecvOk)
            }
            RecvRequest::RecvAbandon { guest, vtpm } => {
                self.expect(&guest, vtpm)?;
                self.abandon();
                Ok(RecvReply::RecvOk)
            }
        }
    }
}

/// Tells the source to send (`RecvOk` on `out`: it waits for that), then reads exactly `size`
/// bytes from `input` into `file` (made empty and 0600 already) and syncs it. A write failure
/// still reads the rest, so the conversation stays in step.
fn receive_saved(input: &mut impl Read, out: &mut impl Write, file: &Path, size: u64) -> Result<(), CliError> {
    vtpm_proto::mgr_io::write_msg(out, &RecvReply::RecvOk)
        .and_then(|()| out.flush().map_err(vtpm_proto::mgr_io::WireError::Io))
        .map_err(|e| CliError::caused(FAILURE, "answering the source", e))?;
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(file).map_err(|e| CliError::caused(FAILURE, file.display().to_string(), e))?;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    let mut failed: Option<std::io::Error> = None;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = input.read(&mut buf[..want]).map_err(|e| CliError::caused(FAILURE, "reading the saved guest", e))?;
        if n == 0 {
            let _ = std::fs::remove_file(file);
            return Err(fail(FAILURE, format!("the source ended after {} of {size} bytes of the saved guest; nothing moved", size - left)));
        }
        if failed.is_none()
            && let Err(e) = f.write_all(&buf[..n])
        {
            failed = Some(e);
        }
        left -= n as u64;
    }
    if let Some(e) = failed.or_else(|| f.sync_all().err()) {
        let _ = std::fs::remove_file(file);
        return Err(CliError::caused(FAILURE, format!("writing the saved guest to {}; nothing moved", file.display()), e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// The source's side of the stream: it sends the saved guest only after the receiver said
    /// so (a receiver that waits for the bytes before answering deadlocks the move).
    struct Source {
        told: Rc<RefCell<Vec<u8>>>,
        data: std::io::Cursor<Vec<u8>>,
    }

    impl Read for Source {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            let told = self.told.borrow();
            let frame = vtpm_proto::mgr_io::read_frame(&mut &told[..]).expect("a frame").expect("the receiver answered before reading");
            assert!(matches!(vtpm_proto::mgr::decode::<RecvReply>(&frame).unwrap(), RecvReply::RecvOk));
            self.data.read(b)
        }
    }

    struct Shared(Rc<RefCell<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_receiver_asks_for_the_saved_guest_before_it_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("g.xlsave");
        std::fs::write(&file, b"").unwrap();
        let told = Rc::new(RefCell::new(Vec::new()));
        let body: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let mut src = Source { told: told.clone(), data: std::io::Cursor::new(body.clone()) };
        receive_saved(&mut src, &mut Shared(told), &file, body.len() as u64).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), body);
    }

    #[test]
    fn a_source_that_ends_early_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("g.xlsave");
        std::fs::write(&file, b"").unwrap();
        let told = Rc::new(RefCell::new(Vec::new()));
        let mut src = Source { told: told.clone(), data: std::io::Cursor::new(vec![7u8; 1000]) };
        let e = receive_saved(&mut src, &mut Shared(told), &file, 5000).unwrap_err();
        assert!(e.text().contains("after 1000 of 5000 bytes"), "{}", e.text());
        assert!(!file.exists());
    }
}
