//! A second Xen host simulated inside the same dom0, for cross-host migration (switch
//! `xvtpm_xhost=1|0`, default 1): "host-b" is a second vtpmmgr with its own "physical TPM" — a
//! `swtpm socket` in dom0 on TCP 127.0.0.1:2421 (control 2422), its state manufactured by
//! build-images.sh like host A's (swtpm_setup with the same private vendor CA, so its EK
//! certificate chains to /etc/xvtpm-testbed/vendor-root.pem) — its own `--run-dir /run/xvtpm-b`
//! and `--state-dir /var/lib/xvtpm-b`, and host A's registry (`XVTPM_REGISTRY` =
//! /var/lib/xvtpm/registry.sqlite, xl-vtpm's default under A's state directory). Host A is
//! dom0's own manager (`/run/xvtpm`, `/var/lib/xvtpm`); in these phases its xl-vtpm runs with
//! `XVTPM_HOST=host-a`. One RESULT per step:
//!   xhost-setup    host B's swtpm answers on both ports, its SHA-256 PCRs 0–7 read into the
//!                  policy file B's destination checks use, `vtpmmgr serve --xen` on it, `xl-vtpm mgr
//!                  provision` (B's default group), `mgr status` (its own TCTI), `mgr enrollment` of
//!                  A and B (different host ids and EK certificates); then a fresh vTPM made on A
//!                  and stopped moves to B with `xl-vtpm vtpm migrate UUID --to-run-dir
//!                  /run/xvtpm-b --ek-ca … --ek-intermediate … --host-pcrs-policy B.json --to-host
//!                  host-b --to-name host-b` (every transfer step; B's EK chain checked against the
//!                  vendor root), starts on B (a vtpm-domain process under B's env) with the same
//!                  EK, and starting it on A is refused naming host-b (A's copy is retired). The
//!                  vTPM's identity is then deleted on both managers; B keeps serving.
//!   migrate-xhost  a running PV guest moved to host B and back with the cross-host `xl-vtpm
//!                  migrate GUEST host-b --non-live --ssh /etc/xvtpm-testbed/ssh-local --receiver
//!                  "env XVTPM_…=B xl-vtpm migrate-receive" …`: `xl-vtpm create` of mig-x
//!                  (dom0-process vTPM, `role=mig hold=1 tick=1`), in the guest NV, 0x81000010, PCR
//!                  16 extended, EK read; first a refused move: the same command with a policy
//!                  whose PCR 0 is wrong (11…11) exits 6 naming the destination host PCRs and
//!                  nothing moved (the source's manager verifies the offer before the guest leaves,
//!                  `TransferVerify`), and the guest is still the same domain on A with the same
//!                  vTPM process, PCR 16 and a TPM that quotes, the registry names A, B holds no
//!                  identity of it nor its incoming config, and B's log shows its offer withdrawn;
//!                  then the moves: after each the guest's EK, key, NV and PCR 16 kept and
//!                  a fresh AK quote verified, the registry names the host, the holding host's vTPM
//!                  runs, the other refuses to start it naming the holder; P6
//!                  (`PERF p6-xhost-downtime-ms-rN`); then kill rounds: the source `kill -9`ed
//!                  once the guest arrives on B (1: during B's restore, 1b: after A's vTPM was
//!                  suspended) — the receiver destroys its copy, `--finish` restores the guest on
//!                  A — and once B imported the identity (2) — the copy stays paused, `--finish`
//!                  completes the move. Until `xl-vtpm migrate` takes `--receiver` (cross-host,
//!                  being written) it FAILs at that command with the reason.
//!   migrate-xhost-dom  the same with the guest's vTPM in its own domain (xhostdom.rs).
//! After them (or when they cannot run) host B's vTPM processes, manager and swtpm are stopped, so
//! that teardown and the manager-domain phases find dom0 as before.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::migrate::{PCR_AFTER, cons, downtime, field, guest_cmd, last_tick, ticks, write_cfg};
use super::{St, deadline, ek_hash, none};
use crate::cmd::{Cmd, Output, pid_up, show, show_tail, stop_child};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, after_prefix, find_key, jf};

pub const A_HOST: &str = "host-a";
pub const B_HOST: &str = "host-b";
const A_RUN: &str = "/run/xvtpm";
pub(super) const A_STATE: &str = "/var/lib/xvtpm";
pub const B_RUN: &str = "/run/xvtpm-b";
pub const B_STATE: &str = "/var/lib/xvtpm-b";
/// The registry both hosts share: host A's, xl-vtpm's default `STATE_DIR/registry.sqlite` under
/// A's state directory (the scenario gives A's commands no `--registry`).
pub const REGISTRY: &str = "/var/lib/xvtpm/registry.sqlite";
/// Host B's TPM as manufactured (build-images.sh; read-only use) and the copy its swtpm runs on.
const B_TPM_MFG: &str = "/var/lib/xvtpm-testbed/tpm-b";
const B_TPM: &str = "/var/lib/xvtpm-b-tpm";
/// Host B's swtpm: command port; the control port is the next one.
pub const B_PORT: u16 = 2421;
pub const SWTPM_LOG: &str = "/var/log/xvtpm/swtpm-b.log";
pub const MGR_LOG: &str = "/var/log/xvtpm/vtpmmgr-b.log";
/// The destinations' SHA-256 PCRs 0–7 (`{"0": "hex", …}`, `xl-vtpm verify`'s policy format).
pub const B_POLICY: &str = "/etc/xvtpm-testbed/host-b-pcrs.json";
pub const A_POLICY: &str = "/etc/xvtpm-testbed/host-a-pcrs.json";
/// B's policy with a PCR 0 host B does not have (`migrate-xhost`'s refusal round).
const B_POLICY_WRONG: &str = "/etc/xvtpm-testbed/host-b-pcrs-wrong.json";
/// Stands in for ssh on one machine: drops its first argument (the host), runs the rest with
/// `sh -c` (build-images.sh writes it).
pub const SSH_LOCAL: &str = "/etc/xvtpm-testbed/ssh-local";
pub(super) const VENDOR_ROOT: &str = "/etc/xvtpm-testbed/vendor-root.pem";
pub(super) const VENDOR_INT: &str = "/etc/xvtpm-testbed/vendor-intermediate.pem";

const XG: &str = "mig-x";
const XCFG: &str = "/etc/xen/mig-x.cfg";

/// Host A's xl-vtpm environment in these phases (dom0's manager; the host named host-a).
pub fn a_env() -> [(&'static str, &'static str); 4] {
    [("XVTPM_RUN_DIR", A_RUN), ("XVTPM_STATE_DIR", A_STATE), ("XVTPM_HOST", A_HOST), ("XVTPM_REGISTRY", REGISTRY)]
}

/// Host B's: its manager and state directory, its name, host A's registry.
pub fn b_env() -> [(&'static str, &'static str); 4] {
    [("XVTPM_RUN_DIR", B_RUN), ("XVTPM_STATE_DIR", B_STATE), ("XVTPM_HOST", B_HOST), ("XVTPM_REGISTRY", REGISTRY)]
}

/// `env K=V … ` of an environment, for a receiver's command line.
pub(super) fn env_words(env: &[(&str, &str)]) -> String {
    let mut s = String::from("env");
    for (k, v) in env {
        s.push_str(&format!(" {k}={v}"));
    }
    s
}

/// A command run under a host's environment (`NO_COLOR=1`).
pub(super) fn on(env: &[(&str, &str)], argv: &[&str]) -> Cmd {
    let mut c = Cmd::new(argv).env("NO_COLOR", "1");
    for (k, v) in env {
        c = c.env(k, v);
    }
    c
}

/// Host B while it serves: its swtpm and manager (children of the scenario).
pub struct HostB {
    swtpm: Child,
    mgr: Child,
    /// its host id (`xl-vtpm mgr enrollment`: SHA-256 of its EK certificate)
    host_id: String,
}

pub fn run(r: &mut Runner, st: &mut St) {
    let mode = xen::cmdline_arg("xvtpm_xhost").unwrap_or_else(|| "1".into());
    if mode == "0" {
        r.skip_all(&["xhost-setup", "migrate-xhost", "migrate-xhost-dom", "migrate-xhost-hvm"], "disabled (XVTPM_TESTBED_XHOST=0)");
        return;
    }
    let mut hb: Option<HostB> = None;
    let blocked = if st.mgr_ready() { None } else { Some("needs host A: a provisioned vtpmmgr (mgr phases)") };
    r.phase_if("xhost-setup", blocked, deadline(600), |cx| setup(cx, &mut hb));
    // (only setup makes or drops host B)
    let blocked = if hb.is_none() { Some("needs host B (xhost-setup did not leave it serving)") } else { None };
    r.phase_if("migrate-xhost", blocked, deadline(1200), guest_move);
    r.phase_if("migrate-xhost-dom", blocked, deadline(900), super::xhostdom::dom_move);
    if st.hvm_mode == "1" || st.hvm_mode == "mig" {
        r.phase_if("migrate-xhost-hvm", blocked, deadline(900), super::xhosthvm::hvm_move);
    } else {
        r.skip("migrate-xhost-hvm", &format!("XVTPM_TESTBED_HVM={}: no HVM guest's device model here", st.hvm_mode));
    }
    if let Some(h) = hb.take() {
        stop_b(&r.cx, h);
    }
}

