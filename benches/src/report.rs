//! The BENCHMARKS.md section: the shared table helpers, the run's header (machine, versions,
//! load), and writing the dated section — a rerun on the same day replaces it, keeping the
//! subsections of benchmarks it did not run.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Result;

use crate::p1::online_cpus;
use crate::stats::{ms, summarize};
use crate::{Args, loadavg, sh};

pub(crate) fn pass(ok: bool) -> &'static str {
    if ok { "**pass**" } else { "**FAIL**" }
}

pub(crate) fn med(v: &[u64]) -> f64 {
    summarize(v).median
}

pub(crate) fn row_ms(out: &mut String, name: &str, v: &[u64]) {
    if v.is_empty() {
        let _ = writeln!(out, "| {name} | n/a | | | |");
        return;
    }
    let s = summarize(v);
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {} | {} |",
        ms(s.median),
        ms(s.min),
        ms(s.p90),
        ms(s.max)
    );
}

pub(crate) fn header(args: &Args, date: &str, load_start: &str) -> String {
    let mut h = String::new();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = online_cpus();
    let mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo");
    let _ = writeln!(h, "## Run of {date}\n");
    let _ = writeln!(h, "| | |\n|---|---|");
    let _ = writeln!(h, "| date (UTC) | {} |", sh("date -u '+%Y-%m-%d %H:%M:%S'"));
    let _ = writeln!(h, "| `uname -a` | `{}` |", sh("uname -a"));
    let _ = writeln!(h, "| CPU | {cpu}, {cores} cores online, {mem} RAM |");
    let _ = writeln!(
        h,
        "| load average (1/5/15 min) at start / end | {load_start} / {} |",
        loadavg()
    );
    let _ = writeln!(
        h,
        "| busiest processes at start | {} |",
        std::env::var("XVTPM_BENCH_TOP").unwrap_or_default()
    );
    let _ = writeln!(
        h,
        "| build | `cargo build --release` (opt-level 3, debug = 1, no LTO) |"
    );
    let _ = writeln!(
        h,
        "| versions | xvtpm {} (git {}), {}, swtpm {}, libtpms {} (Debian), {} |",
        env!("CARGO_PKG_VERSION"),
        sh("git rev-parse --short HEAD 2>/dev/null && (git diff --quiet HEAD 2>/dev/null || echo '+uncommitted')").replace('\n', ""),
        sh("rustc -V"),
        sh("swtpm --version 2>&1 | sed -n 's/.*version \\([0-9.]*\\).*/\\1/p'"),
        sh("dpkg-query -W -f '${Version}' libtpms0 2>/dev/null"),
        sh("dpkg-query -W -f 'OpenSSL ${Version}' libssl3 2>/dev/null")
    );
    let _ = writeln!(
        h,
        "| work directory | `{}` on {} |",
        args.work.display(),
        sh(&format!(
            "df -T '{}' | awk 'NR==2 {{print $2 \" (\" $1 \")\"}}'",
            args.work.display()
        ))
    );
    if let Some(r) = &args.run_dir {
        let _ = writeln!(
            h,
            "| runtime directory (sockets, runtime records) | `{}` on {} |",
            r.display(),
            sh(&format!(
                "df -T '{}' | awk 'NR==2 {{print $2}}'",
                r.display()
            ))
        );
    }
    let _ = writeln!(h, "| command | `make bench` (`scripts/bench.sh`) |\n");
    h
}

/// The benchmark a `### P…` subsection belongs to (`p1` for P1a/P1b).
fn subsection_key(title: &str) -> Option<String> {
    let t = title.strip_prefix("### P")?;
    let d: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    (!d.is_empty()).then(|| format!("p{d}"))
}

/// Splits a section body into (text before the first `### `, [(key, subsection text)]).
fn split_subsections(body: &str) -> (String, Vec<(Option<String>, String)>) {
    let mut head = String::new();
    let mut subs: Vec<(Option<String>, String)> = vec![];
    for line in body.split_inclusive('\n') {
        if line.starts_with("### ") {
            subs.push((subsection_key(line), String::new()));
        }
        match subs.last_mut() {
            Some((_, t)) => t.push_str(line),
            None => head.push_str(line),
        }
    }
    (head, subs)
}

/// Merges this run's `body` into an earlier section of the same day: benchmarks this run
/// did not run keep their earlier subsections (marked as such), in P1, P2, P3, P4 order.
fn merge_section(old_body: &str, body: &str) -> String {
    let (head, new_subs) = split_subsections(body);
    let (old_head, old_subs) = split_subsections(old_body);
    let ran: Vec<Option<String>> = new_subs.iter().map(|(k, _)| k.clone()).collect();
    let old_date = old_head
        .lines()
        .find(|l| l.starts_with("| date (UTC) |"))
        .and_then(|l| l.split('|').nth(2))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let old_git = old_head
        .lines()
        .find(|l| l.starts_with("| versions |"))
        .and_then(|l| l.split("(git ").nth(1))
        .and_then(|l| l.split(')').next())
        .map(|g| format!(", xvtpm git {g}"))
        .unwrap_or_default();
    let mut all: Vec<(Option<String>, String, bool)> =
        new_subs.into_iter().map(|(k, t)| (k, t, false)).collect();
    for (k, t) in old_subs {
        if k.is_some() && !ran.contains(&k) {
            all.push((k, t, true));
        }
    }
    all.sort_by_key(|(k, _, _)| k.clone().unwrap_or_default());
    let mut out = head;
    for (_, t, kept) in all {
        if kept {
            let mut lines = t.splitn(2, '\n');
            let title = lines.next().unwrap_or_default();
            let rest = lines.next().unwrap_or_default();
            // Already marked by an earlier merge: keep that note (it names the right run).
            let note = if rest.trim_start().starts_with("*(earlier run") {
                String::new()
            } else {
                format!(
                    "\n*(earlier run of this day, started {old_date} UTC{old_git}; not rerun in the run above)*\n"
                )
            };
            out.push_str(&format!("{title}\n{note}{rest}"));
        } else {
            out.push_str(&t);
        }
    }
    out
}

pub(crate) fn write_section(path: &Path, date: &str, body: &str) -> Result<()> {
    let begin = format!("<!-- xvtpm-bench {date} -->");
    let end = format!("<!-- /xvtpm-bench {date} -->");
    let old = fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nWritten by `make bench` (`scripts/bench.sh` → `xvtpm-bench`); one section per day, a rerun on the same day \
         replaces that day's section (benchmarks left out of the rerun with `--only` keep their earlier subsections). Timings are \
         medians on a shared, noisy machine: compare ratios measured in the same run, not absolute values across runs.\n\n"
            .to_string()
    });
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            let merged = merge_section(old[a + begin.len()..b].trim_start_matches('\n'), body);
            format!(
                "{}{begin}\n{merged}{end}\n{}",
                &old[..a],
                old[b + end.len()..].trim_start_matches('\n')
            )
        }
        _ => format!(
            "{}{}{begin}\n{body}{end}\n",
            old,
            if old.ends_with("\n\n") { "" } else { "\n" },
        ),
    };
    fs::write(path, new)?;
    Ok(())
}
