//! Validated configuration of one vtpm-domain process.

use std::net::SocketAddr;
use std::path::PathBuf;

use uuid::Uuid;
use vtpm_proto::tpm::Family;

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
        let (kind, rest) = s.split_once(':').ok_or_else(|| format!("--listen {s:?}: {hint}"))?;
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

/// What the vTPM does with a fresh engine before serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Startup {
    /// Send TPM2_Startup(CLEAR) itself, like swtpm's `--flags startup-clear`.
    Clear,
    /// Leave Startup to the client (firmware, the guest kernel).
    None,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The vTPM's identity.
    pub uuid: Uuid,
    /// TPM family.
    pub family: Family,
    /// Where the sealed state lives.
    pub state: StateSpec,
    /// How to reach the manager.
    pub mgr: MgrSpec,
    /// Manufacture a new TPM (the state file must not exist).
    pub create: bool,
    /// Startup behaviour.
    pub startup: Startup,
    /// Listeners.
    pub listen: Vec<Listen>,
    /// Who may connect besides root (`--consumer-uid`); Unix sockets are made theirs.
    pub consumer_uid: Option<u32>,
    /// How long to keep retrying the manager while it has not attached us.
    pub mgr_wait: std::time::Duration,
    /// The endorsement key made at `--create`.
    pub ek: EkChoice,
    /// Running as the init of the vTPM's own Xen domain ([`crate::init`]).
    pub as_init: bool,
    /// Keep serving after the controller on a `ctrl:PATH` socket hangs up.
    pub persist: bool,
    /// Privilege drop and seccomp after setup ([`crate::sandbox`]; not applied as init).
    pub sandbox: crate::sandbox::SandboxSpec,
}

/// Where the sealed state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSpec {
    /// A file, replaced atomically (temp, fsync, rename, fsync dir).
    File(PathBuf),
    /// A raw block device (or file) with A/B slots — for a vTPM in its own
    /// Xen domain, which has no file system.
    Block(PathBuf),
}

/// How the vTPM reaches vtpmmgr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MgrSpec {
    /// The manager's per-vTPM Unix socket (the vTPM runs in the manager's domain).
    Socket(PathBuf),
    /// A tpmif link from our own Xen domain to the manager's (frontend directory,
    /// normally `device/vtpm/0`, from the vTPM domain's `vtpm=["backend=0,uuid=…"]`).
    Xen(String),
}

/// The endorsement key a new vTPM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum EkChoice {
    /// RSA-2048 at 0x81010001 (TCG template L-1).
    #[default]
    Rsa,
    /// ECC NIST P-256 at 0x81010002 (TCG template L-2): much faster to create.
    Ecc,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        assert_eq!("tcp:127.0.0.1:0".parse::<Listen>(), Ok(Listen::TcpPair("127.0.0.1:0".parse().unwrap())));
        assert_eq!("data:/run/x.sock".parse::<Listen>(), Ok(Listen::UnixData("/run/x.sock".into())));
        assert_eq!("ctrl:/run/c".parse::<Listen>(), Ok(Listen::UnixCtrl("/run/c".into())));
        assert_eq!("xen".parse::<Listen>(), Ok(Listen::Xen("backend/vtpm".into())));
        assert_eq!("xen:/local/domain/0/backend/vtpm".parse::<Listen>(), Ok(Listen::Xen("/local/domain/0/backend/vtpm".into())));
        assert_eq!("tcp:[::1]:0".parse::<Listen>(), Ok(Listen::TcpPair("[::1]:0".parse().unwrap())));
        for bad in ["", "tcp:nope", "tcp:1.2.3.4", "tcp:0.0.0.0:2321", "tcp:[::]:0", "data:", "ctrl:", "udp:1", "xen:"] {
            let e = bad.parse::<Listen>().unwrap_err();
            assert!(e.contains("--listen"), "{e}");
        }
    }
}
