//! Moving a running PV guest with its vTPM: `xl-vtpm migrate GUEST localhost --non-live` (switch
//! `xvtpm_migrate=1|0`, default 1). Non-live: the testbed's Xen refuses log-dirty mode for PV
//! guests — `xc: error: Failed to enable logdirty: 95,22,0` — and `xl migrate` is always live;
//! `xl save` + `xl restore` need no log-dirty mode (ci/testbed/README.md). One RESULT per step:
//!   migrate-plain    P6 baseline: a guest without a vTPM (`role=plain hold=1 tick=1`), moved twice with
//!                    plain `xl save mig-p FILE` + `xl restore FILE`; the largest gap between the
//!                    guest's 0.1 s ticks is the downtime it saw (`PERF p6-novtpm-…`)
//!   migrate          `xl-vtpm create` of mig-a (dom0-process vTPM, `role=mig hold=1 tick=1`), `xl-vtpm watch`
//!                    running from here to the end of migrate-recover (a guest in a move is not gone): the guest
//!                    makes 0x81000010, NV 0x01500016, extends PCR 16 and reads its EK; `xl-vtpm migrate
//!                    mig-a localhost --non-live` (new domid, save file removed, same vTPM process, the source's device gone, registry
//!                    domid follows); in the guest: same EK, key and NV, PCR 16 unchanged, a fresh AK quote
//!                    verified; a second move for P6 (`PERF p6-vtpm-…`)
//!   migrate-recover  failure points with real processes: `xl migrate` failing before the guest moved
//!                    (`--ssh false`): the guest stays where it was with the same vTPM process; `xl
//!                    save` into xl-vtpm's save file run alone (a non-live move cut short after it) and
//!                    the vTPM process killed -9 meanwhile: `xl-vtpm migrate mig-a --finish` restores the
//!                    file, starts the vTPM again from its state and resumes the guest (EK, key, NV kept; PCR 16 reset, as after a power loss);
//!                    `xl reboot` of the restored guest (its monitor is now `xl restore`): the watcher keeps the
//!                    vTPM process and records the new domid;
//!                    `xl-vtpm destroy`: the domain and the vTPM process are gone
//!   migrate-vtpmdom  the vTPM in its own domain (needs the manager and the vTPM-domain image, no dom0
//!                    vTPM process): `xl-vtpm create` of mig-d (`vtpm = [ "backend=vtpm-mig-d" ]`, the
//!                    mig-a guest otherwise; vtpm-mig-d at the memory xl-vtpm picks, 32 MiB with the own
//!                    kernel); `xl-vtpm migrate mig-d localhost --non-live` twice: JSON (`vtpm_domain`,
//!                    `vtpm_pid` 0, `non_live`, `reconnect_ms`), the vTPM domain the same domid and ready,
//!                    the source domain and its device in the vTPM domain's backend gone, save file
//!                    removed, registry (new guest domid, same vTPM domid), the marker taken and the vTPM
//!                    domain saying it resumed; in the guest EK, key, NV and PCR 16 kept, quote verified;
//!                    P6 (`PERF p6-vtpmdom-…`); refused (exit 6, nothing moved, the reason named) with the
//!                    vTPM domain stopped (`xl-vtpm vtpm stop`); `vtpm start` again, `xl-vtpm destroy`

use std::time::Duration;

use serde_json::Value;

use super::life::{Watch, life_row, watch_start};
use super::{St, deadline, ek_hash, none};
use crate::cmd::{Cmd, pid_up, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, after_prefix, jf};

const MCFG: &str = "/etc/xen/mig-a.cfg";
const PCFG: &str = "/etc/xen/mig-p.cfg";
const PSAVE: &str = "/tmp/mig-p.xlsave";
const WLOG: &str = "/tmp/watch-mig.log";
pub(super) const PCR_AFTER: &str = "39DE0A6FECF21D432302A5D79315BC42DFF73C4BE042FB5276E3C5B4758BCA02";
const PCR_ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Both console logs of a migrated guest: xenconsoled names a log after the domain's name when
/// it first sees it, and an incoming domain is `NAME--incoming` until xl renames it.
pub(super) fn cons(name: &str) -> String {
    let mut c = xen::console(name);
    c.push_str(&xen::console(&format!("{name}--incoming")));
    c
}

/// The guest's ticks (uptime, s) from both logs, sorted.
pub(super) fn ticks(name: &str) -> Vec<f64> {
    tick_values(&cons(name))
}

/// The `GUEST-TICK` values (uptime, s) in console text, sorted, each once.
pub(super) fn tick_values(text: &str) -> Vec<f64> {
    let mut v: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("GUEST-TICK ")?.trim().parse().ok())
        .collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// The largest gap between ticks after `from` and how many ticks follow it.
pub(super) fn max_gap(t: &[f64], from: f64) -> Option<(f64, usize)> {
    let t: Vec<f64> = t.iter().copied().filter(|x| *x >= from).collect();
    let mut best: Option<(f64, usize)> = None;
    for i in 1..t.len() {
        let g = t[i] - t[i - 1];
        if best.is_none_or(|(b, _)| g > b) {
            best = Some((g, t.len() - i));
        }
    }
    best
}

/// Waits until the largest tick gap after `from` has ≥ 5 ticks after it (the guest runs again);
/// the gap in ms, from the same read of the consoles that met the condition (a log rewritten
/// after it, as xenconsoled may when a domain is renamed, does not undo it).
pub(super) fn downtime(cx: &Cx, name: &str, from: f64) -> Option<i64> {
    let mut seen = None;
    cx.wait_every(90, Duration::from_millis(500), || {
        seen = max_gap(&ticks(name), from).filter(|(_, after)| *after >= 5);
        seen.is_some()
    });
    seen.map(|(g, _)| (g * 1000.0) as i64)
}

