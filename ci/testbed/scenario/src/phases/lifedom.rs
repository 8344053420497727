//! Lifecycle of a guest whose vTPM is its own domain (xl-vtpm create/destroy, xl-vtpm watch).
//! `xl-vtpm create life-d.cfg` with vtpm = [ "backend=vtpm-life-d" ] (life-a.cfg, i.e. xen-configs/guest.cfg,
//! with only name and vtpm changed): xl-vtpm makes the vTPM domain vtpm-life-d on first use (new
//! disk, new TPM), boots it from its disk later, and `xl-vtpm watch` shuts it down when the guest
//! goes. One RESULT per step:
//!   lifedom-create      watcher running (started again if the life-* phases' is gone); both domains
//!                       in `xl list`; `xl-vtpm list --json`: running, vtpm_running_domid = the vTPM
//!                       domain; a new 4 MiB disk, first boot with --create; guest writes 0x81000010 + NV
//!   lifedom-xl-destroy  plain `xl destroy life-d`: the watcher shuts vtpm-life-d down (clean stop,
//!                       gone within 15 s: PERF), its loop device is released, the pair stopped
//!   lifedom-recreate    the same config again: same vTPM UUID, its domain booted from the kept disk
//!                       (same image, no --create); 0x81000010 + NV kept, same EK
//!   lifedom-destroy     `xl-vtpm destroy life-d`: guest and vTPM domain gone, loop released, pair
//!                       stopped; `xl-vtpm registry check` clean (running, and after); watcher stopped
//! With XVTPM_TESTBED_MGRDOM=1 the set runs a second time after `mgrdom-serve`, as
//! `lifedom-*@mgrdom`, with the manager in its own domain (dom0's admin CLI through `vtpmmgr
//! bridge`), on a new pair life-m / vtpm-life-m (watcher log watch-m.log): the same checks, plus
//! `lifedom-mgr-link-{create,recreate}` (the vTPM domain's manager link is on the manager domain).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use super::life::{
    LCFG0, Life, life_list, life_row, life_state, registry_clean, row_line, tail_of, watch_start,
};
use super::vtpmdom::{
    disk_check, dom_xs, dom0_backends, domain_logs, extra_line, extra_of, resumes_from_disk,
};
use super::{St, deadline, drop_standalone_vtpm, ek_stable, ms, none, secs1, up, wallt};
use crate::cmd::{Cmd, Output, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, console_from, jf, lines_of, vd_loop};

/// The pair's names. The second pass (the manager in its own domain) makes a new pair, life-m:
/// the first pass's life-d stays in the registry, stopped, with its vTPM identity and disk, and
/// `xl-vtpm create life-d.cfg` would boot that vTPM again instead of making one.
#[derive(Clone, Copy)]
struct Names {
    /// the guest, its vTPM domain, its config
    g: &'static str,
    v: &'static str,
    cfg: &'static str,
    /// in the names of /tmp files (`/tmp/xl-life-<t>-create.out`, …)
    t: &'static str,
    /// the watcher's log when these phases start their own
    wlog: &'static str,
}

const FIRST: Names = Names {
    g: "life-d",
    v: "vtpm-life-d",
    cfg: "/etc/xen/life-d.cfg",
    t: "d",
    wlog: "/var/log/xvtpm/watch-d.log",
};
const SECOND: Names = Names {
    g: "life-m",
    v: "vtpm-life-m",
    cfg: "/etc/xen/life-m.cfg",
    t: "m",
    wlog: "/var/log/xvtpm/watch-m.log",
};

impl Default for Names {
    fn default() -> Self {
        FIRST
    }
}
/// ms; below xl-vtpm's 20 s shutdown grace: a clean stop, not the xl destroy fallback
const LD_GONE_LIMIT: i64 = 15000;

#[derive(Default)]
struct Ld {
    n: Names,
    uuid: String,
    ek: String,
    voff: usize,
    vdomid: String,
    ino: Option<u64>,
    gone_ms: Option<i64>,
}

