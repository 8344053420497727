//! vTPM domain: the vTPM as the only program of its own Xen domain.
//! `xl-vtpm vtpm create --domain` boots a PV domain whose /init is vtpm-domain
//! (/usr/lib/xvtpm/vtpmdom/initrd, built by scripts/build-vtpmdom.sh; the guests' kernel). It keeps its
//! sealed state on its own disk (/dev/xvda: a 4 MiB image on a dom0 loop device, blkback, our
//! /etc/xen/scripts/block), reaches vtpmmgr (serve --xen) over a tpmif device whose backend is dom0,
//! and serves its guest on its own backend/vtpm. One RESULT per step:
//!   vtpmdom-create   domain running, data/xvtpm/ready = its UUID, VTPMDOM-READY on its console;
//!                    PERF: create time, memory (xl list, and the domain's own meminfo/RSS line)
//!   vtpmdom-guest    guest-vdom with vtpm = [ "backend=vtpmdom-a,uuid=U" ]: the vtpm-guest checks
//!                    (stock xen-tpmfront), the deep quote verified in dom0 (right nonce 8, wrong 7); P5
//!   vtpmdom-reboot   the guest again: 0x81000010 + NV kept, PCR 16 reset, same EK
//!   vtpmdom-restart  `xl-vtpm vtpm stop` (clean stop: VTPMDOM-EXIT code=0, loop device released),
//!                    `xl-vtpm vtpm start` (new domain, resumes from its disk: no --create); guest
//!                    boot 3: 0x81000010 + NV kept, same EK -- the A/B store on a real xen-blkfront disk
//!   vtpmdom-destroy  xl destroy of the (held) guest, the vTPM domain survives it; `xl-vtpm vtpm destroy
//!                    --yes`: domain, manager identity, disk image and loop device gone
//!   vtpmdom-debian   a vTPM domain on Debian's kernel with its modules (128 MiB): ready, destroyed
//! With XVTPM_TESTBED_MGRDOM=1 the set runs a second time after `mgrdom-serve`, as
//! `vtpmdom-*@mgrdom`, with the manager in its own domain (`st.mgr_dom`; dom0 reaches it through
//! `vtpmmgr bridge`): the same checks, and where a check is about where the manager is it says so
//! (`vtpmdom-mgr-link*`: the manager link's backend is the manager domain; the deep quote is
//! verified with the group AK the manager domain gives; backends gone in dom0 and in the manager
//! domain; the manager's log from the manager domain's console).

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::{
    BOOT1_CHECKS, GuestBoot, REBOOT_CHECKS, St, capture_dq, deadline, ek_stable, none, secs1, up,
    verify_nonces_ak,
};
use crate::cmd::{Cmd, Output, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, console_from, jf, lines_of, vd_loop};

pub const VD: &str = "vtpmdom-a";
const VDG: &str = "guest-vdom";
const VDCFG: &str = "/etc/xen/guest-vdom.cfg";
pub const RAMDISK: &str = "/usr/lib/xvtpm/vtpmdom/initrd";
pub const KERNEL: &str = "/usr/lib/xvtpm/vtpmdom/vmlinuz";
/// The Debian kernel's vTPM-domain image, beside the own kernel's default one (build-images.sh).
const DEB_DIR: &str = "/usr/lib/xvtpm/vtpmdom-debian";
/// The vtpmdom-debian phase's domain.
const VDD: &str = "vtpmdom-deb";

/// PERF lines from the vTPM domain's `VTPMDOM-READY` line in `con`: MemTotal, MemAvailable,
/// vtpm-domain's RSS, and its kernel's uptime at readiness (boot to ready, inside the domain).
pub fn ready_perf(key: &str, con: &str) {
    let ml = con
        .lines()
        .find(|l| {
            (l.starts_with("VTPMDOM-READY ") || l.starts_with("VTPMDOM-MEM "))
                && l.contains("mem_total_kib=")
        })
        .unwrap_or("");
    let v = |k: &str| xen::token(ml, k).unwrap_or_default();
    println!(
        "PERF {key}-mem-total-kib={} {key}-mem-available-kib={} {key}-rss-kib={} (inside the vTPM domain when ready: MemTotal, MemAvailable, vtpm-domain VmRSS)",
        v("mem_total_kib"),
        v("mem_available_kib"),
        v("rss_kib")
    );
    println!(
        "PERF {key}-boot-to-ready-ms={} (the vTPM domain's kernel uptime when it was ready: kernel boot, initramfs, init, manager link, ready)",
        v("uptime_ms")
    );
}

