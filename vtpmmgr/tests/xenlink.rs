//! The manager's Xen link against a real manager (one swtpm per test) over the fake xenstore
//! and a page shared in memory with a `xen_platform::frontend::Frontend`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::Swtpm;
use uuid::Uuid;
use vtpm_proto::mgr::{self, AdminReply, AdminRequest, ErrorCode, VtpmReply, VtpmRequest};
use vtpmmgr::deepquote::BatchConfig;
use vtpmmgr::dispatch::{Dispatcher, Shared, lock};
use vtpmmgr::manager::{Config, Manager};
use vtpmmgr::peer::Peer;
use vtpmmgr::xenlink::XenLink;
use xen_platform::DomId;
use xen_platform::fake::{FakeFrontendLink, FakeFrontendTransport, FakeXenstore, MemTransport};
use xen_platform::frontend::{Frontend, FrontendConfig, FrontendError};

const ROOT: &str = "/local/domain/0/backend/vtpm";
const DOMID: u16 = 7;

fn be() -> String {
    be_of(DOMID)
}
fn be_of(domid: u16) -> String {
    format!("{ROOT}/{domid}/0")
}
fn fe_of(domid: u16) -> String {
    format!("/local/domain/{domid}/device/vtpm/0")
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The process-wide log capture (a thread-local default subscriber misses events whose
/// callsite interest another test thread cached first). Tests pick their lines by vTPM UUID.
fn logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .init();
        logs
    })
    .clone()
}

fn lines_about(logs: &Logs, uuid: Uuid, needle: &str) -> usize {
    logs.text()
        .lines()
        .filter(|l| l.contains(&uuid.to_string()) && l.contains(needle))
        .count()
}

struct World {
    _tpm: Swtpm,
    _dir: tempfile::TempDir,
    mgr: Shared,
    xs: FakeXenstore,
    mem: MemTransport,
    poke: Arc<tokio::sync::Notify>,
    vtpm: Uuid,
}

impl World {
    /// A provisioned manager with one vTPM, its Xen link running, and the toolstack's device
    /// for the vTPM domain `DOMID`.
    async fn start() -> World {
        let tpm = Swtpm::start();
        let dir = testkit::tempdir();
        let cfg = Config {
            tcti: tpm.tcti(),
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            vtpm_state_dir: dir.path().join("state"),
            batch: BatchConfig::default(),
        };
        let mut m = Manager::open(cfg).expect("open manager");
        assert!(matches!(
            m.admin(AdminRequest::Provision { pcrs: vec![16] }),
            AdminReply::Status(_)
        ));
        let vtpm = Uuid::new_v4();
        let created = m.admin(AdminRequest::VtpmCreate {
            group: None,
            uuid: Some(vtpm),
        });
        assert!(matches!(created, AdminReply::Vtpm(_)), "{created:?}");
        let mgr: Shared = Arc::new(Mutex::new(m));
        let dispatch = Dispatcher::new(mgr.clone());

        let (xs, _unused) = FakeXenstore::new();
        let (bxs, bev) = xs.client();
        let mem = MemTransport::new();
        let link = XenLink::new(bxs, bev, mem.clone(), ROOT, dispatch)
            .await
            .unwrap();
        let poke = link.poker();
        tokio::spawn(link.run());

        add_device(&xs, DOMID, vtpm);
        World {
            _tpm: tpm,
            _dir: dir,
            mgr,
            xs,
            mem,
            poke,
            vtpm,
        }
    }

    fn admin(&self, req: AdminRequest) -> AdminReply {
        let r = lock(&self.mgr).admin(req);
        self.poke.notify_one(); // what the daemon does after every admin request
        r
    }

    async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<Frontend<FakeXenstore, FakeFrontendLink>, FrontendError> {
        self.connect_as(DOMID, timeout).await
    }