/// TCP 127.0.0.1:`port` accepts a connection.
fn answers(port: u16) -> bool {
    let a = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok()
}

/// A child with its output in `log`.
fn spawn(argv: &[&str], log: &str) -> Result<Child, String> {
    let f = std::fs::File::create(log).map_err(|e| format!("{log}: {e}"))?;
    let f2 = f.try_clone().map_err(|e| format!("{log}: {e}"))?;
    Command::new(argv[0])
        .args(&argv[1..])
        .env("XVTPM_LOG", std::env::var("XVTPM_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| format!("{}: cannot start: {e}", argv[0]))
}

fn up(c: &mut Child) -> bool {
    matches!(c.try_wait(), Ok(None))
}

/// `tpm2_pcrread sha256:0,…,7` output → the policy JSON `{"0": "hex", …}` (lowercase hex), if all
/// eight were read.
pub fn pcr_policy(text: &str) -> Option<String> {
    let mut m = serde_json::Map::new();
    for l in text.lines() {
        let Some((i, v)) = l.trim().split_once(':') else { continue };
        let (i, v) = (i.trim(), v.trim());
        let Some(h) = v.strip_prefix("0x") else { continue };
        if i.len() == 1 && ('0'..='7').contains(&i.chars().next()?) && h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
            m.insert(i.to_string(), Value::String(h.to_ascii_lowercase()));
        }
    }
    (m.len() == 8).then(|| Value::Object(m).to_string())
}

/// Reads a host's SHA-256 PCRs 0–7 with `tpm2_pcrread` on `tcti` into the policy file `out`.
fn write_policy(cx: &Cx, tcti: &str, out: &str, e: &mut Errs, check: &str, what: &str) -> bool {
    let o = Cmd::new(&["tpm2_pcrread", "-T", tcti, "sha256:0,1,2,3,4,5,6,7"]).secs(60).run(cx);
    let pol = pcr_policy(&o.stdout);
    let ok = o.ok() && pol.as_ref().is_some_and(|p| std::fs::write(out, p).is_ok());
    if !ok {
        show_tail("tpm2_pcrread", &o.all(), 12);
    }
    e.check(check, ok, format!("{what}: tpm2_pcrread -T {tcti} sha256:0-7 rc={} → {out}: {}", o.rc, pol.as_deref().unwrap_or("(not 8 PCRs)")))
}

/// The JSON answer of a command (stdout), or Null.
pub(super) fn json(o: &Output) -> Value {
    xen::parse_json(&o.stdout).unwrap_or(Value::Null)
}

/// `xl-vtpm mgr enrollment` under `env` into `out`: (rc, host id, EK certificate).
fn enrollment(cx: &Cx, env: &[(&str, &str)], out: &str) -> (i32, String, String, usize) {
    let o = on(env, &["xl-vtpm", "mgr", "enrollment", "--out", out, "--ek-intermediate", VENDOR_INT]).secs(120).run(cx);
    show_tail("xl-vtpm mgr enrollment", &o.all(), 3);
    let v = xen::parse_json(&xen::read_text(out)).unwrap_or(Value::Null);
    let groups = v.get("groups").and_then(Value::as_array).map_or(0, Vec::len);
    (o.rc, jf(&v, "host_id"), jf(&v, "ek_cert"), groups)
}

/// The EK's name (`tpm2_readpublic -c 0x81010002`, the ECC EK) of a running vTPM reached by
/// `tcti`, after `tpm2_startup -c` (ignored when the vTPM was started already).
fn ek_name(cx: &Cx, tcti: &str) -> String {
    let _ = Cmd::new(&["tpm2_startup", "-c", "-T", tcti]).secs(60).run(cx);
    let o = Cmd::new(&["tpm2_readpublic", "-c", "0x81010002", "-T", tcti]).secs(60).split().run(cx);
    let n = o.stdout.lines().find_map(|l| l.strip_prefix("name: ")).unwrap_or_default().trim().to_string();
    if n.is_empty() {
        show_tail("tpm2_readpublic", &o.all(), 6);
    }
    n
}

/// xhost-setup: host B up and serving, and a stopped vTPM's identity moved A → B.
fn setup(cx: &Cx, hb: &mut Option<HostB>) -> Outcome {
    let mut e = Errs::default();
    if !std::path::Path::new(&format!("{B_TPM_MFG}/tpm2-00.permall")).exists() {
        return Outcome::fail(format!("dom0 has no manufactured host-B TPM in {B_TPM_MFG} (build-images.sh)"));
    }
    if !std::path::Path::new("/usr/bin/swtpm").exists() {
        return Outcome::fail("dom0 has no /usr/bin/swtpm (build-images.sh installs Debian's swtpm)");
    }
    // 1. its physical TPM: swtpm on a writable copy of the manufactured state
    let _ = std::fs::remove_dir_all(B_TPM);
    let cp = Cmd::new(&["cp", "-a", B_TPM_MFG, B_TPM]).secs(30).run(cx);
    if !cp.ok() {
        return Outcome::fail(cp.failed("cp -a of host B's TPM state"));
    }
    for d in [B_RUN, B_STATE] {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = Cmd::new(&["chmod", "0700", B_STATE]).run(cx);
    let (p, pc) = (B_PORT.to_string(), (B_PORT + 1).to_string());
    if answers(B_PORT) || answers(B_PORT + 1) {
        return Outcome::fail(format!("127.0.0.1:{B_PORT} or :{pc} answers before host B's swtpm started (what else listens in dom0?)"));
    }
    let t0 = std::time::Instant::now();
    let swtpm = spawn(
        &[
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            &format!("dir={B_TPM}"),
            "--server",
            &format!("type=tcp,port={p},bindaddr=127.0.0.1"),
            "--ctrl",
            &format!("type=tcp,port={pc},bindaddr=127.0.0.1"),
            "--flags",
            "not-need-init,startup-clear",
            "--log",
            &format!("file={SWTPM_LOG},level=1"),
        ],
        "/var/log/xvtpm/swtpm-b.out",
    );
    let mut swtpm = match swtpm {
        Ok(c) => c,
        Err(w) => return Outcome::fail(w),
    };
    let ready = cx.wait_until(30, || answers(B_PORT) && answers(B_PORT + 1) || !up(&mut swtpm));
    let alive = up(&mut swtpm);
    if !e.check(
        "xhost-b-swtpm",
        ready && alive,
        format!("host B's TPM: swtpm socket --tpm2 on {B_TPM} (copy of {B_TPM_MFG}), 127.0.0.1:{p} + control :{pc} answered after {} ms: {}; alive {alive}", t0.elapsed().as_millis(), ready && alive),
    ) {
        show_tail("swtpm-b", &format!("{}{}", xen::read_text("/var/log/xvtpm/swtpm-b.out"), xen::read_text(SWTPM_LOG)), 20);
        crate::cmd::kill_child(&mut swtpm);
        return e.verdict("");
    }
    // 2. its PCRs before its manager holds the only connection swtpm serves at a time
    let tcti = format!("swtpm:host=127.0.0.1,port={p}");
    write_policy(cx, &tcti, B_POLICY, &mut e, "xhost-b-pcrs", "host B's PCRs 0–7 (the policy a move to B is checked against)");
    // host A's too (a move back to A is checked against them); A's manager shares tpmrm0
    write_policy(cx, "device:/dev/tpmrm0", A_POLICY, &mut e, "xhost-a-pcrs", "host A's PCRs 0–7 (the policy of a move back to A)");
    // 3. its manager
    // (`--xen`: B's vTPM domains reach it over dom0's tpmif backend directory, which A's manager
    // serves too; each takes only the devices of the vTPM domains attached to it.)
    let mgr = spawn(&["vtpmmgr", "--tcti", &tcti, "--state-dir", B_STATE, "--run-dir", B_RUN, "serve", "--xen"], MGR_LOG);
    let mut mgr = match mgr {
        Ok(c) => c,
        Err(w) => {
            crate::cmd::kill_child(&mut swtpm);
            return Outcome::fail(w);
        }
    };
    cx.wait_until(120, || xen::read_text(MGR_LOG).contains("\"ready\":true") || !up(&mut mgr));
    let serving = xen::read_text(MGR_LOG).contains("\"ready\":true") && up(&mut mgr);
    if !e.check("xhost-b-serve", serving, format!("vtpmmgr --tcti {tcti} --state-dir {B_STATE} --run-dir {B_RUN} serve --xen (pid {}): ready {serving}", mgr.id())) {
        show_tail("vtpmmgr-b", &xen::read_text(MGR_LOG), 30);
        crate::cmd::kill_child(&mut mgr);
        crate::cmd::kill_child(&mut swtpm);
        return e.verdict("");
    }
    let b = b_env();
    let a = a_env();
    let prov = on(&b, &["xl-vtpm", "mgr", "provision", "--yes"]).secs(180).save("/tmp/xl-xhost-b-provision.out").run(cx);
    show_tail("xl-vtpm mgr provision (B)", &prov.all(), 8);
    let st = on(&b, &["xl-vtpm", "--json", "mgr", "status"]).secs(60).split().run(cx);
    let sv = json(&st);
    let ast = on(&a, &["xl-vtpm", "--json", "mgr", "status"]).secs(60).split().run(cx);
    let av = json(&ast);
    e.check(
        "xhost-b-provisioned",
        prov.ok() && st.ok() && find_key(&sv, "provisioned") == Some(&Value::Bool(true)) && jf(&sv, "tcti") == tcti && jf(&sv, "groups") == "1",
        format!(
            "B: xl-vtpm mgr provision --yes rc={}; mgr status rc={}: provisioned {}, tcti {}, software_tpm {}, groups {}, sealed_pcrs {}; A's status: tcti {}, provisioned {}",
            prov.rc,
            st.rc,
            jf(&sv, "provisioned"),
            none(&jf(&sv, "tcti")),
            jf(&sv, "software_tpm"),
            jf(&sv, "groups"),
            jf(&sv, "sealed_pcrs").replace(['\n', ' '], ""),
            none(&jf(&av, "tcti")),
            jf(&av, "provisioned")
        ),
    );
    // 4. enrollment: B's material, and a TPM other than A's
    let (brc, bid, bek, bgroups) = enrollment(cx, &b, "/tmp/xhost-b-material.json");
    let (arc, aid, aek, _) = enrollment(cx, &a, "/tmp/xhost-a-material.json");
    e.check("xhost-b-enrollment", brc == 0 && bid.len() == 64 && !bek.is_empty() && bgroups >= 1, format!("B: xl-vtpm mgr enrollment rc={brc}: host id {}, {} group(s), EK certificate {} chars", none(&bid), bgroups, bek.len()));
    e.check(
        "xhost-b-other-tpm",
        arc == 0 && !aid.is_empty() && !bid.is_empty() && aid != bid && aek != bek && jf(&av, "tcti") != jf(&sv, "tcti"),
        format!("host ids (SHA-256 of the EK certificate): A {} B {}; EK certificates differ {}; TCTIs A {} B {}", none(&aid), none(&bid), aek != bek, none(&jf(&av, "tcti")), none(&jf(&sv, "tcti"))),
    );
    let host = HostB { swtpm, mgr, host_id: bid.clone() };
    if !e.is_empty() {
        stop_b(cx, host);
        return e.verdict("");
    }
    *hb = Some(host);
    // 5. a fresh vTPM on A, stopped, moved to B with the all-at-once command
    let o = on(&a, &["xl-vtpm", "--json", "vtpm", "create", "--ek", "ecc"]).secs(120).split().save_split("/tmp/xl-xhost-vcreate.out", "/tmp/xl-xhost-vcreate.err").run(cx);
    let v = json(&o);
    let uuid = jf(&v, "uuid");
    let atcti = jf(&v, "tcti");
    if !e.check("xhost-vtpm-create-a", o.ok() && uuid.len() == 36 && atcti.starts_with("swtpm:"), format!("A: xl-vtpm vtpm create --ek ecc rc={}: vTPM {} reached at {}", o.rc, none(&uuid), none(&atcti))) {
        show_tail("xl-vtpm vtpm create", &o.all(), 10);
        return e.verdict("");
    }
    let ek_a = ek_name(cx, &atcti);
    let stop = on(&a, &["xl-vtpm", "vtpm", "stop", &uuid]).secs(60).run(cx);
    e.check("xhost-vtpm-stopped-a", stop.ok() && !ek_a.is_empty(), format!("A: its ECC EK (0x81010002) name {}; xl-vtpm vtpm stop rc={}", none(&ek_a), stop.rc));
    let t0 = std::time::Instant::now();
    let m = on(
        &a,
        &[
            "xl-vtpm", "--json", "vtpm", "migrate", &uuid, "--to-run-dir", B_RUN, "--ek-ca", VENDOR_ROOT, "--ek-intermediate", VENDOR_INT, "--host-pcrs-policy", B_POLICY, "--to-host", B_HOST, "--to-name", B_HOST,
        ],
    )
    .secs(300)
    .save_split("/tmp/xl-xhost-vmigrate.out", "/tmp/xl-xhost-vmigrate.err")
    .run(cx);
    let mv = json(&m);
    show("xl-vtpm vtpm migrate", &m.all());
    let moved = e.check(
        "xhost-vtpm-migrate",
        m.ok() && jf(&mv, "uuid") == uuid && jf(&mv, "dest_host") == bid,
        format!(
            "xl-vtpm vtpm migrate {uuid} --to-run-dir {B_RUN} --ek-ca {VENDOR_ROOT} --ek-intermediate {VENDOR_INT} --host-pcrs-policy {B_POLICY} --to-host {B_HOST} --to-name {B_HOST}: rc={} in {} ms, dest_host {} (B's host id: {}), generation {}, registry_host {} (a standalone vTPM has no pair to record)",
            m.rc,
            t0.elapsed().as_millis(),
            none(&jf(&mv, "dest_host")),
            if jf(&mv, "dest_host") == bid { "yes" } else { "NO" },
            jf(&mv, "generation"),
            jf(&mv, "registry_host")
        ),
    );
    if moved {
        let s = on(&b, &["xl-vtpm", "--json", "vtpm", "start", &uuid]).secs(120).split().save_split("/tmp/xl-xhost-vstart-b.out", "/tmp/xl-xhost-vstart-b.err").run(cx);
        let sv = json(&s);
        let pid: Option<u32> = jf(&sv, "pid").parse().ok();
        let btcti = jf(&sv, "tcti");
        let started = e.check(
            "xhost-vtpm-start-b",
            s.ok() && jf(&sv, "state") == "running" && pid_up(pid) && jf(&sv, "state_file").starts_with(B_STATE) && btcti.contains(B_RUN),
            format!("B (XVTPM_RUN_DIR={B_RUN} XVTPM_STATE_DIR={B_STATE} XVTPM_HOST={B_HOST}): xl-vtpm vtpm start rc={}: state {}, vtpm-domain pid {pid:?} alive {}, state file {}, reached at {}", s.rc, jf(&sv, "state"), pid_up(pid), none(&jf(&sv, "state_file")), none(&btcti)),
        );
        if !started {
            show_tail("xl-vtpm vtpm start (B)", &s.all(), 10);
        } else {
            let ek_b = ek_name(cx, &btcti);
            e.check("xhost-vtpm-same-ek", !ek_a.is_empty() && ek_a == ek_b, format!("the vTPM's ECC EK name on B {} (on A {})", none(&ek_b), none(&ek_a)));
            let l = on(&b, &["xl-vtpm", "--json", "vtpm", "list"]).secs(60).split().run(cx);
            let listed = xen::parse_json(&l.stdout)
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|rows| rows.iter().any(|r| jf(r, "uuid") == uuid && jf(r, "state") == "running"));
            e.check("xhost-vtpm-list-b", listed, format!("B's xl-vtpm vtpm list names {uuid} running: {listed}"));
        }
        let ra = on(&a, &["xl-vtpm", "vtpm", "start", &uuid]).secs(60).run(cx);
        e.check(
            "xhost-vtpm-refused-a",
            !ra.ok() && ra.all().contains(B_HOST) && !ra.all().contains("panicked"),
            format!("A: xl-vtpm vtpm start rc={} (want a refusal naming {B_HOST}): {}", ra.rc, ra.tail1(2)),
        );
        // nothing of it stays: stopped on B, its identity deleted on B and A (A's copy is retired)
        let _ = on(&b, &["xl-vtpm", "vtpm", "stop", &uuid]).secs(60).run(cx);
        let db = on(&b, &["xl-vtpm", "mgr", "vtpm", "del", &uuid, "--yes"]).secs(60).run(cx);
        let da = on(&a, &["xl-vtpm", "mgr", "vtpm", "del", &uuid, "--yes"]).secs(60).run(cx);
        println!("INFO xhost-setup vTPM {uuid} stopped on B; identity deleted on B (rc {}) and A (rc {})", db.rc, da.rc);
    }
    e.verdict(format!(
        "host B serves (swtpm 127.0.0.1:{p}, vtpmmgr --run-dir {B_RUN} --state-dir {B_STATE}, provisioned, registry {REGISTRY}), its TPM not A's (host id {}…); a stopped vTPM moved A → B with xl-vtpm vtpm migrate (EK chain to the vendor root, B's PCR policy), started on B with the same EK, refused on A naming {B_HOST}",
        &bid[..16.min(bid.len())]
    ))
}

/// Host B's vTPM processes, manager and swtpm stopped (after the phases, or a failed setup).
fn stop_b(cx: &Cx, mut h: HostB) {
    let b = b_env();
    let l = on(&b, &["xl-vtpm", "--json", "vtpm", "list"]).secs(60).split().run(cx);
    let mut stopped = Vec::new();
    if let Some(rows) = xen::parse_json(&l.stdout).and_then(|v| v.as_array().cloned()) {
        for r in rows.iter().filter(|r| jf(r, "state") == "running") {
            let u = jf(r, "uuid");
            let o = on(&b, &["xl-vtpm", "vtpm", "stop", &u]).secs(60).run(cx);
            stopped.push(format!("{u} (rc {})", o.rc));
        }
    }
    let m = stop_child(cx, &mut h.mgr, 20);
    let id = h.host_id.clone();
    let s = stop_child(cx, &mut h.swtpm, 10);
    println!(
        "INFO xhost host B (host id {id}) stopped: vTPMs stopped {stopped:?}; vtpmmgr (pid {}) exited on SIGTERM {m}; swtpm (pid {}) exited on SIGTERM {s}",
        h.mgr.id(),
        h.swtpm.id()
    );
}

/// The registry row of guest `name` as `xl-vtpm list --json` under `env` shows it.
pub(super) fn row(cx: &Cx, env: &[(&str, &str)], name: &str) -> Value {
    let o = on(env, &["xl-vtpm", "--json", "list"]).secs(60).split().run(cx);
    xen::parse_json(&o.stdout)
        .and_then(|v| v.as_array().and_then(|a| a.iter().find(|r| jf(r, "guest_name") == name).cloned()))
        .unwrap_or(Value::Null)
}

/// `xl-vtpm vtpm list --json` under `env` names `uuid` running.
pub(super) fn vtpm_running(cx: &Cx, env: &[(&str, &str)], uuid: &str) -> bool {
    vtpm_row(cx, env, uuid).ok().flatten().is_some_and(|r| jf(&r, "state") == "running")
}

/// `uuid`'s row in `xl-vtpm vtpm list --json` under `env` (the identities its manager holds):
/// None when it is not listed; Err when the list could not be read.
fn vtpm_row(cx: &Cx, env: &[(&str, &str)], uuid: &str) -> Result<Option<Value>, String> {
    let o = on(env, &["xl-vtpm", "--json", "vtpm", "list"]).secs(60).split().run(cx);
    match xen::parse_json(&o.stdout).and_then(|v| v.as_array().cloned()) {
        Some(rows) if o.ok() => Ok(rows.into_iter().find(|r| jf(r, "uuid") == uuid)),
        _ => Err(format!("xl-vtpm vtpm list rc={}: {}", o.rc, o.tail1(2))),
    }
}

/// The running vTPM process of a listed row (`runtime.pid`).
fn row_pid(r: &Value) -> Option<u32> {
    r.get("runtime")?.get("pid")?.as_u64().and_then(|p| u32::try_from(p).ok())
}

/// The largest gap (ms) between the guest's ticks after `from`.
fn max_gap_ms(name: &str, from: f64) -> Option<i64> {
    let t: Vec<f64> = ticks(name).into_iter().filter(|x| *x >= from).collect();
    t.windows(2).map(|w| ((w[1] - w[0]) * 1000.0) as i64).max()
}

/// A host policy file (`{"0": "hex", …}`) with PCR 0's value replaced by `11…11`.
pub fn wrong_pcr0(policy: &str) -> Option<String> {
    let mut v: Value = serde_json::from_str(policy).ok()?;
    let m = v.as_object_mut()?;
    m.get("0")?;
    m.insert("0".into(), Value::String("11".repeat(32)));
    Some(v.to_string())
}

/// `(offer made, offer withdrawn)` lines of host B's manager log that name vTPM `uuid`: each as
/// its offer id.
fn b_offers(uuid: &str) -> (Vec<String>, Vec<String>) {
    let log = xen::read_text(MGR_LOG);
    let pick = |what: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(what) && l.contains(&format!("vtpm={uuid}")))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("offer=")).map(str::to_string))
            .collect()
    };
    (pick("transfer offer made"), pick("transfer offer withdrawn"))
}

