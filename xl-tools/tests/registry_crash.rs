//! Registry crash safety: stop a create/destroy after every step, and SIGKILL a process that
//! is driving the registry at random instants (≥ 50 times). Every time the database must open
//! and be intact, `check` must report the half-done operation, `repair` must propose the right
//! actions, and after executing them nothing is left orphaned.
//!
//! Xen is simulated by a directory: one file per running domain (`<name>` holding
//! `<uuid> <domid>`), created and removed atomically like `xl create`/`xl destroy`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uuid::Uuid;
use xl_tools::registry::{
    CheckOptions, Drift, NewPair, ObservedDomain, Registry, RepairAction, State, check, repair,
};

const CHILD_ENV: &str = "XVTPM_REGISTRY_CRASH_CHILD_DIR";
const GUESTS: u128 = 4;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "xvtpm-registry-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(p.join("world")).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The simulated hypervisor.
struct World(PathBuf);

impl World {
    fn create(&self, name: &str, uuid: Uuid, domid: u32) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, format!("{uuid} {domid}")).unwrap();
        std::fs::rename(&tmp, self.0.join(name)).unwrap();
    }

    fn destroy(&self, name: &str) {
        match std::fs::remove_file(self.0.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{e}"),
        }
    }

    fn observe(&self) -> Vec<ObservedDomain> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.0).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if name.starts_with('.') {
                continue;
            }
            let text = std::fs::read_to_string(e.path()).unwrap();
            let (u, d) = text.split_once(' ').unwrap();
            out.push(ObservedDomain {
                name,
                uuid: Uuid::parse_str(u).unwrap(),
                domid: d.parse().unwrap(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn guest(i: u128) -> NewPair {
    NewPair {
        guest_uuid: Uuid::from_u128(0x6000_0000 + i),
        guest_name: format!("g{i}"),
        vtpm_uuid: Uuid::from_u128(0x7000_0000 + i),
        vtpm_domain: format!("vtpm-g{i}"),
        group: Some("default".into()),
    }
}

/// The Xen UUID of a vTPM domain (not tracked by the registry; any fixed value will do).
fn vtpm_dom_uuid(i: u128) -> Uuid {
    Uuid::from_u128(0x8000_0000 + i)
}

fn opts() -> CheckOptions {
    CheckOptions {
        now: i64::MAX / 2,
        stale_after: Duration::ZERO,
    }
}

/// Executes a repair against the simulated world; returns how many domains were destroyed.
fn execute(reg: &mut Registry, world: &World, actions: &[RepairAction]) -> usize {
    let mut destroyed = 0;
    for a in actions {
        match a {
            RepairAction::DestroyDomain { name, domid, .. } => {
                let live = world.observe();
                let d = live
                    .iter()
                    .find(|d| &d.name == name)
                    .unwrap_or_else(|| panic!("destroy of absent {name}"));
                assert_eq!(
                    d.domid, *domid,
                    "destroy of {name} must name its current domid"
                );
                world.destroy(name);
                destroyed += 1;
            }
            RepairAction::RestartVtpm { .. } | RepairAction::Manual { .. } => {
                panic!("a crash must not need {a}")
            }
            _ => assert!(reg.apply(a).unwrap(), "{a}"),
        }
    }
    destroyed
}

/// Nothing orphaned: every domain belongs to a pair in `running`, with the recorded domids,
/// and every other pair has no domain.
fn assert_consistent(reg: &Registry, world: &World) {
    let live = world.observe();
    let rows = reg.list().unwrap();
    for d in &live {
        let row = rows
            .iter()
            .find(|r| r.guest_uuid == d.uuid || r.vtpm_domain == d.name)
            .unwrap_or_else(|| panic!("domain {} belongs to no pair: orphaned", d.name));
        assert_eq!(
            row.state,
            State::Running,
            "domain {} runs but its pair is {}",
            d.name,
            row.state
        );
    }
    for r in &rows {
        let g = live.iter().find(|d| d.uuid == r.guest_uuid);
        let v = live.iter().find(|d| d.name == r.vtpm_domain);
        match r.state {
            State::Running => {
                assert_eq!(g.map(|d| d.domid), r.guest_domid, "{}", r.guest_name);
                assert_eq!(v.map(|d| d.domid), r.vtpm_domid, "{}", r.guest_name);
            }
            State::Stopped => assert!(
                g.is_none() && v.is_none(),
                "{} stopped but a domain runs",
                r.guest_name
            ),
            s => panic!("{} left in {s}", r.guest_name),
        }
    }
    assert_eq!(reg.check(&live, None, opts()).unwrap(), vec![]);
}

// ---------------------------------------------------------------------------------------------
// Stop after every step.

/// Runs the first `steps` steps of a create of guest `i`; returns the row id if one was made.
fn create_steps(
    reg: &mut Registry,
    world: &World,
    i: u128,
    steps: usize,
    domids: (u32, u32),
) -> Option<i64> {
    let p = guest(i);
    let (g, v) = domids;
    let mut id = None;
    for step in 1..=steps {
        match step {
            1 => id = Some(reg.begin_create(&p).unwrap()),
            2 => world.create(&p.vtpm_domain, vtpm_dom_uuid(i), v),
            3 => reg.set_domids(id.unwrap(), None, Some(v)).unwrap(),
            4 => world.create(&p.guest_name, p.guest_uuid, g),
            5 => reg.set_domids(id.unwrap(), Some(g), Some(v)).unwrap(),
            6 => reg.mark_running(id.unwrap(), g, v).unwrap(),
            _ => unreachable!(),
        }
    }
    id
}

fn destroy_steps(reg: &mut Registry, world: &World, i: u128, id: i64, steps: usize) {
    let p = guest(i);
    for step in 1..=steps {
        match step {
            1 => reg.begin_destroy(id).unwrap(),
            2 => world.destroy(&p.guest_name),
            3 => world.destroy(&p.vtpm_domain),
            4 => reg.mark_stopped(id).unwrap(),
            _ => unreachable!(),
        }
    }
}

fn names(actions: &[RepairAction]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            RepairAction::DestroyDomain { name, .. } => format!("destroy {name}"),
            RepairAction::MarkRunning { .. } => "running".into(),
            RepairAction::MarkStopped { .. } => "stopped".into(),
            RepairAction::DeleteRow { .. } => "delete".into(),
            RepairAction::RestartVtpm { vtpm_domain, .. } => format!("restart {vtpm_domain}"),
            RepairAction::Manual { .. } => "manual".into(),
        })
        .collect()
}

#[test]
fn create_interrupted_after_every_step() {
    let expected: [&[&str]; 7] = [
        &[],
        &["stopped"],
        &["destroy vtpm-g0", "stopped"],
        &["destroy vtpm-g0", "stopped"],
        &["running"],
        &["running"],
        &[],
    ];
    for (steps, want) in expected.iter().enumerate() {
        for manager in [None, Some(vec![]), Some(vec![guest(0).vtpm_uuid])] {
            let dir = TempDir::new("steps");
            let world = World(dir.0.join("world"));
            let db = dir.0.join("registry.sqlite");
            {
                let mut reg = Registry::open(&db).unwrap();
                create_steps(&mut reg, &world, 0, steps, (21, 20));
                // The process dies here: the connection is dropped mid-protocol.
            }
            let mut reg = Registry::open(&db).unwrap();
            reg.integrity_check().unwrap();
            let drift = reg
                .check(&world.observe(), manager.as_deref(), opts())
                .unwrap();
            let stuck = drift
                .iter()
                .filter(|d| matches!(d, Drift::StuckCreating { .. }))
                .count();
            assert_eq!(
                stuck,
                usize::from(!want.is_empty()),
                "step {steps}: {drift:?}"
            );
            let actions = repair(&drift, manager.as_deref());
            let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            // The manager proves a never-started vTPM never existed: forget the row.
            if manager.as_deref() == Some(&[]) && want.last().is_some_and(|w| w == "stopped") {
                *want.last_mut().unwrap() = "delete".into();
            }
            let got: Vec<String> = names(&actions)
                .into_iter()
                .filter(|n| n != "manual")
                .collect();
            assert_eq!(
                got, want,
                "create stopped after step {steps}, manager {manager:?}"
            );
            let actions: Vec<_> = actions
                .into_iter()
                .filter(|a| !matches!(a, RepairAction::Manual { .. }))
                .collect();
            execute(&mut reg, &world, &actions);
            assert_consistent(&reg, &world);
            // And the guest can be (re)started afterwards, with the same vTPM.
            if let Some(r) = reg.get_by_guest(guest(0).guest_uuid).unwrap()
                && r.state == State::Running
            {
                destroy_steps(&mut reg, &world, 0, r.id, 4);
            }
            let id = create_steps(&mut reg, &world, 0, 6, (31, 30)).unwrap();
            assert_eq!(reg.get(id).unwrap().unwrap().vtpm_uuid, guest(0).vtpm_uuid);
            assert_consistent(&reg, &world);
        }
    }
}

#[test]
fn destroy_interrupted_after_every_step() {
    let expected: [&[&str]; 5] = [
        &[],
        &["destroy g0", "destroy vtpm-g0", "stopped"],
        &["destroy vtpm-g0", "stopped"],
        &["stopped"],
        &[],
    ];
    for (steps, want) in expected.iter().enumerate() {
        let dir = TempDir::new("dsteps");
        let world = World(dir.0.join("world"));
        let db = dir.0.join("registry.sqlite");
        {
            let mut reg = Registry::open(&db).unwrap();
            let id = create_steps(&mut reg, &world, 0, 6, (11, 10)).unwrap();
            destroy_steps(&mut reg, &world, 0, id, steps);
        }
        let mut reg = Registry::open(&db).unwrap();
        let drift = reg.check(&world.observe(), None, opts()).unwrap();
        let actions = repair(&drift, None);
        assert_eq!(
            names(&actions),
            *want,
            "destroy stopped after step {steps}: {drift:?}"
        );
        execute(&mut reg, &world, &actions);
        assert_consistent(&reg, &world);
        // The binding survived: the row is stopped, not gone.
        let want = if steps == 0 {
            State::Running
        } else {
            State::Stopped
        };
        assert_eq!(
            reg.get_by_guest(guest(0).guest_uuid)
                .unwrap()
                .unwrap()
                .state,
            want
        );
    }
}

#[test]
fn drift_outside_crashes() {
    let dir = TempDir::new("drift");
    let world = World(dir.0.join("world"));
    let mut reg = Registry::open(&dir.0.join("r.sqlite")).unwrap();
    for i in 0..4 {
        create_steps(&mut reg, &world, i, 6, (100 + i as u32, 200 + i as u32));
    }
    world.destroy("g0"); // `xl destroy g0` with plain xl while no watcher ran
    world.destroy("vtpm-g1"); // the vTPM domain crashed
    world.create("vtpm-g2", vtpm_dom_uuid(2), 299); // vTPM restarted behind our back
    world.destroy("g3");
    world.destroy("vtpm-g3");
    world.create("g3", Uuid::from_u128(1), 300); // someone else's domain took the name
    let drift = reg.check(&world.observe(), None, opts()).unwrap();
    let actions = repair(&drift, None);
    let n = names(&actions);
    assert_eq!(
        n,
        [
            "destroy vtpm-g0",
            "restart vtpm-g1",
            "stopped",
            "running",
            "manual",
            "stopped"
        ],
        "{drift:#?}"
    );
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, Drift::OrphanVtpm { row, vtpm: 200 } if row.guest_name == "g0"))
    );
    assert!(drift.iter().any(
        |d| matches!(d, Drift::GuestWithoutVtpm { row, guest: 101 } if row.guest_name == "g1")
    ));
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, Drift::DomidMismatch { vtpm: 299, .. }))
    );
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, Drift::NameTakenByOtherDomain { domid: 300, .. }))
    );
    for d in &drift {
        assert!(!d.to_string().is_empty());
    }

    // Young creating rows are left to the process that is creating them.
    let id = reg.begin_create(&guest(9)).unwrap();
    let young = CheckOptions {
        now: reg.get(id).unwrap().unwrap().updated_at,
        stale_after: Duration::from_secs(120),
    };
    let drift = reg.check(&world.observe(), None, young).unwrap();
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, Drift::InProgress { row } if row.id == id))
    );
    assert!(!repair(&drift, None).iter().any(|a| matches!(a, RepairAction::MarkStopped { id: x } | RepairAction::DeleteRow { id: x } if *x == id)));

    // The manager's view: a vTPM it does not know, and one nobody owns.
    let stranger = Uuid::from_u128(0xdead);
    let known: Vec<Uuid> = (0..4)
        .map(|i| guest(i).vtpm_uuid)
        .filter(|u| *u != guest(1).vtpm_uuid)
        .chain([stranger])
        .collect();
    let drift = check(&reg.list().unwrap(), &world.observe(), Some(&known), opts());
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, Drift::VtpmUnknownToManager { row } if row.guest_name == "g1"))
    );
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, Drift::UnregisteredManagerVtpm { vtpm } if *vtpm == stranger))
    );
    assert!(
        !drift
            .iter()
            .any(|d| matches!(d, Drift::VtpmUnknownToManager { row } if row.guest_name == "g9")),
        "a first create may not have reached the manager yet"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGKILL at random instants.

struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t ^ (u64::from(std::process::id()) << 32) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The child: drives creates, destroys and removals through the registry forever, until
/// the parent kills it. Does nothing when run as an ordinary test.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let world = World(dir.join("world"));
    let mut reg = Registry::open(&dir.join("registry.sqlite")).unwrap();
    let raw = rusqlite_raw(&dir.join("registry.sqlite"));
    let mut rng = Rng::seeded();
    std::fs::write(dir.join("child-ready"), b"").unwrap();
    loop {
        let i = rng.below(GUESTS as u64) as u128;
        let p = guest(i);
        let domids = (1 + rng.below(30000) as u32, 1 + rng.below(30000) as u32);
        match reg.get_by_guest(p.guest_uuid).unwrap() {
            None => {
                create_steps(&mut reg, &world, i, 6, domids);
            }
            Some(r) if r.state == State::Stopped && rng.below(4) == 0 => reg.remove(r.id).unwrap(),
            Some(r) if r.state == State::Stopped => {
                create_steps(&mut reg, &world, i, 6, domids);
            }
            Some(r) if r.state == State::Running => destroy_steps(&mut reg, &world, i, r.id, 4),
            Some(r) => panic!(
                "child found {} {} — the parent should have repaired it",
                r.guest_name, r.state
            ),
        }
        if rng.below(3) == 0 {
            // A long multi-statement transaction that is never committed: killed inside it,
            // none of it may survive.
            raw(&format!(
                "BEGIN IMMEDIATE; \
                 INSERT INTO pairs (guest_uuid, guest_name, vtpm_uuid, vtpm_domain, state, created_at, updated_at) \
                 VALUES ('{}', 'ghost', '{}', 'vtpm-ghost', 'creating', 0, 0); \
                 UPDATE pairs SET updated_at = updated_at + 1;",
                Uuid::from_u128(0xfeed),
                Uuid::from_u128(0xbeef)
            ));
            std::thread::sleep(Duration::from_micros(rng.below(2000)));
            raw("ROLLBACK;");
        }
    }
}

