//! `vtpmmgr serve` under a service manager: with `$NOTIFY_SOCKET` (systemd `Type=notify`)
//! it sends `READY=1` once its admin socket accepts, and `STOPPING=1` on SIGTERM.
//! A real manager on a real swtpm; the test plays systemd's side of the socket.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use xvtpm_tests::Stack;

#[test]
fn the_manager_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let mut s = Stack::start_unprovisioned();
    s.stop_manager();
    let notify = s.dir.path().join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = std::fs::remove_file(s.run_dir().join("admin.sock"));
    let mut mgr = s
        .mgr_command()
        .env("NOTIFY_SOCKET", &notify)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = rx
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification from vtpmmgr ({e}):\n{}", s.mgr_log()));
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1");
    // Ready means ready: the admin socket takes connections at once.
    UnixStream::connect(s.run_dir().join("admin.sock")).expect("admin socket after READY=1");
    kill(Pid::from_raw(mgr.id() as i32), Signal::SIGTERM).unwrap();
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "STOPPING=1");
    assert!(mgr.wait().unwrap().success());
}