/// The refusal round, before the guest's first move: `xl-vtpm migrate mig-x host-b …` with a
/// policy whose PCR 0 host B does not have must exit 6 naming the destination's PCRs, with
/// nothing moved — the guest the same domain on A, its vTPM process the same and serving (PCR 16
/// as it was, a fresh quote), the registry naming host A, host B holding no identity of it and no
/// incoming config, its offer withdrawn. Returns false when the guest is no longer on A as it
/// was (the moves that follow would speak about something else).
fn refused_round(cx: &Cx, e: &mut Errs, uuid: &str, ek: &str, pcr: &str) -> bool {
    let (a, b) = (a_env(), b_env());
    let t0 = std::time::Instant::now();
    let bad = match wrong_pcr0(&xen::read_text(B_POLICY)) {
        Some(p) if std::fs::write(B_POLICY_WRONG, &p).is_ok() => p,
        _ => {
            e.add(format!("cannot write {B_POLICY_WRONG} from {B_POLICY}"));
            return false;
        }
    };
    println!("INFO migrate-xhost refusal round: {B_POLICY_WRONG} = {bad}");
    let before = xen::domid(XG).unwrap_or_default();
    let pid_before = vtpm_row(cx, &a, uuid).ok().flatten().as_ref().and_then(row_pid);
    let from = last_tick(XG);
    let h = Hop { round: 0, from: &a, from_name: A_HOST, to: &b, to_name: B_HOST, policy: B_POLICY_WRONG };
    let receiver = format!("{} xl-vtpm migrate-receive", env_words(h.to));
    let argv = h.argv(&receiver);
    println!("migrate-xhost refusal round: {} (source env: {})", argv.join(" "), env_words(h.from));
    let tm = std::time::Instant::now();
    let o = on(h.from, &argv.iter().map(String::as_str).collect::<Vec<_>>()).secs(360).save_split("/tmp/xl-mig-x-refused.out", "/tmp/xl-mig-x-refused.out.err").run(cx);
    let took = tm.elapsed().as_millis();
    show("xl-vtpm migrate (cross-host, wrong PCR policy)", &o.all());
    let all = o.all();
    e.check(
        "migrate-xhost-refused-policy-exit",
        o.rc == 6 && all.contains("destination host PCRs") && all.contains("nothing moved") && !all.contains("panicked"),
        format!("xl-vtpm migrate {XG} {B_HOST} --host-pcrs-policy {B_POLICY_WRONG} (PCR 0 = 11…11): rc={} in {took} ms (want 6, naming the destination host PCRs and nothing moved): {}", o.rc, o.tail1(2)),
    );
    let now = xen::domid(XG).unwrap_or_default();
    let same = !before.is_empty() && now == before;
    e.check("migrate-xhost-refused-policy-domid", same, format!("xl domid {XG} before {} after {} (the same domain on host A)", none(&before), none(&now)));
    let ra = vtpm_row(cx, &a, uuid);
    let pid_after = ra.as_ref().ok().and_then(|r| r.as_ref()).and_then(row_pid);
    e.check(
        "migrate-xhost-refused-policy-vtpm",
        pid_before.is_some() && pid_after == pid_before && pid_up(pid_after) && ra.as_ref().ok().and_then(|r| r.as_ref()).is_some_and(|r| jf(r, "state") == "running"),
        format!("host A's xl-vtpm vtpm list: {uuid} vtpm-domain pid before {pid_before:?} after {pid_after:?}, alive {}, state {}", pid_up(pid_after), ra.as_ref().map_or_else(|w| w.clone(), |r| r.as_ref().map_or("(not listed)".into(), |r| jf(r, "state")))),
    );
    let gap = max_gap_ms(XG, from);
    println!("INFO migrate-xhost refusal round: largest gap between the guest's ticks during it: {} ms (it was never paused)", gap.map_or("none".into(), |g| g.to_string()));
    if !same {
        return false;
    }
    let a1 = guest_cmd(cx, XG, 9, &format!("migcheck:{}", xen::nonce(16)), 240);
    println!("[{XG}] {a1}");
    e.check("migrate-xhost-refused-policy-pcr16", field(&a1, "pcr16") == pcr, format!("in the guest after the refusal: PCR 16 before {pcr} after {} (unchanged)", none(&field(&a1, "pcr16"))));
    e.check(
        "migrate-xhost-refused-policy-tpm",
        !ek.is_empty() && field(&a1, "ek") == ek && field(&a1, "persistent") == "kept" && field(&a1, "nv") == "kept" && field(&a1, "quote") == "verified",
        format!("the guest's TPM answers: EK {} ({}), 0x81000010 {}, NV {}, a fresh AK quote {}", none(&field(&a1, "ek")), if field(&a1, "ek") == ek { "the same" } else { "NOT the same" }, none(&field(&a1, "persistent")), none(&field(&a1, "nv")), none(&field(&a1, "quote"))),
    );
    let (ra, rb) = (row(cx, &a, XG), row(cx, &b, XG));
    e.check(
        "migrate-xhost-refused-policy-registry",
        jf(&ra, "host") == A_HOST && jf(&rb, "host") == A_HOST && jf(&ra, "state") == "running" && jf(&ra, "guest_domid") == before,
        format!("xl-vtpm list under A's env names host {}, under B's {} (state {}, guest domid {})", none(&jf(&ra, "host")), none(&jf(&rb, "host")), jf(&ra, "state"), jf(&ra, "guest_domid")),
    );
    let lb = vtpm_row(cx, &b, uuid);
    e.check(
        "migrate-xhost-refused-policy-b-no-identity",
        matches!(lb, Ok(None)),
        format!("B's xl-vtpm vtpm list names {uuid}: {}", match &lb { Ok(None) => "no".to_string(), Ok(Some(r)) => format!("YES (state {})", jf(r, "state")), Err(w) => w.clone() }),
    );
    let left: Vec<String> = [format!("{B_RUN}/guests/{XG}.cfg"), format!("{B_RUN}/guests/{XG}.incoming.cfg"), format!("{B_STATE}/migrate-save/{uuid}.xlsave"), format!("{A_STATE}/migrate-save/{uuid}.xlsave")]
        .into_iter()
        .filter(|f| std::path::Path::new(f).exists())
        .collect();
    e.check("migrate-xhost-refused-policy-no-leftover", left.is_empty(), format!("left behind of the announced move (B's guests/{XG}.cfg, {XG}.incoming.cfg, either host's save file): {left:?}"));
    let (made, gone) = b_offers(uuid);
    e.check(
        "migrate-xhost-refused-policy-offer-cancelled",
        made.len() == 1 && gone == made,
        format!("{MGR_LOG}: offers made for {uuid} {made:?}, withdrawn {gone:?}"),
    );
    println!("PERF migrate-xhost-refusal-round-ms={} (the refused move {took} ms, then the checks)", t0.elapsed().as_millis());
    true
}

