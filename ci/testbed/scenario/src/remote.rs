//! The testbed's stand-in for ssh between its two Xen hosts (`xvtpm_twohost`): dom0 has no sshd,
//! and the cross-host move runs its other end the way `xl migrate` does, `sh -c "<ssh> HOST
//! <command>"`. `xvtpm-testbed ssh HOST WORDS…` is that `<ssh>`; `xvtpm-testbed sshd ADDR
//! [K=V…]` is the other end, in each host's dom0, listening on the hosts' private link only.
//!
//! One TCP connection per command. The client sends the command line (a 4-byte big-endian
//! length, then the words joined by blanks, as ssh joins them for the remote shell), then relays
//! its stdin raw and half-closes at its end. The server runs `sh -c LINE` with the connection as
//! its stdin and frames what it writes: `[tag][4-byte length][bytes]`, tag 1 stdout, 2 stderr,
//! and last tag 3 with the exit code (4 bytes, big endian; 255 when killed by a signal, as ssh
//! reports it). The client writes the frames to its stdout and stderr and exits with that code.
//! It trusts whoever reaches the port, as the test harness it is: the link joins two test VMs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The port both hosts' sshd listens on.
pub const PORT: u16 = 7022;
/// The longest command line a server accepts.
const MAX_LINE: u32 = 64 * 1024;

/// `xvtpm-testbed ssh HOST WORDS…`: the remote command's exit code (255 on a transport error).
pub fn client(args: &[String]) -> i32 {
    let Some((host, words)) = args.split_first() else {
        eprintln!("usage: xvtpm-testbed ssh HOST COMMAND…");
        return 255;
    };
    match run_client(host, &words.join(" ")) {
        Ok(rc) => rc,
        Err(e) => {
            eprintln!("xvtpm-testbed ssh {host}: {e}");
            255
        }
    }
}

fn run_client(host: &str, line: &str) -> std::io::Result<i32> {
    let addr = (host, PORT).to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other(format!("{host}: no address")))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    let len = u32::try_from(line.len()).map_err(|_| std::io::Error::other("command line too long"))?;
    s.write_all(&len.to_be_bytes())?;
    s.write_all(line.as_bytes())?;
    let mut up = s.try_clone()?;
    // stdin → the remote command, then EOF to it; a reader ended by the process exit otherwise
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(Shutdown::Write);
    });
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    loop {
        let mut hdr = [0u8; 5];
        s.read_exact(&mut hdr)?;
        let n = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
        match hdr[0] {
            3 => return Ok(i32::try_from(n).unwrap_or(255)),
            t @ (1 | 2) => {
                if n > 1 << 20 {
                    return Err(std::io::Error::other(format!("frame of {n} bytes")));
                }
                let mut buf = vec![0u8; n as usize];
                s.read_exact(&mut buf)?;
                if t == 1 {
                    out.write_all(&buf)?;
                    out.flush()?;
                } else {
                    err.write_all(&buf)?;
                }
            }
            t => return Err(std::io::Error::other(format!("bad frame tag {t}"))),
        }
    }
}

/// `xvtpm-testbed sshd ADDR [K=V…]`: serves until killed; each command runs with `K=V` added to
/// its environment (the host's `XVTPM_HOST`, `XVTPM_REGISTRY`).
pub fn server(args: &[String]) -> i32 {
    let Some((addr, env)) = args.split_first() else {
        eprintln!("usage: xvtpm-testbed sshd ADDR [K=V…]");
        return 2;
    };
    let env: Vec<(String, String)> = env.iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let l = match TcpListener::bind((addr.as_str(), PORT)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("xvtpm-testbed sshd: bind {addr}:{PORT}: {e}");
            return 1;
        }
    };
    eprintln!("xvtpm-testbed sshd: listening on {addr}:{PORT}");
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let env = env.clone();
        std::thread::spawn(move || {
            let peer = c.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if let Err(e) = serve(c, &env) {
                eprintln!("xvtpm-testbed sshd: {peer}: {e}");
            }
        });
    }
    0
}

fn serve(mut c: TcpStream, env: &[(String, String)]) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut len = [0u8; 4];
    c.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_LINE {
        return Err(std::io::Error::other(format!("command line of {len} bytes refused")));
    }
    let mut line = vec![0u8; len as usize];
    c.read_exact(&mut line)?;
    let line = String::from_utf8_lossy(&line).into_owned();
    eprintln!("xvtpm-testbed sshd: {line}");
    let stdin = OwnedFd::from(c.try_clone()?);
    let mut child = Command::new("/bin/sh")
        .args(["-c", &line])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (mut so, mut se) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let w = std::sync::Arc::new(std::sync::Mutex::new(c));
    let w2 = w.clone();
    let t = std::thread::spawn(move || pump(&mut se, 2, &w2));
    pump(&mut so, 1, &w);
    let _ = t.join();
    let st = child.wait()?;
    let rc = st.code().and_then(|c| u32::try_from(c).ok()).unwrap_or(255);
    let mut c = w.lock().map_err(|_| std::io::Error::other("poisoned"))?;
    let mut f = vec![3u8];
    f.extend_from_slice(&rc.to_be_bytes());
    c.write_all(&f)?;
    c.shutdown(Shutdown::Both)
}

/// Frames everything `r` yields with `tag` onto the connection, until `r` ends.
fn pump(r: &mut impl Read, tag: u8, w: &std::sync::Mutex<TcpStream>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Ok(mut c) = w.lock() else { return };
        let mut f = Vec::with_capacity(n + 5);
        f.push(tag);
        f.extend_from_slice(&u32::try_from(n).unwrap_or(0).to_be_bytes());
        f.extend_from_slice(&buf[..n]);
        if c.write_all(&f).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_s_output_streams_and_exit_code_come_back_framed() {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            serve(c, &[("XX".into(), "yy".into())]).unwrap();
        });
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let line = "read a; echo \"$a $XX\"; echo err >&2; exit 7";
        s.write_all(&(line.len() as u32).to_be_bytes()).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"hello\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let (mut out, mut err, mut rc) = (Vec::new(), Vec::new(), None);
        let mut i = 0;
        while i + 5 <= all.len() {
            let n = u32::from_be_bytes(all[i + 1..i + 5].try_into().unwrap()) as usize;
            match all[i] {
                3 => {
                    rc = Some(n);
                    i += 5;
                    continue;
                }
                1 => out.extend_from_slice(&all[i + 5..i + 5 + n]),
                _ => err.extend_from_slice(&all[i + 5..i + 5 + n]),
            }
            i += 5 + n;
        }
        assert_eq!(String::from_utf8_lossy(&out), "hello yy\n");
        assert_eq!(String::from_utf8_lossy(&err), "err\n");
        assert_eq!(rc, Some(7));
    }
}
