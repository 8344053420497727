//! Safe wrappers over libxenevtchn and libxengnttab (bindgen, `build.rs`), and the production
//! [`Transport`] built on them. This is the only module of the crate with `unsafe`.
//!
//! The C libraries are the stable `.so.1` ABIs (LGPL-2.1, dynamically linked); they hide the
//! Linux/FreeBSD ioctl details. Without Xen (no `/dev/xen/*`) every `open()` fails with
//! `ENOENT`, which is how CI sees them.
//!
//! Thread-safety: on Linux every libxenevtchn/libxengnttab call on a handle is a thin wrapper
//! around one `ioctl`/`read`/`write`/`mmap`/`munmap` on the handle's file descriptor, with no
//! userspace state mutated after `open`, so handles are `Send + Sync`. (The header's warning about
//! sharing one event-channel handle between threads concerns *which* thread sees a pending port,
//! not memory safety; each connection here owns its own handle.)

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

use crate::frontend::{FrontendTransport, SharedRing};
use crate::ids::{DomId, EvtchnPort, GrantRef};
use crate::tpmif::{OutOfBounds, PAGE_SIZE, SharedPage, check_bounds};
use crate::xenbus::{Connection, Transport, TransportError};

#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/xen_bindings.rs"));
}

/// An open `/dev/xen/evtchn` handle (`xenevtchn_handle`).
pub struct Evtchn {
    handle: NonNull<sys::xenevtchn_handle>,
}

// SAFETY: the handle is heap state owned by this value alone and only used through calls that
// are thin syscall wrappers on its fd (see the module docs); it is not tied to a thread.
unsafe impl Send for Evtchn {}
// SAFETY: concurrent calls through `&Evtchn` only issue independent syscalls on the same fd;
// libxenevtchn mutates no userspace state after `xenevtchn_open`.
unsafe impl Sync for Evtchn {}

/// Turns a `-1`/`NULL`-with-errno return into an `io::Error` (read right after the call).
fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn port_result(ret: sys::xenevtchn_port_or_error_t) -> io::Result<EvtchnPort> {
    if ret < 0 {
        return Err(last_error());
    }
    u32::try_from(ret)
        .ok()
        .and_then(EvtchnPort::new)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad port {ret}")))
}

impl Evtchn {
    /// Opens the event-channel device. Without Xen: `ENOENT`.
    pub fn open() -> io::Result<Self> {
        // SAFETY: a NULL logger selects libxenevtchn's default; flags 0 are valid. The returned
        // pointer is either NULL (errno set) or a handle we own until `xenevtchn_close`.
        let raw = unsafe { sys::xenevtchn_open(ptr::null_mut(), 0) };
        NonNull::new(raw)
            .map(|handle| Evtchn { handle })
            .ok_or_else(last_error)
    }

    /// Binds a local port to `remote_port`, an unbound port `domid` allocated for us.
    pub fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: EvtchnPort,
    ) -> io::Result<EvtchnPort> {
        // SAFETY: `self.handle` is a live handle from `xenevtchn_open`; the other arguments are
        // plain integers.
        port_result(unsafe {
            sys::xenevtchn_bind_interdomain(
                self.handle.as_ptr(),
                u32::from(domid.get()),
                remote_port.get(),
            )
        })
    }

    /// Allocates a local port that `domid` may bind to (frontend side).
    pub fn bind_unbound_port(&self, domid: DomId) -> io::Result<EvtchnPort> {
        // SAFETY: live handle; integer argument.
        port_result(unsafe {
            sys::xenevtchn_bind_unbound_port(self.handle.as_ptr(), u32::from(domid.get()))
        })
    }

    /// Unbinds a local port.
    pub fn unbind(&self, port: EvtchnPort) -> io::Result<()> {
        // SAFETY: live handle; integer argument.
        let ret = unsafe { sys::xenevtchn_unbind(self.handle.as_ptr(), port.get()) };
        if ret < 0 { Err(last_error()) } else { Ok(()) }
    }

    /// Signals the remote end of a local port.
    pub fn notify(&self, port: EvtchnPort) -> io::Result<()> {
        // SAFETY: live handle; integer argument.
        let ret = unsafe { sys::xenevtchn_notify(self.handle.as_ptr(), port.get()) };
        if ret < 0 { Err(last_error()) } else { Ok(()) }
    }

    /// Takes the next pending local port; `Ok(None)` when nothing is pending (`EAGAIN` on the
    /// non-blocking fd that [`XenTransport`] sets up). The port stays masked until
    /// [`unmask`](Self::unmask).
    pub fn pending(&self) -> io::Result<Option<EvtchnPort>> {
        // SAFETY: live handle.
        let ret = unsafe { sys::xenevtchn_pending(self.handle.as_ptr()) };
        if ret < 0 {
            let e = last_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        port_result(ret).map(Some)
    }

    /// Re-arms a port returned by [`pending`](Self::pending).
    pub fn unmask(&self, port: EvtchnPort) -> io::Result<()> {
        // SAFETY: live handle; integer argument.
        let ret = unsafe { sys::xenevtchn_unmask(self.handle.as_ptr(), port.get()) };
        if ret < 0 { Err(last_error()) } else { Ok(()) }
    }

    /// The handle's fd, readable when a port is pending (for `AsyncFd`/poll).
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: live handle. The fd stays open until `xenevtchn_close` in Drop, which the
        // returned borrow cannot outlive.
        unsafe { BorrowedFd::borrow_raw(sys::xenevtchn_fd(self.handle.as_ptr())) }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.fd().as_raw_fd();
        // SAFETY: `fd` is open (borrowed from a live handle); F_GETFL/F_SETFL take/return ints.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(last_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(last_error());
        }
        Ok(())
    }
}

