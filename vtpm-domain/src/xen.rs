//! The Xen transport: a tpmif v2 backend (see `xen_platform::xenbus`) that
//! serves the guest whose `vtpm=[...,uuid=<this vTPM>]` device names us.
//!
//! The guest's page holds at most 4088 bytes of packet, so the vTPM's buffer
//! size drops to 4088 (reported to the guest through TPM2_GetCapability).

use std::io;
use std::rc::Rc;

use uuid::Uuid;

use xen_platform::tpmif::MAX_PACKET;
use xen_platform::xen::XenTransport;
use tpm_wire::{self as tpm, Family};
use xen_platform::tpmif::{Rejection, Rejections};
use xen_platform::xenbus::{Activity, Backend, BackendEvent, DeviceKey, Take, Ticket, Transport, take_resume_marker};
use xen_platform::xenstore::{WatchEvents, Xenstore, XsClient};

use crate::{guest_info, guest_warn};
use crate::dispatch::{Shared, execute, is_deep_quote};

/// A started tpmif backend.
pub struct XenBackend {
    backend: Backend<XsClient, XenTransport>,
    events: WatchEvents,
}

fn io_other<E: std::error::Error + Send + Sync + 'static>(what: &str, e: E) -> io::Error {
    crate::errctx::io_other(what)(e)
}

impl XenBackend {
    /// Connects to xenstore and the Xen devices and starts watching `root`
    /// (made absolute under our own domain if relative). Must run before the
    /// guest is created: libxl gives a backend only 10 s to reach InitWait.
    pub async fn open(root: &str, uuid: Uuid, family: Family) -> io::Result<XenBackend> {
        let (xs, events) = XsClient::open().await.map_err(|e| io_other("xenstore", e))?;
        let root = if root.starts_with('/') {
            root.to_string()
        } else {
            let domid = xs.read("domid").await.map_err(|e| io_other("reading our domid", e))?;
            let domid = domid.ok_or_else(|| io::Error::other("xenstore: no `domid` key for this domain"))?;
            let domid = xen_platform::DomId::parse("domid", domid.trim()).map_err(|e| io_other("our domid", e))?;
            format!("/local/domain/{}/{}", domid.get(), root.trim_end_matches('/'))
        };
        let transport = XenTransport::open().map_err(|e| io_other("Xen event channel / grant devices", e))?;
        let mut backend = tpmif_backend(xs, transport, root.clone(), uuid, family);
        for ev in backend.start().await.map_err(|e| io_other("watching the backend directory", e))? {
            log_event(&ev);
        }
        xvtpm_log::host_info!(root = %root, "tpmif backend watching");
        Ok(XenBackend { backend, events })
    }

