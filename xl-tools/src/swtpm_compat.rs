//! libvirt's way in: `swtpm`, `swtpm_setup` and `swtpm_ioctl` entry points that make and run
//! xvtpm vTPMs (binary `xvtpm-swtpm`, installed under those three names in a directory put
//! first in libvirtd's `PATH`; docs/libvirt.md).
//!
//! libvirt (9.0, Debian 12) drives an `<tpm><backend type='emulator' version='2.0'/></tpm>`
//! through these command lines (src/qemu/qemu_tpm.c, src/util/virtpm.c), all of which are
//! accepted here and nothing else:
//!
//! * `swtpm_setup --print-capabilities`, `swtpm socket --print-capabilities` (also with
//!   `--tpm2`): JSON `{"type", "features", "version"}`; libvirt reads `features` only.
//! * `swtpm_setup --tpm2 --tpm-state DIR --vmid NAME:UUID --logfile FILE --createek
//!   --create-ek-cert --create-platform-cert --lock-nvram --not-overwrite`, run when DIR
//!   (`/var/lib/libvirt/swtpm/<vm-uuid>/tpm2`) is empty: creates a vTPM through the manager
//!   (EK and EK certificate included, the certificate's NV index locked) and writes
//!   [`MARKER`] into DIR naming it. The vTPM's state stays in xvtpm's state directory, sealed;
//!   DIR holds only the marker. [`BINDING`] in the vTPM's own directory records the DIR it
//!   was made for, so a marker copied into another VM's DIR is refused.
//! * `swtpm socket --ctrl type=unixio,path=SOCK,mode=0600 --tpmstate dir=DIR,mode=0600
//!   --log file=FILE --terminate --tpm2`, daemonized by libvirt, which records this process's
//!   pid (holding the pidfile's lock) and waits up to 1 s for SOCK: starts the marker's vTPM
//!   on SOCK (served to root and QEMU's uid, the owner of SOCK's directory), then stays, as
//!   swtpm would, until the vTPM ends (QEMU quit or hung up, `swtpm_ioctl -s`) or SIGTERM
//!   (which stops it). Its exit status is the vTPM's.
//! * `swtpm_ioctl --unix SOCK -s`: `CMD_SHUTDOWN` on the control socket.
//!
//! Refused with a message, never ignored: state encryption with a libvirt secret
//! (`--key`, `--migration-key`, `--pwdfile*`, `--keyfile*`, `--cipher`: xvtpm always seals
//! the state under a key rooted in the physical TPM, so a second passphrase would be
//! silently meaningless), `--reconfigure`/`--pcr-banks` (the vTPM keeps libtpms' default
//! banks), TPM 1.2, `--migration` (shared-storage migration: the state is sealed to this
//! host), and every option libvirt 9.0 does not pass.
//!
//! libvirt removes DIR's parent on `virsh undefine` (unless `persistent_state='yes'` or
//! `--keep-tpm`) without running any of these programs; [`sweep`] then destroys the vTPM
//! (`xl-vtpm libvirt sweep`, run by `xvtpm-libvirt-sweep.path` or with `--watch`).

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, REFUSED, USAGE};
use crate::local::{CreateOpts, Local};

/// The file in libvirt's TPM state directory naming its vTPM.
pub const MARKER: &str = "xvtpm-vtpm.json";
/// The file in a vTPM's own directory naming the libvirt domain and TPM state directory it
/// was made for.
pub const BINDING: &str = "libvirt.json";
/// The swtpm version whose command lines these entry points speak.
pub const SWTPM_VERSION: &str = "0.7.1";

/// Which program libvirt ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `swtpm`.
    Swtpm,
    /// `swtpm_setup`.
    Setup,
    /// `swtpm_ioctl`.
    Ioctl,
}

impl Tool {
    /// The tool a program name (argv\[0\]'s file name) stands for.
    pub fn from_name(name: &str) -> Option<Tool> {
        match name {
            "swtpm" | "xvtpm-swtpm" => Some(Tool::Swtpm),
            "swtpm_setup" => Some(Tool::Setup),
            "swtpm_ioctl" => Some(Tool::Ioctl),
            _ => None,
        }
    }
}

/// What [`MARKER`] holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    /// `xvtpm.libvirt-marker/1`.
    pub schema: String,
    /// The vTPM.
    pub vtpm: Uuid,
}

/// What [`BINDING`] holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Binding {
    /// `xvtpm.libvirt-binding/1`.
    pub schema: String,
    /// The libvirt domain's UUID.
    pub vm_uuid: Uuid,
    /// The libvirt domain's name when the vTPM was made.
    pub vm_name: String,
    /// libvirt's TPM state directory (`/var/lib/libvirt/swtpm/<vm-uuid>/tpm2`).
    pub tpm_state: PathBuf,
}

const MARKER_SCHEMA: &str = "xvtpm.libvirt-marker/1";
const BINDING_SCHEMA: &str = "xvtpm.libvirt-binding/1";

/// Caps the files read here (a marker or binding is a few hundred bytes).
const MAX_RECORD: u64 = 64 * 1024;

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<Option<T>, CliError> {
    let f = match fs::File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CliError::caused(FAILURE, format!("reading {}", p.display()), e)),
    };
    let mut buf = Vec::new();
    f.take(MAX_RECORD).read_to_end(&mut buf).map_err(|e| CliError::caused(FAILURE, format!("reading {}", p.display()), e))?;
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| CliError::caused(FAILURE, format!("{} is not an xvtpm record", p.display()), e).fix("remove it only if no vTPM belongs to it"))
}

