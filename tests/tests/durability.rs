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
