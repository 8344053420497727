//! The phases, in the order they run, and the state they hand on.

mod attest;
mod base;
mod eventlog;
mod hvm;
mod hvmmig;
mod libvirt;
mod life;
mod lifedom;
mod mgrdom;
mod migrate;
mod tail;
pub mod twohost;
mod vtpm;
mod vtpmdom;
mod xhost;
mod xhostdom;
mod xhosthvm;

use std::process::Child;

use crate::cmd::{Cmd, Output, show};
use crate::runner::{Cx, Errs, Runner, uptime, wall};
use crate::s;
use crate::xen::{self, after_prefix, console, token};

/// What the phases hand on to each other.
#[derive(Default)]
pub struct St {
    pub mgr_mode: String,
    pub vtpm_mode: String,
    pub life_mode: String,
    pub vtpmdom_mode: String,
    pub lifedom_mode: String,
    pub hvm_mode: String,
    pub mgrdom_mode: String,
    /// `vtpmmgr serve --xen` (the one running now) and its log.
    pub mgr: Option<Child>,
    pub mgr_log: String,
    /// `xl-vtpm mgr status --json` said `"provisioned": true`.
    pub provisioned: bool,
    // dom0-process vTPM (vtpm-*)
    pub vtpm_uuid: String,
    pub vtpm_pid: Option<u32>,
    pub vlog: String,
    pub ek1: String,
    pub dq_nonce: String,
    // lifecycle (life-*, lifedom-*)
    pub watch: Option<life::Watch>,
    pub wlog: String,
    pub luuid: String,
    pub lpid: Option<u32>,
    pub lvlog: String,
    /// every vTPM process of the life-* phases (the second pass checks they are all gone)
    pub lpids: Vec<u32>,
    /// the second pass's dom0 vTPM logs (dump name, path); st.vlog/lvlog keep the first pass's
    pub pass2_logs: Vec<(String, String)>,
    // vTPM domain (vtpmdom-*)
    pub vdu: String,
    // hvm-tis: the HVM guest's vTPM log
    pub hvlog: String,
    // hvm-ovmf: the OVMF guest's vTPM log
    pub ovlog: String,
    /// The second pass of the vTPM-domain phases (`vtpmdom-*@mgrdom`, `lifedom-*@mgrdom`, run
    /// by mgrdom.rs after `mgrdom-serve`): the manager runs in this domain, dom0's admin CLI
    /// reaches it through `vtpmmgr bridge`. None: dom0's vtpmmgr process (the first pass).
    pub mgr_dom: Option<MgrDom>,
}

/// The manager domain serving the second pass.
pub struct MgrDom {
    /// its name (`xl domid NAME`) and its domid now: the one the pass began with, changed only
    /// by `life-mgr-restart@mgrdom`, which restarts the manager domain (mgrdom::restart_in_pass)
    pub name: String,
    pub domid: String,
    /// its state disk's loop device and how many times it was started (for a restart)
    pub lo: String,
    pub boots: u32,
    /// the domids it had after restarts in the pass
    pub restarts: Vec<String>,
    /// dom0's `vtpmmgr bridge` (its pid: it binds the relayed vTPMs' sockets)
    pub bridge_pid: Option<u32>,
}

