//! Lifecycle: `xl-vtpm create` of xen-configs/guest.cfg, `xl-vtpm watch` couples the vTPM
//! process to the guest. One RESULT per step:
//!   life-watch       `xl-vtpm watch` runs in the background (@releaseDomain)
//!   life-create      `xl-vtpm create /etc/xen/life-a.cfg` (vtpm = [ "backend=0" ], no uuid): list --json
//!                    says running with a vtpm_pid; the guest writes 0x81000010 + NV on the fresh vTPM
//!   life-xl-destroy  plain `xl destroy`: the watcher stops the vTPM process within 2 s; list says stopped
//!   life-recreate    the same config again: same vTPM UUID, 0x81000010 + NV still there, same EK
//!   life-reboot      `xl-vtpm reboot`: same vTPM pid, state kept, PCR 16 reset, registry domid follows
//!   life-refuse-b    guest B with vtpm = [ "backend=0,uuid=<A's vTPM>" ] is refused naming life-a;
//!                    no domain, `xl-vtpm list` unchanged
//!   life-mgr-restart vtpmmgr SIGTERM + restart; `xl-vtpm destroy` + `xl-vtpm create` of A: the vTPM
//!                    comes back on the new manager, state kept, same EK (INFO: the running pair right
//!                    after the restart, getrandom + deep quote from the guest)
//!   life-registry    `xl-vtpm registry check` clean with A running and after `xl-vtpm destroy`; the
//!                    watcher is stopped
//! Timestamps: watch.log lines and the INFO timeline lines carry the Xen wallclock (the clock of
//! vtpm.log's UTC timestamps).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{
    St, deadline, drop_standalone_vtpm, ek_hash, ek_stable, guest_checks, ms, none, secs1, up,
    wallt,
};
use crate::cmd::{Cmd, Output, kill_child, pid_up, show, show_tail, stop_child};
use crate::runner::{Cx, Errs, Outcome, Runner, check, wall};
use crate::xen::{self, console_from, find_obj, jf, lines_of};

pub const LCFG0: &str = "/etc/xen/life-a.cfg";
/// The second pass (the manager in its own domain, `life-*@mgrdom`) makes a new pair: the first
/// pass's life-a stays in the registry, stopped, with its vTPM identity and state, and
/// `xl-vtpm create life-a.cfg` would find that vTPM (state kept) instead of a fresh one.
const LCFG_M: &str = "/etc/xen/life-r.cfg";

fn second() -> bool {
    !crate::runner::suffix().is_empty()
}
/// The pair's guest: life-a, or life-r in the second pass.
fn la() -> &'static str {
    if second() { "life-r" } else { "life-a" }
}
/// The guest that must be refused: life-b, or life-rb in the second pass.
fn lb() -> &'static str {
    if second() { "life-rb" } else { "life-b" }
}
/// The pair's config: LCFG0, or in the second pass LCFG0 with only the name changed.
fn lcfg() -> String {
    if !second() {
        return LCFG0.into();
    }
    let t = xen::cfg_from(&xen::read_text(LCFG0), &[("name = ", format!("name = \"{}\"", la()))]);
    let _ = fs::write(LCFG_M, t);
    LCFG_M.into()
}

/// The phases of this set, in order (mgrdom.rs skips them by name when their second pass cannot run).
pub const PHASES: [&str; 8] = [
    "life-watch",
    "life-create",
    "life-xl-destroy",
    "life-recreate",
    "life-reboot",
    "life-refuse-b",
    "life-mgr-restart",
    "life-registry",
];

/// `xl-vtpm watch` in the background; its lines go to the log with the Xen wallclock in front.
pub struct Watch {
    pub child: Child,
}

impl Watch {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn up(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// SIGTERM, `secs` to exit, then SIGKILL; false if it needed the SIGKILL.
    pub fn stop(mut self, cx: &Cx, secs: u64) -> bool {
        stop_child(cx, &mut self.child, secs)
    }
}

/// Starts the watcher; Err unless it says it watches @releaseDomain within 20 s.
pub fn watch_start(cx: &Cx, wlog: &str) -> Result<Watch, String> {
    let mut child = Command::new("xl-vtpm")
        .arg("watch")
        .env("XVTPM_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("xl-vtpm watch: cannot start: {e}"))?;
    let f = fs::File::create(wlog).map_err(|e| format!("{wlog}: {e}"))?;
    let f = std::sync::Arc::new(std::sync::Mutex::new(f));
    let mut pipes: Vec<Box<dyn std::io::Read + Send>> = Vec::new();
    if let Some(o) = child.stdout.take() {
        pipes.push(Box::new(o));
    }
    if let Some(e) = child.stderr.take() {
        pipes.push(Box::new(e));
    }
    for p in pipes {
        let f = f.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(p).lines() {
                let Ok(l) = l else { break };
                if let Ok(mut g) = f.lock() {
                    let _ = writeln!(g, "[{:.6}] {l}", wall());
                }
            }
        });
    }
    let mut w = Watch { child };
    cx.wait_until(20, || xen::read_text(wlog).contains("watching") || !w.up());
    if xen::read_text(wlog).contains("\"watching\":\"@releaseDomain\"") && w.up() {
        return Ok(w);
    }
    let alive = if w.up() { "yes" } else { "no" };
    let why = format!(
        "xl-vtpm watch not watching within 20 s (alive: {alive}): {}",
        crate::cmd::tail_lines(&xen::read_text(wlog), 3).replace('\n', " ")
    );
    let _ = w.stop(cx, 5);
    Err(why)
}

