//! QEMU's way in: the swtpm control channel on a Unix socket, as QEMU 7.2's
//! `-tpmdev emulator` (backends/tpm/tpm_emulator.c) speaks it.
//!
//! * The conformance test replays QEMU 7.2's control requests byte for byte
//!   (whole C unions, padding included: `CMD_SET_LOCALITY` is 8 bytes on the
//!   wire) for start-up, two resets and quit, and checks every reply's length
//!   and result and that nothing else is left on the stream. It runs against
//!   plain swtpm too, which proves the expectations are swtpm's.
//! * The real thing: `qemu-system-x86_64` (TCG, SeaBIOS, no guest OS — SeaBIOS
//!   itself starts the TPM 2.0 through tpm-tis and measures into PCRs 0-7) on
//!   the vTPM, driven over QMP through 5 `system_reset`s and a `quit`; and
//!   migrated through a file to a second QEMU on a second process of the same
//!   vTPM, keeping its PCRs, while a tampered or replayed stream is refused; and migrated to a
//!   QEMU on the vTPM moved to a second manager (docs/migration.md), with the downtime QEMU
//!   reports printed beside plain swtpm's; and two QEMUs at once on one vTPM process, as a Xen
//!   HVM guest's localhost migration has them: the source's quit after the destination's load
//!   leaves the TPM running with its PCRs.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::qmp::Qmp;
use xvtpm_tests::{Stack, VtpmHandle, rc, read_response, wait_gone};

/// A vTPM listening on a Unix control socket (for QEMU) and on TCP (to look
/// at its PCRs while QEMU owns the Unix data channel).
fn vtpm_for_qemu(s: &Stack) -> (VtpmHandle, PathBuf) {
    let ctrl = s.dir.path().join("vtpm.ctrl");
    let listen = format!("ctrl:{}", ctrl.display());
    let j = s.xl_json(&["vtpm", "create", "--ek", "ecc", "--listen", &listen, "--listen", "tcp:127.0.0.1:0"]);
    assert_eq!(j["state"], "running");
    let v = VtpmHandle {
        uuid: j["uuid"].as_str().unwrap().parse().unwrap(),
        pid: j["runtime"]["pid"].as_u64().map(|p| p as u32),
        port: j["runtime"]["tcp_ports"][0][0].as_u64().map(|p| p as u16),
        socket: None,
        state_file: j["state_file"].as_str().unwrap().into(),
    };
    (v, ctrl)
}

/// Plain swtpm with a Unix control socket only, as libvirt runs it (`--terminate`).
struct PlainSwtpm {
    child: Child,
    ctrl: PathBuf,
    _dir: tempfile::TempDir,
}