    /// Serves until xenstore closes.
    ///
    /// Every new frontend connection is a platform reset of the guest (boot,
    /// reboot, kexec): the TPM is power-cycled and started, so PCRs start
    /// from zero while keys and NV stay, as on a physical machine. The one
    /// exception is a connection the toolstack marked as a resume after a
    /// migration ([`RESUME_MARKER`](xen_platform::xenbus::RESUME_MARKER), taken once).
    ///
    /// A deep quote waits for the manager; the page stays in SUBMIT and the
    /// device is answered (by its ticket) when the evidence arrives, while
    /// other work (other devices, xenstore) goes on.
    pub async fn serve(mut self, shared: Rc<Shared>) {
        shared.vtpm.borrow_mut().set_buffer_size(MAX_PACKET as u32);
        // Requests answered later: each carries its ticket; a ticket from before a reconnect is
        // dropped by the backend, which then looks at the page again.
        let mut ready: tokio::task::JoinSet<(Ticket, Vec<u8>)> = tokio::task::JoinSet::new();
        loop {
            let activity = tokio::select! {
                a = self.backend.next(&mut self.events) => a,
                Some(done) = ready.join_next(), if !ready.is_empty() => {
                    if let Ok((ticket, response)) = done {
                        self.complete(ticket, &response);
                    }
                    continue;
                }
            };
            match activity {
                Activity::Guest(key) => match self.backend.take(key) {
                    Ok(Take::Request(req)) if is_deep_quote(&shared, &req.command) => {
                        let s = shared.clone();
                        ready.spawn_local(async move {
                            let rsp = execute(&s, &req.command).await;
                            (req.ticket, rsp)
                        });
                    }
                    Ok(Take::Request(req)) => {
                        let response = {
                            let mut v = shared.vtpm.borrow_mut();
                            v.set_locality(req.locality.min(4));
                            v.execute(&req.command)
                        };
                        self.complete(req.ticket, &response);
                    }
                    Ok(Take::Stepped(_) | Take::InFlight) => {}
                    Err(e) => guest_warn!(device = %key, error = %e, "tpmif service failed"),
                },
                Activity::Xenstore(events) => {
                    for ev in &events {
                        log_event(ev);
                        if let BackendEvent::Connected { key } = ev {
                            on_connected(&self.backend, *key, &shared.vtpm).await;
                        }
                    }
                }
                Activity::GuestError(key, e) => guest_warn!(device = %key, error = %e, "guest event channel error"),
                Activity::XenstoreClosed => {
                    xvtpm_log::host_warn!("xenstore connection closed");
                    return;
                }
            }
        }
    }

    fn complete(&mut self, ticket: Ticket, response: &[u8]) {
        let key = ticket.key();
        if let Err(e) = self.backend.complete(ticket, response) {
            guest_warn!(device = %key, error = %e, "tpmif service failed");
        }
    }
}

/// A frontend connected device `key`. A boot (the TPM is power-cycled and started: PCRs from
/// zero, keys and NV kept) unless the toolstack marked this connection as the resume of a
/// migrated guest ([`RESUME_MARKER`](xen_platform::xenbus::RESUME_MARKER) in the device's backend
/// directory, `xl-vtpm migrate`): then the TPM keeps running as it is — PCRs and all — as across
/// a suspend. Returns whether it was a resume.
pub async fn on_connected<X: Xenstore, T: Transport>(backend: &Backend<X, T>, key: DeviceKey, vtpm: &std::cell::RefCell<crate::vtpm::Vtpm>) -> bool {
    let marker = match backend.device(key).map(|d| d.backend_path().to_string()) {
        Some(path) => take_resume_marker(backend.xenstore(), &path).await,
        None => Ok(None),
    };
    match marker {
        Ok(Some(from)) => {
            xvtpm_log::host_info!(device = %key, from_domain = %from, "tpmif: the guest resumed after a migration; TPM state kept (no reset)");
            return true;
        }
        Ok(None) => {}
        Err(e) => guest_warn!(device = %key, error = %e, "tpmif: cannot take the resume marker; the connection is a boot (TPM reset)"),
    }
    if let Err(e) = vtpm.borrow_mut().platform_reset() {
        guest_warn!(device = %key, error = %e, "TPM reset on guest connect failed");
    }
    false
}

/// The tpmif backend of the vTPM `uuid` of `family` under `root`: it serves only the device whose
/// backend `uuid` key names this vTPM, and answers what the page layer rejects the way this
/// vTPM answers a badly sized command or one it cannot run ([`rejections`]).
pub fn tpmif_backend<X: Xenstore, T: Transport>(xs: X, transport: T, root: String, uuid: Uuid, family: Family) -> Backend<X, T> {
    Backend::new(xs, transport, root, rejections(family)).only_uuid(uuid)
}

/// A vTPM's answers to requests the tpmif page layer rejects: 10-byte error responses of its
/// own family — a request of length 0 or above the page gets `TPM_RC_COMMAND_SIZE` (TPM 2.0) or
/// `TPM_BAD_PARAM_SIZE` (TPM 1.2), a response that does not fit `TPM_RC_FAILURE` / `TPM_FAIL`.
pub fn rejections(family: Family) -> Rejections {
    Rejections::new(|why| {
        let rc = match why {
            Rejection::CommandSize => family.command_size_code(),
            Rejection::ResponseSize => family.failure_code(),
        };
        tpm::error_response(family, rc).to_vec()
    })
    .expect("a 10-byte error response fits any tpmif page")
}

