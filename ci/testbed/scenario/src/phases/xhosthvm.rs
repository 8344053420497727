//! migrate-xhost-hvm: an HVM guest, whose device model emulates its TPM, moved to the testbed's
//! second host and back with `xl-vtpm migrate GUEST HOST --non-live` (run between migrate-xhost
//! and the end of host B, with the HVM phases on: `XVTPM_TESTBED_HVM=1` or `mig`). The guest is
//! hvm-mig's (SeaBIOS, QEMU's tpm-crb, the xenstore client: `mig=1 tick=1`) as `hvm-x` with
//! 192 MiB: its saved memory is twice in dom0's ramfs during a move (the source's copy, kept
//! until the guest runs there, and the one the receiver keeps until its vTPM runs there).
//! Checks, one RESULT:
//!   - `xl-vtpm create` on host A, the boot's checks (PCR 16 extended, NV, 0x81000010, EK, quote);
//!   - a live move is refused before anything moves (exit 6 naming --non-live): the guest the
//!     same domain with the same vTPM process, its TPM answering;
//!   - A → B and B → A non-live: JSON `hvm` true, a new domain with one device model, in the
//!     guest the same EK, key and NV, PCR 16 as it was (the TPM's state travelled sealed in the
//!     saved guest and loaded into the vTPM process the receiver started from the moved
//!     identity), a fresh quote verified; the registry names the holder, whose vTPM runs; the
//!     other host refuses to start it naming the holder; P6 (`PERF p6-xhost-hvm-downtime-ms-rN`);
//!   - two moves A → B cut by `kill -9` of the source, each completed by `--finish`: (k1) once
//!     B holds the whole saved guest, before the vTPM's identity moved — the receiver removes
//!     what it kept, `--finish` exits 1 ("never arrived", the guest restored on A from its saved
//!     memory, its vTPM started again if the move had stopped it); (k2) once B's manager imported
//!     the identity — the receiver keeps the saved guest, `--finish` exits 0 with the guest
//!     restored and resumed on B; after each the guest's EK, key, NV, PCR 16 and a fresh quote,
//!     the registry and no file left behind;
//!   - `xl-vtpm destroy` on the holder, the pair and both identities removed.

use std::process::Child;
use std::time::{Duration, Instant};

use super::hvmmig::{dms_of, mem_available_mib};
use super::migrate::{cons, downtime, field, guest_cmd, last_tick};
use super::xhost::{
    A_HOST, A_POLICY, A_STATE, B_HOST, B_POLICY, B_STATE, SSH_LOCAL, VENDOR_INT, VENDOR_ROOT, a_env, b_env, b_log_count, env_words, json, kill_source, leftovers, on, receivers, row,
    spawn_move, vtpm_running,
};
use super::none;
use crate::cmd::{Output, pid_up, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, why};
use crate::xen::{self, jf};

const NAME: &str = "hvm-x";
const CFG: &str = "/etc/xen/hvm-x.cfg";
const SRC: &str = "/etc/xen/hvm-mig.cfg";
const MEMORY_MIB: u64 = 192;
/// dom0 needs, besides the two copies of the guest's memory: the restored domain's device
/// model and xl, with a margin.
const MARGIN_MIB: u64 = 200;

/// hvm-mig.cfg as `hvm-x` with MEMORY_MIB.
fn write_cfg() -> Result<(), String> {
    let mut out = String::new();
    for l in xen::read_text(SRC).lines() {
        let t = l.trim_start();
        let l = if t.starts_with("name ") || t.starts_with("name=") {
            format!("name = \"{NAME}\"")
        } else if t.starts_with("serial ") || t.starts_with("serial=") {
            format!("serial = \"file:/var/log/xen/{NAME}.serial\"")
        } else if t.starts_with("memory ") || t.starts_with("memory=") {
            format!("memory = {MEMORY_MIB}")
        } else {
            l.to_string()
        };
        out.push_str(&l);
        out.push('\n');
    }
    if !out.contains(&format!("name = \"{NAME}\"")) || !out.contains(&format!("memory = {MEMORY_MIB}")) || !out.contains("model=crb") {
        return Err(format!("{CFG}: name/memory not substituted in {SRC}, or no model=crb vTPM there"));
    }
    std::fs::write(CFG, out).map_err(|e| format!("{CFG}: {e}"))
}

fn console_lines() -> String {
    cons(NAME).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n")
}

