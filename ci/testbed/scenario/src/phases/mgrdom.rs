//! The manager domain (XVTPM_TESTBED_MGRDOM=1, off by default; runs last, after teardown, as it
//! takes the physical TPM away from dom0): vtpmmgr in its own PV domain that owns the TPM through
//! `iomem = [ "fed40,5" ]` (the TIS MMIO, 5 pages at 0xFED40000). docs/manager-domain.md.
//!   mgrdom-unbind   dom0 reads PCR 0-7 and the EK certificates, then unbinds its tpm_tis from the
//!                   device: /dev/tpm0 and /dev/tpmrm0 gone
//!   mgrdom-control  the same domain without `iomem`: it must not reach the TPM (the grant is what
//!                   makes passthrough work); without HAP, a PVH domain is refused (INFO)
//!   mgrdom-pv       the domain with `iomem` and a fresh state disk (ext2 image on a dom0 loop
//!                   device, /dev/xvda): its tpm_tis drives the TPM, the same PCRs and EK
//!                   certificates as dom0 read, vtpmmgr provisioned there, state on the disk
//!   mgrdom-restart  the domain again from the same disk: vtpmmgr finds its state (provisioned
//!                   without provisioning), the same group AK
//!   mgrdom-serve    the domain SERVES (boot=serve: `vtpmmgr serve --xen --admin-xen`), dom0 still
//!                   without a TPM: `vtpmmgr bridge --domain mgrdom` in dom0 carries the admin CLI
//!                   to it (status: xen_domain = its domid, the same group AK); a vTPM domain whose
//!                   manager link's backend is the manager domain serves a guest (tpm2-tools
//!                   checks, NV index, persistent key, deep quote verified in dom0); then vTPM
//!                   domain and manager domain stopped cleanly, the manager domain started again
//!                   (new domid, the bridge follows it), the vTPM domain booted from its disk (its
//!                   key unsealed by the new manager domain): same EK, key and NV kept, a deep
//!                   quote verified again; its vTPM destroyed. The manager domain and the bridge
//!                   stay for:
//!   (second pass)   the vtpmdom-*, lifedom-*, then vtpm-* and life-* phases again, as
//!                   `vtpmdom-create@mgrdom` … (`Runner::set_suffix`), with `st.mgr_dom` set: every
//!                   vTPM domain's manager link on the manager domain, dom0's admin CLI through the
//!                   bridge, dom0-process vTPMs relayed by the bridge (their sockets its own), the
//!                   same checks (those about where the manager is say so); life-mgr-restart@mgrdom
//!                   restarts the MANAGER DOMAIN (restart_in_pass) and proves the dom0 vTPM process
//!                   ran on; SKIPPED with the reason if mgrdom-serve left no serving manager domain
//!                   or they would not fit in memory
//!   mgrdom-serve-stop  the manager domain is the one the second pass left, no domain, dom0 vTPM
//!                   process or relayed socket of the pass is left; the bridge stops on SIGTERM,
//!                   the manager domain shuts down cleanly
//!   mgrdom-pvh      (only with HAP) the domain as PVH (tsc_mode native under TCG): its tpm_tis reads
//!                   the same PCRs and EK certificate
//!   mgrdom-rebind   the domains gone, the loop device released; dom0's tpm_tis binds the device
//!                   again and reads the same PCRs

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

use super::{life, lifedom, vtpm, vtpmdom};
use super::{BOOT1_CHECKS, GuestBoot, MgrDom, REBOOT_CHECKS, St, capture_dq, deadline, ek_stable, none, secs1, up, verify_nonces_ak};
use crate::cmd::{Cmd, Output, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, after_prefix, console, console_from, jf, lines_of, token};

const NAME: &str = "mgrdom";
const CTL: &str = "mgrdom-ctl";
const PVH: &str = "mgrdom-pvh";
const IMG: &str = "/var/lib/xvtpm-mgrdom/state.img";
const RAMDISK: &str = "/guest/mgrdom.cpio.zst";
/// What the domain's /init must report as PASS (mgrdom-init.sh), per boot.
const BOOT1: [&str; 7] = [
    "pcrread",
    "state-disk",
    "mgr-ready",
    "provision",
    "provisioned",
    "mgr-stop",
    "group-ak",
];
/// Boot 1 with dom0's store carried over: no provisioning, the store found on the disk.
const BOOT1_CARRIED: [&str; 7] = [
    "pcrread",
    "state-disk",
    "state-kept",
    "mgr-ready",
    "provisioned",
    "mgr-stop",
    "group-ak",
];
const BOOT2: [&str; 6] = [
    "state-disk",
    "state-kept",
    "mgr-ready",
    "provisioned",
    "mgr-stop",
    "group-ak",
];
/// What the domain's /init must report as PASS before it serves (boot=serve), and when it stops.
const SERVE: [&str; 6] = [
    "pcrread",
    "state-disk",
    "xen-devices",
    "state-kept",
    "mgr-ready",
    "provisioned",
];
const SERVE_STOP: [&str; 1] = ["mgr-stop"];
/// mgrdom-serve: the vTPM domain the manager domain serves, its guest (the vtpmdom phases' guest
/// image and checks; its config from guest-vdom.cfg.in with only the name changed).
const SRV_VD: &str = "vtpmdom-m";
const SRV_G: &str = "guest-mgrdom";
const SRV_GCFG: &str = "/etc/xen/guest-mgrdom.cfg";
// dom0's `vtpmmgr bridge` (the run directory is dom0's manager's: xl-vtpm's default)
use super::{BRIDGE_LOG, RUN_DIR};
/// The suffix of the second pass's phase names (`vtpmdom-create@mgrdom`) and CHECK places.
pub const PASS: &str = "@mgrdom";
const DRIVERS: [&str; 2] = [
    "/sys/bus/platform/drivers/tpm_tis",
    "/sys/bus/pnp/drivers/tpm_tis",
];

#[derive(Default)]
struct Md {
    /// (driver dir, device name) that dom0 unbound
    unbound: Vec<(String, String)>,
    pcrs: Vec<(u32, String)>,
    ekcerts: Vec<String>,
    lo: String,
    ak: String,
    /// dom0's manager was provisioned (the mgr phases ran): its store goes onto the domain's disk
    /// and the domain must serve that provisioning (the same group AK as dom0's manager had)
    carried: bool,
    dom0_ak: String,
    /// mgrdom-serve: dom0's `vtpmmgr bridge`
    bridge: Option<Child>,
    srv: Sv,
}

/// What mgrdom-serve carries from step to step (and leaves for mgrdom-rebind's cleanup).
#[derive(Default)]
struct Sv {
    /// the manager domain's domid now, and how many times it was started
    domid: String,
    boots: u32,
    /// every domid it served as
    domids: Vec<String>,
    /// the vTPM (domain) it serves
    uuid: String,
    vdomid: String,
    voff: usize,
    ek1: String,
}

/// The files of vtpmmgr's own store in its state directory (not the vTPMs' or the registry's).
const STORE: [&str; 2] = ["manager.json", "policy-signing.key"];

fn sha256_file(p: &str) -> String {
    use sha2::Digest;
    match fs::read(p) {
        Ok(b) if !b.is_empty() => hex::encode(sha2::Sha256::digest(&b)),
        _ => String::new(),
    }
}

/// PCR index -> hex (upper case) from `tpm2_pcrread` output, or from `MGRDOM-PCR sha256 I HEX`.
fn parse_pcrs(text: &str) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for l in text.lines() {
        let l = l.trim();
        let (i, h) = if let Some(r) = l.strip_prefix("MGRDOM-PCR sha256 ") {
            let mut it = r.split_whitespace();
            (it.next(), it.next())
        } else if let Some((a, b)) = l.split_once(':') {
            (Some(a.trim()), b.trim().strip_prefix("0x"))
        } else {
            (None, None)
        };
        if let (Some(Ok(i)), Some(h)) = (i.map(str::parse::<u32>), h)
            && h.len() == 64
            && h.chars().all(|c| c.is_ascii_hexdigit())
        {
            v.push((i, h.to_ascii_uppercase()));
        }
    }
    v
}

fn tpm_devs() -> Vec<String> {
    let mut v: Vec<String> = xen::dir_names("/dev")
        .into_iter()
        .filter(|d| d.starts_with("tpm"))
        .collect();
    v.sort();
    v
}

/// The devices bound to dom0's tpm_tis (symlinks in the driver's sysfs directory).
fn bound() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for d in DRIVERS {
        for n in xen::dir_names(d) {
            if ["bind", "unbind", "uevent", "module", "new_id", "remove_id"].contains(&n.as_str()) {
                continue;
            }
            if fs::symlink_metadata(format!("{d}/{n}")).is_ok_and(|m| m.file_type().is_symlink()) {
                v.push((d.to_string(), n));
            }
        }
    }
    v
}

fn dom0_pcrs(cx: &Cx, tcti: &str) -> (Vec<(u32, String)>, String) {
    let o = Cmd::new(&["tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7"])
        .env("TPM2TOOLS_TCTI", tcti)
        .secs(60)
        .run(cx);
    (parse_pcrs(&o.stdout), o.all())
}

