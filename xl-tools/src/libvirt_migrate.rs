//! A libvirt migration (`virsh migrate`, Nova's live migration) that takes the guest's vTPM
//! along, between hosts that share one registry (docs/libvirt.md, "Migrating a guest with its
//! vTPM").
//!
//! libvirt's libxl driver moves the guest's memory itself and has no vTPM device in its domain
//! XML, so the vTPM's identity follows through the hooks, from the destination:
//!
//! 1. `migrate begin` (destination, libvirt's Prepare, before the source's guest is touched):
//!    the registry binds the guest's name to a vTPM running on host H; this host's
//!    [`MigrateConfig`] exists: the migration is let in and an [`Incoming`] marker written.
//!    Without the configuration the migration is refused there, cleanly.
//! 2. `prepare` (destination, before the restore): the marker says the guest comes with its
//!    vTPM: no vTPM is made here (it would be a new identity), the marker is confirmed.
//! 3. `started` (destination, the restored guest paused; the source's guest suspended, not yet
//!    destroyed): the hook runs H's [`MigrateConfig::handoff`] through the transport. That is
//!    `xl-vtpm libvirt-handoff GUEST THIS-HOST --domid D` on H: H's own checks of this host
//!    (EK certificate to H's roots, a fresh quote of this host's PCRs against H's policy), then
//!    the vTPM suspended there, its identity sealed to this host's TPM, imported here and
//!    committed, the registry's move, the vTPM started here and attached to the paused guest
//!    with the resume marker — the `xl-vtpm migrate` steps after the guest left. libvirt's
//!    Finish then unpauses the guest, whose TPM runs as it was (PCRs kept).
//! 4. `release` (source, after libvirt destroyed the suspended guest; or destination, after a
//!    failed incoming migration): the pair is held by another host, so nothing is stopped.
//!
//! A failure at `started` before the identity left H (H's checks refuse this host, the
//! transport fails) makes libvirt destroy the incoming guest and resume it on H, with its vTPM
//! there untouched. The checks are H's own ([`MigrateConfig`] on H): the destination never
//! chooses what it is checked against.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::exit::{CliError, FAILURE, REFUSED, USAGE};

/// Where a host's configuration for libvirt migrations with vTPMs is.
pub const CONFIG_PATH: &str = "/etc/xvtpm/libvirt-migrate.json";
/// The environment variable that names another file (libvirt clears a hook's environment: set
/// it in the hook script, or use the default path).
pub const CONFIG_ENV: &str = "XVTPM_LIBVIRT_MIGRATE";
/// The largest configuration file read.
const MAX_CONFIG: u64 = 64 * 1024;
/// How long after `migrate begin` the destination's `prepare` may come (libvirt runs it as
/// soon as the source connects its stream); an older marker is stale and ignored.
pub const PREPARE_WITHIN: Duration = Duration::from_secs(600);
/// How long the destination's `migrate begin` waits for the source's `--prepare` by default (it
/// runs in libvirt's Prepare: an unreachable source must not hold the migration).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
fn default_prepare_timeout() -> u64 {
    PREPARE_TIMEOUT.as_secs()
}
/// The most of the source's output a hook reads, per stream (the rest is drained).
pub const MAX_HANDOFF_OUTPUT: u64 = 256 * 1024;

fn default_ssh() -> String {
    "ssh".into()
}
fn default_handoff() -> String {
    "xl-vtpm libvirt-handoff".into()
}
fn default_receiver() -> String {
    "xl-vtpm migrate-receive".into()
}

/// A host's configuration for libvirt migrations that take vTPMs along
/// (`/etc/xvtpm/libvirt-migrate.json`, root's): the transport to the other hosts, and — as a
/// source — what a destination is checked against.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateConfig {
    /// The transport: `SSH HOST COMMAND` runs COMMAND on HOST (default `ssh`). HOST is a
    /// host's name in the registry, which must be a name the transport reaches.
    #[serde(default = "default_ssh")]
    pub ssh: String,
    /// The source's command, run by the destination's hook (default `xl-vtpm libvirt-handoff`;
    /// give `xl-vtpm --registry … libvirt-handoff` when the transport does not carry the
    /// registry's environment).
    #[serde(default = "default_handoff")]
    pub handoff: String,
    /// The destination's receiver, run by the source (default `xl-vtpm migrate-receive`).
    #[serde(default = "default_receiver")]
    pub receiver: String,
    /// Trusted TPM vendor roots a destination's EK certificate must chain to (PEM files).
    pub ek_ca: Vec<PathBuf>,
    /// Intermediates of destinations' EK certificates.
    #[serde(default)]
    pub ek_intermediate: Vec<PathBuf>,
    /// The SHA-256 host PCR values a destination must have (`xl-vtpm verify`'s format).
    pub host_pcrs_policy: PathBuf,
    /// The group the vTPM joins on the destination (default: its default group).
    #[serde(default)]
    pub group: Option<String>,
    /// How long (s) a destination's `migrate begin` waits for the source's checks and offer
    /// before it refuses the migration (default 120).
    #[serde(default = "default_prepare_timeout")]
    pub prepare_timeout_s: u64,
}

