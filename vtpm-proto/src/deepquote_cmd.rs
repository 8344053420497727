//! The deep-quote vendor command a guest sends through its ordinary TPM
//! device, and the `TPM2_GetCapability` patch that advertises it.
//!
//! ```text
//! command  (tag TPM_ST_NO_SESSIONS 0x8001, code TPM2_CC_XVTPM_DEEP_QUOTE 0x20000100)
//!   TPM2B   nonce                 u16 k ‖ k bytes, k ≤ 64
//!   TPML_PCR_SELECTION vpcrs      exactly one bank; the vTPM reads these vPCRs itself
//!   TPML_PCR_SELECTION host_pcrs  exactly one bank, SHA-256
//!   UINT32  flags                 bound into the leaf, not interpreted
//! response (tag 0x8001)
//!   rc == 0: UINT32 len ‖ evidence bundle (see docs/deep-quote.md)
//! ```
//!
//! The code has the TPM 2.0 vendor bit (bit 29) set, so it can never clash
//! with a TCG command. Linux's `/dev/tpmrm0` forwards only commands the TPM
//! lists in `TPM_CAP_COMMANDS`, sized by `TPM_PT_TOTAL_COMMANDS`; the vTPM
//! therefore patches those two answers from libtpms ([`patch_getcap_response`]).

use crate::evidence::PcrSelection;
use tpm_wire::{TPM2_CC_GET_CAPABILITY, TPM2_ST_NO_SESSIONS};

/// The vendor command code (TPM_CC with the V bit, index 0x100).
pub const TPM2_CC_XVTPM_DEEP_QUOTE: u32 = 0x2000_0100;
/// `TPMA_CC` of the command: commandIndex 0x0100, V (bit 29) set, no handles.
pub const TPMA_CC_DEEP_QUOTE: u32 = 0x2000_0100;

pub use tpm_wire::{
    TPM2_CAP_COMMANDS as TPM_CAP_COMMANDS, TPM2_CAP_TPM_PROPERTIES as TPM_CAP_TPM_PROPERTIES,
    TPM2_PT_TOTAL_COMMANDS as TPM_PT_TOTAL_COMMANDS, TPM2_PT_VENDOR_COMMANDS as TPM_PT_VENDOR_COMMANDS,
};

/// Parameter error codes (TPM_RC_VALUE/SIZE with the parameter number), so
/// a guest learns which field is wrong.
pub mod rc {
    /// Nonce too long.
    pub const NONCE: u32 = 0x0D5 | 0x040 | (1 << 8);
    /// vPCR selection bad (empty, several banks, unknown bank, index ≥ 24).
    pub const VPCRS: u32 = 0x084 | 0x040 | (2 << 8);
    /// Host PCR selection bad (not exactly one SHA-256 bank, empty, ≥ 24).
    pub const HOST_PCRS: u32 = 0x084 | 0x040 | (3 << 8);
    /// Missing or trailing bytes.
    pub const SIZE: u32 = 0x095;
    /// The manager could not produce evidence (it refused, or its reply made no sense).
    pub const NO_RESULT: u32 = 0x154;
    /// The manager is busy, or unreachable for now (down or restarting): retry.
    pub const RETRY: u32 = 0x922;
}

/// A parsed deep-quote command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeepQuoteCommand {
    /// Caller nonce (≤ 64 bytes).
    pub nonce: Vec<u8>,
    /// vPCR bank.
    pub vpcr_alg: u16,
    /// vPCR indices, ascending.
    pub vpcrs: Vec<u8>,
    /// Host PCR indices (SHA-256 bank), ascending.
    pub host_pcrs: Vec<u8>,
    /// Flags.
    pub flags: u32,
}

fn bitmap(pcrs: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 3];
    for &p in pcrs {
        m[usize::from(p / 8)] |= 1 << (p % 8);
    }
    m
}

/// One-bank TPML_PCR_SELECTION bytes.
pub fn selection_bytes(alg: u16, pcrs: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&alg.to_be_bytes());
    out.push(3);
    out.extend_from_slice(&bitmap(pcrs));
    out
}

/// The one-bank [`PcrSelection`] for SHA-256 PCR indices.
pub fn sha256_selection(pcrs: &[u8]) -> PcrSelection {
    PcrSelection { hash_alg: crate::evidence::TPM_ALG_SHA256, select: bitmap(pcrs) }
}

struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// One-bank selection → (alg, ascending indices < 24), None if malformed.
    fn selection(&mut self) -> Option<Result<(u16, Vec<u8>), ()>> {
        let count = self.u32()?;
        if count != 1 {
            return Some(Err(()));
        }
        let alg = self.u16()?;
        let n = usize::from(self.u8()?);
        let map = self.take(n)?;
        let mut idx = vec![];
        for (i, byte) in map.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let p = i * 8 + bit;
                    if p >= 24 {
                        return Some(Err(()));
                    }
                    idx.push(p as u8);
                }
            }
        }
        if idx.is_empty() {
            return Some(Err(()));
        }
        Some(Ok((alg, idx)))
    }
}