impl St {
    pub fn mgr_pid(&self) -> Option<u32> {
        self.mgr.as_ref().map(Child::id)
    }
    /// The manager process is running.
    pub fn mgr_up(&mut self) -> bool {
        match self.mgr.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
    /// vtpmmgr runs and was provisioned (what the vTPM phases need): dom0's process, or (second
    /// pass) the manager domain, whose provisioning mgrdom.rs checked through the bridge.
    pub fn mgr_ready(&mut self) -> bool {
        (self.mgr.is_some() || self.mgr_dom.is_some()) && self.provisioned
    }
    /// The manager domain's domid in the second pass; None in the first (dom0's manager).
    pub fn mgr_domid(&self) -> Option<&str> {
        self.mgr_dom.as_ref().map(|m| m.domid.as_str())
    }
    /// Where the manager runs, for a check's text.
    pub fn mgr_where(&self) -> String {
        match &self.mgr_dom {
            Some(m) => format!("the manager domain {} (domid {})", m.name, m.domid),
            None => "dom0's vtpmmgr".into(),
        }
    }
    /// The manager's last `n` log lines, shown with the prefix `vtpmmgr`: dom0's manager's log
    /// file, or in the second pass the manager domain's (its /init streams it onto its console
    /// as `MGRDOM-LOG` lines, mgrdom-init.sh).
    pub fn show_mgr_log(&self, n: usize) {
        match &self.mgr_dom {
            Some(m) => {
                let c = console(&m.name);
                let v: Vec<&str> = c.lines().filter(|l| l.starts_with("MGRDOM-LOG ")).collect();
                show_last(&format!("vtpmmgr in {} (console, MGRDOM-LOG)", m.name), &v, n);
            }
            None => crate::cmd::show_tail("vtpmmgr", &xen::read_text(&self.mgr_log), n),
        }
    }

    pub fn vtpm_exited(&self) -> bool {
        !crate::cmd::pid_up(self.vtpm_pid)
    }
}

/// dom0's `vtpmmgr bridge` log and run directory (the second pass reads them).
pub const BRIDGE_LOG: &str = "/var/log/xvtpm/vtpmmgr-bridge.log";
pub const RUN_DIR: &str = "/run/xvtpm";

/// The per-vTPM socket of a dom0-process vTPM.
pub fn vtpm_sock(uuid: &str) -> String {
    format!("{RUN_DIR}/vtpm/{uuid}.sock")
}

/// The sockets left in `/run/xvtpm/vtpm` (names).
pub fn vtpm_socks_left() -> Vec<String> {
    let mut v: Vec<String> = xen::dir_names(&format!("{RUN_DIR}/vtpm"))
        .into_iter()
        .filter(|n| n.ends_with(".sock"))
        .collect();
    v.sort();
    v
}

/// The inode of the listening unix socket bound at `path` (/proc/net/unix), if any.
pub fn unix_inode(path: &str) -> Option<String> {
    unix_inode_in(&xen::read_text("/proc/net/unix"), path)
}

pub fn unix_inode_in(table: &str, path: &str) -> Option<String> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening
        (f.len() >= 8 && f[7] == path && f[3] == "00010000").then(|| f[6].to_string())
    })
}

/// Process `pid` holds the socket with inode `ino` (a `socket:[ino]` fd).
pub fn holds_socket(pid: u32, ino: &str) -> bool {
    let want = format!("socket:[{ino}]");
    xen::dir_names(&format!("/proc/{pid}/fd"))
        .iter()
        .any(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|t| t.to_string_lossy() == want)
        })
}

/// In the second pass: CHECK `name`: the dom0-process vTPM `uuid` (process `pid`) is relayed by
/// dom0's bridge: its socket `/run/xvtpm/vtpm/<uuid>.sock` is a listening socket, mode 0660,
/// group VTPM_GID, held by the bridge process (not by a manager in dom0: there is none), and the
/// bridge's `relayed.json` names the vTPM with that pid.
pub fn relayed_check(e: &mut Errs, st: &St, name: &str, uuid: &str, pid: Option<u32>) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Some(m) = &st.mgr_dom else { return true };
    let path = vtpm_sock(uuid);
    let meta = std::fs::metadata(&path).ok();
    let sock = meta.as_ref().is_some_and(|m| m.file_type().is_socket());
    let mode = meta.as_ref().map(|m| format!("{:o}", m.mode() & 0o7777)).unwrap_or_else(|| "none".into());
    let gid = meta.as_ref().map(|m| m.gid()).unwrap_or(0);
    let ino = unix_inode(&path).unwrap_or_default();
    let bp = m.bridge_pid.unwrap_or(0);
    let held = !ino.is_empty() && bp != 0 && holds_socket(bp, &ino);
    let rel = xen::read_text(&format!("{RUN_DIR}/relayed.json"));
    let listed = relayed_has(&rel, uuid, pid);
    let ok = sock && mode == "660" && gid == 0x7A00_0000 && held && listed && st.mgr.is_none();
    e.check(
        name,
        ok,
        format!(
            "vTPM {uuid} (pid {}) relayed by dom0's vtpmmgr bridge (pid {bp}) to {}: {path} socket {sock}, mode {mode}, gid {gid:#x} (want 0660, VTPM_GID 0x7a000000), listening inode {} held by the bridge {held}; relayed.json names it with that pid {listed}; no vtpmmgr serve in dom0 {}",
            pid.unwrap_or(0),
            st.mgr_where(),
            none(&ino),
            st.mgr.is_none()
        ),
    )
}

