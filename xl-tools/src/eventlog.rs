//! `xl-vtpm eventlog …`: the host's measured-boot event log for tenants (docs/eventlog.md).
//! The provider exports the log dom0's kernel exposes; a tenant inspects it, writes a policy
//! from a known-good host, and `xl-vtpm verify --event-log --event-log-policy` replays it
//! against the host PCRs of a verified deep quote. Nothing here talks to the manager.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vtpm_attest::eventlog::{self, EventLog, EventLogPolicy};

use crate::exit::{Cause, CliError, USAGE};
use crate::guest::{self, NOT_VERIFIED};

/// Where Linux exposes the firmware's log of the first TPM (securityfs).
pub const DEFAULT_SOURCE: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";

/// `xl-vtpm eventlog` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum EventlogCmd {
    /// Provider, in dom0: copy the host's measured-boot event log for tenants (checked that it
    /// parses; securityfs must be mounted: `mount -t securityfs none /sys/kernel/security`).
    Export {
        /// Output file (the binary log, unchanged).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The log to export.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_SOURCE)]
        source: PathBuf,
    },
    /// List a log's events and the SHA-256 PCR values they replay to.
    Show {
        /// The binary log.
        file: PathBuf,
    },
    /// Write a policy that accepts exactly this (known-good) log's state of the given PCRs.
    Policy {
        /// The binary log of a host in a state you trust.
        file: PathBuf,
        /// PCRs the quote must cover and the log must replay to, e.g. 0-7.
        #[arg(long, default_value = "0-7")]
        replay: String,
        /// Output file (JSON, xvtpm-eventlog-policy-v1).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// Reads and parses a log named on the command line (size-capped before reading).
pub fn read_log(path: &Path, flag: &str) -> Result<EventLog, CliError> {
    let bytes = guest::read_capped(path, eventlog::MAX_LOG as u64, flag)?;
    EventLog::parse(&bytes).map_err(|e| CliError::caused(USAGE, format!("{flag} {}", path.display()), e))
}

/// Reads and parses a guest's IMA log (`binary_runtime_measurements`), size-capped.
pub fn read_ima_log(path: &Path, flag: &str) -> Result<vtpm_attest::ima::ImaLog, CliError> {
    let bytes = guest::read_capped(path, vtpm_attest::ima::MAX_LOG as u64, flag)?;
    vtpm_attest::ima::ImaLog::parse(&bytes).map_err(|e| CliError::caused(USAGE, format!("{flag} {}", path.display()), e))
}

/// Reads a policy file and checks its shape.
pub fn read_policy(path: &Path, flag: &str) -> Result<eventlog::CheckedPolicy, CliError> {
    let bad = |why: Cause| CliError::caused(USAGE, format!("{flag} {}", path.display()), why);
    let p: EventLogPolicy = serde_json::from_slice(&guest::read_capped(path, guest::MAX_SMALL_INPUT, flag)?)
        .map_err(|e| bad(CliError::caused(USAGE, "not an event-log policy", e).into()))?;
    p.check().map_err(|e| bad(e.into()))
}

/// Runs an `eventlog` subcommand.
pub fn run(cmd: &EventlogCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        EventlogCmd::Export { out, source } => {
            let bytes = guest::read_capped(source, eventlog::MAX_LOG as u64, "--source").map_err(|e| {
                if source == Path::new(DEFAULT_SOURCE) && !source.exists() {
                    CliError::new(
                        USAGE,
                        format!(
                            "{DEFAULT_SOURCE} does not exist: mount securityfs (`mount -t securityfs none /sys/kernel/security`); \
                             if it still does not appear, the firmware gave the kernel no TPM event log"
                        ),
                    )
                } else {
                    e
                }
            })?;
            let log = EventLog::parse(&bytes).map_err(|e| CliError::caused(USAGE, format!("--source {}", source.display()), e))?;
            xvtpm_fsutil::write_atomic(out, &bytes, 0o644).map_err(|e| CliError::caused(1, format!("cannot write {}", out.display()), e))?;
            if json {
                println!("{}", serde_json::json!({"out": out, "events": log.events.len(), "bytes": bytes.len()}));
            } else {
                println!("wrote the event log ({} events, {} bytes) to {}", log.events.len(), bytes.len(), out.display());
            }
        }
        EventlogCmd::Show { file } => {
            let log = read_log(file, "FILE")?;
            let pcrs: BTreeMap<String, String> = log.replay_sha256().iter().map(|(p, v)| (p.to_string(), hex::encode(v))).collect();
            if json {
                let events: Vec<_> = log
                    .events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "index": e.index, "pcr": e.pcr, "type": e.type_name(),
                            "sha256": e.sha256.map(hex::encode), "data_len": e.data.len(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "schema": "xvtpm-eventlog-v1", "startup_locality": log.startup_locality,
                        "events": events, "replayed_sha256": pcrs,
                    }))
                    .expect("serialisable")
                );
            } else {
                for e in &log.events {
                    println!("{e}");
                }
                for (p, v) in &pcrs {
                    println!("PCR {p:>2} sha256 {v}");
                }
            }
        }
        EventlogCmd::Policy { file, replay, out } => {
            let log = read_log(file, "FILE")?;
            let replay: Vec<u32> = guest::parse_pcr_list(replay, "--replay")?.into_iter().map(u32::from).collect();
            let policy = EventLogPolicy::from_log(&log, &replay);
            let text = serde_json::to_string_pretty(&policy).expect("serialisable") + "\n";
            xvtpm_fsutil::write_atomic(out, text.as_bytes(), 0o644).map_err(|e| CliError::caused(1, format!("cannot write {}", out.display()), e))?;
            if !json {
                println!(
                    "wrote an event-log policy for PCRs {replay:?} ({} event digests) to {}",
                    policy.events.values().map(Vec::len).sum::<usize>(),
                    out.display()
                );
            }
        }
    }
    Ok(())
}