/// The vTPM named by the marker in libvirt's TPM state directory `dir`, if any.
pub fn marker(dir: &Path) -> Result<Option<Uuid>, CliError> {
    Ok(read_json::<Marker>(&dir.join(MARKER))?.map(|m| m.vtpm))
}

/// The libvirt binding recorded with vTPM `uuid`, if it was made for libvirt.
pub fn binding(local: &Local, uuid: &Uuid) -> Result<Option<Binding>, CliError> {
    read_json(&local.vtpm_dir(uuid).join(BINDING))
}

/// `--print-capabilities` of each tool (swtpm's JSON shape; libvirt reads `features`).
/// `cmdarg-reconfigure-pcr-banks` is announced so that libvirt passes `<active_pcr_banks>` to
/// us (and we refuse it) instead of dropping it silently; the encryption features
/// (`cmdarg-pwd-fd`, `cmdarg-pwdfile-fd`) are not, so libvirt itself refuses `<encryption>`.
pub fn capabilities(tool: Tool) -> serde_json::Value {
    match tool {
        Tool::Swtpm => serde_json::json!({ "type": "swtpm", "features": ["tpm-2.0"], "version": SWTPM_VERSION }),
        Tool::Setup => serde_json::json!({ "type": "swtpm_setup", "features": ["tpm-2.0", "cmdarg-reconfigure-pcr-banks"], "version": SWTPM_VERSION }),
        Tool::Ioctl => serde_json::json!({ "type": "swtpm_ioctl", "features": [], "version": SWTPM_VERSION }),
    }
}

fn usage(m: impl Into<String>) -> CliError {
    CliError::new(USAGE, m.into())
}

const ENCRYPTION: &str = "state encryption with a libvirt secret is not provided: an xvtpm vTPM's state is always sealed \
(AES-256-GCM) under a key that only the manager releases, rooted in the host's physical TPM; remove <encryption> from the \
domain's <tpm> backend";

/// Splits `--opt=value` into (`--opt`, Some(value)).
fn split_eq(a: &str) -> (&str, Option<&str>) {
    match a.split_once('=') {
        Some((k, v)) if a.starts_with("--") => (k, Some(v)),
        _ => (a, None),
    }
}

/// Iterates options, giving each its value on request.
struct Opts<'a> {
    args: std::slice::Iter<'a, String>,
    pending: Option<&'a str>,
}

impl<'a> Opts<'a> {
    fn new(args: &'a [String]) -> Self {
        Opts { args: args.iter(), pending: None }
    }
    fn next_opt(&mut self) -> Option<&'a str> {
        let a = self.args.next()?;
        let (k, v) = split_eq(a);
        self.pending = v;
        Some(k)
    }
    fn value(&mut self, opt: &str) -> Result<&'a str, CliError> {
        if let Some(v) = self.pending.take() {
            return Ok(v);
        }
        self.args.next().map(String::as_str).ok_or_else(|| usage(format!("{opt} needs a value")))
    }
    fn no_value(&mut self, opt: &str) -> Result<(), CliError> {
        match self.pending.take() {
            Some(v) => Err(usage(format!("{opt} takes no value (got {v:?})"))),
            None => Ok(()),
        }
    }
}

/// `key=value,key=value` (swtpm's option syntax).
fn kv(opt: &str, s: &str) -> Result<Vec<(String, String)>, CliError> {
    s.split(',')
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(usage(format!("{opt} {s:?}: expected key=value pairs separated by ','"))),
        })
        .collect()
}

/// `swtpm_setup`'s command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetupArgs {
    /// `--tpm2`.
    pub tpm2: bool,
    /// `--tpm-state DIR`.
    pub tpm_state: Option<PathBuf>,
    /// `--vmid NAME:UUID`.
    pub vmid: Option<(String, Uuid)>,
    /// `--logfile FILE`.
    pub logfile: Option<PathBuf>,
    /// `--overwrite` (Some(true)) or `--not-overwrite` (Some(false)).
    pub overwrite: Option<bool>,
    /// `--ecc`: an ECC P-256 EK instead of RSA-2048.
    pub ecc: bool,
    /// `--print-capabilities`, `--version`, `--help` or `--create-config-files`: answer and exit.
    pub info: Option<&'static str>,
}