/// `relayed.json` (`[[uuid, {"pid": P, "start": S}], …]`) names `uuid` with `pid`.
pub fn relayed_has(json: &str, uuid: &str, pid: Option<u32>) -> bool {
    let Some(v) = xen::parse_json(json) else { return false };
    let Some(a) = v.as_array() else { return false };
    a.iter().any(|row| {
        row.get(0).and_then(|u| u.as_str()) == Some(uuid)
            && pid.is_some_and(|p| row.get(1).and_then(|r| r.get("pid")).and_then(|x| x.as_u64()) == Some(u64::from(p)))
    })
}

/// The directories dom0's programs expect (both hosts).
pub fn make_dirs() {
    for d in ["/run/xen", "/run/xenstored", "/var/lib/xen", "/var/log/xen/console", "/var/lock", "/var/log/xvtpm", "/var/lib/xvtpm", "/run/xvtpm"] {
        let _ = std::fs::create_dir_all(d);
    }
}

pub fn run_all() -> i32 {
    let mut st = St {
        mgr_mode: xen::cmdline_arg("xvtpm_mgr").unwrap_or_else(|| "auto".into()),
        vtpm_mode: xen::cmdline_arg("xvtpm_vtpm").unwrap_or_else(|| "dom0".into()),
        life_mode: xen::cmdline_arg("xvtpm_life").unwrap_or_else(|| "1".into()),
        vtpmdom_mode: xen::cmdline_arg("xvtpm_vtpmdom").unwrap_or_else(|| "1".into()),
        lifedom_mode: xen::cmdline_arg("xvtpm_lifedom").unwrap_or_else(|| "1".into()),
        hvm_mode: xen::cmdline_arg("xvtpm_hvm").unwrap_or_else(|| "1".into()),
        mgrdom_mode: xen::cmdline_arg("xvtpm_mgrdom").unwrap_or_else(|| "0".into()),
        mgr_log: "/dev/null".into(),
        wlog: "/var/log/xvtpm/watch.log".into(),
        ..Default::default()
    };
    if st.vtpm_mode == "1" {
        st.vtpm_mode = "dom0".into();
    }
    if st.vtpm_mode != "0" && st.vtpm_mode != "dom0" {
        println!(
            "scenario: xvtpm_vtpm={} is not dom0|0 (the old 'domain' experiment is now the vtpmdom-* phases); using dom0",
            st.vtpm_mode
        );
        st.vtpm_mode = "dom0".into();
    }
    let deadline: f64 = xen::cmdline_arg("xvtpm_deadline")
        .and_then(|d| d.parse().ok())
        .unwrap_or(100000.0);
    let left = (deadline - uptime()).max(0.0);
    println!(
        "scenario: {} mgr={} vtpm={} vtpmdom={} deadline={deadline} (xvtpm-testbed)",
        xen::read_text("/etc/xvtpm-testbed.env").replace('\n', " "),
        st.mgr_mode,
        st.vtpm_mode,
        st.vtpmdom_mode
    );
    make_dirs();
    let mut r = Runner::new(std::time::Duration::from_secs_f64(left));
    base::run(&mut r, &mut st);
    vtpm::run(&mut r, &mut st);
    life::run(&mut r, &mut st);
    vtpmdom::run(&mut r, &mut st);
    lifedom::run(&mut r, &mut st);
    migrate::run(&mut r, &mut st);
    // two real Xen hosts: host B boots beside the simulated one's phases
    twohost::boot_b();
    // a second host simulated in dom0 (host-b): cross-host moves; stopped again before libvirt
    xhost::run(&mut r, &mut st);
    twohost::run(&mut r, &mut st);
    libvirt::run(&mut r, &mut st);
    hvm::run(&mut r, &mut st);
    tail::run(&mut r, &mut st);
    // last: it takes the physical TPM away from dom0 (after teardown stopped dom0's vtpmmgr)
    mgrdom::run(&mut r, &mut st);
    let nfail = r.count(crate::runner::Status::Fail);
    tail::dump_logs(&st, nfail > 0);
    println!("{}", r.summary());
    if nfail == 0 { 0 } else { 1 }
}

