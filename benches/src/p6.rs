//! P6 — NV-write-heavy command latency: what state anchors cost.
//!
//! Every command that changes a vTPM's permanent state (here `TPM2_NV_Increment` of an NV
//! counter) makes vtpm-domain write its sealed state and — with state anchors — wait until the
//! manager has recorded the new generation under its rollback counter (one store write and one
//! physical NV increment per *batch*, group commit). Two cells:
//!
//! * **sequential**: one vTPM, one client, NV_Increment after NV_Increment over one persistent
//!   connection — per-command latency;
//! * **concurrent**: `--p6-vtpms` vTPMs, one client each, all incrementing at once — aggregate
//!   writes/s, per-command latency, and how many physical counter increments the anchors cost.
//!
//! With `--p6-baseline DIR` the same cells run, in the same run and interleaved, against the
//! `vtpmmgr`/`vtpm-domain`/`xl-vtpm` in `DIR` (a build without anchors) on its own swtpm and
//! manager: the before/after comparison.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::procs::{Procs, connect_retry};
use crate::stats::{Summary, ms, summarize};
use crate::tpm::Conn;
use crate::{Args, Stack, loadavg};
use tpm_wire::nv_counter;

const NV_INDEX: u32 = 0x0150_0040;

fn nv_define_counter() -> Vec<u8> {
    nv_counter::define(NV_INDEX)
}

fn nv_increment() -> Vec<u8> {
    nv_counter::increment(NV_INDEX)
}

/// One cell's result.
pub struct Cell {
    /// "this build" or "baseline".
    pub build: &'static str,
    /// vTPMs writing at once.
    pub vtpms: usize,
    /// Per-command latency.
    pub lat: Summary,
    /// Acknowledged NV writes per second, all vTPMs together.
    pub writes_per_s: f64,
    /// Acknowledged NV writes.
    pub writes: u64,
    /// Physical NV counter increments during the cell (the manager's store counter).
    pub counter_increments: Option<u64>,
}

/// P6 results.
pub struct P6 {
    /// Cells in run order.
    pub cells: Vec<Cell>,
    /// Load average at start.
    pub load: String,
    /// The baseline's binaries, if any.
    pub baseline: Option<PathBuf>,
}

