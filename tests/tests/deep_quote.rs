//! Deep quotes end to end: real swtpm as the physical TPM (behind a 20 ms
//! per-command delay, like a discrete TPM), real vtpm-domains, the vendor
//! command sent by many guests at once, every bundle verified offline.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use vtpm_proto::deepquote_cmd::{self, DeepQuoteCommand};
use vtpm_proto::evidence::{Bundle, TPM_ALG_SHA256};
use vtpm_attest::verify::{Expectations, VerifyError, verify};
use xvtpm_tests::{Options, Stack, raw_command, rc};

fn ak_of_default_group(s: &Stack) -> Vec<u8> {
    let groups = s.xl_json(&["mgr", "group", "list"]);
    hex::decode(groups[0]["ak_public"].as_str().unwrap()).unwrap()
}

fn command(nonce: &[u8]) -> DeepQuoteCommand {
    DeepQuoteCommand { nonce: nonce.to_vec(), vpcr_alg: TPM_ALG_SHA256, vpcrs: vec![0, 1, 16], host_pcrs: vec![0, 7], flags: 0 }
}

#[test]
fn sixteen_concurrent_guests_share_physical_quotes_and_all_verify() {
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(20)), ..Default::default() });
    let ak = ak_of_default_group(&s);
    let guests: Vec<_> = (0..16).map(|_| s.create_vtpm()).collect();
    // Give each guest a distinct vPCR 16 so leaves differ in content too.
    for (i, g) in guests.iter().enumerate() {
        xvtpm_tests::tpm2(&g.tcti(), &["tpm2_pcrextend", &format!("16:sha256={:064x}", i + 1)]);
    }
    let before = s.xl_json(&["mgr", "status"])["physical_quotes"].as_u64().unwrap();
    let barrier = Arc::new(Barrier::new(guests.len()));
    let handles: Vec<_> = guests
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let port = g.port.unwrap();
            let b = barrier.clone();
            std::thread::spawn(move || {
                let nonce = format!("guest-{i}-nonce").into_bytes();
                b.wait();
                let rsp = raw_command(port, &command(&nonce).encode());
                (nonce, rsp)
            })
        })
        .collect();
    let mut sizes = vec![];
    for (g, h) in guests.iter().zip(handles) {
        let (nonce, rsp) = h.join().unwrap();
        assert_eq!(rc(&rsp), 0, "deep quote failed: {:#x}", rc(&rsp));
        let bundle = Bundle::decode(&deepquote_cmd::parse_response(&rsp).unwrap()).unwrap();
        let mut exp = Expectations::new(nonce.clone(), ak.clone());
        exp.vtpm_uuid = Some(g.uuid);
        let v = verify(&bundle, &exp).unwrap_or_else(|e| panic!("bundle of {} did not verify: {e}", g.uuid));
        assert_eq!(v.leaf.vpcr_selection.pcrs, vec![0, 1, 16]);
        sizes.push(v.leaf.position.tree_size);
    }
    let after = s.xl_json(&["mgr", "status"]);
    let physical = after["physical_quotes"].as_u64().unwrap() - before;
    assert!(physical < 16, "16 requests took {physical} physical quotes (tree sizes {sizes:?})");
    assert!(sizes.iter().any(|n| *n > 1), "no batch had more than one leaf: {sizes:?}");
}