/// The kernel line for the manager domain: Debian's kernel has tpm_tis built in; a PV domain
/// has no ACPI, so it is forced onto the TIS base, without interrupts.
fn cfg(name: &str, typ: &str, iomem: bool, disk: Option<&str>, boot: &str) -> String {
    let kernel = if xen::testbed_env("guest_kernel").as_deref() == Some("bzimage") {
        "/guest/vmlinuz"
    } else {
        "/guest/vmlinux"
    };
    let mut c = format!(
        "name = \"{name}\"\ntype = \"{typ}\"\nkernel = \"{kernel}\"\nramdisk = \"{RAMDISK}\"\n\
         extra = \"rootfstype=ramfs console=hvc0 tpm_tis.force=1 tpm_tis.interrupts=0 boot={boot}\"\n\
         memory = 256\nvcpus = 1\non_poweroff = \"destroy\"\non_crash = \"destroy\"\n"
    );
    if typ == "pvh" {
        // as for the hvm-tis guest (docs/hvm.md): with the default, QEMU TCG's nested SVM reports
        // the kernel's RDTSCP without a next-RIP and Xen loops on "SVM Insn len emulation failed"
        c.push_str("tsc_mode = \"native\"\n");
    }
    if iomem {
        // 0xFED40000, 5 pages: the TIS localities 0-4
        c.push_str("iomem = [ \"fed40,5\" ]\n");
    }
    if let Some(d) = disk {
        c.push_str(&format!("disk = [ \"phy:{d},xvda,w\" ]\n"));
    }
    c
}

fn create(cx: &Cx, name: &str, text: &str, e: &mut Errs) -> bool {
    let path = format!("/etc/xen/{name}.cfg");
    let _ = fs::write(&path, text);
    xen::show_cfg(name, text, &["type", "iomem", "disk", "extra"]);
    let _ = fs::remove_file(xen::clog(name));
    let t0 = up();
    let ok = super::xl_create_named(cx, Some(name), &path, &format!("/tmp/xl-{name}.out"), 120, e);
    println!("xl create {name}: {} in {} s", if ok { "ok" } else { "FAILED" }, secs1(t0, up()));
    ok
}

/// Waits for MGRDOM-DONE; echoes the domain's checks as CHECK lines; each of `want` must PASS.
fn boot_checks(cx: &Cx, e: &mut Errs, name: &str, tag: &str, want: &[&str], wait: u64) -> String {
    let t0 = up();
    if !cx.wait_until(wait, || console(name).contains("MGRDOM-DONE")) {
        e.add(format!("{tag}-no-MGRDOM-DONE-in-{wait}s"));
    }
    let c = console(name);
    println!("{name} ({tag}): MGRDOM-DONE after {} s", secs1(t0, up()));
    let miss = echo_checks(name, tag, &c, want, true);
    if !miss.is_empty() {
        e.add(format!("{tag}-checks-failed: {}", miss.join(" ")));
    }
    if !cx.wait_until(60, || xen::domain_gone(name)) {
        e.add(format!("{tag}-did-not-power-off"));
        xen::xl_destroy(cx, name, 60);
    }
    c
}

/// Echoes the domain's MGRDOM-CHECK lines in `c` as `CHECK NAME/TAG …` and its other MGRDOM-
/// lines (not the PCR values; the manager's log lines only with `logs`); returns those of `want`
/// that did not PASS.
fn echo_checks<'a>(name: &str, tag: &str, c: &str, want: &[&'a str], logs: bool) -> Vec<&'a str> {
    for l in c.lines() {
        if let Some(r) = l.strip_prefix("MGRDOM-CHECK ") {
            println!("CHECK {name}/{tag} {r}");
        } else if l.starts_with("MGRDOM-")
            && !l.starts_with("MGRDOM-PCR ")
            && (logs || !l.starts_with("MGRDOM-LOG "))
        {
            println!("[{name}] {l}");
        }
    }
    want.iter()
        .copied()
        .filter(|w| {
            !c.lines()
                .any(|l| l.starts_with(&format!("MGRDOM-CHECK {w} PASS")))
        })
        .collect()
}

/// The domain's PCRs and EK certificate hashes against dom0's.
fn compare(e: &mut Errs, md: &Md, c: &str, tag: &str) {
    let got = parse_pcrs(c);
    let ok = got.len() == 8 && got == md.pcrs;
    e.check(
        &format!("{tag}-pcrs-match"),
        ok,
        if ok {
            format!(
                "PCR 0-7 (sha256) as dom0 read them; PCR 0 = {}...",
                &got[0].1[..16]
            )
        } else {
            format!("domain read {got:?}; dom0 read {:?}", md.pcrs)
        },
    );
    let mut theirs: Vec<String> = c
        .lines()
        .filter_map(|l| l.strip_prefix("MGRDOM-EKCERT "))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    theirs.sort();
    let ok = !md.ekcerts.is_empty() && theirs == md.ekcerts;
    e.check(
        &format!("{tag}-ekcert-match"),
        ok,
        format!("domain {theirs:?}; dom0 {:?}", md.ekcerts),
    );
}

