//! Who is on the other end of a connection.
//!
//! A vTPM serves root and its declared consumer (e.g. the QEMU user) only. On a Unix
//! socket the kernel reports the peer's credentials (`SO_PEERCRED`). A TCP connection
//! carries none, but a loopback peer's socket lives in this host's network namespace:
//! the kernel's socket-diagnostics interface (`NETLINK_SOCK_DIAG`, what `ss` uses) looks
//! it up by its exact 4-tuple and reports the uid that created it. The lookup is one
//! hash-table probe in the kernel, so its cost does not grow with the number of sockets
//! on the host (scanning `/proc/net/tcp` would).
//!
//! Only a live, full socket counts: a connection whose client already closed (an
//! orphan or a time-wait socket, which the kernel reports with uid 0 and inode 0), a
//! listening socket, or no match at all yields no uid, and the caller refuses.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink, sockopt};

/// Who may use a vTPM: root, and its consumer if one was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// The consumer's uid (e.g. the QEMU user), besides root.
    pub consumer_uid: Option<u32>,
}

impl Access {
    /// Whether a peer running as `uid` may use the vTPM.
    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || self.consumer_uid == Some(uid)
    }
}

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const IPPROTO_TCP: u8 = 6;
const TCP_LISTEN: u8 = 10;
const TCP_TIME_WAIT: u8 = 6;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `inet_diag_sockid`: sport, dport (big endian), src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// `inet_diag_msg` up to and including `idiag_inode`.
const MSG_LEN: usize = 72;

fn family_and_addr(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            a[..4].copy_from_slice(&v4.octets());
            (libc_af(AddressFamily::INET), a)
        }
        IpAddr::V6(v6) => (libc_af(AddressFamily::INET6), v6.octets()),
    }
}

fn libc_af(f: AddressFamily) -> u8 {
    f.as_raw() as u8
}

/// The socket id of the peer's own socket: local = `peer`, remote = `ours`.
fn sockid(peer: SocketAddr, ours: SocketAddr) -> [u8; SOCKID_LEN] {
    let mut id = [0u8; SOCKID_LEN];
    id[0..2].copy_from_slice(&peer.port().to_be_bytes());
    id[2..4].copy_from_slice(&ours.port().to_be_bytes());
    id[4..20].copy_from_slice(&family_and_addr(peer.ip()).1);
    id[20..36].copy_from_slice(&family_and_addr(ours.ip()).1);
    // idiag_if = 0; cookie = INET_DIAG_NOCOOKIE (no cookie check).
    id[40..48].copy_from_slice(&[0xff; 8]);
    id
}

fn request(peer: SocketAddr, ours: SocketAddr, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family_and_addr(peer.ip()).0);
    m.push(IPPROTO_TCP);
    m.push(0); // idiag_ext
    m.push(0); // pad
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state; checked below
    m.extend_from_slice(&sockid(peer, ours));
    m
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses the kernel's answer. `Ok(None)`: no live socket with exactly this 4-tuple.
fn parse_reply(reply: &[u8], want: &[u8; SOCKID_LEN]) -> io::Result<Option<u32>> {
    if reply.len() < NLMSG_HDR {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short sock_diag reply"));
    }
    let len = (u32_at(reply, 0) as usize).min(reply.len());
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind == NLMSG_ERROR {
        let errno = if len >= NLMSG_HDR + 4 { -(u32_at(reply, NLMSG_HDR) as i32) } else { 0 };
        // ENOENT: no such socket (the client is gone, or never was local).
        return if errno == rustix::io::Errno::NOENT.raw_os_error() { Ok(None) } else { Err(io::Error::from_raw_os_error(errno)) };
    }
    if kind != SOCK_DIAG_BY_FAMILY || len < NLMSG_HDR + MSG_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected sock_diag reply type {kind}, {len} bytes")));
    }
    let msg = &reply[NLMSG_HDR..NLMSG_HDR + MSG_LEN];
    let state = msg[1];
    // Exactly the peer's socket: same ports and addresses (ignore interface and cookie).
    let same = msg[4..40] == want[..36];
    let uid = u32_at(msg, 64);
    let inode = u32_at(msg, 68);
    if !same || state == TCP_LISTEN || state == TCP_TIME_WAIT || inode == 0 {
        return Ok(None);
    }
    Ok(Some(uid))
}

/// The uid owning the local socket at the other end of the TCP connection
/// `ours` ⇄ `peer`, or `None` if there is no such live socket on this host.
pub fn tcp_peer_uid(ours: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let (ours, peer) = (canonical(ours), canonical(peer));
    if ours.is_ipv4() != peer.is_ipv4() {
        return Ok(None);
    }
    let fd = rustix::net::socket_with(AddressFamily::NETLINK, SocketType::DGRAM, SocketFlags::CLOEXEC, Some(netlink::SOCK_DIAG))?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(1)))?;
    let seq = 1;
    let req = request(peer, ours, seq);
    rustix::net::sendto(&fd, &req, SendFlags::empty(), &netlink::SocketAddrNetlink::new(0, 0))?;
    let mut buf = [0u8; 512];
    let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
    parse_reply(&buf[..n], &sockid(peer, ours))
}

/// IPv4-mapped IPv6 addresses as plain IPv4 (how the kernel indexes such a peer).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn access_is_root_and_the_consumer() {
        let none = Access::default();
        assert!(none.allows(0) && !none.allows(65534));
        let qemu = Access { consumer_uid: Some(64055) };
        assert!(qemu.allows(0) && qemu.allows(64055) && !qemu.allows(65534));
    }

    #[test]
    fn finds_the_owner_of_an_ipv6_loopback_peer() {
        let Ok(l) = TcpListener::bind("[::1]:0") else { return }; // no IPv6 on this host
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(tcp_peer_uid(s.local_addr().unwrap(), peer).unwrap(), Some(me));
    }

    #[test]
    fn finds_the_owner_of_a_live_loopback_peer_and_nothing_else() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let ours = s.local_addr().unwrap();
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(tcp_peer_uid(ours, peer).unwrap(), Some(me));
        // Our own accepted socket is not the peer: swapping the tuple finds the client's
        // view of it only, never a listener.
        assert_eq!(tcp_peer_uid(ours, SocketAddr::new(peer.ip(), 1)).unwrap(), None);
        // Once the client has closed, its socket is an orphan / time-wait entry: no uid.
        drop(c);
        let gone = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            tcp_peer_uid(ours, peer).unwrap().is_none()
        });
        assert!(gone, "a closed client still maps to a uid");
    }
}