pub(super) fn hvm_move(cx: &Cx) -> Outcome {
    let mut e = Errs::default();
    let (a, b) = (a_env(), b_env());
    if xen::domid(NAME).is_some() {
        return Outcome::fail(format!("{NAME} runs already (an earlier run's leftover)"));
    }
    let dm = super::hvm::dm_path();
    if dm == "none" || !std::path::Path::new(&dm).is_file() {
        return Outcome::fail(format!("no TPM-enabled device model in dom0 (hvm_dm={dm})"));
    }
    if let Err(w) = write_cfg() {
        return Outcome::fail(w);
    }
    let (avail, need) = (mem_available_mib(), 2 * MEMORY_MIB + MARGIN_MIB);
    println!("INFO migrate-xhost-hvm: dom0 MemAvailable {avail} MiB (the moves need {need})");
    if avail < need {
        return Outcome::fail(format!("dom0 MemAvailable {avail} MiB < {need} MiB: two copies of the guest's memory do not fit in dom0's ramfs (raise XVTPM_TESTBED_DOM0_MEM)"));
    }
    let o = on(&a, &["xl-vtpm", "create", CFG]).secs(180).save("/tmp/xl-hvm-x-create.out").run(cx);
    if !o.ok() {
        show_tail("xl-vtpm create hvm-x", &o.all(), 20);
        cleanup(cx, "");
        return Outcome::fail(format!("xl-vtpm create {CFG} (host A) rc={}", o.rc));
    }
    let r0 = row(cx, &a, NAME);
    let uuid = jf(&r0, "vtpm_uuid");
    let pid0 = jf(&r0, "vtpm_pid").parse::<u32>().ok();
    let (ek, pcr) = super::hvmmig::boot_checks(cx, &mut e, NAME, 300);
    e.check("xhost-hvm-boot", !ek.is_empty() && !pcr.is_empty() && pcr != "0".repeat(64), format!("{NAME} on host A: vTPM {} (pid {}), EK sha256 {}, PCR 16 {}", none(&uuid), none(&jf(&r0, "vtpm_pid")), none(&ek), none(&pcr)));
    if !e.is_empty() {
        show_tail("hvm-x console (GUEST lines)", &console_lines(), 25);
        cleanup(cx, &uuid);
        return e.verdict("");
    }

    // live: refused before anything moves (its device model would load the TPM's state before
    // the vTPM's identity could be there)
    let d0 = xen::domid(NAME).unwrap_or_default();
    let receiver = format!("{} xl-vtpm migrate-receive", env_words(&b));
    let live = on(&a, &["xl-vtpm", "migrate", NAME, B_HOST, "--ssh", SSH_LOCAL, "--receiver", &receiver, "--ek-ca", VENDOR_ROOT, "--ek-intermediate", VENDOR_INT, "--host-pcrs-policy", B_POLICY])
        .secs(120)
        .run(cx);
    let a1 = guest_cmd(cx, NAME, 1, "getrandom", 120);
    e.check(
        "xhost-hvm-live-refused",
        live.rc == 6 && live.all().contains("--non-live") && xen::domid(NAME).as_deref() == Some(d0.as_str()) && pid_up(pid0) && a1.contains("getrandom PASS"),
        format!("a live move rc={} (want 6 naming --non-live): {}; the guest stays domain {d0}, vTPM process {pid0:?} up: {}; {a1}", live.rc, live.tail1(2), pid_up(pid0)),
    );

    let hops = [(1u32, &a, A_HOST, &b, B_HOST, B_POLICY), (2, &b, B_HOST, &a, A_HOST, A_POLICY)];
    let mut downs = Vec::new();
    for (round, from, from_name, to, to_name, policy) in hops {
        if !e.is_empty() {
            break;
        }
        let receiver = format!("{} xl-vtpm migrate-receive", env_words(to));
        let argv = [
            "xl-vtpm", "--json", "migrate", NAME, to_name, "--non-live", "--ssh", SSH_LOCAL, "--receiver", &receiver, "--ek-ca", VENDOR_ROOT, "--ek-intermediate", VENDOR_INT, "--host-pcrs-policy", policy,
        ];
        println!("migrate-xhost-hvm round {round}: {} (source env: {})", argv.join(" "), env_words(from));
        let before = xen::domid(NAME).unwrap_or_default();
        let ticks_from = last_tick(NAME);
        let save = format!("/tmp/xl-hvm-x-{round}.out");
        let o = on(from, &argv).secs(420).save_split(&save, &format!("{save}.err")).run(cx);
        let v = json(&o);
        show("xl-vtpm migrate (HVM, cross-host)", &o.all());
        let new = xen::domid(NAME).unwrap_or_default();
        let t = format!("round {round} ({from_name} → {to_name})");
        if !e.check(
            "xhost-hvm-xl-vtpm",
            o.ok() && !new.is_empty() && new != before && jf(&v, "hvm") == "true" && jf(&v, "tpm_kept") == "true" && dms_of(&new) == 1 && dms_of(&before) == 0,
            format!(
                "{t}: rc={}{} domid {before} -> {}, device models of the new domain {}, of the old {}; xl save {} ms, {} bytes sent, xl restore there {} ms, identity {} ms, total {} ms",
                o.rc,
                if o.timed_out { " (killed at its limit)" } else { "" },
                none(&new),
                dms_of(&new),
                dms_of(&before),
                jf(&v, "xl_save_ms"),
                jf(&v, "saved_bytes"),
                jf(&v, "xl_restore_ms"),
                jf(&v, "transfer_ms"),
                jf(&v, "total_ms")
            ),
        ) {
            show_tail("xl-vtpm migrate stderr", &o.stderr, 15);
            break;
        }
        match downtime(cx, NAME, ticks_from) {
            Some(ms) => {
                println!(
                    "PERF p6-xhost-hvm-downtime-ms-r{round}={ms} (largest gap between the HVM guest's 0.1 s ticks; {from_name} → {to_name} in one dom0, non-live; xl save {} ms, xl restore {} ms, xl-vtpm migrate {} ms)",
                    jf(&v, "xl_save_ms"),
                    jf(&v, "xl_restore_ms"),
                    jf(&v, "total_ms")
                );
                downs.push(ms);
            }
            None => e.add(format!("no-ticks-after-round-{round}")),
        }
        let g = guest_cmd(cx, NAME, round + 1, &format!("migcheck:{}", xen::nonce(16)), 240);
        println!("[{NAME}] {g}");
        e.check("xhost-hvm-guest-ek", field(&g, "ek") == ek, format!("{t}: EK sha256 before {ek} after {}", field(&g, "ek")));
        e.check("xhost-hvm-guest-persistent", field(&g, "persistent") == "kept", format!("{t}: 0x81000010 still there and readable"));
        e.check("xhost-hvm-guest-nv", field(&g, "nv") == "kept", format!("{t}: NV 0x01500016 contents kept"));
        e.check("xhost-hvm-guest-pcr16", field(&g, "pcr16") == pcr, format!("{t}: PCR 16 before {pcr} after {} (the TPM's state travelled in the saved guest)", field(&g, "pcr16")));
        e.check("xhost-hvm-guest-quote", field(&g, "quote") == "verified", format!("{t}: a fresh ECC AK quote over PCR 16 verified"));
        let (ra, rb) = (row(cx, &a, NAME), row(cx, &b, NAME));
        e.check(
            "xhost-hvm-registry",
            jf(&ra, "host") == to_name && jf(&rb, "host") == to_name && jf(&ra, "state") == "running" && jf(&ra, "guest_domid") == new,
            format!("{t}: the registry names host {} (under B's env {}), state {}, guest domid {}", none(&jf(&ra, "host")), none(&jf(&rb, "host")), jf(&ra, "state"), jf(&ra, "guest_domid")),
        );
        let runs = vtpm_running(cx, to, &uuid);
        e.check("xhost-hvm-vtpm-runs", runs, format!("{t}: {to_name}'s xl-vtpm vtpm list names {uuid} running: {runs}"));
        let o = on(from, &["xl-vtpm", "vtpm", "start", &uuid]).secs(60).run(cx);
        e.check("xhost-hvm-refused", !o.ok() && o.all().contains(to_name), format!("{t}: {from_name}'s xl-vtpm vtpm start rc={} (want a refusal naming {to_name}): {}", o.rc, o.tail1(2)));
    }
    let mut killed = String::new();
    if e.is_empty() {
        killed = kill_rounds(cx, &mut e, &uuid, &ek, &pcr);
    }
    if !e.is_empty() {
        show_tail("hvm-x console (GUEST lines)", &console_lines(), 25);
        show_tail("qemu-dm hvm-x", &xen::read_text(&format!("/var/log/xen/qemu-dm-{NAME}.log")), 15);
        show_tail("qemu-dm hvm-x--incoming", &xen::read_text(&format!("/var/log/xen/qemu-dm-{NAME}--incoming.log")), 15);
    }
    cleanup(cx, &uuid);
    e.verdict(format!(
        "HVM guest {NAME} (tpm-crb, device model's TPM) moved to {B_HOST} and back non-live with its vTPM (EK/key/NV/PCR 16 kept, quote verified, the registry names the holder, the other host refuses; a live move refused first); downtime seen by the guest {downs:?} ms; {killed}"
    ))
}