impl Ld {
    fn vcon(&self) -> String {
        let Names { v: ldv, .. } = self.n;
        console_from(ldv, self.voff)
    }
    fn img(&self) -> String {
        format!("/var/lib/xvtpm/vtpms/{}/disk.img", self.uuid)
    }
    /// `xl-vtpm destroy <guest>`: the guest and its vTPM domain (cleanup when `save` is none).
    fn xlvtpm_destroy(&self, cx: &Cx, save: Option<&str>) -> Output {
        let Names { g: ldn, .. } = self.n;
        let c = Cmd::new(&["xl-vtpm", "destroy", ldn])
            .env("NO_COLOR", "1")
            .secs(150);
        match save {
            Some(p) => c.save(p),
            None => c,
        }
        .run(cx)
    }
    fn xlcfg(&self) -> String {
        format!("/run/xvtpm/vtpms/{}.xl.cfg", self.uuid)
    }
    fn vtpmdom_lines(&self, n: usize) -> String {
        let c = self.vcon();
        let v: Vec<&str> = c.lines().filter(|l| l.starts_with("VTPMDOM-")).collect();
        v[v.len().saturating_sub(n)..].join(" ")
    }

    /// What xl-vtpm and xl say about the pair, one line each; the pair's row.
    fn domains(&self, cx: &Cx) -> serde_json::Value {
        let Names { g: ldn, .. } = self.n;
        let l = Cmd::sh("xl list").run(cx).stdout;
        let doms: Vec<String> = l
            .lines()
            .skip(1)
            .map(|r| {
                let f: Vec<&str> = r.split_whitespace().collect();
                format!("{}({})", f.first().unwrap_or(&""), f.get(1).unwrap_or(&""))
            })
            .collect();
        println!("xl list: {}", doms.join(" "));
        let row = life_row(cx, ldn);
        println!(
            "xl-vtpm list --json {ldn}: state={} guest_running_domid={} vtpm_domain={} vtpm_domid={} vtpm_running_domid={} vtpm_pid={}",
            jf(&row, "state"),
            jf(&row, "guest_running_domid"),
            jf(&row, "vtpm_domain"),
            jf(&row, "vtpm_domid"),
            jf(&row, "vtpm_running_domid"),
            jf(&row, "vtpm_pid")
        );
        row
    }

    /// The pair runs: both domains, the registry row, the vTPM domain ready; sets vdomid.
    fn running(&mut self, cx: &Cx, tag: &str, e: &mut Errs) {
        let Names { g: ldn, v: ldv, .. } = self.n;
        let row = self.domains(cx);
        let g = xen::domid(ldn).unwrap_or_default();
        self.vdomid = xen::domid(ldv).unwrap_or_default();
        let both = !g.is_empty() && !self.vdomid.is_empty();
        e.check(
            &format!("lifedom-xl-list-{tag}"),
            both,
            if both {
                format!("{ldn} is domid {g}, {ldv} is domid {}", self.vdomid)
            } else {
                format!("{ldn}: {}, {ldv}: {}", none(&g), none(&self.vdomid))
            },
        );
        let ok = jf(&row, "state") == "running"
            && jf(&row, "guest_running_domid") == g
            && jf(&row, "vtpm_domain") == ldv
            && !self.vdomid.is_empty()
            && jf(&row, "vtpm_running_domid") == self.vdomid
            && jf(&row, "vtpm_domid") == self.vdomid;
        e.check(
            &format!("lifedom-list-running-{tag}"),
            ok,
            if ok {
                format!(
                    "running, guest domid {g}, vtpm_domain {ldv}, vtpm_domid = vtpm_running_domid = {}",
                    self.vdomid
                )
            } else {
                row_line(&row)
            },
        );
        let ready_key = format!(
            "/local/domain/{}/data/xvtpm/ready",
            if self.vdomid.is_empty() {
                "x"
            } else {
                &self.vdomid
            }
        );
        let rd = xen::xs_read(&ready_key).unwrap_or_default();
        let con = self
            .vcon()
            .lines()
            .any(|l| l.starts_with(&format!("VTPMDOM-READY uuid={}", self.uuid)));
        let ok = !self.vdomid.is_empty() && rd == self.uuid && con;
        e.check(
            &format!("lifedom-vtpm-ready-{tag}"),
            ok,
            if ok {
                format!(
                    "data/xvtpm/ready = {}, VTPMDOM-READY on its console",
                    self.uuid
                )
            } else {
                format!("ready='{rd}'; console: {}", self.vtpmdom_lines(2))
            },
        );
    }

