//! swtpm's socket protocol: a data channel carrying raw TPM packets and a
//! control channel carrying `CMD_*` requests (see [`vtpm_proto::swtpm_ctrl`]).
//!
//! Everything runs on one thread (libtpms is process-global and not
//! thread-safe): a tokio current-thread runtime with a `LocalSet`, the vTPM
//! in an `Rc<RefCell<_>>` that is never borrowed across an `.await`.
//!
//! Framing on the data channel is defensive: a header must arrive within
//! [`FRAME_GRACE`] of its first byte and a body within [`BODY_GRACE`]; a
//! packet that is short, oversized or lies about its size is answered with a
//! TPM error, the rest of what the peer sent is drained, and the connection
//! keeps serving.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::time::timeout;
use vtpm_proto::swtpm_ctrl::{self as ctrl, Request, cap, res};
use tpm_wire::{self as tpm, HEADER_LEN};

use crate::config::Listen;
use crate::dispatch::{Shared, execute};
use crate::peer::Access;
use xvtpm_log::{guest_info, guest_warn};

/// How long the rest of a header may take after its first byte.
pub const FRAME_GRACE: Duration = Duration::from_millis(200);
/// How long the body may take after the header.
pub const BODY_GRACE: Duration = Duration::from_secs(2);
/// Quiet period that ends draining after a malformed packet.
pub const DRAIN_QUIET: Duration = Duration::from_millis(30);

/// Control-channel capabilities we implement.
pub const CAPS: u32 = cap::INIT
    | cap::SHUTDOWN
    | cap::GET_TPMESTABLISHED
    | cap::SET_LOCALITY
    | cap::CANCEL_TPM_CMD
    | cap::STORE_VOLATILE
    | cap::RESET_TPMESTABLISHED
    | cap::GET_STATEBLOB
    | cap::SET_STATEBLOB
    | cap::STOP
    | cap::GET_CONFIG
    | cap::SET_DATAFD
    | cap::SET_BUFFERSIZE;

/// Most connections open at once per channel (data, control) of this vTPM; more
/// are accepted and closed at once. QEMU uses one of each, a tpm2-tss client one
/// data connection and short control connections.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection must send its first byte within this long, or it is closed.
pub const FIRST_BYTE_WAIT: Duration = Duration::from_secs(10);
/// First and longest pause after `accept` fails (out of descriptors or memory):
/// the listener stays readable, so retrying at once would spin.
pub const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(500));

/// The two channels of swtpm's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// TPM command packets.
    Data,
    /// `CMD_*` control requests.
    Ctrl,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Data => "data",
            Channel::Ctrl => "control",
        }
    }

    fn open(self) -> &'static AtomicUsize {
        static OPEN: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        &OPEN[self as usize]
    }
}

/// One of a channel's [`MAX_CONNECTIONS`] places, given back on drop.
pub struct Slot(&'static AtomicUsize);

impl Slot {
    /// A place on `ch`, if one is free.
    pub fn take(ch: Channel) -> Option<Slot> {
        let open = ch.open();
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < MAX_CONNECTIONS).then_some(n + 1)).ok().map(|_| Slot(open))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Bound listeners, ready to serve.
pub struct Bound {
    listeners: Vec<(Listener, Channel)>,
    xen: Vec<crate::xen::XenBackend>,
    access: Access,
    /// (data port, ctrl port) of each TCP pair.
    pub tcp_ports: Vec<(u16, u16)>,
}

/// Binds every listener. Must be called inside the runtime. Unix sockets are made
/// mode 0600 and owned by the consumer (if any); every connection is checked against
/// `access` when accepted. With `ctrl_from_stdin` the (one) `ctrl:PATH` listener is not bound
/// here but taken from stdin, where the process that started us put it bound at PATH.
pub async fn bind(listen: &[Listen], uuid: uuid::Uuid, family: tpm::Family, access: Access, ctrl_from_stdin: bool) -> io::Result<Bound> {
    let mut b = Bound { listeners: vec![], xen: vec![], access, tcp_ports: vec![] };
    if ctrl_from_stdin && listen.iter().filter(|l| matches!(l, Listen::UnixCtrl(_))).count() != 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "--ctrl-listener-stdin needs exactly one --listen ctrl:PATH"));
    }
    for l in listen {
        match l {
            Listen::UnixCtrl(p) if ctrl_from_stdin => b.listeners.push((Listener::Unix(inherited_unix(p)?), Channel::Ctrl)),
            Listen::TcpPair(addr) => {
                let (d, c) = bind_tcp_pair(*addr).await?;
                b.tcp_ports.push((d.local_addr()?.port(), c.local_addr()?.port()));
                b.listeners.push((Listener::Tcp(d), Channel::Data));
                b.listeners.push((Listener::Tcp(c), Channel::Ctrl));
            }
            Listen::UnixData(p) => b.listeners.push((Listener::Unix(bind_unix(p, access)?), Channel::Data)),
            Listen::UnixCtrl(p) => b.listeners.push((Listener::Unix(bind_unix(p, access)?), Channel::Ctrl)),
            Listen::Xen(root) => b.xen.push(crate::xen::XenBackend::open(root, uuid, family).await?),
        }
    }
    Ok(b)
}

