//! Checks a TCTI string before tss2 loads it, so that an unusable one is reported by its real
//! cause (no such device, permission denied, connection refused, unknown TCTI name) instead of
//! tss2's generic response codes, and silences tss2's own log lines for it.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// The TCTI names the manager accepts, each with an example.
pub const VALID: &str = "device (device:/dev/tpmrm0), swtpm (swtpm:host=127.0.0.1,port=2321), \
mssim (mssim:host=127.0.0.1,port=2321) or tabrmd (tabrmd:bus_type=system)";

/// How long a TCP pre-check waits for the TPM to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a TCTI cannot be used, in words an administrator can act on (one sentence, the fix
/// included; the TCTI string itself is named by the caller).
pub fn precheck(tcti: &str) -> Result<(), String> {
    let (name, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    match name {
        "device" => check_device(Path::new(if conf.is_empty() { "/dev/tpm0" } else { conf })),
        "swtpm" | "mssim" => {
            let (host, port) = parse_network(conf)?;
            check_tcp(name, &host, port)?;
            // Both TCTIs also open the control (platform) port next to the command port.
            let ctrl = port.checked_add(1).ok_or_else(|| {
                format!(
                    "port={port} leaves no room for the control port (port+1); pick a lower port"
                )
            })?;
            check_tcp(name, &host, ctrl)
                .map_err(|e| format!("{e} (the control port, next to the command port {port})"))
        }
        "tabrmd" => Ok(()),
        "" => Err(format!("no TCTI name; give one of {VALID}")),
        other => Err(format!("unknown TCTI name {other:?}; use one of {VALID}")),
    }
}

/// `host=H,port=P` (either optional, default localhost:2321), as tss-esapi parses it.
fn parse_network(conf: &str) -> Result<(String, u16), String> {
    let (mut host, mut port) = ("localhost".to_string(), 2321u16);
    for kv in conf.split(',').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("host", h)) if !h.is_empty() => host = h.to_string(),
            Some(("port", p)) => {
                port = p
                    .parse()
                    .map_err(|_| format!("port={p:?} is not a TCP port number (1-65535)"))?
            }
            Some(("path", _)) => {
                return Err("the manager reaches a software TPM over TCP only: give host=H,port=P, not path= (start swtpm with --server type=tcp,port=P --ctrl type=tcp,port=P+1)".into());
            }
            _ => {
                return Err(format!(
                    "{kv:?} is not host=H or port=P (example: swtpm:host=127.0.0.1,port=2321)"
                ));
            }
        }
    }
    Ok((host, port))
}

fn check_device(path: &Path) -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(format!(
            "{} does not exist: this host has no TPM there (is the TPM enabled in the firmware and its driver loaded? `ls /dev/tpm*`), \
             or pass the right one with --tcti device:/dev/tpmrm0",
            path.display()
        )),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Err(format!(
            "permission denied opening {}: run vtpmmgr as root (or as a user that may open the device, e.g. group tss)",
            path.display()
        )),
        // /dev/tpm0 admits one opener at a time.
        Err(e) if e.raw_os_error() == Some(16) => Err(format!(
            "{} is busy: another program (tpm2-abrmd, another manager) has it open; use /dev/tpmrm0, or stop that program",
            path.display()
        )),
        Err(e) => Err(format!("cannot open {}: {e}", path.display())),
    }
}

fn check_tcp(name: &str, host: &str, port: u16) -> Result<(), String> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host {host:?}: {e}"))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let what = if name == "swtpm" {
        "swtpm"
    } else {
        "the TPM simulator"
    };
    Err(match last {
        Some(e) if e.kind() == ErrorKind::ConnectionRefused => {
            format!("connection refused to {host}:{port}: is {what} running and listening there?")
        }
        Some(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
            format!(
                "no answer from {host}:{port} within {} s (a firewall, or the wrong host?)",
                CONNECT_TIMEOUT.as_secs()
            )
        }
        Some(e) => format!("cannot connect to {host}:{port}: {e}"),
        None => format!("host {host:?} has no address"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_cause() {
        assert!(
            precheck("bogus:x")
                .unwrap_err()
                .contains("unknown TCTI name \"bogus\"")
        );
        assert!(
            precheck("bogus:x")
                .unwrap_err()
                .contains("swtpm:host=127.0.0.1,port=2321")
        );
        assert!(
            precheck("device:/nonexistent/tpm")
                .unwrap_err()
                .contains("/nonexistent/tpm does not exist")
        );
        assert!(
            precheck("swtpm:host=127.0.0.1,port=x")
                .unwrap_err()
                .contains("not a TCP port")
        );
        assert!(
            precheck("swtpm:path=/run/s")
                .unwrap_err()
                .contains("TCP only")
        );
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = precheck(&format!("swtpm:host=127.0.0.1,port={free}")).unwrap_err();
        assert!(
            e.starts_with(&format!("connection refused to 127.0.0.1:{free}")),
            "{e}"
        );
    }
}
