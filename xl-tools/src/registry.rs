//! The registry: which guest owns which vTPM, and what state the pair is in.
//!
//! One row per guest ⇄ vTPM pair: guest UUID and name, vTPM UUID, the name of the vTPM
//! domain, both domids while running, the manager group, creation time and a state
//! (`creating → running → destroying → stopped`, and `stopped → creating` on the next start).
//! It lives in an embedded SQLite file (default `/var/lib/xvtpm/registry.sqlite`) in WAL mode
//! with `synchronous=FULL`, so a committed change survives a power cut and readers
//! (`xl-vtpm list`, the `@releaseDomain` watcher) never block the writer. Every change is
//! one `BEGIN IMMEDIATE` transaction, so concurrent `xl-vtpm` processes serialise instead of
//! interleaving, and a process killed at any instant leaves the file either before or after
//! the change — never half-way.
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

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

/// Schema version this code writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// Default [`CheckOptions::stale_after`]: longer than any create (the vTPM backend's 10 s,
/// guest creation and the manager's provisioning of a new vTPM).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(120);

const SCHEMA_V1: &str = r#"
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
    /// No such row.
    #[error("no registry entry with id {0}")]
    NotFound(i64),
    /// The file was written by a newer xl-vtpm.
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

/// The registry database.
#[derive(Debug)]
pub struct Registry {
    conn: Connection,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const COLUMNS: &str = "id, guest_uuid, guest_name, vtpm_uuid, vtpm_domain, grp, guest_domid, \
                       vtpm_domid, state, created_at, updated_at, ran_before";

fn row_from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Row, RegistryError>> {
    let id: i64 = r.get(0)?;
    let uuid = |i: usize, what: &str| -> rusqlite::Result<Result<Uuid, RegistryError>> {
        let s: String = r.get(i)?;
        Ok(Uuid::parse_str(&s).map_err(|_| RegistryError::Corrupt {
            id,
            what: format!("{what} `{s}` is not a UUID"),
        }))
    };
    let guest_uuid = match uuid(1, "guest_uuid")? {
        Ok(u) => u,
        Err(e) => return Ok(Err(e)),
    };
    let vtpm_uuid = match uuid(3, "vtpm_uuid")? {
        Ok(u) => u,
        Err(e) => return Ok(Err(e)),
    };
    let state_s: String = r.get(8)?;
    let Some(state) = State::parse(&state_s) else {
        return Ok(Err(RegistryError::Corrupt {
            id,
            what: format!("state `{state_s}`"),
        }));
    };
    Ok(Ok(Row {
        id,
        guest_uuid,
        guest_name: r.get(2)?,
        vtpm_uuid,
        vtpm_domain: r.get(4)?,
        group: r.get(5)?,
        guest_domid: r.get(6)?,
        vtpm_domid: r.get(7)?,
        state,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        ran_before: r.get(11)?,
    }))
}

fn query_one(
    conn: &Connection,
    cond: &str,
    p: impl rusqlite::Params,
) -> Result<Option<Row>, RegistryError> {
    let sql = format!("SELECT {COLUMNS} FROM pairs WHERE {cond}");
    conn.query_row(&sql, p, row_from_sql)
        .optional()?
        .transpose()
}

impl Registry {
    /// Opens (creating if needed) the registry at `path`: WAL, `synchronous=FULL`, a 10 s
    /// busy timeout, and the schema migrated to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        // Root-only: SQLite creates the file with the umask's mode (0644) and gives its WAL and
        // shared-memory files the database file's mode, so the file is made (or narrowed) first.
        {
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            let io = |source| RegistryError::Io { path: path.into(), source };
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        let conn = Connection::open(path)?;
        Registry::init(conn, true)
    }

    /// An in-memory registry (tests, dry runs).
    pub fn open_in_memory() -> Result<Registry, RegistryError> {
        Registry::init(Connection::open_in_memory()?, false)
    }

