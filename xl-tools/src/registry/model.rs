//! What the registry stores and answers: a pair's [`State`], its [`Row`], a [`NewPair`] to
//! create, and [`RegistryError`], whose variants name the cause and the fix.

use uuid::Uuid;

use super::sql::pg_message;


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

    pub(super) fn parse(s: &str) -> Option<State> {
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

/// What [`Registry::begin_create`](super::Registry::begin_create) records.
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

impl RegistryError {
    /// Whether a PostgreSQL transaction that failed so may succeed when run again: a
    /// serialization failure or deadlock (SERIALIZABLE lets only one of two conflicting
    /// writers commit), a unique key taken by a concurrent insert, or a row changed under us.
    /// The retry re-reads and then gives the precise answer (e.g. who holds the vTPM).
    pub(super) fn retryable(&self) -> bool {
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
