//! Who sent a vTPM request, as the link established it — never as the caller claims.
//!
//! Both links reduce their caller to a [`Peer`]; everything after that
//! ([`crate::dispatch`], [`crate::manager::Manager::authorize`]) is the same for both.

use uuid::Uuid;

/// The caller of a vTPM request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A process on vTPM `vtpm`'s own socket: the kernel's `SO_PEERCRED` pid and that
    /// process's start time, read when it connected (`None` if the kernel did not say).
    Process {
        /// The vTPM whose socket it connected to.
        vtpm: Uuid,
        /// Its pid.
        pid: Option<u32>,
        /// Its start time ([`xvtpm_fsutil::start_time`]).
        start: Option<u64>,
    },
    /// A vTPM domain on the Xen link: the vTPM and frontend domain the toolstack wrote into the
    /// manager's own backend directory.
    Domain {
        /// The backend directory's `uuid`.
        vtpm: Uuid,
        /// The backend directory's `frontend-id`.
        domid: u32,
    },
}

impl Peer {
    /// A process on vTPM `vtpm`'s socket with pid `pid` (its start time is read now).
    pub fn process(vtpm: Uuid, pid: Option<u32>) -> Peer {
        Peer::Process { vtpm, pid, start: pid.and_then(xvtpm_fsutil::start_time) }
    }

    /// The vTPM the link serves.
    pub fn vtpm(&self) -> Uuid {
        match self {
            Peer::Process { vtpm, .. } | Peer::Domain { vtpm, .. } => *vtpm,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Process { pid: Some(pid), .. } => write!(f, "process {pid}"),
            Peer::Process { pid: None, .. } => write!(f, "a process the kernel did not name"),
            Peer::Domain { domid, .. } => write!(f, "domain {domid}"),
        }
    }
}