    async fn connect_as(
        &self,
        domid: u16,
        timeout: Duration,
    ) -> Result<Frontend<FakeXenstore, FakeFrontendLink>, FrontendError> {
        let (fxs, mut fev) = self.xs.client();
        let mut t = FakeFrontendTransport::new(self.mem.clone(), DomId::new(domid).unwrap());
        let cfg = FrontendConfig {
            connect_timeout: timeout,
            request_timeout: Duration::from_secs(30),
            max_reply: mgr::MAX_FRAME,
        };
        Frontend::connect(Arc::new(fxs), &mut fev, &mut t, &fe_of(domid), cfg).await
    }
}

/// What libxl writes for vTPM domain `domid`'s `vtpm = ["backend=0,uuid=<vtpm>"]`.
fn add_device(xs: &FakeXenstore, domid: u16, vtpm: Uuid) {
    for (k, v) in [
        ("frontend", fe_of(domid)),
        ("frontend-id", domid.to_string()),
        ("online", "1".into()),
        ("state", "1".into()),
        ("handle", "0".into()),
        ("uuid", vtpm.to_string()),
    ] {
        xs.set(&format!("{}/{k}", be_of(domid)), &v);
    }
    for (k, v) in [
        ("backend", be_of(domid)),
        ("backend-id", "0".into()),
        ("state", "1".into()),
        ("handle", "0".into()),
    ] {
        xs.set(&format!("{}/{k}", fe_of(domid)), &v);
    }
}

async fn call(fe: &mut Frontend<FakeXenstore, FakeFrontendLink>, req: &VtpmRequest) -> VtpmReply {
    let reply = fe
        .transact(&mgr::encode(req).unwrap())
        .await
        .expect("transact");
    vtpm_proto::mgr_io::decode_frame(&reply).expect("reply decodes")
}

