//! The production [`Transport`] and [`FrontendTransport`], built on `xen-sys`'s safe handles
//! over libxenevtchn, libxengnttab and libxengntshr (where all of the `unsafe` lives; this crate
//! forbids it). Without Xen (no `/dev/xen/*`) every `open()` fails with `ENOENT`, which is how
//! CI sees them.

use std::io;
use std::sync::Arc;

use xen_sys::{AsyncEvtchn, Evtchn, Gnttab, Gntshr, MappedPage, OutOfPage, SharedMem};

use crate::frontend::{FrontendTransport, SharedRing};
use crate::ids::{DomId, EvtchnPort, GrantRef};
use crate::tpmif::{OutOfBounds, PAGE_SIZE, SharedPage, check_bounds};
use crate::xenbus::{Connection, Transport, TransportError};

fn out_of_bounds(e: OutOfPage) -> OutOfBounds {
    OutOfBounds { offset: e.offset, len: e.len }
}

impl SharedPage for MappedPage {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, buf.len())?;
        self.read(offset, buf).map_err(out_of_bounds)
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, data.len())?;
        self.write(offset, data).map_err(out_of_bounds)
    }
}

impl SharedPage for SharedMem {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, buf.len())?;
        self.read(offset, buf).map_err(out_of_bounds)
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, data.len())?;
        self.write(offset, data).map_err(out_of_bounds)
    }
}

/// A port number from libxenevtchn as the checked newtype.
fn port(raw: u32) -> io::Result<EvtchnPort> {
    EvtchnPort::new(raw).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad port {raw}")))
}

const _: () = assert!(PAGE_SIZE == xen_sys::PAGE_SIZE, "tpmif pages are Xen's 4 KiB pages");

/// The production [`Transport`]: libxengnttab mapping plus one libxenevtchn handle per
/// connection, its fd registered with tokio. Must be used inside a tokio runtime.
pub struct XenTransport {
    gnttab: Gnttab,
    /// Event-channel handles not bound to a connection. One is opened with the grant device,
    /// and a connection gives its handle back when it ends: a backend that drops its privileges
    /// after `open` (the root-only `/dev/xen/evtchn` cannot be opened then) still serves one
    /// connection after another (a guest's reboots).
    spare: Arc<std::sync::Mutex<Vec<Evtchn>>>,
}

impl XenTransport {
    /// Opens the grant device and one event-channel handle.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            gnttab: Gnttab::open()?,
            spare: Arc::new(std::sync::Mutex::new(vec![Evtchn::open()?])),
        })
    }
}

impl Transport for XenTransport {
    type Connection = XenConnection;

    fn connect(
        &mut self,
        frontend: DomId,
        ring_ref: GrantRef,
        port: EvtchnPort,
    ) -> Result<XenConnection, TransportError> {
        let page = self
            .gnttab
            .map_grant_ref(frontend.get(), ring_ref.get())
            .map_err(|source| TransportError::MapGrant {
                domid: frontend,
                gref: ring_ref,
                source,
            })?;
        let bind_err = |source| TransportError::BindEvtchn {
            domid: frontend,
            port,
            source,
        };
        let spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let evtchn = match spare {
            Some(e) => e,
            None => Evtchn::open().map_err(bind_err)?,
        };
        evtchn.set_nonblocking().map_err(bind_err)?;
        let local_port = evtchn
            .bind_interdomain(frontend.get(), port.get())
            .and_then(self::port)
            .map_err(bind_err)?;
        let evtchn = evtchn.into_async().map_err(TransportError::Evtchn)?;
        Ok(XenConnection {
            evtchn: Some(evtchn),
            local_port,
            page,
            spare: Arc::clone(&self.spare),
        })
    }
}

/// A mapped tpmif page plus its bound event channel. Drop unbinds the port, deregisters the fd
/// from tokio, hands the handle back to the transport, and unmaps the page (in that order).
pub struct XenConnection {
    /// `Some` until dropped.
    evtchn: Option<AsyncEvtchn>,
    local_port: EvtchnPort,
    page: MappedPage,
    spare: Arc<std::sync::Mutex<Vec<Evtchn>>>,
}

