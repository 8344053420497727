//! `xl-vtpm migrate GUEST localhost`: moves a running PV guest to a new domain with `xl migrate`,
//! its dom0-process vTPM serving the new domain before the guest's frontend reconnects there.
//!
//! The vTPM process keeps running through the move: it watches dom0's whole tpmif backend
//! directory and serves every device that names its vTPM, so it serves the incoming domain's
//! device as soon as libxl writes it (before the domain can run), and forgets the source's
//! when xl destroys the source. `xl migrate -p` leaves the incoming domain paused; this module
//! then checks that the vTPM serves its device (InitWait), writes the resume marker into that
//! device's backend directory ([`xen_platform::xenbus::RESUME_MARKER`]: the connection resumes
//! the guest, the TPM is not power-cycled, so PCRs and everything else stay as after a
//! suspend), unpauses it and records the new domid in the registry.
//!
//! Failure points (docs/migration.md, "Moving the guest with its vTPM"):
//! - `xl migrate` fails before the guest moved: xl resumes the guest where it was (same domid);
//!   nothing of the vTPM changed (no marker was written). Reported as a failure.
//! - it fails after the incoming domain exists (paused) or `xl-vtpm` is killed before the unpause:
//!   `xl-vtpm migrate GUEST --finish` does the steps after `xl migrate`.
//! - the vTPM process died: it is started again from its durable state before the unpause
//!   (EK, keys, NV kept; PCRs reset as after a power loss, and no marker is written).
//!
//! An HVM guest whose TPM its device model emulates (`vtpm = [ "model=tis|crb" ]`, docs/hvm.md)
//! moves the same way, without tpmif steps: libxl starts the destination's device model on the
//! same control socket of the same vTPM process while the source's still runs; it loads the
//! TPM's state blobs from the stream (sealed to this vTPM, refused if replayed) and starts the
//! TPM with them. The vTPM keeps the TPM running when the source's device model then ends, and
//! hands it back to the source if the destination's ends first (a failed move). Before the
//! unpause this module waits for the source's device model to end and checks that the TPM
//! answers; a vTPM that is not running is never started anew for a moving HVM guest (its
//! device model would not reconnect): the move is refused before anything moves.
//!
//! `--non-live` moves the guest without log-dirty mode (a Xen that refuses it for PV guests):
//! `xl save GUEST FILE` (the guest is suspended, its memory written, the source destroyed), then
//! `xl restore -p FILE` (a new domain, paused) and the same steps as above. FILE is
//! [`save_file`]: 0600 in a 0700 directory of the state directory (guest memory; no vTPM secret
//! is in it). `xl save` failing leaves the guest where it was (xl resumes it; the file is
//! removed); `xl restore` failing keeps the file and names it: `--finish` restores it. The file
//! is removed only once the new domain runs.

use std::io::ErrorKind;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, REFUSED, USAGE};
use crate::registry::State;
use crate::xs::{with_xs, xs_write};
use crate::xenlife::{DOM0_BACKEND_ROOT, Xen, reg_err};

/// How long the incoming domain's tpmif device may take to reach InitWait after `xl migrate`.
pub const BACKEND_WAIT: Duration = Duration::from_secs(20);
/// How long the resumed guest's frontend may take to connect again (reported, not required).
pub const RECONNECT_WAIT: Duration = Duration::from_secs(60);
/// How long an HVM guest's source device model may take to end after the move (xl destroyed
/// its domain); reported, not required: its shutdown leaves the TPM to the destination's.
pub const DEVICE_MODEL_WAIT: Duration = Duration::from_secs(30);

/// What `xl-vtpm migrate` did.
#[derive(Debug, serde::Serialize)]
pub struct GuestMigrated {
    /// The guest.
    pub guest_name: String,
    /// Its domain before the move.
    pub from_domid: u32,
    /// Its domain now.
    pub to_domid: u32,
    /// Its vTPM.
    pub vtpm_uuid: Uuid,
    /// The vTPM process serving it now.
    pub vtpm_pid: u32,
    /// The vTPM process had to be started again (its PCRs were reset).
    pub vtpm_restarted: bool,
    /// `xl migrate` wall time (ms; 0 with `--finish` or `--non-live`).
    pub xl_migrate_ms: u64,
    /// The move was non-live (`xl save` + `xl restore`).
    pub non_live: bool,
    /// `xl save` wall time (ms; 0 unless `--non-live`).
    pub xl_save_ms: u64,
    /// `xl restore -p` wall time (ms; 0 unless this command restored the guest).
    pub xl_restore_ms: u64,
    /// From the unpause until the guest's TPM frontend was connected again (ms), if it was
    /// within [`RECONNECT_WAIT`].
    pub reconnect_ms: Option<u64>,
    /// The whole command (ms).
    pub total_ms: u64,
    /// The guest is HVM: its device model emulates the TPM (no tpmif frontend to reconnect).
    pub hvm: bool,
    /// HVM: from the end of the move until the source's device model had ended (ms), if it did
    /// within [`DEVICE_MODEL_WAIT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_device_model_ended_ms: Option<u64>,
    /// The vTPM domain serving the guest, when its vTPM runs in its own domain (then
    /// `vtpm_pid` is 0): the same domain before and after the move.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtpm_domain: Option<String>,
}

