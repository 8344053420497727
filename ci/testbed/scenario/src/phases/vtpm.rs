//! vtpm-create, vtpm-guest, deep-quote, vtpm-reboot, vtpm-destroy: vtpm-domain as a dom0
//! process serving tpmif; guest boot, reboot, destroy.
//! With XVTPM_TESTBED_MGRDOM=1 the set runs a second time after `mgrdom-serve`, as `vtpm-*@mgrdom`
//! (mgrdom.rs, `st.mgr_dom` set): the manager runs in its own domain and dom0's `vtpmmgr bridge`
//! relays the vTPM process's requests. The same checks; added there: `vtpm-relayed` (the vTPM's
//! socket bound by the bridge, relayed.json), `vtpm-relayed-gone` (socket and attachment gone after
//! `xl-vtpm vtpm stop`); the deep quote is verified with the group AK fetched through the bridge.
//! host-eventlog and attest-service are SKIPPED there: they need dom0's own TPM event log.

use std::fs;
use std::path::Path;

use super::{
    BOOT1_CHECKS, GuestBoot, REBOOT_CHECKS, St, capture_dq, deadline, ek_stable, secs1, up,
    verify_ak, verify_nonces_ak,
};
use crate::cmd::{Cmd, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner, check};
use crate::xen;

const GCFG: &str = "/etc/xen/guest-vtpm.cfg";
const OTHER: &str = "00000000-0000-4000-8000-000000000001";

/// The phases of this set, in order (mgrdom.rs skips them by name when their second pass cannot run).
pub const PHASES: [&str; 7] = [
    "vtpm-create",
    "vtpm-guest",
    "deep-quote",
    "host-eventlog",
    "attest-service",
    "vtpm-reboot",
    "vtpm-destroy",
];

pub fn run(r: &mut Runner, st: &mut St) {
    if st.vtpm_mode == "0" {
        r.skip_all(&PHASES, "disabled (XVTPM_TESTBED_VTPM=0)");
        return;
    }
    r.phase("vtpm-create", deadline(150), |cx| create(cx, st));
    r.phase("vtpm-guest", deadline(650), |cx| guest(cx, st));
    r.phase("deep-quote", deadline(260), |cx| deep_quote(cx, st));
    if st.mgr_dom.is_some() {
        // dom0's TPM is unbound (mgrdom-unbind): no /sys/kernel/security/tpm0 event log in dom0
        r.skip(
            "host-eventlog",
            "needs dom0's own TPM: its measured-boot event log is /sys/kernel/security/tpm0, gone since mgrdom-unbind unbound dom0's tpm_tis (the manager domain owns the TPM); the first pass checked it",
        );
        r.skip(
            "attest-service",
            "needs host-eventlog's event-log policy of this pass (host-eventlog@mgrdom is SKIPPED: dom0 has no TPM event log with the TPM in the manager domain); the first pass checked it",
        );
    } else {
        r.phase("host-eventlog", deadline(200), |cx| {
            super::eventlog::host_eventlog(cx, st)
        });
        r.phase("attest-service", deadline(150), |cx| {
            super::attest::attest_service(cx, st)
        });
    }
    r.phase("vtpm-reboot", deadline(420), |cx| reboot(cx, st));
    r.phase("vtpm-destroy", deadline(200), |cx| destroy(cx, st));
}

/// A `Pss:`/`Rss:` value (kB) of /proc/PID/smaps_rollup.
pub fn kib(pid: Option<u32>, key: &str) -> String {
    let Some(p) = pid else { return String::new() };
    xen::read_text(&format!("/proc/{p}/smaps_rollup"))
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_default()
}

