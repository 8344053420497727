//! hvm-tis: an HVM guest whose TPM is emulated by its device model and served by a vtpm-domain
//! process (docs/hvm.md). `xl-vtpm create /etc/xen/hvm-tis.cfg` (xen-configs/hvm-guest.cfg with the
//! testbed's settings: SeaBIOS, direct kernel boot of the Debian bzImage, `tsc_mode = "native"`,
//! `device_model_override` = the TPM-enabled device model from ci/testbed/build-qemu-xen.sh,
//! `vtpm = [ "model=tis" ]`) starts the vTPM and libxl's QEMU with `-device tpm-tis`. The guest
//! (domu-init.sh role=hvm) finds the TPM 2.0 through ACPI, runs startup, getrandom, pcrread, EK +
//! AK, quote + checkquote, writes an NV index and reads the EK certificate (NV 0x01c00002). Then
//! `xl-vtpm reboot` (a platform reset: the device model ends and a new one connects to the same
//! vTPM process): NV kept, PCR 16 reset, same EK. The vTPM's log and the device model's must show
//! no control-channel error. `xl-vtpm destroy` takes the domain and the vTPM process down. Last,
//! the same guest without a vTPM (`/etc/xen/hvm-notpm.cfg`, plain `xl create`): it sees no TPM,
//! and its create -> /init is P5's baseline for the HVM guest.
//!
//! hvm-crb: the same guest with `vtpm = [ "model=crb" ]` (QEMU's tpm-crb; `xl-vtpm create` passes a
//! TPM2 table and an MSFT0101 device in `acpi_firmware`), first boot's checks. hvm-ovmf: that guest
//! booted by OVMF for Xen with the TPM 2.0 modules (ci/testbed/build-ovmf-xen.sh, named by
//! `bios_path_override`): UEFI + TPM2 table + CRB, Windows 11's shape. The firmware measures the
//! boot; the guest (fw=ovmf) replays its TCG2 event log with tpm2_eventlog to the vTPM's PCRs 0-7
//! on each boot and prints it as hex on the first; dom0 replays the copy again with `xl-vtpm
//! eventlog show` (run.sh keeps it as hvm-ovmf-eventlog.bin); then `xl-vtpm reboot` and destroy as
//! for hvm-tis.
//!
//! The waits come from the budget: each gets what is left of the scenario minus what the steps
//! after it need (`left_for`), so a slow host uses its whole budget and a fast one never waits
//! on a fixed timeout.

use std::path::Path;
use std::time::Duration;

use super::life::{life_row, row_line, tail_of};
use super::{St, deadline, ek_hash, guest_checks, ms, now_wall, secs1, up, wall_up};
use crate::cmd::{Cmd, pid_up, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, console_from, jf, lines_of};

pub const NAME: &str = "hvm-tis";
pub const CFG: &str = "/etc/xen/hvm-tis.cfg";
pub const DM_LOG: &str = "/var/log/xen/qemu-dm-hvm-tis.log";
pub const SERIAL: &str = "/var/log/xen/hvm-tis.serial";
/// A guest whose TPM is QEMU's tpm-crb, found through the ACPI tables `xl-vtpm create` adds.
pub struct Crb {
    pub name: &'static str,
    pub cfg: &'static str,
    pub dm_log: &'static str,
    pub serial: &'static str,
    /// booted by OVMF: the event log checks, and a reboot
    pub ovmf: bool,
}
/// The hvm-tis guest with QEMU's tpm-crb (`vtpm = [ "model=crb" ]`; build-images.sh writes it
/// from hvm-tis.cfg).
pub const CRB: Crb = Crb {
    name: "hvm-crb",
    cfg: "/etc/xen/hvm-crb.cfg",
    dm_log: "/var/log/xen/qemu-dm-hvm-crb.log",
    serial: "/var/log/xen/hvm-crb.serial",
    ovmf: false,
};
/// The hvm-crb guest booted by OVMF for Xen with TPM 2.0 (build-images.sh writes it from
/// hvm-crb.cfg when run.sh built the firmware).
pub const OVMF: Crb = Crb {
    name: "hvm-ovmf",
    cfg: "/etc/xen/hvm-ovmf.cfg",
    dm_log: "/var/log/xen/qemu-dm-hvm-ovmf.log",
    serial: "/var/log/xen/hvm-ovmf.serial",
    ovmf: true,
};
/// dom0's copies of the OVMF guest's event log (raw, and the hex the log dump carries out)
pub const EVLOG_BIN: &str = "/tmp/hvm-ovmf-eventlog.bin";
pub const EVLOG_HEX: &str = "/tmp/hvm-ovmf-eventlog.hex";
/// The same guest without a vTPM (build-images.sh writes it from hvm-tis.cfg).
pub const NOTPM: &str = "hvm-notpm";
pub const NOTPM_CFG: &str = "/etc/xen/hvm-notpm.cfg";