#[test]
fn evidence_is_bound_to_its_vtpm_and_nonce() {
    let s = Stack::start();
    let ak = ak_of_default_group(&s);
    let a = s.create_vtpm();
    let b = s.create_vtpm();
    let nonce = b"fresh-nonce-1".to_vec();
    let rsp = raw_command(a.port.unwrap(), &command(&nonce).encode());
    assert_eq!(rc(&rsp), 0);
    let bundle = Bundle::decode(&deepquote_cmd::parse_response(&rsp).unwrap()).unwrap();
    let mut as_a = Expectations::new(nonce.clone(), ak.clone());
    as_a.vtpm_uuid = Some(a.uuid);
    verify(&bundle, &as_a).unwrap();
    // The same evidence presented as B's fails on the vTPM identity.
    let mut as_b = as_a.clone();
    as_b.vtpm_uuid = Some(b.uuid);
    assert!(matches!(verify(&bundle, &as_b), Err(VerifyError::VtpmUuidMismatch { .. })));
    // Replayed against a verifier that sent a new nonce: rejected.
    let fresh = Expectations { nonce: b"fresh-nonce-2".to_vec(), ..as_a.clone() };
    assert!(matches!(verify(&bundle, &fresh), Err(VerifyError::NonceMismatch { .. })));
    // The vPCR values in the evidence are the vTPM's own: PCR 16 reads zero on a fresh vTPM.
    assert_eq!(bundle.leaf.vpcr_values[2], vec![0u8; 32]);

    // The CLI round trip: guest tool + offline verifier. The AK here is not enrolled (this
    // swtpm has no EK certificate; tests/tests/enrollment.rs has the enrolled path), so the raw
    // --ak needs --insecure-unenrolled-ak. Exit codes: 0 all checked, 7 a check failed, 8 no host
    // policy, 2 usage.
    let d = s.dir.path();
    let out = s.xl(&["guest", "deep-quote", "--tcti", &a.tcti(), "--nonce", "c0ffee", "--vpcrs", "0-7", "--host-pcrs", "0-7", "--out", d.join("ev.bin").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(d.join("ak.pub"), &ak).unwrap();
    let ev = d.join("ev.bin");
    let ev = ev.to_str().unwrap();
    let akp = d.join("ak.pub");
    let akp = akp.to_str().unwrap();
    let policy = d.join("host.json");
    xvtpm_tests::write_host_policy(&policy, &Bundle::decode(&std::fs::read(ev).unwrap()).unwrap());
    let policy = policy.to_str().unwrap();
    let insecure = ["--ak", akp, "--insecure-unenrolled-ak"];
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", ev];
        args.extend_from_slice(extra);
        s.xl(&args)
    };
    let a_uuid = a.uuid.to_string();
    let ok = verify(&[&["--nonce", "c0ffee", "--vtpm", &a_uuid, "--host-pcrs-policy", policy][..], &insecure].concat());
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stderr).contains("not enrolled"), "the unenrolled AK is called out");
    let unchecked = verify(&[&["--nonce", "c0ffee", "--vtpm", &a_uuid][..], &insecure].concat());
    assert_eq!(unchecked.status.code(), Some(8), "{}", String::from_utf8_lossy(&unchecked.stderr));
    assert!(String::from_utf8_lossy(&unchecked.stderr).contains("host state NOT checked"));
    let replay = verify(&[&["--nonce", "c0ffef", "--vtpm", &a_uuid, "--host-pcrs-policy", policy][..], &insecure].concat());
    assert_eq!(replay.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&replay.stderr).contains("nonce"));
    let b_uuid = b.uuid.to_string();
    let wrong = verify(&[&["--nonce", "c0ffee", "--vtpm", &b_uuid, "--host-pcrs-policy", policy][..], &insecure].concat());
    assert_eq!(wrong.status.code(), Some(7));
    // A raw AK without the explicit opt-in is refused, and so is evidence without --vtpm.
    let raw = verify(&["--nonce", "c0ffee", "--vtpm", &a_uuid, "--host-pcrs-policy", policy, "--ak", akp]);
    assert_eq!(raw.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&raw.stderr).contains("--insecure-unenrolled-ak"), "{}", String::from_utf8_lossy(&raw.stderr));
    let no_vtpm = verify(&[&["--nonce", "c0ffee", "--host-pcrs-policy", policy][..], &insecure].concat());
    assert_eq!(no_vtpm.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_vtpm.stderr).contains("--vtpm"), "{}", String::from_utf8_lossy(&no_vtpm.stderr));
    let any = verify(&[&["--nonce", "c0ffee", "--any-vtpm", "--host-pcrs-policy", policy][..], &insecure].concat());
    assert_eq!(any.status.code(), Some(0), "{}", String::from_utf8_lossy(&any.stderr));
}

#[test]
fn bad_deep_quote_commands_get_parameter_errors() {
    let s = Stack::start();
    let a = s.create_vtpm();
    let port = a.port.unwrap();
    let mut c = command(b"n");
    c.host_pcrs = vec![];
    assert_eq!(rc(&raw_command(port, &c.encode())), deepquote_cmd::rc::HOST_PCRS);
    let mut c = command(b"n");
    c.vpcr_alg = 0x0099;
    assert_eq!(rc(&raw_command(port, &c.encode())), deepquote_cmd::rc::VPCRS);
    let mut p = command(b"n").encode();
    p.truncate(p.len() - 2);
    let n = p.len() as u32;
    p[2..6].copy_from_slice(&n.to_be_bytes());
    assert_eq!(rc(&raw_command(port, &p)), deepquote_cmd::rc::SIZE);
    // Still serving.
    assert_eq!(rc(&raw_command(port, &xvtpm_tests::get_random(8))), 0);
}

/// Behind a slow TPM every TPM command of a round costs a delay: once warm, a round (here one
/// request each) is exactly one TPM command, `TPM2_Quote`, counted by the proxy.
#[test]
fn a_warm_deep_quote_round_is_one_tpm_command() {
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(1)), ..Default::default() });
    let port = s.create_vtpm().port.unwrap();
    assert_eq!(rc(&raw_command(port, &command(b"warm-up").encode())), 0);
    let quotes = |s: &Stack| s.xl_json(&["mgr", "status"])["physical_quotes"].as_u64().unwrap();
    let (q0, c0) = (quotes(&s), s.tpm_commands());
    for i in 0..5u8 {
        assert_eq!(rc(&raw_command(port, &command(&[i]).encode())), 0);
    }
    // The TPM commands first: a status call must not fall inside the counted window.
    let c1 = s.tpm_commands();
    let q1 = quotes(&s);
    assert_eq!(q1 - q0, 5, "physical quotes for 5 sequential requests");
    assert_eq!(c1 - c0, 5, "TPM commands for 5 rounds (one TPM2_Quote each)");
}

