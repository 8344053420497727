//! The Xen transport: a tpmif v2 backend (see `xen_platform::xenbus`) that
//! serves the guest whose `vtpm=[...,uuid=<this vTPM>]` device names us.
//!
//! The guest's page holds at most 4088 bytes of packet, so the vTPM's buffer
//! size drops to 4088 (reported to the guest through TPM2_GetCapability).

use std::io;
use std::rc::Rc;

use tracing::{info, warn};
use uuid::Uuid;
use xen_platform::tpmif::MAX_PACKET;
use xen_platform::xen::XenTransport;
use xen_platform::xenbus::{Activity, Backend, BackendEvent};
use xen_platform::xenstore::{WatchEvents, Xenstore, XsClient};

use crate::guest_warn;
use crate::server::{Shared, execute_blocking};

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
        info!(root = %root, "tpmif backend watching");
        Ok(XenBackend { backend, events })
    }

    /// Serves until xenstore closes.
    pub async fn serve(mut self, shared: Rc<Shared>) {
        shared.vtpm.borrow_mut().set_buffer_size(MAX_PACKET as u32);
        loop {
            match self.backend.next(&mut self.events).await {
                Activity::Guest(key) => {
                    let mut handler = |cmd: &[u8], locality: u8| {
                        shared.vtpm.borrow_mut().set_locality(locality.min(4));
                        execute_blocking(&shared, cmd)
                    };
                    if let Err(e) = self.backend.service(key, &mut handler) {
                        guest_warn!(device = %key, error = %e, "tpmif service failed");
                    }
                }
                Activity::Xenstore(events) => events.iter().for_each(log_event),
                Activity::GuestError(key, e) => guest_warn!(device = %key, error = %e, "guest event channel error"),
                Activity::XenstoreClosed => {
                    warn!("xenstore connection closed");
                    return;
                }
            }
        }
    }
}

fn log_event(ev: &BackendEvent) {
    match ev {
        BackendEvent::Error { .. } => guest_warn!(event = ?ev, "tpmif device error"),
        other => info!(event = ?other, "tpmif"),
    }
}
