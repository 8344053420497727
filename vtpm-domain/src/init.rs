//! PID 1 duties, for a vTPM that is the only program of its own Xen domain.
//!
//! The vTPM domain is unikernel-style: a Linux kernel and an initramfs whose `/init` is this
//! binary, nothing else. When it finds itself running as PID 1 it does what an init system
//! would, and no more:
//!
//! 1. mounts `/proc`, `/sys` and devtmpfs on `/dev`, and opens `/dev/console` as stdio if
//!    the kernel could not (an image built without device nodes);
//! 2. loads the kernel modules named in [`LOAD_ORDER`] (one file name per line, relative to
//!    `/lib/modules`, in dependency order; the image builder writes it) with `finit_module`;
//! 3. makes the domain's shutdown requests reach it: `xl shutdown` makes the kernel run
//!    `/proc/sys/kernel/poweroff_cmd`, which is set to this binary with [`POWEROFF_ARG`] (it
//!    sends SIGTERM to PID 1), and `xl reboot` (ctrl-alt-del) becomes SIGINT;
//! 4. waits (bounded) for the Xen devices and the state disk, which appear asynchronously
//!    after their modules load;
//! 5. after the vTPM stops, for whatever reason, syncs and powers the domain off — PID 1 must
//!    never exit, or the kernel panics.
//!
//! Progress goes to the console as `VTPMDOM-…` lines (the toolstack's console log), readiness
//! to xenstore (`data/xvtpm/ready` = the vTPM's UUID, `data/xvtpm/exit` = the exit code), in
//! the domain's own `data/` directory, which the toolstack can read.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};

/// The module list the image builder writes.
pub const LOAD_ORDER: &str = "/lib/modules/load-order";
/// The argument that turns this binary into the poweroff helper.
pub const POWEROFF_ARG: &str = "--xvtpm-poweroff";
/// Devices the vTPM needs in a domain (xenstore, event channels, grant mapping, grant sharing).
pub const XEN_DEVICES: [&str; 4] = ["/dev/xen/xenbus", "/dev/xen/evtchn", "/dev/xen/gntdev", "/dev/xen/gntalloc"];
/// How long devices may take to appear.
pub const DEVICE_WAIT: Duration = Duration::from_secs(30);
/// Where readiness is published, relative to the domain's xenstore home.
pub const XS_READY: &str = "data/xvtpm/ready";
/// Where the exit code is published.
pub const XS_EXIT: &str = "data/xvtpm/exit";
/// Published with readiness: `1` when the TPM started from a suspend's saved volatile state (it
/// runs as it was, PCRs included), `0` when it was powered on anew.
pub const XS_RESUMED: &str = "data/xvtpm/resumed";
/// Written by the toolstack (dom0) before it shuts the domain down: `1` makes that shutdown a
/// suspend — the running TPM's volatile state is saved with its permanent state for the next
/// start (a guest moving to another host keeps its PCRs). A domain has no signal dom0 can send
/// its init but the poweroff request, so the request's meaning is read from here.
pub const XS_SUSPEND: &str = "data/xvtpm/suspend";

/// Whether this process is the domain's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// The poweroff helper: the kernel runs `/init --xvtpm-poweroff` on a Xen poweroff request.
/// It asks PID 1 to stop, but only if PID 1 is this very program (run by hand on a host whose
/// init is something else, it does nothing).
pub fn poweroff_helper() -> i32 {
    let same = |a: &str, b: &str| match (std::fs::read_link(a), std::fs::read_link(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if !same("/proc/1/exe", "/proc/self/exe") {
        eprintln!("vtpm-domain: {POWEROFF_ARG}: PID 1 is not vtpm-domain; nothing done");
        return 1;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), nix::sys::signal::Signal::SIGTERM) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vtpm-domain: {POWEROFF_ARG}: cannot signal PID 1: {e}");
            1
        }
    }
}

/// A step of the domain's init that failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Step {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The module list names a path, not a file beside it.
    #[error("{}: {name:?}: a module file name, not a path", list.display())]
    ModulePath {
        /// The module list.
        list: PathBuf,
        /// The entry.
        name: String,
    },
}

/// `what` failed because of `e`.
fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Step { what, source }
}

/// Mounts, loads modules, routes shutdown requests. Returns the loaded modules' names.
pub fn setup() -> Result<Vec<String>, InitError> {
    for (src, target, fstype) in [("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("devtmpfs", "/dev", "devtmpfs")] {
        std::fs::create_dir_all(target).map_err(step(format!("creating {target}")))?;
        match mount(Some(src), target, Some(fstype), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, None::<&str>) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(step(format!("mounting {fstype} on {target}"))(e.into())),
        }
    }
    attach_console();
    let loaded = load_modules(Path::new(LOAD_ORDER))?;
    // xl shutdown -> kernel runs poweroff_cmd; xl reboot -> SIGINT (instead of an unsynced restart).
    let me = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("/init"));
    let cmd = format!("{} {POWEROFF_ARG}", me.display());
    std::fs::write("/proc/sys/kernel/poweroff_cmd", &cmd).map_err(step("setting poweroff_cmd"))?;
    nix::sys::reboot::set_cad_enabled(false).map_err(|e| step("disabling ctrl-alt-del")(e.into()))?;
    Ok(loaded)
}