/// What the phases after this one (hvm-migrate, tpm2-guest, teardown and the log dump) need of
/// the scenario's time, in s; this phase's waits leave it to them.
const AFTER_PHASE: u64 = 150 + super::hvmmig::PHASE;
/// What the hvm-crb phase after hvm-tis needs (one boot of the same guest, ~60 s on an idle
/// host, and its destroy), with a margin; hvm-tis's waits leave it this.
const CRB_PHASE: u64 = 180;
/// What the hvm-ovmf phase needs (two boots of the guest through OVMF, ~70 s each on an idle
/// host, its destroy), with a margin; hvm-tis's and hvm-crb's waits leave it this.
const OVMF_PHASE: u64 = 300;
/// What hvm-tis's waits leave to what follows it.
const AFTER_TIS: u64 = AFTER_PHASE + CRB_PHASE + OVMF_PHASE;
/// `xl-vtpm destroy` of the guest and the checks after it (measured 17 s), with a margin.
const DESTROY: u64 = 45;
/// The baseline guest without a vTPM: xl create -> /init -> GUEST-DONE, xl destroy (measured
/// ~20 s to /init on an idle host), with a margin.
const BASELINE: u64 = 90;
/// The least a boot's wait gets, even when the budget says less (it then fails, naming itself;
/// a wait never runs past the scenario's end). A boot with its checks needs ~60 s on an idle
/// 2-core host and more under load: in the CI run at e54df9b (2026-12-05) hvm-tis's boot 1 got
/// 60 s, its guest was at `createak` after 50 s (tpm-tis polled under TCG: createek and createak
/// 15 s each) and the phase failed, though ~600 s of the scenario were still unused. The
/// reserves above are estimates with margins; this floor is what a real boot needs.
const MIN_WAIT: u64 = 180;

/// A wait that leaves `reserve` s of the scenario to what follows it.
pub(super) fn left_for(cx: &Cx, reserve: u64) -> u64 {
    cx.scenario_left()
        .as_secs()
        .saturating_sub(reserve)
        .max(MIN_WAIT)
}

/// Lines of the vTPM's or the device model's log that mean the two disagree about the
/// swtpm control protocol (what QEMU's tpm_emulator and the vTPM log when they do).
const CTRL_ERRORS: &[&str] = &[
    "control request shorter than its command code",
    "TPM result for",
    "tpm-emulator:",
];

pub(super) fn dm_path() -> String {
    xen::testbed_env("hvm_dm").unwrap_or_else(|| "none".into())
}

/// Waits for this boot's GUEST-DONE (console after line `off`); echoes the checks. Returns the
/// failures and the console text of this boot.
fn guest_boot(cx: &Cx, name: &str, off: usize, tag: &str, state: &str, secs: u64, ovmf: bool) -> (Vec<String>, String) {
    let mut miss = Vec::new();
    // the guest's markers as they come (with dom0's uptime): where a slow boot spends its time
    let mut seen = 0;
    if !cx.wait_every(secs, Duration::from_secs(1), || {
        let c = console_from(name, off);
        for l in c.lines().skip(seen) {
            seen += 1;
            // (not the event log's and the deep quote's hex)
            if l.starts_with("GUEST-") && !l.starts_with("GUEST-EVLOG-HEX") && !l.starts_with("GUEST-DQ ") {
                println!("[{name} {tag} live up={:.1}] {l}", up());
            }
        }
        c.lines().any(|l| l.starts_with("GUEST-DONE"))
    }) {
        miss.push("no-GUEST-DONE".to_string());
    }
    let c = console_from(name, off);
    let want: &[&str] = if state == "fresh" {
        &[
            "tpm0",
            "startup",
            "getrandom",
            "pcrread",
            "pcr16-reset",
            "createek",
            "pcrextend",
            "createak",
            "quote",
            "checkquote",
            "nv-write",
            "ekcert",
        ]
    } else {
        &[
            "tpm0",
            "startup",
            "getrandom",
            "pcrread",
            "pcr16-reset",
            "createek",
            "nv-kept",
        ]
    };
    // IMA found the vTPM before it started (the driver probes first) and its log replays to PCR
    // 10 — unless the kernel's own probe timed out and domu-init.sh probed again after IMA had
    // gone to TPM-bypass (a loaded host; the GUEST-INFO line says so)
    let mut want = want.to_vec();
    if ovmf {
        want.extend(["eventlog", "eventlog-replay"]);
        if state == "fresh" {
            want.push("deep-quote");
        }
    }
    if !c.contains("probing again") {
        want.push("ima-replay");
    }
    miss.extend(guest_checks(&c, name, tag, &want));
    // an EK certificate the guest found must have read back as DER
    if c.lines().any(|l| l.starts_with("GUEST-CHECK ekcert FAIL")) {
        miss.push("ekcert".into());
    }
    let got = xen::after_prefix(&c, "GUEST-HVM state=")
        .unwrap_or_default()
        .trim()
        .to_string();
    if got != state {
        miss.push(format!("vtpm-state-{got}(want-{state})"));
    }
    for l in c.lines() {
        if [
            "GUEST-UP",
            "GUEST-HVM",
            "GUEST-DONE",
            "GUEST-DMESG",
            "GUEST-INFO",
            "GUEST-EVLOG ",
            "GUEST-EVLOG-PCRS",
        ]
        .iter()
        .any(|k| l.starts_with(k))
            || l.contains("panic")
            || l.contains("Oops")
        {
            println!("[{name} {tag}] {l}");
        }
    }
    if !miss.is_empty() {
        show_tail(&format!("{name} {tag} console"), &c, 20);
    }
    (miss, c)
}