/// The listening Unix socket on stdin, which must be bound at `p`.
fn inherited_unix(p: &Path) -> io::Result<UnixListener> {
    use std::os::fd::AsFd;
    let named = |m: String| io::Error::new(io::ErrorKind::InvalidInput, format!("--ctrl-listener-stdin: {m}"));
    let fd = io::stdin().as_fd().try_clone_to_owned()?;
    let l = std::os::unix::net::UnixListener::from(fd);
    let addr = l.local_addr().map_err(|e| named(format!("stdin is not a Unix socket ({e})")))?;
    if addr.as_pathname() != Some(p) {
        return Err(named(format!("stdin is bound at {:?}, not at {}", addr.as_pathname(), p.display())));
    }
    // A connected stream has a local address too; only a listener has SO_ACCEPTCONN.
    if !rustix::net::sockopt::socket_acceptconn(&l)? {
        return Err(named("stdin is not a listening socket".into()));
    }
    l.set_nonblocking(true)?;
    UnixListener::from_std(l)
}

fn bind_unix(p: &Path, access: Access) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // A stale socket from a killed predecessor would make bind fail.
    if let Ok(meta) = std::fs::symlink_metadata(p) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(p)?;
        }
    }
    let l = UnixListener::bind(p)?;
    let named = |e: io::Error| crate::errctx::io_named(p.display())(e);
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(named)?;
    if let Some(uid) = access.consumer_uid.filter(|&u| u != rustix::process::geteuid().as_raw()) {
        std::os::unix::fs::chown(p, Some(uid), None).map_err(named)?;
    }
    Ok(l)
}

async fn bind_tcp_pair(addr: SocketAddr) -> io::Result<(TcpListener, TcpListener)> {
    if addr.port() != 0 {
        let d = TcpListener::bind(addr).await.map_err(crate::errctx::io_named(addr))?;
        let mut c_addr = addr;
        c_addr.set_port(addr.port().checked_add(1).ok_or_else(|| io::Error::other("port 65535 leaves no control port"))?);
        return Ok((d, TcpListener::bind(c_addr).await.map_err(crate::errctx::io_named(c_addr))?));
    }
    // Port 0: a free pair below the kernel's ephemeral range, so that the pair the vTPM gets can
    // be recorded and bound again at its next start (xl-vtpm does so) without an outgoing
    // connection having taken one of the ports meanwhile; the kernel's pick if there is no room.
    if let Some((lo, hi)) = fixed_port_range() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let mut d_addr = addr;
            d_addr.set_port(rng.gen_range(lo..hi));
            let Ok(d) = TcpListener::bind(d_addr).await else { continue };
            let mut c_addr = addr;
            c_addr.set_port(d_addr.port() + 1);
            if let Ok(c) = TcpListener::bind(c_addr).await {
                return Ok((d, c));
            }
        }
    }
    for _ in 0..200 {
        let d = TcpListener::bind(addr).await?;
        let p = d.local_addr()?.port();
        let Some(cp) = p.checked_add(1) else { continue };
        let mut c_addr = addr;
        c_addr.set_port(cp);
        if let Ok(c) = TcpListener::bind(c_addr).await {
            return Ok((d, c));
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no free data/control port pair found"))
}

/// Where a port-0 TCP pair is picked: `[10000, ephemeral low - 1)` (data ports; control is the
/// next one), or `None` if the kernel's ephemeral range starts too low to leave room.
fn fixed_port_range() -> Option<(u16, u16)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    const FIRST: u16 = 10_000;
    (low > FIRST + 1000).then_some((FIRST, low - 1))
}