fn store_counter(stack: &Stack) -> Option<u64> {
    let out = stack.xl(&["mgr", "status", "--json"]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["store_counter"]["tpm_value"].as_u64()
}

/// Creates `n` vTPMs with an NV counter each; returns (pid, port).
fn vtpms(stack: &Stack, procs: &mut Procs, n: usize) -> Result<Vec<(u32, u16)>> {
    let mut out = vec![];
    for _ in 0..n {
        let (_, pid, port, _) = stack.create_with(procs, &["--ek", "ecc"])?;
        let mut c = Conn::new(connect_retry(port, Duration::from_secs(10))?);
        let rc = c.xfer(&nv_define_counter())?;
        if rc != 0 {
            bail!("NV_DefineSpace returned {rc:#x}");
        }
        out.push((pid, port));
    }
    Ok(out)
}

/// Every vTPM in `ports` increments `per_vtpm` times at once (after `warmup` each).
fn run_cell(stack: &Stack, build: &'static str, ports: &[u16], per_vtpm: usize, warmup: usize) -> Result<Cell> {
    let cmd = nv_increment();
    let streams = ports.iter().map(|p| connect_retry(*p, Duration::from_secs(10))).collect::<Result<Vec<_>>>()?;
    for s in &streams {
        let mut c = Conn::new(s.try_clone()?);
        for _ in 0..warmup {
            c.xfer(&cmd)?;
        }
    }
    let before = store_counter(stack);
    let start = Instant::now();
    let threads: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let cmd = cmd.clone();
            std::thread::spawn(move || -> Result<Vec<u64>> {
                let mut c = Conn::new(s);
                let mut lat = Vec::with_capacity(per_vtpm);
                for _ in 0..per_vtpm {
                    let t = Instant::now();
                    let rc = c.xfer(&cmd)?;
                    if rc != 0 {
                        bail!("NV_Increment returned {rc:#x}");
                    }
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = vec![];
    for t in threads {
        all.extend(t.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??);
    }
    let secs = start.elapsed().as_secs_f64();
    let after = store_counter(stack);
    Ok(Cell {
        build,
        vtpms: ports.len(),
        lat: summarize(&all),
        writes_per_s: all.len() as f64 / secs,
        writes: all.len() as u64,
        counter_increments: after.zip(before).map(|(a, b)| a - b),
    })
}

pub fn p6(args: &Args, stack: &Stack, procs: &mut Procs) -> Result<P6> {
    let load = loadavg();
    let mut stacks: Vec<(&'static str, Option<Stack>)> = vec![("this build", None)];
    if let Some(dir) = &args.p6_baseline {
        let run_dir = args.run_dir.clone().unwrap_or_else(|| args.work.join("run")).with_extension("p6-baseline");
        stacks.insert(0, ("baseline", Some(Stack::start_in(procs, dir, &args.work.join("p6-baseline"), &run_dir)?)));
    }
    let mut prepared = vec![];
    for (build, s) in &stacks {
        let st = s.as_ref().unwrap_or(stack);
        let seq = vtpms(st, procs, 1)?;
        let conc = vtpms(st, procs, args.p6_vtpms)?;
        prepared.push((*build, st, seq, conc));
    }
    let mut cells = vec![];
    for round in 0..args.p6_runs {
        for (build, st, seq, _) in &prepared {
            let ports: Vec<u16> = seq.iter().map(|(_, p)| *p).collect();
            cells.push(run_cell(st, build, &ports, args.p6_n, if round == 0 { 20 } else { 0 })?);
        }
        for (build, st, _, conc) in &prepared {
            let ports: Vec<u16> = conc.iter().map(|(_, p)| *p).collect();
            cells.push(run_cell(st, build, &ports, args.p6_n.div_ceil(conc.len()).max(20), if round == 0 { 5 } else { 0 })?);
        }
        eprintln!("P6 run {} done (load {})", round + 1, loadavg());
    }
    let pids: Vec<u32> = prepared.iter().flat_map(|(_, _, s, c)| s.iter().chain(c).map(|(pid, _)| *pid)).collect();
    procs.stop_many(&pids, Duration::from_secs(3));
    if let Some((_, Some(b))) = stacks.first() {
        procs.stop(b.mgr_pid, Duration::from_secs(10));
    }
    Ok(P6 { cells, load, baseline: args.p6_baseline.clone() })
}

fn median_of(cells: &[&Cell], f: impl Fn(&Cell) -> f64) -> f64 {
    crate::stats::median_f(&cells.iter().map(|c| f(c)).collect::<Vec<_>>())
}

pub fn report_p6(out: &mut String, r: &P6, args: &Args) {
    let _ = writeln!(out, "### P6 — NV-write-heavy commands: the cost of state anchors\n");
    let _ = writeln!(
        out,
        "`TPM2_NV_Increment` of an NV counter (owner password session): every command writes the vTPM's sealed state \
         (fsync) and, with state anchors, waits until the manager has anchored the new generation under its rollback \
         counter (group commit: one store write + one physical NV increment per batch). Sequential: one vTPM, one \
         client, {} commands per run. Concurrent: {} vTPMs, one client each, all at once. {} runs, interleaved; \
         medians of the per-run values. Load at start: {}.{}\n",
        args.p6_n,
        args.p6_vtpms,
        args.p6_runs,
        r.load,
        match &r.baseline {
            Some(d) => format!(" **Baseline**: the binaries in `{}` ({}), on their own swtpm and manager in the same run.", d.display(), args.p6_baseline_label),
            None => String::new(),
        }
    );
    let _ = writeln!(out, "| build | vTPMs | p50 ms | p90 ms | p99 ms | writes/s | physical NV increments per 100 writes |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let mut keys: Vec<(&str, usize)> = vec![];
    for c in &r.cells {
        if !keys.contains(&(c.build, c.vtpms)) {
            keys.push((c.build, c.vtpms));
        }
    }
    keys.sort_by_key(|(b, n)| (*n, *b != "baseline"));
    for (build, n) in keys {
        let cs: Vec<&Cell> = r.cells.iter().filter(|c| c.build == build && c.vtpms == n).collect();
        let inc = cs.iter().filter_map(|c| c.counter_increments.map(|i| i as f64 * 100.0 / c.writes as f64)).collect::<Vec<_>>();
        let _ = writeln!(
            out,
            "| {build} | {n} | {} | {} | {} | {:.0} | {} |",
            ms(median_of(&cs, |c| c.lat.median)),
            ms(median_of(&cs, |c| c.lat.p90)),
            ms(median_of(&cs, |c| c.lat.p99)),
            median_of(&cs, |c| c.writes_per_s),
            if inc.is_empty() { "–".into() } else { format!("{:.1}", crate::stats::median_f(&inc)) },
        );
    }
    let _ = writeln!(out);
}
