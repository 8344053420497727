//! **P3**: time from "create a vTPM" to its first answered command, EK included — through
//! `xl-vtpm` and step by step against the manager — vs `swtpm_setup --create-ek-cert` plus
//! spawning swtpm, with an ECC P-256 EK variant measured in process; timestamps read from the
//! processes' logs where a step has no other observable end.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use vtpm_engine::{Engine, TpmVersion, Zeroizing};
use vtpm_proto::mgr::{AdminReply, AdminRequest};
use tpm_wire::Family;

use crate::procs::{Procs, free_port_pair};
use crate::report::{med, pass, row_ms};
use crate::stats::ms;
use crate::tpm;
use crate::{Args, Stack, admin_call, get_random_once, loadavg, swtpm_cmd};

#[derive(Default)]
pub(crate) struct P3 {
    /// xl-vtpm vtpm create (CLI exit) and create → first GetRandom answered.
    xl_cli: Vec<u64>,
    /// `xl-vtpm vtpm show UUID --json`: the CLI's fixed cost (exec, admin connect, one request).
    xl_show: Vec<u64>,
    xl_total: Vec<u64>,
    /// The same, claiming a vTPM made ahead of demand (`vtpm pool fill`), interleaved with
    /// `xl_total`'s creates; and the fill's time per vTPM made (off the create's path).
    pool_cli: Vec<u64>,
    pool_total: Vec<u64>,
    pool_fill_each: Vec<u64>,
    /// Creates that found the pool empty and manufactured (should be 0).
    pool_misses: usize,
    /// The same with the pool kept at size 2 by `vtpm pool size`: each create claims and leaves
    /// a background refill (nice 19) running while its vTPM answers its first command.
    bg_cli: Vec<u64>,
    bg_total: Vec<u64>,
    bg_misses: usize,
    /// Direct steps (ns, per create): VtpmCreate, spawn(), VtpmAttach, spawn→ready line,
    /// ready→first answer, total; and from the logs: spawn→key released, spawn→manufactured.
    d_create: Vec<u64>,
    d_spawn: Vec<u64>,
    d_attach: Vec<u64>,
    d_ready: Vec<u64>,
    d_first: Vec<u64>,
    d_total: Vec<u64>,
    d_key_released: Vec<u64>,
    d_manufactured: Vec<u64>,
    /// In process.
    exec: Vec<u64>,
    key_fetch: Vec<u64>,
    manufacture: Vec<u64>,
    startup: Vec<u64>,
    ek_rsa: Vec<u64>,
    evict: Vec<u64>,
    ek_ecc: Vec<u64>,
    get_state: Vec<u64>,
    seal: Vec<u64>,
    write_fsync: Vec<u64>,
    vtpm_manufacture: Vec<u64>,
    /// IssueEkCert of a new identity's EK (CA signature in the physical TPM + the store write
    /// that makes the identity durable), and the same request repeated (signature only).
    ek_cert_first: Vec<u64>,
    ek_cert_again: Vec<u64>,
    /// The physical store counter before and after the xl-vtpm creates (from `mgr status`).
    counter_xl: Option<(u64, u64)>,
    /// The same across the pool fills (before the creates).
    counter_fill: Option<(u64, u64)>,
    /// Counter increments of each pooled and each manufacturing create.
    counter_per_claim: Vec<u64>,
    counter_per_new: Vec<u64>,
    /// Whether the manager reserves identities (`VtpmReserve`) or writes them at once.
    reserve: bool,
    state_len: usize,
    /// swtpm.
    sw_setup_cert: Vec<u64>,
    sw_setup_ek: Vec<u64>,
    sw_spawn_first: Vec<u64>,
    sw_total_cert: Vec<u64>,
    sw_total_ek: Vec<u64>,
    load: String,
}

