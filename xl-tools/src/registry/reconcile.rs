//! Reconciling the registry with what runs: [`check`] compares rows with the observed domains
//! (and optionally the manager's vTPM list) and reports [`Drift`]; [`repair`] turns drift into
//! [`RepairAction`]s — pure decisions, never a lost binding that might guard TPM state.

use std::time::Duration;

use uuid::Uuid;

use super::{Row, State, unix_now};


/// Default [`CheckOptions::stale_after`]: longer than any create (the vTPM backend's 10 s,
/// guest creation and the manager's provisioning of a new vTPM).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(120);

/// A running domain as observed by the caller (from xenstore or `xl list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedDomain {
    /// Domain name.
    pub name: String,
    /// Xen UUID of the domain.
    pub uuid: Uuid,
    /// Domain id.
    pub domid: u32,
}

/// Tuning of [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Current time (Unix seconds).
    pub now: i64,
    /// `creating`/`destroying` rows untouched for longer than this are stuck (their process
    /// died); younger ones are assumed to be in progress.
    pub stale_after: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            now: unix_now(),
            stale_after: DEFAULT_STALE_AFTER,
        }
    }
}

/// A difference between the registry and what runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A create was interrupted (process killed or crashed between steps).
    StuckCreating {
        /// The row.
        row: Row,
        /// The guest's domid, if the guest domain exists.
        guest: Option<u32>,
        /// The vTPM domain's domid, if it exists.
        vtpm: Option<u32>,
    },
    /// A destroy was interrupted.
    StuckDestroying {
        /// The row.
        row: Row,
        /// The guest's domid, if the guest domain still exists.
        guest: Option<u32>,
        /// The vTPM domain's domid, if it still exists.
        vtpm: Option<u32>,
    },
    /// A create or destroy younger than `stale_after`: probably still running elsewhere.
    InProgress {
        /// The row.
        row: Row,
    },
    /// The guest runs but its vTPM domain does not: the guest's TPM is dead.
    GuestWithoutVtpm {
        /// The row.
        row: Row,
        /// The guest's domid.
        guest: u32,
    },
    /// The vTPM domain runs without its guest (the guest died while nobody watched).
    OrphanVtpm {
        /// The row.
        row: Row,
        /// The vTPM domain's domid.
        vtpm: u32,
    },
    /// The row says running, but neither domain exists.
    StaleRunning {
        /// The row.
        row: Row,
    },
    /// The row says stopped, but both domains run (started outside xl-vtpm).
    UnrecordedRunning {
        /// The row.
        row: Row,
        /// The guest's domid.
        guest: u32,
        /// The vTPM domain's domid.
        vtpm: u32,
    },
    /// Both run, but with other domids than recorded (restarted outside xl-vtpm).
    DomidMismatch {
        /// The row.
        row: Row,
        /// The guest's observed domid.
        guest: u32,
        /// The vTPM domain's observed domid.
        vtpm: u32,
    },
    /// A domain has the guest's name but another UUID: not our guest.
    NameTakenByOtherDomain {
        /// The row.
        row: Row,
        /// The impostor's domid.
        domid: u32,
        /// The impostor's UUID.
        uuid: Uuid,
    },
    /// The manager has no vTPM with this row's UUID (only when the manager list was given).
    VtpmUnknownToManager {
        /// The row.
        row: Row,
    },
    /// The manager has a vTPM no row refers to.
    UnregisteredManagerVtpm {
        /// The vTPM.
        vtpm: Uuid,
    },
    /// The activation record disagrees with the pair's state or host (a `stopped` pair that
    /// holds one, an active pair without one): the database was edited outside xl-vtpm.
    ActivationMismatch {
        /// The row.
        row: Row,
    },
    /// A create or destroy on another host is older than `stale_after` (`--all-hosts`): the
    /// process there died; only that host can see its domains and finish it.
    StuckElsewhere {
        /// The row.
        row: Row,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: &Option<u32>| d.map_or("absent".to_string(), |d| format!("domid {d}"));
        match self {
            Drift::StuckCreating { row, guest, vtpm } => write!(
                f,
                "{}: create was interrupted (guest {}, vTPM domain {} {})",
                row.guest_name,
                d(guest),
                row.vtpm_domain,
                d(vtpm)
            ),
            Drift::StuckDestroying { row, guest, vtpm } => write!(
                f,
                "{}: destroy was interrupted (guest {}, vTPM domain {} {})",
                row.guest_name,
                d(guest),
                row.vtpm_domain,
                d(vtpm)
            ),
            Drift::InProgress { row } => {
                write!(
                    f,
                    "{}: {} in progress (changed {}s ago)",
                    row.guest_name,
                    row.state,
                    unix_now() - row.updated_at
                )
            }
            Drift::GuestWithoutVtpm { row, guest } => write!(
                f,
                "{}: guest runs (domid {guest}) without its vTPM domain {}",
                row.guest_name, row.vtpm_domain
            ),
            Drift::OrphanVtpm { row, vtpm } => write!(
                f,
                "{}: vTPM domain {} (domid {vtpm}) runs but its guest is gone",
                row.guest_name, row.vtpm_domain
            ),
            Drift::StaleRunning { row } => {
                write!(
                    f,
                    "{}: recorded as running but neither guest nor vTPM domain exists",
                    row.guest_name
                )
            }
            Drift::UnrecordedRunning { row, guest, vtpm } => write!(
                f,
                "{}: recorded as stopped but guest (domid {guest}) and vTPM domain (domid {vtpm}) run",
                row.guest_name
            ),
            Drift::DomidMismatch { row, guest, vtpm } => write!(
                f,
                "{}: recorded domids guest {:?}/vTPM {:?}, observed {guest}/{vtpm}",
                row.guest_name, row.guest_domid, row.vtpm_domid
            ),
            Drift::NameTakenByOtherDomain { row, domid, uuid } => write!(
                f,
                "{}: domain {domid} has this guest's name but UUID {uuid}, not {}",
                row.guest_name, row.guest_uuid
            ),
            Drift::VtpmUnknownToManager { row } => {
                write!(
                    f,
                    "{}: the manager has no vTPM {}",
                    row.guest_name, row.vtpm_uuid
                )
            }
            Drift::UnregisteredManagerVtpm { vtpm } => {
                write!(f, "manager vTPM {vtpm} belongs to no registered guest")
            }
            Drift::ActivationMismatch { row } => write!(
                f,
                "{}: {} on host {} but its activation record is {}",
                row.guest_name,
                row.state,
                row.host,
                row.active_on
                    .as_deref()
                    .map_or("absent".to_string(), |h| format!("held by host {h}"))
            ),
            Drift::StuckElsewhere { row } => write!(
                f,
                "{}: {} on host {} since {}s ago (interrupted there?)",
                row.guest_name,
                row.state,
                row.host,
                unix_now() - row.updated_at
            ),
        }
    }
}