/// Serves until shutdown is requested.
pub async fn serve(bound: Bound, shared: Rc<Shared>) {
    for (l, ch) in bound.listeners {
        tokio::task::spawn_local(accept_loop(l, ch, bound.access, shared.clone()));
    }
    for x in bound.xen {
        let s = shared.clone();
        tokio::task::spawn_local(async move {
            x.serve(s.clone()).await;
            // Xenstore went away: nothing left to serve.
            s.exit.notify_one();
        });
    }
    shared.exit.notified().await;
}

/// The uid behind a connection, or why there is none.
fn peer_uid(c: &Conn) -> io::Result<u32> {
    use crate::errctx::io_named;
    match c {
        Conn::Unix(s) => s.peer_cred().map(|c| c.uid()).map_err(io_named("SO_PEERCRED")),
        Conn::Tcp(s) => {
            let (ours, peer) = (s.local_addr()?, s.peer_addr()?);
            match crate::peer::tcp_peer_uid(ours, peer) {
                Ok(Some(uid)) => Ok(uid),
                Ok(None) => Err(io::Error::new(io::ErrorKind::NotFound, format!("no live local socket for peer {peer}"))),
                Err(e) => Err(io_named(format_args!("looking up the owner of peer {peer}"))(e)),
            }
        }
    }
}

/// Waits until the peer has sent something (or closed): a peek, since a fresh
/// stream counts as readable before anything arrived.
async fn first_byte(c: &Conn) -> io::Result<()> {
    let mut b = [0u8; 1];
    match c {
        Conn::Tcp(t) => t.peek(&mut b).await.map(|_| ()),
        Conn::Unix(u) => loop {
            u.readable().await?;
            let peek = || {
                rustix::net::recv(u.as_fd(), &mut b[..], rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT)
                    .map(|_| ())
                    .map_err(io::Error::from)
            };
            match u.try_io(tokio::io::Interest::READABLE, peek) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        },
    }
}

