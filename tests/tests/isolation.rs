//! A vTPM's state key goes only to the process attached to it, on its own
//! socket; a forged UUID or a foreign process is refused and logged.


use uuid::Uuid;
use vtpm_proto::mgr::{self, AdminReply, AdminRequest, ErrorCode, VtpmReply, VtpmRequest};
use xvtpm_tests::{Stack, mgr_call};

fn key_request(uuid: Uuid) -> VtpmRequest {
    VtpmRequest::GetStateKey { version: mgr::PROTOCOL_VERSION, uuid }
}

fn refused(r: VtpmReply, code: ErrorCode) {
    match r {
        VtpmReply::Error(f) => assert_eq!(f.code, code, "{}", f.message),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn keys_go_only_to_the_attached_process_on_its_own_socket() {
    let s = Stack::start();
    let a = s.create_vtpm();
    let b = s.create_vtpm();
    let admin = s.run_dir().join("admin.sock");
    let sock = |u: &Uuid| s.run_dir().join("vtpm").join(format!("{u}.sock"));

    // This test process is not vTPM B's process: B's socket refuses it,
    // whether it claims to be B or A.
    refused(mgr_call(&sock(&b.uuid), &key_request(b.uuid)), ErrorCode::Refused);
    refused(mgr_call(&sock(&b.uuid), &key_request(a.uuid)), ErrorCode::Refused);

    // A third identity attached to *this* process: its own key is released
    // (so refusals above are not a blanket "no"), but asking its socket for
    // A's key — a forged UUID — is refused.
    let c = match mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmCreate { group: None, uuid: None }) {
        AdminReply::Vtpm(v) => v.uuid,
        other => panic!("{other:?}"),
    };
    let me = std::process::id();
    assert_eq!(mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmAttach { uuid: c, pid: me }), AdminReply::Ok);
    let ka = match mgr_call::<_, VtpmReply>(&sock(&c), &key_request(c)) {
        VtpmReply::StateKey { key, .. } => key,
        other => panic!("own key refused: {other:?}"),
    };
    assert_eq!(ka.0.len(), 32);
    refused(mgr_call(&sock(&c), &key_request(a.uuid)), ErrorCode::Refused);
    // Attaching this process to A, which is served by a live process, is refused.
    match mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmAttach { uuid: a.uuid, pid: me }) {
        AdminReply::Error(f) => assert_eq!(f.code, ErrorCode::Exists),
        other => panic!("attach to a live vTPM accepted: {other:?}"),
    }
    // Keys differ per vTPM: C's key does not open A's state.
    let a_state = std::fs::read(&a.state_file).unwrap();
    let k: [u8; 32] = ka.0.as_slice().try_into().unwrap();
    assert!(vtpm_proto::sealed::open(&k, &a.uuid, &a_state).is_err());

    let log = s.mgr_log();
    assert!(log.contains("refused a vTPM request: caller claimed another vTPM's UUID"), "{log}");
    assert!(log.contains("refused a vTPM request: caller is not the attached process"), "{log}");
}

#[test]
fn admin_socket_is_root_only_and_unprovisioned_manager_serves_nothing() {
    let s = Stack::start_unprovisioned();
    let admin = s.run_dir().join("admin.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777, 0o600);
    match mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmCreate { group: None, uuid: None }) {
        AdminReply::Error(f) => assert_eq!(f.code, ErrorCode::NotProvisioned),
        other => panic!("{other:?}"),
    }
    let out = s.xl(&["vtpm", "create"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("xl-vtpm mgr provision"));
    // No vTPM sockets exist before provisioning.
    assert!(!s.run_dir().join("vtpm").exists() || std::fs::read_dir(s.run_dir().join("vtpm")).unwrap().count() == 0);
}