/// One cross-host move of the guest: `xl-vtpm --json migrate mig-x TO --non-live --ssh
/// SSH_LOCAL --receiver "<env of TO> xl-vtpm migrate-receive" --ek-ca … --ek-intermediate …
/// --host-pcrs-policy POLICY`, run under `from`'s environment.
struct Hop<'a> {
    round: u32,
    from: &'a [(&'a str, &'a str)],
    from_name: &'a str,
    to: &'a [(&'a str, &'a str)],
    to_name: &'a str,
    policy: &'a str,
}

impl Hop<'_> {
    fn argv(&self, receiver: &str) -> Vec<String> {
        [
            "xl-vtpm", "--json", "migrate", XG, self.to_name, "--non-live", "--ssh", SSH_LOCAL, "--receiver", receiver, "--ek-ca", VENDOR_ROOT, "--ek-intermediate", VENDOR_INT, "--host-pcrs-policy", self.policy,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// migrate-xhost: the guest with its dom0-process vTPM moved to host B and back.
fn guest_move(cx: &Cx) -> Outcome {
    let mut e = Errs::default();
    let (a, b) = (a_env(), b_env());
    // the cross-host composition exists once xl-vtpm migrate takes a receiver
    let help = on(&a, &["xl-vtpm", "migrate", "--help"]).secs(60).run(cx).all();
    let have = help.contains("--receiver");
    println!("INFO migrate-xhost xl-vtpm migrate --help names --receiver: {have}");
    if xen::domid(XG).is_some() {
        return Outcome::fail(format!("{XG} runs already (an earlier run's leftover)"));
    }
    if let Err(w) = write_cfg(XCFG, XG, "role=mig hold=1 tick=1", Some("0")) {
        return Outcome::fail(w);
    }
    let o = on(&a, &["xl-vtpm", "create", XCFG]).secs(180).save("/tmp/xl-mig-x-create.out").run(cx);
    if !o.ok() {
        show_tail("xl-vtpm create mig-x", &o.all(), 20);
        cleanup(cx, "");
        return Outcome::fail(format!("xl-vtpm create {XCFG} (host A) rc={}", o.rc));
    }
    let r0 = row(cx, &a, XG);
    let uuid = jf(&r0, "vtpm_uuid");
    e.check("migrate-xhost-created", jf(&r0, "host") == A_HOST && jf(&r0, "state") == "running", format!("{XG} on host A: registry host {}, state {}, vTPM {} (pid {})", none(&jf(&r0, "host")), jf(&r0, "state"), none(&uuid), jf(&r0, "vtpm_pid")));
    if !cx.wait_every(300, Duration::from_secs(1), || cons(XG).contains("GUEST-HOLD")) {
        e.add("no-GUEST-HOLD");
    }
    let c = cons(XG);
    for m in super::guest_checks(&c, XG, "boot", &["tpm0", "startup", "getrandom", "ek", "persistent", "nv-write", "pcrextend"]) {
        e.add(m);
    }
    let ek = ek_hash(&c);
    let pcr = after_prefix(&c, "GUEST-PCR16 ").unwrap_or_default().trim().to_string();
    e.check("migrate-xhost-pcr16-extended", pcr == PCR_AFTER, format!("PCR 16 before the move {}", none(&pcr)));
    if !e.is_empty() {
        show_tail("mig-x console (GUEST lines)", &cons(XG).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 25);
        cleanup(cx, &uuid);
        return e.verdict("");
    }
    // first a move that must be refused before the guest leaves (host B's PCRs miss the policy)
    let on_a = refused_round(cx, &mut e, &uuid, &ek, &pcr);
    if !on_a || !e.is_empty() {
        show_tail("mig-x console (GUEST lines)", &cons(XG).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 25);
        cleanup(cx, &uuid);
        return e.verdict("");
    }
    let hops = [
        Hop { round: 1, from: &a, from_name: A_HOST, to: &b, to_name: B_HOST, policy: B_POLICY },
        Hop { round: 2, from: &b, from_name: B_HOST, to: &a, to_name: A_HOST, policy: A_POLICY },
    ];
    let mut downs = Vec::new();
    for h in &hops {
        let receiver = format!("{} xl-vtpm migrate-receive", env_words(h.to));
        let argv = h.argv(&receiver);
        println!("migrate-xhost round {}: {} (source env: {})", h.round, argv.join(" "), env_words(h.from));
        let before = xen::domid(XG).unwrap_or_default();
        let from = last_tick(XG);
        let mut cmd = on(h.from, &argv.iter().map(String::as_str).collect::<Vec<_>>());
        let save = format!("/tmp/xl-mig-x-{}.out", h.round);
        cmd = cmd.secs(360).save_split(&save, &format!("{save}.err"));
        let o = cmd.run(cx);
        let v = json(&o);
        show("xl-vtpm migrate (cross-host)", &o.all());
        let new = xen::domid(XG).unwrap_or_default();
        if !e.check(
            "migrate-xhost-xl-vtpm",
            o.ok() && !new.is_empty() && new != before,
            format!("round {} {} → {}: rc={}{} domid {before} -> {}; JSON {}", h.round, h.from_name, h.to_name, o.rc, if o.timed_out { " (killed at its limit)" } else { "" }, none(&new), if v.is_null() { "none".into() } else { v.to_string() }),
        ) {
            let why = if !have {
                format!(
                    "xl-vtpm migrate {XG} {} (cross-host, --receiver) exited {}: this xl-vtpm has no cross-host migrate yet (its --help names no --receiver): {}",
                    h.to_name,
                    o.rc,
                    o.tail1(2)
                )
            } else {
                format!("xl-vtpm migrate {XG} {} --non-live --ssh {SSH_LOCAL} --receiver … exited {}{}: {}", h.to_name, o.rc, if o.timed_out { " (killed after 360 s)" } else { "" }, o.tail1(3))
            };
            show_tail("mig-x console (GUEST lines)", &cons(XG).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 10);
            cleanup(cx, &uuid);
            return Outcome::fail(why);
        }
        match downtime(cx, XG, from) {
            Some(ms) => {
                println!(
                    "PERF p6-xhost-downtime-ms-r{}={ms} (largest gap between the guest's 0.1 s ticks; {} → {} in one dom0, non-live; xl save {} ms, xl restore {} ms, xl-vtpm migrate {} ms)",
                    h.round,
                    h.from_name,
                    h.to_name,
                    jf(&v, "xl_save_ms"),
                    jf(&v, "xl_restore_ms"),
                    jf(&v, "total_ms")
                );
                downs.push(ms);
            }
            None => e.add(format!("no-ticks-after-round-{}", h.round)),
        }
        let a1 = guest_cmd(cx, XG, h.round, &format!("migcheck:{}", xen::nonce(16)), 240);
        println!("[{XG}] {a1}");
        let t = format!("round {} ({} → {})", h.round, h.from_name, h.to_name);
        e.check("migrate-xhost-guest-ek", !ek.is_empty() && field(&a1, "ek") == ek, format!("{t}: EK sha256 before {ek} after {}", field(&a1, "ek")));
        e.check("migrate-xhost-guest-persistent", field(&a1, "persistent") == "kept", format!("{t}: 0x81000010 still there and readable"));
        e.check("migrate-xhost-guest-nv", field(&a1, "nv") == "kept", format!("{t}: NV 0x01500016 contents kept"));
        e.check("migrate-xhost-guest-pcr16", field(&a1, "pcr16") == pcr, format!("{t}: PCR 16 before {pcr} after {} (unchanged)", field(&a1, "pcr16")));
        e.check("migrate-xhost-guest-quote", field(&a1, "quote") == "verified", format!("{t}: a fresh ECC AK quote over PCR 16 verified"));
        let (ra, rb) = (row(cx, &a, XG), row(cx, &b, XG));
        e.check(
            "migrate-xhost-registry",
            jf(&ra, "host") == h.to_name && jf(&rb, "host") == h.to_name && jf(&ra, "state") == "running",
            format!("{t}: xl-vtpm list under A's env names host {}, under B's {} (state {}, guest domid {})", none(&jf(&ra, "host")), none(&jf(&rb, "host")), jf(&ra, "state"), jf(&ra, "guest_domid")),
        );
        let runs = vtpm_running(cx, h.to, &uuid);
        e.check("migrate-xhost-vtpm-runs", runs, format!("{t}: {}'s xl-vtpm vtpm list names {uuid} running: {runs}", h.to_name));
        let o = on(h.from, &["xl-vtpm", "vtpm", "start", &uuid]).secs(60).run(cx);
        e.check(
            "migrate-xhost-refused",
            !o.ok() && o.all().contains(h.to_name),
            format!("{t}: {}'s xl-vtpm vtpm start rc={} (want a refusal naming {}): {}", h.from_name, o.rc, h.to_name, o.tail1(2)),
        );
        if !e.is_empty() {
            break;
        }
    }
    // then two moves cut short by killing the source (`kill -9`), each finished with --finish
    let mut killed = String::new();
    if e.is_empty() {
        killed = kill_rounds(cx, &mut e, &uuid, &ek, &pcr);
    }
    if !e.is_empty() {
        show_tail("mig-x console (GUEST lines)", &cons(XG).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 25);
    }
    cleanup(cx, &uuid);
    e.verdict(format!(
        "{XG} moved to {B_HOST} and back with its vTPM (EK/key/NV/PCR 16 kept, quote verified, the registry names the holder, the other host refuses); downtime seen by the guest {downs:?} ms; {killed}"
    ))
}

/// The processes (pids) whose command line runs `xl-vtpm migrate-receive` (a receiver, or the
/// transport's shells around it).
pub(super) fn receivers() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id();
    rd.filter_map(|d| d.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| *p != me)
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains("xl-vtpm migrate-receive")))
        .collect()
}