impl PlainSwtpm {
    fn start() -> PlainSwtpm {
        let dir = testkit::tempdir();
        let ctrl = dir.path().join("swtpm.ctrl");
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--terminate", "--ctrl"])
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.path().join("state").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn swtpm");
        // Wait until it listens (a probe connection would end a --terminate swtpm).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(&ctrl) {
            assert!(Instant::now() < deadline, "swtpm did not listen on its control socket in 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        PlainSwtpm { child, ctrl, _dir: dir }
    }

    fn exited(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Whether a Unix socket listens at `path` (`__SO_ACCEPTCON` in /proc/net/unix).
fn listening(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[7] == path && f[3] == "00010000"
    })
}

impl Drop for PlainSwtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One control request as QEMU writes it (one write), its reply read at the
/// length QEMU reads, and nothing else may follow: a server that framed the
/// request wrongly answers the leftover bytes as another request.
fn exchange(c: &mut UnixStream, what: &str, req: &[u8], reply_len: usize) -> Vec<u8> {
    c.write_all(req).unwrap();
    let mut r = vec![0u8; reply_len];
    c.read_exact(&mut r).unwrap_or_else(|e| panic!("{what}: no {reply_len}-byte reply: {e}"));
    c.set_nonblocking(true).unwrap();
    let mut more = [0u8; 64];
    let extra = c.read(&mut more);
    c.set_nonblocking(false).unwrap();
    match extra {
        // Nothing queued; or the server closed after answering (CMD_SHUTDOWN).
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok(0) => {}
        other => panic!("{what}: bytes after the {reply_len}-byte reply {r:02x?}: {other:?} {more:02x?}"),
    }
    r
}

fn result(r: &[u8]) -> u32 {
    u32::from_be_bytes(r[0..4].try_into().unwrap())
}

const CMD_STOP: [u8; 4] = [0, 0, 0, 0x0e];
const SET_BUFFERSIZE_QUERY: [u8; 8] = [0, 0, 0, 0x11, 0, 0, 0, 0];
const SET_BUFFERSIZE_4096: [u8; 8] = [0, 0, 0, 0x11, 0, 0, 0x10, 0];
const CMD_INIT: [u8; 8] = [0, 0, 0, 0x02, 0, 0, 0, 0];
const TPM_RC_INITIALIZE: u32 = tpm_wire::TPM2_RC_INITIALIZE;

/// QEMU's reset (tpm_tis_reset → startup_tpm): get_buffer_size, then
/// set_buffer_size, each preceded by CMD_STOP, then CMD_INIT(flags 0).
fn qemu_reset(c: &mut UnixStream) {
    for (what, req, len) in [
        ("CMD_STOP", &CMD_STOP[..], 4),
        ("CMD_SET_BUFFERSIZE(0)", &SET_BUFFERSIZE_QUERY[..], 16),
        ("CMD_STOP", &CMD_STOP[..], 4),
        ("CMD_SET_BUFFERSIZE(4096)", &SET_BUFFERSIZE_4096[..], 16),
    ] {
        let r = exchange(c, what, req, len);
        assert_eq!(result(&r), 0, "{what}: {r:02x?}");
        if len == 16 {
            assert_eq!(&r[4..8], &[0, 0, 0x10, 0], "{what}: buffer size in use");
        }
    }
    assert_eq!(exchange(c, "CMD_INIT", &CMD_INIT, 4), [0, 0, 0, 0]);
}

/// Replays QEMU 7.2's control channel: start-up, two resets (each followed by
/// the firmware's TPM2_Startup on the data channel), odd requests other
/// clients send, and quit. `gone` says whether the server process ended.
fn replay_qemu_session(ctrl: &Path, gone: &mut dyn FnMut() -> bool) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let mut c = UnixStream::connect(ctrl).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // CMD_SET_DATAFD: 4 bytes with the data socket as SCM_RIGHTS.
    let (mut data, theirs) = UnixStream::pair().unwrap();
    data.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let fds = [theirs.as_raw_fd()];
    let cmd = 0x10u32.to_be_bytes();
    sendmsg::<()>(c.as_raw_fd(), &[std::io::IoSlice::new(&cmd)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
    let mut r = [0u8; 4];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r, [0, 0, 0, 0], "CMD_SET_DATAFD");
    drop(theirs);

    // CMD_GET_CAPABILITY: QEMU reads 8 bytes as a be64 and needs its TPM 2 set.
    let caps = u64::from_be_bytes(exchange(&mut c, "CMD_GET_CAPABILITY", &[0, 0, 0, 1], 8).try_into().unwrap());
    for bit in [0, 1, 2, 3, 7, 10, 12, 13] {
        assert!(caps & (1 << bit) != 0, "capability bit {bit} missing (QEMU requires it): {caps:#x}");
    }
    // tpm_tis realize + first reset.
    qemu_reset(&mut c);
    let est = exchange(&mut c, "CMD_GET_TPMESTABLISHED", &[0, 0, 0, 4], 8);
    assert_eq!(result(&est), 0);
    // sizeof(ptm_loc) = 4: the locality and 3 bytes of padding.
    assert_eq!(exchange(&mut c, "CMD_SET_LOCALITY(0) padded", &[0, 0, 0, 5, 0, 0, 0, 0], 4), [0, 0, 0, 0]);
    data.write_all(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR)).unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0, "firmware TPM2_Startup after start-up");
    data.write_all(&xvtpm_tests::get_random(8)).unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0);

    for round in 0..2 {
        qemu_reset(&mut c);
        // A TPM that was really power-cycled takes TPM2_Startup again.
        data.write_all(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR)).unwrap();
        assert_eq!(rc(&read_response(&mut data)), 0, "TPM2_Startup after reset {round}");
        data.write_all(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR)).unwrap();
        assert_eq!(rc(&read_response(&mut data)), TPM_RC_INITIALIZE, "second TPM2_Startup after reset {round}");
    }

    // QEMU's reset_tpm_established_flag: sizeof(ptm_reset_est) = 4, padded.
    let r = exchange(&mut c, "CMD_RESET_TPMESTABLISHED(3) padded", &[0, 0, 0, 0x0b, 3, 0, 0, 0], 4);
    assert_eq!(result(&r), 0);
    assert_eq!(exchange(&mut c, "CMD_CANCEL_TPM_CMD", &[0, 0, 0, 9], 4), [0, 0, 0, 0]);
    // swtpm_ioctl and the tpm2-tss TCTI send only u.req: 1 byte.
    assert_eq!(exchange(&mut c, "CMD_SET_LOCALITY(0) bare", &[0, 0, 0, 5, 0], 4), [0, 0, 0, 0]);
    assert_eq!(result(&exchange(&mut c, "CMD_SET_LOCALITY(7)", &[0, 0, 0, 5, 7, 0, 0, 0], 4)), 0x3d);
    // Unknown codes and wrong sizes get swtpm's answers and the stream stays in step.
    assert_eq!(result(&exchange(&mut c, "unknown 0x99 with a body", &[0, 0, 0, 0x99, 1, 2, 3, 4, 5], 4)), 0x0a);
    assert_eq!(result(&exchange(&mut c, "CMD_STOP with a stray byte", &[0, 0, 0, 0x0e, 0], 4)), 0x03);
    assert_eq!(result(&exchange(&mut c, "CMD_INIT with 5 bytes", &[0, 0, 0, 2, 0, 0, 0, 0, 0], 4)), 0x03);
    let r = exchange(&mut c, "CMD_GET_CONFIG", &[0, 0, 0, 0x0f], 8);
    assert_eq!(result(&r), 0);
    data.write_all(&xvtpm_tests::get_random(8)).unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0, "the TPM still runs after the odd requests");

    // QEMU's pre_save: CMD_GET_STATEBLOB (ptm_getstate.u.req, 12 bytes) per blob type; the
    // reply is the 16-byte u.resp head and then totlength (= length) bytes of blob.
    for (kind, name) in [(1u8, "permanent"), (2, "volatile")] {
        c.write_all(&[0, 0, 0, 0x0c, 0, 0, 0, 1, 0, 0, 0, kind, 0, 0, 0, 0]).unwrap();
        let mut head = [0u8; 16];
        c.read_exact(&mut head).unwrap();
        assert_eq!(result(&head), 0, "CMD_GET_STATEBLOB {name}: {head:02x?}");
        let total = u32::from_be_bytes(head[8..12].try_into().unwrap());
        assert_eq!(head[12..16], head[8..12], "CMD_GET_STATEBLOB {name}: totlength != length");
        assert!(total > 0, "CMD_GET_STATEBLOB {name}: empty");
        let mut blob = vec![0u8; total as usize - 1];
        c.read_exact(&mut blob).unwrap();
        exchange(&mut c, &format!("CMD_GET_STATEBLOB {name}'s last byte"), &[], 1);
    }

    // quit: tpm_emulator_shutdown.
    assert_eq!(exchange(&mut c, "CMD_SHUTDOWN", &[0, 0, 0, 3], 4), [0, 0, 0, 0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone() {
        assert!(Instant::now() < deadline, "the TPM process did not exit after CMD_SHUTDOWN");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn qemu_72_control_requests_replayed_byte_exact() {
    let s = Stack::start();
    let (v, ctrl) = vtpm_for_qemu(&s);
    let pid = v.pid.unwrap();
    replay_qemu_session(&ctrl, &mut || !xvtpm_fsutil::pid_alive(pid));
    // The same expectations hold for plain swtpm.
    let mut sw = PlainSwtpm::start();
    let sw_ctrl = sw.ctrl.clone();
    replay_qemu_session(&sw_ctrl, &mut || sw.exited(Duration::ZERO));
}

#[test]
fn controller_hang_up_ends_the_vtpm_unless_persist() {
    let s = Stack::start();
    let (v, ctrl) = vtpm_for_qemu(&s);
    let mut c = UnixStream::connect(&ctrl).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(result(&exchange(&mut c, "CMD_GET_CAPABILITY", &[0, 0, 0, 1], 8)), 0);
    // The TCP control channel (tpm2-tss opens one per request) never ends the process.
    let mut t = std::net::TcpStream::connect(("127.0.0.1", v.port.unwrap() + 1)).unwrap();
    t.write_all(&[0, 0, 0, 1]).unwrap();
    t.read_exact(&mut [0u8; 8]).unwrap();
    drop(t);
    assert_eq!(rc(&xvtpm_tests::raw_command(v.port.unwrap(), &xvtpm_tests::get_random(8))), 0);
    // QEMU killed: its control connection drops, the vTPM saves and exits.
    drop(c);
    assert!(wait_gone(v.pid.unwrap(), Duration::from_secs(10)), "vTPM kept running after its controller hung up");
    assert!(s.vtpm_log(&v.uuid).contains("controller hung up"), "{}", s.vtpm_log(&v.uuid));

    // Started with --persist: it stays.
    let (pid, _) = restart_vtpm_with(&s, &v, &ctrl, &["--persist"]);
    for _ in 0..2 {
        let mut c = UnixStream::connect(&ctrl).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(result(&exchange(&mut c, "CMD_GET_CAPABILITY", &[0, 0, 0, 1], 8)), 0);
    }
    assert!(xvtpm_fsutil::pid_alive(pid), "--persist vTPM exited when its controller hung up");
}

/// Starts the stopped vTPM again (same identity and state) on `ctrl` and TCP,
/// with extra `vtpm-domain` flags (through a wrapper, as a unit file would pass
/// them). Returns its pid and TCP data port.
fn restart_vtpm_with(s: &Stack, v: &VtpmHandle, ctrl: &Path, flags: &[&str]) -> (u32, u16) {
    let wrapper = s.dir.path().join("vtpm-domain-wrapper");
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec {} \"$@\" {}\n", testkit::bin_path("vtpm-domain").display(), flags.join(" "))).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let listen = format!("ctrl:{}", ctrl.display());
    let out = Command::new(testkit::bin_path("xl-vtpm"))
        .args(["vtpm", "start", &v.uuid.to_string(), "--listen", &listen, "--listen", "tcp:127.0.0.1:0", "--json"])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .env("XVTPM_VTPM_DOMAIN", &wrapper)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let j = if j.is_array() { &j[0] } else { &j };
    (j["runtime"]["pid"].as_u64().unwrap() as u32, j["runtime"]["tcp_ports"][0][0].as_u64().unwrap() as u16)
}

// ---- the real QEMU ----

fn qemu_binary() -> &'static str {
    let found = Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]).output().map(|o| o.status.success());
    assert!(
        matches!(found, Ok(true)),
        "qemu-system-x86_64 is not installed: this test runs a real QEMU against the vTPM. \
         Install it with `apt-get install qemu-system-x86` (scripts/install-deps.sh does)."
    );
    "qemu-system-x86_64"
}

