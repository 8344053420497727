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
mod vtpm;
mod vtpmdom;

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
    // vTPM domain (vtpmdom-*)
    pub vdu: String,
    // hvm-tis: the HVM guest's vTPM log
    pub hvlog: String,
    // hvm-ovmf: the OVMF guest's vTPM log
    pub ovlog: String,
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
    /// vtpmmgr runs and was provisioned (what the vTPM phases need).
    pub fn mgr_ready(&mut self) -> bool {
        self.mgr.is_some() && self.provisioned
    }
    pub fn vtpm_exited(&self) -> bool {
        !crate::cmd::pid_up(self.vtpm_pid)
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
    for d in [
        "/run/xen",
        "/run/xenstored",
        "/var/lib/xen",
        "/var/log/xen/console",
        "/var/lock",
        "/var/log/xvtpm",
        "/var/lib/xvtpm",
        "/run/xvtpm",
    ] {
        let _ = std::fs::create_dir_all(d);
    }
    let mut r = Runner::new(std::time::Duration::from_secs_f64(left));
    base::run(&mut r, &mut st);
    vtpm::run(&mut r, &mut st);
    life::run(&mut r, &mut st);
    vtpmdom::run(&mut r, &mut st);
    lifedom::run(&mut r, &mut st);
    migrate::run(&mut r, &mut st);
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
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("GUEST-CHECK ") {
            println!("CHECK {name}/{tag} {rest}");
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

/// `xl-vtpm verify` of BUNDLE with the guest's nonce and with a fresh wrong one: their exit codes
/// (want 8: verified, host state not checked; and 7), their output in `SAVE-ok.out`/`SAVE-bad.out`.
pub fn verify_nonces(cx: &Cx, bundle: &str, nonce: &str, uuid: &str, save: &str) -> (i32, i32) {
    verify_nonces_ak(cx, bundle, nonce, uuid, "/tmp/ak.bin", save)
}

/// [`verify_nonces`] with the group AK in the file `ak`.
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
