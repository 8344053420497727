//! The host's measured-boot event log (TCG PC Client Platform Firmware Profile, "crypto
//! agile" format, as Linux exposes it in `/sys/kernel/security/tpm0/binary_bios_measurements`):
//! parsing, replay into SHA-256 PCR values, and a tenant's policy over the replayed values and
//! the individual events. See docs/eventlog.md.
//!
//! The log is untrusted input (it comes from the provider's dom0): every length is checked
//! against the bytes that remain before anything is allocated, the number of events and the
//! log's size are capped, and a log proves nothing by itself — only a replay that ends in the
//! PCR values a TPM quote signed makes its events evidence.
//!
//! ```text
//! TCG_PCClientPCREvent (first event, SHA-1 layout):
//!   u32 pcrIndex | u32 eventType (EV_NO_ACTION) | 20-byte digest | u32 eventSize | event
//!   event = "Spec ID Event03\0" | u32 platformClass | u8 minor | u8 major | u8 errata |
//!           u8 uintnSize | u32 numberOfAlgorithms | {u16 algId, u16 digestSize}* |
//!           u8 vendorInfoSize | vendorInfo
//! TCG_PCR_EVENT2 (every later event):
//!   u32 pcrIndex | u32 eventType | u32 count | {u16 algId, digest}* | u32 eventSize | event
//! ```
//! All integers are little-endian (the firmware's byte order), unlike TPM structures.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest log accepted (UEFI logs are typically 20–100 KiB; SeaBIOS's a few KiB).
pub const MAX_LOG: usize = 8 << 20;
/// Most events accepted.
pub const MAX_EVENTS: usize = 65_536;
/// Highest PCR index of a PC Client TPM.
pub const MAX_PCR: u32 = 23;

/// `TPM_ALG_SHA1`.
pub const ALG_SHA1: u16 = 0x0004;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000B;

/// `EV_NO_ACTION`: informational, never extended.
pub const EV_NO_ACTION: u32 = 0x0000_0003;

const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY: &[u8; 16] = b"StartupLocality\0";

/// Why a log was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogError {
    /// Larger than [`MAX_LOG`].
    #[error("event log is {0} bytes, more than the {MAX_LOG}-byte limit")]
    TooLarge(usize),
    /// The first event is not a TCG2 "Spec ID Event03" header.
    #[error(
        "not a crypto-agile TCG event log: the first event is not a \"Spec ID Event03\" header \
         (a SHA-1-only log of a TPM 1.2 cannot be replayed into SHA-256 PCRs)"
    )]
    NotCryptoAgile,
    /// The header lists no SHA-256 bank.
    #[error("the event log has no SHA-256 digests (its header lists algorithms {0:?})")]
    NoSha256(Vec<u16>),
    /// A length or count runs past the end.
    #[error("event log truncated or malformed at byte {offset}: {what}")]
    Malformed {
        /// Byte offset of the event (or field) that failed.
        offset: usize,
        /// What was wrong.
        what: String,
    },
    /// More than [`MAX_EVENTS`] events.
    #[error("event log has more than {MAX_EVENTS} events")]
    TooManyEvents,
}

/// One measured event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log (0 = the Spec ID header).
    pub index: usize,
    /// PCR it was extended into.
    pub pcr: u32,
    /// `eventType`.
    pub event_type: u32,
    /// The SHA-256 digest that was extended (`None` for the SHA-1 header event).
    pub sha256: Option<[u8; 32]>,
    /// The event data (at most what the log holds).
    pub data: Vec<u8>,
}