/// `xl list NAME`'s state column (`--p---` while paused), if the domain exists.
pub(super) fn xl_state(name: &str) -> Option<String> {
    let o = Cmd::new(&["xl", "list", name]).split().run_for(Duration::from_secs(30));
    if !o.ok() {
        return None;
    }
    o.stdout.lines().nth(1).and_then(|l| l.split_whitespace().nth(4)).map(str::to_string)
}

/// Lines of host B's manager log containing `what` and naming vTPM `uuid`.
pub(super) fn b_log_count(what: &str, uuid: &str) -> usize {
    xen::read_text(MGR_LOG).lines().filter(|l| l.contains(what) && l.contains(&format!("vtpm={uuid}"))).count()
}

/// What a killed move of guest `guest` may not leave once finished: the move record, either
/// saved guest, B's incoming config.
pub(super) fn leftovers(uuid: &str, guest: &str) -> Vec<String> {
    [
        format!("{A_STATE}/migrate-save/{uuid}.move.json"),
        format!("{A_STATE}/migrate-save/{uuid}.xlsave"),
        format!("{B_STATE}/migrate-save/{uuid}.xlsave"),
        format!("{B_RUN}/guests/{guest}.incoming.cfg"),
    ]
    .into_iter()
    .filter(|f| std::path::Path::new(f).exists())
    .collect()
}