/// Seconds since midnight UTC of a tracing timestamp (`2026-11-24T06:06:32.123456Z ...`).
pub(crate) fn log_time_of_day(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let t = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut it = t.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn now_time_of_day() -> f64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() % 86400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

fn find_log_time(path: &Path, needle: &str, also: &str) -> Option<f64> {
    let s = fs::read_to_string(path).ok()?;
    s.lines()
        .filter(|l| l.contains(needle) && l.contains(also))
        .find_map(log_time_of_day)
}

/// Waits until the pool holds `n` ready vTPMs and no fill is making one.
fn wait_pool_full(stack: &Stack, n: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = stack.xl(&["vtpm", "pool", "status", "--json"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ready: u64 = v["ready"].as_array().map(|a| a.iter().filter_map(|c| c["ready"].as_u64()).sum()).unwrap_or(0);
        if ready >= n && v["making"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pool never refilled to {n}: {v}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn timed<T>(v: &mut Vec<u64>, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    v.push(t.elapsed().as_nanos() as u64);
    r
}

pub(crate) fn p3(args: &Args, stack: &Stack, procs: &mut Procs) -> Result<P3> {
    let mut r = P3 {
        load: loadavg(),
        ..Default::default()
    };

    // (a) xl-vtpm vtpm create, then the first GetRandom: manufactured now (--no-pool), and
    // claimed from the pool, interleaved (one of each per round; the pool is filled ahead,
    // untimed except for the fill's own cost per vTPM).
    let counter_before = store_counter(stack);
    let mut pids = vec![];
    for _ in 0..args.creates {
        let t0 = Instant::now();
        let out = stack.xl(&["vtpm", "pool", "fill", "--count", "1", "--json"])?;
        if !out.status.success() {
            bail!("xl-vtpm vtpm pool fill failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        r.pool_fill_each.push(t0.elapsed().as_nanos() as u64);
    }
    let counter_filled = store_counter(stack);
    for _ in 0..args.creates {
        let c0 = store_counter(stack);
        let t0 = Instant::now();
        let (_, pid, port, from) = stack.create_from(procs, &[])?;
        r.pool_cli.push(t0.elapsed().as_nanos() as u64);
        get_random_once(port)?;
        r.pool_total.push(t0.elapsed().as_nanos() as u64);
        if from != "pool" {
            r.pool_misses += 1;
        }
        pids.push(pid);
        let c1 = store_counter(stack);
        let t0 = Instant::now();
        let (uuid, pid, port, _) = stack.create_from(procs, &["--no-pool"])?;
        r.xl_cli.push(t0.elapsed().as_nanos() as u64);
        get_random_once(port)?;
        r.xl_total.push(t0.elapsed().as_nanos() as u64);
        pids.push(pid);
        if let (Some(a), Some(b), Some(c)) = (c0, c1, store_counter(stack)) {
            r.counter_per_claim.push(b - a);
            r.counter_per_new.push(c - b);
        }
        let u = uuid.to_string();
        let out = timed(&mut r.xl_show, || stack.xl(&["vtpm", "show", &u, "--json"]))?;
        if !out.status.success() {
            bail!(
                "xl-vtpm vtpm show failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    if let (Some(a), Some(f), Some(b)) = (counter_before, counter_filled, store_counter(stack)) {
        r.counter_xl = Some((f, b));
        r.counter_fill = Some((a, f));
    }
    // (a') the pool kept at a size by its background refill (`vtpm pool size 2`): each create
    // claims and starts a refill that runs while the claimed vTPM answers; the next create
    // waits (untimed) until the pool is full again.
    let out = stack.xl(&["vtpm", "pool", "size", "2", "--json"])?;
    if !out.status.success() {
        bail!("xl-vtpm vtpm pool size failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    for _ in 0..args.creates {
        wait_pool_full(stack, 2)?;
        let t0 = Instant::now();
        let (_, pid, port, from) = stack.create_from(procs, &[])?;
        r.bg_cli.push(t0.elapsed().as_nanos() as u64);
        get_random_once(port)?;
        r.bg_total.push(t0.elapsed().as_nanos() as u64);
        if from != "pool" {
            r.bg_misses += 1;
        }
        pids.push(pid);
    }
    wait_pool_full(stack, 2)?;
    let out = stack.xl(&["vtpm", "pool", "size", "0", "--json"])?;
    if !out.status.success() {
        bail!("xl-vtpm vtpm pool size 0 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    procs.stop_many(&pids, Duration::from_secs(3));
    eprintln!("P3 xl-vtpm creates done (load {})", loadavg());
    r.reserve = {
        let mut admin = stack.admin()?;
        let probe = vtpm_proto::mgr_io::call::<_, _, AdminReply>(&mut admin.0, &AdminRequest::VtpmReserve { group: None, uuid: None })
            .map_err(|e| anyhow!("VtpmReserve probe: {e}"))?;
        match probe {
            AdminReply::Vtpm(v) => {
                let _ = admin_call(&mut admin, &AdminRequest::VtpmDel { uuid: v.uuid });
                true
            }
            _ => false, // a manager without reservations (an earlier build)
        }
    };

    // (b) The same steps done directly, with timestamps between them.
    let mut admin = stack.admin()?;
    let mut pids = vec![];
    for _ in 0..args.creates {
        let t0 = Instant::now();
        let info = match admin_call(&mut admin, &new_identity(r.reserve))? {
            AdminReply::Vtpm(v) => v,
            o => bail!("unexpected {o:?}"),
        };
        let t1 = Instant::now();
        let dir = stack.state_dir.join("direct").join(info.uuid.to_string());
        fs::create_dir_all(&dir)?;
        let log = dir.join("vtpm.log");
        let spawn_tod = now_time_of_day();
        let (pid, stdout) = procs.spawn_piped(
            Command::new(stack.bin.join("vtpm-domain"))
                .arg("--uuid")
                .arg(info.uuid.to_string())
                .arg("--state")
                .arg(dir.join("state.xvts"))
                .arg("--mgr-socket")
                .arg(&info.socket)
                .arg("--create")
                .arg("--listen")
                .arg("tcp:127.0.0.1:0")
                .env("XVTPM_LOG", "info")
                .stdin(Stdio::null())
                .stderr(fs::File::create(&log)?),
        )?;
        let t2 = Instant::now();
        admin_call(
            &mut admin,
            &AdminRequest::VtpmAttach {
                uuid: info.uuid,
                pid,
            },
        )?;
        let t3 = Instant::now();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let t4 = Instant::now();
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "vtpm-domain ready line {line:?}; log: {}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        let port = v["tcp_ports"][0][0]
            .as_u64()
            .ok_or_else(|| anyhow!("no port in {v}"))? as u16;
        get_random_once(port)?;
        let t5 = Instant::now();
        let d = |a: Instant, b: Instant| (b - a).as_nanos() as u64;
        r.d_create.push(d(t0, t1));
        r.d_spawn.push(d(t1, t2));
        r.d_attach.push(d(t2, t3));
        r.d_ready.push(d(t1, t4));
        r.d_first.push(d(t4, t5));
        r.d_total.push(d(t0, t5));
        let uuid = info.uuid.to_string();
        if let Some(t) = find_log_time(&stack.mgr_log, "released state key", &uuid) {
            r.d_key_released
                .push(((t - spawn_tod).max(0.0) * 1e9) as u64);
        }
        if let Some(t) = find_log_time(&log, "manufactured a new vTPM", &uuid) {
            r.d_manufactured
                .push(((t - spawn_tod).max(0.0) * 1e9) as u64);
        }
        pids.push(pid);
    }
    procs.stop_many(&pids, Duration::from_secs(3));
    eprintln!("P3 direct creates done (load {})", loadavg());

    // (c) In process: the pieces vtpm-domain does at --create.
    let info = match admin_call(
        &mut admin,
        &AdminRequest::VtpmCreate {
            group: None,
            uuid: None,
        },
    )? {
        AdminReply::Vtpm(v) => v,
        o => bail!("unexpected {o:?}"),
    };
    admin_call(
        &mut admin,
        &AdminRequest::VtpmAttach {
            uuid: info.uuid,
            pid: std::process::id(),
        },
    )?;
    let sock = PathBuf::from(&info.socket);
    let seal_dir = args.work.join("p3-inproc");
    fs::create_dir_all(&seal_dir)?;
    for i in 0..args.creates {
        timed(&mut r.exec, || {
            Command::new(stack.bin.join("vtpm-domain"))
                .arg("--version")
                .output()
        })?;
        let key = timed(&mut r.key_fetch, || {
            vtpm_domain::mgr_client::fetch_state_key_blocking(
                &sock,
                info.uuid,
                Duration::from_secs(10),
            )
        })?;
        let mut e = timed(&mut r.manufacture, || {
            Engine::start(TpmVersion::Tpm2, None, None)
        })?;
        let rsp = timed(&mut r.startup, || e.process(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR)));
        check(&rsp, "Startup")?;
        let rsp = timed(&mut r.ek_rsa, || {
            e.process(&tpm::create_primary_ek(&vtpm_engine::ek_rsa2048_template()))
        });
        check(&rsp, "CreatePrimary RSA")?;
        let h = tpm::object_handle(&rsp);
        let rsp = timed(&mut r.evict, || {
            e.process(&tpm::evict_control(h, vtpm_engine::EK_RSA_HANDLE))
        });
        check(&rsp, "EvictControl")?;
        check(&e.process(&tpm::flush(h)), "FlushContext")?;
        let rsp = timed(&mut r.ek_ecc, || {
            e.process(&tpm::create_primary_ek(&vtpm_engine::ek_ecc_p256_template()))
        });
        check(&rsp, "CreatePrimary ECC")?;
        check(
            &e.process(&tpm::flush(tpm::object_handle(&rsp))),
            "FlushContext",
        )?;
        let perm = timed(&mut r.get_state, || e.permanent_state())?;
        let state = vtpm_proto::sealed::State {
            family: Family::Tpm2,
            generation: 1,
            permanent: Zeroizing::new(perm.to_vec()),
            volatile: Zeroizing::new(vec![]),
        };
        let blob = timed(&mut r.seal, || {
            vtpm_proto::sealed::seal(&key, &info.uuid, &state, &[7u8; 12])
        });
        r.state_len = blob.len();
        let path = seal_dir.join(format!("s{i}.xvts"));
        timed(&mut r.write_fsync, || {
            xvtpm_fsutil::write_atomic(&path, &blob, 0o600)
        })?;
        drop(e);
        // The whole of Vtpm::manufacture (engine, EK, seal, atomic write), as vtpm-domain runs it.
        let store = vtpm_domain::store::Store::create(
            &seal_dir.join(format!("m{i}.xvts")),
            info.uuid,
            Family::Tpm2,
            key,
        )?;
        let v = timed(&mut r.vtpm_manufacture, || {
            vtpm_domain::vtpm::Vtpm::manufacture(Family::Tpm2, store)
        })?;
        drop(v);
        // The EK certificate of a new identity, as `vtpm-domain --create` asks for it.
        let ecc = e_ek_public(&key_engine_ek()?)?;
        let id = match admin_call(&mut admin, &new_identity(r.reserve))? {
            AdminReply::Vtpm(v) => v,
            o => bail!("unexpected {o:?}"),
        };
        admin_call(&mut admin, &AdminRequest::VtpmAttach { uuid: id.uuid, pid: std::process::id() })?;
        let mut link = std::os::unix::net::UnixStream::connect(&id.socket).with_context(|| format!("connecting {}", id.socket))?;
        let req = vtpm_proto::mgr::VtpmRequest::IssueEkCert { uuid: id.uuid, ek_public: hex::encode(&ecc), tpm: libtpms_info() };
        for series in [&mut r.ek_cert_first, &mut r.ek_cert_again] {
            let reply = timed(series, || vtpm_proto::mgr_io::call::<_, _, vtpm_proto::mgr::VtpmReply>(&mut link, &req))
                .map_err(|e| anyhow!("IssueEkCert: {e}"))?;
            if !matches!(reply, vtpm_proto::mgr::VtpmReply::EkCert { .. }) {
                bail!("IssueEkCert: {reply:?}");
            }
        }
        drop(link);
        let _ = admin_call(&mut admin, &AdminRequest::VtpmDetach { uuid: id.uuid });
    }
    let _ = admin_call(&mut admin, &AdminRequest::VtpmDetach { uuid: info.uuid });
    eprintln!("P3 in-process done (load {})", loadavg());

    // (d) swtpm_setup + spawning swtpm until its first GetRandom answers.
    let ca = args.work.join("swtpm-ca");
    fs::create_dir_all(&ca)?;
    let conf = ca.join("swtpm_setup.conf");
    fs::write(
        ca.join("localca.conf"),
        format!(
            "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\ncertserial = {d}/certserial\n",
            d = ca.display()
        ),
    )?;
    fs::write(
        ca.join("localca.options"),
        "--platform-manufacturer xvtpm-bench\n--platform-version 2.1\n--platform-model bench\n",
    )?;
    fs::write(
        &conf,
        format!(
            "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {d}/localca.conf\ncreate_certs_tool_options = {d}/localca.options\nactive_pcr_banks = sha256\n",
            d = ca.display()
        ),
    )?;
    let setup = |dir: &Path, ek_cert: bool| -> Result<()> {
        fs::create_dir_all(dir)?;
        let mut c = Command::new("swtpm_setup");
        c.arg("--tpm2")
            .arg("--tpmstate")
            .arg(dir)
            .arg("--config")
            .arg(&conf);
        if ek_cert {
            c.arg("--create-ek-cert");
        } else {
            c.arg("--createek");
        }
        let out = c.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "swtpm_setup failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    setup(&args.work.join("swtpm-setup-warmup"), true)?; // creates the local CA (not timed)
    for i in 0..args.setups {
        for ek_cert in [true, false] {
            let dir = args.work.join(format!("swtpm-setup-{i}-{ek_cert}"));
            let t0 = Instant::now();
            setup(&dir, ek_cert)?;
            let t1 = Instant::now();
            let (pid, port) = {
                let port = free_port_pair()?;
                (procs.spawn(&mut swtpm_cmd(port, &dir, None))?, port)
            };
            get_random_once(port)?;
            let t2 = Instant::now();
            procs.stop(pid, Duration::from_secs(3));
            let d = |a: Instant, b: Instant| (b - a).as_nanos() as u64;
            if ek_cert {
                r.sw_setup_cert.push(d(t0, t1));
                r.sw_total_cert.push(d(t0, t2));
            } else {
                r.sw_setup_ek.push(d(t0, t1));
                r.sw_total_ek.push(d(t0, t2));
            }
            r.sw_spawn_first.push(d(t1, t2));
        }
    }
    eprintln!("P3 swtpm done (load {})", loadavg());
    Ok(r)
}

/// What the manager is asked for a new vTPM identity: what `xl-vtpm vtpm create` asks.
fn new_identity(reserve: bool) -> AdminRequest {
    if reserve { AdminRequest::VtpmReserve { group: None, uuid: None } } else { AdminRequest::VtpmCreate { group: None, uuid: None } }
}

/// The store's rollback counter as the physical TPM holds it (`mgr status`).
fn store_counter(stack: &Stack) -> Option<u64> {
    let mut admin = stack.admin().ok()?;
    match admin_call(&mut admin, &AdminRequest::Status).ok()? {
        AdminReply::Status(s) => s.store_counter.and_then(|c| c.tpm_value),
        _ => None,
    }
}

/// A fresh libtpms with an ECC P-256 EK: the CreatePrimary response.
fn key_engine_ek() -> Result<Vec<u8>> {
    let mut e = Engine::start(TpmVersion::Tpm2, None, None)?;
    check(&e.process(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR)), "Startup")?;
    let rsp = e.process(&tpm::create_primary_ek(&vtpm_engine::ek_ecc_p256_template()));
    check(&rsp, "CreatePrimary ECC")?;
    Ok(rsp.to_vec())
}

/// The TPM2B_PUBLIC of a CreatePrimary response (handle, parameterSize, then outPublic).
fn e_ek_public(rsp: &[u8]) -> Result<Vec<u8>> {
    let n = rsp.get(18..20).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize).ok_or_else(|| anyhow!("short CreatePrimary response"))?;
    rsp.get(18..20 + n).map(<[u8]>::to_vec).ok_or_else(|| anyhow!("short CreatePrimary response"))
}

/// libtpms' TPM properties, as vtpm-domain reports them.
fn libtpms_info() -> vtpm_proto::mgr::TpmInfo {
    vtpm_proto::mgr::TpmInfo { manufacturer: 0x4942_4D00, model: "SW   TPM".into(), firmware_version: 0x2019_1023, family: "2.0".into(), level: 0, revision: 164 }
}

fn check(rsp: &[u8], what: &str) -> Result<()> {
    match tpm::rc(rsp) {
        0 => Ok(()),
        rc => bail!("{what} returned {rc:#x}"),
    }
}

pub(crate) fn report_p3(out: &mut String, r: &P3, args: &Args) {
    let _ = writeln!(
        out,
        "### P3 — new vTPM to first answered command (EK included)\n"
    );
    let _ = writeln!(
        out,
        "{} creates per method; swtpm_setup {} runs per variant (after one untimed run that creates the local CA). \
         State files on the work directory's file system, runtime directory as in the header. The RSA-2048 EK's prime search depends on the \
         random endorsement seed, so its time varies several-fold from one new TPM to the next: medians of different series carry that noise. \
         Load average at start: {}.\n",
        args.creates, args.setups, r.load
    );
    let ours = med(&r.xl_total);
    let sw = med(&r.sw_total_cert);
    let sw_ek = med(&r.sw_total_ek);
    let _ = writeln!(
        out,
        "| | ours (median ms) | swtpm baseline (median ms) | ratio | goal |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| `xl-vtpm vtpm create` → first GetRandom answered, vs `swtpm_setup --tpm2 --create-ek-cert` + spawn swtpm → first GetRandom | {} | {} | {:.3}× | ≤ 40 ms: {} |",
        ms(ours),
        ms(sw),
        ours / sw,
        pass(ours <= 40e6)
    );
    let pooled = med(&r.pool_total);
    let pooled_p99 = crate::stats::summarize(&r.pool_total).p99;
    let _ = writeln!(
        out,
        "| `xl-vtpm vtpm create` claiming a pooled vTPM (made ahead by `vtpm pool fill`) → first GetRandom answered, vs the same swtpm baseline | {} (p99 {}) | {} | {:.3}× | ≤ 40 ms: {}; moonshot ≤ 10 ms p99: {} |",
        ms(pooled),
        ms(pooled_p99),
        ms(sw),
        pooled / sw,
        pass(pooled <= 40e6),
        pass(pooled_p99 <= 10e6)
    );
    let bg = med(&r.bg_total);
    let bg_p99 = crate::stats::summarize(&r.bg_total).p99;
    let _ = writeln!(
        out,
        "| same, the pool kept at 2 by `vtpm pool size 2` (each claim leaves a refill at nice 19 running while its vTPM answers) | {} (p99 {}) | {} | {:.3}× | ≤ 40 ms: {}; moonshot ≤ 10 ms p99: {} |",
        ms(bg),
        ms(bg_p99),
        ms(sw),
        bg / sw,
        pass(bg <= 40e6),
        pass(bg_p99 <= 10e6)
    );
    let _ = writeln!(
        out,
        "| same, vs `swtpm_setup --tpm2 --createek` (no certificates) + spawn swtpm | {} | {} | {:.3}× | |",
        ms(ours),
        ms(sw_ek),
        ours / sw_ek
    );
    let _ = writeln!(
        out,
        "| direct steps (no xl-vtpm process): {} → spawn vtpm-domain --create → attach → first GetRandom | {} | | | ≤ 40 ms: {} |",
        if r.reserve { "VtpmReserve" } else { "VtpmCreate" },
        ms(med(&r.d_total)),
        pass(med(&r.d_total) <= 40e6)
    );
    let _ = writeln!(out, "\nDistributions (ms):\n");
    let _ = writeln!(out, "| series | median | min | p90 | max |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    row_ms(out, "xl-vtpm vtpm create (CLI until exit)", &r.xl_cli);
    row_ms(
        out,
        "xl-vtpm vtpm create → first GetRandom answered",
        &r.xl_total,
    );
    let _ = writeln!(out, "| same, p99 | {} | | | |", ms(crate::stats::summarize(&r.xl_total).p99));
    row_ms(out, "pooled: xl-vtpm vtpm create (CLI until exit, claim + start)", &r.pool_cli);
    row_ms(out, "pooled: xl-vtpm vtpm create → first GetRandom answered", &r.pool_total);
    let _ = writeln!(
        out,
        "| pooled, p99 ({} of {} creates found the pool empty) | {} | | | |",
        r.pool_misses,
        r.pool_total.len(),
        ms(crate::stats::summarize(&r.pool_total).p99)
    );
    row_ms(out, "pool size 2, background refill: xl-vtpm vtpm create (CLI until exit, claim + start + refill spawned)", &r.bg_cli);
    row_ms(out, "pool size 2, background refill: xl-vtpm vtpm create → first GetRandom answered", &r.bg_total);
    let _ = writeln!(
        out,
        "| pool size 2, p99 ({} of {} creates found the pool empty) | {} | | | |",
        r.bg_misses,
        r.bg_total.len(),
        ms(crate::stats::summarize(&r.bg_total).p99)
    );
    row_ms(out, "off the create's path: `xl-vtpm vtpm pool fill --count 1` (one vTPM made ahead: manufacture, RSA EK, EK certificate, 2 store writes)", &r.pool_fill_each);
    row_ms(
        out,
        "for scale: `xl-vtpm vtpm show UUID --json` (the CLI's fixed cost: exec, admin connect, one request)",
        &r.xl_show,
    );
    row_ms(
        out,
        if r.reserve { "direct: manager VtpmReserve (admin socket; no store write: the identity is written with its EK certificate)" } else { "direct: manager VtpmCreate (admin socket, store write)" },
        &r.d_create,
    );
    row_ms(
        out,
        "direct: fork/exec returns (`Command::spawn`)",
        &r.d_spawn,
    );
    row_ms(out, "direct: VtpmAttach (after spawn)", &r.d_attach);
    row_ms(
        out,
        "direct: spawn start → manager logs \"released state key\" (fork/exec, runtime init, key fetch; log timestamps)",
        &r.d_key_released,
    );
    row_ms(
        out,
        "direct: spawn start → vtpm-domain logs \"manufactured\" (+ manufacture, EK, seal, fsync; log timestamps)",
        &r.d_manufactured,
    );
    row_ms(
        out,
        "direct: spawn start → ready line on stdout (+ tokio runtime, bind listeners)",
        &r.d_ready,
    );
    row_ms(
        out,
        "direct: ready → first GetRandom answered (connect + command)",
        &r.d_first,
    );
    row_ms(out, "direct: total", &r.d_total);
    row_ms(
        out,
        "swtpm_setup --tpm2 --create-ek-cert (RSA-2048 + ECC P-384 EKs, 2 EK certs)",
        &r.sw_setup_cert,
    );
    row_ms(
        out,
        "swtpm_setup --tpm2 --createek (RSA-2048 + ECC P-384 EKs, no certs)",
        &r.sw_setup_ek,
    );
    row_ms(
        out,
        "swtpm spawn → first GetRandom answered",
        &r.sw_spawn_first,
    );
    row_ms(out, "swtpm total with EK certs", &r.sw_total_cert);
    row_ms(out, "swtpm total without certs", &r.sw_total_ek);
    let _ = writeln!(
        out,
        "\nBreakdown of our time, each piece measured in process by the harness (ms, {} iterations, fresh TPM each):\n",
        r.manufacture.len()
    );
    let _ = writeln!(out, "| piece | median | min | p90 | max |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    row_ms(
        out,
        "process spawn: `vtpm-domain --version` spawn → exit (exec, dynamic linking, clap)",
        &r.exec,
    );
    row_ms(
        out,
        "key fetch from the manager (`mgr_client::fetch_state_key`, attached)",
        &r.key_fetch,
    );
    row_ms(
        out,
        "libtpms manufacture (`Engine::start(Tpm2, None, None)`)",
        &r.manufacture,
    );
    row_ms(out, "TPM2_Startup(CLEAR)", &r.startup);
    row_ms(out, "EK CreatePrimary RSA-2048 (template L-1)", &r.ek_rsa);
    row_ms(out, "EvictControl → 0x81010001", &r.evict);
    row_ms(
        out,
        "*alternative:* EK CreatePrimary ECC NIST P-256 (template L-2)",
        &r.ek_ecc,
    );
    row_ms(out, "TPMLIB_GetState(PERMANENT)", &r.get_state);
    row_ms(
        out,
        &format!("seal (AES-256-GCM, {} B file)", r.state_len),
        &r.seal,
    );
    row_ms(
        out,
        "atomic write: temp + fsync + rename + dir fsync",
        &r.write_fsync,
    );
    row_ms(
        out,
        "all of `Vtpm::manufacture` (engine, RSA EK, seal, write)",
        &r.vtpm_manufacture,
    );
    row_ms(
        out,
        if r.reserve {
            "IssueEkCert of a new identity's ECC EK (CA signature in the physical TPM + the one store write of the create)"
        } else {
            "IssueEkCert of a new identity's ECC EK (CA signature in the physical TPM + the EK binding's store write)"
        },
        &r.ek_cert_first,
    );
    row_ms(out, "IssueEkCert repeated for the same EK (CA signature only, no store write)", &r.ek_cert_again);
    if let Some((a, b)) = r.counter_xl {
        let _ = writeln!(
            out,
            "\nPhysical store counter (read from the TPM by `mgr status`) across the {} `xl-vtpm vtpm create`s (half from the pool): {a} → {b}, {:.2} increments per create.",
            r.xl_total.len() + r.pool_total.len(),
            (b - a) as f64 / (r.xl_total.len() + r.pool_total.len()).max(1) as f64
        );
    }
    if let Some((a, b)) = r.counter_fill {
        let _ = writeln!(
            out,
            "Across the {} pool fills: {a} → {b}, {:.2} increments per vTPM made (the identity with its EK certificate, and the first state's anchor).",
            r.pool_fill_each.len(),
            (b - a) as f64 / r.pool_fill_each.len().max(1) as f64
        );
    }
    if !r.counter_per_claim.is_empty() {
        let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
        let _ = writeln!(
            out,
            "Per create: {:.2} increments for a claim from the pool (the state write after its first Startup), {:.2} for a manufacturing create (the identity with its EK certificate).",
            avg(&r.counter_per_claim),
            avg(&r.counter_per_new)
        );
    }
    let rsa = med(&r.ek_rsa);
    let ecc = med(&r.ek_ecc);
    let _ = writeln!(
        out,
        "\nRSA-2048 EK CreatePrimary is {:.0}% of the median create-to-first-answer time; an ECC P-256 EK would take {} ms instead of {} ms \
         (median), i.e. the create path would be about {} ms.\n",
        100.0 * rsa / ours,
        ms(ecc),
        ms(rsa),
        ms((ours - rsa + ecc).max(0.0))
    );
}
