//! Descriptors passed over a vTPM's Unix control socket (SCM_RIGHTS) are owned and
//! closed: more than the one `CMD_SET_DATAFD` takes, or a truncated control message,
//! ends the connection without leaving a descriptor behind in the vTPM. Real
//! `sendmsg` of many descriptors, counted in `/proc/<pid>/fd`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use xvtpm_tests::{Stack, get_random, rc, read_response};

const CMD_GET_CAPABILITY: u32 = 0x01;
const CMD_SET_DATAFD: u32 = 0x10;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Sends `code` with `fds` attached; errors (the vTPM closed the connection) are ignored.
fn send_with_fds(c: &UnixStream, code: u32, fds: &[RawFd]) {
    let b = code.to_be_bytes();
    let _ = sendmsg::<()>(c.as_raw_fd(), &[std::io::IoSlice::new(&b)], &[ControlMessage::ScmRights(fds)], MsgFlags::empty(), None);
}

/// Waits until the vTPM's descriptor count is back to `want` (or 10 s pass).
fn settles_at(pid: u32, want: usize) -> Result<(), usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = open_fds(pid);
        if n <= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(n);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn passed_descriptors_are_always_closed() {
    let s = Stack::start();
    let ctrl = s.dir.path().join("c.sock");
    let listen = format!("ctrl:{}", ctrl.display());
    // With a data socket beside it the control socket is not QEMU's, whose hang-up ends the vTPM:
    // this test hangs up 50 times and keeps counting the same process's descriptors.
    let data = format!("data:{}", s.dir.path().join("d.sock").display());
    let v = Stack::handle(&s.xl_json(&["vtpm", "create", "--listen", "tcp:127.0.0.1:0", "--listen", &listen, "--listen", &data]));
    let pid = v.pid.unwrap();
    let before = open_fds(pid);

    // 50 connections, each CMD_SET_DATAFD with 10 descriptors (socket pairs).
    for _ in 0..50 {
        let c = UnixStream::connect(&ctrl).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let pairs: Vec<(UnixStream, UnixStream)> = (0..10).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<RawFd> = pairs.iter().map(|p| p.1.as_raw_fd()).collect();
        send_with_fds(&c, CMD_SET_DATAFD, &fds);
        // An error answer or the connection closed: either way, wait for the vTPM's verdict.
        let mut r = [0u8; 4];
        let _ = (&c).read(&mut r);
    }
    if let Err(n) = settles_at(pid, before) {
        panic!("the vTPM holds {} descriptors more than before 50 connections with 10 each", n - before);
    }

    // One connection passing a descriptor with every request, never CMD_SET_DATAFD: the
    // vTPM does not hoard them (the second one waiting is an error).
    let c = UnixStream::connect(&ctrl).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (_a, b) = UnixStream::pair().unwrap();
    for _ in 0..100 {
        send_with_fds(&c, CMD_GET_CAPABILITY, &[b.as_raw_fd()]);
    }
    if let Err(n) = settles_at(pid, before) {
        panic!("with the connection still open, the vTPM holds {} descriptors more", n - before);
    }
    let log = s.vtpm_log(&v.uuid);
    assert!(log.matches("closed a control connection").count() <= 15, "{log}");

    // QEMU's way still works: exactly one descriptor with CMD_SET_DATAFD.
    let c = UnixStream::connect(&ctrl).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut mine, theirs) = UnixStream::pair().unwrap();
    send_with_fds(&c, CMD_SET_DATAFD, &[theirs.as_raw_fd()]);
    let mut r = [0u8; 4];
    (&c).read_exact(&mut r).unwrap();
    assert_eq!(r, [0, 0, 0, 0], "CMD_SET_DATAFD refused");
    drop(theirs);
    mine.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    mine.write_all(&get_random(16)).unwrap();
    assert_eq!(rc(&read_response(&mut mine)), 0);
}