async fn accept_loop(l: Listener, ch: Channel, access: Access, shared: Rc<Shared>) {
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let accepted = match &l {
            Listener::Tcp(t) => t.accept().await.map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(u) => u.accept().await.map(|(s, _)| Conn::Unix(s)),
        };
        let conn = match accepted {
            Ok(c) => {
                backoff = ACCEPT_BACKOFF.0;
                c
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOMEM leave the connection queued and the listener
                // readable: pause (doubling) instead of spinning.
                guest_warn!(channel = ch.name(), error = %e, pause_ms = backoff.as_millis() as u64, "accept failed; pausing this listener");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        match peer_uid(&conn) {
            Ok(uid) if access.allows(uid) => {}
            Ok(uid) => {
                guest_warn!(channel = ch.name(), uid, consumer = ?access.consumer_uid, "refused a connection: only root and the vTPM's consumer may use it");
                continue;
            }
            Err(why) => {
                guest_warn!(channel = ch.name(), reason = %why, "refused a connection whose owner is unknown");
                continue;
            }
        }
        let Some(slot) = Slot::take(ch) else {
            guest_warn!(channel = ch.name(), limit = MAX_CONNECTIONS, "refused a connection: too many open on this channel");
            continue;
        };
        let s = shared.clone();
        tokio::task::spawn_local(async move {
            let _slot = slot;
            if timeout(FIRST_BYTE_WAIT, first_byte(&conn)).await.is_err() {
                guest_info!(channel = ch.name(), wait_s = FIRST_BYTE_WAIT.as_secs(), "closed a connection that sent nothing");
                return;
            }
            match (ch, conn) {
                (Channel::Data, Conn::Tcp(t)) => {
                    t.set_nodelay(true).ok();
                    serve_data(t, s).await
                }
                (Channel::Data, Conn::Unix(u)) => serve_data(u, s).await,
                (Channel::Ctrl, Conn::Tcp(t)) => {
                    t.set_nodelay(true).ok();
                    serve_ctrl(CtrlStream::Tcp(t), s).await
                }
                (Channel::Ctrl, Conn::Unix(u)) => serve_ctrl(CtrlStream::Unix(u, None), s).await,
            }
        });
    }
}

async fn drain<S: AsyncRead + Unpin>(s: &mut S) {
    let mut sink = [0u8; 4096];
    while let Ok(Ok(n)) = timeout(DRAIN_QUIET, s.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// Reads into `buf` until full, or until `grace` passes without completion.
/// Returns bytes read; 0 with an empty buf means EOF.
async fn read_within<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8], grace: Duration) -> io::Result<usize> {
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + grace;
    while got < buf.len() {
        match tokio::time::timeout_at(deadline, s.read(&mut buf[got..])).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    Ok(got)
}

/// Serves one data-channel connection.
///
/// One buffer per connection: a command normally arrives in a single read,
/// which is then the only syscall and no timer is armed. Bytes beyond the
/// declared size (a pipelining client) are kept for the next command.
pub async fn serve_data<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, shared: Rc<Shared>) {
    let mut buf = vec![0u8; crate::vtpm::DEFAULT_BUFFER as usize];
    let mut have = 0usize;
    loop {
        if have == 0 {
            have = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
        }
        if have < HEADER_LEN {
            match read_within(&mut s, &mut buf[have..HEADER_LEN], FRAME_GRACE).await {
                Ok(n) => have += n,
                Err(_) => return,
            }
        }
        let max = (shared.vtpm.borrow().buffer_size() as usize).min(buf.len());
        let declared = tpm::peek_header(&buf[..have]).map(|h| h.size as usize);
        let rsp = match declared {
            Some(size) if (HEADER_LEN..=max).contains(&size) => {
                if have < size {
                    match read_within(&mut s, &mut buf[have..size], BODY_GRACE).await {
                        Ok(n) => have += n,
                        Err(_) => return,
                    }
                }
                let complete = have >= size;
                let rsp = execute(&shared, &buf[..size.min(have)]).await;
                if complete {
                    // Keep what a pipelining client sent after this command.
                    buf.copy_within(size..have, 0);
                    have -= size;
                } else {
                    drain(&mut s).await;
                    have = 0;
                }
                rsp
            }
            _ => {
                // Short, undersized or oversized: answer from what we have,
                // then resynchronise by draining whatever else was sent.
                let rsp = shared.vtpm.borrow_mut().execute(&buf[..have.min(HEADER_LEN)]);
                drain(&mut s).await;
                have = 0;
                rsp
            }
        };
        if s.write_all(&rsp).await.is_err() {
            return;
        }
    }
}

/// A control connection: TCP (tpm2-tss) or Unix (QEMU, may carry fds).
pub enum CtrlStream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix, with the descriptor received for `CMD_SET_DATAFD`, if any.
    Unix(UnixStream, Option<OwnedFd>),
}

/// One `recvmsg`. Every descriptor the kernel installs is owned (closed when dropped),
/// whatever else goes wrong. A message with more than one descriptor, a truncated
/// control message, or a second descriptor while one waits for `CMD_SET_DATAFD` is an
/// error: the peer is not speaking swtpm's protocol.
fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8], pending: &mut Option<OwnedFd>) -> io::Result<usize> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(fd, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC)?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            received.extend(fds);
        }
    }
    let bad = |why: String| Err(io::Error::new(io::ErrorKind::InvalidData, why));
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return bad(format!("control message truncated (more descriptors than the one CMD_SET_DATAFD takes); closed the {} received", received.len()));
    }
    match (received.len(), pending.is_some()) {
        (0, _) => {}
        (1, false) => *pending = received.pop(),
        (n, waiting) => {
            return bad(format!("{} descriptors passed where CMD_SET_DATAFD takes one; closed them", n + usize::from(waiting)));
        }
    }
    Ok(msg.bytes)
}