fn get_key(uuid: Uuid) -> VtpmRequest {
    VtpmRequest::GetStateKey {
        version: mgr::PROTOCOL_VERSION,
        uuid,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn only_the_attached_domain_gets_the_key() {
    let logs = logs();
    let w = World::start().await;

    // 1. Not attached: the device is not even taken, and the refusal is logged once.
    let err = w
        .connect(Duration::from_millis(700))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, FrontendError::Timeout { .. }), "{err}");
    assert_eq!(
        w.xs.history(&format!("{}/state", be())),
        ["1"],
        "the backend never touched the device"
    );
    assert_eq!(w.mem.live_connections(), 0);
    assert_eq!(
        lines_about(&logs, w.vtpm, "refused a tpmif link"),
        1,
        "{}",
        logs.text()
    );

    // 2. Attached to another domain: still refused.
    assert_eq!(
        w.admin(AdminRequest::VtpmAttachDomain {
            uuid: w.vtpm,
            domid: u32::from(DOMID) + 1
        }),
        AdminReply::Ok
    );
    assert!(w.connect(Duration::from_millis(700)).await.is_err());
    assert_eq!(w.mem.live_connections(), 0);
    // Re-attaching elsewhere needs a detach first; unknown vTPMs and dom0 are refused.
    assert!(
        matches!(w.admin(AdminRequest::VtpmAttachDomain { uuid: w.vtpm, domid: DOMID.into() }), AdminReply::Error(f) if f.code == ErrorCode::Exists)
    );
    assert!(
        matches!(w.admin(AdminRequest::VtpmAttachDomain { uuid: Uuid::new_v4(), domid: 9 }), AdminReply::Error(f) if f.code == ErrorCode::NotFound)
    );
    assert!(
        matches!(w.admin(AdminRequest::VtpmAttachDomain { uuid: w.vtpm, domid: 0 }), AdminReply::Error(f) if f.code == ErrorCode::BadRequest)
    );
    assert_eq!(
        w.admin(AdminRequest::VtpmDetach { uuid: w.vtpm }),
        AdminReply::Ok
    );

    // 3. Attached: the link connects and releases the key — the same key the socket path gives.
    assert_eq!(
        w.admin(AdminRequest::VtpmAttachDomain {
            uuid: w.vtpm,
            domid: DOMID.into()
        }),
        AdminReply::Ok
    );
    let mut fe = w
        .connect(Duration::from_secs(5))
        .await
        .expect("attached domain connects");
    let VtpmReply::StateKey { key, group } = call(&mut fe, &get_key(w.vtpm)).await else {
        panic!("no key")
    };
    assert_eq!(key.0.len(), 32);
    let pid = std::process::id();
    assert_eq!(
        w.admin(AdminRequest::VtpmAttach { uuid: w.vtpm, pid }),
        AdminReply::Ok
    );
    let VtpmReply::StateKey {
        key: via_socket,
        group: g2,
    } = lock(&w.mgr).state_key(&Peer::process(w.vtpm, Some(pid)), mgr::PROTOCOL_VERSION, w.vtpm)
    else {
        panic!("socket path refused")
    };
    assert_eq!((key, group), (via_socket, g2));

    // 4. Claiming another vTPM's UUID over the link: refused (the backend directory decides).
    let other = Uuid::new_v4();
    let r = call(&mut fe, &get_key(other)).await;
    assert!(
        matches!(&r, VtpmReply::Error(f) if f.code == ErrorCode::Refused),
        "{r:?}"
    );
    assert_eq!(
        lines_about(&logs, w.vtpm, "claimed another vTPM"),
        1,
        "{}",
        logs.text()
    );

    // 5. Garbage and stray CONTs get error frames, and the link keeps working.
    let garbage = [0, 0, 0, 3, b'{', b'x', b'}'];
    let r = fe.transact(&garbage).await.unwrap();
    assert!(
        matches!(mgr::decode::<VtpmReply>(&r[4..]).unwrap(), VtpmReply::Error(f) if f.code == ErrorCode::BadRequest)
    );
    assert!(matches!(
        call(&mut fe, &get_key(w.vtpm)).await,
        VtpmReply::StateKey { .. }
    ));

    // 6. Detached while connected: the next request is refused.
    assert_eq!(
        w.admin(AdminRequest::VtpmDetach { uuid: w.vtpm }),
        AdminReply::Ok
    );
    let r = call(&mut fe, &get_key(w.vtpm)).await;
    assert!(
        matches!(&r, VtpmReply::Error(f) if f.code == ErrorCode::NotAttached),
        "{r:?}"
    );
    fe.close().await;
}

#[tokio::test(flavor = "current_thread")]
async fn deep_quotes_over_the_link_are_answered_when_ready() {
    let w = World::start().await;
    assert_eq!(
        w.admin(AdminRequest::VtpmAttachDomain {
            uuid: w.vtpm,
            domid: DOMID.into()
        }),
        AdminReply::Ok
    );
    let mut fe = w.connect(Duration::from_secs(5)).await.unwrap();
    // Many vPCRs make the bundle (hex) large enough to need chunks.
    let vpcrs: Vec<u8> = (0..24).collect();
    let req = VtpmRequest::DeepQuote {
        uuid: w.vtpm,
        nonce: hex::encode([0x5a; 32]),
        vpcr_alg: 0x000b,
        vpcrs: vpcrs.clone(),
        vpcr_values: vpcrs.iter().map(|i| hex::encode([*i; 32])).collect(),
        host_pcrs: (0..24).collect(),
        flags: 0,
    };
    let frame = mgr::encode(&req).unwrap();
    let reply = fe.transact(&frame).await.expect("deep quote");
    eprintln!("deep-quote reply frame: {} bytes", reply.len());
    let VtpmReply::DeepQuote { bundle } = mgr::decode(&reply[4..]).unwrap() else {
        panic!("no bundle: {reply:?}")
    };
    let bundle = hex::decode(bundle).unwrap();
    assert!(!bundle.is_empty());
    // A state key right after (the link is idle again) and a second quote still work.
    assert!(matches!(
        call(&mut fe, &get_key(w.vtpm)).await,
        VtpmReply::StateKey { .. }
    ));
    assert!(matches!(
        call(&mut fe, &req).await,
        VtpmReply::DeepQuote { .. }
    ));
    // A deep quote claiming another vTPM is refused at once.
    let VtpmRequest::DeepQuote {
        nonce,
        vpcr_alg,
        vpcrs,
        vpcr_values,
        host_pcrs,
        flags,
        ..
    } = req
    else {
        unreachable!()
    };
    let forged = VtpmRequest::DeepQuote {
        uuid: Uuid::new_v4(),
        nonce,
        vpcr_alg,
        vpcrs,
        vpcr_values,
        host_pcrs,
        flags,
    };
    assert!(
        matches!(call(&mut fe, &forged).await, VtpmReply::Error(f) if f.code == ErrorCode::Refused)
    );
    fe.close().await;
}