/// Starts QEMU (TCG, q35, SeaBIOS, no disk) with a tpm-tis on the control socket `ctrl`.
/// The real-QEMU tests run one at a time. Run in parallel in this test process (2 cores), a
/// QEMU 7.2 (Debian 12) was seen to end by itself right after a completed migration, outgoing or
/// incoming, in about 1 of 8 runs of this file (its QMP socket gone when the test sent `quit`;
/// nothing in its log); one at a time, 20 runs of 20 passed. The cause was not found; the plain
/// swtpm baseline below had shown the same once. Each test holds this for its whole run.
fn one_qemu_test() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn start_qemu(dir: &Path, ctrl: &Path) -> (Child, Qmp) {
    let mut child = spawn_qemu(dir, ctrl, &[]);
    let q = Qmp::connect(&dir.join("qmp.sock"), &mut child, &dir.join("qemu.log"), Duration::from_secs(30));
    (child, q)
}

fn spawn_qemu(dir: &Path, ctrl: &Path, extra: &[&str]) -> Child {
    let qmp = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    Command::new(qemu_binary())
        .args(["-machine", "q35", "-accel", "tcg", "-nodefaults", "-nographic", "-m", "64"])
        .arg("-chardev")
        .arg(format!("socket,id=chrtpm,path={}", ctrl.display()))
        .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn qemu")
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("qemu still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
}

fn assert_qemu_alive(q: &mut Qmp, child: &mut Child, dir: &Path, when: &str) {
    if let Some(st) = child.try_wait().unwrap() {
        panic!("qemu died {when} ({st}):\n{}", qemu_log(dir));
    }
    let status = q.execute("query-status");
    assert_eq!(status["status"], "running", "{when}: {status}");
}

/// TPM2_PCR_Read of one SHA-256 PCR; None while the TPM does not answer (stopped, not started).
fn pcr(port: u16, index: u8) -> Option<[u8; 32]> {
    let mut sel = [0u8; 3];
    sel[usize::from(index / 8)] = 1 << (index % 8);
    let cmd = tpm_wire::tpm2_pcr_read_bitmap(tpm_wire::TPM2_ALG_SHA256, sel);
    let r = xvtpm_tests::raw_command(port, &cmd);
    // header, updateCounter, selection (4+2+1+3), count, TPM2B size, digest.
    (rc(&r) == 0 && r.len() == 62).then(|| r[30..62].try_into().unwrap())
}

/// TPM2_PCR_Extend(index, SHA-256 digest) with an empty password session.
fn pcr_extend(port: u16, index: u8, digest: [u8; 32]) {
    let c = tpm_wire::tpm2_pcr_extend(u32::from(index), &digest);
    assert_eq!(rc(&xvtpm_tests::raw_command(port, &c)), 0, "PCR_Extend");
}

/// Polls until `f` holds (SeaBIOS under TCG takes a few seconds to measure).
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn real_qemu_survives_resets_and_quit_ends_the_vtpm() {
    let _one_qemu_test = one_qemu_test();
    let s = Stack::start();
    let (v, ctrl) = vtpm_for_qemu(&s);
    let port = v.port.unwrap();
    let (mut qemu, mut q) = start_qemu(s.dir.path(), &ctrl);
    let zero = [0u8; 32];
    let mut measured = None;
    until("SeaBIOS to measure into PCR 0", || {
        measured = pcr(port, 0).filter(|p| *p != zero);
        measured.is_some()
    });
    let measured = measured.unwrap();
    for round in 1..=5u8 {
        // A mark in PCR 9 (SeaBIOS measures into 0-7 only): a TPM reset clears it.
        pcr_extend(port, 9, [round; 32]);
        assert_ne!(pcr(port, 9), Some(zero));
        q.execute("system_reset");
        until(&format!("reset {round}: PCR 9 cleared and PCR 0 measured again"), || {
            pcr(port, 9) == Some(zero) && pcr(port, 0) == Some(measured)
        });
        assert_qemu_alive(&mut q, &mut qemu, s.dir.path(), &format!("after system_reset {round}"));
    }
    // Each round above proved its reset through the PCRs; the log shows the power cycles too, at
    // most 5 lines per 10 s (CMD_INIT is peer-triggerable, so its line is rate-limited).
    let inits = s.vtpm_log(&v.uuid).matches("TPM initialised (power cycle)").count();
    assert!(inits >= 5, "{inits} CMD_INITs logged for a start and 5 resets");
    q.execute("quit");
    let status = wait_exit(&mut qemu, Duration::from_secs(30));
    assert!(status.success(), "qemu exited with {status}:\n{}", qemu_log(s.dir.path()));
    assert!(!qemu_log(s.dir.path()).contains("tpm-emulator"), "{}", qemu_log(s.dir.path()));
    assert!(wait_gone(v.pid.unwrap(), Duration::from_secs(10)), "the vTPM outlived QEMU's quit");
}

#[test]
fn real_qemu_on_plain_swtpm_for_comparison() {
    let _one_qemu_test = one_qemu_test();
    let mut sw = PlainSwtpm::start();
    let dir = testkit::tempdir();
    let (mut qemu, mut q) = start_qemu(dir.path(), &sw.ctrl.clone());
    for round in 1..=5 {
        q.execute("system_reset");
        assert_qemu_alive(&mut q, &mut qemu, dir.path(), &format!("after system_reset {round}"));
    }
    q.execute("quit");
    let st = qemu.wait().unwrap();
    assert!(st.success(), "qemu on swtpm exited with {st}");
    assert!(sw.exited(Duration::from_secs(10)), "swtpm --terminate outlived QEMU's quit");
}

/// A file that must exist.
fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Loads `file` into a new QEMU on a new process of the same vTPM; returns QEMU's exit
/// status if loading failed, or the running QEMU and QMP.
fn incoming(s: &Stack, v: &VtpmHandle, ctrl: &Path, file: &Path, dir: &Path) -> (u32, u16, Result<(Child, Qmp), std::process::ExitStatus>) {
    // QEMU's firmware starts the TPM; the vTPM must not (that would write a newer state).
    let (pid, port) = restart_vtpm_with(s, v, ctrl, &["--startup", "none"]);
    (pid, port, load_incoming(ctrl, file, dir))
}

/// A QEMU in `dir` on the vTPM's control socket `ctrl` that loads the migration stream `file`:
/// paused once loaded, or its exit status if the load failed.
fn load_incoming(ctrl: &Path, file: &Path, dir: &Path) -> Result<(Child, Qmp), std::process::ExitStatus> {
    std::fs::create_dir_all(dir).unwrap();
    let from = format!("exec:cat {}", file.display());
    let mut qemu = spawn_qemu(dir, ctrl, &["-incoming", &from]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A failed load ends QEMU at any moment, QMP connection included.
        if let Some(st) = qemu.try_wait().unwrap() {
            return Err(st);
        }
        if matches!(query_status(&dir.join("qmp.sock")).as_deref(), Some(st) if st != "inmigrate") {
            let q = Qmp::connect(&dir.join("qmp.sock"), &mut qemu, &dir.join("qemu.log"), Duration::from_secs(30));
            return Ok((qemu, q));
        }
        assert!(Instant::now() < deadline, "incoming migration did not finish in 60 s:\n{}", qemu_log(dir));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// QEMU's run state over a fresh QMP connection; None if QEMU does not answer (yet, or any more).
fn query_status(qmp: &Path) -> Option<String> {
    let s = UnixStream::connect(qmp).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut w = s.try_clone().ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#).ok()?;
    writeln!(w, r#"{{"execute":"query-status"}}"#).ok()?;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        if let Some(st) = v["return"]["status"].as_str() {
            return Some(st.to_string());
        }
    }
}

#[test]
fn real_qemu_migration_keeps_tpm_state_and_refuses_tampered_or_replayed_blobs() {
    let _one_qemu_test = one_qemu_test();
    let s = Stack::start();
    let (v, ctrl) = vtpm_for_qemu(&s);
    let port = v.port.unwrap();
    let dir = s.dir.path().join("q1");
    std::fs::create_dir_all(&dir).unwrap();
    let (mut qemu, mut q) = start_qemu(&dir, &ctrl);
    let zero = [0u8; 32];
    let mut measured = None;
    until("SeaBIOS to measure into PCR 0", || {
        measured = pcr(port, 0).filter(|p| *p != zero);
        measured.is_some()
    });
    // PCRs are volatile state: a mark in PCR 9 survives only if the volatile blob does.
    pcr_extend(port, 9, [0x5a; 32]);
    let mark = pcr(port, 9).unwrap();
    let ek = xvtpm_tests::raw_command(port, &xvtpm_tests::read_public(0x8101_0002));
    assert_eq!(rc(&ek), 0, "EK ReadPublic");
    let size = usize::from(u16::from_be_bytes([ek[10], ek[11]]));
    let ek_y = ek[12 + size - 32..12 + size].to_vec();

    let file = s.dir.path().join("vm.migration");
    q.execute_with("migrate", serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) }));
    until("the migration to complete", || {
        let m = q.execute("query-migrate");
        assert_ne!(m["status"], "failed", "{m}\n{}", qemu_log(&dir));
        m["status"] == "completed"
    });
    q.execute("quit");
    assert!(wait_exit(&mut qemu, Duration::from_secs(30)).success(), "{}", qemu_log(&dir));
    assert!(wait_gone(v.pid.unwrap(), Duration::from_secs(10)), "the vTPM outlived QEMU's quit");
    let stream = read_file(&file);
    assert!(!stream.windows(32).any(|w| w == &ek_y[..]), "plaintext TPM state (the EK's public key) in the migration stream");
    let blob_at = stream.windows(4).position(|w| w == b"XVTB").expect("no sealed state blob in the migration stream");

    // A tampered blob is refused; QEMU fails the load.
    let mut bad = stream.clone();
    bad[blob_at + 100] ^= 0x01;
    let bad_file = s.dir.path().join("tampered.migration");
    std::fs::write(&bad_file, &bad).unwrap();
    let (pid, _, r) = incoming(&s, &v, &ctrl, &bad_file, &s.dir.path().join("q2"));
    let st = r.err().expect("QEMU accepted a migration stream with a tampered TPM blob");
    assert!(!st.success());
    assert!(wait_gone(pid, Duration::from_secs(10)));
    assert!(s.vtpm_log(&v.uuid).contains("failed authentication"), "{}", s.vtpm_log(&v.uuid));

    // The real stream: a second vTPM process of the same identity resumes the TPM as it was.
    let (pid, port, r) = incoming(&s, &v, &ctrl, &file, &s.dir.path().join("q3"));
    let (mut qemu, mut q) = r.unwrap_or_else(|st| panic!("incoming migration failed ({st}):\n{}\n{}", qemu_log(&s.dir.path().join("q3")), s.vtpm_log(&v.uuid)));
    assert_eq!(pcr(port, 9), Some(mark), "PCR 9 lost in migration");
    assert_eq!(pcr(port, 0), Some(measured.unwrap()), "PCR 0 lost in migration");
    q.execute("quit");
    assert!(wait_exit(&mut qemu, Duration::from_secs(30)).success());
    assert!(wait_gone(pid, Duration::from_secs(10)));

    // The same stream again (a replay of older state) is refused.
    let (pid, _, r) = incoming(&s, &v, &ctrl, &file, &s.dir.path().join("q4"));
    let st = r.err().expect("QEMU loaded a replayed TPM state blob");
    assert!(!st.success());
    assert!(wait_gone(pid, Duration::from_secs(10)));
    assert!(s.vtpm_log(&v.uuid).contains("older than this vTPM's state"), "{}", s.vtpm_log(&v.uuid));
}