impl Drop for Evtchn {
    fn drop(&mut self) {
        // SAFETY: the handle came from `xenevtchn_open` and is closed exactly once, here; this
        // also unbinds every port still bound through it.
        unsafe { sys::xenevtchn_close(self.handle.as_ptr()) };
    }
}

struct GnttabHandle(NonNull<sys::xengnttab_handle>);

// SAFETY: see `Evtchn`; libxengnttab calls are syscalls on the handle's fd.
unsafe impl Send for GnttabHandle {}
// SAFETY: see `Evtchn`.
unsafe impl Sync for GnttabHandle {}

impl Drop for GnttabHandle {
    fn drop(&mut self) {
        // SAFETY: from `xengnttab_open`, closed exactly once; every `MappedPage` holds an `Arc`
        // to this handle, so no mapping outlives it.
        unsafe { sys::xengnttab_close(self.0.as_ptr()) };
    }
}

/// An open `/dev/xen/gntdev` handle, for mapping other domains' grants.
#[derive(Clone)]
pub struct Gnttab {
    handle: Arc<GnttabHandle>,
}

impl Gnttab {
    /// Opens the grant-mapping device. Without Xen: `ENOENT`.
    pub fn open() -> io::Result<Self> {
        // SAFETY: NULL logger = default; flags 0 valid; NULL (errno set) or an owned handle.
        let raw = unsafe { sys::xengnttab_open(ptr::null_mut(), 0) };
        let handle = NonNull::new(raw).ok_or_else(last_error)?;
        Ok(Gnttab {
            handle: Arc::new(GnttabHandle(handle)),
        })
    }

    /// Maps one page granted by `domid` read/write. Unmapped when the result is dropped.
    pub fn map_grant_ref(&self, domid: DomId, gref: GrantRef) -> io::Result<MappedPage> {
        // SAFETY: live handle; integer arguments. On success the result is a fresh PAGE_SIZE
        // mapping owned by us until `xengnttab_unmap`.
        let raw = unsafe {
            sys::xengnttab_map_grant_ref(
                self.handle.0.as_ptr(),
                u32::from(domid.get()),
                gref.get(),
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(last_error)?;
        Ok(MappedPage {
            ptr,
            gnttab: self.handle.clone(),
        })
    }
}

/// A peer's page mapped into our address space. Only accessed through [`SharedPage`]
/// (volatile copies); no reference into it is ever created.
pub struct MappedPage {
    ptr: NonNull<u8>,
    gnttab: Arc<GnttabHandle>,
}

// SAFETY: the mapping is process-wide memory, valid until Drop, and not tied to a thread.
unsafe impl Send for MappedPage {}
// SAFETY: `&MappedPage` only allows volatile byte copies in and out (no references into the
// page). The peer already reads and writes the page concurrently at any time; a second thread
// of ours doing the same adds no new kind of access, and the protocol code tolerates any
// interleaving by copying the header once and validating the copy.
unsafe impl Sync for MappedPage {}

/// Volatile copy out of `base[offset..offset + buf.len()]`.
///
/// # Safety
/// `base` must point to a live mapping of at least `PAGE_SIZE` bytes and
/// `offset + buf.len() <= PAGE_SIZE` must hold.
unsafe fn volatile_read(base: NonNull<u8>, offset: usize, buf: &mut [u8]) {
    for (i, dst) in buf.iter_mut().enumerate() {
        // SAFETY: in bounds of the live mapping per the contract; u8 has no alignment needs;
        // volatile because the peer writes the memory concurrently.
        *dst = unsafe { ptr::read_volatile(base.as_ptr().add(offset + i)) };
    }
}

/// Volatile copy into `base[offset..offset + data.len()]`.
///
/// # Safety
/// As for [`volatile_read`], and the mapping must be writable.
unsafe fn volatile_write(base: NonNull<u8>, offset: usize, data: &[u8]) {
    for (i, &b) in data.iter().enumerate() {
        // SAFETY: in bounds of the live, writable mapping per the contract.
        unsafe { ptr::write_volatile(base.as_ptr().add(offset + i), b) };
    }
}

impl SharedPage for MappedPage {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, buf.len())?;
        // SAFETY: `ptr` is a live PAGE_SIZE mapping until Drop; bounds checked above.
        unsafe { volatile_read(self.ptr, offset, buf) };
        Ok(())
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, data.len())?;
        // SAFETY: as above; mapped PROT_READ|PROT_WRITE.
        unsafe { volatile_write(self.ptr, offset, data) };
        Ok(())
    }
}