/// The cross-host move A → B started in the background (`XVTPM_LOG=info`), its output in
/// `/tmp/xl-mig-x-kill<tag>.out`/`.err` (the receiver's stderr lands in `.err` too).
fn start_move(tag: &str) -> Result<(Child, String), String> {
    let h = Hop { round: 0, from: &[], from_name: A_HOST, to: &[], to_name: B_HOST, policy: B_POLICY };
    let receiver = format!("{} xl-vtpm migrate-receive", env_words(&b_env()));
    spawn_move(&h.argv(&receiver), &format!("/tmp/xl-mig-x-kill{tag}.out"), &format!("migrate-xhost kill round {tag}"))
}

/// Runs `argv` (a move from A) in the background under A's environment with `XVTPM_LOG=info`,
/// stdout in `out`, stderr (the receiver's too) in `out.err`, whose name it returns.
pub(super) fn spawn_move(argv: &[String], out: &str, what: &str) -> Result<(Child, String), String> {
    println!("{what}: {} & (source env: {})", argv.join(" "), env_words(&a_env()));
    let err = format!("{out}.err");
    let f = std::fs::File::create(out).map_err(|e| format!("{out}: {e}"))?;
    let f2 = std::fs::File::create(&err).map_err(|e| format!("{err}: {e}"))?;
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]).env("NO_COLOR", "1").env("XVTPM_LOG", "info").stdin(Stdio::null()).stdout(f).stderr(f2);
    for (k, v) in a_env() {
        c.env(k, v);
    }
    c.spawn().map(|ch| (ch, err)).map_err(|e| format!("xl-vtpm migrate: cannot start: {e}"))
}

/// `kill -9` of the source; whether it still ran (None) or had exited (its code) before.
pub(super) fn kill_source(c: &mut Child) -> Option<i32> {
    let before = match c.try_wait() {
        Ok(Some(s)) => Some(s.code().unwrap_or(-1)),
        _ => None,
    };
    crate::cmd::kill_child(c);
    before
}

/// `xl-vtpm --json migrate mig-x host-b --finish` with the move's transport and checks (A's env).
fn finish(cx: &Cx, tag: &str) -> Output {
    let receiver = format!("{} xl-vtpm migrate-receive", env_words(&b_env()));
    let argv = [
        "xl-vtpm", "--json", "migrate", XG, B_HOST, "--finish", "--ssh", SSH_LOCAL, "--receiver", &receiver, "--ek-ca", VENDOR_ROOT, "--ek-intermediate", VENDOR_INT, "--host-pcrs-policy", B_POLICY,
    ];
    println!("migrate-xhost kill round {tag}: {}", argv.join(" "));
    let out = format!("/tmp/xl-mig-x-finish{tag}.out");
    let o = on(&a_env(), &argv).env("XVTPM_LOG", "info").secs(360).save_split(&out, &format!("{out}.err")).run(cx);
    show("xl-vtpm migrate --finish", &o.all());
    o
}

/// After a kill: the receiver (and its transport's shells) end within 60 s; the lines it wrote.
fn receiver_end(cx: &Cx, e: &mut Errs, name: &str, err: &str) -> bool {
    let t = std::time::Instant::now();
    let ended = cx.wait_every(60, Duration::from_millis(200), || receivers().is_empty());
    let left = receivers();
    let said: Vec<String> = xen::read_text(err).lines().filter(|l| l.contains("stays paused") || l.contains("ended before its resume") || l.contains("ERROR") || l.contains("WARN")).map(str::to_string).collect();
    e.check(name, ended, format!("the receiver ended {} ms after the kill: {ended} (processes left: {left:?}); its lines: {said:?}", t.elapsed().as_millis()))
}

/// The guest's TPM after a finished round: EK, key, NV, PCR 16 and a fresh quote (CHECK
/// `<pre>-tpm`, `<pre>-pcr16`).
fn tpm_checks(cx: &Cx, e: &mut Errs, pre: &str, n: u32, ek: &str, pcr: &str, t: &str) {
    let a1 = guest_cmd(cx, XG, n, &format!("migcheck:{}", xen::nonce(16)), 240);
    println!("[{XG}] {a1}");
    e.check(&format!("{pre}-pcr16"), field(&a1, "pcr16") == pcr, format!("{t}: PCR 16 before {pcr} after {} (unchanged)", none(&field(&a1, "pcr16"))));
    e.check(
        &format!("{pre}-tpm"),
        !ek.is_empty() && field(&a1, "ek") == ek && field(&a1, "persistent") == "kept" && field(&a1, "nv") == "kept" && field(&a1, "quote") == "verified",
        format!("{t}: EK {} ({}), 0x81000010 {}, NV {}, a fresh AK quote {}", none(&field(&a1, "ek")), if field(&a1, "ek") == ek { "the same" } else { "NOT the same" }, none(&field(&a1, "persistent")), none(&field(&a1, "nv")), none(&field(&a1, "quote"))),
    );
}

