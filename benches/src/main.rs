//! `xvtpm-bench`: the benchmarks behind `make bench` (see `scripts/bench.sh`).
//!
//! Real parts only: swtpm as the physical TPM, `vtpmmgr serve`, `xl-vtpm`,
//! `vtpm-domain` processes (libtpms), and plain `swtpm socket --tpm2` /
//! `swtpm_setup` as the baseline on the same machine in the same run.
//!
//! * **P1** command latency (GetRandom(32), PCR_Extend(16, sha256, password
//!   session)) over one persistent TCP connection: vtpm-domain vs swtpm vs
//!   libtpms in process (vtpm-engine).
//! * **P2** deep quotes per second and p50/p99 latency with N = 1, 16, 256
//!   concurrent requesters (each its own vtpm-domain), batched vs unbatched, against the
//!   physical swtpm directly and behind a 100 ms per-command delay (a discrete TPM); every
//!   bundle verified offline (see `p2.rs`); plus one cell through the attestation service
//!   (`xvtpm-attestd`, 1 000 mTLS tenants, `p2/service.rs`).
//! * **P3** time from "create a vTPM" to its first answered command, EK
//!   included, vs `swtpm_setup --create-ek-cert` + spawning swtpm; with a
//!   breakdown of our time and an ECC P-256 EK variant measured in process.
//! * **P4** memory (PSS, Private_Dirty, RSS) per running vTPM with N
//!   vtpm-domain processes vs N swtpm processes.
//! * **P6** NV-write-heavy latency (NV_Increment: every command writes state and anchors its
//!   generation in the manager), one vTPM and N concurrent vTPMs, optionally against a baseline
//!   build in the same run (see `p6.rs`).
//!
//! Results go to stdout (JSON) and into a dated section of BENCHMARKS.md.
//! Timings are reported, never asserted.
//!
//! This file holds the command line, the stack every benchmark runs against (swtpm, the
//! manager, `xl-vtpm`) and `main`; each benchmark with its BENCHMARKS.md subsection is its own
//! module (`p1.rs`, `p2.rs`, `p3.rs`, `p4.rs`, `p6.rs`), and `report.rs` writes the section.

#![forbid(unsafe_code)]

mod p1;
mod p2;
mod p3;
mod p4;
mod p6;
mod procs;
mod report;
mod stats;
mod tpm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use p1::{p1, report_p1};
use p3::{p3, report_p3};
use p4::{p4, report_p4};
use procs::{Procs, connect_retry, free_port_pair};
use report::{header, write_section};
use tpm::Conn;
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest};