impl Drop for MappedPage {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `xengnttab_map_grant_ref` on this handle (kept alive by the
        // Arc), covers one page, and is unmapped exactly once; no reference into it exists.
        let ret =
            unsafe { sys::xengnttab_unmap(self.gnttab.0.as_ptr(), self.ptr.as_ptr().cast(), 1) };
        if ret < 0 {
            xvtpm_log::host_warn!(error = %last_error(), "xengnttab_unmap failed");
        }
    }
}

struct GntshrHandle(NonNull<sys::xengntshr_handle>);

// SAFETY: see `Evtchn`; libxengntshr calls are syscalls on the handle's fd.
unsafe impl Send for GntshrHandle {}
// SAFETY: see `Evtchn`.
unsafe impl Sync for GntshrHandle {}

impl Drop for GntshrHandle {
    fn drop(&mut self) {
        // SAFETY: from `xengntshr_open`, closed once; every `SharedMem` holds an Arc to it.
        unsafe { sys::xengntshr_close(self.0.as_ptr()) };
    }
}

/// An open `/dev/xen/gntalloc` handle, for granting our pages to another domain (a userspace
/// frontend: loopback tests and tools; real guests use the in-kernel `xen-tpmfront`).
#[derive(Clone)]
pub struct Gntshr {
    handle: Arc<GntshrHandle>,
}

impl Gntshr {
    /// Opens the grant-allocation device. Without Xen: `ENOENT`.
    pub fn open() -> io::Result<Self> {
        // SAFETY: NULL logger = default; flags 0 valid; NULL (errno set) or an owned handle.
        let raw = unsafe { sys::xengntshr_open(ptr::null_mut(), 0) };
        let handle = NonNull::new(raw).ok_or_else(last_error)?;
        Ok(Gntshr {
            handle: Arc::new(GntshrHandle(handle)),
        })
    }

    /// Allocates a zeroed page and grants it to `domid`. Unshared when the memory is dropped.
    pub fn share_page(&self, domid: DomId, writable: bool) -> io::Result<(GrantRef, SharedMem)> {
        let mut gref: u32 = 0;
        // SAFETY: live handle; `gref` is a valid out-pointer for exactly `count = 1` refs. On
        // success the result is a fresh one-page mapping owned by us until `xengntshr_unshare`.
        let raw = unsafe {
            sys::xengntshr_share_pages(
                self.handle.0.as_ptr(),
                u32::from(domid.get()),
                1,
                &mut gref,
                i32::from(writable),
            )
        };
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(last_error)?;
        Ok((
            GrantRef::new(gref),
            SharedMem {
                ptr,
                gntshr: self.handle.clone(),
            },
        ))
    }
}

/// A page of ours granted to another domain; accessed only through [`SharedPage`].
pub struct SharedMem {
    ptr: NonNull<u8>,
    gntshr: Arc<GntshrHandle>,
}

// SAFETY: as for `MappedPage`.
unsafe impl Send for SharedMem {}
// SAFETY: as for `MappedPage`.
unsafe impl Sync for SharedMem {}

