//! hvm-migrate: an HVM guest moved live with its emulated TPM, `xl-vtpm migrate GUEST localhost`
//! (XVTPM_TESTBED_HVM=1, or =mig for this phase alone). The guest is the hvm-crb guest (SeaBIOS,
//! QEMU's tpm-crb) with the xenstore client (`/etc/xen/hvm-mig.cfg`, `mig=1 tick=1`): on its first
//! boot it extends PCR 16, writes NV 0x01500016, makes the persistent key 0x81000010 and reads the
//! manufactured EK, then serves dom0's checks (data/xvtpm-cmd) and prints a tick every 0.1 s.
//!
//! Unlike a PV guest (this Xen has no log-dirty mode for PV), an HVM guest moves live: HAP tracks
//! its dirty pages. libxl starts the destination's device model on the same vTPM control socket
//! while the source's still runs; the TPM's state travels sealed in the device model's stream.
//! One RESULT per step:
//!   hvm-migrate-plain  P6 baseline: the same guest without a vTPM (`tpm=0`), moved to localhost
//!                      twice with xl-vtpm's steps minus the vTPM: `xl migrate -p`, the source's
//!                      device model ended, `xl unpause`; the largest gap between its ticks
//!                      (`PERF p6-hvm-novtpm-…`). `xvtpm_hvmmig_rounds=N` (dom0's command line)
//!                      moves each guest N times live instead of twice
//!   hvm-migrate        `xl-vtpm create`, the boot's checks; `xl-vtpm migrate hvm-mig localhost`
//!                      twice live and once `--non-live` (xl save + xl restore -p): a new domid, the same vTPM process, the source's device model ended,
//!                      one device model left, the registry follows; in the guest after each move:
//!                      the same EK, key and NV, PCR 16 as it was (kept, as across a suspend), a
//!                      fresh quote verified; the largest tick gap (`PERF p6-hvm-vtpm-…`); then
//!                      `xl migrate` failing before the guest moved (`--ssh false`): the guest stays
//!                      with its TPM answering; `xl-vtpm destroy` ends domain, device model and vTPM

use std::time::Duration;

use super::hvm::{cleanup, create, ctrl_errors, device_models, dm_path, left_for};
use super::life::life_row;
use super::migrate::{cons, downtime, field, guest_cmd, last_tick, vtpm_pid, xl_vtpm_migrate};
use super::{St, deadline, guest_checks};
use crate::cmd::{Cmd, pid_up, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner, why};
use crate::xen::{self, after_prefix, jf};

pub const NAME: &str = "hvm-mig";
const CFG: &str = "/etc/xen/hvm-mig.cfg";
const PNAME: &str = "hvm-mig-p";
const PCFG: &str = "/tmp/hvm-mig-p.cfg";
const PCR_AFTER: &str = "39DE0A6FECF21D432302A5D79315BC42DFF73C4BE042FB5276E3C5B4758BCA02";
/// What this phase needs of the scenario: two boots (~20 s each on an idle host), five moves, the checks after each, two destroys; with a margin.
pub const PHASE: u64 = 300;
/// What the phases after this one (tpm2-guest, teardown and the log dump) need.
const AFTER: u64 = 150;

/// Live moves per guest: 2, or `xvtpm_hvmmig_rounds=N` on dom0's command line (a longer soak:
/// XVTPM_TESTBED_DOM0_EXTRA).
fn rounds() -> u32 {
    xen::cmdline_arg("xvtpm_hvmmig_rounds").and_then(|n| n.parse().ok()).filter(|n| (1..=50).contains(n)).unwrap_or(2)
}

/// What a `--non-live` round needs in dom0 besides the guest's memory (the save file in ramfs):
/// the restored domain's device model and xl, with a margin.
const NONLIVE_MARGIN_MIB: u64 = 200;