impl MigrateConfig {
    /// The configuration file's path (`XVTPM_LIBVIRT_MIGRATE`, else [`CONFIG_PATH`]).
    pub fn path() -> PathBuf {
        std::env::var_os(CONFIG_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(CONFIG_PATH))
    }

    /// This host's configuration; `None` if the file does not exist (libvirt migrations of
    /// guests with a vTPM are then refused).
    pub fn load() -> Result<Option<MigrateConfig>, CliError> {
        Self::load_from(&Self::path())
    }

    /// The configuration in `path`; `None` if it does not exist.
    pub fn load_from(path: &Path) -> Result<Option<MigrateConfig>, CliError> {
        let bytes = match crate::guest::read_capped(path, MAX_CONFIG, "the libvirt migration configuration") {
            Ok(b) => b,
            Err(_) if !path.exists() => return Ok(None),
            Err(e) => return Err(e),
        };
        let c: MigrateConfig = serde_json::from_slice(&bytes).map_err(|e| CliError::caused(USAGE, path.display().to_string(), e))?;
        if !(1..=3600).contains(&c.prepare_timeout_s) {
            return Err(CliError::new(USAGE, format!("{}: prepare_timeout_s must be 1 to 3600", path.display())));
        }
        if c.ek_ca.is_empty() {
            return Err(CliError::new(USAGE, format!("{}: ek_ca names no TPM vendor root", path.display())));
        }
        for (what, s) in [("ssh", &c.ssh), ("handoff", &c.handoff), ("receiver", &c.receiver)] {
            if s.trim().is_empty() {
                return Err(CliError::new(USAGE, format!("{}: {what} is empty", path.display())));
            }
        }
        Ok(Some(c))
    }

    /// The shell line the destination's hooks run: the source's handoff on `from_host` for
    /// guest `guest` coming here (`to_host`) — at `migrate begin` (`domid` `None`:
    /// `--prepare`), and at `started`, arrived as domain `domid`. Names are checked (letters,
    /// digits, `.`, `_`, `-`, and for hosts `:@[]`), so nothing in them reaches a shell as syntax.
    pub fn handoff_line(&self, from_host: &str, guest: &str, to_host: &str, domid: Option<u32>) -> Result<String, CliError> {
        check_name(guest, "guest")?;
        for h in [from_host, to_host] {
            check_host_name(h)?;
        }
        let what = domid.map_or_else(|| "--prepare".to_string(), |d| format!("--domid {d}"));
        Ok(format!("{} {from_host} {} {guest} {to_host} {what}", self.ssh, self.handoff))
    }
}

/// A guest name the markers and the transport take.
pub fn check_name(name: &str, what: &str) -> Result<(), CliError> {
    let ok = !name.is_empty() && name.len() <= 64 && !name.starts_with(['-', '.']) && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok { Ok(()) } else { Err(CliError::new(REFUSED, format!("{what} name {name:?} cannot cross hosts with its vTPM (letters, digits, . _ - only)"))) }
}

fn check_host_name(host: &str) -> Result<(), CliError> {
    let ok = !host.is_empty() && host.len() <= 253 && !host.starts_with('-') && host.chars().all(|c| c.is_ascii_alphanumeric() || "._-:@[]".contains(c));
    if ok { Ok(()) } else { Err(CliError::new(REFUSED, format!("registry host {host:?} is not a name the transport can reach"))) }
}

/// The destination's note that a guest is arriving with its vTPM, from `migrate begin` until
/// `started` (or `release`) — `<run-dir>/libvirt-incoming/<guest>.json`, 0600.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The guest's name.
    pub guest: String,
    /// Its vTPM.
    pub vtpm: Uuid,
    /// The registry host that holds the vTPM (the source).
    pub from_host: String,
    /// When `migrate begin` let it in (seconds since the epoch).
    pub since: u64,
    /// `prepare` saw it: the restore is under way, `started` pulls the identity.
    pub prepared: bool,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn marker(run_dir: &Path, guest: &str) -> PathBuf {
    run_dir.join("libvirt-incoming").join(format!("{guest}.json"))
}