    fn init(conn: Connection, wal: bool) -> Result<Registry, RegistryError> {
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
        let mut reg = Registry { conn };
        reg.migrate()?;
        Ok(reg)
    }

    fn migrate(&mut self) -> Result<(), RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let v: Option<i64> =
            tx.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?;
        match v {
            None => {
                tx.execute_batch(SCHEMA_V1)?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(RegistryError::TooNew {
                    found: v,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(_) => {}
        }
        tx.commit()?;
        Ok(())
    }

    /// The schema version in the file.
    pub fn schema_version(&self) -> Result<i64, RegistryError> {
        Ok(self
            .conn
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?)
    }

    /// Runs SQLite's `integrity_check`; `Ok(())` if the file is sound.
    pub fn integrity_check(&self) -> Result<(), RegistryError> {
        let res: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if res == "ok" {
            Ok(())
        } else {
            Err(RegistryError::Corrupt {
                id: 0,
                what: format!("integrity_check: {res}"),
            })
        }
    }

    /// Starts a create: records the pair as `creating` and returns its row id.
    ///
    /// A new guest gets a new row. A guest that has a `stopped` pair restarts it (its name is
    /// updated if the guest was renamed). Refused: a vTPM bound to another guest
    /// ([`RegistryError::VtpmBoundToOtherGuest`]), a guest bound to another vTPM, a pair that is
    /// not stopped, a name or vTPM domain name used by another pair.
    pub fn begin_create(&mut self, new: &NewPair) -> Result<i64, RegistryError> {
        let now = unix_now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(other) = query_one(&tx, "vtpm_uuid = ?1", [new.vtpm_uuid.to_string()])?
            && other.guest_uuid != new.guest_uuid
        {
            return Err(RegistryError::VtpmBoundToOtherGuest {
                vtpm: new.vtpm_uuid,
                guest: other.guest_uuid,
                guest_name: other.guest_name,
            });
        }
        if let Some(other) = query_one(
            &tx,
            "guest_name = ?1 AND guest_uuid <> ?2",
            params![new.guest_name, new.guest_uuid.to_string()],
        )? {
            return Err(RegistryError::GuestNameInUse {
                name: new.guest_name.clone(),
                other: other.guest_uuid,
            });
        }
        if let Some(other) = query_one(
            &tx,
            "vtpm_domain = ?1 AND guest_uuid <> ?2",
            params![new.vtpm_domain, new.guest_uuid.to_string()],
        )? {
            return Err(RegistryError::VtpmDomainInUse {
                name: new.vtpm_domain.clone(),
                guest_name: other.guest_name,
            });
        }
        let id = match query_one(&tx, "guest_uuid = ?1", [new.guest_uuid.to_string()])? {
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
                    return Err(RegistryError::InvalidTransition {
                        id: row.id,
                        guest_name: row.guest_name,
                        from: row.state,
                        to: "creating",
                        hint: "it is not stopped; `xl-vtpm list` shows it, `xl-vtpm registry check` repairs an interrupted operation",
                    });
                }
                tx.execute(
                    "UPDATE pairs SET state = 'creating', guest_name = ?2, vtpm_domain = ?3, grp = ?4, \
                     guest_domid = NULL, vtpm_domid = NULL, updated_at = ?5 WHERE id = ?1",
                    params![row.id, new.guest_name, new.vtpm_domain, new.group, now],
                )?;
                row.id
            }
            None => {
                tx.execute(
                    "INSERT INTO pairs (guest_uuid, guest_name, vtpm_uuid, vtpm_domain, grp, state, created_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 'creating', ?6, ?6)",
                    params![
                        new.guest_uuid.to_string(),
                        new.guest_name,
                        new.vtpm_uuid.to_string(),
                        new.vtpm_domain,
                        new.group,
                        now
                    ],
                )?;
                tx.last_insert_rowid()
            }
        };
        tx.commit()?;
        Ok(id)
    }