impl CtrlStream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            CtrlStream::Tcp(s) => s.read(buf).await,
            CtrlStream::Unix(s, pending) => loop {
                s.readable().await?;
                let fd = s.as_fd();
                match s.try_io(tokio::io::Interest::READABLE, || recv_with_fds(fd, buf, pending)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        guest_warn!(error = %e, "closed a control connection");
                        return Err(e);
                    }
                    other => return other,
                }
            },
        }
    }

    async fn read_exact_within(&mut self, buf: &mut [u8], grace: Duration) -> io::Result<bool> {
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + grace;
        while got < buf.len() {
            match tokio::time::timeout_at(deadline, self.read(&mut buf[got..])).await {
                Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            CtrlStream::Tcp(s) => s.write_all(b).await,
            CtrlStream::Unix(s, _) => s.write_all(b).await,
        }
    }

    /// How many bytes (up to `max`) the peer has already sent and we have not
    /// read, without waiting and without consuming them.
    fn queued(&self, max: usize) -> usize {
        use nix::sys::socket::{MsgFlags, recv};
        let raw = match self {
            CtrlStream::Tcp(s) => s.as_raw_fd(),
            CtrlStream::Unix(s, _) => s.as_raw_fd(),
        };
        let mut peek = vec![0u8; max];
        recv(raw, &mut peek, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).unwrap_or(0)
    }

    fn take_fd(&mut self) -> Option<OwnedFd> {
        match self {
            CtrlStream::Tcp(_) => None,
            CtrlStream::Unix(_, pending) => pending.take(),
        }
    }
}

/// Serves one control-channel connection.
///
/// A request is framed as swtpm frames it (see [`vtpm_proto::swtpm_ctrl`]):
/// the command code, the fixed part of its body, then whatever the client
/// wrote with it (QEMU's union padding), or the length its header announces.
/// Every request gets exactly one response, so the stream stays in step
/// whatever the command. When a controller on a Unix control socket (QEMU)
/// hangs up or sends `CMD_SHUTDOWN`, the process ends like swtpm `--terminate`,
/// unless it persists (`--persist`, or a data socket beside the control socket).
pub async fn serve_ctrl(mut s: CtrlStream, shared: Rc<Shared>) {
    let served = serve_ctrl_requests(&mut s, &shared).await;
    if served == CtrlEnd::HungUp && matches!(s, CtrlStream::Unix(..)) && !shared.persist {
        xvtpm_log::host_info!("the controller hung up the control channel; stopping (run with --persist to keep serving)");
        shared.exit.notify_one();
    }
}

#[derive(Debug, PartialEq, Eq)]
enum CtrlEnd {
    /// The peer closed the connection (or it failed).
    HungUp,
    /// `CMD_SHUTDOWN` ended the process.
    Shutdown,
}

/// This control connection is a device model's (it gave a data channel): counted in
/// [`Shared::device_models`] while it is open.
struct DeviceModel(Rc<Shared>);

impl DeviceModel {
    fn new(shared: &Rc<Shared>) -> DeviceModel {
        shared.device_models.set(shared.device_models.get() + 1);
        DeviceModel(shared.clone())
    }
}

impl Drop for DeviceModel {
    fn drop(&mut self) {
        let left = self.0.device_models.get().saturating_sub(1);
        self.0.device_models.set(left);
        if left > 0 {
            hand_back(&self.0);
        }
    }
}

/// A device model ended while another is still connected: a Xen HVM guest's migration whose
/// other end is gone. If the ended one was a destination that stopped the TPM (its machine
/// reset does, before it loads the incoming state) and never started it again, the source
/// resumes its guest: the TPM runs again where it stopped, not powered off under it.
fn hand_back(shared: &Shared) {
    let Ok(mut v) = shared.vtpm.try_borrow_mut() else { return };
    if v.running() {
        return;
    }
    match v.resume_stopped() {
        Ok(true) => {
            if shared.imported.take().is_some() {
                // The source's guest runs on this state: it is the floor from now on.
                shared.import_floor.set(v.generation());
                shared.import_pending.set(None);
            }
            guest_info!("a device model ended before it loaded the state or started the TPM (a failed move): the TPM runs on where it stopped, for the other one");
        }
        Ok(false) => guest_info!("a device model ended with the TPM stopped and no state to resume: it stays off until the next CMD_INIT"),
        Err(e) => guest_warn!(error = %e, "resuming the TPM after a device model ended failed; it stays off until the next CMD_INIT"),
    }
}

