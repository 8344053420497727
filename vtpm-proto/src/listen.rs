//! `--listen` specs of a vTPM (`vtpm-domain --listen`, `xl-vtpm vtpm create --listen`): parsed
//! here once, so that xl-vtpm refuses a bad one before it creates anything.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Where the vTPM listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// swtpm-TCTI style: data channel on `addr`, control channel on
    /// `addr.port() + 1` (port 0 picks a free pair). Loopback only: each
    /// connection is mapped to the uid that made it, which only a local peer has.
    TcpPair(SocketAddr),
    /// A Unix-socket data channel.
    UnixData(PathBuf),
    /// A Unix-socket control channel (QEMU's `-chardev socket,path=`);
    /// the data channel then arrives through `CMD_SET_DATAFD`.
    UnixCtrl(PathBuf),
    /// Xen tpmif v2 backend for the devices under this xenstore directory
    /// whose `uuid` is this vTPM's (relative paths are resolved against
    /// our own domain's home, `/local/domain/<domid>/`).
    Xen(String),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let hint = "expected tcp:HOST:PORT, data:PATH, ctrl:PATH or xen[:XENSTORE-DIR]";
        if s == "xen" {
            return Ok(Listen::Xen("backend/vtpm".into()));
        }
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("--listen {s:?}: {hint}"))?;
        match kind {
            "tcp" => match rest.parse::<SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => Ok(Listen::TcpPair(a)),
                Ok(_) => Err(format!(
                    "--listen {s:?}: TCP listeners must be on a loopback address (127.0.0.1 or [::1]): \
                     a connection is accepted only from a local uid allowed to use the vTPM"
                )),
                Err(e) => Err(format!("--listen {s:?}: bad address ({e}); {hint}")),
            },
            "data" if !rest.is_empty() => Ok(Listen::UnixData(rest.into())),
            "ctrl" if !rest.is_empty() => Ok(Listen::UnixCtrl(rest.into())),
            "xen" if !rest.is_empty() => Ok(Listen::Xen(rest.into())),
            _ => Err(format!("--listen {s:?}: {hint}")),
        }
    }
}
