//! Moves recorded in a fleet registry: two "hosts" (two real swtpms manufactured by private
//! vendor CAs, two `vtpmmgr serve`) share one real PostgreSQL registry (`testkit::pg`). A vTPM
//! with a registered pair moves back and forth with `xl-vtpm vtpm migrate --to-host`; a client
//! writes its NV between the moves (a move needs the vTPM stopped); then `kill -9` of the CLI,
//! of the source manager and of the destination manager in the middle of a move. After each,
//! the registry names exactly one host, the one that can run the vTPM, with every
//! acknowledged write present; `registry check --all-hosts` reports a half-done move.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::pg::PgCluster;
use tpm_wire::nv_counter;
use uuid::Uuid;
use xl_tools::registry::{CheckOptions, Drift, Location, NewPair, Registry};
use xvtpm_tests::{Options, Stack, VtpmHandle, rc};

const COUNTER: u32 = 0x0150_0041;
/// Moves back and forth.
const ROUNDS: u32 = 6;
/// Acknowledged NV writes per round.
const WRITES: u64 = 5;

struct Host {
    s: Stack,
    name: &'static str,
    url: String,
}

impl Host {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.s.xl_command(args);
        c.env("XVTPM_REGISTRY", &self.url).env("XVTPM_HOST", self.name);
        c
    }
    fn xl(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn migrate_cmd(from: &Host, to: &Host, uuid: &Uuid, policy: &Path) -> Command {
    let ca = to.s.ek_ca.as_ref().unwrap();
    from.cmd(&[
        "vtpm", "migrate", &uuid.to_string(), "--to-run-dir", p(&to.s.run_dir()), "--ek-ca", p(&ca.root_cert()), "--ek-intermediate",
        p(&ca.intermediate_cert()), "--host-pcrs-policy", p(policy), "--to-name", to.name, "--to-host", to.name,
    ])
}

fn start(h: &Host, uuid: &Uuid) -> VtpmHandle {
    Stack::handle(&h.s.xl_json(&["vtpm", "start", &uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]))
}

fn counter(v: &VtpmHandle) -> u64 {
    let r = v.command(&nv_counter::read(COUNTER));
    assert_eq!(rc(&r), 0, "NV_Read of the counter");
    u64::from_be_bytes(r[16..24].try_into().unwrap())
}

/// The client: `WRITES` acknowledged increments; returns the value it saw acknowledged last.
fn write_some(v: &VtpmHandle, acked: u64) -> u64 {
    for i in 1..=WRITES {
        assert_eq!(rc(&v.command(&nv_counter::increment(COUNTER))), 0, "NV_Increment");
        assert_eq!(counter(v), acked + i);
    }
    acked + WRITES
}

/// The registry names `holder`, no move is open and nothing is active; the vTPM starts there
/// with every acknowledged write, and not on `other`.
fn held_by(reg: &Registry, holder: &Host, other: &Host, uuid: &Uuid, acked: u64) {
    let row = reg.get_by_vtpm(*uuid).unwrap().unwrap();
    assert_eq!(row.host, holder.name, "the registry names the wrong host: {row:?}");
    assert_eq!(row.active_on, None);
    assert!(reg.moves().unwrap().is_empty(), "{:?}", reg.moves());
    let o = other.s.xl(&["vtpm", "start", &uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]);
    assert!(!o.status.success(), "{} runs a copy too: {}", other.name, text(&o));
    let v = start(holder, uuid);
    assert_eq!(counter(&v), acked, "acknowledged writes lost");
    holder.s.stop_vtpm(uuid);
}

/// Waits until `cond` holds (polled), or fails after 120 s.
fn when(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "never saw: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kill9(mut c: Child) -> Output {
    let _ = c.kill();
    c.wait_with_output().unwrap()
}

/// Finishes or aborts the registry's open move of `uuid` from `from` to `to` the documented way:
/// the destination's receipt if it imported (then commit), else its cancellation (then abort).
/// Returns whether the vTPM moved.
fn recover(reg: &Registry, from: &Host, to: &Host, uuid: &Uuid) -> bool {
    let moves = reg.moves().unwrap();
    assert_eq!(moves.len(), 1, "a half-done move is recorded: {moves:?}");
    let m = &moves[0];
    assert_eq!((m.from_host.as_str(), m.to_host.as_str()), (from.name, to.name));
    // `registry check --all-hosts` reports it, naming how to finish or abort it.
    let drift = reg.check_all_hosts(&[], None, CheckOptions::default()).unwrap();
    let report: Vec<String> = drift.iter().filter(|d| matches!(d, Drift::MoveUnfinished { .. })).map(|d| d.to_string()).collect();
    assert!(report.len() == 1 && report[0].contains("is being moved from host") && report[0].contains("transfer commit"), "{drift:?}");
    let d = from.s.dir.path();
    let r = d.join("recover-receipt.json");
    // A receipt for this move's offer (the destination may hold one of an earlier import).
    let imported = to.xl(&["vtpm", "transfer", "receipt", &uuid.to_string(), "--out", p(&r)]).status.success()
        && serde_json::from_slice::<serde_json::Value>(&std::fs::read(&r).unwrap()).unwrap()["offer_id"] == m.offer_id.to_string().as_str();
    if imported {
        ok(from.xl(&["vtpm", "transfer", "commit", &uuid.to_string(), "--receipt", p(&r)]));
        true
    } else {
        let c = d.join("recover-cancel.json");
        ok(to.xl(&["vtpm", "transfer", "cancel", &m.offer_id.to_string(), "--out", p(&c)]));
        ok(from.xl(&["vtpm", "transfer", "abort", &uuid.to_string(), "--receipt", p(&c)]));
        false
    }
}

#[test]
fn moves_flip_the_registry_host_at_the_commit_and_every_failure_leaves_one_host() {
    let pg = PgCluster::start();
    let url = pg.url("postgres");
    // A discrete TPM's pace (20 ms per command), so that a kill at a log line lands before
    // the next step of the move.
    let opts = Options { ek_cert: true, tpm_delay: Some(Duration::from_millis(20)), ..Default::default() };
    let mut a = Host { s: Stack::start_with(opts.clone()), name: "host-a", url: url.clone() };
    let mut b = Host { s: Stack::start_with(opts), name: "host-b", url: url.clone() };
    let policy = a.s.dir.path().join("policy.json");
    std::fs::write(&policy, format!("{{\"0\": \"{0}\", \"7\": \"{0}\"}}", "00".repeat(32))).unwrap();

    // The vTPM and its pair (registered on host-a, stopped).
    let v = a.s.create_vtpm();
    let uuid = v.uuid;
    assert_eq!(rc(&v.command(&nv_counter::define(COUNTER))), 0);
    assert_eq!(rc(&v.command(&nv_counter::increment(COUNTER))), 0);
    let mut acked = write_some(&v, 1);
    a.s.stop_vtpm(&uuid);
    let mut reg = Registry::connect(&Location::parse(&url).unwrap(), "host-a").unwrap();
    let pair = NewPair { guest_uuid: Uuid::new_v4(), guest_name: "web1".into(), vtpm_uuid: uuid, vtpm_domain: "vtpm-web1".into(), group: None };
    let id = reg.begin_create(&pair).unwrap();
    reg.mark_stopped(id).unwrap();

    // Back and forth, writing between the moves.
    let (mut from, mut to) = (&a, &b);
    for round in 0..ROUNDS {
        let out = ok(migrate_cmd(from, to, &uuid, &policy).output().unwrap());
        assert!(text(&out).contains(&format!("the registry names host {}", to.name)), "round {round}: {}", text(&out));
        let row = reg.get_by_vtpm(uuid).unwrap().unwrap();
        assert_eq!(row.host, to.name);
        let v = start(to, &uuid);
        assert_eq!(counter(&v), acked, "round {round}: acknowledged writes lost");
        acked = write_some(&v, acked);
        to.s.stop_vtpm(&uuid);
        std::mem::swap(&mut from, &mut to);
    }
    held_by(&reg, from, to, &uuid, acked);
    let (mut src_is_a, mut holder_is_a) = (std::ptr::eq(from, &a), std::ptr::eq(from, &a));

    // Failure points: the CLI killed once the source marked the vTPM exporting; the source
    // manager killed at the same point; the destination manager killed once it wrote the
    // state file (before its store write and answer); the CLI killed once the destination
    // imported (the receipt lost with it).
    for (point, log_host_is_src, line) in [
        ("cli", true, "vTPM marked exporting"),
        ("source", true, "vTPM marked exporting"),
        ("destination", false, "imported vTPM's state file written"),
        ("cli", false, "vTPM imported"),
    ] {
        let (src, dst) = if src_is_a { (&mut a, &mut b) } else { (&mut b, &mut a) };
        let before = if log_host_is_src { &src.s } else { &dst.s }.mgr_log().matches(line).count();
        let cli = migrate_cmd(src, dst, &uuid, &policy).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        {
            let watched = if log_host_is_src { &src.s } else { &dst.s };
            when(|| watched.mgr_log().matches(line).count() > before, line);
        }
        let out = match point {
            "cli" => kill9(cli),
            "source" => {
                src.s.kill9_manager();
                let o = cli.wait_with_output().unwrap();
                src.s.start_manager();
                o
            }
            _ => {
                dst.s.kill9_manager();
                let o = cli.wait_with_output().unwrap();
                dst.s.start_manager();
                o
            }
        };
        assert!(!out.status.success(), "{point} killed at {line:?}, yet the migrate succeeded: {}", text(&out));
        let moved = recover(&reg, &*src, &*dst, &uuid);
        let (holder, other) = if moved { (&*dst, &*src) } else { (&*src, &*dst) };
        held_by(&reg, holder, other, &uuid, acked);
        // The client writes on, wherever it runs now.
        let v = start(holder, &uuid);
        acked = write_some(&v, acked);
        holder.s.stop_vtpm(&uuid);
        holder_is_a = if moved { !src_is_a } else { src_is_a };
        src_is_a = holder_is_a;
    }
    let (holder, other) = if holder_is_a { (&a, &b) } else { (&b, &a) };
    held_by(&reg, holder, other, &uuid, acked);
    reg.integrity_check().unwrap();
}