/// The pair of NAME from `xl-vtpm list --json`.
pub fn life_row(cx: &Cx, name: &str) -> Value {
    let o = Cmd::sh("xl-vtpm list --json").secs(30).split().run(cx);
    xen::parse_json(&o.stdout)
        .and_then(|v| find_obj(&v, "guest_name", name).cloned())
        .unwrap_or(Value::Null)
}

pub fn row_line(v: &Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        v.to_string()
    }
}

pub fn life_list(cx: &Cx) {
    show(
        "xl-vtpm list",
        &Cmd::sh("xl-vtpm list").secs(30).run(cx).all(),
    );
}

pub fn life_state(cx: &Cx, name: &str, want: &str) -> bool {
    jf(&life_row(cx, name), "state") == want
}

fn a_running() -> bool {
    xen::domid(la()).is_some()
}

fn parse_pid(s: &str) -> Option<u32> {
    s.parse().ok()
}

/// The running pair's bookkeeping between the steps.
pub struct Life {
    pub name: String,
    pub cfg: String,
    /// Console lines before the current boot.
    pub off: usize,
    pub guest_uuid: String,
    pub ek: String,
    pub lrc: i32,
    pub row: Value,
    pub uuid_now: String,
    pub pid_now: Option<u32>,
    pub ek_now: String,
}

impl Life {
    pub fn new(name: &str, cfg: &str) -> Self {
        Life {
            name: name.into(),
            cfg: cfg.into(),
            off: 0,
            guest_uuid: String::new(),
            ek: String::new(),
            lrc: 0,
            row: Value::Null,
            uuid_now: String::new(),
            pid_now: None,
            ek_now: String::new(),
        }
    }

    /// `xl-vtpm create CFG` of this guest; sets lrc, row, uuid_now, pid_now from the registry.
    pub fn create(&mut self, cx: &Cx, cfg: &str, tag: &str) {
        self.off = lines_of(&xen::clog(&self.name));
        let t0 = up();
        let o = Cmd::new(&["xl-vtpm", "create", cfg])
            .env("NO_COLOR", "1")
            .secs(150)
            .save(&format!("/tmp/xl-life-{tag}.out"))
            .run(cx);
        self.lrc = o.rc;
        println!(
            "xl-vtpm create {cfg} ({tag}): rc={} in {} s",
            o.rc,
            secs1(t0, up())
        );
        show_tail(&format!("xl-vtpm create {tag}"), &o.all(), 20);
        self.row = life_row(cx, &self.name);
        self.uuid_now = jf(&self.row, "vtpm_uuid");
        self.pid_now = parse_pid(&jf(&self.row, "vtpm_pid"));
        println!(
            "registry: {} state={} domid={} vtpm={} vtpm_pid={}",
            self.name,
            jf(&self.row, "state"),
            jf(&self.row, "guest_running_domid"),
            self.uuid_now,
            jf(&self.row, "vtpm_pid")
        );
    }

    /// Waits for this boot's GUEST-DONE, echoes its checks; `fresh`/`kept` is the vTPM state the
    /// guest must have found. Returns the failures; sets ek_now.
    pub fn guest(&mut self, cx: &Cx, tag: &str, state: &str) -> Vec<String> {
        let (name, off) = (self.name.clone(), self.off);
        let mut miss = Vec::new();
        if !cx.wait_every(240, Duration::from_secs(1), || {
            console_from(&name, off)
                .lines()
                .any(|l| l.starts_with("GUEST-DONE"))
        }) {
            miss.push("no-GUEST-DONE".to_string());
        }
        let c = console_from(&name, off);
        let want: &[&str] = if state == "fresh" {
            &[
                "tpm0",
                "startup",
                "getrandom",
                "pcr16-reset",
                "ek",
                "persistent",
                "nv-write",
            ]
        } else {
            &[
                "tpm0",
                "startup",
                "getrandom",
                "pcr16-reset",
                "ek",
                "persistent-kept",
                "nv-kept",
            ]
        };
        miss.extend(guest_checks(&c, &name, tag, want));
        let got = xen::after_prefix(&c, "GUEST-LIFE state=")
            .unwrap_or_default()
            .trim()
            .to_string();
        if got != state {
            miss.push(format!("vtpm-state-{}(want-{state})", none(&got)));
        }
        self.ek_now = ek_hash(&c);
        for l in c.lines() {
            let show = ["GUEST-UP", "GUEST-LIFE", "GUEST-DONE", "GUEST-DMESG"]
                .iter()
                .any(|k| l.starts_with(k))
                || l.contains("GUEST-CHECK tpm0 FAIL")
                || l.contains("panic")
                || l.contains("Oops");
            if show {
                println!("[{name} {tag}] {l}");
            }
        }
        if !miss.is_empty() {
            show_tail(&format!("{name} {tag} console"), &c, 15);
        }
        miss
    }

    fn ek_check(&self, tag: &str, e: &mut Errs) {
        ek_stable(
            e,
            "life-ek-stable",
            "ek-changed",
            tag,
            &self.ek,
            &self.ek_now,
        );
    }
}

/// Leaves no life-a domain and no running pair (after a failed step).
fn life_stop_a(cx: &Cx, lpid: Option<u32>) {
    if a_running() || !life_state(cx, la(), "stopped") {
        println!(
            "life: cleaning up {} (domain: {}, pair: {})",
            la(),
            xen::domid(la()).unwrap_or_else(|| "none".into()),
            jf(&life_row(cx, la()), "state")
        );
        let o = Cmd::new(&["xl-vtpm", "destroy", la()])
            .env("NO_COLOR", "1")
            .secs(60)
            .run(cx);
        show("xl-vtpm destroy (cleanup)", &o.all());
        xen::destroy_if_running(cx, la());
    }
    term_leftover(lpid);
}

