//! **P4**: memory per running vTPM — PSS, Private_Dirty and RSS from `/proc/PID/smaps_rollup`,
//! and the executable's own dirty pages — for N vtpm-domain processes vs N swtpm processes.

use std::fmt::Write as _;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::procs::Procs;
use crate::report::pass;
use crate::{Args, Stack, get_random_once, loadavg, start_swtpm};

#[derive(Default, Clone, Copy)]
struct Mem {
    rss: u64,
    pss: u64,
    pss_anon: u64,
    pss_file: u64,
    private_dirty: u64,
    private_clean: u64,
    shared_clean: u64,
}

fn smaps_rollup(pid: u32) -> Result<Mem> {
    let s = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let mut m = Mem::default();
    for l in s.lines() {
        let mut it = l.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "Rss:" => m.rss = v,
            "Pss:" => m.pss = v,
            "Pss_Anon:" => m.pss_anon = v,
            "Pss_File:" => m.pss_file = v,
            "Private_Dirty:" => m.private_dirty = v,
            "Private_Clean:" => m.private_clean = v,
            "Shared_Clean:" => m.shared_clean = v,
            _ => {}
        }
    }
    Ok(m)
}

struct MemSet {
    n: usize,
    avg: [f64; 7],
    total_pss: u64,
    threads: u64,
}

