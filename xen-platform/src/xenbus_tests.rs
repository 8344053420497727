//! Backend state machine tests over the in-memory xenstore and transport.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::fake::{FakeChannel, FakeXenstore, MemTransport};
use crate::ids::ParseErrorKind;
use crate::tpmif::testing::rejections;
use crate::tpmif::{
    Completion, DATA_OFFSET, MemPage, OFFSET_LENGTH, OFFSET_STATE, PageState, Rejection,
};

const ROOT: &str = "/local/domain/0/backend/vtpm";
const BE: &str = "/local/domain/0/backend/vtpm/5/0";
const FE: &str = "/local/domain/5/device/vtpm/0";
const UUID: &str = "e2b1a7d4-3c5f-4b8e-9a61-0c2d4e6f8a10";

fn key() -> DeviceKey {
    DeviceKey {
        frontend: DomId::new(5).unwrap(),
        devid: DevId::new(0),
    }
}

fn dom5() -> DomId {
    DomId::new(5).unwrap()
}

struct Harness {
    xs: FakeXenstore,
    events: WatchEvents,
    transport: MemTransport,
    backend: Backend<FakeXenstore, MemTransport>,
}

impl Harness {
    async fn new() -> Self {
        Self::new_with(|b| b).await
    }

    async fn new_with(
        configure: impl FnOnce(
            Backend<FakeXenstore, MemTransport>,
        ) -> Backend<FakeXenstore, MemTransport>,
    ) -> Self {
        let (xs, events) = FakeXenstore::new();
        let transport = MemTransport::new();
        let mut backend = configure(Backend::new(
            xs.clone(),
            transport.clone(),
            format!("{ROOT}/"),
            rejections(),
        ));
        let initial = backend.start().await.unwrap();
        assert!(initial.is_empty(), "{initial:?}");
        let mut h = Harness {
            xs,
            events,
            transport,
            backend,
        };
        h.pump().await;
        h
    }