/// SIGTERM to the vTPM process `lpid` if it still runs (cleanup; no verdict).
fn term_leftover(lpid: Option<u32>) {
    if let Some(p) = lpid.filter(|_| pid_up(lpid)) {
        println!("life: stopping leftover vTPM pid {p}");
        crate::cmd::signal(p, nix::sys::signal::Signal::SIGTERM);
    }
}

/// `xl-vtpm destroy life-a` (its output in `save`), and the guest gone within 30 s
/// (`xl-vtpm-destroy-exit-N`, `guest-still-there`).
fn destroy_a(cx: &Cx, save: &str, e: &mut Errs) -> Output {
    let o = Cmd::new(&["xl-vtpm", "destroy", la()])
        .env("NO_COLOR", "1")
        .secs(60)
        .save(save)
        .run(cx);
    show_tail("xl-vtpm destroy", &o.all(), 10);
    if !o.ok() {
        e.add(format!("xl-vtpm-destroy-exit-{}", o.rc));
    }
    if !cx.wait_until(30, || xen::domain_gone(la())) {
        e.add("guest-still-there");
    }
    o
}

/// A command to the held guest life-a (xenstore data/xvtpm-cmd); its GUEST-CMD line.
fn life_cmd(cx: &Cx, off: usize, n: u32, cmd: &str, secs: u64) -> String {
    let Some(d) = xen::domid(la()) else {
        return format!("no {} domain", la());
    };
    if !xen::xs_write(
        &format!("/local/domain/{d}/data/xvtpm-cmd"),
        &format!("{n}:{cmd}"),
    ) {
        return "xenstore-write failed".into();
    }
    let key = format!("GUEST-CMD {n} ");
    if !cx.wait_every(secs, Duration::from_secs(1), || {
        console_from(la(), off)
            .lines()
            .any(|l| l.starts_with(&key))
    }) {
        return format!("no answer within {secs} s");
    }
    console_from(la(), off)
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or("")
        .to_string()
}

