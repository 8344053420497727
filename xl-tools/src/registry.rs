//! The registry: which guest owns which vTPM, and what state the pair is in.
//!
//! One row per guest ⇄ vTPM pair: guest UUID and name, vTPM UUID, the name of the vTPM
//! domain, both domids while running, the manager group, creation time, the host it runs (or
//! last ran) on and a state (`creating → running → destroying → stopped`, and `stopped →
//! creating` on the next start, on any host).
//!
//! Two backends, one schema and one set of statements ([`Location`]):
//!
//! * **SQLite** (the default, one host): an embedded file (`/var/lib/xvtpm/registry.sqlite`)
//!   in WAL mode with `synchronous=FULL`, so a committed change survives a power cut and
//!   readers (`xl-vtpm list`, the `@releaseDomain` watcher) never block the writer. Every change
//!   is one `BEGIN IMMEDIATE` transaction, so concurrent `xl-vtpm` processes serialise instead
//!   of interleaving, and a process killed at any instant leaves the file either before or
//!   after the change — never half-way.
//! * **PostgreSQL** (a fleet of hosts sharing one registry, `--registry postgres://…`): every
//!   change is one SERIALIZABLE transaction, committed before the call returns; when two
//!   writers conflict PostgreSQL lets one commit and the other's transaction is run again
//!   (it then sees the winner's row and answers precisely, e.g. which host holds the vTPM). A
//!   connection that breaks during COMMIT is reported as such ([`RegistryError::CommitUnknown`]):
//!   the change may or may not be recorded, and `check` tells which.
//!
//! Schema changes are versioned migrations applied on open, each in the transaction that
//! records its version; a database from a newer xl-vtpm is refused ([`RegistryError::TooNew`]).
//!
//! # One host at a time
//!
//! A vTPM's state must never run in two places (the copies would diverge). A pair that is not
//! `stopped` holds an **activation record** (`activations`, primary key the vTPM UUID, with a
//! foreign key to the pair's `(vtpm_uuid, host)`): the database refuses a second activation,
//! an activation on a host that is not the pair's, moving an active pair to another host and
//! deleting an active pair. [`Registry::begin_create`] takes the activation in the same
//! transaction that marks the pair `creating`; [`Registry::mark_stopped`] releases it. Another
//! host's attempt fails with [`RegistryError::ActiveOnOtherHost`] naming the holder.
//!
//! # Why a registry at all
//!
//! Xen has no lifecycle coupling (reference §5): when a guest dies its vTPM domain keeps
//! running in InitWait, and **nothing stops a different guest from attaching to it later and
//! inheriting its TPM state** (keys, NV, sealed secrets). The registry is where that is made
//! impossible: a vTPM UUID is `UNIQUE` in the table and a trigger forbids ever rewriting a
//! row's guest or vTPM UUID, so the binding made at first create is permanent until the pair
//! is explicitly removed; the API refuses with [`RegistryError::VtpmBoundToOtherGuest`].
//!
//! # Crash safety: the protocols and what `check` sees
//!
//! A create or destroy is several steps against Xen with a registry write between them, and
//! the process can die between any two. The registry records *intent first*, so every
//! interrupted operation is visible afterwards:
//!
//! * **create**: [`Registry::begin_create`] (row `creating`, vTPM domain name recorded) →
//!   create the vTPM domain → [`Registry::set_domids`] → wait for its backend to reach
//!   InitWait (libxl gives a frontend's backend only 10 s, so the vTPM must be ready *before*
//!   the guest is created) → create the guest → [`Registry::set_domids`] →
//!   [`Registry::mark_running`].
//! * **destroy/shutdown**: [`Registry::begin_destroy`] (row `destroying`) → stop the guest →
//!   stop the vTPM domain → [`Registry::mark_stopped`]. The binding stays: the next create
//!   of that guest gets the same vTPM (and a guest reboot keeps its vTPM).
//! * **remove** (the vTPM is deleted in the manager): only from `stopped`.
//!
//! [`check`] reconciles rows against the domains actually running (the caller lists them
//! from xenstore or `xl list`; this module never talks to Xen) and reports [`Drift`];
//! [`repair`] turns drift into [`RepairAction`]s — pure decisions the caller executes
//! (destroying domains) or hands back to [`Registry::apply`] (registry updates). Rows in
//! `creating`/`destroying` younger than [`CheckOptions::stale_after`] are reported as
//! [`Drift::InProgress`] and left alone, so `registry check` does not fight a create that is
//! still running in another process.
//!
//! Repairs never lose a binding that might guard TPM state: an interrupted first create is
//! only forgotten (row deleted) when the manager's vTPM list is given and proves the manager
//! never created that vTPM; otherwise the row is kept as `stopped`.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior};
use uuid::Uuid;

/// Schema version this code writes and reads.
pub const SCHEMA_VERSION: i64 = 2;

/// Default [`CheckOptions::stale_after`]: longer than any create (the vTPM backend's 10 s,
/// guest creation and the manager's provisioning of a new vTPM).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(120);

/// How often a PostgreSQL transaction is retried after a serialization failure, deadlock or a
/// unique-key conflict with a concurrent writer before the error is reported.
pub const PG_MAX_ATTEMPTS: u32 = 40;

/// How long a PostgreSQL statement waits for a row lock held by another writer.
const PG_LOCK_TIMEOUT: &str = "10s";

/// A schema change, in both dialects. Applied in order, each in the transaction that records
/// its version, so a database is always at exactly one version.
struct Migration {
    version: i64,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: SQLITE_V1,
        postgres: PG_V1,
    },
    Migration {
        version: 2,
        sqlite: SQLITE_V2,
        postgres: PG_V2,
    },
];

/// Version 1: pairs with a permanent guest ⇄ vTPM binding (unchanged since the first release,
/// so existing files keep their bytes until version 2 is added on top).
const SQLITE_V1: &str = r#"
CREATE TABLE pairs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    guest_uuid   TEXT    NOT NULL UNIQUE,
    guest_name   TEXT    NOT NULL UNIQUE,
    -- UNIQUE: a vTPM belongs to exactly one guest, ever.
    vtpm_uuid    TEXT    NOT NULL UNIQUE,
    vtpm_domain  TEXT    NOT NULL UNIQUE,
    grp          TEXT,
    guest_domid  INTEGER,
    vtpm_domid   INTEGER,
    state        TEXT    NOT NULL
                 CHECK (state IN ('creating', 'running', 'stopped', 'destroying')),
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    ran_before   INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER pairs_binding_is_permanent
BEFORE UPDATE OF guest_uuid, vtpm_uuid ON pairs
WHEN NEW.guest_uuid IS NOT OLD.guest_uuid OR NEW.vtpm_uuid IS NOT OLD.vtpm_uuid
BEGIN
    SELECT RAISE(ABORT, 'xvtpm: a vTPM stays bound to the guest it was created for');
END;
"#;

const PG_V1: &str = r#"
CREATE TABLE pairs (
    id           BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    guest_uuid   TEXT    NOT NULL UNIQUE,
    guest_name   TEXT    NOT NULL UNIQUE,
    -- UNIQUE: a vTPM belongs to exactly one guest, ever.
    vtpm_uuid    TEXT    NOT NULL UNIQUE,
    vtpm_domain  TEXT    NOT NULL UNIQUE,
    grp          TEXT,
    guest_domid  BIGINT  CHECK (guest_domid BETWEEN 0 AND 4294967295),
    vtpm_domid   BIGINT  CHECK (vtpm_domid BETWEEN 0 AND 4294967295),
    state        TEXT    NOT NULL
                 CHECK (state IN ('creating', 'running', 'stopped', 'destroying')),
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    ran_before   BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE FUNCTION xvtpm_binding_is_permanent() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.guest_uuid IS DISTINCT FROM OLD.guest_uuid
       OR NEW.vtpm_uuid IS DISTINCT FROM OLD.vtpm_uuid THEN
        RAISE EXCEPTION 'xvtpm: a vTPM stays bound to the guest it was created for';
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER pairs_binding_is_permanent
BEFORE UPDATE OF guest_uuid, vtpm_uuid ON pairs
FOR EACH ROW EXECUTE FUNCTION xvtpm_binding_is_permanent();
"#;

/// Version 2: the host each pair runs (or last ran) on, and the activation record. A vTPM that
/// is not stopped has exactly one `activations` row, keyed by the vTPM: a second host cannot
/// activate it (primary key), the record must name the pair's own host (composite foreign
/// key), the pair cannot move to another host while active and cannot be deleted while active
/// (the same key). Existing rows get the opening host (see [`Registry::migrate`]).
const SQLITE_V2: &str = r#"
ALTER TABLE pairs ADD COLUMN host TEXT CHECK (host IS NULL OR length(host) BETWEEN 1 AND 255);
CREATE UNIQUE INDEX pairs_vtpm_host ON pairs (vtpm_uuid, host);
CREATE TABLE activations (
    vtpm_uuid TEXT    PRIMARY KEY,
    host      TEXT    NOT NULL,
    since     INTEGER NOT NULL,
    FOREIGN KEY (vtpm_uuid, host) REFERENCES pairs (vtpm_uuid, host)
);
"#;

const PG_V2: &str = r#"
ALTER TABLE pairs ADD COLUMN host TEXT CHECK (host IS NULL OR length(host) BETWEEN 1 AND 255);
ALTER TABLE pairs ADD CONSTRAINT pairs_vtpm_host UNIQUE (vtpm_uuid, host);
CREATE TABLE activations (
    vtpm_uuid TEXT   PRIMARY KEY,
    host      TEXT   NOT NULL,
    since     BIGINT NOT NULL,
    FOREIGN KEY (vtpm_uuid, host) REFERENCES pairs (vtpm_uuid, host)
);
"#;

/// Lifecycle state of a guest ⇄ vTPM pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// A create is under way (or was interrupted).
    Creating,
    /// Guest and vTPM domain are running.
    Running,
    /// Neither runs; the binding is kept for the next start.
    Stopped,
    /// A destroy/shutdown is under way (or was interrupted).
    Destroying,
}

