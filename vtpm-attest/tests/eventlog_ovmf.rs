//! A real UEFI measured-boot log: `data/ovmf-xen-tcg2-eventlog.bin` is the TCG2 event log an HVM
//! guest's firmware (edk2's OvmfXen with the TPM 2.0 modules, ci/testbed/build-ovmf-xen.sh) handed
//! to Linux in the Xen testbed's hvm-ovmf phase on 2026-12-04, copied out of the guest's
//! /sys/kernel/security/tpm0/binary_bios_measurements. The PCR values below are what the guest read
//! from its vTPM (`tpm2_pcrread`) in that boot: the parser and replay must reach exactly them, and
//! the policy made from the log must refuse any event digest changed.

use std::collections::BTreeMap;

use vtpm_attest::eventlog::{EventLog, EventLogPolicy, ReplayError, check};

const LOG: &[u8] = include_bytes!("data/ovmf-xen-tcg2-eventlog.bin");

/// PCRs 0-7 (sha256) as the vTPM reported them in the boot that wrote the log.
const READ: [(u32, &str); 8] = [
    (0, "64ab9e4e6086bbb956c9ec926a20f6ba602e3a426c837be63fe44be1245a5960"),
    (1, "8e9d1fe23131f12d6a523e9c32eb3223d4dc25e14eb5fd60163e7ba8de0f248c"),
    (2, "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"),
    (3, "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"),
    (4, "6fcb457991693c7007459faa22774f5d0ba5807f843d270a477d4a29bb1142d1"),
    (5, "a5ceb755d043f32431d63e39f5161464620a3437280494b5850dc1b47cc074e0"),
    (6, "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"),
    (7, "b5710bf57d25623e4019027da116821fa99f5c81e9e38b87671cc574f9281439"),
];

fn quoted() -> BTreeMap<u32, Vec<u8>> {
    READ.iter().map(|(p, v)| (*p, hex::decode(v).unwrap())).collect()
}

#[test]
fn ovmf_xen_log_replays_to_the_pcrs_the_vtpm_reported() {
    let log = EventLog::parse(LOG).unwrap();
    // the Spec ID header, CRTM and firmware volumes, Secure Boot variables, the kernel (direct
    // boot), boot variables, separators, the kernel's EFI stub tags (PCR 9), ExitBootServices
    assert_eq!(log.events.len(), 25);
    let replayed = log.replay_sha256();
    for (p, want) in READ {
        assert_eq!(hex::encode(replayed[&p]), want, "PCR {p}");
    }
    let names: Vec<String> = log.events.iter().map(|e| e.type_name()).collect();
    for t in ["EV_S_CRTM_VERSION", "EV_EFI_PLATFORM_FIRMWARE_BLOB", "EV_EFI_VARIABLE_DRIVER_CONFIG", "EV_EFI_BOOT_SERVICES_APPLICATION", "EV_SEPARATOR"] {
        assert!(names.iter().any(|n| n == t), "no {t} in {names:?}");
    }
}

#[test]
fn a_policy_from_the_log_accepts_it_and_refuses_every_changed_digest() {
    let log = EventLog::parse(LOG).unwrap();
    let policy = EventLogPolicy::from_log(&log, &[0, 1, 2, 3, 4, 5, 6, 7]).check().unwrap();
    let ok = check(&log, &quoted(), &policy).unwrap();
    assert_eq!(ok.pcrs.len(), 8);

    // every measured event's SHA-256 digest, one bit changed, in the raw log: refused, whether
    // the quote still says the old values (mismatch) or the log and the quote agree (policy)
    let measured: Vec<(u32, [u8; 32])> = log.events.iter().filter_map(|e| Some((e.pcr, e.sha256?))).filter(|(p, _)| *p < 8).collect();
    assert!(measured.len() >= 20, "{}", measured.len());
    for (pcr, d) in measured {
        let at = LOG.windows(32).position(|w| w == d).expect("digest in the raw log");
        let mut raw = LOG.to_vec();
        raw[at] ^= 0x01;
        let bad = EventLog::parse(&raw).unwrap();
        assert!(
            matches!(check(&bad, &quoted(), &policy), Err(ReplayError::Mismatch { .. })),
            "PCR {pcr}: a changed digest must not replay to the quoted value"
        );
        let agreeing: BTreeMap<u32, Vec<u8>> = bad.replay_sha256().into_iter().filter(|(p, _)| *p < 8).map(|(p, v)| (p, v.to_vec())).collect();
        assert!(check(&bad, &agreeing, &policy).is_err(), "PCR {pcr}: the policy must refuse a changed digest");
    }
}

#[test]
fn every_truncation_of_the_real_log_is_refused_or_shorter_never_a_panic() {
    for n in 0..LOG.len() {
        if let Ok(l) = EventLog::parse(&LOG[..n]) {
            assert!(l.events.len() < 25, "{n} bytes gave every event");
        }
    }
}
