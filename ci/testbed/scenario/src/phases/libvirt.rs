//! A guest's life through libvirt's libxl driver, the way OpenStack Nova drives Xen: Debian's
//! `libvirtd` (libxl driver only) and `virsh` in dom0, xvtpm coupled by the libvirt hook
//! (`/etc/libvirt/hooks/libxl` → `xl-vtpm libvirt-hook`, docs/libvirt.md). Switch
//! `xvtpm_libvirt=1|0` (default 1). One RESULT per step:
//!   libvirt-start    libvirtd starts; `virsh define` + `virsh start` of lv-a (PV, `role=life hold=1`,
//!                    `<xvtpm:vtpm/>` metadata): the hook's prepare made a vTPM process, started attached
//!                    it (`xl vtpm-attach`); in the guest a fresh vTPM: tpm0, startup, getrandom, PCR 16
//!                    zero, EK, 0x81000010 and the NV index written; the registry row is running
//!   libvirt-restart  libvirtd SIGTERM + start: reconnect hook exit 0; the guest runs on (same domid)
//!                    with the same vTPM process; a getrandom in the guest answers
//!   libvirt-reboot   `virsh reboot`: libvirt re-creates the domain (release + prepare + started hooks):
//!                    same vTPM UUID and EK, key and NV kept, PCR 16 reset, the registry follows the domid
//!   libvirt-save     PCR 16 extended; `virsh save` (domain gone, the release hook stops the vTPM
//!                    process), `virsh restore --paused` (the hook starts it again and attaches it before
//!                    the guest runs) + `virsh resume`: same EK, key and NV, PCR 16 reset (the vTPM
//!                    power-cycled), a fresh quote verified
//!   libvirt-migrate  `virsh migrate --p2p` to this host is refused by libvirt before anything moves: the
//!                    guest and its vTPM process are untouched (one host cannot prove a move; the hook
//!                    refuses an incoming migration of a guest with a vTPM by design)
//!   libvirt-destroy  `virsh destroy`: the vTPM process ends, the registry row is stopped (binding kept);
//!                    `virsh undefine`; libvirtd stops

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::life::life_row;
use super::{St, deadline, ek_hash, guest_checks};
use crate::cmd::{Cmd, Output, pid_up, show, show_tail, stop_child};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, console_from, jf};

const NAME: &str = "lv-a";
const XML: &str = "/etc/libvirt-testbed/lv-a.xml";
const URI: &str = "xen:///system";
const DLOG: &str = "/var/log/libvirt/libvirtd.out";
pub const HOOK_LOG: &str = "/var/log/xvtpm/libvirt-hook.log";
pub const HOOK_XML_DIR: &str = "/var/log/xvtpm/libvirt-hook";
const SAVE: &str = "/tmp/lv-a.virsh-save";
const PCR_AFTER: &str = "39DE0A6FECF21D432302A5D79315BC42DFF73C4BE042FB5276E3C5B4758BCA02";
const PCR_ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const BOOT1: [&str; 7] = ["tpm0", "startup", "getrandom", "pcr16-reset", "ek", "persistent", "nv-write"];
const BOOT2: [&str; 7] = ["tpm0", "startup", "getrandom", "pcr16-reset", "ek", "persistent-kept", "nv-kept"];

fn virsh(cx: &Cx, args: &[&str], secs: u64, save: &str) -> Output {
    let mut argv = vec!["virsh", "-c", URI];
    argv.extend_from_slice(args);
    let o = Cmd::new(&argv).secs(secs).save(save).run(cx);
    show(&format!("virsh {}", args.join(" ")), &crate::cmd::tail_lines(&o.all(), 8));
    o
}

fn start_libvirtd() -> Result<Child, String> {
    let f = fs::OpenOptions::new().create(true).append(true).open(DLOG).map_err(|e| format!("{DLOG}: {e}"))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    Command::new("libvirtd")
        .args(["-f", "/etc/libvirt/libvirtd.conf"])
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| format!("libvirtd: cannot start: {e}"))
}