impl State {
    /// The name stored in the database and shown by `xl-vtpm list`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Stopped => "stopped",
            State::Destroying => "destroying",
        }
    }

    fn parse(s: &str) -> Option<State> {
        Some(match s {
            "creating" => State::Creating,
            "running" => State::Running,
            "stopped" => State::Stopped,
            "destroying" => State::Destroying,
            _ => return None,
        })
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One guest ⇄ vTPM pair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    /// Row id (stable for the life of the pair).
    pub id: i64,
    /// The guest's Xen UUID (`uuid=` of its config).
    pub guest_uuid: Uuid,
    /// The guest's domain name.
    pub guest_name: String,
    /// The vTPM's identity in the manager.
    pub vtpm_uuid: Uuid,
    /// Domain name of the vTPM domain serving this guest.
    pub vtpm_domain: String,
    /// Manager group of the vTPM.
    pub group: Option<String>,
    /// Guest domid while running.
    pub guest_domid: Option<u32>,
    /// vTPM domain domid while running.
    pub vtpm_domid: Option<u32>,
    /// Lifecycle state.
    pub state: State,
    /// When the pair was first created (Unix seconds).
    pub created_at: i64,
    /// Last change of this row (Unix seconds).
    pub updated_at: i64,
    /// Whether the pair has ever reached `running` (its vTPM may hold guest state).
    pub ran_before: bool,
    /// The host the pair runs on (or last ran on).
    pub host: String,
    /// The host holding the vTPM's activation record: set exactly while the pair is not
    /// `stopped`, and then equal to [`Row::host`] (the database enforces both).
    pub active_on: Option<String>,
}

/// What [`Registry::begin_create`] records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPair {
    /// The guest's Xen UUID.
    pub guest_uuid: Uuid,
    /// The guest's domain name.
    pub guest_name: String,
    /// The vTPM's identity in the manager.
    pub vtpm_uuid: Uuid,
    /// Domain name the vTPM domain will get.
    pub vtpm_domain: String,
    /// Manager group.
    pub group: Option<String>,
}

/// Registry failures; each message names the object and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The vTPM was created for another guest.
    #[error(
        "vTPM {vtpm} belongs to guest {guest_name} ({guest}); a vTPM is never attached to a \
         different guest than the one it was created for, because its keys, NV and sealed \
         secrets are that guest's. Give this guest its own vTPM (omit uuid= in vtpm= to \
         allocate one), or, if {guest_name} is gone for good, delete its pair first \
         (`xl-vtpm registry remove {guest_name}`)"
    )]
    VtpmBoundToOtherGuest {
        /// The vTPM asked for.
        vtpm: Uuid,
        /// The guest it is bound to.
        guest: Uuid,
        /// That guest's name.
        guest_name: String,
    },
    /// The guest already has a (different) vTPM.
    #[error(
        "guest {guest_name} ({guest}) already has vTPM {bound}, not {requested}: replacing a \
         guest's TPM would silently drop its keys and NV. Use uuid={bound} in vtpm=, or omit uuid="
    )]
    GuestHasOtherVtpm {
        /// The guest.
        guest: Uuid,
        /// Its name.
        guest_name: String,
        /// The vTPM it has.
        bound: Uuid,
        /// The vTPM asked for.
        requested: Uuid,
    },
    /// Another guest (other UUID) is registered under this name.
    #[error(
        "guest name `{name}` is registered for another guest ({other}); rename this guest, or \
         delete the old pair (`xl-vtpm registry remove {name}`)"
    )]
    GuestNameInUse {
        /// The name.
        name: String,
        /// The UUID registered under it.
        other: Uuid,
    },
    /// Another pair uses this vTPM domain name.
    #[error("vTPM domain name `{name}` is used by guest {guest_name}'s pair; choose another name")]
    VtpmDomainInUse {
        /// The vTPM domain name.
        name: String,
        /// The guest whose pair uses it.
        guest_name: String,
    },
    /// The pair is in a state the operation cannot start from.
    #[error("pair {id} ({guest_name}) is {from}, cannot go to {to}: {hint}")]
    InvalidTransition {
        /// Row id.
        id: i64,
        /// Guest name.
        guest_name: String,
        /// Current state.
        from: State,
        /// Requested state or operation.
        to: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// The vTPM is active (being created, running or being destroyed) on another host.
    #[error(
        "vTPM {vtpm} (guest {guest_name}) is {state} on host {holder}: a vTPM is active on one \
         host at a time, or two copies of its state would diverge. Stop it there first \
         (`xl-vtpm destroy {guest_name}` on {holder}); if an operation there was interrupted, \
         `xl-vtpm registry check --repair` on {holder} finishes it"
    )]
    ActiveOnOtherHost {
        /// The vTPM.
        vtpm: Uuid,
        /// Its guest.
        guest_name: String,
        /// The host holding its activation.
        holder: String,
        /// The pair's state there.
        state: State,
    },
    /// No such row.
    #[error("no registry entry with id {0}")]
    NotFound(i64),
    /// The database was written by a newer xl-vtpm.
    #[error(
        "registry schema version {found} is newer than this xl-vtpm understands ({supported}); \
         use the newer xl-vtpm"
    )]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Version this code supports.
        supported: i64,
    },
    /// A row that cannot be decoded (edited by hand?).
    #[error("registry row {id} is corrupt: {what}")]
    Corrupt {
        /// Row id.
        id: i64,
        /// What is wrong.
        what: String,
    },
    /// SQLite failed (I/O, locked beyond the busy timeout, corrupt file, …).
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused a statement or the transaction (the server's message).
    #[error("registry database (PostgreSQL): {}", pg_message(.0))]
    Postgres(#[from] postgres::Error),
    /// The connection to PostgreSQL broke while a change was being committed.
    #[error(
        "registry database (PostgreSQL): the connection broke while committing ({}); the \
         change may or may not have been recorded. `xl-vtpm list` or `xl-vtpm registry check` \
         shows which, once the database is reachable again",
        pg_message(.0)
    )]
    CommitUnknown(postgres::Error),
    /// The registry location cannot be used.
    #[error("registry `{spec}`: {why}")]
    BadLocation {
        /// The location as given (password removed).
        spec: String,
        /// What is wrong and what to write instead.
        why: String,
    },
    /// The host name for activation records is unusable.
    #[error(
        "host name `{0}` cannot be recorded: use 1 to 255 characters of letters, digits, `.`, \
         `-` and `_` (`--host NAME` or XVTPM_HOST)"
    )]
    BadHost(String),
    /// PostgreSQL is unreachable.
    #[error(
        "cannot reach the registry database {what}: {}; check that PostgreSQL runs there and \
         that the URL's user, host or socket directory and database are right",
        pg_message(.source)
    )]
    Connect {
        /// Which database (no password).
        what: String,
        /// Cause.
        source: postgres::Error,
    },
    /// A concurrent writer changed the row between the read and the write (retried).
    #[error("registry row {0} changed under a concurrent writer; try again")]
    Conflict(i64),
    /// Creating or narrowing the database file.
    #[error("registry {path}: {source}")]
    Io {
        /// The database file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

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
/// can be handed to [`Registry::apply`]. [`repair`] orders them: guests are destroyed before
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
    /// then record the new domids with [`Registry::mark_running`].
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

/// Where the registry lives, from `--registry` / `XVTPM_REGISTRY`.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An embedded SQLite file (a path, or `sqlite:PATH`).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by a fleet: a `postgres://` or `postgresql://` URL, or a
    /// libpq key-value string (`host=/run/postgresql dbname=xvtpm user=xvtpm`).
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

/// libpq keys that start a key-value connection string.
const CONNINFO_KEYS: &[&str] = &["host", "hostaddr", "port", "dbname", "user"];

impl Location {
    /// Parses a location; nothing is opened or created. A string that is neither a URL nor a
    /// key-value string is a file path.
    pub fn parse(spec: &str) -> Result<Location, RegistryError> {
        let bad = |why: &str| RegistryError::BadLocation {
            spec: redact(spec),
            why: why.to_string(),
        };
        if spec.trim().is_empty() {
            return Err(bad(
                "empty; give a file path, sqlite:PATH or postgres://USER@HOST/DB",
            ));
        }
        let lower = spec.to_ascii_lowercase();
        let kv = CONNINFO_KEYS.iter().any(|k| {
            lower
                .strip_prefix(k)
                .is_some_and(|r| r.trim_start().starts_with('='))
        });
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") || kv {
            let config: postgres::Config = spec.parse().map_err(|e| {
                bad(&format!(
                    "not a PostgreSQL connection string ({e}); write \
                     postgres://USER@HOST/DB or, for a Unix socket, \
                     postgres://USER@%2Frun%2Fpostgresql/DB"
                ))
            })?;
            if config.get_dbname().is_none() {
                return Err(bad(
                    "names no database; add it (postgres://USER@HOST/DB or dbname=DB)",
                ));
            }
            return Ok(Location::Postgres(spec.to_string()));
        }
        if lower.starts_with("postgres:") || lower.starts_with("postgresql:") {
            return Err(bad(
                "a PostgreSQL URL starts with postgres:// (for a Unix socket: \
                 postgres://USER@%2Frun%2Fpostgresql/DB)",
            ));
        }
        let path = spec.strip_prefix("sqlite:").unwrap_or(spec);
        if path.is_empty() {
            return Err(bad("sqlite: needs a file path (sqlite:/var/lib/xvtpm/registry.sqlite)"));
        }
        if spec.contains("://") {
            return Err(bad(
                "unknown scheme; the registry is a SQLite file (a path or sqlite:PATH) or \
                 PostgreSQL (postgres://…)",
            ));
        }
        Ok(Location::Sqlite(PathBuf::from(path)))
    }

    /// A printable name (never the password).
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => format!("SQLite file {}", p.display()),
            Location::Postgres(s) => match s.parse::<postgres::Config>() {
                Ok(c) => {
                    let hosts: Vec<String> = c
                        .get_hosts()
                        .iter()
                        .map(|h| match h {
                            postgres::config::Host::Tcp(h) => h.clone(),
                            postgres::config::Host::Unix(p) => p.display().to_string(),
                        })
                        .collect();
                    format!(
                        "PostgreSQL database {} on {} as {}",
                        c.get_dbname().unwrap_or("?"),
                        if hosts.is_empty() { "the default socket".into() } else { hosts.join(",") },
                        c.get_user().unwrap_or("the current user")
                    )
                }
                Err(_) => format!("PostgreSQL {}", redact(s)),
            },
        }
    }
}