async fn serve_ctrl_requests(s: &mut CtrlStream, shared: &Rc<Shared>) -> CtrlEnd {
    let mut device_model: Option<DeviceModel> = None;
    loop {
        let mut code = [0u8; 4];
        let first = match s.read(&mut code).await {
            Ok(0) | Err(_) => return CtrlEnd::HungUp,
            Ok(n) => n,
        };
        match s.read_exact_within(&mut code[first..], FRAME_GRACE).await {
            Ok(true) => {}
            Ok(false) => {
                guest_warn!("control request shorter than its command code");
                if s.write_all(&ctrl::response(res::BAD_PARAMETER, &[])).await.is_err() {
                    return CtrlEnd::HungUp;
                }
                continue;
            }
            Err(_) => return CtrlEnd::HungUp,
        }
        let code = u32::from_be_bytes(code);
        let req = match ctrl::framing(code) {
            ctrl::Framing::Fixed { min } => {
                let mut body = vec![0u8; min];
                if !matches!(s.read_exact_within(&mut body, BODY_GRACE).await, Ok(true)) {
                    return CtrlEnd::HungUp;
                }
                // What the client wrote with the request is part of it (QEMU
                // sends whole C unions: ptm_loc is the locality and 3 bytes
                // of padding), as swtpm takes it.
                let extra = s.queued(ctrl::MAX_BODY - min);
                if extra > 0 {
                    body.resize(min + extra, 0);
                    if !matches!(s.read_exact_within(&mut body[min..], BODY_GRACE).await, Ok(true)) {
                        return CtrlEnd::HungUp;
                    }
                }
                ctrl::decode(code, &body)
            }
            ctrl::Framing::Announced { header, len_at } => {
                let mut head = vec![0u8; header];
                if !matches!(s.read_exact_within(&mut head, BODY_GRACE).await, Ok(true)) {
                    return CtrlEnd::HungUp;
                }
                let len = ctrl::announced_len(&head, len_at).unwrap_or(0) as usize;
                let req = ctrl::decode(code, &head);
                if matches!(req, Request::SetStateBlob { .. }) && len <= vtpm_proto::stateblob::MAX_SEALED {
                    let mut data = vec![0u8; len];
                    if !matches!(s.read_exact_within(&mut data, BODY_GRACE).await, Ok(true)) {
                        return CtrlEnd::HungUp;
                    }
                    let reply = set_state_blob(req, &data, shared);
                    if s.write_all(&reply).await.is_err() {
                        return CtrlEnd::HungUp;
                    }
                    continue;
                }
                // Not taken (hashing; a blob over the cap): consume the data in
                // chunks (never allocating what the peer announces), then answer.
                let mut sink = [0u8; 4096];
                let mut left = len;
                while left > 0 {
                    let n = left.min(sink.len());
                    if !matches!(s.read_exact_within(&mut sink[..n], BODY_GRACE).await, Ok(true)) {
                        return CtrlEnd::HungUp;
                    }
                    left -= n;
                }
                match req {
                    Request::SetStateBlob { .. } => {
                        guest_warn!(len, "state blob larger than any this vTPM makes");
                        Request::BadSize(code)
                    }
                    other => other,
                }
            }
        };
        let gives_data = matches!(req, Request::SetDataFd);
        // another device model than this one is connected
        let other_device_model = device_model.is_some() && shared.device_models.get() >= 2;
        let (reply, exit) = handle_ctrl(req, s, shared, other_device_model);
        if gives_data && device_model.is_none() && reply == ctrl::response(res::SUCCESS, &[]) {
            device_model = Some(DeviceModel::new(shared));
        }
        if s.write_all(&reply).await.is_err() {
            return CtrlEnd::HungUp;
        }
        if exit {
            shared.exit.notify_one();
            return CtrlEnd::Shutdown;
        }
    }
}

fn result_of<E: std::fmt::Display>(r: Result<(), E>, what: &str) -> u32 {
    match r {
        Ok(()) => res::SUCCESS,
        Err(e) => {
            // A client can repeat a failing request as fast as it likes.
            guest_warn!(error = %e, "{what} failed");
            res::FAIL
        }
    }
}

