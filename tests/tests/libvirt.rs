//! libvirt's `<tpm><backend type='emulator' version='2.0'/></tpm>`, unchanged, on xvtpm vTPMs:
//! a REAL `libvirtd` (Debian 12's 9.0) started by the test, finding `swtpm`, `swtpm_setup` and
//! `swtpm_ioctl` first in its `PATH` (links to `xvtpm-swtpm`), running a TCG guest (SeaBIOS, no
//! disk: the firmware itself starts the TPM and measures into PCRs 0-7) through define, start,
//! reset, save/restore, destroy and undefine, with the manager on a real swtpm as physical TPM.
//!
//! The libvirtd is the test's own: `unshare --mount` gives it private `/etc/libvirt`, `/run`,
//! `/var/lib/libvirt`, `/var/cache/libvirt` and `/var/log` (temporary directories), so a system
//! libvirtd, if any, is not touched and nothing needs to run beforehand. Its `qemu.conf` sets
//! what docs/libvirt.md tells an administrator to set (`swtpm_user = "root"`), plus what a
//! container without cgroup, AppArmor or virtlogd needs (no cgroup controllers, no security
//! driver, `stdio_handler = "file"`, no mount namespace for QEMU).
//!
//! The host side reads the vTPM's PCRs as root through its own control connection to the
//! socket libvirt gave QEMU (`CMD_SET_DATAFD` with a socket pair: a second data channel, which
//! QEMU's does not notice), kept open while QEMU runs (a controller's hang-up ends the vTPM).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;
use xvtpm_tests::{Stack, rc, read_response, wait_gone};

/// A private libvirtd in its own mount namespace.
struct Libvirtd {
    child: Child,
    dir: tempfile::TempDir,
    uri: String,
}

