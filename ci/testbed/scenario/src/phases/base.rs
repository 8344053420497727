//! dom0-up, ptpm, mgr-serve, mgr-cli, guest.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{St, deadline, ms, secs1, up, wall_up};
use crate::cmd::{Cmd, show, show_tail};
use crate::runner::{Errs, Outcome, Runner};
use crate::xen::{self, console, has_seq};

pub fn run(r: &mut Runner, st: &mut St) {
    r.phase("dom0-up", deadline(180), dom0_up);
    r.phase("ptpm", deadline(300), ptpm);
    mgr(r, st);
    r.phase("guest", deadline(500), guest);
}

pub(super) fn dom0_up(cx: &crate::runner::Cx) -> Outcome {
    let mut e = Errs::default();
    for m in [
        "xen-privcmd",
        "xenfs",
        "xen-evtchn",
        "xen-gntdev",
        "xen-gntalloc",
    ] {
        if !xen::modload(m) {
            e.add(format!("insmod-{m}"));
        }
    }
    if !Cmd::sh("mount -t xenfs xenfs /proc/xen").run(cx).ok() {
        e.add("xenfs");
    }
    for d in [
        "privcmd",
        "evtchn",
        "gntdev",
        "gntalloc",
        "xenbus",
        "xenbus_backend",
    ] {
        if !is_char(&format!("/dev/xen/{d}")) {
            e.add(format!("no-/dev/xen/{d}"));
        }
    }
    // xenstored daemonizes; XENSTORED_ROOTDIR comes from the launcher
    let o = Cmd::sh("xenstored --pid-file /run/xen/xenstored.pid")
        .secs(30)
        .run(cx);
    if !o.ok() {
        show("xenstored", &o.all());
    }
    if !cx.wait_until(20, || {
        Cmd::sh("xenstore-read -s /").run_for(crate::s(10)).ok()
    }) {
        e.add("xenstored");
    }
    if !Cmd::new(&["xen-init-dom0"])
        .secs(60)
        .save("/var/log/xen/xen-init-dom0.log")
        .run(cx)
        .ok()
    {
        e.add("xen-init-dom0");
    }
    if !Cmd::new(&[
        "xenconsoled",
        "--pid-file=/run/xen/xenconsoled.pid",
        "--log=guest",
        "--log-dir=/var/log/xen/console",
    ])
    .secs(30)
    .run(cx)
    .ok()
    {
        e.add("xenconsoled");
    }
    let info = Cmd::sh("xl info").secs(60).save("/tmp/xl-info").run(cx);
    if !info.ok() {
        e.add("xl-info");
    }
    for l in info.stdout.lines() {
        if [
            "xen_version ",
            "nr_cpus ",
            "total_memory ",
            "free_memory ",
            "xen_caps ",
        ]
        .iter()
        .any(|k| l.starts_with(k))
        {
            println!("{l}");
        }
    }
    cx.wait_until(10, || is_char("/dev/tpmrm0"));
    show("ls", &Cmd::sh("ls -l /dev/tpm0 /dev/tpmrm0").run(cx).all());
    if !is_char("/dev/tpm0") {
        e.add("no-/dev/tpm0");
    }
    if !is_char("/dev/tpmrm0") {
        e.add("no-/dev/tpmrm0");
    }
    println!(
        "tpm0: TPM {} {}",
        xen::read_text("/sys/class/tpm/tpm0/tpm_version_major").trim(),
        xen::read_text("/sys/class/tpm/tpm0/device/description").trim()
    );
    let ver = info
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("xen_version"))
        .map(|v| v.trim_start().trim_start_matches(':').trim().to_string())
        .unwrap_or_default();
    e.verdict(format!("xen {ver}, toolstack up, /dev/tpm0 + /dev/tpmrm0"))
}

fn is_char(p: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(p)
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false)
}