/// PERF: `xl-vtpm create`/`reboot` (wall clock `w0`) -> the guest's /init and its first TPM answer.
fn boot_perf(key: &str, c: &str, w0: f64) {
    let (Some(i), Some(a)) = (
        wall_up(c, "GUEST-UP "),
        wall_up(c, "GUEST-P5 first-tpm-answer "),
    ) else {
        println!("PERF {key}=n/a (no GUEST-UP/GUEST-P5 marker)");
        return;
    };
    println!(
        "PERF {key}={} (ms: -> guest /init; of it: to the kernel's start {} ms (domain + device model + hvmloader + firmware (SeaBIOS or OVMF) + \
         fw_cfg loading of kernel and initrd), kernel to /init {} ms; /init -> first answered TPM command {} ms)",
        ms(w0, i.0),
        ms(w0, i.0 - i.1),
        ms(0.0, i.1),
        ms(i.1, a.1)
    );
}

/// P5 for the HVM guest: `xl-vtpm create`/`reboot` (wall clock `w0`) -> the first answered TPM
/// command in the guest.
fn p5_hvm(key: &str, c: &str, w0: f64) {
    match wall_up(c, "GUEST-P5 first-tpm-answer ") {
        Some(a) => println!(
            "PERF {key}={} (xl-vtpm -> first answered tpm2_getrandom in the HVM guest)",
            ms(w0, a.0)
        ),
        None => println!("PERF {key}=n/a (no GUEST-P5 marker)"),
    }
}

/// The hvm-tis guest without a vTPM (plain `xl create` of hvm-notpm.cfg): it boots, finds no TPM
/// (no TIS for hvmloader to describe), and its create -> /init is P5's HVM baseline.
fn baseline(cx: &Cx, e: &mut Errs) {
    let off = lines_of(&xen::clog(NOTPM));
    let wait = left_for(cx, AFTER_TIS + 20);
    println!("hvm: the same guest without a vTPM ({NOTPM_CFG}); waiting up to {wait} s");
    let w0 = now_wall();
    let t0 = up();
    if !super::xl_create(cx, NOTPM_CFG, "/tmp/xl-hvm-notpm.out", 150, e) {
        return;
    }
    let done = cx.wait_every(wait, Duration::from_millis(500), || {
        console_from(NOTPM, off)
            .lines()
            .any(|l| l.starts_with("GUEST-DONE"))
    });
    let c = console_from(NOTPM, off);
    match wall_up(&c, "GUEST-UP ") {
        Some(i) => println!(
            "PERF p5-hvm-without-vtpm-ms={} (xl create -> guest /init, no vTPM: to the kernel's start {} ms, kernel to /init {} ms)",
            ms(w0, i.0),
            ms(w0, i.0 - i.1),
            ms(0.0, i.1)
        ),
        None => println!("PERF p5-hvm-without-vtpm-ms=n/a (no GUEST-UP marker)"),
    }
    for l in c.lines().filter(|l| l.starts_with("GUEST-INFO")) {
        println!("[{NOTPM}] {l}");
    }
    let miss = guest_checks(&c, NOTPM, "notpm", &["no-tpm"]);
    e.check(
        "hvm-notpm-guest",
        done && miss.is_empty(),
        if done {
            format!(
                "no TPM in the guest; checks missing: {}",
                if miss.is_empty() {
                    "none".into()
                } else {
                    miss.join(" ")
                }
            )
        } else {
            format!("no GUEST-DONE within {wait} s")
        },
    );
    if !(done && miss.is_empty()) {
        show_tail(&format!("{NOTPM} console"), &c, 20);
    }
    xen::xl_destroy(cx, NOTPM, 60);
    let gone = cx.wait_until(30, || {
        xen::domain_gone(NOTPM) && device_models().trim().is_empty()
    });
    e.check(
        "hvm-notpm-destroy",
        gone,
        format!(
            "xl destroy {NOTPM}: domain and device model gone ({} s after create)",
            secs1(t0, up())
        ),
    );
}

/// The command lines (arguments joined by spaces) of the running device models (`-xen-domid`),
/// from /proc: busybox `ps` cuts long command lines.
pub(super) fn device_models() -> String {
    let mut out = String::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "-xen-domid") {
            out.push_str(&format!(
                "{} {}\n",
                e.file_name().to_string_lossy(),
                args.join(" ")
            ));
        }
    }
    out
}

/// The running device models' command lines once one holds `what`, waiting up to 15 s: in a CI
/// run the device model of a guest whose `xl create` had returned (and which then booted with
/// its TPM) was once not yet found by its command line in /proc.
fn device_model_with(cx: &Cx, what: &str) -> String {
    let mut line = String::new();
    cx.wait_every(15, Duration::from_millis(200), || {
        line = device_models();
        line.contains(what)
    });
    line
}

/// Lines of `text` that name a control-channel disagreement.
pub(super) fn ctrl_errors(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| CTRL_ERRORS.iter().any(|k| l.contains(k)))
        .map(str::to_string)
        .collect()
}

/// Leaves no domain `name` and no live vTPM process `pid` (after a failed step).
pub(super) fn cleanup(cx: &Cx, name: &str, pid: Option<u32>) {
    if xen::domid(name).is_some() || pid_up(pid) {
        let o = Cmd::new(&["xl-vtpm", "destroy", name])
            .env("NO_COLOR", "1")
            .secs(60)
            .run(cx);
        show("xl-vtpm destroy (cleanup)", &o.all());
        if xen::domid(name).is_some() {
            xen::xl_destroy(cx, name, 60);
        }
    }
    if pid_up(pid) {
        println!("hvm: killing leftover vTPM pid {}", pid.unwrap_or(0));
        crate::cmd::signal(pid.unwrap_or(0), nix::sys::signal::Signal::SIGTERM);
    }
}

