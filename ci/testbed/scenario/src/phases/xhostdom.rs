//! migrate-xhost-dom: a PV guest whose vTPM runs in its own domain, moved to the testbed's second
//! host and back with `xl-vtpm migrate GUEST HOST --non-live` (run after migrate-xhost, while
//! host B serves). Host B's manager serves its own Xen link (`vtpmmgr serve --xen` in dom0, beside
//! host A's: each takes only the tpmif devices of the vTPM domains attached to it), so the vTPM
//! domain that B's receiver boots reaches B's manager, and A's reaches A's.
//! Checks, one RESULT:
//!   - `xl-vtpm create` on host A of `mig-xd` (`vtpm = [ "backend=vtpm-mig-xd" ]`): the vTPM
//!     domain booted and manufactured, the guest's boot checks (NV, 0x81000010, EK, PCR 16);
//!   - A → B and B → A: JSON `vtpm_domain` vtpm-mig-xd and `tpm_kept` true; a new guest domain
//!     and a new vTPM domain of the same name whose backend serves the guest's device; in the
//!     guest the same EK, key and NV and PCR 16 as it was (the source's vTPM domain was
//!     suspended: its shutdown saved the running TPM on its disk, and the new one resumed it),
//!     a fresh AK quote verified; the registry names the holder and the vTPM domain's domid;
//!     the source's disk image and description of that vTPM are gone, the holder's disk image
//!     is there; the source refuses to start the vTPM, naming the holder; P6
//!     (`PERF p6-xhost-dom-downtime-ms-rN`);
//!   - two moves A → B cut by `kill -9` of the source, each completed by `--finish`: (k1) once
//!     A's vTPM domain ended (suspended), before the identity moved — the receiver destroys its
//!     copy, `--finish` exits 1 ("never arrived") with A's vTPM domain booted again from its disk
//!     (resuming the suspend's state) and the guest restored on A; (k2) once B's manager wrote
//!     the imported state — the copy stays paused on B, `--finish` exits 0 with B's vTPM domain
//!     made from it and the guest resumed there; after each the guest's EK, key, NV and PCR 16
//!     and a fresh quote, the registry, the vTPM domain serving it, no file left behind;
//!   - `xl-vtpm destroy` on the holder, the pair and both identities removed.

use std::time::{Duration, Instant};

use super::xhost::{MGR_LOG, b_log_count, kill_source, leftovers, receivers, spawn_move, xl_state};
use super::migrate::{cons, downtime, field, guest_cmd, last_tick, write_cfg};
use super::xhost::{A_HOST, A_POLICY, A_STATE, B_HOST, B_POLICY, B_STATE, SSH_LOCAL, VENDOR_INT, VENDOR_ROOT, a_env, b_env, env_words, json, on, row, vtpm_running};
use super::{ek_hash, none};
use crate::cmd::{show, show_tail};
use crate::runner::{Cx, Errs, Outcome, why};
use crate::xen::{self, after_prefix, jf};

const NAME: &str = "mig-xd";
const VDOM: &str = "vtpm-mig-xd";
const CFG: &str = "/etc/xen/mig-xd.cfg";

/// What helps when the phase fails: the guest's GUEST lines, the vTPM domain's console, the
/// move's output, the domains.
fn diag(cx: &Cx, out: &str) {
    show_tail(&format!("{NAME} console (GUEST lines)"), &cons(NAME).lines().filter(|l| !l.starts_with("GUEST-TICK")).collect::<Vec<_>>().join("\n"), 20);
    show_tail(&format!("{VDOM} console"), &xen::console(VDOM), 25);
    why("xl-vtpm migrate", out, 12);
    why(&format!("{VDOM} console"), &xen::console(VDOM), 8);
    show("xl list", &crate::cmd::Cmd::sh("xl list").secs(30).run(cx).all());
}