impl Event {
    /// The TCG name of the event type, or its number.
    pub fn type_name(&self) -> String {
        event_type_name(self.event_type)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event {} (PCR {}, {}", self.index, self.pcr, self.type_name())?;
        if let Some(d) = &self.sha256 {
            write!(f, ", sha256 {}", hex::encode(d))?;
        }
        write!(f, ")")
    }
}

/// The TCG name of an event type.
pub fn event_type_name(t: u32) -> String {
    let n = match t {
        0x0000_0000 => "EV_PREBOOT_CERT",
        0x0000_0001 => "EV_POST_CODE",
        0x0000_0003 => "EV_NO_ACTION",
        0x0000_0004 => "EV_SEPARATOR",
        0x0000_0005 => "EV_ACTION",
        0x0000_0006 => "EV_EVENT_TAG",
        0x0000_0007 => "EV_S_CRTM_CONTENTS",
        0x0000_0008 => "EV_S_CRTM_VERSION",
        0x0000_0009 => "EV_CPU_MICROCODE",
        0x0000_000A => "EV_PLATFORM_CONFIG_FLAGS",
        0x0000_000B => "EV_TABLE_OF_DEVICES",
        0x0000_000C => "EV_COMPACT_HASH",
        0x0000_000D => "EV_IPL",
        0x0000_000E => "EV_IPL_PARTITION_DATA",
        0x0000_000F => "EV_NONHOST_CODE",
        0x0000_0010 => "EV_NONHOST_CONFIG",
        0x0000_0011 => "EV_NONHOST_INFO",
        0x0000_0012 => "EV_OMIT_BOOT_DEVICE_EVENTS",
        0x8000_0001 => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x8000_0002 => "EV_EFI_VARIABLE_BOOT",
        0x8000_0003 => "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x8000_0004 => "EV_EFI_BOOT_SERVICES_DRIVER",
        0x8000_0005 => "EV_EFI_RUNTIME_SERVICES_DRIVER",
        0x8000_0006 => "EV_EFI_GPT_EVENT",
        0x8000_0007 => "EV_EFI_ACTION",
        0x8000_0008 => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        0x8000_0009 => "EV_EFI_HANDOFF_TABLES",
        0x8000_000A => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000_000B => "EV_EFI_HANDOFF_TABLES2",
        0x8000_000C => "EV_EFI_VARIABLE_BOOT2",
        0x8000_0010 => "EV_EFI_HCRTM_EVENT",
        0x8000_00E0 => "EV_EFI_VARIABLE_AUTHORITY",
        0x8000_00E1 => "EV_EFI_SPDM_FIRMWARE_BLOB",
        0x8000_00E2 => "EV_EFI_SPDM_FIRMWARE_CONFIG",
        _ => return format!("event type {t:#010x}"),
    };
    n.to_string()
}

/// A parsed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    /// Digest algorithms the header lists, with their sizes.
    pub algorithms: Vec<(u16, u16)>,
    /// Every event, the header first.
    pub events: Vec<Event>,
    /// The locality the TPM was started from (`StartupLocality` event), 0 if none.
    pub startup_locality: u8,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], EventLogError> {
        if self.b.len() - self.pos < n {
            return Err(EventLogError::Malformed {
                offset: self.pos,
                what: format!("{what}: needs {n} bytes, {} left", self.b.len() - self.pos),
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16, EventLogError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32, EventLogError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn done(&self) -> bool {
        self.pos == self.b.len()
    }
}

impl EventLog {
    /// Parses a crypto-agile log. Trailing zero bytes (Linux returns the log area's padding
    /// on some firmware) end the log.
    pub fn parse(bytes: &[u8]) -> Result<EventLog, EventLogError> {
        if bytes.len() > MAX_LOG {
            return Err(EventLogError::TooLarge(bytes.len()));
        }
        let mut r = Reader { b: bytes, pos: 0 };
        // The header, in the SHA-1 layout.
        let pcr = r.u32("header pcrIndex").map_err(|_| EventLogError::NotCryptoAgile)?;
        let ty = r.u32("header eventType").map_err(|_| EventLogError::NotCryptoAgile)?;
        r.take(20, "header digest").map_err(|_| EventLogError::NotCryptoAgile)?;
        let size = r.u32("header eventSize").map_err(|_| EventLogError::NotCryptoAgile)? as usize;
        let data = r.take(size, "header event").map_err(|_| EventLogError::NotCryptoAgile)?;
        if pcr != 0 || ty != EV_NO_ACTION || data.len() < 16 + 12 || &data[..16] != SPEC_ID_SIGNATURE {
            return Err(EventLogError::NotCryptoAgile);
        }
        let mut h = Reader { b: data, pos: 16 };
        h.take(4 + 4, "Spec ID platformClass..uintnSize")?;
        let n = h.u32("Spec ID numberOfAlgorithms")? as usize;
        if n == 0 || n > 16 {
            return Err(EventLogError::Malformed { offset: 0, what: format!("Spec ID lists {n} algorithms (1–16 expected)") });
        }
        let mut algorithms = Vec::with_capacity(n);
        for _ in 0..n {
            let alg = h.u16("Spec ID algorithmId")?;
            let sz = h.u16("Spec ID digestSize")?;
            if sz == 0 || sz > 64 {
                return Err(EventLogError::Malformed { offset: 0, what: format!("algorithm {alg:#06x} has digest size {sz}") });
            }
            algorithms.push((alg, sz));
        }
        if !algorithms.iter().any(|&(a, s)| a == ALG_SHA256 && s == 32) {
            return Err(EventLogError::NoSha256(algorithms.iter().map(|a| a.0).collect()));
        }
        let mut events = vec![Event { index: 0, pcr, event_type: ty, sha256: None, data: data.to_vec() }];
        let mut startup_locality = 0;
        while !r.done() {
            if r.b[r.pos..].iter().all(|&b| b == 0) {
                break;
            }
            if events.len() > MAX_EVENTS {
                return Err(EventLogError::TooManyEvents);
            }
            let at = r.pos;
            let pcr = r.u32("pcrIndex")?;
            let event_type = r.u32("eventType")?;
            if pcr > MAX_PCR && event_type != EV_NO_ACTION {
                return Err(EventLogError::Malformed { offset: at, what: format!("PCR index {pcr} (0–{MAX_PCR})") });
            }
            let count = r.u32("digest count")? as usize;
            if count == 0 || count > algorithms.len() {
                return Err(EventLogError::Malformed { offset: at, what: format!("{count} digests, header lists {}", algorithms.len()) });
            }
            let mut sha256 = None;
            for _ in 0..count {
                let alg = r.u16("digest algorithm")?;
                let Some(&(_, sz)) = algorithms.iter().find(|a| a.0 == alg) else {
                    return Err(EventLogError::Malformed { offset: at, what: format!("digest algorithm {alg:#06x} is not in the header") });
                };
                let d = r.take(sz as usize, "digest")?;
                if alg == ALG_SHA256 {
                    if sha256.is_some() {
                        return Err(EventLogError::Malformed { offset: at, what: "two SHA-256 digests".into() });
                    }
                    sha256 = Some(<[u8; 32]>::try_from(d).expect("size 32 checked in the header"));
                }
            }
            if sha256.is_none() {
                return Err(EventLogError::Malformed { offset: at, what: "event without a SHA-256 digest".into() });
            }
            let size = r.u32("eventSize")? as usize;
            let data = r.take(size, "event data")?.to_vec();
            if event_type == EV_NO_ACTION && pcr == 0 && data.len() == 17 && &data[..16] == STARTUP_LOCALITY {
                startup_locality = data[16];
            }
            events.push(Event { index: events.len(), pcr, event_type, sha256, data });
        }
        Ok(EventLog { algorithms, events, startup_locality })
    }

    /// The SHA-256 PCR values the log's events extend to, for every PCR that at least one
    /// event touches (PCR 0 starts at the startup locality, every other PCR at zero).
    pub fn replay_sha256(&self) -> BTreeMap<u32, [u8; 32]> {
        let mut pcrs: BTreeMap<u32, [u8; 32]> = BTreeMap::new();
        for e in self.measured() {
            let d = e.sha256.expect("measured events carry a SHA-256 digest");
            let v = pcrs.entry(e.pcr).or_insert_with(|| self.reset_value(e.pcr));
            let mut h = Sha256::new();
            h.update(*v);
            h.update(d);
            *v = h.finalize().into();
        }
        pcrs
    }

    /// A PCR's value before the first event: zero, but PCR 0 holds the startup locality.
    pub fn reset_value(&self, pcr: u32) -> [u8; 32] {
        let mut v = [0u8; 32];
        if pcr == 0 {
            v[31] = self.startup_locality;
        }
        v
    }

    /// The events that were extended (every event but the header and `EV_NO_ACTION`).
    pub fn measured(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(|e| e.index > 0 && e.event_type != EV_NO_ACTION)
    }
}

/// A tenant's policy over a host's event log (JSON, `docs/eventlog.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLogPolicy {
    /// Always `xvtpm-eventlog-policy-v1`.
    pub format: String,
    /// PCRs that must be in the quote and whose quoted SHA-256 value the log must replay to.
    pub replay: Vec<u32>,
    /// Allowed replayed values per PCR (any of the list); a PCR not named is not restricted.
    #[serde(default)]
    pub pcrs: BTreeMap<String, Vec<String>>,
    /// Allowed event digests per PCR: every event measured into a named PCR must carry one of
    /// these SHA-256 digests; a PCR not named is not restricted.
    #[serde(default)]
    pub events: BTreeMap<String, Vec<String>>,
}

/// The policy format string.
pub const POLICY_FORMAT: &str = "xvtpm-eventlog-policy-v1";

/// Why a policy file was refused (before any evidence is judged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event-log policy: {0}")]
pub struct PolicyError(pub String);

/// A policy checked for shape, with decoded digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPolicy {
    replay: BTreeSet<u32>,
    pcrs: BTreeMap<u32, BTreeSet<[u8; 32]>>,
    events: BTreeMap<u32, BTreeSet<[u8; 32]>>,
}

fn pcr_key(k: &str) -> Result<u32, PolicyError> {
    k.parse::<u32>()
        .ok()
        .filter(|&p| p <= MAX_PCR)
        .ok_or_else(|| PolicyError(format!("\"{k}\" is not a PCR index 0–{MAX_PCR}")))
}

fn digests(list: &[String], what: &str) -> Result<BTreeSet<[u8; 32]>, PolicyError> {
    list.iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| PolicyError(format!("{what}: \"{h}\" is not a 64-digit hex SHA-256 digest")))
        })
        .collect()
}