impl XenConnection {
    /// Our local port.
    pub fn local_port(&self) -> EvtchnPort {
        self.local_port
    }
}

impl Drop for XenConnection {
    fn drop(&mut self) {
        let Some(evtchn) = self.evtchn.take() else { return };
        match evtchn.get_ref().unbind(self.local_port.get()) {
            // Unbound: the handle is clean for the next connection (deregistered first).
            Ok(()) => self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(evtchn.into_inner()),
            // Still bound: close it rather than hand a bound port to another connection.
            Err(e) => xvtpm_log::host_warn!(error = %e, port = %self.local_port, "xenevtchn_unbind failed"),
        }
        // Then the page is unmapped.
    }
}

impl Connection for XenConnection {
    type Page = MappedPage;

    fn page(&self) -> &MappedPage {
        &self.page
    }

    fn notify(&self) -> Result<(), TransportError> {
        self.evtchn()
            .get_ref()
            .notify(self.local_port.get())
            .map_err(TransportError::Evtchn)
    }

    async fn wait_event(&self) -> Result<(), TransportError> {
        self.evtchn().wait_pending().await.map_err(TransportError::Evtchn)
    }
}

impl XenConnection {
    fn evtchn(&self) -> &AsyncEvtchn {
        self.evtchn.as_ref().expect("the event channel lives until drop")
    }
}

/// The production [`FrontendTransport`]: a page granted with libxengntshr (`/dev/xen/gntalloc`)
/// and an unbound port from libxenevtchn, its fd registered with tokio. For a userspace frontend
/// such as a vTPM domain talking to vtpmmgr. Must be used inside a tokio runtime.
pub struct XenFrontendTransport {
    gntshr: Gntshr,
}

impl XenFrontendTransport {
    /// Opens the grant-allocation device. Without Xen: `ENOENT`.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            gntshr: Gntshr::open()?,
        })
    }
}

impl FrontendTransport for XenFrontendTransport {
    type Link = XenFrontendLink;

    fn share(&mut self, backend: DomId) -> Result<SharedRing<XenFrontendLink>, TransportError> {
        let (ring_ref, page) = self
            .gntshr
            .share_page(backend.get(), true)
            .map(|(gref, page)| (GrantRef::new(gref), page))
            .map_err(|source| TransportError::ShareGrant {
                domid: backend,
                source,
            })?;
        let alloc_err = |source| TransportError::AllocEvtchn {
            domid: backend,
            source,
        };
        let evtchn = Evtchn::open().map_err(alloc_err)?;
        evtchn.set_nonblocking().map_err(alloc_err)?;
        let port = evtchn.bind_unbound_port(backend.get()).and_then(self::port).map_err(alloc_err)?;
        let evtchn = evtchn.into_async().map_err(TransportError::Evtchn)?;
        Ok(SharedRing {
            ring_ref,
            port,
            link: XenFrontendLink { evtchn, port, page },
        })
    }
}

/// Our granted page plus our event-channel port. Drop unbinds the port, closes the handle and
/// unshares the page (in that order).
pub struct XenFrontendLink {
    evtchn: AsyncEvtchn,
    port: EvtchnPort,
    page: SharedMem,
}

impl Drop for XenFrontendLink {
    fn drop(&mut self) {
        if let Err(e) = self.evtchn.get_ref().unbind(self.port.get()) {
            xvtpm_log::host_warn!(error = %e, port = %self.port, "xenevtchn_unbind failed");
        }
    }
}

impl Connection for XenFrontendLink {
    type Page = SharedMem;

    fn page(&self) -> &SharedMem {
        &self.page
    }

    fn notify(&self) -> Result<(), TransportError> {
        self.evtchn
            .get_ref()
            .notify(self.port.get())
            .map_err(TransportError::Evtchn)
    }

    async fn wait_event(&self) -> Result<(), TransportError> {
        self.evtchn.wait_pending().await.map_err(TransportError::Evtchn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_xen_fails_with_enoent() {
        if std::path::Path::new("/dev/xen/evtchn").exists() {
            return;
        }
        let e = XenTransport::open().err().expect("transport open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = XenFrontendTransport::open().err().expect("frontend transport open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