pub(super) fn last_tick(name: &str) -> f64 {
    ticks(name).last().copied().unwrap_or(0.0)
}

/// A config for `name` from life-a.cfg (the lifecycle guest: kernel, memory, `vtpm = [ "backend=0" ]`)
/// with `extra`; its vTPM line names `backend` (`0`: a dom0 process; a name: that vTPM domain),
/// or is left out when `backend` is None.
pub(super) fn write_cfg(path: &str, name: &str, extra: &str, backend: Option<&str>) -> Result<(), String> {
    let src = xen::read_text(super::life::LCFG0);
    let mut out = String::new();
    for l in src.lines() {
        let t = l.trim_start();
        let l = if t.starts_with("name ") || t.starts_with("name=") {
            format!("name = \"{name}\"")
        } else if t.starts_with("extra ") || t.starts_with("extra=") {
            format!("extra = \"console=hvc0 rootfstype=ramfs quiet {extra}\"")
        } else if t.starts_with("vtpm ") || t.starts_with("vtpm=") {
            match backend {
                Some(b) => format!("vtpm = [ \"backend={b}\" ]"),
                None => continue,
            }
        } else {
            l.to_string()
        };
        out.push_str(&l);
        out.push('\n');
    }
    let want_vtpm = backend.is_none_or(|b| out.contains(&format!("backend={b}\"")));
    if !out.contains(&format!("name = \"{name}\"")) || !out.contains(extra) || !want_vtpm {
        return Err(format!("{path}: name/extra not substituted from {}", super::life::LCFG0));
    }
    std::fs::write(path, out).map_err(|e| format!("{path}: {e}"))
}

/// A command to the held guest NAME (xenstore data/xvtpm-cmd of its current domain); its
/// GUEST-CMD line.
pub(super) fn guest_cmd(cx: &Cx, name: &str, n: u32, cmd: &str, secs: u64) -> String {
    let Some(d) = xen::domid(name) else {
        return format!("no {name} domain");
    };
    if !xen::xs_write(&format!("/local/domain/{d}/data/xvtpm-cmd"), &format!("{n}:{cmd}")) {
        return "xenstore-write failed".into();
    }
    let key = format!("GUEST-CMD {n} ");
    cx.wait_every(secs, Duration::from_secs(1), || cons(name).lines().any(|l| l.starts_with(&key)));
    cons(name)
        .lines()
        .find(|l| l.starts_with(&key))
        .map_or_else(|| format!("no answer within {secs} s"), str::to_string)
}

/// `xl-vtpm migrate …` with `--json`: (exit code, the JSON answer, all output).
pub(super) fn xl_vtpm_migrate(cx: &Cx, args: &[&str], save: &str) -> (i32, Value, String) {
    let mut argv = vec!["xl-vtpm", "--json", "migrate"];
    argv.extend_from_slice(args);
    let o = Cmd::new(&argv).env("NO_COLOR", "1").secs(240).save_split(save, &format!("{save}.err")).run(cx);
    let v = xen::parse_json(&o.stdout).unwrap_or(Value::Null);
    (o.rc, v, o.all())
}

/// The save file of a non-live move of guest `name` (xl-vtpm's state directory, by vTPM UUID).
fn save_path(cx: &Cx, name: &str) -> String {
    format!("/var/lib/xvtpm/migrate-save/{}.xlsave", jf(&life_row(cx, name), "vtpm_uuid"))
}

/// A save file of guest `name` is left behind.
fn save_left(cx: &Cx, name: &str) -> bool {
    std::path::Path::new(&save_path(cx, name)).exists()
}

pub(super) fn vtpm_pid(cx: &Cx, name: &str) -> Option<u32> {
    jf(&life_row(cx, name), "vtpm_pid").parse().ok()
}

/// The migcheck answer's `key=value`.
pub(super) fn field(line: &str, key: &str) -> String {
    xen::token(line, key).unwrap_or_default()
}

pub fn run(r: &mut Runner, st: &mut St) {
    run_dom0(r, st);
    // the vTPM in its own domain: needs the manager and the vTPM-domain image, no dom0 vTPM process
    let mode = xen::cmdline_arg("xvtpm_migrate").unwrap_or_else(|| "1".into());
    if mode == "0" {
        r.skip("migrate-vtpmdom", "disabled (XVTPM_TESTBED_MIGRATE=0)");
        return;
    }
    r.phase("migrate-vtpmdom", deadline(900), |cx| vtpmdom_move(cx, st));
}