#[derive(Parser, Debug)]
#[command(
    about = "xvtpm benchmarks (P1 latency, P2 deep-quote throughput, P3 creation time, P4 memory) against swtpm"
)]
struct Args {
    /// Directory with vtpmmgr, vtpm-domain and xl-vtpm (release build).
    #[arg(long)]
    bin: PathBuf,
    /// Scratch directory (state files live here: put it on a real disk).
    #[arg(long)]
    work: PathBuf,
    /// BENCHMARKS.md to update (a dated section is added or replaced).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runtime directory (sockets, runtime records); default WORK/run. In production it is
    /// /run/xvtpm, a tmpfs: pass a tmpfs directory to match.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// File that receives the PID of every process started (for the wrapper's trap).
    #[arg(long)]
    pidfile: PathBuf,
    /// P1: measured commands per command type, per run and target.
    #[arg(long, default_value_t = 20_000)]
    n: usize,
    /// P1: warm-up commands per command type, per run and target.
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// P1: runs (targets interleaved within each run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// P3: vTPMs created per method.
    #[arg(long, default_value_t = 30)]
    creates: usize,
    /// P3: swtpm_setup runs per variant.
    #[arg(long, default_value_t = 5)]
    setups: usize,
    /// P4: concurrent instances.
    #[arg(long, default_value_t = 50)]
    instances: usize,
    /// P2: concurrent requesters (vTPMs) per cell.
    #[arg(long, default_value = "1,16,256", value_delimiter = ',')]
    p2_n: Vec<usize>,
    /// P2: time box (s) of a cell against the physical swtpm directly.
    #[arg(long, default_value_t = 8.0)]
    p2_secs: f64,
    /// P2: time box (s) of a cell behind the delay proxy.
    #[arg(long, default_value_t = 15.0)]
    p2_secs_delay: f64,
    /// P2: after the time box, at most this long (s) for outstanding requests to finish;
    /// still outstanding then: reported as censored.
    #[arg(long, default_value_t = 8.0)]
    p2_drain_secs: f64,
    /// P2: at most this many requests per cell (whichever comes first with the time box).
    #[arg(long, default_value_t = 40_000)]
    p2_max_requests: usize,
    /// P2: delay (ms) before every physical TPM command (the discrete-TPM model).
    #[arg(long, default_value_t = 100)]
    p2_delay_ms: u64,
    /// P2: physical TPM paths to run (direct, delay).
    #[arg(long, default_value = "direct,delay", value_delimiter = ',')]
    p2_tpm: Vec<String>,
    /// P2: manager modes to run (batched, unbatched).
    #[arg(long, default_value = "batched,unbatched", value_delimiter = ',')]
    p2_modes: Vec<String>,
    /// P2: verify at most this many responses per cell (evenly spaced sample); 0 = all.
    #[arg(long, default_value_t = 0)]
    p2_verify_max: usize,
    /// P2: how requests reach the vTPMs: `direct` (each requester on its vTPM's data port, every
    /// cell above) and/or `service` (one more cell behind the delay, batched, N = the largest
    /// --p2-n: tenants over HTTPS/mTLS to `xvtpm-attestd`, which uses the vTPMs' host-quote sockets).
    #[arg(long, default_value = "direct,service", value_delimiter = ',')]
    p2_via: Vec<String>,
    /// P2 service cell: tenants (each its own client certificate and connection); the N vTPMs
    /// are bound one each to the first N.
    #[arg(long, default_value_t = 1000)]
    p2_service_tenants: usize,
    /// P2 service cell: time box (s).
    #[arg(long, default_value_t = 15.0)]
    p2_service_secs: f64,
    /// P6: NV_Increment commands per run (sequential; split over the vTPMs when concurrent).
    #[arg(long, default_value_t = 400)]
    p6_n: usize,
    /// P6: vTPMs writing at once in the concurrent cell.
    #[arg(long, default_value_t = 8)]
    p6_vtpms: usize,
    /// P6: runs.
    #[arg(long, default_value_t = 3)]
    p6_runs: usize,
    /// P6: also run against the binaries in this directory (a build without state anchors), in
    /// the same run, for the before/after comparison.
    #[arg(long)]
    p6_baseline: Option<PathBuf>,
    /// P6: what the baseline build is, for the report.
    #[arg(long, default_value = "a build without state anchors")]
    p6_baseline_label: String,
    /// Benchmarks to run (comma separated: p1,p2,p3,p4,p6).
    #[arg(long, default_value = "p1,p2,p3,p4,p6", value_delimiter = ',')]
    only: Vec<String>,
}

// ---------------------------------------------------------------- the stack

/// swtpm (physical TPM) + provisioned vtpmmgr + the xl-vtpm environment.
struct Stack {
    bin: PathBuf,
    run_dir: PathBuf,
    state_dir: PathBuf,
    mgr_log: PathBuf,
    /// The running vtpmmgr (replaced by [`Stack::restart_mgr`]).
    mgr_pid: u32,
    /// The physical swtpm's data port (control is port + 1).
    hw_port: u16,
}

fn swtpm_cmd(port: u16, dir: &Path, log: Option<&Path>) -> Command {
    let mut c = Command::new("swtpm");
    c.arg("socket")
        .arg("--tpm2")
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .arg("--flags")
        .arg("not-need-init,startup-clear")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(l) = log {
        c.arg("--log").arg(format!("file={},level=1", l.display()));
    }
    c
}

/// Starts a baseline swtpm on a fresh port pair; returns (pid, port).
fn start_swtpm(procs: &mut Procs, dir: &Path) -> Result<(u32, u16)> {
    fs::create_dir_all(dir)?;
    for _ in 0..5 {
        let port = free_port_pair()?;
        let pid = procs.spawn(&mut swtpm_cmd(port, dir, None))?;
        if connect_retry(port, Duration::from_secs(5)).is_ok() {
            return Ok((pid, port));
        }
        procs.stop(pid, Duration::from_secs(1));
    }
    bail!("swtpm did not start")
}

impl Stack {
    fn start(args: &Args, procs: &mut Procs) -> Result<Stack> {
        let run_dir = args.run_dir.clone().unwrap_or_else(|| args.work.join("run"));
        Stack::start_in(procs, &args.bin, &args.work, &run_dir)
    }