impl EventLogPolicy {
    /// Checks the policy's shape.
    pub fn check(&self) -> Result<CheckedPolicy, PolicyError> {
        if self.format != POLICY_FORMAT {
            return Err(PolicyError(format!("format is \"{}\", expected \"{POLICY_FORMAT}\"", self.format)));
        }
        if self.replay.is_empty() {
            return Err(PolicyError("\"replay\" names no PCR: the log would prove nothing".into()));
        }
        let replay: BTreeSet<u32> = self
            .replay
            .iter()
            .map(|&p| if p <= MAX_PCR { Ok(p) } else { Err(PolicyError(format!("replay PCR {p} is not 0–{MAX_PCR}"))) })
            .collect::<Result<_, _>>()?;
        let mut pcrs = BTreeMap::new();
        for (k, v) in &self.pcrs {
            let p = pcr_key(k)?;
            if !replay.contains(&p) {
                return Err(PolicyError(format!("\"pcrs\" restricts PCR {p}, which \"replay\" does not name (its value would not be tied to the quote)")));
            }
            pcrs.insert(p, digests(v, &format!("pcrs.{p}"))?);
        }
        let mut events = BTreeMap::new();
        for (k, v) in &self.events {
            let p = pcr_key(k)?;
            if !replay.contains(&p) {
                return Err(PolicyError(format!("\"events\" restricts PCR {p}, which \"replay\" does not name (its events would not be tied to the quote)")));
            }
            events.insert(p, digests(v, &format!("events.{p}"))?);
        }
        Ok(CheckedPolicy { replay, pcrs, events })
    }

