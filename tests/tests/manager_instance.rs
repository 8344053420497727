//! The manager owns its directories and the physical TPM alone: a second `vtpmmgr serve` on
//! the same directories refuses (naming the first's pid) and leaves the first's sockets alone;
//! a manager killed with SIGKILL — repeatedly, in the middle of deep quotes — leaves transient
//! objects and sessions in a TPM without a resource manager (swtpm here, like `/dev/tpm0`),
//! and the next start cleans them up and serves.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vtpm_proto::deepquote_cmd::DeepQuoteCommand;
use vtpm_proto::mgr::{AdminReply, AdminRequest};
use xvtpm_tests::{Stack, mgr_call, raw_command, rc};

#[test]
fn a_second_manager_on_the_same_directories_refuses_and_touches_nothing() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let first = s.mgr_pid().unwrap();
    let admin = s.run_dir().join("admin.sock");
    let vsock = s.run_dir().join("vtpm").join(format!("{}.sock", v.uuid));
    let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let (admin_ino, vsock_ino) = (ino(&admin), ino(&vsock));

    let mut second = s.mgr_command().stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let Some(status) = status else {
        // It runs: stop it the normal way, which is what removed the first's sockets.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(second.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = second.wait();
        panic!(
            "a second manager started on the same directories; after it stopped: admin.sock exists: {}, vTPM socket exists: {}",
            admin.exists(),
            vsock.exists()
        );
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains(&format!("another vtpmmgr (pid {first})")), "{err}");
    // The first manager's sockets are the same files and it still serves on them.
    assert_eq!((ino(&admin), ino(&vsock)), (admin_ino, vsock_ino));
    assert!(matches!(mgr_call::<_, AdminReply>(&admin, &AdminRequest::Status), AdminReply::Status(_)));
    let dq = DeepQuoteCommand { nonce: vec![7; 16], vpcr_alg: 0x000B, vpcrs: vec![0], host_pcrs: vec![0], flags: 0 };
    assert_eq!(rc(&raw_command(v.port.unwrap(), &dq.encode())), 0, "{}", s.mgr_log());
}

#[test]
fn a_manager_killed_repeatedly_mid_operation_restarts_and_serves() {
    let mut s = Stack::start();
    let v = s.create_vtpm();
    let port = v.port.unwrap();
    let dq = DeepQuoteCommand { nonce: vec![1; 16], vpcr_alg: 0x000B, vpcrs: vec![0], host_pcrs: vec![0, 1], flags: 0 };
    for round in 0..5 {
        let stop = AtomicBool::new(false);
        let answered = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        if rc(&raw_command(port, &dq.encode())) == 0 {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            // Deep quotes are flowing (the TPM holds the SRK, an AK and sessions): kill now.
            let deadline = Instant::now() + Duration::from_secs(30);
            while answered.load(Ordering::Relaxed) < 3 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            s.kill9_manager();
            stop.store(true, Ordering::Relaxed);
        });
        assert!(answered.load(Ordering::Relaxed) >= 3, "round {round}: deep quotes were not served:\n{}", s.mgr_log());
        assert!(s.try_start_manager(), "round {round}: the manager did not restart after kill -9:\n{}", s.mgr_log());
    }
    // Right after a restart a request may still meet the killed manager's socket: the vTPM
    // answers TPM_RC_RETRY for that (transient), never a hard failure; a client's retry is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = rc(&raw_command(port, &dq.encode()));
    while last == vtpm_proto::deepquote_cmd::rc::RETRY && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        last = rc(&raw_command(port, &dq.encode()));
    }
    assert_eq!(last, 0, "{}", s.mgr_log());
    assert!(s.mgr_log().contains("flushed the transient objects and sessions"), "{}", s.mgr_log());
}