    /// Applies every pending watch event (including those our own writes cause).
    async fn pump(&mut self) -> Vec<BackendEvent> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let Some(ev) = self.events.try_next() else {
                return out;
            };
            out.extend(self.backend.handle_watch_event(ev).await);
        }
        panic!("watch events never settle: {out:?}");
    }

    /// What libxl writes for `vtpm = ["backend=0,uuid=…"]`.
    fn toolstack_add(&self) {
        for (k, v) in [
            ("frontend", FE),
            ("frontend-id", "5"),
            ("online", "1"),
            ("state", "1"),
            ("handle", "0"),
            ("uuid", UUID),
            ("resume", "False"),
        ] {
            self.xs.set(&format!("{BE}/{k}"), v);
        }
        for (k, v) in [
            ("backend", BE),
            ("backend-id", "0"),
            ("state", "1"),
            ("handle", "0"),
        ] {
            self.xs.set(&format!("{FE}/{k}"), v);
        }
    }

    /// What Linux xen-tpmfront does in `setup_ring` + switch to Initialised.
    fn guest_publish(&self, gref: u32, port: u32) -> (Arc<MemPage>, Arc<FakeChannel>) {
        let page = self.transport.grant_page(dom5(), GrantRef::new(gref));
        let chan = self
            .transport
            .alloc_port(dom5(), EvtchnPort::new(port).unwrap());
        self.xs.set(&format!("{FE}/ring-ref"), &gref.to_string());
        self.xs
            .set(&format!("{FE}/event-channel"), &port.to_string());
        self.xs.set(&format!("{FE}/feature-protocol-v2"), "1");
        self.xs.set(&format!("{FE}/state"), "3");
        (page, chan)
    }

    fn be(&self, k: &str) -> Option<String> {
        self.xs.get(&format!("{BE}/{k}"))
    }

    async fn connected() -> (Self, Arc<MemPage>, Arc<FakeChannel>) {
        Self::connected_with(|b| b).await
    }

    async fn connected_with(
        configure: impl FnOnce(
            Backend<FakeXenstore, MemTransport>,
        ) -> Backend<FakeXenstore, MemTransport>,
    ) -> (Self, Arc<MemPage>, Arc<FakeChannel>) {
        let mut h = Harness::new_with(configure).await;
        h.toolstack_add();
        h.pump().await;
        let (page, chan) = h.guest_publish(8, 17);
        let ev = h.pump().await;
        assert!(
            ev.iter()
                .any(|e| matches!(e, BackendEvent::Connected { .. })),
            "{ev:?}"
        );
        (h, page, chan)
    }

    /// Drives `Backend::next` until the guest's kick is served; returns the step outcome.
    async fn serve(&mut self, handler: &mut dyn FnMut(&[u8], u8) -> Vec<u8>) -> StepOutcome {
        loop {
            let act =
                tokio::time::timeout(Duration::from_secs(5), self.backend.next(&mut self.events))
                    .await
                    .expect("backend never woke");
            match act {
                Activity::Guest(k) => {
                    let out = self.backend.service(k, handler).unwrap();
                    if out != StepOutcome::Nothing {
                        return out;
                    }
                }
                Activity::Xenstore(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn submit(page: &MemPage, chan: &FakeChannel, cmd: &[u8]) {
    page.write_bytes(DATA_OFFSET, cmd).unwrap();
    page.write_u32_ne(OFFSET_LENGTH, cmd.len() as u32).unwrap();
    page.write_u8(OFFSET_STATE, PageState::Submit as u8)
        .unwrap();
    chan.kick();
}

fn read_response(page: &MemPage) -> Vec<u8> {
    let len = page.read_u32_ne(OFFSET_LENGTH).unwrap() as usize;
    let mut r = vec![0; len];
    page.read_bytes(DATA_OFFSET, &mut r).unwrap();
    r
}

/// A "TPM" that answers success and echoes the command body after its 10-byte header.
fn echo_tpm(cmd: &[u8], _locality: u8) -> Vec<u8> {
    let body = cmd.get(10..).unwrap_or(&[]);
    let mut r = vec![0x80, 0x01];
    r.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn handshake_initwait_to_connected() {
    let mut h = Harness::new().await;
    assert!(h.xs.watched().contains(&ROOT.to_owned()));
    h.toolstack_add();
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Added { key: k, uuid }] if *k == key() && uuid.to_string() == UUID),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("2"));
    assert_eq!(h.be("feature-protocol-v2").as_deref(), Some("1"));
    // feature-protocol-v2 is visible before InitWait.
    assert_eq!(h.xs.history(&format!("{BE}/state")), ["1", "2"]);
    assert!(h.xs.watched().contains(&FE.to_owned()));
    assert_eq!(h.transport.live_connections(), 0);

    let (_page, chan) = h.guest_publish(8, 17);
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Connected { key: k }] if *k == key()),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("4"));
    assert_eq!(h.be("ready").as_deref(), Some("1"));
    assert_eq!(h.transport.live_connections(), 1);
    assert!(chan.is_bound());
    let dev = h.backend.device(key()).unwrap();
    assert_eq!(dev.state(), XenbusState::Connected);
    assert_eq!(dev.frontend_path(), FE);
    assert!(dev.connection().is_some());

    // Re-reading an unchanged store changes nothing (level-triggered, idempotent).
    let before = h.xs.mutations();
    let ev = h.backend.rescan().await;
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(h.xs.mutations(), before);
}

#[tokio::test]
async fn frontend_skipping_initialised_connects_too() {
    // The Mini-OS frontend writes Connected(4) directly.
    let mut h = Harness::new().await;
    h.toolstack_add();
    h.pump().await;
    h.guest_publish(8, 17);
    h.xs.set(&format!("{FE}/state"), "4");
    h.pump().await;
    assert_eq!(h.be("state").as_deref(), Some("4"));
}

#[tokio::test]
async fn submit_round_trip_through_backend() {
    let (mut h, page, chan) = Harness::connected().await;
    let cmd = [
        0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x7b, 0xde, 0xad, 0xbe, 0xef,
    ];
    submit(&page, &chan, &cmd);
    let out = h.serve(&mut echo_tpm).await;
    assert_eq!(
        out,
        StepOutcome::NotifyGuest(Completion::Responded {
            command_len: 14,
            response_len: 14
        })
    );
    assert_eq!(page.read_u8(OFFSET_STATE).unwrap(), PageState::Finish as u8);
    assert_eq!(
        read_response(&page),
        [0x80, 0x01, 0, 0, 0, 14, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]
    );
    assert_eq!(chan.notifications(), 1);

    // A second command on the same connection.
    submit(&page, &chan, &[0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x44]);
    let out = h.serve(&mut echo_tpm).await;
    assert!(out.notify_guest());
    assert_eq!(chan.notifications(), 2);
}

