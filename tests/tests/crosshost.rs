//! `xl-vtpm migrate-receive`, the destination's end of `xl-vtpm migrate GUEST HOST`, against a
//! real manager on a real swtpm: what a source (or anyone who reaches the transport) can make
//! it do. It relays only a move's destination requests to its manager, answers every bad
//! request with an error and keeps serving, refuses a guest its registry does not know before
//! anything is written, and prints nothing but frames on stdout. The Xen steps (restore,
//! attach, resume) run in the testbed's `migrate-xhost` phase.

use std::io::{Read, Write};
use std::process::{Child, Stdio};

use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, ErrorCode, MAX_FRAME};
use vtpm_proto::mgr_io;
use xl_tools::crosshost::{RECEIVE_PROTOCOL, RecvReply, RecvRequest};
use xvtpm_tests::{Options, Stack};

struct Receiver {
    child: Child,
}

impl Receiver {
    fn start(s: &Stack) -> Receiver {
        let child = s
            .xl_command(&["migrate-receive"])
            .env("XVTPM_HOST", "host-b")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xl-vtpm migrate-receive");
        Receiver { child }
    }

    fn send<T: serde::Serialize>(&mut self, msg: &T) {
        mgr_io::write_msg(self.child.stdin.as_mut().unwrap(), msg).expect("write to the receiver");
    }

    fn answer<T: serde::de::DeserializeOwned>(&mut self) -> T {
        let body = mgr_io::read_frame(self.child.stdout.as_mut().unwrap()).expect("a frame").expect("an answer, not the end");
        vtpm_proto::mgr::decode(&body).expect("a well-formed answer")
    }

    fn recv(&mut self, req: RecvRequest) -> RecvReply {
        self.send(&req);
        self.answer()
    }

    fn admin(&mut self, req: AdminRequest) -> AdminReply {
        self.send(&req);
        self.answer()
    }

    /// Closes stdin; returns the exit status, stdout's rest and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, Vec<u8>, String) {
        drop(self.child.stdin.take());
        let mut rest = Vec::new();
        self.child.stdout.take().unwrap().read_to_end(&mut rest).unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (self.child.wait().unwrap(), rest, err)
    }
}

fn refused(r: RecvReply, code: i32, what: &str) {
    match r {
        RecvReply::RecvError { code: c, message } => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(what), "expected {what:?} in {message:?}");
        }
        other => panic!("expected a refusal containing {what:?}, got {other:?}"),
    }
}

#[test]
fn the_receiver_relays_only_a_destinations_requests_and_refuses_unknown_guests() {
    let b = Stack::start_with(Options { ek_cert: true, ..Default::default() });
    let mut rx = Receiver::start(&b);

    // Its name in the registry, and the protocol check.
    match rx.recv(RecvRequest::RecvHello { protocol: RECEIVE_PROTOCOL }) {
        RecvReply::RecvHello { protocol, host } => assert_eq!((protocol, host.as_str()), (RECEIVE_PROTOCOL, "host-b")),
        other => panic!("{other:?}"),
    }
    refused(rx.recv(RecvRequest::RecvHello { protocol: RECEIVE_PROTOCOL + 1 }), 6, "run the same release on both hosts");

    // The destination's manager requests pass; nothing else does.
    assert!(matches!(rx.admin(AdminRequest::Status), AdminReply::Status(s) if s.transfer_protocol >= 2));
    assert!(matches!(rx.admin(AdminRequest::Enrollment), AdminReply::Enrollment(_)));
    for req in [AdminRequest::VtpmListPage { after: None }, AdminRequest::VtpmDel { uuid: Uuid::new_v4() }] {
        match rx.admin(req) {
            AdminReply::Error(f) => {
                assert_eq!(f.code, ErrorCode::Refused);
                assert!(f.message.contains("relays only the destination's transfer requests"), "{}", f.message);
            }
            other => panic!("relayed: {other:?}"),
        }
    }
    // A relayed request the manager refuses comes back as the manager's refusal.
    match rx.admin(AdminRequest::TransferReceipt { uuid: Uuid::new_v4() }) {
        AdminReply::Error(f) => assert_eq!(f.code, ErrorCode::NotFound, "{}", f.message),
        other => panic!("{other:?}"),
    }

    // Malformed frames are answered, and the receiver goes on serving.
    rx.send(&serde_json::json!({"NoSuchRequest": {}}));
    match rx.answer::<AdminReply>() {
        AdminReply::Error(f) => assert_eq!(f.code, ErrorCode::BadRequest, "{}", f.message),
        other => panic!("{other:?}"),
    }

    // A guest is checked before anything is written: its name, this host's registry.
    let vtpm = Uuid::new_v4();
    let config = "name = \"g1\"\nkernel = \"/boot/vmlinuz\"\nmemory = 128\nvtpm = [ \"backend=0,uuid=".to_string() + &vtpm.to_string() + "\" ]\n";
    refused(rx.recv(RecvRequest::RecvIncoming { guest: "../g1".into(), vtpm, config: config.clone(), source_boot: String::new(), from_domid: 3 }), 2, "is not a guest name");
    refused(rx.recv(RecvRequest::RecvIncoming { guest: "g1".into(), vtpm, config: config.clone(), source_boot: String::new(), from_domid: 3 }), 6, "this host's registry has no guest g1");
    assert!(!b.run_dir().join("guests").join("g1.cfg").exists(), "nothing written for a refused guest");
    // Steps of a move that was never announced.
    refused(rx.recv(RecvRequest::RecvRestore { guest: "g1".into(), vtpm, size: 1 << 20 }), 2, "was announced");
    refused(rx.recv(RecvRequest::RecvResume { guest: "g1".into(), vtpm, from_domid: 7, keep_tpm: true }), 2, "was announced");

    // The end of its stdin ends it cleanly; stdout carried only frames.
    let (status, rest, err) = rx.finish();
    assert!(status.success(), "{status}: {err}");
    assert!(rest.is_empty(), "stdout after the last answer: {:?}", String::from_utf8_lossy(&rest));
}

#[test]
fn an_oversized_frame_ends_the_receiver_without_answering() {
    let b = Stack::start_with(Options::default());
    let mut rx = Receiver::start(&b);
    let w = rx.child.stdin.as_mut().unwrap();
    w.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes()).unwrap();
    w.flush().unwrap();
    let (status, rest, err) = rx.finish();
    assert!(!status.success());
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(err.contains("the source's request"), "{err}");
}