fn create(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    if !Path::new("/usr/bin/vtpm-domain").exists() {
        return Outcome::fail("vtpm-domain not built");
    }
    let t0 = up();
    let o = Cmd::sh("xl-vtpm vtpm create --listen xen:/local/domain/0/backend/vtpm --json")
        .env("XVTPM_LOG", "info")
        .env("NO_COLOR", "1")
        .secs(90)
        .save_split("/tmp/vtpm-create.json", "/tmp/vtpm-create.err")
        .run(cx);
    println!("xl-vtpm vtpm create: rc={} in {} s", o.rc, secs1(t0, up()));
    show_tail("vtpm create", &o.all(), 40);
    let j = xen::parse_json(&o.stdout);
    let uuid = j
        .as_ref()
        .and_then(|v| xen::find_key(v, "uuid"))
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let pid = j
        .as_ref()
        .and_then(|v| xen::find_key(v, "pid"))
        .and_then(|v| v.as_u64())
        .and_then(|p| u32::try_from(p).ok());
    st.vtpm_uuid = uuid.clone();
    st.vtpm_pid = pid;
    st.vlog = format!("/var/lib/xvtpm/vtpms/{uuid}/vtpm.log");
    if o.rc != 0 {
        e.add(format!("xl-vtpm vtpm create exited {}", o.rc));
    } else if uuid.is_empty()
        || pid.is_none()
        || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
    {
        e.add("no uuid/pid in the --json output");
    } else if !cx.wait_until(30, || {
        xen::read_text(&st.vlog).contains("tpmif backend watching")
    }) {
        e.add(format!(
            "no 'tpmif backend watching' in {} within 30 s",
            st.vlog
        ));
    } else if st.vtpm_exited() {
        e.add(format!(
            "vtpm-domain (pid {}) is not running",
            pid.unwrap_or(0)
        ));
    } else {
        // least privilege in dom0-process mode too: its own uid, no-new-privileges, seccomp
        let status = xen::read_text(&format!("/proc/{}/status", pid.unwrap_or(0)));
        let line: Vec<String> = status
            .lines()
            .filter(|l| {
                l.starts_with("Uid:") || l.starts_with("NoNewPrivs:") || l.starts_with("Seccomp:")
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let stl = line.join(" ");
        let root = stl.starts_with("Uid: 0 ");
        let ok = !root && stl.contains("NoNewPrivs: 1") && stl.contains("Seccomp: 2");
        check("dom0", "vtpm-sandboxed", ok, &stl);
        if !ok {
            e.add(format!("vtpm-domain is not sandboxed: {stl}"));
        }
        // second pass: the manager is in its own domain; the vTPM's socket is the bridge's
        if st.mgr_dom.is_some() {
            let _ = cx.wait_until(10, || Path::new(&super::vtpm_sock(&uuid)).exists());
            super::relayed_check(&mut e, st, "vtpm-relayed", &uuid, pid);
        }
    }
    if Path::new(&st.vlog).is_file() {
        show_tail("vtpm.log", &xen::read_text(&st.vlog), 5);
    }
    println!("PERF vtpm-create-s={}", secs1(t0, up()));
    if pid.is_some() {
        println!(
            "PERF vtpm-idle-pss-kib={} vtpm-idle-rss-kib={}",
            kib(pid, "Pss"),
            kib(pid, "Rss")
        );
    }
    if e.is_empty() {
        Outcome::pass(format!(
            "vTPM {uuid}, vtpm-domain pid {}, tpmif backend watching /local/domain/0/backend/vtpm{}",
            pid.unwrap_or(0),
            relayed_said(st)
        ))
    } else {
        st.vtpm_uuid.clear();
        Outcome::fail(e.joined())
    }
}

/// Boot N of guest-vtpm on the vTPM `uuid` (`extra` on its kernel command line).
fn boot<'a>(uuid: &'a str, extra: &'a str, n: u32) -> GuestBoot<'a> {
    GuestBoot {
        name: "guest-vtpm",
        cfg: GCFG,
        subst: vec![("@UUID@", uuid), ("@EXTRA@", extra)],
        n,
        checks: if n == 1 {
            &BOOT1_CHECKS
        } else {
            &REBOOT_CHECKS
        },
        wait: if n == 1 { 400 } else { 180 },
        p5: if n == 1 {
            "p5-with-vtpm-ms"
        } else {
            "p5-with-vtpm-reboot-ms"
        },
        show: if n == 1 { 30 } else { 20 },
    }
}

fn guest(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if st.vtpm_uuid.is_empty() {
        return Outcome::fail("no vTPM (vtpm-create failed)");
    }
    // a console left by an earlier boot of guest-vtpm (the first pass's boot 2, held until
    // vtpm-destroy) is kept apart: its GUEST-DONE must not count for this boot
    keep_console("guest-vtpm-boot2-earlier");
    st.dq_nonce = xen::nonce(32);
    let extra = format!("boot=1 dq_nonce={}", st.dq_nonce);
    let uuid = st.vtpm_uuid.clone();
    // 28-36 s to GUEST-DONE on a quiet host; ~320 s at load 15 on 2 cores (tpm2-tools under TCG)
    let b = boot(&uuid, &extra, 1).run(cx, &mut e);
    if b.created {
        st.ek1 = b.ek;
        if let Err(x) = capture_dq("guest-vtpm", "/tmp/dq.bin") {
            e.add(x);
        }
        xen::poweroff_or_destroy(cx, "guest-vtpm", &mut e);
        if st.vtpm_exited() {
            e.add("vtpm-domain-died");
        }
    }
    let _ = fs::rename(
        xen::clog("guest-vtpm"),
        format!(
            "/var/log/xen/console/guest-guest-vtpm-boot1{}.log",
            crate::runner::suffix()
        ),
    );
    e.verdict(format!(
        "boot 1: all guest checks passed on /dev/tpm0 (TPM 2.0 behind stock xen-tpmfront){}",
        relayed_said(st)
    ))
}

/// Moves guest-vtpm's console log (if any) to `guest-TAG.log` (a second pass's with its suffix).
fn keep_console(tag: &str) {
    let c = xen::clog("guest-vtpm");
    if Path::new(&c).exists() {
        let to = format!("/var/log/xen/console/guest-{tag}{}.log", crate::runner::suffix());
        println!("guest-vtpm: an earlier console log kept as {to}");
        let _ = fs::rename(&c, to);
    }
}

/// `; manager: … (relayed by dom0's vtpmmgr bridge)` for a verdict of the second pass.
fn relayed_said(st: &St) -> String {
    if st.mgr_dom.is_some() {
        format!(
            "; manager: {}, the vTPM process's requests relayed by dom0's vtpmmgr bridge",
            st.mgr_where()
        )
    } else {
        String::new()
    }
}

/// The group AK into /tmp/ak.bin (once).
pub fn group_ak(cx: &Cx) -> Result<(), String> {
    if fs::metadata("/tmp/ak.bin")
        .map(|m| m.len() > 0)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let o = Cmd::sh("xl-vtpm mgr group ak default --out /tmp/ak.bin")
        .secs(60)
        .save("/tmp/ak.out")
        .run(cx);
    if o.ok() { Ok(()) } else { Err(o.tail1(3)) }
}

// Here the AK is not enrolled (`xl-vtpm enroll`, docs/enrollment.md; attest-service enrolls it
// through the service from the vendor root): verify takes the raw AK with --insecure-unenrolled-ak.
// No host PCR policy is given either, so a bundle that verifies exits 8 (host state not
// checked), never 0; a bundle that does not verify exits 7.
fn deep_quote(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    let size = fs::metadata("/tmp/dq.bin").map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        return Outcome::fail("no bundle from the guest");
    }
    // the group AK: dom0's manager's (/tmp/ak.bin), or in the second pass the manager
    // domain's, fetched anew through the bridge (/tmp/ak-mgrdom.bin)
    let ak = match super::vtpmdom::group_ak(cx, st) {
        Ok(a) => a,
        Err(t) => return Outcome::fail(format!("xl-vtpm mgr group ak default failed: {t}")),
    };
    let u = st.vtpm_uuid.clone();
    let (rc_ok, rc_bad) = verify_nonces_ak(cx, "/tmp/dq.bin", &st.dq_nonce, &u, &ak, "/tmp/verify");
    let rc_uuid = verify_ak(
        cx,
        "/tmp/dq.bin",
        &st.dq_nonce,
        OTHER,
        &ak,
        "verify other vTPM",
        "/tmp/verify-uuid.out",
        5,
        &[],
    )
    .rc;
    e.check_or(
        "verify-other-vtpm",
        rc_uuid == 7,
        format!("exit={rc_uuid} (want 7: bundle is bound to {u})"),
        format!("verify-with-other-vtpm-uuid-exit-{rc_uuid}(want-7)"),
    );
    e.check_or(
        "verify-right-nonce",
        rc_ok == 8,
        format!(
            "exit={rc_ok} (want 8: verified, host state not checked){}",
            if st.mgr_dom.is_some() {
                format!("; with the group AK of {} ({ak}, fetched through the bridge)", st.mgr_where())
            } else {
                String::new()
            }
        ),
        format!("verify-with-right-nonce-exit-{rc_ok}(want-8)"),
    );
    e.check_or(
        "verify-wrong-nonce",
        rc_bad == 7,
        format!("exit={rc_bad} (want 7)"),
        format!("verify-with-wrong-nonce-exit-{rc_bad}(want-7)"),
    );
    e.verdict(format!(
        "xl-vtpm verify: right nonce -> 8 (verified, host unchecked), wrong nonce -> 7 ({size} byte bundle){}",
        relayed_said(st)
    ))
}

fn reboot(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if st.vtpm_uuid.is_empty() {
        return Outcome::fail("no vTPM");
    }
    if st.vtpm_exited() {
        return Outcome::fail(format!(
            "vtpm-domain (pid {}) is gone",
            st.vtpm_pid.unwrap_or(0)
        ));
    }
    xen::destroy_if_running(cx, "guest-vtpm");
    let uuid = st.vtpm_uuid.clone();
    let b = boot(&uuid, "boot=2 hold=1", 2).run(cx, &mut e);
    if b.created {
        ek_stable(&mut e, "ek-stable", "ek-changed", "boot 2", &st.ek1, &b.ek);
        println!(
            "PERF vtpm-pss-kib={} vtpm-rss-kib={} (vtpm-domain pid {} serving a connected guest)",
            kib(st.vtpm_pid, "Pss"),
            kib(st.vtpm_pid, "Rss"),
            st.vtpm_pid.unwrap_or(0)
        );
    }
    e.verdict(format!(
        "boot 2: 0x81000010 persistent key + NV index kept, PCR16 reset, same EK{}",
        relayed_said(st)
    ))
}

fn destroy(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if st.vtpm_uuid.is_empty() {
        return Outcome::fail("no vTPM");
    }
    if let Some(domid) = xen::domid("guest-vtpm") {
        xen::destroy_and_wait(cx, "guest-vtpm", &mut e);
        keep_console("guest-vtpm-boot2");
        std::thread::sleep(crate::s(2));
        let be: Vec<String> = xen::xs_ls("/local/domain/0/backend/vtpm")
            .into_iter()
            .filter(|l| l.contains(&format!("/vtpm/{domid}/")))
            .collect();
        let be = be.join(" ");
        println!("backend after xl destroy: {}", &be[..be.len().min(300)]);
    }
    let alive = !st.vtpm_exited();
    e.check_or(
        "vtpm-survives-destroy",
        alive,
        if alive {
            format!("pid {} still running", st.vtpm_pid.unwrap_or(0))
        } else {
            String::new()
        },
        "vtpm-domain-exited-on-guest-destroy",
    );
    let t0 = up();
    let o = Cmd::new(&["xl-vtpm", "vtpm", "stop", &st.vtpm_uuid])
        .secs(30)
        .save("/tmp/vtpm-stop.out")
        .run(cx);
    show("vtpm stop", &o.all());
    if !o.ok() {
        e.add(format!("vtpm-stop-exit-{}", o.rc));
    }
    let pid = st.vtpm_pid;
    if cx.wait_until(10, || !crate::cmd::pid_up(pid)) {
        check(
            "dom0",
            "vtpm-stop",
            true,
            &format!("pid {} gone after {} s", pid.unwrap_or(0), secs1(t0, up())),
        );
    } else {
        e.check_or(
            "vtpm-stop",
            false,
            format!("pid {} still alive", pid.unwrap_or(0)),
            "vtpm-domain-still-running",
        );
        if let Some(p) = pid {
            crate::cmd::signal(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
    if st.mgr_dom.is_some() {
        // the bridge unbinds the vTPM's socket on VtpmDetach or when it sees the process exit
        // (a 1 s poll) and drops it from relayed.json
        let sock = super::vtpm_sock(&st.vtpm_uuid);
        let u = st.vtpm_uuid.clone();
        let rel = || xen::read_text(&format!("{}/relayed.json", super::RUN_DIR));
        let gone = cx.wait_until(15, || !Path::new(&sock).exists() && !rel().contains(&u));
        e.check(
            "vtpm-relayed-gone",
            gone,
            format!(
                "after xl-vtpm vtpm stop: {sock} exists {}; relayed.json names the vTPM {} ({})",
                Path::new(&sock).exists(),
                rel().contains(&u),
                rel().trim()
            ),
        );
        show_tail("vtpmmgr bridge", &xen::read_text(super::BRIDGE_LOG), 6);
    }
    show(
        "vtpm list",
        &Cmd::sh("xl-vtpm vtpm list").secs(30).run(cx).all(),
    );
    show_tail("vtpm.log", &xen::read_text(&st.vlog), 8);
    e.verdict(format!(
        "guest destroyed, vtpm-domain survived it; xl-vtpm vtpm stop ended the process{}",
        if st.mgr_dom.is_some() {
            "; the bridge unbound its relayed socket and dropped the attachment"
        } else {
            ""
        }
    ))
}