/// Parses `swtpm_setup` arguments (without argv\[0\]).
pub fn parse_setup(args: &[String]) -> Result<SetupArgs, CliError> {
    let mut a = SetupArgs::default();
    let mut o = Opts::new(args);
    while let Some(opt) = o.next_opt() {
        match opt {
            "--print-capabilities" => a.info = Some("capabilities"),
            "--version" => a.info = Some("version"),
            "--help" | "-h" => a.info = Some("help"),
            // libvirt runs `--create-config-files skip-if-exist` in session mode only; there are
            // no swtpm configuration files to make here.
            "--create-config-files" => {
                const WORDS: [&str; 3] = ["overwrite", "root", "skip-if-exist"];
                let value = o.pending.take().or_else(|| o.args.clone().next().map(String::as_str).filter(|n| !n.starts_with('-')).inspect(|_| {
                    o.args.next();
                }));
                if let Some(v) = value.filter(|v| !v.split(',').all(|w| WORDS.contains(&w))) {
                    return Err(usage(format!("--create-config-files {v:?}: expected a list of {WORDS:?}")));
                }
                a.info = Some("config-files");
            }
            "--tpm2" => {
                o.no_value(opt)?;
                a.tpm2 = true
            }
            "--tpm-state" | "--tpmstate" => {
                let v = o.value(opt)?;
                let p = v.strip_prefix("dir://").unwrap_or(v);
                if p.is_empty() || v.contains("://") && !v.starts_with("dir://") {
                    return Err(usage(format!("{opt} {v:?}: a directory (or dir://DIR) is expected")));
                }
                a.tpm_state = Some(PathBuf::from(p));
            }
            "--vmid" => {
                let v = o.value(opt)?;
                let (name, id) = v.rsplit_once(':').ok_or_else(|| usage(format!("--vmid {v:?}: expected NAME:UUID, as libvirt passes it")))?;
                let id = Uuid::parse_str(id).map_err(|e| CliError::caused(USAGE, format!("--vmid {v:?}: {id:?} is not a UUID"), e))?;
                a.vmid = Some((name.to_string(), id));
            }
            "--logfile" => a.logfile = Some(PathBuf::from(o.value(opt)?)),
            "--overwrite" => {
                o.no_value(opt)?;
                a.overwrite = Some(true)
            }
            "--not-overwrite" => {
                o.no_value(opt)?;
                a.overwrite = Some(false)
            }
            // What every vTPM gets anyway: an EK, its certificate at the TCG index, that index locked.
            "--createek" | "--create-ek-cert" | "--lock-nvram" => o.no_value(opt)?,
            // No platform certificate: accepted because libvirt always asks (docs/libvirt.md).
            "--create-platform-cert" => o.no_value(opt)?,
            "--ecc" => {
                o.no_value(opt)?;
                a.ecc = true
            }
            "--pwdfile" | "--pwdfile-fd" | "--keyfile" | "--keyfile-fd" | "--cipher" => return Err(CliError::new(REFUSED, format!("{opt}: {ENCRYPTION}"))),
            "--reconfigure" | "--pcr-banks" => {
                return Err(CliError::new(
                    REFUSED,
                    format!("{opt}: an xvtpm vTPM keeps libtpms' default PCR banks (SHA-1 and SHA-256); remove <active_pcr_banks> from the domain's <tpm> backend"),
                ));
            }
            other => {
                return Err(usage(format!(
                    "swtpm_setup option {other:?} is not provided by xvtpm's entry point (it accepts what libvirt 9.0 passes; see docs/libvirt.md)"
                )));
            }
        }
    }
    Ok(a)
}

/// `swtpm socket`'s command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SocketArgs {
    /// `--tpm2`.
    pub tpm2: bool,
    /// `--ctrl type=unixio,path=SOCK[,mode=0600]`.
    pub ctrl: Option<PathBuf>,
    /// `--tpmstate dir=DIR[,mode=0600]`.
    pub tpm_state: Option<PathBuf>,
    /// `--log file=FILE[,level=N]`.
    pub log: Option<PathBuf>,
    /// `--pid file=FILE`.
    pub pidfile: Option<PathBuf>,
    /// `--print-capabilities`, `--version`, `--help`: answer and exit.
    pub info: Option<&'static str>,
}

/// Parses `swtpm` arguments (without argv\[0\]).
pub fn parse_socket(args: &[String]) -> Result<SocketArgs, CliError> {
    let mut a = SocketArgs::default();
    match args.first().map(String::as_str) {
        Some("socket") => {}
        Some("--version") => return Ok(SocketArgs { info: Some("version"), ..Default::default() }),
        Some("--help" | "-h") => return Ok(SocketArgs { info: Some("help"), ..Default::default() }),
        Some(other) => {
            return Err(usage(format!("swtpm {other:?}: only `swtpm socket` is provided by xvtpm's entry point (what libvirt runs)")));
        }
        None => return Err(usage("swtpm: expected `socket`")),
    }
    let mut o = Opts::new(&args[1..]);
    let mode_ok = |opt: &str, k: &str, v: &str| -> Result<(), CliError> {
        if v == "0600" || v == "600" {
            Ok(())
        } else {
            Err(usage(format!("{opt} {k}={v}: the vTPM's sockets and files are always mode 0600; only mode=0600 is accepted")))
        }
    };
    while let Some(opt) = o.next_opt() {
        match opt {
            "--print-capabilities" => a.info = Some("capabilities"),
            "--version" => a.info = Some("version"),
            "--help" | "-h" => a.info = Some("help"),
            "--tpm2" => {
                o.no_value(opt)?;
                a.tpm2 = true
            }
            // The vTPM on a control socket alone ends when its controller does: --terminate.
            "--terminate" | "-t" => o.no_value(opt)?,
            "--ctrl" => {
                let v = o.value(opt)?;
                let mut ty = None;
                for (k, val) in kv(opt, v)? {
                    match k.as_str() {
                        "type" => ty = Some(val),
                        "path" => a.ctrl = Some(PathBuf::from(val)),
                        "mode" => mode_ok(opt, &k, &val)?,
                        _ => return Err(usage(format!("--ctrl {k}=: not provided (xvtpm's entry point takes type=unixio,path=SOCK[,mode=0600])"))),
                    }
                }
                if ty.as_deref() != Some("unixio") || a.ctrl.is_none() {
                    return Err(usage(format!("--ctrl {v:?}: expected type=unixio,path=SOCK (QEMU's control socket)")));
                }
            }
            "--tpmstate" => {
                let v = o.value(opt)?;
                for (k, val) in kv(opt, v)? {
                    match k.as_str() {
                        "dir" => a.tpm_state = Some(PathBuf::from(val)),
                        "backend-uri" => match val.strip_prefix("dir://") {
                            Some(d) => a.tpm_state = Some(PathBuf::from(d)),
                            None => return Err(usage(format!("--tpmstate backend-uri={val}: only dir://DIR is provided"))),
                        },
                        "mode" => mode_ok(opt, &k, &val)?,
                        _ => return Err(usage(format!("--tpmstate {k}=: not provided (dir=DIR[,mode=0600])"))),
                    }
                }
            }
            "--log" => {
                let v = o.value(opt)?;
                for (k, val) in kv(opt, v)? {
                    match k.as_str() {
                        "file" => a.log = Some(PathBuf::from(val)),
                        // The vTPM's own log has its own level (XVTPM_LOG); this file gets our lines.
                        "level" | "truncate" | "prefix" => {}
                        _ => return Err(usage(format!("--log {k}=: not provided (file=FILE[,level=N])"))),
                    }
                }
            }
            "--pid" => {
                let v = o.value(opt)?;
                for (k, val) in kv(opt, v)? {
                    match k.as_str() {
                        "file" => a.pidfile = Some(PathBuf::from(val)),
                        _ => return Err(usage(format!("--pid {k}=: not provided (file=FILE)"))),
                    }
                }
            }
            "--key" | "--migration-key" | "--pwd" | "--pwd-fd" => return Err(CliError::new(REFUSED, format!("{opt}: {ENCRYPTION}"))),
            "--migration" => {
                return Err(CliError::new(
                    REFUSED,
                    "--migration: migration over shared storage is not provided: a vTPM's state is sealed to this host's physical TPM",
                ));
            }
            "--daemon" | "-d" => return Err(usage("--daemon: not provided; libvirt (since 8.x) daemonizes swtpm itself and records its pid")),
            "--server" => {
                return Err(usage("--server: not provided; QEMU's data channel arrives through the control socket (CMD_SET_DATAFD)"));
            }
            other => {
                return Err(usage(format!(
                    "swtpm socket option {other:?} is not provided by xvtpm's entry point (it accepts what libvirt 9.0 passes; see docs/libvirt.md)"
                )));
            }
        }
    }
    Ok(a)
}