/// The move A → B's argv (`--finish`: the completion of one cut short).
fn move_argv(receiver: &str, finish: bool) -> Vec<String> {
    let mut v: Vec<String> = ["xl-vtpm", "--json", "migrate", NAME, B_HOST, "--non-live", "--ssh", SSH_LOCAL, "--receiver", receiver, "--ek-ca", VENDOR_ROOT, "--ek-intermediate", VENDOR_INT, "--host-pcrs-policy", B_POLICY]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if finish {
        v.retain(|a| a != "--non-live");
        v.push("--finish".into());
    }
    v
}

/// The move A → B started in the background.
fn start_move(tag: &str) -> Result<(Child, String), String> {
    let argv = move_argv(&format!("{} xl-vtpm migrate-receive", env_words(&b_env())), false);
    spawn_move(&argv, &format!("/tmp/xl-hvm-x-kill{tag}.out"), &format!("migrate-xhost-hvm kill round {tag}"))
}

fn finish(cx: &Cx, tag: &str) -> Output {
    let argv = move_argv(&format!("{} xl-vtpm migrate-receive", env_words(&b_env())), true);
    println!("migrate-xhost-hvm kill round {tag}: {}", argv.join(" "));
    let out = format!("/tmp/xl-hvm-x-finish{tag}.out");
    let o = on(&a_env(), &argv.iter().map(String::as_str).collect::<Vec<_>>()).env("XVTPM_LOG", "info").secs(420).save_split(&out, &format!("{out}.err")).run(cx);
    show("xl-vtpm migrate --finish (HVM)", &o.all());
    o
}

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The guest's TPM after a finished round (CHECK `<pre>-tpm`).
fn tpm_checks(cx: &Cx, e: &mut Errs, pre: &str, n: u32, ek: &str, pcr: &str, t: &str) {
    let g = guest_cmd(cx, NAME, n, &format!("migcheck:{}", xen::nonce(16)), 240);
    println!("[{NAME}] {g}");
    e.check(
        &format!("{pre}-tpm"),
        field(&g, "ek") == ek && field(&g, "persistent") == "kept" && field(&g, "nv") == "kept" && field(&g, "pcr16") == pcr && field(&g, "quote") == "verified",
        format!(
            "{t}: EK {}, 0x81000010 {}, NV {}, PCR 16 {} (before {pcr}), a fresh AK quote {}",
            if field(&g, "ek") == ek { "the same" } else { "NOT the same" },
            none(&field(&g, "persistent")),
            none(&field(&g, "nv")),
            none(&field(&g, "pcr16")),
            none(&field(&g, "quote"))
        ),
    );
}

