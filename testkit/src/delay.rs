//! A delaying TCP proxy in front of a TPM, to model a discrete TPM.
//!
//! swtpm answers in microseconds to milliseconds; a discrete TPM on an LPC or
//! SPI bus takes tens to hundreds of milliseconds per command. [`DelayProxy`]
//! listens on a data/control port pair (P, P+1, like swtpm) and forwards to
//! the TPM's pair, holding every client→TPM chunk for a fixed delay first.
//! Only the request direction is delayed, so each TPM command costs one delay.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A running proxy pair; stops accepting on drop.
pub struct DelayProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    chunks: Arc<AtomicU64>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, chunks: Option<Arc<AtomicU64>>) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(c) = &chunks {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn serve(l: TcpListener, target: u16, delay: Duration, stop: Arc<AtomicBool>, chunks: Option<Arc<AtomicU64>>) {
    for c in l.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = c else { continue };
        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
        client.set_nodelay(true).ok();
        server.set_nodelay(true).ok();
        let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
        let chunks = chunks.clone();
        std::thread::spawn(move || pump(client, server, delay, chunks));
        std::thread::spawn(move || pump(s2, c2, Duration::ZERO, None));
    }
}

impl DelayProxy {
    /// Proxies `127.0.0.1:{target, target+1}` with `delay` per request chunk.
    pub fn start(target: u16, delay: Duration) -> DelayProxy {
        for _ in 0..50 {
            let Ok(d) = TcpListener::bind(("127.0.0.1", 0)) else { continue };
            let port = d.local_addr().expect("addr").port();
            let Some(cp) = port.checked_add(1) else { continue };
            let Ok(c) = TcpListener::bind(("127.0.0.1", cp)) else { continue };
            let stop = Arc::new(AtomicBool::new(false));
            let chunks = Arc::new(AtomicU64::new(0));
            let (s1, s2, n) = (stop.clone(), stop.clone(), chunks.clone());
            std::thread::spawn(move || serve(d, target, delay, s1, Some(n)));
            std::thread::spawn(move || serve(c, target + 1, delay, s2, None));
            return DelayProxy { port, stop, chunks };
        }
        panic!("no free port pair for the delay proxy");
    }

    /// The proxy's data port (control is port + 1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Client→TPM chunks forwarded on the data port so far: TPM commands, for a client that
    /// writes each command at once (the swtpm TCTI does).
    pub fn commands(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }

    /// TCTI string for the proxied TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loops so they see the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = TcpStream::connect(("127.0.0.1", self.port + 1));
    }
}