/// `xl-vtpm create CFG` of guest `name` (output saved to `save`), the vTPM's control requests
/// logged one by one (the level is inherited); returns its output, the guest's registry row, the
/// vTPM's UUID and process id.
pub(super) fn create(cx: &Cx, name: &str, cfg: &str, save: &str) -> (crate::cmd::Output, serde_json::Value, String, Option<u32>) {
    let t0 = up();
    let o = Cmd::new(&["xl-vtpm", "create", cfg])
        .env("NO_COLOR", "1")
        .env("XVTPM_LOG", "info,vtpm_domain::server=debug")
        .secs(150)
        .save(save)
        .run(cx);
    println!("xl-vtpm create {cfg}: rc={} in {} s", o.rc, secs1(t0, up()));
    show_tail(&format!("xl-vtpm create {name}"), &o.all(), 20);
    let row = life_row(cx, name);
    let uuid = jf(&row, "vtpm_uuid");
    let pid: Option<u32> = jf(&row, "vtpm_pid").parse().ok();
    (o, row, uuid, pid)
}

/// The `up=` stamp of check `name` in a boot's console.
fn check_up(c: &str, name: &str) -> Option<f64> {
    let l = xen::after_prefix(c, &format!("GUEST-CHECK {name} "))?;
    l.rsplit_once("[up=")?.1.trim_end_matches(']').trim().parse().ok()
}

/// PERF: how long the guest's key creations took through this TPM interface (each check's
/// `up=` stamp minus the one before it): TIS moves a command a byte per register access, each an
/// ioreq to the device model; CRB a buffer.
fn key_times(key: &str, c: &str) {
    let d = |a: &str, b: &str| match (check_up(c, a), check_up(c, b)) {
        (Some(a), Some(b)) => format!("{:.1}", b - a),
        _ => "n/a".into(),
    };
    println!(
        "PERF {key}-createek-s={} PERF {key}-createak-s={} (tpm2_createek ECC, tpm2_createak ECC, in the guest)",
        d("pcr16-reset", "createek"),
        d("pcrextend", "createak")
    );
}

/// `N=HEX` words after `prefix` (the guest's GUEST-EVLOG-PCRS line) as PCR -> lower-case hex.
fn pcr_words(text: &str, prefix: &str) -> std::collections::BTreeMap<u32, String> {
    xen::after_prefix(text, prefix)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|w| {
            let (n, v) = w.split_once('=')?;
            Some((n.parse().ok()?, v.to_ascii_lowercase()))
        })
        .collect()
}

/// dom0's side of the measured boot: the event log the guest printed (GUEST-EVLOG-HEX) is
/// decoded, must have the size and SHA-256 the guest reported, and `xl-vtpm eventlog show`
/// (xvtpm's own parser and replay) must give the PCRs 0-7 the guest read from the vTPM. The
/// log stays in EVLOG_BIN and, as hex, in EVLOG_HEX for the log dump.
fn eventlog_dom0(cx: &Cx, c1: &str, e: &mut Errs) {
    let hex_text: String = c1
        .lines()
        .filter_map(|l| l.strip_prefix("GUEST-EVLOG-HEX "))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    let raw = hex::decode(hex_text.replace('\n', "")).unwrap_or_default();
    let want = xen::after_prefix(c1, "GUEST-EVLOG ").unwrap_or_default();
    let got = {
        use sha2::Digest;
        format!("bytes={} sha256={}", raw.len(), hex::encode(sha2::Sha256::digest(&raw)))
    };
    let _ = std::fs::write(EVLOG_BIN, &raw);
    let _ = std::fs::write(EVLOG_HEX, format!("{hex_text}\n"));
    let intact = !raw.is_empty() && want.trim() == got;
    e.check(
        "hvm-ovmf-eventlog-copied",
        intact,
        format!("the guest's event log in dom0 ({EVLOG_BIN}): {got}; the guest said {}", want.trim()),
    );
    if !intact {
        return;
    }
    let o = Cmd::new(&["xl-vtpm", "--json", "eventlog", "show", EVLOG_BIN])
        .env("NO_COLOR", "1")
        .secs(30)
        .run(cx);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
    let guest = pcr_words(c1, "GUEST-EVLOG-PCRS ");
    let mut diff = Vec::new();
    for p in 0..8u32 {
        let replayed = v["replayed_sha256"][p.to_string()].as_str().unwrap_or("<none>").to_string();
        let read = guest.get(&p).cloned().unwrap_or_else(|| "<none>".into());
        if replayed != read {
            diff.push(format!("PCR {p}: log {replayed} vTPM {read}"));
        }
    }
    let events = v["events"].as_array().map_or(0, Vec::len);
    e.check(
        "hvm-ovmf-eventlog-dom0-replay",
        o.ok() && events > 0 && diff.is_empty(),
        if o.ok() && diff.is_empty() {
            format!("xl-vtpm eventlog show: {events} events replay to the vTPM's PCRs 0-7 as the guest read them")
        } else {
            let all = o.all();
            let tail: Vec<&str> = all.lines().rev().take(5).collect();
            format!("rc={} {} {}", o.rc, diff.join("; "), tail.into_iter().rev().collect::<Vec<_>>().join(" | "))
        },
    );
}