/// A migration's source side: a vTPM on xl-vtpm's layout (control + data sockets, so it outlives
/// a device model, and TCP for the test's own commands) and a QEMU on it that measured, got PCR 9
/// extended with `mark`, was paused and saved its state to `file` (Xen: xen-save-devices-state),
/// still running.
struct Source {
    ctrl: PathBuf,
    uuid: uuid::Uuid,
    pid: u32,
    port: u16,
    qemu: Child,
    qmp: Qmp,
    dir: PathBuf,
    file: PathBuf,
    /// PCR 9 after the extend
    mark: [u8; 32],
}

fn migrated_source(s: &Stack, mark: u8) -> Source {
    let ctrl = s.dir.path().join("vtpm.ctrl");
    let data = s.dir.path().join("vtpm.data");
    let (lc, ld) = (format!("ctrl:{}", ctrl.display()), format!("data:{}", data.display()));
    let j = s.xl_json(&["vtpm", "create", "--ek", "ecc", "--listen", &lc, "--listen", &ld, "--listen", "tcp:127.0.0.1:0"]);
    assert_eq!(j["state"], "running");
    let uuid: uuid::Uuid = j["uuid"].as_str().unwrap().parse().unwrap();
    let pid = j["runtime"]["pid"].as_u64().unwrap() as u32;
    let port = j["runtime"]["tcp_ports"][0][0].as_u64().unwrap() as u16;
    let dir = s.dir.path().join("source");
    std::fs::create_dir_all(&dir).unwrap();
    let (qemu, mut qmp) = start_qemu(&dir, &ctrl);
    let zero = [0u8; 32];
    until("SeaBIOS to measure into PCR 0", || pcr(port, 0).is_some_and(|p| p != zero));
    pcr_extend(port, 9, [mark; 32]);
    let mark = pcr(port, 9).unwrap();
    qmp.execute("stop");
    let file = s.dir.path().join("vm.migration");
    migrate_to_file(&mut qmp, &file, &dir);
    Source { ctrl, uuid, pid, port, qemu, qmp, dir, file, mark }
}