pub fn run(r: &mut Runner, st: &mut St) {
    const ALL: [&str; 8] = [
        "mgrdom-unbind",
        "mgrdom-control",
        "mgrdom-pv",
        "mgrdom-restart",
        "mgrdom-serve",
        // (the second pass: vtpmdom-*@mgrdom, lifedom-*@mgrdom)
        "mgrdom-serve-stop",
        "mgrdom-pvh",
        "mgrdom-rebind",
    ];
    if st.mgrdom_mode != "1" {
        r.skip_all(&ALL, "disabled (XVTPM_TESTBED_MGRDOM=0)");
        return;
    }
    if !std::path::Path::new(RAMDISK).exists() {
        let why = "no /guest/mgrdom.cpio.zst (vtpmmgr or xl-vtpm not built)";
        r.skip_all(&ALL[..5], why);
        skip_second(r, st, why);
        r.skip_all(&ALL[5..], why);
        return;
    }
    let mut md = Md::default();
    let mut md_ok = false;
    r.phase("mgrdom-unbind", deadline(200), |cx| {
        let mut e = Errs::default();
        if st.mgr_up() {
            e.add("dom0-vtpmmgr-still-running");
        }
        // dom0's manager was provisioned (the mgr phases ran, teardown stopped it): its store moves
        // to the manager domain; its group AK is what the domain must serve then
        if std::path::Path::new("/var/lib/xvtpm/manager.json").exists() {
            md.carried = true;
            let ok = super::base::start_mgr(st, "/var/log/xvtpm/vtpmmgr-3.log")
                && super::base::mgr_wait_ready(cx, st);
            let o = Cmd::new(&["xl-vtpm", "mgr", "group", "ak", "default", "--out", "/tmp/mgrdom-dom0-ak"])
                .secs(60)
                .run(cx);
            if !super::base::stop_mgr(cx, st) {
                e.add("dom0-vtpmmgr-did-not-exit");
            }
            md.dom0_ak = if ok && o.ok() { sha256_file("/tmp/mgrdom-dom0-ak") } else { String::new() };
            e.check(
                "mgrdom-dom0-store",
                !md.dom0_ak.is_empty(),
                format!("dom0's manager is provisioned: its store moves to the domain; group AK sha256 {}", super::none(&md.dom0_ak)),
            );
        }
        let (p, raw) = dom0_pcrs(cx, "device:/dev/tpmrm0");
        md.pcrs = p;
        if !e.check(
            "mgrdom-dom0-pcrs",
            md.pcrs.len() == 8,
            format!("{} PCRs read in dom0", md.pcrs.len()),
        ) {
            show("pcrread", &raw);
        }
        for idx in ["0x01c00002", "0x01c0000a"] {
            let f = format!("/tmp/ekcert-{idx}.der");
            let o = Cmd::new(&["tpm2_nvread", idx, "-o", &f]).secs(60).run(cx);
            if o.ok() {
                md.ekcerts.push(format!("{idx} sha256={}", super::none(&sha256_file(&f))));
            }
        }
        md.ekcerts.sort();
        e.check(
            "mgrdom-dom0-ekcerts",
            !md.ekcerts.is_empty(),
            format!("{:?}", md.ekcerts),
        );
        md.unbound = bound();
        println!("dom0 tpm_tis devices: {:?}; /dev: {:?}", md.unbound, tpm_devs());
        if !e.check(
            "mgrdom-dom0-device",
            !md.unbound.is_empty(),
            format!("bound to tpm_tis: {:?}", md.unbound),
        ) {
            return e.verdict("");
        }
        for (d, n) in &md.unbound {
            if let Err(err) = fs::write(format!("{d}/unbind"), n) {
                e.add(format!("unbind-{n}: {err}"));
            }
        }
        let gone = cx.wait_until(15, || tpm_devs().is_empty());
        e.check(
            "mgrdom-dom0-unbound",
            gone,
            format!(
                "dom0 /dev/tpm*: {:?}; /sys/class/tpm: {:?}",
                tpm_devs(),
                xen::dir_names("/sys/class/tpm")
            ),
        );
        md_ok = e.is_empty();
        e.verdict(format!(
            "dom0 read PCR 0-7 + {} EK certificate(s), then unbound {:?} from tpm_tis: no /dev/tpm* left",
            md.ekcerts.len(),
            md.unbound
        ))
    });
    let blocked = (!md_ok).then_some("mgrdom-unbind failed: dom0 still holds the TPM");
    r.phase_if("mgrdom-control", blocked, deadline(400), |cx| {
        let mut e = Errs::default();
        let info = Cmd::sh("xl info").split().run(cx).stdout;
        let caps = info
            .lines()
            .find(|l| l.starts_with("virt_caps"))
            .unwrap_or("virt_caps: ?")
            .to_string();
        println!("INFO mgrdom {caps}");
        if !caps.contains("hap") {
            // evidence: a PVH domain cannot be built here (Xen 4.17 in Debian has no shadow paging)
            let mut pe = Errs::default();
            let ok = create(cx, PVH, &cfg(PVH, "pvh", true, None, "0"), &mut pe);
            let o = xen::read_text(&format!("/tmp/xl-{PVH}.out"));
            let why = o
                .lines()
                .find(|l| l.contains("hap") || l.contains("shadow") || l.contains("error"))
                .unwrap_or("")
                .to_string();
            println!("INFO mgrdom pvh-without-hap created={ok} {why}");
            xen::destroy_if_running(cx, PVH);
        }
        if !create(cx, CTL, &cfg(CTL, "pv", false, None, "0"), &mut e) {
            return e.verdict("");
        }
        // the kernel faults in tpm_tis (the domain crashes: on_crash = destroy) or /init finds no TPM
        cx.wait_until(300, || {
            let c = console(CTL);
            xen::domain_gone(CTL) || c.contains("MGRDOM-DONE") || c.contains("Kernel panic")
        });
        let c = console(CTL);
        // the evidence: the fault and its call chain, or /init's own "no TPM"
        for l in c
            .lines()
            .filter(|l| {
                [
                    "page fault",
                    "Oops",
                    "Kernel panic",
                    "RIP:",
                    "tpm_",
                    "MGRDOM-",
                ]
                .iter()
                .any(|k| l.contains(k))
            })
            .take(14)
        {
            println!("[{CTL}] {l}");
        }
        let fault = c.lines().find(|l| {
            [
                "unable to handle page fault",
                "Oops",
                "Kernel panic",
                "MGRDOM-CHECK tpm FAIL",
            ]
            .iter()
            .any(|k| l.contains(k))
        });
        let reached = c.contains("MGRDOM-TPM ");
        e.check(
            "mgrdom-control-no-tpm",
            !reached && fault.is_some(),
            if reached {
                "the domain without iomem reached the TPM".to_string()
            } else {
                format!(
                    "no TPM without iomem: {}",
                    fault.unwrap_or("(neither a fault nor /init's verdict on the console)")
                )
            },
        );
        xen::destroy_if_running(cx, CTL);
        e.verdict("without `iomem` the domain cannot reach the TPM")
    });
    // a fresh state disk: ext2 on a file, through a dom0 loop device and blkback
    let mut disk_ok = false;
    r.phase_if("mgrdom-pv", blocked, deadline(700), |cx| {
        let mut e = Errs::default();
        let _ = fs::create_dir_all("/var/lib/xvtpm-mgrdom");
        let _ = fs::remove_file(IMG);
        xen::modload("loop");
        xen::modload("xen-blkback");
        let mk = Cmd::new(&[
            "sh",
            "-c",
            &format!("dd if=/dev/zero of={IMG} bs=1M count=16 2>&1 && mke2fs -q -F {IMG} 2>&1 && losetup -f"),
        ])
        .secs(60)
        .split()
        .run(cx);
        md.lo = mk.stdout.lines().last().unwrap_or("").trim().to_string();
        if !mk.ok() || !md.lo.starts_with("/dev/loop") {
            e.add(format!("state-disk: {}", mk.all().trim()));
            return e.verdict("");
        }
        let l = Cmd::new(&["losetup", &md.lo, IMG]).secs(30).run(cx);
        if !l.ok() {
            e.add(format!("losetup {} {IMG}: {}", md.lo, l.all().trim()));
            return e.verdict("");
        }
        disk_ok = true;
        if md.carried {
            let mnt = "/run/mgrdom-state";
            let _ = fs::create_dir_all(mnt);
            xen::modload("crc32c_generic");
            xen::modload("ext4");
            let files: Vec<String> = STORE.iter().map(|f| format!("/var/lib/xvtpm/{f}")).collect();
            let o = Cmd::new(&[
                "sh",
                "-c",
                &format!(
                    "mount -t ext4 {lo} {mnt} && cp -p {files} {mnt}/ && chmod 0600 {mnt}/* && ls -l {mnt}; rc=$?; umount {mnt}; exit $rc",
                    lo = md.lo,
                    files = files.join(" ")
                ),
            ])
            .secs(60)
            .run(cx);
            show("store to the disk", &o.all());
            if !e.check(
                "mgrdom-store-carried",
                o.ok(),
                format!("dom0's {} copied onto {IMG}: rc {}", STORE.join(" + "), o.rc),
            ) {
                return e.verdict("");
            }
        }
        if !create(cx, NAME, &cfg(NAME, "pv", true, Some(&md.lo), if md.carried { "1 carried=1" } else { "1" }), &mut e) {
            return e.verdict("");
        }
        show(
            "xl list",
            &Cmd::new(&["xl", "list", NAME]).run(cx).all(),
        );
        let want: &[&str] = if md.carried { &BOOT1_CARRIED } else { &BOOT1 };
        let c = boot_checks(cx, &mut e, NAME, "boot1", want, 480);
        let tpm = after_prefix(&c, "MGRDOM-TPM ").unwrap_or_default();
        e.check(
            "mgrdom-pv-tpm",
            tpm.contains("version=2"),
            format!("domain's tpm_tis: {}", super::none(&tpm)),
        );
        compare(&mut e, &md, &c, "mgrdom-pv");
        md.ak = after_prefix(&c, "MGRDOM-AK ")
            .and_then(|l| token(&l, "sha256"))
            .unwrap_or_default();
        if md.carried {
            e.check(
                "mgrdom-pv-dom0-ak",
                !md.ak.is_empty() && md.ak == md.dom0_ak,
                format!("group AK sha256: dom0's manager {} the domain's {}", super::none(&md.dom0_ak), super::none(&md.ak)),
            );
        }
        e.verdict(format!(
            "PV + iomem fed40,5: the domain's tpm_tis drives the physical TPM (same PCRs, same EK certificate), vtpmmgr {} there, state on {}",
            if md.carried {
                "serving dom0's provisioning (its store moved onto the disk)"
            } else {
                "provisioned"
            },
            md.lo
        ))
    });
    let blocked2 = if !md_ok {
        blocked
    } else if !disk_ok || md.ak.is_empty() {
        Some("mgrdom-pv did not provision the manager domain")
    } else {
        None
    };
    r.phase_if("mgrdom-restart", blocked2, deadline(600), |cx| {
        let mut e = Errs::default();
        if !create(cx, NAME, &cfg(NAME, "pv", true, Some(&md.lo), "2"), &mut e) {
            return e.verdict("");
        }
        let c = boot_checks(cx, &mut e, NAME, "boot2", &BOOT2, 480);
        compare(&mut e, &md, &c, "mgrdom-restart");
        let ak = after_prefix(&c, "MGRDOM-AK ")
            .and_then(|l| token(&l, "sha256"))
            .unwrap_or_default();
        e.check(
            "mgrdom-restart-same-ak",
            ak == md.ak,
            format!("group AK sha256 boot 1 {} boot 2 {}", md.ak, super::none(&ak)),
        );
        e.verdict("a new manager domain from the same disk: vtpmmgr found its state (provisioned without provisioning), the same group AK")
    });
    // the manager domain serving: dom0's admin CLI through the bridge, a vTPM domain and its guest
    // through the manager domain, across a restart of the manager domain; the manager domain and
    // the bridge are left running for the second pass and mgrdom-serve-stop
    r.phase_if("mgrdom-serve", blocked2, deadline(1500), |cx| {
        let mut e = Errs::default();
        serve(cx, &mut md, &mut e);
        serve_vtpm_cleanup(cx, &mut md, &mut e);
        if !e.is_empty() {
            serve_diag(&md);
        }
        e.verdict(format!(
            "dom0 without a TPM; the manager domain served (domids {}): dom0's admin CLI through vtpmmgr bridge, vTPM domain {SRV_VD} and its guest (TPM checks, NV, persistent key, deep quote verified); after the manager domain's restart the vTPM booted from its disk (key unsealed by the new manager domain): same EK, key and NV kept, deep quote verified again",
            md.srv.domids.join(" -> ")
        ))
    });
    // the second pass: the vTPM phase sets again, the manager in its own domain
    let kept = second_pass(r, st, &mut md);
    let nothing = (md.bridge.is_none() && xen::domain_gone(NAME))
        .then_some("mgrdom-serve left no manager domain and no bridge running");
    r.phase_if("mgrdom-serve-stop", nothing, deadline(400), |cx| {
        let mut e = Errs::default();
        if let Some(p) = &kept {
            let now = xen::domid(NAME).unwrap_or_default();
            let d = p.domids.last().cloned().unwrap_or_default();
            e.check(
                "mgrdom-serve-kept",
                now == d && now == md.srv.domid,
                format!(
                    "the manager domain is the one the second pass left: domid {} at its start{}, {} now",
                    p.domids.first().map(String::as_str).unwrap_or("none"),
                    if p.domids.len() > 1 {
                        format!(", restarted by life-mgr-restart{PASS} (domids {})", p.domids.join(" -> "))
                    } else {
                        " (no restart in the pass: one domain throughout)".to_string()
                    },
                    none(&now)
                ),
            );
            let l = Cmd::sh("xl list").split().run(cx).stdout;
            let left: Vec<&str> = l
                .lines()
                .skip(1)
                .filter_map(|r| r.split_whitespace().next())
                .filter(|n| !["Domain-0", NAME].contains(n))
                .collect();
            e.check(
                "mgrdom-second-pass-clean",
                left.is_empty(),
                format!("domains left by the second pass beside Domain-0 and {NAME}: {left:?}"),
            );
            // the dom0-process vTPMs of the pass (vtpm-*@mgrdom, life-*@mgrdom): their processes
            // gone, no relayed socket left, the bridge relays nothing any more
            let alive: Vec<u32> = p.pids.iter().copied().filter(|x| crate::cmd::pid_up(Some(*x))).collect();
            let socks = super::vtpm_socks_left();
            let rel = xen::read_text(&format!("{RUN_DIR}/relayed.json"));
            let listed: Vec<&String> = p.uuids.iter().filter(|u| rel.contains(u.as_str())).collect();
            e.check(
                "mgrdom-second-pass-relayed-clean",
                alive.is_empty() && socks.is_empty() && listed.is_empty(),
                format!(
                    "dom0 vTPM processes of the pass {:?} still running: {alive:?}; sockets left in {RUN_DIR}/vtpm: {socks:?}; vTPMs of the pass {:?} still in the bridge's relayed.json: {listed:?} ({})",
                    p.pids,
                    p.uuids,
                    rel.trim()
                ),
            );
        }
        serve_stop(cx, &mut md, &mut e);
        if !e.is_empty() {
            serve_diag(&md);
        }
        e.verdict(format!(
            "dom0's vtpmmgr bridge stopped on SIGTERM, the manager domain shut down cleanly (vtpmmgr SIGTERM, disk unmounted){}",
            match &kept {
                Some(p) if p.domids.len() > 1 => format!(
                    ", after it served the second pass (vtpmdom-*, lifedom-*, vtpm-*, life-* @mgrdom; restarted once by life-mgr-restart{PASS}: domids {})",
                    p.domids.join(" -> ")
                ),
                Some(_) => ", after it served the second pass (vtpmdom-*, lifedom-*, vtpm-*, life-* @mgrdom) as one domain".to_string(),
                None => String::new(),
            }
        ))
    });
    r.phase_if("mgrdom-pvh", blocked, deadline(400), |cx| {
        let info = Cmd::sh("xl info").split().run(cx).stdout;
        if !info
            .lines()
            .any(|l| l.starts_with("virt_caps") && l.contains("hap"))
        {
            return Outcome::skipped(
                "no HAP (virt_caps without hap; XVTPM_TESTBED_CPU=max,-smap,-xsave gives it): Xen refuses PVH here",
            );
        }
        let mut e = Errs::default();
        if !create(cx, PVH, &cfg(PVH, "pvh", true, None, "0"), &mut e) {
            return e.verdict("");
        }
        let c = boot_checks(cx, &mut e, PVH, "pvh", &["pcrread"], 300);
        compare(&mut e, &md, &c, "mgrdom-pvh");
        e.verdict("PVH + iomem fed40,5: the domain's tpm_tis reads the same PCRs and EK certificate")
    });
    r.phase_if("mgrdom-rebind", blocked, deadline(200), |cx| {
        let mut e = Errs::default();
        // what a cut-short mgrdom-serve left: the bridge, the guest, the vTPM domain, its disk's loop device
        serve_leftovers(cx, &mut md);
        for n in [NAME, CTL, PVH] {
            xen::destroy_if_running(cx, n);
        }
        if !md.lo.is_empty() {
            let o = Cmd::new(&["losetup", "-d", &md.lo]).secs(30).run(cx);
            e.check(
                "mgrdom-loop-released",
                o.ok(),
                format!("losetup -d {}: rc {}", md.lo, o.rc),
            );
        }
        for (d, n) in &md.unbound {
            if let Err(err) = fs::write(format!("{d}/bind"), n) {
                e.add(format!("bind-{n}: {err}"));
            }
        }
        let back = cx.wait_until(15, || tpm_devs().iter().any(|d| d.starts_with("tpmrm")));
        let devs = tpm_devs();
        let rm = devs
            .iter()
            .find(|d| d.starts_with("tpmrm"))
            .cloned()
            .unwrap_or_default();
        e.check(
            "mgrdom-dom0-rebound",
            back,
            format!("dom0 /dev/tpm*: {devs:?}"),
        );
        if back {
            let (p, raw) = dom0_pcrs(cx, &format!("device:/dev/{rm}"));
            let ok = p == md.pcrs;
            if !e.check(
                "mgrdom-dom0-pcrs-again",
                ok,
                format!(
                    "{} PCRs via /dev/{rm}, as before the passthrough: {ok}",
                    p.len()
                ),
            ) {
                show("pcrread", &raw);
            }
        }
        let l = Cmd::sh("xl list").split().run(cx).stdout;
        e.check(
            "mgrdom-domains-gone",
            l.lines().skip(1).count() == 1,
            l.lines()
                .skip(1)
                .map(|r| r.split_whitespace().next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(" "),
        );
        e.verdict(format!(
            "dom0's tpm_tis has the TPM again (/dev/{rm}), same PCRs"
        ))
    });
}

// ---- the second pass ----

/// What the second pass leaves for mgrdom-serve-stop's checks.
struct Pass {
    /// the manager domain's domids in the pass (more than one after life-mgr-restart@mgrdom)
    domids: Vec<String>,
    /// the dom0-process vTPMs of the pass (vtpm-*@mgrdom, life-*@mgrdom): processes, UUIDs
    pids: Vec<u32>,
    uuids: Vec<String>,
}

/// The second pass of the vTPM phase sets with the manager domain that mgrdom-serve left
/// serving (and dom0's bridge to it): `vtpmdom-*@mgrdom` and `lifedom-*@mgrdom` (vTPM domains),
/// then `vtpm-*@mgrdom` and `life-*@mgrdom` (vTPMs as dom0 processes, relayed by the bridge;
/// life-mgr-restart@mgrdom restarts the manager domain, so these run last). The same phases,
/// `st.mgr_dom` telling them where the manager is. A set that cannot run (no serving manager
/// domain, or its domains do not fit in Xen's free memory beside it) is SKIPPED with the reason.
fn second_pass(r: &mut Runner, st: &mut St, md: &mut Md) -> Option<Pass> {
    let ready = second_pass_ready(&r.cx, st, md);
    r.set_suffix(PASS);
    let kept = match ready {
        Ok((domid, free)) => {
            println!(
                "INFO mgrdom second-pass: the vTPM phases again (names {PASS}), the manager in domain {NAME} (domid {domid}), dom0's admin CLI and dom0-process vTPMs through vtpmmgr bridge; Xen free memory {free} MiB beside it"
            );
            let saved = st.provisioned;
            // mgrdom-serve and second_pass_ready checked it through the bridge
            st.provisioned = true;
            st.mgr_dom = Some(MgrDom {
                name: NAME.into(),
                domid: domid.clone(),
                lo: md.lo.clone(),
                boots: md.srv.boots,
                restarts: Vec::new(),
                bridge_pid: md.bridge.as_ref().map(Child::id),
            });
            let fits = |what: &str, need: u64| {
                (free < need).then(|| {
                    format!(
                        "does not fit beside the manager domain: Xen has {free} MiB free, {what} need {need} MiB"
                    )
                })
            };
            let (vneed, lneed) = (
                vtpmdom_mem() + cfg_mem("/etc/xen/guest-vdom.cfg.in"),
                vtpmdom_mem() + cfg_mem(super::life::LCFG0),
            );
            match fits("a vTPM domain and its guest (vtpmdom)", vneed) {
                Some(why) if st.vtpmdom_mode != "0" => r.skip_all(&vtpmdom::PHASES, &why),
                _ => vtpmdom::run(r, st),
            }
            match fits("a vTPM domain and its guest (lifedom)", lneed) {
                Some(why) if st.lifedom_mode != "0" => r.skip_all(&lifedom::PHASES, &why),
                _ => lifedom::run(r, st),
            }
            // the dom0-process vTPMs: only their guests take Xen memory
            let mut pids = Vec::new();
            let mut uuids = Vec::new();
            let first = (st.vlog.clone(), st.lvlog.clone(), st.luuid.clone());
            match fits("the guest of a dom0-process vTPM (vtpm)", cfg_mem("/etc/xen/guest-vtpm.cfg.in")) {
                Some(why) if st.vtpm_mode != "0" => r.skip_all(&vtpm::PHASES, &why),
                _ => {
                    st.vtpm_uuid.clear();
                    st.vtpm_pid = None;
                    vtpm::run(r, st);
                    pids.extend(st.vtpm_pid);
                    if !st.vtpm_uuid.is_empty() {
                        uuids.push(st.vtpm_uuid.clone());
                    }
                }
            }
            match fits("the guest of a dom0-process vTPM (life)", cfg_mem(super::life::LCFG0)) {
                Some(why) if st.life_mode != "0" && st.vtpm_mode == "dom0" => r.skip_all(&life::PHASES, &why),
                _ => {
                    st.luuid.clear();
                    st.lpid = None;
                    st.lpids.clear();
                    life::run(r, st);
                    pids.extend(st.lpids.iter().copied());
                    if !st.luuid.is_empty() {
                        uuids.push(st.luuid.clone());
                    }
                }
            }
            pids.sort_unstable();
            pids.dedup();
            // the logs dump_logs shows stay the first pass's; the second pass's are dumped apart
            for (n, l) in [("vtpm-mgrdom", &st.vlog), ("vtpm-life-r", &st.lvlog)] {
                if !l.is_empty() && *l != first.0 && *l != first.1 {
                    st.pass2_logs.push((n.to_string(), l.clone()));
                }
            }
            (st.vlog, st.lvlog, st.luuid) = first;
            let m = st.mgr_dom.take();
            st.provisioned = saved;
            let mut domids = vec![domid];
            if let Some(m) = m {
                // the manager domain as the pass left it (life-mgr-restart@mgrdom restarts it)
                md.srv.domid = m.domid.clone();
                md.srv.boots = m.boots;
                md.srv.domids.extend(m.restarts.iter().cloned());
                domids.extend(m.restarts);
            }
            Some(Pass { domids, pids, uuids })
        }
        Err(why) => {
            skip_second(r, st, &why);
            None
        }
    };
    r.set_suffix("");
    kept
}

/// Every phase of the second pass SKIPPED (`why`; a set that is off says so instead).
fn skip_second(r: &mut Runner, st: &St, why: &str) {
    let saved = crate::runner::suffix();
    r.set_suffix(PASS);
    let why = format!("no second pass with the manager domain: {why}");
    let life_on = st.life_mode != "0" && st.vtpm_mode == "dom0";
    for (on, names, off) in [
        (st.vtpmdom_mode != "0", &vtpmdom::PHASES[..], "disabled (XVTPM_TESTBED_VTPMDOM=0)"),
        (st.lifedom_mode != "0", &lifedom::PHASES[..], "disabled (XVTPM_TESTBED_LIFEDOM=0)"),
        (st.vtpm_mode != "0", &vtpm::PHASES[..], "disabled (XVTPM_TESTBED_VTPM=0)"),
        (life_on, &life::PHASES[..], "disabled (XVTPM_TESTBED_LIFE=0, or XVTPM_TESTBED_VTPM not dom0)"),
    ] {
        r.skip_all(names, if on { &why } else { off });
    }
    r.set_suffix(&saved);
}

/// The manager domain serves and dom0's bridge reaches it: (its domid, Xen's free memory in
/// MiB), or why not.
fn second_pass_ready(cx: &Cx, st: &St, md: &mut Md) -> Result<(String, u64), String> {
    if st.vtpmdom_mode == "0" && st.lifedom_mode == "0" && st.vtpm_mode == "0" {
        return Err("every set of the pass is off".into());
    }

    if cx.past_deadline() {
        return Err("scenario deadline reached".into());
    }
    let domid = md.srv.domid.clone();
    let now = xen::domid(NAME).unwrap_or_default();
    if domid.is_empty() || now != domid {
        return Err(format!(
            "mgrdom-serve left no serving manager domain (serving as {}, {NAME} is domid {})",
            none(&domid),
            none(&now)
        ));
    }
    if !bridge_up(md) {
        return Err("dom0's vtpmmgr bridge is not running".into());
    }
    let (prov, xd, o) = mgr_status(cx, "/tmp/mgrdom-pass2-status.json");
    if !prov || xd != domid {
        return Err(format!(
            "dom0's xl-vtpm mgr status --json through the bridge: rc {}, provisioned {prov}, xen_domain {} (the manager domain is {domid}): {}",
            o.rc,
            none(&xd),
            o.tail1(2)
        ));
    }
    let info = Cmd::sh("xl info").split().secs(60).run(cx).stdout;
    let free = info
        .lines()
        .find_map(|l| l.strip_prefix("free_memory"))
        .and_then(|v| v.trim_start().trim_start_matches(':').trim().parse().ok())
        .unwrap_or(0);
    Ok((domid, free))
}

/// The vTPM domains' memory (MiB): what the image's memory-mib says (the testbed's env).
fn vtpmdom_mem() -> u64 {
    xen::testbed_env("vtpmdom_mem")
        .and_then(|m| m.parse().ok())
        .unwrap_or(128)
}

/// `memory = N` of an xl config (MiB; 0 if none).
fn cfg_mem(path: &str) -> u64 {
    xen::read_text(path)
        .lines()
        .find_map(|l| l.strip_prefix("memory = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// ---- a restart of the manager domain inside the second pass (life-mgr-restart@mgrdom) ----

/// Restarts the manager domain of the second pass as mgrdom-serve does: `xl shutdown` (its /init
/// stops vtpmmgr on SIGTERM, unmounts the disk, powers off: CHECK `mgrdom-serveN-clean-stop`),
/// then a new domain from the same disk with `boot=serve` (CHECK `mgrdom-serveN+1-serving`); then
/// waits until dom0's bridge (the same process) follows it: `xl-vtpm mgr status --json` names the
/// new domid as `xen_domain` (CHECK `mgrdom-restart-bridge-follows`). `st.mgr_dom` then names the
/// new domain. Returns (old domid, new domid) when the new domain serves and the bridge follows.
pub fn restart_in_pass(cx: &Cx, e: &mut Errs, st: &mut St) -> Option<(String, String)> {
    let m = st.mgr_dom.as_mut()?;
    let mut md = Md {
        lo: m.lo.clone(),
        ..Default::default()
    };
    md.srv.domid = m.domid.clone();
    md.srv.boots = m.boots;
    let d1 = m.domid.clone();
    let t0 = up();
    let down = serve_down(cx, e, &mut md);
    let _ = fs::rename(
        xen::clog(NAME),
        format!("/var/log/xen/console/guest-{NAME}-serve{}.log", md.srv.boots),
    );
    println!(
        "INFO life-mgr-restart{PASS}: the manager domain (domid {d1}) stopped {} after {} s",
        if down { "cleanly" } else { "NOT cleanly (destroyed)" },
        secs1(t0, up())
    );
    let served = serve_up(cx, e, &mut md);
    m.boots = md.srv.boots;
    m.domid = md.srv.domid.clone();
    if !served {
        return None;
    }
    let d2 = md.srv.domid.clone();
    m.restarts.push(d2.clone());
    let bp = m.bridge_pid;
    e.check(
        "mgrdom-restart-new-domain",
        d2 != d1,
        format!("the manager domain: domid {d1} -> {d2}"),
    );
    let t1 = up();
    let mut last = String::new();
    let back = cx.wait_every(180, crate::s(3), || {
        let (p, xd, o) = mgr_status(cx, "/tmp/mgrdom-pass-status.json");
        last = format!("rc {} provisioned {p} xen_domain {} {}", o.rc, none(&xd), o.tail1(2));
        p && xd == d2
    });
    let same_bridge = crate::cmd::pid_up(bp);
    e.check(
        "mgrdom-restart-bridge-follows",
        back && same_bridge,
        format!(
            "dom0's vtpmmgr bridge (pid {}, running: {same_bridge}) follows the new manager domain: xl-vtpm mgr status --json after {} s: {last}",
            bp.unwrap_or(0),
            secs1(t1, up())
        ),
    );
    println!(
        "PERF life-mgr-restart-mgrdom-s={} (xl shutdown of the manager domain -> a new one serving -> dom0's status answered by it)",
        secs1(t0, up())
    );
    if !back {
        show_tail("vtpmmgr bridge", &xen::read_text(BRIDGE_LOG), 30);
        return None;
    }
    Some((d1, d2))
}

// ---- mgrdom-serve ----

/// `xl create` of the manager domain with `boot=serve` on the state disk; waits for its
/// MGRDOM-SERVING line. CHECK `mgrdom-serveN-serving`; the domid in `md.srv.domid`.
fn serve_up(cx: &Cx, e: &mut Errs, md: &mut Md) -> bool {
    md.srv.boots += 1;
    let n = md.srv.boots;
    let tag = format!("serve{n}");
    md.srv.domid.clear();
    let t0 = up();
    if !create(cx, NAME, &cfg(NAME, "pv", true, Some(&md.lo), "serve"), e) {
        return false;
    }
    cx.wait_every(300, crate::s(1), || {
        let c = console(NAME);
        c.contains("MGRDOM-SERVING") || c.contains("MGRDOM-DONE") || xen::domain_gone(NAME)
    });
    let c = console(NAME);
    let miss = echo_checks(NAME, &tag, &c, &SERVE, false);
    let line = after_prefix(&c, "MGRDOM-SERVING ").unwrap_or_default();
    let dom = xen::domid(NAME).unwrap_or_default();
    let said = token(&line, "domid").unwrap_or_default();
    let ok = !line.is_empty() && miss.is_empty() && !dom.is_empty() && said == dom;
    e.check(
        &format!("mgrdom-{tag}-serving"),
        ok,
        if ok {
            format!(
                "domid {dom}: vtpmmgr serve --xen --admin-xen (pid {}) serving {} s after xl create",
                none(&token(&line, "pid").unwrap_or_default()),
                secs1(t0, up())
            )
        } else {
            format!(
                "MGRDOM-SERVING: '{line}'; not PASS: {}; domid: xl {} / the domain's own {}",
                miss.join(" "),
                none(&dom),
                none(&said)
            )
        },
    );
    println!("PERF mgrdom-serve-boot{n}-s={} (xl create -> MGRDOM-SERVING: boot, TPM, disk, Xen devices, vtpmmgr ready)", secs1(t0, up()));
    if ok {
        md.srv.domids.push(dom.clone());
        md.srv.domid = dom;
    } else {
        mgr_log(NAME, 30);
        xen::destroy_if_running(cx, NAME);
    }
    ok
}

/// The manager's own log lines (MGRDOM-LOG, streamed by the domain's /init), the last `n`.
fn mgr_log(name: &str, n: usize) {
    let c = console(name);
    let v: Vec<&str> = c.lines().filter(|l| l.starts_with("MGRDOM-LOG ")).collect();
    super::show_last(&format!("{name} vtpmmgr"), &v, n);
}

/// `xl shutdown` of the serving manager domain: its /init stops vtpmmgr (SIGTERM), unmounts the
/// disk, powers off. CHECK `mgrdom-serveN-clean-stop`; `xl destroy` if it does not go.
fn serve_down(cx: &Cx, e: &mut Errs, md: &mut Md) -> bool {
    let tag = format!("serve{}", md.srv.boots);
    let off = lines_of(&xen::clog(NAME));
    let t0 = up();
    let o = Cmd::new(&["xl", "shutdown", NAME]).secs(90).run(cx);
    let gone = cx.wait_every(120, crate::s(1), || xen::domain_gone(NAME));
    let stop_s = secs1(t0, up());
    let c = console_from(NAME, off);
    let miss = echo_checks(NAME, &tag, &c, &SERVE_STOP, false);
    mgr_log(NAME, 12);
    let asked = c.contains("MGRDOM-STOP-REQUEST");
    let done = after_prefix(&c, "MGRDOM-DONE ").unwrap_or_default();
    let ok = o.ok() && gone && asked && miss.is_empty() && !done.is_empty();
    e.check(
        &format!("mgrdom-{tag}-clean-stop"),
        ok,
        format!(
            "xl shutdown rc {}; stop request seen: {asked}; vtpmmgr stopped on SIGTERM: {}; MGRDOM-DONE {}; domain gone after {stop_s} s: {gone}",
            o.rc,
            miss.is_empty(),
            none(&done)
        ),
    );
    println!("PERF mgrdom-serve-stop{}-s={stop_s} (xl shutdown -> the manager domain gone)", md.srv.boots);
    if !gone {
        xen::xl_destroy(cx, NAME, 60);
    }
    md.srv.domid.clear();
    ok
}

fn bridge_start(md: &mut Md) -> Result<(), String> {
    let f = fs::File::create(BRIDGE_LOG).map_err(|x| format!("{BRIDGE_LOG}: {x}"))?;
    let f2 = f.try_clone().map_err(|x| format!("{BRIDGE_LOG}: {x}"))?;
    let c = Command::new("vtpmmgr")
        .args(["--run-dir", RUN_DIR, "bridge", "--domain", NAME])
        .env("XVTPM_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|x| format!("vtpmmgr bridge: cannot start: {x}"))?;
    println!("vtpmmgr --run-dir {RUN_DIR} bridge --domain {NAME}: pid {} (log {BRIDGE_LOG})", c.id());
    md.bridge = Some(c);
    Ok(())
}

fn bridge_up(md: &mut Md) -> bool {
    md.bridge
        .as_mut()
        .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
}

/// `xl-vtpm mgr status --json` (through the bridge): provisioned, its `xen_domain` (as printed;
/// empty when absent), the command's output.
fn mgr_status(cx: &Cx, save: &str) -> (bool, String, Output) {
    let o = Cmd::new(&["xl-vtpm", "mgr", "status", "--json"])
        .env("NO_COLOR", "1")
        .secs(60)
        .save_split(save, &format!("{save}.err"))
        .run(cx);
    let j = xen::parse_json(&o.stdout).filter(serde_json::Value::is_object);
    let prov = j.as_ref().is_some_and(|v| {
        xen::find_key(v, "provisioned") == Some(&serde_json::Value::Bool(true))
    });
    let xd = j.as_ref().map(|v| jf(v, "xen_domain")).unwrap_or_default();
    (o.ok() && prov, xd, o)
}

/// `xl-vtpm mgr group ak default --out OUT` (through the bridge): the AK file's sha256, or empty.
fn group_ak_to(cx: &Cx, out: &str) -> String {
    let _ = fs::remove_file(out);
    let o = Cmd::new(&["xl-vtpm", "mgr", "group", "ak", "default", "--out", out])
        .env("NO_COLOR", "1")
        .secs(60)
        .run(cx);
    if o.ok() {
        sha256_file(out)
    } else {
        show_tail("xl-vtpm mgr group ak", &o.all(), 10);
        String::new()
    }
}

/// CHECK `name`: the vTPM domain's manager link is served by the manager domain (backend-id = its
/// domid, Connected), and dom0 serves no vtpm device of it.
fn link_check(e: &mut Errs, name: &str, md: &Md) {
    super::mgr_link_check(e, name, SRV_VD, &md.srv.vdomid, &md.srv.domid);
}

fn vd_ready(md: &Md) -> bool {
    !md.srv.vdomid.is_empty()
        && xen::xs_read(&format!("/local/domain/{}/data/xvtpm/ready", md.srv.vdomid)).as_deref()
            == Some(md.srv.uuid.as_str())
}

/// `xl-vtpm vtpm create --domain` (new) or `vtpm start` (from its disk): the domain ready and its
/// manager link on the manager domain.
fn vtpm_up(cx: &Cx, e: &mut Errs, md: &mut Md, mem: &str) -> bool {
    let first = md.srv.uuid.is_empty();
    let what = if first { "create" } else { "start" };
    md.srv.voff = lines_of(&xen::clog(SRV_VD));
    let u = md.srv.uuid.clone();
    let argv: Vec<&str> = if first {
        vec!["xl-vtpm", "vtpm", "create", "--domain", SRV_VD, "--memory", mem, "--ek", "ecc", "--json"]
    } else {
        vec!["xl-vtpm", "vtpm", "start", &u, "--json"]
    };
    let t0 = up();
    let o = Cmd::new(&argv)
        .env("NO_COLOR", "1")
        .secs(200)
        .save_split(&format!("/tmp/mgrdom-vtpm-{what}.json"), &format!("/tmp/mgrdom-vtpm-{what}.err"))
        .run(cx);
    let took = secs1(t0, up());
    show_tail(&format!("xl-vtpm vtpm {what}"), &o.all(), 20);
    let j = xen::parse_json(&o.stdout).unwrap_or(serde_json::Value::Null);
    if first {
        md.srv.uuid = jf(&j, "uuid");
    }
    let before = md.srv.vdomid.clone();
    md.srv.vdomid = xen::domid(SRV_VD).unwrap_or_default();
    let said = jf(&j, "domid");
    let ready = o.ok() && vd_ready(md) && said == md.srv.vdomid && md.srv.vdomid != before;
    e.check(
        &format!("mgrdom-serve-vtpm-{what}"),
        ready,
        format!(
            "xl-vtpm vtpm {what}{}: rc {} in {took} s; vTPM {} in {SRV_VD}, domid {} (json {}, before {}); data/xvtpm/ready: {}",
            if first { format!(" --domain {SRV_VD} --memory {mem}") } else { String::new() },
            o.rc,
            none(&md.srv.uuid),
            none(&md.srv.vdomid),
            none(&said),
            none(&before),
            vd_ready(md)
        ),
    );
    println!("PERF mgrdom-serve-vtpm-{what}-s={took} (xl-vtpm vtpm {what}: the vTPM domain ready, its manager link on the manager domain)");
    let con = console_from(SRV_VD, md.srv.voff);
    let v: Vec<&str> = con.lines().filter(|l| l.starts_with("VTPMDOM-")).collect();
    super::show_last(&format!("{SRV_VD} console"), &v, 6);
    if !first {
        let xcfg = format!("{RUN_DIR}/vtpms/{}.xl.cfg", md.srv.uuid);
        let resumed = vtpmdom::resumes_from_disk(&xcfg);
        e.check(
            "mgrdom-serve-vtpm-resumed",
            resumed,
            if resumed {
                format!("booted from its disk, no --create: {}", vtpmdom::extra_of(&xcfg))
            } else {
                format!("{xcfg}: {}", vtpmdom::extra_line(&xcfg))
            },
        );
    }
    if md.srv.vdomid.is_empty() {
        return false;
    }
    link_check(e, &format!("mgrdom-serve-vtpm-link{}", md.srv.boots), md);
    ready
}

/// `xl-vtpm vtpm stop` (its state kept on its disk): gone, a clean stop, its loop device released.
fn vtpm_stop(cx: &Cx, e: &mut Errs, md: &mut Md) -> bool {
    let t0 = up();
    let o = Cmd::new(&["xl-vtpm", "vtpm", "stop", &md.srv.uuid])
        .env("NO_COLOR", "1")
        .secs(150)
        .save("/tmp/mgrdom-vtpm-stop.out")
        .run(cx);
    show_tail("xl-vtpm vtpm stop", &o.all(), 10);
    let gone = cx.wait_until(30, || xen::domain_gone(SRV_VD));
    let c = console_from(SRV_VD, md.srv.voff);
    let clean = c.lines().any(|l| l.starts_with("VTPMDOM-EXIT code=0"));
    let lp = xen::vd_loop(&md.srv.uuid);
    let ok = o.ok() && gone && clean && lp.is_empty();
    e.check(
        "mgrdom-serve-vtpm-stop",
        ok,
        format!(
            "xl-vtpm vtpm stop rc {} in {} s: domain gone {gone}, VTPMDOM-EXIT code=0 {clean}, loop devices left {lp:?}",
            o.rc,
            secs1(t0, up())
        ),
    );
    ok
}

/// Boot N of the guest (domu-init.sh role=vtpm) with a deep-quote nonce; its checks (boot 1: the
/// first boot's, later: state kept + the deep quote again), the deep quote verified in dom0 with
/// the group AK in `ak` (right nonce 8, wrong 7); powered off, its console kept.
fn guest_boot(cx: &Cx, e: &mut Errs, md: &Md, n: u32, ak: &str) -> super::Booted {
    let nonce = xen::nonce(32);
    let extra = format!("boot={n} dq_nonce={nonce}");
    let checks: Vec<&str> = if n == 1 {
        BOOT1_CHECKS.to_vec()
    } else {
        REBOOT_CHECKS.iter().copied().chain(["deep-quote"]).collect()
    };
    let p5 = format!("p5-mgrdom-serve-boot{n}-ms");
    let b = GuestBoot {
        name: SRV_G,
        cfg: SRV_GCFG,
        subst: vec![("@UUID@", &md.srv.uuid), ("@BACKEND@", SRV_VD), ("@EXTRA@", &extra)],
        n,
        checks: &checks,
        wait: 300,
        p5: &p5,
        show: 20,
    }
    .run(cx, e);
    if b.created {
        let bundle = format!("/tmp/mgrdom-dq{n}.bin");
        match capture_dq(SRV_G, &bundle) {
            Ok(_) => {
                let (rc_ok, rc_bad) =
                    verify_nonces_ak(cx, &bundle, &nonce, &md.srv.uuid, ak, &format!("/tmp/mgrdom-verify{n}"));
                e.check(
                    &format!("mgrdom-serve-verify{n}-right-nonce"),
                    rc_ok == 8,
                    format!("exit={rc_ok} (want 8: verified with the manager domain's group AK, host state not checked)"),
                );
                e.check(
                    &format!("mgrdom-serve-verify{n}-wrong-nonce"),
                    rc_bad == 7,
                    format!("exit={rc_bad} (want 7)"),
                );
            }
            Err(x) => e.add(format!("boot{n}-{x}")),
        }
        xen::poweroff_or_destroy(cx, SRV_G, e);
    }
    let _ = fs::rename(
        xen::clog(SRV_G),
        format!("/var/log/xen/console/guest-{SRV_G}-boot{n}.log"),
    );
    b
}

/// The phase's steps; each failure is in `e`, and a step that the next ones need ends it early
/// (serve_cleanup runs after it in any case).
fn serve(cx: &Cx, md: &mut Md, e: &mut Errs) {
    let devs = tpm_devs();
    let cls = xen::dir_names("/sys/class/tpm");
    if !e.check(
        "mgrdom-serve-dom0-no-tpm",
        devs.is_empty() && cls.is_empty(),
        format!("dom0 /dev/tpm*: {devs:?}; /sys/class/tpm: {cls:?}"),
    ) {
        return;
    }
    for p in ["/usr/bin/vtpmmgr", "/usr/bin/xl-vtpm", vtpmdom::RAMDISK, "/etc/xen/guest-vdom.cfg.in"] {
        if fs::metadata(p).map(|m| m.len() == 0).unwrap_or(true) {
            e.add(format!("no {p} in dom0 (not built at image build)"));
        }
    }
    if !e.is_empty() {
        return;
    }
    // the guest: the vtpmdom phases' config template under its own name
    let t = xen::cfg_from(
        &xen::read_text("/etc/xen/guest-vdom.cfg.in"),
        &[("name = ", format!("name = \"{SRV_G}\""))],
    );
    if let Err(x) = fs::write(format!("{SRV_GCFG}.in"), t) {
        e.add(format!("{SRV_GCFG}.in: {x}"));
        return;
    }
    for n in [SRV_G, SRV_VD, NAME] {
        xen::destroy_if_running(cx, n);
    }
    vtpmdom::load_block_modules(cx, e);
    if !serve_up(cx, e, md) {
        return;
    }
    compare(e, md, &console(NAME), "mgrdom-serve");
    show(&format!("dom0 {RUN_DIR} before the bridge"), &Cmd::new(&["ls", "-la", RUN_DIR]).run(cx).all());
    let t0 = up();
    if let Err(x) = bridge_start(md) {
        e.add(x);
        return;
    }
    cx.wait_until(120, || {
        xen::read_text(BRIDGE_LOG).contains("\"ready\":true") || !bridge_up(md)
    });
    let ready = xen::read_text(BRIDGE_LOG).contains("\"ready\":true") && bridge_up(md);
    let mode = fs::metadata(format!("{RUN_DIR}/admin.sock"))
        .map(|m| format!("{:o}", m.permissions().mode() & 0o7777))
        .unwrap_or_else(|_| "none".into());
    e.check(
        "mgrdom-serve-bridge-ready",
        ready && mode == "600",
        format!(
            "vtpmmgr bridge --domain {NAME}: ready {ready} after {} s; {RUN_DIR}/admin.sock mode {mode}",
            secs1(t0, up())
        ),
    );
    println!("PERF mgrdom-serve-bridge-ready-s={}", secs1(t0, up()));
    show_tail("vtpmmgr bridge", &xen::read_text(BRIDGE_LOG), if ready { 5 } else { 30 });
    if !ready {
        return;
    }
    let (prov, xd, o) = mgr_status(cx, "/tmp/mgrdom-serve-status.json");
    show_tail("xl-vtpm mgr status --json (through the bridge)", &o.all(), 30);
    e.check(
        "mgrdom-serve-status",
        prov && xd == md.srv.domid,
        format!(
            "dom0's xl-vtpm mgr status --json: rc {}, provisioned {prov}, xen_domain {} (the manager domain: {})",
            o.rc,
            none(&xd),
            md.srv.domid
        ),
    );
    let ak = group_ak_to(cx, "/tmp/mgrdom-serve-ak1.bin");
    e.check(
        "mgrdom-serve-same-ak",
        !ak.is_empty() && ak == md.ak,
        format!(
            "dom0's xl-vtpm mgr group ak default (through the bridge) sha256 {}; the domain's own at boot 1 {}",
            none(&ak),
            md.ak
        ),
    );
    if !prov {
        return;
    }
    let mem = xen::testbed_env("vtpmdom_mem").unwrap_or_else(|| "128".into());
    if !vtpm_up(cx, e, md, &mem) {
        return;
    }
    let b1 = guest_boot(cx, e, md, 1, "/tmp/mgrdom-serve-ak1.bin");
    md.srv.ek1 = b1.ek;
    if !b1.created || md.srv.ek1.is_empty() {
        return;
    }
    // the restart: vTPM domain stopped (state on its disk), the manager domain stopped and started
    if !vtpm_stop(cx, e, md) {
        return;
    }
    let d1 = md.srv.domid.clone();
    if !serve_down(cx, e, md) {
        return;
    }
    e.check(
        "mgrdom-serve-bridge-survives",
        bridge_up(md),
        format!("vtpmmgr bridge still running with its manager domain (was domid {d1}) gone"),
    );
    let t1 = up();
    let (_, _, o) = mgr_status(cx, "/tmp/mgrdom-serve-status-down.json");
    println!(
        "INFO mgrdom-serve status-while-down: xl-vtpm mgr status rc {} after {} s: {}",
        o.rc,
        secs1(t1, up()),
        o.tail1(2)
    );
    let _ = fs::rename(
        xen::clog(NAME),
        format!("/var/log/xen/console/guest-{NAME}-serve1.log"),
    );
    if !serve_up(cx, e, md) {
        return;
    }
    e.check(
        "mgrdom-serve-new-domain",
        md.srv.domid != d1,
        format!("the manager domain: domid {d1} -> {}", md.srv.domid),
    );
    // the bridge follows the name: the next request reaches the new domain
    let t2 = up();
    let mut last = String::new();
    let want = md.srv.domid.clone();
    let back = cx.wait_every(180, crate::s(3), || {
        let (p, xd, o) = mgr_status(cx, "/tmp/mgrdom-serve-status2.json");
        last = format!("rc {} provisioned {p} xen_domain {} {}", o.rc, none(&xd), o.tail1(2));
        p && xd == want
    });
    e.check(
        "mgrdom-serve-bridge-reconnect",
        back,
        format!(
            "dom0's xl-vtpm mgr status after the restart ({} s): {last}",
            secs1(t2, up())
        ),
    );
    println!("PERF mgrdom-serve-reconnect-s={} (MGRDOM-SERVING of the new domain -> dom0's status answered by it)", secs1(t2, up()));
    if !back {
        show_tail("vtpmmgr bridge", &xen::read_text(BRIDGE_LOG), 30);
        return;
    }
    let ak2 = group_ak_to(cx, "/tmp/mgrdom-serve-ak2.bin");
    e.check(
        "mgrdom-serve-restart-same-ak",
        !ak2.is_empty() && ak2 == md.ak,
        format!("group AK sha256 after the restart {}; before {}", none(&ak2), md.ak),
    );
    if !vtpm_up(cx, e, md, &mem) {
        return;
    }
    let b2 = guest_boot(cx, e, md, 2, "/tmp/mgrdom-serve-ak2.bin");
    if b2.created {
        ek_stable(
            e,
            "mgrdom-serve-ek-stable",
            "ek-changed",
            "after the manager domain's restart",
            &md.srv.ek1,
            &b2.ek,
        );
    }
}

/// Guest and vTPM (`xl-vtpm vtpm destroy`, through the manager domain) gone; what fails is in
/// `e`, what is left mgrdom-rebind's serve_leftovers takes. Bridge and manager domain stay (the
/// second pass, then mgrdom-serve-stop).
fn serve_vtpm_cleanup(cx: &Cx, md: &mut Md, e: &mut Errs) {
    xen::destroy_if_running(cx, SRV_G);
    if !md.srv.uuid.is_empty() {
        let t0 = up();
        let o = Cmd::new(&["xl-vtpm", "vtpm", "destroy", &md.srv.uuid, "--yes"])
            .env("NO_COLOR", "1")
            .secs(150)
            .save("/tmp/mgrdom-vtpm-destroy.out")
            .run(cx);
        let gone = cx.wait_until(30, || xen::domain_gone(SRV_VD));
        let lp = xen::vd_loop(&md.srv.uuid);
        let ok = o.ok() && gone && lp.is_empty();
        if !e.check(
            "mgrdom-serve-vtpm-destroy",
            ok,
            format!(
                "xl-vtpm vtpm destroy --yes rc {} in {} s: domain gone {gone}, loop devices left {lp:?}",
                o.rc,
                secs1(t0, up())
            ),
        ) {
            show_tail("xl-vtpm vtpm destroy", &o.all(), 10);
        } else {
            md.srv.uuid.clear();
        }
    }
}

/// The bridge and the manager domain stopped (mgrdom-serve-stop); what fails is in `e`.
fn serve_stop(cx: &Cx, md: &mut Md, e: &mut Errs) {
    if let Some(mut c) = md.bridge.take() {
        let ok = crate::cmd::stop_child(cx, &mut c, 20);
        e.check(
            "mgrdom-serve-bridge-stop",
            ok,
            if ok { "vtpmmgr bridge exited on SIGTERM" } else { "vtpmmgr bridge needed SIGKILL" },
        );
        let sock = std::path::Path::new(&format!("{RUN_DIR}/admin.sock")).exists();
        println!("INFO mgrdom-serve bridge gone; {RUN_DIR}/admin.sock left: {sock}");
    }
    if xen::domid(NAME).is_some() {
        if md.srv.domid.is_empty() {
            // it never served: nothing to stop cleanly
            xen::destroy_if_running(cx, NAME);
        } else {
            serve_down(cx, e, md);
        }
    }
}

/// What a cut-short mgrdom-serve left (no verdict): the bridge, the guest, the vTPM domain, the
/// loop device of its disk.
fn serve_leftovers(cx: &Cx, md: &mut Md) {
    if let Some(mut c) = md.bridge.take() {
        crate::cmd::stop_child(cx, &mut c, 10);
    }
    for n in [SRV_G, SRV_VD] {
        xen::destroy_if_running(cx, n);
    }
    for l in xen::vd_loop(&md.srv.uuid) {
        let _ = Cmd::new(&["losetup", "-d", &l]).secs(30).run(cx);
    }
}

/// On a failure: the vTPM domain's console and xenstore, the manager domain's backends and admin
/// link in xenstore, its manager's log, the bridge's log, xl's and the block script's logs.
fn serve_diag(md: &Md) {
    show_tail(&format!("{SRV_VD} console"), &console_from(SRV_VD, md.srv.voff), 30);
    if !md.srv.vdomid.is_empty() {
        for l in vtpmdom::dom_xs(&md.srv.vdomid, &["data", "device", "backend"]).iter().take(50) {
            println!("[{SRV_VD} xenstore] {l}");
        }
    }
    if let Some(d) = xen::domid(NAME) {
        for l in xen::xs_ls(&format!("/local/domain/{d}"))
            .iter()
            .filter(|l| l.contains("/backend/") || l.contains("/data/"))
            .take(60)
        {
            println!("[{NAME} xenstore] {l}");
        }
    }
    mgr_log(NAME, 40);
    show_tail("vtpmmgr bridge", &xen::read_text(BRIDGE_LOG), 40);
    show_tail(
        &format!("xl-{SRV_VD}.log"),
        &xen::read_text(&format!("/var/log/xen/xl-{SRV_VD}.log")),
        25,
    );
    show_tail("xen-hotplug.log", &xen::read_text("/var/log/xen/xen-hotplug.log"), 10);
}

#[cfg(test)]
mod tests {
    use super::echo_checks;
    use super::parse_pcrs;
    use crate::phases::{links_of, xs_pairs};

    #[test]
    fn manager_links_from_xenstore_ls() {
        let ls: Vec<String> = [
            "/local/domain/7/device/vtpm/0/backend = \"/local/domain/3/backend/vtpm/7/0\"",
            "/local/domain/7/device/vtpm/0/backend-id = \"3\"",
            "/local/domain/7/device/vtpm/0/state = \"4\"",
            "not a pair",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let kv = xs_pairs(&ls);
        assert_eq!(kv.len(), 3);
        let links = links_of(&kv, |b| {
            assert_eq!(b, "/local/domain/3/backend/vtpm/7/0");
            "4".into()
        });
        assert_eq!(links, vec![("3".to_string(), "4".to_string())]);
        // backend-id is not taken for the backend path
        assert!(links_of(&kv[1..], |_| String::new()).is_empty());
    }

    #[test]
    fn unregistered_vtpms_from_a_registry_check() {
        let out = "drift: manager vTPM 94d092d5-0579-456a-844b-11b3aa551e3f belongs to no registered guest\n\
                   drift: registry pair life-x: its vTPM 9f3f9cf4-a387-49ec-b376-de2b81520867 is missing in the manager\n\
                   drift: manager vTPM 9f3f9cf4-a387-49ec-b376-de2b81520867 belongs to no registered guest\n\
                   hint: manager vTPM 9f3f9cf4-a387-49ec-b376-de2b81520867 belongs to no registered guest; if it is not needed, …\n\
                   registry matches what runs\n";
        assert_eq!(
            crate::phases::unregistered_vtpms(out),
            [
                "94d092d5-0579-456a-844b-11b3aa551e3f",
                "9f3f9cf4-a387-49ec-b376-de2b81520867"
            ]
        );
        assert!(crate::phases::unregistered_vtpms("registry matches what runs").is_empty());
    }

    #[test]
    fn relayed_sockets_and_attachments() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                     0000000000000000: 00000002 00000000 00010000 0001 01 4711 /run/xvtpm/vtpm/u1.sock\n\
                     0000000000000000: 00000003 00000000 00000000 0001 03 4712 /run/xvtpm/vtpm/u1.sock\n\
                     0000000000000000: 00000002 00000000 00010000 0001 01 99 /run/xvtpm/admin.sock\n";
        assert_eq!(crate::phases::unix_inode_in(table, "/run/xvtpm/vtpm/u1.sock").as_deref(), Some("4711"));
        assert_eq!(crate::phases::unix_inode_in(table, "/run/xvtpm/vtpm/u2.sock"), None);
        let j = r#"[["94d092d5-0579-456a-844b-11b3aa551e3f",{"pid":812,"start":4242}]]"#;
        assert!(crate::phases::relayed_has(j, "94d092d5-0579-456a-844b-11b3aa551e3f", Some(812)));
        assert!(!crate::phases::relayed_has(j, "94d092d5-0579-456a-844b-11b3aa551e3f", Some(813)));
        assert!(!crate::phases::relayed_has(j, "94d092d5-0579-456a-844b-11b3aa551e3f", None));
        assert!(!crate::phases::relayed_has("[]", "x", Some(1)));
        assert!(!crate::phases::relayed_has("", "x", Some(1)));
    }

    #[test]
    fn serve_checks_missing() {
        let c = "MGRDOM-CHECK mgr-ready PASS x [up=1]\nMGRDOM-CHECK provisioned FAIL y\nMGRDOM-LOG z\n";
        assert_eq!(echo_checks("m", "t", c, &["mgr-ready", "provisioned", "xen-devices"], false), vec!["provisioned", "xen-devices"]);
    }

    #[test]
    fn pcrs_from_both_sides_compare() {
        let h = "3B601227023B6A4393425AAEC9930303862DBBFCDC503406EE2E99F2B6B8C44D";
        let dom0 = format!("  sha256:\n    0 : 0x{h}\n    1 : 0x{}\n", h.to_lowercase());
        let dom = format!("MGRDOM-PCR sha256 0 {h}\nMGRDOM-PCR sha256 1 {h}\nnoise: 0x12\n");
        assert_eq!(parse_pcrs(&dom0), parse_pcrs(&dom));
        assert_eq!(parse_pcrs(&dom).len(), 2);
        // a short or non-hex value is no PCR
        assert!(parse_pcrs("  2 : 0xABC\n  3 : 0xZZ").is_empty());
    }
}