fn ptpm(cx: &crate::runner::Cx) -> Outcome {
    let mut e = Errs::default();
    let g = Cmd::sh("tpm2_getrandom --hex 16").secs(60).run(cx);
    if g.ok() {
        println!("tpm2_getrandom: {}", g.all().trim());
    } else {
        e.add(format!("getrandom({})", g.all().trim()));
    }
    let p = Cmd::sh("tpm2_pcrread sha256:0,1,2,3,4,5,6,7")
        .secs(60)
        .save("/tmp/pcrs")
        .run(cx);
    if !p.ok() {
        e.add("pcrread");
    }
    print!("{}", p.all());
    // '^ +[0-7] *: 0x[0-9A-F]{64}'
    let n = p
        .all()
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            if t.len() == l.len() {
                return false;
            }
            let mut it = t.splitn(2, ':');
            let idx = it.next().unwrap_or("").trim();
            let val = it.next().unwrap_or("").trim();
            idx.len() == 1
                && ('0'..='7').contains(&idx.chars().next().unwrap_or('x'))
                && val.strip_prefix("0x").is_some_and(|h| {
                    h.len() >= 64
                        && h[..64]
                            .chars()
                            .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
                })
        })
        .count();
    if n != 8 {
        e.add("pcrread-output");
    }
    let fixed = Cmd::sh("tpm2_getcap properties-fixed")
        .secs(60)
        .split()
        .run(cx);
    println!(
        "{}",
        grep_after(
            &fixed.stdout,
            &["TPM2_PT_MANUFACTURER:", "TPM2_PT_FIRMWARE_VERSION_1:"],
            1
        )
    );
    let var = Cmd::sh("tpm2_getcap properties-variable")
        .secs(60)
        .split()
        .run(cx);
    println!("{}", grep_after(&var.stdout, &["TPM2_PT_STARTUP_CLEAR"], 4));
    e.verdict("TPM2_GetRandom + PCR read via device:/dev/tpmrm0")
}

