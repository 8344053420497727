//! Round trips through a vTPM with tpm2-tools (swtpm TCTI: `swtpm:path=` on the default
//! Unix sockets) and with tss-esapi (the manager's own TPM layer, pointed at a vTPM on
//! TCP), and persistence across a vTPM restart.

use xvtpm_tests::{Stack, get_random, raw_command, rc, read_public, tpm2};

#[test]
fn tpm2_tools_round_trip_and_restart_keeps_keys_nv_and_ek() {
    let s = Stack::start();
    // The default listeners: Unix sockets, reached by tpm2-tss's `swtpm:path=` TCTI.
    let v = s.create_vtpm_with(&[]);
    assert!(v.port.is_none() && v.socket.is_some(), "{v:?}");
    let t = v.tcti();
    assert!(t.starts_with("swtpm:path="), "{t}");
    let d = s.dir.path();
    let p = |f: &str| d.join(f).display().to_string();
    tpm2(&t, &["tpm2_startup", "-c"]);
    let hex = tpm2(&t, &["tpm2_getrandom", "--hex", "16"]);
    assert_eq!(hex.trim().len(), 32);
    tpm2(&t, &["tpm2_pcrextend", "16:sha256=0000000000000000000000000000000000000000000000000000000000000001"]);
    let pcr = tpm2(&t, &["tpm2_pcrread", "sha256:16"]);
    // SHA-256(32 zero bytes ‖ 0…01) — computed independently below.
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update([0u8; 32]);
    let mut one = [0u8; 32];
    one[31] = 1;
    h.update(one);
    let expect = hex_upper(&h.finalize());
    assert!(pcr.contains(&expect), "PCR16 {pcr} != {expect}");
    tpm2(&t, &["tpm2_createek", "-c", &p("ek.ctx"), "-G", "rsa", "-u", &p("ek.pub")]);
    tpm2(&t, &["tpm2_createak", "-C", &p("ek.ctx"), "-c", &p("ak.ctx"), "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u", &p("ak.pub"), "-f", "pem", "-n", &p("ak.name")]);
    tpm2(&t, &["tpm2_flushcontext", "-t"]);
    tpm2(&t, &["tpm2_flushcontext", "-s"]);
    tpm2(&t, &["tpm2_quote", "-c", &p("ak.ctx"), "-l", "sha256:0,16", "-q", "c0ffee", "-m", &p("q.msg"), "-s", &p("q.sig"), "-o", &p("q.pcrs"), "-g", "sha256"]);
    tpm2(&t, &["tpm2_checkquote", "-u", &p("ak.pub"), "-m", &p("q.msg"), "-s", &p("q.sig"), "-f", &p("q.pcrs"), "-g", "sha256", "-q", "c0ffee"]);
    tpm2(&t, &["tpm2_flushcontext", "-t"]);

    // Persistent key and NV index, then restart.
    tpm2(&t, &["tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", &p("srk.ctx")]);
    tpm2(&t, &["tpm2_evictcontrol", "-C", "o", "-c", &p("srk.ctx"), "0x81000001"]);
    tpm2(&t, &["tpm2_flushcontext", "-t"]);
    tpm2(&t, &["tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite"]);
    std::fs::write(d.join("nv.in"), b"persist!").unwrap();
    tpm2(&t, &["tpm2_nvwrite", "0x1500016", "-C", "o", "-i", &p("nv.in")]);
    let ek_before = v.command(&read_public(0x8101_0001));
    assert_eq!(rc(&ek_before), 0);

    s.stop_vtpm(&v.uuid);
    let v2 = s.start_vtpm(&v.uuid);
    assert_ne!(v2.pid, v.pid);
    let t2 = v2.tcti();
    assert!(tpm2(&t2, &["tpm2_getcap", "handles-persistent"]).contains("0x81000001"));
    assert_eq!(tpm2(&t2, &["tpm2_nvread", "0x1500016", "-C", "o", "-s", "8"]), "persist!");
    assert_eq!(v2.socket, v.socket, "the restart keeps the recorded listeners");
    assert_eq!(v2.command(&read_public(0x8101_0001)), ek_before, "EK changed across restart");
    // PCRs reset on restart (power cycle), as on a real TPM.
    assert!(!tpm2(&t2, &["tpm2_pcrread", "sha256:16"]).contains(&expect));
}

fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

#[test]
fn tss_esapi_drives_a_vtpm_like_a_physical_tpm() {
    // The manager's physical-TPM layer (tss-esapi) runs unchanged against a
    // vTPM: provision (PolicyPCR + PolicyAuthorize sealing), unseal, AK, quote.
    let s = Stack::start();
    let v = s.create_vtpm();
    let mut hw = vtpmmgr::hwtpm::HwTpm::open(&v.tcti()).expect("tss-esapi context on the vTPM");
    assert!(hw.is_software_tpm());
    let (rec, _key, secret) = hw.provision(&vtpmmgr::hwtpm::PcrPolicySpec::with_pcrs(&[16])).unwrap();
    let again = hw.unseal_master(&rec).unwrap();
    assert_eq!(&secret[..], &again[..]);
    hw.pcr_extend(16, &[7u8; 32]).unwrap();
    assert!(hw.unseal_master(&rec).is_err(), "unseal must fail after the policy PCR moved");
    let ak = hw.create_ak(vtpmmgr::hwtpm::AkAlg::EccP256).unwrap();
    let q = hw.quote(&ak, b"nonce-nonce-nonce", &[0, 16]).unwrap();
    assert_eq!(q.pcr_values.len(), 2);
    assert!(!q.attest.is_empty() && !q.signature.is_empty());
    let r = hw.get_random(32).unwrap();
    assert_eq!(r.len(), 32);
    drop(hw);
    // Raw GetRandom on the same vTPM still answers.
    assert_eq!(rc(&raw_command(v.port.unwrap(), &get_random(8))), 0);
}

#[test]
fn ecc_endorsement_key_on_request() {
    let s = Stack::start();
    let j = s.xl_json(&["vtpm", "create", "--ek", "ecc", "--listen", "tcp:127.0.0.1:0"]);
    let port = j["runtime"]["tcp_ports"][0][0].as_u64().unwrap() as u16;
    let uuid: uuid::Uuid = j["uuid"].as_str().unwrap().parse().unwrap();
    let ek = raw_command(port, &read_public(0x8101_0002));
    assert_eq!(rc(&ek), 0, "no ECC EK at 0x81010002");
    assert_ne!(rc(&raw_command(port, &read_public(0x8101_0001))), 0, "an RSA EK was made too");
    // TPMT_PUBLIC type is TPM_ALG_ECC, and it survives a restart.
    assert_eq!(&ek[12..14], &[0x00, 0x23]);
    s.stop_vtpm(&uuid);
    let v = s.start_vtpm(&uuid);
    assert_eq!(raw_command(v.port.unwrap(), &read_public(0x8101_0002)), ek);
}