/// The tenant's check of the OVMF guest: its deep quote (vPCRs 0-7 and host PCRs 0-7, from the
/// console as GUEST-DQ hex) verified by `xl-vtpm verify` with the guest's event log against a
/// policy made from that log (`xl-vtpm eventlog policy`, as a tenant would from a reference
/// boot): exit 8 (verified; no host PCR policy given, so host state not checked). The same log
/// with the last event's SHA-256 digest altered must be refused (exit 7).
fn deep_quote_verify(cx: &Cx, name: &str, nonce: &str, uuid: &str, e: &mut Errs) {
    const DQ: &str = "/tmp/hvm-ovmf-dq.bin";
    const POLICY: &str = "/tmp/hvm-ovmf-eventlog-policy.json";
    const TAMPERED: &str = "/tmp/hvm-ovmf-eventlog-tampered.bin";
    if let Err(m) = super::capture_dq(name, DQ) {
        e.add(format!("{name}-{m}"));
        return;
    }
    if let Err(m) = super::vtpm::group_ak(cx) {
        e.add(format!("{name}-group-ak({m})"));
        return;
    }
    let o = Cmd::new(&["xl-vtpm", "eventlog", "policy", EVLOG_BIN, "--replay", "0-7", "--out", POLICY])
        .env("NO_COLOR", "1")
        .secs(30)
        .run(cx);
    show("xl-vtpm eventlog policy", &o.all());
    if !o.ok() {
        e.add(format!("{name}-eventlog-policy-rc={}", o.rc));
        return;
    }
    let with_log = |log: &str, tag: &str, save: &str| {
        super::verify(cx, DQ, nonce, uuid, tag, save, 12, &["--guest-event-log", log, "--guest-event-log-policy", POLICY]).rc
    };
    let rc_ok = with_log(EVLOG_BIN, "verify hvm-ovmf + event log", "/tmp/hvm-ovmf-verify-ok.out");
    // the last event's digest altered: the log no longer replays to the quoted vPCRs
    let o = Cmd::new(&["xl-vtpm", "--json", "eventlog", "show", EVLOG_BIN]).secs(30).run(cx);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
    let last = v["events"]
        .as_array()
        .and_then(|a| a.iter().rev().find_map(|ev| ev["sha256"].as_str()))
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_default();
    let mut raw = std::fs::read(EVLOG_BIN).unwrap_or_default();
    let at = if last.len() == 32 { raw.windows(32).rposition(|w| w == last.as_slice()) } else { None };
    let rc_bad = match at {
        Some(i) => {
            raw[i] ^= 0x01;
            let _ = std::fs::write(TAMPERED, &raw);
            with_log(TAMPERED, "verify hvm-ovmf + altered event log", "/tmp/hvm-ovmf-verify-bad.out")
        }
        None => -1,
    };
    e.check(
        &format!("{name}-deep-quote-verify"),
        rc_ok == 8 && rc_bad == 7,
        format!(
            "xl-vtpm verify of the guest's deep quote with its event log and policy: exit {rc_ok} (want 8: verified, host unchecked); with the last event's digest altered: exit {rc_bad} (want 7)"
        ),
    );
}

/// A reboot step: the guest, its check-name prefix, its PERF keys, and whether OVMF boots it.
struct Reboot<'a> {
    name: &'a str,
    tag: &'a str,
    boot_key: &'a str,
    p5_key: &'a str,
    ovmf: bool,
}

/// What boot 1 left: its missing checks, console, domid and vTPM process.
struct Boot1<'a> {
    miss: &'a [String],
    console: &'a str,
    domid: &'a str,
    pid: Option<u32>,
}

/// `xl-vtpm reboot` (a platform reset) after boot 1: boot 2's checks ("kept" state) in the same
/// vTPM process under a new domid, with the same EK; its waits leave `reserve` s to what follows.
/// Returns boot 2's console, or None when boot 1 left nothing to show across a reboot (no TPM or
/// no end) or the phase is out of time.
fn reboot(cx: &Cx, g: &Reboot, b1: &Boot1, reserve: u64, e: &mut Errs) -> Option<String> {
    let name = g.name;
    if b1.miss.iter().any(|m| m == "no-GUEST-DONE" || m == "tpm0") || cx.past_deadline() {
        e.add("reboot-skipped");
        return None;
    }
    let off2 = lines_of(&xen::clog(name));
    let w1 = now_wall();
    let o = Cmd::new(&["xl-vtpm", "reboot", name]).env("NO_COLOR", "1").secs(60).run(cx);
    show("xl-vtpm reboot", &o.all());
    if !o.ok() {
        e.add(format!("xl-vtpm-reboot-rc={}", o.rc));
    }
    let wait2 = left_for(cx, reserve);
    println!("{name}: waiting up to {wait2} s for boot 2 (scenario left {} s)", cx.scenario_left().as_secs());
    let (miss2, c2) = guest_boot(cx, name, off2, "boot2", "kept", wait2, g.ovmf);
    boot_perf(g.boot_key, &c2, w1);
    p5_hvm(g.p5_key, &c2, w1);
    let tag = g.tag;
    e.check(&format!("{tag}-guest-boot2"), miss2.is_empty(), if miss2.is_empty() { "all checks PASS".into() } else { miss2.join(" ") });
    let d2 = xen::domid(name).unwrap_or_default();
    let pid2: Option<u32> = jf(&life_row(cx, name), "vtpm_pid").parse().ok();
    let (d1, pid) = (b1.domid, b1.pid);
    e.check(
        &format!("{tag}-reboot-same-vtpm"),
        pid2 == pid && pid_up(pid) && !d2.is_empty() && d2 != d1,
        format!("domid {d1} -> {d2}, vTPM pid {pid:?} -> {pid2:?} (same process, new domain)"),
    );
    let (ek1, ek2) = (ek_hash(b1.console), ek_hash(&c2));
    e.check(&format!("{tag}-ek-stable"), !ek1.is_empty() && ek1 == ek2, format!("EK sha256 boot1 {ek1} boot2 {ek2}"));
    Some(c2)
}