/// The phase.
pub fn dom_move(cx: &Cx) -> Outcome {
    let mut e = Errs::default();
    let (a, b) = (a_env(), b_env());
    let rd = super::vtpmdom::RAMDISK;
    if std::fs::metadata(rd).map(|m| m.len() == 0).unwrap_or(true) {
        return Outcome::fail(format!("the vTPM-domain image {rd} not built"));
    }
    if xen::domid(NAME).is_some() || xen::domid(VDOM).is_some() {
        return Outcome::fail(format!("{NAME} or {VDOM} runs already (an earlier run's leftover)"));
    }
    super::vtpmdom::load_block_modules(cx, &mut e);
    if !e.is_empty() {
        return Outcome::fail(e.joined());
    }
    if let Err(w) = write_cfg(CFG, NAME, "role=mig hold=1 tick=1", Some(VDOM)) {
        return Outcome::fail(w);
    }
    let t0 = Instant::now();
    let o = on(&a, &["xl-vtpm", "create", CFG]).secs(300).save("/tmp/xl-mig-xd-create.out").run(cx);
    println!("PERF migrate-xhost-dom-create-s={:.1} (xl-vtpm create on host A: the vTPM identity, {VDOM} booted and manufactured, then the guest)", t0.elapsed().as_secs_f64());
    if !o.ok() {
        diag(cx, &o.all());
        cleanup(cx, "");
        return Outcome::fail(format!("xl-vtpm create {CFG} (host A) rc={}: {}", o.rc, o.tail1(2)));
    }
    let r0 = row(cx, &a, NAME);
    let uuid = jf(&r0, "vtpm_uuid");
    let vd0 = xen::domid(VDOM).unwrap_or_default();
    e.check(
        "migrate-xhost-dom-created",
        jf(&r0, "host") == A_HOST && jf(&r0, "state") == "running" && jf(&r0, "vtpm_domain") == VDOM && !vd0.is_empty() && jf(&r0, "vtpm_domid") == vd0,
        format!("{NAME} on host A: registry host {}, state {}, vTPM {} in {} (domid {}, xl says {})", none(&jf(&r0, "host")), jf(&r0, "state"), none(&uuid), jf(&r0, "vtpm_domain"), jf(&r0, "vtpm_domid"), none(&vd0)),
    );
    if !cx.wait_every(300, Duration::from_secs(1), || cons(NAME).contains("GUEST-HOLD")) {
        e.add("no-GUEST-HOLD");
    }
    let c = cons(NAME);
    for m in super::guest_checks(&c, NAME, "boot", &["tpm0", "startup", "getrandom", "ek", "persistent", "nv-write", "pcrextend"]) {
        e.add(m);
    }
    let ek = ek_hash(&c);
    let pcr = after_prefix(&c, "GUEST-PCR16 ").unwrap_or_default().trim().to_string();
    e.check("migrate-xhost-dom-pcr16-extended", pcr == super::migrate::PCR_AFTER, format!("PCR 16 before the move {}", none(&pcr)));
    if !e.is_empty() {
        diag(cx, "");
        cleanup(cx, &uuid);
        return e.verdict("");
    }
    let hops = [(1, &a, A_HOST, A_STATE, &b, B_HOST, B_STATE, B_POLICY), (2, &b, B_HOST, B_STATE, &a, A_HOST, A_STATE, A_POLICY)];
    let mut downs = Vec::new();
    for (round, from, from_name, from_state, to, to_name, to_state, policy) in hops {
        let argv = move_argv(to, to_name, policy);
        println!("migrate-xhost-dom round {round}: {} (source env: {})", argv.join(" "), env_words(from));
        let before = xen::domid(NAME).unwrap_or_default();
        let vbefore = xen::domid(VDOM).unwrap_or_default();
        let tick = last_tick(NAME);
        let save = format!("/tmp/xl-mig-xd-{round}.out");
        let o = on(from, &argv.iter().map(String::as_str).collect::<Vec<_>>()).secs(420).save_split(&save, &format!("{save}.err")).run(cx);
        let v = json(&o);
        show("xl-vtpm migrate (cross-host, vTPM domain)", &o.all());
        let new = xen::domid(NAME).unwrap_or_default();
        let vnew = xen::domid(VDOM).unwrap_or_default();
        let t = format!("round {round} ({from_name} → {to_name})");
        if !e.check(
            "migrate-xhost-dom-xl-vtpm",
            o.ok() && !new.is_empty() && new != before && jf(&v, "vtpm_domain") == VDOM && jf(&v, "tpm_kept") == "true",
            format!(
                "{t}: rc={}{} guest domid {before} -> {}, {VDOM} domid {vbefore} -> {}; JSON vtpm_domain {} tpm_kept {} (want {VDOM}, true)",
                o.rc,
                if o.timed_out { " (killed at its limit)" } else { "" },
                none(&new),
                none(&vnew),
                none(&jf(&v, "vtpm_domain")),
                none(&jf(&v, "tpm_kept"))
            ),
        ) {
            diag(cx, &o.all());
            cleanup(cx, &uuid);
            return e.verdict("");
        }
        match downtime(cx, NAME, tick) {
            Some(ms) => {
                println!(
                    "PERF p6-xhost-dom-downtime-ms-r{round}={ms} (largest gap between the guest's 0.1 s ticks; {from_name} → {to_name} in one dom0, non-live, its vTPM in its own domain; xl save {} ms, xl restore {} ms, transfer {} ms, xl-vtpm migrate {} ms)",
                    jf(&v, "xl_save_ms"),
                    jf(&v, "xl_restore_ms"),
                    jf(&v, "transfer_ms"),
                    jf(&v, "total_ms")
                );
                downs.push(ms);
            }
            None => e.add(format!("no-ticks-after-round-{round}")),
        }
        let a1 = guest_cmd(cx, NAME, 10 + round, &format!("migcheck:{}", xen::nonce(16)), 240);
        println!("[{NAME}] {a1}");
        e.check("migrate-xhost-dom-guest-ek", !ek.is_empty() && field(&a1, "ek") == ek, format!("{t}: EK sha256 before {ek} after {}", none(&field(&a1, "ek"))));
        e.check("migrate-xhost-dom-guest-persistent", field(&a1, "persistent") == "kept", format!("{t}: 0x81000010 {}", none(&field(&a1, "persistent"))));
        e.check("migrate-xhost-dom-guest-nv", field(&a1, "nv") == "kept", format!("{t}: NV 0x01500016 {}", none(&field(&a1, "nv"))));
        e.check(
            "migrate-xhost-dom-guest-pcr16",
            field(&a1, "pcr16") == pcr,
            format!("{t}: PCR 16 before {pcr} after {} (kept: the vTPM domain's suspend saved it, the new one resumed it)", none(&field(&a1, "pcr16"))),
        );
        e.check("migrate-xhost-dom-guest-quote", field(&a1, "quote") == "verified", format!("{t}: a fresh ECC AK quote {}", none(&field(&a1, "quote"))));
        let (ra, rb) = (row(cx, &a, NAME), row(cx, &b, NAME));
        e.check(
            "migrate-xhost-dom-registry",
            jf(&ra, "host") == to_name && jf(&rb, "host") == to_name && jf(&ra, "state") == "running" && jf(&ra, "guest_domid") == new && jf(&ra, "vtpm_domid") == vnew,
            format!("{t}: registry host {} / {} (A's env / B's), state {}, guest domid {} (xl {new}), vTPM domid {} (xl {})", none(&jf(&ra, "host")), none(&jf(&rb, "host")), jf(&ra, "state"), jf(&ra, "guest_domid"), jf(&ra, "vtpm_domid"), none(&vnew)),
        );
        let backend = xen::xs_ls(&format!("/local/domain/{vnew}/backend/vtpm/{new}"));
        e.check("migrate-xhost-dom-backend", !vnew.is_empty() && !backend.is_empty(), format!("{t}: {VDOM} (domid {}) serves the guest's device: /local/domain/{vnew}/backend/vtpm/{new} has {} entries", none(&vnew), backend.len()));
        let runs = vtpm_running(cx, to, &uuid);
        e.check("migrate-xhost-dom-vtpm-runs", runs, format!("{t}: {to_name}'s xl-vtpm vtpm list names {uuid} running: {runs}"));
        let (src_img, dst_img) = (format!("{from_state}/vtpms/{uuid}/disk.img"), format!("{to_state}/vtpms/{uuid}/disk.img"));
        let (src_spec, src_state) = (format!("{from_state}/vtpms/{uuid}/domain.json"), format!("{from_state}/vtpms/{uuid}/state.xvts"));
        let gone = [&src_img, &src_spec, &src_state].iter().all(|p| !std::path::Path::new(p).exists());
        let there = std::path::Path::new(&dst_img).exists() && !std::path::Path::new(&format!("{to_state}/vtpms/{uuid}/state.xvts")).exists();
        e.check("migrate-xhost-dom-disks", gone && there, format!("{t}: the source's disk image, description and state file of {uuid} gone: {gone}; the holder's disk image {dst_img} there (and no state file beside it): {there}"));
        let o = on(from, &["xl-vtpm", "vtpm", "start", &uuid]).secs(60).run(cx);
        e.check("migrate-xhost-dom-refused", !o.ok() && o.all().contains(to_name), format!("{t}: {from_name}'s xl-vtpm vtpm start rc={} (want a refusal naming {to_name}): {}", o.rc, o.tail1(2)));
        if !e.is_empty() {
            diag(cx, "");
            break;
        }
    }
    let mut killed = Vec::new();
    if e.is_empty() {
        for (tag, identity_there) in [("1", false), ("2", true)] {
            killed.push(kill_round(cx, &mut e, &uuid, &ek, &pcr, tag, identity_there));
            if !e.is_empty() {
                diag(cx, "");
                break;
            }
        }
    }
    cleanup(cx, &uuid);
    e.verdict(format!(
        "{NAME}, its vTPM in {VDOM}, moved to {B_HOST} and back (a new vTPM domain on the holder from the moved identity; EK/key/NV and PCR 16 kept, quote verified, the registry names the holder); downtime seen by the guest {downs:?} ms; {}",
        killed.join("; ")
    ))
}