impl DeepQuoteCommand {
    /// Encodes the full command packet.
    pub fn encode(&self) -> Vec<u8> {
        tpm_wire::Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_XVTPM_DEEP_QUOTE)
            .u16(self.nonce.len() as u16)
            .bytes(&self.nonce)
            .bytes(&selection_bytes(self.vpcr_alg, &self.vpcrs))
            .bytes(&selection_bytes(crate::evidence::TPM_ALG_SHA256, &self.host_pcrs))
            .u32(self.flags)
            .finish()
    }

    /// Parses a command packet whose framing was already checked; returns
    /// the TPM response code to answer with on error.
    pub fn parse(packet: &[u8]) -> Result<DeepQuoteCommand, u32> {
        let mut c = Cur { b: packet, at: 10 };
        let n = usize::from(c.u16().ok_or(rc::SIZE)?);
        if n > crate::evidence::MAX_NONCE {
            return Err(rc::NONCE);
        }
        let nonce = c.take(n).ok_or(rc::SIZE)?.to_vec();
        let (vpcr_alg, vpcrs) = c.selection().ok_or(rc::SIZE)?.map_err(|_| rc::VPCRS)?;
        if crate::evidence::digest_size(vpcr_alg).is_none() {
            return Err(rc::VPCRS);
        }
        let (host_alg, host_pcrs) = c.selection().ok_or(rc::SIZE)?.map_err(|_| rc::HOST_PCRS)?;
        if host_alg != crate::evidence::TPM_ALG_SHA256 {
            return Err(rc::HOST_PCRS);
        }
        let flags = c.u32().ok_or(rc::SIZE)?;
        if c.at != packet.len() {
            return Err(rc::SIZE);
        }
        Ok(DeepQuoteCommand { nonce, vpcr_alg, vpcrs, host_pcrs, flags })
    }
}

/// The success response carrying `bundle`.
pub fn response(bundle: &[u8]) -> Vec<u8> {
    let mut r = TPM2_ST_NO_SESSIONS.to_be_bytes().to_vec();
    r.extend_from_slice(&[0; 8]); // size (below), TPM_RC_SUCCESS
    r.extend_from_slice(&(bundle.len() as u32).to_be_bytes());
    r.extend_from_slice(bundle);
    let n = r.len() as u32;
    r[2..6].copy_from_slice(&n.to_be_bytes());
    r
}

/// Extracts the bundle from a response; `Err(rc)` for an error response.
pub fn parse_response(rsp: &[u8]) -> Result<Vec<u8>, u32> {
    let hdr = tpm_wire::peek_header(rsp).ok_or(rc::SIZE)?;
    if hdr.code != 0 {
        return Err(hdr.code);
    }
    let mut c = Cur { b: rsp, at: 10 };
    let n = c.u32().ok_or(rc::SIZE)? as usize;
    let b = c.take(n).ok_or(rc::SIZE)?;
    if c.at != rsp.len() {
        return Err(rc::SIZE);
    }
    Ok(b.to_vec())
}