/// A TCG default ECC P-256 EK public area (template L-2) around a software key, as TPM2B_PUBLIC.
fn ecc_ek(seed: u8) -> Vec<u8> {
    let sk = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
    let pt = sk.verifying_key().to_encoded_point(false);
    let mut t = hex::decode(
        "0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080004300100003001000\
         20",
    )
    .unwrap();
    t.extend_from_slice(pt.x().unwrap());
    t.extend_from_slice(&32u16.to_be_bytes());
    t.extend_from_slice(pt.y().unwrap());
    let mut b = (t.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(&t);
    b
}

#[tokio::test(flavor = "current_thread")]
async fn ek_certificates_over_the_link_only_for_the_attached_vtpm() {
    use vtpm_attest::ekcert;
    use vtpm_proto::ekcert::Certificate;
    use vtpm_proto::mgr::TpmInfo;
    let w = World::start().await;
    assert_eq!(w.admin(AdminRequest::VtpmAttachDomain { uuid: w.vtpm, domid: DOMID.into() }), AdminReply::Ok);
    let mut fe = w.connect(Duration::from_secs(5)).await.unwrap();
    let tpm = TpmInfo { manufacturer: 0x4942_4D00, model: "SW   TPM".into(), firmware_version: 1, family: "2.0".into(), level: 0, revision: 164 };
    let issue = |uuid: Uuid, ek: &[u8]| VtpmRequest::IssueEkCert { uuid, ek_public: hex::encode(ek), tpm: tpm.clone() };

    // Claiming another vTPM over this link: refused.
    let r = call(&mut fe, &issue(Uuid::new_v4(), &ecc_ek(1))).await;
    assert!(matches!(&r, VtpmReply::Error(f) if f.code == ErrorCode::Refused), "{r:?}");
    // Its own: a certificate of the group's CA for exactly that EK.
    let VtpmReply::EkCert { cert } = call(&mut fe, &issue(w.vtpm, &ecc_ek(1))).await else { panic!("no certificate") };
    let cert = Certificate::parse(&hex::decode(cert).unwrap()).unwrap();
    let AdminReply::GroupCa(ca) = w.admin(AdminRequest::GroupCa { group: "default".into() }) else { panic!("no CA") };
    let ca = Certificate::parse(&hex::decode(&ca.cert).unwrap()).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    ekcert::verify_ek_cert(&cert, &ca, now).unwrap();
    ekcert::check_ek_matches(&cert, &ecc_ek(1)).unwrap();
    // One EK per identity.
    let r = call(&mut fe, &issue(w.vtpm, &ecc_ek(2))).await;
    assert!(matches!(&r, VtpmReply::Error(f) if f.code == ErrorCode::Refused), "{r:?}");
    // Detached: not served.
    assert_eq!(w.admin(AdminRequest::VtpmDetach { uuid: w.vtpm }), AdminReply::Ok);
    let r = call(&mut fe, &issue(w.vtpm, &ecc_ek(1))).await;
    assert!(matches!(&r, VtpmReply::Error(f) if f.code == ErrorCode::NotAttached), "{r:?}");
    fe.close().await;
}

/// State anchors over the Xen link: deferred to the group-commit task like deep quotes, and the
/// same rules as on the socket — an older generation (or the same one with other contents) is
/// refused, naming both generations and the admin command.
#[tokio::test(flavor = "current_thread")]
async fn state_anchors_over_the_link() {
    let w = World::start().await;
    assert_eq!(w.admin(AdminRequest::VtpmAttachDomain { uuid: w.vtpm, domid: DOMID.into() }), AdminReply::Ok);
    let mut fe = w.connect(Duration::from_secs(5)).await.unwrap();
    let anchor = |uuid: Uuid, generation: u64, d: u8, opening: bool| VtpmRequest::AnchorState {
        uuid,
        generation,
        digest: hex::encode([d; 32]),
        opening,
    };
    let anchored = |g: u64| VtpmReply::StateAnchored { generation: g, continue_after: None };
    assert_eq!(call(&mut fe, &anchor(w.vtpm, 5, 1, true)).await, anchored(5));
    assert_eq!(call(&mut fe, &anchor(w.vtpm, 6, 2, false)).await, anchored(6));
    // The same state again (a restart after a clean stop): answered, nothing written.
    assert_eq!(call(&mut fe, &anchor(w.vtpm, 6, 2, true)).await, anchored(6));
    for (g, d) in [(5, 1), (6, 3)] {
        let r = call(&mut fe, &anchor(w.vtpm, g, d, true)).await;
        let VtpmReply::Error(f) = &r else { panic!("generation {g} accepted: {r:?}") };
        assert_eq!(f.code, ErrorCode::StaleState, "{r:?}");
        assert!(f.message.contains(&format!("generation {g}")) && f.message.contains("generation 6"), "{}", f.message);
        assert!(f.message.contains(&format!("xl-vtpm vtpm accept-state {} --yes", w.vtpm)), "{}", f.message);
    }
    // Another vTPM's UUID over this link: refused; a malformed digest: a bad request.
    let r = call(&mut fe, &anchor(Uuid::new_v4(), 9, 1, false)).await;
    assert!(matches!(&r, VtpmReply::Error(f) if f.code == ErrorCode::Refused), "{r:?}");
    let bad = VtpmRequest::AnchorState { uuid: w.vtpm, generation: 9, digest: "zz".into(), opening: false };
    assert!(matches!(call(&mut fe, &bad).await, VtpmReply::Error(f) if f.code == ErrorCode::BadRequest));
    // The anchor is in the store: it survives the manager.
    let AdminReply::Status(st) = w.admin(AdminRequest::Status) else { panic!("no status") };
    let c = st.store_counter.expect("provisioned");
    assert_eq!((c.anchor_requests, c.anchor_commits), (6, 2), "{c:?}");
    fe.close().await;
}

/// Continues a stopped process when dropped (also when the test fails).
struct Stopped(i32);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        let pid = pid as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGCONT);
    }
}

