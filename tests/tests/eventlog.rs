//! Host reference state: the host's measured-boot event log replays to the host PCRs of a deep
//! quote and satisfies the tenant's policy. The physical TPM is a real swtpm (with a vendor EK
//! certificate from a private swtpm_localca); "firmware" measures into it with tpm2_pcrextend
//! and writes the matching TCG log; tpm2-tools' own parser (`tpm2_eventlog`) must agree with
//! ours on what the log replays to.

use std::path::Path;
use std::process::{Command, Output};

use vtpm_attest::eventlog::{self, EV_NO_ACTION};
use xvtpm_tests::{Options, Stack};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// What our "firmware" measures: (PCR, event type, data); digests are SHA-256 of the data.
fn boot(kernel: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut e = vec![
        (0, EV_NO_ACTION, b"informational, never extended".to_vec()),
        (0, 0x8, b"SeaBIOS 1.16".to_vec()), // EV_S_CRTM_VERSION
        (2, 0x1, b"option ROM".to_vec()), // EV_POST_CODE
        (4, 0xD, b"boot loader".to_vec()), // EV_IPL
        (4, 0xD, kernel.to_vec()),
    ];
    for pcr in 0..8 {
        e.push((pcr, 0x4, vec![0; 4])); // EV_SEPARATOR
    }
    e
}

/// The SHA-256 PCR values `tpm2_eventlog` replays a log to.
fn tpm2_eventlog_replay(log: &Path) -> Vec<(u32, String)> {
    let out = Command::new("tpm2_eventlog").arg(log).output().expect("tpm2_eventlog (tpm2-tools)");
    assert!(out.status.success(), "{}", text(&out));
    let y = String::from_utf8_lossy(&out.stdout).to_string();
    let bank = y.split("pcrs:").nth(1).and_then(|s| s.split("sha256:").nth(1)).expect("a sha256 pcrs section");
    bank.lines()
        .map(str::trim)
        .take_while(|l| l.contains(" : 0x") || l.is_empty())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (p, v) = l.split_once(" : 0x").unwrap();
            (p.trim().parse().unwrap(), v.trim().to_string())
        })
        .collect()
}

#[test]
fn our_replay_agrees_with_tpm2_eventlog() {
    let d = testkit::tempdir();
    let log = d.path().join("log.bin");
    // Without the EV_NO_ACTION event: the spec says it is never extended (the real TPM test
    // below proves we follow that), but tpm2-tools 5.4's tpm2_eventlog extends it anyway.
    let measured: Vec<_> = boot(b"vmlinuz-6.1").into_iter().filter(|e| e.1 != EV_NO_ACTION).collect();
    std::fs::write(&log, eventlog::build_sha256(&measured)).unwrap();
    let ours: Vec<(u32, String)> = eventlog::EventLog::parse(&std::fs::read(&log).unwrap())
        .unwrap()
        .replay_sha256()
        .into_iter()
        .map(|(p, v)| (p, hex::encode(v)))
        .collect();
    assert_eq!(ours.len(), 8);
    assert_eq!(ours, tpm2_eventlog_replay(&log));
}

/// A host whose "firmware" measured `boot(vmlinuz-6.1)` into its physical TPM before the
/// manager sealed to PCRs 0-7, enrolled by a tenant: (stack, known-good host log, its policy,
/// the trust store).
fn measured_enrolled_host() -> (Stack, std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut s = Stack::start_unprovisioned_with(Options { ek_cert: true, ..Default::default() });
    let d = s.dir.path().to_path_buf();
    // Firmware measures into the physical TPM before the manager seals to PCRs 0-7.
    s.stop_manager();
    let events = boot(b"vmlinuz-6.1");
    extend(&s.swtpm.tcti(), &events);
    s.start_manager();
    let out = s.xl(&["mgr", "provision", "--yes", "--pcrs", "0-7"]);
    assert!(out.status.success(), "{}", text(&out));

    // Provider: export the log. Tenant: enroll, write a policy from the known-good log.
    let good = d.join("good.bin");
    std::fs::write(d.join("source.bin"), eventlog::build_sha256(&events)).unwrap();
    let out = s.xl(&["eventlog", "export", "--source", p(&d.join("source.bin")), "--out", p(&good)]);
    assert!(out.status.success(), "{}", text(&out));
    let policy = d.join("policy.json");
    let out = s.xl(&["eventlog", "policy", p(&good), "--replay", "0-7", "--out", p(&policy)]);
    assert!(out.status.success(), "{}", text(&out));
    let ca = s.ek_ca.as_ref().unwrap();
    let material = d.join("material.json");
    let out = s.xl(&["mgr", "enrollment", "--out", p(&material), "--ek-intermediate", p(&ca.intermediate_cert())]);
    assert!(out.status.success(), "{}", text(&out));
    let store = d.join("trust");
    let out = s.xl(&["enroll", "--material", p(&material), "--ek-ca", p(&ca.root_cert()), "--trust-store", p(&store)]);
    assert!(out.status.success(), "{}", text(&out));
    (s, good, policy, store)
}