pub(crate) fn fail(code: i32, m: impl Into<String>) -> CliError {
    CliError::new(code, m)
}

/// Whether HOST names this host (a local migration: the vTPM stays with this manager).
pub fn is_local(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1") || host == crate::registry::this_host()
}

/// `xl migrate` arguments: `-p` (the incoming domain stays paused until its vTPM is ready).
/// Without `ssh`, a local move runs the receiver directly (`-s ""`, no sshd needed).
pub fn xl_migrate_args(name: &str, host: &str, ssh: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = vec!["migrate".into(), "-p".into()];
    match ssh {
        Some(s) => {
            a.extend(["-s".into(), s.to_string(), name.to_string(), host.to_string()]);
        }
        None => {
            a.extend(["-s".into(), String::new(), name.to_string(), "xl migrate-receive -p".into()]);
        }
    }
    a
}

pub use crate::xenlife::save_file;

/// `xl save NAME FILE`: the guest is suspended, written to FILE and its domain destroyed (not
/// `-p`/`-c`, which keep the source: the restored domain needs its name and its memory).
pub fn xl_save_args(name: &str, file: &Path) -> Vec<String> {
    vec!["save".into(), name.into(), file.display().to_string()]
}

/// `xl restore -p [CFG] FILE`: the new domain stays paused until its vTPM is ready. With CFG
/// (the guest's config as `xl-vtpm create` wrote it) instead of the one saved in FILE: a vTPM
/// domain named in it is looked up anew, so a vTPM domain booted again since the save (another
/// domid) serves the restored guest; the saved config names the old domid, and libxl fails to
/// add the device.
pub fn xl_restore_args(file: &Path, cfg: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = vec!["restore".into(), "-p".into()];
    a.extend(cfg.map(|c| c.display().to_string()));
    a.push(file.display().to_string());
    a
}

/// Makes `file`'s directory (0700, a real directory, not a link) and `file` itself, empty and
/// 0600 (xl keeps an existing file's mode). Refuses when `file` exists: an earlier move's.
pub fn prepare_save_file(file: &Path) -> Result<(), String> {
    let dir = file.parent().ok_or_else(|| format!("{}: no directory", file.display()))?;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    let md = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !md.is_dir() {
        return Err(format!("{} is not a directory; remove it", dir.display()));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file).map(drop).map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            format!("{} exists: a saved guest of an earlier `xl-vtpm migrate --non-live`", file.display())
        } else {
            format!("{}: {e}", file.display())
        }
    })
}

/// The refusal when `xl restore` failed: the saved guest is kept and the retry named.
pub fn restore_failed(name: &str, file: &Path, why: &str) -> CliError {
    fail(
        FAILURE,
        format!(
            "xl restore -p {} failed: {why}; guest {name} is not running; its saved memory is kept in {} (root-only): fix the cause, then \
             `xl-vtpm migrate {name} --finish` restores it and gives it its vTPM",
            file.display(),
            file.display()
        ),
    )
}

/// The State column of `xl list` (`r-----`, `-b----`, `--p---`, …) for domain `domid`.
pub fn xl_list_state(text: &str, domid: u32) -> Option<String> {
    text.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        if cols.get(1)?.parse::<u32>().ok()? != domid {
            return None;
        }
        cols.get(4).map(|s| s.to_string())
    })
}

/// xl's first error lines and its last lines (where it stopped).
pub(crate) fn xl_said(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut tail: Vec<&str> = text.lines().filter(|l| l.contains("error")).take(2).collect();
    tail.extend(text.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev());
    tail.join(" | ")
}

impl Xen {
    /// `xl restore -p [CFG] FILE` ([`xl_restore_args`]; CFG when the vTPM runs in its own
    /// domain); its wall time (ms).
    pub(crate) fn restore_saved(&self, name: &str, file: &Path, vtpm_domain: bool) -> Result<u64, CliError> {
        let cfg = self.local.run_dir.join("guests").join(format!("{name}.cfg"));
        let cfg = (vtpm_domain && cfg.is_file()).then_some(cfg);
        let t = Instant::now();
        let out = Command::new(&self.xl)
            .args(xl_restore_args(file, cfg.as_deref()))
            .output()
            .map_err(|e| restore_failed(name, file, &format!("cannot run {} ({e})", self.xl.display())))?;
        if !out.status.success() || self.xl_domid(name).is_none() {
            return Err(restore_failed(name, file, &format!("exit {}; xl said: {}", out.status.code().unwrap_or(-1), xl_said(&out))));
        }
        Ok(t.elapsed().as_millis() as u64)
    }