/// A Xen HVM guest's localhost migration, as libxl orders it: the source device model saves the
/// TPM's state and stays up; the destination's starts on the same control socket of the same
/// vTPM process (xl-vtpm's layout: control + data sockets, so the vTPM outlives a controller) and
/// loads it; then the source's ends, sending CMD_SHUTDOWN. That must not power the TPM off under
/// the moved guest. The last device model's shutdown still does.
#[test]
fn a_device_model_s_shutdown_leaves_the_tpm_to_the_other_one_connected() {
    let _one_qemu_test = one_qemu_test();
    let s = Stack::start();
    let Source { ctrl, uuid, pid, port, qemu: mut a, qmp: mut qa, dir: a_dir, file, mark } = migrated_source(&s, 0x5a);

    // the destination: a second device model on the same control socket loads it
    let b_dir = s.dir.path().join("destination");
    std::fs::create_dir_all(&b_dir).unwrap();
    let from = format!("exec:cat {}", file.display());
    let mut b = spawn_qemu(&b_dir, &ctrl, &["-incoming", &from]);
    until("the destination to load the state", || {
        assert!(b.try_wait().unwrap().is_none(), "the destination QEMU ended:\n{}\n{}", qemu_log(&b_dir), s.vtpm_log(&uuid));
        matches!(query_status(&b_dir.join("qmp.sock")).as_deref(), Some(st) if st != "inmigrate")
    });
    let mut qb = Qmp::connect(&b_dir.join("qmp.sock"), &mut b, &b_dir.join("qemu.log"), Duration::from_secs(30));
    assert_eq!(pcr(port, 9), Some(mark), "PCR 9 after the destination's load");

    // the source ends after the move: its CMD_SHUTDOWN leaves the TPM running for the destination
    qa.execute("quit");
    assert!(wait_exit(&mut a, Duration::from_secs(30)).success(), "{}", qemu_log(&a_dir));
    assert_eq!(pcr(port, 9), Some(mark), "the source's shutdown powered the TPM off under the moved guest:\n{}", s.vtpm_log(&uuid));
    assert!(s.vtpm_log(&uuid).contains("another is connected"), "{}", s.vtpm_log(&uuid));

    // the last device model's shutdown powers it off (the process stays for the next one)
    qb.execute("quit");
    assert!(wait_exit(&mut b, Duration::from_secs(30)).success(), "{}", qemu_log(&b_dir));
    until("the TPM to be powered off", || pcr(port, 9).is_none());
    assert!(!wait_gone(pid, Duration::from_millis(500)), "the vTPM process ended with its last device model");
}

