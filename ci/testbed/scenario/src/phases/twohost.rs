//! Two real Xen hosts (switch `xvtpm_twohost=1|0`): run.sh boots a second QEMU — Xen 4.17 and
//! the same dom0 image, its own swtpm as physical TPM — when host A's scenario asks for it
//! (`HOSTB-BOOT` on A's console). Each dom0 has two virtio-net NICs: the hosts' private link
//! (10.9.0.1 host-a, 10.9.0.2 host-b; QEMU `-netdev stream` over a Unix socket) and QEMU's
//! user-mode network, whose only way out is the fleet registry: a PostgreSQL server on the
//! machine running the testbed (run.sh starts a private cluster), reached at 10.0.2.100:5432
//! (`guestfwd` to its Unix socket). Both hosts' xl-vtpm use it (`XVTPM_REGISTRY`), as a fleet
//! does. Commands cross the link through `xvtpm-testbed ssh`/`sshd` (remote.rs), the stand-in for
//! ssh. Host B's dom0 runs `hostb_main` instead of the phases: Xen's daemons, its manager on its
//! own TPM (`vtpmmgr serve --xen`, `xl-vtpm mgr provision`), the sshd; then it waits for A's
//! `done`, dumps its logs on its console (run.sh keeps them under `dom0-b/`) and powers off.
//!
//!   twohost-setup   A's link and sshd; host B answers over the link; both registries are the
//!                   one PostgreSQL; each host's SHA-256 PCRs 0–7 read into the policy the other
//!                   checks a move against (B's read on B).
//!   migrate-2host   a PV guest with a dom0-process vTPM (`xl-vtpm create`, `role=mig hold=1
//!                   tick=1`: NV, 0x81000010, PCR 16 extended) moved A → B (`xl-vtpm migrate
//!                   mig-2 host-b --non-live --ssh "xvtpm-testbed ssh"`, run on A) and back
//!                   (the same command run on B): after each the guest runs on the destination
//!                   only, with the same EK, key, NV and PCR 16 and a fresh AK quote verified,
//!                   the registry names the holder, the holder's vTPM runs and the other host
//!                   refuses to start it; P6 (`PERF p6-2host-downtime-ms-rN`) from the guest's
//!                   ticks on both hosts' consoles.
//!   migrate-2host-dom  the same with the guest's vTPM in its own domain (`vtpm = [
//!                   "backend=vtpm-mig-2d" ]`): after each move a new vTPM domain of that name runs
//!                   on the destination and none on the source.
//!   libvirt-2host   libvirtd (libxl driver) on both hosts, listening on the link (`--listen`,
//!                   TCP without auth: the link joins two test VMs; host B with its own
//!                   `host_uuid`), both hooks on the fleet registry (`/etc/xvtpm-testbed/hook.env`:
//!                   libvirt clears a hook's environment): a guest without a vTPM started with
//!                   `virsh` on A and moved with `virsh migrate --p2p lv-m xen+tcp://host-b/system`
//!                   (non-live: this Xen has no PV log-dirty) runs on B, not on A, and ticks on
//!                   (P6 of a move without a vTPM); a guest with a vTPM (the hook's metadata),
//!                   without the hosts' `/etc/xvtpm/libvirt-migrate.json`, is refused by B's hook
//!                   (`migrate begin`, which libvirt 9.0 sends no XML: the guest's name is bound
//!                   to a vTPM in the registry), still runs on A with the same domid and vTPM
//!                   process and its TPM answers; libvirt's view of it, which its cancelled p2p
//!                   migration leaves `paused`, is mended by a libvirtd restart. With the
//!                   configuration on both hosts: A's policy for B that B does not meet refuses
//!                   at B's `migrate begin` (A's `libvirt-handoff --prepare`), the guest runs on
//!                   with its vTPM and PCR 16; then `virsh migrate --p2p` moves it to B and back
//!                   with its vTPM (the hooks pull the identity at `started`): the same EK, key,
//!                   NV and PCR 16, a fresh quote, the registry names the holder, the old host
//!                   refuses to start the vTPM (P6 `p6-2host-libvirt-vtpm-downtime-ms-rN`).

use std::time::Duration;

use serde_json::Value;

use super::migrate::{PCR_AFTER, field, write_cfg};
use super::xhost::{VENDOR_INT, VENDOR_ROOT, json, on, pcr_policy};
use super::{St, deadline, ek_hash, none};
use crate::cmd::{Cmd, Output, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, Runner};
use crate::xen::{self, after_prefix, jf};

/// The fleet registry, as both hosts reach it.
pub const REGISTRY: &str = "postgres://xvtpm@10.0.2.100:5432/xvtpm";
const HOSTS: [(&str, &str); 2] = [("host-a", "10.9.0.1"), ("host-b", "10.9.0.2")];
/// The scenario binary (both roles, and the ssh stand-in).
const ME: &str = "/usr/lib/xvtpm/testbed/xvtpm-testbed";
const SSHD_LOG: &str = "/var/log/xvtpm/sshd.log";
/// Host B ends when this exists (A's `done`).
const DONE: &str = "/run/xvtpm-testbed-hostb.done";
const POL_A: &str = "/etc/xvtpm-testbed/2host-a-pcrs.json";
const POL_B: &str = "/etc/xvtpm-testbed/2host-b-pcrs.json";
/// A guest moved between the hosts: its name and config, its vTPM's placement (`None`: a dom0
/// process; a name: its own domain of that name), the key of its checks and figures.
struct Mv {
    g: &'static str,
    cfg: &'static str,
    vdom: Option<&'static str>,
    key: &'static str,
}
const PV: Mv = Mv { g: "mig-2", cfg: "/etc/xen/mig-2.cfg", vdom: None, key: "2host" };
const DOM: Mv = Mv { g: "mig-2d", cfg: "/etc/xen/mig-2d.cfg", vdom: Some("vtpm-mig-2d"), key: "2host-dom" };