    /// After the guest went: vTPM domain gone (clean stop), loop released, pair stopped.
    fn stopped(&mut self, cx: &Cx, tag: &str, t0: f64, e: &mut Errs) {
        let Names { g: ldn, v: ldv, .. } = self.n;
        cx.wait_every(60, Duration::from_millis(100), || xen::domain_gone(ldv));
        let tg = up();
        if xen::domid(ldv).is_some() {
            e.check(
                &format!("lifedom-vtpmdom-gone-{tag}"),
                false,
                format!(
                    "{ldv} still there {} s later: {}",
                    secs1(t0, tg),
                    Cmd::new(&["xl", "list", ldv]).run(cx).tail(1)
                ),
            );
            self.gone_ms = None;
        } else {
            let g = ms(t0, tg);
            self.gone_ms = Some(g);
            e.check(
                &format!("lifedom-vtpmdom-gone-{tag}"),
                true,
                format!("{ldv} (domid {}) gone {g} ms later", self.vdomid),
            );
        }
        let clean = self
            .vcon()
            .lines()
            .any(|l| l.starts_with("VTPMDOM-EXIT code=0"));
        e.check(
            &format!("lifedom-clean-stop-{tag}"),
            clean,
            if clean {
                "VTPMDOM-EXIT code=0 on its console (xl shutdown -> clean stop)".to_string()
            } else {
                format!("no 'VTPMDOM-EXIT code=0': {}", self.vtpmdom_lines(2))
            },
        );
        let u = self.uuid.clone();
        let noloop = cx.wait_until(15, || vd_loop(&u).is_empty());
        e.check(
            &format!("lifedom-loop-released-{tag}"),
            noloop,
            if noloop {
                format!("no loop device on {}", self.img())
            } else {
                vd_loop(&u).join(" ")
            },
        );
        if cx.wait_until(15, || life_state(cx, ldn, "stopped")) {
            let r = life_row(cx, ldn);
            let ok =
                jf(&r, "vtpm_running_domid") == "null" && jf(&r, "guest_running_domid") == "null";
            e.check(
                &format!("lifedom-pair-stopped-{tag}"),
                ok,
                if ok {
                    "state stopped, guest_running_domid and vtpm_running_domid null".to_string()
                } else {
                    row_line(&r)
                },
            );
        } else {
            e.check(
                &format!("lifedom-pair-stopped-{tag}"),
                false,
                row_line(&life_row(cx, ldn)),
            );
        }
    }

    /// The vTPM domain's console and xenstore, dom0's backends, xl's log, the watcher, the manager.
    fn diag(&self, cx: &Cx, st: &St) {
        let Names { g: ldn, v: ldv, .. } = self.n;
        show_tail(&format!("{ldv} console"), &self.vcon(), 30);
        for n in [ldv, ldn] {
            if let Some(i) = xen::domid(n) {
                for l in dom_xs(&i, &["data", "device", "control"]).iter().take(40) {
                    println!("[{n} xenstore] {l}");
                }
            }
        }
        for l in dom0_backends().iter().take(40) {
            println!("[dom0 backend] {l}");
        }
        super::show_mgr_backends(st, 40);
        println!(
            "[run/xvtpm/vtpms] {}",
            xen::dir_names("/run/xvtpm/vtpms").join(" ")
        );
        show_tail("watch.log", &xen::read_text(&st.wlog), 10);
        domain_logs(ldv, 20, st);
        life_list(cx);
    }

    fn show_vcon(&self, n: usize) {
        let Names { v: ldv, .. } = self.n;
        let c = self.vcon();
        let v: Vec<&str> = c
            .lines()
            .filter(|l| l.starts_with("VTPMDOM-") || l.contains("panic") || l.contains("Oops"))
            .collect();
        super::show_last(&format!("{ldv} console"), &v, n);
    }
}

/// The phases of this set, in order (mgrdom.rs skips them by name when their second pass cannot run).
pub const PHASES: [&str; 4] = [
    "lifedom-create",
    "lifedom-xl-destroy",
    "lifedom-recreate",
    "lifedom-destroy",
];