pub fn run(r: &mut Runner, st: &mut St) {
    if st.life_mode == "0" || st.vtpm_mode != "dom0" {
        let why = if st.life_mode == "0" {
            "disabled (XVTPM_TESTBED_LIFE=0)"
        } else {
            "needs XVTPM_TESTBED_VTPM=dom0"
        };
        r.skip_all(&PHASES, why);
        return;
    }
    let acfg = lcfg();
    let mut a = Life::new(la(), &acfg);
    if second() {
        // its own watcher log (the first pass's watch.log and lifedom's watch-m.log stay)
        st.wlog = "/var/log/xvtpm/watch-r.log".into();
    }

    // life-watch
    r.phase("life-watch", deadline(90), |cx| {
        if !st.mgr_ready() {
            return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
        }
        if !Path::new("/usr/bin/xl-vtpm").exists() || !Path::new("/usr/bin/vtpm-domain").exists() {
            return Outcome::fail("xl-vtpm or vtpm-domain not built");
        }
        if !Path::new(LCFG0).is_file() {
            return Outcome::fail(format!("{LCFG0} missing (build-images.sh)"));
        }
        if st.mgr_dom.is_some() {
            // the second pass: the standalone vTPMs of earlier phases (vtpm-*@mgrdom's, and those
            // between the passes) are dropped, as the first pass drops vtpm-*'s, so that the
            // registry checks speak about the pairs only
            super::drop_unregistered_vtpms(cx, "life second pass");
        } else {
            drop_standalone_vtpm(cx, st);
        }
        for l in xen::read_text(&acfg).lines() {
            let t = l.trim_start();
            if !t.is_empty() && !t.starts_with('#') {
                println!("[{}] {l}", acfg.trim_start_matches("/etc/xen/"));
            }
        }
        match watch_start(cx, &st.wlog) {
            Ok(w) => {
                let pid = w.pid();
                st.watch = Some(w);
                Outcome::pass(format!("xl-vtpm watch (pid {pid}) watching @releaseDomain"))
            }
            Err(why) => Outcome::fail(why),
        }
    });

    // life-create
    if st.watch.is_none() {
        r.skip("life-create", "life-watch failed");
    } else {
        r.phase("life-create", deadline(480), |cx| {
            let cfg = a.cfg.clone();
            a.create(cx, &cfg, "create1");
            st.luuid = a.uuid_now.clone();
            st.lpid = a.pid_now;
            st.lpids.extend(a.pid_now);
            a.guest_uuid = jf(&a.row, "guest_uuid");
            st.lvlog = format!("/var/lib/xvtpm/vtpms/{}/vtpm.log", st.luuid);
            let why = if a.lrc != 0 {
                Some(format!(
                    "xl-vtpm create exited {}: {}",
                    a.lrc,
                    tail_of("/tmp/xl-life-create1.out")
                ))
            } else if jf(&a.row, "state") != "running" {
                Some(format!(
                    "xl-vtpm list --json: life-a not running: {}",
                    row_line(&a.row)
                ))
            } else if !pid_up(st.lpid) {
                Some(format!(
                    "xl-vtpm list --json: no live vtpm_pid ({})",
                    jf(&a.row, "vtpm_pid")
                ))
            } else if !jf(&a.row, "guest_running_domid")
                .chars()
                .all(|c| c.is_ascii_digit())
                || jf(&a.row, "guest_running_domid").is_empty()
            {
                Some("xl-vtpm list --json: no guest_running_domid".to_string())
            } else {
                check(
                    "dom0",
                    "life-list-running",
                    true,
                    &format!(
                        "{} domid {}, vTPM {} pid {}",
                        la(),
                        jf(&a.row, "guest_running_domid"),
                        st.luuid,
                        st.lpid.unwrap_or(0)
                    ),
                );
                // second pass: the vTPM process's socket is bound by dom0's bridge
                let mut re = Errs::default();
                super::relayed_check(&mut re, st, "life-relayed", &st.luuid, st.lpid);
                let mut miss = a.guest(cx, "create1", "fresh");
                a.ek = a.ek_now.clone();
                if !re.is_empty() {
                    miss.push(re.joined());
                }
                (!miss.is_empty()).then(|| format!("guest checks failed: {}", miss.join(" ")))
            };
            match why {
                None => Outcome::pass(format!(
                    "{} with vTPM {} (pid {}, allocated by xl-vtpm); 0x81000010 + NV written{}",
                    la(),
                    st.luuid,
                    st.lpid.unwrap_or(0),
                    if st.mgr_dom.is_some() {
                        format!("; its requests relayed by dom0's vtpmmgr bridge to {}", st.mgr_where())
                    } else {
                        String::new()
                    }
                )),
                Some(w) => Outcome::fail(w),
            }
        });
    }

    // life-xl-destroy
    let blocked =
        (st.luuid.is_empty() || !a_running()).then_some("no running life-a (life-create failed)");
    r.phase_if("life-xl-destroy", blocked, deadline(150), |cx| {
            let mut e = Errs::default();
            let d = xen::domid(la()).unwrap_or_default();
            println!("INFO life timeline xl-destroy-start {}", wallt());
            let t0 = up();
            let o = xen::xl_destroy(cx, la(), 60);
            if !o.ok() {
                e.add(format!("xl-destroy-rc={}", o.rc));
            }
            let t1 = up();
            let lpid = st.lpid;
            cx.wait_every(10, Duration::from_millis(50), || !pid_up(lpid));
            let t2 = up();
            println!("INFO life timeline vtpm-gone {}", wallt());
            let mut gone_ms = 0;
            if pid_up(lpid) {
                e.check_or(
                    "life-vtpm-gone",
                    false,
                    format!("vTPM pid {} still alive {} s after xl destroy returned", lpid.unwrap_or(0), secs1(t1, t2)),
                    "vtpm-process-still-running-after-10s",
                );
            } else {
                gone_ms = ms(t1, t2);
                println!(
                    "PERF life-destroy-to-vtpm-gone-ms={gone_ms} (xl destroy returned -> vTPM pid {} gone; {} ms from the start of xl destroy, which took {} ms)",
                    lpid.unwrap_or(0),
                    ms(t0, t2),
                    ms(t0, t1)
                );
                // The check is that the watcher ends the vTPM at all (within the 10 s wait above);
                // how fast is a figure (the PERF line), not a pass/fail limit: a loaded host took
                // 3–4.6 s where a quiet one takes well under 1 s.
                e.check("life-vtpm-gone", true, format!("{gone_ms} ms after xl destroy"));
            }
            if cx.wait_until(10, || life_state(cx, la(), "stopped")) {
                let row = life_row(cx, la());
                let p = jf(&row, "vtpm_pid");
                e.check_or("life-list-stopped", p == "null", if p == "null" {
                    "state stopped, vtpm_pid null".to_string()
                } else {
                    format!("vtpm_pid {p}")
                }, "list-vtpm-pid");
            } else {
                e.check_or("life-list-stopped", false, row_line(&life_row(cx, la())), "list-not-stopped");
            }
            life_list(cx);
            show_tail("watch.log", &xen::read_text(&st.wlog), 3);
            show_tail(&format!("vtpm-{}.log", la()), &xen::read_text(&st.lvlog), 4);
            term_leftover(lpid);
            e.verdict(format!("xl destroy (domid {d}): vTPM process gone {gone_ms} ms later (watcher), pair stopped"))
        });

    // life-recreate
    let no_vtpm = st
        .luuid
        .is_empty()
        .then_some("no vTPM (life-create failed)");
    r.phase_if("life-recreate", no_vtpm, deadline(900), |cx| {
        let mut e = Errs::default();
        life_stop_a(cx, st.lpid);
        let cfg = a.cfg.clone();
        a.create(cx, &cfg, "recreate");
        if a.lrc != 0 {
            e.add(format!(
                "xl-vtpm create of the unchanged {LCFG0} exited {}: {}",
                a.lrc,
                tail_of("/tmp/xl-life-recreate.out")
            ));
            // go on with the guest's recorded uuid, so the later steps still say something
            if !a.guest_uuid.is_empty() {
                let ucfg = if second() { "/etc/xen/life-r-uuid.cfg" } else { "/etc/xen/life-a-uuid.cfg" };
                let t = xen::cfg_from(
                    &xen::read_text(&a.cfg),
                    &[("# uuid = ", format!("uuid = \"{}\"", a.guest_uuid))],
                );
                let _ = fs::write(ucfg, t);
                a.cfg = ucfg.into();
                println!(
                    "life-recreate: retrying with {ucfg} (uuid = {}); the later steps use it",
                    a.guest_uuid
                );
                a.create(cx, ucfg, "recreate-uuid");
                if a.lrc != 0 {
                    e.add(format!("; with uuid = {} too (rc {})", a.guest_uuid, a.lrc));
                }
            }
        }
        if a.lrc == 0 {
            let same = a.uuid_now == st.luuid;
            e.check_or(
                "life-same-vtpm",
                same,
                if same {
                    st.luuid.clone()
                } else {
                    format!("now {}, first create {}", none(&a.uuid_now), st.luuid)
                },
                "other-vtpm-uuid",
            );
            if !pid_up(a.pid_now) {
                e.add("no-live-vtpm-pid");
            }
            st.lpid = a.pid_now;
            st.lpids.extend(a.pid_now);
            let miss = a.guest(cx, "recreate", "kept");
            if !miss.is_empty() {
                e.add(format!("guest checks failed: {}", miss.join(" ")));
            }
            a.ek_check("recreate", &mut e);
        }
        e.verdict(format!(
            "same vTPM {} (new pid {}), 0x81000010 + NV kept, same EK",
            st.luuid,
            st.lpid.unwrap_or(0)
        ))
    });

    // life-reboot
    let blocked = (!a_running()).then_some("no running life-a (life-recreate failed)");
    r.phase_if("life-reboot", blocked, deadline(1100), |cx| {
        reboot(cx, st, &mut a)
    });

    // life-refuse-b
    let no_vtpm = st
        .luuid
        .is_empty()
        .then_some("no vTPM (life-create failed)");
    r.phase_if("life-refuse-b", no_vtpm, deadline(280), |cx| {
        refuse_b(cx, st)
    });

    // life-mgr-restart (the second pass restarts the manager domain instead of dom0's vtpmmgr)
    let blocked = (st.luuid.is_empty() || !mgr_alive(st)).then_some("no vTPM or no manager");
    r.phase_if("life-mgr-restart", blocked, deadline(900), |cx| {
        if st.mgr_dom.is_some() {
            mgr_restart_dom(cx, st, &mut a)
        } else {
            mgr_restart(cx, st, &mut a)
        }
    });

    // life-registry
    if st.watch.is_none() {
        r.skip("life-registry", "life-watch failed");
    } else if !mgr_alive(st) {
        r.verdict(
            "life-registry",
            Outcome::fail("no manager for xl-vtpm (see life-mgr-restart)"),
        );
    } else {
        r.phase("life-registry", deadline(280), |cx| registry(cx, st));
    }
    // nothing of the lifecycle may outlive it (teardown then checks there is no domU left)
    let cx = &r.cx;
    for d in [la(), lb()] {
        xen::destroy_if_running(cx, d);
    }
    term_leftover(st.lpid);
    if let Some(mut w) = st.watch.take() {
        kill_child(&mut w.child);
    }
}

