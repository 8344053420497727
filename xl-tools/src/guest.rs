//! Tenant-side commands: ask a vTPM for a deep quote through an ordinary TPM
//! device (`/dev/tpm0`, `/dev/tpmrm0`) or an swtpm socket, and verify a
//! bundle offline with [`vtpm_attest::verify`], trusting nothing in it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use vtpm_proto::deepquote_cmd::{self, DeepQuoteCommand};
use vtpm_proto::evidence::{Bundle, TPM_ALG_SHA256};
use vtpm_attest::verify::{Expectations, PcrPolicy, Verified};

use crate::exit::{Cause, CliError, FAILURE, USAGE};

/// Exit code: the evidence did not verify.
pub const NOT_VERIFIED: i32 = 7;

/// Where TPM commands go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `swtpm:host=H,port=P` (the data channel).
    Swtpm(String, u16),
    /// `device:/dev/tpm0` or a bare device path.
    Device(String),
}

impl Target {
    /// Parses a TCTI-style string.
    pub fn parse(s: &str) -> Result<Target, CliError> {
        let bad = |why: &str| CliError::new(USAGE, format!("--tcti {s:?}: {why} (use swtpm:host=127.0.0.1,port=2321 or device:/dev/tpm0)"));
        if let Some(rest) = s.strip_prefix("swtpm:") {
            let (mut host, mut port) = ("127.0.0.1".to_string(), None);
            for kv in rest.split(',').filter(|x| !x.is_empty()) {
                match kv.split_once('=') {
                    Some(("host", h)) => host = h.to_string(),
                    Some(("port", p)) => port = Some(p.parse::<u16>().map_err(|_| bad("bad port"))?),
                    _ => return Err(bad(&format!("unknown option {kv:?}"))),
                }
            }
            return Ok(Target::Swtpm(host, port.ok_or_else(|| bad("port= missing"))?));
        }
        if let Some(p) = s.strip_prefix("device:") {
            return Ok(Target::Device(p.to_string()));
        }
        if s.starts_with('/') {
            return Ok(Target::Device(s.to_string()));
        }
        Err(bad("unknown TCTI"))
    }

    /// Sends one command and returns the response.
    pub fn transact(&self, cmd: &[u8]) -> Result<Vec<u8>, CliError> {
        let io = |e: std::io::Error| CliError::caused(FAILURE, format!("TPM I/O ({self:?})"), e);
        match self {
            Target::Swtpm(host, port) => {
                let mut s = std::net::TcpStream::connect((host.as_str(), *port)).map_err(io)?;
                s.set_read_timeout(Some(Duration::from_secs(120))).map_err(io)?;
                exchange(&mut s, cmd, &format!("{self:?}"))
            }
            Target::Device(path) => {
                let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
                f.write_all(cmd).map_err(io)?;
                let mut buf = vec![0u8; 8192];
                let n = f.read(&mut buf).map_err(io)?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }
}

/// One command over a stream transport (swtpm's data channel: TCP or a Unix socket): writes
/// `cmd`, reads the response its header announces (10 bytes to 64 KiB). `what` names the
/// transport in an I/O error.
pub fn exchange<S: Read + Write>(s: &mut S, cmd: &[u8], what: &str) -> Result<Vec<u8>, CliError> {
    let io = |e: std::io::Error| CliError::caused(FAILURE, format!("TPM I/O ({what})"), e);
    s.write_all(cmd).map_err(io)?;
    let mut hdr = [0u8; 10];
    s.read_exact(&mut hdr).map_err(io)?;
    let n = u32::from_be_bytes(hdr[2..6].try_into().expect("4 bytes")) as usize;
    if !(10..=65536).contains(&n) {
        return Err(CliError::new(FAILURE, format!("TPM answered with an impossible size {n}")));
    }
    let mut rsp = hdr.to_vec();
    rsp.resize(n, 0);
    s.read_exact(&mut rsp[10..]).map_err(io)?;
    Ok(rsp)
}

/// Parses "0,2,4,7" or "0-7,16" into PCR indices (0..=23), naming `flag` on error.
pub fn parse_pcr_list(s: &str, flag: &str) -> Result<Vec<u8>, CliError> {
    let bad = |part: &str| CliError::new(USAGE, format!("{flag} {s:?}: {part:?} is not a PCR index or range within 0..=23 (e.g. 0,2,4,7 or 0-7)"));
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: u8 = a.trim().parse().map_err(|_| bad(part))?;
        let b: u8 = b.trim().parse().map_err(|_| bad(part))?;
        if a > b || b > 23 {
            return Err(bad(part));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(CliError::new(USAGE, format!("{flag}: give at least one PCR (e.g. 0-7)")));
    }
    Ok(out)
}

/// Parses a hex argument, naming `flag`.
pub fn parse_hex(s: &str, flag: &str) -> Result<Vec<u8>, CliError> {
    hex::decode(s.trim()).map_err(|e| CliError::caused(USAGE, format!("{flag}: not hex"), e))
}

/// Sends the deep-quote vendor command and returns the bundle bytes.
pub fn deep_quote(target: &Target, cmd: &DeepQuoteCommand) -> Result<Vec<u8>, CliError> {
    let rsp = target.transact(&cmd.encode())?;
    deepquote_cmd::parse_response(&rsp).map_err(|rc| {
        let hint = match rc {
            deepquote_cmd::rc::RETRY => " (the manager is busy or restarting: retry)",
            deepquote_cmd::rc::NO_RESULT => " (the vTPM could not get evidence from its manager)",
            deepquote_cmd::rc::NONCE => " (--nonce is longer than 64 bytes)",
            deepquote_cmd::rc::VPCRS => " (bad --vpcrs)",
            deepquote_cmd::rc::HOST_PCRS => " (bad --host-pcrs)",
            _ => "",
        };
        CliError::new(FAILURE, format!("the vTPM answered the deep quote with TPM error {rc:#x}{hint}"))
    })
}

/// The largest evidence bundle `verify` reads: a bundle is ~1 KiB plus 32 bytes per Merkle level.
pub const MAX_EVIDENCE: u64 = 1 << 20;
/// The largest key or policy file the verifier reads.
pub const MAX_SMALL_INPUT: u64 = 64 << 10;

/// Reads at most `cap` bytes of a file the user named (`what` names it in errors): a larger
/// input (or a device such as /dev/zero) is refused before it is read into memory.
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let bad = |why: Cause| CliError::caused(USAGE, format!("{what} {}", path.display()), why);
    let f = std::fs::File::open(path).map_err(|e| bad(e.into()))?;
    let mut buf = Vec::new();
    f.take(cap + 1).read_to_end(&mut buf).map_err(|e| bad(e.into()))?;
    if buf.len() as u64 > cap {
        return Err(bad(format!("larger than {cap} bytes; this is not the file you meant").into()));
    }
    Ok(buf)
}

/// Reads a file that holds bytes either raw or as hex text.
pub fn read_bytes_or_hex(path: &Path, flag: &str) -> Result<Vec<u8>, CliError> {
    let raw = read_capped(path, MAX_SMALL_INPUT, flag)?;
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim();
    if !t.is_empty() && t.len().is_multiple_of(2) && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(hex::decode(t).expect("checked hex"));
    }
    Ok(raw)
}