impl Incoming {
    /// A new marker for `guest` arriving from `from_host` with `vtpm`.
    pub fn new(guest: &str, vtpm: Uuid, from_host: &str) -> Incoming {
        Incoming { guest: guest.into(), vtpm, from_host: from_host.into(), since: now(), prepared: false }
    }

    /// Writes (replaces) the marker.
    pub fn save(&self, run_dir: &Path) -> Result<(), CliError> {
        check_name(&self.guest, "guest")?;
        let path = marker(run_dir, &self.guest);
        let dir = path.parent().expect("a parent");
        std::fs::DirBuilder::new().recursive(true).create(dir).map_err(|e| CliError::caused(FAILURE, dir.display().to_string(), e))?;
        let body = serde_json::to_vec(self).map_err(|e| CliError::caused(FAILURE, "the incoming marker", e))?;
        xvtpm_fsutil::write_atomic(&path, &body, 0o600).map_err(|e| CliError::caused(FAILURE, path.display().to_string(), e))
    }

    /// The marker of `guest`, if one is here and readable; a marker not yet `prepared` counts
    /// only within [`PREPARE_WITHIN`] of its `migrate begin`.
    pub fn find(run_dir: &Path, guest: &str) -> Option<Incoming> {
        check_name(guest, "guest").ok()?;
        let b = crate::guest::read_capped(&marker(run_dir, guest), 4096, "the incoming marker").ok()?;
        let m: Incoming = serde_json::from_slice(&b).ok()?;
        let fresh = m.prepared || now().saturating_sub(m.since) <= PREPARE_WITHIN.as_secs();
        (m.guest == guest && fresh).then_some(m)
    }

    /// Removes the marker of `guest` (if any).
    pub fn remove(run_dir: &Path, guest: &str) {
        if check_name(guest, "guest").is_ok() {
            let _ = std::fs::remove_file(marker(run_dir, guest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_lives_from_migrate_begin_to_started() {
        let dir = tempfile::tempdir().unwrap();
        let v = Uuid::new_v4();
        assert_eq!(Incoming::find(dir.path(), "lv-v"), None);
        let mut m = Incoming::new("lv-v", v, "host-a");
        m.save(dir.path()).unwrap();
        assert_eq!(Incoming::find(dir.path(), "lv-v").unwrap().vtpm, v);
        assert_eq!(Incoming::find(dir.path(), "lv-w"), None);
        // an unprepared marker older than PREPARE_WITHIN is stale; a prepared one is not
        m.since -= PREPARE_WITHIN.as_secs() + 1;
        m.save(dir.path()).unwrap();
        assert_eq!(Incoming::find(dir.path(), "lv-v"), None);
        m.prepared = true;
        m.save(dir.path()).unwrap();
        assert!(Incoming::find(dir.path(), "lv-v").is_some());
        Incoming::remove(dir.path(), "lv-v");
        assert_eq!(Incoming::find(dir.path(), "lv-v"), None);
        // names that would leave the directory are refused
        assert!(Incoming::new("../x", v, "host-a").save(dir.path()).is_err());
        assert_eq!(Incoming::find(dir.path(), "../x"), None);
    }

    #[test]
    fn the_configuration_is_checked_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        assert!(MigrateConfig::load_from(&p).unwrap().is_none(), "no file: no configuration");
        std::fs::write(&p, r#"{"ek_ca": ["/r.pem"], "host_pcrs_policy": "/p.json"}"#).unwrap();
        let c = MigrateConfig::load_from(&p).unwrap().unwrap();
        assert_eq!((c.ssh.as_str(), c.handoff.as_str(), c.receiver.as_str()), ("ssh", "xl-vtpm libvirt-handoff", "xl-vtpm migrate-receive"));
        assert_eq!(c.handoff_line("host-a", "lv-v", "host-b", Some(7)).unwrap(), "ssh host-a xl-vtpm libvirt-handoff lv-v host-b --domid 7");
        assert_eq!(c.handoff_line("host-a", "lv-v", "host-b", None).unwrap(), "ssh host-a xl-vtpm libvirt-handoff lv-v host-b --prepare");
        assert!(c.handoff_line("host-a;reboot", "lv-v", "host-b", Some(7)).is_err());
        assert!(c.handoff_line("host-a", "lv v", "host-b", Some(7)).is_err());
        std::fs::write(&p, r#"{"ek_ca": [], "host_pcrs_policy": "/p.json"}"#).unwrap();
        assert!(MigrateConfig::load_from(&p).unwrap_err().text().contains("ek_ca"));
        std::fs::write(&p, r#"{"ek_ca": ["/r.pem"], "host_pcrs_policy": "/p.json", "polcy": 1}"#).unwrap();
        assert!(MigrateConfig::load_from(&p).is_err(), "a misspelt key is refused, not ignored");
    }
}
