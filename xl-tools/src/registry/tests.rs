//! The registry's tests, each run against SQLite and, where marked, a real PostgreSQL server
//! (testkit).

use std::path::PathBuf;

use super::schema::SQLITE_V1;
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
    a_move_flips_the_host_at_its_commit_and_blocks_starts_until_then,
    tenants_own_disjoint_vtpms,
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
    if matches!(f.location, Location::Sqlite(_)) {
        // Fresh SQLite files opened by 8 connections at once, many times: every open succeeds
        // (switching a fresh file to WAL used to fail at once with "database is locked").
        for round in 0..30 {
            let dir = testkit::tempdir();
            let loc = Location::parse(dir.path().join("fresh.sqlite").to_str().unwrap()).unwrap();
            std::thread::scope(|s| {
                for i in 0..8 {
                    let loc = &loc;
                    s.spawn(move || {
                        Registry::connect(loc, &format!("host-{i}"))
                            .unwrap_or_else(|e| panic!("round {round}, opener {i}: {e}"))
                    });
                }
            });
        }
    }
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
    // What the first release reads: the current version > 1, so it refuses the file.
    let c = Connection::open(&path).unwrap();
    let v: i64 = c.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    // The tenants table came with the migration.
    let r = Registry::open(&path).unwrap();
    assert_eq!(r.tenants().unwrap(), vec![]);
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

/// A move: begun on the source (the pair stopped there), it blocks every host's start; its
/// commit flips the pair's host in one transaction (the destination can then start it, the
/// source cannot); an abort keeps it on the source. `check_all_hosts` reports an open move.
fn a_move_flips_the_host_at_its_commit_and_blocks_starts_until_then(f: &Fixture) {
    let mut a = f.open("host-a");
    let mut b = f.open("host-b");
    let p = pair(7);
    let id = a.begin_create(&p).unwrap();
    a.mark_running(id, 3, 4).unwrap();
    // A running pair is not moved.
    let offer = Uuid::from_u128(0xaa);
    assert!(matches!(a.begin_move(p.vtpm_uuid, "host-b", offer), Err(RegistryError::ActiveOnOtherHost { .. })));
    a.mark_stopped(id).unwrap();
    // Only from the pair's host; a vTPM without a pair records nothing.
    assert!(matches!(b.begin_move(p.vtpm_uuid, "host-c", offer), Err(RegistryError::NotOnThisHost { .. })));
    assert_eq!(a.begin_move(Uuid::from_u128(0xdead), "host-b", offer).unwrap(), None);
    assert_eq!(a.begin_move(p.vtpm_uuid, "host-b", offer).unwrap(), Some(id));
    assert_eq!(a.begin_move(p.vtpm_uuid, "host-b", offer).unwrap(), Some(id), "the same move again is a no-op");
    assert!(matches!(a.begin_move(p.vtpm_uuid, "host-c", Uuid::from_u128(0xbb)), Err(RegistryError::Moving { .. })));
    // While it moves, no host starts it.
    for r in [&mut a, &mut b] {
        let e = r.begin_create(&p).unwrap_err();
        assert!(matches!(e, RegistryError::Moving { .. }), "{e}");
        assert!(e.to_string().contains("from host host-a to host host-b"), "{e}");
    }
    let drift = b.check_all_hosts(&[], None, CheckOptions::default()).unwrap();
    assert!(drift.iter().any(|d| matches!(d, Drift::MoveUnfinished { m } if m.to_host == "host-b" && m.offer_id == offer)), "{drift:?}");
    // The database itself keeps the pair on the source while the move is open.
    assert!(a.execute_raw(&format!("UPDATE pairs SET host = 'host-b' WHERE id = {id}")).is_err());
    // A commit of another offer is refused; the right one flips the host, once.
    assert!(matches!(a.finish_move(p.vtpm_uuid, Uuid::from_u128(0xbb)), Err(RegistryError::Moving { .. })));
    assert_eq!(a.finish_move(p.vtpm_uuid, offer).unwrap().as_deref(), Some("host-b"));
    assert_eq!(a.finish_move(p.vtpm_uuid, offer).unwrap(), None);
    assert_eq!(a.get(id).unwrap().unwrap().host, "host-b");
    assert!(b.moves().unwrap().is_empty());
    // B starts it; moving it back needs it stopped there, and an abort keeps it on B.
    b.begin_create(&p).unwrap();
    assert_eq!(b.get(id).unwrap().unwrap().active_on.as_deref(), Some("host-b"));
    b.mark_stopped(id).unwrap();
    let back = Uuid::from_u128(0xcc);
    b.begin_move(p.vtpm_uuid, "host-a", back).unwrap();
    assert!(b.abort_move(p.vtpm_uuid, Some(back)).unwrap());
    assert!(!b.abort_move(p.vtpm_uuid, Some(back)).unwrap());
    assert_eq!(b.get(id).unwrap().unwrap().host, "host-b");
    assert!(a.begin_create(&p).is_ok(), "a stopped pair starts on any host once no move is open");
}

fn tenants_own_disjoint_vtpms(f: &Fixture) {
    let mut r = f.open("host-a");
    let (ka, kb) = ("a".repeat(64), "b".repeat(64));
    r.tenant_add("acme", &ka).unwrap();
    r.tenant_add("globex", &kb).unwrap();
    assert!(matches!(r.tenant_add("acme", &"c".repeat(64)), Err(RegistryError::TenantExists { what: "this name", .. })));
    // One certificate key is one tenant: the service identifies tenants by it.
    assert!(matches!(r.tenant_add("other", &ka), Err(RegistryError::TenantExists { ref name, what: "this certificate key" }) if name == "acme"));
    assert!(matches!(r.tenant_add("bad name", &"c".repeat(64)), Err(RegistryError::BadTenantName(_))));
    assert!(r.tenant_add("upper", &"A".repeat(64)).is_err());
    let (v1, v2) = (Uuid::from_u128(1), Uuid::from_u128(2));
    r.tenant_bind("acme", v1).unwrap();
    r.tenant_bind("acme", v1).unwrap();
    r.tenant_bind("globex", v2).unwrap();
    assert!(matches!(r.tenant_bind("globex", v1), Err(RegistryError::VtpmBoundToOtherTenant { ref tenant, .. }) if tenant == "acme"));
    assert!(matches!(r.tenant_bind("nobody", v1), Err(RegistryError::NoSuchTenant(_))));
    // A second host sees the same tenants (one database).
    let b = f.open("host-b");
    assert_eq!(b.tenant_by_key(&ka).unwrap().unwrap().vtpms, vec![v1]);
    assert_eq!(b.tenant_by_key(&"d".repeat(64)).unwrap(), None);
    assert_eq!(b.tenant_of(v2).unwrap().as_deref(), Some("globex"));
    // The database itself refuses a second tenant for a vTPM.
    assert!(r.execute_raw(&format!("INSERT INTO tenant_vtpms (vtpm_uuid, tenant, bound_at) VALUES ('{v1}', 'globex', 0)")).is_err());
    assert_eq!(r.tenant_unbind(v1).unwrap().as_deref(), Some("acme"));
    r.tenant_bind("globex", v1).unwrap();
    assert_eq!(r.tenant_del("globex").unwrap(), vec![v1, v2]);
    assert_eq!(r.tenant_of(v1).unwrap(), None);
    assert!(matches!(r.tenant_del("globex"), Err(RegistryError::NoSuchTenant(_))));
    let all = r.tenants().unwrap();
    assert_eq!(all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["acme"]);
}
