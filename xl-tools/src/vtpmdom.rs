//! Domain mode: a vTPM as the only program of its own Xen domain.
//!
//! The vTPM domain is a PV domain whose kernel boots an initramfs with `vtpm-domain` as
//! `/init` (see `vtpm_domain::init`). Its sealed state lives on its own disk (`/dev/xvda`,
//! A/B slots, no filesystem), its manager link is a tpmif device whose backend is vtpmmgr in
//! dom0, and it serves its guest on its own `backend/vtpm` (the guest's config says
//! `vtpm = [ "backend=<vTPM domain>,uuid=<vTPM>" ]`).
//!
//! Booting one, in this order (each step undone if a later one fails):
//!
//! 1. the disk: a block device given by the admin (`--disk`, e.g. an LVM volume), or a 4 MiB
//!    image `<state-dir>/vtpms/<uuid>/disk.img` put on a loop device with `losetup` (libxl's
//!    phy backend and Xen's `block` hotplug script take block devices);
//! 2. `xl create -p` of a generated config (`<run-dir>/vtpms/<uuid>.xl.cfg`);
//! 3. the manager learns the domain: `VtpmAttachDomain` (it takes the tpmif device only from
//!    an attached domain, and it reads the caller's identity from its own backend directory);
//! 4. `xl vtpm-attach <domid> backend=<manager> uuid=<uuid>` — only now, because libxl waits
//!    just 10 s for the backend (the manager) to reach InitWait, and the manager refuses devices
//!    of unattached domains. `<manager>` is 0, or the manager domain its status names
//!    (`xen_domain`, docs/manager-domain.md);
//! 5. `xl unpause`, then wait until the domain publishes `data/xvtpm/ready` = its UUID.
//!
//! The domain's description (kernel, ramdisk, memory, disk) is kept in
//! `<state-dir>/vtpms/<uuid>/domain.json`, so `start` boots the same vTPM again from its disk;
//! the running domain's record is `<run-dir>/vtpms/<uuid>.domain.json`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, VtpmInfo};

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, NOT_FOUND, REFUSED, USAGE};
use crate::local::{DomainRuntime, Local};

/// Size of a new disk image: two 1 MiB slots and room to spare.
pub const DISK_IMAGE_SIZE: u64 = 4 << 20;
/// Memory of a vTPM domain (MiB) when neither `--memory`, `XVTPM_VTPMDOM_MEMORY` nor a
/// [`MEMORY_FILE`] beside the ramdisk says otherwise: what a distribution kernel (Debian's
/// 6.1, with its modules) needs.
pub const DEFAULT_MEMORY_MIB: u32 = 128;
/// The file beside a vTPM domain's ramdisk that says how much memory that image and its kernel
/// need, in MiB (`scripts/build-vtpmdom.sh` writes it: 32 with the project's own kernel,
/// `ci/testbed/build-vtpmdom-kernel.sh`; 128 with a distribution kernel).
pub const MEMORY_FILE: &str = "memory-mib";
/// Bounds of a vTPM domain's memory (MiB): below 8 no kernel boots; a vTPM needs nothing near
/// the upper one.
pub const MEMORY_RANGE: std::ops::RangeInclusive<u32> = 8..=4096;

/// Parses a memory size in MiB from `what` (named in the error).
fn parse_memory(text: &str, what: &str) -> Result<u32, CliError> {
    let t = text.trim();
    match t.parse::<u32>() {
        Ok(m) if MEMORY_RANGE.contains(&m) => Ok(m),
        _ => Err(fail(
            USAGE,
            format!(
                "{what}: {t:?} is not a vTPM domain's memory in MiB ({}..={}); fix or remove it",
                MEMORY_RANGE.start(),
                MEMORY_RANGE.end()
            ),
        )),
    }
}

/// The memory of a new vTPM domain booting `ramdisk`, when `--memory` was not given:
/// `XVTPM_VTPMDOM_MEMORY` (`env`), else the [`MEMORY_FILE`] beside the ramdisk, else
/// [`DEFAULT_MEMORY_MIB`].
pub fn default_memory_mib(env: Option<&str>, ramdisk: &Path) -> Result<u32, CliError> {
    if let Some(v) = env {
        return parse_memory(v, "XVTPM_VTPMDOM_MEMORY");
    }
    let file = ramdisk.with_file_name(MEMORY_FILE);
    match fs::read_to_string(&file) {
        Ok(t) => parse_memory(&t, &file.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DEFAULT_MEMORY_MIB),
        Err(e) => Err(fail(FAILURE, format!("reading {}: {e}", file.display()))),
    }
}
/// How long a vTPM domain may take from unpause to ready.
pub const DEFAULT_READY_WAIT: Duration = Duration::from_secs(120);
/// How long `stop` waits for a clean shutdown before `xl destroy`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Where a vTPM domain keeps its state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Disk {
    /// An image file, put on a loop device at each boot.
    Image(PathBuf),
    /// A block device given by the admin.
    Device(PathBuf),
}