/// A failed move: the source device model has saved the TPM's state and is paused; the
/// destination's starts on the same control socket, stops the TPM at its machine reset (QEMU
/// waits for the incoming state: `-incoming defer`) and dies before it loads anything (Xen: the
/// receiving side failed; libxl kills its device model). The source resumes: its TPM must run on
/// with everything it had (PCR 9's mark), not stay powered off under it.
#[test]
fn a_destination_that_dies_before_its_load_hands_the_tpm_back_to_the_source() {
    let _one_qemu_test = one_qemu_test();
    let s = Stack::start();
    let Source { ctrl, uuid, port, qemu: mut a, qmp: mut qa, dir: a_dir, mark, .. } = migrated_source(&s, 0xa5);

    // the destination: up, waiting for its state, the TPM stopped by its reset
    let b_dir = s.dir.path().join("destination");
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut b = spawn_qemu(&b_dir, &ctrl, &["-incoming", "defer"]);
    until("the destination to wait for its state", || {
        assert!(b.try_wait().unwrap().is_none(), "the destination QEMU ended:\n{}", qemu_log(&b_dir));
        query_status(&b_dir.join("qmp.sock")).as_deref() == Some("inmigrate")
    });
    assert_eq!(pcr(port, 9), None, "the destination's reset did not stop the TPM (the premise of this test)");

    // it dies: the TPM runs again for the source, with its state
    b.kill().unwrap();
    b.wait().unwrap();
    let mut back = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while back.is_none() && Instant::now() < deadline {
        back = pcr(port, 9);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(back, Some(mark), "the TPM stayed off (or lost PCR 9) after the destination died:\n{}", s.vtpm_log(&uuid));
    qa.execute("cont");
    assert_qemu_alive(&mut qa, &mut a, &a_dir, "after the failed move");
    pcr_extend(port, 9, [0x5a; 32]);
    assert_ne!(pcr(port, 9), Some(mark));
    assert!(s.vtpm_log(&uuid).contains("ended before it loaded"), "{}", s.vtpm_log(&uuid));
    qa.execute("quit");
    assert!(wait_exit(&mut a, Duration::from_secs(30)).success(), "{}", qemu_log(&a_dir));
    until("the TPM to be powered off", || pcr(port, 9).is_none());
}

/// A destination whose device model loaded the TPM's state and died before the guest ran (Xen:
/// `xl restore` failed after the device model started; the receiver keeps the saved guest for
/// `xl-vtpm migrate --finish`): on the same vTPM process the same saved state loads again, since
/// nothing of it changed — before, the load had raised the replay floor past it and the guest
/// could never be restored. Reads (QEMU's own start-up probe, PCR reads) leave it so; once the
/// TPM ran a command that changes its state, the same load is a replay and refused.
#[test]
fn a_restore_that_failed_after_its_load_loads_the_same_state_again() {
    let _one_qemu_test = one_qemu_test();
    let s = Stack::start();
    let Source { ctrl, uuid, pid, port, qemu: mut a, qmp: mut qa, dir: a_dir, file, mark } = migrated_source(&s, 0x3c);
    // the guest left: the source's device model ends (the TPM powers off, the process stays)
    qa.execute("quit");
    assert!(wait_exit(&mut a, Duration::from_secs(30)).success(), "{}", qemu_log(&a_dir));

    // loaded, then killed before anything ran on the TPM (this test sends nothing either)
    let b_dir = s.dir.path().join("b");
    let (mut b, _qb) = load_incoming(&ctrl, &file, &b_dir).unwrap_or_else(|st| panic!("the first load failed ({st}):\n{}\n{}", qemu_log(&b_dir), s.vtpm_log(&uuid)));
    b.kill().unwrap();
    b.wait().unwrap();

    // the retry loads the same state: the TPM runs as it was saved; reading it changes nothing
    for n in ["c", "c2"] {
        let c_dir = s.dir.path().join(n);
        let (mut c, _qc) = load_incoming(&ctrl, &file, &c_dir).unwrap_or_else(|st| panic!("{n}: the same state did not load again ({st}):\n{}\n{}", qemu_log(&c_dir), s.vtpm_log(&uuid)));
        assert_eq!(pcr(port, 9), Some(mark), "{n}: PCR 9 after the retried load");
        if n == "c2" {
            // the TPM moves on
            pcr_extend(port, 9, [0x11; 32]);
        }
        c.kill().unwrap();
        c.wait().unwrap();
    }

    // a command changed its state: the same state again is a replay (PCR 9 would roll back)
    let d_dir = s.dir.path().join("d");
    let st = load_incoming(&ctrl, &file, &d_dir).err().expect("QEMU loaded a state the TPM had run commands on");
    assert!(!st.success());
    assert!(s.vtpm_log(&uuid).contains("older than this vTPM's state"), "{}", s.vtpm_log(&uuid));
    assert!(!wait_gone(pid, Duration::from_millis(500)), "the vTPM process ended");
}

/// A manager on its own swtpm manufactured with an EK certificate: a second "host".
fn enrolled_host() -> Stack {
    Stack::start_with(xvtpm_tests::Options { ek_cert: true, ..Default::default() })
}

/// `migrate` to `file`; returns QEMU's reported downtime (ms) once completed.
fn migrate_to_file(q: &mut Qmp, file: &Path, dir: &Path) -> u64 {
    q.execute_with("migrate", serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) }));
    let mut downtime = None;
    until("the migration to complete", || {
        let m = q.execute("query-migrate");
        assert_ne!(m["status"], "failed", "{m}\n{}", qemu_log(dir));
        downtime = m["downtime"].as_u64();
        m["status"] == "completed"
    });
    downtime.expect("query-migrate reports no downtime")
}