/// The two kill rounds (the guest on A before them); a summary for the phase's reason.
fn kill_rounds(cx: &Cx, e: &mut Errs, uuid: &str, ek: &str, pcr: &str) -> String {
    let (a, b) = (a_env(), b_env());
    let mut sum = Vec::new();
    let (a_save, b_save) = (format!("{A_STATE}/migrate-save/{uuid}.xlsave"), format!("{B_STATE}/migrate-save/{uuid}.xlsave"));
    for (tag, after_import, n) in [("1", false, 11u32), ("2", true, 12)] {
        let pre = format!("xhost-hvm-kill{tag}");
        let t0 = Instant::now();
        let imported0 = b_log_count("vTPM imported", uuid) + b_log_count("imported vTPM's state file written", uuid);
        let (mut src, err) = match start_move(tag) {
            Ok(x) => x,
            Err(w) => {
                e.add(w);
                break;
            }
        };
        let up = |c: &mut Child| matches!(c.try_wait(), Ok(None));
        let seen = if after_import {
            cx.wait_every(420, Duration::from_millis(10), || b_log_count("vTPM imported", uuid) + b_log_count("imported vTPM's state file written", uuid) > imported0 || !up(&mut src))
        } else {
            // B holds the whole saved guest (the source's file as long): the identity is next
            cx.wait_every(420, Duration::from_millis(5), || (file_len(&b_save) > 0 && file_len(&b_save) == file_len(&a_save)) || !up(&mut src))
        };
        let exited = kill_source(&mut src);
        let when = if after_import { "B's manager imported the identity" } else { "B held the whole saved guest, before the identity moved" };
        e.check(
            &format!("{pre}-cut"),
            seen && exited.is_none(),
            format!("source killed -9 {} ms after its start, once {when} (seen {seen}); it {}", t0.elapsed().as_millis(), exited.map_or("still ran".to_string(), |c| format!("HAD EXITED rc={c} before the kill"))),
        );
        let ended = cx.wait_every(60, Duration::from_millis(200), || receivers().is_empty());
        let b_kept = std::path::Path::new(&b_save).exists();
        e.check(
            &format!("{pre}-receiver"),
            ended && b_kept == after_import && xen::domid(NAME).is_none() && xen::domid(&format!("{NAME}--incoming")).is_none(),
            format!(
                "the receiver ended: {ended}; B's saved guest kept: {b_kept} (want {after_import}: {}); no domain {NAME} anywhere",
                if after_import { "the identity is there" } else { "the identity is still on A" }
            ),
        );
        show_tail(&format!("HVM kill round {tag}: source + receiver stderr"), &xen::read_text(&err), 12);
        let o = finish(cx, tag);
        let all = o.all();
        let d = xen::domid(NAME).unwrap_or_default();
        let (ra, rb) = (row(cx, &a, NAME), row(cx, &b, NAME));
        let (want_rc, holder) = if after_import { (0, B_HOST) } else { (1, A_HOST) };
        e.check(
            &format!("{pre}-finish"),
            o.rc == want_rc && (after_import || (all.contains("never arrived") && all.contains("restored here"))),
            format!("xl-vtpm migrate {NAME} {B_HOST} --finish rc={} in {} ms (want {want_rc}): {}", o.rc, o.elapsed.as_millis(), o.tail1(2)),
        );
        let holder_env = if after_import { &b } else { &a };
        e.check(
            &format!("{pre}-holder"),
            !d.is_empty() && jf(&ra, "host") == holder && jf(&rb, "host") == holder && jf(&ra, "state") == "running" && jf(&ra, "guest_domid") == d && vtpm_running(cx, holder_env, uuid),
            format!("domain {NAME} {}; the registry names host {} (state {}, domid {}), want {holder} whose vTPM runs", none(&d), none(&jf(&ra, "host")), jf(&ra, "state"), jf(&ra, "guest_domid")),
        );
        if !d.is_empty() {
            tpm_checks(cx, e, &pre, n, ek, pcr, &format!("after the --finish ({holder})"));
        }
        let left = leftovers(uuid, NAME);
        e.check(&format!("{pre}-no-leftover"), left.is_empty(), format!("move record, saved guests, B's incoming config left: {left:?}"));
        println!("PERF {pre}-round-ms={}", t0.elapsed().as_millis());
        sum.push(format!("kill round {tag} ({when}): --finish rc {} in {} ms", o.rc, o.elapsed.as_millis()));
        if !e.is_empty() {
            why(&format!("{pre}: the source and receiver said"), &xen::read_text(&err), 4);
            why(&format!("{pre}: --finish said"), &all, 2);
            why(&format!("{pre}: xl's log of {NAME} said"), &xen::read_text(&format!("/var/log/xen/xl-{NAME}.log")), 3);
            break;
        }
    }
    sum.join("; ")
}