#[tokio::test]
async fn garbage_length_via_backend_still_finishes() {
    for length in [0u32, 4089, 0xffff_ffff] {
        let (mut h, page, chan) = Harness::connected().await;
        page.write_u32_ne(OFFSET_LENGTH, length).unwrap();
        page.write_u8(OFFSET_STATE, PageState::Submit as u8)
            .unwrap();
        chan.kick();
        let out = h.serve(&mut |_, _| panic!("handler must not run")).await;
        assert_eq!(
            out,
            StepOutcome::NotifyGuest(Completion::CommandRejected { length })
        );
        assert_eq!(
            read_response(&page),
            rejections().answer(Rejection::CommandSize)
        );
        assert_eq!(chan.notifications(), 1);
    }
}

#[tokio::test]
async fn garbage_state_byte_is_reported_not_answered() {
    let (mut h, page, chan) = Harness::connected().await;
    // Consume the post-connect step first.
    let _ = h.backend.service(key(), &mut |_, _| unreachable!());
    page.write_u8(OFFSET_STATE, 0xa5).unwrap();
    chan.kick();
    let act = tokio::time::timeout(Duration::from_secs(5), h.backend.next(&mut h.events))
        .await
        .unwrap();
    assert!(matches!(act, Activity::Guest(k) if k == key()));
    let out = h
        .backend
        .service(key(), &mut |_, _| unreachable!())
        .unwrap();
    assert_eq!(out, StepOutcome::UnknownState(0xa5));
    assert_eq!(chan.notifications(), 0);
}

#[tokio::test]
async fn cancel_mid_command_still_completes_with_finish() {
    let (mut h, page, chan) = Harness::connected().await;
    submit(&page, &chan, &[0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x44]);
    let guest_page = page.clone();
    let out = h
        .serve(&mut |cmd, loc| {
            guest_page
                .write_u8(OFFSET_STATE, PageState::Cancel as u8)
                .unwrap();
            echo_tpm(cmd, loc)
        })
        .await;
    assert!(out.notify_guest());
    assert_eq!(page.read_u8(OFFSET_STATE).unwrap(), PageState::Finish as u8);
    assert_eq!(read_response(&page), [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]);

    // A CANCEL while idle is acknowledged with IDLE.
    page.write_u8(OFFSET_STATE, PageState::Cancel as u8)
        .unwrap();
    chan.kick();
    let out = h.serve(&mut |_, _| unreachable!()).await;
    assert_eq!(
        out,
        StepOutcome::NotifyGuest(Completion::CancelAcknowledged)
    );
    assert_eq!(page.read_u8(OFFSET_STATE).unwrap(), PageState::Idle as u8);
}

#[tokio::test]
async fn guest_vanishing_cleans_up() {
    let (mut h, _page, chan) = Harness::connected().await;
    // `xl destroy`: the guest's whole domain directory goes.
    h.xs.remove("/local/domain/5");
    let ev = h.pump().await;
    assert!(
        ev.iter()
            .any(|e| matches!(e, BackendEvent::Gone { key: k } if *k == key())),
        "{ev:?}"
    );
    assert_eq!(
        h.xs.history(&format!("{BE}/state")),
        ["1", "2", "4", "5", "6"]
    );
    assert!(!h.xs.exists(BE), "backend directory must be removed");
    assert_eq!(h.transport.live_connections(), 0);
    assert!(!chan.is_bound());
    assert!(h.backend.device(key()).is_none());
    assert!(!h.xs.watched().contains(&FE.to_owned()));
    assert!(h.xs.watched().contains(&ROOT.to_owned()));
}

#[tokio::test]
async fn vanishing_before_connect_cleans_up() {
    let mut h = Harness::new().await;
    h.toolstack_add();
    h.pump().await;
    h.xs.remove(FE);
    let ev = h.pump().await;
    assert!(
        ev.iter().any(|e| matches!(e, BackendEvent::Gone { .. })),
        "{ev:?}"
    );
    assert!(!h.xs.exists(BE));
}

#[tokio::test]
async fn close_returns_to_initwait_and_reconnect_works() {
    let (mut h, page, chan) = Harness::connected().await;
    h.xs.set(&format!("{FE}/state"), "5");
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Closing { .. }]),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("5"));
    // Our own Closing is not mistaken for a toolstack detach.
    assert!(h.backend.device(key()).unwrap().connection().is_some());

    h.xs.set(&format!("{FE}/state"), "6");
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Disconnected { .. }]),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("2"));
    assert_eq!(h.transport.live_connections(), 0);
    assert!(!chan.is_bound());
    drop(page);

    // kexec / module reload: the frontend starts again with a fresh ring.
    h.xs.set(&format!("{FE}/state"), "1");
    h.pump().await;
    assert_eq!(h.be("state").as_deref(), Some("2"));
    let (page2, chan2) = h.guest_publish(9, 18);
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Connected { .. }]),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("4"));
    submit(
        &page2,
        &chan2,
        &[0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8],
    );
    let out = h.serve(&mut echo_tpm).await;
    assert!(out.notify_guest());
    assert_eq!(
        read_response(&page2),
        [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0, 8]
    );
}