/// The guest-less QEMU migrated to a file, its vTPM moved to another manager (sealed to that
/// host's TPM), and the stream loaded into a second QEMU on the vTPM under the new manager:
/// PCRs, NV and EK survive, and the first host's copy is retired. QEMU's downtime with our vTPM
/// and with plain swtpm (same QEMU, same run) is printed, not asserted.
#[test]
fn real_qemu_migrates_to_another_manager_with_the_vtpm_sealed_to_its_tpm() {
    let _one_qemu_test = one_qemu_test();
    let (a, b) = (enrolled_host(), enrolled_host());
    let (v, ctrl) = vtpm_for_qemu(&a);
    let port = v.port.unwrap();
    let dir = a.dir.path().join("q1");
    std::fs::create_dir_all(&dir).unwrap();
    let (mut qemu, mut q) = start_qemu(&dir, &ctrl);
    let zero = [0u8; 32];
    let mut measured = None;
    until("SeaBIOS to measure into PCR 0", || {
        measured = pcr(port, 0).filter(|p| *p != zero);
        measured.is_some()
    });
    pcr_extend(port, 9, [0x6b; 32]);
    let mark = pcr(port, 9).unwrap();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    xvtpm_tests::tpm2(&tcti, &["tpm2_nvdefine", "0x1500017", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite"]);
    let nv_in = a.dir.path().join("nv.in");
    std::fs::write(&nv_in, b"hostA->B").unwrap();
    xvtpm_tests::tpm2(&tcti, &["tpm2_nvwrite", "0x1500017", "-C", "o", "-i", nv_in.to_str().unwrap()]);
    let ek = xvtpm_tests::raw_command(port, &xvtpm_tests::read_public(0x8101_0002));
    assert_eq!(rc(&ek), 0, "EK ReadPublic");

    // While the guest runs: B is checked and offers a transfer key (nothing here needs the
    // vTPM stopped).
    let (d, uuid) = (a.dir.path(), v.uuid.to_string());
    let path = |f: &str| d.join(f).to_str().unwrap().to_string();
    let policy = path("policy.json");
    std::fs::write(&policy, format!("{{\"0\": \"{}\"}}", "00".repeat(32))).unwrap();
    let ca = b.ek_ca.as_ref().unwrap();
    let (root, inter) = (ca.root_cert().to_str().unwrap().to_string(), ca.intermediate_cert().to_str().unwrap().to_string());
    let xl_ok = |s: &Stack, args: &[&str]| {
        let out = s.xl(args);
        assert!(out.status.success(), "xl-vtpm {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    };
    xl_ok(&b, &["mgr", "enrollment", "--out", &path("material.json"), "--ek-intermediate", &inter]);
    xl_ok(&a, &["vtpm", "transfer", "challenge", &uuid, "--material", &path("material.json"), "--ek-ca", &root, "--host-pcrs-policy", &policy, "--out", &path("challenge.json")]);
    xl_ok(&b, &["vtpm", "transfer", "offer", "--challenge", &path("challenge.json"), "--ek-intermediate", &inter, "--out", &path("offer.json")]);

    let file = a.dir.path().join("vm.migration");
    let vtpm_downtime = migrate_to_file(&mut q, &file, &dir);
    q.execute("quit");
    assert!(wait_exit(&mut qemu, Duration::from_secs(30)).success(), "{}", qemu_log(&dir));
    assert!(wait_gone(v.pid.unwrap(), Duration::from_secs(10)), "the vTPM outlived QEMU's quit");
    a.stop_vtpm(&v.uuid);

    // The source QEMU has stopped: the identity moves A → B, sealed to B's TPM. This is what a
    // move between hosts adds to the guest's downtime.
    let transfer_started = Instant::now();
    xl_ok(&a, &[
        "vtpm", "transfer", "export", &uuid, "--offer", &path("offer.json"), "--ek-ca", &root, "--host-pcrs-policy", &policy, "--to-name", "host-b", "--out",
        &path("package.json"),
    ]);
    xl_ok(&b, &["vtpm", "transfer", "import", &path("package.json"), "--out", &path("receipt.json")]);
    let transfer_ms = transfer_started.elapsed().as_millis();
    xl_ok(&a, &["vtpm", "transfer", "commit", &uuid, "--receipt", &path("receipt.json")]);

    // The destination QEMU, on the vTPM started under manager B.
    let ctrl_b = b.dir.path().join("vtpm.ctrl");
    let (pid, port_b, r) = incoming(&b, &v, &ctrl_b, &file, &b.dir.path().join("q2"));
    let (mut qemu, mut q) = r.unwrap_or_else(|st| panic!("incoming migration failed ({st}):\n{}\n{}", qemu_log(&b.dir.path().join("q2")), b.vtpm_log(&v.uuid)));
    assert_eq!(pcr(port_b, 9), Some(mark), "PCR 9 lost in migration");
    assert_eq!(pcr(port_b, 0), Some(measured.unwrap()), "PCR 0 lost in migration");
    assert_eq!(xvtpm_tests::raw_command(port_b, &xvtpm_tests::read_public(0x8101_0002)), ek, "EK changed");
    let tcti_b = format!("swtpm:host=127.0.0.1,port={port_b}");
    assert_eq!(xvtpm_tests::tpm2(&tcti_b, &["tpm2_nvread", "0x1500017", "-C", "o", "-s", "8"]), "hostA->B");
    assert_qemu_alive(&mut q, &mut qemu, &b.dir.path().join("q2"), "after the incoming migration");
    q.execute("quit");
    assert!(wait_exit(&mut qemu, Duration::from_secs(30)).success());
    assert!(wait_gone(pid, Duration::from_secs(10)));

    // A's copy is retired.
    let again = a.xl(&["vtpm", "start", &v.uuid.to_string()]);
    assert_eq!(again.status.code(), Some(6), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("was transferred to host-b"), "{}", String::from_utf8_lossy(&again.stderr));

    // Plain swtpm, same QEMU, same run: migrate once SeaBIOS has extended a PCR (seen in
    // swtpm's command log).
    let sw_dir = testkit::tempdir();
    let log = sw_dir.path().join("swtpm.log");
    let sw_ctrl = sw_dir.path().join("swtpm.ctrl");
    std::fs::create_dir_all(sw_dir.path().join("state")).unwrap();
    let mut sw = Command::new("swtpm")
        .args(["socket", "--tpm2", "--terminate", "--ctrl"])
        .arg(format!("type=unixio,path={}", sw_ctrl.display()))
        .arg("--tpmstate")
        .arg(format!("dir={}", sw_dir.path().join("state").display()))
        .arg("--log")
        .arg(format!("file={},level=20", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn swtpm");
    until("swtpm to listen", || listening(&sw_ctrl));
    let qdir = sw_dir.path().join("q");
    std::fs::create_dir_all(&qdir).unwrap();
    let (mut qemu, mut q) = start_qemu(&qdir, &sw_ctrl);
    // TPM2_PCR_Extend's command code in swtpm's hex dump of a received command.
    until("SeaBIOS to extend a PCR on plain swtpm", || std::fs::read_to_string(&log).unwrap_or_default().contains("00 00 01 82"));
    let swtpm_downtime = migrate_to_file(&mut q, &sw_dir.path().join("vm.migration"), &qdir);
    // Only the figure matters here; the baseline QEMU may already be gone (seen once with swtpm
    // 0.7 after the migration completed), which this test does not judge.
    q.send("quit");
    let st = wait_exit(&mut qemu, Duration::from_secs(30));
    if !st.success() {
        eprintln!("baseline QEMU on plain swtpm exited with {st} after the migration:\n{}", qemu_log(&qdir));
    }
    let _ = sw.kill();
    let _ = sw.wait();
    eprintln!("MIGRATION-DOWNTIME (QEMU query-migrate, ms): xvtpm-vtpm={vtpm_downtime} plain-swtpm={swtpm_downtime}");
    eprintln!("MIGRATION-TRANSFER (transfer export on A + import on B after the source QEMU stopped, wall clock, ms): {transfer_ms}");
}