pub fn run(r: &mut Runner, st: &mut St) {
    if st.lifedom_mode == "0" {
        r.skip_all(&PHASES, "disabled (XVTPM_TESTBED_LIFEDOM=0)");
        return;
    }
    // the second pass (the manager in its own domain) makes a pair of its own
    let n = if st.mgr_dom.is_some() { SECOND } else { FIRST };
    let Names { g: ldn, v: ldv, cfg: ldcfg, .. } = n;
    let mut ld = Ld {
        n,
        ..Ld::default()
    };
    let mut a = Life::new(ldn, ldcfg);

    r.phase("lifedom-create", deadline(560), |cx| {
        create(cx, st, &mut ld, &mut a)
    });

    let why = format!("no running {ldn} or no watcher (lifedom-create failed)");
    let blocked = (ld.uuid.is_empty() || xen::domid(ldn).is_none() || st.watch.is_none())
        .then_some(why.as_str());
    r.phase_if("lifedom-xl-destroy", blocked, deadline(360), |cx| {
        xl_destroy(cx, st, &mut ld)
    });

    let blocked = (ld.uuid.is_empty() || ld.ek.is_empty())
        .then_some("no vTPM or no first boot (lifedom-create failed)");
    r.phase_if("lifedom-recreate", blocked, deadline(560), |cx| {
        recreate(cx, st, &mut ld, &mut a)
    });

    if ld.uuid.is_empty() {
        r.skip("lifedom-destroy", "no vTPM (lifedom-create failed)");
    } else if xen::domid(ldn).is_none() {
        r.skip(
            "lifedom-destroy",
            &format!("no running {ldn} (lifedom-recreate failed)"),
        );
    } else {
        r.phase("lifedom-destroy", deadline(450), |cx| {
            destroy(cx, st, &mut ld)
        });
    }
    // nothing of it may outlive the section (teardown checks that no domU is left)
    let cx = &r.cx;
    if xen::domid(ldn).is_some() || xen::domid(ldv).is_some() {
        println!("lifedom: cleaning up (xl-vtpm destroy {ldn})");
        println!("{}", ld.xlvtpm_destroy(cx, None).tail(3));
        for d in [ldn, ldv] {
            xen::destroy_if_running(cx, d);
        }
    }
    if let Some(w) = st.watch.take() {
        let _ = w.stop(cx, 10);
    }
    show_tail("watch.log", &xen::read_text(&st.wlog), 10);
}