/// A host's xl-vtpm environment: its name and the fleet registry.
fn env(host: &str) -> [(&'static str, &str); 2] {
    [("XVTPM_HOST", host), ("XVTPM_REGISTRY", REGISTRY)]
}

fn ssh_cmd() -> String {
    format!("{ME} ssh")
}

/// `LINE` run on `host` through the link (`sh -c` there, under its sshd's environment).
fn rsh(cx: &Cx, host: &str, line: &str, secs: u64) -> Output {
    Cmd::new(&[ME, "ssh", host, line]).secs(secs).split().run(cx)
}

/// The dom0 side of the two NICs (by their MAC addresses, run.sh's): addresses, `/etc/hosts`,
/// the hostname; then the registry must answer.
fn net_up(cx: &Cx, me: usize) -> Outcome {
    for m in ["virtio_pci", "virtio_net"] {
        let _ = xen::modload(m);
    }
    let mac = |kind: u8| format!("52:54:00:0{kind:x}:00:0{}", me + 1);
    let find = |m: &str| {
        xen::dir_names("/sys/class/net").into_iter().find(|n| xen::read_text(&format!("/sys/class/net/{n}/address")).trim() == m)
    };
    let (mut user, mut link) = (None, None);
    cx.wait_until(30, || {
        user = find(&mac(0xa));
        link = find(&mac(0xb));
        user.is_some() && link.is_some()
    });
    let (Some(user), Some(link)) = (user, link) else {
        show("ip link", &Cmd::sh("ip link").run(cx).all());
        return Outcome::fail(format!("dom0 has no NICs with MACs {} (user) and {} (link) after loading virtio_net", mac(0xa), mac(0xb)));
    };
    let (host, ip) = HOSTS[me];
    let hosts: String = HOSTS.iter().map(|(h, a)| format!("{a} {h}\n")).collect();
    let _ = std::fs::write("/etc/hosts", format!("127.0.0.1 localhost\n{hosts}"));
    let _ = std::fs::write("/proc/sys/kernel/hostname", host);
    let script = format!(
        "ip link set lo up; ip link set {link} mtu 9000 || true; ip link set {user} up && ip addr add 10.0.2.15/24 dev {user} && ip link set {link} up && ip addr add {ip}/24 dev {link}"
    );
    let o = Cmd::new(&["sh", "-c", &script]).secs(30).run(cx);
    if !o.ok() {
        return Outcome::fail(o.failed(&script));
    }
    let reg = std::net::SocketAddr::from(([10, 0, 2, 100], 5432));
    let mut ok = false;
    cx.wait_until(30, || {
        ok = std::net::TcpStream::connect_timeout(&reg, Duration::from_secs(2)).is_ok();
        ok
    });
    if !ok {
        return Outcome::fail("the fleet registry 10.0.2.100:5432 does not answer (run.sh's PostgreSQL, QEMU's guestfwd)");
    }
    let mtu = xen::read_text(&format!("/sys/class/net/{link}/mtu")).trim().to_string();
    Outcome::pass(format!("{host}: {link} {ip}/24 (the hosts' link, MTU {mtu}), {user} 10.0.2.15/24 (QEMU user network: the registry at 10.0.2.100:5432 answers)"))
}

/// The sshd of this host on the link, under its xl-vtpm environment.
fn spawn_sshd(me: usize) -> Result<std::process::Child, String> {
    let (host, ip) = HOSTS[me];
    let f = std::fs::File::create(SSHD_LOG).map_err(|e| format!("{SSHD_LOG}: {e}"))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    std::process::Command::new(ME)
        .args(["sshd", ip, &format!("XVTPM_HOST={host}"), &format!("XVTPM_REGISTRY={REGISTRY}")])
        .stdin(std::process::Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| format!("{ME} sshd: {e}"))
}

/// Host B's dom0: Xen's daemons, its manager, the sshd; serves until A says done.
pub fn hostb_main() -> i32 {
    super::make_dirs();
    let dl: f64 = xen::cmdline_arg("xvtpm_deadline").and_then(|d| d.parse().ok()).unwrap_or(100000.0);
    let mut r = Runner::new(Duration::from_secs_f64((dl - super::up()).max(0.0)));
    let mut st = St::default();
    r.phase("hostb-dom0-up", deadline(180), super::base::dom0_up);
    r.phase("hostb-net", deadline(120), |cx| net_up(cx, 1));
    let mut sshd = None;
    r.phase("hostb-serve", deadline(400), |cx| {
        if !super::base::start_mgr(&mut st, "/var/log/xvtpm/vtpmmgr.log") || !super::base::mgr_wait_ready(cx, &mut st) {
            show_tail("vtpmmgr", &xen::read_text("/var/log/xvtpm/vtpmmgr.log"), 20);
            return Outcome::fail("vtpmmgr serve --xen on host B's TPM did not become ready");
        }
        // a vTPM domain that arrives gets its disk through a loop device and blkback
        let mut e = Errs::default();
        super::vtpmdom::load_block_modules(cx, &mut e);
        if !e.is_empty() {
            return Outcome::fail(format!("host B's block modules: {}", e.joined()));
        }
        let p = on(&env("host-b"), &["xl-vtpm", "mgr", "provision", "--yes"]).secs(180).save("/tmp/xl-hostb-provision.out").run(cx);
        if !p.ok() {
            return Outcome::fail(p.failed("xl-vtpm mgr provision --yes"));
        }
        match spawn_sshd(1) {
            Ok(c) => sshd = Some(c),
            Err(w) => return Outcome::fail(w),
        }
        Outcome::pass("vtpmmgr serve --xen on /dev/tpmrm0, provisioned; sshd on 10.9.0.2")
    });
    println!("HOSTB-READY");
    r.cx.wait_every(100000, Duration::from_secs(1), || std::path::Path::new(DONE).exists());
    println!("INFO host B: {}", if std::path::Path::new(DONE).exists() { "host A said done" } else { "deadline reached before host A said done" });
    if let Some(mut c) = sshd {
        crate::cmd::kill_child(&mut c);
    }
    xen::dump_log("sshd", SSHD_LOG, 200);
    let nfail = r.count(crate::runner::Status::Fail);
    super::tail::dump_logs(&st, nfail > 0);
    println!("{}", r.summary());
    if nfail == 0 { 0 } else { 1 }
}

/// Asks run.sh for host B (once; it boots while A's other phases run).
pub fn boot_b() {
    if xen::cmdline_arg("xvtpm_twohost").as_deref() == Some("1") {
        println!("HOSTB-BOOT");
    }
}

pub fn run(r: &mut Runner, st: &mut St) {
    if xen::cmdline_arg("xvtpm_twohost").as_deref() != Some("1") {
        r.skip_all(&["twohost-setup", "migrate-2host", "migrate-2host-dom", "libvirt-2host"], "disabled (XVTPM_TESTBED_TWOHOST=0)");
        return;
    }
    let mut sshd = None;
    let blocked = if st.mgr_ready() { None } else { Some("needs host A: a provisioned vtpmmgr (mgr phases)") };
    let ok = r.phase_if("twohost-setup", blocked, deadline(600), |cx| setup(cx, &mut sshd)) == crate::runner::Status::Pass;
    r.phase_if("migrate-2host", (!ok).then_some("needs both hosts (twohost-setup)"), deadline(900), |cx| guest_move(cx, &PV));
    r.phase_if("migrate-2host-dom", (!ok).then_some("needs both hosts (twohost-setup)"), deadline(900), |cx| guest_move(cx, &DOM));
    if xen::cmdline_arg("xvtpm_libvirt").as_deref() == Some("0") {
        r.skip("libvirt-2host", "XVTPM_TESTBED_LIBVIRT=0: no libvirtd in dom0");
    } else {
        r.phase_if("libvirt-2host", (!ok).then_some("needs both hosts (twohost-setup)"), deadline(600), libvirt_move);
    }
    let o = rsh(&r.cx, "host-b", &format!("touch {DONE}"), 30);
    println!("HOSTB-DONE rc={}", o.rc);
    if let Some(mut c) = sshd {
        crate::cmd::kill_child(&mut c);
    }
}

fn setup(cx: &Cx, sshd: &mut Option<std::process::Child>) -> Outcome {
    let mut e = Errs::default();
    let n = net_up(cx, 0);
    if n.status != crate::runner::Status::Pass {
        return n;
    }
    match spawn_sshd(0) {
        Ok(c) => *sshd = Some(c),
        Err(w) => return Outcome::fail(w),
    }
    let t0 = std::time::Instant::now();
    let mut last = None;
    cx.wait_every(600, Duration::from_secs(3), || {
        let o = rsh(cx, "host-b", "xl-vtpm --json mgr status", 60);
        let up = o.ok();
        last = Some(o);
        up
    });
    let st = last.unwrap_or_else(|| rsh(cx, "host-b", "xl-vtpm --json mgr status", 60));
    let sv = json(&st);
    if !e.check(
        "twohost-b-serves",
        st.ok() && jf(&sv, "provisioned") == "true",
        format!("host B over the link: xl-vtpm mgr status rc={} after {} s: provisioned {}, xen_link {}", st.rc, t0.elapsed().as_secs(), jf(&sv, "provisioned"), jf(&sv, "xen_link")),
    ) {
        show_tail("host B", &st.all(), 10);
        return e.verdict("");
    }
    let la = on(&env("host-a"), &["xl-vtpm", "--json", "list"]).secs(60).split().run(cx);
    let lb = rsh(cx, "host-b", "xl-vtpm --json list", 60);
    e.check("twohost-registry", la.ok() && lb.ok(), format!("xl-vtpm list on A rc={}, on B rc={} (registry {REGISTRY}): {}", la.rc, lb.rc, la.tail1(1)));
    // each host's PCRs, read on that host, are the policy a move to it is checked against
    let pa = Cmd::new(&["tpm2_pcrread", "-T", "device:/dev/tpmrm0", "sha256:0,1,2,3,4,5,6,7"]).secs(60).run(cx);
    let pb = rsh(cx, "host-b", "tpm2_pcrread -T device:/dev/tpmrm0 sha256:0,1,2,3,4,5,6,7", 60);
    let (pola, polb) = (pcr_policy(&pa.stdout), pcr_policy(&pb.stdout));
    let wrote = match (&pola, &polb) {
        (Some(a), Some(b)) => {
            std::fs::write(POL_B, b).is_ok() && rsh(cx, "host-b", &format!("printf '%s' '{a}' > {POL_A}"), 30).ok()
        }
        _ => false,
    };
    e.check(
        "twohost-policies",
        wrote,
        format!("PCRs 0–7 read on each host: A rc={} ({}), B rc={} ({}); B's kept on A as {POL_B}, A's on B as {POL_A}", pa.rc, pola.is_some(), pb.rc, polb.is_some()),
    );
    e.verdict("host B (its own Xen, dom0 and TPM) serves over the hosts' link; both hosts' xl-vtpm use the one PostgreSQL registry; each host's PCR policy is on the other")
}

/// Guest `g`'s console on `host` (both logs, as [`super::migrate::cons`] reads them on A).
fn cons_on(cx: &Cx, host: &str, g: &str) -> String {
    if host == "host-a" {
        return super::migrate::cons(g);
    }
    rsh(cx, host, &format!("cat /var/log/xen/console/guest-{g}.log /var/log/xen/console/guest-{g}--incoming.log 2>/dev/null; true"), 30).stdout
}

/// Guest `g`'s ticks from A's console and B's (read over the link), sorted.
fn ticks(cx: &Cx, g: &str) -> Vec<f64> {
    super::migrate::tick_values(&(cons_on(cx, "host-a", g) + &cons_on(cx, "host-b", g)))
}

/// Guest `g`'s largest tick gap after `from` once ≥ 5 ticks follow it (it runs again), in ms.
fn downtime(cx: &Cx, g: &str, from: f64) -> Option<i64> {
    let mut seen = None;
    cx.wait_every(120, Duration::from_secs(1), || {
        seen = super::migrate::max_gap(&ticks(cx, g), from).filter(|(_, after)| *after >= 5);
        seen.is_some()
    });
    seen.map(|(g, _)| (g * 1000.0) as i64)
}

/// `migcheck` in guest `g` on `host`: its answer line.
fn migcheck(cx: &Cx, g: &str, host: &str, n: u32) -> String {
    let cmd = format!("{n}:migcheck:{}", xen::nonce(16));
    let key = format!("GUEST-CMD {n} ");
    let w = rsh(cx, host, &format!("xenstore-write /local/domain/$(xl domid {g})/data/xvtpm-cmd '{cmd}'"), 30);
    if !w.ok() {
        return format!("xenstore-write on {host} failed: {}", w.tail1(2));
    }
    let mut line = None;
    cx.wait_every(240, Duration::from_secs(2), || {
        line = cons_on(cx, host, g).lines().find(|l| l.starts_with(&key)).map(str::to_string);
        line.is_some()
    });
    line.unwrap_or_else(|| format!("no answer on {host} within 240 s"))
}

/// Guest `g`'s registry row as `host`'s xl-vtpm lists it.
fn row_of(cx: &Cx, host: &str, g: &str) -> Value {
    let o = rsh(cx, host, "xl-vtpm --json list", 60);
    xen::parse_json(&o.stdout)
        .and_then(|v| v.as_array().and_then(|a| a.iter().find(|r| jf(r, "guest_name") == g).cloned()))
        .unwrap_or(Value::Null)
}

fn guest_move(cx: &Cx, m: &Mv) -> Outcome {
    let mut e = Errs::default();
    let (g, key) = (m.g, m.key);
    if xen::domid(g).is_some() || m.vdom.is_some_and(|v| xen::domid(v).is_some()) {
        return Outcome::fail(format!("{g} or its vTPM domain runs already (an earlier run's leftover)"));
    }
    if m.vdom.is_some() {
        super::vtpmdom::load_block_modules(cx, &mut e);
        if !e.is_empty() {
            return Outcome::fail(e.joined());
        }
    }
    if let Err(w) = write_cfg(m.cfg, g, "role=mig hold=1 tick=1", Some(m.vdom.unwrap_or("0"))) {
        return Outcome::fail(w);
    }
    let o = on(&env("host-a"), &["xl-vtpm", "create", m.cfg]).secs(300).save(&format!("/tmp/xl-{g}-create.out")).run(cx);
    if !o.ok() {
        show_tail(&format!("xl-vtpm create {g}"), &o.all(), 20);
        cleanup(cx, m, "");
        return Outcome::fail(o.failed(&format!("xl-vtpm create {} (host A, registry {REGISTRY})", m.cfg)));
    }
    let uuid = jf(&row_of(cx, "host-a", g), "vtpm_uuid");
    if !cx.wait_every(300, Duration::from_secs(1), || super::migrate::cons(g).contains("GUEST-HOLD")) {
        e.add("no-GUEST-HOLD");
    }
    let c = super::migrate::cons(g);
    for w in super::guest_checks(&c, g, "boot", &["tpm0", "startup", "getrandom", "ek", "persistent", "nv-write", "pcrextend"]) {
        e.add(w);
    }
    let ek = ek_hash(&c);
    let pcr = after_prefix(&c, "GUEST-PCR16 ").unwrap_or_default().trim().to_string();
    e.check(&format!("migrate-{key}-pcr16-extended"), pcr == PCR_AFTER, format!("{g} on host A (vTPM {}): PCR 16 before the moves {}", none(&uuid), none(&pcr)));
    if !e.is_empty() {
        cleanup(cx, m, &uuid);
        return e.verdict("");
    }
    let ssh = ssh_cmd();
    let mut downs = Vec::new();
    for (n, from, to, pol) in [(1u32, "host-a", "host-b", POL_B), (2, "host-b", "host-a", POL_A)] {
        let line = format!(
            "xl-vtpm --json migrate {g} {to} --non-live --ssh '{ssh}' --receiver 'xl-vtpm migrate-receive' --ek-ca {VENDOR_ROOT} --ek-intermediate {VENDOR_INT} --host-pcrs-policy {pol}"
        );
        let t = format!("round {n} ({from} → {to}, run on {from})");
        println!("migrate-{key} {t}: {line}");
        let t0 = ticks(cx, g).last().copied().unwrap_or(0.0);
        let o = rsh(cx, from, &line, 420);
        let v = json(&o);
        show("xl-vtpm migrate (two hosts)", &o.all());
        let on_to = rsh(cx, to, &format!("xl domid {g}"), 30).ok();
        let on_from = rsh(cx, from, &format!("xl domid {g}"), 30).ok();
        // its vTPM domain: made anew there, gone here
        let vd = m.vdom.map(|vn| (rsh(cx, to, &format!("xl domid {vn}"), 30).ok(), rsh(cx, from, &format!("xl domid {vn}"), 30).ok(), jf(&v, "vtpm_domain")));
        let vd_ok = vd.as_ref().is_none_or(|(there, here, named)| *there && !*here && named.contains(m.vdom.unwrap_or_default()));
        if !e.check(
            &format!("migrate-{key}-xl-vtpm"),
            o.ok() && on_to && !on_from && jf(&v, "tpm_kept") == "true" && vd_ok,
            format!(
                "{t}: rc={} tpm_kept {}; the guest runs on {to}: {on_to}, on {from}: {on_from}{}; {}",
                o.rc,
                jf(&v, "tpm_kept"),
                vd.as_ref().map_or(String::new(), |(there, here, named)| format!("; its vTPM domain runs on {to}: {there}, on {from}: {here} (JSON vtpm_domain {named})")),
                if v.is_null() { o.tail1(3) } else { v.to_string() }
            ),
        ) {
            break;
        }
        match downtime(cx, g, t0) {
            Some(ms) => {
                println!(
                    "PERF p6-{key}-downtime-ms-r{n}={ms} (largest gap between the guest's 0.1 s ticks; {from} → {to}, two Xen hosts, non-live{}; xl save {} ms, xl restore {} ms, xl-vtpm migrate {} ms, saved {} bytes)",
                    if m.vdom.is_some() { ", its vTPM in its own domain" } else { "" },
                    jf(&v, "xl_save_ms"),
                    jf(&v, "xl_restore_ms"),
                    jf(&v, "total_ms"),
                    jf(&v, "saved_bytes")
                );
                downs.push(ms);
            }
            None => e.add(format!("no-ticks-after-round-{n}")),
        }
        let a1 = migcheck(cx, g, to, n);
        println!("[{g}@{to}] {a1}");
        e.check(&format!("migrate-{key}-guest-tpm"), field(&a1, "ek") == ek && field(&a1, "persistent") == "kept" && field(&a1, "nv") == "kept", format!("{t}: EK {} (before {ek}), 0x81000010 {}, NV {}", none(&field(&a1, "ek")), none(&field(&a1, "persistent")), none(&field(&a1, "nv"))));
        e.check(&format!("migrate-{key}-guest-pcr16"), field(&a1, "pcr16") == pcr, format!("{t}: PCR 16 {} (before {pcr})", none(&field(&a1, "pcr16"))));
        e.check(&format!("migrate-{key}-guest-quote"), field(&a1, "quote") == "verified", format!("{t}: a fresh ECC AK quote over PCR 16: {}", none(&field(&a1, "quote"))));
        let (ra, rb) = (row_of(cx, "host-a", g), row_of(cx, "host-b", g));
        e.check(
            &format!("migrate-{key}-registry"),
            jf(&ra, "host") == to && jf(&rb, "host") == to && jf(&ra, "state") == "running",
            format!("{t}: the one registry, listed on A names host {}, on B {} (state {}, guest domid {})", none(&jf(&ra, "host")), none(&jf(&rb, "host")), jf(&ra, "state"), jf(&ra, "guest_domid")),
        );
        let vl = rsh(cx, to, "xl-vtpm --json vtpm list", 60);
        let runs = xen::parse_json(&vl.stdout).and_then(|v| v.as_array().cloned()).is_some_and(|r| r.iter().any(|r| jf(r, "uuid") == uuid && jf(r, "state") == "running"));
        e.check(&format!("migrate-{key}-vtpm-runs"), runs, format!("{t}: {to}'s xl-vtpm vtpm list names {uuid} running: {runs}"));
        let s = rsh(cx, from, &format!("xl-vtpm vtpm start {uuid}"), 60);
        e.check(&format!("migrate-{key}-refused"), !s.ok() && s.all().contains(to), format!("{t}: {from}'s xl-vtpm vtpm start rc={} (want a refusal naming {to}): {}", s.rc, s.tail1(2)));
        if !e.is_empty() {
            break;
        }
    }
    cleanup(cx, m, &uuid);
    e.verdict(format!("{g} moved host-a → host-b → host-a between two Xen hosts with its vTPM{} (EK/key/NV/PCR 16 kept, quote verified, the one registry names the holder, the other host refuses); downtime seen by the guest {downs:?} ms", if m.vdom.is_some() { " in its own domain" } else { "" }))
}

fn cleanup(cx: &Cx, m: &Mv, uuid: &str) {
    let (g, key) = (m.g, m.key);
    for h in ["host-a", "host-b"] {
        if rsh(cx, h, &format!("xl domid {g}"), 30).ok() || m.vdom.is_some_and(|v| rsh(cx, h, &format!("xl domid {v}"), 30).ok()) {
            let o = rsh(cx, h, &format!("xl-vtpm destroy {g}"), 150);
            println!("INFO migrate-{key} cleanup: xl-vtpm destroy {g} on {h} rc={}", o.rc);
        }
        for d in std::iter::once(g).chain(m.vdom) {
            let _ = rsh(cx, h, &format!("xl domid {d} > /dev/null 2>&1 && xl destroy {d}; true"), 60);
        }
    }
    let rr = on(&env("host-a"), &["xl-vtpm", "registry", "remove", g, "--yes"]).secs(60).run(cx);
    let mut dels = Vec::new();
    if !uuid.is_empty() {
        for h in ["host-a", "host-b"] {
            let _ = rsh(cx, h, &format!("xl-vtpm vtpm stop {uuid}"), 60);
            dels.push(rsh(cx, h, &format!("xl-vtpm mgr vtpm del {uuid} --yes"), 60).rc);
        }
    }
    println!("INFO migrate-{key} cleanup: registry remove {g} rc={}; vTPM {} identity deleted on A, B: rc {dels:?}", rr.rc, none(uuid));
}

/// The testbed hook's environment (libvirt clears the hook's): the fleet registry, while this
/// phase runs.
const HOOK_ENV: &str = "/etc/xvtpm-testbed/hook.env";
/// Stops a host's libvirtd and waits for it (busybox has `killall`, no `pkill`); its pid file goes.
const STOP_LIBVIRTD: &str = "killall libvirtd; i=0; while pidof libvirtd > /dev/null && [ $i -lt 20 ]; do sleep 1; i=$((i+1)); done; killall -9 libvirtd; rm -f /run/libvirtd.pid; true";
const LV_CONF: &str = "/etc/libvirt/libvirtd-2host.conf";
const LV_OUT: &str = "/var/log/libvirt/libvirtd-2host.out";

/// libvirtd of host `me` listening on the link (its own `host_uuid` on B: libvirt refuses a
/// migration between two hosts of one UUID), outside the fleet registry's environment: its
/// hook keeps dom0's default registry, as the libvirt phases' does.
fn libvirtd_line(me: usize) -> String {
    let (_, ip) = HOSTS[me];
    let uuid = if me == 0 { "5b0f7a52-3c1e-4d8a-9f61-2e7d4c9a8b13" } else { "6c1f8b63-4d2f-4e9b-8a72-3f8e5dab9c24" };
    let (host, _) = HOSTS[me];
    format!(
        "printf 'XVTPM_REGISTRY={REGISTRY}\nXVTPM_HOST={host}\n' > {HOOK_ENV} && grep -v '^host_uuid' /etc/libvirt/libvirtd.conf > {LV_CONF} && printf '%s\n' 'host_uuid = \"{uuid}\"' 'listen_tcp = 1' 'listen_tls = 0' 'auth_tcp = \"none\"' 'listen_addr = \"{ip}\"' >> {LV_CONF} && \
         (env -u XVTPM_REGISTRY -u XVTPM_HOST setsid libvirtd -f {LV_CONF} --listen > {LV_OUT} 2>&1 < /dev/null &) && i=0; while [ $i -lt 90 ]; do virsh -c xen:///system version > /dev/null 2>&1 && exit 0; i=$((i+1)); sleep 1; done; tail -n 20 {LV_OUT}; exit 1"
    )
}

/// A libvirt guest from the libvirt phases' XML: `name`, with or without the vTPM metadata.
fn lv_xml(name: &str, vtpm: bool) -> Result<String, String> {
    let src = xen::read_text("/etc/libvirt-testbed/lv-a.xml");
    if !src.contains("<name>lv-a</name>") {
        return Err("/etc/libvirt-testbed/lv-a.xml missing (build-images.sh, XVTPM_TESTBED_LIBVIRT=1)".into());
    }
    let mut x = src.replace("<name>lv-a</name>", &format!("<name>{name}</name>"));
    if !vtpm {
        x = x.lines().filter(|l| !l.contains("xvtpm:vtpm") && !l.contains("metadata>")).collect::<Vec<_>>().join("\n");
        x = x.replace("role=life hold=1", "role=plain hold=1 mig=1 tick=1");
    } else {
        x = x.replace("role=life hold=1", "role=life hold=1 tick=1");
    }
    let path = format!("/etc/libvirt-testbed/{name}.xml");
    std::fs::write(&path, x).map_err(|e| format!("{path}: {e}"))?;
    Ok(path)
}

fn virsh_on(cx: &Cx, host: &str, args: &str, secs: u64) -> Output {
    rsh(cx, host, &format!("virsh -c xen:///system {args}"), secs)
}

fn libvirt_move(cx: &Cx) -> Outcome {
    let mut e = Errs::default();
    for (i, (h, _)) in HOSTS.iter().enumerate() {
        let o = rsh(cx, h, &libvirtd_line(i), 150);
        if !e.check("libvirt-2host-libvirtd", o.ok(), format!("{h}: libvirtd --listen on the link rc={}: {}", o.rc, o.tail1(2))) {
            libvirt_cleanup(cx);
            return e.verdict("");
        }
    }
    // 1. a guest without a vTPM moves
    let (plain, vt) = match (lv_xml("lv-m", false), lv_xml("lv-v", true)) {
        (Ok(p), Ok(v)) => (p, v),
        (Err(w), _) | (_, Err(w)) => {
            libvirt_cleanup(cx);
            return Outcome::fail(w);
        }
    };
    let s = virsh_on(cx, "host-a", &format!("create {plain}"), 120);
    e.check("libvirt-2host-start", s.ok(), format!("host-a: virsh create lv-m (no vTPM) rc={}: {}", s.rc, s.tail1(2)));
    if !cx.wait_every(240, Duration::from_secs(1), || xen::console("lv-m").contains("GUEST-TICK")) {
        e.add("lv-m-no-ticks");
    }
    let from = ticks(cx, "lv-m").last().copied().unwrap_or(0.0);
    let t0 = std::time::Instant::now();
    let m = virsh_on(cx, "host-a", "migrate --p2p lv-m xen+tcp://host-b/system", 300);
    let ms = t0.elapsed().as_millis();
    let on_b = virsh_on(cx, "host-b", "domstate lv-m", 30);
    let on_a = virsh_on(cx, "host-a", "domstate lv-m", 30);
    let gap = if m.ok() { downtime(cx, "lv-m", from) } else { None };
    e.check(
        "libvirt-2host-migrate",
        m.ok() && on_b.stdout.trim() == "running" && !on_a.stdout.contains("running") && gap.is_some(),
        format!("virsh migrate --p2p lv-m xen+tcp://host-b/system (run on host-a) rc={} in {ms} ms: {}; on host-b: {}; on host-a: {} {}; the guest ticks on host-b after a gap of {gap:?} ms", m.rc, m.tail1(2), on_b.stdout.trim(), on_a.stdout.trim(), on_a.stderr.trim()),
    );
    if let Some(g) = gap {
        println!("PERF p6-2host-libvirt-downtime-ms={g} (largest gap between the ticks of a 160 MiB PV guest without a vTPM moved host-a → host-b by virsh migrate, non-live; virsh migrate took {ms} ms)");
    }
    // 2. a guest with a vTPM: refused by the destination's hook, still running here
    let s = virsh_on(cx, "host-a", &format!("create {vt}"), 120);
    let up = s.ok() && cx.wait_every(240, Duration::from_secs(1), || xen::console("lv-v").contains("GUEST-HOLD"));
    let before = (xen::domid("lv-v"), lv_vtpm_pid(cx));
    e.check("libvirt-2host-vtpm-guest", up && before.0.is_some() && before.1.is_some(), format!("host-a: virsh create lv-v (with the vTPM metadata) rc={}: domid {:?}, vTPM process {:?}", s.rc, before.0, before.1));
    let m = virsh_on(cx, "host-a", "migrate --p2p lv-v xen+tcp://host-b/system", 300);
    let after = (xen::domid("lv-v"), lv_vtpm_pid(cx));
    // libvirt's p2p source runs its Confirm as cancelled after a refused Prepare: it calls
    // libxl_domain_resume on a guest it never suspended, then calls the guest paused while Xen
    // runs it, and `virsh resume` fails (libxl unpauses no running domain). A restart of
    // libvirtd takes the state from Xen again (its reconnect).
    let seen_a = virsh_on(cx, "host-a", "domstate lv-v", 30).stdout.trim().to_string();
    let xl_a = super::xhost::xl_state("lv-v").unwrap_or_default();
    let resume = if seen_a == "running" {
        None
    } else {
        let r = virsh_on(cx, "host-a", "resume lv-v", 60);
        let _ = rsh(cx, "host-a", STOP_LIBVIRTD, 60);
        let l = rsh(cx, "host-a", &libvirtd_line(0), 150);
        Some((r, l))
    };
    let state_a = virsh_on(cx, "host-a", "domstate lv-v", 30).stdout.trim().to_string();
    let answers = super::migrate::guest_cmd(cx, "lv-v", 1, "migcheck:00", 120);
    let hook_said = rsh(cx, "host-b", "grep -h 'refused' /var/log/xvtpm/libvirt-hook.log | tail -n 1", 30).stdout;
    let on_b = virsh_on(cx, "host-b", "domstate lv-v", 30);
    e.check(
        "libvirt-2host-vtpm-refused",
        !m.ok() && m.all().contains("hook") && hook_said.contains("cannot follow a libvirt migration") && after == before && !xl_a.contains('p') && state_a == "running" && answers.starts_with("GUEST-CMD 1 ") && !field(&answers, "ek").is_empty() && !on_b.ok(),
        format!(
            "virsh migrate --p2p lv-v xen+tcp://host-b/system rc={} (want a refusal by host-b's hook): {}; host-b's hook said: {}; on host-a Xen's state {xl_a}, libvirt said {seen_a}{}, now {state_a}, domid {:?} vTPM {:?} (before {:?} {:?}), its TPM answers: {}; on host-b: {}",
            m.rc,
            m.tail1(2),
            hook_said.trim(),
            resume.as_ref().map_or(String::new(), |(r, l)| format!(" (virsh resume rc={}: {}; libvirtd restarted rc={})", r.rc, r.tail1(1), l.rc)),
            after.0,
            after.1,
            before.0,
            before.1,
            answers.chars().take(160).collect::<String>(),
            on_b.tail1(1)
        ),
    );
    // 3. with the hosts' libvirt migration configuration, the same guest moves with its vTPM,
    // to B and back
    let moved = if e.is_empty() { libvirt_vtpm_moves(cx, &mut e, &field(&answers, "ek")) } else { Vec::new() };
    libvirt_cleanup(cx);
    e.verdict(format!(
        "virsh migrate moved a guest without a vTPM to the second Xen host in {ms} ms; a guest with a vTPM was refused by the destination's hook without the hosts' migration configuration (and kept running here with its vTPM), and with it moved host-a → host-b → host-a with its vTPM (EK, key, NV, PCR 16 kept; downtime seen by the guest {moved:?} ms)"
    ))
}

/// The hosts' libvirt migration configuration (`/etc/xvtpm/libvirt-migrate.json`): the link's
/// transport, this testbed's vendor roots, and the PCR policy the other host must meet.
fn lv_migrate_config(policy: &str) -> String {
    format!(r#"{{"ssh": "{ME} ssh", "ek_ca": ["{VENDOR_ROOT}"], "ek_intermediate": ["{VENDOR_INT}"], "host_pcrs_policy": "{policy}"}}"#)
}
const LV_MIGRATE: &str = "/etc/xvtpm/libvirt-migrate.json";
/// A PCR policy no host meets.
const POL_BOGUS: &str = "/etc/xvtpm-testbed/2host-bogus-pcrs.json";

/// `libvirt-2host` part 3: lv-v (running on A, refused once) moves to B and back with
/// `virsh migrate --p2p`, its vTPM following through the hooks. Returns the guest's downtimes.
fn libvirt_vtpm_moves(cx: &Cx, e: &mut Errs, ek: &str) -> Vec<i64> {
    for (h, pol) in [("host-a", POL_B), ("host-b", POL_A)] {
        let w = rsh(cx, h, &format!("mkdir -p /etc/xvtpm && printf '%s' '{}' > {LV_MIGRATE} && chmod 600 {LV_MIGRATE}", lv_migrate_config(pol)), 30);
        if !e.check("libvirt-2host-vtpm-config", w.ok(), format!("{h}: {LV_MIGRATE} rc={}: {}", w.rc, w.tail1(1))) {
            return Vec::new();
        }
    }
    let x = super::migrate::guest_cmd(cx, "lv-v", 2, "extend", 120);
    if !e.check("libvirt-2host-vtpm-extend", x.contains("extend PASS"), format!("lv-v on host-a: PCR 16 extended once before the moves: {x}")) {
        return Vec::new();
    }
    let uuid = jf(&row_of(cx, "host-a", "lv-v"), "vtpm_uuid");
    // 3a. A refuses B (A's policy for B names a PCR 0 no host has): B's `migrate begin` hook
    // runs A's `libvirt-handoff --prepare`, which checks B before anything moves, and refuses the
    // migration with A's cause; lv-v runs on A with its vTPM untouched.
    let bogus = format!(r#"{{"0": "{}"}}"#, "f".repeat(64));
    let w = rsh(cx, "host-a", &format!("printf '%s' '{bogus}' > {POL_BOGUS} && printf '%s' '{}' > {LV_MIGRATE}", lv_migrate_config(POL_BOGUS)), 30);
    let m = virsh_on(cx, "host-a", "migrate --p2p lv-v xen+tcp://host-b/system", 420);
    let said = rsh(cx, "host-b", "grep -h 'does not hand' /var/log/xvtpm/libvirt-hook.log | tail -n 1", 30).stdout.trim().to_string();
    let on_b = rsh(cx, "host-b", "xl domid lv-v", 30).ok();
    let xl_a = super::xhost::xl_state("lv-v").unwrap_or_default();
    let seen_a = virsh_on(cx, "host-a", "domstate lv-v", 30).stdout.trim().to_string();
    let a0 = migcheck(cx, "lv-v", "host-a", 3);
    let ra = row_of(cx, "host-a", "lv-v");
    e.check(
        "libvirt-2host-vtpm-policy-refused",
        w.ok() && !m.ok() && said.contains("PCR") && !on_b && !xl_a.is_empty() && !xl_a.contains('p') && !xl_a.contains('s') && field(&a0, "ek") == ek && field(&a0, "pcr16") == PCR_AFTER && field(&a0, "quote") == "verified" && jf(&ra, "host") == "host-a" && jf(&ra, "state") == "running",
        format!(
            "A's policy for B names a PCR 0 B does not have: virsh migrate rc={} (want B's migrate begin hook to refuse with A's cause): {}; B's hook said: {}; lv-v on B: {on_b}; on A Xen's state {xl_a}, libvirt says {seen_a}; its TPM on A: EK {} PCR 16 {} quote {}; registry host {} state {}",
            m.rc,
            m.tail1(2),
            none(&said),
            none(&field(&a0, "ek")),
            none(&field(&a0, "pcr16")),
            none(&field(&a0, "quote")),
            none(&jf(&ra, "host")),
            jf(&ra, "state")
        ),
    );
    if seen_a != "running" {
        // (libvirt's view after a cancelled migration, as in part 2: its reconnect mends it)
        let _ = rsh(cx, "host-a", STOP_LIBVIRTD, 60);
        let l = rsh(cx, "host-a", &libvirtd_line(0), 150);
        println!("INFO libvirt-2host: libvirt called lv-v {seen_a} after the refusal; libvirtd restarted rc={}, now {}", l.rc, virsh_on(cx, "host-a", "domstate lv-v", 30).stdout.trim());
    }
    let w = rsh(cx, "host-a", &format!("printf '%s' '{}' > {LV_MIGRATE}", lv_migrate_config(POL_B)), 30);
    if !e.check("libvirt-2host-vtpm-config", w.ok() && e.is_empty(), format!("host-a: {LV_MIGRATE} with B's policy again rc={}", w.rc)) {
        return Vec::new();
    }
    // 3b. Offers no move used do not pile up on B: A's `--prepare` run once more than B's
    // manager keeps offers open (8), as libvirt migrations that ended between `migrate begin` and
    // `started` would; each withdraws the one before (else the ninth is refused as too many).
    let w = rsh(cx, "host-a", "for i in 1 2 3 4 5 6 7 8 9; do xl-vtpm libvirt-handoff lv-v host-b --prepare || exit $?; done", 300);
    let offers: std::collections::BTreeSet<String> = w.stdout.lines().filter(|l| l.contains("\"offer_id\"")).filter_map(|l| l.split('"').nth(3)).map(str::to_string).collect();
    if !e.check("libvirt-2host-vtpm-unused-offers", w.ok() && offers.len() == 9, format!("A's libvirt-handoff lv-v host-b --prepare nine times: rc={}, {} distinct offers: {}", w.rc, offers.len(), w.tail1(2))) {
        return Vec::new();
    }
    let mut downs = Vec::new();
    for (n, from, to) in [(4u32, "host-a", "host-b"), (5, "host-b", "host-a")] {
        let t = format!("round {} ({from} → {to}, virsh migrate run on {from})", n - 3);
        let t0 = ticks(cx, "lv-v").last().copied().unwrap_or(0.0);
        let hook_log = |h: &str| rsh(cx, h, "grep -h -e 'took its vTPM' -e 'cannot take' /var/log/xvtpm/libvirt-hook.log | tail -n 1", 30).stdout.trim().to_string();
        let before = hook_log(to);
        let w0 = std::time::Instant::now();
        let m = virsh_on(cx, from, &format!("migrate --p2p lv-v xen+tcp://{to}/system"), 420);
        let ms = w0.elapsed().as_millis();
        let (st_to, st_from) = (virsh_on(cx, to, "domstate lv-v", 30), virsh_on(cx, from, "domstate lv-v", 30));
        let said = hook_log(to);
        let ok = e.check(
            "libvirt-2host-vtpm-migrate",
            m.ok() && st_to.stdout.trim() == "running" && !st_from.stdout.contains("running") && said != before && said.contains("took its vTPM"),
            format!(
                "{t}: rc={} in {ms} ms: {}; libvirt on {to}: {}, on {from}: {} {}; {to}'s hook said: {}",
                m.rc,
                m.tail1(2),
                st_to.stdout.trim(),
                st_from.stdout.trim(),
                st_from.stderr.trim(),
                none(&said)
            ),
        );
        if !ok {
            show("virsh migrate (vTPM)", &m.all());
            for h in [from, to] {
                show(&format!("{h}: libvirt-hook.log"), &rsh(cx, h, "tail -n 30 /var/log/xvtpm/libvirt-hook.log", 30).stdout);
            }
            break;
        }
        match downtime(cx, "lv-v", t0) {
            Some(g) => {
                println!("PERF p6-2host-libvirt-vtpm-downtime-ms-r{}={g} (largest gap between the ticks of a 160 MiB PV guest with a dom0-process vTPM moved {from} → {to} by virsh migrate --p2p, the vTPM's identity following through the hooks; virsh migrate took {ms} ms)", n - 3);
                downs.push(g);
            }
            None => e.add(format!("libvirt-2host-vtpm-no-ticks-r{}", n - 3)),
        }
        let a = migcheck(cx, "lv-v", to, n);
        println!("[lv-v@{to}] {a}");
        e.check(
            "libvirt-2host-vtpm-guest-tpm",
            field(&a, "ek") == ek && !ek.is_empty() && field(&a, "persistent") == "kept" && field(&a, "nv") == "kept" && field(&a, "pcr16") == PCR_AFTER && field(&a, "quote") == "verified",
            format!("{t}: EK {} (before {}), 0x81000010 {}, NV {}, PCR 16 {} (want {PCR_AFTER}, kept as across a suspend), quote {}", none(&field(&a, "ek")), none(ek), none(&field(&a, "persistent")), none(&field(&a, "nv")), none(&field(&a, "pcr16")), none(&field(&a, "quote"))),
        );
        let (ra, rb) = (row_of(cx, "host-a", "lv-v"), row_of(cx, "host-b", "lv-v"));
        e.check(
            "libvirt-2host-vtpm-registry",
            jf(&ra, "host") == to && jf(&rb, "host") == to && jf(&ra, "state") == "running" && jf(&ra, "vtpm_uuid") == uuid,
            format!("{t}: the one registry, listed on A names host {}, on B {} (state {}, vTPM {})", none(&jf(&ra, "host")), none(&jf(&rb, "host")), jf(&ra, "state"), none(&jf(&ra, "vtpm_uuid"))),
        );
        let s = rsh(cx, from, &format!("xl-vtpm vtpm start {uuid}"), 60);
        let gone = !rsh(cx, from, "xl domid lv-v", 30).ok();
        e.check("libvirt-2host-vtpm-one-copy", gone && !s.ok() && s.all().contains(to), format!("{t}: lv-v gone from {from}: {gone}; {from}'s xl-vtpm vtpm start rc={} (want a refusal naming {to}): {}", s.rc, s.tail1(2)));
        if !e.is_empty() {
            break;
        }
    }
    downs
}

/// lv-v's vTPM process as the fleet registry lists it.
fn lv_vtpm_pid(cx: &Cx) -> Option<u32> {
    jf(&row_of(cx, "host-a", "lv-v"), "vtpm_pid").parse().ok()
}

fn libvirt_cleanup(cx: &Cx) {
    for h in ["host-a", "host-b"] {
        for g in ["lv-m", "lv-v"] {
            let _ = virsh_on(cx, h, &format!("destroy {g}"), 60);
        }
        // (the libvirt phases start their own libvirtd next: this one must be gone, its pid file too)
        let _ = rsh(cx, h, &format!("{STOP_LIBVIRTD}; rm -f {HOOK_ENV} {LV_MIGRATE}"), 60);
    }
    // a guest libvirt could not destroy: xl-vtpm's destroy stops it and its vTPM
    for h in ["host-a", "host-b"] {
        for g in ["lv-m", "lv-v"] {
            if rsh(cx, h, &format!("xl domid {g}"), 30).ok() {
                let o = rsh(cx, h, &format!("xl-vtpm destroy {g} || xl destroy {g}"), 120);
                println!("INFO libvirt-2host cleanup: {g} still ran on {h}; destroyed rc={}", o.rc);
            }
        }
    }
    // lv-v's vTPM: its pair and identity, so the later phases start from the same registry
    let uuid = jf(&row_of(cx, "host-a", "lv-v"), "vtpm_uuid");
    let rr = rsh(cx, "host-a", "xl-vtpm registry remove lv-v --yes", 60);
    let del = if uuid.is_empty() { -1 } else { rsh(cx, "host-a", &format!("xl-vtpm mgr vtpm del {uuid} --yes"), 60).rc };
    println!("INFO libvirt-2host cleanup: registry remove lv-v rc={}, vTPM {} identity del rc={del}", rr.rc, none(&uuid));
}