/// Gives us stdin/stdout/stderr on `/dev/console` if the kernel could not (an initramfs
/// without a `/dev/console` node: the kernel opens it before devtmpfs is mounted).
fn attach_console() {
    use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
    if fcntl(1, FcntlArg::F_GETFD).is_ok() {
        return;
    }
    if let Ok(fd) = open("/dev/console", OFlag::O_RDWR | OFlag::O_NOCTTY, nix::sys::stat::Mode::empty()) {
        for target in 0..=2 {
            if fd != target {
                let _ = nix::unistd::dup2(fd, target);
            }
        }
        if fd > 2 {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Loads each module of the list in order. A missing list means no modules.
pub fn load_modules(list: &Path) -> Result<Vec<String>, InitError> {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(step(format!("reading {}", list.display()))(e)),
    };
    let dir = list.parent().unwrap_or(Path::new("/"));
    let mut loaded = vec![];
    for name in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if name.contains('/') || name.starts_with('.') {
            return Err(InitError::ModulePath { list: list.to_path_buf(), name: name.to_string() });
        }
        let path = dir.join(name);
        let file = File::open(&path).map_err(step(format!("opening {}", path.display())))?;
        let params = CString::default();
        match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => loaded.push(name.trim_end_matches(".ko").to_string()),
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(step(format!("loading {}", path.display()))(e.into())),
        }
    }
    Ok(loaded)
}

/// Waits until every path exists, up to `limit`. Names the missing ones on timeout.
pub fn wait_for(paths: &[&Path], limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let missing: Vec<_> = paths.iter().filter(|p| !p.exists()).collect();
        if missing.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            let names: Vec<_> = missing.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "{} did not appear within {} s (is the module in {LOAD_ORDER} and the disk in the domain's config?)",
                names.join(", "),
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `key=value` pairs for the console's memory line: the domain's total and available memory
/// and this process's resident set, in KiB, and the kernel's uptime in ms (for the domain's
/// init, the time from its kernel's start to now: boot-to-ready when printed at readiness).
pub fn memory_report() -> String {
    let field = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let show = |v: Option<u64>| v.map_or("?".to_string(), |n| n.to_string());
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse::<f64>().ok()))
        .map(|s| (s * 1000.0).round() as u64);
    format!(
        "mem_total_kib={} mem_available_kib={} rss_kib={} uptime_ms={}",
        show(field(&meminfo, "MemTotal:")),
        show(field(&meminfo, "MemAvailable:")),
        show(field(&status, "VmRSS:")),
        show(uptime_ms)
    )
}

/// Publishes `value` at `path` (relative to the domain's xenstore home), best effort: the
/// toolstack also sees the console and the domain's state.
pub async fn publish(path: &str, value: &str) {
    match xen_platform::xenstore::XsClient::open().await {
        Ok((xs, _events)) => {
            use xen_platform::xenstore::Xenstore;
            if let Err(e) = xs.write(path, value).await {
                xvtpm_log::host_warn!(path, error = %e, "cannot publish to xenstore");
            }
        }
        Err(e) => xvtpm_log::host_warn!(path, error = %e, "cannot publish to xenstore"),
    }
}

/// Reads `path` (relative to the domain's xenstore home); `None` if it is absent or xenstore
/// cannot be reached.
pub async fn read(path: &str) -> Option<String> {
    use xen_platform::xenstore::Xenstore;
    let (xs, _events) = xen_platform::xenstore::XsClient::open().await.ok()?;
    xs.read(path).await.ok().flatten()
}

/// Ends the domain: flushes the disks and powers off. Never returns.
pub fn power_off(code: i32) -> ! {
    println!("VTPMDOM-EXIT code={code} powering off");
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF).unwrap_err();
    // Only reachable without CAP_SYS_BOOT; PID 1 must not exit (kernel panic), so wait.
    eprintln!("vtpm-domain: power off failed: {err}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_list_refuses_paths_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_modules(&dir.path().join("load-order")).unwrap(), Vec::<String>::new());
        for bad in ["../evil.ko", "/lib/x.ko", "sub/x.ko", ".hidden.ko"] {
            std::fs::write(dir.path().join("load-order"), format!("{bad}\n")).unwrap();
            let e = load_modules(&dir.path().join("load-order")).unwrap_err().to_string();
            assert!(e.contains("not a path"), "{bad}: {e}");
        }
        std::fs::write(dir.path().join("load-order"), "# comment\n\nmissing.ko\n").unwrap();
        let e = load_modules(&dir.path().join("load-order")).unwrap_err();
        assert!(matches!(&e, InitError::Step { source, .. } if source.kind() == io::ErrorKind::NotFound), "the cause is kept: {e:?}");
        assert!(e.to_string().contains("missing.ko"), "{e}");
    }

    #[test]
    fn waiting_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path().join("here");
        std::fs::write(&here, b"").unwrap();
        assert!(wait_for(&[&here], Duration::from_millis(10)).is_ok());
        let gone = dir.path().join("gone");
        let e = wait_for(&[&here, &gone], Duration::from_millis(50)).unwrap_err();
        assert!(e.contains("gone") && !e.contains("here,"), "{e}");
    }

    #[test]
    fn memory_report_has_numbers() {
        let r = memory_report();
        assert!(r.starts_with("mem_total_kib="), "{r}");
        assert!(!r.contains('?'), "{r}");
    }

    #[test]
    fn poweroff_helper_does_nothing_when_pid1_is_another_program() {
        // In a test, PID 1 is the container's or host's init, never this test binary.
        assert_eq!(poweroff_helper(), 1);
    }
}
