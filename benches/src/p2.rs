//! **P2**: deep quotes per second and latency with N concurrent requesters, batched vs
//! unbatched, against the physical swtpm directly and behind a fixed per-command delay
//! (testkit's `DelayProxy`, modelling a discrete TPM).
//!
//! Every requester is its own vTPM (`vtpm-domain` created with `xl-vtpm vtpm create --ek ecc`)
//! with one persistent TCP connection to its data port and one outstanding request at a time
//! (closed loop), each request with a fresh random 32-byte nonce. A cell (TPM × mode × N) runs
//! on a freshly started manager (same state, same swtpm) so its queue and counters start empty.
//! Responses are kept and verified offline, after the timed section, with
//! `vtpm_attest::verify::verify` against the group's AK, the nonce sent and the vTPM's UUID.
//!
//! `--p2-via service` adds one cell in which the same N vTPMs are asked through the
//! attestation service by 1 000 mTLS tenants ([`service`]), behind the same delay proxy.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use testkit::delay::DelayProxy;
use uuid::Uuid;
use vtpm_attest::verify::{Expectations, verify};
use vtpm_proto::deepquote_cmd::{self, DeepQuoteCommand};
use vtpm_proto::evidence::{Bundle, TPM_ALG_SHA256};
use vtpm_proto::mgr::AdminRequest;

use crate::p3::log_time_of_day;
use crate::procs::{Procs, connect_retry};
use crate::{Args, Stack, admin_call, loadavg};

mod service;

/// The vPCRs and host PCRs every request selects (what a guest attesting its boot would ask).
const VPCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
const HOST_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

/// One request as the requester saw it.
pub struct Sample {
    vtpm: usize,
    /// ns since the cell's start.
    start: u64,
    /// ns since the cell's start; None: still outstanding when the cell was stopped.
    end: Option<u64>,
    nonce: [u8; 32],
    /// The vendor command's response, or (`bundle`) the evidence bundle itself.
    rsp: Vec<u8>,
    bundle: bool,
}

/// Offline verification outcome of one cell.
#[derive(Default)]
pub struct Verified {
    pub checked: usize,
    pub ok: usize,
    /// First failures (text), at most 5.
    pub failures: Vec<String>,
    /// Tree size of every verified bundle (the batch it was signed in).
    pub tree_sizes: Vec<u32>,
    pub secs: f64,
    pub sampled: bool,
}

/// The "verified" column of a report table: `ok/checked`, ` (sample)` when only a sample was
/// checked, and the first failures.
fn verified_cell(v: &Verified) -> String {
    let mut s = format!("{}/{}", v.ok, v.checked);
    if v.sampled {
        s.push_str(" (sample)");
    }
    if !v.failures.is_empty() {
        s.push_str(&format!(" — FAILED: {}", v.failures.join("; ")));
    }
    s
}

/// One cell of the P2 table.
pub struct Cell {
    pub delayed: bool,
    pub batched: bool,
    pub n: usize,
    /// Time box (ns): requests are issued only before it.
    pub window: u64,
    /// Responses with rc 0 that arrived inside the window.
    pub done_in_window: usize,
    /// Latencies (ns) of all completed successful requests (window + drain).
    pub lat: Vec<u64>,
    /// The same without each requester's first request (the one that meets a cold manager:
    /// the AK's first load), reported beside the goal, never instead of it.
    pub lat_warm: Vec<u64>,
    /// Ages (ns) at the stop of the requests still outstanding (right-censored latencies).
    pub censored: Vec<u64>,
    /// Error responses by response code.
    pub errors: BTreeMap<u32, usize>,
    /// How long the cell waited after the window for outstanding requests (ns).
    #[allow(dead_code)]
    pub drain: u64,
    /// Manager counters over the cell (status before the first request, after the drain).
    pub deep_quotes: u64,
    pub physical_quotes: u64,
    /// Physical TPM commands seen by the counting proxy during the cell (delay cells only),
    /// by command code.
    pub tpm_cmds: BTreeMap<u32, u64>,
    /// From the manager's debug log: (time of day s, batch size) of every signed batch.
    pub batches: Vec<(f64, u64)>,
    pub verified: Verified,
    pub load: String,
    /// One successful (response, nonce, vTPM index), for the cost measurement.
    pub example: Option<(Vec<u8>, [u8; 32], usize)>,
}

pub struct P2 {
    pub cells: Vec<Cell>,
    pub create_secs: f64,
    pub vtpms: usize,
    pub delay_ms: u64,
    pub load: String,
    pub ak_alg: String,
    /// Wall time of the whole P2 (s).
    pub total_secs: f64,
    pub mgr_restart_ms: Vec<f64>,
    pub costs: Option<Costs>,
    /// The cell through the attestation service (`--p2-via service`).
    pub service: Option<(Cell, service::SvcStats)>,
}

/// In-process CPU cost of the per-request work around a physical quote, measured on a real
/// bundle from this run (medians over repetitions, ns).
pub struct Costs {
    pub bundle_len: usize,
    pub frame_len: usize,
    /// Manager: `hex::encode(bundle)` + `mgr::encode(VtpmReply::DeepQuote)` (JSON).
    pub reply_encode: f64,
    /// vtpm-domain: `mgr::decode::<VtpmReply>` + its byte-by-byte unhex.
    pub reply_decode: f64,
    /// vtpm-domain + manager: request JSON (hex nonce, hex vPCR values) encode + decode + hex::decode.
    pub request_codec: f64,
    /// Manager: a batch of `batch` leaves → encode, Merkle tree, proofs, bundle encodes.
    pub batch: usize,
    pub batch_build: f64,
    /// Offline verification of one bundle (`verify::verify`).
    pub verify: f64,
}

fn random32() -> [u8; 32] {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    b
}

/// Sends one command and reads the whole response.
fn exchange(s: &mut TcpStream, cmd: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(cmd)?;
    let mut hdr = [0u8; 10];
    s.read_exact(&mut hdr)?;
    let size = u32::from_be_bytes([hdr[2], hdr[3], hdr[4], hdr[5]]) as usize;
    if !(10..=65536).contains(&size) {
        return Err(std::io::Error::other(format!("bad response size {size}")));
    }
    let mut rsp = vec![0u8; size];
    rsp[..10].copy_from_slice(&hdr);
    s.read_exact(&mut rsp[10..])?;
    Ok(rsp)
}

// ------------------------------------------------------------ counting proxy

/// A pass-through TCP proxy on a port pair (like swtpm's) that parses the TPM command stream
/// on the data port and counts commands by command code (control-channel connections are
/// counted as code 0). Sits between the DelayProxy and swtpm, so it adds no delay to what
/// the manager sees beyond one loopback hop.
struct CountingProxy {
    port: u16,
    counts: Arc<Mutex<BTreeMap<u32, u64>>>,
}