/// An EK certificate is a signature in the physical TPM. While one is being issued for one vTPM
/// domain — here the physical TPM (swtpm) is stopped, so the signature hangs — the link keeps
/// serving the others: the request runs on the blocking pool, as on the Unix sockets, not on the
/// link's own task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_ek_certificate_does_not_stall_the_link() {
    use vtpm_proto::mgr::TpmInfo;
    let w = World::start().await;
    assert_eq!(w.admin(AdminRequest::VtpmAttachDomain { uuid: w.vtpm, domid: DOMID.into() }), AdminReply::Ok);
    let other_dom = DOMID + 1;
    let other = Uuid::new_v4();
    assert!(matches!(w.admin(AdminRequest::VtpmCreate { group: None, uuid: Some(other) }), AdminReply::Vtpm(_)));
    assert_eq!(w.admin(AdminRequest::VtpmAttachDomain { uuid: other, domid: other_dom.into() }), AdminReply::Ok);
    add_device(&w.xs, other_dom, other);
    let mut fe = w.connect(Duration::from_secs(5)).await.unwrap();
    let mut fe_other = w.connect_as(other_dom, Duration::from_secs(5)).await.unwrap();

    let stopped = Stopped::stop(w._tpm.pid());
    let tpm = TpmInfo { manufacturer: 0x4942_4D00, model: "SW   TPM".into(), firmware_version: 1, family: "2.0".into(), level: 0, revision: 164 };
    let issue = VtpmRequest::IssueEkCert { uuid: w.vtpm, ek_public: hex::encode(ecc_ek(1)), tpm };
    let slow = tokio::spawn(async move {
        let r = call(&mut fe, &issue).await;
        (fe, r)
    });
    // The issue is under way once it holds the manager (waiting for the stopped TPM).
    while w.mgr.try_lock().is_ok() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The other domain is answered meanwhile (a malformed frame needs neither the manager nor
    // the TPM: only the link's task). The bound only keeps a regression from hanging the test.
    let garbage = [0, 0, 0, 3, b'{', b'x', b'}'];
    let r = tokio::time::timeout(Duration::from_secs(20), fe_other.transact(&garbage))
        .await
        .expect("the link answered nothing while an EK certificate was being issued")
        .unwrap();
    assert!(matches!(mgr::decode::<VtpmReply>(&r[4..]).unwrap(), VtpmReply::Error(f) if f.code == ErrorCode::BadRequest));
    assert!(w.mgr.try_lock().is_err(), "the EK certificate was issued before the TPM was continued");

    drop(stopped);
    let (fe, r) = slow.await.unwrap();
    assert!(matches!(&r, VtpmReply::EkCert { .. }), "{r:?}");
    fe.close().await;
    fe_other.close().await;
}

