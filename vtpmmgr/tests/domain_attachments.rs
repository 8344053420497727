//! Attachments and peers. A vTPM domain attachment survives a manager restart (the domain keeps running and must
//! still be able to reach the manager), dies with the vTPM identity, and a detach sticks.

use testkit::Swtpm;
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest};
use vtpmmgr::deepquote::BatchConfig;
use vtpmmgr::manager::{Config, Manager};
use vtpmmgr::peer::Peer;

fn cfg(tpm: &Swtpm, dir: &std::path::Path) -> Config {
    Config { tcti: tpm.tcti(), state_dir: dir.join("state"), run_dir: dir.join("run"), batch: BatchConfig::default() }
}

fn ok(r: AdminReply) {
    assert!(matches!(r, AdminReply::Ok | AdminReply::Vtpm(_) | AdminReply::Status(_)), "{r:?}");
}

#[test]
fn domain_attachments_survive_a_restart_and_follow_detach_and_delete() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    std::fs::create_dir_all(dir.path().join("run")).unwrap(); // the daemon makes it
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    {
        let mut m = Manager::open(cfg(&tpm, dir.path())).expect("open");
        ok(m.admin(AdminRequest::Provision { pcrs: vec![16] }));
        for u in [a, b] {
            ok(m.admin(AdminRequest::VtpmCreate { group: None, uuid: Some(u) }));
        }
        ok(m.admin(AdminRequest::VtpmAttachDomain { uuid: a, domid: 7 }));
        ok(m.admin(AdminRequest::VtpmAttachDomain { uuid: b, domid: 8 }));
    }
    {
        let mut m = Manager::open(cfg(&tpm, dir.path())).expect("reopen");
        assert_eq!(m.attached_domain(&a), Some(7));
        assert_eq!(m.attached_domain(&b), Some(8));
        assert!(m.authorize(&Peer::Domain { vtpm: a, domid: 7 }, a).is_ok());
        assert!(m.authorize(&Peer::Domain { vtpm: a, domid: 8 }, a).is_err(), "domain 8 is b's");
        ok(m.admin(AdminRequest::VtpmDetach { uuid: a }));
        ok(m.admin(AdminRequest::VtpmDel { uuid: b }));
    }
    let m = Manager::open(cfg(&tpm, dir.path())).expect("reopen again");
    assert_eq!(m.attached_domain(&a), None, "the detach was forgotten");
    assert_eq!(m.attached_domain(&b), None, "a deleted vTPM kept its domain");
}

/// A process peer is the attached process instance: its pid and its start time, as the socket
/// read them when it connected. The same pid with another start time (a later process that
/// obtained the pid) is refused, and so is a domain peer for a process-attached vTPM.
#[test]
fn a_process_peer_is_its_pid_and_start_time() {
    use vtpm_proto::mgr::ErrorCode;
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let a = Uuid::new_v4();
    let mut m = Manager::open(cfg(&tpm, dir.path())).expect("open");
    ok(m.admin(AdminRequest::Provision { pcrs: vec![16] }));
    ok(m.admin(AdminRequest::VtpmCreate { group: None, uuid: Some(a) }));
    let pid = std::process::id();
    ok(m.admin(AdminRequest::VtpmAttach { uuid: a, pid }));
    let me = Peer::process(a, Some(pid));
    assert!(matches!(me, Peer::Process { start: Some(_), .. }), "{me:?}");
    assert!(m.authorize(&me, a).is_ok());
    let Peer::Process { start: Some(start), .. } = me else { unreachable!() };
    let later = Peer::Process { vtpm: a, pid: Some(pid), start: Some(start + 1) };
    assert_eq!(m.authorize(&later, a).unwrap_err().code, ErrorCode::Refused);
    assert_eq!(m.authorize(&Peer::Domain { vtpm: a, domid: 7 }, a).unwrap_err().code, ErrorCode::NotAttached);
    assert_eq!(m.authorize(&me, Uuid::new_v4()).unwrap_err().code, ErrorCode::Refused);
}