fn pump_plain(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 8192];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn pump_counting(mut from: TcpStream, mut to: TcpStream, counts: Arc<Mutex<BTreeMap<u32, u64>>>) {
    let mut buf = [0u8; 8192];
    let mut pending: Vec<u8> = vec![];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        // Whole commands: tag(2) size(4) code(4).
        while pending.len() >= 10 {
            let size =
                u32::from_be_bytes([pending[2], pending[3], pending[4], pending[5]]) as usize;
            if size < 10 || pending.len() < size {
                if size < 10 {
                    pending.clear();
                }
                break;
            }
            let cc = u32::from_be_bytes([pending[6], pending[7], pending[8], pending[9]]);
            *counts.lock().unwrap().entry(cc).or_default() += 1;
            pending.drain(..size);
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl CountingProxy {
    fn start(target: u16) -> Result<CountingProxy> {
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        for _ in 0..50 {
            let d = TcpListener::bind(("127.0.0.1", 0))?;
            let port = d.local_addr()?.port();
            let Some(cp) = port.checked_add(1) else {
                continue;
            };
            let Ok(c) = TcpListener::bind(("127.0.0.1", cp)) else {
                continue;
            };
            for (l, tgt, data) in [(d, target, true), (c, target + 1, false)] {
                let counts = counts.clone();
                std::thread::spawn(move || {
                    for conn in l.incoming() {
                        let Ok(client) = conn else { continue };
                        let Ok(server) = TcpStream::connect(("127.0.0.1", tgt)) else {
                            continue;
                        };
                        client.set_nodelay(true).ok();
                        server.set_nodelay(true).ok();
                        let (c2, s2) = (
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        if data {
                            let k = counts.clone();
                            std::thread::spawn(move || pump_counting(client, server, k));
                        } else {
                            *counts.lock().unwrap().entry(0).or_default() += 1;
                            std::thread::spawn(move || pump_plain(client, server));
                        }
                        std::thread::spawn(move || pump_plain(s2, c2));
                    }
                });
            }
            return Ok(CountingProxy { port, counts });
        }
        bail!("no free port pair for the counting proxy")
    }

    fn snapshot(&self) -> BTreeMap<u32, u64> {
        self.counts.lock().unwrap().clone()
    }
}

fn diff(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> BTreeMap<u32, u64> {
    b.iter()
        .map(|(k, v)| (*k, v - a.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Name of a TPM 2.0 command code (the ones the manager sends), for the report.
pub fn cc_name(cc: u32) -> String {
    match cc {
        0 => "control-channel connection".into(),
        0x157 => "Load".into(),
        0x158 => "Quote".into(),
        0x17E => "PCR_Read".into(),
        0x165 => "FlushContext".into(),
        0x131 => "CreatePrimary".into(),
        0x176 => "StartAuthSession".into(),
        0x17A => "GetCapability".into(),
        0x15E => "Unseal".into(),
        0x17F => "PolicyPCR".into(),
        0x173 => "ReadPublic".into(),
        0x144 => "Startup".into(),
        c => format!("{c:#x}"),
    }
}

// ------------------------------------------------------------------- the run

struct Vt {
    uuid: Uuid,
    pid: u32,
    port: u16,
}

fn status(stack: &Stack) -> Result<(u64, u64, bool)> {
    let out = stack.xl(&["mgr", "status", "--json"])?;
    if !out.status.success() {
        bail!(
            "xl-vtpm mgr status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["deep_quotes"]
            .as_u64()
            .ok_or_else(|| anyhow!("no deep_quotes in {v}"))?,
        v["physical_quotes"]
            .as_u64()
            .ok_or_else(|| anyhow!("no physical_quotes in {v}"))?,
        v["batching"].as_bool().unwrap_or(false),
    ))
}

/// "deep quote batch signed" debug lines of the manager's log: (time of day, batch size).
fn batches_in_log(log: &Path) -> Vec<(f64, u64)> {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    s.lines()
        .filter(|l| l.contains("deep quote batch signed"))
        .filter_map(|l| {
            let t = log_time_of_day(l)?;
            let b = l
                .split("batch=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((t, b))
        })
        .collect()
}

/// Restarts the manager on `tcti` (batched or not, deep-quote debug log to `log`) and
/// re-attaches every vTPM, so a cell starts with an empty queue and fresh counters.
fn fresh_manager(
    stack: &mut Stack,
    procs: &mut Procs,
    vts: &[Vt],
    tcti: &str,
    batched: bool,
    log: &Path,
    restart_ms: &mut Vec<f64>,
) -> Result<()> {
    let extra: &[&str] = if batched { &[] } else { &["--no-batching"] };
    let t = Instant::now();
    stack.restart_mgr(procs, tcti, extra, log, "info,vtpmmgr::deepquote=debug")?;
    let mut admin = stack.admin()?;
    for v in vts {
        admin_call(
            &mut admin,
            &AdminRequest::VtpmAttach {
                uuid: v.uuid,
                pid: v.pid,
            },
        )?;
    }
    drop(admin);
    restart_ms.push(t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

/// The service cell: behind the delay proxy, batched, the first `n` vTPMs bound one each to
/// the first `n` of `args.p2_service_tenants` tenants, all asking `xvtpm-attestd`.
#[allow(clippy::too_many_arguments)]
fn run_service_cell(
    args: &Args,
    stack: &mut Stack,
    procs: &mut Procs,
    vts: &[Vt],
    ak: &[u8],
    tcti: &str,
    counter: &CountingProxy,
    n: usize,
    restart_ms: &mut Vec<f64>,
) -> Result<(Cell, service::SvcStats)> {
    let t_cell = Instant::now();
    let mut st = service::SvcStats::default();
    let tenants = args.p2_service_tenants.max(n);
    let (svc, tn) = service::setup(args, stack, procs, &vts[..n], tenants, &mut st)?;
    eprintln!(
        "P2 service: {tenants} tenants, certificates {:.1} s, registered and bound {:.1} s (load {})",
        st.certs_secs,
        st.register_secs,
        loadavg()
    );
    let load = loadavg();
    let log = args
        .work
        .join(format!("p2-vtpmmgr-service-delay-batched-n{n}.log"));
    fresh_manager(stack, procs, vts, tcti, true, &log, restart_ms)?;
    let (dq0, pq0, _) = status(stack)?;
    let c0 = counter.snapshot();
    let window = Duration::from_secs_f64(args.p2_service_secs);
    let (samples, censored, stop) = service::run(args, &svc, tn, &vts[..n], window, &mut st)?;
    let (dq1, pq1, _) = status(stack)?;
    let c1 = counter.snapshot();
    procs.stop(svc.pid, Duration::from_secs(5));
    let win_ns = window.as_nanos() as u64;
    let mut cell = Cell {
        delayed: true,
        batched: true,
        n,
        window: win_ns,
        done_in_window: 0,
        lat: vec![],
        lat_warm: vec![],
        censored,
        errors: BTreeMap::new(),
        drain: (stop.as_nanos() as u64).saturating_sub(win_ns),
        deep_quotes: dq1 - dq0,
        physical_quotes: pq1 - pq0,
        tpm_cmds: diff(&c0, &c1),
        batches: batches_in_log(&log),
        verified: Verified::default(),
        load,
        example: None,
    };
    let mut ok_samples = Vec::with_capacity(samples.len());
    for (first, s) in samples {
        let end = s.end.unwrap_or(s.start);
        cell.lat.push(end - s.start);
        if !first {
            cell.lat_warm.push(end - s.start);
        }
        if end <= win_ns {
            cell.done_in_window += 1;
        }
        ok_samples.push(s);
    }
    cell.verified = verify_all(&ok_samples, &vts[..n], ak, args.p2_verify_max);
    st.cell_secs = t_cell.elapsed().as_secs_f64();
    eprintln!(
        "P2 service-delay-batched-n{n}: {} ok in {:.0} s window ({:.1}/s), {} censored, non-200 {:?}, 429s {}, polls {:?}, reconnects {}, \
         {} deep / {} physical quotes ({} TPM2_Quote at the proxy), verified {}/{} in {:.1} s, service sockets mid-window {} (load {}){}",
        cell.done_in_window,
        window.as_secs_f64(),
        cell.done_in_window as f64 / window.as_secs_f64(),
        cell.censored.len(),
        st.quote_statuses,
        st.rate_limited,
        st.polls,
        st.reconnects,
        cell.deep_quotes,
        cell.physical_quotes,
        cell.tpm_cmds.get(&0x158).copied().unwrap_or(0),
        cell.verified.ok,
        cell.verified.checked,
        cell.verified.secs,
        st.service_sockets,
        loadavg(),
        if st.net_errors.is_empty() {
            String::new()
        } else {
            format!("; errors: {}", st.net_errors.join("; "))
        }
    );
    Ok((cell, st))
}

#[allow(clippy::too_many_arguments)]
fn run_cell(
    args: &Args,
    stack: &mut Stack,
    procs: &mut Procs,
    vts: &[Vt],
    ak: &[u8],
    tcti: &str,
    counter: Option<&CountingProxy>,
    delayed: bool,
    batched: bool,
    n: usize,
    restart_ms: &mut Vec<f64>,
) -> Result<Cell> {
    let load = loadavg();
    let tag = format!(
        "{}-{}-n{n}",
        if delayed { "delay" } else { "direct" },
        if batched { "batched" } else { "unbatched" }
    );
    let log = args.work.join(format!("p2-vtpmmgr-{tag}.log"));
    fresh_manager(stack, procs, vts, tcti, batched, &log, restart_ms)?;
    let (dq0, pq0, batching) = status(stack)?;
    if batching != batched {
        bail!("manager reports batching={batching}, wanted {batched}");
    }
    let c0 = counter.map(|c| c.snapshot());

    let window = Duration::from_secs_f64(if delayed {
        args.p2_secs_delay
    } else {
        args.p2_secs
    });
    let max_requests = args.p2_max_requests;
    let issued = Arc::new(AtomicUsize::new(0));
    let active = Arc::new(AtomicUsize::new(n));
    let stopped = Arc::new(AtomicBool::new(false));
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut conns = Vec::with_capacity(n);
    for v in &vts[..n] {
        let s = connect_retry(v.port, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        conns.push(s);
    }
    let t0 = Arc::new(Mutex::new(None::<Instant>));
    let mut handles = Vec::with_capacity(n);
    for (i, mut s) in conns.into_iter().enumerate() {
        let (issued, active, stopped, stop_at, barrier, t0) = (
            issued.clone(),
            active.clone(),
            stopped.clone(),
            stop_at.clone(),
            barrier.clone(),
            t0.clone(),
        );
        handles.push(
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    let mut out: Vec<Sample> = Vec::new();
                    barrier.wait();
                    let t0 = t0.lock().unwrap().expect("t0 set before the barrier");
                    loop {
                        let start = t0.elapsed();
                        if start >= window || issued.fetch_add(1, Ordering::Relaxed) >= max_requests
                        {
                            break;
                        }
                        let nonce = random32();
                        let cmd = DeepQuoteCommand {
                            nonce: nonce.to_vec(),
                            vpcr_alg: TPM_ALG_SHA256,
                            vpcrs: VPCRS.to_vec(),
                            host_pcrs: HOST_PCRS.to_vec(),
                            flags: 0,
                        }
                        .encode();
                        let r = exchange(&mut s, &cmd);
                        let end = t0.elapsed().as_nanos() as u64;
                        let late =
                            stopped.load(Ordering::SeqCst) && end >= stop_at.load(Ordering::SeqCst);
                        out.push(Sample {
                            vtpm: i,
                            start: start.as_nanos() as u64,
                            end: if late { None } else { Some(end) },
                            nonce,
                            rsp: r.unwrap_or_default(),
                            bundle: false,
                        });
                        if late || out.last().is_some_and(|s| s.rsp.is_empty()) {
                            break;
                        }
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                    out
                })?,
        );
    }
    *t0.lock().unwrap() = Some(Instant::now());
    let start = t0.lock().unwrap().expect("set");
    barrier.wait();
    // Time box, then let outstanding requests finish for at most the drain time.
    let drain_cap = Duration::from_secs_f64(args.p2_drain_secs);
    while start.elapsed() < window + drain_cap && active.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop = start.elapsed();
    stop_at.store(stop.as_nanos() as u64, Ordering::SeqCst);
    stopped.store(true, Ordering::SeqCst);
    // Manager counters before the manager is stopped (the in-flight quote may still add one).
    let (dq1, pq1, _) = status(stack)?;
    let c1 = counter.map(|c| c.snapshot());
    // Requests still outstanding: stopping the manager makes every vtpm-domain answer them
    // (with an error) at once; they count as censored at `stop`.
    if active.load(Ordering::SeqCst) > 0 {
        procs.stop(stack.mgr_pid, Duration::from_secs(20));
    }
    let mut samples = Vec::new();
    for h in handles {
        let mine = h.join().map_err(|_| anyhow!("requester thread panicked"))?;
        samples.extend(mine.into_iter().enumerate().map(|(k, s)| (k == 0, s)));
    }
    let win_ns = window.as_nanos() as u64;
    let stop_ns = stop.as_nanos() as u64;
    let mut cell = Cell {
        delayed,
        batched,
        n,
        window: win_ns,
        done_in_window: 0,
        lat: vec![],
        lat_warm: vec![],
        censored: vec![],
        errors: BTreeMap::new(),
        drain: stop_ns.saturating_sub(win_ns),
        deep_quotes: dq1 - dq0,
        physical_quotes: pq1 - pq0,
        tpm_cmds: match (c0, c1) {
            (Some(a), Some(b)) => diff(&a, &b),
            _ => BTreeMap::new(),
        },
        batches: batches_in_log(&log),
        verified: Verified::default(),
        load,
        example: None,
    };
    let mut ok_samples = Vec::new();
    for (first, s) in samples {
        match s.end {
            None => cell.censored.push(stop_ns.saturating_sub(s.start)),
            Some(end) => {
                let rc = if s.rsp.len() >= 10 {
                    crate::tpm::rc(&s.rsp)
                } else {
                    u32::MAX
                };
                if rc != 0 {
                    *cell.errors.entry(rc).or_default() += 1;
                    continue;
                }
                cell.lat.push(end - s.start);
                if !first {
                    cell.lat_warm.push(end - s.start);
                }
                if end <= win_ns {
                    cell.done_in_window += 1;
                }
                ok_samples.push(s);
            }
        }
    }
    cell.verified = verify_all(&ok_samples, vts, ak, args.p2_verify_max);
    cell.example = ok_samples.last().map(|s| (s.rsp.clone(), s.nonce, s.vtpm));
    eprintln!(
        "P2 {tag}: {} ok in {:.0} s window ({:.1}/s), {} censored, errors {:?}, {} deep / {} physical quotes, verified {}/{} in {:.1} s (load {})",
        cell.done_in_window,
        window.as_secs_f64(),
        cell.done_in_window as f64 / window.as_secs_f64(),
        cell.censored.len(),
        cell.errors,
        cell.deep_quotes,
        cell.physical_quotes,
        cell.verified.ok,
        cell.verified.checked,
        cell.verified.secs,
        loadavg()
    );
    Ok(cell)
}

/// Verifies every successful response (or an evenly spaced sample of `max` of them when
/// `max` > 0 and there are more), on all CPUs, after the timed section.
fn verify_all(samples: &[Sample], vts: &[Vt], ak: &[u8], max: usize) -> Verified {
    let t = Instant::now();
    let picked: Vec<&Sample> = if max > 0 && samples.len() > max {
        let step = samples.len() as f64 / max as f64;
        (0..max)
            .map(|i| &samples[(i as f64 * step) as usize])
            .collect()
    } else {
        samples.iter().collect()
    };
    let threads = crate::p1::online_cpus().max(1);
    let chunk = picked.len().div_ceil(threads).max(1);
    let results: Vec<(usize, Vec<String>, Vec<u32>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = picked
            .chunks(chunk)
            .map(|part| {
                sc.spawn(move || {
                    let mut ok = 0;
                    let mut fails = vec![];
                    let mut sizes = vec![];
                    for s in part {
                        let raw = if s.bundle {
                            Ok(s.rsp.clone())
                        } else {
                            deepquote_cmd::parse_response(&s.rsp)
                                .map_err(|rc| format!("response code {rc:#x}"))
                        };
                        let r = raw
                            .and_then(|b| Bundle::decode(&b).map_err(|e| format!("decode: {e}")))
                            .and_then(|b| {
                                let mut exp = Expectations::new(s.nonce.to_vec(), ak.to_vec());
                                exp.vtpm_uuid = Some(vts[s.vtpm].uuid);
                                verify(&b, &exp)
                                    .map(|v| v.leaf.position.tree_size)
                                    .map_err(|e| format!("verify: {e}"))
                            });
                        match r {
                            Ok(size) => {
                                ok += 1;
                                sizes.push(size);
                            }
                            Err(e) if fails.len() < 5 => {
                                fails.push(format!("vTPM {}: {e}", vts[s.vtpm].uuid))
                            }
                            Err(_) => {}
                        }
                    }
                    (ok, fails, sizes)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("verify thread"))
            .collect()
    });
    let mut v = Verified {
        checked: picked.len(),
        sampled: picked.len() < samples.len(),
        ..Default::default()
    };
    for (ok, f, sizes) in results {
        v.ok += ok;
        v.failures.extend(f);
        v.tree_sizes.extend(sizes);
    }
    v.failures.truncate(5);
    v.secs = t.elapsed().as_secs_f64();
    v
}

pub fn p2(args: &Args, stack: &mut Stack, procs: &mut Procs) -> Result<P2> {
    let t_all = Instant::now();
    let load = loadavg();
    let mut ns: Vec<usize> = args.p2_n.clone();
    ns.sort_unstable();
    let max_n = *ns.last().ok_or_else(|| anyhow!("--p2-n is empty"))?;
    // The requesters: N real vTPMs (ECC EK: created in ~15 ms instead of ~50 ms for RSA).
    let t = Instant::now();
    let mut vts = Vec::with_capacity(max_n);
    for _ in 0..max_n {
        let (uuid, pid, port, _) = stack.create_with(procs, &["--ek", "ecc"])?;
        vts.push(Vt { uuid, pid, port });
    }
    let create_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "P2: created {max_n} vTPMs in {create_secs:.1} s (load {})",
        loadavg()
    );
    let groups = stack.xl(&["mgr", "group", "list", "--json"])?;
    let g: serde_json::Value = serde_json::from_slice(&groups.stdout).context("group list")?;
    let ak = hex::decode(
        g[0]["ak_public"]
            .as_str()
            .ok_or_else(|| anyhow!("no ak_public in {g}"))?,
    )?;
    let ak_alg = g[0]["ak_alg"].as_str().unwrap_or("?").to_string();

    // The physical TPM path: direct, and DelayProxy → CountingProxy → swtpm.
    let counter = CountingProxy::start(stack.hw_port)?;
    let delay = Duration::from_millis(args.p2_delay_ms);
    let proxy = DelayProxy::start(counter.port, delay);
    let direct = format!("swtpm:host=127.0.0.1,port={}", stack.hw_port);
    let mut cells = vec![];
    let mut restart_ms = vec![];
    let has = |v: &[String], x: &str| v.iter().any(|s| s.eq_ignore_ascii_case(x));
    for delayed in [false, true] {
        if !has(&args.p2_via, "direct") {
            break;
        }
        if !has(&args.p2_tpm, if delayed { "delay" } else { "direct" }) {
            continue;
        }
        for batched in [true, false] {
            if !has(
                &args.p2_modes,
                if batched { "batched" } else { "unbatched" },
            ) {
                continue;
            }
            for &n in &ns {
                let (tcti, c) = if delayed {
                    (proxy.tcti(), Some(&counter))
                } else {
                    (direct.clone(), None)
                };
                cells.push(run_cell(
                    args,
                    stack,
                    procs,
                    &vts,
                    &ak,
                    &tcti,
                    c,
                    delayed,
                    batched,
                    n,
                    &mut restart_ms,
                )?);
            }
        }
    }
    let service = if has(&args.p2_via, "service") {
        Some(run_service_cell(
            args,
            stack,
            procs,
            &vts,
            &ak,
            &proxy.tcti(),
            &counter,
            max_n,
            &mut restart_ms,
        )?)
    } else {
        None
    };
    // Leave a manager running on the direct TPM, as the other benchmarks expect.
    let log = stack.mgr_log.clone();
    stack.restart_mgr(procs, &direct, &[], &log, "info")?;
    let costs = cells
        .iter()
        .rev()
        .find_map(|c| c.example.clone())
        .map(|(rsp, nonce, vt)| measure_costs(&rsp, &nonce, &ak, vts[vt].uuid, ns[ns.len() - 1]))
        .transpose()?;
    let pids: Vec<u32> = vts.iter().map(|v| v.pid).collect();
    procs.stop_many(&pids, Duration::from_secs(5));
    drop(proxy);
    Ok(P2 {
        cells,
        create_secs,
        vtpms: max_n,
        delay_ms: args.p2_delay_ms,
        load,
        ak_alg,
        total_secs: t_all.elapsed().as_secs_f64(),
        mgr_restart_ms: restart_ms,
        costs,
        service,
    })
}

/// The vtpm-domain's unhex (vtpm-domain/src/deepquote.rs), reproduced to time it.
fn unhex_like_domain(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn med_ns<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(f());
        v.push(t.elapsed().as_nanos() as u64);
    }
    crate::stats::summarize(&v).median
}

fn measure_costs(
    rsp: &[u8],
    nonce: &[u8; 32],
    ak: &[u8],
    uuid: Uuid,
    batch: usize,
) -> Result<Costs> {
    use vtpm_proto::evidence::LeafPosition;
    use vtpm_proto::merkle::Tree;
    use vtpm_proto::mgr::{self, VtpmReply, VtpmRequest};
    let raw = deepquote_cmd::parse_response(rsp).map_err(|rc| anyhow!("rc {rc:#x}"))?;
    let bundle = Bundle::decode(&raw).map_err(|e| anyhow!("{e}"))?;
    let reply = || {
        mgr::encode(&VtpmReply::DeepQuote {
            bundle: hex::encode(&raw),
        })
        .expect("encode")
    };
    let frame = reply();
    let reply_encode = med_ns(2000, reply);
    let reply_decode = med_ns(2000, || {
        match mgr::decode::<VtpmReply>(&frame[4..]).expect("decode") {
            VtpmReply::DeepQuote { bundle } => unhex_like_domain(&bundle),
            _ => None,
        }
    });
    let hexs = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let request_codec = med_ns(2000, || {
        let req = VtpmRequest::DeepQuote {
            uuid,
            nonce: hexs(nonce),
            vpcr_alg: TPM_ALG_SHA256,
            vpcrs: VPCRS.to_vec(),
            vpcr_values: bundle.leaf.vpcr_values.iter().map(|v| hexs(v)).collect(),
            host_pcrs: HOST_PCRS.to_vec(),
            flags: 0,
        };
        let f = mgr::encode(&req).expect("encode");
        match mgr::decode::<VtpmRequest>(&f[4..]).expect("decode") {
            VtpmRequest::DeepQuote {
                nonce, vpcr_values, ..
            } => (
                hex::decode(nonce).ok(),
                vpcr_values
                    .iter()
                    .map(hex::decode)
                    .collect::<Result<Vec<_>, _>>()
                    .ok(),
            ),
            _ => (None, None),
        }
    });
    // The manager's work for one batch around the physical quote (deepquote.rs quote_part).
    let batch_build = med_ns(20, || {
        let n = batch as u32;
        let leaves: Vec<_> = (0..n)
            .map(|i| {
                let mut l = bundle.leaf.clone();
                l.position = LeafPosition {
                    leaf_index: i,
                    tree_size: n,
                };
                l
            })
            .collect();
        let enc: Vec<Vec<u8>> = leaves.iter().map(|l| l.encode().expect("leaf")).collect();
        let tree = Tree::from_leaves(&enc);
        leaves
            .into_iter()
            .enumerate()
            .map(|(i, leaf)| {
                let b = Bundle {
                    leaf,
                    path: tree.inclusion_proof(i).expect("proof"),
                    ..bundle.clone()
                };
                mgr::encode(&VtpmReply::DeepQuote {
                    bundle: hex::encode(b.encode().expect("bundle")),
                })
                .expect("frame")
                .len()
            })
            .sum::<usize>()
    });
    let mut exp = Expectations::new(nonce.to_vec(), ak.to_vec());
    exp.vtpm_uuid = Some(uuid);
    let verify_ns = med_ns(200, || verify(&bundle, &exp).is_ok());
    Ok(Costs {
        bundle_len: raw.len(),
        frame_len: frame.len(),
        reply_encode,
        reply_decode,
        request_codec,
        batch,
        batch_build,
        verify: verify_ns,
    })
}

// -------------------------------------------------------------------- report

/// The `p` quantile of the latencies, counting censored requests at their age (a lower bound
/// of their latency). `(value ns, exact)`: exact when no censored age lies below the value,
/// so the censored requests cannot move it; otherwise the true quantile is ≥ the value.
fn quantile(lat: &[u64], censored: &[u64], p: f64) -> Option<(f64, bool)> {
    let mut all: Vec<u64> = lat.iter().chain(censored).copied().collect();
    if all.is_empty() {
        return None;
    }
    all.sort_unstable();
    let idx = (((all.len() - 1) as f64) * p).round() as usize;
    let v = all[idx.min(all.len() - 1)];
    Some((v as f64, censored.iter().all(|&c| c >= v)))
}

fn fmt_q(q: Option<(f64, bool)>) -> String {
    match q {
        None => "—".into(),
        Some((v, true)) => crate::stats::ms(v),
        Some((v, false)) => format!("≥ {}", crate::stats::ms(v)),
    }
}

fn per_s(c: &Cell) -> f64 {
    c.done_in_window as f64 / (c.window as f64 / 1e9)
}

fn find(r: &P2, delayed: bool, batched: bool, n: usize) -> Option<&Cell> {
    r.cells
        .iter()
        .find(|c| c.delayed == delayed && c.batched == batched && c.n == n)
}

/// Median interval (ns) between consecutive signed batches: in a saturated unbatched cell
/// (a request always queued) this is the physical quote time as the manager sees it.
fn quote_interval(c: &Cell) -> Option<f64> {
    let t: Vec<f64> = c.batches.iter().map(|b| b.0).collect();
    let d: Vec<f64> = t
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1e9)
        .filter(|d| *d >= 0.0)
        .collect();
    (!d.is_empty()).then(|| crate::stats::median_f(&d))
}

fn median_batch(c: &Cell) -> u64 {
    let mut v: Vec<u64> = c.batches.iter().map(|b| b.1).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn batch_sizes(c: &Cell) -> String {
    if c.batches.is_empty() {
        return "—".into();
    }
    let mut b: Vec<u64> = c.batches.iter().map(|x| x.1).collect();
    b.sort_unstable();
    let med = b[b.len() / 2];
    format!(
        "{} batches; median {med}, min {}, max {}",
        b.len(),
        b[0],
        b[b.len() - 1]
    )
}

pub fn report_p2(out: &mut String, r: &P2, args: &Args) {
    use std::fmt::Write as _;
    let ms = crate::stats::ms;
    let pass = crate::report::pass;
    let d = r.delay_ms;
    let _ = writeln!(
        out,
        "### P2 — deep quotes: throughput and latency with N concurrent requesters, batched vs unbatched\n"
    );
    let _ = writeln!(
        out,
        "**Method.** {} vTPMs created with `xl-vtpm vtpm create --ek ecc` ({:.1} s for all); requester *i* is vTPM *i*'s own vtpm-domain, \
         reached over one persistent TCP connection to its data port, with one request outstanding at a time (closed loop). Each request is the \
         deep-quote vendor command (`DeepQuoteCommand{{..}}.encode()`) with a fresh random 32-byte nonce, vPCRs 0–7 (SHA-256) and host PCRs 0–7. \
         Every cell runs against a freshly started `vtpmmgr serve` (`--no-batching` for unbatched; same state directory, attachments restored, \
         so queue and counters start empty; restart + {} attaches took median {:.0} ms) on the **same physical swtpm** as the rest of this run. \
         The *delay* rows point the manager's TCTI at testkit's `DelayProxy` ({d} ms before every client→TPM chunk, i.e. before every TPM command) \
         in front of a counting pass-through proxy in front of that swtpm. \
         **Time box:** requests are issued only during the first {} s (direct) / {} s (delay) of a cell, or until {} requests, whichever comes first; \
         *quotes/s* = successful responses that arrived inside the window ÷ window. Requests still outstanding at the end of the window get up to \
         {} s more; their latencies count. Requests still outstanding after that are *censored*: their latency is at least their age, and \
         p50/p99 are computed over completed latencies plus censored ages — shown as “≥” where a censored request could move the value. \
         Unbatched throughput is bounded by 1 / physical-quote time whatever N is, so a time-boxed rate is the steady-state rate. \
         *Physical per deep* = Δ`physical_quotes` ÷ Δ`deep_quotes` from `xl-vtpm mgr status --json` read before the first request and after the drain. \
         **Verification:** after each cell, offline, {} successful response with `vtpm_attest::verify::verify` (AK = the group's {} AK from \
         `xl-vtpm mgr group list`, nonce sent, vTPM UUID); *tree size* is the leaf count of the Merkle tree the bundle was signed in. \
         The whole P2 took {:.0} s. Load average at start: {}.\n",
        r.vtpms,
        r.create_secs,
        r.vtpms,
        crate::stats::median_f(&r.mgr_restart_ms),
        args.p2_secs,
        args.p2_secs_delay,
        args.p2_max_requests,
        args.p2_drain_secs,
        if args.p2_verify_max == 0 {
            "every".to_string()
        } else {
            format!(
                "up to {} (evenly spaced sample) of each cell's",
                args.p2_verify_max
            )
        },
        r.ak_alg,
        r.total_secs,
        r.load
    );
    let _ = writeln!(
        out,
        "| physical TPM | mode | N | quotes/s | p50 ms | p99 ms | max ms | ok (window / +drain) | censored | errors | physical per deep | tree size (bundles: mean, max) | verified | load at start |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in &r.cells {
        let max = quantile(&c.lat, &c.censored, 1.0);
        let ts = &c.verified.tree_sizes;
        let mean_ts = if ts.is_empty() {
            f64::NAN
        } else {
            ts.iter().map(|&x| x as f64).sum::<f64>() / ts.len() as f64
        };
        let errors = if c.errors.is_empty() {
            "0".to_string()
        } else {
            c.errors
                .iter()
                .map(|(rc, k)| format!("{k}× {rc:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} / {} | {} | {} | {} | {:.1}, {} | {} | {} |",
            if c.delayed {
                format!("swtpm + {d} ms/command")
            } else {
                "swtpm".into()
            },
            if c.batched { "batched" } else { "unbatched" },
            c.n,
            per_s(c),
            fmt_q(quantile(&c.lat, &c.censored, 0.5)),
            fmt_q(quantile(&c.lat, &c.censored, 0.99)),
            fmt_q(max),
            c.done_in_window,
            c.lat.len() - c.done_in_window,
            c.censored.len(),
            errors,
            if c.deep_quotes > 0 {
                format!("{:.3}", c.physical_quotes as f64 / c.deep_quotes as f64)
            } else {
                format!("{} / 0", c.physical_quotes)
            },
            mean_ts,
            ts.iter().max().copied().unwrap_or(0),
            verified_cell(&c.verified),
            c.load
        );
    }

    // The physical quote time behind the delay.
    let _ = writeln!(
        out,
        "\n**Physical quote time** (the yardstick of the latency goal):\n"
    );
    let _ = writeln!(out, "| measure | direct swtpm | swtpm + {d} ms/command |");
    let _ = writeln!(out, "|---|---|---|");
    let sat = |delayed: bool| {
        // The saturated unbatched cell with the most signed batches.
        r.cells
            .iter()
            .filter(|c| c.delayed == delayed && !c.batched && c.n > 1)
            .max_by_key(|c| c.batches.len())
    };
    let interval = |delayed: bool| sat(delayed).and_then(quote_interval);
    let lone = |delayed: bool| {
        find(r, delayed, true, 1)
            .and_then(|c| quantile(&c.lat, &c.censored, 0.5))
            .map(|q| q.0)
    };
    let _ = writeln!(
        out,
        "| median interval between consecutive physical quotes, saturated unbatched cell (manager debug log `deep quote batch signed`) | {} ms | {} ms |",
        interval(false).map(ms).unwrap_or("—".into()),
        interval(true).map(ms).unwrap_or("—".into())
    );
    let _ = writeln!(
        out,
        "| p50 latency of a lone request (N = 1, batched): quote + vtpm-domain + manager round trip | {} ms | {} ms |",
        lone(false).map(ms).unwrap_or("—".into()),
        lone(true).map(ms).unwrap_or("—".into())
    );
    // TPM commands per physical quote (counting proxy, delay cells).
    let mut cmds: BTreeMap<u32, u64> = BTreeMap::new();
    let mut pq = 0;
    for c in r.cells.iter().filter(|c| c.delayed) {
        for (k, v) in &c.tpm_cmds {
            *cmds.entry(*k).or_default() += v;
        }
        pq += c.physical_quotes;
    }
    let per_quote: Vec<String> = cmds
        .iter()
        .filter(|(k, _)| **k != 0)
        .map(|(k, v)| format!("{} {:.2}", cc_name(*k), *v as f64 / pq.max(1) as f64))
        .collect();
    let cmd_total: u64 = cmds.iter().filter(|(k, _)| **k != 0).map(|(_, v)| v).sum();
    let cmds_per_quote = cmd_total as f64 / pq.max(1) as f64;
    let _ = writeln!(
        out,
        "| TPM commands per physical quote (counting proxy over all delay cells: {cmd_total} commands, {pq} physical quotes, {} control-channel connections) × {d} ms | | {:.2} × {d} = {} ms ({}) |",
        cmds.get(&0).copied().unwrap_or(0),
        cmds_per_quote,
        ms(cmds_per_quote * d as f64 * 1e6),
        per_quote.join(", ")
    );
    // T_q: the manager-side quote time behind the delay.
    let tq = interval(true).or(lone(true)).unwrap_or(f64::NAN);
    let tq_direct = interval(false).or(lone(false)).unwrap_or(f64::NAN);

    // Goals.
    let _ = writeln!(
        out,
        "\n| goal | measured | target | result |\n|---|---|---|---|"
    );
    let top = r.cells.iter().map(|c| c.n).max().unwrap_or(0);
    let ratio = |delayed: bool| match (find(r, delayed, true, top), find(r, delayed, false, top)) {
        (Some(b), Some(u)) if per_s(u) > 0.0 => Some((per_s(b), per_s(u), per_s(b) / per_s(u))),
        _ => None,
    };
    if let Some((b, u, x)) = ratio(true) {
        let _ = writeln!(
            out,
            "| batched ÷ unbatched throughput, N = {top}, {d} ms delay | {b:.1} ÷ {u:.2} = **{x:.0}×** | ≥ 100× | {} |",
            pass(x >= 100.0)
        );
    }
    for c in r.cells.iter().filter(|c| c.delayed && c.batched) {
        if let Some((p99, exact)) = quantile(&c.lat, &c.censored, 0.99) {
            let _ = writeln!(
                out,
                "| p99 latency, batched, N = {}, {d} ms delay | {}{} ms = **{:.2}** physical quote times | ≤ 2 × T_q = {} ms (T_q = {} ms, median interval above) | {} |",
                c.n,
                if exact { "" } else { "≥ " },
                ms(p99),
                p99 / tq,
                ms(2.0 * tq),
                ms(tq),
                pass(exact && p99 <= 2.0 * tq)
            );
        }
        if let Some((p99, exact)) = quantile(&c.lat_warm, &c.censored, 0.99) {
            let _ = writeln!(
                out,
                "| *info:* the same without each requester's first request (cold manager: the AK's first load) | {}{} ms = {:.2} physical quote times | | |",
                if exact { "" } else { "≥ " },
                ms(p99),
                p99 / tq,
            );
        }
    }
    if let Some((b, u, x)) = ratio(false) {
        let _ = writeln!(
            out,
            "| *info:* batched ÷ unbatched throughput, N = {top}, direct swtpm | {b:.1} ÷ {u:.1} = {x:.1}× | | |"
        );
    }
    for c in r.cells.iter().filter(|c| !c.delayed && c.batched) {
        if let Some((p99, _)) = quantile(&c.lat, &c.censored, 0.99) {
            let _ = writeln!(
                out,
                "| *info:* p99 latency, batched, N = {}, direct swtpm | {} ms = {:.2} physical quote times (T_q = {} ms) | | |",
                c.n,
                ms(p99),
                p99 / tq_direct,
                ms(tq_direct)
            );
        }
    }
    // Reading the numbers.
    if let (Some(ub), Some(bb)) = (find(r, true, false, top), find(r, true, true, top)) {
        let mid = r
            .cells
            .iter()
            .filter(|c| c.delayed && !c.batched && c.n > 1 && c.n < top)
            .map(|c| c.n)
            .max();
        let mean_batch = if bb.physical_quotes > 0 {
            bb.deep_quotes as f64 / bb.physical_quotes as f64
        } else {
            f64::NAN
        };
        let ideal = top as f64 / (2.0 * tq / 1e9);
        let _ = write!(
            out,
            "\n**Reading the numbers.** *Unbatched:* one physical quote per request (physical per deep = 1), so behind the delay the rate stays at \
             ≈ 1 / T_q = {:.2}/s for every N ({:.2}/s at N = {top}) and a request waits for the N − 1 others: latency ≈ N × T_q{}. \
             *Batched, ideal:* with N closed-loop requesters, the requests that come back while quote *k* + 1 runs all go into quote *k* + 2, \
             so at least N requests are signed per 2 T_q (≥ {:.0}/s at N = {top}, ≥ {:.0}× unbatched) and no request waits more than 2 T_q plus overhead. \
             *Batched, measured* at N = {top} behind the delay: {:.1}/s, {:.1} requests per physical quote on average (of {top} possible), \
             median signed batch {}, p50 {}. ",
            1e9 / tq,
            per_s(ub),
            mid.and_then(|m| find(r, true, false, m))
                .and_then(|c| quantile(&c.lat, &c.censored, 0.5).map(|q| format!(
                    " (N = {}: p50 {} ms = {:.1} T_q)",
                    c.n,
                    ms(q.0),
                    q.0 / tq
                )))
                .unwrap_or_default(),
            ideal,
            ideal / per_s(ub).max(1e-9),
            per_s(bb),
            mean_batch,
            median_batch(bb),
            fmt_q(quantile(&bb.lat, &bb.censored, 0.5)).to_string() + " ms",
        );
        if mean_batch < top as f64 / 4.0 {
            let _ = writeln!(
                out,
                "The queue held only a few requests whenever a quote started, although {top} requesters were waiting. This is what the manager's \
                 locking predicts: the batcher runs the physical quote (= T_q) inside \
                 `spawn_blocking(lock(&m).quote_root(..))` (vtpmmgr/src/deepquote.rs), holding the one `std::sync::Mutex<Manager>` for the whole quote, \
                 and every arriving request needs that same lock for `authorize` *before* it is queued (vtpmmgr/src/dispatch.rs `deep_quote`), on one of the \
                 runtime's 2 worker threads. So requests arriving during a quote are not queued during it — two of them block both tokio workers (stalling \
                 every other connection, so the rest are not even read) — and when the quote ends they race the batcher, which starts the next quote with \
                 whatever reached the queue first. A request therefore waits several quotes instead of at most two."
            );
        } else {
            let _ = writeln!(
                out,
                "Batches are large, as natural batching intends: after a crowded batch the batcher gathers until as many requests are back as it \
                 answered (at most T_q / 4, ≤ 50 ms). What remains above 2 T_q is a request that misses that gather (it waits out the quote in flight, \
                 then its own), the cell's first quote (cold: Load and PCR_Read too) that the other N − 1 wait out, and delivering {top} responses \
                 through {top} vtpm-domains on this machine."
            );
        }
    }
    if let Some(k) = &r.costs {
        let us = crate::stats::us;
        let _ = writeln!(
            out,
            "\n**Per-request CPU around the quote**, timed in process on a real bundle of this run ({} B bundle, {} B JSON frame manager → vtpm-domain; medians):\n",
            k.bundle_len, k.frame_len
        );
        let _ = writeln!(out, "| step | cost |\n|---|---|");
        let _ = writeln!(
            out,
            "| manager: `hex::encode(bundle)` + JSON frame (`mgr::encode(VtpmReply::DeepQuote)`) | {} µs |",
            us(k.reply_encode)
        );
        let _ = writeln!(
            out,
            "| vtpm-domain: JSON decode + its byte-by-byte `unhex` | {} µs |",
            us(k.reply_decode)
        );
        let _ = writeln!(
            out,
            "| request: JSON with hex nonce and vPCR values, encode + decode + `hex::decode` | {} µs |",
            us(k.request_codec)
        );
        let _ = writeln!(
            out,
            "| manager: one batch of {} — leaf encodes, Merkle tree, {} proofs, bundle encodes, hex + JSON frames | {} ms ({} µs per request) |",
            k.batch,
            k.batch,
            ms(k.batch_build),
            us(k.batch_build / k.batch as f64)
        );
        let _ = writeln!(
            out,
            "| verifier: `verify::verify` of one bundle ({} AK) | {} µs |",
            r.ak_alg,
            us(k.verify)
        );
    }
    let _ = writeln!(
        out,
        "\nBatches signed per cell (manager debug log): {}.\n",
        r.cells
            .iter()
            .filter(|c| c.batched)
            .map(|c| format!(
                "{} N={}: {}",
                if c.delayed { "delay" } else { "direct" },
                c.n,
                batch_sizes(c)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    report_service(out, r, args);
}

/// The service subsection: the service cell beside the direct cell of the same N behind the
/// same delay.
fn report_service(out: &mut String, r: &P2, args: &Args) {
    use std::fmt::Write as _;
    let Some((sc, st)) = &r.service else { return };
    let ms = crate::stats::ms;
    let d = r.delay_ms;
    // T_q as in the table above: the saturated unbatched delay cell's quote interval, else a
    // lone request's latency.
    let sat = r
        .cells
        .iter()
        .filter(|c| c.delayed && !c.batched && c.n > 1)
        .max_by_key(|c| c.batches.len())
        .and_then(quote_interval);
    let lone = find(r, true, true, 1)
        .and_then(|c| quantile(&c.lat, &c.censored, 0.5))
        .map(|q| q.0);
    let (tq, tq_src) = match (sat, lone) {
        (Some(t), _) => (
            t,
            "median interval between physical quotes of the saturated unbatched delay cell",
        ),
        (None, Some(t)) => (t, "p50 latency of a lone batched request behind the delay"),
        (None, None) => (f64::NAN, "no unbatched or N = 1 delay cell in this run"),
    };
    let _ = writeln!(
        out,
        "\n#### P2 through the attestation service (`xvtpm-attestd`, {} mTLS tenants)\n",
        st.tenants
    );
    let _ = writeln!(
        out,
        "**Method.** The same {n} vTPMs, the same physical swtpm behind the same {d} ms/command delay and counting proxy, a freshly started \
         batched manager. A test CA made in the run (rcgen, ECDSA P-256) issues the service's certificate and one client certificate per tenant; \
         {t} tenants are registered with `xl-vtpm tenant add` and vTPM *i* is bound to tenant *i* (`xl-vtpm tenant bind`; a vTPM has at most one \
         tenant, so {n} tenants own one vTPM each and {idle} own none) — certificates {:.1} s, registration {:.1} s. One `xvtpm-attestd` \
         (`{flags}`; `--max-connections` above the tenant count because every tenant keeps its connection open — with the default 512 the others \
         would wait in the kernel's accept queue — and rate/burst at their defaults) serves them over TLS 1.3 on loopback. All tenants are tasks \
         of one 2-worker tokio runtime in the bench process, each with its own `rustls::ClientConfig` (its certificate) and one HTTP/1.1 keep-alive \
         connection, opened before the window (all {t} connected and identified by `GET /v1/vtpms`, then one more `GET /v1/vtpms` each just \
         before the window, in {:.1} s; {} connections the service had closed meanwhile — idle longer than its request timeout while the others \
         connected — were reopened then). During the {w:.0} s window a \
         tenant with a vTPM loops `POST /v1/vtpms/{{uuid}}/deep-quote` (closed loop, fresh random 32-byte nonce, vPCRs 0–7, host PCRs 0–7); a \
         tenant without one polls `GET /v1/vtpms` once a second. Halfway through the window the service held {} sockets open. A 429 or 503 is \
         counted and the tenant waits its `Retry-After`; nothing is retried silently. After the window requests get up to {} s more \
         (then censored). Every 200 answer is verified offline as the direct cells' are (`verify::verify`: AK signature, Merkle path, nonce, vTPM \
         UUID). The whole cell (certificates, registration, connections, window, drain, verification) took {:.0} s; `--p2-via direct` leaves it out, `--p2-service-tenants` and \
         `--p2-service-secs` size it. *Physical quotes* are the TPM2_Quote commands the counting proxy saw during the window and drain \
         (the manager's `physical_quotes` in brackets). T_q = {} ms ({tq_src}).\n",
        st.certs_secs,
        st.register_secs,
        st.connect_secs,
        st.pre_reconnects,
        st.service_sockets,
        args.p2_drain_secs,
        st.cell_secs,
        ms(tq),
        n = sc.n,
        t = st.tenants,
        idle = st.tenants - st.quoting,
        flags = st.flags,
        w = sc.window as f64 / 1e9,
    );
    let _ = writeln!(
        out,
        "| via | requesters | verified answers/s | p50 ms (T_q) | p99 ms (T_q) | physical quotes (manager) | answers per physical quote | censored | not answered 200 | 429s | verified | load at start |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let row = |out: &mut String, via: &str, who: String, c: &Cell, non200: String, r429: String| {
        let q = |p| quantile(&c.lat, &c.censored, p);
        let t = |p| {
            q(p).map(|(v, _)| format!(" ({:.2})", v / tq))
                .unwrap_or_default()
        };
        let quotes = c.tpm_cmds.get(&0x158).copied().unwrap_or(0);
        let answered = c.lat.len();
        let rate = c.verified.ok as f64 * (c.done_in_window as f64 / c.lat.len().max(1) as f64)
            / (c.window as f64 / 1e9);
        let _ = writeln!(
            out,
            "| {via} | {who} | {:.1} | {}{} | {}{} | {quotes} ({}) | {} | {} | {non200} | {r429} | {} | {} |",
            rate,
            fmt_q(q(0.5)),
            t(0.5),
            fmt_q(q(0.99)),
            t(0.99),
            c.physical_quotes,
            if quotes > 0 {
                format!("{:.1}", answered as f64 / quotes as f64)
            } else {
                "—".into()
            },
            c.censored.len(),
            verified_cell(&c.verified),
            c.load
        );
    };
    if let Some(dc) = find(r, true, true, sc.n) {
        let errs = dc.errors.values().sum::<usize>();
        row(
            out,
            "direct (data port)",
            format!("{} vTPM connections", dc.n),
            dc,
            errs.to_string(),
            "—".into(),
        );
    }
    let non200: usize = st.quote_statuses.values().sum();
    let non200 = if non200 == 0 {
        "0".to_string()
    } else {
        st.quote_statuses
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    row(
        out,
        "service (HTTPS/mTLS)",
        format!("{} tenants ({} quoting)", st.tenants, st.quoting),
        sc,
        non200,
        st.rate_limited.to_string(),
    );
    let polls: usize = st.polls.values().sum();
    let _ = writeln!(
        out,
        "\n*Verified answers/s* = answers that arrived inside the window ÷ window, scaled by the verified fraction. *Answers per physical quote* = \
         all answers (window + drain) ÷ TPM2_Quote commands. The {} tenants without a vTPM made {polls} `GET /v1/vtpms` polls ({}); \
         429s waited {:.0} s in all; connections lost and reopened: {}{}. Batches signed (manager debug log): {}.\n",
        st.tenants - st.quoting,
        st.polls
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        st.rate_wait_secs,
        st.reconnects,
        if st.net_errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", st.net_errors.join("; "))
        },
        batch_sizes(sc)
    );
}