/// Waits until `virsh version` answers (libvirtd up, libxl driver loaded); false if libvirtd died.
fn wait_ready(cx: &Cx, d: &mut Child, secs: u64) -> bool {
    cx.wait_every(secs, Duration::from_secs(1), || {
        !matches!(d.try_wait(), Ok(None)) || Cmd::new(&["virsh", "-c", URI, "version"]).secs(20).run(cx).ok()
    });
    matches!(d.try_wait(), Ok(None)) && Cmd::new(&["virsh", "-c", URI, "version"]).secs(20).run(cx).ok()
}

/// The hook lines (`HOOK <args> rc=N …`) logged since line `from`.
fn hooks_since(from: usize) -> Vec<String> {
    xen::read_text(HOOK_LOG).lines().filter(|l| l.starts_with("HOOK ")).skip(from).map(str::to_string).collect()
}

fn hook_count() -> usize {
    hooks_since(0).len()
}

/// The hook ran `op` with exit code `rc` among `lines`.
fn hook_ran(lines: &[String], op: &str, rc: i32) -> bool {
    lines.iter().any(|l| l.starts_with(&format!("HOOK {NAME} {op} ")) && l.contains(&format!(" rc={rc} ")))
}

/// A command to the held guest (xenstore data/xvtpm-cmd of its current domain); its GUEST-CMD line.
fn guest_cmd(cx: &Cx, n: u32, cmd: &str, secs: u64) -> String {
    let Some(d) = xen::domid(NAME) else {
        return format!("no {NAME} domain");
    };
    if !xen::xs_write(&format!("/local/domain/{d}/data/xvtpm-cmd"), &format!("{n}:{cmd}")) {
        return "xenstore-write failed".into();
    }
    let key = format!("GUEST-CMD {n} ");
    cx.wait_every(secs, Duration::from_secs(1), || xen::console(NAME).lines().any(|l| l.starts_with(&key)));
    xen::console(NAME)
        .lines()
        .find(|l| l.starts_with(&key))
        .map_or_else(|| format!("no answer within {secs} s"), str::to_string)
}

/// Waits for the boot whose console starts at byte `off` to say GUEST-DONE; its checks.
fn boot_checks(cx: &Cx, e: &mut Errs, off: usize, tag: &str, want: &[&str], state: &str) -> String {
    if !cx.wait_until(300, || console_from(NAME, off).contains("GUEST-DONE")) {
        e.add(format!("{tag}-no-GUEST-DONE-in-300s"));
    }
    let c = console_from(NAME, off);
    let miss = guest_checks(&c, NAME, tag, want);
    if !miss.is_empty() {
        e.add(format!("{tag}-guest-checks-failed: {}", miss.join(" ")));
    }
    let st = xen::after_prefix(&c, "GUEST-LIFE ").unwrap_or_default();
    e.check(&format!("libvirt-{tag}-state"), st.trim() == format!("state={state}"), format!("guest says {} (want state={state})", st.trim()));
    ek_hash(&c)
}