/// Given a `TPM2_GetCapability` command and libtpms' successful response,
/// returns a patched response that also lists the deep-quote command (in
/// `TPM_CAP_COMMANDS`) and counts it (in `TPM_PT_TOTAL_COMMANDS` and
/// `TPM_PT_VENDOR_COMMANDS`). `None` = leave the response as it is.
pub fn patch_getcap_response(cmd: &[u8], rsp: &[u8]) -> Option<Vec<u8>> {
    let h = tpm_wire::peek_header(cmd)?;
    if h.code != TPM2_CC_GET_CAPABILITY || cmd.len() != 22 || tpm_wire::response_code(rsp)? != 0 {
        return None;
    }
    let mut c = Cur { b: cmd, at: 10 };
    let (cap, property, count) = (c.u32()?, c.u32()?, c.u32()?);
    // Response: header(10) ‖ moreData(1) ‖ capability(4) ‖ list count(4) ‖ entries.
    let mut r = Cur { b: rsp, at: 10 };
    let more = r.u8()?;
    if r.u32()? != cap {
        return None;
    }
    let n = r.u32()? as usize;
    match cap {
        TPM_CAP_COMMANDS => {
            let entries = r.take(n.checked_mul(4)?)?;
            if more != 0 || n as u32 >= count || property > TPM2_CC_XVTPM_DEEP_QUOTE {
                return None;
            }
            if entries.chunks(4).any(|e| u32::from_be_bytes([e[0], e[1], e[2], e[3]]) == TPMA_CC_DEEP_QUOTE) {
                return None;
            }
            let mut out = rsp[..r.at].to_vec();
            out.extend_from_slice(&TPMA_CC_DEEP_QUOTE.to_be_bytes());
            out.extend_from_slice(&rsp[r.at..]);
            let cnt = (n as u32 + 1).to_be_bytes();
            out[15..19].copy_from_slice(&cnt);
            let size = out.len() as u32;
            out[2..6].copy_from_slice(&size.to_be_bytes());
            Some(out)
        }
        TPM_CAP_TPM_PROPERTIES => {
            let mut out = rsp.to_vec();
            let mut changed = false;
            for i in 0..n {
                let at = 19 + i * 8;
                let e = rsp.get(at..at + 8)?;
                let prop = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
                if prop == TPM_PT_TOTAL_COMMANDS || prop == TPM_PT_VENDOR_COMMANDS {
                    let v = u32::from_be_bytes([e[4], e[5], e[6], e[7]]).saturating_add(1);
                    out[at + 4..at + 8].copy_from_slice(&v.to_be_bytes());
                    changed = true;
                }
            }
            changed.then_some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeepQuoteCommand {
        DeepQuoteCommand { nonce: vec![7; 32], vpcr_alg: 0x000B, vpcrs: vec![0, 1, 16], host_pcrs: vec![0, 7], flags: 5 }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let p = c.encode();
        tpm_wire::parse_command(&p, tpm_wire::Family::Tpm2, 4096).unwrap();
        assert_eq!(DeepQuoteCommand::parse(&p), Ok(c));
    }

    #[test]
    fn bad_fields_name_the_parameter() {
        let mut c = sample();
        c.nonce = vec![0; 65];
        assert_eq!(DeepQuoteCommand::parse(&c.encode()), Err(rc::NONCE));
        let mut c = sample();
        c.vpcr_alg = 0x1234;
        assert_eq!(DeepQuoteCommand::parse(&c.encode()), Err(rc::VPCRS));
        let mut c = sample();
        c.host_pcrs = vec![];
        assert_eq!(DeepQuoteCommand::parse(&c.encode()), Err(rc::HOST_PCRS));
        let p = sample().encode();
        for len in 10..p.len() {
            assert!(DeepQuoteCommand::parse(&p[..len]).is_err(), "truncated at {len} accepted");
        }
        let mut long = p.clone();
        long.push(0);
        assert_eq!(DeepQuoteCommand::parse(&long), Err(rc::SIZE));
    }

    #[test]
    fn response_round_trip() {
        assert_eq!(parse_response(&response(b"bundle")), Ok(b"bundle".to_vec()));
        assert_eq!(parse_response(&tpm_wire::error_response(tpm_wire::Family::Tpm2, rc::RETRY)), Err(rc::RETRY));
    }

    fn getcap(cap: u32, prop: u32, count: u32) -> Vec<u8> {
        let mut c = vec![0x80, 0x01, 0, 0, 0, 22, 0, 0, 0x01, 0x7A];
        for v in [cap, prop, count] {
            c.extend_from_slice(&v.to_be_bytes());
        }
        c
    }

    fn cap_rsp(more: u8, cap: u32, entries: &[u32]) -> Vec<u8> {
        let mut r = vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, more];
        r.extend_from_slice(&cap.to_be_bytes());
        r.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for e in entries {
            r.extend_from_slice(&e.to_be_bytes());
        }
        let n = r.len() as u32;
        r[2..6].copy_from_slice(&n.to_be_bytes());
        r
    }

    #[test]
    fn command_list_gains_the_vendor_command_at_its_end() {
        let cmd = getcap(TPM_CAP_COMMANDS, 0x11f, 200);
        let rsp = cap_rsp(0, TPM_CAP_COMMANDS, &[0x0000_011f, 0x0000_0120]);
        let p = patch_getcap_response(&cmd, &rsp).unwrap();
        assert_eq!(p, cap_rsp(0, TPM_CAP_COMMANDS, &[0x0000_011f, 0x0000_0120, TPMA_CC_DEEP_QUOTE]));
        // Not when more data follows, or the caller asked for exactly what it got.
        assert!(patch_getcap_response(&cmd, &cap_rsp(1, TPM_CAP_COMMANDS, &[0x11f])).is_none());
        assert!(patch_getcap_response(&getcap(TPM_CAP_COMMANDS, 0x11f, 2), &rsp).is_none());
        // Other capabilities are left alone.
        assert!(patch_getcap_response(&getcap(0, 0, 10), &cap_rsp(0, 0, &[])).is_none());
    }

    #[test]
    fn command_counts_are_incremented() {
        let cmd = getcap(TPM_CAP_TPM_PROPERTIES, TPM_PT_TOTAL_COMMANDS, 1);
        let mut rsp = vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        rsp.extend_from_slice(&TPM_CAP_TPM_PROPERTIES.to_be_bytes());
        rsp.extend_from_slice(&1u32.to_be_bytes());
        rsp.extend_from_slice(&TPM_PT_TOTAL_COMMANDS.to_be_bytes());
        rsp.extend_from_slice(&110u32.to_be_bytes());
        let n = rsp.len() as u32;
        rsp[2..6].copy_from_slice(&n.to_be_bytes());
        let p = patch_getcap_response(&cmd, &rsp).unwrap();
        assert_eq!(&p[23..27], &111u32.to_be_bytes());
    }
}