/// `xl-vtpm --json migrate mig-xd TO --non-live` through the local transport to the receiver
/// under `to`'s environment, checked against `policy`.
fn move_argv(to: &[(&str, &str)], to_name: &str, policy: &str) -> Vec<String> {
    let receiver = format!("{} xl-vtpm migrate-receive", env_words(to));
    ["xl-vtpm", "--json", "migrate", NAME, to_name, "--non-live", "--ssh", SSH_LOCAL, "--receiver", &receiver, "--ek-ca", VENDOR_ROOT, "--ek-intermediate", VENDOR_INT, "--host-pcrs-policy", policy]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// One move A → B cut by `kill -9` of the source and completed by `--finish` (see the module
/// docs): before the identity moved (`identity_there` false: once A's vTPM domain ended), or
/// after B's manager wrote the imported state. Returns a summary.
fn kill_round(cx: &Cx, e: &mut Errs, uuid: &str, ek: &str, pcr: &str, tag: &str, identity_there: bool) -> String {
    let (a, b) = (a_env(), b_env());
    let pre = format!("migrate-xhost-dom-kill{tag}");
    let incoming = format!("{NAME}--incoming");
    let argv = move_argv(&b, B_HOST, B_POLICY);
    let t0 = Instant::now();
    let vdom_before = xen::domid(VDOM).unwrap_or_default();
    let n0 = b_log_count("imported vTPM's state file written", uuid);
    let (mut src, err) = match spawn_move(&argv, &format!("/tmp/xl-mig-xd-kill{tag}.out"), &format!("migrate-xhost-dom kill round {tag}")) {
        Ok(x) => x,
        Err(w) => {
            e.add(w);
            return format!("kill round {tag}: not started");
        }
    };
    let marker = if identity_there { format!("`imported vTPM's state file written vtpm={uuid}` in {MGR_LOG}") } else { format!("{VDOM} (domain {vdom_before}) ended") };
    let seen = cx.wait_every(360, Duration::from_millis(10), || {
        let hit = if identity_there { b_log_count("imported vTPM's state file written", uuid) > n0 } else { xen::domid(VDOM).is_none() };
        hit || !matches!(src.try_wait(), Ok(None))
    });
    let exited = kill_source(&mut src);
    let at = t0.elapsed().as_millis();
    e.check(
        &format!("{pre}-cut"),
        seen && exited.is_none(),
        format!("source xl-vtpm migrate (pid {}) killed -9 {at} ms after its start, once {marker} (seen {seen}); it {}", src.id(), exited.map_or("still ran".to_string(), |c| format!("HAD EXITED rc={c} before the kill"))),
    );
    let ended = cx.wait_every(60, Duration::from_millis(200), || receivers().is_empty());
    let copy = xl_state(&incoming);
    let copy_ok = if identity_there { copy.as_deref().is_some_and(|s| s.contains('p')) } else { copy.is_none() };
    e.check(
        &format!("{pre}-receiver"),
        ended && copy_ok,
        format!(
            "the receiver ended: {ended}; {incoming} on B {} (want {})",
            copy.map_or("gone".into(), |s| format!("there, state {s}")),
            if identity_there { "paused: the identity is on B" } else { "destroyed: the identity is on A" }
        ),
    );
    show_tail(&format!("kill round {tag}: source + receiver stderr"), &xen::read_text(&err), 12);
    // the same command with --finish in place of --non-live
    let fin: Vec<&str> = argv.iter().map(|w| if w == "--non-live" { "--finish" } else { w.as_str() }).collect();
    let o = on(&a, &fin)
        .env("XVTPM_LOG", "info")
        .secs(420)
        .save_split(&format!("/tmp/xl-mig-xd-finish{tag}.out"), &format!("/tmp/xl-mig-xd-finish{tag}.out.err"))
        .run(cx);
    show("xl-vtpm migrate --finish", &o.all());
    let (want_rc, holder) = if identity_there { (0, B_HOST) } else { (1, A_HOST) };
    let said = o.all();
    e.check(
        &format!("{pre}-finish"),
        o.rc == want_rc && (identity_there || said.contains("never arrived")),
        format!("xl-vtpm migrate {NAME} {B_HOST} --finish rc={} in {} ms (want {want_rc}{}): {}", o.rc, o.elapsed.as_millis(), if identity_there { "" } else { ", the guest never arrived" }, o.tail1(2)),
    );
    let g = xen::domid(NAME).unwrap_or_default();
    let vd = xen::domid(VDOM).unwrap_or_default();
    let (ra, rb) = (row(cx, &a, NAME), row(cx, &b, NAME));
    e.check(
        &format!("{pre}-holder"),
        !g.is_empty() && !vd.is_empty() && jf(&ra, "host") == holder && jf(&rb, "host") == holder && jf(&ra, "guest_domid") == g && jf(&ra, "vtpm_domid") == vd,
        format!("{NAME} domain {}, {VDOM} domain {}; the registry names host {} / {} (want {holder}), guest domid {}, vTPM domid {}", none(&g), none(&vd), none(&jf(&ra, "host")), none(&jf(&rb, "host")), jf(&ra, "guest_domid"), jf(&ra, "vtpm_domid")),
    );
    if !g.is_empty() && !vd.is_empty() {
        let served = !xen::xs_ls(&format!("/local/domain/{vd}/backend/vtpm/{g}")).is_empty();
        e.check(&format!("{pre}-backend"), served, format!("{VDOM} (domain {vd}) serves the guest's device (domain {g}): {served}"));
        let a1 = guest_cmd(cx, NAME, 20 + u32::from(identity_there), &format!("migcheck:{}", xen::nonce(16)), 240);
        println!("[{NAME}] {a1}");
        e.check(&format!("{pre}-pcr16"), field(&a1, "pcr16") == pcr, format!("after --finish: PCR 16 before {pcr} after {} (kept: the suspend's state resumed)", none(&field(&a1, "pcr16"))));
        e.check(
            &format!("{pre}-tpm"),
            !ek.is_empty() && field(&a1, "ek") == ek && field(&a1, "persistent") == "kept" && field(&a1, "nv") == "kept" && field(&a1, "quote") == "verified",
            format!("after --finish: EK {}, 0x81000010 {}, NV {}, a fresh AK quote {}", if field(&a1, "ek") == ek { "the same" } else { "NOT the same" }, none(&field(&a1, "persistent")), none(&field(&a1, "nv")), none(&field(&a1, "quote"))),
        );
    }
    let left = leftovers(uuid, NAME);
    e.check(&format!("{pre}-no-leftover"), left.is_empty(), format!("move record, save files, B's incoming config left: {left:?}"));
    let ms = t0.elapsed().as_millis();
    println!("PERF migrate-xhost-dom-kill{tag}-round-ms={ms}");
    format!("kill round {tag} ({}): --finish rc {} in {ms} ms, on {holder}", if identity_there { "after the import" } else { "after the suspend" }, o.rc)
}

/// `xl-vtpm destroy` under whichever host holds the guest; the pair and both identities removed.
fn cleanup(cx: &Cx, uuid: &str) {
    let (a, b) = (a_env(), b_env());
    for env in [&a, &b] {
        if xen::domid(NAME).is_some() || xen::domid(VDOM).is_some() {
            let o = on(env, &["xl-vtpm", "destroy", NAME]).secs(150).run(cx);
            println!("INFO migrate-xhost-dom cleanup: xl-vtpm destroy {NAME} under {} rc={}", env_words(env), o.rc);
        }
    }
    for d in [NAME, VDOM] {
        xen::destroy_if_running(cx, d);
    }
    let rr = on(&a, &["xl-vtpm", "registry", "remove", NAME, "--yes"]).secs(60).run(cx);
    let mut dels = Vec::new();
    if !uuid.is_empty() && rr.ok() {
        for env in [&a, &b] {
            dels.push(on(env, &["xl-vtpm", "mgr", "vtpm", "del", uuid, "--yes"]).secs(60).run(cx).rc);
        }
    }
    if !uuid.is_empty() {
        for s in [A_STATE, B_STATE] {
            let _ = std::fs::remove_file(format!("{s}/migrate-save/{uuid}.xlsave"));
        }
    }
    println!("INFO migrate-xhost-dom cleanup: registry remove {NAME} rc={}; vTPM {} identity deleted on A, B: rc {dels:?}", rr.rc, none(uuid));
}