/// One step of a repair. Domain actions are for the caller (it talks to Xen); record actions
/// can be handed to [`Registry::apply`](super::Registry::apply). [`repair`] orders them: guests are destroyed before
/// their vTPM domains, domains before the registry is updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairAction {
    /// Destroy this domain (`xl destroy <domid>`), after checking it still has this name.
    DestroyDomain {
        /// Its name.
        name: String,
        /// Its domid.
        domid: u32,
        /// Why.
        reason: String,
    },
    /// Start the vTPM domain of a running guest again and re-attach it to that (same) guest;
    /// then record the new domids with [`Registry::mark_running`](super::Registry::mark_running).
    RestartVtpm {
        /// Row id.
        id: i64,
        /// The guest.
        guest_name: String,
        /// The guest's domid.
        guest_domid: u32,
        /// vTPM domain to start.
        vtpm_domain: String,
        /// vTPM identity to serve.
        vtpm_uuid: Uuid,
    },
    /// Record the pair as running with these domids.
    MarkRunning {
        /// Row id.
        id: i64,
        /// Guest domid.
        guest_domid: u32,
        /// vTPM domain domid.
        vtpm_domid: u32,
    },
    /// Record the pair as stopped (binding kept).
    MarkStopped {
        /// Row id.
        id: i64,
    },
    /// Forget a pair whose vTPM provably never existed in the manager.
    DeleteRow {
        /// Row id.
        id: i64,
    },
    /// Needs a person: the message says what and how.
    Manual {
        /// What to look at.
        message: String,
    },
}

impl std::fmt::Display for RepairAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepairAction::DestroyDomain {
                name,
                domid,
                reason,
            } => {
                write!(f, "destroy domain {name} (domid {domid}): {reason}")
            }
            RepairAction::RestartVtpm {
                guest_name,
                vtpm_domain,
                ..
            } => {
                write!(
                    f,
                    "restart vTPM domain {vtpm_domain} and re-attach it to {guest_name}"
                )
            }
            RepairAction::MarkRunning {
                id,
                guest_domid,
                vtpm_domid,
            } => {
                write!(
                    f,
                    "record pair {id} as running (guest {guest_domid}, vTPM {vtpm_domid})"
                )
            }
            RepairAction::MarkStopped { id } => write!(f, "record pair {id} as stopped"),
            RepairAction::DeleteRow { id } => {
                write!(f, "delete pair {id} (its vTPM never existed)")
            }
            RepairAction::Manual { message } => write!(f, "manual: {message}"),
        }
    }
}