/// `spec` with any password replaced by `***`.
fn redact(spec: &str) -> String {
    let mut out = spec.to_string();
    if let Some(rest) = spec.split_once("://").map(|(_, r)| r)
        && let Some((userinfo, _)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        out = spec.replacen(userinfo, &format!("{user}:***"), 1);
    }
    let mut words: Vec<String> = out.split(' ').map(str::to_string).collect();
    for w in &mut words {
        if w.to_ascii_lowercase().starts_with("password=") {
            *w = "password=***".into();
        }
    }
    words.join(" ")
}

/// This machine's host name (the default `--host`).
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| check_host(h).is_ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Refuses host names that cannot be recorded or printed safely.
pub fn check_host(host: &str) -> Result<(), RegistryError> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadHost(host.escape_debug().to_string()))
    }
}

fn pg_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            m.push_str(&format!("; {d}"));
        }
        return m;
    }
    let mut m = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    m
}

impl RegistryError {
    /// Whether a PostgreSQL transaction that failed so may succeed when run again: a
    /// serialization failure or deadlock (SERIALIZABLE lets only one of two conflicting
    /// writers commit), a unique key taken by a concurrent insert, or a row changed under us.
    /// The retry re-reads and then gives the precise answer (e.g. who holds the vTPM).
    fn retryable(&self) -> bool {
        use postgres::error::SqlState;
        match self {
            RegistryError::Conflict(_) => true,
            RegistryError::Postgres(e) => e.code().is_some_and(|c| {
                *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::UNIQUE_VIOLATION
            }),
            _ => false,
        }
    }
}

/// A value crossing into either database: every column is an integer, a text or NULL
/// (booleans are integers 0/1 on the way out).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(v)
    }
}
impl From<u32> for Val {
    fn from(v: u32) -> Val {
        Val::Int(v.into())
    }
}
impl From<Option<u32>> for Val {
    fn from(v: Option<u32>) -> Val {
        v.map_or(Val::Null, Val::from)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(v.to_string())
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Val {
        Val::Text(v.clone())
    }
}
impl From<Option<&String>> for Val {
    fn from(v: Option<&String>) -> Val {
        v.map_or(Val::Null, Val::from)
    }
}
impl From<Uuid> for Val {
    fn from(v: Uuid) -> Val {
        Val::Text(v.to_string())
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

impl postgres::types::ToSql for Val {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => Err(format!("integer parameter for a {ty} column").into()),
            },
            Val::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// Statements against either database. SQL is written once, with `$N` placeholders
/// (PostgreSQL's; rewritten to SQLite's `?N`) and only syntax both accept.
trait Sql {
    fn rows(&mut self, sql: &str, p: &[Val]) -> Result<Vec<Vec<Val>>, RegistryError>;
    fn exec(&mut self, sql: &str, p: &[Val]) -> Result<u64, RegistryError>;
    fn batch(&mut self, sql: &str) -> Result<(), RegistryError>;
    fn postgres(&self) -> bool;
}

fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

struct Lite<'a>(&'a Connection);

impl Sql for Lite<'_> {
    fn rows(&mut self, sql: &str, p: &[Val]) -> Result<Vec<Vec<Val>>, RegistryError> {
        let mut stmt = self.0.prepare(&sqlite_sql(sql))?;
        let n = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(p))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                use rusqlite::types::ValueRef;
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(i) => Val::Int(i),
                    ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Real(f) => Val::Text(f.to_string()),
                    ValueRef::Blob(b) => Val::Text(String::from_utf8_lossy(b).into_owned()),
                });
            }
            out.push(row);
        }
        Ok(out)
    }

    fn exec(&mut self, sql: &str, p: &[Val]) -> Result<u64, RegistryError> {
        Ok(self
            .0
            .execute(&sqlite_sql(sql), rusqlite::params_from_iter(p))? as u64)
    }

    fn batch(&mut self, sql: &str) -> Result<(), RegistryError> {
        Ok(self.0.execute_batch(sql)?)
    }

    fn postgres(&self) -> bool {
        false
    }
}

struct Pg<'a, C: postgres::GenericClient>(&'a mut C);

fn pg_params(p: &[Val]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

impl<C: postgres::GenericClient> Sql for Pg<'_, C> {
    fn rows(&mut self, sql: &str, p: &[Val]) -> Result<Vec<Vec<Val>>, RegistryError> {
        use postgres::types::Type;
        let rows = self.0.query(sql, &pg_params(p))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = Vec::with_capacity(r.len());
            for (i, c) in r.columns().iter().enumerate() {
                let v = match *c.type_() {
                    Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Val::Int),
                    Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|v| Val::Int(v.into())),
                    Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|v| Val::Int(v.into())),
                    Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|v| Val::Int(v.into())),
                    _ => r.try_get::<_, Option<String>>(i)?.map(Val::Text),
                };
                row.push(v.unwrap_or(Val::Null));
            }
            out.push(row);
        }
        Ok(out)
    }

    fn exec(&mut self, sql: &str, p: &[Val]) -> Result<u64, RegistryError> {
        Ok(self.0.execute(sql, &pg_params(p))?)
    }

    fn batch(&mut self, sql: &str) -> Result<(), RegistryError> {
        Ok(self.0.batch_execute(sql)?)
    }

    fn postgres(&self) -> bool {
        true
    }
}

enum Db {
    Lite(Connection),
    Pg {
        client: Box<postgres::Client>,
        config: Box<postgres::Config>,
        what: String,
    },
}