    /// A policy that accepts exactly this log's state for `replay`: the replayed values and
    /// the digests of the events measured into those PCRs (a known-good host's log).
    pub fn from_log(log: &EventLog, replay: &[u32]) -> EventLogPolicy {
        let values = log.replay_sha256();
        let mut pcrs = BTreeMap::new();
        let mut events: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for &p in replay {
            if let Some(v) = values.get(&p) {
                pcrs.insert(p.to_string(), vec![hex::encode(v)]);
            }
        }
        for e in log.measured().filter(|e| replay.contains(&e.pcr)) {
            let d = hex::encode(e.sha256.expect("measured"));
            let list = events.entry(e.pcr.to_string()).or_default();
            if !list.contains(&d) {
                list.push(d);
            }
        }
        EventLogPolicy { format: POLICY_FORMAT.into(), replay: replay.to_vec(), pcrs, events }
    }
}

/// Why a log did not satisfy a policy against a quote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// A PCR the policy replays was not in the quote.
    #[error("PCR {0} is not in the quote's SHA-256 selection (ask for a deep quote that covers the policy's \"replay\" PCRs)")]
    NotQuoted(u32),
    /// The log does not replay to the quoted value.
    #[error("the event log does not replay to quoted PCR {pcr}: log {log}, quote {quoted}")]
    Mismatch {
        /// PCR index.
        pcr: u32,
        /// Replayed value (hex).
        log: String,
        /// Quoted value (hex).
        quoted: String,
    },
    /// A replayed value the policy does not allow.
    #[error("PCR {pcr} = {value} is not one of the policy's allowed values")]
    ValueNotAllowed {
        /// PCR index.
        pcr: u32,
        /// The value (hex).
        value: String,
    },
    /// An event the policy does not allow.
    #[error("{0} is not allowed by the policy")]
    EventNotAllowed(String),
}