/// `swtpm_ioctl`'s command line: only `--unix SOCK -s` (what libvirt runs to stop swtpm).
pub fn parse_ioctl(args: &[String]) -> Result<Result<PathBuf, &'static str>, CliError> {
    let mut sock = None;
    let mut shutdown = false;
    let mut o = Opts::new(args);
    while let Some(opt) = o.next_opt() {
        match opt {
            "--version" => return Ok(Err("version")),
            "--help" | "-h" => return Ok(Err("help")),
            "--unix" => sock = Some(PathBuf::from(o.value(opt)?)),
            "-s" => shutdown = true,
            other => {
                return Err(usage(format!(
                    "swtpm_ioctl option {other:?} is not provided by xvtpm's entry point (only `--unix SOCK -s`, what libvirt runs)"
                )));
            }
        }
    }
    match (sock, shutdown) {
        (Some(s), true) => Ok(Ok(s)),
        _ => Err(usage("swtpm_ioctl: expected --unix SOCK -s")),
    }
}

/// Appends a line to the swtpm log file libvirt named (best effort: the log is for people).
fn log_line(log: Option<&Path>, line: &str) {
    if let Some(p) = log {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).mode(0o600).open(p) {
            let _ = writeln!(f, "xvtpm: {line}");
        }
    }
}

/// `swtpm_setup`: creates the vTPM of a libvirt domain (or finds it), see the module docs.
pub fn setup(local: &Local, a: &SetupArgs) -> Result<String, CliError> {
    if !a.tpm2 {
        return Err(CliError::new(REFUSED, "TPM 1.2 is not provided through libvirt: use <backend type='emulator' version='2.0'/>"));
    }
    let dir = a.tpm_state.as_deref().ok_or_else(|| usage("swtpm_setup: --tpm-state DIR is required"))?;
    if !dir.is_dir() {
        return Err(CliError::new(FAILURE, format!("--tpm-state {}: not a directory (libvirt makes it before running swtpm_setup)", dir.display())));
    }
    if let Some(existing) = marker(dir)? {
        return match a.overwrite {
            Some(false) => Ok(format!("vTPM {existing} exists for {}; kept (--not-overwrite)", dir.display())),
            Some(true) => Err(CliError::new(
                REFUSED,
                format!(
                    "--overwrite would destroy vTPM {existing} (its keys and NV); xvtpm never regenerates a vTPM's state. \
                     Destroy it explicitly with `xl-vtpm vtpm destroy {existing}` and remove {}",
                    dir.join(MARKER).display()
                ),
            )),
            None => Err(CliError::new(REFUSED, format!("{} holds vTPM {existing} already; pass --not-overwrite to keep it", dir.display()))),
        };
    }
    let Some((name, vm_uuid)) = a.vmid.clone() else {
        return Err(CliError::new(
            REFUSED,
            format!(
                "no vTPM for {} on this host, and none is made without --vmid: a domain restored or migrated in brings \
                 TPM state sealed to the host it came from, which cannot be opened here",
                dir.display()
            ),
        ));
    };
    let mut admin = Admin::connect(&local.run_dir)?;
    let opts = CreateOpts { ek_ecc: a.ecc, ..Default::default() };
    let rt = local.create(&mut admin, None, None, &[], &opts)?;
    let uuid = rt.uuid;
    let recorded = (|| -> Result<(), CliError> {
        local.stop(&mut admin, &uuid, Duration::from_secs(10))?;
        let binding = Binding { schema: BINDING_SCHEMA.into(), vm_uuid, vm_name: name.clone(), tpm_state: dir.to_path_buf() };
        let b = local.vtpm_dir(&uuid).join(BINDING);
        xvtpm_fsutil::write_atomic(&b, &serde_json::to_vec_pretty(&binding).expect("serialisable"), 0o600)
            .map_err(|e| CliError::caused(FAILURE, format!("writing {}", b.display()), e))?;
        let m = dir.join(MARKER);
        let marker = Marker { schema: MARKER_SCHEMA.into(), vtpm: uuid };
        xvtpm_fsutil::write_atomic(&m, &serde_json::to_vec_pretty(&marker).expect("serialisable"), 0o600)
            .map_err(|e| CliError::caused(FAILURE, format!("writing {}", m.display()), e))
    })();
    if let Err(e) = recorded {
        // No marker, no vTPM: the next start runs swtpm_setup again.
        let _ = fs::remove_file(dir.join(MARKER));
        return Err(match local.destroy(&mut admin, &uuid) {
            Ok(()) => e,
            Err(d) => CliError::new(e.code, format!("{}\nvTPM {uuid} could not be removed ({}); remove it with `xl-vtpm vtpm destroy {uuid}`", e.text(), d.text())),
        });
    }
    Ok(format!(
        "created vTPM {uuid} for libvirt domain {name} ({vm_uuid}): TPM 2.0, EK with its certificate at the TCG NV index (locked), \
         no platform certificate; state sealed in {}",
        local.state_file(&uuid).display()
    ))
}