    /// `xl save NAME FILE` of the guest that runs as domain `old`; its wall time (ms).
    pub(crate) fn save_guest(&self, name: &str, old: u32, file: &Path) -> Result<u64, CliError> {
        if let Err(e) = prepare_save_file(file) {
            return Err(fail(
                REFUSED,
                format!("xl-vtpm migrate {name} --non-live: {e}; guest {name} runs as domain {old}, so it is stale: remove it, then run this again"),
            ));
        }
        let t = Instant::now();
        let out = Command::new(&self.xl).args(xl_save_args(name, file)).output();
        let ms = t.elapsed().as_millis() as u64;
        let after = self.xl_domid(name);
        let (ok, said) = match &out {
            Ok(o) => (o.status.success(), format!("exit {}; xl said: {}", o.status.code().unwrap_or(-1), xl_said(o))),
            Err(e) => (false, format!("cannot run {} ({e})", self.xl.display())),
        };
        match (ok, after) {
            (true, None) => Ok(ms),
            (_, Some(d)) if d == old => {
                let _ = std::fs::remove_file(file);
                Err(fail(FAILURE, format!("xl save failed before the guest moved ({said}): {name} runs on as domain {old} with its vTPM; nothing changed")))
            }
            // Another domain of that name: the guest rebooted during the save (xl's on_reboot
            // made it anew). What the file holds is no guest any more: restoring it would make a
            // second one.
            (false, Some(d)) => {
                let _ = std::fs::remove_file(file);
                Err(self.rebooted(name, old, d, &format!("during xl save ({said}); the partial save was removed")))
            }
            _ => Err(fail(
                FAILURE,
                format!(
                    "xl save of {name} ended ({said}) with {}: its saved memory, if complete, is in {}; check `xl list`, then `xl-vtpm migrate {name} --finish`",
                    after.map_or("no domain".to_string(), |d| format!("domain {d}")),
                    file.display()
                ),
            )),
        }
    }

    /// Guest `name` (domain `old`) rebooted during a move (`how`) and runs as domain `new`: the
    /// registry follows it (as for any reboot), and the error says that nothing moved.
    pub(crate) fn rebooted(&self, name: &str, old: u32, new: u32, how: &str) -> CliError {
        let reg = self.open_registry().and_then(|mut reg| {
            let row = self.row_by_name(&reg, name)?;
            reg.mark_running(row.id, new, row.vtpm_domid.unwrap_or(0)).map_err(reg_err)
        });
        let reg = match reg {
            Ok(()) => format!("the registry now names domain {new}"),
            Err(e) => format!("the registry still names domain {old} ({}): `xl-vtpm registry check` shows it", e.text()),
        };
        fail(
            FAILURE,
            format!(
                "guest {name} restarted {how}: domain {old} ended and {name} is now domain {new}, a reboot made by its on_reboot, not a move; nothing moved. \
                 It runs as domain {new} with its vTPM (the TPM reset, as at any reboot); {reg}. Its console and `xl dmesg` say why it rebooted"
            ),
        )
    }

    /// Whether domain `domid` is paused (`xl list`'s state `--p---`); `None` if xl cannot say.
    pub(crate) fn domain_paused(&self, domid: u32) -> Option<bool> {
        let out = Command::new(&self.xl).arg("list").output().ok()?;
        if !out.status.success() {
            return None;
        }
        xl_list_state(&String::from_utf8_lossy(&out.stdout), domid).map(|s| s.as_bytes().get(2) == Some(&b'p'))
    }