/// hvm-crb and hvm-ovmf: the hvm-tis guest with QEMU's tpm-crb. hvmloader has no tables for a CRB
/// TPM; `xl-vtpm create` passes a TPM2 table and an MSFT0101 device in `acpi_firmware`, and the
/// guest must find the TPM through them (tpm_crb, no force) and pass boot 1's checks. Booted by
/// OVMF (`g.ovmf`): the event log replays in the guest and in dom0, and after `xl-vtpm reboot`
/// the same vTPM serves the new domain with NV and EK kept, PCRs reset and measured again.
fn crb(cx: &Cx, st: &mut St, dm: &str, g: &Crb, after: u64) -> Outcome {
    let name = g.name;
    if dm == "none" || !Path::new(dm).is_file() {
        return Outcome::fail(format!("no TPM-enabled device model in dom0 (hvm_dm={dm})"));
    }
    if g.ovmf {
        let fd = xen::testbed_env("hvm_ovmf").unwrap_or_else(|| "none".into());
        if fd == "none" || !Path::new(&fd).is_file() {
            return Outcome::fail(format!(
                "no OVMF for Xen in dom0 (hvm_ovmf={fd}): run.sh builds it with build-ovmf-xen.sh unless XVTPM_TESTBED_HVM=0 or crb"
            ));
        }
    }
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    let mut e = Errs::default();
    let off = lines_of(&xen::clog(name));
    let w0 = now_wall();
    let save = format!("/tmp/xl-{name}-create.out");
    // OVMF: the deep quote's nonce rides on the guest's command line (a copy of the config)
    let nonce = xen::nonce(32);
    let cfg = if g.ovmf {
        let path = format!("/tmp/{name}.cfg");
        let text: String = xen::read_text(g.cfg)
            .lines()
            .map(|l| match l.strip_prefix("extra = \"").and_then(|x| x.strip_suffix('"')) {
                Some(x) => format!("extra = \"{x} dq_nonce={nonce}\"\n"),
                None => format!("{l}\n"),
            })
            .collect();
        if !text.contains("dq_nonce=") || std::fs::write(&path, text).is_err() {
            return Outcome::fail(format!("cannot write {path} with dq_nonce from {}", g.cfg));
        }
        path
    } else {
        g.cfg.to_string()
    };
    let (o, _, uuid, pid) = create(cx, name, &cfg, &save);
    let vlog_path = format!("/var/lib/xvtpm/vtpms/{uuid}/vtpm.log");
    if g.ovmf {
        st.ovlog = vlog_path.clone();
    }
    let d1 = xen::domid(name).unwrap_or_default();
    if !o.ok() || d1.is_empty() || !pid_up(pid) {
        show_tail("qemu-dm", &xen::read_text(g.dm_log), 20);
        cleanup(cx, name, pid);
        return Outcome::fail(format!("xl-vtpm create exited {}: {}", o.rc, tail_of(&save)));
    }
    let dmline = device_model_with(cx, "tpm-crb,tpmdev=xvtpm-tpm");
    e.check(
        &format!("{name}-dm-args"),
        dmline.contains("tpm-crb,tpmdev=xvtpm-tpm") && dmline.contains(&uuid),
        format!("device model: {}", dmline.trim()),
    );
    // OVMF: boot 1, the reboot and boot 2 share what is left before the later phases
    let reserve = after + DESTROY + if g.ovmf { MIN_WAIT } else { 0 };
    let wait = left_for(cx, reserve);
    println!("{name}: waiting up to {wait} s for the boot (scenario left {} s)", cx.scenario_left().as_secs());
    let (mut miss, c) = guest_boot(cx, name, off, "boot1", "fresh", wait, g.ovmf);
    let tpm0 = xen::after_prefix(&c, "GUEST-CHECK tpm0 ").unwrap_or_default();
    if !(tpm0.contains("driver tpm_crb") && tpm0.contains("via ACPI MSFT0101") && tpm0.contains("TPM2 table yes")) {
        miss.push("crb-via-acpi".into());
    }
    boot_perf(&format!("{name}-boot1-ms"), &c, w0);
    p5_hvm(&format!("p5-{name}-with-vtpm-ms"), &c, w0);
    key_times(name, &c);
    e.check(
        &format!("{name}-guest"),
        miss.is_empty(),
        if miss.is_empty() { format!("all checks PASS; tpm0 {}", tpm0.trim()) } else { miss.join(" ") },
    );
    if g.ovmf {
        eventlog_dom0(cx, &c, &mut e);
        deep_quote_verify(cx, name, &nonce, &uuid, &mut e);
        let b1 = Boot1 { miss: &miss, console: &c, domid: &d1, pid };
        let (boot_key, p5_key) = (format!("{name}-boot2-ms"), format!("p5-{name}-with-vtpm-reboot-ms"));
        let rb = Reboot { name, tag: name, boot_key: &boot_key, p5_key: &p5_key, ovmf: true };
        if let Some(c2) = reboot(cx, &rb, &b1, after + DESTROY, &mut e) {
            // the firmware measured the same boot again into the reset PCRs
            let (p1, p2) = (pcr_words(&c, "GUEST-EVLOG-PCRS "), pcr_words(&c2, "GUEST-EVLOG-PCRS "));
            e.check(
                &format!("{name}-pcrs-remeasured"),
                p1.len() == 8 && p1 == p2,
                format!("PCRs 0-7 boot1 {p1:?} boot2 {p2:?} (the same firmware and kernel measure the same values after the reset)"),
            );
        }
    }
    let dmlog = xen::read_text(g.dm_log);
    let vlog = xen::read_text(&vlog_path);
    let mut bad = ctrl_errors(&dmlog);
    bad.extend(ctrl_errors(&vlog));
    e.check(
        &format!("{name}-ctrl-clean"),
        bad.is_empty(),
        if bad.is_empty() { "no control-channel error in either log".to_string() } else { bad.join(" | ") },
    );
    let o = Cmd::new(&["xl-vtpm", "destroy", name]).env("NO_COLOR", "1").secs(90).run(cx);
    show("xl-vtpm destroy", &o.all());
    let gone = cx.wait_every(30, Duration::from_millis(100), || !pid_up(pid));
    e.check(
        &format!("{name}-destroy"),
        o.ok() && gone && xen::domain_gone(name) && device_models().trim().is_empty(),
        format!("rc={}; domain {}; vTPM pid {} {}", o.rc, if xen::domain_gone(name) { "gone" } else { "still there" }, pid.unwrap_or(0), if gone { "gone" } else { "still running" }),
    );
    if !e.is_empty() {
        show_tail(&format!("qemu-dm {name}"), &dmlog, 20);
        show_tail(&format!("vtpm.log {name}"), &vlog, 20);
        cleanup(cx, name, pid);
    }
    e.verdict(if g.ovmf {
        format!(
            "HVM guest booted by OVMF for Xen with tpm-crb: TPM 2.0 through the TPM2 table and MSFT0101 device (tpm_crb, no force), the firmware's event log replays to PCRs 0-7 in the guest and in dom0, quote over PCRs 0-7 verified, NV and EK kept across xl-vtpm reboot with PCRs measured anew; vTPM {uuid} gone after xl-vtpm destroy"
        )
    } else {
        format!(
            "HVM guest with tpm-crb: TPM 2.0 found through xl-vtpm's TPM2 table and MSFT0101 device (tpm_crb, no force), quote verified, NV, EK certificate; vTPM {uuid} gone after xl-vtpm destroy"
        )
    })
}