/// Reconciles `rows` with the running domains `observed` (and, if given, the manager's vTPM
/// list). Pure: the caller gathers the observations and acts on [`repair`]'s answer.
///
/// Guests are matched by UUID, vTPM domains by name (recorded before they are created, so a
/// crash between `xl create` and the domid being written is still found).
pub fn check(
    rows: &[Row],
    observed: &[ObservedDomain],
    manager_vtpms: Option<&[Uuid]>,
    opts: CheckOptions,
) -> Vec<Drift> {
    let mut out = Vec::new();
    for row in rows {
        let guest = observed
            .iter()
            .find(|d| d.uuid == row.guest_uuid)
            .map(|d| d.domid);
        let vtpm = observed
            .iter()
            .find(|d| d.name == row.vtpm_domain)
            .map(|d| d.domid);
        if guest.is_none()
            && let Some(d) = observed.iter().find(|d| d.name == row.guest_name)
        {
            out.push(Drift::NameTakenByOtherDomain {
                row: row.clone(),
                domid: d.domid,
                uuid: d.uuid,
            });
        }
        let active = row.state != State::Stopped;
        if active != (row.active_on.as_deref() == Some(row.host.as_str()))
            || (!active && row.active_on.is_some())
        {
            out.push(Drift::ActivationMismatch { row: row.clone() });
        }
        let stale = opts.now.saturating_sub(row.updated_at) >= opts.stale_after.as_secs() as i64;
        match (row.state, guest, vtpm) {
            (State::Creating | State::Destroying, ..) if !stale => {
                out.push(Drift::InProgress { row: row.clone() })
            }
            (State::Creating, ..) => out.push(Drift::StuckCreating {
                row: row.clone(),
                guest,
                vtpm,
            }),
            (State::Destroying, ..) => out.push(Drift::StuckDestroying {
                row: row.clone(),
                guest,
                vtpm,
            }),
            (State::Running | State::Stopped, Some(g), None) => out.push(Drift::GuestWithoutVtpm {
                row: row.clone(),
                guest: g,
            }),
            (State::Running | State::Stopped, None, Some(v)) => out.push(Drift::OrphanVtpm {
                row: row.clone(),
                vtpm: v,
            }),
            (State::Running, None, None) => out.push(Drift::StaleRunning { row: row.clone() }),
            (State::Running, Some(g), Some(v)) => {
                if row.guest_domid != Some(g) || row.vtpm_domid != Some(v) {
                    out.push(Drift::DomidMismatch {
                        row: row.clone(),
                        guest: g,
                        vtpm: v,
                    });
                }
            }
            (State::Stopped, Some(g), Some(v)) => out.push(Drift::UnrecordedRunning {
                row: row.clone(),
                guest: g,
                vtpm: v,
            }),
            (State::Stopped, None, None) => {}
        }
        if let Some(known) = manager_vtpms {
            // A first create may not have reached the manager yet.
            let may_be_unallocated = row.state == State::Creating && !row.ran_before;
            if !known.contains(&row.vtpm_uuid) && !may_be_unallocated {
                out.push(Drift::VtpmUnknownToManager { row: row.clone() });
            }
        }
    }
    if let Some(known) = manager_vtpms {
        for v in known {
            if !rows.iter().any(|r| r.vtpm_uuid == *v) {
                out.push(Drift::UnregisteredManagerVtpm { vtpm: *v });
            }
        }
    }
    out
}