    pub(crate) fn xl_domid(&self, name: &str) -> Option<u32> {
        let out = Command::new(&self.xl).args(["domid", name]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// `xl-vtpm migrate NAME HOST [--ssh CMD | --non-live]`, or with `finish` the steps after
    /// `xl migrate` (or `xl save`: a kept save file is restored first).
    pub fn migrate_guest(&self, admin: &mut Admin, name: &str, host: Option<&str>, ssh: Option<&str>, finish: bool, non_live: bool) -> Result<GuestMigrated, CliError> {
        let t0 = Instant::now();
        if !finish {
            let host = host.ok_or_else(|| fail(USAGE, "xl-vtpm migrate: name the destination HOST (localhost), or give --finish"))?;
            if !is_local(host) {
                return Err(fail(
                    USAGE,
                    format!(
                        "xl-vtpm migrate {name} {host}: only a move on this host (localhost) is supported; to another host, move the \
                         vTPM's identity with `xl-vtpm vtpm migrate` (docs/migration.md)"
                    ),
                ));
            }
        }
        let reg = &mut self.open_registry()?;
        let row = self.row_by_name(reg, name)?;
        if row.state != State::Running {
            return Err(fail(REFUSED, format!("guest {name} is not running (registry state {:?})", row.state)));
        }
        let uuid = row.vtpm_uuid;
        // A move to another host cut short is finished there, not by restoring here (its
        // guest may be paused on the other host).
        if let Ok(b) = std::fs::read(crate::xenlife::move_record(&self.local.state_dir, &uuid)) {
            let to = serde_json::from_slice::<serde_json::Value>(&b).ok().and_then(|v| v["host"].as_str().map(str::to_string)).unwrap_or_else(|| "HOST".into());
            return Err(fail(
                REFUSED,
                format!("guest {name} was moving to {to} when that move was cut short: finish it with `xl-vtpm migrate {name} {to} --finish` (with the move's --ssh, --receiver and checks)"),
            ));
        }
        let rt = self.local.runtime(&uuid);
        // The vTPM in its own domain: that domain stays where it is and serves the moved guest's
        // device, as a dom0 process would.
        let vdom = if rt.is_none() { self.domains().runtime(&uuid) } else { None };
        // A vTPM domain that is not running: the registry names it (a running pair's vTPM domid
        // is not 0), or the pair names a domain other than the dom0-process default.
        let in_domain = row.vtpm_domid.is_some_and(|d| d != 0)
            || row.vtpm_domain != crate::xenlife::vtpm_domain_name(name)
            || matches!(self.domains().spec(&uuid), Ok(Some(_)));
        if rt.is_none() && vdom.is_none() && in_domain {
            return Err(fail(
                REFUSED,
                format!(
                    "guest {name}'s vTPM {uuid} runs in its own domain {:?}, which is not running; nothing moved: start it (`xl-vtpm vtpm start {uuid}`), then move the guest",
                    row.vtpm_domain
                ),
            ));
        }
        let old = row.guest_domid.ok_or_else(|| fail(FAILURE, format!("the registry has no domid for guest {name}")))?;
        let hvm = vdom.is_none() && serves_device_model(rt.as_ref().map(|rt| &rt.listen[..]), &self.local.access(&uuid).listen, || tpmif_device(old));
        if hvm && rt.is_none() {
            return Err(fail(
                REFUSED,
                format!(
                    "guest {name}'s vTPM {uuid} (its device model's TPM) does not run, so the guest has no TPM state to move and its device model \
                     would not reconnect; nothing moved: restart the vTPM (`xl-vtpm vtpm start {uuid}`) and reboot the guest (`xl-vtpm reboot {name}`), then move it"
                ),
            ));
        }
        // HVM: the device model that serves the guest before the move (it ends after it).
        // (Its start time too: a pid reused after it ended is not it.)
        let source_dm = if hvm && !finish { device_model(old) } else { None };
        let mut xl_ms = 0;
        let (mut save_ms, mut restore_ms) = (0, 0);
        let file = save_file(&self.local.state_dir, &uuid);
        if !finish {
            let now = self.xl_domid(name);
            if now != Some(old) {
                return Err(fail(
                    REFUSED,
                    format!(
                        "guest {name} is {} but the registry says domain {old}; if an earlier `xl-vtpm migrate` was cut short, run `xl-vtpm migrate {name} --finish`",
                        now.map_or("not running".to_string(), |d| format!("domain {d}"))
                    ),
                ));
            }
        }
        let mut restarted_before = false;
        if non_live && !finish {
            // The vTPM must serve the restored domain's device as soon as libxl writes it.
            if !hvm && vdom.is_none() {
                self.ensure_vtpm_process(admin, uuid, None)?;
            }
            save_ms = self.save_guest(name, old, &file)?;
            restore_ms = self.restore_saved(name, &file, vdom.is_some())?;
        } else if finish && self.xl_domid(name).is_none() && file.exists() {
            // The vTPM must run before libxl writes the restored domain's device.
            if !hvm && vdom.is_none() {
                restarted_before = self.ensure_vtpm_process(admin, uuid, None)?.1;
            }
            restore_ms = self.restore_saved(name, &file, vdom.is_some())?;
        }
        if !finish && !non_live {
            // The vTPM must serve the incoming domain's device as soon as libxl writes it.
            if !hvm && vdom.is_none() {
                self.ensure_vtpm_process(admin, uuid, None)?;
            }
            let args = xl_migrate_args(name, host.unwrap_or("localhost"), ssh);
            let t = Instant::now();
            let out = Command::new(&self.xl)
                .args(&args)
                .output()
                .map_err(|e| fail(FAILURE, format!("cannot run {} ({e})", self.xl.display())))?;
            xl_ms = t.elapsed().as_millis() as u64;
            // xl's first errors name the cause (e.g. `xc: error: Failed to enable logdirty: 95,…`:
            // this Xen cannot track a PV guest's dirty pages, and `xl migrate` is always live:
            // `--non-live`); its last lines say where it stopped.
            let said = xl_said(&out);
            let after = self.xl_domid(name);
            match after {
                Some(d) if d == old => {
                    // HVM: a destination device model that stopped the TPM and died handed it back.
                    let tpm = match if hvm { self.hvm_tpm_answers(&uuid) } else { Ok(()) } {
                        Ok(()) => String::new(),
                        Err(e) => format!(" BUT its TPM does not answer ({e}): reboot the guest (`xl-vtpm reboot {name}`) to reset it."),
                    };
                    return Err(fail(
                        FAILURE,
                        format!(
                            "xl migrate failed before the guest moved (exit {}): {name} runs on as domain {old} with its vTPM; nothing changed.{tpm} xl said: {}",
                            out.status.code().unwrap_or(-1),
                            said
                        ),
                    ));
                }
                // `xl migrate -p` leaves the domain it made paused: one of that name that runs is
                // the guest made anew by its on_reboot (it rebooted during the migration).
                Some(d) if self.domain_paused(d) == Some(false) => {
                    return Err(self.rebooted(name, old, d, &format!("during the migration (xl migrate exit {}; xl said: {said})", out.status.code().unwrap_or(-1))));
                }
                Some(_) => {}
                None => {
                    return Err(fail(
                        FAILURE,
                        format!(
                            "xl migrate ended (exit {}) with no domain named {name}: check `xl list` for {name}--incoming / {name}--migratedaway and resume at most one \
                             (its vTPM keeps running and serves either); then `xl-vtpm migrate {name} --finish`. xl said: {}",
                            out.status.code().unwrap_or(-1),
                            said
                        ),
                    ));
                }
            }
        }
        let new = self.xl_domid(name).ok_or_else(|| fail(FAILURE, format!("guest {name} has no domain; nothing to finish")))?;
        if finish && new == old && restore_ms == 0 {
            return Err(fail(REFUSED, format!("guest {name} is still domain {old}, as the registry says: there is no move to finish")));
        }
        if hvm {
            return self.finish_hvm_move(reg, &row, source_dm, Moved { old, new, t0, xl_ms, save_ms, restore_ms, non_live: non_live || restore_ms > 0 }, &file);
        }
        // The vTPM process: still the one that served the source (state in memory), or started
        // again from its durable state (PCRs reset, so no resume marker). A vTPM domain must be
        // the one that served the source: one started anew would have lost the PCRs (and
        // `xl-vtpm vtpm start` is the admin's call).
        let (pid, restarted, root, vtpm_domid) = match &vdom {
            Some(d) => {
                if self.domains().runtime(&uuid).map(|now| now.domid) != Some(d.domid) {
                    return Err(fail(
                        FAILURE,
                        format!(
                            "guest {name} (domain {new}, paused): its vTPM domain {} (domain {}) ended during the move; the guest stays paused: start the vTPM (`xl-vtpm vtpm start {uuid}`), then `xl-vtpm migrate {name} --finish`",
                            d.name, d.domid
                        ),
                    ));
                }
                (0, false, format!("/local/domain/{}/backend/vtpm", d.domid), d.domid)
            }
            None => {
                let (_, restarted) = self.ensure_vtpm_process(admin, uuid, None)?;
                let rt = self.local.runtime(&uuid).ok_or_else(|| fail(FAILURE, format!("vTPM {uuid} does not run")))?;
                // Started again from a suspend's saved state (a move to another host cut short
                // after the suspend), the TPM runs as it was: the connection resumes it.
                (rt.pid, (restarted || restarted_before) && !rt.resumed, DOM0_BACKEND_ROOT.to_string(), 0)
            }
        };
        let dev = wait_backend(&root, new, &uuid, BACKEND_WAIT).map_err(|e| {
            fail(FAILURE, format!("guest {name} (domain {new}, paused): its vTPM does not serve the incoming domain's device: {e}; the guest stays paused"))
        })?;
        if !restarted {
            xs_write(&format!("{dev}/{}", xen_platform::xenbus::RESUME_MARKER), &old.to_string())
                .map_err(|e| fail(FAILURE, format!("guest {name} (domain {new}, paused): writing the resume marker: {e}; the guest stays paused, run `xl-vtpm migrate {name} --finish`")))?;
        }
        self.xl_run(&["unpause", &new.to_string()])?;
        let t_unpause = Instant::now();
        // The guest runs as its new domain: its saved memory is no longer needed.
        if let Err(e) = std::fs::remove_file(&file)
            && e.kind() != ErrorKind::NotFound
        {
            eprintln!("xl-vtpm: warning: guest {name} runs as domain {new}; removing its saved memory {}: {e}; remove it by hand", file.display());
        }
        reg.mark_running(row.id, new, vtpm_domid).map_err(reg_err)?;
        let reconnect_ms = wait_connected(&dev, RECONNECT_WAIT).then(|| t_unpause.elapsed().as_millis() as u64);
        Ok(GuestMigrated {
            guest_name: name.to_string(),
            from_domid: old,
            to_domid: new,
            vtpm_uuid: uuid,
            vtpm_pid: pid,
            vtpm_restarted: restarted,
            xl_migrate_ms: xl_ms,
            non_live: non_live || restore_ms > 0,
            xl_save_ms: save_ms,
            xl_restore_ms: restore_ms,
            reconnect_ms,
            total_ms: t0.elapsed().as_millis() as u64,
            hvm: false,
            source_device_model_ended_ms: None,
            vtpm_domain: vdom.map(|d| d.name),
        })
    }

    /// An HVM guest's TPM answers after a move (or a failed one): a command on its vTPM's data
    /// socket (a tpmif vTPM is checked through its device instead).
    fn hvm_tpm_answers(&self, uuid: &Uuid) -> Result<(), String> {
        let rt = self.local.runtime(uuid).ok_or_else(|| format!("vTPM {uuid} does not run"))?;
        let sock = rt.socket.ok_or_else(|| format!("vTPM {uuid} (process {}) has no data socket", rt.pid))?;
        tpm_answers(&sock)
    }

    /// The steps after an HVM guest moved (paused as domain `m.new`): its source device model
    /// ends, its TPM answers (the destination's device model started it with the moved state),
    /// then the unpause and the registry.
    fn finish_hvm_move(&self, reg: &mut crate::registry::Registry, row: &crate::registry::Row, source_dm: Option<(u32, u64)>, m: Moved, file: &Path) -> Result<GuestMigrated, CliError> {
        let (name, uuid, new) = (&row.guest_name, row.vtpm_uuid, m.new);
        let mut source_ended = None;
        if let Some(dm @ (pid, _)) = source_dm {
            source_ended = wait_device_model_end(dm);
            if source_ended.is_none() {
                eprintln!(
                    "xl-vtpm: warning: guest {name}: the source's device model (process {pid}) still runs {} s after the move; its end will leave the TPM to the new one",
                    DEVICE_MODEL_WAIT.as_secs()
                );
            }
        }
        let pid = self.local.runtime(&uuid).map(|r| r.pid).ok_or_else(|| {
            fail(FAILURE, format!("guest {name} (domain {new}, paused): its vTPM {uuid} no longer runs, so its device model has no TPM; the guest stays paused: destroy it (`xl-vtpm destroy {name}`) and create it again"))
        })?;
        self.hvm_tpm_answers(&uuid).map_err(|e| {
            fail(
                FAILURE,
                format!(
                    "guest {name} (domain {new}, paused): its TPM does not answer after the move ({e}); the guest stays paused. Its device model's log (/var/log/xen/qemu-dm-{name}.log) \
                     says why; `xl unpause {new}` resumes it as it is"
                ),
            )
        })?;
        self.xl_run(&["unpause", &new.to_string()])?;
        if let Err(e) = std::fs::remove_file(file)
            && e.kind() != ErrorKind::NotFound
        {
            eprintln!("xl-vtpm: warning: guest {name} runs as domain {new}; removing its saved memory {}: {e}; remove it by hand", file.display());
        }
        reg.mark_running(row.id, new, 0).map_err(reg_err)?;
        Ok(GuestMigrated {
            guest_name: name.clone(),
            from_domid: m.old,
            to_domid: new,
            vtpm_uuid: uuid,
            vtpm_pid: pid,
            vtpm_restarted: false,
            xl_migrate_ms: m.xl_ms,
            non_live: m.non_live,
            xl_save_ms: m.save_ms,
            xl_restore_ms: m.restore_ms,
            reconnect_ms: None,
            total_ms: m.t0.elapsed().as_millis() as u64,
            hvm: true,
            source_device_model_ended_ms: source_ended,
            vtpm_domain: None,
        })
    }

    pub(crate) fn xl_run(&self, args: &[&str]) -> Result<(), CliError> {
        let out = Command::new(&self.xl).args(args).output().map_err(|e| fail(FAILURE, format!("cannot run {} ({e})", self.xl.display())))?;
        if !out.status.success() {
            return Err(fail(FAILURE, format!("xl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
        }
        Ok(())
    }
}

/// What the move did before its last steps.
struct Moved {
    old: u32,
    new: u32,
    t0: Instant,
    xl_ms: u64,
    save_ms: u64,
    restore_ms: u64,
    non_live: bool,
}

/// Whether a guest's vTPM serves its device model (an HVM guest's emulated TPM), not tpmif: what
/// the running process listens on (`running`); if it is gone, what it was made to listen on
/// (`made`: tpmif says `xen:…`) or, failing that, a tpmif device of the guest's domain (`tpmif`:
/// `None` if xenstore cannot say). A PV guest cut short after `xl save` has neither a process nor
/// a domain any more; its vTPM's record still names tpmif.
pub fn serves_device_model(running: Option<&[String]>, made: &[String], tpmif: impl FnOnce() -> Option<bool>) -> bool {
    let xen = |l: &[String]| l.iter().any(|l| l.starts_with("xen:"));
    match running {
        Some(l) => !xen(l),
        None => !xen(made) && tpmif() != Some(true),
    }
}

/// Whether domain `domid` has a tpmif device under dom0's backend root; `None` if xenstore
/// cannot say.
pub(crate) fn tpmif_device(domid: u32) -> Option<bool> {
    use xen_platform::xenstore::Xenstore;
    with_xs(async |xs| xs.directory(&format!("{DOM0_BACKEND_ROOT}/{domid}")).await.map_err(|e| e.to_string()))
        .ok()
        .map(|d| d.is_some_and(|d| !d.is_empty()))
}

/// Marks domain `domid`'s tpmif devices under dom0's backend root Closed (6): their backend, a
/// vTPM process, has ended (its guest left with libvirt's migration, and its identity with the
/// handoff). libxl waits for a Connected backend to close when it destroys the domain (10 s, then
/// it removes the device anyway); a backend that says Closed is removed at once. Returns how many.
pub(crate) fn close_ended_backends(domid: u32) -> usize {
    use xen_platform::xenstore::Xenstore;
    let root = format!("{DOM0_BACKEND_ROOT}/{domid}");
    let devs = with_xs(async |xs| xs.directory(&root).await.map_err(|e| e.to_string())).ok().flatten().unwrap_or_default();
    devs.iter().filter(|d| d.parse::<u32>().is_ok() && xs_write(&format!("{root}/{d}/state"), "6").is_ok()).count()
}

/// Domain `domid`'s device model as a process instance: its pid and start time (a pid reused
/// after it ended is not it).
pub(crate) fn device_model(domid: u32) -> Option<(u32, u64)> {
    device_model_pid(domid).and_then(|p| Some((p, xvtpm_fsutil::start_time(p)?)))
}

/// Waits up to [`DEVICE_MODEL_WAIT`] for device model instance `dm` (from [`device_model`]) to
/// end: how long it took (ms), or `None` if it still runs.
pub(crate) fn wait_device_model_end((pid, start): (u32, u64)) -> Option<u64> {
    let t = Instant::now();
    while t.elapsed() < DEVICE_MODEL_WAIT {
        if !xvtpm_fsutil::instance_alive(pid, start) {
            return Some(t.elapsed().as_millis() as u64);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The process of domain `domid`'s device model (libxl's `/local/domain/<domid>/image/device-model-pid`).
fn device_model_pid(domid: u32) -> Option<u32> {
    use xen_platform::xenstore::Xenstore;
    with_xs(async |xs| xs.read(&format!("/local/domain/{domid}/image/device-model-pid")).await.map_err(|e| e.to_string()))
        .ok()
        .flatten()
        .and_then(|p| p.trim().parse().ok())
}

/// How long the TPM may take to answer a probe.
const PROBE_WAIT: Duration = Duration::from_secs(20);

/// Sends TPM2_GetRandom(8) on the vTPM's data socket `sock` (swtpm's data channel: raw
/// commands); `Ok` if the TPM answered success. It reads nothing of the guest's state.
pub fn tpm_answers(sock: &Path) -> Result<(), String> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(PROBE_WAIT)).map_err(|e| e.to_string())?;
    let what = format!("{}, answer within {} s", sock.display(), PROBE_WAIT.as_secs());
    let rsp = crate::guest::exchange(&mut s, &tpm_wire::tpm2_get_random(8), &what).map_err(|e| e.text())?;
    match tpm_wire::response_code(&rsp) {
        Some(0) => Ok(()),
        Some(rc) => Err(format!("TPM2_GetRandom answered {rc:#x}{}", if rc == 0x101 { " (TPM_RC_FAILURE: the TPM is off, or cannot save its state)" } else { "" })),
        None => Err("a malformed answer".into()),
    }
}

/// Waits until a device of domain `domid` under dom0's tpmif backend root names vTPM `uuid`
/// and its backend is in InitWait (2) or later; returns its backend directory.
pub(crate) fn wait_backend(root: &str, domid: u32, uuid: &Uuid, limit: Duration) -> Result<String, String> {
    use xen_platform::xenstore::Xenstore;
    let dir = format!("{root}/{domid}");
    with_xs(async |xs| {
        let deadline = Instant::now() + limit;
        let mut seen = String::from("no device");
        loop {
            for devid in xs.directory(&dir).await.map_err(|e| e.to_string())?.unwrap_or_default() {
                let p = format!("{dir}/{devid}");
                let u = xs.read(&format!("{p}/uuid")).await.ok().flatten().unwrap_or_default();
                if u.trim() != uuid.to_string() {
                    continue;
                }
                let st = xs.read(&format!("{p}/state")).await.ok().flatten().unwrap_or_default();
                if st.trim().parse::<u32>().is_ok_and(|s| (2..=4).contains(&s)) {
                    return Ok(p);
                }
                seen = format!("{p} in state {:?}", st.trim());
            }
            if Instant::now() >= deadline {
                return Err(format!("{seen} within {} s", limit.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Whether the backend `dev` reaches Connected (4) within `limit`.
pub(crate) fn wait_connected(dev: &str, limit: Duration) -> bool {
    use xen_platform::xenstore::Xenstore;
    with_xs(async |xs| {
        let deadline = Instant::now() + limit;
        loop {
            if xs.read(&format!("{dev}/state")).await.ok().flatten().is_some_and(|s| s.trim() == "4") {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xl_list_gives_each_domain_s_state() {
        let t = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
Domain-0                                     0  1280     2     r-----      99.1\n\
g--incoming                                 13   256     1     --p---       0.0\n\
g                                           14   256     1     -b----       1.2\n";
        assert_eq!(xl_list_state(t, 13).as_deref(), Some("--p---"));
        assert_eq!(xl_list_state(t, 14).as_deref(), Some("-b----"));
        assert_eq!(xl_list_state(t, 1), None);
        assert_eq!(xl_list_state("", 0), None);
    }

    #[test]
    fn a_guest_is_hvm_only_when_its_vtpm_serves_no_tpmif() {
        let pv = vec!["xen:backend/vtpm".to_string()];
        let dm: Vec<String> = vec![];
        let never = || -> Option<bool> { panic!("xenstore asked although the process says") };
        assert!(!serves_device_model(Some(&pv), &pv, never));
        assert!(serves_device_model(Some(&dm), &dm, never));
        // the vTPM process is gone: a PV guest saved away (no domain, no device) is still PV
        assert!(!serves_device_model(None, &pv, || Some(false)));
        assert!(!serves_device_model(None, &pv, || None));
        // no record of its listeners: a tpmif device decides
        assert!(!serves_device_model(None, &dm, || Some(true)));
        assert!(serves_device_model(None, &dm, || Some(false)));
        assert!(serves_device_model(None, &dm, || None));
    }

    #[test]
    fn local_moves_run_the_receiver_directly_and_keep_the_domain_paused() {
        assert_eq!(xl_migrate_args("g", "localhost", None), ["migrate", "-p", "-s", "", "g", "xl migrate-receive -p"]);
        assert_eq!(xl_migrate_args("g", "localhost", Some("false")), ["migrate", "-p", "-s", "false", "g", "localhost"]);
        assert!(is_local("localhost") && is_local("127.0.0.1") && !is_local("host-b.example"));
    }

    #[test]
    fn a_non_live_move_saves_destroying_the_source_and_restores_paused() {
        let f = save_file(Path::new("/var/lib/xvtpm"), &Uuid::nil());
        assert_eq!(f, Path::new("/var/lib/xvtpm/migrate-save/00000000-0000-0000-0000-000000000000.xlsave"));
        assert_eq!(xl_save_args("g", &f), ["save", "g", f.to_str().unwrap()]);
        assert_eq!(xl_restore_args(&f, None), ["restore", "-p", f.to_str().unwrap()]);
        let cfg = Path::new("/run/xvtpm/guests/g.cfg");
        assert_eq!(xl_restore_args(&f, Some(cfg)), ["restore", "-p", "/run/xvtpm/guests/g.cfg", f.to_str().unwrap()], "the guest's config names its vTPM domain anew");
    }

    #[test]
    fn the_save_file_is_root_only_and_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let f = save_file(tmp.path(), &Uuid::nil());
        prepare_save_file(&f).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(f.parent().unwrap()), 0o700);
        assert_eq!(mode(&f), 0o600);
        // an earlier move's saved guest is kept, not truncated
        std::fs::write(&f, b"saved guest").unwrap();
        let e = prepare_save_file(&f).unwrap_err();
        assert!(e.contains("exists") && e.contains("earlier"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"saved guest");
        // a directory loosened since is made root-only again
        std::fs::set_permissions(f.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_file(&f).unwrap();
        prepare_save_file(&f).unwrap();
        assert_eq!(mode(f.parent().unwrap()), 0o700);
        // a link in the directory's place is refused
        let t2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(tmp.path(), t2.path().join("migrate-save")).unwrap();
        assert!(prepare_save_file(&save_file(t2.path(), &Uuid::nil())).unwrap_err().contains("not a directory"));
    }

    #[test]
    fn a_failed_restore_names_the_kept_file_and_the_retry() {
        let f = save_file(Path::new("/var/lib/xvtpm"), &Uuid::nil());
        let e = restore_failed("g", &f, "exit 1").to_string();
        assert!(e.contains(f.to_str().unwrap()) && e.contains("xl-vtpm migrate g --finish") && e.contains("kept"), "{e}");
    }
}