pub fn run(r: &mut Runner, st: &mut St) {
    if st.hvm_mode == "0" {
        for p in [NAME, CRB.name, OVMF.name].into_iter().chain(super::hvmmig::PHASES) {
            r.skip(p, "disabled (XVTPM_TESTBED_HVM=0)");
        }
        return;
    }
    // XVTPM_TESTBED_HVM=mig: the hvm-migrate phases alone
    if st.hvm_mode == "mig" {
        for p in [NAME, CRB.name, OVMF.name] {
            r.skip(p, "XVTPM_TESTBED_HVM=mig: the hvm-migrate phases only");
        }
        super::hvmmig::run(r, st);
        return;
    }
    // XVTPM_TESTBED_HVM=crb or ovmf: that phase alone (a quicker run while working on it)
    if st.hvm_mode == "crb" || st.hvm_mode == "ovmf" {
        let g = if st.hvm_mode == "crb" { &CRB } else { &OVMF };
        for p in [NAME, CRB.name, OVMF.name].into_iter().chain(super::hvmmig::PHASES).filter(|p| *p != g.name) {
            r.skip(p, &format!("XVTPM_TESTBED_HVM={}: the {} phase only", st.hvm_mode, g.name));
        }
        let secs = r.cx.scenario_left().as_secs().max(MIN_WAIT);
        r.phase(g.name, deadline(secs), |cx| crb(cx, st, &dm_path(), g, AFTER_PHASE));
        return;
    }
    // the phase may use what the scenario has left (its waits leave the later phases theirs)
    let phase_secs = r.cx.scenario_left().as_secs().max(MIN_WAIT);
    r.phase("hvm-tis", deadline(phase_secs), |cx| {
        let dm = dm_path();
        if dm == "none" || !Path::new(&dm).is_file() {
            return Outcome::fail(format!(
                "no TPM-enabled device model in dom0 (hvm_dm={dm}; run.sh builds it with build-qemu-xen.sh unless XVTPM_TESTBED_HVM=0)"
            ));
        }
        if !st.mgr_ready() {
            return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
        }
        let caps = Cmd::sh("xl info").split().secs(30).run(cx).stdout;
        let caps = caps.lines().find(|l| l.starts_with("virt_caps")).unwrap_or("").to_string();
        println!("hvm: {caps}");
        if !(caps.contains("hvm") && caps.contains("hap")) {
            return Outcome::fail(format!(
                "Xen offers no HVM with HAP ({caps}): Debian's Xen has no shadow paging; the outer QEMU needs -cpu max,-smap,-xsave (run.sh's default XVTPM_TESTBED_CPU)"
            ));
        }
        for l in xen::read_text(CFG).lines() {
            let t = l.trim_start();
            if !t.is_empty() && !t.starts_with('#') {
                println!("[hvm-tis.cfg] {l}");
            }
        }
        let mut e = Errs::default();

        // ---- create: vTPM process + libxl's device model with tpm-tis ----
        let off = lines_of(&xen::clog(NAME));
        let w0 = now_wall();
        let (o, row, uuid, pid) = create(cx, NAME, CFG, "/tmp/xl-hvm-create.out");
        let d1 = xen::domid(NAME).unwrap_or_default();
        st.hvlog = format!("/var/lib/xvtpm/vtpms/{uuid}/vtpm.log");
        println!("registry: {}", row_line(&row));
        if !o.ok() || d1.is_empty() || !pid_up(pid) {
            show_tail("qemu-dm", &xen::read_text(DM_LOG), 20);
            cleanup(cx, NAME, pid);
            return Outcome::fail(format!(
                "xl-vtpm create exited {} (domain {}, vTPM pid {}): {}",
                o.rc,
                if d1.is_empty() { "none" } else { &d1 },
                pid.map_or("none".into(), |p| p.to_string()),
                tail_of("/tmp/xl-hvm-create.out")
            ));
        }
        let dmline = device_model_with(cx, "tpm-tis,tpmdev=xvtpm-tpm");
        e.check(
            "hvm-dm-tpm-args",
            dmline.contains(&dm) && dmline.contains("tpm-tis,tpmdev=xvtpm-tpm") && dmline.contains(&uuid),
            format!("device model: {}", dmline.trim()),
        );

        // ---- boot 1: a fresh vTPM ----
        let wait1 = left_for(cx, AFTER_TIS + BASELINE + DESTROY + MIN_WAIT);
        println!("hvm: waiting up to {wait1} s for boot 1 (scenario left {} s)", cx.scenario_left().as_secs());
        let (miss, c1) = guest_boot(cx, NAME, off, "boot1", "fresh", wait1, false);
        boot_perf("hvm-tis-boot1-ms", &c1, w0);
        key_times("hvm-tis", &c1);
        p5_hvm("p5-hvm-with-vtpm-ms", &c1, w0);
        e.check("hvm-guest-boot1", miss.is_empty(), if miss.is_empty() { "all checks PASS".into() } else { miss.join(" ") });

        // ---- reboot: a platform reset, the same vTPM process ----
        let b1 = Boot1 { miss: &miss, console: &c1, domid: &d1, pid };
        let tis = Reboot { name: NAME, tag: "hvm", boot_key: "hvm-tis-boot2-ms", p5_key: "p5-hvm-with-vtpm-reboot-ms", ovmf: false };
        reboot(cx, &tis, &b1, AFTER_TIS + BASELINE + DESTROY, &mut e);

        // ---- the control channel: no disagreement in either log ----
        let dmlog = xen::read_text(DM_LOG);
        let vlog = xen::read_text(&st.hvlog);
        let mut bad = ctrl_errors(&dmlog);
        bad.extend(ctrl_errors(&vlog));
        for l in dmlog.lines().filter(|l| l.to_ascii_lowercase().contains("tpm")) {
            println!("[qemu-dm-hvm-tis] {l}");
        }
        e.check(
            "hvm-ctrl-clean",
            bad.is_empty(),
            if bad.is_empty() {
                "no control-channel error in the device model's log or the vTPM's".to_string()
            } else {
                bad.join(" | ")
            },
        );

        // ---- destroy: domain and vTPM process gone ----
        let t2 = up();
        let o = Cmd::new(&["xl-vtpm", "destroy", NAME]).env("NO_COLOR", "1").secs(90).run(cx);
        show("xl-vtpm destroy", &o.all());
        let gone = cx.wait_every(30, Duration::from_millis(100), || !pid_up(pid));
        e.check(
            "hvm-destroy",
            o.ok() && gone && xen::domain_gone(NAME),
            format!(
                "rc={}; domain {}; vTPM pid {} {} ({} s)",
                o.rc,
                if xen::domain_gone(NAME) { "gone" } else { "still there" },
                pid.unwrap_or(0),
                if gone { "gone" } else { "still running" },
                secs1(t2, up())
            ),
        );
        let dm_left = device_models();
        e.check("hvm-dm-gone", dm_left.trim().is_empty(), format!("device models left: {}", dm_left.trim()));
        if !e.is_empty() {
            show_tail("qemu-dm", &dmlog, 20);
            show_tail("vtpm.log", &vlog, 20);
            cleanup(cx, NAME, pid);
        }

        // ---- the same guest without a vTPM: P5's baseline ----
        baseline(cx, &mut e);
        e.verdict(format!(
            "HVM guest (SeaBIOS, tsc_mode native) with tpm-tis from {dm}: TPM 2.0 via ACPI, quote verified, EK certificate read, NV kept across xl-vtpm reboot with PCRs reset; vTPM {uuid} pid {} gone after xl-vtpm destroy; without a vTPM no TPM",
            pid.unwrap_or(0)
        ))
    });
    let secs = r.cx.scenario_left().as_secs().max(MIN_WAIT);
    r.phase(CRB.name, deadline(secs), |cx| crb(cx, st, &dm_path(), &CRB, AFTER_PHASE + OVMF_PHASE));
    let secs = r.cx.scenario_left().as_secs().max(MIN_WAIT);
    r.phase(OVMF.name, deadline(secs), |cx| crb(cx, st, &dm_path(), &OVMF, AFTER_PHASE));
    super::hvmmig::run(r, st);
}
