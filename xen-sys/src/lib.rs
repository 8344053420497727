//! libxenevtchn, libxengnttab and libxengntshr (bindgen, `build.rs`) and safe handles over
//! them: all of xvtpm's `unsafe` Xen code. `xen-platform` builds the tpmif transports on these
//! handles and forbids `unsafe`.
//!
//! The C libraries are the stable `.so.1` ABIs (LGPL-2.1, dynamically linked); they hide the
//! Linux/FreeBSD ioctl details. Without Xen (no `/dev/xen/*`) every `open()` fails with
//! `ENOENT`, which is how CI sees them. Domains, ports and grant references are plain integers
//! here; `xen-platform` wraps them in its checked newtypes.
//!
//! Thread-safety: on Linux every libxenevtchn/libxengnttab call on a handle is a thin wrapper
//! around one `ioctl`/`read`/`write`/`mmap`/`munmap` on the handle's file descriptor, with no
//! userspace state mutated after `open`, so handles are `Send + Sync`. (The header's warning about
//! sharing one event-channel handle between threads concerns *which* thread sees a pending port,
//! not memory safety; each connection owns its own handle.)
//!
//! Shared memory (a peer's mapped page, our granted page) is only ever copied in and out with
//! volatile byte accesses, bounds-checked against [`PAGE_SIZE`]; no reference into it exists.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
// FFI: the whole crate wraps the C libraries (`unsafe` is denied workspace-wide).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

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

/// Size of a Xen page (what one grant covers).
pub const PAGE_SIZE: usize = 4096;

/// An access outside `0..PAGE_SIZE` of a shared page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfPage {
    /// Requested offset.
    pub offset: usize,
    /// Requested length.
    pub len: usize,
}

fn in_page(offset: usize, len: usize) -> Result<(), OutOfPage> {
    match offset.checked_add(len) {
        Some(end) if end <= PAGE_SIZE => Ok(()),
        _ => Err(OutOfPage { offset, len }),
    }
}

/// An open `/dev/xen/evtchn` handle (`xenevtchn_handle`).
pub struct Evtchn {
    handle: NonNull<sys::xenevtchn_handle>,
}

// SAFETY: the handle is heap state owned by this value alone and only used through calls that
// are thin syscall wrappers on its fd (see the crate docs); it is not tied to a thread.
unsafe impl Send for Evtchn {}
// SAFETY: concurrent calls through `&Evtchn` only issue independent syscalls on the same fd;
// libxenevtchn mutates no userspace state after `xenevtchn_open`.
unsafe impl Sync for Evtchn {}

/// Turns a `-1`/`NULL`-with-errno return into an `io::Error` (read right after the call).
fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn port_result(ret: sys::xenevtchn_port_or_error_t) -> io::Result<u32> {
    if ret < 0 {
        return Err(last_error());
    }
    u32::try_from(ret).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad port {ret}")))
}

fn status(ret: i32) -> io::Result<()> {
    if ret < 0 { Err(last_error()) } else { Ok(()) }
}

impl Evtchn {
    /// Opens the event-channel device. Without Xen: `ENOENT`.
    pub fn open() -> io::Result<Self> {
        // SAFETY: a NULL logger selects libxenevtchn's default; flags 0 are valid. The returned
        // pointer is either NULL (errno set) or a handle we own until `xenevtchn_close`.
        let raw = unsafe { sys::xenevtchn_open(ptr::null_mut(), 0) };
        NonNull::new(raw).map(|handle| Evtchn { handle }).ok_or_else(last_error)
    }

    /// Binds a local port to `remote_port`, an unbound port `domid` allocated for us; returns
    /// the local port.
    pub fn bind_interdomain(&self, domid: u16, remote_port: u32) -> io::Result<u32> {
        // SAFETY: `self.handle` is a live handle from `xenevtchn_open`; the other arguments are
        // plain integers.
        port_result(unsafe { sys::xenevtchn_bind_interdomain(self.handle.as_ptr(), u32::from(domid), remote_port) })
    }

