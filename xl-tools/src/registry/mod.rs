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

//! Layout: this file holds [`Registry`] (opening either backend, migrating, the transactions
//! and every operation on pairs); `schema` has the migrations, `model` the row, state and
//! error types, `tenants` the attestation service's tenants, `location` parses `--registry`, `sql` puts both databases behind one
//! statement interface, and `reconcile` holds [`check`] and [`repair`].

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior};
use uuid::Uuid;

mod location;
mod model;
mod reconcile;
mod schema;
mod sql;
mod tenants;
#[cfg(test)]
mod tests;

pub use location::{Location, check_host, this_host};
pub use model::{Move, NewPair, RegistryError, Row, State};
pub use reconcile::{CheckOptions, DEFAULT_STALE_AFTER, Drift, ObservedDomain, RepairAction, check, repair};
pub use schema::SCHEMA_VERSION;
pub use tenants::{Tenant, check_tenant_name};

use schema::MIGRATIONS;
use location::redact;
use sql::{Lite, Pg, Sql, Val};

/// How often a PostgreSQL transaction is retried after a serialization failure, deadlock or a
/// unique-key conflict with a concurrent writer before the error is reported.
pub const PG_MAX_ATTEMPTS: u32 = 40;

/// How long a PostgreSQL statement waits for a row lock held by another writer.
const PG_LOCK_TIMEOUT: &str = "10s";

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

const MOVE_COLUMNS: &str = "m.vtpm_uuid, p.guest_name, m.from_host, m.to_host, m.offer_id, m.since";
const MOVE_FROM: &str = "moves m JOIN pairs p ON p.vtpm_uuid = m.vtpm_uuid";

fn move_from_vals(v: Vec<Val>) -> Result<Move, RegistryError> {
    let corrupt = |what: String| RegistryError::Corrupt { id: 0, what: format!("move record: {what}") };
    let text = |i: usize| match v.get(i) {
        Some(Val::Text(s)) => Ok(s.clone()),
        other => Err(corrupt(format!("column {i} is {other:?}"))),
    };
    let uuid = |i: usize| text(i).and_then(|s| Uuid::parse_str(&s).map_err(|_| corrupt(format!("`{s}` is not a UUID"))));
    Ok(Move {
        vtpm_uuid: uuid(0)?,
        guest_name: text(1)?,
        from_host: text(2)?,
        to_host: text(3)?,
        offer_id: uuid(4)?,
        since: match v.get(5) {
            Some(Val::Int(i)) => *i,
            other => return Err(corrupt(format!("since is {other:?}"))),
        },
    })
}

fn open_move(db: &mut dyn Sql, vtpm: Uuid) -> Result<Option<Move>, RegistryError> {
    let sql = format!("SELECT {MOVE_COLUMNS} FROM {MOVE_FROM} WHERE m.vtpm_uuid = $1");
    db.rows(&sql, &[vtpm.into()])?.into_iter().next().map(move_from_vals).transpose()
}

fn moving(m: Move) -> RegistryError {
    RegistryError::Moving { vtpm: m.vtpm_uuid, guest_name: m.guest_name, from: m.from_host, to: m.to_host, offer: m.offer_id }
}