// ---- shared by the guest phases ----

/// `wall=` and `up=` of the first console line starting with `prefix`.
pub fn wall_up(text: &str, prefix: &str) -> Option<(f64, f64)> {
    let l = after_prefix(text, prefix)?;
    Some((
        token(&l, "wall")?.parse().ok()?,
        token(&l, "up")?.parse().ok()?,
    ))
}

pub fn ms(a: f64, b: f64) -> i64 {
    ((b - a) * 1000.0) as i64
}

pub fn secs1(a: f64, b: f64) -> String {
    format!("{:.1}", b - a)
}

/// Echoes NAME's GUEST-CHECK lines as `CHECK NAME/TAG …`; each of `want` must have passed and
/// the guest must have said `GUEST-DONE … result=ok`. Returns the missing ones.
pub fn guest_checks(text: &str, name: &str, tag: &str, want: &[&str]) -> Vec<String> {
    let sfx = crate::runner::suffix();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("GUEST-CHECK ") {
            println!("CHECK {name}/{tag}{sfx} {rest}");
        }
    }
    let mut miss: Vec<String> = want
        .iter()
        .filter(|c| {
            !text
                .lines()
                .any(|l| l.starts_with(&format!("GUEST-CHECK {c} PASS")))
        })
        .map(|c| c.to_string())
        .collect();
    if !text
        .lines()
        .any(|l| l.starts_with("GUEST-DONE ") && l.contains("result=ok"))
    {
        miss.push("guest-result".into());
    }
    miss
}

/// P5: xl create (at wall clock `w0`) -> the first answered TPM command in the guest.
pub fn p5_vtpm(key: &str, name: &str, w0: f64) {
    let c = console(name);
    let (Some(a), Some(i)) = (
        wall_up(&c, "GUEST-P5 first-tpm-answer "),
        wall_up(&c, "GUEST-UP "),
    ) else {
        println!("PERF {key}=n/a (no GUEST-P5 marker)");
        return;
    };
    println!(
        "PERF {key}={} (xl create -> first answered tpm2_getrandom: domain build+start {} ms, kernel to init {} ms, init to TPM answer {} ms incl. insmod xen-tpmfront + probe + tpm2_startup)",
        ms(w0, a.0),
        ms(w0, i.0 - i.1),
        ms(0.0, i.1),
        ms(i.1, a.1)
    );
    for l in c.lines() {
        if let Some(rest) = l.strip_prefix("GUEST-INFO ") {
            println!("INFO {name} {rest}");
        }
    }
}