/// The registry database: an embedded SQLite file or a PostgreSQL database shared by hosts.
pub struct Registry {
    db: RefCell<Db>,
    host: String,
    retries: Cell<u64>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &*self.db.borrow() {
            Db::Lite(c) => format!("SQLite {:?}", c.path()),
            Db::Pg { what, .. } => what.clone(),
        };
        write!(f, "Registry({what}, host {})", self.host)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const COLUMNS: &str = "p.id, p.guest_uuid, p.guest_name, p.vtpm_uuid, p.vtpm_domain, p.grp, \
                       p.guest_domid, p.vtpm_domid, p.state, p.created_at, p.updated_at, \
                       p.ran_before, p.host, a.host";
const FROM: &str = "pairs p LEFT JOIN activations a ON a.vtpm_uuid = p.vtpm_uuid";

fn row_from_vals(v: Vec<Val>) -> Result<Row, RegistryError> {
    let id = match v.first() {
        Some(Val::Int(i)) => *i,
        _ => 0,
    };
    let corrupt = |what: String| RegistryError::Corrupt { id, what };
    let int = |i: usize, what: &str| match &v[i] {
        Val::Int(x) => Ok(*x),
        other => Err(corrupt(format!("{what} is {other:?}, not an integer"))),
    };
    let opt_domid = |i: usize, what: &str| match &v[i] {
        Val::Null => Ok(None),
        Val::Int(x) => u32::try_from(*x)
            .map(Some)
            .map_err(|_| corrupt(format!("{what} {x} is not a domid"))),
        other => Err(corrupt(format!("{what} is {other:?}"))),
    };
    let text = |i: usize, what: &str| match &v[i] {
        Val::Text(s) => Ok(s.clone()),
        other => Err(corrupt(format!("{what} is {other:?}, not text"))),
    };
    let opt_text = |i: usize, what: &str| match &v[i] {
        Val::Null => Ok(None),
        Val::Text(s) => Ok(Some(s.clone())),
        other => Err(corrupt(format!("{what} is {other:?}, not text"))),
    };
    let uuid = |i: usize, what: &str| {
        let s = text(i, what)?;
        Uuid::parse_str(&s).map_err(|_| corrupt(format!("{what} `{s}` is not a UUID")))
    };
    let state_s = text(8, "state")?;
    let state = State::parse(&state_s).ok_or_else(|| corrupt(format!("state `{state_s}`")))?;
    Ok(Row {
        id,
        guest_uuid: uuid(1, "guest_uuid")?,
        guest_name: text(2, "guest_name")?,
        vtpm_uuid: uuid(3, "vtpm_uuid")?,
        vtpm_domain: text(4, "vtpm_domain")?,
        group: opt_text(5, "grp")?,
        guest_domid: opt_domid(6, "guest_domid")?,
        vtpm_domid: opt_domid(7, "vtpm_domid")?,
        state,
        created_at: int(9, "created_at")?,
        updated_at: int(10, "updated_at")?,
        ran_before: int(11, "ran_before")? != 0,
        host: opt_text(12, "host")?.ok_or_else(|| corrupt("host is NULL".into()))?,
        active_on: opt_text(13, "activation host")?,
    })
}

fn query_one(db: &mut dyn Sql, cond: &str, p: &[Val]) -> Result<Option<Row>, RegistryError> {
    let sql = format!("SELECT {COLUMNS} FROM {FROM} WHERE {cond}");
    db.rows(&sql, p)?.into_iter().next().map(row_from_vals).transpose()
}

fn scalar(db: &mut dyn Sql, sql: &str, p: &[Val]) -> Result<Option<i64>, RegistryError> {
    Ok(match db.rows(sql, p)?.into_iter().next().and_then(|r| r.into_iter().next()) {
        Some(Val::Int(i)) => Some(i),
        _ => None,
    })
}

/// Records `host`'s activation of `row`'s vTPM, or names the host that holds it.
fn activate(db: &mut dyn Sql, row: &Row, host: &str, now: i64) -> Result<(), RegistryError> {
    let n = db.exec(
        "INSERT INTO activations (vtpm_uuid, host, since) VALUES ($1, $2, $3) \
         ON CONFLICT (vtpm_uuid) DO NOTHING",
        &[row.vtpm_uuid.into(), host.into(), now.into()],
    )?;
    if n == 1 {
        return Ok(());
    }
    let holder = db.rows(
        "SELECT host FROM activations WHERE vtpm_uuid = $1",
        &[row.vtpm_uuid.into()],
    )?;
    match holder.into_iter().next().and_then(|r| r.into_iter().next()) {
        Some(Val::Text(h)) => Err(RegistryError::ActiveOnOtherHost {
            vtpm: row.vtpm_uuid,
            guest_name: row.guest_name.clone(),
            holder: h,
            state: row.state,
        }),
        // Released between the insert and the read: run the transaction again.
        _ => Err(RegistryError::Conflict(row.id)),
    }
}

/// Refuses a change to `row` from `host` while another host holds its activation.
fn held_elsewhere(row: &Row, host: &str) -> Result<(), RegistryError> {
    match &row.active_on {
        Some(h) if h != host => Err(RegistryError::ActiveOnOtherHost {
            vtpm: row.vtpm_uuid,
            guest_name: row.guest_name.clone(),
            holder: h.clone(),
            state: row.state,
        }),
        _ => Ok(()),
    }
}

impl Registry {
    /// Opens (creating if needed) the SQLite registry at `path` for this host: WAL,
    /// `synchronous=FULL`, a 10 s busy timeout, foreign keys on, and the schema migrated to
    /// [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        Registry::open_sqlite(path, &this_host())
    }

    /// Opens the registry at `location`, recording activations under `host`. The location and
    /// host are validated before anything is created or connected to.
    pub fn connect(location: &Location, host: &str) -> Result<Registry, RegistryError> {
        check_host(host)?;
        match location {
            Location::Sqlite(p) => Registry::open_sqlite(p, host),
            Location::Postgres(s) => Registry::open_postgres(s, host),
        }
    }