/// The vTPM libvirt's TPM state directory `dir` belongs to, checked against the binding the
/// vTPM recorded at creation (a marker copied into another domain's directory is refused).
pub fn vtpm_of(local: &Local, dir: &Path) -> Result<Uuid, CliError> {
    let uuid = marker(dir)?.ok_or_else(|| {
        let swtpm_state = ["tpm2-00.permall", "tpm-00.permall"].iter().any(|f| dir.join(f).exists());
        CliError::new(
            FAILURE,
            if swtpm_state {
                format!(
                    "{} holds a plain swtpm's TPM state, not an xvtpm vTPM: xvtpm does not import swtpm state. Run this domain on \
                     swtpm (without xvtpm's directory in libvirtd's PATH), or give it a new xvtpm vTPM with \
                     `virsh undefine --keep-nvram --tpm` and define it again (its TPM contents are lost)",
                    dir.display()
                )
            } else {
                format!("no xvtpm vTPM for {} ({MARKER} missing): swtpm_setup makes it when libvirt starts the domain with an empty TPM state directory", dir.display())
            },
        )
    })?;
    let b = binding(local, &uuid)?.ok_or_else(|| {
        CliError::new(REFUSED, format!("vTPM {uuid} named in {} was not made for libvirt (no {BINDING}); refusing to hand it to this domain", dir.join(MARKER).display()))
    })?;
    let same = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if same(&b.tpm_state) != same(dir) {
        return Err(CliError::new(
            REFUSED,
            format!(
                "vTPM {uuid} belongs to libvirt domain {} ({}, TPM state {}), not to {}: a vTPM is never attached to another guest",
                b.vm_name,
                b.vm_uuid,
                b.tpm_state.display(),
                dir.display()
            ),
        ));
    }
    Ok(uuid)
}

/// Binds QEMU's control socket at `ctrl`: mode 0600, owned by `consumer` (QEMU's uid); a stale
/// socket there (a killed predecessor's; libvirt also unlinks it) is replaced, anything else is not.
fn bind_ctrl(ctrl: &Path, consumer: Option<u32>) -> Result<std::os::unix::net::UnixListener, CliError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |e: std::io::Error| CliError::caused(FAILURE, format!("--ctrl path={}", ctrl.display()), e);
    if let Ok(m) = fs::symlink_metadata(ctrl) {
        if !m.file_type().is_socket() {
            return Err(CliError::new(FAILURE, format!("--ctrl path={}: exists and is not a socket; remove it", ctrl.display())));
        }
        fs::remove_file(ctrl).map_err(fail)?;
    }
    if ctrl.as_os_str().len() > 107 {
        return Err(CliError::new(USAGE, format!("--ctrl path={}: longer than a Unix socket path may be (107 bytes)", ctrl.display())));
    }
    let l = std::os::unix::net::UnixListener::bind(ctrl).map_err(fail)?;
    let set = fs::set_permissions(ctrl, fs::Permissions::from_mode(0o600))
        .and_then(|()| consumer.map_or(Ok(()), |u| std::os::unix::fs::chown(ctrl, Some(u), None)));
    if let Err(e) = set {
        let _ = fs::remove_file(ctrl);
        return Err(fail(e));
    }
    Ok(l)
}