/// Extends a TPM's SHA-256 PCRs with the measured (not `EV_NO_ACTION`) events, as firmware does.
fn extend(tcti: &str, events: &[(u32, u32, Vec<u8>)]) {
    for (pcr, ty, data) in events {
        if *ty != EV_NO_ACTION {
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(data));
            xvtpm_tests::tpm2(tcti, &["tpm2_pcrextend", &format!("{pcr}:sha256={digest}")]);
        }
    }
}

#[test]
fn event_log_replays_to_the_deep_quote_and_the_policy_decides() {
    let (s, good, policy, store) = measured_enrolled_host();
    let d = s.dir.path().to_path_buf();
    let v = s.create_vtpm();
    let quote = |host_pcrs: &str, out: &Path| {
        let o = s.xl(&[
            "guest", "deep-quote", "--tcti", &v.tcti(), "--nonce", "c0ffee", "--vpcrs", "0", "--host-pcrs", host_pcrs, "--out", p(out),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    };
    let ev = d.join("ev.bin");
    quote("0-7", &ev);
    let uuid = v.uuid.to_string();
    let verify = |ev: &Path, log: &Path, policy: &Path| {
        s.xl(&[
            "verify", p(ev), "--nonce", "c0ffee", "--vtpm", &uuid, "--trust-store", p(&store), "--event-log", p(log),
            "--event-log-policy", p(policy),
        ])
    };

    // The log replays to the quoted PCRs and the policy allows it: every check passed, exit 0.
    let ok = verify(&ev, &good, &policy);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("host event log: 12 events replay to the quoted PCRs"), "{}", text(&ok));

    // A log that does not describe what the TPM measured (another kernel) does not replay.
    let lying = d.join("lying.bin");
    std::fs::write(&lying, eventlog::build_sha256(&boot(b"vmlinuz-other"))).unwrap();
    let o = verify(&ev, &lying, &policy);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("host event log: the event log does not replay to quoted PCR 4"), "{}", text(&o));

    // An honest log of a state the tenant's policy does not allow: the event is named.
    let other = d.join("other.bin");
    std::fs::write(&other, eventlog::build_sha256(&boot(b"vmlinuz-other"))).unwrap();
    let other_policy = d.join("other-policy.json");
    let o = s.xl(&["eventlog", "policy", p(&other), "--replay", "0-7", "--out", p(&other_policy)]);
    assert!(o.status.success(), "{}", text(&o));
    let mut events_only: serde_json::Value = serde_json::from_slice(&std::fs::read(&other_policy).unwrap()).unwrap();
    events_only["pcrs"] = serde_json::json!({});
    std::fs::write(&other_policy, serde_json::to_vec(&events_only).unwrap()).unwrap();
    let o = verify(&ev, &good, &other_policy);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("event 5 (PCR 4, EV_IPL, sha256 ") && text(&o).contains("is not allowed by the policy"), "{}", text(&o));

    // A deep quote that leaves out a PCR the policy replays proves nothing about it.
    let partial = d.join("partial.bin");
    quote("0-3", &partial);
    let o = verify(&partial, &good, &policy);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("PCR 4 is not in the quote's SHA-256 selection"), "{}", text(&o));

    // Input is checked before anything is judged: garbage and oversized logs are usage errors.
    let junk = d.join("junk.bin");
    std::fs::write(&junk, b"not a log").unwrap();
    let o = verify(&ev, &junk, &policy);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a crypto-agile TCG event log"), "{}", text(&o));
    let o = verify(&ev, Path::new("/dev/zero"), &policy);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// What a guest's UEFI firmware measures into its vTPM (PCR, event type, data).
