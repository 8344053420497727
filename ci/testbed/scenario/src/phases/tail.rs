//! tpm2-guest, teardown, and the log dump for run.sh.

use super::{St, deadline};
use crate::cmd::Cmd;
use crate::runner::{Errs, Outcome, Runner};
use crate::xen::{self, dump_log};

pub fn run(r: &mut Runner, st: &mut St) {
    // patched xen-tpmfront -> /dev/tpmrm0 in the guest (guest/linux); its own script, live output
    if st.mgr.is_none() {
        r.skip("tpm2-guest", "needs the manager (mgr phases)");
    } else {
        r.phase("tpm2-guest", deadline(620), |cx| {
            let o = Cmd::new(&["sh", "/usr/lib/xvtpm/tpm2-guest-phase.sh", "/guest/xen-tpmfront-tpm2.ko"])
                .secs(600)
                .inherit()
                .run(cx);
            if o.ok() {
                Outcome::pass(
                    "patched xen-tpmfront: TPM 2.0 vTPM -> /dev/tpmrm0 + tpm2-tools via the kernel RM; TPM 1.2 vTPM stays 1.2",
                )
            } else {
                Outcome::fail(format!("tpm2-guest-phase.sh failed (exit {})", o.rc))
            }
        });
    }

    r.phase("teardown", deadline(200), |cx| {
        let mut e = Errs::default();
        if st.vtpm_pid.is_some() && !st.vtpm_exited() {
            e.add("vtpm-domain-left-running");
            Cmd::new(&["xl-vtpm", "vtpm", "stop", &st.vtpm_uuid])
                .secs(30)
                .run(cx);
        }
        if st.mgr.is_some() {
            if !super::base::stop_mgr(cx, st) {
                e.add("vtpmmgr-did-not-exit");
            }
            crate::cmd::show_tail("vtpmmgr", &xen::read_text(&st.mgr_log), 3);
        }
        let l = Cmd::sh("xl list").split().run(cx).stdout;
        for row in l.lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            if f.len() > 1 && f[1] != "0" {
                e.add(format!("leftover-{}", f[0]));
                xen::xl_destroy(cx, f[0], 60);
            }
        }
        let l = Cmd::sh("xl list").split().run(cx).stdout;
        print!("{l}");
        if l.lines().skip(1).count() != 1 {
            e.add("xl-list");
        }
        e.verdict("all domUs gone, daemons stopped")
    });
}

/// The logs for run.sh (saved as ci/out/runs/<stamp>/dom0/<name>.log; printed on failure).
pub fn dump_logs(st: &St, failed: bool) {
    let n = if failed { 400 } else { 300 };
    // the lifecycle's logs first (the budget may cut the dump short)
    dump_log("watch", "/var/log/xvtpm/watch.log", n);
    dump_log("watch-d", "/var/log/xvtpm/watch-d.log", n);
    // the lifedom phases' second pass (the manager in its own domain, XVTPM_TESTBED_MGRDOM=1)
    dump_log("watch-m", "/var/log/xvtpm/watch-m.log", n);
    // the life phases' second pass (dom0-process vTPMs relayed by the bridge)
    dump_log("watch-r", "/var/log/xvtpm/watch-r.log", n);
    if !st.luuid.is_empty() {
        dump_log("vtpm-life-a", &st.lvlog, n);
    }
    if !st.vlog.is_empty() {
        dump_log("vtpm", &st.vlog, n);
    }
    for (name, l) in &st.pass2_logs {
        dump_log(name, l, n);
    }
    let mut cons = xen::dir_names("/var/log/xen/console");
    cons.retain(|f| f.starts_with("guest-") && f.ends_with(".log"));
    cons.sort();
    let (life, other): (Vec<String>, Vec<String>) =
        cons.into_iter().partition(|f| f.starts_with("guest-life-"));
    for f in life.iter().chain(other.iter()) {
        let b = f.trim_end_matches(".log").trim_start_matches("guest-");
        dump_log(
            &format!("console-{b}"),
            &format!("/var/log/xen/console/{f}"),
            n,
        );
    }
    if !st.hvlog.is_empty() {
        dump_log("vtpm-hvm-tis", &st.hvlog, n);
    }
    dump_log("qemu-dm-hvm-tis", super::hvm::DM_LOG, 200);
    dump_log("hvm-tis-serial", super::hvm::SERIAL, 100);
    dump_log("qemu-dm-hvm-crb", super::hvm::CRB.dm_log, 100);
    if !st.ovlog.is_empty() {
        dump_log("vtpm-hvm-ovmf", &st.ovlog, n);
    }
    dump_log("qemu-dm-hvm-ovmf", super::hvm::OVMF.dm_log, 200);
    dump_log("hvm-ovmf-serial", super::hvm::OVMF.serial, 100);
    // the OVMF guest's TCG2 event log as hex (run.sh writes it back as hvm-ovmf-eventlog.bin)
    dump_log("hvm-ovmf-eventlog-hex", super::hvm::EVLOG_HEX, 4000);
    dump_log("libvirtd", "/var/log/libvirt/libvirtd.log", 200);
    dump_log("libvirtd-out", "/var/log/libvirt/libvirtd.out", 100);
    dump_log("libvirt-hook", super::libvirt::HOOK_LOG, 200);
    // every hook invocation's domain XML (what libvirt's libxl driver passes on stdin)
    let mut xmls = xen::dir_names(super::libvirt::HOOK_XML_DIR);
    xmls.sort();
    for f in xmls {
        dump_log(&format!("libvirt-hook-{}", f.trim_end_matches(".xml")), &format!("{}/{f}", super::libvirt::HOOK_XML_DIR), 400);
    }
    dump_log("vtpmmgr", "/var/log/xvtpm/vtpmmgr.log", n);
    dump_log("attestd", "/var/log/xvtpm/attestd.log", 100);
    dump_log("vtpmmgr-2", "/var/log/xvtpm/vtpmmgr-2.log", n);
    // xhost-*: host B's manager and its swtpm (the simulated second host)
    dump_log("vtpmmgr-b", super::xhost::MGR_LOG, n);
    dump_log("swtpm-b", super::xhost::SWTPM_LOG, 100);
    // mgrdom-serve: dom0's admin socket for the manager domain (its manager's own log is on the
    // domain's console, MGRDOM-LOG lines)
    dump_log("vtpmmgr-bridge", "/var/log/xvtpm/vtpmmgr-bridge.log", n);
    dump_log("xen-hotplug", "/var/log/xen/xen-hotplug.log", 100);
    dump_log("xl-vtpmdom-a", "/var/log/xen/xl-vtpmdom-a.log", 100);
    dump_log("xl-vtpm-life-d", "/var/log/xen/xl-vtpm-life-d.log", 100);
    dump_log("xl-vtpm-life-m", "/var/log/xen/xl-vtpm-life-m.log", 100);
    let mut outs = xen::dir_names("/tmp");
    outs.retain(|f| f.starts_with("xl-") && f.ends_with(".out"));
    outs.sort();
    outs.push("vtpm-create.err".into());
    for f in outs {
        let p = format!("/tmp/{f}");
        if std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false) {
            dump_log(&f, &p, 100);
        }
    }
    if failed {
        let o = Cmd::new(&["xenstore-ls", "-f", "/local/domain"])
            .save("/tmp/xenstore.txt")
            .run_for(crate::s(60));
        let _ = o;
        dump_log("xenstore", "/tmp/xenstore.txt", 200);
    }
}