/// Marks every descriptor above stderr close-on-exec, so the vTPM process does not inherit
/// libvirt's (the pidfile whose lock this process holds, pipes to libvirtd).
fn cloexec_inherited() {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).filter(|&fd| fd > 2).collect())
        .unwrap_or_default();
    for fd in fds {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// `swtpm socket`: starts the domain's vTPM on libvirt's control socket and stays until it ends.
/// Returns the exit code.
pub fn socket(local: &Local, a: &SocketArgs) -> Result<i32, CliError> {
    if !a.tpm2 {
        return Err(CliError::new(REFUSED, "TPM 1.2 is not provided through libvirt: use <backend type='emulator' version='2.0'/>"));
    }
    let ctrl = a.ctrl.as_deref().ok_or_else(|| usage("swtpm socket: --ctrl type=unixio,path=SOCK is required"))?;
    let dir = a.tpm_state.as_deref().ok_or_else(|| usage("swtpm socket: --tpmstate dir=DIR is required"))?;
    let log = a.log.as_deref();
    let uuid = vtpm_of(local, dir)?;
    // QEMU's uid: libvirt makes the socket's directory QEMU's (0770, QEMU's user, swtpm's group).
    let consumer = {
        use std::os::unix::fs::MetadataExt;
        let parent = ctrl.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let m = fs::metadata(parent).map_err(|e| CliError::caused(FAILURE, parent.display().to_string(), e))?;
        (m.uid() != 0).then_some(m.uid())
    };
    cloexec_inherited();
    let mut admin = Admin::connect(&local.run_dir)?;
    // libvirt waits 1 s for the socket to appear (and starts QEMU then): bind it now, before
    // the vTPM opens its state; QEMU's connection waits in the backlog until the vTPM serves.
    let listener = bind_ctrl(ctrl, consumer)?;
    let rt = match local.start_for_qemu(&mut admin, &uuid, ctrl, listener, consumer) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = fs::remove_file(ctrl);
            return Err(e);
        }
    };
    drop(admin);
    log_line(
        log,
        &format!(
            "vTPM {uuid} runs as process {} on {} (QEMU uid {}); its own log: {}",
            rt.pid,
            ctrl.display(),
            consumer.map_or("root".to_string(), |u| u.to_string()),
            rt.log.display()
        ),
    );
    if let Some(p) = &a.pidfile {
        xvtpm_fsutil::write_atomic(p, format!("{}\n", std::process::id()).as_bytes(), 0o600)
            .map_err(|e| CliError::caused(FAILURE, format!("--pid file={}", p.display()), e))?;
    }
    let code = wait_vtpm(rt.pid);
    let ended = match code {
        Ok(c) => format!("vTPM {uuid} ended (exit status {c})"),
        Err(sig) => format!("vTPM {uuid} stopped on {sig}"),
    };
    // Clean up as swtpm does: its records, the manager's attachment, the socket.
    if let Ok(mut admin) = Admin::connect(&local.run_dir) {
        let _ = local.stop(&mut admin, &uuid, Duration::from_secs(10));
    }
    if fs::symlink_metadata(ctrl).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        let _ = fs::remove_file(ctrl);
    }
    log_line(log, &ended);
    Ok(code.unwrap_or(0))
}

/// Waits until vTPM process `pid` (our child) exits: Ok(its exit code), or Err(the signal we
/// got, after stopping the vTPM with SIGTERM and reaping it).
fn wait_vtpm(pid: u32) -> Result<i32, &'static str> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::Pid;
    let child = Pid::from_raw(pid as i32);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let reap = move |flags: Option<WaitPidFlag>| match waitpid(child, flags) {
        Ok(WaitStatus::Exited(_, c)) => Some(c),
        Ok(WaitStatus::Signaled(_, s, _)) => Some(128 + s as i32),
        Ok(_) => None,
        // Not our child (any more): gone.
        Err(_) => Some(1),
    };
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int, mut hup) = (
            signal(SignalKind::terminate()).expect("SIGTERM handler"),
            signal(SignalKind::interrupt()).expect("SIGINT handler"),
            signal(SignalKind::hangup()).expect("SIGHUP handler"),
        );
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => break "SIGHUP",
                _ = tick.tick() => if let Some(c) = reap(Some(WaitPidFlag::WNOHANG)) { return Ok(c) },
            }
        };
        // The vTPM saves its state and exits on SIGTERM.
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if reap(Some(WaitPidFlag::WNOHANG)).is_some() {
                return Err(sig);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = reap(None);
        Err(sig)
    })
}

/// `swtpm_ioctl --unix SOCK -s`: CMD_SHUTDOWN; Ok if the TPM answered success.
pub fn ioctl_shutdown(sock: &Path) -> Result<(), CliError> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(|e| CliError::caused(FAILURE, format!("Could not connect to {}", sock.display()), e))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(&[0, 0, 0, 3]).map_err(|e| CliError::caused(FAILURE, sock.display().to_string(), e))?;
    let mut r = [0u8; 4];
    s.read_exact(&mut r).map_err(|e| CliError::caused(FAILURE, format!("{}: no answer to CMD_SHUTDOWN", sock.display()), e))?;
    match u32::from_be_bytes(r) {
        0 => Ok(()),
        rc => Err(CliError::new(FAILURE, format!("TPM result from PTM_SHUTDOWN: 0x{rc:x}"))),
    }
}

