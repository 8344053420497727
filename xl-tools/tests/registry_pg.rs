//! The registry on a real PostgreSQL server shared by several hosts (each host a separate
//! process of this test binary, like `xl-vtpm` on two dom0s):
//!
//! * **race**: two hosts start the same vTPM at the same instant, hundreds of times (a new
//!   pair, then the same pair again once stopped): exactly one wins each round, the loser is
//!   told which host holds it, and the database shows the winner's activation only;
//! * **restart**: PostgreSQL is restarted (`pg_ctl restart -m fast`), crashed (`-m immediate`)
//!   and its postmaster killed with SIGKILL while a host is creating pairs in a loop: every
//!   create either failed with a message naming the database, or is complete (row and
//!   activation) — no half row — every reported success survived, and `check` reports the
//!   interrupted creates consistently and repairs them.
//!
//! Each test runs its own cluster ([`testkit::pg::PgCluster`]); the children find it through
//! the environment.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use testkit::pg::PgCluster;
use uuid::Uuid;
use xl_tools::registry::{
    repair, CheckOptions, Drift, Location, NewPair, Registry, RegistryError, RepairAction, State,
};

const URL_ENV: &str = "XVTPM_REGISTRY_PG_TEST_URL";
const HOST_ENV: &str = "XVTPM_REGISTRY_PG_TEST_HOST";
const STOP_ENV: &str = "XVTPM_REGISTRY_PG_TEST_STOP";

/// Rounds of the race (each: both hosts start the same vTPM at the same instant).
const RACE_ROUNDS: u32 = 240;

fn pair(i: u32) -> NewPair {
    NewPair {
        guest_uuid: Uuid::from_u128(0x5000_0000 + i as u128),
        guest_name: format!("g{i}"),
        vtpm_uuid: Uuid::from_u128(0x6000_0000 + i as u128),
        vtpm_domain: format!("vtpm-g{i}"),
        group: Some("default".into()),
    }
}

fn open(url: &str, host: &str) -> Registry {
    Registry::connect(&Location::parse(url).unwrap(), host)
        .unwrap_or_else(|e| panic!("host {host}: {e}"))
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn spawn_child(test: &str, envs: &[(&str, String)]) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// A host process of the race, driven line by line.
struct Host {
    name: String,
    child: Child,
    to: Option<ChildStdin>,
    from: BufReader<ChildStdout>,
}

impl Host {
    fn start(url: &str, name: &str) -> Host {
        let mut child = spawn_child(
            "race_child",
            &[(URL_ENV, url.to_string()), (HOST_ENV, name.to_string())],
        );
        let to = child.stdin.take();
        let from = BufReader::new(child.stdout.take().unwrap());
        let mut h = Host {
            name: name.into(),
            child,
            to,
            from,
        };
        assert_eq!(h.answer(), "ready", "host {name} did not start");
        h
    }

    fn send(&mut self, line: &str) {
        let to = self.to.as_mut().unwrap();
        writeln!(to, "{line}").unwrap();
        to.flush().unwrap();
    }

    /// The child's next protocol line (the test harness prints its own lines too).
    fn answer(&mut self) -> String {
        loop {
            let mut line = String::new();
            if self.from.read_line(&mut line).unwrap() == 0 {
                panic!("host {} exited: {:?}", self.name, self.child.wait());
            }
            // libtest may have started the line (`test race_child ... `).
            if let Some((_, a)) = line.trim_end().split_once("@@ ") {
                return a.to_string();
            }
        }
    }
}

/// A race host: `go <guest> <start-at-unix-nanos>` → waits for the instant, starts the
/// guest's vTPM, answers `won <id> <retries>`, `lost <holder> <retries>` or `error <message>`.
#[test]
fn race_child() {
    let (Some(url), Some(host)) = (std::env::var_os(URL_ENV), std::env::var_os(HOST_ENV)) else {
        return;
    };
    if std::env::var_os(STOP_ENV).is_some() {
        return;
    }
    let (url, host) = (url.into_string().unwrap(), host.into_string().unwrap());
    let mut reg = open(&url, &host);
    let say = |s: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "@@ {s}").unwrap();
        out.flush().unwrap();
    };
    say("ready".into());
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split(' ').collect();
        assert_eq!(w[0], "go", "{line}");
        let (guest, at): (u32, u128) = (w[1].parse().unwrap(), w[2].parse().unwrap());
        while unix_nanos() < at {
            std::hint::spin_loop();
        }
        let before = reg.retries();
        let answer = match reg.begin_create(&pair(guest)) {
            Ok(id) => format!("won {id} {}", reg.retries() - before),
            Err(RegistryError::ActiveOnOtherHost { holder, .. }) => {
                format!("lost {holder} {}", reg.retries() - before)
            }
            Err(e) => format!("error {e}"),
        };
        say(answer);
    }
}