/// The last 3 lines of a file on one line.
pub fn tail_of(path: &str) -> String {
    crate::cmd::tail_lines(&xen::read_text(path), 3).replace('\n', " ")
}

fn reboot(cx: &Cx, st: &mut St, a: &mut Life) -> Outcome {
    let mut e = Errs::default();
    let d0 = xen::domid(la()).unwrap_or_default();
    let mut d1 = String::new();
    a.off = lines_of(&xen::clog(la()));
    println!("INFO life timeline xl-vtpm-reboot {}", wallt());
    let t0 = up();
    let o = Cmd::new(&["xl-vtpm", "reboot", la()])
        .secs(60)
        .save("/tmp/xl-life-reboot.out")
        .run(cx);
    if !o.ok() {
        e.add(format!("xl-vtpm-reboot-rc={}", o.rc));
    }
    show_tail("xl-vtpm reboot", &o.all(), 5);
    let rebooted = || xen::domid(la()).is_some_and(|n| n != d0);
    if cx.wait_until(120, rebooted) {
        d1 = xen::domid(la()).unwrap_or_default();
        println!("INFO life timeline new-domid-{d1}-seen {}", wallt());
        println!(
            "{} rebooted: domid {d0} -> {d1} after {} s",
            la(),
            secs1(t0, up())
        );
        let kept = pid_up(st.lpid);
        e.check_or(
            "life-vtpm-kept",
            kept,
            format!(
                "vTPM pid {} {}",
                st.lpid.unwrap_or(0),
                if kept {
                    "alive after the reboot"
                } else {
                    "is gone (the watcher stopped it?)"
                }
            ),
            "vtpm-process-stopped",
        );
        show_tail("watch.log", &xen::read_text(&st.wlog), 4);
        let vl = xen::read_text(&st.lvlog);
        let v: Vec<&str> = vl
            .lines()
            .filter(|l| {
                l.contains(&format!("DomId({d0})"))
                    || l.contains(&format!("DomId({d1})"))
                    || l.contains("signal")
                    || l.contains("shutting")
            })
            .collect();
        super::show_last(&format!("vtpm-{}.log", la()), &v, 8);
        if e.is_empty() {
            let miss = a.guest(cx, "reboot", "kept");
            if !miss.is_empty() {
                e.add(format!("guest checks failed: {}", miss.join(" ")));
            }
            a.ek_check("reboot", &mut e);
            let rp = jf(&life_row(cx, la()), "vtpm_pid");
            if parse_pid(&rp) != st.lpid {
                e.check_or(
                    "life-vtpm-kept",
                    false,
                    format!("registry vtpm_pid {rp}, want {}", st.lpid.unwrap_or(0)),
                    "registry-vtpm-pid",
                );
            }
            let d1c = d1.clone();
            let follows = cx.wait_until(15, || jf(&life_row(cx, la()), "guest_domid") == d1c);
            e.check_or(
                "life-registry-domid",
                follows,
                if follows {
                    format!("guest_domid {d1}")
                } else {
                    format!(
                        "registry guest_domid {}, running {d1}",
                        jf(&life_row(cx, la()), "guest_domid")
                    )
                },
                "registry-domid",
            );
        } else {
            std::thread::sleep(crate::s(5));
            println!(
                "life-a 5 s later: domid {}",
                xen::domid(la()).unwrap_or_else(|| "none".into())
            );
            let c = console_from(la(), a.off);
            let v: Vec<&str> = c
                .lines()
                .filter(|l| {
                    ["GUEST-", "tpm", "vtpm", "xenbus"]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .collect();
            super::show_last("life-a reboot console", &v, 10);
            show_tail(
                "xl-life-a.log",
                &xen::read_text(&format!("/var/log/xen/xl-{}.log", la())),
                25,
            );
        }
    } else {
        e.add("no-new-domain-in-120s");
    }
    life_list(cx);
    if !e.is_empty() && !cx.past_deadline() {
        // bring the pair back (no verdict on it; its time counts here) so the next steps test what they are for
        println!("life: recovering life-a for the next steps (xl-vtpm destroy + create)");
        life_stop_a(cx, st.lpid);
        let cfg = a.cfg.clone();
        a.create(cx, &cfg, "reboot-recover");
        if a.lrc == 0 {
            st.lpid = a.pid_now;
            st.lpids.extend(a.pid_now);
            let miss = a.guest(cx, "reboot-recover", "kept");
            println!(
                "INFO life recovered: vTPM pid {}, guest checks: {}",
                st.lpid.unwrap_or(0),
                if miss.is_empty() {
                    "all PASS".to_string()
                } else {
                    miss.join(" ")
                }
            );
        }
    }
    e.verdict(format!(
        "domid {d0} -> {d1}, vTPM pid {} kept, 0x81000010 + NV kept, PCR16 reset, same EK",
        st.lpid.unwrap_or(0)
    ))
}

fn refuse_b(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    let t = xen::cfg_from(
        &xen::read_text(LCFG0),
        &[
            ("name = ", format!("name = \"{}\"", lb())),
            (
                "vtpm = ",
                format!("vtpm = [ \"backend=0,uuid={}\" ]", st.luuid),
            ),
        ],
    );
    let bcfg = format!("/etc/xen/{}.cfg", lb());
    let _ = fs::write(&bcfg, &t);
    xen::show_cfg(&format!("{}.cfg", lb()), &t, &["name", "vtpm", "uuid"]);
    let lpid = st.lpid;
    let a_state = || {
        format!(
            "domain {}, vTPM pid {} {}",
            xen::domid(la()).unwrap_or_else(|| "none".into()),
            lpid.unwrap_or(0),
            if pid_up(lpid) { "up" } else { "down" }
        )
    };
    let before_a = a_state();
    let before = Cmd::sh("xl-vtpm list --json")
        .secs(30)
        .save("/tmp/life-list-before.json")
        .run(cx);
    let o = Cmd::new(&["xl-vtpm", "create", &bcfg])
        .env("NO_COLOR", "1")
        .secs(120)
        .save("/tmp/xl-life-b.out")
        .run(cx);
    show_tail("xl-vtpm create life-b", &o.all(), 10);
    let after = Cmd::sh("xl-vtpm list --json")
        .secs(30)
        .save("/tmp/life-list-after.json")
        .run(cx);
    e.check_or(
        "life-b-refused",
        o.rc == 6,
        if o.rc == 6 {
            "exit 6 (refused)".into()
        } else {
            format!("exit {} (want 6)", o.rc)
        },
        format!("exit-{}", o.rc),
    );
    let names = o.all().contains(la());
    e.check_or(
        "life-b-names-owner",
        names,
        if names { "the error names life-a" } else { "" },
        "error-does-not-name-life-a",
    );
    if xen::domid(lb()).is_some() {
        e.add("life-b-domain-exists");
        xen::xl_destroy(cx, lb(), 60);
    }
    let unchanged = before.all() == after.all() && after.all().contains(la());
    e.check_or(
        "life-b-nothing-left",
        unchanged,
        if unchanged {
            "no life-b domain, xl-vtpm list --json unchanged"
        } else {
            "xl-vtpm list changed:"
        },
        "xl-vtpm-list-changed",
    );
    if !unchanged {
        show("before", &crate::cmd::tail_lines(&before.all(), 10));
        show("after", &crate::cmd::tail_lines(&after.all(), 10));
    }
    let after_a = a_state();
    e.check_or(
        "life-a-untouched",
        before_a == after_a,
        if before_a == after_a {
            after_a.clone()
        } else {
            format!("before: {before_a}; after: {after_a}")
        },
        "life-a-changed",
    );
    e.verdict(format!(
        "xl-vtpm create {} refused (exit 6, names {}); nothing created; {}: {after_a}",
        lb(),
        la(),
        la()
    ))
}

fn mgr_restart(cx: &Cx, st: &mut St, a: &mut Life) -> Outcome {
    let mut e = Errs::default();
    let ar = a_running() && pid_up(st.lpid);
    if !ar {
        println!(
            "life-a is not running with its vTPM (an earlier step failed): restart the manager, then create it"
        );
        life_stop_a(cx, st.lpid);
    }
    let old = st.mgr_pid().unwrap_or(0);
    if super::base::stop_mgr(cx, st) {
        println!("vtpmmgr (pid {old}) exited on SIGTERM");
    } else {
        e.add("vtpmmgr-did-not-exit");
    }
    if ar {
        println!(
            "INFO life vtpm-after-mgr-exit pid {} alive={}",
            st.lpid.unwrap_or(0),
            yn(pid_up(st.lpid))
        );
    }
    let started = super::base::start_mgr(st, "/var/log/xvtpm/vtpmmgr-2.log");
    if started && super::base::mgr_wait_ready(cx, st) {
        println!("vtpmmgr restarted (pid {})", st.mgr_pid().unwrap_or(0));
        if ar {
            // the running pair, untouched (informational: this step restarts the vTPM below)
            println!(
                "INFO life vtpm-after-mgr-restart pid {} alive={}",
                st.lpid.unwrap_or(0),
                yn(pid_up(st.lpid))
            );
            println!(
                "INFO life live-getrandom-after-mgr-restart {}",
                life_cmd(cx, a.off, 1, "getrandom", 60)
            );
            println!(
                "INFO life live-deepquote-after-mgr-restart {}",
                life_cmd(cx, a.off, 2, &format!("deepquote:{}", xen::nonce(16)), 60)
            );
            let t0 = up();
            let o = destroy_a(cx, "/tmp/xl-life-destroy2.out", &mut e);
            println!(
                "xl-vtpm destroy life-a: rc={} in {} s",
                o.rc,
                secs1(t0, up())
            );
            let lpid = st.lpid;
            if !cx.wait_until(10, || !pid_up(lpid)) {
                e.add(format!("vtpm-pid-{}-still-alive", lpid.unwrap_or(0)));
                crate::cmd::signal(lpid.unwrap_or(0), nix::sys::signal::Signal::SIGKILL);
            }
            if !cx.wait_until(10, || life_state(cx, la(), "stopped")) {
                e.add(format!(
                    "pair-not-stopped({})",
                    jf(&life_row(cx, la()), "state")
                ));
            }
        }
        let cfg = a.cfg.clone();
        a.create(cx, &cfg, "create3");
        if a.lrc != 0 {
            e.add(format!(
                "xl-vtpm-create-exit-{}: {}",
                a.lrc,
                tail_of("/tmp/xl-life-create3.out")
            ));
        } else {
            if a.uuid_now != st.luuid {
                e.add(format!("other-vtpm-uuid-{}", a.uuid_now));
            }
            if !pid_up(a.pid_now) {
                e.add("no-live-vtpm-pid");
            }
            println!(
                "vTPM {}: pid {} -> {} on the restarted manager",
                a.uuid_now,
                st.lpid.unwrap_or(0),
                a.pid_now.unwrap_or(0)
            );
            st.lpid = a.pid_now;
            st.lpids.extend(a.pid_now);
            let miss = a.guest(cx, "mgr-restart", "kept");
            if !miss.is_empty() {
                e.add(format!("guest checks failed: {}", miss.join(" ")));
            }
            a.ek_check("mgr-restart", &mut e);
        }
    } else {
        show_tail(
            "vtpmmgr-2",
            &xen::read_text("/var/log/xvtpm/vtpmmgr-2.log"),
            20,
        );
        e.add("vtpmmgr-not-ready-after-restart");
        if let Some(mut c) = st.mgr.take() {
            kill_child(&mut c);
        }
    }
    life_list(cx);
    e.verdict(format!(
        "vtpmmgr restarted; A's vTPM restarted on it (pid {}): getrandom, 0x81000010 + NV kept, same EK",
        st.lpid.unwrap_or(0)
    ))
}

/// life-mgr-restart in the second pass: the manager runs in its own domain and the pair's vTPM is
/// a dom0 process whose requests dom0's bridge relays. The MANAGER DOMAIN is restarted (`xl
/// shutdown`, a new domain from its disk with boot=serve; mgrdom::restart_in_pass) and the bridge
/// follows it; the vTPM process must keep running (same pid, its relayed socket still the
/// bridge's) and still serve its guest, including what needs the new manager: a deep quote from
/// the guest (the bridge attaches the vTPM again on the manager's "not attached", once), and then
/// a reboot of the guest through `xl-vtpm reboot` with 0x81000010 + NV kept and the same EK.
fn mgr_restart_dom(cx: &Cx, st: &mut St, a: &mut Life) -> Outcome {
    let mut e = Errs::default();
    if !(a_running() && pid_up(st.lpid)) {
        println!(
            "{} is not running with its vTPM (an earlier step failed): created again before the manager domain's restart",
            la()
        );
        life_stop_a(cx, st.lpid);
        let cfg = a.cfg.clone();
        a.create(cx, &cfg, "mgr-restart-pre");
        if a.lrc != 0 || !pid_up(a.pid_now) {
            return Outcome::fail(format!(
                "{} could not be started before the restart: xl-vtpm create rc {}",
                la(),
                a.lrc
            ));
        }
        st.lpid = a.pid_now;
        st.lpids.extend(a.pid_now);
        let miss = a.guest(cx, "mgr-restart-pre", "kept");
        if !miss.is_empty() {
            e.add(format!("guest checks before the restart failed: {}", miss.join(" ")));
        }
    }
    let pid = st.lpid;
    let uuid = st.luuid.clone();
    let gdom = xen::domid(la()).unwrap_or_default();
    let boff = lines_of(super::BRIDGE_LOG);
    println!("INFO life timeline mgrdom-restart-start {}", wallt());
    let Some((d1, d2)) = super::mgrdom::restart_in_pass(cx, &mut e, st) else {
        st.show_mgr_log(20);
        e.add("manager-domain-restart-failed");
        return e.verdict("");
    };
    println!("INFO life timeline mgrdom-restarted {}", wallt());
    // the vTPM process ran on through the restart: same pid, same guest domain, its socket the bridge's
    let rp = parse_pid(&jf(&life_row(cx, la()), "vtpm_pid"));
    let kept = pid_up(pid) && rp == pid;
    e.check(
        "life-vtpm-kept-mgrdom-restart",
        kept,
        format!(
            "vTPM {uuid} process pid {} alive {} across the manager domain's restart (domid {d1} -> {d2}); registry vtpm_pid {}",
            pid.unwrap_or(0),
            pid_up(pid),
            rp.map(|p| p.to_string()).unwrap_or_else(|| "none".into())
        ),
    );
    let gnow = xen::domid(la()).unwrap_or_default();
    e.check(
        "life-guest-kept-mgrdom-restart",
        !gdom.is_empty() && gnow == gdom,
        format!("{} domid {} before the restart, {} after", la(), none(&gdom), none(&gnow)),
    );
    super::relayed_check(&mut e, st, "life-relayed-after-mgrdom-restart", &uuid, pid);
    // the guest's vTPM answers, and what needs the (new) manager works: a deep quote
    let g = life_cmd(cx, a.off, 1, "getrandom", 60);
    e.check(
        "life-getrandom-after-mgrdom-restart",
        g.contains("getrandom PASS"),
        format!("the guest's tpm2_getrandom after the restart: {}", none(&g)),
    );
    let dq = life_cmd(cx, a.off, 2, &format!("deepquote:{}", xen::nonce(16)), 180);
    e.check(
        "life-deepquote-after-mgrdom-restart",
        dq.contains("deepquote PASS"),
        format!(
            "the guest's deep quote (signed by the new manager domain {d2}, relayed by the bridge): {}",
            none(&dq)
        ),
    );
    let bl = xen::read_text(super::BRIDGE_LOG);
    let after: Vec<&str> = bl.lines().skip(boff).collect();
    let re = after
        .iter()
        .any(|l| l.contains("lost a relayed attachment") && l.contains(&uuid));
    e.check(
        "life-bridge-reattached",
        re,
        format!(
            "dom0's bridge attached vTPM {uuid} again to the new manager domain on its \"not attached\" (its log after the restart: 'the manager lost a relayed attachment (restarted?); attaching again'): {re}"
        ),
    );
    super::show_last("vtpmmgr bridge (after the restart)", &after, 12);
    // a reboot of the guest on the same vTPM process: state kept (0x81000010 + NV), same EK
    let rb = reboot(cx, st, a);
    e.check(
        "life-reboot-after-mgrdom-restart",
        rb.status == crate::runner::Status::Pass,
        format!(
            "xl-vtpm reboot {} after the manager domain's restart: {} {}",
            la(),
            rb.status.word(),
            rb.reason
        ),
    );
    e.check(
        "life-vtpm-kept-after-reboot",
        st.lpid == pid && pid_up(pid),
        format!(
            "vTPM pid {} before the restart, {} after the restart and the reboot",
            pid.unwrap_or(0),
            st.lpid.unwrap_or(0)
        ),
    );
    if !e.is_empty() {
        st.show_mgr_log(20);
    }
    life_list(cx);
    e.verdict(format!(
        "the manager domain restarted (domid {d1} -> {d2}, dom0's bridge followed it); the dom0 vTPM process (pid {}) kept running, its requests relayed by the bridge: getrandom and a deep quote from the guest after the restart (the bridge attached the vTPM again to the new manager domain), then a guest reboot with 0x81000010 + NV kept, same EK",
        pid.unwrap_or(0)
    ))
}

/// A manager serves: dom0's vtpmmgr, or (second pass) the manager domain (empty domid: its
/// restart failed).
fn mgr_alive(st: &St) -> bool {
    st.mgr.is_some() || st.mgr_dom.as_ref().is_some_and(|m| !m.domid.is_empty())
}

fn yn(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `xl-vtpm registry check` says the registry matches what runs.
pub fn registry_clean(cx: &Cx, save: &str, tag: &str) -> (bool, i32) {
    let o = Cmd::sh("xl-vtpm registry check")
        .secs(60)
        .save(save)
        .run(cx);
    show(tag, &o.all());
    (
        o.ok() && o.all().contains("registry matches what runs"),
        o.rc,
    )
}

fn registry(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if a_running() {
        let (ok, rc) = registry_clean(cx, "/tmp/life-check1.out", "registry check, life-a running");
        if !ok {
            e.add(format!("drift-with-life-a-running(rc={rc})"));
        }
        let t0 = up();
        let o = destroy_a(cx, "/tmp/xl-life-destroy3.out", &mut e);
        if pid_up(st.lpid) {
            e.add(format!(
                "vtpm-pid-{}-alive-after-xl-vtpm-destroy",
                st.lpid.unwrap_or(0)
            ));
        }
        if !life_state(cx, la(), "stopped") {
            e.add("pair-not-stopped");
        }
        if st.mgr_dom.is_some() {
            // second pass: the bridge unbound the vTPM's relayed socket and dropped its attachment
            let sock = super::vtpm_sock(&st.luuid);
            let u = st.luuid.clone();
            let rel = || xen::read_text(&format!("{}/relayed.json", super::RUN_DIR));
            let gone = cx.wait_until(15, || !Path::new(&sock).exists() && !rel().contains(&u));
            e.check(
                "life-relayed-gone",
                gone,
                format!(
                    "after xl-vtpm destroy: {sock} exists {}; relayed.json names the vTPM {} ({})",
                    Path::new(&sock).exists(),
                    rel().contains(&u),
                    rel().trim()
                ),
            );
        }
        println!(
            "xl-vtpm destroy life-a: rc={}, guest and vTPM gone after {} s",
            o.rc,
            secs1(t0, up())
        );
    } else {
        println!("life-a is not running (an earlier step failed); checking the registry as it is");
        e.add("life-a-not-running");
    }
    let (ok, rc) = registry_clean(cx, "/tmp/life-check2.out", "registry check, end");
    if !ok {
        e.add(format!("drift-at-end(rc={rc})"));
    }
    life_list(cx);
    if let Some(w) = st.watch.take()
        && !w.stop(cx, 10)
    {
        e.add("watcher-did-not-exit");
    }
    show_tail("watch.log", &xen::read_text(&st.wlog), 20);
    e.verdict(
        format!(
            "registry check: no drift ({} running, and after xl-vtpm destroy); watcher stopped{}",
            la(),
            if st.mgr_dom.is_some() {
                "; the bridge unbound the vTPM's relayed socket and dropped the attachment"
            } else {
                ""
            }
        ),
    )
}