/// Runs one entry point; returns the process exit code (swtpm's: 0 ok, 1 failure; usage 2
/// is swtpm's `EXIT_FAILURE` too, so libvirt sees non-zero either way).
pub fn main(tool: Tool, local: &Local, args: &[String]) -> i32 {
    let name = match tool {
        Tool::Swtpm => "swtpm",
        Tool::Setup => "swtpm_setup",
        Tool::Ioctl => "swtpm_ioctl",
    };
    let help = |tool: Tool| match tool {
        Tool::Swtpm => "usage: swtpm socket --tpm2 --ctrl type=unixio,path=SOCK[,mode=0600] --tpmstate dir=DIR[,mode=0600] [--log file=FILE] [--terminate] [--pid file=FILE]\n\
                        xvtpm's swtpm entry point for libvirt: runs the xvtpm vTPM of libvirt's TPM state directory DIR on SOCK (docs/libvirt.md).",
        Tool::Setup => "usage: swtpm_setup --tpm2 --tpm-state DIR --vmid NAME:UUID [--logfile FILE] [--createek] [--create-ek-cert] [--create-platform-cert] [--lock-nvram] [--not-overwrite]\n\
                        xvtpm's swtpm_setup entry point for libvirt: creates an xvtpm vTPM through the manager for the domain (docs/libvirt.md).",
        Tool::Ioctl => "usage: swtpm_ioctl --unix SOCK -s\nxvtpm's swtpm_ioctl entry point for libvirt: shuts the vTPM on SOCK down.",
    };
    let version = format!("xvtpm {name} entry point {} (swtpm {SWTPM_VERSION} command lines, for libvirt)", env!("CARGO_PKG_VERSION"));
    // Where a refusal is written even when the command line itself is refused: libvirt
    // points at these logs ("Check error log ...").
    let log_of = |args: &[String]| -> Option<PathBuf> {
        args.iter().enumerate().find_map(|(i, a)| match split_eq(a) {
            ("--logfile", Some(v)) => Some(PathBuf::from(v)),
            ("--logfile", None) => args.get(i + 1).map(PathBuf::from),
            ("--log", v) => v.or(args.get(i + 1).map(String::as_str)).and_then(|v| {
                v.split(',').find_map(|p| p.strip_prefix("file=")).map(PathBuf::from)
            }),
            _ => None,
        })
    };
    let result: Result<i32, (CliError, Option<PathBuf>)> = match tool {
        Tool::Setup => match parse_setup(args) {
            Err(e) => Err((e, log_of(args))),
            Ok(a) => match a.info {
                Some("capabilities") => {
                    println!("{}", capabilities(tool));
                    Ok(0)
                }
                Some("version") => {
                    println!("{version}");
                    Ok(0)
                }
                Some("help") => {
                    println!("{}", help(tool));
                    Ok(0)
                }
                Some(_) => Ok(0),
                None => match setup(local, &a) {
                    Ok(line) => {
                        log_line(a.logfile.as_deref(), &line);
                        println!("{line}");
                        Ok(0)
                    }
                    Err(e) => Err((e, a.logfile)),
                },
            },
        },
        Tool::Swtpm => match parse_socket(args) {
            Err(e) => Err((e, log_of(args))),
            Ok(a) => match a.info {
                Some("capabilities") => {
                    println!("{}", capabilities(tool));
                    Ok(0)
                }
                Some("version") => {
                    println!("{version}");
                    Ok(0)
                }
                Some(_) => {
                    println!("{}", help(tool));
                    Ok(0)
                }
                None => socket(local, &a).map_err(|e| (e, a.log.clone())),
            },
        },
        Tool::Ioctl => match parse_ioctl(args) {
            Err(e) => Err((e, None)),
            Ok(Err("version")) => {
                println!("{version}");
                Ok(0)
            }
            Ok(Err(_)) => {
                println!("{}", help(tool));
                Ok(0)
            }
            Ok(Ok(sock)) => ioctl_shutdown(&sock).map(|()| 0).map_err(|e| (e, None)),
        },
    };
    match result {
        Ok(c) => c,
        Err((e, log)) => {
            log_line(log.as_deref(), &format!("error: {}", e.text()));
            eprintln!("{name} (xvtpm): error: {}", e.text());
            e.code
        }
    }
}

/// What [`sweep`] did with one libvirt vTPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Swept {
    /// The vTPM.
    pub vtpm: Uuid,
    /// Its libvirt domain.
    pub vm_uuid: Uuid,
    /// `kept` (the domain is defined), `kept-state` (undefined, TPM state kept: `persistent_state='yes'`
    /// or `--keep-tpm`), `kept-unverified` (libvirt's swtpm storage directory itself is absent:
    /// storage not mounted, or a sweep outside libvirtd's mount namespace), `destroyed`, or
    /// `running` (undefined and state gone, but its process runs: left alone), or `orphaned`
    /// (the domain is defined but its TPM directory no longer names this vTPM: left alone while
    /// the domain exists; `xl-vtpm vtpm destroy` removes it), or `failed: REASON`.
    pub action: String,
}

/// Destroys the vTPMs of libvirt domains that are undefined **and** whose TPM state directory
/// libvirt removed (the two together are what `virsh undefine` does; either alone is not:
/// a domain still defined keeps its vTPM even if its directory is unreadable, e.g. storage
/// not mounted, and an undefined one whose directory libvirt kept — `persistent_state='yes'`,
/// `--keep-tpm` — keeps it for the next domain defined with that UUID).
/// `defined` is every domain UUID libvirt knows (`virsh list --all --uuid`).
pub fn sweep(local: &Local, admin: &mut Admin, defined: &HashSet<Uuid>) -> Result<Vec<Swept>, CliError> {
    let mut out = vec![];
    let rd = match fs::read_dir(local.state_dir.join("vtpms")) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(CliError::caused(FAILURE, format!("listing {}", local.state_dir.join("vtpms").display()), e)),
    };
    for e in rd.flatten() {
        let Some(uuid) = e.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) else { continue };
        let Ok(Some(b)) = binding(local, &uuid) else { continue };
        // A marker that cannot be read counts as present: only a directory libvirt removed
        // (or one naming another vTPM) gives the vTPM up.
        let still_marked = match marker(&b.tpm_state) {
            Ok(Some(u)) => u == uuid,
            Ok(None) => false,
            Err(_) => true,
        };
        // libvirt's swtpm storage directory (`/var/lib/libvirt/swtpm`) itself missing means we
        // do not see libvirt's storage (not mounted, another mount namespace), not an undefine.
        let storage_seen = b.tpm_state.parent().and_then(Path::parent).is_some_and(Path::is_dir);
        let action = if defined.contains(&b.vm_uuid) {
            // libvirt deletes a TPM directory it made when the start fails after swtpm_setup
            // (e.g. `--reconfigure` refused): the domain's next start makes another vTPM.
            if storage_seen && !still_marked { "orphaned" } else { "kept" }
        } else if !storage_seen {
            "kept-unverified"
        } else if still_marked {
            "kept-state"
        } else if local.runtime(&uuid).is_some() {
            "running"
        } else {
            // One vTPM that cannot be destroyed (e.g. its identity was deleted by hand) does not
            // keep the others.
            match local.destroy(admin, &uuid) {
                Ok(()) => "destroyed",
                Err(e) => {
                    out.push(Swept { vtpm: uuid, vm_uuid: b.vm_uuid, action: format!("failed: {}", e.text()) });
                    continue;
                }
            }
        };
        out.push(Swept { vtpm: uuid, vm_uuid: b.vm_uuid, action: action.into() });
    }
    Ok(out)
}