/// What a vTPM domain is made of (persistent, `domain.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainSpec {
    /// Xen domain name.
    pub name: String,
    /// PV kernel.
    pub kernel: PathBuf,
    /// Initramfs whose /init is vtpm-domain.
    pub ramdisk: PathBuf,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The state disk.
    pub disk: Disk,
    /// Extra vtpm-domain arguments used at manufacture (`--ek ecc`, `--tpm12`).
    pub create_args: Vec<String>,
}

impl DomainSpec {
    /// A description whose kernel and ramdisk are kept as absolute paths (as given if they do
    /// not resolve).
    pub fn new(name: &str, kernel: &Path, ramdisk: &Path, memory_mib: u32, disk: Disk, create_args: Vec<String>) -> DomainSpec {
        let canonical = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        DomainSpec { name: name.to_string(), kernel: canonical(kernel), ramdisk: canonical(ramdisk), memory_mib, disk, create_args }
    }
}

/// Options of `vtpm create --domain`.
#[derive(Debug, Clone)]
pub struct DomainOpts {
    /// Domain name.
    pub name: String,
    /// PV kernel.
    pub kernel: PathBuf,
    /// Ramdisk.
    pub ramdisk: PathBuf,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// A block device for the state (else an image file on a loop device).
    pub disk: Option<PathBuf>,
    /// How long to wait for the domain to be ready.
    pub ready_wait: Duration,
}

/// Domain-mode operations.
pub struct Domains<'a> {
    /// Paths shared with local mode.
    pub local: &'a Local,
    /// The `xl` binary.
    pub xl: PathBuf,
    /// The `losetup` binary.
    pub losetup: PathBuf,
}

fn fail(code: i32, m: impl Into<String>) -> CliError {
    CliError::new(code, m)
}

/// A name xl would not take as a Xen domain name; the caller names where it was given.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a domain name: use letters, digits, '-', '_' or '.' (not all digits, at most 64)")]
pub struct BadDomainName(pub String);

/// Checks a Xen domain name as xl would take it (and as it goes into a config file).
pub fn check_name(name: &str) -> Result<(), BadDomainName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.chars().all(|c| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(BadDomainName(name.to_string()))
    }
}

fn quote(p: &Path) -> Result<String, CliError> {
    let s = p.to_str().ok_or_else(|| fail(USAGE, format!("{}: the path must be UTF-8", p.display())))?;
    if s.contains(['"', '\n', ',', '\\']) {
        return Err(fail(USAGE, format!("{s:?}: the path must not contain '\"', ',', '\\' or a newline (it goes into an xl config)")));
    }
    Ok(s.to_string())
}

/// xen-blkfront's settings for the state disk, on the vTPM domain's kernel command line. With
/// persistent grants (dom0's blkback offers them) blkfront allocates a page for every grant it
/// may use up front: (32 indirect segments + 1) x 32 ring slots = 1056 pages, 4.1 MiB of a
/// domain that needs ~10 MiB for everything else, and during the boot's initramfs unpack (it
/// probes while the image is unpacked). The vTPM writes tens of KiB at a time: grants made per
/// request and no indirect descriptors (11 = the plain request's limit) cost it nothing
/// measurable. With blkfront as a module (the Debian kernel's image) they do nothing: the kernel
/// drops unused `module.param` words, and vtpm-domain loads its modules without parameters.
pub const BLKFRONT_ARGS: &str = "xen_blkfront.feature_persistent=0 xen_blkfront.max_indirect_segments=11";

/// The xl config of a vTPM domain boot.
pub fn render_config(uuid: &Uuid, spec: &DomainSpec, disk_device: &Path, create: bool) -> Result<String, CliError> {
    let mut argv = format!("--uuid {uuid} --state-block /dev/xvda --mgr-xen --listen xen");
    if create {
        argv.push_str(" --create");
        for a in &spec.create_args {
            argv.push(' ');
            argv.push_str(a);
        }
    }
    Ok(format!(
        "# Generated by xl-vtpm for vTPM {uuid}; regenerated at every start.\n\
         name = \"{name}\"\n\
         type = \"pv\"\n\
         kernel = \"{kernel}\"\n\
         ramdisk = \"{ramdisk}\"\n\
         extra = \"console=hvc0 quiet NO_COLOR=1 {BLKFRONT_ARGS} -- {argv}\"\n\
         memory = {mem}\n\
         vcpus = 1\n\
         on_poweroff = \"destroy\"\n\
         on_reboot = \"destroy\"\n\
         on_crash = \"destroy\"\n\
         disk = [ \"format=raw,vdev=xvda,access=rw,target={disk}\" ]\n",
        name = spec.name,
        kernel = quote(&spec.kernel)?,
        ramdisk = quote(&spec.ramdisk)?,
        mem = spec.memory_mib,
        disk = quote(disk_device)?,
    ))
}

/// The loop device currently backed by `image`, from sysfs.
pub fn loop_of(image: &Path) -> Option<PathBuf> {
    let want = fs::canonicalize(image).ok()?;
    for e in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str().filter(|n| n.starts_with("loop")) else { continue };
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim()) == want
        {
            return Some(PathBuf::from(format!("/dev/{n}")));
        }
    }
    None
}