    /// A stack of the binaries in `bin`, its files under `work` and its sockets in `run_dir`.
    fn start_in(procs: &mut Procs, bin: &Path, work: &Path, run_dir: &Path) -> Result<Stack> {
        let hw = work.join("hwtpm");
        fs::create_dir_all(&hw)?;
        let port = free_port_pair()?;
        procs.spawn(&mut swtpm_cmd(port, &hw, Some(&hw.join("swtpm.log"))))?;
        drop(connect_retry(port, Duration::from_secs(10)).context("physical swtpm")?);
        let mut s = Stack {
            bin: bin.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            state_dir: work.join("state"),
            mgr_log: work.join("vtpmmgr.log"),
            mgr_pid: 0,
            hw_port: port,
        };
        let log = s.mgr_log.clone();
        s.spawn_mgr(
            procs,
            &format!("swtpm:host=127.0.0.1,port={port}"),
            &[],
            &log,
            "info",
        )?;
        let out = s.xl(&["mgr", "provision", "--yes", "--pcrs", "0-7"])?;
        if !out.status.success() {
            bail!("provision failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(s)
    }

    /// Spawns `vtpmmgr --tcti TCTI serve EXTRA...` (stderr to `log`, `XVTPM_LOG=filter`) and
    /// waits until its admin socket answers.
    fn spawn_mgr(
        &mut self,
        procs: &mut Procs,
        tcti: &str,
        extra: &[&str],
        log: &Path,
        filter: &str,
    ) -> Result<()> {
        let logf = fs::File::create(log)?;
        self.mgr_pid = procs.spawn(
            Command::new(self.bin.join("vtpmmgr"))
                .arg("--tcti")
                .arg(tcti)
                .arg("--state-dir")
                .arg(self.state_dir.join("mgr"))
                .arg("--run-dir")
                .arg(&self.run_dir)
                .arg("serve")
                .args(extra)
                .env("XVTPM_LOG", filter)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(logf),
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(self.run_dir.join("admin.sock")).is_err() {
            if Instant::now() > deadline || !Path::new(&format!("/proc/{}", self.mgr_pid)).exists()
            {
                bail!(
                    "vtpmmgr did not come up:\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops the running manager (SIGTERM: it finishes the physical command in flight and
    /// flushes its SRK, so no transient slot of the physical TPM leaks) and starts another
    /// on the same state, e.g. with another TCTI or batching switch.
    fn restart_mgr(
        &mut self,
        procs: &mut Procs,
        tcti: &str,
        extra: &[&str],
        log: &Path,
        filter: &str,
    ) -> Result<()> {
        procs.stop(self.mgr_pid, Duration::from_secs(20));
        self.spawn_mgr(procs, tcti, extra, log, filter)
    }

    fn xl(&self, a: &[&str]) -> Result<std::process::Output> {
        Command::new(self.bin.join("xl-vtpm"))
            .args(a)
            .env("XVTPM_RUN_DIR", &self.run_dir)
            .env("XVTPM_STATE_DIR", &self.state_dir)
            .env("XVTPM_VTPM_DOMAIN", self.bin.join("vtpm-domain"))
            .stdin(Stdio::null())
            .output()
            .context("running xl-vtpm")
    }

    /// `xl-vtpm vtpm create --json` → (uuid, pid, data port, state file).
    fn create(&self, procs: &mut Procs) -> Result<(Uuid, u32, u16, PathBuf)> {
        self.create_with(procs, &[])
    }

    /// As [`Stack::create`], with extra arguments (e.g. more `--listen`).
    /// As [`Stack::create_with`], with how the create got its vTPM (`created_from`: "pool" or "new").
    fn create_from(&self, procs: &mut Procs, extra: &[&str]) -> Result<(Uuid, u32, u16, String)> {
        let mut a = vec!["vtpm", "create", "--json", "--listen", "tcp:127.0.0.1:0"];
        a.extend_from_slice(extra);
        let out = self.xl(&a)?;
        if !out.status.success() {
            bail!("xl-vtpm vtpm create failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let pid = v["runtime"]["pid"].as_u64().ok_or_else(|| anyhow!("no pid in {v}"))? as u32;
        procs.adopt(pid);
        let port = v["runtime"]["tcp_ports"][0][0].as_u64().ok_or_else(|| anyhow!("no port in {v}"))? as u16;
        let uuid: Uuid = v["uuid"].as_str().ok_or_else(|| anyhow!("no uuid"))?.parse()?;
        Ok((uuid, pid, port, v["created_from"].as_str().unwrap_or("").to_string()))
    }

    fn create_with(&self, procs: &mut Procs, extra: &[&str]) -> Result<(Uuid, u32, u16, PathBuf)> {
        // Loopback TCP (the benchmarks' clients speak TCP), plus any extra listeners.
        let mut a = vec!["vtpm", "create", "--json", "--listen", "tcp:127.0.0.1:0"];
        a.extend_from_slice(extra);
        let out = self.xl(&a)?;
        if !out.status.success() {
            bail!(
                "xl-vtpm vtpm create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let v = if v.is_array() { v[0].clone() } else { v };
        let pid = v["runtime"]["pid"]
            .as_u64()
            .ok_or_else(|| anyhow!("no pid in {v}"))? as u32;
        procs.adopt(pid);
        let port = v["runtime"]["tcp_ports"][0][0]
            .as_u64()
            .ok_or_else(|| anyhow!("no port in {v}"))? as u16;
        let uuid: Uuid = v["uuid"]
            .as_str()
            .ok_or_else(|| anyhow!("no uuid"))?
            .parse()?;
        let state = PathBuf::from(v["state_file"].as_str().unwrap_or_default());
        Ok((uuid, pid, port, state))
    }

    fn admin(&self) -> Result<Admin> {
        let s = std::os::unix::net::UnixStream::connect(self.run_dir.join("admin.sock"))
            .context("admin socket")?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Admin(s))
    }
}

/// A connection to vtpmmgr's admin socket (the same framing xl-vtpm uses).
struct Admin(std::os::unix::net::UnixStream);

fn admin_call(a: &mut Admin, req: &AdminRequest) -> Result<AdminReply> {
    match vtpm_proto::mgr_io::call::<_, _, AdminReply>(&mut a.0, req).map_err(|e| anyhow!("admin call {req:?}: {e}"))? {
        AdminReply::Error(f) => bail!("admin call {req:?} refused: {f:?}"),
        other => Ok(other),
    }
}

fn get_random_once(port: u16) -> Result<()> {
    let mut c = Conn::new(connect_retry(port, Duration::from_secs(10))?);
    let rc = c.xfer(&tpm::get_random(32))?;
    if rc != 0 {
        bail!("GetRandom on port {port} returned {rc:#x}");
    }
    Ok(())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn state_generation(p: &Path) -> Option<u64> {
    vtpm_proto::sealed::peek(&fs::read(p).ok()?)
        .ok()
        .map(|(_, _, g)| g)
}

fn main() -> Result<()> {
    let args = Args::parse();
    procs::become_subreaper();
    fs::create_dir_all(&args.work)?;
    let date = sh("date -u +%Y-%m-%d");
    let load_start = loadavg();
    let mut procs = Procs::new(&args.pidfile);
    let mut stack = Stack::start(&args, &mut procs)?;
    let want = |b: &str| args.only.iter().any(|o| o.eq_ignore_ascii_case(b));

    let mut body = String::new();
    let r1 = if want("p1") {
        Some((
            p1(&args, &stack, &mut procs, false)?,
            p1(&args, &stack, &mut procs, true)?,
        ))
    } else {
        None
    };
    let r3 = if want("p3") {
        Some(p3(&args, &stack, &mut procs)?)
    } else {
        None
    };
    let r4 = if want("p4") {
        Some(p4(&args, &stack, &mut procs)?)
    } else {
        None
    };
    let r6 = if want("p6") {
        Some(p6::p6(&args, &stack, &mut procs)?)
    } else {
        None
    };
    // Last: it restarts the manager (with other TCTIs and batching switches) per cell.
    let r2 = if want("p2") {
        Some(p2::p2(&args, &mut stack, &mut procs)?)
    } else {
        None
    };
    procs.stop_all();

    body.push_str(&header(&args, &date, &load_start));
    if let Some((same, split)) = &r1 {
        report_p1(&mut body, same, &args);
        report_p1(&mut body, split, &args);
    }
    if let Some(r) = &r2 {
        p2::report_p2(&mut body, r, &args);
    }
    if let Some(r) = &r3 {
        report_p3(&mut body, r, &args);
    }
    if let Some(r) = &r4 {
        report_p4(&mut body, r);
    }
    if let Some(r) = &r6 {
        p6::report_p6(&mut body, r, &args);
    }
    println!("{body}");
    if let Some(out) = &args.out {
        write_section(out, &date, &body)?;
        eprintln!("results written to {}", out.display());
    }
    Ok(())
}