fn create(cx: &Cx, st: &mut St, ld: &mut Ld, a: &mut Life) -> Outcome {
    let Names { g: ldn, v: ldv, cfg: ldcfg, .. } = ld.n;
    let mut e = Errs::default();
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    let rd = super::vtpmdom::RAMDISK;
    if !Path::new("/usr/bin/xl-vtpm").exists()
        || fs::metadata(rd).map(|m| m.len() == 0).unwrap_or(true)
    {
        return Outcome::fail(format!("xl-vtpm or the vTPM-domain image {rd} not built"));
    }
    if cx.past_deadline() {
        return Outcome::fail("scenario deadline reached");
    }
    super::vtpmdom::load_block_modules(cx, &mut e);
    if !e.is_empty() {
        return Outcome::fail(e.joined());
    }
    let watching = st.watch.as_mut().is_some_and(|w| w.up());
    if !watching {
        // the life-* phases stopped theirs (or did not run): one for these phases, its own log
        if st.mgr_dom.is_some() {
            super::drop_unregistered_vtpms(cx, "lifedom second pass");
        } else if st.life_mode == "0" {
            drop_standalone_vtpm(cx, st);
        }
        st.wlog = ld.n.wlog.into();
        match watch_start(cx, &st.wlog) {
            Ok(w) => {
                println!(
                    "xl-vtpm watch started for the lifedom phases (pid {}, {})",
                    w.pid(),
                    st.wlog
                );
                st.watch = Some(w);
            }
            Err(why) => return Outcome::fail(why),
        }
    }
    let t = xen::cfg_from(
        &xen::read_text(LCFG0),
        &[
            ("name = ", format!("name = \"{ldn}\"")),
            ("vtpm = ", format!("vtpm = [ \"backend={ldv}\" ]")),
        ],
    );
    let _ = fs::write(ldcfg, &t);
    xen::show_cfg(&format!("{ldn}.cfg"), &t, &["name", "uuid", "vtpm", "extra"]);
    ld.voff = lines_of(&xen::clog(ldv));
    let t0 = up();
    let tag = format!("{}-create", ld.n.t);
    a.create(cx, ldcfg, &tag);
    let create_s = secs1(t0, up());
    ld.uuid = a.uuid_now.clone();
    if a.lrc != 0 {
        e.add(format!(
            "xl-vtpm create exited {}: {}",
            a.lrc,
            tail_of(&format!("/tmp/xl-life-{tag}.out"))
        ));
    } else if ld.uuid.is_empty() || ld.uuid == "null" {
        ld.uuid.clear();
        e.add(format!("no vtpm_uuid for {ldn} in xl-vtpm list --json"));
    } else {
        ld.running(cx, "create", &mut e);
        super::mgr_link_if_mgrdom(&mut e, st, "lifedom-mgr-link-create", ldv, &ld.vdomid);
        ld.ino = disk_check(cx, &mut e, "lifedom-new-disk", &ld.uuid).map(|m| m.ino());
        let cfgt = xen::read_text(&ld.xlcfg());
        let key = format!("--uuid {} ", ld.uuid);
        let newtpm = cfgt
            .lines()
            .any(|l| l.find(&key).is_some_and(|i| l[i..].contains("--create")));
        e.check(
            "lifedom-new-tpm",
            newtpm,
            if newtpm {
                format!("first boot manufactures: {}", extra_of(&ld.xlcfg()))
            } else {
                format!("{}: {}", ld.xlcfg(), extra_line(&ld.xlcfg()))
            },
        );
        ld.show_vcon(6);
        let miss = a.guest(cx, &tag, "fresh");
        ld.ek = a.ek_now.clone();
        if !miss.is_empty() {
            e.add(format!("guest-checks-failed: {}", miss.join(" ")));
        }
    }
    println!(
        "PERF lifedom-create-s={create_s} (xl-vtpm create {ldn}.cfg: new vTPM identity, disk, vTPM domain boot + manufacture + ready, then xl create of the guest)"
    );
    // xl-vtpm's own choice of memory (no --memory: memory-mib beside the default ramdisk)
    let mem = xen::read_text(&ld.xlcfg())
        .lines()
        .find_map(|l| l.strip_prefix("memory = ").map(str::to_string))
        .unwrap_or_default();
    println!(
        "PERF lifedom-vtpmdom-mem-mib={mem} (the memory xl-vtpm create chose for {ldv}: its generated config)"
    );
    super::vtpmdom::ready_perf("lifedom", &ld.vcon());
    if !e.is_empty() {
        ld.diag(cx, st);
    }
    e.verdict(format!(
        "{ldn} with vTPM {} in its own domain {ldv} (domid {}, made in this create, {create_s} s); 0x81000010 + NV written{}",
        ld.uuid,
        ld.vdomid,
        super::mgr_said(st)
    ))
}

