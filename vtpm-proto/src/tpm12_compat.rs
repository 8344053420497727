//! A TPM 1.2 face for a TPM 2.0 vTPM, just wide enough for stock Linux
//! `xen-tpmfront`.
//!
//! Stock `xen-tpmfront` never probes for TPM 2.0, so Linux drives our vTPM
//! as a TPM 1.2 chip: at probe it asks `TPM_GetCapability` for the TIS
//! timeouts and command durations, and the hwrng thread asks
//! `TPM_GetRandom`. A TPM 2.0 answers such 1.2-tagged commands with
//! `TPM_RC_BAD_TAG`, leaving Linux with guessed timeouts and a failing
//! hwrng. This module answers exactly those commands the way Xen's own
//! vTPM does (timeouts and durations from `stubdom/vtpm-*-duration.patch`),
//! with randomness from the TPM 2.0 engine; anything else 1.2-tagged still
//! gets the TPM 2.0 answer. TPM 2.0 software (tpm2-tools on /dev/tpm0) is
//! unaffected: it never sends 1.2 tags.

use tpm_wire::{
    TPM12_CAP_PROP_DURATION as PROP_DURATION, TPM12_CAP_PROP_TIS_TIMEOUT as PROP_TIS_TIMEOUT,
    TPM12_CAP_PROPERTY as CAP_PROPERTY, TPM12_ORD_GET_CAPABILITY as ORD_GET_CAPABILITY,
    TPM12_ORD_GET_RANDOM as ORD_GET_RANDOM, TPM12_TAG_RQU_COMMAND as TAG_RQU,
    TPM12_TAG_RSP_COMMAND as TAG_RSP,
};

/// TIS timeouts A/B/C/D in µs (as Xen's vTPM reports them).
pub const TIS_TIMEOUTS_US: [u32; 4] = [750_000, 2_000_000, 750_000, 750_000];
/// Short/medium/long command durations in µs. Long is 10 minutes: a TPM 2.0
/// RSA key generation or a deep quote behind a busy manager can take seconds.
pub const DURATIONS_US: [u32; 3] = [3_000_000, 3_000_000, 600_000_000];

/// Largest GetRandom answered (a TPM 1.2 returns at most what fits).
pub const MAX_RANDOM: u32 = 128;

fn response(body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(10 + body.len());
    r.extend_from_slice(&TAG_RSP.to_be_bytes());
    r.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(body);
    r
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Answers the 1.2 commands listed in the module docs; `None` for anything
/// else. `random(n)` must return `n` random bytes (from the TPM 2.0 engine).
pub fn answer(cmd: &[u8], random: impl FnOnce(u16) -> Option<Vec<u8>>) -> Option<Vec<u8>> {
    let h = tpm_wire::peek_header(cmd)?;
    if h.tag != TAG_RQU || h.size as usize != cmd.len() {
        return None;
    }
    match h.code {
        ORD_GET_CAPABILITY if cmd.len() == 22 => {
            if be32(cmd, 10)? != CAP_PROPERTY || be32(cmd, 14)? != 4 {
                return None;
            }
            let values: &[u32] = match be32(cmd, 18)? {
                PROP_TIS_TIMEOUT => &TIS_TIMEOUTS_US,
                PROP_DURATION => &DURATIONS_US,
                _ => return None,
            };
            let mut body = ((values.len() * 4) as u32).to_be_bytes().to_vec();
            values.iter().for_each(|v| body.extend_from_slice(&v.to_be_bytes()));
            Some(response(&body))
        }
        ORD_GET_RANDOM if cmd.len() == 14 => {
            let n = be32(cmd, 10)?.min(MAX_RANDOM) as u16;
            let bytes = random(n)?;
            let mut body = (bytes.len() as u32).to_be_bytes().to_vec();
            body.extend_from_slice(&bytes);
            Some(response(&body))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn getcap(sub: u32) -> Vec<u8> {
        tpm_wire::tpm12_get_capability_property(sub)
    }

    #[test]
    fn timeouts_and_durations_as_linux_parses_them() {
        let r = answer(&getcap(PROP_TIS_TIMEOUT), |_| None).unwrap();
        assert_eq!(&r[..10], &[0x00, 0xC4, 0, 0, 0, 30, 0, 0, 0, 0]);
        assert_eq!(be32(&r, 10), Some(16));
        assert_eq!(be32(&r, 14), Some(750_000));
        assert_eq!(be32(&r, 18), Some(2_000_000));
        let r = answer(&getcap(PROP_DURATION), |_| None).unwrap();
        assert_eq!(be32(&r, 10), Some(12));
        assert_eq!(be32(&r, 22), Some(600_000_000));
        assert_eq!(answer(&getcap(0x999), |_| None), None);
    }

    #[test]
    fn get_random_is_capped_and_sized() {
        let cmd = tpm_wire::tpm12_get_random(0x1000);
        let r = answer(&cmd, |n| Some(vec![0xAB; n as usize])).unwrap();
        assert_eq!(be32(&r, 10), Some(MAX_RANDOM));
        assert_eq!(r.len(), 14 + MAX_RANDOM as usize);
        assert_eq!(be32(&r, 2), Some(r.len() as u32));
        // No engine randomness: no answer (the caller falls back to TPM 2.0 errors).
        assert_eq!(answer(&cmd, |_| None), None);
    }

    #[test]
    fn other_and_malformed_commands_are_not_answered() {
        assert_eq!(answer(&tpm_wire::tpm2_get_random(8), |_| None), None);
        let mut short = getcap(PROP_TIS_TIMEOUT);
        short.truncate(20);
        assert_eq!(answer(&short, |_| None), None);
        assert_eq!(answer(&[0x00, 0xC1, 0, 0, 0, 10, 0, 0, 0, 0x99], |_| None), None);
    }
}