/// A second, raw connection to the registry file (what a concurrent writer would do).
fn rusqlite_raw(path: &Path) -> impl Fn(&str) + use<> {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    move |sql: &str| conn.execute_batch(sql).unwrap()
}

#[test]
fn sigkill_at_random_points() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = TempDir::new("kill");
    let world = World(dir.0.join("world"));
    let db = dir.0.join("registry.sqlite");
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::seeded();
    let (mut half_done, mut destroyed, mut repairs) = (0, 0, 0);
    let kills = 60;
    let started = Instant::now();
    for round in 0..kills {
        let _ = std::fs::remove_file(dir.0.join("child-ready"));
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, &dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Let it get going, then kill it at a random instant.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.0.join("child-ready").exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("round {round}: child exited early ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "child never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if std::os::unix::process::ExitStatusExt::signal(&status) != Some(9) {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("round {round}: child was not killed but exited ({status}): {err}");
        }

        let mut reg = Registry::open(&db)
            .unwrap_or_else(|e| panic!("round {round}: registry does not open: {e}"));
        reg.integrity_check().unwrap();
        assert!(
            reg.get_by_name("ghost").unwrap().is_none(),
            "round {round}: an uncommitted transaction survived"
        );
        let live = world.observe();
        let rows = reg.list().unwrap();
        let drift = reg.check(&live, None, opts()).unwrap();
        // Every half-done operation is reported.
        for r in rows
            .iter()
            .filter(|r| matches!(r.state, State::Creating | State::Destroying))
        {
            half_done += 1;
            assert!(
                drift.iter().any(|d| matches!(d,
                    Drift::StuckCreating { row, .. } | Drift::StuckDestroying { row, .. } if row.id == r.id)),
                "round {round}: {} is {} but check says {drift:?}",
                r.guest_name,
                r.state
            );
        }
        // Every domain is accounted for (no domain without a pair), before any repair.
        for d in &live {
            assert!(
                rows.iter()
                    .any(|r| r.guest_uuid == d.uuid || r.vtpm_domain == d.name),
                "round {round}: domain {} has no registry row",
                d.name
            );
        }
        let actions = repair(&drift, None);
        repairs += actions.len();
        destroyed += execute(&mut reg, &world, &actions);
        assert_consistent(&reg, &world);
    }
    eprintln!(
        "{kills} kills in {:?}: {half_done} half-done operations found, {repairs} repair actions, {destroyed} domains destroyed",
        started.elapsed()
    );
    assert!(
        half_done > 0,
        "no kill landed inside an operation; the test is not testing anything"
    );
}