#[test]
fn two_hosts_race_to_start_the_same_vtpm() {
    if std::env::var_os(URL_ENV).is_some() {
        return;
    }
    let started = Instant::now();
    let pg = PgCluster::start();
    let url = pg.url("postgres");
    // The schema exists before the race (its creation is tested elsewhere).
    let referees = [open(&url, "host-0"), open(&url, "host-1")];
    let mut hosts = [Host::start(&url, "host-0"), Host::start(&url, "host-1")];
    let (mut wins, mut contended, mut retries) = ([0u32; 2], 0u32, 0u64);
    for round in 0..RACE_ROUNDS {
        // Even rounds: a new pair (both insert); odd rounds: the same pair again, stopped
        // meanwhile (both update the existing row).
        let guest = round / 2;
        let at = unix_nanos() + 20_000_000;
        for h in &mut hosts {
            h.send(&format!("go {guest} {at}"));
        }
        let answers: Vec<String> = hosts.iter_mut().map(|h| h.answer()).collect();
        let won: Vec<usize> = (0..2).filter(|&i| answers[i].starts_with("won ")).collect();
        assert_eq!(
            won.len(),
            1,
            "round {round} (guest {guest}): exactly one host must win: {answers:?}"
        );
        let (w, l) = (won[0], 1 - won[0]);
        let lost: Vec<&str> = answers[l].split(' ').collect();
        assert_eq!(
            lost[..2],
            ["lost", hosts[w].name.as_str()],
            "round {round}: the loser must be told the holder: {answers:?}"
        );
        let r: Vec<u64> = answers
            .iter()
            .map(|a| a.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        if r.iter().any(|&n| n > 0) {
            contended += 1;
        }
        retries += r.iter().sum::<u64>();
        wins[w] += 1;
        // The database agrees: the winner's host, its activation only.
        let row = referees[0]
            .get_by_guest(pair(guest).guest_uuid)
            .unwrap()
            .unwrap();
        assert_eq!(row.state, State::Creating);
        assert_eq!(row.host, hosts[w].name, "round {round}");
        assert_eq!(
            row.active_on.as_deref(),
            Some(hosts[w].name.as_str()),
            "round {round}"
        );
        // The winner stops it; the next round races for it again.
        let mut referee = open(&url, &hosts[w].name);
        referee.mark_stopped(row.id).unwrap();
        drop(referee);
    }
    for h in &mut hosts {
        drop(h.to.take()); // end of input ends the child
        assert!(h.child.wait().unwrap().success());
    }
    let rows = referees[0].list().unwrap();
    assert_eq!(rows.len() as u32, RACE_ROUNDS / 2);
    assert!(rows
        .iter()
        .all(|r| r.state == State::Stopped && r.active_on.is_none()));
    eprintln!(
        "{RACE_ROUNDS} rounds in {:.1?}: one winner each (host-0 {}, host-1 {}); {contended} rounds \
         where the transactions collided and one was retried ({retries} retries in all)",
        started.elapsed(),
        wins[0],
        wins[1]
    );
    assert!(
        wins[0] > 0 && wins[1] > 0,
        "one host never won: the race is not a race"
    );
}

/// A creating host: creates pairs 0, 1, 2, … until the stop file exists, printing
/// `ok <i> <id>` after each create that returned Ok and `err <i> <message>` otherwise.
#[test]
fn restart_child() {
    let (Some(url), Some(host), Some(stop)) = (
        std::env::var_os(URL_ENV),
        std::env::var_os(HOST_ENV),
        std::env::var_os(STOP_ENV),
    ) else {
        return;
    };
    let (url, host, stop) = (
        url.into_string().unwrap(),
        host.into_string().unwrap(),
        PathBuf::from(stop),
    );
    let mut reg = open(&url, &host);
    let mut i = 0u32;
    while !stop.exists() {
        let line = match reg.begin_create(&pair(i)) {
            Ok(id) => format!("ok {i} {id}"),
            Err(e) => {
                std::thread::sleep(Duration::from_millis(20));
                format!("err {i} {e}")
            }
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "@@ {line}").unwrap();
        out.flush().unwrap();
        i += 1;
    }
}

#[test]
fn database_restarts_during_creates() {
    if std::env::var_os(URL_ENV).is_some() {
        return;
    }
    let started = Instant::now();
    let pg = PgCluster::start();
    let url = pg.url("postgres");
    drop(open(&url, "host-a")); // schema
    let stop = pg.dir().join("stop-creating");
    let mut child = spawn_child(
        "restart_child",
        &[
            (URL_ENV, url.clone()),
            (HOST_ENV, "host-a".into()),
            (STOP_ENV, stop.display().to_string()),
        ],
    );
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in out.lines() {
            let line = line.unwrap();
            if let Some((_, l)) = line.split_once("@@ ") {
                tx.send(l.to_string()).unwrap();
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    // Wait until `n` more creates succeeded.
    let successes_after = |lines: &mut Vec<String>, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no successful create within 60 s: {:?}", lines.last()));
            seen += usize::from(l.starts_with("ok "));
            lines.push(l);
        }
    };
    successes_after(&mut lines, 30);
    type Restart = fn(&PgCluster);
    let restarts: [(&str, Restart); 3] = [
        ("pg_ctl restart -m fast", PgCluster::restart_fast),
        (
            "pg_ctl stop -m immediate (crash) and start",
            PgCluster::crash_restart,
        ),
        (
            "kill -9 of the postmaster and start",
            PgCluster::kill9_restart,
        ),
    ];
    for (what, restart) in restarts {
        let before = lines.len();
        restart(&pg);
        successes_after(&mut lines, 30);
        let errors = lines[before..]
            .iter()
            .filter(|l| l.starts_with("err "))
            .count();
        eprintln!("{what}: {errors} creates failed while the database was away");
    }
    std::fs::write(&stop, b"").unwrap();
    assert!(child.wait().unwrap().success());
    reader.join().unwrap();
    lines.extend(rx.try_iter());

    let reg = open(&url, "host-a");
    let rows = reg.list().unwrap();
    let (mut oks, mut errs, mut unknown_committed) = (0, 0, 0);
    for l in &lines {
        let w: Vec<&str> = l.splitn(3, ' ').collect();
        let i: u32 = w[1].parse().unwrap();
        let row = rows.iter().find(|r| r.guest_uuid == pair(i).guest_uuid);
        match w[0] {
            "ok" => {
                oks += 1;
                // Reported success is durable, through restarts and crashes.
                let row = row
                    .unwrap_or_else(|| panic!("create {i} answered ok but is not in the database"));
                assert_eq!(row.id.to_string(), w[2]);
            }
            "err" => {
                errs += 1;
                assert!(
                    w[2].contains("registry database"),
                    "create {i} failed without naming the database: {}",
                    w[2]
                );
                if row.is_some() {
                    // Only a commit whose answer was lost may have happened.
                    assert!(
                        w[2].contains("may or may not have been recorded"),
                        "create {i} failed ({}) but its row exists",
                        w[2]
                    );
                    unknown_committed += 1;
                }
            }
            other => panic!("{other}"),
        }
    }
    // Never a half row: each row is a whole create (state creating, this host's activation).
    for r in &rows {
        assert_eq!(r.state, State::Creating, "{r:?}");
        assert_eq!(
            (r.host.as_str(), r.active_on.as_deref()),
            ("host-a", Some("host-a")),
            "{r:?}"
        );
    }
    assert_eq!(rows.len(), oks + unknown_committed);
    assert!(
        errs > 0,
        "no create ever hit a restart: the test did not test anything"
    );
    // check reports every interrupted create, and nothing else; repair resolves them.
    let opts = CheckOptions {
        now: i64::MAX / 2,
        stale_after: Duration::ZERO,
    };
    let mut reg = reg;
    let drift = reg.check_all_hosts(&[], None, opts).unwrap();
    assert_eq!(drift.len(), rows.len());
    assert!(
        drift.iter().all(|d| matches!(
            d,
            Drift::StuckCreating {
                guest: None,
                vtpm: None,
                ..
            }
        )),
        "{drift:?}"
    );
    let actions = repair(&drift, Some(&[]));
    assert!(actions
        .iter()
        .all(|a| matches!(a, RepairAction::DeleteRow { .. })));
    for a in &actions {
        assert!(reg.apply(a).unwrap());
    }
    assert_eq!(reg.check_all_hosts(&[], None, opts).unwrap(), vec![]);
    eprintln!(
        "3 restarts in {:.1?}: {oks} creates ok (all present), {errs} failed cleanly \
         ({unknown_committed} of them committed with the answer lost), no half rows",
        started.elapsed()
    );
}