/// Answers one control request. Responses carry only `u.resp` of the
/// command's union; a failure is a bare 4-byte result, as swtpm sends it.
fn handle_ctrl(req: Request, s: &mut CtrlStream, shared: &Rc<Shared>, other_device_model: bool) -> (Vec<u8>, bool) {
    xvtpm_log::guest_debug!(?req, "control request");
    let mut v = shared.vtpm.borrow_mut();
    let ok = |r: u32| ctrl::response(r, &[]);
    // swtpm answers commands that need a running TPM with BAD_ORDINAL while stopped.
    let stopped = !v.running();
    match req {
        Request::GetCapability => (ctrl::capability_response(CAPS).to_vec(), false),
        Request::Init { .. } => {
            if let Some(loaded) = shared.imported.take() {
                // No older blob loads from now on; the loaded ones again only until the TPM
                // runs a command on their state (then the generation their load wrote is the
                // floor: see set_state_blob).
                shared.import_floor.set(shared.import_floor.get().max(loaded));
                shared.import_pending.set(Some((v.generation(), v.commands_run())));
            }
            (ok(result_of(v.init(), "CMD_INIT")), false)
        }
        // QEMU sends CMD_SHUTDOWN whenever it exits, also when a Xen HVM guest reboots (libxl
        // ends the device model and starts a new one on the same control socket). A vTPM that
        // outlives its controller (`--persist`, or xl-vtpm's layout with a data socket) powers
        // the TPM off (state saved) and keeps serving: the next controller's CMD_INIT powers it
        // on, as a platform reset does. Otherwise the process ends, as swtpm's does.
        // Two device models at once: a Xen HVM guest's localhost migration. The destination's
        // loaded the state blobs and runs the TPM for the moved guest; the source's, ending
        // after the move, must not power it off under it (nor, after a failed move, the
        // destination's under the source that resumes).
        Request::Shutdown if shared.persist && other_device_model => {
            guest_info!("CMD_SHUTDOWN from a device model while another is connected (a migration's other end): the TPM keeps running");
            (ok(res::SUCCESS), false)
        }
        Request::Shutdown if shared.persist => {
            let r = result_of(v.stop(), "CMD_SHUTDOWN");
            guest_info!("CMD_SHUTDOWN: TPM powered off, state saved; serving the next controller");
            (ok(r), false)
        }
        Request::Shutdown => {
            let r = result_of(v.stop(), "CMD_SHUTDOWN");
            xvtpm_log::host_info!("shutdown requested on the control channel");
            (ok(r), true)
        }
        Request::Stop => (ok(result_of(v.stop(), "CMD_STOP")), false),
        Request::GetTpmEstablished if stopped => (ok(res::BAD_ORDINAL), false),
        Request::GetTpmEstablished => (ctrl::established_response(res::SUCCESS, false).to_vec(), false),
        Request::SetLocality(l) if l <= 4 => {
            v.set_locality(l);
            (ok(res::SUCCESS), false)
        }
        Request::SetLocality(_) => (ok(res::BAD_LOCALITY), false),
        Request::ResetTpmEstablished(_) if stopped => (ok(res::BAD_ORDINAL), false),
        Request::ResetTpmEstablished(l) if l <= 4 => (ok(res::SUCCESS), false),
        Request::ResetTpmEstablished(_) => (ok(res::BAD_LOCALITY), false),
        // Commands run synchronously; nothing is ever in flight to cancel.
        Request::Cancel if stopped => (ok(res::BAD_ORDINAL), false),
        Request::Cancel => (ok(res::SUCCESS), false),
        Request::StoreVolatile if stopped => (ok(res::BAD_ORDINAL), false),
        Request::StoreVolatile => (ok(result_of(v.store_volatile(), "CMD_STORE_VOLATILE")), false),
        Request::GetConfig => (ctrl::response(res::SUCCESS, &0u32.to_be_bytes()), false),
        // A running TPM's buffer size can only be queried (swtpm: err_running).
        Request::SetBufferSize(n) if n > 0 && !stopped => (ok(res::BAD_ORDINAL), false),
        Request::SetBufferSize(n) => {
            let (size, min, max) = v.set_buffer_size(n);
            (ctrl::buffersize_response(res::SUCCESS, size, min, max).to_vec(), false)
        }
        Request::SetDataFd => match s.take_fd() {
            Some(fd) => {
                let std_stream = std::os::unix::net::UnixStream::from(fd);
                let attached = std_stream.set_nonblocking(true).and_then(|_| UnixStream::from_std(std_stream));
                match (attached, Slot::take(Channel::Data)) {
                    (Ok(stream), Some(slot)) => {
                        let s = shared.clone();
                        tokio::task::spawn_local(async move {
                            let _slot = slot;
                            serve_data(stream, s).await
                        });
                        (ok(res::SUCCESS), false)
                    }
                    (Ok(_), None) => {
                        guest_warn!(limit = MAX_CONNECTIONS, "CMD_SET_DATAFD refused: too many data connections open");
                        (ok(res::FAIL), false)
                    }
                    (Err(e), _) => {
                        guest_warn!(error = %e, "CMD_SET_DATAFD: unusable descriptor");
                        (ok(res::FAIL), false)
                    }
                }
            }
            None => (ok(res::BAD_PARAMETER), false),
        },
        Request::BadSize(code) => {
            guest_warn!(code = %format!("{code:#x}"), "control request with a body of the wrong size");
            (ok(res::BAD_PARAMETER), false)
        }
        Request::Unknown(code) => {
            guest_warn!(code = %format!("{code:#x}"), "unknown control command");
            (ok(res::BAD_ORDINAL), false)
        }
        Request::GetStateBlob { .. } if stopped => (ok(res::BAD_ORDINAL), false),
        Request::GetStateBlob { kind, offset } => {
            let kind = match u8::try_from(kind) {
                Ok(k @ 1..=3) if offset == 0 => k,
                _ => return (ok(res::BAD_PARAMETER), false),
            };
            // The blob is stamped with the generation on disk: write what is pending first.
            if let Err(e) = v.persist_if_dirty() {
                xvtpm_log::guest_warn!(error = %e, "CMD_GET_STATEBLOB: could not persist the state first");
                return (ok(res::FAIL), false);
            }
            let plain = match v.export_blob(kind) {
                Ok(p) => p,
                Err(e) => {
                    xvtpm_log::guest_warn!(error = %e, "CMD_GET_STATEBLOB failed");
                    return (ok(res::FAIL), false);
                }
            };
            if plain.is_empty() {
                return (ctrl::stateblob_response(0, &[]), false);
            }
            let mut nonce = [0u8; 12];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
            let sealed = vtpm_proto::stateblob::seal(&shared.blob_key, &shared.uuid, v.family(), kind, v.generation(), &plain, &nonce);
            crate::guest_info!(kind, bytes = sealed.len(), generation = v.generation(), "state blob sealed for the controller");
            (ctrl::stateblob_response(ctrl::STATE_FLAG_ENCRYPTED, &sealed), false)
        }
        // The data of SET_STATEBLOB is read by the caller: see set_state_blob.
        Request::SetStateBlob { .. } => (ok(res::BAD_PARAMETER), false),
        Request::GetInfo { .. } | Request::Unsupported(_) => (ok(res::BAD_ORDINAL), false),
    }
}