fn mem_of(pids: &[u32]) -> Result<MemSet> {
    let mut sum = [0u64; 7];
    let mut threads = 0;
    for &p in pids {
        let m = smaps_rollup(p)?;
        for (i, v) in [
            m.rss,
            m.pss,
            m.pss_anon,
            m.pss_file,
            m.private_dirty,
            m.private_clean,
            m.shared_clean,
        ]
        .iter()
        .enumerate()
        {
            sum[i] += v;
        }
        threads += fs::read_to_string(format!("/proc/{p}/status"))?
            .lines()
            .find_map(|l| {
                l.strip_prefix("Threads:")
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
    }
    let n = pids.len().max(1) as f64;
    Ok(MemSet {
        n: pids.len(),
        avg: sum.map(|s| s as f64 / n),
        total_pss: sum[1],
        threads,
    })
}

/// Private_Dirty (KiB) of the mappings backed by the process's own executable: for a PIE
/// binary this is mostly `.data.rel.ro` + `.got` written by the dynamic loader's relocations.
fn exe_private_dirty(pid: u32) -> Result<u64> {
    let exe = fs::read_link(format!("/proc/{pid}/exe"))?;
    let exe = exe.to_string_lossy().into_owned();
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut ours, mut total) = (false, 0);
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            ours = l.split_whitespace().nth(5) == Some(exe.as_str());
        } else if let Some(v) = l.strip_prefix("Private_Dirty:")
            && ours
        {
            total += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// The PSS / Private_Dirty (KiB) of one process split by what its mappings hold.
const PARTS: [&str; 10] = [
    "executable (text, rodata)",
    "executable (relro, data, bss: relocated at load)",
    "[heap]",
    "anonymous (mmap'd heap, thread stacks)",
    "[stack]",
    "libtpms (swtpm: and libswtpm_libtpms)",
    "libcrypto",
    "libc, ld.so",
    "other shared libraries",
    "other",
];

/// Which of [`PARTS`] a mapping of `exe` with this name and permissions belongs to.
fn part_of(exe: &str, name: Option<&str>, perms: &str) -> usize {
    let file = name.map(|n| n.rsplit('/').next().unwrap_or(n));
    match (name, file) {
        // Read-only mappings with dirty pages (relro) are moved to part 1 by `breakdown`.
        (Some(n), _) if n == exe => usize::from(perms.starts_with("rw")),
        (Some("[heap]"), _) => 2,
        (None, _) => 3,
        (Some("[stack]"), _) => 4,
        (_, Some(f)) if f.starts_with("libtpms") || f.starts_with("libswtpm") => 5,
        (_, Some(f)) if f.starts_with("libcrypto") => 6,
        (_, Some(f)) if f.starts_with("libc.so") || f.starts_with("ld-linux") => 7,
        (_, Some(f)) if f.contains(".so") => 8,
        _ => 9,
    }
}

/// Per-part (PSS, Private_Dirty) in KiB of one process, from `/proc/PID/smaps`. The executable's
/// read-only mappings that hold private dirty pages (relro after relocation) count as part 1.
fn breakdown(pid: u32) -> Result<[(u64, u64); PARTS.len()]> {
    let exe = fs::read_link(format!("/proc/{pid}/exe"))?.to_string_lossy().into_owned();
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut out = [(0u64, 0u64); PARTS.len()];
    let (mut part, mut pss, mut dirty, mut ours) = (9usize, 0u64, 0u64, false);
    let flush = |part: usize, pss: u64, dirty: u64, ours: bool, out: &mut [(u64, u64); PARTS.len()]| {
        // An executable mapping that is not writable but holds dirty pages is relro.
        let p = if ours && part == 0 && dirty > 0 { 1 } else { part };
        out[p].0 += pss;
        out[p].1 += dirty;
    };
    for l in smaps.lines() {
        let mut it = l.split_whitespace();
        let first = it.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            flush(part, pss, dirty, ours, &mut out);
            let perms = it.next().unwrap_or("");
            let name = it.nth(3);
            part = part_of(&exe, name, perms);
            ours = name == Some(exe.as_str());
            (pss, dirty) = (0, 0);
        } else {
            let v = || it.clone().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match first {
                "Pss:" => pss = v(),
                "Private_Dirty:" => dirty = v(),
                _ => {}
            }
        }
    }
    flush(part, pss, dirty, ours, &mut out);
    Ok(out)
}

/// [`breakdown`] averaged over `pids`.
fn breakdown_avg(pids: &[u32]) -> Result<[(f64, f64); PARTS.len()]> {
    let mut sum = [(0u64, 0u64); PARTS.len()];
    for &p in pids {
        for (s, b) in sum.iter_mut().zip(breakdown(p)?) {
            s.0 += b.0;
            s.1 += b.1;
        }
    }
    let n = pids.len().max(1) as f64;
    Ok(sum.map(|(a, b)| (a as f64 / n, b as f64 / n)))
}

pub(crate) struct P4 {
    /// Private_Dirty (KiB) of the mappings of the program's own executable, first process.
    ours_exe_dirty: u64,
    swtpm_exe_dirty: u64,
    ours: MemSet,
    swtpm: MemSet,
    ours_parts: [(f64, f64); PARTS.len()],
    swtpm_parts: [(f64, f64); PARTS.len()],
    create_all_ns: u64,
    load: String,
}

pub(crate) fn p4(args: &Args, stack: &Stack, procs: &mut Procs) -> Result<P4> {
    let load = loadavg();
    let t = Instant::now();
    let mut pids = vec![];
    let mut ports = vec![];
    for _ in 0..args.instances {
        let (_, pid, port, _) = stack.create(procs)?;
        pids.push(pid);
        ports.push(port);
    }
    let create_all_ns = t.elapsed().as_nanos() as u64;
    for &p in &ports {
        get_random_once(p)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let ours = mem_of(&pids)?;
    let ours_parts = breakdown_avg(&pids)?;
    let ours_exe_dirty = exe_private_dirty(pids[0]).unwrap_or(0);
    procs.stop_many(&pids, Duration::from_secs(5));
    eprintln!("P4 vtpm-domain done (load {})", loadavg());

    let mut pids = vec![];
    for i in 0..args.instances {
        let (pid, port) = start_swtpm(procs, &args.work.join(format!("p4-swtpm-{i}")))?;
        get_random_once(port)?;
        pids.push(pid);
    }
    std::thread::sleep(Duration::from_millis(300));
    let swtpm = mem_of(&pids)?;
    let swtpm_parts = breakdown_avg(&pids)?;
    let swtpm_exe_dirty = exe_private_dirty(pids[0]).unwrap_or(0);
    procs.stop_many(&pids, Duration::from_secs(5));
    eprintln!("P4 swtpm done (load {})", loadavg());
    Ok(P4 {
        ours_exe_dirty,
        swtpm_exe_dirty,
        ours,
        swtpm,
        ours_parts,
        swtpm_parts,
        create_all_ns,
        load,
    })
}

pub(crate) fn report_p4(out: &mut String, r: &P4) {
    let _ = writeln!(out, "### P4 — memory per running vTPM\n");
    let _ = writeln!(
        out,
        "{} vtpm-domain processes (created with `xl-vtpm vtpm create`, one GetRandom each) measured together, stopped, then {} \
         `swtpm socket --tpm2` processes (own state dir, `--flags not-need-init,startup-clear`, one GetRandom each) measured together. \
         Values are averages per process from `/proc/PID/smaps_rollup`, in KiB. The physical swtpm and vtpmmgr run during both phases. \
         Creating the {} vTPMs took {:.1} s. Load average at start: {}.\n",
        r.ours.n,
        r.swtpm.n,
        r.ours.n,
        r.create_all_ns as f64 / 1e9,
        r.load
    );
    let _ = writeln!(out, "| per process (KiB) | vtpm-domain | swtpm | ratio |");
    let _ = writeln!(out, "|---|---|---|---|");
    let names = [
        "Rss",
        "Pss",
        "Pss_Anon",
        "Pss_File",
        "Private_Dirty",
        "Private_Clean",
        "Shared_Clean",
    ];
    for (i, n) in names.iter().enumerate() {
        let ratio = if r.swtpm.avg[i] >= 8.0 {
            format!("{:.2}×", r.ours.avg[i] / r.swtpm.avg[i])
        } else {
            "—".into()
        };
        let _ = writeln!(
            out,
            "| {n} | {:.0} | {:.0} | {ratio} |",
            r.ours.avg[i], r.swtpm.avg[i]
        );
    }
    let _ = writeln!(
        out,
        "| threads per process | {:.1} | {:.1} | |",
        r.ours.threads as f64 / r.ours.n.max(1) as f64,
        r.swtpm.threads as f64 / r.swtpm.n.max(1) as f64
    );
    let ratio = r.ours.avg[1] / r.swtpm.avg[1];
    let _ = writeln!(
        out,
        "\n| | vtpm-domain | swtpm | ratio | goal |\n|---|---|---|---|---|\n| PSS per vTPM (MiB) | {:.2} | {:.2} | {:.2}× | ≤ 1.0×: {} |\n| total PSS of {} processes (MiB) | {:.1} | {:.1} | | |\n",
        r.ours.avg[1] / 1024.0,
        r.swtpm.avg[1] / 1024.0,
        ratio,
        pass(ratio <= 1.0),
        r.ours.n,
        r.ours.total_pss as f64 / 1024.0,
        r.swtpm.total_pss as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "Where the PSS is, per process (KiB, averages, from `/proc/PID/smaps`; the executable's read-only \
         mappings with dirty pages — relro after relocation — count as relocated):\n"
    );
    let _ = writeln!(out, "| part | vtpm-domain PSS | swtpm PSS | vtpm-domain Private_Dirty | swtpm Private_Dirty |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (i, name) in PARTS.iter().enumerate() {
        let (o, s) = (r.ours_parts[i], r.swtpm_parts[i]);
        let _ = writeln!(out, "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |", o.0, s.0, o.1, s.1);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Private_Dirty in the mappings of the executable itself (first process): vtpm-domain {} KiB, swtpm {} KiB. For a PIE executable this is \
         `.data.rel.ro` + `.got` rewritten by the dynamic loader at start (relocations), so every process holds a private copy; it accounts for \
         {:.0}% of the Private_Dirty difference of {:.0} KiB.\n",
        r.ours_exe_dirty,
        r.swtpm_exe_dirty,
        100.0 * (r.ours_exe_dirty as f64 - r.swtpm_exe_dirty as f64)
            / (r.ours.avg[4] - r.swtpm.avg[4]),
        r.ours.avg[4] - r.swtpm.avg[4]
    );
}