/// PERF line: the sizes of a vTPM domain's initramfs (compressed, as loaded) and kernel file.
pub fn image_perf(key: &str, ramdisk: &str, kernel: &str) {
    let size = |p: &str| {
        fs::metadata(p)
            .map(|m| m.len().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    println!(
        "PERF {key}-initrd-bytes={} {key}-kernel-bytes={} ({ramdisk}, {kernel})",
        size(ramdisk),
        size(kernel)
    );
}

struct Vd {
    uuid: String,
    domid: String,
    off: usize,
    ek1: String,
}

fn vd_domid() -> Option<String> {
    xen::domid(VD)
}

fn vd_ready(u: &str) -> bool {
    vd_domid().is_some_and(|i| {
        xen::xs_read(&format!("/local/domain/{i}/data/xvtpm/ready")).as_deref() == Some(u)
    })
}

/// CHECK `name`: the vTPM domain is still there and ready (after what happened to its guest).
fn still_ready(e: &mut Errs, name: &str, u: &str, how: &str) {
    let rd = vd_ready(u);
    e.check(
        name,
        rd,
        if rd {
            format!("{VD} {how}")
        } else {
            format!(
                "{VD}: domid {}",
                vd_domid().unwrap_or_else(|| "none".into())
            )
        },
    );
}

/// CHECK `name`: `xl-vtpm vtpm show U --json` says the vTPM is in `state`.
fn show_state(cx: &Cx, e: &mut Errs, name: &str, u: &str, state: &str) {
    let row: String = Cmd::new(&["xl-vtpm", "vtpm", "show", u, "--json"])
        .secs(30)
        .split()
        .run(cx)
        .stdout
        .split_whitespace()
        .collect();
    let ok = row.contains(&format!("\"state\":\"{state}\""));
    e.check(
        name,
        ok,
        if ok {
            format!("xl-vtpm vtpm show: {state}")
        } else {
            format!("xl-vtpm vtpm show: {}", cut(&row, 300))
        },
    );
}

/// CHECK `name`: the vTPM's disk image is the new 4 MiB one, on a loop device; its metadata.
pub fn disk_check(cx: &Cx, e: &mut Errs, name: &str, u: &str) -> Option<fs::Metadata> {
    let img = format!("/var/lib/xvtpm/vtpms/{u}/disk.img");
    let meta = fs::metadata(&img).ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let lp = vd_loop(u);
    let ok = size == 4194304 && !lp.is_empty();
    e.check(
        name,
        ok,
        if ok {
            format!("{img} (4 MiB) on {}", lp.join(" "))
        } else {
            format!(
                "{img}: {size} bytes; loop: {}",
                Cmd::sh("losetup -a").run(cx).all().replace('\n', " ")
            )
        },
    );
    meta
}

/// The vTPM domain's xl config (written by xl-vtpm) boots it from its disk, not as a new TPM.
pub fn resumes_from_disk(cfg: &str) -> bool {
    let ct = xen::read_text(cfg);
    Path::new(cfg).is_file() && ct.contains("--state-block /dev/xvda") && !ct.contains("--create")
}

/// The vTPM domain's arguments in its xl config (what follows `-- ` on the `extra = ` line).
pub fn extra_of(cfg: &str) -> String {
    xen::read_text(cfg)
        .lines()
        .find(|l| l.starts_with("extra = "))
        .and_then(|l| l.split_once("-- ").map(|x| x.1.replace('"', "")))
        .unwrap_or_default()
}

/// The `extra` line of the vTPM domain's xl config (a failed check's detail).
pub fn extra_line(cfg: &str) -> String {
    xen::read_text(cfg)
        .lines()
        .find(|l| l.starts_with("extra"))
        .unwrap_or("")
        .to_string()
}

/// What xl, the block script and the manager (dom0's, or the manager domain's) said about the
/// vTPM domain NAME.
pub fn domain_logs(name: &str, xl_lines: usize, st: &St) {
    show_tail(
        &format!("xl-{name}.log"),
        &xen::read_text(&format!("/var/log/xen/xl-{name}.log")),
        xl_lines,
    );
    show_tail(
        "xen-hotplug.log",
        &xen::read_text("/var/log/xen/xen-hotplug.log"),
        10,
    );
    st.show_mgr_log(15);
}

/// The console lines matching `f`, last `n`, prefixed.
fn show_con(text: &str, prefix: &str, n: usize, f: impl Fn(&str) -> bool) {
    let v: Vec<&str> = text.lines().filter(|l| f(l)).collect();
    super::show_last(prefix, &v, n);
}

pub fn backends_of(domid: &str) -> Vec<String> {
    xen::xs_ls("/local/domain/0/backend")
        .into_iter()
        .filter(|l| {
            l.contains(&format!("/backend/vbd/{domid}/"))
                || l.contains(&format!("/backend/vtpm/{domid}/"))
        })
        .collect()
}

pub fn dom0_backends() -> Vec<String> {
    xen::xs_ls("/local/domain/0/backend")
        .into_iter()
        .filter(|l| l.contains("/backend/vbd/") || l.contains("/backend/vtpm/"))
        .collect()
}

/// The domain's own xenstore (data, device, backend, control).
pub fn dom_xs(domid: &str, keys: &[&str]) -> Vec<String> {
    xen::xs_ls(&format!("/local/domain/{domid}"))
        .into_iter()
        .filter(|l| keys.iter().any(|k| l.contains(&format!("/{domid}/{k}/"))))
        .collect()
}

fn print_lines(prefix: &str, v: &[String], n: usize) {
    for l in v.iter().take(n) {
        println!("[{prefix}] {l}");
    }
}

impl Vd {
    fn con(&self) -> String {
        console_from(VD, self.off)
    }
    /// What the vTPM domain, xenstore, xl, the block script and the manager said.
    fn diag(&self, st: &St) {
        show_tail(&format!("{VD} console"), &self.con(), 40);
        if let Some(i) = vd_domid() {
            print_lines(
                &format!("{VD} xenstore"),
                &dom_xs(&i, &["data", "device", "backend"]),
                60,
            );
        }
        print_lines("dom0 backend", &dom0_backends(), 60);
        super::show_mgr_backends(st, 40);
        domain_logs(VD, 25, st);
    }
    /// A snapshot while xl-vtpm waits (it destroys a domain that does not become ready).
    fn snap(&self, why: &str) {
        let Some(i) = vd_domid() else {
            println!("vtpmdom snapshot ({why}): no {VD} domain");
            return;
        };
        let l = Cmd::new(&["xl", "list", &i])
            .run_for(Duration::from_secs(20))
            .stdout;
        let st = l
            .lines()
            .nth(1)
            .map(|r| {
                let f: Vec<&str> = r.split_whitespace().collect();
                format!(
                    "state {}, cpu {} s",
                    f.get(4).unwrap_or(&""),
                    f.get(5).unwrap_or(&"")
                )
            })
            .unwrap_or_default();
        println!("vtpmdom snapshot ({why}): domid {i}, {st}");
        print_lines(
            &format!("{VD} xenstore"),
            &dom_xs(&i, &["data", "device", "backend", "control"]),
            60,
        );
        print_lines("dom0 backend", &backends_of(&i), 40);
        show_tail(&format!("{VD} console"), &self.con(), 20);
    }
}

/// `xl-vtpm ARGS` with a snapshot of the vTPM domain if it still waits after 40 s.
fn xlvtpm_snap(cx: &Cx, vd: &Vd, args: &[&str], secs: u64, out: &str, err: Option<&str>) -> Output {
    let mut argv = vec!["xl-vtpm"];
    argv.extend_from_slice(args);
    let c = Cmd::new(&argv).env("NO_COLOR", "1").secs(secs);
    let c = match err {
        Some(e) => c.save_split(out, e),
        None => c.save(out),
    };
    let what = format!(
        "xl-vtpm {out} {} still waiting after 40 s",
        err.unwrap_or(out)
    );
    c.run_watched(cx, Duration::from_secs(40), |_| vd.snap(&what))
}

/// The phases of this set, in order (mgrdom.rs skips them by name when their second pass cannot run).
pub const PHASES: [&str; 6] = [
    "vtpmdom-create",
    "vtpmdom-guest",
    "vtpmdom-reboot",
    "vtpmdom-restart",
    "vtpmdom-destroy",
    "vtpmdom-debian",
];

pub fn run(r: &mut Runner, st: &mut St) {
    if st.vtpmdom_mode == "0" {
        r.skip_all(&PHASES, "disabled (XVTPM_TESTBED_VTPMDOM=0)");
        return;
    }
    let mem = xen::testbed_env("vtpmdom_mem").unwrap_or_else(|| "128".into());
    let mut vd = Vd {
        uuid: String::new(),
        domid: String::new(),
        off: 0,
        ek1: String::new(),
    };

    r.phase("vtpmdom-create", deadline(300), |cx| {
        create(cx, st, &mut vd, &mem)
    });

    let no_domain = vd.domid.is_empty();
    r.phase_if(
        "vtpmdom-guest",
        no_domain.then_some("no vTPM domain (vtpmdom-create failed)"),
        deadline(620),
        |cx| guest1(cx, st, &mut vd),
    );

    let no_boot = vd.domid.is_empty() || vd.ek1.is_empty();
    r.phase_if(
        "vtpmdom-reboot",
        no_boot.then_some("no vTPM domain or no first boot (vtpmdom-create/-guest failed)"),
        deadline(450),
        |cx| {
            let mut e = Errs::default();
            boot(cx, &mut vd, 2, "", &mut e);
            xen::poweroff_or_destroy(cx, VDG, &mut e);
            if !vd_ready(&vd.uuid) {
                e.add("vtpm-domain-not-ready-after-boot-2");
            }
            if !e.is_empty() {
                vd.diag(st);
            }
            keep_log(2);
            e.verdict(format!(
                "boot 2: 0x81000010 + NV index kept, PCR16 reset, same EK (domain {VD}, domid {})",
                vd.domid
            ))
        },
    );

    let no_boot = vd.domid.is_empty() || vd.ek1.is_empty();
    r.phase_if(
        "vtpmdom-restart",
        no_boot.then_some("no vTPM domain or no first boot"),
        deadline(900),
        |cx| restart(cx, st, &mut vd),
    );

    if vd.uuid.is_empty() {
        r.skip("vtpmdom-destroy", "no vTPM (vtpmdom-create failed)");
    } else {
        r.phase("vtpmdom-destroy", deadline(360), |cx| {
            destroy(cx, st, &mut vd)
        });
    }
    let deb_missing = !Path::new(&format!("{DEB_DIR}/initrd")).is_file();
    r.phase_if(
        "vtpmdom-debian",
        deb_missing.then_some(
            "no second image: the vTPM domains boot Debian's kernel already (XVTPM_TESTBED_VTPMDOM_KERNEL=debian)",
        ),
        deadline(300),
        |cx| debian(cx, st),
    );
    // diagnosis (XVTPM_TESTBED_VTPMDOM_PROBE="24 16"): the default image at smaller memory, INFO only
    let probe = xen::testbed_env("vtpmdom_probe").unwrap_or_default();
    if !probe.trim().is_empty() && st.mgr_ready() {
        for m in probe.split_whitespace() {
            probe_mem(&r.cx, m);
        }
    }
    // nothing of it may outlive the section (teardown checks that no domU is left)
    let cx = &r.cx;
    xen::destroy_if_running(cx, VDD);
    xen::destroy_if_running(cx, VDG);
    if xen::domid(VD).is_some() && !vd.uuid.is_empty() {
        println!("vtpmdom: cleaning up {VD}");
        let o = Cmd::new(&["xl-vtpm", "vtpm", "destroy", &vd.uuid, "--yes"])
            .env("NO_COLOR", "1")
            .secs(150)
            .run(cx);
        println!("{}", o.tail(3));
    }
    xen::destroy_if_running(cx, VD);
    st.vdu = vd.uuid.clone();
}

/// vtpmdom-debian: a vTPM domain on Debian's kernel (with its modules) at its memory (128 MiB),
/// beside the default domains on the project's own kernel: it boots and becomes ready, its
/// memory and boot figures, and `xl-vtpm vtpm destroy` takes it down again.
fn debian(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    let (kernel, ramdisk) = (format!("{DEB_DIR}/vmlinuz"), format!("{DEB_DIR}/initrd"));
    let mem = xen::read_text(&format!("{DEB_DIR}/memory-mib"))
        .trim()
        .to_string();
    let mem = if mem.is_empty() {
        "128".to_string()
    } else {
        mem
    };
    let off = lines_of(&xen::clog(VDD));
    let t0 = up();
    let o = Cmd::new(&[
        "xl-vtpm",
        "vtpm",
        "create",
        "--domain",
        VDD,
        "--kernel",
        &kernel,
        "--ramdisk",
        &ramdisk,
        "--memory",
        &mem,
        "--ek",
        "ecc",
        "--json",
    ])
    .env("NO_COLOR", "1")
    .secs(200)
    .save_split(
        "/tmp/vtpmdom-deb-create.json",
        "/tmp/vtpmdom-deb-create.err",
    )
    .run(cx);
    let create_s = secs1(t0, up());
    show_tail("vtpm create --domain (Debian kernel)", &o.all(), 20);
    let j = xen::parse_json(&o.stdout).unwrap_or(serde_json::Value::Null);
    let (u, d) = (jf(&j, "uuid"), jf(&j, "domid"));
    let con = console_from(VDD, off);
    if o.rc != 0 || u.is_empty() {
        e.add(format!(
            "xl-vtpm vtpm create --domain {VDD} exited {}",
            o.rc
        ));
    } else {
        let rd = xen::domid(VDD).is_some_and(|i| {
            xen::xs_read(&format!("/local/domain/{i}/data/xvtpm/ready")).as_deref()
                == Some(u.as_str())
        });
        e.check(
            "vtpmdom-debian-ready",
            rd,
            if rd {
                format!("{VDD} (domid {d}, {mem} MiB, Debian kernel) ready")
            } else {
                format!("{VDD}: not ready (domid {})", none(&d))
            },
        );
        let cr = con
            .lines()
            .any(|l| l.starts_with(&format!("VTPMDOM-READY uuid={u}")));
        e.check(
            "vtpmdom-debian-console-ready",
            cr,
            if cr {
                "VTPMDOM-READY on its console".to_string()
            } else {
                format!("no 'VTPMDOM-READY uuid={u}' on its console")
            },
        );
        if rd && let Some(i) = xen::domid(VDD) {
            super::mgr_link_if_mgrdom(&mut e, st, "vtpmdom-debian-mgr-link", VDD, &i);
        }
        let mods = con
            .lines()
            .find(|l| l.starts_with("VTPMDOM-INIT vtpm-domain"))
            .unwrap_or("");
        println!("INFO vtpmdom-debian init: {mods}");
    }
    println!(
        "PERF vtpmdom-debian-create-s={create_s} (the same steps as vtpmdom-create-s, Debian kernel, {mem} MiB)"
    );
    println!("PERF vtpmdom-debian-mem-mib={mem}");
    ready_perf("vtpmdom-debian", &con);
    image_perf("vtpmdom-debian", &ramdisk, "/guest/vmlinux");
    if !u.is_empty() {
        let t1 = up();
        let o = Cmd::new(&["xl-vtpm", "vtpm", "destroy", &u, "--yes"])
            .env("NO_COLOR", "1")
            .secs(150)
            .run(cx);
        if !o.ok() {
            e.add(format!("vtpm-destroy-exit-{}", o.rc));
            show_tail("vtpm destroy", &o.all(), 10);
        }
        xen::gone_check(cx, &mut e, "vtpmdom-debian-gone", VDD, || {
            format!(
                "{VDD} not in xl list {} s after xl-vtpm vtpm destroy",
                secs1(t1, up())
            )
        });
    }
    if !e.is_empty() {
        show_tail(&format!("{VDD} console"), &con, 40);
        domain_logs(VDD, 25, st);
    }
    e.verdict(format!(
        "vTPM domain on Debian's kernel with modules at {mem} MiB: ready in {create_s} s, destroyed"
    ))
}

/// A vTPM domain of the default image at `mem` MiB: ready or not, its figures (INFO, no verdict).
fn probe_mem(cx: &Cx, mem: &str) {
    let name = format!("vtpmdom-p{mem}");
    let off = lines_of(&xen::clog(&name));
    let t0 = up();
    let o = Cmd::new(&[
        "xl-vtpm", "vtpm", "create", "--domain", &name, "--memory", mem, "--ek", "ecc", "--wait",
        "90", "--json",
    ])
    .env("NO_COLOR", "1")
    .secs(150)
    .save_split(&format!("/tmp/{name}.json"), &format!("/tmp/{name}.err"))
    .run(cx);
    let con = console_from(&name, off);
    let u = xen::parse_json(&o.stdout)
        .map(|j| jf(&j, "uuid"))
        .unwrap_or_default();
    println!(
        "INFO vtpmdom probe {mem} MiB: xl-vtpm exit {} after {} s, ready={}",
        o.rc,
        secs1(t0, up()),
        con.lines().any(|l| l.starts_with("VTPMDOM-READY"))
    );
    ready_perf(&format!("vtpmdom-probe{mem}"), &con);
    show_con(&con, &format!("{name} console"), 12, |l| {
        l.starts_with("VTPMDOM-")
            || [
                "error",
                "panic",
                "Kernel",
                "Out of memory",
                "oom",
                "Initramfs",
            ]
            .iter()
            .any(|k| l.contains(k))
    });
    if o.rc != 0 {
        show_tail(&format!("{name} xl-vtpm"), &o.all(), 8);
    }
    let id = if u.is_empty() {
        // a failed create leaves the identity: find it by the domain name
        xen::read_text(&format!("/tmp/{name}.err"))
            .split_whitespace()
            .find(|w| w.len() == 36 && w.matches('-').count() == 4)
            .unwrap_or("")
            .to_string()
    } else {
        u
    };
    if !id.is_empty() {
        let _ = Cmd::new(&["xl-vtpm", "vtpm", "destroy", &id, "--yes"])
            .env("NO_COLOR", "1")
            .secs(120)
            .run(cx);
    }
    xen::destroy_if_running(cx, &name);
}

pub fn load_block_modules(cx: &Cx, e: &mut Errs) {
    for m in ["loop", "xen-blkback"] {
        if !xen::modload(m) {
            e.add(format!("insmod-{m}"));
        }
    }
    if !cx.wait_until(10, || Path::new("/dev/loop-control").exists()) {
        e.add("no-/dev/loop-control");
    }
}

fn create(cx: &Cx, st: &mut St, vd: &mut Vd, mem: &str) -> Outcome {
    let mut e = Errs::default();
    if !st.mgr_ready() {
        return Outcome::fail("needs a provisioned vtpmmgr (mgr phases)");
    }
    if fs::metadata(RAMDISK).map(|m| m.len() == 0).unwrap_or(true) {
        return Outcome::fail(format!(
            "no vTPM-domain image {RAMDISK} (vtpm-domain not built at image build)"
        ));
    }
    if cx.past_deadline() {
        return Outcome::fail("scenario deadline reached");
    }
    load_block_modules(cx, &mut e);
    if !e.is_empty() {
        return Outcome::fail(e.joined());
    }
    vd.off = lines_of(&xen::clog(VD));
    let t0 = up();
    let o = xlvtpm_snap(
        cx,
        vd,
        &[
            "vtpm", "create", "--domain", VD, "--memory", mem, "--ek", "ecc", "--json",
        ],
        200,
        "/tmp/vtpmdom-create.json",
        Some("/tmp/vtpmdom-create.err"),
    );
    let create_s = secs1(t0, up());
    println!(
        "xl-vtpm vtpm create --domain {VD}: rc={} in {create_s} s",
        o.rc
    );
    show_tail("vtpm create --domain", &o.all(), 40);
    let j = xen::parse_json(&o.stdout).unwrap_or(serde_json::Value::Null);
    vd.uuid = jf(&j, "uuid");
    vd.domid = jf(&j, "domid");
    if vd.domid == "null" {
        vd.domid.clear();
    }
    if o.rc != 0 {
        e.add(format!("xl-vtpm vtpm create --domain exited {}", o.rc));
    } else if vd.uuid.is_empty() || vd.domid.is_empty() {
        e.add("no uuid/domid in the --json output");
    } else {
        let cur = vd_domid();
        e.check(
            "vtpmdom-running",
            cur.as_deref() == Some(vd.domid.as_str()),
            if cur.as_deref() == Some(vd.domid.as_str()) {
                format!("{VD} is domid {}", vd.domid)
            } else {
                format!(
                    "xl domid {VD}: {}, json said {}",
                    cur.unwrap_or_else(|| "none".into()),
                    vd.domid
                )
            },
        );
        let rd = vd_ready(&vd.uuid);
        e.check(
            "vtpmdom-xs-ready",
            rd,
            if rd {
                format!("/local/domain/{}/data/xvtpm/ready = {}", vd.domid, vd.uuid)
            } else {
                format!(
                    "data/xvtpm/ready = '{}'",
                    xen::xs_read(&format!("/local/domain/{}/data/xvtpm/ready", vd.domid))
                        .unwrap_or_default()
                )
            },
        );
        let cr = vd
            .con()
            .lines()
            .any(|l| l.starts_with(&format!("VTPMDOM-READY uuid={}", vd.uuid)));
        e.check(
            "vtpmdom-console-ready",
            cr,
            if cr {
                "VTPMDOM-READY on its console".to_string()
            } else {
                format!("no 'VTPMDOM-READY uuid={}' on the console", vd.uuid)
            },
        );
        show_state(cx, &mut e, "vtpmdom-show-running", &vd.uuid, "running");
        super::mgr_link_if_mgrdom(&mut e, st, "vtpmdom-mgr-link", VD, &vd.domid);
        disk_check(cx, &mut e, "vtpmdom-disk", &vd.uuid);
        show(
            &format!("xl block-list {VD}"),
            &Cmd::new(&["xl", "block-list", VD]).run(cx).all(),
        );
    }
    show_con(&vd.con(), &format!("{VD} console"), 12, |l| {
        l.starts_with("VTPMDOM-") || ["error", "panic", "Oops"].iter().any(|k| l.contains(k))
    });
    println!(
        "PERF vtpmdom-create-s={create_s} (xl-vtpm vtpm create --domain: loop device, xl create -p, manager attach, vtpm-attach, unpause, boot + manufacture, ready)"
    );
    if !vd.domid.is_empty() {
        let l = Cmd::new(&["xl", "list", VD]).run(cx).stdout;
        let m = l
            .lines()
            .nth(1)
            .and_then(|r| r.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string();
        println!("PERF vtpmdom-xl-mem-mib={m} (xl list; configured {mem} MiB)");
        // vtpm-domain's own line when it serves (VTPMDOM-READY, or a separate VTPMDOM-MEM)
        let c = vd.con();
        ready_perf("vtpmdom", &c);
        image_perf("vtpmdom", RAMDISK, KERNEL);
        if let Some(t) = c
            .lines()
            .find_map(|l| l.strip_prefix("VTPMDOM-INIT devices present after "))
        {
            let t = t.split_whitespace().next().unwrap_or("");
            println!(
                "INFO vtpmdom devices-present-after-ms={t} (modules loaded -> /dev/xen/* and /dev/xvda there)"
            );
        }
    }
    if !e.is_empty() {
        vd.diag(st);
    }
    if e.is_empty() {
        Outcome::pass(format!(
            "vTPM {} in domain {VD} (domid {}), ready in {create_s} s; state on /dev/xvda{}",
            vd.uuid,
            vd.domid,
            super::mgr_said(st)
        ))
    } else {
        // the next steps need a ready vTPM domain
        if !vd_ready(&vd.uuid) {
            vd.domid.clear();
        }
        Outcome::fail(e.joined())
    }
}

pub fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Boot N of guest-vdom, its vTPM served by the vTPM domain (`extra` on its kernel command line);
/// appends to `e`. Boot 1 records the EK, a later boot checks it is the same. The console log is
/// kept as guest-guest-vdom-bootN.log by `keep_log`.
fn boot(cx: &Cx, vd: &mut Vd, n: u32, extra: &str, e: &mut Errs) {
    let extra = format!("boot={n} {extra}");
    let p5 = if n == 1 {
        "p5-vtpmdom-ms".to_string()
    } else {
        format!("p5-vtpmdom-boot{n}-ms")
    };
    let b = GuestBoot {
        name: VDG,
        cfg: VDCFG,
        subst: vec![("@UUID@", &vd.uuid), ("@BACKEND@", VD), ("@EXTRA@", &extra)],
        n,
        checks: if n == 1 {
            &BOOT1_CHECKS
        } else {
            &REBOOT_CHECKS
        },
        wait: 240,
        p5: &p5,
        show: 20,
    }
    .run(cx, e);
    if n == 1 {
        vd.ek1 = b.ek;
    } else {
        ek_stable(
            e,
            "vtpmdom-ek-stable",
            "ek-changed",
            &format!("boot {n}"),
            &vd.ek1,
            &b.ek,
        );
    }
}

/// Keeps boot N's console (a second pass's under its suffix: guest-guest-vdom-bootN@mgrdom.log).
fn keep_log(n: u32) {
    let _ = fs::rename(
        xen::clog(VDG),
        format!(
            "/var/log/xen/console/guest-{VDG}-boot{n}{}.log",
            crate::runner::suffix()
        ),
    );
}

fn guest1(cx: &Cx, st: &mut St, vd: &mut Vd) -> Outcome {
    let mut e = Errs::default();
    let nonce = xen::nonce(32);
    boot(cx, vd, 1, &format!("dq_nonce={nonce}"), &mut e);
    match capture_dq(VDG, "/tmp/vdq.bin") {
        Ok(_) => match group_ak(cx, st) {
            Ok(ak) => {
                let (rc_ok, rc_bad) =
                    verify_nonces_ak(cx, "/tmp/vdq.bin", &nonce, &vd.uuid, &ak, "/tmp/vdverify");
                e.check(
                    "vtpmdom-verify-right-nonce",
                    rc_ok == 8,
                    format!(
                        "exit={rc_ok} (want 8: verified, host state not checked){}",
                        if st.mgr_dom.is_some() {
                            format!("; with the group AK of {} ({ak}, fetched through the bridge)", st.mgr_where())
                        } else {
                            String::new()
                        }
                    ),
                );
                e.check(
                    "vtpmdom-verify-wrong-nonce",
                    rc_bad == 7,
                    format!("exit={rc_bad} (want 7)"),
                );
            }
            Err(t) => e.add(format!("no-group-ak({t})")),
        },
        Err(x) => e.add(x),
    }
    xen::poweroff_or_destroy(cx, VDG, &mut e);
    still_ready(
        &mut e,
        "vtpmdom-survives-guest",
        &vd.uuid,
        "still running and ready after the guest powered off",
    );
    if !e.is_empty() {
        vd.diag(st);
    }
    keep_log(1);
    e.verdict(format!(
        "boot 1: all guest checks on /dev/tpm0 served by domain {VD}; deep quote verified in dom0 (right nonce 8 = host unchecked, wrong 7){}",
        super::mgr_said(st)
    ))
}

/// The group AK the deep quotes are verified with, in a file: dom0's manager's (`/tmp/ak.bin`,
/// as the other phases use it), or in the second pass the manager domain's, fetched anew through
/// the bridge (`/tmp/ak-mgrdom.bin`).
pub fn group_ak(cx: &Cx, st: &St) -> Result<String, String> {
    if st.mgr_dom.is_none() {
        return super::vtpm::group_ak(cx).map(|()| "/tmp/ak.bin".to_string());
    }
    let ak = "/tmp/ak-mgrdom.bin";
    let _ = fs::remove_file(ak);
    let o = Cmd::new(&["xl-vtpm", "mgr", "group", "ak", "default", "--out", ak])
        .env("NO_COLOR", "1")
        .secs(60)
        .save("/tmp/ak-mgrdom.out")
        .run(cx);
    if o.ok() && fs::metadata(ak).is_ok_and(|m| m.len() > 0) {
        Ok(ak.into())
    } else {
        Err(o.tail1(3))
    }
}


fn restart(cx: &Cx, st: &mut St, vd: &mut Vd) -> Outcome {
    let mut e = Errs::default();
    let d0 = vd.domid.clone();
    let t0 = up();
    // xl-vtpm stop: xl shutdown (run in the background), up to 20 s for the clean stop, then xl destroy
    let u = vd.uuid.clone();
    let o = xlvtpm_snap(
        cx,
        vd,
        &["vtpm", "stop", &u],
        150,
        "/tmp/vtpmdom-stop.out",
        None,
    );
    let stop_s = secs1(t0, up());
    show_tail("vtpm stop", &o.all(), 10);
    if !o.ok() {
        e.add(format!("vtpm-stop-exit-{}", o.rc));
    }
    xen::gone_check(cx, &mut e, "vtpmdom-stopped", VD, || {
        format!("domain {VD} (domid {d0}) gone {stop_s} s after xl-vtpm vtpm stop")
    });
    let c = vd.con();
    show_con(&c, &format!("{VD} console"), 5, |l| {
        l.starts_with("VTPMDOM-EXIT")
            || ["signal", "stopping", "shut"].iter().any(|k| l.contains(k))
    });
    let clean = c.lines().any(|l| l.starts_with("VTPMDOM-EXIT code=0"));
    e.check(
        "vtpmdom-clean-stop",
        clean,
        if clean {
            "VTPMDOM-EXIT code=0 (xl shutdown -> SIGTERM -> clean stop)".to_string()
        } else {
            format!(
                "no 'VTPMDOM-EXIT code=0' on the console: {}",
                c.lines()
                    .rfind(|l| l.starts_with("VTPMDOM-EXIT"))
                    .unwrap_or("")
            )
        },
    );
    let lp = vd_loop(&vd.uuid);
    e.check(
        "vtpmdom-loop-released",
        lp.is_empty(),
        if lp.is_empty() {
            "no loop device on the disk image".into()
        } else {
            lp.join(" ")
        },
    );
    show_state(cx, &mut e, "vtpmdom-show-stopped", &vd.uuid, "stopped");
    println!(
        "PERF vtpmdom-stop-s={stop_s} (xl-vtpm vtpm stop: xl shutdown, clean stop, domain gone, loop device released)"
    );
    vd.off = lines_of(&xen::clog(VD));
    let t0 = up();
    let o = xlvtpm_snap(
        cx,
        vd,
        &["vtpm", "start", &u, "--json"],
        200,
        "/tmp/vtpmdom-start.json",
        Some("/tmp/vtpmdom-start.err"),
    );
    let start_s = secs1(t0, up());
    show_tail("vtpm start", &o.all(), 20);
    vd.domid = xen::parse_json(&o.stdout)
        .map(|j| jf(&j, "domid"))
        .unwrap_or_default();
    if vd.domid == "null" {
        vd.domid.clear();
    }
    if o.rc != 0 {
        e.add(format!("vtpm-start-exit-{}", o.rc));
        vd.domid = vd_domid().unwrap_or_default();
    } else {
        let cur = vd_domid();
        let ok =
            !vd.domid.is_empty() && vd.domid != d0 && cur.as_deref() == Some(vd.domid.as_str());
        e.check(
            "vtpmdom-new-domain",
            ok,
            if ok {
                format!("domid {d0} -> {}", vd.domid)
            } else {
                format!(
                    "json domid {}, xl domid {}, before {d0}",
                    none(&vd.domid),
                    cur.unwrap_or_else(|| "none".into())
                )
            },
        );
        let rd = vd_ready(&vd.uuid);
        e.check(
            "vtpmdom-xs-ready",
            rd,
            if rd {
                format!("data/xvtpm/ready = {}", vd.uuid)
            } else {
                "not ready".into()
            },
        );
        super::mgr_link_if_mgrdom(&mut e, st, "vtpmdom-mgr-link-restart", VD, &vd.domid);
        let cfg = format!("/run/xvtpm/vtpms/{}.xl.cfg", vd.uuid);
        let resumed = resumes_from_disk(&cfg);
        e.check(
            "vtpmdom-resumed",
            resumed,
            if resumed {
                format!("booted without --create: {}", extra_of(&cfg))
            } else {
                format!("{cfg}: {}", extra_line(&cfg))
            },
        );
    }
    show_con(&vd.con(), &format!("{VD} console, boot 2"), 8, |l| {
        l.starts_with("VTPMDOM-") || l.contains("error") || l.contains("panic")
    });
    println!(
        "PERF vtpmdom-start-s={start_s} (xl-vtpm vtpm start: boot from the disk, resume, ready)"
    );
    ready_perf("vtpmdom-start", &vd.con());
    if vd_ready(&vd.uuid) {
        boot(cx, vd, 3, "hold=1", &mut e);
    } else {
        e.add("no-ready-vtpm-domain-for-boot-3");
    }
    if !e.is_empty() {
        vd.diag(st);
    }
    e.verdict(format!(
        "vTPM domain stopped cleanly and booted again from its disk (domid {d0} -> {}); boot 3: 0x81000010 + NV kept, same EK",
        vd.domid
    ))
}

fn destroy(cx: &Cx, st: &mut St, vd: &mut Vd) -> Outcome {
    let mut e = Errs::default();
    if xen::domid(VDG).is_some() {
        xen::destroy_and_wait(cx, VDG, &mut e);
        std::thread::sleep(crate::s(1));
        still_ready(
            &mut e,
            "vtpmdom-survives-destroy",
            &vd.uuid,
            &format!("still ready after xl destroy {VDG}"),
        );
    }
    keep_log(3);
    let d = vd_domid();
    let t0 = up();
    let u = vd.uuid.clone();
    let o = xlvtpm_snap(
        cx,
        vd,
        &["vtpm", "destroy", &u, "--yes"],
        150,
        "/tmp/vtpmdom-destroy.out",
        None,
    );
    show_tail("vtpm destroy", &o.all(), 10);
    if !o.ok() {
        e.add(format!("vtpm-destroy-exit-{}", o.rc));
    }
    xen::gone_check(cx, &mut e, "vtpmdom-domain-gone", VD, || {
        format!(
            "{VD} not in xl list {} s after xl-vtpm vtpm destroy",
            secs1(t0, up())
        )
    });
    println!("PERF vtpmdom-destroy-s={}", secs1(t0, up()));
    let l = Cmd::sh("xl-vtpm mgr vtpm list")
        .secs(30)
        .save("/tmp/vtpmdom-mgr-list.out")
        .run(cx);
    let listed = l.all().to_lowercase().contains(&u.to_lowercase());
    e.check(
        "vtpmdom-identity-gone",
        !listed,
        if listed {
            format!("the manager still lists {u}")
        } else {
            "not in xl-vtpm mgr vtpm list".into()
        },
    );
    let dir = format!("/var/lib/xvtpm/vtpms/{u}");
    let lp = vd_loop(&u);
    let ok = !Path::new(&dir).exists() && lp.is_empty();
    e.check(
        "vtpmdom-disk-gone",
        ok,
        if ok {
            format!("no {dir}, no loop device")
        } else {
            format!(
                "{} {}",
                Cmd::new(&["ls", "-l", &dir])
                    .run(cx)
                    .all()
                    .replace('\n', " "),
                lp.join(" ")
            )
        },
    );
    if let Some(d) = d {
        let left: Vec<String> = super::backends_left(st, &d).into_iter().take(3).collect();
        e.check(
            "vtpmdom-backends-gone",
            left.is_empty(),
            if left.is_empty() {
                format!("{} of domid {d} left", super::backends_where(st))
            } else {
                left.join(" ")
            },
        );
    }
    if !e.is_empty() {
        vd.diag(st);
    }
    e.verdict("guest destroyed (vTPM domain survived); xl-vtpm vtpm destroy: domain, identity, disk and loop device gone")
}