    fn open_sqlite(path: &Path, host: &str) -> Result<Registry, RegistryError> {
        check_host(host)?;
        // Root-only: SQLite creates the file with the umask's mode (0644) and gives its WAL and
        // shared-memory files the database file's mode, so the file is made (or narrowed) first.
        {
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            let io = |source| RegistryError::Io { path: path.into(), source };
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        let conn = Connection::open(path)?;
        Registry::init_sqlite(conn, true, host)
    }

    /// Connects to a PostgreSQL registry (`postgres://…`, `postgresql://…` or a libpq
    /// key-value string; Unix sockets as `host=/dir` or a percent-encoded URL host).
    pub fn open_postgres(spec: &str, host: &str) -> Result<Registry, RegistryError> {
        check_host(host)?;
        let Location::Postgres(_) = Location::parse(spec)? else {
            return Err(RegistryError::BadLocation {
                spec: redact(spec),
                why: "not a PostgreSQL URL (postgres://USER@HOST/DB)".into(),
            });
        };
        let mut config: postgres::Config = spec.parse().map_err(|e| RegistryError::BadLocation {
            spec: redact(spec),
            why: format!("{e}"),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("xl-vtpm");
        }
        config.options(&format!("-c lock_timeout={PG_LOCK_TIMEOUT}"));
        let what = Location::Postgres(spec.to_string()).describe();
        let client = config
            .connect(postgres::NoTls)
            .map_err(|source| RegistryError::Connect { what: what.clone(), source })?;
        let reg = Registry {
            db: RefCell::new(Db::Pg { client: Box::new(client), config: Box::new(config), what }),
            host: host.to_string(),
            retries: Cell::new(0),
        };
        reg.migrate()?;
        Ok(reg)
    }

    /// An in-memory SQLite registry (tests, dry runs).
    pub fn open_in_memory() -> Result<Registry, RegistryError> {
        Registry::init_sqlite(Connection::open_in_memory()?, false, &this_host())
    }

    fn init_sqlite(conn: Connection, wal: bool, host: &str) -> Result<Registry, RegistryError> {
        conn.busy_timeout(Duration::from_secs(10))?;
        if wal {
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(RegistryError::Corrupt {
                    id: 0,
                    what: format!("cannot switch to WAL (journal_mode={mode})"),
                });
            }
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let reg = Registry {
            db: RefCell::new(Db::Lite(conn)),
            host: host.to_string(),
            retries: Cell::new(0),
        };
        reg.migrate()?;
        Ok(reg)
    }

    /// The host this registry handle records activations under.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether this is a PostgreSQL registry.
    pub fn is_postgres(&self) -> bool {
        matches!(&*self.db.borrow(), Db::Pg { .. })
    }

    /// How many PostgreSQL transactions this handle ran again after a conflict with a
    /// concurrent writer.
    pub fn retries(&self) -> u64 {
        self.retries.get()
    }

    /// A read outside a transaction (each statement sees committed data).
    fn read<T>(&self, f: impl FnOnce(&mut dyn Sql) -> Result<T, RegistryError>) -> Result<T, RegistryError> {
        let mut db = self.db.borrow_mut();
        match &mut *db {
            Db::Lite(conn) => f(&mut Lite(conn)),
            Db::Pg { client, config, what } => {
                reconnect(client, config, what)?;
                f(&mut Pg(&mut **client))
            }
        }
    }

    /// One change, all or nothing, durable when this returns `Ok`: SQLite `BEGIN IMMEDIATE`
    /// (writers serialise); PostgreSQL SERIALIZABLE, run again on a conflict with a concurrent
    /// writer (up to [`PG_MAX_ATTEMPTS`] times), so `f` must only touch the database.
    fn write<T>(
        &self,
        mut f: impl FnMut(&mut dyn Sql, &str) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut db = self.db.borrow_mut();
        match &mut *db {
            Db::Lite(conn) => {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let v = f(&mut Lite(&tx), &self.host)?;
                tx.commit()?;
                Ok(v)
            }
            Db::Pg { client, config, what } => {
                reconnect(client, config, what)?;
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let result = (|| -> Result<T, RegistryError> {
                        let mut tx = client
                            .build_transaction()
                            .isolation_level(postgres::IsolationLevel::Serializable)
                            .start()?;
                        let v = f(&mut Pg(&mut tx), &self.host)?;
                        // Only a refusal of the transaction itself (class 40: serialization
                        // failure, deadlock; class 23: a constraint) means "not committed". Any
                        // other failure of COMMIT leaves the outcome unknown — a broken connection,
                        // or a server that commits and then reports FATAL 57P01 because its
                        // postmaster died: say so.
                        tx.commit().map_err(|e| {
                            let refused = e
                                .code()
                                .is_some_and(|c| c.code().starts_with("40") || c.code().starts_with("23"));
                            if refused {
                                RegistryError::Postgres(e)
                            } else {
                                RegistryError::CommitUnknown(e)
                            }
                        })?;
                        Ok(v)
                    })();
                    match result {
                        Err(e) if e.retryable() && attempt < PG_MAX_ATTEMPTS => {
                            self.retries.set(self.retries.get() + 1);
                            // Back off a little, differently in each process.
                            let jitter = (std::process::id() as u64 * 7919 + attempt as u64 * 104_729) % 5_000;
                            std::thread::sleep(Duration::from_micros(200 * attempt as u64 + jitter));
                        }
                        other => return other,
                    }
                }
            }
        }
    }

    /// Applies the missing migrations, each in one transaction with its version record.
    /// Concurrent first openers of a PostgreSQL database take an advisory lock, so the schema
    /// is made once. Refuses a database from a newer xl-vtpm.
    fn migrate(&self) -> Result<(), RegistryError> {
        let mut db = self.db.borrow_mut();
        match &mut *db {
            Db::Lite(conn) => {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                // `schema_version` is the table the first release reads (and refuses a newer
                // version by): kept, so an older xl-vtpm refuses a migrated file.
                tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
                migrate_in(&mut Lite(&tx), "schema_version", &self.host)?;
                tx.commit()?;
            }
            Db::Pg { client, .. } => {
                let mut tx = client.transaction()?;
                // Any constant: serialises concurrent migrations of this database.
                tx.batch_execute("SELECT pg_advisory_xact_lock(7806209845521130061)")?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (\
                     version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
                )?;
                migrate_in(&mut Pg(&mut tx), "schema_migrations", &self.host)?;
                tx.commit()?;
            }
        }
        Ok(())
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, RegistryError> {
        let table = if self.is_postgres() { "schema_migrations" } else { "schema_version" };
        self.read(|db| Ok(scalar(db, &format!("SELECT max(version) FROM {table}"), &[])?.unwrap_or(0)))
    }

    /// SQLite's `integrity_check`; `Ok(())` if the file is sound. PostgreSQL checks its own
    /// pages and WAL; there it only proves the database answers.
    pub fn integrity_check(&self) -> Result<(), RegistryError> {
        let res = self.read(|db| {
            if db.postgres() {
                db.rows("SELECT 'ok'", &[])?;
                return Ok("ok".to_string());
            }
            match db.rows("PRAGMA integrity_check", &[])?.into_iter().next().and_then(|r| r.into_iter().next()) {
                Some(Val::Text(s)) => Ok(s),
                other => Ok(format!("{other:?}")),
            }
        })?;
        if res == "ok" {
            Ok(())
        } else {
            Err(RegistryError::Corrupt {
                id: 0,
                what: format!("integrity_check: {res}"),
            })
        }
    }

    /// Runs raw SQL outside the API (tests: the database's own constraints must still hold).
    #[doc(hidden)]
    pub fn execute_raw(&self, sql: &str) -> Result<(), RegistryError> {
        self.read(|db| db.batch(sql))
    }

    /// Starts a create on this host: records the pair as `creating` with this host's
    /// activation, and returns its row id.
    ///
    /// A new guest gets a new row. A guest that has a `stopped` pair restarts it (its name is
    /// updated if the guest was renamed; it may have last run on another host). Refused: a
    /// vTPM bound to another guest ([`RegistryError::VtpmBoundToOtherGuest`]), a guest bound to
    /// another vTPM, a pair active on another host ([`RegistryError::ActiveOnOtherHost`]), a
    /// pair that is not stopped, a name or vTPM domain name used by another pair.
    pub fn begin_create(&mut self, new: &NewPair) -> Result<i64, RegistryError> {
        self.write(|tx, host| {
            let now = unix_now();
            if let Some(other) = query_one(tx, "p.vtpm_uuid = $1", &[new.vtpm_uuid.into()])?
                && other.guest_uuid != new.guest_uuid
            {
                return Err(RegistryError::VtpmBoundToOtherGuest {
                    vtpm: new.vtpm_uuid,
                    guest: other.guest_uuid,
                    guest_name: other.guest_name,
                });
            }
            if let Some(other) = query_one(
                tx,
                "p.guest_name = $1 AND p.guest_uuid <> $2",
                &[(&new.guest_name).into(), new.guest_uuid.into()],
            )? {
                return Err(RegistryError::GuestNameInUse {
                    name: new.guest_name.clone(),
                    other: other.guest_uuid,
                });
            }
            if let Some(other) = query_one(
                tx,
                "p.vtpm_domain = $1 AND p.guest_uuid <> $2",
                &[(&new.vtpm_domain).into(), new.guest_uuid.into()],
            )? {
                return Err(RegistryError::VtpmDomainInUse {
                    name: new.vtpm_domain.clone(),
                    guest_name: other.guest_name,
                });
            }
            let row = match query_one(tx, "p.guest_uuid = $1", &[new.guest_uuid.into()])? {
                Some(row) => {
                    if row.vtpm_uuid != new.vtpm_uuid {
                        return Err(RegistryError::GuestHasOtherVtpm {
                            guest: row.guest_uuid,
                            guest_name: row.guest_name,
                            bound: row.vtpm_uuid,
                            requested: new.vtpm_uuid,
                        });
                    }
                    if row.state != State::Stopped {
                        held_elsewhere(&row, host)?;
                        return Err(RegistryError::InvalidTransition {
                            id: row.id,
                            guest_name: row.guest_name,
                            from: row.state,
                            to: "creating",
                            hint: "it is not stopped; `xl-vtpm list` shows it, `xl-vtpm registry check` repairs an interrupted operation",
                        });
                    }
                    let n = tx.exec(
                        "UPDATE pairs SET state = 'creating', guest_name = $2, vtpm_domain = $3, grp = $4, \
                         guest_domid = NULL, vtpm_domid = NULL, updated_at = $5, host = $6 \
                         WHERE id = $1 AND state = 'stopped'",
                        &[row.id.into(), (&new.guest_name).into(), (&new.vtpm_domain).into(), new.group.as_ref().into(), now.into(), host.into()],
                    )?;
                    if n != 1 {
                        return Err(RegistryError::Conflict(row.id));
                    }
                    row
                }
                None => {
                    let id = scalar(
                        tx,
                        "INSERT INTO pairs (guest_uuid, guest_name, vtpm_uuid, vtpm_domain, grp, state, created_at, updated_at, host) \
                         VALUES ($1, $2, $3, $4, $5, 'creating', $6, $6, $7) RETURNING id",
                        &[new.guest_uuid.into(), (&new.guest_name).into(), new.vtpm_uuid.into(), (&new.vtpm_domain).into(), new.group.as_ref().into(), now.into(), host.into()],
                    )?
                    .ok_or(RegistryError::Corrupt { id: 0, what: "INSERT returned no id".into() })?;
                    query_one(tx, "p.id = $1", &[id.into()])?.ok_or(RegistryError::NotFound(id))?
                }
            };
            activate(tx, &row, host, now)?;
            Ok(row.id)
        })
    }

    /// Refuses unless `vtpm` may serve `guest`: it is unregistered, or registered to `guest`.
    /// Call before any attach (`xl vtpm-attach`, libvirt hook) that bypasses [`Self::begin_create`].
    pub fn check_attach(&self, vtpm: Uuid, guest: Uuid) -> Result<(), RegistryError> {
        match self.read(|db| query_one(db, "p.vtpm_uuid = $1", &[vtpm.into()]))? {
            Some(row) if row.guest_uuid != guest => Err(RegistryError::VtpmBoundToOtherGuest {
                vtpm,
                guest: row.guest_uuid,
                guest_name: row.guest_name,
            }),
            _ => Ok(()),
        }
    }

    /// A state change of row `id` from one of `from` (refused while another host holds its
    /// activation); `body` does the writes.
    fn transition(
        &mut self,
        id: i64,
        from: &[State],
        to: &'static str,
        hint: &'static str,
        mut body: impl FnMut(&mut dyn Sql, &Row, &str) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        self.write(|tx, host| {
            let row = query_one(tx, "p.id = $1", &[id.into()])?.ok_or(RegistryError::NotFound(id))?;
            held_elsewhere(&row, host)?;
            if !from.contains(&row.state) {
                return Err(RegistryError::InvalidTransition {
                    id,
                    guest_name: row.guest_name,
                    from: row.state,
                    to,
                    hint,
                });
            }
            body(tx, &row, host)
        })
    }

    /// Records the domids (as they are now: `None` = no such domain yet) during a create.
    pub fn set_domids(
        &mut self,
        id: i64,
        guest_domid: Option<u32>,
        vtpm_domid: Option<u32>,
    ) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Creating, State::Running],
            "set domids",
            "domids are recorded only while creating or running",
            |tx, _, _| {
                tx.exec(
                    "UPDATE pairs SET guest_domid = $2, vtpm_domid = $3, updated_at = $4 WHERE id = $1",
                    &[id.into(), guest_domid.into(), vtpm_domid.into(), unix_now().into()],
                )
                .map(drop)
            },
        )
    }

    /// Finishes a create: both domains run with these domids. Also used by repairs (from
    /// `stopped` when both were found running on this host, from `running` to fix domids).
    pub fn mark_running(
        &mut self,
        id: i64,
        guest_domid: u32,
        vtpm_domid: u32,
    ) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Creating, State::Running, State::Stopped],
            "running",
            "a pair being destroyed must finish (`xl-vtpm registry check`) before it runs again",
            |tx, row, host| {
                let now = unix_now();
                if row.state == State::Stopped {
                    tx.exec("UPDATE pairs SET host = $2 WHERE id = $1", &[id.into(), host.into()])?;
                    let row = Row { host: host.to_string(), ..row.clone() };
                    activate(tx, &row, host, now)?;
                }
                tx.exec(
                    "UPDATE pairs SET state = 'running', guest_domid = $2, vtpm_domid = $3, updated_at = $4, \
                     ran_before = TRUE WHERE id = $1",
                    &[id.into(), guest_domid.into(), vtpm_domid.into(), now.into()],
                )
                .map(drop)
            },
        )
    }

    /// Starts a destroy/shutdown.
    pub fn begin_destroy(&mut self, id: i64) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Running, State::Creating, State::Destroying],
            "destroying",
            "it is already stopped",
            |tx, _, _| {
                tx.exec(
                    "UPDATE pairs SET state = 'destroying', updated_at = $2 WHERE id = $1",
                    &[id.into(), unix_now().into()],
                )
                .map(drop)
            },
        )
    }

    /// Records that neither domain runs and releases the activation; the binding stays for
    /// the next start (on any host).
    pub fn mark_stopped(&mut self, id: i64) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Creating, State::Running, State::Stopped, State::Destroying],
            "stopped",
            "",
            |tx, row, _| {
                tx.exec("DELETE FROM activations WHERE vtpm_uuid = $1", &[row.vtpm_uuid.into()])?;
                tx.exec(
                    "UPDATE pairs SET state = 'stopped', guest_domid = NULL, vtpm_domid = NULL, updated_at = $2 WHERE id = $1",
                    &[id.into(), unix_now().into()],
                )
                .map(drop)
            },
        )
    }

    /// Deletes a stopped pair (when its vTPM is deleted in the manager, or by a repair).
    pub fn remove(&mut self, id: i64) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Stopped],
            "removed",
            "stop it first (`xl-vtpm destroy`)",
            |tx, _, _| tx.exec("DELETE FROM pairs WHERE id = $1", &[id.into()]).map(drop),
        )
    }

    /// The pair with this row id.
    pub fn get(&self, id: i64) -> Result<Option<Row>, RegistryError> {
        self.read(|db| query_one(db, "p.id = $1", &[id.into()]))
    }

    /// The pair of this guest.
    pub fn get_by_guest(&self, guest_uuid: Uuid) -> Result<Option<Row>, RegistryError> {
        self.read(|db| query_one(db, "p.guest_uuid = $1", &[guest_uuid.into()]))
    }

    /// The pair of this vTPM.
    pub fn get_by_vtpm(&self, vtpm_uuid: Uuid) -> Result<Option<Row>, RegistryError> {
        self.read(|db| query_one(db, "p.vtpm_uuid = $1", &[vtpm_uuid.into()]))
    }

    /// The pair whose guest has this name.
    pub fn get_by_name(&self, guest_name: &str) -> Result<Option<Row>, RegistryError> {
        self.read(|db| query_one(db, "p.guest_name = $1", &[guest_name.into()]))
    }

    /// All pairs of every host, ordered by guest name.
    pub fn list(&self) -> Result<Vec<Row>, RegistryError> {
        self.read(|db| {
            db.rows(&format!("SELECT {COLUMNS} FROM {FROM} ORDER BY p.guest_name"), &[])?
                .into_iter()
                .map(row_from_vals)
                .collect()
        })
    }

    /// [`check`] of this host's pairs against the domains observed on this host (and this
    /// host's manager). A manager vTPM whose pair is registered on another host is not
    /// reported as unregistered.
    pub fn check(
        &self,
        observed: &[ObservedDomain],
        manager_vtpms: Option<&[Uuid]>,
        opts: CheckOptions,
    ) -> Result<Vec<Drift>, RegistryError> {
        let all = self.list()?;
        let (mine, others): (Vec<Row>, Vec<Row>) = all.into_iter().partition(|r| r.host == self.host);
        let mut drift = check(&mine, observed, manager_vtpms, opts);
        drift.retain(|d| !matches!(d, Drift::UnregisteredManagerVtpm { vtpm } if others.iter().any(|r| r.vtpm_uuid == *vtpm)));
        Ok(drift)
    }

    /// [`Self::check`] for this host, plus what the registry alone tells about the other
    /// hosts' pairs: activation records that disagree with their pair, and creates or
    /// destroys there older than `stale_after` ([`Drift::StuckElsewhere`]; only that host can
    /// repair them).
    pub fn check_all_hosts(
        &self,
        observed: &[ObservedDomain],
        manager_vtpms: Option<&[Uuid]>,
        opts: CheckOptions,
    ) -> Result<Vec<Drift>, RegistryError> {
        let mut drift = self.check(observed, manager_vtpms, opts)?;
        for row in self.list()?.into_iter().filter(|r| r.host != self.host) {
            let active = row.state != State::Stopped;
            if active != (row.active_on.as_deref() == Some(row.host.as_str())) || (!active && row.active_on.is_some()) {
                drift.push(Drift::ActivationMismatch { row: row.clone() });
            }
            let stale = opts.now.saturating_sub(row.updated_at) >= opts.stale_after.as_secs() as i64;
            match row.state {
                State::Creating | State::Destroying if stale => drift.push(Drift::StuckElsewhere { row }),
                State::Creating | State::Destroying => drift.push(Drift::InProgress { row }),
                State::Running | State::Stopped => {}
            }
        }
        Ok(drift)
    }

    /// Applies a record action of a repair. Returns `Ok(false)` for actions that are not
    /// registry updates (destroy/restart a domain, manual) — the caller's business.
    pub fn apply(&mut self, action: &RepairAction) -> Result<bool, RegistryError> {
        match action {
            RepairAction::MarkRunning {
                id,
                guest_domid,
                vtpm_domid,
            } => self.mark_running(*id, *guest_domid, *vtpm_domid)?,
            RepairAction::MarkStopped { id } => self.mark_stopped(*id)?,
            RepairAction::DeleteRow { id } => self.transition(
                *id,
                &[State::Creating, State::Running, State::Stopped, State::Destroying],
                "deleted",
                "",
                |tx, row, _| {
                    tx.exec("DELETE FROM activations WHERE vtpm_uuid = $1", &[row.vtpm_uuid.into()])?;
                    tx.exec("DELETE FROM pairs WHERE id = $1", &[row.id.into()]).map(drop)
                },
            )?,
            RepairAction::DestroyDomain { .. }
            | RepairAction::RestartVtpm { .. }
            | RepairAction::Manual { .. } => return Ok(false),
        }
        Ok(true)
    }
}