fn xl_destroy(cx: &Cx, st: &mut St, ld: &mut Ld) -> Outcome {
    let Names { g: ldn, v: ldv, .. } = ld.n;
    let mut e = Errs::default();
    ld.vdomid = xen::domid(ldv).unwrap_or_default();
    let gd = xen::domid(ldn).unwrap_or_default();
    println!("INFO lifedom timeline xl-destroy-start {}", wallt());
    let t0 = up();
    let vdomid = ld.vdomid.clone();
    let o = Cmd::new(&["xl", "destroy", ldn])
        .secs(60)
        .save(&format!("/tmp/xl-life-{}-xldestroy.out", ld.n.t))
        .run_watched(cx, Duration::from_secs(3), |ran| {
            // still waiting: libxl waits (10 s) for the backend domain to remove its backend directory
            let p = format!("/local/domain/{vdomid}/backend/vtpm/{gd}");
            let l = Cmd::new(&["xenstore-ls", "-f", &p])
                .run_for(Duration::from_secs(10))
                .all();
            show(
                &format!(
                    "xl destroy still running after {:.1} s: {ldv}'s backend",
                    ran.as_secs_f64()
                ),
                &l,
            );
        });
    let t1 = up();
    show("xl destroy", &o.all());
    if !o.ok() {
        e.add(format!("xl-destroy-rc={}", o.rc));
    }
    println!(
        "PERF lifedom-xl-destroy-ms={} (plain xl destroy {ldn}, a guest whose vTPM backend is the domain {ldv})",
        ms(t0, t1)
    );
    if o.all().contains(&format!(
        "timed out while waiting for /local/domain/{}/backend/vtpm/{gd}/0 to be removed",
        ld.vdomid
    )) {
        println!(
            "INFO lifedom xl-destroy-backend-timeout yes: libxl waited for {ldv} (domid {}) to remove its backend directory backend/vtpm/{gd}/0 and gave up (LIBXL_DESTROY_TIMEOUT); a driver domain removes it itself",
            ld.vdomid
        );
    }
    ld.stopped(cx, "xl-destroy", t1, &mut e);
    println!("INFO lifedom timeline vtpmdom-gone-seen {}", wallt());
    if let Some(g) = ld.gone_ms {
        println!(
            "PERF lifedom-destroy-to-vtpmdom-gone-ms={g} (xl destroy {ldn} returned -> {ldv} gone from xl list, through the watcher's xl shutdown; xl destroy took {} ms)",
            ms(t0, t1)
        );
        e.check(
            "lifedom-gone-in-time",
            g <= LD_GONE_LIMIT,
            format!("{g} ms (limit {LD_GONE_LIMIT})"),
        );
    }
    let said = format!("{ldn}: guest gone; vTPM {} stopped", ld.uuid);
    let wl = xen::read_text(&st.wlog);
    let line = wl
        .lines()
        .rfind(|l| l.contains(&format!("{ldn}: guest gone")))
        .unwrap_or("")
        .to_string();
    e.check(
        "lifedom-watcher-said",
        wl.contains(&said),
        if wl.contains(&said) {
            line
        } else {
            format!("no '{said}' in {}", st.wlog)
        },
    );
    show_tail("watch.log", &wl, 3);
    let c = ld.vcon();
    let v: Vec<&str> = c
        .lines()
        .filter(|l| l.starts_with("VTPMDOM-") || l.contains("signal") || l.contains("stopping"))
        .collect();
    super::show_last(&format!("{ldv} console"), &v, 4);
    if !e.is_empty() {
        ld.diag(cx, st);
    }
    let out = e.verdict(format!(
        "xl destroy {ldn}: the watcher shut {ldv} (domid {}) down cleanly {} ms later; loop device released, pair stopped",
        ld.vdomid,
        ld.gone_ms.map(|g| g.to_string()).unwrap_or_default()
    ));
    // leave nothing running for the recreate (no verdict)
    if xen::domid(ldv).is_some() {
        println!("lifedom: {ldv} still running; xl-vtpm destroy {ldn}");
        println!("{}", ld.xlvtpm_destroy(cx, None).tail(3));
    }
    out
}