/// One kill round before the identity moved (`tag` 1: kill once `mig-x--incoming` exists; 1b,
/// `after_suspend`: once A's vTPM process ended, i.e. B's restore answered and the source
/// suspended the vTPM, before the export reached B). Returns (the guest is on A, A's registry
/// row, a summary).
#[allow(clippy::too_many_arguments)]
fn arrive_round(cx: &Cx, e: &mut Errs, uuid: &str, ek: &str, pcr: &str, tag: &str, after_suspend: bool, n: u32) -> (bool, Value, String) {
    let (a, b) = (a_env(), b_env());
    let incoming = format!("{XG}--incoming");
    let pre = format!("migrate-xhost-kill{tag}");
    let t0 = std::time::Instant::now();
    let pid_before = vtpm_row(cx, &a, uuid).ok().flatten().as_ref().and_then(row_pid);
    let (mut src, err) = match start_move(tag) {
        Ok(x) => x,
        Err(w) => {
            e.add(w);
            return (false, Value::Null, String::new());
        }
    };
    let b_save = format!("{B_STATE}/migrate-save/{uuid}.xlsave");
    let mut seen = cx.wait_every(360, Duration::from_millis(20), || xen::domid(&incoming).is_some() || !up(&mut src));
    if after_suspend && seen {
        // B's restore answered, the source suspended A's vTPM (its process ended): the export
        // and the import are next
        seen = cx.wait_every(360, Duration::from_millis(2), || !pid_up(pid_before) || !up(&mut src));
    }
    let restoring = std::path::Path::new(&b_save).exists();
    // (read before the kill: the receiver may destroy its copy within milliseconds of it)
    let state = xl_state(&incoming);
    let exited = kill_source(&mut src);
    let at = t0.elapsed().as_millis();
    e.check(
        &format!("{pre}-arrived"),
        seen && exited.is_none() && state.as_deref().is_some_and(|s| s.contains('p')),
        format!(
            "source xl-vtpm migrate (pid {}) killed -9 {at} ms after its start, once {incoming} existed{} (seen {seen}; xl list state {}; B's save file still there, i.e. xl restore -p running: {restoring}); it {}",
            src.id(),
            if after_suspend { format!(" and A's vTPM process {pid_before:?} had ended (suspended by the source after B's restore answered)") } else { String::new() },
            none(&state.clone().unwrap_or_default()),
            exited.map_or("still ran".to_string(), |c| format!("HAD EXITED rc={c} before the kill"))
        ),
    );
    let ended = receiver_end(cx, e, &format!("{pre}-receiver-ended"), &err);
    let copy = xl_state(&incoming);
    let b_copy = xen::domid(XG);
    e.check(
        &format!("{pre}-copy-destroyed"),
        ended && copy.is_none() && b_copy.is_none(),
        format!("after the receiver ended: {incoming} {} (want gone: the identity is still on A), a domain {XG} {}", copy.map_or("gone".into(), |s| format!("STILL THERE (state {s})")), b_copy.map_or("none".into(), |d| format!("domain {d}"))),
    );
    show_tail(&format!("kill round {tag}: source + receiver stderr"), &xen::read_text(&err), 15);
    let o = finish(cx, tag);
    let all = o.all();
    e.check(
        &format!("{pre}-finish"),
        o.rc == 1 && all.contains("never arrived") && all.contains("restored here"),
        format!("xl-vtpm migrate {XG} {B_HOST} --finish rc={} in {} ms (want 1, never arrived … restored here): {}", o.rc, o.elapsed.as_millis(), o.tail1(2)),
    );
    let d = xen::domid(XG).unwrap_or_default();
    let ra = vtpm_row(cx, &a, uuid);
    let pid_after = ra.as_ref().ok().and_then(|r| r.as_ref()).and_then(row_pid);
    let (rga, rgb) = (row(cx, &a, XG), row(cx, &b, XG));
    let on_a = !d.is_empty() && jf(&rga, "host") == A_HOST;
    e.check(
        &format!("{pre}-on-a"),
        on_a && jf(&rgb, "host") == A_HOST && jf(&rga, "state") == "running" && jf(&rga, "guest_domid") == d,
        format!("xl domid {XG} {}; the registry under A's env names host {} (state {}, guest domid {}), under B's {}", none(&d), none(&jf(&rga, "host")), jf(&rga, "state"), jf(&rga, "guest_domid"), none(&jf(&rgb, "host"))),
    );
    e.check(
        &format!("{pre}-vtpm-a"),
        pid_up(pid_after) && ra.as_ref().ok().and_then(|r| r.as_ref()).is_some_and(|r| jf(r, "state") == "running"),
        format!(
            "host A's vTPM {uuid} runs: pid before the round {pid_before:?}, after {pid_after:?} ({}), alive {}",
            if pid_after.is_some() && pid_after == pid_before { "the same process: never suspended" } else { "ANOTHER process" },
            pid_up(pid_after)
        ),
    );
    if !d.is_empty() {
        tpm_checks(cx, e, &pre, n, ek, pcr, "after the --finish restored it on A");
    }
    // B holds no live copy: none at all, or the copy retired there by an earlier move (its
    // start refused, naming host-a), never one that runs or starts.
    let lb = vtpm_row(cx, &b, uuid);
    let (live, why) = match &lb {
        Ok(None) => (false, "not listed".to_string()),
        Ok(Some(r)) if jf(r, "state") == "running" => (true, "listed RUNNING".to_string()),
        Ok(Some(_)) => {
            let r = on(&b, &["xl-vtpm", "vtpm", "start", uuid]).secs(60).run(cx);
            (r.ok() || !r.all().contains(A_HOST), format!("listed (a copy retired by an earlier move); its start rc={} (want a refusal naming {A_HOST}): {}", r.rc, r.tail1(2)))
        }
        Err(w) => (true, w.clone()),
    };
    e.check(&format!("{pre}-b-no-identity"), !live, format!("B's xl-vtpm vtpm list and start for {uuid}: {why}"));
    let left = leftovers(uuid, XG);
    e.check(&format!("{pre}-no-leftover"), left.is_empty(), format!("move record, save files, B's incoming config left: {left:?}"));
    let r1 = t0.elapsed().as_millis();
    println!("PERF {pre}-round-ms={r1}");
    let s = format!("kill round {tag} ({}): --finish rc {} in {r1} ms", if after_suspend { "after the suspend, before the import" } else { "during B's restore" }, o.rc);
    (on_a, rga, s)
}

