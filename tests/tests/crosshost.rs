//! `xl-vtpm migrate-receive`, the destination's end of `xl-vtpm migrate GUEST HOST`, against a
//! real manager on a real swtpm: what a source (or anyone who reaches the transport) can make
//! it do. It relays only a move's destination requests to its manager, answers every bad
//! request with an error and keeps serving, refuses a guest its registry does not know before
//! anything is written, and prints nothing but frames on stdout. The Xen steps (restore,
//! attach, resume) run in the testbed's `migrate-xhost` phase.

use std::io::{Read, Write};
use std::process::{Child, Stdio};

use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, ErrorCode, MAX_FRAME, Refusal};
use vtpm_proto::mgr_io;
use xl_tools::crosshost::{RECEIVE_PROTOCOL, RecvReply, RecvRequest};
use xvtpm_tests::{Options, Stack};

struct Receiver {
    child: Child,
}

impl Receiver {
    fn start(s: &Stack) -> Receiver {
        Receiver::start_with(s, &[])
    }

    fn start_with(s: &Stack, env: &[(&str, &str)]) -> Receiver {
        let child = s
            .xl_command(&["migrate-receive"])
            .env("XVTPM_HOST", "host-b")
            .envs(env.iter().copied())
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

    /// `RecvRestore` of `size` bytes, answered `RecvOk`, then the bytes (the answer to them is
    /// the caller's to read).
    fn stream_saved(&mut self, guest: &str, vtpm: Uuid, size: u64) {
        assert!(matches!(self.recv(RecvRequest::RecvRestore { guest: guest.into(), vtpm, size }), RecvReply::RecvOk));
        let w = self.child.stdin.as_mut().unwrap();
        w.write_all(&vec![0x5a; size as usize]).unwrap();
        w.flush().unwrap();
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

/// A guest `guest` bound to a new vTPM in `b`'s registry (the pair a move's receiver expects);
/// returns the vTPM.
fn pair_in(b: &Stack, guest: &str) -> Uuid {
    let vtpm = Uuid::new_v4();
    let mut reg = xl_tools::registry::Registry::connect(&xl_tools::registry::Location::Sqlite(b.state_dir().join("registry.sqlite")), "host-b").unwrap();
    reg.begin_create(&xl_tools::registry::NewPair { guest_uuid: Uuid::new_v4(), guest_name: guest.into(), vtpm_uuid: vtpm, vtpm_domain: format!("vtpm-{guest}"), group: None }).unwrap();
    vtpm
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
    refused(rx.recv(RecvRequest::RecvIncoming { guest: "../g1".into(), vtpm, config: config.clone(), source_boot: String::new(), from_domid: 3, hvm: None, vtpm_domain: None }), 2, "is not a guest name");
    refused(rx.recv(RecvRequest::RecvIncoming { guest: "g1".into(), vtpm, config: config.clone(), source_boot: String::new(), from_domid: 3, hvm: None, vtpm_domain: None }), 6, "this host's registry has no guest g1");
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

/// The saved guest of a `--non-live` move streams to the receiver after its `RecvOk`; limits
/// are refused before a byte is read; a restore that fails, or a source that ends mid-stream,
/// leaves no file behind, and a conversation that ends before the guest arrived leaves no
/// config. (This machine has no Xen: `xl` is a path that does not exist, so the restore fails.)
#[test]
fn a_saved_guest_streams_to_the_receiver_and_a_failed_move_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let b = Stack::start_with(Options::default());
    let vtpm = pair_in(&b, "g1");
    let mut rx = Receiver::start_with(&b, &[("XVTPM_XL", "/nonexistent/xl")]);
    let config = format!("name = \"g1\"\nkernel = \"/boot/vmlinuz\"\nmemory = 128\nvtpm = [ \"backend=0,uuid={vtpm}\" ]\n");
    let incoming = |source_boot: &str| RecvRequest::RecvIncoming { guest: "g1".into(), vtpm, config: config.clone(), source_boot: source_boot.into(), from_domid: 3, hvm: None, vtpm_domain: None };
    // Another guest's config is refused.
    let other = RecvRequest::RecvIncoming { guest: "g1".into(), vtpm, config: config.replace("\"g1\"", "\"g2\""), source_boot: String::new(), from_domid: 3, hvm: None, vtpm_domain: None };
    refused(rx.recv(other), 2, "names another guest");
    assert!(matches!(rx.recv(incoming("")), RecvReply::RecvOk));
    let guests = b.run_dir().join("guests");
    for f in ["g1.cfg", "g1.incoming.cfg"] {
        let m = std::fs::metadata(guests.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let plain = std::fs::read_to_string(guests.join("g1.incoming.cfg")).unwrap();
    assert!(!plain.contains("vtpm"), "the incoming domain is made without its vTPM device: {plain}");
    refused(rx.recv(incoming("")), 6, "a receiver takes one guest");

    // Over the limit: refused before anything is read.
    refused(rx.recv(RecvRequest::RecvRestore { guest: "g1".into(), vtpm, size: xl_tools::crosshost::MAX_SAVE + 1 }), 6, "over this receiver's limit");
    // 4 MiB streamed; the restore fails (no Xen here) and the file goes.
    let save = b.state_dir().join("migrate-save").join(format!("{vtpm}.xlsave"));
    let size = 4 << 20;
    rx.stream_saved("g1", vtpm, size);
    refused(rx.answer(), 1, "/nonexistent/xl");
    assert!(!save.exists(), "a failed restore leaves no saved guest behind");

    // A source that ends mid-stream: the receiver ends, and removes the partial file and the
    // configs of a guest that never arrived.
    assert!(matches!(rx.recv(RecvRequest::RecvRestore { guest: "g1".into(), vtpm, size }), RecvReply::RecvOk));
    let w = rx.child.stdin.as_mut().unwrap();
    w.write_all(&vec![0x5a; 100_000]).unwrap();
    let (status, rest, err) = rx.finish();
    assert!(status.success(), "{status}: {err}");
    // Its answer (to no one) is the refusal; then the end of the conversation.
    let frame = mgr_io::read_frame(&mut &rest[..]).unwrap().expect("an answer");
    refused(vtpm_proto::mgr::decode(&frame).unwrap(), 1, "after 100000 of 4194304 bytes");
    assert!(!save.exists(), "the partial file is removed");
    for f in ["g1.cfg", "g1.incoming.cfg"] {
        assert!(!guests.join(f).exists(), "{f} left behind");
    }
}

/// An HVM guest (its device model emulates the TPM): the receiver gives the device model its
/// own socket of the vTPM and the guest's ACPI tables, keeps the saved guest without restoring it
/// (the device model would load the TPM's state before the vTPM's identity is here), and
/// removes it when the move ends before the identity arrived.
#[test]
fn an_hvm_guest_is_staged_until_its_vtpm_is_here() {
    let b = Stack::start_with(Options::default());
    let vtpm = pair_in(&b, "h1");
    let mut rx = Receiver::start_with(&b, &[("XVTPM_XL", "/nonexistent/xl")]);
    let config = "name = \"h1\"\ntype = \"hvm\"\nmemory = 256\ndevice_model_args_hvm = [ \"-no-hpet\" ]\n".to_string();
    let tables = hex::encode(b"TPM2 tables of the source");
    let hvm = |model: &str| Some(xl_tools::crosshost::HvmTpm { model: model.into(), acpi: Some(tables.clone()) });
    let incoming = |config: &str, model: &str| RecvRequest::RecvIncoming { guest: "h1".into(), vtpm, config: config.into(), source_boot: String::new(), from_domid: 3, hvm: hvm(model), vtpm_domain: None };
    refused(rx.recv(incoming(&config, "tpm-9000")), 2, "does not know");
    refused(rx.recv(incoming(&config.replace("\"hvm\"", "\"pvh\""), "crb")), 6, "cannot have its TPM here");
    assert!(matches!(rx.recv(incoming(&config, "crb")), RecvReply::RecvOk));
    let guests = b.run_dir().join("guests");
    let ctrl = b.run_dir().join("vtpms").join(vtpm.to_string()).join("tpm.sock.ctrl");
    for (f, name) in [("h1.cfg", "\"h1\""), ("h1.incoming.cfg", "\"h1--incoming\"")] {
        let c = std::fs::read_to_string(guests.join(f)).unwrap();
        assert!(c.contains(&format!("path={}", ctrl.display())) && c.contains("tpm-crb,tpmdev=xvtpm-tpm") && c.contains("-no-hpet"), "{f}: {c}");
        assert!(c.contains(&format!("acpi_firmware = \"{}\"", guests.join("h1.acpi").display())) && c.contains(name), "{f}: {c}");
    }
    assert_eq!(std::fs::read(guests.join("h1.acpi")).unwrap(), b"TPM2 tables of the source");
    // The saved guest is kept, not restored (xl is not even run).
    let save = b.state_dir().join("migrate-save").join(format!("{vtpm}.xlsave"));
    let size = 1 << 20;
    rx.stream_saved("h1", vtpm, size);
    assert!(matches!(rx.answer::<RecvReply>(), RecvReply::RecvStaged));
    assert_eq!(std::fs::metadata(&save).unwrap().len(), size);
    // The move ends before the identity arrived: the source keeps the guest; nothing stays here.
    let (status, _, err) = rx.finish();
    assert!(status.success(), "{status}: {err}");
    assert!(!save.exists(), "the staged guest is removed");
    for f in ["h1.cfg", "h1.incoming.cfg", "h1.acpi"] {
        assert!(!guests.join(f).exists(), "{f} left behind");
    }
}

/// The identity step of `xl-vtpm migrate GUEST HOST`, run again by `--finish` after a move cut
/// short: between two real managers on two swtpms and one registry, it completes from wherever
/// the earlier run stopped (after the export; after the import, its receipt lost) and is a
/// no-op once done — the vTPM runs on exactly one host, the registry names it.
#[test]
fn the_identity_step_completes_from_where_a_move_stopped() {
    use xl_tools::registry::{Location, NewPair, Registry};
    let (a, b) = (Stack::start_with(Options { ek_cert: true, ..Default::default() }), Stack::start_with(Options { ek_cert: true, ..Default::default() }));
    let db = Location::Sqlite(a.dir.path().join("fleet.sqlite"));
    let policy_file = a.dir.path().join("policy.json");
    std::fs::write(&policy_file, format!("{{\"0\": \"{0}\", \"7\": \"{0}\"}}", "00".repeat(32))).unwrap();
    let ca = b.ek_ca.as_ref().unwrap();
    let checks = xl_tools::crosshost::Checks {
        roots: xl_tools::transfer::read_certs(&[ca.root_cert()], "--ek-ca").unwrap(),
        intermediates: xl_tools::transfer::read_certs(&[ca.intermediate_cert()], "--ek-intermediate").unwrap(),
        policy: xl_tools::transfer::read_policy(&policy_file).unwrap(),
        group: None,
    };
    let local = xl_tools::local::Local { state_dir: a.state_dir(), run_dir: a.run_dir(), vtpm_domain: std::path::PathBuf::new(), sandbox: true };
    let mut src = xl_tools::admin::Admin::connect(&a.run_dir()).unwrap();
    let mut dst = xl_tools::admin::Admin::connect(&b.run_dir()).unwrap();
    let mut reg = Registry::connect(&db, "host-a").unwrap();

    for (i, stop_after) in ["export", "import", "done"].into_iter().enumerate() {
        let guest = format!("g{i}");
        let v = a.create_vtpm();
        xvtpm_tests::tpm2(&v.tcti(), &["tpm2_getrandom", "8"]);
        let id = reg.begin_create(&NewPair { guest_uuid: Uuid::new_v4(), guest_name: guest.clone(), vtpm_uuid: v.uuid, vtpm_domain: format!("vtpm-{guest}"), group: None }).unwrap();
        reg.mark_running(id, 7, 0).unwrap();
        a.stop_vtpm(&v.uuid);
        let offer = xl_tools::transfer::prepare(&mut src, &mut dst, v.uuid, None, &checks.roots, checks.intermediates.clone(), &checks.policy).unwrap();
        // The run that was cut short.
        match stop_after {
            "export" => {
                reg.mark_stopped(id).unwrap();
                reg.begin_move(v.uuid, "host-b", offer.offer_id).unwrap();
                xl_tools::transfer::export(&mut src, &local, v.uuid, offer.clone(), &checks.roots, &checks.policy, "host-b".into()).unwrap();
            }
            "import" => {
                reg.mark_stopped(id).unwrap();
                reg.begin_move(v.uuid, "host-b", offer.offer_id).unwrap();
                let pkg = xl_tools::transfer::export(&mut src, &local, v.uuid, offer.clone(), &checks.roots, &checks.policy, "host-b".into()).unwrap();
                xl_tools::transfer::import(&mut dst, pkg.clone()).unwrap();
                // What the finish reads from the destination's refusal: its class, not its prose.
                let again = xl_tools::transfer::import(&mut dst, pkg).unwrap_err();
                assert_eq!(again.refusal(), Some(Refusal::AlreadyImported), "{}", again.text());
            }
            _ => {
                xl_tools::crosshost::move_identity(&mut src, &local, &mut dst, &mut reg, &guest, "host-b", v.uuid, offer.clone(), &checks).unwrap();
            }
        }
        // The finish (and, for the last, a second one).
        let used = xl_tools::crosshost::move_identity(&mut src, &local, &mut dst, &mut reg, &guest, "host-b", v.uuid, offer.clone(), &checks)
            .unwrap_or_else(|e| panic!("cut after {stop_after}: {}", e.text()));
        assert_eq!(used.offer_id, offer.offer_id);
        let row = reg.get_by_name(&guest).unwrap().unwrap();
        assert_eq!(row.host, "host-b", "cut after {stop_after}: the registry names the destination");
        let o = a.xl(&["vtpm", "start", &v.uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]);
        assert_eq!(o.status.code(), Some(6), "cut after {stop_after}: the source refuses it");
        let w = Stack::handle(&b.xl_json(&["vtpm", "start", &v.uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]));
        xvtpm_tests::tpm2(&w.tcti(), &["tpm2_getrandom", "8"]);
        b.stop_vtpm(&v.uuid);
        if stop_after == "done" {
            // A commit whose removal of the state file here was lost: the source's manager
            // refuses the export as retired, and the finish goes on to the registry.
            std::fs::write(local.state_file(&v.uuid), b"left behind").unwrap();
            let e = xl_tools::transfer::export(&mut src, &local, v.uuid, offer.clone(), &checks.roots, &checks.policy, "host-b".into()).unwrap_err();
            assert_eq!(e.refusal(), Some(Refusal::Retired), "{}", e.text());
            xl_tools::crosshost::move_identity(&mut src, &local, &mut dst, &mut reg, &guest, "host-b", v.uuid, offer.clone(), &checks)
                .unwrap_or_else(|e| panic!("finish after a lost removal: {}", e.text()));
            assert_eq!(reg.get_by_name(&guest).unwrap().unwrap().host, "host-b");
        }
    }
}

/// One receiver per guest at a time: a `--finish`'s receiver waits until the receiver of the
/// cut-off move has ended (and cleaned up) before it looks for the guest.
#[test]
fn a_second_receiver_of_a_guest_waits_for_the_first() {
    let b = Stack::start_with(Options::default());
    let vtpm = pair_in(&b, "g1");
    let env = [("XVTPM_XL", "/nonexistent/xl")];
    let mut first = Receiver::start_with(&b, &env);
    let config = format!("name = \"g1\"\nkernel = \"/boot/vmlinuz\"\nmemory = 128\nvtpm = [ \"backend=0,uuid={vtpm}\" ]\n");
    assert!(matches!(first.recv(RecvRequest::RecvIncoming { guest: "g1".into(), vtpm, config, source_boot: String::new(), from_domid: 3, hvm: None, vtpm_domain: None }), RecvReply::RecvOk));
    let mut second = Receiver::start_with(&b, &env);
    second.send(&RecvRequest::RecvAdopt { guest: "g1".into(), vtpm, vtpm_domain: None });
    let waiter = std::thread::spawn(move || {
        let r: RecvReply = second.answer();
        (std::time::Instant::now(), r, second)
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let ended = std::time::Instant::now();
    let (status, _, err) = first.finish();
    assert!(status.success(), "{err}");
    let (answered, reply, second) = waiter.join().unwrap();
    assert!(answered > ended, "the second receiver answered while the first still served the guest");
    assert!(matches!(reply, RecvReply::RecvAdopted { domid: None, staged: false }), "{reply:?}");
    assert!(!b.run_dir().join("guests").join("g1.cfg").exists(), "the first receiver cleaned up before the second looked");
    let (status, _, err) = second.finish();
    assert!(status.success(), "{err}");
}

/// A guest whose vTPM runs in its own domain: the receiver will make that domain from this
/// host's kernel and ramdisk and attach it to this host's manager, so a host without them, a bad
/// domain name, an HVM guest (whose TPM is its device model's), or a manager that serves no vTPM
/// domains (no `--xen`: this machine has no Xen) is refused before anything is written. (The
/// move itself is the testbed's `migrate-xhost-dom`.)
#[test]
fn the_receiver_checks_it_can_make_the_guest_s_vtpm_domain_before_anything_moves() {
    use xl_tools::crosshost::{HvmTpm, VtpmDomainMove};
    let b = Stack::start_with(Options::default());
    let vtpm = pair_in(&b, "g1");
    let dir = tempfile::tempdir().unwrap();
    let (kernel, ramdisk) = (dir.path().join("vmlinuz"), dir.path().join("initrd.cpio"));
    let env = [("XVTPM_XL", "/nonexistent/xl"), ("XVTPM_VTPMDOM_KERNEL", kernel.to_str().unwrap()), ("XVTPM_VTPMDOM_RAMDISK", ramdisk.to_str().unwrap())];
    let config = format!("name = \"g1\"\nkernel = \"/boot/vmlinuz\"\nmemory = 128\nvtpm = [ \"backend=vtpm-g1,uuid={vtpm}\" ]\n");
    let incoming = |name: &str, hvm: Option<HvmTpm>| RecvRequest::RecvIncoming {
        guest: "g1".into(),
        vtpm,
        config: config.clone(),
        source_boot: String::new(),
        from_domid: 3,
        hvm,
        vtpm_domain: Some(VtpmDomainMove { name: name.into() }),
    };
    let cfg = b.run_dir().join("guests").join("g1.cfg");
    let mut rx = Receiver::start_with(&b, &env);
    refused(rx.recv(incoming("vtpm-g1", None)), 6, &format!("this host has no vTPM domain kernel ({}", kernel.display()));
    std::fs::write(&kernel, b"k").unwrap();
    refused(rx.recv(incoming("vtpm-g1", None)), 6, "no vTPM domain ramdisk");
    std::fs::write(&ramdisk, b"r").unwrap();
    refused(rx.recv(incoming("../vtpm", None)), 2, "is not a domain name");
    refused(rx.recv(incoming("vtpm-g1", Some(HvmTpm { model: "tis".into(), acpi: None }))), 2, "has no vTPM domain");
    refused(rx.recv(incoming("vtpm-g1", None)), 6, "run it with `vtpmmgr serve --xen`; nothing moved");
    assert!(!cfg.exists(), "nothing written for a refused guest");
    let (status, _, err) = rx.finish();
    assert!(status.success(), "{status}: {err}");
}