/// The actions that resolve `drift`, in the order to execute them. Pure.
///
/// `manager_vtpms` is the manager's vTPM list if known; it decides whether an interrupted
/// *first* create may be forgotten (the manager never created the vTPM) or must be kept as a
/// `stopped` pair (it might hold state).
///
/// | drift | actions |
/// |---|---|
/// | interrupted create, both domains up | record running (roll forward) |
/// | interrupted create, otherwise | destroy what exists (guest first), then record stopped — or delete the row if its vTPM provably never existed |
/// | interrupted destroy | destroy what still exists (guest first), record stopped |
/// | guest without vTPM | restart the vTPM domain and re-attach it to the same guest |
/// | orphaned vTPM domain | destroy it, record stopped |
/// | running row, nothing runs | record stopped |
/// | stopped row, both run / domids differ | record running with the observed domids |
/// | name taken, manager mismatch | manual (never delete TPM state automatically) |
pub fn repair(drift: &[Drift], manager_vtpms: Option<&[Uuid]>) -> Vec<RepairAction> {
    // Executed in this order: guests die before their vTPM domains (a vTPM must not vanish
    // under a live guest), domains change before the registry records it.
    let mut guests = Vec::new();
    let mut vtpms = Vec::new();
    let mut restarts = Vec::new();
    let mut records = Vec::new();
    let destroy = |name: &str, domid: u32, reason: &str| RepairAction::DestroyDomain {
        name: name.to_owned(),
        domid,
        reason: reason.to_owned(),
    };
    for d in drift {
        match d {
            Drift::InProgress { .. } => {}
            Drift::StuckCreating { row, guest: Some(g), vtpm: Some(v) } => {
                records.push(RepairAction::MarkRunning { id: row.id, guest_domid: *g, vtpm_domid: *v })
            }
            Drift::StuckCreating { row, guest, vtpm } => {
                if let Some(g) = guest {
                    guests.push(destroy(&row.guest_name, *g, "guest of an interrupted create has no vTPM domain"));
                }
                if let Some(v) = vtpm {
                    vtpms.push(destroy(&row.vtpm_domain, *v, "vTPM domain of an interrupted create has no guest"));
                }
                let never_existed = !row.ran_before && manager_vtpms.is_some_and(|m| !m.contains(&row.vtpm_uuid));
                records.push(if never_existed {
                    RepairAction::DeleteRow { id: row.id }
                } else {
                    RepairAction::MarkStopped { id: row.id }
                });
            }
            Drift::StuckDestroying { row, guest, vtpm } => {
                if let Some(g) = guest {
                    guests.push(destroy(&row.guest_name, *g, "finishing an interrupted destroy"));
                }
                if let Some(v) = vtpm {
                    vtpms.push(destroy(&row.vtpm_domain, *v, "finishing an interrupted destroy"));
                }
                records.push(RepairAction::MarkStopped { id: row.id });
            }
            Drift::GuestWithoutVtpm { row, guest } => restarts.push(RepairAction::RestartVtpm {
                id: row.id,
                guest_name: row.guest_name.clone(),
                guest_domid: *guest,
                vtpm_domain: row.vtpm_domain.clone(),
                vtpm_uuid: row.vtpm_uuid,
            }),
            Drift::OrphanVtpm { row, vtpm } => {
                vtpms.push(destroy(&row.vtpm_domain, *vtpm, "its guest is gone; a vTPM is never handed to another guest"));
                if row.state != State::Stopped {
                    records.push(RepairAction::MarkStopped { id: row.id });
                }
            }
            Drift::StaleRunning { row } => records.push(RepairAction::MarkStopped { id: row.id }),
            Drift::UnrecordedRunning { row, guest, vtpm } | Drift::DomidMismatch { row, guest, vtpm } => {
                records.push(RepairAction::MarkRunning { id: row.id, guest_domid: *guest, vtpm_domid: *vtpm })
            }
            Drift::NameTakenByOtherDomain { row, domid, uuid } => records.push(RepairAction::Manual {
                message: format!(
                    "domain {domid} is named {} but has UUID {uuid}, not the registered guest's {}; \
                     rename one of them (`xl rename`) — xl-vtpm will not give it the vTPM",
                    row.guest_name, row.guest_uuid
                ),
            }),
            Drift::VtpmUnknownToManager { row } => records.push(RepairAction::Manual {
                message: format!(
                    "the manager has no vTPM {} (guest {}); its state is missing — restore the manager's \
                     store from backup, or `xl-vtpm registry remove {}` to give the guest a new, empty vTPM",
                    row.vtpm_uuid, row.guest_name, row.guest_name
                ),
            }),
            Drift::ActivationMismatch { row } => records.push(RepairAction::Manual {
                message: format!(
                    "pair {} ({}) is {} on host {} but its activation record is {:?}: the \
                     registry was edited outside xl-vtpm; make them agree by hand (a stopped pair \
                     has none, an active one has one on its own host)",
                    row.id, row.guest_name, row.state, row.host, row.active_on
                ),
            }),
            Drift::StuckElsewhere { row } => records.push(RepairAction::Manual {
                message: format!(
                    "run `xl-vtpm registry check --repair` on host {} to finish {}'s interrupted \
                     operation (only that host sees its domains)",
                    row.host, row.guest_name
                ),
            }),
            Drift::UnregisteredManagerVtpm { vtpm } => records.push(RepairAction::Manual {
                message: format!(
                    "manager vTPM {vtpm} belongs to no registered guest; if it is not needed, \
                     `xl-vtpm mgr vtpm del {vtpm}` (its state is lost)"
                ),
            }),
        }
    }
    guests.extend(vtpms);
    guests.extend(restarts);
    guests.extend(records);
    guests
}
