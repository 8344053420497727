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
/// The same guest with QEMU's tpm-crb (`vtpm = [ "model=crb" ]`; build-images.sh writes it from
/// hvm-tis.cfg).
pub const CRB: &str = "hvm-crb";
pub const CRB_CFG: &str = "/etc/xen/hvm-crb.cfg";
pub const CRB_DM_LOG: &str = "/var/log/xen/qemu-dm-hvm-crb.log";
/// The same guest without a vTPM (build-images.sh writes it from hvm-tis.cfg).
pub const NOTPM: &str = "hvm-notpm";
pub const NOTPM_CFG: &str = "/etc/xen/hvm-notpm.cfg";

/// What the phases after this one (tpm2-guest, teardown and the log dump) need of the scenario's
/// time, in s; this phase's waits leave it to them.
const AFTER_PHASE: u64 = 150;
/// What the hvm-crb phase after hvm-tis needs (one boot of the same guest, ~60 s on an idle
/// host, and its destroy), with a margin; hvm-tis's waits leave it this.
const CRB_PHASE: u64 = 180;
/// What hvm-tis's waits leave to what follows it.
const AFTER_TIS: u64 = AFTER_PHASE + CRB_PHASE;
/// `xl-vtpm destroy` of the guest and the checks after it (measured 17 s), with a margin.
const DESTROY: u64 = 45;
/// The baseline guest without a vTPM: xl create -> /init -> GUEST-DONE, xl destroy (measured
/// ~20 s to /init on an idle host), with a margin.
const BASELINE: u64 = 90;
/// The least a boot's wait gets, even when the budget says less (it then fails, naming itself).
const MIN_WAIT: u64 = 60;

