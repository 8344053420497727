//! Memory footprint of a vTPM process (BENCHMARKS.md, P4): what the vtpm-domain executable
//! links must not bring large pointer tables, which the dynamic loader relocates into private
//! pages of every vTPM process at start (a PIE keeps them private: ASLR gives every process
//! its own addresses).

use std::process::Command;

/// Defined symbols of `bin` whose (mangled) name contains one of `crates`.
fn symbols_of(bin: &std::path::Path, crates: &[&str]) -> Vec<String> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(bin)
        .output()
        .expect("running nm (binutils)");
    assert!(out.status.success(), "nm {}: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| crates.iter().any(|c| l.contains(c)))
        .map(str::to_owned)
        .collect()
}

/// tracing-subscriber's `EnvFilter` links a regex engine whose Unicode tables made ~200 KiB of
/// vtpm-domain's ~300 KiB `.data.rel.ro` — relocated, hence private, in every vTPM process.
/// vtpm-domain filters its log with `Targets` instead (`vtpm_domain::log_filter`).
#[test]
fn vtpm_domain_links_no_regex_engine() {
    let bin = testkit::bin_path("vtpm-domain");
    let found = symbols_of(&bin, &["regex_automata", "regex_syntax", "12regex_automata", "12regex_syntax"]);
    assert!(
        found.is_empty(),
        "{} links a regex engine ({} symbols, e.g. {:?}): its tables are relocated into private pages of \
         every vTPM process; filter logs without regexes (vtpm_domain::log_filter)",
        bin.display(),
        found.len(),
        found.first()
    );
}