#[tokio::test]
async fn frontend_restart_without_close_disconnects() {
    let (mut h, _page, _chan) = Harness::connected().await;
    h.xs.set(&format!("{FE}/state"), "1");
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Disconnected { .. }]),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("2"));
    assert_eq!(h.transport.live_connections(), 0);
}

#[tokio::test]
async fn toolstack_detach_goes_to_closed_promptly() {
    let (mut h, _page, chan) = Harness::connected().await;
    // libxl__initiate_device_generic_remove: online=0 and state=5 on the backend.
    h.xs.set(&format!("{BE}/online"), "0");
    h.xs.set(&format!("{BE}/state"), "5");
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Detached { .. }]),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("6"));
    assert_eq!(h.transport.live_connections(), 0);
    assert!(!chan.is_bound());
    // The frontend reacting (Linux unregisters on backend Closed) changes nothing.
    h.xs.set(&format!("{FE}/state"), "6");
    assert!(h.pump().await.is_empty());
    assert_eq!(h.be("state").as_deref(), Some("6"));
    // libxl then removes both directories.
    h.xs.remove(FE);
    h.xs.remove(BE);
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Gone { .. }]),
        "{ev:?}"
    );
    assert!(h.backend.device(key()).is_none());
}

#[tokio::test]
async fn a_driver_domain_backend_removes_its_directory_after_a_detach() {
    let (mut h, _page, chan) = Harness::connected_with(|b| b.driver_domain(true)).await;
    h.xs.set(&format!("{BE}/online"), "0");
    h.xs.set(&format!("{BE}/state"), "5");
    let ev = h.pump().await;
    assert!(
        matches!(
            ev.as_slice(),
            [BackendEvent::Detached { .. }, BackendEvent::Gone { .. }]
        ),
        "{ev:?}"
    );
    assert_eq!(h.be("state"), None, "the backend directory must be gone");
    assert_eq!(h.transport.live_connections(), 0);
    assert!(!chan.is_bound());
    assert!(h.backend.device(key()).is_none());
}

#[test]
fn driver_domain_is_derived_from_the_root() {
    assert!(!is_driver_domain_root("/local/domain/0/backend/vtpm"));
    assert!(is_driver_domain_root("/local/domain/7/backend/vtpm"));
    assert!(!is_driver_domain_root("backend/vtpm"));
}

#[tokio::test]
async fn toolstack_state_5_alone_is_a_detach() {
    let (mut h, _page, _chan) = Harness::connected().await;
    h.xs.set(&format!("{BE}/state"), "5");
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Detached { .. }]),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("6"));
}

#[tokio::test]
async fn forced_backend_removal_releases_the_mapping() {
    let (mut h, _page, _chan) = Harness::connected().await;
    h.xs.remove(BE);
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Gone { .. }]),
        "{ev:?}"
    );
    assert_eq!(h.transport.live_connections(), 0);
}

fn parse_error(ev: &[BackendEvent]) -> &ParseError {
    match ev {
        [
            BackendEvent::Error {
                error: XenbusError::Parse(p),
                ..
            },
        ] => p,
        other => panic!("expected one parse error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_ring_ref_and_event_channel_are_clear_errors() {
    let mut h = Harness::new().await;
    h.toolstack_add();
    h.pump().await;
    h.transport.grant_page(dom5(), GrantRef::new(8));
    h.transport.alloc_port(dom5(), EvtchnPort::new(17).unwrap());
    h.xs.set(&format!("{FE}/feature-protocol-v2"), "1");
    h.xs.set(&format!("{FE}/event-channel"), "17");

    let ring_key = format!("{FE}/ring-ref");
    for (value, kind) in [
        ("abc", ParseErrorKind::NotDecimal { index: 0 }),
        ("-1", ParseErrorKind::NotDecimal { index: 0 }),
        (
            "99999999999",
            ParseErrorKind::OutOfRange {
                min: 0,
                max: u64::from(u32::MAX),
            },
        ),
    ] {
        h.xs.set(&ring_key, value);
        h.xs.set(&format!("{FE}/state"), "3");
        let ev = h.pump().await;
        let err = parse_error(&ev);
        assert_eq!(err.key(), ring_key);
        assert_eq!(err.value(), value);
        assert_eq!(err.kind(), kind);
        assert!(err.to_string().contains("ring-ref"), "{err}");
        assert_eq!(h.be("state").as_deref(), Some("2"));
        assert_eq!(h.transport.live_connections(), 0);
    }

    h.xs.set(&ring_key, "8");
    h.xs.set(&format!("{FE}/event-channel"), "");
    let err = parse_error(&h.pump().await).clone();
    assert_eq!(err.key(), format!("{FE}/event-channel"));
    assert_eq!(err.kind(), ParseErrorKind::Empty);

    h.xs.set(&format!("{FE}/event-channel"), "0");
    assert!(matches!(
        parse_error(&h.pump().await).kind(),
        ParseErrorKind::OutOfRange { .. }
    ));

    // Fixed values: the same device connects.
    h.xs.set(&format!("{FE}/event-channel"), "17");
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Connected { .. }]),
        "{ev:?}"
    );
}