/// Destroys the guest wherever it runs, its pair and both identities.
fn cleanup(cx: &Cx, uuid: &str) {
    let (a, b) = (a_env(), b_env());
    for env in [&a, &b] {
        if xen::domid(NAME).is_some() || xen::domid(&format!("{NAME}--incoming")).is_some() {
            let o = on(env, &["xl-vtpm", "destroy", NAME]).secs(120).run(cx);
            println!("INFO migrate-xhost-hvm cleanup: xl-vtpm destroy {NAME} under {} rc={}", env_words(env), o.rc);
        }
    }
    xen::destroy_if_running(cx, NAME);
    xen::destroy_if_running(cx, &format!("{NAME}--incoming"));
    for env in [&a, &b] {
        if !uuid.is_empty() && vtpm_running(cx, env, uuid) {
            let _ = on(env, &["xl-vtpm", "vtpm", "stop", uuid]).secs(60).run(cx);
        }
    }
    let rr = on(&a, &["xl-vtpm", "registry", "remove", NAME, "--yes"]).secs(60).run(cx);
    let mut dels = Vec::new();
    if !uuid.is_empty() && rr.ok() {
        for env in [&a, &b] {
            dels.push(on(env, &["xl-vtpm", "mgr", "vtpm", "del", uuid, "--yes"]).secs(60).run(cx).rc);
        }
    }
    for dir in ["/var/lib/xvtpm/migrate-save", "/var/lib/xvtpm-b/migrate-save"] {
        if !uuid.is_empty() {
            let _ = std::fs::remove_file(format!("{dir}/{uuid}.xlsave"));
        }
    }
    println!("INFO migrate-xhost-hvm cleanup: registry remove {NAME} rc={}; vTPM {} identity deleted on A, B: rc {dels:?}", rr.rc, none(uuid));
}