/// Reads a PCR policy file: `{"hash_alg": "sha256", "pcrs": {"0": "hex", ...}}`
/// or just `{"0": "hex", ...}` (SHA-256).
pub fn read_policy(path: &Path, flag: &str) -> Result<PcrPolicy, CliError> {
    let bad = |why: Cause| CliError::caused(USAGE, format!("{flag} {}", path.display()), why);
    let v: serde_json::Value = serde_json::from_slice(&read_capped(path, MAX_SMALL_INPUT, flag)?).map_err(|e| bad(CliError::caused(USAGE, "not JSON", e).into()))?;
    let hash_alg = match v.get("hash_alg").and_then(|x| x.as_str()).unwrap_or("sha256") {
        "sha1" => 0x0004,
        "sha256" => TPM_ALG_SHA256,
        "sha384" => 0x000C,
        "sha512" => 0x000D,
        other => return Err(bad(format!("hash_alg {other:?}: use sha1, sha256, sha384 or sha512").into())),
    };
    let map = v.get("pcrs").unwrap_or(&v).as_object().ok_or_else(|| bad("expected an object of PCR index → hex value".into()))?;
    let mut values = BTreeMap::new();
    for (k, val) in map {
        if k == "hash_alg" {
            continue;
        }
        let idx: u32 = k.parse().ok().filter(|i| *i < 24).ok_or_else(|| bad(format!("key {k:?} is not a PCR index 0..=23").into()))?;
        let hexs = val.as_str().ok_or_else(|| bad(format!("PCR {k}: value must be a hex string").into()))?;
        values.insert(idx, hex::decode(hexs).map_err(|e| bad(CliError::caused(USAGE, format!("PCR {k}: not hex"), e).into()))?);
    }
    Ok(PcrPolicy { hash_alg, values })
}

/// Decodes and verifies a bundle.
pub fn verify_bytes(bytes: &[u8], expected: &Expectations) -> Result<Verified, CliError> {
    let bundle = Bundle::decode(bytes).map_err(|e| CliError::caused(NOT_VERIFIED, "evidence does not decode", e))?;
    vtpm_attest::verify::verify(&bundle, expected).map_err(|e| CliError::caused(NOT_VERIFIED, "evidence did not verify", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(Target::parse("swtpm:host=127.0.0.1,port=2321").unwrap(), Target::Swtpm("127.0.0.1".into(), 2321));
        assert_eq!(Target::parse("swtpm:port=5").unwrap(), Target::Swtpm("127.0.0.1".into(), 5));
        assert_eq!(Target::parse("device:/dev/tpm0").unwrap(), Target::Device("/dev/tpm0".into()));
        assert_eq!(Target::parse("/dev/tpmrm0").unwrap(), Target::Device("/dev/tpmrm0".into()));
        for bad in ["mssim:port=1", "swtpm:host=x", "swtpm:port=99999", "swtpm:bogus=1"] {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.text().contains("--tcti"), "{}", e.text());
        }
    }

    #[test]
    fn pcr_lists() {
        assert_eq!(parse_pcr_list("0-3,16", "--vpcrs").unwrap(), vec![0, 1, 2, 3, 16]);
        for bad in ["", "24", "x", "5-2"] {
            assert!(parse_pcr_list(bad, "--vpcrs").unwrap_err().text().contains("--vpcrs"));
        }
    }

    #[test]
    fn garbage_bundles_do_not_verify() {
        let e = Expectations::new(vec![1], vec![2]);
        for b in [&b""[..], b"XVDQ", &[0u8; 100][..]] {
            assert_eq!(verify_bytes(b, &e).unwrap_err().code, NOT_VERIFIED);
        }
    }
}