/// What a successful check established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The PCRs whose quoted values the log replayed to.
    pub pcrs: BTreeMap<u32, [u8; 32]>,
    /// How many measured events fed them.
    pub events: usize,
}

/// Checks a parsed log against the SHA-256 values a verified quote signed (`quoted`: PCR →
/// value) and a policy: every `replay` PCR must be quoted and replay exactly (a PCR with no
/// event replays to its reset value), its value must be allowed, and every event measured
/// into a restricted PCR must be allowed.
pub fn check(log: &EventLog, quoted: &BTreeMap<u32, Vec<u8>>, policy: &CheckedPolicy) -> Result<Replayed, ReplayError> {
    let replayed = log.replay_sha256();
    let mut out = BTreeMap::new();
    for &p in &policy.replay {
        let q = quoted.get(&p).ok_or(ReplayError::NotQuoted(p))?;
        let v = replayed.get(&p).copied().unwrap_or_else(|| log.reset_value(p));
        if q.as_slice() != v {
            return Err(ReplayError::Mismatch { pcr: p, log: hex::encode(v), quoted: hex::encode(q) });
        }
        if let Some(allowed) = policy.pcrs.get(&p)
            && !allowed.contains(&v)
        {
            return Err(ReplayError::ValueNotAllowed { pcr: p, value: hex::encode(v) });
        }
        out.insert(p, v);
    }
    let mut n = 0;
    for e in log.measured().filter(|e| policy.replay.contains(&e.pcr)) {
        n += 1;
        if let Some(allowed) = policy.events.get(&e.pcr)
            && !allowed.contains(&e.sha256.expect("measured"))
        {
            return Err(ReplayError::EventNotAllowed(e.to_string()));
        }
    }
    Ok(Replayed { pcrs: out, events: n })
}