#[tokio::test]
async fn missing_values_and_protocol_v1_are_errors() {
    let mut h = Harness::new().await;
    h.toolstack_add();
    h.pump().await;
    h.xs.set(&format!("{FE}/state"), "3");
    let ev = h.pump().await;
    assert!(
        matches!(
            ev.as_slice(),
            [BackendEvent::Error {
                error: XenbusError::ProtocolV2Required { value: None, .. },
                ..
            }]
        ),
        "{ev:?}"
    );
    h.xs.set(&format!("{FE}/feature-protocol-v2"), "0");
    let ev = h.pump().await;
    assert!(matches!(
        ev.as_slice(),
        [BackendEvent::Error {
            error: XenbusError::ProtocolV2Required { .. },
            ..
        }]
    ));
    h.xs.set(&format!("{FE}/feature-protocol-v2"), "1");
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Error { error: XenbusError::Missing { path }, .. }] if path.ends_with("/ring-ref")),
        "{ev:?}"
    );
    // Granted nothing: the map fails cleanly.
    h.xs.set(&format!("{FE}/ring-ref"), "77");
    h.xs.set(&format!("{FE}/event-channel"), "17");
    let ev = h.pump().await;
    assert!(
        matches!(
            ev.as_slice(),
            [BackendEvent::Error {
                error: XenbusError::Transport(TransportError::MapGrant { .. }),
                ..
            }]
        ),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("2"));
}

#[tokio::test]
async fn garbage_frontend_state_is_an_error_without_transition() {
    let (mut h, _page, _chan) = Harness::connected().await;
    for bad in ["banana", "9", "-4", "4 ", ""] {
        h.xs.set(&format!("{FE}/state"), bad);
        let err = parse_error(&h.pump().await).clone();
        assert_eq!(err.key(), format!("{FE}/state"));
        assert_eq!(h.be("state").as_deref(), Some("4"));
        assert_eq!(h.transport.live_connections(), 1);
    }
}

#[tokio::test]
async fn bad_backend_directory_is_rejected() {
    let mut h = Harness::new().await;
    // frontend-id disagrees with the path.
    h.toolstack_add();
    h.xs.set(&format!("{BE}/frontend-id"), "6");
    // (the toolstack's writes came one by one; only the settled state matters)
    let ev = h.pump().await;
    assert!(
        ev.iter().all(|e| matches!(
            e,
            BackendEvent::Error {
                error: XenbusError::FrontendIdMismatch { .. },
                ..
            }
        )),
        "{ev:?}"
    );
    assert_eq!(h.be("state").as_deref(), Some("1"));
    h.xs.set(&format!("{BE}/frontend-id"), "5");
    h.xs.set(&format!("{BE}/uuid"), "not-a-uuid");
    let ev = h.pump().await;
    assert!(
        ev.iter().all(|e| matches!(
            e,
            BackendEvent::Error {
                error: XenbusError::BadUuid { .. },
                ..
            }
        )),
        "{ev:?}"
    );
    h.xs.set(&format!("{BE}/uuid"), UUID);
    let ev = h.pump().await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Added { .. }]),
        "{ev:?}"
    );

    // Garbage device names under the root are reported, not fatal.
    h.xs.set(&format!("{ROOT}/abc/0/frontend"), FE);
    h.xs.set(&format!("{ROOT}/7/-1/frontend"), FE);
    let ev = h.pump().await;
    assert!(
        !ev.is_empty()
            && ev
                .iter()
                .all(|e| matches!(e, BackendEvent::Error { key: None, .. })),
        "{ev:?}"
    );
}