/// Every domain UUID libvirt knows, from `virsh [-c URI] list --all --uuid`; an error if libvirt
/// cannot be asked (then nothing may be destroyed).
pub fn defined_domains(virsh: &Path, uri: Option<&str>) -> Result<HashSet<Uuid>, CliError> {
    let mut c = std::process::Command::new(virsh);
    if let Some(u) = uri {
        c.arg("-c").arg(u);
    }
    let out = c
        .args(["-q", "list", "--all", "--uuid"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| CliError::caused(FAILURE, format!("running {}", virsh.display()), e).fix("install libvirt-clients"))?;
    if !out.status.success() {
        return Err(CliError::new(
            FAILURE,
            format!("`virsh list --all --uuid` failed ({}): {}; nothing was removed", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| Uuid::parse_str(l).map_err(|e| CliError::caused(FAILURE, format!("virsh listed {l:?}, not a UUID"), e).fix("nothing was removed")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn libvirt_90_command_lines_parse() {
        let s = parse_setup(&v(&[
            "--tpm2", "--tpm-state", "/var/lib/libvirt/swtpm/6f1d8c1e-1111-4a2b-9c3d-0123456789ab/tpm2", "--vmid",
            "web:1:6f1d8c1e-1111-4a2b-9c3d-0123456789ab", "--logfile", "/var/log/swtpm/libvirt/qemu/web-swtpm.log", "--createek",
            "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite",
        ]))
        .unwrap();
        assert!(s.tpm2);
        assert_eq!(s.vmid, Some(("web:1".into(), "6f1d8c1e-1111-4a2b-9c3d-0123456789ab".parse().unwrap())));
        assert_eq!(s.overwrite, Some(false));
        let s = parse_socket(&v(&[
            "socket", "--ctrl", "type=unixio,path=/run/libvirt/qemu/swtpm/1-web-swtpm.sock,mode=0600", "--tpmstate",
            "dir=/var/lib/libvirt/swtpm/u/tpm2,mode=0600", "--log", "file=/var/log/swtpm/libvirt/qemu/web-swtpm.log", "--terminate", "--tpm2",
        ]))
        .unwrap();
        assert_eq!(s.ctrl.as_deref(), Some(Path::new("/run/libvirt/qemu/swtpm/1-web-swtpm.sock")));
        assert_eq!(s.tpm_state.as_deref(), Some(Path::new("/var/lib/libvirt/swtpm/u/tpm2")));
        assert_eq!(parse_ioctl(&v(&["--unix", "/s", "-s"])).unwrap(), Ok(PathBuf::from("/s")));
        assert_eq!(parse_socket(&v(&["socket", "--tpm2", "--print-capabilities"])).unwrap().info, Some("capabilities"));
        assert_eq!(parse_setup(&v(&["--create-config-files", "skip-if-exist"])).unwrap().info, Some("config-files"));
    }

    #[test]
    fn security_relevant_and_unknown_options_are_refused() {
        for (args, code) in [
            (v(&["socket", "--tpm2", "--key", "pwdfd=3,mode=aes-256-cbc"]), REFUSED),
            (v(&["socket", "--tpm2", "--migration-key", "pwdfd=4,mode=aes-256-cbc"]), REFUSED),
            (v(&["socket", "--tpm2", "--migration", "release-lock-outgoing"]), REFUSED),
            (v(&["socket", "--tpm2", "--ctrl", "type=unixio,path=/s,mode=0666"]), USAGE),
            (v(&["socket", "--tpm2", "--daemon"]), USAGE),
            (v(&["socket", "--tpm2", "--flags", "startup-clear"]), USAGE),
            (v(&["chardev", "--tpm2"]), USAGE),
        ] {
            assert_eq!(parse_socket(&args).unwrap_err().code, code, "{args:?}");
        }
        for (args, code) in [
            (v(&["--tpm2", "--pwdfile-fd", "3", "--cipher", "aes-256-cbc"]), REFUSED),
            (v(&["--tpm2", "--pcr-banks", "sha256", "--reconfigure"]), REFUSED),
            (v(&["--tpm2", "--take-ownership"]), USAGE),
            (v(&["--tpm2", "--vmid", "no-uuid"]), USAGE),
        ] {
            assert_eq!(parse_setup(&args).unwrap_err().code, code, "{args:?}");
        }
        assert_eq!(parse_ioctl(&v(&["--unix", "/s", "-i"])).unwrap_err().code, USAGE);
    }

    #[test]
    fn capabilities_announce_no_encryption() {
        for t in [Tool::Swtpm, Tool::Setup] {
            let c = capabilities(t);
            let f: Vec<&str> = c["features"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
            assert!(f.contains(&"tpm-2.0"));
            assert!(!f.iter().any(|x| x.contains("pwd")), "{f:?}");
        }
    }
}