impl SharedPage for SharedMem {
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, buf.len())?;
        // SAFETY: `ptr` is a live PAGE_SIZE read/write mapping until Drop; bounds checked.
        unsafe { volatile_read(self.ptr, offset, buf) };
        Ok(())
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        check_bounds(offset, data.len())?;
        // SAFETY: as above.
        unsafe { volatile_write(self.ptr, offset, data) };
        Ok(())
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `xengntshr_share_pages` on this handle (alive via the Arc),
        // one page, unshared exactly once.
        let ret =
            unsafe { sys::xengntshr_unshare(self.gntshr.0.as_ptr(), self.ptr.as_ptr().cast(), 1) };
        if ret < 0 {
            xvtpm_log::host_warn!(error = %last_error(), "xengntshr_unshare failed");
        }
    }
}

const _: () = assert!(PAGE_SIZE == 4096, "tpmif pages are Xen's 4 KiB pages");

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
            .map_grant_ref(frontend, ring_ref)
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
        let local_port = evtchn.bind_interdomain(frontend, port).map_err(bind_err)?;
        // SAFETY: `Evtchn::as_raw_fd` returns the fd of the live handle, which stays open and
        // unchanged until the `Evtchn` is dropped; the `AsyncFd` owns the `Evtchn`, so it
        // deregisters before the handle (and fd) is closed or handed back.
        let evtchn = unsafe { AsyncFd::register(evtchn) }
            .map_err(|e| TransportError::Evtchn(io::Error::other(e.to_string())))?;
        Ok(XenConnection {
            evtchn: Some(evtchn),
            local_port,
            page,
            spare: Arc::clone(&self.spare),
        })
    }
}

impl AsRawFd for Evtchn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd().as_raw_fd()
    }
}

/// A mapped tpmif page plus its bound event channel. Drop unbinds the port, deregisters the fd
/// from tokio, hands the handle back to the transport, and unmaps the page (in that order).
pub struct XenConnection {
    /// `Some` until dropped.
    evtchn: Option<AsyncFd<Evtchn>>,
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
        match evtchn.get_ref().unbind(self.local_port) {
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
            .notify(self.local_port)
            .map_err(TransportError::Evtchn)
    }

    async fn wait_event(&self) -> Result<(), TransportError> {
        wait_pending(self.evtchn()).await
    }
}

impl XenConnection {
    fn evtchn(&self) -> &AsyncFd<Evtchn> {
        self.evtchn.as_ref().expect("the event channel lives until drop")
    }
}

/// Waits until a port of `evtchn` is pending, consumes it and re-arms it.
async fn wait_pending(evtchn: &AsyncFd<Evtchn>) -> Result<(), TransportError> {
    loop {
        let mut guard = evtchn.readable().await.map_err(TransportError::Evtchn)?;
        match guard
            .get_inner()
            .pending()
            .map_err(TransportError::Evtchn)?
        {
            Some(port) => {
                guard
                    .get_inner()
                    .unmask(port)
                    .map_err(TransportError::Evtchn)?;
                return Ok(());
            }
            None => guard.clear_ready(),
        }
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
            .share_page(backend, true)
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
        let port = evtchn.bind_unbound_port(backend).map_err(alloc_err)?;
        // SAFETY: as in `XenTransport::connect`: the fd belongs to the live handle owned by the
        // `AsyncFd`, which deregisters before the handle (and fd) is closed.
        let evtchn = unsafe { AsyncFd::register(evtchn) }
            .map_err(|e| TransportError::Evtchn(io::Error::other(e.to_string())))?;
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
    evtchn: AsyncFd<Evtchn>,
    port: EvtchnPort,
    page: SharedMem,
}

impl Drop for XenFrontendLink {
    fn drop(&mut self) {
        if let Err(e) = self.evtchn.get_ref().unbind(self.port) {
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
            .notify(self.port)
            .map_err(TransportError::Evtchn)
    }

    async fn wait_event(&self) -> Result<(), TransportError> {
        wait_pending(&self.evtchn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xen_present() -> bool {
        std::path::Path::new("/dev/xen/evtchn").exists()
    }

    #[test]
    fn open_without_xen_fails_with_enoent() {
        if xen_present() {
            return;
        }
        let e = Evtchn::open()
            .err()
            .expect("evtchn open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = Gnttab::open()
            .err()
            .expect("gnttab open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = Gntshr::open()
            .err()
            .expect("gntshr open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = XenTransport::open()
            .err()
            .expect("transport open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = XenFrontendTransport::open()
            .err()
            .expect("frontend transport open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