fn guest_boot(loader: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut e = vec![
        (0, EV_NO_ACTION, b"Spec ID Event03 follows the header".to_vec()),
        (0, 0x8, b"EDK II".to_vec()),                  // EV_S_CRTM_VERSION
        (0, 0x8000_0008, b"OVMF firmware volume".to_vec()), // EV_EFI_PLATFORM_FIRMWARE_BLOB
        (1, 0x8000_0001, b"BootOrder".to_vec()),       // EV_EFI_VARIABLE_DRIVER_CONFIG
        (4, 0x8000_0003, loader.to_vec()),             // EV_EFI_BOOT_SERVICES_APPLICATION
        (7, 0x8000_0001, b"SecureBoot=0".to_vec()),
    ];
    for pcr in 0..8 {
        e.push((pcr, 0x4, vec![0; 4])); // EV_SEPARATOR
    }
    e
}

/// An HVM/UEFI guest's firmware measures its boot into the guest's vTPM (real libtpms) and hands
/// the guest a TCG log; the tenant replays that log to the vPCRs of a deep quote, beside the
/// host's log replayed to the host PCRs of the same quote, and a policy decides on both.
#[test]
fn guest_event_log_replays_to_the_deep_quote_s_vpcrs() {
    let (s, host_log, host_policy, store) = measured_enrolled_host();
    let d = s.dir.path().to_path_buf();
    let v = s.create_vtpm();
    let events = guest_boot(b"grubx64.efi");
    extend(&v.tcti(), &events);
    let guest_log = d.join("guest-log.bin");
    std::fs::write(&guest_log, eventlog::build_sha256(&events)).unwrap();
    let guest_policy = d.join("guest-policy.json");
    let o = s.xl(&["eventlog", "policy", p(&guest_log), "--replay", "0-7", "--out", p(&guest_policy)]);
    assert!(o.status.success(), "{}", text(&o));

    let quote = |vpcrs: &str, out: &Path| {
        let o = s.xl(&[
            "guest", "deep-quote", "--tcti", &v.tcti(), "--nonce", "c0ffee", "--vpcrs", vpcrs, "--host-pcrs", "0-7", "--out", p(out),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    };
    let ev = d.join("ev.bin");
    quote("0-7", &ev);
    let uuid = v.uuid.to_string();
    let verify = |ev: &Path, log: &Path, policy: &Path, host: bool| {
        let mut args = vec![
            "verify", p(ev), "--nonce", "c0ffee", "--vtpm", &uuid, "--trust-store", p(&store), "--guest-event-log", p(log),
            "--guest-event-log-policy", p(policy),
        ];
        if host {
            args.extend(["--event-log", p(&host_log), "--event-log-policy", p(&host_policy)]);
        }
        s.xl(&args)
    };

    // Host and guest logs both replay and are allowed: exit 0, each named.
    let ok = verify(&ev, &guest_log, &guest_policy, true);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("guest event log: 13 events replay to the quoted vPCRs [0, 1, 2, 3, 4, 5, 6, 7]"), "{}", text(&ok));
    assert!(text(&ok).contains("host event log: 12 events replay"), "{}", text(&ok));

    // A guest log alone checks the guest, not the host: verified, but exit 8.
    let o = verify(&ev, &guest_log, &guest_policy, false);
    assert_eq!(o.status.code(), Some(8), "{}", text(&o));
    assert!(text(&o).contains("guest event log: 13 events replay"), "{}", text(&o));

    // A log claiming another boot loader does not replay to what the vTPM measured.
    let lying = d.join("lying.bin");
    std::fs::write(&lying, eventlog::build_sha256(&guest_boot(b"evil.efi"))).unwrap();
    let o = verify(&ev, &lying, &guest_policy, true);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        text(&o).contains("guest event log (vPCRs): the event log does not replay to quoted PCR 4"),
        "{}",
        text(&o)
    );

    // The host's log is not the guest's: replayed to the vPCRs it fails.
    let o = verify(&ev, &host_log, &host_policy, true);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("guest event log (vPCRs): the event log does not replay"), "{}", text(&o));

    // A deep quote that carries only vPCR 0 proves nothing about vPCRs 1-7.
    let partial = d.join("partial.bin");
    quote("0", &partial);
    let o = verify(&partial, &guest_log, &guest_policy, true);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("PCR 1 is not in the quote's SHA-256 selection"), "{}", text(&o));

    // The policy alone, or the log alone, is a usage error before anything is judged.
    let o = s.xl(&["verify", p(&ev), "--nonce", "c0ffee", "--vtpm", &uuid, "--trust-store", p(&store), "--guest-event-log", p(&guest_log)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--guest-event-log-policy"), "{}", text(&o));
}

/// A guest's IMA log (Linux `binary_runtime_measurements`, `ima-ng`) replays to vPCR 10 of a
/// deep quote: the "kernel" extends a real vTPM's PCR 10 as Linux does for a SHA-256 bank.
#[test]
fn guest_ima_log_replays_to_the_deep_quote_s_vpcr_10() {
    use vtpm_attest::ima::{ImaLog, build_ima_ng};
    let (s, host_log, host_policy, store) = measured_enrolled_host();
    let d = s.dir.path().to_path_buf();
    let v = s.create_vtpm();
    let files = [("boot_aggregate", [0x11; 32]), ("/init", [0x22; 32]), ("/usr/bin/tpm2", [0x33; 32])];
    let log = build_ima_ng(&files);
    for e in ImaLog::parse(&log).unwrap().entries {
        xvtpm_tests::tpm2(&v.tcti(), &["tpm2_pcrextend", &format!("10:sha256={}", hex::encode(e.sha256))]);
    }
    let ima = d.join("ima.bin");
    std::fs::write(&ima, &log).unwrap();
    let quote = |vpcrs: &str, out: &Path| {
        let o = s.xl(&["guest", "deep-quote", "--tcti", &v.tcti(), "--nonce", "c0ffee", "--vpcrs", vpcrs, "--host-pcrs", "0-7", "--out", p(out)]);
        assert!(o.status.success(), "{}", text(&o));
    };
    let ev = d.join("ev.bin");
    quote("10", &ev);
    let uuid = v.uuid.to_string();
    let verify = |ev: &Path, ima: &Path| {
        s.xl(&[
            "verify", p(ev), "--nonce", "c0ffee", "--vtpm", &uuid, "--trust-store", p(&store), "--event-log", p(&host_log),
            "--event-log-policy", p(&host_policy), "--guest-ima-log", p(ima),
        ])
    };
    let ok = verify(&ev, &ima);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("guest IMA log: 3 entries replay to the quoted vPCRs [10]"), "{}", text(&ok));

    // The log of another run (a file the guest did not execute) does not replay.
    let other = d.join("other.bin");
    std::fs::write(&other, build_ima_ng(&[files[0], files[1], ("/tmp/evil", [0x44; 32])])).unwrap();
    let o = verify(&ev, &other);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("guest IMA log: the IMA log (3 entries) does not replay to quoted PCR 10"), "{}", text(&o));
    // Leaving out the last entry does not replay either (the log is a chain).
    let short = d.join("short.bin");
    std::fs::write(&short, build_ima_ng(&files[..2])).unwrap();
    assert_eq!(verify(&ev, &short).status.code(), Some(7));

    // A deep quote without vPCR 10 proves nothing about the log.
    let no10 = d.join("no10.bin");
    quote("0", &no10);
    let o = verify(&no10, &ima);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("PCR 10 is not in the quote's SHA-256 vPCRs"), "{}", text(&o));

    // Malformed input is a usage error before anything is judged: a truncated log, an edited
    // entry (its SHA-1 template digest no longer matches), garbage.
    let bad = d.join("bad.bin");
    std::fs::write(&bad, &log[..log.len() - 3]).unwrap();
    let o = verify(&ev, &bad);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not an IMA binary_runtime_measurements log: entry 2"), "{}", text(&o));
    let mut edited = log.clone();
    let at = edited.len() - 20;
    edited[at] ^= 1;
    std::fs::write(&bad, &edited).unwrap();
    let o = verify(&ev, &bad);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("entry 2 (/usr/bin/tpm2): its template digest is not SHA-1"), "{}", text(&o));
}