/// Connects again after the server closed the connection (a restart, a failover).
fn reconnect(client: &mut Box<postgres::Client>, config: &postgres::Config, what: &str) -> Result<(), RegistryError> {
    if client.is_closed() {
        **client = config
            .connect(postgres::NoTls)
            .map_err(|source| RegistryError::Connect { what: what.to_string(), source })?;
    }
    Ok(())
}

/// The migration steps after `version_table` says where the database is.
fn migrate_in(db: &mut dyn Sql, version_table: &str, host: &str) -> Result<(), RegistryError> {
    let current = scalar(db, &format!("SELECT max(version) FROM {version_table}"), &[])?.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(RegistryError::TooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        db.batch(if db.postgres() { m.postgres } else { m.sqlite })?;
        if m.version == 2 {
            // Pairs from before hosts were recorded ran here; active ones get their record.
            db.exec("UPDATE pairs SET host = $1 WHERE host IS NULL", &[host.into()])?;
            db.exec(
                "INSERT INTO activations (vtpm_uuid, host, since) \
                 SELECT vtpm_uuid, host, updated_at FROM pairs WHERE state <> 'stopped'",
                &[],
            )?;
        }
        if db.postgres() {
            db.exec(
                &format!("INSERT INTO {version_table} (version, applied_at) VALUES ($1, $2)"),
                &[m.version.into(), unix_now().into()],
            )?;
        } else {
            db.exec(&format!("INSERT INTO {version_table} (version) VALUES ($1)"), &[m.version.into()])?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry database on one backend, opened by as many hosts as a test wants: a SQLite
    /// file in a temporary directory, or a fresh PostgreSQL cluster of its own.
    struct Fixture {
        location: Location,
        _dir: Option<tempfile::TempDir>,
        _pg: Option<testkit::pg::PgCluster>,
    }

    impl Fixture {
        fn sqlite() -> Fixture {
            let dir = testkit::tempdir();
            Fixture {
                location: Location::Sqlite(dir.path().join("registry.sqlite")),
                _dir: Some(dir),
                _pg: None,
            }
        }

        fn postgres() -> Fixture {
            let pg = testkit::pg::PgCluster::start();
            Fixture {
                location: Location::parse(&pg.url("postgres")).unwrap(),
                _dir: None,
                _pg: Some(pg),
            }
        }

        fn open(&self, host: &str) -> Registry {
            Registry::connect(&self.location, host).unwrap()
        }
    }

    /// Each test runs once per backend: the registry behaves the same on both.
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {
            mod on_sqlite {
                $( #[test] fn $name() { super::$name(&super::Fixture::sqlite()) } )*
            }
            mod on_postgres {
                $( #[test] fn $name() { super::$name(&super::Fixture::postgres()) } )*
            }
        };
    }

    on_both_backends!(
        lifecycle_and_binding,
        trigger_forbids_rebinding_even_in_raw_sql,
        names_are_unique,
        transitions_are_guarded,
        a_vtpm_is_active_on_one_host_at_a_time,
        the_database_enforces_activation_records,
        a_newer_schema_is_refused,
        migrations_are_applied_once,
    );

    fn pair(n: u8) -> NewPair {
        NewPair {
            guest_uuid: Uuid::from_u128(0x1000 + n as u128),
            guest_name: format!("guest{n}"),
            vtpm_uuid: Uuid::from_u128(0x2000 + n as u128),
            vtpm_domain: format!("vtpm-guest{n}"),
            group: Some("default".into()),
        }
    }

    fn lifecycle_and_binding(f: &Fixture) {
        let mut r = f.open("host-a");
        assert_eq!(r.schema_version().unwrap(), SCHEMA_VERSION);
        let id = r.begin_create(&pair(1)).unwrap();
        r.set_domids(id, None, Some(7)).unwrap();
        r.mark_running(id, 8, 7).unwrap();
        let row = r.get_by_name("guest1").unwrap().unwrap();
        assert_eq!(
            (row.state, row.guest_domid, row.vtpm_domid, row.ran_before),
            (State::Running, Some(8), Some(7), true)
        );
        assert_eq!((row.host.as_str(), row.active_on.as_deref()), ("host-a", Some("host-a")));
        // Busy while running.
        assert!(matches!(
            r.begin_create(&pair(1)),
            Err(RegistryError::InvalidTransition { .. })
        ));
        // Another guest asking for guest1's vTPM.
        let mut thief = pair(2);
        thief.vtpm_uuid = pair(1).vtpm_uuid;
        let e = r.begin_create(&thief).unwrap_err();
        assert!(
            matches!(e, RegistryError::VtpmBoundToOtherGuest { vtpm, guest, .. } if vtpm == pair(1).vtpm_uuid && guest == pair(1).guest_uuid)
        );
        assert!(e.to_string().contains("never attached to a different guest"), "{e}");
        assert!(r.check_attach(pair(1).vtpm_uuid, pair(2).guest_uuid).is_err());
        assert!(r.check_attach(pair(1).vtpm_uuid, pair(1).guest_uuid).is_ok());
        // Guest asking for another vTPM.
        let mut swap = pair(1);
        swap.vtpm_uuid = Uuid::from_u128(99);
        r.begin_destroy(id).unwrap();
        r.mark_stopped(id).unwrap();
        assert_eq!(r.get(id).unwrap().unwrap().active_on, None);
        assert!(matches!(
            r.begin_create(&swap),
            Err(RegistryError::GuestHasOtherVtpm { .. })
        ));
        // Restart keeps the row.
        assert_eq!(r.begin_create(&pair(1)).unwrap(), id);
        r.mark_stopped(id).unwrap();
        r.remove(id).unwrap();
        assert!(r.list().unwrap().is_empty());
        // After removal the vTPM UUID is free again.
        r.begin_create(&thief).unwrap();
        // A committed change is seen by a new handle (another process).
        assert_eq!(f.open("host-a").list().unwrap().len(), 1);
    }

    fn trigger_forbids_rebinding_even_in_raw_sql(f: &Fixture) {
        let mut r = f.open("host-a");
        let id = r.begin_create(&pair(1)).unwrap();
        let e = r
            .execute_raw(&format!("UPDATE pairs SET guest_uuid = 'x' WHERE id = {id}"))
            .unwrap_err();
        assert!(e.to_string().contains("stays bound"), "{e}");
        r.begin_create(&pair(2)).unwrap();
        let e = r
            .execute_raw(&format!("UPDATE pairs SET vtpm_uuid = (SELECT vtpm_uuid FROM pairs WHERE guest_name='guest2') WHERE id = {id}"))
            .unwrap_err();
        assert!(e.to_string().contains("stays bound"), "{e}");
        // A second row for the same vTPM is refused by the database itself.
        let e = r
            .execute_raw(&format!(
                "INSERT INTO pairs (guest_uuid, guest_name, vtpm_uuid, vtpm_domain, state, created_at, updated_at, host) \
                 VALUES ('{}', 'g9', '{}', 'vtpm-g9', 'stopped', 0, 0, 'h')",
                Uuid::from_u128(9),
                pair(1).vtpm_uuid
            ))
            .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("unique"), "{e}");
    }

    fn names_are_unique(f: &Fixture) {
        let mut r = f.open("host-a");
        r.begin_create(&pair(1)).unwrap();
        let mut same_name = pair(2);
        same_name.guest_name = "guest1".into();
        assert!(matches!(
            r.begin_create(&same_name),
            Err(RegistryError::GuestNameInUse { .. })
        ));
        let mut same_dom = pair(3);
        same_dom.vtpm_domain = "vtpm-guest1".into();
        assert!(matches!(
            r.begin_create(&same_dom),
            Err(RegistryError::VtpmDomainInUse { .. })
        ));
    }

    fn transitions_are_guarded(f: &Fixture) {
        let mut r = f.open("host-a");
        let id = r.begin_create(&pair(1)).unwrap();
        assert!(matches!(
            r.remove(id),
            Err(RegistryError::InvalidTransition { .. })
        ));
        r.mark_stopped(id).unwrap();
        assert!(matches!(
            r.begin_destroy(id),
            Err(RegistryError::InvalidTransition { .. })
        ));
        assert!(matches!(
            r.set_domids(id, Some(1), None),
            Err(RegistryError::InvalidTransition { .. })
        ));
        assert!(matches!(
            r.mark_stopped(4242),
            Err(RegistryError::NotFound(4242))
        ));
    }

    fn a_vtpm_is_active_on_one_host_at_a_time(f: &Fixture) {
        let mut a = f.open("host-a");
        let mut b = f.open("host-b");
        let id = a.begin_create(&pair(1)).unwrap();
        let holder = |e: RegistryError| match e {
            RegistryError::ActiveOnOtherHost { holder, .. } => holder,
            other => panic!("expected ActiveOnOtherHost, got {other}"),
        };
        let e = b.begin_create(&pair(1)).unwrap_err();
        assert!(e.to_string().contains("on host host-a"), "{e}");
        assert_eq!(holder(e), "host-a");
        // Nor may host-b drive host-a's pair.
        assert_eq!(holder(b.mark_running(id, 1, 2).unwrap_err()), "host-a");
        assert_eq!(holder(b.begin_destroy(id).unwrap_err()), "host-a");
        assert_eq!(holder(b.mark_stopped(id).unwrap_err()), "host-a");
        a.mark_running(id, 3, 4).unwrap();
        // Per host, host-b has nothing to check; fleet-wide it sees host-a's pair.
        let opts = CheckOptions { now: i64::MAX / 2, stale_after: Duration::ZERO };
        assert_eq!(b.check(&[], None, opts).unwrap(), vec![]);
        assert_eq!(b.check_all_hosts(&[], None, opts).unwrap(), vec![]);
        // Once stopped on host-a, host-b may start it: the pair moves.
        a.begin_destroy(id).unwrap();
        a.mark_stopped(id).unwrap();
        assert_eq!(b.begin_create(&pair(1)).unwrap(), id);
        let row = a.get(id).unwrap().unwrap();
        assert_eq!((row.host.as_str(), row.active_on.as_deref()), ("host-b", Some("host-b")));
        assert_eq!(holder(a.begin_create(&pair(1)).unwrap_err()), "host-b");
        // host-b's create is interrupted: host-a reports it fleet-wide, not per host, and
        // repair leaves it to host-b.
        let drift = a.check_all_hosts(&[], None, opts).unwrap();
        assert!(matches!(&drift[..], [Drift::StuckElsewhere { row }] if row.id == id), "{drift:?}");
        assert!(matches!(&repair(&drift, None)[..], [RepairAction::Manual { message }] if message.contains("on host host-b")));
        assert_eq!(a.check(&[], None, opts).unwrap(), vec![]);
        let young = CheckOptions { now: row.updated_at, stale_after: Duration::from_secs(120) };
        assert!(matches!(&a.check_all_hosts(&[], None, young).unwrap()[..], [Drift::InProgress { .. }]));
        // The manager of host-a does not call host-b's vTPM unregistered.
        assert_eq!(a.check(&[], Some(&[pair(1).vtpm_uuid]), opts).unwrap(), vec![]);
        // A repair on host-b (both domains found running) keeps the activation consistent.
        b.mark_running(id, 5, 6).unwrap();
        b.mark_stopped(id).unwrap();
        b.mark_running(id, 5, 6).unwrap();
        let row = a.get(id).unwrap().unwrap();
        assert_eq!(row.active_on.as_deref(), Some("host-b"));
    }

    fn the_database_enforces_activation_records(f: &Fixture) {
        let mut a = f.open("host-a");
        let id = a.begin_create(&pair(1)).unwrap();
        let stopped = a.begin_create(&pair(2)).unwrap();
        a.mark_stopped(stopped).unwrap();
        let v1 = pair(1).vtpm_uuid;
        let v2 = pair(2).vtpm_uuid;
        for (sql, why) in [
            (format!("INSERT INTO activations (vtpm_uuid, host, since) VALUES ('{v1}', 'host-b', 0)"), "second activation"),
            (format!("INSERT INTO activations (vtpm_uuid, host, since) VALUES ('{v2}', 'host-b', 0)"), "activation on a host that is not the pair's"),
            (format!("INSERT INTO activations (vtpm_uuid, host, since) VALUES ('{}', 'host-a', 0)", Uuid::from_u128(7)), "activation of an unregistered vTPM"),
            (format!("UPDATE pairs SET host = 'host-b' WHERE id = {id}"), "moving an active pair"),
            (format!("UPDATE activations SET host = 'host-b' WHERE vtpm_uuid = '{v1}'"), "handing an activation to another host"),
            (format!("DELETE FROM pairs WHERE id = {id}"), "deleting an active pair"),
        ] {
            assert!(a.execute_raw(&sql).is_err(), "the database accepted {why}: {sql}");
        }
        let row = a.get(id).unwrap().unwrap();
        assert_eq!((row.host.as_str(), row.active_on.as_deref()), ("host-a", Some("host-a")));
        // An edit that the constraints cannot see (an active pair without its record) is
        // reported by check.
        a.execute_raw(&format!("DELETE FROM activations WHERE vtpm_uuid = '{v1}'")).unwrap();
        let opts = CheckOptions { now: i64::MAX / 2, stale_after: Duration::ZERO };
        let drift = a.check(&[], None, opts).unwrap();
        assert!(drift.iter().any(|d| matches!(d, Drift::ActivationMismatch { row } if row.id == id)), "{drift:?}");
    }

    fn a_newer_schema_is_refused(f: &Fixture) {
        let r = f.open("host-a");
        let sql = if r.is_postgres() {
            "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)"
        } else {
            "INSERT INTO schema_version (version) VALUES (99)"
        };
        r.execute_raw(sql).unwrap();
        drop(r);
        let e = Registry::connect(&f.location, "host-a").unwrap_err();
        assert!(matches!(e, RegistryError::TooNew { found: 99, supported: SCHEMA_VERSION }), "{e}");
        assert!(e.to_string().contains("use the newer xl-vtpm"), "{e}");
    }

    fn migrations_are_applied_once(f: &Fixture) {
        // Several hosts open a fresh database at once: the schema is made exactly once.
        std::thread::scope(|s| {
            for i in 0..4 {
                s.spawn(move || f.open(&format!("host-{i}")));
            }
        });
        let r = f.open("host-a");
        assert_eq!(r.schema_version().unwrap(), SCHEMA_VERSION);
        let table = if r.is_postgres() { "schema_migrations" } else { "schema_version" };
        let n = r.read(|db| scalar(db, &format!("SELECT count(*) FROM {table}"), &[])).unwrap();
        assert_eq!(n, Some(MIGRATIONS.len() as i64));
    }

    #[test]
    fn the_registry_files_are_root_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = testkit::tempdir();
        let path = dir.path().join("registry.sqlite");
        let mut reg = Registry::open(&path).unwrap();
        reg.begin_create(&pair(1)).unwrap();
        for name in ["registry.sqlite", "registry.sqlite-wal", "registry.sqlite-shm"] {
            let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
        }
    }

    /// A file written by the first release (schema 1, no hosts) opens, migrates in place and
    /// keeps its pairs; an older xl-vtpm then refuses it instead of misreading it.
    #[test]
    fn a_version_1_sqlite_file_migrates() {
        let dir = testkit::tempdir();
        let path = dir.path().join("registry.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").unwrap();
            c.execute_batch(SQLITE_V1).unwrap();
            c.execute_batch("INSERT INTO schema_version (version) VALUES (1)").unwrap();
            for (n, state, ran) in [(1u8, "running", 1), (2, "stopped", 1), (3, "creating", 0)] {
                let p = pair(n);
                c.execute(
                    "INSERT INTO pairs (guest_uuid, guest_name, vtpm_uuid, vtpm_domain, grp, guest_domid, vtpm_domid, state, created_at, updated_at, ran_before) \
                     VALUES (?1, ?2, ?3, ?4, 'default', ?5, ?6, ?7, 100, 200, ?8)",
                    rusqlite::params![p.guest_uuid.to_string(), p.guest_name, p.vtpm_uuid.to_string(), p.vtpm_domain,
                        (state == "running").then_some(10), (state == "running").then_some(11), state, ran],
                )
                .unwrap();
            }
        }
        let mut r = Registry::connect(&Location::parse(&format!("sqlite:{}", path.display())).unwrap(), "old-host").unwrap();
        assert_eq!(r.schema_version().unwrap(), SCHEMA_VERSION);
        let rows = r.list().unwrap();
        assert_eq!(rows.len(), 3);
        for row in &rows {
            assert_eq!(row.host, "old-host");
            assert_eq!(row.active_on.is_some(), row.state != State::Stopped, "{row:?}");
        }
        assert_eq!(rows[0].guest_domid, Some(10));
        assert!(rows[0].ran_before && !rows[2].ran_before);
        r.integrity_check().unwrap();
        let opts = CheckOptions { now: 200, stale_after: DEFAULT_STALE_AFTER };
        let obs = [
            ObservedDomain { name: "guest1".into(), uuid: pair(1).guest_uuid, domid: 10 },
            ObservedDomain { name: "vtpm-guest1".into(), uuid: Uuid::from_u128(5), domid: 11 },
        ];
        let drift = r.check(&obs, None, opts).unwrap();
        assert!(matches!(&drift[..], [Drift::InProgress { row }] if row.guest_name == "guest3"), "{drift:?}");
        // The pairs work as before.
        let id = rows[0].id;
        r.begin_destroy(id).unwrap();
        r.mark_stopped(id).unwrap();
        r.begin_create(&pair(1)).unwrap();
        drop(r);
        // What the first release reads: version 2 > 1, so it refuses the file.
        let c = Connection::open(&path).unwrap();
        let v: i64 = c.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, 2);
    }

    #[test]
    fn locations_are_parsed_before_anything_is_opened() {
        let sq = |s: &str| match Location::parse(s).unwrap() {
            Location::Sqlite(p) => p,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(sq("/var/lib/xvtpm/registry.sqlite"), PathBuf::from("/var/lib/xvtpm/registry.sqlite"));
        assert_eq!(sq("sqlite:/x/r.db"), PathBuf::from("/x/r.db"));
        assert_eq!(sq("relative.sqlite"), PathBuf::from("relative.sqlite"));
        for pg in [
            "postgres://xvtpm@db.example/xvtpm",
            "postgresql://xvtpm:secret@db.example:5433/xvtpm?sslmode=disable",
            "postgres://postgres@%2Frun%2Fpostgresql/xvtpm",
            "host=/run/postgresql dbname=xvtpm user=xvtpm",
            "dbname=xvtpm",
        ] {
            assert!(matches!(Location::parse(pg), Ok(Location::Postgres(_))), "{pg}");
        }
        for bad in ["", "postgres:/x", "postgres://host", "mysql://h/db", "sqlite:", "host=/x"] {
            let e = Location::parse(bad).unwrap_err();
            assert!(matches!(e, RegistryError::BadLocation { .. }), "{bad}: {e}");
        }
        // Passwords never reach a message.
        let e = Location::parse("postgres://u:hunter2@h").unwrap_err().to_string();
        assert!(!e.contains("hunter2") && e.contains("u:***@"), "{e}");
        let d = Location::parse("host=/run/postgresql dbname=x user=u password=hunter2").unwrap().describe();
        assert!(!d.contains("hunter2") && d.contains("/run/postgresql"), "{d}");
        // Host names.
        assert!(check_host("dom0-rack3.example").is_ok());
        for bad in ["", "a b", "a/b", "x\n"] {
            assert!(matches!(check_host(bad), Err(RegistryError::BadHost(_))), "{bad:?}");
        }
        assert!(check_host(&this_host()).is_ok());
    }

    /// The key-value form with a Unix-socket directory reaches the same database.
    #[test]
    fn postgres_key_value_unix_socket() {
        let pg = testkit::pg::PgCluster::start();
        pg.create_db("xvtpm");
        let mut a = Registry::connect(&Location::parse(&pg.conninfo("xvtpm")).unwrap(), "host-a").unwrap();
        a.begin_create(&pair(1)).unwrap();
        let b = Registry::connect(&Location::parse(&pg.url("xvtpm")).unwrap(), "host-b").unwrap();
        assert_eq!(b.get_by_name("guest1").unwrap().unwrap().host, "host-a");
        // A wrong database is named with the cause, not a hang or a panic.
        let e = Registry::connect(&Location::parse(&pg.url("nope")).unwrap(), "host-a").unwrap_err();
        assert!(matches!(e, RegistryError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("does not exist") && e.to_string().contains("database nope"), "{e}");
    }
}