/// What the page layer rejects on the manager link is answered in the manager protocol (an error
/// frame the vTPM domain decodes like any reply), not with a TPM error packet.
#[test]
fn page_rejections_are_manager_error_frames() {
    use xen_platform::tpmif::Rejection;
    let answers = vtpmmgr::xenlink::rejections();
    for (why, code) in [(Rejection::CommandSize, ErrorCode::BadRequest), (Rejection::ResponseSize, ErrorCode::Internal)] {
        let frame = answers.answer(why);
        let len = mgr::frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4, "{why:?}: one whole frame");
        match mgr::decode::<VtpmReply>(&frame[4..]).unwrap() {
            VtpmReply::Error(f) => assert_eq!(f.code, code, "{why:?}: {f}"),
            other => panic!("{why:?}: {other:?}"),
        }
    }
}

/// The admin link of a manager in its own domain (`serve --admin-xen`), with the device
/// `vtpmmgr bridge` writes for it: dom0 gets admin answers, a reply larger than the page comes
/// in chunks, a malformed request gets an admin error, and a device whose frontend is another
/// domain is never served.
#[tokio::test(flavor = "current_thread")]
async fn the_admin_link_serves_dom0_only() {
    const MGR_DOMAIN: u32 = 3;
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let cfg = Config {
        tcti: tpm.tcti(),
        state_dir: dir.path().join("state"),
        run_dir: dir.path().join("run"),
        vtpm_state_dir: dir.path().join("state"),
        batch: BatchConfig::default(),
    };
    let mut m = Manager::open(cfg).expect("open manager");
    assert!(matches!(m.admin(AdminRequest::Provision { pcrs: vec![16] }), AdminReply::Status(_)));
    let mgr: Shared = Arc::new(Mutex::new(m));
    let (xs, _unused) = FakeXenstore::new();
    let (bxs, bev) = xs.client();
    let mem = MemTransport::new();
    let root = vtpmmgr::xenlink::admin_root(MGR_DOMAIN);
    let dispatch = Dispatcher::new(mgr.clone());
    let service = vtpmmgr::daemon::standalone_admin(dispatch.clone());
    let link = XenLink::new_admin(bxs, bev, mem.clone(), &root, dispatch, service).await.unwrap();
    tokio::spawn(link.run());
    let cfg = |timeout| FrontendConfig { connect_timeout: timeout, request_timeout: Duration::from_secs(30), max_reply: mgr::MAX_FRAME };

    // The bridge's device, frontend dom0.
    let fe_dir = vtpmmgr::bridge::make_device(&xs, MGR_DOMAIN, 0).await.unwrap();
    let (fxs, mut fev) = xs.client();
    let mut t = FakeFrontendTransport::new(mem.clone(), DomId::new(0).unwrap());
    let mut fe = Frontend::connect(Arc::new(fxs), &mut fev, &mut t, &fe_dir, cfg(Duration::from_secs(10))).await.expect("dom0's admin link connects");
    let ask = |req: AdminRequest| mgr::encode(&req).unwrap();
    let reply = fe.transact(&ask(AdminRequest::Status)).await.unwrap();
    match vtpm_proto::mgr_io::decode_frame::<AdminReply>(&reply).unwrap() {
        AdminReply::Status(s) => assert!(s.provisioned, "{s:?}"),
        other => panic!("status over the admin link: {other:?}"),
    }
    // Enough identities that the list does not fit one page.
    for _ in 0..24 {
        let r = fe.transact(&ask(AdminRequest::VtpmCreate { group: None, uuid: None })).await.unwrap();
        assert!(matches!(vtpm_proto::mgr_io::decode_frame::<AdminReply>(&r).unwrap(), AdminReply::Vtpm(_)));
    }
    let reply = fe.transact(&ask(AdminRequest::VtpmList)).await.unwrap();
    assert!(reply.len() > 4096, "the list is {} bytes: not a chunked reply", reply.len());
    match vtpm_proto::mgr_io::decode_frame::<AdminReply>(&reply).unwrap() {
        AdminReply::Vtpms { vtpms } => assert_eq!(vtpms.len(), 24),
        other => panic!("list over the admin link: {other:?}"),
    }
    assert_eq!(lock(&mgr).admin(AdminRequest::VtpmList), vtpm_proto::mgr_io::decode_frame::<AdminReply>(&reply).unwrap());
    let mut bad = 7u32.to_be_bytes().to_vec();
    bad.extend_from_slice(b"{\"op\":1");
    match vtpm_proto::mgr_io::decode_frame::<AdminReply>(&fe.transact(&bad).await.unwrap()).unwrap() {
        AdminReply::Error(f) => assert_eq!(f.code, ErrorCode::BadRequest, "{f:?}"),
        other => panic!("a malformed admin request: {other:?}"),
    }

    // The same device from domain 5 (which could not write there on Xen): never served.
    let be5 = format!("{root}/5/0");
    let fe5 = "/local/domain/5/device/xvtpm-admin/0";
    for (k, v) in [("frontend-id", "5"), ("uuid", &Uuid::new_v4().to_string()), ("online", "1"), ("state", "1"), ("frontend", fe5)] {
        xs.set(&format!("{be5}/{k}"), v);
    }
    for (k, v) in [("backend", be5.as_str()), ("backend-id", "3"), ("state", "1")] {
        xs.set(&format!("{fe5}/{k}"), v);
    }
    let (gxs, mut gev) = xs.client();
    let mut t5 = FakeFrontendTransport::new(mem.clone(), DomId::new(5).unwrap());
    let refused = Frontend::connect(Arc::new(gxs), &mut gev, &mut t5, fe5, cfg(Duration::from_secs(3))).await;
    assert!(matches!(refused, Err(FrontendError::Timeout { .. })), "domain 5's admin device: {:?}", refused.err());
    assert_ne!(xs.get(&format!("{be5}/state")).as_deref(), Some("2"), "the backend answered domain 5's device");
    // dom0's link still works.
    let reply = fe.transact(&ask(AdminRequest::Status)).await.unwrap();
    assert!(matches!(vtpm_proto::mgr_io::decode_frame::<AdminReply>(&reply).unwrap(), AdminReply::Status(_)));

    // dom0's vTPM processes, relayed by the bridge: only the attached process (as the bridge
    // names it: pid and start time in dom0) gets the key, until the bridge reports its exit.
    let AdminReply::Vtpms { vtpms } = lock(&mgr).admin(AdminRequest::VtpmList) else { panic!("list") };
    let (v, other) = (vtpms[0].uuid, vtpms[1].uuid);
    let relay = |pid: u32, start: u64, uuid: Uuid| ask(AdminRequest::VtpmRelay { uuid: v, pid, start, request: Box::new(get_key(uuid)) });
    let relayed = |frame: Vec<u8>| match vtpm_proto::mgr_io::decode_frame::<AdminReply>(&frame).unwrap() {
        AdminReply::Relayed { reply } => *reply,
        other => panic!("a relayed request: {other:?}"),
    };
    // A pid no process here has: the manager cannot (and must not) look it up.
    let (pid, start) = (4_000_000, 12345);
    match relayed(fe.transact(&relay(pid, start, v)).await.unwrap()) {
        VtpmReply::Error(f) => assert_eq!(f.code, ErrorCode::NotAttached, "{f:?}"),
        other => panic!("before the attachment: {other:?}"),
    }
    let r = fe.transact(&ask(AdminRequest::VtpmAttachRelayed { uuid: v, pid, start })).await.unwrap();
    assert_eq!(vtpm_proto::mgr_io::decode_frame::<AdminReply>(&r).unwrap(), AdminReply::Ok);
    assert!(matches!(relayed(fe.transact(&relay(pid, start, v)).await.unwrap()), VtpmReply::StateKey { .. }), "the attached process gets the key");
    for (p, st, u, code) in [(pid + 1, start, v, ErrorCode::Refused), (pid, start + 1, v, ErrorCode::Refused), (pid, start, other, ErrorCode::Refused)] {
        match relayed(fe.transact(&relay(p, st, u)).await.unwrap()) {
            VtpmReply::Error(f) => assert_eq!(f.code, code, "pid {p} start {st} claiming {u}: {f:?}"),
            r => panic!("pid {p} start {st} claiming {u} got {r:?}"),
        }
    }
    // Not persisted as a local process's attachment (its pid means nothing to this manager).
    let saved = std::fs::read_to_string(dir.path().join("run/attachments.json")).unwrap_or_default();
    assert!(!saved.contains(&v.to_string()), "{saved}");
    let r = fe.transact(&ask(AdminRequest::VtpmRelayedExited { uuid: v, pid, start })).await.unwrap();
    assert_eq!(vtpm_proto::mgr_io::decode_frame::<AdminReply>(&r).unwrap(), AdminReply::Ok);
    match relayed(fe.transact(&relay(pid, start, v)).await.unwrap()) {
        VtpmReply::Error(f) => assert_eq!(f.code, ErrorCode::NotAttached, "{f:?}"),
        other => panic!("after the exit: {other:?}"),
    }
    // An exit the manager never heard of (the link was down): the bridge's next attachment of
    // that vTPM replaces the stale one (the bridge refuses a second live process itself).
    let r = fe.transact(&ask(AdminRequest::VtpmAttachRelayed { uuid: v, pid, start })).await.unwrap();
    assert_eq!(vtpm_proto::mgr_io::decode_frame::<AdminReply>(&r).unwrap(), AdminReply::Ok);
    let r = fe.transact(&ask(AdminRequest::VtpmAttachRelayed { uuid: v, pid: pid + 7, start: start + 7 })).await.unwrap();
    assert_eq!(vtpm_proto::mgr_io::decode_frame::<AdminReply>(&r).unwrap(), AdminReply::Ok);
    assert!(matches!(relayed(fe.transact(&relay(pid + 7, start + 7, v)).await.unwrap()), VtpmReply::StateKey { .. }));
    assert!(matches!(relayed(fe.transact(&relay(pid, start, v)).await.unwrap()), VtpmReply::Error(f) if f.code == ErrorCode::Refused));
}