    /// Allocates a local port that `domid` may bind to (frontend side).
    pub fn bind_unbound_port(&self, domid: u16) -> io::Result<u32> {
        // SAFETY: live handle; integer argument.
        port_result(unsafe { sys::xenevtchn_bind_unbound_port(self.handle.as_ptr(), u32::from(domid)) })
    }

    /// Unbinds a local port.
    pub fn unbind(&self, port: u32) -> io::Result<()> {
        // SAFETY: live handle; integer argument.
        status(unsafe { sys::xenevtchn_unbind(self.handle.as_ptr(), port) })
    }

    /// Signals the remote end of a local port.
    pub fn notify(&self, port: u32) -> io::Result<()> {
        // SAFETY: live handle; integer argument.
        status(unsafe { sys::xenevtchn_notify(self.handle.as_ptr(), port) })
    }

    /// Takes the next pending local port; `Ok(None)` when nothing is pending (`EAGAIN` on a
    /// non-blocking fd, see [`set_nonblocking`](Self::set_nonblocking)). The port stays masked
    /// until [`unmask`](Self::unmask).
    pub fn pending(&self) -> io::Result<Option<u32>> {
        // SAFETY: live handle.
        let ret = unsafe { sys::xenevtchn_pending(self.handle.as_ptr()) };
        if ret < 0 {
            let e = last_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        port_result(ret).map(Some)
    }

    /// Re-arms a port returned by [`pending`](Self::pending).
    pub fn unmask(&self, port: u32) -> io::Result<()> {
        // SAFETY: live handle; integer argument.
        status(unsafe { sys::xenevtchn_unmask(self.handle.as_ptr(), port) })
    }

    /// The handle's fd, readable when a port is pending (for `AsyncFd`/poll).
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: live handle. The fd stays open until `xenevtchn_close` in Drop, which the
        // returned borrow cannot outlive.
        unsafe { BorrowedFd::borrow_raw(sys::xenevtchn_fd(self.handle.as_ptr())) }
    }

    /// Makes [`pending`](Self::pending) return `Ok(None)` instead of blocking.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.fd().as_raw_fd();
        // SAFETY: `fd` is open (borrowed from a live handle); F_GETFL/F_SETFL take/return ints.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(last_error());
        }
        // SAFETY: as above.
        status(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })
    }

    /// Registers the handle's fd with tokio (inside a runtime), for [`AsyncEvtchn::wait_pending`].
    pub fn into_async(self) -> io::Result<AsyncEvtchn> {
        // SAFETY: `as_raw_fd` returns the fd of the live handle, which stays open and unchanged
        // until the `Evtchn` is dropped; the `AsyncFd` owns the `Evtchn`, so it deregisters
        // before the handle (and fd) is closed or handed back by `into_inner`.
        let fd = unsafe { AsyncFd::register(self) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(AsyncEvtchn { fd })
    }
}

impl AsRawFd for Evtchn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd().as_raw_fd()
    }
}

impl Drop for Evtchn {
    fn drop(&mut self) {
        // SAFETY: the handle came from `xenevtchn_open` and is closed exactly once, here; this
        // also unbinds every port still bound through it.
        unsafe { sys::xenevtchn_close(self.handle.as_ptr()) };
    }
}

/// An [`Evtchn`] whose fd is registered with tokio.
pub struct AsyncEvtchn {
    fd: AsyncFd<Evtchn>,
}

impl AsyncEvtchn {
    /// The handle.
    pub fn get_ref(&self) -> &Evtchn {
        self.fd.get_ref()
    }

    /// Deregisters the fd and gives the handle back.
    pub fn into_inner(self) -> Evtchn {
        self.fd.into_inner()
    }

