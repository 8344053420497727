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
//!   mgrdom-pvh      (only with HAP) the domain as PVH (tsc_mode native under TCG): its tpm_tis reads
//!                   the same PCRs and EK certificate
//!   mgrdom-rebind   the domains gone, the loop device released; dom0's tpm_tis binds the device
//!                   again and reads the same PCRs

use std::fs;

use super::{St, deadline, secs1, up};
use crate::cmd::{Cmd, show};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, after_prefix, console, token};

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
    for l in c.lines() {
        if let Some(r) = l.strip_prefix("MGRDOM-CHECK ") {
            println!("CHECK {name}/{tag} {r}");
        } else if l.starts_with("MGRDOM-") && !l.starts_with("MGRDOM-PCR ") {
            println!("[{name}] {l}");
        }
    }
    let miss: Vec<&str> = want
        .iter()
        .copied()
        .filter(|w| {
            !c.lines()
                .any(|l| l.starts_with(&format!("MGRDOM-CHECK {w} PASS")))
        })
        .collect();
    if !miss.is_empty() {
        e.add(format!("{tag}-checks-failed: {}", miss.join(" ")));
    }
    if !cx.wait_until(60, || xen::domain_gone(name)) {
        e.add(format!("{tag}-did-not-power-off"));
        xen::xl_destroy(cx, name, 60);
    }
    c
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
    const ALL: [&str; 6] = [
        "mgrdom-unbind",
        "mgrdom-control",
        "mgrdom-pv",
        "mgrdom-restart",
        "mgrdom-pvh",
        "mgrdom-rebind",
    ];
    if st.mgrdom_mode != "1" {
        r.skip_all(&ALL, "disabled (XVTPM_TESTBED_MGRDOM=0, the default)");
        return;
    }
    if !std::path::Path::new(RAMDISK).exists() {
        r.skip_all(
            &ALL,
            "no /guest/mgrdom.cpio.zst (vtpmmgr or xl-vtpm not built)",
        );
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

#[cfg(test)]
mod tests {
    use super::parse_pcrs;

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