impl Domains<'_> {
    fn spec_file(&self, uuid: &Uuid) -> PathBuf {
        self.local.vtpm_dir(uuid).join("domain.json")
    }
    fn runtime_file(&self, uuid: &Uuid) -> PathBuf {
        self.local.run_dir.join("vtpms").join(format!("{uuid}.domain.json"))
    }
    fn config_file(&self, uuid: &Uuid) -> PathBuf {
        self.local.run_dir.join("vtpms").join(format!("{uuid}.xl.cfg"))
    }

    /// Writes the description of a domain-mode vTPM (`domain.json`, 0600).
    fn write_spec(&self, uuid: &Uuid, spec: &DomainSpec) -> Result<(), CliError> {
        let bytes = serde_json::to_vec_pretty(spec).expect("serialisable");
        xvtpm_fsutil::write_atomic(&self.spec_file(uuid), &bytes, 0o600).map_err(|e| CliError::caused(FAILURE, format!("writing {}", self.spec_file(uuid).display()), e))
    }

    /// The description of a domain-mode vTPM (`None`: not domain mode).
    pub fn spec(&self, uuid: &Uuid) -> Result<Option<DomainSpec>, CliError> {
        match fs::read(self.spec_file(uuid)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CliError::caused(FAILURE, self.spec_file(uuid).display().to_string(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CliError::caused(FAILURE, self.spec_file(uuid).display().to_string(), e)),
        }
    }

    /// The running domain of a vTPM, if its record names a domain that still exists.
    pub fn runtime(&self, uuid: &Uuid) -> Option<DomainRuntime> {
        let rt: DomainRuntime = serde_json::from_slice(&fs::read(self.runtime_file(uuid)).ok()?).ok()?;
        (self.domid(&rt.name) == Some(rt.domid)).then_some(rt)
    }

    fn xl(&self, args: &[&str]) -> Result<String, CliError> {
        run_tool(&self.xl, args, "is this dom0 with the Xen tools installed?")
    }

    fn domid(&self, name: &str) -> Option<u32> {
        let out = Command::new(&self.xl).args(["domid", name]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Creates a vTPM identity and boots its domain, which manufactures the TPM on a fresh
    /// disk. On failure nothing is left: no domain, identity, disk or loop device.
    pub fn create(&self, admin: &mut Admin, group: Option<String>, uuid: Option<Uuid>, opts: &DomainOpts, create_args: Vec<String>) -> Result<DomainRuntime, CliError> {
        check_name(&opts.name).map_err(|e| CliError::caused(USAGE, "--domain", e))?;
        for (what, p) in [("--kernel", &opts.kernel), ("--ramdisk", &opts.ramdisk)] {
            if !p.is_file() {
                return Err(fail(USAGE, format!("{what} {}: no such file (the vTPM domain's {})", p.display(), &what[2..])));
            }
        }
        if let Some(d) = &opts.disk {
            use std::os::unix::fs::FileTypeExt;
            let ok = fs::metadata(d).map(|m| m.file_type().is_block_device()).unwrap_or(false);
            if !ok {
                return Err(fail(USAGE, format!("--disk {}: not a block device (leave --disk out to use an image file)", d.display())));
            }
        }
        if self.domid(&opts.name).is_some() {
            return Err(fail(REFUSED, format!("a domain named {:?} exists already; choose another --domain name", opts.name)));
        }
        let info = match admin.call(&AdminRequest::VtpmCreate { group, uuid })? {
            AdminReply::Vtpm(v) => v,
            other => return Err(fail(FAILURE, format!("unexpected reply {other:?}"))),
        };
        let result = self.create_inner(admin, &info, opts, create_args);
        if result.is_err() {
            let _ = admin.call(&AdminRequest::VtpmDetach { uuid: info.uuid });
            let _ = admin.call(&AdminRequest::VtpmDel { uuid: info.uuid });
            let _ = fs::remove_dir_all(self.local.vtpm_dir(&info.uuid));
        }
        result
    }

    fn create_inner(&self, admin: &mut Admin, info: &VtpmInfo, opts: &DomainOpts, create_args: Vec<String>) -> Result<DomainRuntime, CliError> {
        let uuid = info.uuid;
        let dir = self.local.vtpm_dir(&uuid);
        fs::create_dir_all(&dir).map_err(|e| CliError::caused(FAILURE, format!("creating {}", dir.display()), e))?;
        let disk = match &opts.disk {
            Some(d) => Disk::Device(d.clone()),
            None => {
                use std::os::unix::fs::OpenOptionsExt;
                let img = dir.join("disk.img");
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&img)
                    .map_err(|e| CliError::caused(FAILURE, format!("creating {}", img.display()), e))?;
                f.set_len(DISK_IMAGE_SIZE).and_then(|()| f.sync_all()).map_err(|e| CliError::caused(FAILURE, format!("sizing {}", img.display()), e))?;
                Disk::Image(img)
            }
        };
        let spec = DomainSpec::new(&opts.name, &opts.kernel, &opts.ramdisk, opts.memory_mib, disk, create_args);
        self.write_spec(&uuid, &spec)?;
        self.boot(admin, uuid, &spec, true, opts.ready_wait)
    }

    /// Boots the domain of an existing, stopped vTPM from its disk.
    pub fn start(&self, admin: &mut Admin, uuid: &Uuid, ready_wait: Duration) -> Result<DomainRuntime, CliError> {
        let spec = self.spec(uuid)?.ok_or_else(|| fail(NOT_FOUND, format!("vTPM {uuid} has no domain (not created with --domain)")))?;
        if let Some(rt) = self.runtime(uuid) {
            return Err(fail(REFUSED, format!("vTPM {uuid} is already running as domain {} ({})", rt.name, rt.domid)));
        }
        if self.domid(&spec.name).is_some() {
            return Err(fail(REFUSED, format!("a domain named {:?} exists but is not this vTPM's; remove it first", spec.name)));
        }
        self.boot(admin, *uuid, &spec, false, ready_wait)
    }

    fn boot(&self, admin: &mut Admin, uuid: Uuid, spec: &DomainSpec, create: bool, ready_wait: Duration) -> Result<DomainRuntime, CliError> {
        fs::create_dir_all(self.local.run_dir.join("vtpms")).map_err(|e| CliError::caused(FAILURE, "creating the run dir", e))?;
        let mut undo = Undo::default();
        let result = self.boot_steps(admin, uuid, spec, create, ready_wait, &mut undo);
        if result.is_err() {
            if let Some(domid) = undo.domid {
                let _ = self.xl(&["destroy", &domid.to_string()]);
            }
            if undo.attached {
                let _ = admin.call(&AdminRequest::VtpmDetach { uuid });
            }
            if let Some(l) = &undo.loop_device {
                let _ = self.detach_loop(l);
            }
            let _ = fs::remove_file(self.runtime_file(&uuid));
        }
        result
    }

    fn boot_steps(&self, admin: &mut Admin, uuid: Uuid, spec: &DomainSpec, create: bool, ready_wait: Duration, undo: &mut Undo) -> Result<DomainRuntime, CliError> {
        let (disk_device, loop_device) = match &spec.disk {
            Disk::Device(d) => (d.clone(), None),
            Disk::Image(img) => {
                let l = match loop_of(img) {
                    Some(l) => l, // left over from a crash: reuse it
                    None => {
                        let l = self.attach_loop(img)?;
                        undo.loop_device = Some(l.clone());
                        l
                    }
                };
                (l.clone(), Some(l))
            }
        };
        let cfg = self.config_file(&uuid);
        let text = render_config(&uuid, spec, &disk_device, create)?;
        xvtpm_fsutil::write_atomic(&cfg, text.as_bytes(), 0o600).map_err(|e| CliError::caused(FAILURE, format!("writing {}", cfg.display()), e))?;
        let cfg_s = quote(&cfg)?;
        self.xl(&["create", "-p", &cfg_s])?;
        let domid = self.domid(&spec.name).ok_or_else(|| fail(FAILURE, format!("xl create -p {cfg_s} succeeded but domain {} has no domid", spec.name)))?;
        undo.domid = Some(domid);
        // The vTPM runs nowhere (checked by the callers): an attachment the manager still
        // holds is stale (a domain that crashed or was destroyed behind our back).
        admin.call(&AdminRequest::VtpmDetach { uuid })?;
        admin.call(&AdminRequest::VtpmAttachDomain { uuid, domid })?;
        undo.attached = true;
        // The manager link's backend is the manager: dom0's process, or its own domain.
        let (manager, serves) = manager_link(admin)?;
        self.xl(&["vtpm-attach", &domid.to_string(), &format!("backend={manager}"), &format!("uuid={uuid}")]).map_err(|e| {
            if serves { e } else { e.fix("the manager serves no vTPM domains (its Xen link is off): run it with `vtpmmgr serve --xen`") }
        })?;
        self.xl(&["unpause", &domid.to_string()])?;
        let resumed = wait_ready(domid, &uuid, ready_wait).map_err(|m| {
            let console = format!("/var/log/xen/console/guest-{}.log", spec.name);
            let tail = crate::local::tail(Path::new(&console), 15);
            let hint = if tail.is_empty() { format!("see `xl console {}`", spec.name) } else { format!("last lines of {console}:\n{tail}") };
            CliError::caused(FAILURE, format!("vTPM domain {} (domid {domid}) did not become ready", spec.name), m).fix(hint)
        })?;
        let rt = DomainRuntime { uuid, name: spec.name.clone(), domid, disk_device, loop_device, config: cfg, resumed };
        let bytes = serde_json::to_vec_pretty(&rt).expect("serialisable");
        xvtpm_fsutil::write_atomic(&self.runtime_file(&uuid), &bytes, 0o600)
            .map_err(|e| CliError::caused(FAILURE, "writing the runtime record", e))?;
        Ok(rt)
    }

    fn attach_loop(&self, img: &Path) -> Result<PathBuf, CliError> {
        let hint = "install util-linux (losetup) and load the loop module, or give --disk";
        for _ in 0..5 {
            let free = run_tool(&self.losetup, &["-f"], hint)?;
            let dev = free.trim().to_string();
            if !dev.starts_with("/dev/") {
                return Err(fail(FAILURE, format!("losetup -f printed {dev:?}, not a device")));
            }
            // `losetup DEV FILE` works with util-linux and busybox alike.
            if run_tool(&self.losetup, &[&dev, &quote(img)?], hint).is_ok() {
                return Ok(PathBuf::from(dev));
            }
            if let Some(l) = loop_of(img) {
                return Ok(l);
            }
            std::thread::sleep(Duration::from_millis(50)); // raced another attach: next free one
        }
        Err(fail(FAILURE, format!("could not put {} on a loop device ({hint})", img.display())))
    }

    fn detach_loop(&self, dev: &Path) -> Result<(), CliError> {
        run_tool(&self.losetup, &["-d", &quote(dev)?], "").map(drop)
    }

    /// A stopped vTPM domain leaving for another host: copies the newest whole record of its
    /// disk into the vTPM's state file (`<state-dir>/vtpms/<uuid>/state.xvts`, 0600), from which
    /// the export reads as for a dom0-process vTPM. The manager opens it and checks it is the
    /// state it anchored before anything leaves. Refused while the domain runs (it may still
    /// write a slot).
    pub fn export_state(&self, uuid: &Uuid) -> Result<PathBuf, CliError> {
        let spec = self.spec(uuid)?.ok_or_else(|| fail(NOT_FOUND, format!("vTPM {uuid} has no domain")))?;
        if let Some(rt) = self.runtime(uuid) {
            return Err(fail(REFUSED, format!("vTPM {uuid} runs as domain {} ({}): stop it first", rt.name, rt.domid)));
        }
        let disk = match &spec.disk {
            Disk::Image(p) | Disk::Device(p) => p,
        };
        let f = fs::File::open(disk).map_err(|e| CliError::caused(FAILURE, format!("vTPM {uuid}'s disk {}", disk.display()), e))?;
        let records = vtpm_proto::slots::records(&f).map_err(|e| CliError::caused(FAILURE, format!("reading vTPM {uuid}'s disk {}", disk.display()), e))?;
        let (_, blob) = records.into_iter().next().ok_or_else(|| {
            fail(FAILURE, format!("vTPM {uuid}'s disk {} holds no whole state record (both slots empty or damaged); nothing moved", disk.display()))
        })?;
        let path = self.local.state_file(uuid);
        xvtpm_fsutil::write_atomic(&path, &blob, 0o600).map_err(|e| CliError::caused(FAILURE, format!("writing {}", path.display()), e))?;
        Ok(path)
    }

    /// A vTPM whose identity arrived from another host becomes a vTPM domain here: a new disk
    /// image whose slot A holds the imported state (its generation as sealed), and its
    /// description (`name`, this host's kernel and ramdisk, `memory_mib`). The imported state file
    /// is removed once both are durable, so the state lives in one place. Done already (a
    /// `--finish`): nothing is rewritten.
    pub fn adopt_imported(&self, uuid: &Uuid, name: &str, kernel: &Path, ramdisk: &Path, memory_mib: u32) -> Result<(), CliError> {
        check_name(name).map_err(|e| CliError::caused(USAGE, "the vTPM domain's name", e))?;
        let state_file = self.local.state_file(uuid);
        if self.spec(uuid)?.is_some() {
            let _ = fs::remove_file(&state_file);
            return Ok(());
        }
        let blob = crate::guest::read_capped(&state_file, vtpm_proto::slots::MAX_SEALED as u64, "the imported state file")?;
        let (_, of, generation) = vtpm_proto::sealed::peek(&blob).map_err(|e| CliError::caused(FAILURE, format!("{}: not a sealed vTPM state", state_file.display()), e))?;
        if of != *uuid {
            return Err(fail(FAILURE, format!("{} is vTPM {of}'s state, not {uuid}'s", state_file.display())));
        }
        // The whole image, slot A holding the state and the rest zero, written as any file is.
        let img = self.local.vtpm_dir(uuid).join("disk.img");
        let mut image = vec![0u8; DISK_IMAGE_SIZE as usize];
        let record = vtpm_proto::slots::encode_record(generation, &blob);
        image[..record.len()].copy_from_slice(&record);
        xvtpm_fsutil::remove_stale_temps(&img);
        xvtpm_fsutil::write_atomic(&img, &image, 0o600).map_err(|e| CliError::caused(FAILURE, format!("writing vTPM {uuid}'s new disk {}", img.display()), e))?;
        self.write_spec(uuid, &DomainSpec::new(name, kernel, ramdisk, memory_mib, Disk::Image(img), Vec::new()))?;
        let _ = fs::remove_file(&state_file);
        Ok(())
    }

    /// After the identity of a stopped vTPM domain was committed to another host: its
    /// description and disk image here go (the state on them is retired: the manager no longer
    /// releases its key). A block device given with `--disk` is left as it is, for its admin.
    pub fn forget_moved(&self, uuid: &Uuid) -> Result<(), CliError> {
        if let Some(spec) = self.spec(uuid)? {
            if let Disk::Image(img) = &spec.disk
                && let Err(e) = fs::remove_file(img)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(CliError::caused(FAILURE, format!("removing {}", img.display()), e));
            }
            fs::remove_file(self.spec_file(uuid)).map_err(|e| CliError::caused(FAILURE, format!("removing {}", self.spec_file(uuid).display()), e))?;
        }
        let _ = fs::remove_file(self.local.state_file(uuid));
        Ok(())
    }

    /// A vTPM domain leaving with its guest for another host: its shutdown is a suspend (dom0
    /// writes `data/xvtpm/suspend` = 1 into its xenstore home first, which it reads when the
    /// poweroff request reaches it), so the running TPM's volatile state is saved on its disk
    /// for the next start; then as [`stop`](Self::stop). Returns whether the suspend was asked
    /// for (a domain that ends without saving it starts again powered on anew: its `resumed`
    /// says so).
    pub fn suspend(&self, admin: &mut Admin, uuid: &Uuid, grace: Duration) -> Result<bool, CliError> {
        let asked = match self.runtime(uuid) {
            Some(rt) => match crate::xs::xs_write(&format!("/local/domain/{}/data/xvtpm/suspend", rt.domid), "1") {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("xl-vtpm: warning: vTPM domain {} ({}): cannot ask for a suspend ({e}); it shuts down, its TPM restarts powered on anew", rt.name, rt.domid);
                    false
                }
            },
            None => false,
        };
        self.stop(admin, uuid, grace)?;
        Ok(asked)
    }

    /// Shuts a vTPM domain down (clean stop, `xl destroy` after `grace`), detaches its loop
    /// device and its manager attachment. Returns whether it was running.
    pub fn stop(&self, admin: &mut Admin, uuid: &Uuid, grace: Duration) -> Result<bool, CliError> {
        let spec = self.spec(uuid)?.ok_or_else(|| fail(NOT_FOUND, format!("vTPM {uuid} has no domain")))?;
        let rt = self.runtime(uuid);
        let was = rt.is_some();
        if let Some(rt) = &rt {
            let id = rt.domid.to_string();
            // `xl shutdown` itself waits up to a minute for a domain that does not acknowledge
            // (a hung vTPM domain): run it in the background and keep our own deadline.
            let mut asked = Command::new(&self.xl)
                .args(["shutdown", &id])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok();
            let deadline = Instant::now() + grace;
            while self.domid(&rt.name) == Some(rt.domid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(child) = asked.as_mut() {
                if matches!(child.try_wait(), Ok(None)) {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
            if self.domid(&rt.name) == Some(rt.domid) {
                self.xl(&["destroy", &id])?;
            }
        }
        // Whatever the record says, the image must not stay on a loop device.
        if let Disk::Image(img) = &spec.disk {
            let mut tries = 0;
            while let Some(l) = loop_of(img) {
                // blkback may hold the device for a moment after the domain is gone
                if self.detach_loop(&l).is_ok() || tries >= 50 {
                    break;
                }
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = fs::remove_file(self.runtime_file(uuid));
        let _ = fs::remove_file(self.config_file(uuid));
        admin.call(&AdminRequest::VtpmDetach { uuid: *uuid })?;
        Ok(was)
    }
}

#[derive(Default)]
struct Undo {
    loop_device: Option<PathBuf>,
    domid: Option<u32>,
    attached: bool,
}

/// The domain of the manager (0: dom0's process; its own domain, `xen_domain`,
/// docs/manager-domain.md) and whether it serves vTPM domains' manager links (`serve --xen`).
fn manager_link(admin: &mut Admin) -> Result<(u32, bool), CliError> {
    match admin.call(&AdminRequest::Status)? {
        AdminReply::Status(s) => Ok((s.xen_domain.unwrap_or(0), s.xen_link)),
        other => Err(fail(FAILURE, format!("the manager answered its status with {other:?}"))),
    }
}

/// The domain of the manager that serves vTPM domains' manager links; refused (exit 6) when it
/// does not serve them.
pub fn serving_manager(admin: &mut Admin) -> Result<u32, CliError> {
    match manager_link(admin)? {
        (d, true) => Ok(d),
        (_, false) => Err(fail(
            REFUSED,
            "the manager does not serve vTPM domains: its Xen link is off, so a vTPM domain's manager link would find no backend; run it with `vtpmmgr serve --xen`",
        )),
    }
}

fn run_tool(bin: &Path, args: &[&str], hint: &str) -> Result<String, CliError> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| CliError::caused(FAILURE, format!("cannot run {}", bin.display()), e).fix(hint))?;
    if !out.status.success() {
        return Err(fail(
            FAILURE,
            format!("{} {} failed: {}", bin.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until domain `domid` publishes `data/xvtpm/ready` = `uuid`; fails early if it
/// publishes an exit code or disappears. Returns whether its TPM started from a suspend's saved
/// state (`data/xvtpm/resumed`).
fn wait_ready(domid: u32, uuid: &Uuid, limit: Duration) -> Result<bool, crate::exit::Cause> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use xen_platform::xenstore::Xenstore;
        let (xs, mut events) = xen_platform::xenstore::XsClient::open().await?;
        let home = format!("/local/domain/{domid}");
        let ready = format!("{home}/data/xvtpm/ready");
        let exit = format!("{home}/data/xvtpm/exit");
        // Watches fire on creation; the poll below is the safety net.
        let _ = xs.watch(&ready).await;
        let _ = xs.watch(&exit).await;
        let _ = xs.watch("@releaseDomain").await;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(v)) = xs.read(&ready).await {
                let v = v.trim().to_string();
                if v != uuid.to_string() {
                    return Err(format!("it says it serves vTPM {v:?}, not {uuid}").into());
                }
                return Ok(xs.read(&format!("{home}/data/xvtpm/resumed")).await.ok().flatten().is_some_and(|r| r.trim() == "1"));
            }
            if let Ok(Some(code)) = xs.read(&exit).await {
                return Err(format!("vtpm-domain exited with code {}", code.trim()).into());
            }
            if xs.read(&format!("{home}/domid")).await.ok().flatten().is_none() {
                return Err("the domain is gone".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no data/xvtpm/ready within {} s", limit.as_secs()).into());
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), events.next()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_default_env_then_file_beside_the_ramdisk_then_128() {
        let dir = tempfile::tempdir().unwrap();
        let rd = dir.path().join("initrd");
        assert_eq!(default_memory_mib(None, &rd).unwrap(), DEFAULT_MEMORY_MIB, "no file: the distribution kernel's");
        fs::write(dir.path().join(MEMORY_FILE), "32\n").unwrap();
        assert_eq!(default_memory_mib(None, &rd).unwrap(), 32, "the image's own number");
        assert_eq!(default_memory_mib(Some("48"), &rd).unwrap(), 48, "the environment wins");
        for bad in ["", "x", "0", "7", "4097", "-1", "32 MiB"] {
            let e = default_memory_mib(Some(bad), &rd).unwrap_err();
            assert!(e.text().contains("XVTPM_VTPMDOM_MEMORY") && e.code == USAGE, "{bad:?}: {}", e.text());
        }
        fs::write(dir.path().join(MEMORY_FILE), "lots").unwrap();
        let e = default_memory_mib(None, &rd).unwrap_err();
        assert!(e.text().contains(MEMORY_FILE) && e.text().contains("lots"), "{}", e.text());
    }

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "vtpm-a".into(),
            kernel: "/boot/vmlinuz".into(),
            ramdisk: "/usr/lib/xvtpm/vtpmdom.cpio.zst".into(),
            memory_mib: 128,
            disk: Disk::Image("/var/lib/xvtpm/vtpms/x/disk.img".into()),
            create_args: vec!["--ek".into(), "ecc".into()],
        }
    }

    #[test]
    fn config_carries_the_vtpm_argv_and_disk() {
        let u = Uuid::parse_str("6d0b3b1e-8f57-4f5b-9d7a-4f2e7b7c1a01").unwrap();
        let first = render_config(&u, &spec(), Path::new("/dev/loop3"), true).unwrap();
        assert!(first.contains(&format!("-- --uuid {u} --state-block /dev/xvda --mgr-xen --listen xen --create --ek ecc\"")), "{first}");
        assert!(first.contains("target=/dev/loop3\" ]"), "{first}");
        assert!(first.contains("name = \"vtpm-a\"") && first.contains("memory = 128"), "{first}");
        // blkfront preallocates no grant pages (4.1 MiB with persistent grants)
        assert!(first.contains("quiet NO_COLOR=1 xen_blkfront.feature_persistent=0 xen_blkfront.max_indirect_segments=11 -- --uuid"), "{first}");
        let again = render_config(&u, &spec(), Path::new("/dev/loop3"), false).unwrap();
        assert!(!again.contains("--create") && !again.contains("--ek"), "{again}");
        // the rendered config is one xl.cfg our own parser accepts
        let parsed = crate::xlcfg::XlConfig::parse(&first).unwrap();
        assert!(parsed.get("disk").is_some() && parsed.get("extra").is_some());
    }

    #[test]
    fn hostile_paths_and_names_are_refused() {
        let u = Uuid::nil();
        let mut s = spec();
        s.kernel = "/boot/x\",extra=\"evil".into();
        let e = render_config(&u, &s, Path::new("/dev/loop0"), false).unwrap_err();
        assert_eq!(e.code, USAGE);
        let e = render_config(&u, &spec(), Path::new("/dev/loop0,access=ro"), false).unwrap_err();
        assert!(e.text().contains("must not contain"), "{}", e.text());
        for bad in ["", "123", "a b", "a\"b", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["vtpm-a", "vtpm_guest.1", "v1"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn spec_round_trips() {
        let s = spec();
        let back: DomainSpec = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// A sealed state of vTPM `id` at `generation` (the tools never open it; the manager does).
    fn sealed_state(id: Uuid, generation: u64, perm: &[u8]) -> Vec<u8> {
        let st = vtpm_proto::sealed::State {
            family: tpm_wire::Family::Tpm2,
            generation,
            permanent: zeroize::Zeroizing::new(perm.to_vec()),
            volatile: zeroize::Zeroizing::new(Vec::new()),
        };
        vtpm_proto::sealed::seal(&[7; 32], &id, &st, &[1; 12])
    }

    #[test]
    fn a_moving_vtpm_domain_s_newest_state_leaves_and_arrives_on_a_new_disk() {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let local = Local { state_dir: dir.path().join("a"), run_dir: dir.path().join("run-a"), vtpm_domain: "vtpm-domain".into(), sandbox: false };
        let d = Domains { local: &local, xl: "/nonexistent/xl".into(), losetup: "/nonexistent/losetup".into() };
        let id = Uuid::new_v4();
        fs::create_dir_all(local.vtpm_dir(&id)).unwrap();
        // The source's disk: generation 4 in slot A, 5 in slot B.
        let img = local.vtpm_dir(&id).join("disk.img");
        let f = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&img).unwrap();
        f.set_len(DISK_IMAGE_SIZE).unwrap();
        f.write_all_at(&vtpm_proto::slots::encode_record(4, &sealed_state(id, 4, b"four")), vtpm_proto::slots::OFFSETS[0]).unwrap();
        f.write_all_at(&vtpm_proto::slots::encode_record(5, &sealed_state(id, 5, b"five")), vtpm_proto::slots::OFFSETS[1]).unwrap();
        let mut s = spec();
        s.disk = Disk::Image(img.clone());
        fs::write(d.spec_file(&id), serde_json::to_vec(&s).unwrap()).unwrap();

        let out = d.export_state(&id).unwrap();
        assert_eq!(out, local.state_file(&id));
        assert_eq!(fs::read(&out).unwrap(), sealed_state(id, 5, b"five"), "the newest slot's blob, as it is");
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
        // Slot B torn: slot A's older state is what a whole record holds.
        f.write_all_at(&[0xee; 8], vtpm_proto::slots::OFFSETS[1] + 20).unwrap();
        assert_eq!(fs::read(d.export_state(&id).unwrap()).unwrap(), sealed_state(id, 4, b"four"));
        // Both damaged: refused, naming the disk.
        f.write_all_at(&[0xee; 8], vtpm_proto::slots::OFFSETS[0] + 20).unwrap();
        let e = d.export_state(&id).unwrap_err().text();
        assert!(e.contains("no whole state record") && e.contains("disk.img"), "{e}");

        // The destination: the imported state file becomes slot A of a new disk image.
        let local_b = Local { state_dir: dir.path().join("b"), run_dir: dir.path().join("run-b"), vtpm_domain: "vtpm-domain".into(), sandbox: false };
        let b = Domains { local: &local_b, xl: "/nonexistent/xl".into(), losetup: "/nonexistent/losetup".into() };
        fs::create_dir_all(local_b.vtpm_dir(&id)).unwrap();
        fs::write(local_b.state_file(&id), sealed_state(id, 5, b"five")).unwrap();
        let kernel = dir.path().join("vmlinuz");
        b.adopt_imported(&id, "vtpm-g", &kernel, &dir.path().join("initrd"), 32).unwrap();
        assert!(!local_b.state_file(&id).exists(), "the state lives on the disk only");
        let got = b.spec(&id).unwrap().unwrap();
        let Disk::Image(new_img) = &got.disk else { panic!("{got:?}") };
        assert_eq!((got.name.as_str(), got.memory_mib, got.create_args.len()), ("vtpm-g", 32, 0));
        assert_eq!(fs::metadata(new_img).unwrap().len(), DISK_IMAGE_SIZE);
        assert_eq!(fs::metadata(new_img).unwrap().permissions().mode() & 0o777, 0o600);
        let recs = vtpm_proto::slots::records(&fs::File::open(new_img).unwrap()).unwrap();
        assert_eq!(recs, vec![(5, sealed_state(id, 5, b"five"))], "generation as sealed, slot B empty");
        // Again (a `--finish`): nothing rewritten.
        b.adopt_imported(&id, "vtpm-g", &kernel, &dir.path().join("initrd"), 32).unwrap();
        // Another vTPM's state is refused.
        let other = Uuid::new_v4();
        fs::create_dir_all(local_b.vtpm_dir(&other)).unwrap();
        fs::write(local_b.state_file(&other), sealed_state(id, 5, b"five")).unwrap();
        let e = b.adopt_imported(&other, "vtpm-h", &kernel, &dir.path().join("initrd"), 32).unwrap_err().text();
        assert!(e.contains(&format!("is vTPM {id}'s state, not {other}'s")), "{e}");
        assert!(b.spec(&other).unwrap().is_none());

        // The source forgets what moved: its image and description.
        d.forget_moved(&id).unwrap();
        assert!(!img.exists() && d.spec(&id).unwrap().is_none() && !local.state_file(&id).exists());
    }
}