#[tokio::test]
async fn devices_present_before_start_are_picked_up() {
    let (xs, mut events) = FakeXenstore::new();
    let transport = MemTransport::new();
    let h0 = Harness {
        xs: xs.clone(),
        events: FakeXenstore::new().1,
        transport: transport.clone(),
        backend: Backend::new(xs.clone(), transport.clone(), ROOT, rejections()),
    };
    h0.toolstack_add();
    h0.guest_publish(8, 17);
    let mut backend = h0.backend;
    let ev = backend.start().await.unwrap();
    assert!(
        matches!(
            ev.as_slice(),
            [BackendEvent::Added { .. }, BackendEvent::Connected { .. }]
        ),
        "{ev:?}"
    );
    while let Some(e) = events.try_next() {
        backend.handle_watch_event(e).await;
    }
    assert_eq!(xs.get(&format!("{BE}/state")).as_deref(), Some("4"));
}

#[tokio::test]
async fn resync_after_event_overflow() {
    let mut h = Harness::new().await;
    h.toolstack_add();
    for i in 0..2 * crate::xenstore::MAX_PENDING_EVENTS {
        h.xs.set(&format!("{BE}/noise/{i}"), "x");
    }
    let first = h.events.try_next();
    assert_eq!(first, Some(WatchEvent::Resync));
    let ev = h.backend.handle_watch_event(WatchEvent::Resync).await;
    assert!(
        matches!(ev.as_slice(), [BackendEvent::Added { .. }]),
        "{ev:?}"
    );
    h.pump().await;
    assert_eq!(h.be("state").as_deref(), Some("2"));
}

#[tokio::test]
async fn two_guests_are_independent() {
    let (mut h, page, chan) = Harness::connected().await;
    // A second device for domain 7.
    let be7 = format!("{ROOT}/7/0");
    let fe7 = "/local/domain/7/device/vtpm/0";
    for (k, v) in [
        ("frontend", fe7),
        ("frontend-id", "7"),
        ("online", "1"),
        ("state", "1"),
        ("uuid", UUID),
    ] {
        h.xs.set(&format!("{be7}/{k}"), v);
    }
    h.xs.set(&format!("{fe7}/state"), "1");
    h.pump().await;
    let d7 = DomId::new(7).unwrap();
    let page7 = h.transport.grant_page(d7, GrantRef::new(8));
    let chan7 = h.transport.alloc_port(d7, EvtchnPort::new(17).unwrap());
    for (k, v) in [
        ("ring-ref", "8"),
        ("event-channel", "17"),
        ("feature-protocol-v2", "1"),
        ("state", "3"),
    ] {
        h.xs.set(&format!("{fe7}/{k}"), v);
    }
    h.pump().await;
    assert_eq!(h.xs.get(&format!("{be7}/state")).as_deref(), Some("4"));
    assert_eq!(h.transport.live_connections(), 2);

    submit(
        &page7,
        &chan7,
        &[0x80, 0x01, 0, 0, 0, 11, 0, 0, 0x01, 0x44, 7],
    );
    let out = h.serve(&mut echo_tpm).await;
    assert!(out.notify_guest());
    assert_eq!(
        read_response(&page7),
        [0x80, 0x01, 0, 0, 0, 11, 0, 0, 0, 0, 7]
    );
    assert_eq!(chan7.notifications(), 1);
    assert_eq!(chan.notifications(), 0);
    assert_eq!(page.read_u8(OFFSET_STATE).unwrap(), PageState::Idle as u8);

    // Domain 5 disappears; domain 7 keeps working.
    h.xs.remove("/local/domain/5");
    h.pump().await;
    assert_eq!(h.transport.live_connections(), 1);
    assert_eq!(h.xs.get(&format!("{be7}/state")).as_deref(), Some("4"));
}

