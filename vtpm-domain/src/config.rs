//! Validated configuration of one vtpm-domain process.

use std::path::PathBuf;

use uuid::Uuid;
use tpm_wire::Family;

/// Where the vTPM listens (shared with xl-vtpm, which checks listeners before it creates a vTPM).
pub use vtpm_proto::listen::Listen;

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
    /// With `create`: manufacture (EK, EK certificate, first sealed state), then exit without
    /// binding a listener — a vTPM made ahead of demand for `xl-vtpm vtpm pool fill`.
    pub manufacture_only: bool,
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
    /// The (single) `ctrl:PATH` listener is already bound at PATH by whoever started us and is
    /// our stdin (`--ctrl-listener-stdin`), so the socket existed before we did.
    pub ctrl_listener_stdin: bool,
    /// The host's deep-quote socket ([`crate::hostquote`]), if any.
    pub quote_socket: Option<PathBuf>,
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