/// A wait that leaves `reserve` s of the scenario to what follows it.
fn left_for(cx: &Cx, reserve: u64) -> u64 {
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

fn dm_path() -> String {
    xen::read_text("/etc/xvtpm-testbed.env")
        .lines()
        .find_map(|l| l.strip_prefix("hvm_dm="))
        .unwrap_or("none")
        .trim()
        .to_string()
}

/// Waits for this boot's GUEST-DONE (console after line `off`); echoes the checks. Returns the
/// failures and the console text of this boot.
fn guest_boot(cx: &Cx, name: &str, off: usize, tag: &str, state: &str, secs: u64) -> (Vec<String>, String) {
    let mut miss = Vec::new();
    // the guest's markers as they come (with dom0's uptime): where a slow boot spends its time
    let mut seen = 0;
    if !cx.wait_every(secs, Duration::from_secs(1), || {
        let c = console_from(name, off);
        for l in c.lines().skip(seen) {
            seen += 1;
            if l.starts_with("GUEST-") {
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
        "PERF {key}={} (ms: -> guest /init; of it: to the kernel's start {} ms (domain + device model + hvmloader + SeaBIOS + \
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
fn device_models() -> String {
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

/// Lines of `text` that name a control-channel disagreement.
fn ctrl_errors(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| CTRL_ERRORS.iter().any(|k| l.contains(k)))
        .map(str::to_string)
        .collect()
}

/// Leaves no domain `name` and no live vTPM process `pid` (after a failed step).
fn cleanup(cx: &Cx, name: &str, pid: Option<u32>) {
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
fn create(cx: &Cx, name: &str, cfg: &str, save: &str) -> (crate::cmd::Output, serde_json::Value, String, Option<u32>) {
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

/// hvm-crb: the hvm-tis guest with QEMU's tpm-crb. hvmloader has no tables for a CRB TPM;
/// `xl-vtpm create` passes a TPM2 table and an MSFT0101 device in `acpi_firmware`, and the
/// guest must find the TPM through them (tpm_crb, no force) and pass boot 1's checks.
fn crb(cx: &Cx, st: &mut St, dm: &str) -> Outcome {
    if dm == "none" || !Path::new(dm).is_file() {
        return Outcome::fail(format!("no TPM-enabled device model in dom0 (hvm_dm={dm})"));
    }
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    let mut e = Errs::default();
    let off = lines_of(&xen::clog(CRB));
    let w0 = now_wall();
    let (o, _, uuid, pid) = create(cx, CRB, CRB_CFG, "/tmp/xl-hvm-crb-create.out");
    let vlog_path = format!("/var/lib/xvtpm/vtpms/{uuid}/vtpm.log");
    if !o.ok() || xen::domid(CRB).is_none() || !pid_up(pid) {
        show_tail("qemu-dm", &xen::read_text(CRB_DM_LOG), 20);
        cleanup(cx, CRB, pid);
        return Outcome::fail(format!("xl-vtpm create exited {}: {}", o.rc, tail_of("/tmp/xl-hvm-crb-create.out")));
    }
    let dmline = device_models();
    e.check(
        "hvm-crb-dm-args",
        dmline.contains("tpm-crb,tpmdev=xvtpm-tpm") && dmline.contains(&uuid),
        format!("device model: {}", dmline.trim()),
    );
    let wait = left_for(cx, AFTER_PHASE + DESTROY);
    println!("hvm-crb: waiting up to {wait} s for the boot (scenario left {} s)", cx.scenario_left().as_secs());
    let (mut miss, c) = guest_boot(cx, CRB, off, "boot1", "fresh", wait);
    let tpm0 = xen::after_prefix(&c, "GUEST-CHECK tpm0 ").unwrap_or_default();
    if !(tpm0.contains("driver tpm_crb") && tpm0.contains("via ACPI MSFT0101") && tpm0.contains("TPM2 table yes")) {
        miss.push("crb-via-acpi".into());
    }
    boot_perf("hvm-crb-boot1-ms", &c, w0);
    p5_hvm("p5-hvm-crb-with-vtpm-ms", &c, w0);
    key_times("hvm-crb", &c);
    e.check(
        "hvm-crb-guest",
        miss.is_empty(),
        if miss.is_empty() { format!("all checks PASS; tpm0 {}", tpm0.trim()) } else { miss.join(" ") },
    );
    let dmlog = xen::read_text(CRB_DM_LOG);
    let vlog = xen::read_text(&vlog_path);
    let mut bad = ctrl_errors(&dmlog);
    bad.extend(ctrl_errors(&vlog));
    e.check(
        "hvm-crb-ctrl-clean",
        bad.is_empty(),
        if bad.is_empty() { "no control-channel error in either log".to_string() } else { bad.join(" | ") },
    );
    let o = Cmd::new(&["xl-vtpm", "destroy", CRB]).env("NO_COLOR", "1").secs(90).run(cx);
    show("xl-vtpm destroy", &o.all());
    let gone = cx.wait_every(30, Duration::from_millis(100), || !pid_up(pid));
    e.check(
        "hvm-crb-destroy",
        o.ok() && gone && xen::domain_gone(CRB) && device_models().trim().is_empty(),
        format!("rc={}; domain {}; vTPM pid {} {}", o.rc, if xen::domain_gone(CRB) { "gone" } else { "still there" }, pid.unwrap_or(0), if gone { "gone" } else { "still running" }),
    );
    if !e.is_empty() {
        show_tail("qemu-dm hvm-crb", &dmlog, 20);
        show_tail("vtpm.log hvm-crb", &vlog, 20);
        cleanup(cx, CRB, pid);
    }
    e.verdict(format!(
        "HVM guest with tpm-crb: TPM 2.0 found through xl-vtpm's TPM2 table and MSFT0101 device (tpm_crb, no force), quote verified, NV, EK certificate; vTPM {uuid} gone after xl-vtpm destroy"
    ))
}

pub fn run(r: &mut Runner, st: &mut St) {
    if st.hvm_mode == "0" {
        r.skip("hvm-tis", "disabled (XVTPM_TESTBED_HVM=0)");
        r.skip("hvm-crb", "disabled (XVTPM_TESTBED_HVM=0)");
        return;
    }
    // XVTPM_TESTBED_HVM=crb: the hvm-crb phase alone (a quicker run while working on it)
    if st.hvm_mode == "crb" {
        r.skip("hvm-tis", "XVTPM_TESTBED_HVM=crb: the hvm-crb phase only");
        let secs = r.cx.scenario_left().as_secs().max(MIN_WAIT);
        r.phase("hvm-crb", deadline(secs), |cx| crb(cx, st, &dm_path()));
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
        let dmline = device_models();
        e.check(
            "hvm-dm-tpm-args",
            dmline.contains(&dm) && dmline.contains("tpm-tis,tpmdev=xvtpm-tpm") && dmline.contains(&uuid),
            format!("device model: {}", dmline.trim()),
        );

        // ---- boot 1: a fresh vTPM ----
        let wait1 = left_for(cx, AFTER_TIS + BASELINE + DESTROY + MIN_WAIT);
        println!("hvm: waiting up to {wait1} s for boot 1 (scenario left {} s)", cx.scenario_left().as_secs());
        let (miss, c1) = guest_boot(cx, NAME, off, "boot1", "fresh", wait1);
        boot_perf("hvm-tis-boot1-ms", &c1, w0);
        key_times("hvm-tis", &c1);
        p5_hvm("p5-hvm-with-vtpm-ms", &c1, w0);
        e.check("hvm-guest-boot1", miss.is_empty(), if miss.is_empty() { "all checks PASS".into() } else { miss.join(" ") });
        let ek1 = ek_hash(&c1);

        // ---- reboot: a platform reset, the same vTPM process ----
        // a guest without its TPM (or without an end) has nothing to show across a reboot
        if miss.iter().any(|m| m == "no-GUEST-DONE" || m == "tpm0") || cx.past_deadline() {
            e.add("reboot-skipped");
        } else {
            let off2 = lines_of(&xen::clog(NAME));
            let w1 = now_wall();
            let o = Cmd::new(&["xl-vtpm", "reboot", NAME]).env("NO_COLOR", "1").secs(60).run(cx);
            show("xl-vtpm reboot", &o.all());
            if !o.ok() {
                e.add(format!("xl-vtpm-reboot-rc={}", o.rc));
            }
            let wait2 = left_for(cx, AFTER_TIS + BASELINE + DESTROY);
            println!("hvm: waiting up to {wait2} s for boot 2 (scenario left {} s)", cx.scenario_left().as_secs());
            let (miss2, c2) = guest_boot(cx, NAME, off2, "boot2", "kept", wait2);
            boot_perf("hvm-tis-boot2-ms", &c2, w1);
            p5_hvm("p5-hvm-with-vtpm-reboot-ms", &c2, w1);
            e.check("hvm-guest-boot2", miss2.is_empty(), if miss2.is_empty() { "all checks PASS".into() } else { miss2.join(" ") });
            let d2 = xen::domid(NAME).unwrap_or_default();
            let row2 = life_row(cx, NAME);
            let pid2: Option<u32> = jf(&row2, "vtpm_pid").parse().ok();
            e.check(
                "hvm-reboot-same-vtpm",
                pid2 == pid && pid_up(pid) && !d2.is_empty() && d2 != d1,
                format!("domid {d1} -> {d2}, vTPM pid {:?} -> {:?} (same process, new domain)", pid, pid2),
            );
            let ek2 = ek_hash(&c2);
            e.check("hvm-ek-stable", !ek1.is_empty() && ek1 == ek2, format!("EK sha256 boot1 {ek1} boot2 {ek2}"));
        }

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
    r.phase("hvm-crb", deadline(secs), |cx| crb(cx, st, &dm_path()));
}