#[tokio::test]
async fn a_backend_bound_to_one_vtpm_leaves_other_devices_untouched() {
    let (xs, mut events) = FakeXenstore::new();
    let transport = MemTransport::new();
    let other = Uuid::parse_str("0b6e9d3a-1111-4222-8333-944455556666").unwrap();
    let mut backend = Backend::new(xs.clone(), transport.clone(), ROOT, rejections()).only_uuid(other);
    backend.start().await.unwrap();
    for (k, v) in [
        ("frontend", FE),
        ("frontend-id", "5"),
        ("online", "1"),
        ("state", "1"),
        ("uuid", UUID),
    ] {
        xs.set(&format!("{BE}/{k}"), v);
    }
    xs.set(&format!("{FE}/state"), "1");
    while let Some(ev) = events.try_next() {
        backend.handle_watch_event(ev).await;
    }
    // Not ours: no InitWait, no feature flag, no device.
    assert_eq!(xs.get(&format!("{BE}/state")).as_deref(), Some("1"));
    assert_eq!(xs.get(&format!("{BE}/feature-protocol-v2")), None);
    assert_eq!(backend.devices().count(), 0);
    // The same device with our UUID is served.
    xs.set(&format!("{BE}/uuid"), &other.to_string());
    while let Some(ev) = events.try_next() {
        backend.handle_watch_event(ev).await;
    }
    assert_eq!(xs.get(&format!("{BE}/state")).as_deref(), Some("2"));
}

#[tokio::test]
async fn accept_filter_refuses_once_and_is_re_evaluated_on_rescan() {
    use std::sync::Mutex;
    let (xs, mut events) = FakeXenstore::new();
    let transport = MemTransport::new();
    let allowed: Arc<Mutex<Option<(DomId, Uuid)>>> = Arc::new(Mutex::new(None));
    let consulted = allowed.clone();
    let mut backend = Backend::new(xs.clone(), transport.clone(), ROOT, rejections())
        .accept(move |domid, uuid| *consulted.lock().unwrap() == Some((domid, uuid)));
    backend.start().await.unwrap();
    for (k, v) in [
        ("frontend", FE),
        ("frontend-id", "5"),
        ("online", "1"),
        ("state", "1"),
        ("uuid", UUID),
    ] {
        xs.set(&format!("{BE}/{k}"), v);
    }
    xs.set(&format!("{FE}/state"), "1");
    let mut seen = Vec::new();
    while let Some(ev) = events.try_next() {
        seen.extend(backend.handle_watch_event(ev).await);
    }
    let uuid = Uuid::parse_str(UUID).unwrap();
    let refused: Vec<_> = seen
        .iter()
        .filter(|e| matches!(e, BackendEvent::Refused { .. }))
        .collect();
    assert_eq!(refused.len(), 1, "{seen:?}");
    assert!(
        matches!(refused[0], BackendEvent::Refused { key: k, uuid: u } if *k == key() && *u == uuid)
    );
    assert_eq!(seen.len(), 1, "nothing else happened: {seen:?}");
    assert_eq!(xs.get(&format!("{BE}/state")).as_deref(), Some("1"));
    assert_eq!(xs.get(&format!("{BE}/feature-protocol-v2")), None);
    assert_eq!(backend.refused().collect::<Vec<_>>(), [(key(), uuid)]);
    // Rescans and directory changes do not repeat the report.
    assert!(backend.rescan().await.is_empty());
    // The filter now accepts (e.g. the domain was attached): a rescan picks the device up.
    *allowed.lock().unwrap() = Some((dom5(), uuid));
    let ev = backend.rescan().await;
    assert!(
        ev.iter().any(|e| matches!(e, BackendEvent::Added { .. })),
        "{ev:?}"
    );
    assert_eq!(xs.get(&format!("{BE}/state")).as_deref(), Some("2"));
    assert_eq!(backend.refused().count(), 0);
}

#[tokio::test]
async fn accept_filter_sees_a_verified_frontend_id() {
    let (xs, mut events) = FakeXenstore::new();
    let transport = MemTransport::new();
    let mut backend =
        Backend::new(xs.clone(), transport.clone(), ROOT, rejections()).accept(|_, _| panic!("filter consulted"));
    backend.start().await.unwrap();
    // frontend-id disagreeing with the path is an error before the filter runs.
    for (k, v) in [("frontend", FE), ("frontend-id", "6"), ("uuid", UUID)] {
        xs.set(&format!("{BE}/{k}"), v);
    }
    let mut seen = Vec::new();
    while let Some(ev) = events.try_next() {
        seen.extend(backend.handle_watch_event(ev).await);
    }
    assert!(
        seen.iter().any(|e| matches!(
            e,
            BackendEvent::Error {
                error: XenbusError::FrontendIdMismatch { .. },
                ..
            }
        )),
        "{seen:?}"
    );
}

const GET_RANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];