fn skip(why: &str) -> Option<Libvirtd> {
    let msg = format!(
        "SKIPPED: libvirtd cannot run here: {why}. Install Debian's libvirt-daemon-system, libvirt-daemon-driver-qemu and \
         libvirt-clients (scripts/install-deps.sh does); the test needs root and `unshare --mount`."
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg} (CI=true: a skip is a failure)");
    eprintln!("{msg}");
    None
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

impl Libvirtd {
    fn start(s: &Stack) -> Option<Libvirtd> {
        Libvirtd::start_with(s, &testkit::bin_path("vtpm-domain"))
    }

    /// With `vtpm_domain` as the vTPM binary the entry points run.
    fn start_with(s: &Stack, vtpm_domain: &Path) -> Option<Libvirtd> {
        for c in ["libvirtd", "virsh", "unshare", "qemu-system-x86_64"] {
            if !have(c) {
                return skip(&format!("{c} is not installed"));
            }
        }
        if !nix::unistd::geteuid().is_root() {
            return skip("not root");
        }
        let dir = testkit::tempdir();
        let d = dir.path();
        for sub in ["etc", "run", "lib", "cache", "log/libvirt", "bin"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // The entry points, under the names libvirt looks for in $PATH.
        for tool in ["swtpm", "swtpm_setup", "swtpm_ioctl"] {
            std::os::unix::fs::symlink(testkit::bin_path("xvtpm-swtpm"), d.join("bin").join(tool)).unwrap();
        }
        std::fs::write(
            d.join("etc/libvirtd.conf"),
            "unix_sock_group = \"root\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
             log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n",
        )
        .unwrap();
        std::fs::write(
            d.join("etc/qemu.conf"),
            "swtpm_user = \"root\"\nswtpm_group = \"root\"\n\
             cgroup_controllers = [ ]\nstdio_handler = \"file\"\nsecurity_driver = \"none\"\nnamespaces = [ ]\n",
        )
        .unwrap();
        let script = format!(
            "set -e\nD={d}\nmount --bind $D/etc /etc/libvirt\nmount --bind $D/run /run\nmount --bind $D/lib /var/lib/libvirt\n\
             mount --bind $D/cache /var/cache/libvirt\nmount --bind $D/log /var/log\nexec libvirtd\n",
            d = d.display()
        );
        let out = std::fs::File::create(d.join("libvirtd.out")).unwrap();
        let path = format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", d.join("bin").display());
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("PATH", path)
            .env("XVTPM_RUN_DIR", s.run_dir())
            .env("XVTPM_STATE_DIR", s.state_dir())
            .env("XVTPM_VTPM_DOMAIN", vtpm_domain)
            .env("XVTPM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn unshare");
        let uri = format!("qemu+unix:///system?socket={}", d.join("run/libvirt/libvirt-sock").display());
        let mut l = Libvirtd { child, dir, uri };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = l.child.try_wait().unwrap() {
                let why = format!("it exited ({st}): {}", std::fs::read_to_string(l.dir.path().join("libvirtd.out")).unwrap_or_default());
                return skip(&why);
            }
            if l.dir.path().join("run/libvirt/libvirt-sock").exists() && l.virsh(&["version"]).status.success() {
                return Some(l);
            }
            assert!(Instant::now() < deadline, "libvirtd did not answer in 60 s:\n{}", l.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh").arg("-c").arg(&self.uri).args(args).stdin(Stdio::null()).output().expect("run virsh")
    }

    /// `virsh ARGS`, which must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(o.status.success(), "virsh {args:?} failed: {}{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr), self.logs());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// What libvirt sees inside its namespace at `p` (an absolute path under /run, /var/lib/libvirt or /var/log).
    fn host_path(&self, p: &str) -> PathBuf {
        let d = self.dir.path();
        for (inside, outside) in [("/run/", "run"), ("/var/lib/libvirt/", "lib"), ("/var/log/", "log")] {
            if let Some(rest) = p.strip_prefix(inside) {
                return d.join(outside).join(rest);
            }
        }
        panic!("{p} is not in libvirtd's private directories");
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        let tail = |p: &Path, n: usize| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let l: Vec<&str> = t.lines().collect();
            l[l.len().saturating_sub(n)..].join("\n")
        };
        s += &format!("===== libvirtd log =====\n{}\n", tail(&self.dir.path().join("log/libvirt/libvirtd.log"), 40));
        for sub in ["log/swtpm/libvirt/qemu", "log/libvirt/qemu"] {
            if let Ok(rd) = std::fs::read_dir(self.dir.path().join(sub)) {
                for e in rd.flatten() {
                    s += &format!("===== {} =====\n{}\n", e.path().display(), tail(&e.path(), 30));
                }
            }
        }
        s
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // QEMU and the entry points are libvirtd's daemons, not our children: stop the domains
        // through libvirt, then kill what is left by the pids libvirt recorded.
        let list = self.virsh(&["list", "--name"]);
        for name in String::from_utf8_lossy(&list.stdout).lines().filter(|l| !l.trim().is_empty()) {
            let _ = self.virsh(&["destroy", name.trim()]);
        }
        for sub in ["run/libvirt/qemu", "run/libvirt/qemu/swtpm"] {
            if let Ok(rd) = std::fs::read_dir(self.dir.path().join(sub)) {
                for e in rd.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "pid")) {
                    if let Some(pid) = std::fs::read_to_string(e.path()).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn domain_xml(name: &str, uuid: &Uuid, model: &str, backend_extra: &str) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='q35'>hvm</type></os>\n  <features><acpi/></features>\n  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    \
         <tpm model='{model}'><backend type='emulator' version='2.0'{backend_extra}</tpm>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n"
    )
}

fn define(l: &Libvirtd, xml: &str) {
    let f = l.dir.path().join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    l.ok(&["define", f.to_str().unwrap()]);
}

/// The vTPM libvirt's TPM state directory of domain `vm` names (what swtpm_setup wrote).
fn vtpm_of(l: &Libvirtd, vm: &Uuid) -> Option<Uuid> {
    let m = l.dir.path().join("lib/swtpm").join(vm.to_string()).join("tpm2").join("xvtpm-vtpm.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(m).ok()?).unwrap();
    Some(v["vtpm"].as_str().unwrap().parse().unwrap())
}

/// The control socket and the pid of the swtpm libvirt runs for domain `name` (its pidfile).
fn swtpm_of(l: &Libvirtd, name: &str) -> (PathBuf, u32) {
    let dir = l.dir.path().join("run/libvirt/qemu/swtpm");
    let mut sock = None;
    let mut pid = None;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        if f.ends_with(&format!("-{name}-swtpm.sock")) {
            sock = Some(e.path());
        }
        if f.ends_with(&format!("-{name}-swtpm.pid")) {
            pid = std::fs::read_to_string(e.path()).ok().and_then(|p| p.trim().parse().ok());
        }
    }
    (sock.unwrap_or_else(|| panic!("no swtpm socket for {name} in {}", dir.display())), pid.expect("no swtpm pidfile"))
}

/// A host-side look into a running vTPM: its own control connection (kept open) and a data
/// channel handed over with CMD_SET_DATAFD.
struct Probe {
    _ctrl: UnixStream,
    data: UnixStream,
}

impl Probe {
    fn open(sock: &Path) -> Probe {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let mut c = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (data, theirs) = UnixStream::pair().unwrap();
        data.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let fds = [theirs.as_raw_fd()];
        sendmsg::<()>(c.as_raw_fd(), &[std::io::IoSlice::new(&0x10u32.to_be_bytes())], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
            .unwrap();
        let mut r = [0u8; 4];
        c.read_exact(&mut r).unwrap();
        assert_eq!(r, [0, 0, 0, 0], "CMD_SET_DATAFD");
        Probe { _ctrl: c, data }
    }

    fn command(&mut self, cmd: &[u8]) -> Vec<u8> {
        self.data.write_all(cmd).unwrap();
        read_response(&mut self.data)
    }

    /// SHA-256 PCR `index`; None while the TPM is not started.
    fn pcr(&mut self, index: u8) -> Option<[u8; 32]> {
        let mut sel = [0u8; 3];
        sel[usize::from(index / 8)] = 1 << (index % 8);
        let r = self.command(&[0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, sel[0], sel[1], sel[2]]);
        (rc(&r) == 0 && r.len() == 62).then(|| r[30..62].try_into().unwrap())
    }

    fn extend(&mut self, index: u8, digest: [u8; 32]) {
        let mut c = vec![0x80, 0x02, 0, 0, 0, 65, 0, 0, 0x01, 0x82, 0, 0, 0, index];
        c.extend_from_slice(&[0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0]);
        c.extend_from_slice(&[0, 0, 0, 1, 0, 0x0b]);
        c.extend_from_slice(&digest);
        assert_eq!(rc(&self.command(&c)), 0, "PCR_Extend");
    }

    /// The EK's public area (TPM2_ReadPublic of the RSA EK, 0x81010001).
    fn ek(&mut self) -> Vec<u8> {
        let r = self.command(&xvtpm_tests::read_public(0x8101_0001));
        assert_eq!(rc(&r), 0, "ReadPublic of the EK");
        r
    }
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until SeaBIOS measured into PCR 0; returns the value.
fn measured_pcr0(p: &mut Probe) -> [u8; 32] {
    let mut v = None;
    until("SeaBIOS to measure into PCR 0", || {
        v = p.pcr(0).filter(|x| *x != [0u8; 32]);
        v.is_some()
    });
    v.unwrap()
}

fn vtpm_state(s: &Stack, uuid: &Uuid) -> Option<String> {
    let out = s.xl(&["vtpm", "show", &uuid.to_string(), "--json"]);
    match out.status.code() {
        Some(0) => Some(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["state"].as_str().unwrap().to_string()),
        Some(5) => None,
        c => panic!("xl-vtpm vtpm show: {c:?} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// `xl-vtpm libvirt sweep` where it belongs: in libvirtd's mount namespace (it reads libvirt's
/// TPM state directories).
fn sweep(s: &Stack, l: &Libvirtd) -> serde_json::Value {
    let out = Command::new("nsenter")
        .arg("--mount")
        .arg("--target")
        .arg(l.child.id().to_string())
        .arg("--")
        .arg(testkit::bin_path("xl-vtpm"))
        .args(["libvirt", "sweep", "--connect", &l.uri, "--json"])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .env("XVTPM_VTPM_DOMAIN", testkit::bin_path("vtpm-domain"))
        .stdin(Stdio::null())
        .output()
        .expect("run nsenter xl-vtpm");
    assert!(out.status.success(), "xl-vtpm libvirt sweep failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn libvirt_define_start_reset_save_restore_destroy_undefine() {
    let s = Stack::start();
    let Some(l) = Libvirtd::start(&s) else { return };
    let version = l.ok(&["version"]);
    eprintln!("{version}");
    let vm = Uuid::new_v4();
    let name = "xvtpm-lv1";
    define(&l, &domain_xml(name, &vm, "tpm-crb", "/>"));

    // start: swtpm_setup made a vTPM through the manager, swtpm runs it for QEMU.
    l.ok(&["start", name]);
    let vtpm = vtpm_of(&l, &vm).expect("swtpm_setup wrote no marker");
    assert_eq!(vtpm_state(&s, &vtpm).as_deref(), Some("running"));
    let (sock, swtpm_pid) = swtpm_of(&l, name);
    // libvirt's pidfile names our entry point, which stays for the vTPM's life.
    let exe = std::fs::read_link(format!("/proc/{swtpm_pid}/exe")).unwrap();
    assert_eq!(exe, testkit::bin_path("xvtpm-swtpm"), "libvirt's swtpm pid is not the entry point");
    let rt: serde_json::Value = serde_json::from_slice(&std::fs::read(s.run_dir().join("vtpms").join(format!("{vtpm}.json"))).unwrap()).unwrap();
    let vtpm_pid = rt["pid"].as_u64().unwrap() as u32;
    let (uid, _) = xvtpm_tests::ids(vtpm_pid);
    assert!(uid >= vtpm_proto::mgr::VTPM_UID_FIRST, "the vTPM runs as uid {uid}, not its own");
    let swtpm_log = std::fs::read_to_string(l.host_path(&format!("/var/log/swtpm/libvirt/qemu/{name}-swtpm.log"))).unwrap();
    assert!(swtpm_log.contains(&format!("created vTPM {vtpm}")) && swtpm_log.contains(&format!("vTPM {vtpm} runs as process {vtpm_pid}")), "{swtpm_log}");

    let mut p = Probe::open(&sock);
    let pcr0 = measured_pcr0(&mut p);
    eprintln!("start: SeaBIOS measured PCR 0 = {}", hex::encode(pcr0));

    // reset: the TPM power-cycles (PCR 9 cleared, PCR 0 measured again), the vTPM process stays.
    p.extend(9, [0x11; 32]);
    assert_ne!(p.pcr(9), Some([0u8; 32]));
    l.ok(&["reset", name]);
    until("virsh reset: PCR 9 cleared and PCR 0 measured again", || p.pcr(9) == Some([0u8; 32]) && p.pcr(0) == Some(pcr0));
    assert!(xvtpm_fsutil::pid_alive(vtpm_pid), "the vTPM process did not survive virsh reset");

    // save: QEMU carries the TPM's state as a sealed blob; the vTPM then ends with QEMU.
    p.extend(9, [0x5a; 32]);
    let mark = p.pcr(9).unwrap();
    let saved = l.dir.path().join("saved.img");
    l.ok(&["save", name, saved.to_str().unwrap()]);
    assert!(wait_gone(vtpm_pid, Duration::from_secs(20)), "the vTPM outlived virsh save");
    assert!(wait_gone(swtpm_pid, Duration::from_secs(20)), "the swtpm entry point outlived virsh save");
    drop(p);
    assert_eq!(vtpm_state(&s, &vtpm).as_deref(), Some("stopped"));
    let image = std::fs::read(&saved).unwrap();
    assert!(image.windows(4).any(|w| w == b"XVTB"), "no sealed vTPM state blob in the saved image");

    // restore: the same vTPM, with the PCRs the guest had.
    l.ok(&["restore", saved.to_str().unwrap()]);
    assert_eq!(vtpm_of(&l, &vm), Some(vtpm));
    let (sock, swtpm_pid) = swtpm_of(&l, name);
    let mut p = Probe::open(&sock);
    assert_eq!(p.pcr(9), Some(mark), "PCR 9 lost in save/restore");
    assert_eq!(p.pcr(0), Some(pcr0), "PCR 0 lost in save/restore");
    let rt: serde_json::Value = serde_json::from_slice(&std::fs::read(s.run_dir().join("vtpms").join(format!("{vtpm}.json"))).unwrap()).unwrap();
    let vtpm_pid = rt["pid"].as_u64().unwrap() as u32;

    // destroy: QEMU killed, the vTPM saves and ends, the entry point with it.
    l.ok(&["destroy", name]);
    assert!(wait_gone(vtpm_pid, Duration::from_secs(20)), "the vTPM outlived virsh destroy");
    assert!(wait_gone(swtpm_pid, Duration::from_secs(20)), "the swtpm entry point outlived virsh destroy");
    drop(p);
    assert_eq!(vtpm_state(&s, &vtpm).as_deref(), Some("stopped"));

    // A defined domain keeps its vTPM whatever the sweep sees.
    let swept = sweep(&s, &l);
    assert_eq!(swept[0]["action"], "kept", "{swept}");

    // undefine: libvirt removes the TPM state directory; the sweep then destroys the vTPM.
    l.ok(&["undefine", name]);
    assert!(!l.dir.path().join("lib/swtpm").join(vm.to_string()).exists(), "libvirt kept the TPM state directory");
    let swept = sweep(&s, &l);
    assert_eq!(swept[0]["action"], "destroyed", "{swept}");
    assert_eq!(vtpm_state(&s, &vtpm), None, "the vTPM of an undefined domain still exists");
    assert!(!s.state_dir().join("vtpms").join(vtpm.to_string()).exists());
}

#[test]
fn libvirt_persistent_state_keeps_the_vtpm_and_unsupported_settings_are_refused() {
    let s = Stack::start();
    // A vTPM that takes 2 s to come up (a loaded host): libvirt gives swtpm's socket 1 s to
    // appear, so the entry point must make it before the vTPM opens its state.
    let slow = s.dir.path().join("slow-vtpm-domain");
    std::fs::write(&slow, format!("#!/bin/sh\nsleep 2\nexec {} \"$@\"\n", testkit::bin_path("vtpm-domain").display())).unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let Some(l) = Libvirtd::start_with(&s, &slow) else { return };
    let vm = Uuid::new_v4();
    let name = "xvtpm-lv2";
    let xml = domain_xml(name, &vm, "tpm-tis", " persistent_state='yes'/>");
    define(&l, &xml);
    l.ok(&["start", name]);
    let vtpm = vtpm_of(&l, &vm).unwrap();
    let (sock, _) = swtpm_of(&l, name);
    let mut p = Probe::open(&sock);
    measured_pcr0(&mut p);
    let ek = p.ek();
    l.ok(&["destroy", name]);
    drop(p);

    // undefine keeps persistent state: the marker stays, the sweep keeps the vTPM.
    l.ok(&["undefine", name]);
    assert_eq!(vtpm_of(&l, &vm), Some(vtpm), "persistent_state='yes' lost the TPM state directory");
    // A sweep that does not see libvirt's storage (here: outside libvirtd's mount namespace,
    // where no /var/lib/libvirt/swtpm exists) must not take the missing directory for an
    // undefine. (A host whose own libvirt made /var/lib/libvirt/swtpm cannot show this.)
    if !Path::new("/var/lib/libvirt/swtpm").exists() {
        let swept = s.xl_json(&["libvirt", "sweep", "--connect", &l.uri]);
        assert_eq!(swept[0]["action"], "kept-unverified", "{swept}");
        assert_eq!(vtpm_state(&s, &vtpm).as_deref(), Some("stopped"));
    }
    let swept = sweep(&s, &l);
    assert_eq!(swept[0]["action"], "kept-state", "{swept}");
    assert_eq!(vtpm_state(&s, &vtpm).as_deref(), Some("stopped"));

    // The domain defined again (same UUID) gets the same vTPM: the same EK.
    define(&l, &xml);
    l.ok(&["start", name]);
    assert_eq!(vtpm_of(&l, &vm), Some(vtpm));
    let (sock, _) = swtpm_of(&l, name);
    let mut p = Probe::open(&sock);
    measured_pcr0(&mut p);
    assert_eq!(p.ek(), ek, "a redefined domain got another EK");
    l.ok(&["destroy", name]);
    drop(p);
    // undefine --tpm removes even persistent state, and with it the vTPM.
    l.ok(&["undefine", name, "--tpm"]);
    assert_eq!(sweep(&s, &l)[0]["action"], "destroyed");
    assert_eq!(vtpm_state(&s, &vtpm), None);

    // <active_pcr_banks> is refused (libvirt passes it to swtpm_setup --reconfigure), not ignored.
    let vm3 = Uuid::new_v4();
    define(&l, &domain_xml("xvtpm-lv3", &vm3, "tpm-crb", "><active_pcr_banks><sha256/></active_pcr_banks></backend>"));
    let o = l.virsh(&["start", "xvtpm-lv3"]);
    assert!(!o.status.success(), "a domain with <active_pcr_banks> started");
    let log = std::fs::read_to_string(l.host_path("/var/log/swtpm/libvirt/qemu/xvtpm-lv3-swtpm.log")).unwrap_or_default();
    assert!(log.contains("active_pcr_banks"), "the refusal is not in the swtpm log: {log}\nvirsh: {}", String::from_utf8_lossy(&o.stderr));
    // libvirt removed the TPM directory of the failed start: the vTPM made for it is reported
    // while the domain exists, and destroyed once it is undefined.
    let swept = sweep(&s, &l);
    assert!(swept.as_array().unwrap().iter().all(|x| x["action"] == "orphaned"), "{swept}");
    l.ok(&["undefine", "xvtpm-lv3"]);
    let swept = sweep(&s, &l);
    assert!(swept.as_array().unwrap().iter().all(|x| x["action"] == "destroyed"), "{swept}");
}