/// The first deep quote after a manager start is one TPM command too: the manager loads the
/// default group's AK and reads the host PCRs before it serves, so the first round — which every
/// request arriving meanwhile waits out — is not `Load`, `Quote` and `PCR_Read`.
#[test]
fn the_first_deep_quote_after_a_manager_start_is_one_tpm_command() {
    let mut s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(1)), ..Default::default() });
    let v = s.create_vtpm();
    s.stop_vtpm(&v.uuid);
    s.stop_manager();
    s.start_manager();
    let port = s.start_vtpm(&v.uuid).port.unwrap();
    let c0 = s.tpm_commands();
    assert_eq!(rc(&raw_command(port, &command(b"first").encode())), 0);
    let c1 = s.tpm_commands();
    assert_eq!(c1 - c0, 1, "TPM commands for the first deep quote after a start (one TPM2_Quote)");
    assert!(s.mgr_log().contains("deep-quote path warm"), "{}", s.mgr_log());
}

#[test]
fn unbatched_mode_takes_one_physical_quote_per_request() {
    let s = Stack::start_with(Options { mgr_args: vec!["--no-batching".into()], ..Default::default() });
    let a = s.create_vtpm();
    for i in 0..3u8 {
        assert_eq!(rc(&raw_command(a.port.unwrap(), &command(&[i]).encode())), 0);
    }
    let st = s.xl_json(&["mgr", "status"]);
    assert_eq!(st["batching"], false);
    assert_eq!(st["physical_quotes"], 3);
    assert_eq!(st["deep_quotes"], 3);
}

/// One request on a vTPM's host deep-quote socket; the raw response.
fn host_quote(sock: &std::path::Path, packet: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(packet).unwrap();
    xvtpm_tests::read_response(&mut s)
}

#[test]
fn the_host_asks_for_a_deep_quote_without_the_guest() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let s = Stack::start();
    let ak = ak_of_default_group(&s);
    let a = s.create_vtpm();
    let sock = s.run_dir().join("vtpms").join(format!("{}.quote", a.uuid));
    let meta = std::fs::metadata(&sock).expect("the vTPM made its host-quote socket");
    assert!(meta.file_type().is_socket());
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600), "root only");
    // The guest extends vPCR 16; the host's quote carries the vTPM's own value of it.
    xvtpm_tests::tpm2(&a.tcti(), &["tpm2_pcrextend", &format!("16:sha256={:064x}", 5)]);
    let before = s.xl_json(&["mgr", "status"])["deep_quotes"].as_u64().unwrap();
    let rsp = host_quote(&sock, &command(b"host-nonce").encode());
    assert_eq!(rc(&rsp), 0, "host deep quote failed: {:#x}", rc(&rsp));
    let bundle = Bundle::decode(&deepquote_cmd::parse_response(&rsp).unwrap()).unwrap();
    let mut exp = Expectations::new(b"host-nonce".to_vec(), ak);
    exp.vtpm_uuid = Some(a.uuid);
    verify(&bundle, &exp).unwrap();
    assert_ne!(bundle.leaf.vpcr_values[2], vec![0u8; 32], "vPCR 16 as the guest extended it");
    // The manager counted it as one more deep quote: the same request a guest sends.
    assert_eq!(s.xl_json(&["mgr", "status"])["deep_quotes"].as_u64().unwrap(), before + 1);
    // Anything but the deep-quote command is refused and never reaches the engine:
    // TPM2_Clear (platform hierarchy) would wipe the guest's keys.
    let clear = tpm_wire::Command::new(tpm_wire::TPM2_ST_SESSIONS, 0x126).u32(0x4000_000C).finish();
    assert_eq!(rc(&host_quote(&sock, &clear)), tpm_wire::TPM2_RC_COMMAND_CODE);
    // A deep-quote header announcing 1 MiB is refused before anything is read past it.
    let mut huge = command(b"n").encode();
    huge[2..6].copy_from_slice(&(1u32 << 20).to_be_bytes());
    assert_eq!(rc(&host_quote(&sock, &huge)), deepquote_cmd::rc::SIZE);
    // A nonce longer than 64 bytes makes the command longer than any deep quote: refused.
    assert_eq!(rc(&host_quote(&sock, &command(&[0u8; 65]).encode())), deepquote_cmd::rc::SIZE);
    // A client that never finishes is closed; the vTPM goes on serving its guest.
    {
        use std::io::{Read, Write};
        let mut slow = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        slow.write_all(&command(b"n").encode()[..12]).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(slow.read(&mut b).unwrap(), 0, "closed without an answer");
    }
    assert_eq!(rc(&raw_command(a.port.unwrap(), &command(b"guest").encode())), 0);
    assert!(s.vtpm_log(&a.uuid).contains("host-quote socket"), "{}", s.vtpm_log(&a.uuid));
}