/// Waits for the backend's next guest activity and takes it.
async fn next_take(h: &mut Harness) -> Take {
    loop {
        let act = tokio::time::timeout(Duration::from_secs(5), h.backend.next(&mut h.events))
            .await
            .expect("backend never woke");
        match act {
            Activity::Guest(k) => match h.backend.take(k).unwrap() {
                Take::Stepped(StepOutcome::Nothing) => continue,
                other => return other,
            },
            Activity::Xenstore(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits for the next request and takes it (anything else taken first fails the test).
async fn next_request(h: &mut Harness) -> Request {
    match next_take(h).await {
        Take::Request(r) => r,
        other => panic!("expected a request, took {other:?}"),
    }
}

#[tokio::test]
async fn a_cancel_while_a_taken_request_is_answered_later_still_gets_finish() {
    // An answer that comes later (a deep quote waiting for the manager) and a guest that gives
    // up meanwhile: its CANCEL must still end in FINISH. Before tickets, vtpm-domain's deferred
    // path compared the page with the request it had copied, saw CANCEL instead, and wrote
    // nothing: the page stayed in CANCEL and the guest's TPM hung.
    let (mut h, page, chan) = Harness::connected().await;
    submit(&page, &chan, &GET_RANDOM);
    let r = next_request(&mut h).await;
    assert_eq!(r.command, GET_RANDOM);
    page.write_u8(OFFSET_STATE, PageState::Cancel as u8)
        .unwrap();
    chan.kick();
    assert_eq!(next_take(&mut h).await, Take::InFlight);
    let before = chan.notifications();
    let out = h
        .backend
        .complete(r.ticket, &[0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0])
        .unwrap();
    assert!(out.notify_guest(), "{out:?}");
    assert_eq!(page.read_u8(OFFSET_STATE).unwrap(), PageState::Finish as u8);
    assert_eq!(read_response(&page), [0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0]);
    assert_eq!(chan.notifications(), before + 1);
}

#[tokio::test]
async fn a_reconnect_makes_an_in_flight_ticket_stale_and_the_new_request_is_served() {
    // A guest reboots while its request is being answered, and submits a new one on the new
    // ring before the backend has seen the reconnect. The old answer must not reach the new
    // ring, and the new request must be taken and answered without another signal.
    let (mut h, page, chan) = Harness::connected().await;
    submit(&page, &chan, &GET_RANDOM);
    let old = next_request(&mut h).await;
    h.xs.set(&format!("{FE}/state"), "1");
    h.pump().await;
    let (page2, chan2) = h.guest_publish(9, 18);
    let second = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 4];
    submit(&page2, &chan2, &second);
    let new = next_request(&mut h).await;
    assert_eq!(new.command, second);
    assert!(!h.backend.is_current(&old.ticket));
    assert!(h.backend.is_current(&new.ticket));
    assert_eq!(
        h.backend
            .complete(old.ticket, &[0x80, 1, 0, 0, 0, 10, 0, 0, 0, 1])
            .unwrap(),
        StepOutcome::Nothing
    );
    assert_eq!(
        page2.read_u8(OFFSET_STATE).unwrap(),
        PageState::Submit as u8,
        "stale answer written"
    );
    let out = h
        .backend
        .complete(new.ticket, &[0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0])
        .unwrap();
    assert!(out.notify_guest());
    assert_eq!(read_response(&page2), [0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0]);
}

#[tokio::test]
async fn a_guest_that_rewrites_its_request_in_flight_gets_the_answer_to_what_was_copied() {
    // Guest memory is copied, never borrowed: the answer is for the copy, and it is written.
    let (mut h, page, chan) = Harness::connected().await;
    submit(&page, &chan, &GET_RANDOM);
    let r = next_request(&mut h).await;
    page.write_bytes(DATA_OFFSET, &[0xff; 12]).unwrap();
    let out = h
        .backend
        .complete(r.ticket, &[0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0])
        .unwrap();
    assert!(out.notify_guest());
    assert_eq!(page.read_u8(OFFSET_STATE).unwrap(), PageState::Finish as u8);
}

/// The resume marker counts once: taken (and removed) by the first connection, absent for the
/// next one; no marker, no resume.
#[tokio::test]
async fn the_resume_marker_is_taken_once() {
    let (xs, _events) = FakeXenstore::new();
    assert_eq!(take_resume_marker(&xs, BE).await.unwrap(), None);
    xs.set(&format!("{BE}/{RESUME_MARKER}"), "7\n");
    assert_eq!(take_resume_marker(&xs, BE).await.unwrap().as_deref(), Some("7"));
    assert_eq!(xs.get(&format!("{BE}/{RESUME_MARKER}")), None, "removed when taken");
    assert_eq!(take_resume_marker(&xs, BE).await.unwrap(), None, "a second connection is a boot");
}