fn recreate(cx: &Cx, st: &mut St, ld: &mut Ld, a: &mut Life) -> Outcome {
    let Names { g: ldn, v: ldv, cfg: ldcfg, .. } = ld.n;
    let mut e = Errs::default();
    let v0 = ld.vdomid.clone();
    xen::destroy_if_running(cx, ldn);
    ld.voff = lines_of(&xen::clog(ldv));
    let t0 = up();
    let tag = format!("{}-recreate", ld.n.t);
    a.create(cx, ldcfg, &tag);
    let recreate_s = secs1(t0, up());
    if a.lrc != 0 {
        e.add(format!(
            "xl-vtpm create exited {}: {}",
            a.lrc,
            tail_of(&format!("/tmp/xl-life-{tag}.out"))
        ));
    } else {
        let same = a.uuid_now == ld.uuid;
        e.check(
            "lifedom-same-vtpm",
            same,
            if same {
                ld.uuid.clone()
            } else {
                format!("now {}, first create {}", none(&a.uuid_now), ld.uuid)
            },
        );
        ld.running(cx, "recreate", &mut e);
        super::mgr_link_if_mgrdom(&mut e, st, "lifedom-mgr-link-recreate", ldv, &ld.vdomid);
        let newd = !ld.vdomid.is_empty() && ld.vdomid != v0;
        e.check(
            "lifedom-new-vtpm-domid",
            newd,
            if newd {
                format!("{ldv} domid {v0} -> {}", ld.vdomid)
            } else {
                format!("domid {}, before {v0}", none(&ld.vdomid))
            },
        );
        let cfg = ld.xlcfg();
        let ino = fs::metadata(ld.img()).ok().map(|m| m.ino());
        let ok = resumes_from_disk(&cfg) && ino.is_some() && ino == ld.ino;
        e.check(
            "lifedom-from-disk",
            ok,
            if ok {
                format!(
                    "booted from the kept disk (same image, inode {}, on {}), no --create: {}",
                    ino.unwrap_or(0),
                    vd_loop(&ld.uuid).join(" "),
                    extra_of(&cfg)
                )
            } else {
                format!(
                    "{cfg}: {}; image inode {:?}, first {:?}",
                    extra_line(&cfg),
                    ino,
                    ld.ino
                )
            },
        );
        ld.show_vcon(6);
        let miss = a.guest(cx, &tag, "kept");
        if !miss.is_empty() {
            e.add(format!("guest-checks-failed: {}", miss.join(" ")));
        }
        ek_stable(
            &mut e,
            "lifedom-ek-stable",
            "lifedom-ek-stable",
            "recreate",
            &ld.ek,
            &a.ek_now,
        );
    }
    println!(
        "PERF lifedom-recreate-s={recreate_s} (xl-vtpm create {ldn}.cfg again: vTPM domain boot from its disk + ready, then xl create of the guest)"
    );
    if !e.is_empty() {
        ld.diag(cx, st);
    }
    e.verdict(format!(
        "same vTPM {}, {ldv} booted from its kept disk (domid {v0} -> {}); 0x81000010 + NV kept, same EK{}",
        ld.uuid,
        ld.vdomid,
        super::mgr_said(st)
    ))
}

fn destroy(cx: &Cx, st: &mut St, ld: &mut Ld) -> Outcome {
    let Names { g: ldn, v: ldv, .. } = ld.n;
    let mut e = Errs::default();
    let (ok, rc) = registry_clean(
        cx,
        &format!("/tmp/lifedom-{}-check1.out", ld.n.t),
        &format!("registry check, {ldn} running"),
    );
    e.check(
        "lifedom-registry-running",
        ok,
        if ok {
            format!("no drift with {ldn} + {ldv} running")
        } else {
            format!("rc={rc}")
        },
    );
    ld.vdomid = xen::domid(ldv).unwrap_or_default();
    let t0 = up();
    let o = ld.xlvtpm_destroy(cx, Some(&format!("/tmp/xl-life-{}-destroy.out", ld.n.t)));
    let t1 = up();
    show_tail("xl-vtpm destroy", &o.all(), 10);
    e.check(
        "lifedom-destroy-exit",
        o.ok(),
        if o.ok() {
            format!("xl-vtpm destroy {ldn}: exit 0 in {} s", secs1(t0, t1))
        } else {
            format!("exit {}", o.rc)
        },
    );
    xen::gone_check(cx, &mut e, "lifedom-guest-gone", ldn, || {
        format!("{ldn} not in xl list")
    });
    ld.stopped(cx, "destroy", t1, &mut e);
    println!(
        "PERF lifedom-destroy-s={} (xl-vtpm destroy: xl destroy of the guest, xl shutdown of the vTPM domain, clean stop, loop device released)",
        secs1(t0, t1)
    );
    let (ok, rc) = registry_clean(
        cx,
        &format!("/tmp/lifedom-{}-check2.out", ld.n.t),
        "registry check, end",
    );
    e.check(
        "lifedom-registry-end",
        ok,
        if ok {
            "no drift after xl-vtpm destroy".to_string()
        } else {
            format!("rc={rc}")
        },
    );
    life_list(cx);
    if !e.is_empty() {
        ld.diag(cx, st);
    }
    e.verdict(format!(
        "xl-vtpm destroy {ldn}: guest and {ldv} gone (clean stop), loop device released, pair stopped; registry check clean"
    ))
}