/// `CMD_SET_STATEBLOB` with its data: open the sealed blob (this vTPM's key,
/// UUID, family and the requested type), refuse one older than the state it
/// would replace, and load it into the stopped TPM.
fn set_state_blob(req: Request, data: &[u8], shared: &Rc<Shared>) -> Vec<u8> {
    let ok = |r: u32| ctrl::response(r, &[]);
    let Request::SetStateBlob { kind, .. } = req else { return ok(res::BAD_PARAMETER) };
    let mut v = shared.vtpm.borrow_mut();
    if v.running() {
        // swtpm: err_running; QEMU sends CMD_STOP first.
        return ok(res::BAD_ORDINAL);
    }
    let kind = match u8::try_from(kind) {
        Ok(k @ 1..=3) => k,
        _ => return ok(res::BAD_PARAMETER),
    };
    let (generation, plain) = match vtpm_proto::stateblob::open(&shared.blob_key, &shared.uuid, v.family(), kind, data) {
        Ok(opened) => opened,
        Err(e) => {
            guest_warn!(error = %e, kind, "refused a state blob");
            let r = if e == vtpm_proto::stateblob::BlobError::Authentication { res::DECRYPT_ERROR } else { res::BAD_PARAMETER };
            return ok(r);
        }
    };
    if let Some((written, at)) = shared.import_pending.get()
        && v.commands_run() > at
    {
        shared.import_floor.set(shared.import_floor.get().max(written));
        shared.import_pending.set(None);
    }
    let floor = shared.import_floor.get();
    if generation < floor {
        guest_warn!(kind, generation, current = floor, "refused a state blob older than this vTPM's state (a replay)");
        return ok(res::FAIL);
    }
    match v.import_blob(kind, plain) {
        Ok(()) => {
            shared.imported.set(Some(shared.imported.get().map_or(generation, |g| g.max(generation))));
            crate::guest_info!(kind, generation, "state blob loaded");
            ok(res::SUCCESS)
        }
        Err(e) => {
            xvtpm_log::guest_warn!(error = %e, "CMD_SET_STATEBLOB failed");
            ok(res::FAIL)
        }
    }
}