/// The SHA-256 host PCR values a verified quote signed, by index.
pub fn quoted_sha256(host: &vtpm_proto::evidence::HostPcrs) -> BTreeMap<u32, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut values = host.values.iter();
    for bank in &host.selection {
        for i in bank.indices() {
            let Some(v) = values.next() else { return out };
            if bank.hash_alg == eventlog::ALG_SHA256 {
                out.insert(i, v.clone());
            }
        }
    }
    out
}

/// The SHA-256 vPCR values a verified deep quote's leaf carries, by index (none for another bank).
pub fn quoted_vpcrs(leaf: &vtpm_proto::evidence::Leaf) -> BTreeMap<u32, Vec<u8>> {
    if leaf.vpcr_selection.hash_alg != eventlog::ALG_SHA256 {
        return BTreeMap::new();
    }
    leaf.vpcr_selection.pcrs.iter().map(|&p| u32::from(p)).zip(leaf.vpcr_values.iter().cloned()).collect()
}

/// `verify`'s guest event-log step: the guest firmware's log (read in the guest from
/// `/sys/kernel/security/tpm0/binary_bios_measurements`) replays to the vPCRs the deep quote
/// carries and satisfies the policy.
pub fn check_guest_against_quote(
    log: &EventLog,
    policy: &eventlog::CheckedPolicy,
    leaf: &vtpm_proto::evidence::Leaf,
) -> Result<eventlog::Replayed, CliError> {
    eventlog::check(log, &quoted_vpcrs(leaf), policy)
        .map_err(|e| CliError::caused(NOT_VERIFIED, "evidence did not verify: guest event log (vPCRs)", e))
}

/// `verify`'s IMA step: the guest's IMA log replays to the vPCRs the deep quote carries.
pub fn check_ima_against_quote(log: &vtpm_attest::ima::ImaLog, leaf: &vtpm_proto::evidence::Leaf) -> Result<BTreeMap<u32, [u8; 32]>, CliError> {
    log.check(&quoted_vpcrs(leaf))
        .map_err(|e| CliError::new(NOT_VERIFIED, format!("evidence did not verify: guest IMA log: {e}")))
}

/// `verify`'s event-log step: the log replays to the quoted host PCRs and satisfies the policy.
pub fn check_against_quote(
    log: &EventLog,
    policy: &eventlog::CheckedPolicy,
    host: &vtpm_proto::evidence::HostPcrs,
) -> Result<eventlog::Replayed, CliError> {
    eventlog::check(log, &quoted_sha256(host), policy)
        .map_err(|e| CliError::caused(NOT_VERIFIED, "evidence did not verify: host event log", e))
}