/// dom0's MemAvailable (MiB).
pub(super) fn mem_available_mib() -> u64 {
    xen::read_text("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// The guest's memory (MiB, `memory =` of its config; 256 if unreadable).
fn guest_mib() -> u64 {
    xen::read_text(CFG)
        .lines()
        .find_map(|l| l.trim().strip_prefix("memory")?.trim().strip_prefix('=')?.trim().parse().ok())
        .unwrap_or(256)
}

/// The device model process of domain `domid` (libxl's image/device-model-pid).
fn dm_pid(domid: &str) -> Option<u32> {
    xen::xs_read(&format!("/local/domain/{domid}/image/device-model-pid"))?.trim().parse().ok()
}

/// The device models running for domain `domid` (by their command line).
pub(super) fn dms_of(domid: &str) -> usize {
    let arg = format!("-xen-domid {domid} ");
    device_models().lines().filter(|l| l.contains(&arg)).count()
}

/// A config for the guest without a vTPM: hvm-mig.cfg without its vtpm line, named PNAME, `tpm=0`.
fn write_plain_cfg() -> Result<(), String> {
    let src = xen::read_text(CFG);
    let mut out = String::new();
    for l in src.lines() {
        let t = l.trim_start();
        if t.starts_with("vtpm ") || t.starts_with("vtpm=") {
            continue;
        }
        let l = if t.starts_with("name ") || t.starts_with("name=") {
            format!("name = \"{PNAME}\"")
        } else if t.starts_with("serial ") {
            format!("serial = \"file:/var/log/xen/{PNAME}.serial\"")
        } else if let Some(x) = t.strip_prefix("extra = \"").and_then(|x| x.strip_suffix('"')) {
            format!("extra = \"{x} tpm=0\"")
        } else {
            l.to_string()
        };
        out.push_str(&l);
        out.push('\n');
    }
    if !out.contains(&format!("name = \"{PNAME}\"")) || !out.contains(" tpm=0\"") || out.lines().any(|l| l.trim_start().starts_with("vtpm")) {
        return Err(format!("{PCFG}: name/extra/vtpm not substituted from {CFG}"));
    }
    std::fs::write(PCFG, out).map_err(|e| format!("{PCFG}: {e}"))
}

/// The P6 baseline: the guest without a vTPM moved live twice with plain `xl migrate`.
fn plain(cx: &Cx) -> Outcome {
    let mut e = Errs::default();
    if let Err(w) = write_plain_cfg() {
        return Outcome::fail(w);
    }
    if !super::xl_create(cx, PCFG, "/tmp/xl-hvm-mig-p.out", 180, &mut e) {
        return e.verdict("");
    }
    if !cx.wait_every(left_for(cx, PHASE + AFTER).min(240), Duration::from_secs(1), || cons(PNAME).contains("GUEST-DONE")) {
        show_tail("hvm-mig-p console", &cons(PNAME), 10);
        e.add("no-GUEST-DONE");
    }
    let mut downs = Vec::new();
    for round in 1..=rounds() {
        if !e.is_empty() {
            break;
        }
        let old = xen::domid(PNAME).unwrap_or_default();
        let dm_old = dm_pid(&old);
        let from = last_tick(PNAME);
        // The same steps as xl-vtpm's, without the vTPM: -s "" runs the receiver directly (no
        // sshd); -p keeps the incoming domain paused until the source's device model has ended.
        // (Unpaused by the receiver at once, the moved guest triple-faulted ~3 s later under the
        // testbed's nested TCG while xl destroyed the source, 1 run of 2.)
        let t = std::time::Instant::now();
        let o = Cmd::new(&["xl", "migrate", "-p", "-s", "", PNAME, "xl migrate-receive -p"]).secs(300).save(&format!("/tmp/xl-hvm-mig-p-{round}.out")).run(cx);
        let new = xen::domid(PNAME).unwrap_or_default();
        let dm_gone = cx.wait_every(30, Duration::from_millis(50), || !pid_up(dm_old));
        let u = Cmd::new(&["xl", "unpause", &new]).secs(30).run(cx);
        let all_ms = t.elapsed().as_millis();
        if !e.check(
            "hvm-migrate-plain-xl",
            o.ok() && u.ok() && !new.is_empty() && new != old && dm_gone,
            format!("round {round}: xl migrate -p rc={} in {} ms, domid {old} -> {new}, the source's device model {dm_old:?} ended: {dm_gone}, xl unpause rc={}; {all_ms} ms in all", o.rc, o.elapsed.as_millis(), u.rc),
        ) {
            show_tail("xl migrate", &o.all(), 15);
            break;
        }
        match downtime(cx, PNAME, from) {
            Some(ms) => {
                println!("PERF p6-hvm-novtpm-downtime-ms-r{round}={ms} (largest gap between the HVM guest's 0.1 s ticks; live: xl migrate -p {} ms, {all_ms} ms to the unpause)", o.elapsed.as_millis());
                downs.push(ms);
            }
            None => {
                e.add(format!("no-ticks-after-round-{round}"));
                show_tail("hvm-mig-p console", &cons(PNAME), 10);
            }
        }
    }
    xen::xl_destroy(cx, PNAME, 60);
    e.verdict(format!("an HVM guest without a vTPM moved live {} times on localhost (xl migrate -p, unpaused once the source's device model ended); downtime seen by the guest {downs:?} ms", downs.len()))
}

/// The first boot of a guest of the hvm-mig image (`mig=1`), waited for up to `wait` s: its
/// checks (PCR 16 extended, NV written, 0x81000010 made, EK read, a quote checked) into `e`;
/// returns the EK's SHA-256 and PCR 16 it printed for the checks after a move.
pub(super) fn boot_checks(cx: &Cx, e: &mut Errs, name: &str, wait: u64) -> (String, String) {
    if !cx.wait_every(wait, Duration::from_secs(1), || cons(name).contains("GUEST-HOLD")) {
        e.add("no-GUEST-HOLD");
    }
    let c = cons(name);
    for m in guest_checks(&c, name, "boot", &["tpm0", "startup", "getrandom", "pcrextend", "nv-write", "ek", "persistent", "quote", "checkquote"]) {
        e.add(m);
    }
    let ek = after_prefix(&c, "GUEST-MIGEK ").unwrap_or_default().trim().to_string();
    let pcr = after_prefix(&c, "GUEST-PCR16 ").unwrap_or_default().trim().to_string();
    (ek, pcr)
}

/// The guest with its vTPM: boot, two moves with checks, a failed move, destroy.
fn with_vtpm(cx: &Cx, st: &mut St) -> Outcome {
    let dm = dm_path();
    if dm == "none" || !std::path::Path::new(&dm).is_file() {
        return Outcome::fail(format!("no TPM-enabled device model in dom0 (hvm_dm={dm})"));
    }
    if !std::path::Path::new(CFG).is_file() {
        return Outcome::fail(format!("no {CFG}: build-images.sh writes it with the HVM images"));
    }
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    let mut e = Errs::default();
    let (o, _, uuid, pid) = create(cx, NAME, CFG, "/tmp/xl-hvm-mig-create.out");
    let vlog_path = format!("/var/lib/xvtpm/vtpms/{uuid}/vtpm.log");
    if !o.ok() || xen::domid(NAME).is_none() || !pid_up(pid) {
        forget(cx, &uuid, pid);
        return Outcome::fail(format!("xl-vtpm create exited {}", o.rc));
    }
    let (ek, pcr) = boot_checks(cx, &mut e, NAME, left_for(cx, AFTER + 120).min(300));
    if !e.is_empty() {
        show_tail("hvm-mig console (GUEST lines)", &cons(NAME).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 25);
        forget(cx, &uuid, pid);
        return e.verdict("");
    }
    let mut downs = Vec::new();
    // two live moves (P6), then a non-live one (xl save + xl restore -p: the same TPM path) if
    // dom0 has room for the guest's memory in its ramfs beside what the restore needs: in a full
    // CI run the restored device model was OOM-killed (dom0 768M after every other phase)
    let live = rounds();
    let avail = mem_available_mib();
    let need = guest_mib() + NONLIVE_MARGIN_MIB;
    let with_non_live = avail >= need;
    if !with_non_live {
        println!("INFO hvm-migrate: no --non-live round: dom0 MemAvailable {avail} MiB < {need} MiB (the save file is the guest's memory, in dom0's ramfs)");
    }
    for round in 1..=live + u32::from(with_non_live) {
        let non_live = round == live + 1;
        let before = xen::domid(NAME).unwrap_or_default();
        let dm_before = dm_pid(&before);
        let from = last_tick(NAME);
        let mut args = vec![NAME, "localhost"];
        if non_live {
            args.push("--non-live");
        }
        let (rc, v, all) = xl_vtpm_migrate(cx, &args, &format!("/tmp/xl-hvm-mig-{round}.out"));
        show("xl-vtpm migrate", &all);
        let new = xen::domid(NAME).unwrap_or_default();
        let same_pid = pid.is_some() && jf(&v, "vtpm_pid").parse::<u32>().ok() == pid && pid_up(pid);
        if !e.check(
            "hvm-migrate-xl-vtpm",
            rc == 0 && jf(&v, "hvm") == "true" && !new.is_empty() && new != before && jf(&v, "to_domid") == new && same_pid && jf(&v, "vtpm_restarted") == "false" && jf(&v, "non_live") == non_live.to_string(),
            format!(
                "round {round}{}: rc={rc} domid {before} -> {new}, vTPM process {pid:?} -> {} (kept running), xl migrate {} ms, xl save {} ms, xl restore {} ms, total {} ms, source device model ended {} ms after the move",
                if non_live { " (--non-live)" } else { "" },
                jf(&v, "vtpm_pid"),
                jf(&v, "xl_migrate_ms"),
                jf(&v, "xl_save_ms"),
                jf(&v, "xl_restore_ms"),
                jf(&v, "total_ms"),
                jf(&v, "source_device_model_ended_ms")
            ),
        ) {
            break;
        }
        let dm_after = dm_pid(&new);
        e.check(
            "hvm-migrate-one-device-model",
            dms_of(&before) == 0 && dms_of(&new) == 1 && dm_after.is_some() && dm_after != dm_before && !pid_up(dm_before),
            format!("device model of domain {before} (process {dm_before:?}) gone: {}; domain {new}'s: {dm_after:?}, {} running", !pid_up(dm_before), dms_of(&new)),
        );
        let row = life_row(cx, NAME);
        e.check("hvm-migrate-registry", jf(&row, "guest_domid") == new && jf(&row, "state") == "running", format!("registry: domid {} state {}", jf(&row, "guest_domid"), jf(&row, "state")));
        match downtime(cx, NAME, from) {
            Some(ms) if non_live => println!(
                "PERF p6-hvm-vtpm-nonlive-downtime-ms={ms} (largest gap between the HVM guest's 0.1 s ticks; xl save {} ms, xl restore {} ms, xl-vtpm migrate {} ms)",
                jf(&v, "xl_save_ms"),
                jf(&v, "xl_restore_ms"),
                jf(&v, "total_ms")
            ),
            Some(ms) => {
                println!(
                    "PERF p6-hvm-vtpm-downtime-ms-r{round}={ms} (largest gap between the HVM guest's 0.1 s ticks; live: xl migrate {} ms, xl-vtpm migrate {} ms)",
                    jf(&v, "xl_migrate_ms"),
                    jf(&v, "total_ms")
                );
                downs.push(ms);
            }
            None => e.add(format!("no-ticks-after-round-{round}")),
        }
        let nonce = xen::nonce(16);
        let a = guest_cmd(cx, NAME, round, &format!("migcheck:{nonce}"), 240);
        println!("[{NAME}] {a}");
        if field(&a, "ek") != ek {
            why(&format!("hvm-migrate round {round}: the guest's migcheck said"), &a, 2);
            why(&format!("hvm-migrate round {round}: xl-vtpm migrate said"), &all, 2);
        }
        e.check("hvm-migrate-guest-ek", !ek.is_empty() && field(&a, "ek") == ek, format!("round {round}: EK sha256 before {ek} after {}", field(&a, "ek")));
        e.check("hvm-migrate-guest-persistent", field(&a, "persistent") == "kept", format!("round {round}: 0x81000010 still there and readable"));
        e.check("hvm-migrate-guest-nv", field(&a, "nv") == "kept", format!("round {round}: NV 0x01500016 contents kept"));
        e.check(
            "hvm-migrate-guest-pcr16",
            pcr == PCR_AFTER && field(&a, "pcr16") == pcr,
            format!("round {round}: PCR 16 before {pcr} after {} (kept, as across a suspend)", field(&a, "pcr16")),
        );
        e.check("hvm-migrate-guest-quote", field(&a, "quote") == "verified", format!("round {round}: a fresh ECC AK quote over PCR 16 verified (a wrong nonce is rejected)"));
        if !e.is_empty() {
            break;
        }
    }
    let vlog = xen::read_text(&vlog_path);
    e.check(
        "hvm-migrate-source-shutdown-kept",
        vlog.contains("another is connected"),
        "the vTPM kept the TPM running when the source's device model sent CMD_SHUTDOWN after the move",
    );
    // xl migrate failing before the guest moved: the guest stays where it is, its TPM answering
    let d0 = xen::domid(NAME).unwrap_or_default();
    let (rc, _, all) = xl_vtpm_migrate(cx, &[NAME, "localhost", "--ssh", "false"], "/tmp/xl-hvm-mig-fail.out");
    show("xl-vtpm migrate --ssh false", &all);
    if !e.check(
        "hvm-migrate-fail-before",
        rc == 1 && all.contains("before the guest moved") && !all.contains("does not answer") && xen::domid(NAME).as_deref() == Some(d0.as_str()) && vtpm_pid(cx, NAME) == pid && pid_up(pid),
        format!("rc={rc}; the guest stays domain {d0}, vTPM process {pid:?} unchanged, its TPM answers"),
    ) {
        why("hvm-migrate-fail-before: xl-vtpm migrate --ssh false said", &all, 2);
    }
    let a = guest_cmd(cx, NAME, live + 2, "getrandom", 120);
    e.check("hvm-migrate-fail-before-tpm", a.contains("getrandom PASS"), &a);
    let mut bad = ctrl_errors(&vlog);
    bad.extend(ctrl_errors(&xen::read_text(&format!("/var/log/xen/qemu-dm-{NAME}.log"))));
    e.check("hvm-migrate-ctrl-clean", bad.is_empty(), if bad.is_empty() { "no control-channel error in either log".to_string() } else { bad.join(" | ") });
    // destroy: domain, device model and vTPM gone
    let o = Cmd::new(&["xl-vtpm", "destroy", NAME]).env("NO_COLOR", "1").secs(90).run(cx);
    let gone = cx.wait_every(30, Duration::from_millis(100), || !pid_up(pid));
    e.check(
        "hvm-migrate-destroy",
        o.ok() && gone && xen::domain_gone(NAME) && device_models().trim().is_empty(),
        format!("xl-vtpm destroy rc={}; domain gone, vTPM process {pid:?} gone: {gone}", o.rc),
    );
    if !e.is_empty() {
        let guest_lines = cons(NAME).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n");
        let dm_log = xen::read_text(&format!("/var/log/xen/qemu-dm-{NAME}.log"));
        why("hvm-migrate: the guest's console said", &guest_lines, 3);
        why("hvm-migrate: its vTPM's log said", &vlog, 3);
        why("hvm-migrate: its device model's log said", &dm_log, 3);
        why("hvm-migrate: xl's log of the guest said", &xen::read_text(&format!("/var/log/xen/xl-{NAME}.log")), 3);
        show_tail("hvm-mig console (GUEST lines)", &guest_lines, 25);
        show_tail("hvm-mig vtpm.log", &vlog, 25);
        show_tail("qemu-dm hvm-mig", &dm_log, 20);
        forget(cx, &uuid, pid);
    }
    // a failed --non-live move keeps the guest's memory in dom0's ramfs for --finish: not past this phase
    let save = format!("/var/lib/xvtpm/migrate-save/{uuid}.xlsave");
    if std::path::Path::new(&save).exists() {
        println!("INFO hvm-migrate: removing the kept save file {save}");
        let _ = std::fs::remove_file(&save);
    }
    let nl = if with_non_live { " and non-live once" } else { "" };
    e.verdict(format!(
        "HVM guest with tpm-crb moved live {live} times{nl} with its vTPM (process kept, source device model ended, EK/key/NV/PCR 16 kept, quote verified after each); live downtime seen by the guest {downs:?} ms; a failed move leaves it in place; vTPM {uuid} gone after destroy"
    ))
}

/// The phases' names (for skips).
pub const PHASES: [&str; 2] = ["hvm-migrate-plain", "hvm-migrate"];

/// After a failure: the guest and its vTPM gone, and its binding and identity too, so that the
/// phase run once more (runner.rs, after a guest's triple fault) starts from a fresh vTPM as the
/// first run did (`xl-vtpm create` of a bound name would reuse the vTPM, its NV and key made).
fn forget(cx: &Cx, uuid: &str, pid: Option<u32>) {
    cleanup(cx, NAME, pid);
    let rr = Cmd::new(&["xl-vtpm", "registry", "remove", NAME, "--yes"]).secs(60).run(cx);
    let del = if uuid.is_empty() || !rr.ok() { None } else { Some(Cmd::new(&["xl-vtpm", "mgr", "vtpm", "del", uuid, "--yes"]).secs(60).run(cx).rc) };
    println!("INFO hvm-migrate cleanup: registry remove {NAME} rc={}; vTPM {uuid} identity deleted: rc {del:?}", rr.rc);
}

pub fn run(r: &mut Runner, st: &mut St) {
    let secs = r.cx.scenario_left().as_secs().max(120);
    r.phase("hvm-migrate-plain", deadline(secs), plain);
    let secs = r.cx.scenario_left().as_secs().max(120);
    r.phase("hvm-migrate", deadline(secs), |cx| with_vtpm(cx, st));
}