    /// Refuses unless `vtpm` may serve `guest`: it is unregistered, or registered to `guest`.
    /// Call before any attach (`xl vtpm-attach`, libvirt hook) that bypasses [`Self::begin_create`].
    pub fn check_attach(&self, vtpm: Uuid, guest: Uuid) -> Result<(), RegistryError> {
        match query_one(&self.conn, "vtpm_uuid = ?1", [vtpm.to_string()])? {
            Some(row) if row.guest_uuid != guest => Err(RegistryError::VtpmBoundToOtherGuest {
                vtpm,
                guest: row.guest_uuid,
                guest_name: row.guest_name,
            }),
            _ => Ok(()),
        }
    }

    fn transition(
        &mut self,
        id: i64,
        from: &[State],
        to: &'static str,
        hint: &'static str,
        sql: &str,
        p: &[&dyn rusqlite::ToSql],
    ) -> Result<(), RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = query_one(&tx, "id = ?1", [id])?.ok_or(RegistryError::NotFound(id))?;
        if !from.contains(&row.state) {
            return Err(RegistryError::InvalidTransition {
                id,
                guest_name: row.guest_name,
                from: row.state,
                to,
                hint,
            });
        }
        tx.execute(sql, p)?;
        tx.commit()?;
        Ok(())
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
            "UPDATE pairs SET guest_domid = ?2, vtpm_domid = ?3, updated_at = ?4 WHERE id = ?1",
            &[&id, &guest_domid, &vtpm_domid, &unix_now()],
        )
    }

    /// Finishes a create: both domains run with these domids. Also used by repairs (from
    /// `stopped` when both were found running, from `running` to fix domids).
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
            "UPDATE pairs SET state = 'running', guest_domid = ?2, vtpm_domid = ?3, updated_at = ?4, \
             ran_before = 1 WHERE id = ?1",
            &[&id, &guest_domid, &vtpm_domid, &unix_now()],
        )
    }

    /// Starts a destroy/shutdown.
    pub fn begin_destroy(&mut self, id: i64) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Running, State::Creating, State::Destroying],
            "destroying",
            "it is already stopped",
            "UPDATE pairs SET state = 'destroying', updated_at = ?2 WHERE id = ?1",
            &[&id, &unix_now()],
        )
    }

    /// Records that neither domain runs; the binding stays for the next start.
    pub fn mark_stopped(&mut self, id: i64) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Creating, State::Running, State::Stopped, State::Destroying],
            "stopped",
            "",
            "UPDATE pairs SET state = 'stopped', guest_domid = NULL, vtpm_domid = NULL, updated_at = ?2 WHERE id = ?1",
            &[&id, &unix_now()],
        )
    }

    /// Deletes a stopped pair (when its vTPM is deleted in the manager, or by a repair).
    pub fn remove(&mut self, id: i64) -> Result<(), RegistryError> {
        self.transition(
            id,
            &[State::Stopped],
            "removed",
            "stop it first (`xl-vtpm destroy`)",
            "DELETE FROM pairs WHERE id = ?1",
            &[&id],
        )
    }

    /// The pair with this row id.
    pub fn get(&self, id: i64) -> Result<Option<Row>, RegistryError> {
        query_one(&self.conn, "id = ?1", [id])
    }

    /// The pair of this guest.
    pub fn get_by_guest(&self, guest_uuid: Uuid) -> Result<Option<Row>, RegistryError> {
        query_one(&self.conn, "guest_uuid = ?1", [guest_uuid.to_string()])
    }

    /// The pair of this vTPM.
    pub fn get_by_vtpm(&self, vtpm_uuid: Uuid) -> Result<Option<Row>, RegistryError> {
        query_one(&self.conn, "vtpm_uuid = ?1", [vtpm_uuid.to_string()])
    }

    /// The pair whose guest has this name.
    pub fn get_by_name(&self, guest_name: &str) -> Result<Option<Row>, RegistryError> {
        query_one(&self.conn, "guest_name = ?1", [guest_name])
    }

    /// All pairs, ordered by guest name.
    pub fn list(&self) -> Result<Vec<Row>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM pairs ORDER BY guest_name"))?;
        let rows = stmt.query_map([], row_from_sql)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// [`check`] against the current rows.
    pub fn check(
        &self,
        observed: &[ObservedDomain],
        manager_vtpms: Option<&[Uuid]>,
        opts: CheckOptions,
    ) -> Result<Vec<Drift>, RegistryError> {
        Ok(check(&self.list()?, observed, manager_vtpms, opts))
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
            RepairAction::DeleteRow { id } => {
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute("DELETE FROM pairs WHERE id = ?1", [id])?;
                tx.commit()?;
            }
            RepairAction::DestroyDomain { .. }
            | RepairAction::RestartVtpm { .. }
            | RepairAction::Manual { .. } => return Ok(false),
        }
        Ok(true)
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

    #[test]
    fn the_registry_files_are_root_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("xvtpm-registry-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.sqlite");
        let mut reg = Registry::open(&path).unwrap();
        reg.begin_create(&pair(1)).unwrap();
        for name in ["registry.sqlite", "registry.sqlite-wal", "registry.sqlite-shm"] {
            let mode = std::fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
        }
        drop(reg);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn pair(n: u8) -> NewPair {
        NewPair {
            guest_uuid: Uuid::from_u128(0x1000 + n as u128),
            guest_name: format!("guest{n}"),
            vtpm_uuid: Uuid::from_u128(0x2000 + n as u128),
            vtpm_domain: format!("vtpm-guest{n}"),
            group: Some("default".into()),
        }
    }

    #[test]
    fn lifecycle_and_binding() {
        let mut r = Registry::open_in_memory().unwrap();
        assert_eq!(r.schema_version().unwrap(), SCHEMA_VERSION);
        let id = r.begin_create(&pair(1)).unwrap();
        r.set_domids(id, None, Some(7)).unwrap();
        r.mark_running(id, 8, 7).unwrap();
        let row = r.get_by_name("guest1").unwrap().unwrap();
        assert_eq!(
            (row.state, row.guest_domid, row.vtpm_domid, row.ran_before),
            (State::Running, Some(8), Some(7), true)
        );
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
        assert!(
            e.to_string()
                .contains("never attached to a different guest"),
            "{e}"
        );
        assert!(
            r.check_attach(pair(1).vtpm_uuid, pair(2).guest_uuid)
                .is_err()
        );
        assert!(
            r.check_attach(pair(1).vtpm_uuid, pair(1).guest_uuid)
                .is_ok()
        );
        // Guest asking for another vTPM.
        let mut swap = pair(1);
        swap.vtpm_uuid = Uuid::from_u128(99);
        r.begin_destroy(id).unwrap();
        r.mark_stopped(id).unwrap();
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
    }

    #[test]
    fn trigger_forbids_rebinding_even_in_raw_sql() {
        let mut r = Registry::open_in_memory().unwrap();
        let id = r.begin_create(&pair(1)).unwrap();
        let e = r
            .conn
            .execute("UPDATE pairs SET guest_uuid = 'x' WHERE id = ?1", [id])
            .unwrap_err();
        assert!(e.to_string().contains("stays bound"), "{e}");
        r.begin_create(&pair(2)).unwrap();
        let e = r
            .conn
            .execute("UPDATE pairs SET vtpm_uuid = (SELECT vtpm_uuid FROM pairs WHERE guest_name='guest2') WHERE id = ?1", [id])
            .unwrap_err();
        assert!(e.to_string().contains("stays bound"), "{e}");
    }

    #[test]
    fn names_are_unique() {
        let mut r = Registry::open_in_memory().unwrap();
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

    #[test]
    fn transitions_are_guarded() {
        let mut r = Registry::open_in_memory().unwrap();
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
}
