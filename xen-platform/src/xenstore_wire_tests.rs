//! [`XsClient`] (xenstore-rs) against a minimal xenstored speaking the real wire protocol
//! (`xen/io/xs_wire.h`) on a Unix socket.
//!
//! xenstore-rs only reads the socket path from `$XENSTORED_PATH`, and setting the environment
//! of a running (multi-threaded) test process is unsound, so the parent test serves the socket
//! and re-runs this test binary as a child with the variable set; the child test is a no-op
//! unless it finds [`CHILD_VAR`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::*;

const CHILD_VAR: &str = "XVTPM_XS_WIRE_CHILD";

const XS_DIRECTORY: u32 = 1;
const XS_READ: u32 = 2;
const XS_WATCH: u32 = 4;
const XS_UNWATCH: u32 = 5;
const XS_WRITE: u32 = 11;
const XS_RM: u32 = 13;
const XS_WATCH_EVENT: u32 = 15;
const XS_ERROR: u32 = 16;

fn send(sock: &mut UnixStream, ty: u32, req_id: u32, payload: &[u8]) {
    let mut msg = Vec::with_capacity(16 + payload.len());
    for v in [ty, req_id, 0, payload.len() as u32] {
        msg.extend_from_slice(&v.to_ne_bytes());
    }
    msg.extend_from_slice(payload);
    sock.write_all(&msg).unwrap();
}

fn below(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// Serves one connection until it closes.
fn serve(mut sock: UnixStream) {
    let mut nodes: BTreeMap<String, String> = BTreeMap::new();
    let mut watches: Vec<(String, String)> = Vec::new();
    loop {
        let mut hdr = [0u8; 16];
        if sock.read_exact(&mut hdr).is_err() {
            return;
        }
        let word = |i: usize| u32::from_ne_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
        let (ty, req_id, len) = (word(0), word(1), word(3) as usize);
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload).unwrap();
        let args: Vec<String> = payload
            .split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let path = args[0].clone();
        let mut fired = Vec::new();
        match ty {
            XS_READ => match nodes.get(&path) {
                Some(v) => send(&mut sock, ty, req_id, v.as_bytes()),
                None => send(&mut sock, XS_ERROR, req_id, b"ENOENT\0"),
            },
            XS_DIRECTORY => {
                if nodes.contains_key(&path) {
                    let prefix = format!("{path}/");
                    let mut out = Vec::new();
                    for k in nodes.keys() {
                        if let Some(rest) = k.strip_prefix(&prefix).filter(|r| !r.contains('/')) {
                            out.extend_from_slice(rest.as_bytes());
                            out.push(0);
                        }
                    }
                    send(&mut sock, ty, req_id, &out);
                } else {
                    send(&mut sock, XS_ERROR, req_id, b"ENOENT\0");
                }
            }
            XS_WRITE => {
                // Payload: path NUL value (value not NUL-terminated).
                let split = payload.iter().position(|&b| b == 0).unwrap();
                let value = String::from_utf8_lossy(&payload[split + 1..]).into_owned();
                let mut parent = path.as_str();
                while let Some(i) = parent.rfind('/').filter(|&i| i > 0) {
                    parent = &parent[..i];
                    nodes.entry(parent.to_owned()).or_default();
                }
                nodes.insert(path.clone(), value);
                send(&mut sock, ty, req_id, b"OK\0");
                fired.push((path, false));
            }
            XS_RM => {
                if nodes.contains_key(&path) {
                    nodes.retain(|k, _| !below(k, &path));
                    fired.push((path, true));
                }
                send(&mut sock, ty, req_id, b"OK\0");
            }
            XS_WATCH => {
                watches.push((path.clone(), args[1].clone()));
                send(&mut sock, ty, req_id, b"OK\0");
                let mut ev = Vec::new();
                for part in [path.as_bytes(), args[1].as_bytes()] {
                    ev.extend_from_slice(part);
                    ev.push(0);
                }
                send(&mut sock, XS_WATCH_EVENT, 0, &ev);
            }
            XS_UNWATCH => {
                watches.retain(|(p, t)| !(p == &path && t == &args[1]));
                send(&mut sock, ty, req_id, b"OK\0");
            }
            _ => send(&mut sock, XS_ERROR, req_id, b"ENOSYS\0"),
        }
        for (changed, removed) in fired {
            for (w, token) in &watches {
                // As xenstored's fire_watches: the changed path for watches at or above it; for
                // a removal, also the watch's own path for watches below it.
                let event_path = if below(&changed, w) {
                    &changed
                } else if removed && below(w, &changed) {
                    w
                } else {
                    continue;
                };
                {
                    let mut ev = Vec::new();
                    for part in [event_path.as_bytes(), token.as_bytes()] {
                        ev.extend_from_slice(part);
                        ev.push(0);
                    }
                    send(&mut sock, XS_WATCH_EVENT, 0, &ev);
                }
            }
        }
    }
}

#[test]
fn xs_client_speaks_the_xenstored_wire_protocol() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("xenstored.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        serve(sock);
    });
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "xenstore::wire_tests::child_client",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, "1")
        .env("XENSTORED_PATH", &sock_path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child did not run the client test:\n{text}"
    );
    server.join().unwrap();
}

async fn next_event(events: &mut WatchEvents) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("no watch event")
        .unwrap()
}

#[tokio::test]
async fn child_client() {
    if std::env::var_os(CHILD_VAR).is_none() {
        return;
    }
    let (xs, mut events) = XsClient::open().await.unwrap();
    assert_eq!(
        xs.read("/local/domain/5/device/vtpm/0/state")
            .await
            .unwrap(),
        None
    );
    assert_eq!(xs.directory("/local/domain/5").await.unwrap(), None);
    xs.rm("/nothing/here").await.unwrap();

    xs.write("/local/domain/5/device/vtpm/0/state", "1")
        .await
        .unwrap();
    assert_eq!(
        xs.read("/local/domain/5/device/vtpm/0/state")
            .await
            .unwrap()
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        xs.directory("/local/domain/5/device/vtpm").await.unwrap(),
        Some(vec!["0".to_owned()])
    );

    xs.watch("/local/domain/5/device/vtpm/0").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        WatchEvent::Changed("/local/domain/5/device/vtpm/0".into())
    );
    xs.write("/local/domain/5/device/vtpm/0/ring-ref", "8")
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        WatchEvent::Changed("/local/domain/5/device/vtpm/0/ring-ref".into())
    );
    xs.rm("/local/domain/5").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        WatchEvent::Changed("/local/domain/5/device/vtpm/0".into())
    );
    assert_eq!(
        xs.read("/local/domain/5/device/vtpm/0/ring-ref")
            .await
            .unwrap(),
        None
    );

    xs.unwatch("/local/domain/5/device/vtpm/0").await.unwrap();
    // Let the aborted forwarding task's drop send UNWATCH, then prove no event arrives.
    tokio::time::sleep(Duration::from_millis(50)).await;
    xs.write("/local/domain/5/device/vtpm/0/state", "3")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(events.try_next(), None);
}