/// Records `host`'s activation of `row`'s vTPM, or names the host that holds it (or the move
/// in progress that keeps it from starting anywhere).
fn activate(db: &mut dyn Sql, row: &Row, host: &str, now: i64) -> Result<(), RegistryError> {
    if let Some(m) = open_move(db, row.vtpm_uuid)? {
        return Err(moving(m));
    }
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
            let mode = switch_to_wal(&conn)?;
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
            if let Some(m) = open_move(tx, new.vtpm_uuid)? {
                return Err(moving(m));
            }
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
                    if let Some(m) = open_move(tx, row.vtpm_uuid)? {
                        return Err(moving(m));
                    }
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
        drift.extend(self.moves()?.into_iter().map(|m| Drift::MoveUnfinished { m }));
        Ok(drift)
    }

    /// Begins moving `vtpm` from this host to `to_host` (transfer offer `offer`), before the
    /// source marks it exporting: from now on it is started nowhere (activations are refused)
    /// until [`Self::finish_move`] or [`Self::abort_move`]. `Ok(None)`: the vTPM has no pair in
    /// the registry (nothing to record). Refused while the pair is active anywhere, registered
    /// on another host, or already moving under another offer; the same move again is a no-op.
    pub fn begin_move(&mut self, vtpm: Uuid, to_host: &str, offer: Uuid) -> Result<Option<i64>, RegistryError> {
        check_host(to_host).map_err(|e| RegistryError::BadHost(e.to_string()))?;
        self.write(|tx, host| {
            let Some(row) = query_one(tx, "p.vtpm_uuid = $1", &[vtpm.into()])? else { return Ok(None) };
            if let Some(m) = open_move(tx, vtpm)? {
                if m.offer_id == offer && m.to_host == to_host && m.from_host == host {
                    return Ok(Some(row.id));
                }
                return Err(moving(m));
            }
            if let Some(h) = &row.active_on {
                return Err(RegistryError::ActiveOnOtherHost { vtpm, guest_name: row.guest_name, holder: h.clone(), state: row.state });
            }
            if row.host != host {
                return Err(RegistryError::NotOnThisHost { vtpm, guest_name: row.guest_name, host: row.host, this: host.to_string() });
            }
            if row.host == to_host {
                return Err(RegistryError::BadHost(format!("the destination host {to_host} is the pair's host already")));
            }
            tx.exec(
                "INSERT INTO moves (vtpm_uuid, from_host, to_host, offer_id, since) VALUES ($1, $2, $3, $4, $5)",
                &[vtpm.into(), host.into(), to_host.into(), offer.into(), unix_now().into()],
            )?;
            Ok(Some(row.id))
        })
    }

    /// The commit point of a move, once the source has retired its copy: in one transaction
    /// the move record goes and the pair's host becomes the destination. `Ok(None)`: no move of
    /// `vtpm` is open (finished already, or never recorded); otherwise the destination host.
    /// Refused if the open move is for another offer.
    pub fn finish_move(&mut self, vtpm: Uuid, offer: Uuid) -> Result<Option<String>, RegistryError> {
        self.write(|tx, _| {
            let Some(m) = open_move(tx, vtpm)? else { return Ok(None) };
            if m.offer_id != offer {
                return Err(moving(m));
            }
            tx.exec("DELETE FROM moves WHERE vtpm_uuid = $1", &[vtpm.into()])?;
            let n = tx.exec("UPDATE pairs SET host = $2, updated_at = $3 WHERE vtpm_uuid = $1", &[vtpm.into(), (&m.to_host).into(), unix_now().into()])?;
            if n != 1 {
                return Err(RegistryError::Corrupt { id: 0, what: format!("the pair of moving vTPM {vtpm} is gone") });
            }
            Ok(Some(m.to_host))
        })
    }

    /// Ends a move without it (the source aborted: the vTPM stays on the source host).
    /// `offer`: only the move of that offer. Returns whether a move was open.
    pub fn abort_move(&mut self, vtpm: Uuid, offer: Option<Uuid>) -> Result<bool, RegistryError> {
        self.write(|tx, _| {
            let Some(m) = open_move(tx, vtpm)? else { return Ok(false) };
            if offer.is_some_and(|o| o != m.offer_id) {
                return Err(moving(m));
            }
            Ok(tx.exec("DELETE FROM moves WHERE vtpm_uuid = $1", &[vtpm.into()])? == 1)
        })
    }

    /// The moves in progress.
    pub fn moves(&self) -> Result<Vec<Move>, RegistryError> {
        self.read(|db| {
            let sql = format!("SELECT {MOVE_COLUMNS} FROM {MOVE_FROM} ORDER BY m.vtpm_uuid");
            db.rows(&sql, &[])?.into_iter().map(move_from_vals).collect()
        })
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
/// `PRAGMA journal_mode=WAL`, retried while another connection holds the file: two processes
/// switching a fresh file at once each hold a shared lock and want an exclusive one, and SQLite
/// answers that deadlock with an immediate `SQLITE_BUSY` instead of calling the busy handler.
/// Retried for as long as the busy timeout would have waited.
fn switch_to_wal(conn: &Connection) -> Result<String, RegistryError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(2);
    loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

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
