//! A state write that fails (a full file system, no file descriptors left) is never followed
//! by a success answer that shows unsaved state: the vTPM answers `TPM_RC_FAILURE` and runs
//! nothing until the write succeeds; once the disk recovers it serves again, and the NV
//! counter it shows survives `kill -9` and a restart.
//!
//! Real parts: a 2 MiB tmpfs this test mounts (root) and fills, `prlimit` on the running
//! vTPM process, raw TPM commands over the swtpm data channel.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tpm_wire::nv_counter;
use xvtpm_tests::{Stack, VtpmHandle, rc, read_response, set_nofile, wait_gone};

const NV_INDEX: u32 = 0x0150_0031;

fn nv_define_counter() -> Vec<u8> {
    nv_counter::define(NV_INDEX)
}

fn nv_increment() -> Vec<u8> {
    nv_counter::increment(NV_INDEX)
}

fn nv_read() -> Vec<u8> {
    nv_counter::read(NV_INDEX)
}

use tpm_wire::TPM2_RC_FAILURE as TPM_RC_FAILURE;

/// One data connection kept open (a new connection needs a file descriptor in the vTPM).
struct Conn(TcpStream);

impl Conn {
    fn open(v: &VtpmHandle) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", v.port.expect("running"))).expect("connect data port");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn(s)
    }

    fn cmd(&mut self, packet: &[u8]) -> Vec<u8> {
        self.0.write_all(packet).unwrap();
        read_response(&mut self.0)
    }

    fn rc(&mut self, packet: &[u8]) -> u32 {
        rc(&self.cmd(packet))
    }

    /// NV_Read of the counter: `Ok(value)` or `Err(rc)`.
    fn counter(&mut self) -> Result<u64, u32> {
        let r = self.cmd(&nv_read());
        match rc(&r) {
            0 => Ok(u64::from_be_bytes(r[16..24].try_into().unwrap())),
            code => Err(code),
        }
    }
}

/// A tmpfs mounted for the test; lazily unmounted on drop (the killed vTPM may still hold it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"]).arg(at).status().unwrap();
        assert!(st.success(), "mounting a tmpfs at {} (the test must run as root)", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 4096];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    n
}

/// Counter after `kill -9` and a restart of the vTPM.
fn counter_after_kill9(s: &Stack, v: &VtpmHandle) -> u64 {
    let pid = v.pid.expect("running");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert!(wait_gone(pid, Duration::from_secs(10)), "vTPM {pid} did not die");
    let v2 = s.start_vtpm(&v.uuid);
    Conn::open(&v2).counter().expect("NV_Read after restart")
}

#[test]
fn full_file_system_fails_commands_until_space_returns() {
    let s = Stack::start();
    let vtpms = s.state_dir().join("vtpms");
    let _fs = Tmpfs::mount(&vtpms, "2m");
    let v = s.create_vtpm();
    let mut c = Conn::open(&v);
    assert_eq!(c.rc(&nv_define_counter()), 0);
    assert_eq!(c.rc(&nv_increment()), 0);
    assert_eq!(c.counter(), Ok(1));

    let filler = vtpms.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0);
    for i in 0..3 {
        assert_eq!(c.rc(&nv_increment()), TPM_RC_FAILURE, "NV_Increment {i} on a full disk must fail");
    }
    // The old code answered rc 0 here with the unsaved value 4.
    assert_eq!(c.counter(), Err(TPM_RC_FAILURE), "a read after a failed save must not show unsaved state");

    std::fs::remove_file(&filler).unwrap();
    let shown = c.counter().expect("NV_Read once space is back");
    // The first failed increment may have taken effect (it is written now); the others never ran.
    assert!(shown == 1 || shown == 2, "counter {shown}: commands answered TPM_RC_FAILURE must not all have run");
    assert_eq!(c.rc(&nv_increment()), 0);
    assert_eq!(c.counter(), Ok(shown + 1));
    drop(c);
    assert_eq!(counter_after_kill9(&s, &v), shown + 1, "the acknowledged counter must survive kill -9");
}