/// Builds a crypto-agile log (SHA-256 only) from `(pcr, event type, data)` entries, the
/// digest of each being SHA-256 of its data, as firmware does for most events. For tests and
/// tools that measure into a TPM and must describe what they measured.
pub fn build_sha256(entries: &[(u32, u32, Vec<u8>)]) -> Vec<u8> {
    let mut spec = Vec::new();
    spec.extend_from_slice(SPEC_ID_SIGNATURE);
    spec.extend_from_slice(&0u32.to_le_bytes()); // platformClass: client
    spec.extend_from_slice(&[0, 2, 0, 2]); // version 2.0, errata 0, uintnSize 2 (64-bit)
    spec.extend_from_slice(&1u32.to_le_bytes());
    spec.extend_from_slice(&ALG_SHA256.to_le_bytes());
    spec.extend_from_slice(&32u16.to_le_bytes());
    spec.push(0);
    let mut out = Vec::new();
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
    out.extend_from_slice(&[0u8; 20]);
    out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    out.extend_from_slice(&spec);
    for (pcr, ty, data) in entries {
        out.extend_from_slice(&pcr.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&ALG_SHA256.to_le_bytes());
        out.extend_from_slice(&Sha256::digest(data));
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extend(v: [u8; 32], d: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(v);
        h.update(Sha256::digest(d));
        h.finalize().into()
    }

    fn sample() -> Vec<u8> {
        build_sha256(&[
            (0, 0x8, b"SeaBIOS".to_vec()),
            (4, 0xD, b"boot loader".to_vec()),
            (4, 0xD, b"kernel".to_vec()),
            (7, 0x4, vec![0; 4]),
        ])
    }

    #[test]
    fn replays_each_touched_pcr() {
        let log = EventLog::parse(&sample()).unwrap();
        assert_eq!(log.events.len(), 5);
        let r = log.replay_sha256();
        assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![0, 4, 7]);
        assert_eq!(r[&4], extend(extend([0; 32], b"boot loader"), b"kernel"));
        assert_eq!(r[&0], extend([0; 32], b"SeaBIOS"));
    }

    #[test]
    fn startup_locality_seeds_pcr0() {
        let mut entries = vec![(0, EV_NO_ACTION, [STARTUP_LOCALITY.as_slice(), &[3]].concat())];
        entries.push((0, 0x8, b"x".to_vec()));
        let log = EventLog::parse(&build_sha256(&entries)).unwrap();
        assert_eq!(log.startup_locality, 3);
        let mut init = [0; 32];
        init[31] = 3;
        assert_eq!(log.replay_sha256()[&0], extend(init, b"x"));
    }

    #[test]
    fn every_truncation_is_refused_not_a_panic() {
        let b = sample();
        for n in 0..b.len() {
            let r = EventLog::parse(&b[..n]);
            // A cut exactly at an event boundary is a shorter, valid log.
            if let Ok(log) = r {
                assert!(log.events.len() < 5, "cut at {n}");
            }
        }
    }

    #[test]
    fn garbage_lengths_do_not_allocate() {
        let mut b = sample();
        let header_len = 32 + u32::from_le_bytes(b[28..32].try_into().unwrap()) as usize;
        // eventSize of the first EV2 event → 0xFFFF_FFF0.
        let size_at = header_len + 4 + 4 + 4 + 2 + 32;
        b[size_at..size_at + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(matches!(EventLog::parse(&b), Err(EventLogError::Malformed { .. })));
        assert_eq!(EventLog::parse(&vec![0u8; MAX_LOG + 1]), Err(EventLogError::TooLarge(MAX_LOG + 1)));
        assert_eq!(EventLog::parse(b"\x01\x00\x00\x00"), Err(EventLogError::NotCryptoAgile));
    }

    fn quoted(log: &EventLog) -> BTreeMap<u32, Vec<u8>> {
        let mut q: BTreeMap<u32, Vec<u8>> = (0..8).map(|p| (p, vec![0u8; 32])).collect();
        for (p, v) in log.replay_sha256() {
            q.insert(p, v.to_vec());
        }
        q
    }

    #[test]
    fn policy_from_a_good_log_accepts_it_and_names_what_differs() {
        let log = EventLog::parse(&sample()).unwrap();
        let policy = EventLogPolicy::from_log(&log, &[0, 1, 2, 3, 4, 5, 6, 7]);
        let checked = policy.check().unwrap();
        let ok = check(&log, &quoted(&log), &checked).unwrap();
        assert_eq!(ok.events, 4);
        assert_eq!(ok.pcrs.len(), 8);

        // The quote says something else for PCR 4: the log is not what the TPM measured.
        let mut q = quoted(&log);
        q.get_mut(&4).unwrap()[0] ^= 1;
        assert!(matches!(check(&log, &q, &checked), Err(ReplayError::Mismatch { pcr: 4, .. })));

        // Another kernel: log and quote agree, the policy refuses and names the event.
        let other = EventLog::parse(&build_sha256(&[
            (0, 0x8, b"SeaBIOS".to_vec()),
            (4, 0xD, b"boot loader".to_vec()),
            (4, 0xD, b"evil kernel".to_vec()),
            (7, 0x4, vec![0; 4]),
        ]))
        .unwrap();
        let e = check(&other, &quoted(&other), &checked).unwrap_err();
        assert!(matches!(e, ReplayError::ValueNotAllowed { pcr: 4, .. }), "{e}");
        let mut events_only = policy.clone();
        events_only.pcrs.clear();
        let e = check(&other, &quoted(&other), &events_only.check().unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("event 3 (PCR 4, EV_IPL"), "{e}");

        // A quote without the replayed PCRs proves nothing about them.
        let mut q = quoted(&log);
        q.remove(&7);
        assert_eq!(check(&log, &q, &checked), Err(ReplayError::NotQuoted(7)));
    }

    #[test]
    fn policy_shape_is_checked_before_use() {
        let p = |j: &str| serde_json::from_str::<EventLogPolicy>(j).map_err(|e| e.to_string()).and_then(|p| p.check().map_err(|e| e.to_string()));
        assert!(p(r#"{"format":"xvtpm-eventlog-policy-v1","replay":[]}"#).unwrap_err().contains("names no PCR"));
        assert!(p(r#"{"format":"v0","replay":[0]}"#).unwrap_err().contains("expected"));
        assert!(p(r#"{"format":"xvtpm-eventlog-policy-v1","replay":[0],"pcrs":{"4":[]}}"#).unwrap_err().contains("does not name"));
        assert!(p(r#"{"format":"xvtpm-eventlog-policy-v1","replay":[0],"pcrs":{"0":["zz"]}}"#).unwrap_err().contains("not a 64-digit"));
        assert!(p(r#"{"format":"xvtpm-eventlog-policy-v1","replay":[0],"extra":1}"#).unwrap_err().contains("unknown field"));
        assert!(p(r#"{"format":"xvtpm-eventlog-policy-v1","replay":[0,7]}"#).is_ok());
    }
}