/// The lines containing one of `keys` and the `n` after each, on one line (informational).
fn grep_after(text: &str, keys: &[&str], n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if keys.iter().any(|k| l.contains(k)) {
            for x in &lines[i..(i + n + 1).min(lines.len())] {
                out.push(x.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
    }
    out.join(" ")
}

/// Starts `vtpmmgr … serve --xen` with its output in `log`.
pub fn start_mgr(st: &mut St, log: &str) -> bool {
    st.mgr_log = log.to_string();
    let Ok(f) = fs::File::create(log) else {
        return false;
    };
    let Ok(f2) = f.try_clone() else { return false };
    let lvl = std::env::var("XVTPM_LOG").unwrap_or_else(|_| "info".into());
    match Command::new("vtpmmgr")
        .args([
            "--tcti",
            "device:/dev/tpmrm0",
            "--state-dir",
            "/var/lib/xvtpm",
            "--run-dir",
            "/run/xvtpm",
            "serve",
            "--xen",
        ])
        .env("XVTPM_LOG", lvl)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
    {
        Ok(c) => {
            st.mgr = Some(c);
            true
        }
        Err(e) => {
            println!("vtpmmgr: cannot start: {e}");
            false
        }
    }
}

/// Waits (120 s) until the manager says `"ready":true` or dies; true if ready and alive.
pub fn mgr_wait_ready(cx: &crate::runner::Cx, st: &mut St) -> bool {
    let log = st.mgr_log.clone();
    cx.wait_until(120, || {
        xen::read_text(&log).contains("\"ready\":true") || !st.mgr_up()
    });
    xen::read_text(&log).contains("\"ready\":true") && st.mgr_up()
}

/// Stops the manager (SIGTERM, 20 s, then SIGKILL); false if it needed the SIGKILL.
pub fn stop_mgr(cx: &crate::runner::Cx, st: &mut St) -> bool {
    let Some(mut c) = st.mgr.take() else {
        return true;
    };
    crate::cmd::stop_child(cx, &mut c, 20)
}

fn mgr(r: &mut Runner, st: &mut St) {
    if st.mgr_mode == "0" {
        r.skip("mgr-serve", "disabled (XVTPM_TESTBED_MGR=0)");
        r.skip("mgr-cli", "disabled (XVTPM_TESTBED_MGR=0)");
        return;
    }
    if !Path::new("/usr/bin/vtpmmgr").exists() {
        let why = "vtpmmgr not built (target/*/vtpmmgr missing at image build)";
        if st.mgr_mode == "1" {
            r.verdict("mgr-serve", Outcome::fail(why));
            r.verdict("mgr-cli", Outcome::fail("needs vtpmmgr"));
        } else {
            r.skip("mgr-serve", why);
            r.skip("mgr-cli", "needs vtpmmgr");
        }
        return;
    }
    // --xen: it also serves vTPM domains (the vtpmdom-* phases) over tpmif on dom0's backend/vtpm,
    // from the start (libxl gives a backend 10 s to reach InitWait); devices of unattached domains
    // (every dom0-process guest's) it leaves alone
    r.phase("mgr-serve", deadline(150), |cx| {
        if !start_mgr(st, "/var/log/xvtpm/vtpmmgr.log") {
            return Outcome::fail("vtpmmgr could not be started");
        }
        if mgr_wait_ready(cx, st) {
            show_tail("vtpmmgr", &xen::read_text(&st.mgr_log), 5);
            show("vtpmmgr", &Cmd::sh("ls -l /run/xvtpm").run(cx).all());
            Outcome::pass(format!(
                "vtpmmgr serve --xen ready on device:/dev/tpmrm0 (pid {})",
                st.mgr_pid().unwrap_or(0)
            ))
        } else {
            show_tail("vtpmmgr", &xen::read_text(&st.mgr_log), 30);
            let alive = if st.mgr_up() { "yes" } else { "no" };
            if let Some(mut c) = st.mgr.take() {
                crate::cmd::kill_child(&mut c);
            }
            Outcome::fail(format!(
                "vtpmmgr serve not ready within 120 s (alive: {alive})"
            ))
        }
    });

    let mode = st.mgr_mode.clone();
    r.phase("mgr-cli", deadline(200), |cx| {
        let why = if st.mgr.is_none() {
            Some("vtpmmgr serve is not running".to_string())
        } else if !Path::new("/usr/bin/xl-vtpm").exists() {
            Some("xl-vtpm not built".to_string())
        } else {
            let p = Cmd::sh("xl-vtpm mgr provision --yes")
                .secs(120)
                .save("/tmp/prov.out")
                .run(cx);
            show_tail("xl-vtpm provision", &p.all(), 20);
            let s = Cmd::sh("xl-vtpm mgr status --json")
                .secs(60)
                .save_split("/tmp/status.json", "/tmp/status.err")
                .run(cx);
            show_tail("xl-vtpm status", &s.all(), 30);
            let obj = xen::parse_json(&s.stdout)
                .filter(|v| v.is_object() && s.stdout.trim().starts_with('{'));
            st.provisioned = obj.as_ref().is_some_and(|v| {
                xen::find_key(v, "provisioned") == Some(&serde_json::Value::Bool(true))
            });
            if !p.ok() {
                Some(format!("xl-vtpm mgr provision --yes exited {}", p.rc))
            } else if !s.ok() {
                Some(format!("xl-vtpm mgr status --json exited {}", s.rc))
            } else if obj.is_none() {
                Some(
                    "xl-vtpm mgr status --json printed no JSON object (CLI not implemented yet?)"
                        .to_string(),
                )
            } else {
                None
            }
        };
        match why {
            None => Outcome::pass("provisioned; status --json returned an object"),
            Some(w) if mode == "1" => Outcome::fail(w),
            Some(w) => Outcome::skipped(format!("{w} (XVTPM_TESTBED_MGR=1 makes this required)")),
        }
    });
}

/// guest: a PV domU with the guest initramfs, loads xen-tpmfront, powers off. Also the P5
/// baseline: xl create -> first line of the guest's /init, without a vTPM.
fn guest(cx: &crate::runner::Cx) -> Outcome {
    let mut e = Errs::default();
    let t0 = up();
    let w0 = super::now_wall();
    let created = super::xl_create(cx, "/etc/xen/guest1.cfg", "/tmp/xl-guest1.out", 180, &mut e);
    println!("xl create guest1: {} s", secs1(t0, up()));
    if created {
        if !cx.wait_until(180, || console("guest1").contains("GUEST-DONE")) {
            e.add("no-GUEST-DONE-in-180s");
        }
        if !has_seq(&console("guest1"), "GUEST-DONE role=plain ", "result=ok") {
            e.add("guest-result");
        }
        xen::poweroff_or_destroy(cx, "guest1", &mut e);
    }
    let interesting = |l: &str| {
        ["GUEST-", "Kernel panic", "Oops", "segfault"]
            .iter()
            .any(|k| l.contains(k))
    };
    let c = console("guest1");
    let last20: Vec<&str> = c.lines().filter(|l| !l.trim().is_empty()).collect();
    for l in last20[last20.len().saturating_sub(20)..]
        .iter()
        .filter(|l| interesting(l))
    {
        println!("[guest1] {l}");
    }
    if let Some((gw, gu)) = wall_up(&c, "GUEST-UP ") {
        println!(
            "PERF p5-without-vtpm-ms={} (xl create -> first line of /init: domain build+start {} ms, kernel to init {} ms)",
            ms(w0, gw),
            ms(w0, gw - gu),
            ms(0.0, gu)
        );
    }
    if e.is_empty() {
        Outcome::pass(format!(
            "PV domU booted, xen-tpmfront loaded, powered off (create->gone {} s)",
            secs1(t0, up())
        ))
    } else {
        xen::show_console("guest1", 60, |_| true);
        Outcome::fail(e.joined())
    }
}