/// The lowest descriptor number `pid` does not use: a limit at it leaves no descriptor to open.
fn lowest_free_fd(pid: u32) -> u64 {
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

#[test]
fn no_file_descriptors_fails_commands_until_they_return() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let pid = v.pid.unwrap();
    let mut c = Conn::open(&v);
    assert_eq!(c.rc(&nv_define_counter()), 0);
    assert_eq!(c.rc(&nv_increment()), 0);
    assert_eq!(c.counter(), Ok(1));

    // Every descriptor the vTPM may have is in use: the state write cannot open its temp file.
    set_nofile(pid, lowest_free_fd(pid));
    for i in 0..3 {
        assert_eq!(c.rc(&nv_increment()), TPM_RC_FAILURE, "NV_Increment {i} without fds must fail");
    }
    assert_eq!(c.counter(), Err(TPM_RC_FAILURE), "a read after a failed save must not show unsaved state");

    set_nofile(pid, 1024);
    let shown = c.counter().expect("NV_Read once fds are back");
    assert!(shown == 1 || shown == 2, "counter {shown}: commands answered TPM_RC_FAILURE must not all have run");
    assert_eq!(c.rc(&nv_increment()), 0);
    assert_eq!(c.counter(), Ok(shown + 1));
    drop(c);
    assert_eq!(counter_after_kill9(&s, &v), shown + 1, "the acknowledged counter must survive kill -9");
}

/// A vTPM domain's state arriving with its guest on a host whose disk is full: the receiver
/// writes the imported state as slot A of a new 4 MiB disk image, then the domain's description,
/// and removes the imported state file only once both are durable. A full disk at either write
/// fails the step, naming the file; the imported state stays whole where it was, no image or
/// temporary file is left half-written, and the same step completes once there is space (what
/// `xl-vtpm migrate --finish` does).
#[test]
fn a_full_disk_at_a_moved_vtpm_domain_s_new_disk_keeps_the_imported_state() {
    use xl_tools::vtpmdom::{DISK_IMAGE_SIZE, Domains};
    use xl_tools::local::Local;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    // room for the imported state file (one page) and the image: nothing left for the description
    let fs = Tmpfs::mount(&state_dir, &format!("{}", DISK_IMAGE_SIZE + 4096));
    let local = Local { state_dir: state_dir.clone(), run_dir: dir.path().join("run"), vtpm_domain: "vtpm-domain".into(), sandbox: false };
    let d = Domains { local: &local, xl: "/nonexistent/xl".into(), losetup: "/nonexistent/losetup".into() };
    let id = uuid::Uuid::new_v4();
    std::fs::create_dir_all(local.vtpm_dir(&id)).unwrap();
    let st = vtpm_proto::sealed::State {
        family: tpm_wire::Family::Tpm2,
        generation: 9,
        permanent: zeroize::Zeroizing::new(b"nine".to_vec()),
        volatile: zeroize::Zeroizing::new(Vec::new()),
    };
    let blob = vtpm_proto::sealed::seal(&[7; 32], &id, &st, &[1; 12]);
    std::fs::write(local.state_file(&id), &blob).unwrap();
    let (kernel, ramdisk) = (dir.path().join("vmlinuz"), dir.path().join("initrd"));
    let left = || {
        let mut v: Vec<String> = std::fs::read_dir(local.vtpm_dir(&id)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let state_name = local.state_file(&id).file_name().unwrap().to_string_lossy().into_owned();

    // 1. The image itself does not fit: a filler takes the room.
    let filler = state_dir.join("filler");
    std::fs::write(&filler, vec![0u8; 64 * 1024]).unwrap();
    let e = d.adopt_imported(&id, "vtpm-g", &kernel, &ramdisk, 32).unwrap_err().text();
    assert!(e.contains("disk.img") && e.contains("No space left"), "{e}");
    assert_eq!(std::fs::read(local.state_file(&id)).unwrap(), blob, "the imported state is kept whole");
    assert_eq!(left(), vec![state_name.clone()], "no image or temporary file left");
    assert!(d.spec(&id).unwrap().is_none());

    // 2. The image fits, its description does not.
    std::fs::remove_file(&filler).unwrap();
    let e = d.adopt_imported(&id, "vtpm-g", &kernel, &ramdisk, 32).unwrap_err().text();
    assert!(e.contains("No space left"), "{e}");
    assert_eq!(std::fs::read(local.state_file(&id)).unwrap(), blob, "still kept: the step did not complete");
    assert!(d.spec(&id).unwrap().is_none(), "no description of a domain whose step failed");

    // 3. Space again: the same step completes, the state now on the disk only.
    let st = Command::new("mount").args(["-o", "remount,size=16M"]).arg(&state_dir).status().unwrap();
    assert!(st.success());
    d.adopt_imported(&id, "vtpm-g", &kernel, &ramdisk, 32).unwrap();
    assert!(!local.state_file(&id).exists());
    let spec = d.spec(&id).unwrap().expect("described");
    let xl_tools::vtpmdom::Disk::Image(img) = &spec.disk else { panic!("{spec:?}") };
    let recs = vtpm_proto::slots::records(&std::fs::File::open(img).unwrap()).unwrap();
    assert_eq!(recs, vec![(9, blob)], "slot A holds the state as sealed");
    drop(fs);
}