/// The kill rounds (the guest on A before them): the source killed (1) once the guest started
/// arriving on B (`mig-x--incoming` exists, its `xl restore -p` running) and (1b) once the
/// source suspended A's vTPM after that restore (its process ended), both before its identity
/// moved — the
/// receiver is to destroy its copy and `--finish` to restore the guest on A (exit 1, "never
/// arrived … restored here"); (2) once B's manager imported the identity — the receiver leaves
/// the copy paused, `--finish` completes the move (exit 0). A round that leaves the guest on B
/// moves it back for the next. Returns a summary for the phase's reason.
fn kill_rounds(cx: &Cx, e: &mut Errs, uuid: &str, ek: &str, pcr: &str) -> String {
    let (a, b) = (a_env(), b_env());
    let incoming = format!("{XG}--incoming");
    let mut sum = Vec::new();
    for (tag, after_suspend, n) in [("1", false, 11), ("1b", true, 12)] {
        let (on_a, rga, s) = arrive_round(cx, e, uuid, ek, pcr, tag, after_suspend, n);
        sum.push(s);
        if !on_a {
            // the guest is not on A as the round wants it (e.g. the finish moved it to B): the
            // second round starts from A, so bring it back first
            if jf(&rga, "host") == B_HOST && xen::domid(XG).is_some() {
                let h = Hop { round: 0, from: &b, from_name: B_HOST, to: &a, to_name: A_HOST, policy: A_POLICY };
                let argv = h.argv(&format!("{} xl-vtpm migrate-receive", env_words(&a)));
                let o = on(&b, &argv.iter().map(String::as_str).collect::<Vec<_>>()).secs(360).save_split("/tmp/xl-mig-x-back.out", "/tmp/xl-mig-x-back.out.err").run(cx);
                println!("INFO migrate-xhost kill round {tag} left the guest on {B_HOST}: moved back to {A_HOST} for the next round: rc={} {}", o.rc, o.tail1(2));
                if !o.ok() {
                    return sum.join("; ");
                }
            } else {
                println!("INFO migrate-xhost kill rounds stop: the guest is not on {A_HOST} after round {tag}");
                return sum.join("; ");
            }
        }
    }
    // ---- 2: after the identity moved (B's manager imported it), before the resume
    let mut note = String::new();
    for (try_, marker) in [(1, "vTPM imported"), (2, "imported vTPM's state file written")] {
        let t0 = std::time::Instant::now();
        let n0 = b_log_count(marker, uuid);
        let tag = if try_ == 1 { "2".to_string() } else { "2b".to_string() };
        let (mut src, err) = match start_move(&tag) {
            Ok(x) => x,
            Err(w) => {
                e.add(w);
                break;
            }
        };
        let seen = cx.wait_every(360, Duration::from_millis(10), || b_log_count(marker, uuid) > n0 || !up(&mut src));
        let exited = kill_source(&mut src);
        let at = t0.elapsed().as_millis();
        let landed = format!(
            "source xl-vtpm migrate (pid {}) killed -9 {at} ms after its start, once {MGR_LOG} showed `{marker} vtpm={uuid}` (seen {seen}); it {}",
            src.id(),
            exited.map_or("still ran".to_string(), |c| format!("HAD EXITED rc={c} before the kill"))
        );
        if exited == Some(0) && try_ == 1 {
            println!("INFO migrate-xhost-kill2 the kill came too late: {landed}; the move had completed. Again, killing at the earlier marker `imported vTPM's state file written`");
            note = format!(" (first try: the move completed before the kill at `{marker}`)");
            // back to A for the retry
            let _ = receiver_end(cx, &mut Errs::default(), "migrate-xhost-kill2-late-receiver-ended", &err);
            let h = Hop { round: 0, from: &b, from_name: B_HOST, to: &a, to_name: A_HOST, policy: A_POLICY };
            let argv = h.argv(&format!("{} xl-vtpm migrate-receive", env_words(&a)));
            let o = on(&b, &argv.iter().map(String::as_str).collect::<Vec<_>>()).secs(360).save_split("/tmp/xl-mig-x-back2.out", "/tmp/xl-mig-x-back2.out.err").run(cx);
            println!("INFO migrate-xhost moved back to {A_HOST} for the retry: rc={} {}", o.rc, o.tail1(2));
            if o.ok() {
                continue;
            }
            e.add("kill2-could-not-move-back");
            break;
        }
        e.check("migrate-xhost-kill2-identity-moved", seen && exited.is_none(), &landed);
        let ended = receiver_end(cx, e, "migrate-xhost-kill2-receiver-ended", &err);
        let copy = xl_state(&incoming);
        let resumed = xen::domid(XG);
        e.check(
            "migrate-xhost-kill2-copy-kept",
            ended && copy.as_deref().is_some_and(|s| s.contains('p')),
            format!(
                "after the receiver ended: {incoming} {} (want paused: the identity is on B), a domain {XG} {}",
                copy.map_or("GONE".into(), |s| format!("there, state {s}")),
                resumed.map_or("none".into(), |d| format!("domain {d} (resumed by the receiver before the kill reached it)"))
            ),
        );
        show_tail("kill round 2: source + receiver stderr", &xen::read_text(&err), 15);
        let o = finish(cx, &tag);
        let v = json(&o);
        e.check(
            "migrate-xhost-kill2-finish",
            o.ok() && jf(&v, "to_host") == B_HOST && !jf(&v, "to_domid").is_empty(),
            format!(
                "xl-vtpm migrate {XG} {B_HOST} --finish rc={} in {} ms (want 0): to_host {}, to_domid {}, transfer_ms {}, reconnect_ms {}; {}",
                o.rc,
                o.elapsed.as_millis(),
                none(&jf(&v, "to_host")),
                none(&jf(&v, "to_domid")),
                jf(&v, "transfer_ms"),
                jf(&v, "reconnect_ms"),
                if v.is_null() { o.tail1(3) } else { v.to_string() }
            ),
        );
        println!("INFO migrate-xhost-kill2 --finish tpm_kept {} (the source's vTPM was suspended before the export)", jf(&v, "tpm_kept"));
        let d = xen::domid(XG).unwrap_or_default();
        let (rga, rgb) = (row(cx, &a, XG), row(cx, &b, XG));
        e.check(
            "migrate-xhost-kill2-on-b",
            !d.is_empty() && xen::domid(&incoming).is_none() && jf(&rga, "host") == B_HOST && jf(&rgb, "host") == B_HOST && jf(&rga, "state") == "running" && jf(&rga, "guest_domid") == d,
            format!("xl domid {XG} {}; the registry under A's env names host {}, under B's {} (state {}, guest domid {})", none(&d), none(&jf(&rga, "host")), none(&jf(&rgb, "host")), jf(&rga, "state"), jf(&rga, "guest_domid")),
        );
        let runs = vtpm_running(cx, &b, uuid);
        e.check("migrate-xhost-kill2-vtpm-b", runs, format!("B's xl-vtpm vtpm list names {uuid} running: {runs}"));
        if !d.is_empty() {
            tpm_checks(cx, e, "migrate-xhost-kill2", 12 + try_, ek, pcr, "after the --finish completed the move to B");
        }
        let r = on(&a, &["xl-vtpm", "vtpm", "start", uuid]).secs(60).run(cx);
        e.check("migrate-xhost-kill2-a-refuses", !r.ok() && r.all().contains(B_HOST), format!("A's xl-vtpm vtpm start rc={} (want a refusal naming {B_HOST}): {}", r.rc, r.tail1(2)));
        let left = leftovers(uuid, XG);
        e.check("migrate-xhost-kill2-no-leftover", left.is_empty(), format!("move record, save files, B's incoming config left: {left:?}"));
        let r2 = t0.elapsed().as_millis();
        println!("PERF migrate-xhost-kill2-round-ms={r2}");
        sum.push(format!("kill round 2 (after the identity moved{note}): --finish rc {}, tpm_kept {}, in {r2} ms", o.rc, jf(&v, "tpm_kept")));
        break;
    }
    sum.join("; ")
}

/// Nothing of migrate-xhost may outlive it: the guest destroyed where it runs (A's env, then B's),
/// its pair and identity removed on both hosts (later phases' registry checks speak about theirs).
fn cleanup(cx: &Cx, uuid: &str) {
    let (a, b) = (a_env(), b_env());
    for env in [&a, &b] {
        if xen::domid(XG).is_some() {
            let o = on(env, &["xl-vtpm", "destroy", XG]).secs(120).run(cx);
            println!("INFO migrate-xhost cleanup: xl-vtpm destroy {XG} under {} rc={}", env_words(env), o.rc);
        }
    }
    xen::destroy_if_running(cx, XG);
    for env in [&a, &b] {
        if !uuid.is_empty() && vtpm_running(cx, env, uuid) {
            let _ = on(env, &["xl-vtpm", "vtpm", "stop", uuid]).secs(60).run(cx);
        }
    }
    let rr = on(&a, &["xl-vtpm", "registry", "remove", XG, "--yes"]).secs(60).run(cx);
    if !rr.ok() {
        show_tail("xl-vtpm registry remove", &rr.all(), 3);
    }
    let mut dels = Vec::new();
    // the identity only without its pair (a pair whose vTPM is gone would be drift)
    if !uuid.is_empty() && rr.ok() {
        for env in [&a, &b] {
            dels.push(on(env, &["xl-vtpm", "mgr", "vtpm", "del", uuid, "--yes"]).secs(60).run(cx).rc);
        }
    }
    println!("INFO migrate-xhost cleanup: registry remove {XG} rc={}; vTPM {} identity deleted on A, B: rc {dels:?}", rr.rc, none(uuid));
}

#[cfg(test)]
mod tests {
    use super::{pcr_policy, wrong_pcr0};

    #[test]
    fn the_wrong_policy_differs_in_pcr0_only() {
        let z = "0".repeat(64);
        let p = format!(r#"{{"0":"{z}","1":"{}"}}"#, "ab".repeat(32));
        let w: serde_json::Value = serde_json::from_str(&wrong_pcr0(&p).unwrap()).unwrap();
        assert_eq!(w["0"], "11".repeat(32));
        assert_eq!(w["1"], "ab".repeat(32));
        assert!(wrong_pcr0(r#"{"1":"00"}"#).is_none());
        assert!(wrong_pcr0("").is_none());
    }

    #[test]
    fn pcrread_output_becomes_the_policy() {
        let z = "0".repeat(64);
        let mut t = String::from("  sha256:\n");
        for i in 0..8 {
            t.push_str(&format!("    {i} : 0x{}\n", if i == 1 { "AB".repeat(32) } else { z.clone() }));
        }
        let p = pcr_policy(&t).unwrap();
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["1"], "ab".repeat(32));
        assert_eq!(v["7"], z);
        assert!(pcr_policy("  sha256:\n    0 : 0x00\n").is_none());
    }
}