/// The first `GUEST-EKHASH` of a console text.
pub fn ek_hash(text: &str) -> String {
    after_prefix(text, "GUEST-EKHASH ")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The deep-quote bundle printed as hex on a console (`GUEST-DQ <hex>` lines); checked against
/// the guest's `GUEST-DQ-END sha256=`; written to `out`. Errors name what did not match.
pub fn capture_dq(name: &str, out: &str) -> Result<usize, String> {
    use sha2::Digest;
    let c = console(name);
    let mut hexs = String::new();
    for l in c.lines() {
        if let Some(h) = l.strip_prefix("GUEST-DQ ")
            && h.chars().all(|ch| ch.is_ascii_hexdigit())
        {
            hexs.push_str(h);
        }
    }
    let bytes = hex::decode(&hexs).unwrap_or_default();
    let got = hex::encode(sha2::Sha256::digest(&bytes));
    let want = after_prefix(&c, "GUEST-DQ-END ")
        .and_then(|l| token(&l, "sha256"))
        .unwrap_or_default();
    println!(
        "deep-quote bundle from the {name} console: {} bytes sha256={got} (guest said {})",
        bytes.len(),
        if want.is_empty() { "none" } else { &want }
    );
    let _ = std::fs::remove_file(out);
    if want.is_empty() || want != got {
        return Err("dq-capture".into());
    }
    std::fs::write(out, &bytes).map_err(|e| format!("dq-write({e})"))?;
    Ok(bytes.len())
}

/// `xl-vtpm verify BUNDLE --nonce N --ak AK --insecure-unenrolled-ak --vtpm U [EXTRA…]`; its last
/// `n` lines shown as `[tag]`.
#[allow(clippy::too_many_arguments)]
pub fn verify(
    cx: &Cx,
    bundle: &str,
    nonce: &str,
    uuid: &str,
    tag: &str,
    save: &str,
    n: usize,
    extra: &[&str],
) -> Output {
    verify_ak(cx, bundle, nonce, uuid, "/tmp/ak.bin", tag, save, n, extra)
}

/// [`verify`] with the group AK in the file `ak` (a manager other than dom0's: mgrdom-serve).
#[allow(clippy::too_many_arguments)]
pub fn verify_ak(
    cx: &Cx,
    bundle: &str,
    nonce: &str,
    uuid: &str,
    ak: &str,
    tag: &str,
    save: &str,
    n: usize,
    extra: &[&str],
) -> Output {
    let mut argv = vec![
        "xl-vtpm",
        "verify",
        bundle,
        "--nonce",
        nonce,
        "--ak",
        ak,
        "--insecure-unenrolled-ak",
        "--vtpm",
        uuid,
    ];
    argv.extend_from_slice(extra);
    let o = Cmd::new(&argv).secs(60).save(save).run(cx);
    crate::cmd::show_tail(tag, &o.all(), n);
    o
}

/// `xl-vtpm verify` of BUNDLE with the guest's nonce and with a fresh wrong one, with the group AK
/// in the file `ak`: their exit codes (want 8: verified, host state not checked; and 7), their
/// output in `SAVE-ok.out`/`SAVE-bad.out`.
pub fn verify_nonces_ak(cx: &Cx, bundle: &str, nonce: &str, uuid: &str, ak: &str, save: &str) -> (i32, i32) {
    let ok = verify_ak(
        cx,
        bundle,
        nonce,
        uuid,
        ak,
        "verify right nonce",
        &format!("{save}-ok.out"),
        25,
        &[],
    );
    let bad = verify_ak(
        cx,
        bundle,
        &xen::nonce(32),
        uuid,
        ak,
        "verify wrong nonce",
        &format!("{save}-bad.out"),
        10,
        &[],
    );
    (ok.rc, bad.rc)
}

/// What a guest with a vTPM checks on its first boot (domu-init.sh role=vtpm boot=1).
pub const BOOT1_CHECKS: [&str; 13] = [
    "tpm0",
    "ima-bypass",
    "startup",
    "getrandom",
    "pcr16-reset",
    "pcrextend",
    "createek",
    "createak",
    "quote",
    "checkquote",
    "persistent",
    "nv-write",
    "deep-quote",
];

/// What it checks on a later boot of the same vTPM: 0x81000010 and the NV index kept, PCR 16 reset.
pub const REBOOT_CHECKS: [&str; 9] = [
    "tpm0",
    "startup",
    "getrandom",
    "pcr16-reset",
    "pcrextend",
    "createek",
    "persistent-kept",
    "persistent-usable",
    "nv-kept",
];

/// One boot of a guest with a vTPM (domu-init.sh role=vtpm, `boot=N` on its command line).
pub struct GuestBoot<'a> {
    pub name: &'a str,
    /// The config, written from `CFG.in` with every (`@KEY@`, value) of `subst` substituted.
    pub cfg: &'a str,
    pub subst: Vec<(&'a str, &'a str)>,
    pub n: u32,
    pub checks: &'a [&'a str],
    /// Seconds to wait for the guest's GUEST-DONE.
    pub wait: u64,
    /// The PERF key of its P5 (xl create -> first TPM answer).
    pub p5: &'a str,
    /// How many of its console lines to show at the end.
    pub show: usize,
}