    /// Waits until a port of this handle is pending, consumes it and re-arms it.
    pub async fn wait_pending(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().pending()? {
                Some(port) => return guard.get_inner().unmask(port),
                None => guard.clear_ready(),
            }
        }
    }
}

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
        Ok(Gnttab { handle: Arc::new(GnttabHandle(handle)) })
    }

    /// Maps one page granted by `domid` read/write. Unmapped when the result is dropped.
    pub fn map_grant_ref(&self, domid: u16, gref: u32) -> io::Result<MappedPage> {
        // SAFETY: live handle; integer arguments. On success the result is a fresh PAGE_SIZE
        // mapping owned by us until `xengnttab_unmap`.
        let raw = unsafe {
            sys::xengnttab_map_grant_ref(
                self.handle.0.as_ptr(),
                u32::from(domid),
                gref,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(last_error)?;
        Ok(MappedPage { ptr, gnttab: self.handle.clone() })
    }
}

/// A peer's page mapped into our address space. Only accessed by volatile copies
/// ([`read`](Self::read), [`write`](Self::write)); no reference into it is ever created.
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

impl MappedPage {
    /// Copies `buf.len()` bytes at `offset` out of the page.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfPage> {
        in_page(offset, buf.len())?;
        // SAFETY: `ptr` is a live PAGE_SIZE mapping until Drop; bounds checked above.
        unsafe { volatile_read(self.ptr, offset, buf) };
        Ok(())
    }

    /// Copies `data` into the page at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfPage> {
        in_page(offset, data.len())?;
        // SAFETY: as above; mapped PROT_READ|PROT_WRITE.
        unsafe { volatile_write(self.ptr, offset, data) };
        Ok(())
    }
}

impl Drop for MappedPage {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `xengnttab_map_grant_ref` on this handle (kept alive by the
        // Arc), covers one page, and is unmapped exactly once; no reference into it exists.
        let ret = unsafe { sys::xengnttab_unmap(self.gnttab.0.as_ptr(), self.ptr.as_ptr().cast(), 1) };
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
/// frontend: a vTPM domain talking to the manager; real guests use the in-kernel `xen-tpmfront`).
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
        Ok(Gntshr { handle: Arc::new(GntshrHandle(handle)) })
    }

    /// Allocates a zeroed page and grants it to `domid`; returns the grant reference and the
    /// page. Unshared when the memory is dropped.
    pub fn share_page(&self, domid: u16, writable: bool) -> io::Result<(u32, SharedMem)> {
        let mut gref: u32 = 0;
        // SAFETY: live handle; `gref` is a valid out-pointer for exactly `count = 1` refs. On
        // success the result is a fresh one-page mapping owned by us until `xengntshr_unshare`.
        let raw = unsafe {
            sys::xengntshr_share_pages(self.handle.0.as_ptr(), u32::from(domid), 1, &mut gref, i32::from(writable))
        };
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(last_error)?;
        Ok((gref, SharedMem { ptr, gntshr: self.handle.clone() }))
    }
}

/// A page of ours granted to another domain; accessed only by volatile copies.
pub struct SharedMem {
    ptr: NonNull<u8>,
    gntshr: Arc<GntshrHandle>,
}

// SAFETY: as for `MappedPage`.
unsafe impl Send for SharedMem {}
// SAFETY: as for `MappedPage`.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Copies `buf.len()` bytes at `offset` out of the page.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfPage> {
        in_page(offset, buf.len())?;
        // SAFETY: `ptr` is a live PAGE_SIZE read/write mapping until Drop; bounds checked.
        unsafe { volatile_read(self.ptr, offset, buf) };
        Ok(())
    }

    /// Copies `data` into the page at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfPage> {
        in_page(offset, data.len())?;
        // SAFETY: as above.
        unsafe { volatile_write(self.ptr, offset, data) };
        Ok(())
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `xengntshr_share_pages` on this handle (alive via the Arc),
        // one page, unshared exactly once.
        let ret = unsafe { sys::xengntshr_unshare(self.gntshr.0.as_ptr(), self.ptr.as_ptr().cast(), 1) };
        if ret < 0 {
            xvtpm_log::host_warn!(error = %last_error(), "xengntshr_unshare failed");
        }
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
        let e = Evtchn::open().err().expect("evtchn open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = Gnttab::open().err().expect("gnttab open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = Gntshr::open().err().expect("gntshr open must fail without Xen");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }

    #[test]
    fn page_bounds() {
        assert_eq!(in_page(4095, 1), Ok(()));
        assert_eq!(in_page(4095, 2), Err(OutOfPage { offset: 4095, len: 2 }));
        assert_eq!(in_page(usize::MAX, 1), Err(OutOfPage { offset: usize::MAX, len: 1 }));
    }
}