fn log_event(ev: &BackendEvent) {
    match ev {
        BackendEvent::Error { .. } => guest_warn!(event = ?ev, "tpmif device error"),
        // Frontend state changes: a guest can flip them in a loop.
        other => guest_info!(event = ?other, "tpmif"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tpm_wire::{self as tpm, Family};
    use xen_platform::fake::{FakeChannel, FakeXenstore, MemTransport};
    use xen_platform::tpmif::{DATA_OFFSET, MemPage, OFFSET_LENGTH, OFFSET_STATE, PageState, Rejection, SharedPage};
    use xen_platform::xenbus::{DeviceKey, Take};
    use xen_platform::{DevId, DomId, EvtchnPort, GrantRef};

    use super::tpmif_backend;

    const ROOT: &str = "/local/domain/0/backend/vtpm";
    const BE: &str = "/local/domain/0/backend/vtpm/5/0";
    const FE: &str = "/local/domain/5/device/vtpm/0";
    const UUID: &str = "e2b1a7d4-3c5f-4b8e-9a61-0c2d4e6f8a10";

    /// A vTPM of `family` whose guest (domain 5) is connected: the toolstack's and the guest's
    /// xenstore writes, applied until they settle.
    async fn connected(family: Family) -> (xen_platform::xenbus::Backend<FakeXenstore, MemTransport>, Arc<MemPage>, Arc<FakeChannel>) {
        let (xs, mut events) = FakeXenstore::new();
        let transport = MemTransport::new();
        let mut backend = tpmif_backend(xs.clone(), transport.clone(), ROOT.into(), UUID.parse().unwrap(), family);
        backend.start().await.unwrap();
        for (k, v) in [("frontend", FE), ("frontend-id", "5"), ("online", "1"), ("state", "1"), ("handle", "0"), ("uuid", UUID)] {
            xs.set(&format!("{BE}/{k}"), v);
        }
        for (k, v) in [("backend", BE), ("backend-id", "0"), ("state", "1"), ("handle", "0")] {
            xs.set(&format!("{FE}/{k}"), v);
        }
        let dom5 = DomId::new(5).unwrap();
        let page = transport.grant_page(dom5, GrantRef::new(9));
        let chan = transport.alloc_port(dom5, EvtchnPort::new(3).unwrap());
        for (k, v) in [("ring-ref", "9"), ("event-channel", "3"), ("feature-protocol-v2", "1"), ("state", "3")] {
            xs.set(&format!("{FE}/{k}"), v);
        }
        while let Some(ev) = events.try_next() {
            backend.handle_watch_event(ev).await;
        }
        assert_eq!(xs.get(&format!("{BE}/state")).as_deref(), Some("4"), "the device connects");
        (backend, page, chan)
    }

    /// The 10 bytes the guest finds after a SUBMIT with `length` above the page.
    async fn answer_to_oversized_request(family: Family) -> Vec<u8> {
        let (mut backend, page, chan) = connected(family).await;
        page.write_u32_ne(OFFSET_LENGTH, 4089).unwrap();
        page.write_u8(OFFSET_STATE, PageState::Submit as u8).unwrap();
        chan.kick();
        let key = DeviceKey { frontend: DomId::new(5).unwrap(), devid: DevId::new(0) };
        assert!(matches!(backend.take(key).unwrap(), Take::Stepped(s) if s.notify_guest()));
        assert_eq!(page.read_u8(OFFSET_STATE).unwrap(), PageState::Finish as u8);
        let len = page.read_u32_ne(OFFSET_LENGTH).unwrap() as usize;
        let mut out = vec![0; len];
        page.read_bytes(DATA_OFFSET, &mut out).unwrap();
        out
    }

    /// A `--tpm12` vTPM answers a request the page layer rejects with a TPM 1.2 error
    /// (`TPM_TAG_RSP_COMMAND`, `TPM_BAD_PARAM_SIZE`), as it answers any badly sized command; a
    /// TPM 2.0 vTPM with `TPM_RC_COMMAND_SIZE`.
    #[tokio::test(flavor = "current_thread")]
    async fn a_rejected_request_is_answered_in_the_vtpms_own_family() {
        assert_eq!(
            answer_to_oversized_request(Family::Tpm12).await,
            tpm::error_response(Family::Tpm12, tpm::TPM12_BAD_PARAM_SIZE)
        );
        assert_eq!(
            answer_to_oversized_request(Family::Tpm2).await,
            tpm::error_response(Family::Tpm2, tpm::TPM2_RC_COMMAND_SIZE)
        );
        // A response that does not fit the page: the family's failure code.
        assert_eq!(super::rejections(Family::Tpm12).answer(Rejection::ResponseSize), tpm::error_response(Family::Tpm12, tpm::TPM12_FAIL));
        assert_eq!(super::rejections(Family::Tpm2).answer(Rejection::ResponseSize), tpm::error_response(Family::Tpm2, tpm::TPM2_RC_FAILURE));
    }

    struct NullStore;
    impl crate::vtpm::StateStore for NullStore {
        fn save(&mut self, _: &[u8], _: &[u8]) -> Result<(), crate::store::StoreError> {
            Ok(())
        }
        fn generation(&self) -> u64 {
            0
        }
    }

    fn pcr16(v: &std::cell::RefCell<crate::vtpm::Vtpm>) -> Vec<u8> {
        let rsp = v.borrow_mut().execute(&tpm::tpm2_pcr_read_bitmap(tpm::TPM2_ALG_SHA256, [0, 0, 1]));
        assert_eq!(tpm::response_code(&rsp), Some(tpm::TPM2_RC_SUCCESS));
        rsp[rsp.len() - 32..].to_vec()
    }

    /// A connection the toolstack marked as the resume of a migrated guest keeps the TPM as it
    /// is (PCR 16 keeps its extended value) and takes the marker; the next connection of the
    /// same device (a kexec, a reboot) is a boot again and resets PCR 16. Before the marker,
    /// every connection reset the TPM, and a migrated guest lost its PCRs.
    #[tokio::test(flavor = "current_thread")]
    async fn a_resume_marked_connection_keeps_the_pcrs_and_the_next_one_resets_them() {
        use xen_platform::xenbus::RESUME_MARKER;
        let (backend, _page, _chan) = connected(Family::Tpm2).await;
        let (vtpm, _ek) = crate::vtpm::Vtpm::manufacture_with(Family::Tpm2, NullStore, vtpm_engine::EkKind::EccP256).unwrap();
        let vtpm = std::cell::RefCell::new(vtpm);
        vtpm.borrow_mut().platform_reset().unwrap();
        let key = DeviceKey { frontend: DomId::new(5).unwrap(), devid: DevId::new(0) };
        let rsp = vtpm.borrow_mut().execute(&tpm::tpm2_pcr_extend(16, &[0xaa; 32]));
        assert_eq!(tpm::response_code(&rsp), Some(tpm::TPM2_RC_SUCCESS));
        let extended = pcr16(&vtpm);
        assert_ne!(extended, vec![0; 32]);

        backend.xenstore().set(&format!("{BE}/{RESUME_MARKER}"), "3");
        assert!(super::on_connected(&backend, key, &vtpm).await, "a marked connection is a resume");
        assert_eq!(pcr16(&vtpm), extended, "PCR 16 kept across the resume");
        assert_eq!(backend.xenstore().get(&format!("{BE}/{RESUME_MARKER}")), None, "the marker is taken");

        assert!(!super::on_connected(&backend, key, &vtpm).await, "the next connection is a boot");
        assert_eq!(pcr16(&vtpm), vec![0; 32], "PCR 16 reset by the boot");
    }
}