/// dom0's memory now (`/proc/meminfo`), and libvirtd's RSS: an INFO line.
fn dom0_mem(what: &str, d: Option<&Child>) {
    let mi = xen::read_text("/proc/meminfo");
    let kb = |k: &str| {
        mi.lines()
            .find(|l| l.starts_with(&format!("{k}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let rss = d
        .map(|c| xen::read_text(&format!("/proc/{}/status", c.id())))
        .and_then(|t| t.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string()))
        .unwrap_or_else(|| "-".into());
    println!("INFO libvirt dom0-mem {what}: MemTotal={} kB MemAvailable={} kB MemFree={} kB libvirtd-rss={rss} kB", kb("MemTotal"), kb("MemAvailable"), kb("MemFree"));
}

fn vtpm_pid(row: &serde_json::Value) -> Option<u32> {
    jf(row, "vtpm_pid").parse().ok()
}

pub fn run(r: &mut Runner, st: &mut St) {
    let mode = xen::cmdline_arg("xvtpm_libvirt").unwrap_or_else(|| "1".into());
    let names = ["libvirt-start", "libvirt-restart", "libvirt-reboot", "libvirt-save", "libvirt-migrate", "libvirt-destroy"];
    let why = if mode == "0" {
        Some("disabled (XVTPM_TESTBED_LIBVIRT=0)")
    } else if !std::path::Path::new("/usr/sbin/libvirtd").exists() {
        Some("dom0 has no libvirtd (build-images.sh with XVTPM_TESTBED_LIBVIRT=0)")
    } else if !st.mgr_ready() {
        Some("needs the provisioned manager (mgr phases)")
    } else {
        None
    };
    if let Some(w) = why {
        r.skip_all(&names, w);
        return;
    }
    let _ = fs::create_dir_all("/var/log/libvirt");
    let _ = fs::create_dir_all("/run/libvirt");
    let mut d: Option<Child> = None;
    let (mut ek, mut uuid, mut pid) = (String::new(), String::new(), None::<u32>);
    let mut up = false;
    let mut defined = false;

    r.phase("libvirt-start", deadline(420), |cx| {
        let mut e = Errs::default();
        match start_libvirtd() {
            Ok(c) => d = Some(c),
            Err(w) => return Outcome::fail(w),
        }
        let dd = d.as_mut().expect("started");
        if !wait_ready(cx, dd, 90) {
            show_tail("libvirtd", &xen::read_text(DLOG), 20);
            show_tail("libvirtd.log", &xen::read_text("/var/log/libvirt/libvirtd.log"), 20);
            return Outcome::fail("libvirtd-not-ready (virsh -c xen:///system version failed for 90 s)");
        }
        let v = Cmd::new(&["virsh", "-c", URI, "version"]).secs(30).run(cx).all();
        println!("INFO libvirt {}", v.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join("; "));
        let caps = Cmd::new(&["virsh", "-c", URI, "capabilities"]).secs(30).run(cx).all();
        println!("INFO libvirt host-cpu {}", caps.lines().filter(|l| l.contains("<model") || l.contains("<vendor") || l.contains("<arch>")).map(str::trim).take(3).collect::<Vec<_>>().join(" "));
        if !virsh(cx, &["define", XML], 60, "/tmp/virsh-define.out").ok() {
            e.add("virsh-define");
            return e.verdict("");
        }
        defined = true;
        let h0 = hook_count();
        let off = xen::lines_of(&xen::clog(NAME));
        let o = virsh(cx, &["start", NAME], 240, "/tmp/virsh-start.out");
        let hooks = hooks_since(h0);
        show("hooks", &hooks.join("\n"));
        e.check("libvirt-virsh-start", o.ok(), format!("virsh start rc={} in {} ms", o.rc, o.elapsed.as_millis()));
        e.check("libvirt-hook-prepare", hook_ran(&hooks, "prepare begin", 0), "prepare begin: vTPM ensured, exit 0");
        e.check("libvirt-hook-started", hook_ran(&hooks, "started begin", 0), "started begin: vTPM attached, exit 0");
        if !o.ok() {
            return e.verdict("");
        }
        show("xl vtpm-list", &Cmd::new(&["xl", "vtpm-list", NAME]).secs(30).run(cx).all());
        ek = boot_checks(cx, &mut e, off, "boot1", &BOOT1, "fresh");
        dom0_mem("guest running", d.as_ref());
        let row = life_row(cx, NAME);
        show("registry", &row.to_string());
        uuid = jf(&row, "vtpm_uuid");
        pid = vtpm_pid(&row);
        let dom = xen::domid(NAME).unwrap_or_default();
        e.check(
            "libvirt-registry",
            jf(&row, "state") == "running" && pid_up(pid) && !dom.is_empty() && jf(&row, "guest_running_domid") == dom,
            format!("row state={} vtpm {uuid} pid {:?} running={}, guest domid {dom}", jf(&row, "state"), pid, pid_up(pid)),
        );
        up = e.is_empty();
        e.verdict(format!("virsh define + start of {NAME}: the hook made and attached vTPM {uuid} (pid {pid:?}); fresh vTPM in the guest (EK, 0x81000010, NV written)"))
    });

    r.phase_if("libvirt-restart", (!up).then_some("libvirt-start failed"), deadline(240), |cx| {
        let mut e = Errs::default();
        let dom0 = xen::domid(NAME).unwrap_or_default();
        let h0 = hook_count();
        if let Some(mut c) = d.take() {
            e.check("libvirt-libvirtd-stop", stop_child(cx, &mut c, 30), "SIGTERM: libvirtd exited within 30 s");
        }
        e.check("libvirt-guest-survives-libvirtd", xen::domid(NAME).as_deref() == Some(dom0.as_str()) && pid_up(pid), format!("without libvirtd: domid {dom0} -> {:?}, vTPM pid {pid:?} running={}", xen::domid(NAME), pid_up(pid)));
        match start_libvirtd() {
            Ok(c) => d = Some(c),
            Err(w) => return Outcome::fail(w),
        }
        if !wait_ready(cx, d.as_mut().expect("started"), 90) {
            return Outcome::fail("libvirtd-not-ready after the restart");
        }
        let ok_state = cx.wait_until(30, || Cmd::new(&["virsh", "-c", URI, "domstate", NAME]).secs(20).split().run(cx).stdout.trim() == "running");
        let hooks = hooks_since(h0);
        show("hooks", &hooks.join("\n"));
        e.check("libvirt-hook-reconnect", hook_ran(&hooks, "reconnect begin", 0), "reconnect begin: vTPM verified, exit 0");
        let row = life_row(cx, NAME);
        e.check(
            "libvirt-restart-kept",
            ok_state && xen::domid(NAME).as_deref() == Some(dom0.as_str()) && vtpm_pid(&row) == pid && pid_up(pid),
            format!("virsh domstate running={ok_state}; domid {dom0} -> {:?}; vTPM pid {pid:?} -> {:?}", xen::domid(NAME), vtpm_pid(&row)),
        );
        let a = guest_cmd(cx, 1, "getrandom", 60);
        e.check("libvirt-restart-guest-tpm", a.contains("getrandom PASS"), a);
        e.verdict("libvirtd restarted: the guest runs on with the same vTPM process, which answers")
    });

    r.phase_if("libvirt-reboot", (!up).then_some("libvirt-start failed"), deadline(420), |cx| {
        let mut e = Errs::default();
        let dom0 = xen::domid(NAME).unwrap_or_default();
        let h0 = hook_count();
        let off = xen::lines_of(&xen::clog(NAME));
        let o = virsh(cx, &["reboot", NAME], 60, "/tmp/virsh-reboot.out");
        e.check("libvirt-virsh-reboot", o.ok(), format!("rc={}", o.rc));
        let ek2 = boot_checks(cx, &mut e, off, "boot2", &BOOT2, "kept");
        super::ek_stable(&mut e, "libvirt-reboot-ek", "ek-changed", "after virsh reboot", &ek, &ek2);
        let hooks = hooks_since(h0);
        show("hooks", &hooks.join("\n"));
        e.check("libvirt-reboot-hooks", hook_ran(&hooks, "release end", 0) && hook_ran(&hooks, "prepare begin", 0) && hook_ran(&hooks, "started begin", 0), "release, prepare and started ran with exit 0");
        let row = life_row(cx, NAME);
        let dom = xen::domid(NAME).unwrap_or_default();
        let p2 = vtpm_pid(&row);
        e.check(
            "libvirt-reboot-registry",
            jf(&row, "vtpm_uuid") == uuid && jf(&row, "state") == "running" && pid_up(p2) && !dom.is_empty() && dom != dom0 && jf(&row, "guest_running_domid") == dom,
            format!("vtpm {} (was {uuid}), state {}, pid {pid:?} -> {p2:?}, domid {dom0} -> {dom}", jf(&row, "vtpm_uuid"), jf(&row, "state")),
        );
        println!("INFO libvirt-reboot vTPM process {} (libvirt re-creates the domain: release stops the vTPM, prepare starts it)", if p2 == pid { "kept" } else { "restarted" });
        pid = p2;
        e.verdict("virsh reboot: same vTPM (UUID, EK), 0x81000010 and NV kept, PCR 16 reset")
    });

    r.phase_if("libvirt-save", (!up).then_some("libvirt-start failed"), deadline(420), |cx| {
        let mut e = Errs::default();
        let a = guest_cmd(cx, 2, "extend", 60);
        e.check("libvirt-save-extend", a.contains(&format!("extend PASS pcr16={PCR_AFTER}")), a);
        let h0 = hook_count();
        let _ = fs::remove_file(SAVE);
        let o = virsh(cx, &["save", NAME, SAVE], 240, "/tmp/virsh-save.out");
        let gone = xen::domid(NAME).is_none();
        let stopped = cx.wait_until(20, || !pid_up(pid));
        e.check("libvirt-save-vtpm-stopped", o.ok() && gone && stopped, format!("virsh save rc={} in {} ms; domain gone={gone}; vTPM pid {pid:?} ended={stopped}", o.rc, o.elapsed.as_millis()));
        dom0_mem("the save image in dom0's ramfs", d.as_ref());
        let off = xen::lines_of(&xen::clog(NAME));
        // --paused: the started hook hot-plugs the vTPM before the guest runs again. A plain
        // `virsh restore` resumes the guest first; its xen-tpmfront then finds no vTPM device
        // (libvirt's libxl config has none) and keeps the old one, bound to the old domid's
        // backend: the new device is never probed (docs/libvirt.md, "Limits of the hook")
        let o2 = virsh(cx, &["restore", "--paused", SAVE], 240, "/tmp/virsh-restore.out");
        let _ = fs::remove_file(SAVE);
        let paused = Cmd::new(&["virsh", "-c", URI, "domstate", NAME]).secs(20).split().run(cx).stdout.trim().to_string();
        show("xl vtpm-list", &Cmd::new(&["xl", "vtpm-list", NAME]).secs(30).run(cx).all());
        let o3 = virsh(cx, &["resume", NAME], 60, "/tmp/virsh-resume.out");
        e.check("libvirt-restore-paused", o2.ok() && paused == "paused" && o3.ok(), format!("virsh restore --paused rc={}, domstate {paused}, virsh resume rc={}", o2.rc, o3.rc));
        let hooks = hooks_since(h0);
        show("hooks", &hooks.join("\n"));
        let row = life_row(cx, NAME);
        let p2 = vtpm_pid(&row);
        e.check(
            "libvirt-restore",
            o2.ok() && hook_ran(&hooks, "started begin", 0) && jf(&row, "vtpm_uuid") == uuid && pid_up(p2),
            format!("virsh restore rc={} in {} ms; started hook; vtpm {} pid {p2:?}", o2.rc, o2.elapsed.as_millis(), jf(&row, "vtpm_uuid")),
        );
        let a = guest_cmd(cx, 3, &format!("migcheck:{}", xen::nonce(16)), 180);
        show_tail("guest after restore", &console_from(NAME, off), 6);
        let f = |k: &str| xen::token(&a, k).unwrap_or_default();
        e.check("libvirt-restore-state-kept", a.contains("migcheck PASS") && f("ek") == ek && f("persistent") == "kept" && f("nv") == "kept", format!("{a} (EK at first {ek})"));
        e.check("libvirt-restore-pcr16-reset", f("pcr16") == PCR_ZERO, format!("PCR 16 after the restore {} (extended to {PCR_AFTER} before the save; the restored guest's vTPM was power-cycled)", f("pcr16")));
        pid = p2;
        e.verdict("virsh save stops the vTPM process; virsh restore starts and attaches it: EK, key and NV kept, PCR 16 reset")
    });

    r.phase_if("libvirt-migrate", (!up).then_some("libvirt-start failed"), deadline(120), |cx| {
        let mut e = Errs::default();
        let dom0 = xen::domid(NAME).unwrap_or_default();
        let o = virsh(cx, &["migrate", "--live", "--p2p", NAME, URI], 60, "/tmp/virsh-migrate.out");
        println!("INFO libvirt-migrate {}", o.all().lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(" "));
        let row = life_row(cx, NAME);
        e.check(
            "libvirt-migrate-refused",
            !o.ok() && xen::domid(NAME).as_deref() == Some(dom0.as_str()) && vtpm_pid(&row) == pid && pid_up(pid),
            format!("virsh migrate to this host rc={}; domid {dom0} -> {:?}; vTPM pid {pid:?} -> {:?}", o.rc, xen::domid(NAME), vtpm_pid(&row)),
        );
        let a = guest_cmd(cx, 4, "getrandom", 60);
        e.check("libvirt-migrate-guest-tpm", a.contains("getrandom PASS"), a);
        e.verdict("libvirt refuses a migration to the same host before anything moves; guest and vTPM untouched (one host cannot prove a move)")
    });

    r.phase_if("libvirt-destroy", (!defined).then_some("libvirt-start defined no domain"), deadline(180), |cx| {
        let mut e = Errs::default();
        if xen::domid(NAME).is_some() {
            let h0 = hook_count();
            let o = virsh(cx, &["destroy", NAME], 60, "/tmp/virsh-destroy.out");
            let ended = cx.wait_until(20, || !pid_up(pid));
            let hooks = hooks_since(h0);
            show("hooks", &hooks.join("\n"));
            e.check("libvirt-destroy-vtpm-stopped", o.ok() && xen::domid(NAME).is_none() && ended && hook_ran(&hooks, "release end", 0), format!("virsh destroy rc={}; domain gone={}; vTPM pid {pid:?} ended={ended}", o.rc, xen::domid(NAME).is_none()));
            let row = life_row(cx, NAME);
            e.check("libvirt-destroy-registry", jf(&row, "state") == "stopped" && jf(&row, "vtpm_uuid") == uuid, format!("row state {} vtpm {} (the binding is kept: the hook never deletes a vTPM)", jf(&row, "state"), jf(&row, "vtpm_uuid")));
        } else {
            e.add("no-lv-a-domain-to-destroy");
        }
        let o = virsh(cx, &["undefine", NAME], 60, "/tmp/virsh-undefine.out");
        let l = Cmd::new(&["virsh", "-c", URI, "list", "--all", "--name"]).secs(30).split().run(cx).stdout;
        e.check("libvirt-undefine", o.ok() && !l.lines().any(|x| x.trim() == NAME), format!("virsh undefine rc={}; virsh list --all: {}", o.rc, l.split_whitespace().collect::<Vec<_>>().join(" ")));
        if let Some(mut c) = d.take() {
            e.check("libvirt-libvirtd-exit", stop_child(cx, &mut c, 30), "SIGTERM: libvirtd exited within 30 s");
        }
        // the registry pair is kept (as after `xl-vtpm destroy`); forget it so `registry check` speaks of the others
        let _ = Cmd::new(&["xl-vtpm", "registry", "remove", NAME]).secs(30).run(cx);
        e.verdict("virsh destroy ends the vTPM process (binding kept); virsh undefine; libvirtd stopped")
    });
    if let Some(mut c) = d.take() {
        crate::cmd::kill_child(&mut c);
    }
}