/// The phases of a guest whose vTPM is a dom0 process (`migrate-plain`, `migrate`, `migrate-recover`).
fn run_dom0(r: &mut Runner, st: &mut St) {
    let mode = xen::cmdline_arg("xvtpm_migrate").unwrap_or_else(|| "1".into());
    if mode == "0" || st.vtpm_mode != "dom0" {
        let why = if mode == "0" { "disabled (XVTPM_TESTBED_MIGRATE=0)" } else { "needs XVTPM_TESTBED_VTPM=dom0" };
        for p in ["migrate-plain", "migrate", "migrate-recover"] {
            r.skip(p, why);
        }
        return;
    }

    // migrate-plain: P6 without a vTPM
    r.phase("migrate-plain", deadline(420), |cx| {
        let mut e = Errs::default();
        let info = Cmd::sh("xl info").secs(30).run(cx).all();
        show("xl info", &info.lines().filter(|l| l.starts_with("free_memory") || l.starts_with("total_memory")).collect::<Vec<_>>().join("\n"));
        show("xl list", &Cmd::sh("xl list").secs(30).run(cx).all());
        if let Err(w) = write_cfg(PCFG, "mig-p", "role=plain hold=1 tick=1", None) {
            return Outcome::fail(w);
        }
        if !super::xl_create(cx, PCFG, "/tmp/xl-mig-p.out", 180, &mut e) {
            return e.verdict("");
        }
        if !cx.wait_every(120, Duration::from_secs(1), || cons("mig-p").contains("GUEST-HOLD")) {
            show_tail("mig-p console", &cons("mig-p"), 10);
            e.add("no-GUEST-HOLD");
        }
        let mut downs = Vec::new();
        for round in 1..=2 {
            if !e.is_empty() || r_past(cx) {
                break;
            }
            let old = xen::domid("mig-p").unwrap_or_default();
            let from = last_tick("mig-p");
            // non-live: this Xen refuses log-dirty mode for PV guests, so `xl migrate` cannot run
            let _ = std::fs::remove_file(PSAVE);
            let o = Cmd::new(&["xl", "save", "mig-p", PSAVE]).secs(240).save(&format!("/tmp/xl-mig-p-save-{round}.out")).run(cx);
            let gone = xen::domid("mig-p").is_none();
            let o2 = Cmd::new(&["xl", "restore", PSAVE]).secs(240).save(&format!("/tmp/xl-mig-p-restore-{round}.out")).run(cx);
            let _ = std::fs::remove_file(PSAVE);
            let new = xen::domid("mig-p").unwrap_or_default();
            if !e.check(
                "migrate-plain-xl",
                o.ok() && gone && o2.ok() && !new.is_empty() && new != old,
                format!("round {round}: xl save rc={} in {} ms, xl restore rc={} in {} ms, domid {old} -> {new}", o.rc, o.elapsed.as_millis(), o2.rc, o2.elapsed.as_millis()),
            ) {
                show_tail("xl save", &o.all(), 15);
                show_tail("xl restore", &o2.all(), 15);
                break;
            }
            match downtime(cx, "mig-p", from) {
                Some(ms) => {
                    println!(
                        "PERF p6-novtpm-downtime-ms-r{round}={ms} (largest gap between the guest's 0.1 s ticks; non-live: xl save {} ms, xl restore {} ms)",
                        o.elapsed.as_millis(),
                        o2.elapsed.as_millis()
                    );
                    downs.push(ms);
                }
                None => {
                    e.add(format!("no-ticks-after-round-{round}"));
                    show_tail("mig-p console", &cons("mig-p"), 10);
                }
            }
        }
        xen::xl_destroy(cx, "mig-p", 60);
        e.verdict(format!("a PV guest without a vTPM moved twice on localhost (xl save + xl restore); downtime seen by the guest {downs:?} ms"))
    });

    // migrate: the guest with its vTPM
    let mut ek = String::new();
    let mut pcr = String::new();
    let mut ok = false;
    // `xl-vtpm watch` runs through both phases: a guest in a move, or a restored guest's reboot,
    // must not look gone to it.
    let mut watch: Option<Watch> = None;
    r.phase("migrate", deadline(900), |cx| {
        let mut e = Errs::default();
        if !st.mgr_ready() {
            return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
        }
        if let Err(w) = write_cfg(MCFG, "mig-a", "role=mig hold=1 tick=1", Some("0")) {
            return Outcome::fail(w);
        }
        let o = Cmd::new(&["xl-vtpm", "create", MCFG]).env("NO_COLOR", "1").secs(180).save("/tmp/xl-mig-a-create.out").run(cx);
        if !o.ok() {
            show_tail("xl-vtpm create mig-a", &o.all(), 20);
            return Outcome::fail(format!("xl-vtpm create rc={}", o.rc));
        }
        let pid0 = vtpm_pid(cx, "mig-a");
        match watch_start(cx, WLOG) {
            Ok(w) => watch = Some(w),
            Err(w) => e.add(format!("watcher: {w}")),
        }
        if !cx.wait_every(300, Duration::from_secs(1), || cons("mig-a").contains("GUEST-HOLD")) {
            e.add("no-GUEST-HOLD");
        }
        let c = cons("mig-a");
        let miss = super::guest_checks(&c, "mig-a", "boot", &["tpm0", "startup", "getrandom", "ek", "persistent", "nv-write", "pcrextend"]);
        for m in &miss {
            e.add(m.clone());
        }
        ek = ek_hash(&c);
        pcr = after_prefix(&c, "GUEST-PCR16 ").unwrap_or_default().trim().to_string();
        if !e.is_empty() {
            show_tail("mig-a console", &c, 20);
            return e.verdict("");
        }
        let old = xen::domid("mig-a").unwrap_or_default();
        let mut downs = Vec::new();
        for round in 1..=2 {
            if round == 2 && r_past(cx) {
                break;
            }
            let from = last_tick("mig-a");
            let (rc, v, all) = xl_vtpm_migrate(cx, &["mig-a", "localhost", "--non-live"], &format!("/tmp/xl-mig-a-{round}.out"));
            show("xl-vtpm migrate", &all);
            let before = if round == 1 { old.clone() } else { jf(&v, "from_domid") };
            let new = xen::domid("mig-a").unwrap_or_default();
            let same_pid = pid0.is_some() && jf(&v, "vtpm_pid").parse::<u32>().ok() == pid0 && pid_up(pid0);
            if !e.check(
                "migrate-xl-vtpm",
                rc == 0 && !new.is_empty() && new != before && jf(&v, "to_domid") == new && same_pid && jf(&v, "vtpm_restarted") == "false" && !save_left(cx, "mig-a"),
                format!(
                    "round {round}: rc={rc} domid {before} -> {new}, vTPM process {:?} -> {} (kept running), xl save {} ms, xl restore {} ms, total {} ms, reconnect {} ms, save file removed",
                    pid0,
                    jf(&v, "vtpm_pid"),
                    jf(&v, "xl_save_ms"),
                    jf(&v, "xl_restore_ms"),
                    jf(&v, "total_ms"),
                    jf(&v, "reconnect_ms")
                ),
            ) {
                break;
            }
            if round == 1 {
                let src_dev = xen::xs_ls(&format!("/local/domain/0/backend/vtpm/{before}"));
                e.check("migrate-source-released", src_dev.is_empty(), format!("backend/vtpm/{before}: {} keys left", src_dev.len()));
                let row = life_row(cx, "mig-a");
                e.check("migrate-registry", jf(&row, "guest_domid") == new && jf(&row, "state") == "running", format!("registry: domid {} state {}", jf(&row, "guest_domid"), jf(&row, "state")));
                let marker = xen::xs_read(&format!("/local/domain/0/backend/vtpm/{new}/0/xvtpm-resume"));
                e.check("migrate-marker-taken", marker.is_none(), format!("resume marker after the reconnect: {marker:?}"));
            }
            match downtime(cx, "mig-a", from) {
                Some(ms) => {
                    println!(
                        "PERF p6-vtpm-downtime-ms-r{round}={ms} (largest gap between the guest's 0.1 s ticks; non-live: xl save {} ms, xl restore {} ms, xl-vtpm migrate {} ms, tpmif reconnected {} ms after the unpause)",
                        jf(&v, "xl_save_ms"),
                        jf(&v, "xl_restore_ms"),
                        jf(&v, "total_ms"),
                        jf(&v, "reconnect_ms")
                    );
                    downs.push(ms);
                }
                None => e.add(format!("no-ticks-after-round-{round}")),
            }
            if round == 1 {
                let nonce = xen::nonce(16);
                let a = guest_cmd(cx, "mig-a", 1, &format!("migcheck:{nonce}"), 240);
                println!("[mig-a] {a}");
                e.check("migrate-guest-ek", !ek.is_empty() && field(&a, "ek") == ek, format!("EK sha256 before {} after {}", ek, field(&a, "ek")));
                e.check("migrate-guest-persistent", field(&a, "persistent") == "kept", "0x81000010 still there and readable");
                e.check("migrate-guest-nv", field(&a, "nv") == "kept", "NV 0x01500016 contents kept");
                e.check("migrate-guest-pcr16", pcr == PCR_AFTER && field(&a, "pcr16") == pcr, format!("PCR 16 before {pcr} after {} (kept, as across a suspend)", field(&a, "pcr16")));
                e.check("migrate-guest-quote", field(&a, "quote") == "verified", "a fresh ECC AK quote over PCR 16 verified (tpm2_checkquote; a wrong nonce is rejected)");
            }
        }
        if !e.is_empty() {
            show_tail("mig-a console (GUEST lines)", &cons("mig-a").lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 25);
            show_tail("mig-a vtpm.log", &xen::read_text(&format!("/var/lib/xvtpm/vtpms/{}/vtpm.log", jf(&life_row(cx, "mig-a"), "vtpm_uuid"))), 25);
        } else {
            ok = true;
        }
        e.verdict(format!("mig-a moved with its vTPM (process kept, EK/key/NV/PCR 16 kept, quote verified); downtime seen by the guest {downs:?} ms"))
    });

    // migrate-recover: failure points, then destroy
    r.phase("migrate-recover", deadline(600), |cx| {
        let mut e = Errs::default();
        if !ok || xen::domid("mig-a").is_none() {
            if let Some(w) = watch.take() {
                let _ = w.stop(cx, 5);
            }
            if xen::domid("mig-a").is_some() {
                let _ = Cmd::new(&["xl-vtpm", "destroy", "mig-a"]).secs(60).run(cx);
            }
            return Outcome::fail("needs the migrate phase");
        }
        // 1. xl migrate fails before the guest moved
        let d0 = xen::domid("mig-a").unwrap_or_default();
        let p0 = vtpm_pid(cx, "mig-a");
        let (rc, _, all) = xl_vtpm_migrate(cx, &["mig-a", "localhost", "--ssh", "false"], "/tmp/xl-mig-a-fail.out");
        show("xl-vtpm migrate --ssh false", &all);
        e.check(
            "migrate-fail-before",
            rc == 1 && all.contains("before the guest moved") && xen::domid("mig-a").as_deref() == Some(d0.as_str()) && vtpm_pid(cx, "mig-a") == p0 && pid_up(p0),
            format!("rc={rc}; the guest stays domain {d0}, vTPM process {p0:?} unchanged"),
        );
        let a = guest_cmd(cx, "mig-a", 2, "getrandom", 120);
        e.check("migrate-fail-before-tpm", a.contains("getrandom PASS"), &a);
        // 2. a non-live xl-vtpm migrate cut short after `xl save` (its restore not run); the vTPM
        // process killed meanwhile: --finish restores the kept save file
        let file = save_path(cx, "mig-a");
        let o = Cmd::new(&["xl", "save", "mig-a", &file]).secs(240).save("/tmp/xl-mig-a-cut.out").run(cx);
        e.check("migrate-cut-saved", o.ok() && xen::domid("mig-a").is_none(), format!("xl save mig-a {file} rc={}: domain {d0} gone, the guest only in the save file", o.rc));
        if let Some(p) = p0 {
            crate::cmd::signal(p, nix::sys::signal::Signal::SIGKILL);
            cx.wait_until(10, || !pid_up(p0));
        }
        let (rc, v, all) = xl_vtpm_migrate(cx, &["mig-a", "--finish"], "/tmp/xl-mig-a-finish.out");
        show("xl-vtpm migrate --finish", &all);
        let p1 = vtpm_pid(cx, "mig-a");
        let d1 = xen::domid("mig-a").unwrap_or_default();
        e.check(
            "migrate-finish",
            rc == 0 && !d1.is_empty() && jf(&v, "to_domid") == d1 && jf(&v, "non_live") == "true" && jf(&v, "vtpm_restarted") == "true" && p1.is_some() && p1 != p0 && !save_left(cx, "mig-a"),
            format!("rc={rc}: the save file restored as domain {d1} (xl restore {} ms) and resumed, vTPM started again as process {p1:?} (was {p0:?}, killed -9), save file removed", jf(&v, "xl_restore_ms")),
        );
        let nonce = xen::nonce(16);
        let a = guest_cmd(cx, "mig-a", 3, &format!("migcheck:{nonce}"), 240);
        println!("[mig-a] {a}");
        e.check("migrate-recover-ek", !ek.is_empty() && field(&a, "ek") == ek, format!("EK before {ek} after {}", field(&a, "ek")));
        e.check("migrate-recover-persistent-nv", field(&a, "persistent") == "kept" && field(&a, "nv") == "kept", "0x81000010 and NV kept across the killed vTPM");
        e.check("migrate-recover-pcr16-reset", field(&a, "pcr16") == PCR_ZERO, format!("PCR 16 {} (reset: the killed process's volatile state is gone)", field(&a, "pcr16")));
        e.check("migrate-recover-quote", field(&a, "quote") == "verified", "fresh quote verified");
        // 3. the restored guest reboots (its xl monitor is now `xl restore`, whose command line
        // names neither the guest nor its config): the watcher keeps its vTPM
        let before = xen::domid("mig-a").unwrap_or_default();
        let o = Cmd::new(&["xl", "reboot", "mig-a"]).secs(60).run(cx);
        let back = cx.wait_every(180, Duration::from_secs(1), || xen::domid("mig-a").is_some_and(|d| d != before));
        let d2 = xen::domid("mig-a").unwrap_or_default();
        let connected = cx.wait_every(240, Duration::from_secs(1), || xen::xs_read(&format!("/local/domain/0/backend/vtpm/{d2}/0/state")).as_deref() == Some("4"));
        let said = xen::read_text(WLOG).lines().any(|l| l.contains(&format!("mig-a: rebooted as domid {d2}; vTPM kept")));
        e.check(
            "migrate-reboot-after-restore",
            o.ok() && back && connected && said && pid_up(p1) && vtpm_pid(cx, "mig-a") == p1,
            format!("xl reboot rc={}: domain {before} -> {d2}, tpmif connected: {connected}, watcher said rebooted: {said}, vTPM process {p1:?} kept: {}", o.rc, pid_up(p1)),
        );
        // 4. destroy: domain and vTPM process gone
        let o = Cmd::new(&["xl-vtpm", "destroy", "mig-a"]).env("NO_COLOR", "1").secs(90).run(cx);
        let gone = cx.wait_until(20, || !pid_up(p1));
        e.check("migrate-destroy", o.ok() && xen::domid("mig-a").is_none() && gone, format!("xl-vtpm destroy rc={}; domain gone, vTPM process {p1:?} gone", o.rc));
        if xen::domid("mig-a").is_some() {
            xen::xl_destroy(cx, "mig-a", 60);
        }
        if !e.is_empty() {
            show_tail("mig-a console (GUEST lines)", &cons("mig-a").lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 25);
        }
        if let Some(w) = watch.take() {
            let _ = w.stop(cx, 5);
        }
        show_tail("watch log", &xen::read_text(WLOG), 12);
        e.verdict("xl migrate failing before the move leaves the guest and vTPM in place; a non-live move cut short after xl save, with the vTPM killed -9, finishes with --finish (restored from the kept file) (EK, key, NV kept; PCR 16 reset); the restored guest reboots with its vTPM kept by the watcher; destroy stops the vTPM")
    });
    if let Some(mut w) = watch.take() {
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
}

/// The guest of `migrate-vtpmdom`, its vTPM domain (lifedom's `vtpm-GUEST` scheme) and its config.
const DG: &str = "mig-d";
const DV: &str = "vtpm-mig-d";
const DCFG: &str = "/etc/xen/mig-d.cfg";

/// No domain has id `domid` any more (`xl domname` fails).
fn domid_gone(cx: &Cx, domid: &str) -> bool {
    !domid.is_empty() && !Cmd::new(&["xl", "domname", domid]).secs(30).run(cx).ok()
}

/// The vTPM domain `v`'s tpmif backend directory of guest domain `g`.
fn vbackend(v: &str, g: &str) -> String {
    format!("/local/domain/{v}/backend/vtpm/{g}")
}

/// `reconnect_ms` (or another number) is in the answer.
fn has_ms(v: &Value, key: &str) -> bool {
    jf(v, key).parse::<u64>().is_ok()
}

/// What helps when `migrate-vtpmdom` fails: the guest's GUEST lines, the vTPM domain's console,
/// its backend directory, the domains and the registry.
fn vtpmdom_diag(cx: &Cx) {
    show_tail(&format!("{DG} console (GUEST lines)"), &cons(DG).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 25);
    show_tail(&format!("{DV} console"), &xen::console(DV), 30);
    if let Some(v) = xen::domid(DV) {
        for l in xen::xs_ls(&format!("/local/domain/{v}/backend/vtpm")).iter().take(40) {
            println!("[{DV} backend] {l}");
        }
    }
    show("xl list", &Cmd::sh("xl list").secs(30).run(cx).all());
    super::life::life_list(cx);
}

/// `migrate-vtpmdom`: a PV guest whose vTPM runs in its own domain, moved with `xl-vtpm migrate
/// --non-live` twice (the vTPM domain stays and gets the resume marker on its own backend
/// directory); the move refused with that domain stopped; `xl-vtpm destroy`.
fn vtpmdom_move(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    let rd = super::vtpmdom::RAMDISK;
    if std::fs::metadata(rd).map(|m| m.len() == 0).unwrap_or(true) {
        return Outcome::fail(format!("the vTPM-domain image {rd} not built"));
    }
    if xen::domid(DG).is_some() || xen::domid(DV).is_some() {
        return Outcome::fail(format!("{DG} or {DV} runs already (an earlier phase's leftover)"));
    }
    // the vTPM domain's state disk: a loop device and blkback (vtpmdom.rs loads them too)
    super::vtpmdom::load_block_modules(cx, &mut e);
    if !e.is_empty() {
        return Outcome::fail(e.joined());
    }
    if let Err(w) = write_cfg(DCFG, DG, "role=mig hold=1 tick=1", Some(DV)) {
        return Outcome::fail(w);
    }
    xen::show_cfg(&format!("{DG}.cfg"), &xen::read_text(DCFG), &["name", "memory", "vtpm", "extra"]);
    let t0 = std::time::Instant::now();
    let o = Cmd::new(&["xl-vtpm", "create", DCFG]).env("NO_COLOR", "1").secs(300).save("/tmp/xl-mig-d-create.out").run(cx);
    println!("PERF migrate-vtpmdom-create-s={:.1} (xl-vtpm create {DG}.cfg: a new vTPM identity and disk, {DV} booted and manufactured, then the guest)", t0.elapsed().as_secs_f64());
    if !o.ok() {
        show_tail("xl-vtpm create mig-d", &o.all(), 20);
        vtpmdom_diag(cx);
        vtpmdom_cleanup(cx, "");
        return Outcome::fail(format!("xl-vtpm create rc={}", o.rc));
    }
    let row = life_row(cx, DG);
    let uuid = jf(&row, "vtpm_uuid");
    let vd0 = xen::domid(DV).unwrap_or_default();
    let g0 = xen::domid(DG).unwrap_or_default();
    let mem = xen::read_text(&format!("/run/xvtpm/vtpms/{uuid}.xl.cfg")).lines().find_map(|l| l.strip_prefix("memory = ").map(str::to_string)).unwrap_or_default();
    e.check(
        "migrate-vtpmdom-created",
        jf(&row, "state") == "running" && jf(&row, "vtpm_domain") == DV && !vd0.is_empty() && jf(&row, "vtpm_domid") == vd0 && !g0.is_empty() && jf(&row, "guest_domid") == g0 && !uuid.is_empty() && uuid != "null",
        format!("{DG} domid {g0}, its vTPM {uuid} in {DV} domid {vd0} ({mem} MiB); registry: {}", super::life::row_line(&row)),
    );
    if !cx.wait_every(300, Duration::from_secs(1), || cons(DG).contains("GUEST-HOLD")) {
        e.add("no-GUEST-HOLD");
    }
    let c = cons(DG);
    for m in super::guest_checks(&c, DG, "boot", &["tpm0", "startup", "getrandom", "ek", "persistent", "nv-write", "pcrextend"]) {
        e.add(m);
    }
    let ek = ek_hash(&c);
    let pcr = after_prefix(&c, "GUEST-PCR16 ").unwrap_or_default().trim().to_string();
    if !e.is_empty() {
        vtpmdom_diag(cx);
        vtpmdom_cleanup(cx, &uuid);
        return e.verdict("");
    }
    let mut downs = Vec::new();
    for round in 1..=2 {
        if round == 2 && r_past(cx) {
            break;
        }
        let before = xen::domid(DG).unwrap_or_default();
        let from = last_tick(DG);
        let (rc, v, all) = xl_vtpm_migrate(cx, &[DG, "localhost", "--non-live"], &format!("/tmp/xl-mig-d-{round}.out"));
        show("xl-vtpm migrate", &all);
        let new = xen::domid(DG).unwrap_or_default();
        let ok = rc == 0
            && !new.is_empty()
            && new != before
            && jf(&v, "from_domid") == before
            && jf(&v, "to_domid") == new
            && jf(&v, "non_live") == "true"
            && jf(&v, "vtpm_domain") == DV
            && jf(&v, "vtpm_pid") == "0"
            && jf(&v, "vtpm_restarted") == "false"
            && has_ms(&v, "reconnect_ms");
        if !e.check(
            "migrate-vtpmdom-xl-vtpm",
            ok,
            format!(
                "round {round}: rc={rc} domid {before} -> {new} (from_domid {}, to_domid {}), non_live {}, vtpm_domain {}, vtpm_pid {}, vtpm_restarted {}; xl save {} ms, xl restore {} ms, total {} ms, reconnect {} ms",
                jf(&v, "from_domid"),
                jf(&v, "to_domid"),
                jf(&v, "non_live"),
                jf(&v, "vtpm_domain"),
                jf(&v, "vtpm_pid"),
                jf(&v, "vtpm_restarted"),
                jf(&v, "xl_save_ms"),
                jf(&v, "xl_restore_ms"),
                jf(&v, "total_ms"),
                jf(&v, "reconnect_ms")
            ),
        ) {
            break;
        }
        let vd = xen::domid(DV).unwrap_or_default();
        let ready = xen::xs_read(&format!("/local/domain/{vd0}/data/xvtpm/ready")).unwrap_or_default();
        let exited = xen::console(DV).lines().any(|l| l.starts_with("VTPMDOM-EXIT"));
        e.check(
            "migrate-vtpmdom-same-vtpm-domain",
            vd == vd0 && ready == uuid && !exited,
            format!("round {round}: {DV} domid {vd0} -> {} (data/xvtpm/ready = '{ready}', VTPMDOM-EXIT on its console: {exited})", none(&vd)),
        );
        let gone = cx.wait_until(30, || domid_gone(cx, &before));
        e.check(
            "migrate-vtpmdom-source-gone",
            gone && !save_left(cx, DG),
            format!("round {round}: the source domain {before} gone: {gone}; save file {} removed: {}", save_path(cx, DG), !save_left(cx, DG)),
        );
        if round == 1 {
            // a driver domain removes its own backend directory of a domain that is gone
            let released = cx.wait_until(30, || xen::xs_ls(&vbackend(&vd0, &before)).is_empty());
            e.check("migrate-vtpmdom-source-released", released, format!("{}: {} keys left", vbackend(&vd0, &before), xen::xs_ls(&vbackend(&vd0, &before)).len()));
            let r = life_row(cx, DG);
            e.check(
                "migrate-vtpmdom-registry",
                jf(&r, "state") == "running" && jf(&r, "guest_domid") == new && jf(&r, "vtpm_domid") == vd0 && jf(&r, "vtpm_domain") == DV,
                format!("registry: state {} guest_domid {} (new {new}), vtpm_domain {} vtpm_domid {} (unchanged {vd0})", jf(&r, "state"), jf(&r, "guest_domid"), jf(&r, "vtpm_domain"), jf(&r, "vtpm_domid")),
            );
            let keys = xen::xs_ls(&vbackend(&vd0, &new));
            let marker: Vec<&String> = keys.iter().filter(|l| l.contains("/xvtpm-resume")).collect();
            let connected = keys.iter().any(|l| l.ends_with("/state = \"4\"")) || cx.wait_until(30, || xen::xs_ls(&vbackend(&vd0, &new)).iter().any(|l| l.ends_with("/state = \"4\"")));
            e.check(
                "migrate-vtpmdom-marker-taken",
                marker.is_empty() && connected,
                format!("{}: connected (state 4): {connected}; resume marker after the reconnect: {marker:?}", vbackend(&vd0, &new)),
            );
        }
        // the vTPM domain's own word that it took the marker (its log on its console)
        let said = |l: &str| l.contains("resumed after a migration") && l.contains(&format!("device=vtpm {new}/")) && l.contains(&format!("from_domain={before}"));
        let resumed = cx.wait_until(15, || xen::console(DV).lines().any(said));
        let line = xen::console(DV).lines().find(|l| said(l)).unwrap_or_default().to_string();
        e.check(
            "migrate-vtpmdom-resumed",
            resumed,
            if resumed { format!("round {round}: {DV}: {line}") } else { format!("round {round}: no 'resumed after a migration' for device vtpm {new}/… from_domain={before} on {DV}'s console") },
        );
        match downtime(cx, DG, from) {
            Some(ms) => {
                println!(
                    "PERF p6-vtpmdom-downtime-ms-r{round}={ms} (largest gap between the guest's 0.1 s ticks; its vTPM in the domain {DV}; non-live: xl save {} ms, xl restore {} ms, xl-vtpm migrate {} ms, tpmif reconnected {} ms after the unpause)",
                    jf(&v, "xl_save_ms"),
                    jf(&v, "xl_restore_ms"),
                    jf(&v, "total_ms"),
                    jf(&v, "reconnect_ms")
                );
                downs.push(ms);
            }
            None => e.add(format!("no-ticks-after-round-{round}")),
        }
        if round == 1 {
            let nonce = xen::nonce(16);
            let a = guest_cmd(cx, DG, 1, &format!("migcheck:{nonce}"), 240);
            println!("[{DG}] {a}");
            e.check("migrate-vtpmdom-guest-ek", !ek.is_empty() && field(&a, "ek") == ek, format!("EK sha256 before {ek} after {}", field(&a, "ek")));
            e.check("migrate-vtpmdom-guest-persistent", field(&a, "persistent") == "kept", "0x81000010 still there and readable");
            e.check("migrate-vtpmdom-guest-nv", field(&a, "nv") == "kept", "NV 0x01500016 contents kept");
            e.check(
                "migrate-vtpmdom-guest-pcr16",
                pcr == PCR_AFTER && field(&a, "pcr16") == pcr,
                format!("PCR 16 before {pcr} after {} (kept: the vTPM domain took the resume marker, no power cycle)", field(&a, "pcr16")),
            );
            e.check("migrate-vtpmdom-guest-quote", field(&a, "quote") == "verified", "a fresh ECC AK quote over PCR 16 verified (tpm2_checkquote; a wrong nonce is rejected)");
        }
    }
    // refused: the vTPM domain stopped (`xl-vtpm vtpm stop`), the guest runs on without its TPM
    if e.is_empty() && !r_past(cx) {
        let gd = xen::domid(DG).unwrap_or_default();
        let o = Cmd::new(&["xl-vtpm", "vtpm", "stop", &uuid]).env("NO_COLOR", "1").secs(90).save("/tmp/xl-mig-d-vstop.out").run(cx);
        let stopped = o.ok() && cx.wait_until(60, || xen::domain_gone(DV));
        if !stopped {
            show_tail("xl-vtpm vtpm stop", &o.all(), 10);
        }
        let (rc, _, all) = xl_vtpm_migrate(cx, &[DG, "localhost", "--non-live"], "/tmp/xl-mig-d-refused.out");
        show("xl-vtpm migrate (vTPM domain stopped)", &all);
        let still = xen::domid(DG).unwrap_or_default();
        let r = life_row(cx, DG);
        e.check(
            "migrate-vtpmdom-refused",
            stopped && rc == 6 && still == gd && !save_left(cx, DG) && jf(&r, "guest_domid") == gd,
            format!("{DV} stopped (xl-vtpm vtpm stop rc={}): {stopped}; xl-vtpm migrate rc={rc} (want 6, nothing moved); {DG} domid {gd} -> {}, save file left: {}, registry guest_domid {}", o.rc, none(&still), save_left(cx, DG), jf(&r, "guest_domid")),
        );
        // the reason given must be the stopped vTPM domain (docs/migration.md: "A vTPM domain
        // that is not running is refused before anything moves (exit 6 …)"), not another one
        let err = jf(&xen::parse_json(&all).unwrap_or(Value::Null), "error");
        let err = if err.is_empty() { all.trim().to_string() } else { err };
        e.check(
            "migrate-vtpmdom-refused-reason",
            err.contains("runs in its own domain") && err.contains(DV) && err.contains("not running") && !err.contains("device model"),
            format!("xl-vtpm said: {err}"),
        );
        // whatever a move that was not refused started in dom0 for this vTPM
        if let Ok(p) = jf(&r, "vtpm_pid").parse::<u32>()
            && p > 0
            && pid_up(Some(p))
        {
            println!("migrate-vtpmdom: a dom0 vTPM process {p} runs for {uuid}; stopping it");
            let _ = Cmd::new(&["xl-vtpm", "vtpm", "stop", &uuid]).secs(60).run(cx);
            crate::cmd::signal(p, nix::sys::signal::Signal::SIGTERM);
        }
        // the vTPM domain again (from its disk), so that destroy ends a running pair
        let o = Cmd::new(&["xl-vtpm", "vtpm", "start", &uuid]).env("NO_COLOR", "1").secs(180).save("/tmp/xl-mig-d-vstart.out").run(cx);
        println!("INFO migrate-vtpmdom vtpm-start rc={} {DV} domid {} (booted again from its disk for the destroy)", o.rc, none(&xen::domid(DV).unwrap_or_default()));
    }
    // destroy: the guest and its vTPM domain gone, the loop device released
    let vd = xen::domid(DV).unwrap_or_default();
    let o = Cmd::new(&["xl-vtpm", "destroy", DG]).env("NO_COLOR", "1").secs(150).save("/tmp/xl-mig-d-destroy.out").run(cx);
    let g_gone = cx.wait_until(30, || xen::domain_gone(DG));
    let v_gone = cx.wait_until(60, || xen::domain_gone(DV));
    let noloop = cx.wait_until(15, || xen::vd_loop(&uuid).is_empty());
    let stopped = cx.wait_until(15, || jf(&life_row(cx, DG), "state") == "stopped");
    if !o.ok() {
        show_tail("xl-vtpm destroy", &o.all(), 10);
    }
    e.check(
        "migrate-vtpmdom-destroy",
        o.ok() && g_gone && v_gone && noloop && stopped,
        format!(
            "xl-vtpm destroy {DG} rc={}: guest gone {g_gone}, {DV} (domid {}) gone {v_gone}, loop device released {noloop} ({}), registry state stopped {stopped}",
            o.rc,
            none(&vd),
            xen::vd_loop(&uuid).join(" ")
        ),
    );
    if !e.is_empty() {
        vtpmdom_diag(cx);
    }
    vtpmdom_cleanup(cx, &uuid);
    e.verdict(format!(
        "{DG} moved twice with its vTPM in its own domain {DV} (domid {vd0} kept, resume marker on its backend: EK/key/NV/PCR 16 kept, quote verified); refused with {DV} stopped; destroyed; downtime seen by the guest {downs:?} ms"
    ))
}

/// Nothing of `migrate-vtpmdom` may outlive it (teardown checks that no domU is left).
fn vtpmdom_cleanup(cx: &Cx, uuid: &str) {
    if xen::domid(DG).is_some() || xen::domid(DV).is_some() {
        println!("migrate-vtpmdom: cleaning up (xl-vtpm destroy {DG})");
        let _ = Cmd::new(&["xl-vtpm", "destroy", DG]).secs(150).run(cx);
        for d in [DG, DV] {
            xen::destroy_if_running(cx, d);
        }
    }
    if !uuid.is_empty() {
        let _ = std::fs::remove_file(format!("/var/lib/xvtpm/migrate-save/{uuid}.xlsave"));
    }
}

/// The scenario deadline is near (skip optional rounds).
fn r_past(cx: &Cx) -> bool {
    cx.limit(Duration::from_secs(200)).1
}

#[cfg(test)]
mod tests {
    use super::max_gap;

    #[test]
    fn the_largest_tick_gap_after_a_start() {
        let t = [1.0, 1.1, 1.2, 4.2, 4.3, 4.4, 4.5, 4.6, 4.7];
        let (g, after) = max_gap(&t, 1.1).unwrap();
        assert!((g - 3.0).abs() < 1e-9);
        assert_eq!(after, 6);
        assert!(max_gap(&t, 9.0).is_none());
    }
}
