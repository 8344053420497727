//! Frontend ⇄ backend round trips over the fake xenstore and one shared in-memory page.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::*;
use crate::fake::{FakeFrontendLink, FakeFrontendTransport, FakeXenstore, MemTransport};
use crate::ids::DevId;
use crate::xenbus::{Activity, Backend, BackendEvent, DeviceKey};

const ROOT: &str = "/local/domain/0/backend/vtpm";
const BE: &str = "/local/domain/0/backend/vtpm/7/0";
const FE: &str = "/local/domain/7/device/vtpm/0";
const UUID: &str = "5f0c2a9e-8d7b-4c61-a3e2-1b9f0d4c6e8a";

fn dom7() -> DomId {
    DomId::new(7).unwrap()
}

fn key7() -> DeviceKey {
    DeviceKey {
        frontend: dom7(),
        devid: DevId::new(0),
    }
}

/// What libxl writes for the vTPM domain's `vtpm = ["backend=0,uuid=…"]`.
fn toolstack_add(xs: &FakeXenstore) {
    for (k, v) in [
        ("frontend", FE),
        ("frontend-id", "7"),
        ("online", "1"),
        ("state", "1"),
        ("handle", "0"),
        ("uuid", UUID),
    ] {
        xs.set(&format!("{BE}/{k}"), v);
    }
    for (k, v) in [
        ("backend", BE),
        ("backend-id", "0"),
        ("state", "1"),
        ("handle", "0"),
    ] {
        xs.set(&format!("{FE}/{k}"), v);
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// The test backend's answer: a request body `"<n>"` gets a frame with an `n`-byte body of a
/// position-dependent pattern.
fn reply_for(request: &[u8]) -> Vec<u8> {
    let n: usize = std::str::from_utf8(&request[4..])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    frame(&pattern(n))
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

struct Setup {
    xs: FakeXenstore,
    mem: MemTransport,
    backend_events: mpsc::UnboundedReceiver<BackendEvent>,
    requests: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

/// Starts a backend (with an accept filter reading `accept`) on its own xenstore client and a
/// task serving it with a [`ReplyChunker`] per device.
async fn start_backend(accept: Arc<AtomicBool>) -> Setup {
    let (xs, _unused) = FakeXenstore::new();
    let (bxs, mut events) = xs.client();
    let mem = MemTransport::new();
    let mut backend =
        Backend::new(bxs, mem.clone(), ROOT, crate::tpmif::testing::rejections()).accept(move |_, _| accept.load(Ordering::SeqCst));
    backend.start().await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        let mut chunkers: HashMap<DeviceKey, ReplyChunker> = HashMap::new();
        loop {
            match backend.next(&mut events).await {
                Activity::Guest(key) => {
                    let chunker = chunkers.entry(key).or_default();
                    let mut handler = |cmd: &[u8], _loc: u8| {
                        seen.lock().unwrap().push(cmd.to_vec());
                        if ReplyChunker::is_cont(cmd) {
                            chunker
                                .next_chunk()
                                .unwrap_or_else(|| frame(b"no reply pending"))
                        } else {
                            chunker.start(reply_for(cmd))
                        }
                    };
                    let _ = backend.service(key, &mut handler).unwrap();
                }
                Activity::Xenstore(evs) => {
                    for ev in evs {
                        let _ = tx.send(ev);
                    }
                }
                Activity::GuestError(key, e) => panic!("{key}: {e}"),
                Activity::XenstoreClosed => return,
            }
        }
    });
    Setup {
        xs,
        mem,
        backend_events: rx,
        requests,
    }
}

fn cfg() -> FrontendConfig {
    FrontendConfig {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        max_reply: 1 << 20,
    }
}

async fn connect(
    s: &Setup,
    cfg: FrontendConfig,
) -> Result<Frontend<FakeXenstore, FakeFrontendLink>, FrontendError> {
    let (fxs, mut fev) = s.xs.client();
    let mut transport = FakeFrontendTransport::new(s.mem.clone(), dom7());
    Frontend::connect(Arc::new(fxs), &mut fev, &mut transport, FE, cfg).await
}

#[tokio::test]
async fn handshake_round_trips_and_close() {
    let s = start_backend(Arc::new(AtomicBool::new(true))).await;
    toolstack_add(&s.xs);
    let mut fe = connect(&s, cfg()).await.unwrap();
    assert_eq!(fe.backend_id(), DomId::DOM0);
    assert_eq!(fe.backend_path(), BE);
    assert_eq!(s.xs.get(&format!("{FE}/state")).as_deref(), Some("4"));
    assert_eq!(s.xs.get(&format!("{BE}/state")).as_deref(), Some("4"));
    assert_eq!(s.xs.get(&format!("{FE}/ring-ref")).as_deref(), Some("8"));
    assert_eq!(
        s.xs.get(&format!("{FE}/event-channel")).as_deref(),
        Some("20")
    );
    assert_eq!(
        s.xs.get(&format!("{FE}/feature-protocol-v2")).as_deref(),
        Some("1")
    );
    assert_eq!(s.xs.history(&format!("{FE}/state")), ["1", "3", "4"]);
    assert_eq!(s.mem.live_connections(), 1);

    for n in [0usize, 1, 100, 4084] {
        let reply = fe.transact(&frame(n.to_string().as_bytes())).await.unwrap();
        assert_eq!(reply, frame(&pattern(n)), "n = {n}");
    }

    fe.close().await;
    assert_eq!(
        s.xs.history(&format!("{FE}/state")),
        ["1", "3", "4", "5", "6"]
    );
    assert!(!s.xs.exists(&format!("{FE}/ring-ref")));
    assert!(!s.xs.exists(&format!("{FE}/event-channel")));
    // The backend unmaps on Closed and waits for a new frontend.
    wait_until(|| s.mem.live_connections() == 0).await;
    wait_until(|| s.xs.get(&format!("{BE}/state")).as_deref() == Some("2")).await;
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never became true");
}

#[tokio::test]
async fn replies_larger_than_a_page_are_chunked() {
    let s = start_backend(Arc::new(AtomicBool::new(true))).await;
    toolstack_add(&s.xs);
    let mut fe = connect(&s, cfg()).await.unwrap();
    // Totals around the chunk boundaries (4 + n): 4088, 4089, 8176, 8177, and an 8 KiB bundle.
    for n in [4084usize, 4085, 8172, 8173, 8192, 3 * 4088] {
        s.requests.lock().unwrap().clear();
        let reply = fe.transact(&frame(n.to_string().as_bytes())).await.unwrap();
        assert_eq!(reply.len(), 4 + n);
        assert_eq!(reply, frame(&pattern(n)), "n = {n}");
        let reqs = s.requests.lock().unwrap().clone();
        let chunks = (4 + n).div_ceil(MAX_PACKET);
        assert_eq!(reqs.len(), chunks, "n = {n}");
        assert!(reqs[1..].iter().all(|r| r == b"CONT"), "n = {n}");
    }
    // A new request in the middle of nothing still works (no stale remainder).
    assert_eq!(fe.transact(&frame(b"3")).await.unwrap(), frame(&pattern(3)));
    fe.close().await;
}

#[tokio::test]
async fn oversized_or_malformed_requests_are_refused_locally() {
    let s = start_backend(Arc::new(AtomicBool::new(true))).await;
    toolstack_add(&s.xs);
    let mut fe = connect(&s, cfg()).await.unwrap();
    let big = frame(&vec![b'1'; MAX_PACKET - 3]);
    assert!(matches!(
        fe.transact(&big).await,
        Err(FrontendError::RequestTooLarge { len }) if len == MAX_PACKET + 1
    ));
    let max = frame(&vec![b'1'; MAX_PACKET - 4]);
    assert_eq!(max.len(), MAX_PACKET);
    assert!(fe.transact(&max).await.is_ok(), "a full page is allowed");
    for bad in [&b""[..], b"\x00\x00", b"\x00\x00\x00\x05abc"] {
        assert!(matches!(
            fe.transact(bad).await,
            Err(FrontendError::BadFrame(_))
        ));
    }
    // Nothing reached the backend except the full-page request.
    assert_eq!(s.requests.lock().unwrap().len(), 1);
    fe.close().await;
}

#[tokio::test]
async fn reply_limit_is_checked_before_allocating() {
    let s = start_backend(Arc::new(AtomicBool::new(true))).await;
    toolstack_add(&s.xs);
    let mut fe = connect(
        &s,
        FrontendConfig {
            max_reply: 5000,
            ..cfg()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        fe.transact(&frame(b"5001")).await,
        Err(FrontendError::ReplyTooLarge {
            len: 5001,
            max: 5000
        })
    ));
    fe.close().await;
}

#[tokio::test]
async fn refused_frontend_domain_times_out_and_closes() {
    let accept = Arc::new(AtomicBool::new(false));
    let mut s = start_backend(accept.clone()).await;
    toolstack_add(&s.xs);
    let err = connect(
        &s,
        FrontendConfig {
            connect_timeout: Duration::from_millis(300),
            ..cfg()
        },
    )
    .await
    .err()
    .expect("a refused domain must not connect");
    assert!(matches!(err, FrontendError::Timeout { .. }), "{err}");
    // The backend never touched the device, and said so once.
    assert_eq!(s.xs.history(&format!("{BE}/state")), ["1"]);
    assert_eq!(s.mem.live_connections(), 0);
    let mut refused = 0;
    while let Ok(ev) = s.backend_events.try_recv() {
        match ev {
            BackendEvent::Refused { key, uuid } => {
                assert_eq!((key, uuid), (key7(), Uuid::parse_str(UUID).unwrap()));
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, 1, "reported exactly once");
    // The failed frontend cleaned up after itself.
    assert_eq!(s.xs.get(&format!("{FE}/state")).as_deref(), Some("6"));
    assert!(!s.xs.exists(&format!("{FE}/ring-ref")));

    // Once accepted (and the backend looks again), the same domain connects.
    accept.store(true, Ordering::SeqCst);
    s.xs.set(&format!("{FE}/state"), "1");
    s.xs.set(&format!("{BE}/online"), "1"); // any change under the backend dir re-evaluates
    let mut fe = connect(&s, cfg()).await.unwrap();
    assert_eq!(fe.transact(&frame(b"9")).await.unwrap(), frame(&pattern(9)));
    fe.close().await;
}

#[tokio::test]
async fn missing_device_directory_is_a_clear_error() {
    let s = start_backend(Arc::new(AtomicBool::new(true))).await;
    let err = connect(&s, cfg()).await.err().unwrap();
    assert!(
        matches!(&err, FrontendError::Missing { path } if path == &format!("{FE}/backend")),
        "{err}"
    );
    assert!(err.to_string().contains("vtpm = ["), "{err}");
}

#[tokio::test]
async fn share_failure_is_reported() {
    let s = start_backend(Arc::new(AtomicBool::new(true))).await;
    toolstack_add(&s.xs);
    let (fxs, mut fev) = s.xs.client();
    let mut transport = FakeFrontendTransport::new(s.mem.clone(), dom7());
    transport.fail_shares();
    let err = Frontend::connect(Arc::new(fxs), &mut fev, &mut transport, FE, cfg())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            FrontendError::Transport(TransportError::ShareGrant { .. })
        ),
        "{err}"
    );
}

#[tokio::test]
async fn closed_backend_is_an_error() {
    let s = start_backend(Arc::new(AtomicBool::new(false))).await;
    toolstack_add(&s.xs);
    s.xs.set(&format!("{BE}/state"), "6");
    let err = connect(&s, cfg()).await.err().unwrap();
    assert!(
        matches!(
            err,
            FrontendError::BackendClosed {
                state: XenbusState::Closed,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn drop_closes_the_device() {
    let s = start_backend(Arc::new(AtomicBool::new(true))).await;
    toolstack_add(&s.xs);
    let fe = connect(&s, cfg()).await.unwrap();
    drop(fe);
    wait_until(|| s.xs.get(&format!("{FE}/state")).as_deref() == Some("6")).await;
    wait_until(|| s.mem.live_connections() == 0).await;
}

#[test]
fn chunker_boundaries() {
    let mut c = ReplyChunker::new();
    assert_eq!(c.next_chunk(), None);
    let small = vec![1u8; MAX_PACKET];
    assert_eq!(c.start(small.clone()), small);
    assert_eq!(c.remaining(), 0);
    let big: Vec<u8> = (0..2 * MAX_PACKET + 1).map(|i| i as u8).collect();
    assert_eq!(c.start(big.clone()), big[..MAX_PACKET]);
    assert_eq!(c.next_chunk().unwrap(), big[MAX_PACKET..2 * MAX_PACKET]);
    assert_eq!(c.next_chunk().unwrap(), big[2 * MAX_PACKET..]);
    assert_eq!(c.next_chunk(), None);
    // A new reply discards an unsent remainder.
    c.start(big.clone());
    assert_eq!(c.start(vec![9; 4]), vec![9; 4]);
    assert_eq!(c.next_chunk(), None);
    assert!(ReplyChunker::is_cont(b"CONT") && !ReplyChunker::is_cont(b"CONTX"));
    // CONT is never a plausible frame prefix.
    assert!(u32::from_be_bytes(CONT) as usize > 1 << 20);
}
