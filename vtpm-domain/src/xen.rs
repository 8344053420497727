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
use xen_platform::xenbus::{Activity, Backend, BackendEvent, Take, Ticket};
use xen_platform::xenstore::{WatchEvents, Xenstore, XsClient};

use crate::{guest_info, guest_warn};
use crate::dispatch::{Shared, execute, is_deep_quote};

/// A started tpmif backend.
pub struct XenBackend {
    backend: Backend<XsClient, XenTransport>,
    events: WatchEvents,
}

fn io_other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl XenBackend {
    /// Connects to xenstore and the Xen devices and starts watching `root`
    /// (made absolute under our own domain if relative). Must run before the
    /// guest is created: libxl gives a backend only 10 s to reach InitWait.
    pub async fn open(root: &str, uuid: Uuid) -> io::Result<XenBackend> {
        let (xs, events) = XsClient::open().await.map_err(|e| io_other("xenstore", e))?;
        let root = if root.starts_with('/') {
            root.to_string()
        } else {
            let domid = xs.read("domid").await.map_err(|e| io_other("reading our domid", e))?;
            let domid = domid.ok_or_else(|| io_other("xenstore", "no `domid` key for this domain"))?;
            let domid = xen_platform::DomId::parse("domid", domid.trim()).map_err(|e| io_other("our domid", e))?;
            format!("/local/domain/{}/{}", domid.get(), root.trim_end_matches('/'))
        };
        let transport = XenTransport::open().map_err(|e| io_other("Xen event channel / grant devices", e))?;
        let mut backend = Backend::new(xs, transport, root.clone()).only_uuid(uuid);
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
    /// from zero while keys and NV stay, as on a physical machine.
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
                        if let BackendEvent::Connected { .. } = ev
                            && let Err(e) = shared.vtpm.borrow_mut().platform_reset()
                        {
                            guest_warn!(event = ?ev, error = %e, "TPM reset on guest connect failed");
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

fn log_event(ev: &BackendEvent) {
    match ev {
        BackendEvent::Error { .. } => guest_warn!(event = ?ev, "tpmif device error"),
        // Frontend state changes: a guest can flip them in a loop.
        other => guest_info!(event = ?other, "tpmif"),
    }
}