/// What a boot left: `xl create` succeeded; the guest's EK hash (empty when it said none).
pub struct Booted {
    pub created: bool,
    pub ek: String,
}

impl GuestBoot<'_> {
    /// Writes the config and `xl create`s it; once created, waits for GUEST-DONE and echoes the
    /// guest's checks (`no-GUEST-DONE-in-Ns`, `guest-checks-failed: …` into `e`), its P5.
    pub fn run(&self, cx: &Cx, e: &mut Errs) -> Booted {
        let mut t = xen::read_text(&format!("{}.in", self.cfg));
        for (k, v) in &self.subst {
            t = t.replace(k, v);
        }
        let _ = std::fs::write(self.cfg, &t);
        xen::show_cfg(self.cfg, &t, &["name", "vtpm", "extra"]);
        let (t0, w0) = (up(), now_wall());
        let out = format!("/tmp/xl-{}{}.out", self.name, self.n);
        let created = xl_create(cx, self.cfg, &out, 120, e);
        println!(
            "xl create {} (boot {}): {} s, domid {}",
            self.name,
            self.n,
            secs1(t0, up()),
            xen::domid(self.name).unwrap_or_else(|| "none".into())
        );
        let mut ek = String::new();
        if created {
            show(
                "xl vtpm-list",
                &Cmd::new(&["xl", "vtpm-list", self.name]).run(cx).all(),
            );
            if !cx.wait_until(self.wait, || console(self.name).contains("GUEST-DONE")) {
                e.add(format!("no-GUEST-DONE-in-{}s", self.wait));
            }
            let c = console(self.name);
            let miss = guest_checks(&c, self.name, &format!("boot{}", self.n), self.checks);
            if !miss.is_empty() {
                e.add(format!("guest-checks-failed: {}", miss.join(" ")));
            }
            ek = ek_hash(&c);
            p5_vtpm(self.p5, self.name, w0);
        }
        // its interesting lines (not the bundle hex, not the CHECK lines echoed above)
        let c = console(self.name);
        let v: Vec<&str> = c
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !l.contains("GUEST-DQ ") && !l.contains("GUEST-CHECK"))
            .filter(|l| {
                ["GUEST-", "panic", "Oops", "tpm", "TPM"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        show_last(self.name, &v, self.show);
        Booted { created, ek }
    }
}

/// CHECK `name`: the guest's EK hash `now` is the one it had at first (`first`, not empty);
/// `at` says which boot. A FAIL adds `token`.
pub fn ek_stable(e: &mut Errs, name: &str, token: &str, at: &str, first: &str, now: &str) {
    let ok = !first.is_empty() && first == now;
    let detail = if ok {
        format!(
            "{at}: EK sha256 {}... as at first",
            &first[..16.min(first.len())]
        )
    } else {
        format!("{at}: first={} now={}", none(first), none(now))
    };
    e.check_or(name, ok, detail, token);
}

/// `s`, or `none` when it is empty.
pub fn none(s: &str) -> &str {
    if s.is_empty() { "none" } else { s }
}

/// The standalone vTPM of the vtpm-* phases, stopped by vtpm-destroy, is no lifecycle pair: its
/// identity is dropped so that `xl-vtpm registry check` speaks about the pairs only.
pub fn drop_standalone_vtpm(cx: &Cx, st: &St) {
    if !st.vtpm_uuid.is_empty() && st.vtpm_exited() {
        let o = Cmd::new(&["xl-vtpm", "mgr", "vtpm", "del", &st.vtpm_uuid, "--yes"])
            .secs(30)
            .run(cx);
        show("mgr vtpm del", &o.all());
    }
}

/// The manager vTPM identities `xl-vtpm registry check`'s text `out` names as belonging to no
/// registered guest (`drift: manager vTPM U belongs to no registered guest`).
pub fn unregistered_vtpms(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.contains("belongs to no registered guest"))
        .filter_map(|l| l.split("manager vTPM ").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter(|u| u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .fold(Vec::new(), |mut v, u| {
            if !v.iter().any(|x| x == u) {
                v.push(u.to_string());
            }
            v
        })
}

/// The second pass's counterpart of [`drop_standalone_vtpm`]: the manager domain serves the
/// store dom0's manager had at the end of the first pass, with the standalone vTPMs of the phases
/// that ran between the passes (`tpm2-guest`'s guest-tpm2 and guest-tpm12, and with every section
/// on the others'): no lifecycle pairs, so their identities are dropped (`xl-vtpm mgr vtpm del`,
/// through the bridge, each an INFO line) before the pass, as the first pass began without them,
/// and `xl-vtpm registry check` speaks about the pairs only. A running one is left alone (the
/// registry check then reports it).
pub fn drop_unregistered_vtpms(cx: &Cx, why: &str) {
    let o = Cmd::sh("xl-vtpm registry check").secs(60).run(cx);
    for u in unregistered_vtpms(&o.all()) {
        let row: String = Cmd::new(&["xl-vtpm", "vtpm", "show", &u, "--json"])
            .secs(30)
            .split()
            .run(cx)
            .stdout
            .split_whitespace()
            .collect();
        if row.contains("\"state\":\"running\"") {
            println!("INFO {why}: manager vTPM {u} belongs to no registered guest but runs: kept");
            continue;
        }
        let d = Cmd::new(&["xl-vtpm", "mgr", "vtpm", "del", &u, "--yes"])
            .env("NO_COLOR", "1")
            .secs(30)
            .run(cx);
        println!(
            "INFO {why}: dropped manager vTPM {u} (belongs to no registered guest: a standalone vTPM of an earlier phase, stopped): xl-vtpm mgr vtpm del rc {}",
            d.rc
        );
    }
}

/// `xl create CFG` under the phase; appends `xl-create-rc=N` to `e` on failure.
pub fn xl_create(cx: &Cx, cfg: &str, save: &str, secs: u64, e: &mut Errs) -> bool {
    xl_create_named(cx, None, cfg, save, secs, e)
}

/// `xl create CFG`; a failure is recorded as `xl-create[-NAME]-rc=N` (NAME tells apart the
/// domains of a phase that creates several) with the command's last lines.
pub fn xl_create_named(cx: &Cx, name: Option<&str>, cfg: &str, save: &str, secs: u64, e: &mut Errs) -> bool {
    let o = Cmd::new(&["xl", "create", cfg])
        .secs(secs)
        .save(save)
        .run(cx);
    if !o.ok() {
        e.add(match name {
            Some(n) => format!("xl-create-{n}-rc={}", o.rc),
            None => format!("xl-create-rc={}", o.rc),
        });
        show("xl create", &o.tail(20));
    }
    o.ok()
}

/// The dom0 uptime now (durations on the console: `secs1(t0, up())`).
pub fn up() -> f64 {
    uptime()
}

pub fn now_wall() -> f64 {
    wall()
}

/// `(key, value)` of `xenstore-ls -f` lines (`/path = "value"`).
pub fn xs_pairs(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let (k, v) = l.split_once(" = ")?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

/// The manager links of vTPM domain `vdomid` (its device/vtpm/N): (backend-id, the backend's state).
pub fn mgr_links(vdomid: &str) -> Vec<(String, String)> {
    let kv = xs_pairs(&xen::xs_ls(&format!("/local/domain/{vdomid}/device/vtpm")));
    links_of(&kv, |b| xen::xs_read(&format!("{b}/state")).unwrap_or_default())
}

pub fn links_of(kv: &[(String, String)], state: impl Fn(&str) -> String) -> Vec<(String, String)> {
    kv.iter()
        .filter_map(|(k, b)| {
            let dev = k.strip_suffix("/backend")?;
            let id = kv
                .iter()
                .find(|(k2, _)| *k2 == format!("{dev}/backend-id"))
                .map(|x| x.1.clone())
                .unwrap_or_default();
            Some((id, state(b)))
        })
        .collect()
}

/// CHECK `name`: the manager link(s) of vTPM domain `vdomid` (`label`) are served by the manager
/// domain `mgr` (backend-id = its domid, the backend Connected), and dom0 serves no vtpm device
/// of it.
pub fn mgr_link_check(e: &mut Errs, name: &str, label: &str, vdomid: &str, mgr: &str) -> bool {
    let links = mgr_links(vdomid);
    let in_dom0: Vec<String> = xen::xs_ls("/local/domain/0/backend/vtpm")
        .into_iter()
        .filter(|l| l.contains(&format!("/backend/vtpm/{vdomid}/")))
        .take(2)
        .collect();
    let ok = !vdomid.is_empty()
        && !links.is_empty()
        && links.iter().all(|(id, st)| id == mgr && st == "4")
        && in_dom0.is_empty();
    e.check(
        name,
        ok,
        format!(
            "{label} (domid {}) manager link(s) (backend-id, backend state): {links:?}; the manager domain is domid {mgr}; dom0 vtpm backends of it: {in_dom0:?}",
            none(vdomid)
        ),
    )
}

/// In the second pass (the manager in its own domain) CHECK `name`: vTPM domain `vdomid`'s
/// manager link is on the manager domain ([`mgr_link_check`]). In the first pass nothing (its
/// link is on dom0's manager; the first pass is not changed by the second).
pub fn mgr_link_if_mgrdom(e: &mut Errs, st: &St, name: &str, label: &str, vdomid: &str) {
    if let Some(m) = st.mgr_domid() {
        mgr_link_check(e, name, label, vdomid, m);
    }
}

/// The backends of domain `domid` that are still there: dom0's vbd and vtpm backends, and in
/// the second pass the manager domain's vtpm backend (its manager link).
pub fn backends_left(st: &St, domid: &str) -> Vec<String> {
    let mut v: Vec<String> = xen::xs_ls("/local/domain/0/backend")
        .into_iter()
        .filter(|l| {
            l.contains(&format!("/backend/vbd/{domid}/"))
                || l.contains(&format!("/backend/vtpm/{domid}/"))
        })
        .collect();
    if let Some(m) = st.mgr_domid() {
        v.extend(
            xen::xs_ls(&format!("/local/domain/{m}/backend/vtpm"))
                .into_iter()
                .filter(|l| l.contains(&format!("/backend/vtpm/{domid}/"))),
        );
    }
    v
}

/// `; manager: …` for a verdict of the second pass (empty in the first).
pub fn mgr_said(st: &St) -> String {
    if st.mgr_dom.is_some() {
        format!(
            "; manager: {} (admin CLI through vtpmmgr bridge, manager link on it)",
            st.mgr_where()
        )
    } else {
        String::new()
    }
}

/// In the second pass: the manager domain's vtpm backends (the vTPM domains' manager links), the
/// first `n` lines (diagnosis).
pub fn show_mgr_backends(st: &St, n: usize) {
    if let Some(m) = &st.mgr_dom {
        for l in xen::xs_ls(&format!("/local/domain/{}/backend/vtpm", m.domid))
            .iter()
            .take(n)
        {
            println!("[{} backend] {l}", m.name);
        }
    }
}

/// What a backends-gone check says it verified.
pub fn backends_where(st: &St) -> String {
    match st.mgr_domid() {
        Some(m) => format!("no dom0 vbd/vtpm backend and no vtpm backend in the manager domain (domid {m})"),
        None => "no dom0 vbd/vtpm backend".into(),
    }
}

/// `EPOCH.us (HH:MM:SS UTC)`: the Xen wallclock, comparable with vtpm.log.
pub fn wallt() -> String {
    let w = wall();
    let t = w as u64 % 86400;
    format!(
        "{w:.6} ({:02}:{:02}:{:02} UTC)",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// Prints the last `n` of `lines` with a prefix.
pub fn show_last(prefix: &str, lines: &[&str], n: usize) {
    for l in &lines[lines.len().saturating_sub(n)..] {
        println!("[{prefix}] {l}");
    }
}

pub fn deadline(secs: u64) -> std::time::Duration {
    s(secs)
}
