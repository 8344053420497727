//! vTPM EK certificates end to end: real swtpm as the physical TPM, real
//! manager and vTPMs, and the stock tools a tenant uses — tpm2-tools to read the certificate
//! from the vTPM's NV, `openssl verify` against the group's CA certificate, and `xl-vtpm
//! verify-ekcert` for the CA key's certification by the group AK.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use uuid::Uuid;
use vtpm_attest::ekcert;
use vtpm_proto::ekcert::Certificate;
use vtpm_proto::mgr::TpmInfo;
use vtpm_proto::mgr::{AdminReply, AdminRequest, ErrorCode, VtpmReply, VtpmRequest};
use xvtpm_tests::{Stack, VtpmHandle, mgr_call, raw_command, rc, read_public, tpm2};

fn run(cmd: &str, args: &[&str], tcti: Option<&str>) -> Output {
    let mut c = Command::new(cmd);
    c.args(args);
    if let Some(t) = tcti {
        c.env("TPM2TOOLS_TCTI", t);
    }
    c.output().unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str], tcti: Option<&str>) -> String {
    let out = run(cmd, args, tcti);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// `xl-vtpm mgr group ca-cert` (PEM + certification evidence) and `mgr group ak` of `group`.
fn export_ca(s: &Stack, group: &str, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, certify, ak) = (dir.join(format!("{group}-ca.pem")), dir.join(format!("{group}-certify.json")), dir.join(format!("{group}-ak.bin")));
    s.xl_json(&["mgr", "group", "ca-cert", group, "--out", ca.to_str().unwrap(), "--certify", certify.to_str().unwrap()]);
    s.xl_json(&["mgr", "group", "ak", group, "--out", ak.to_str().unwrap()]);
    (ca, certify, ak)
}

/// Reads the EK certificate at `index` with `tpm2_nvread` (the index's own empty auth, as
/// `tpm2_getekcertificate` and Keylime do) into `<name>.der` and converts it to `<name>.pem`.
fn nvread_cert(v: &VtpmHandle, index: &str, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let der = dir.join(format!("{name}.der"));
    let pem = dir.join(format!("{name}.pem"));
    tpm2(&v.tcti(), &["tpm2_nvread", index, "-o", der.to_str().unwrap()]);
    ok("openssl", &["x509", "-inform", "der", "-in", der.to_str().unwrap(), "-out", pem.to_str().unwrap()], None);
    (der, pem)
}

fn openssl_verify(ca: &Path, cert: &Path) -> Output {
    run("openssl", &["verify", "-CAfile", ca.to_str().unwrap(), cert.to_str().unwrap()], None)
}

/// The SPKI PEM openssl extracts from a certificate.
fn cert_pubkey(pem: &Path) -> String {
    ok("openssl", &["x509", "-in", pem.to_str().unwrap(), "-pubkey", "-noout"], None)
}

#[test]
fn rsa_ek_certificate_in_nv_verifies_with_openssl_tpm2_tools_and_the_ak() {
    let s = Stack::start();
    let dir = s.dir.path().join("tenant");
    std::fs::create_dir_all(&dir).unwrap();
    let v = s.create_vtpm();
    let (ca, certify, ak) = export_ca(&s, "default", &dir);

    // The certificate sits at the TCG index with the attributes hardware TPMs use.
    let public = tpm2(&v.tcti(), &["tpm2_nvreadpublic", "0x1c00002"]);
    for attr in ["ppwrite", "writedefine", "ppread", "ownerread", "authread", "no_da", "written", "platformcreate", "writelocked"] {
        assert!(public.contains(attr), "attribute {attr} missing:\n{public}");
    }
    let (der, pem) = nvread_cert(&v, "0x1c00002", &dir, "ek");

    // Stock openssl accepts the chain…
    let out = openssl_verify(&ca, &pem);
    assert!(out.status.success(), "openssl verify: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
    let text = ok("openssl", &["x509", "-in", pem.to_str().unwrap(), "-noout", "-text"], None);
    for want in ["Key Encipherment", "2.23.133.8.1", "DirName:/2.23.133.2.1=id:49424D00", "CA:FALSE", "Subject: \n"] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    // …and the certified key is the EK, as tpm2_readpublic reports it.
    tpm2(&v.tcti(), &["tpm2_readpublic", "-c", "0x81010001", "-f", "pem", "-o", &p(&dir, "ek-pub.pem")]);
    assert_eq!(cert_pubkey(&pem).trim(), std::fs::read_to_string(dir.join("ek-pub.pem")).unwrap().trim());
    tpm2(&v.tcti(), &["tpm2_readpublic", "-c", "0x81010001", "-o", &p(&dir, "ek.pub")]);
    // tpm2_getekcertificate finds it in NV.
    tpm2(&v.tcti(), &["tpm2_getekcertificate", "-o", &p(&dir, "getek.der")]);
    assert_eq!(std::fs::read(dir.join("getek.der")).unwrap(), std::fs::read(&der).unwrap());

    // xl-vtpm verify-ekcert: the chain, the EK, and the CA key's TPM2_Certify by the group AK.
    let v_json = s.xl_json(&[
        "verify-ekcert", der.to_str().unwrap(), "--ca", ca.to_str().unwrap(), "--ek", &p(&dir, "ek.pub"),
        "--certify", certify.to_str().unwrap(), "--ak", ak.to_str().unwrap(),
    ]);
    assert_eq!(v_json["verified"], true);
    assert_eq!(v_json["ek_type"], "rsa-2048");
    assert_eq!(v_json["tpm_manufacturer"], "id:49424D00");
    assert_eq!(v_json["ca_certify_checked"], true);

    // A second vTPM: another EK, another serial, same CA; its certificate is not the first EK's.
    let w = s.create_vtpm();
    let (der_w, pem_w) = nvread_cert(&w, "0x1c00002", &dir, "ek-w");
    assert!(openssl_verify(&ca, &pem_w).status.success());
    let (c1, c2) = (Certificate::parse(&std::fs::read(&der).unwrap()).unwrap(), Certificate::parse(&std::fs::read(&der_w).unwrap()).unwrap());
    assert_ne!(c1.serial, c2.serial);
    let out = s.xl(&["verify-ekcert", der_w.to_str().unwrap(), "--ca", ca.to_str().unwrap(), "--ek", &p(&dir, "ek.pub")]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the EK read from the TPM"), "{}", String::from_utf8_lossy(&out.stderr));

    // Another group has its own CA and AK: neither vouches for the default group's vTPMs.
    s.xl_json(&["mgr", "group", "add", "tenant-b"]);
    let (ca_b, certify_b, ak_b) = export_ca(&s, "tenant-b", &dir);
    assert!(!openssl_verify(&ca_b, &pem).status.success(), "another group's CA accepted the EK certificate");
    let out = s.xl(&["verify-ekcert", der.to_str().unwrap(), "--ca", ca_b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not issued by this CA"), "{}", String::from_utf8_lossy(&out.stderr));
    // The default CA's evidence does not verify against tenant-b's AK, nor tenant-b's against
    // the default CA certificate.
    let out = s.xl(&["verify-ekcert", der.to_str().unwrap(), "--ca", ca.to_str().unwrap(), "--certify", certify.to_str().unwrap(), "--ak", ak_b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another AK"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = s.xl(&["verify-ekcert", der.to_str().unwrap(), "--ca", ca.to_str().unwrap(), "--certify", certify_b.to_str().unwrap(), "--ak", ak_b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("extraData is not SHA-256 of this CA certificate"), "{}", String::from_utf8_lossy(&out.stderr));
    // A vTPM of tenant-b gets tenant-b's certificate.
    let b = xvtpm_tests_handle(&s.xl_json(&["vtpm", "create", "--group", "tenant-b", "--listen", "tcp:127.0.0.1:0"]));
    let (_, pem_b) = nvread_cert(&b, "0x1c00002", &dir, "ek-b");
    assert!(openssl_verify(&ca_b, &pem_b).status.success());
    assert!(!openssl_verify(&ca, &pem_b).status.success());

    // Clear errors on the unhappy paths.
    let out = s.xl(&["mgr", "group", "ca-cert", "nosuch", "--out", &p(&dir, "x.pem")]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no group \"nosuch\""), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("garbage.der"), b"not a certificate").unwrap();
    let out = s.xl(&["verify-ekcert", &p(&dir, "garbage.der"), "--ca", ca.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an X.509 certificate"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = s.xl(&["verify-ekcert", der.to_str().unwrap(), "--ca", ca.to_str().unwrap(), "--certify", certify.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "--certify needs --ak");
    // The EK certificate is no CA.
    let out = s.xl(&["verify-ekcert", der_w.to_str().unwrap(), "--ca", pem.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));

    // The manager logged issuance without key material.
    let log = s.mgr_log();
    assert!(log.contains("issued an EK certificate"), "{log}");
    assert!(log.contains("EK CA created") || log.contains("group added"), "{log}");
}

fn xvtpm_tests_handle(v: &serde_json::Value) -> VtpmHandle {
    VtpmHandle {
        uuid: v["uuid"].as_str().unwrap().parse().unwrap(),
        pid: v["runtime"]["pid"].as_u64().map(|p| p as u32),
        port: v["runtime"]["tcp_ports"][0][0].as_u64().map(|p| p as u16),
        socket: None,
        state_file: v["state_file"].as_str().unwrap().into(),
    }
}

#[test]
fn ecc_ek_certificate_survives_a_restart() {
    let mut s = Stack::start();
    let dir = s.dir.path().join("tenant");
    std::fs::create_dir_all(&dir).unwrap();
    let v = xvtpm_tests_handle(&s.xl_json(&["vtpm", "create", "--ek", "ecc", "--listen", "tcp:127.0.0.1:0"]));
    let (ca, certify, ak) = export_ca(&s, "default", &dir);
    let (der, pem) = nvread_cert(&v, "0x1c0000a", &dir, "ek");
    assert!(openssl_verify(&ca, &pem).status.success());
    let text = ok("openssl", &["x509", "-in", pem.to_str().unwrap(), "-noout", "-text"], None);
    assert!(text.contains("Key Agreement"), "{text}");
    tpm2(&v.tcti(), &["tpm2_readpublic", "-c", "0x81010002", "-f", "pem", "-o", &p(&dir, "ek-pub.pem")]);
    assert_eq!(cert_pubkey(&pem).trim(), std::fs::read_to_string(dir.join("ek-pub.pem")).unwrap().trim());
    // No RSA EK, so nothing at the RSA certificate index.
    assert!(!run("tpm2_nvread", &["0x1c00002", "-o", &p(&dir, "none.der")], Some(&v.tcti())).status.success());

    // Stop and start: the certificate is part of the vTPM's sealed state.
    s.stop_vtpm(&v.uuid);
    let v2 = s.start_vtpm(&v.uuid);
    let (der2, _) = nvread_cert(&v2, "0x1c0000a", &dir, "ek-again");
    assert_eq!(std::fs::read(&der).unwrap(), std::fs::read(&der2).unwrap());
    tpm2(&v2.tcti(), &["tpm2_readpublic", "-c", "0x81010002", "-o", &p(&dir, "ek.pub")]);
    let j = s.xl_json(&[
        "verify-ekcert", der2.to_str().unwrap(), "--ca", ca.to_str().unwrap(), "--ek", &p(&dir, "ek.pub"),
        "--certify", certify.to_str().unwrap(), "--ak", ak.to_str().unwrap(),
    ]);
    assert_eq!(j["ek_type"], "ecc-p256");
    // The resume did not ask for another certificate: exactly one was issued.
    assert_eq!(s.mgr_log().matches("issued an EK certificate").count(), 1, "{}", s.mgr_log());

    // The guest can remove the index (this vTPM's platform hierarchy is open, as under swtpm);
    // at its next start the vTPM asks for a certificate of the same EK again and gets one — the
    // path a vTPM made before EK certificates takes.
    tpm2(&v2.tcti(), &["tpm2_nvundefine", "-C", "p", "0x1c0000a"]);
    assert!(!run("tpm2_nvread", &["0x1c0000a", "-o", &p(&dir, "gone.der")], Some(&v2.tcti())).status.success());
    s.stop_vtpm(&v.uuid);
    let v3 = s.start_vtpm(&v.uuid);
    let (der3, pem3) = nvread_cert(&v3, "0x1c0000a", &dir, "ek-refilled");
    assert!(openssl_verify(&ca, &pem3).status.success());
    assert_ne!(std::fs::read(&der3).unwrap(), std::fs::read(&der).unwrap(), "a fresh certificate (new serial)");
    assert_eq!(cert_pubkey(&pem3), cert_pubkey(&pem));
    assert!(s.vtpm_log(&v.uuid).contains("EK certificate obtained and stored"), "{}", s.vtpm_log(&v.uuid));
    assert_eq!(s.mgr_log().matches("issued an EK certificate").count(), 2, "{}", s.mgr_log());

    // The CA survives a manager restart unchanged (it is in the manager's store).
    s.stop_manager();
    s.start_manager();
    let again = dir.join("ca-again.pem");
    s.xl_json(&["mgr", "group", "ca-cert", "default", "--out", again.to_str().unwrap()]);
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&ca).unwrap());
}

fn libtpms_info() -> TpmInfo {
    TpmInfo { manufacturer: 0x4942_4D00, model: "SW   TPM".into(), firmware_version: 0x2019_1023, family: "2.0".into(), level: 0, revision: 164 }
}

fn issue(uuid: Uuid, ek: &[u8]) -> VtpmRequest {
    VtpmRequest::IssueEkCert { uuid, ek_public: hex::encode(ek), tpm: libtpms_info() }
}

fn refused(r: VtpmReply, code: ErrorCode, needle: &str) {
    match r {
        VtpmReply::Error(f) => {
            assert_eq!(f.code, code, "{}", f.message);
            assert!(f.message.contains(needle), "{needle:?} not in {:?}", f.message);
        }
        other => panic!("not refused: {other:?}"),
    }
}

/// The EK's TPM2B_PUBLIC through a vTPM's data port.
fn ek_public(v: &VtpmHandle, handle: u32) -> Vec<u8> {
    let rsp = raw_command(v.port.unwrap(), &read_public(handle));
    assert_eq!(rc(&rsp), 0);
    let n = u16::from_be_bytes([rsp[10], rsp[11]]) as usize;
    rsp[10..12 + n].to_vec()
}

#[test]
fn a_vtpm_socket_certifies_only_its_own_identity_and_only_one_ek() {
    let mut s = Stack::start();
    let a = s.create_vtpm();
    let b = s.create_vtpm();
    let (ek_a, ek_b) = (ek_public(&a, 0x8101_0001), ek_public(&b, 0x8101_0001));
    let admin = s.run_dir().join("admin.sock");
    let run_dir = s.run_dir();
    let sock = |u: &Uuid| run_dir.join("vtpm").join(format!("{u}.sock"));

    // This process is not B's process: B's socket refuses it, whatever it claims.
    refused(mgr_call(&sock(&b.uuid), &issue(b.uuid, &ek_b)), ErrorCode::Refused, "not the process attached");
    // An identity attached to this process may not get a certificate in A's name.
    let c = match mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmCreate { group: None, uuid: None }) {
        AdminReply::Vtpm(v) => v.uuid,
        other => panic!("{other:?}"),
    };
    assert_eq!(mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmAttach { uuid: c, pid: std::process::id() }), AdminReply::Ok);
    refused(mgr_call(&sock(&c), &issue(a.uuid, &ek_a)), ErrorCode::Refused, &format!("serves vTPM {c}"));
    // Only TCG default EKs are certified: not garbage, not another key shape.
    refused(mgr_call(&sock(&c), &VtpmRequest::IssueEkCert { uuid: c, ek_public: "zz".into(), tpm: libtpms_info() }), ErrorCode::BadRequest, "not hex");
    let mut not_ek = ek_a.clone();
    not_ek[2 + 7] ^= 0x40; // objectAttributes: userWithAuth
    refused(mgr_call(&sock(&c), &issue(c, &not_ek)), ErrorCode::BadRequest, "TCG default");
    let bad_tpm = VtpmRequest::IssueEkCert { uuid: c, ek_public: hex::encode(&ek_a), tpm: TpmInfo { model: String::new(), ..libtpms_info() } };
    refused(mgr_call(&sock(&c), &bad_tpm), ErrorCode::BadRequest, "model");

    // Its own identity gets a certificate (for whichever EK it presents first)…
    let ca = match mgr_call::<_, AdminReply>(&admin, &AdminRequest::GroupCa { group: "default".into() }) {
        AdminReply::GroupCa(info) => Certificate::parse(&hex::decode(&info.cert).unwrap()).unwrap(),
        other => panic!("{other:?}"),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let first = match mgr_call::<_, VtpmReply>(&sock(&c), &issue(c, &ek_a)) {
        VtpmReply::EkCert { cert } => Certificate::parse(&hex::decode(cert).unwrap()).unwrap(),
        other => panic!("{other:?}"),
    };
    ekcert::verify_ek_cert(&first, &ca, now).unwrap();
    ekcert::check_ek_matches(&first, &ek_a).unwrap();
    // …again for the same EK, but never for a second one.
    assert!(matches!(mgr_call::<_, VtpmReply>(&sock(&c), &issue(c, &ek_a)), VtpmReply::EkCert { .. }));
    refused(mgr_call(&sock(&c), &issue(c, &ek_b)), ErrorCode::Refused, "certified for another EK");
    // The binding is in the manager's store: it holds across a manager restart.
    s.stop_manager();
    s.start_manager();
    assert_eq!(mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmAttach { uuid: c, pid: std::process::id() }), AdminReply::Ok);
    refused(mgr_call(&sock(&c), &issue(c, &ek_b)), ErrorCode::Refused, "certified for another EK");
    let log = s.mgr_log();
    assert!(log.contains("refused EK certificate: this vTPM identity was certified for another EK"), "{log}");
    assert!(log.contains("EK certificate not issued"), "{log}");
}

#[test]
fn unprovisioned_manager_has_no_ca() {
    let s = Stack::start_unprovisioned();
    let out = s.xl(&["mgr", "group", "ca-cert", "default", "--out", s.dir.path().join("ca.pem").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("xl-vtpm mgr provision"));
}

/// `VtpmReserve` (what `vtpm create` asks for a TPM 2.0 vTPM) keeps the identity in the
/// manager's memory: it serves its attached process (state key, EK certificate) but is not
/// listed, cannot anchor a state, and moves the physical rollback counter only when its EK is
/// certified — once, for identity and EK binding together. Dropped or forgotten (a manager
/// restart) before that, it leaves nothing behind.
#[test]
fn a_reserved_identity_is_written_once_with_its_ek_certificate() {
    let mut s = Stack::start();
    let a = s.create_vtpm();
    let ek_a = ek_public(&a, 0x8101_0001);
    let admin = s.run_dir().join("admin.sock");
    let run_dir = s.run_dir();
    let sock = |u: &Uuid| run_dir.join("vtpm").join(format!("{u}.sock"));
    let status = |s: &Stack| s.xl_json(&["mgr", "status"]);
    let counter = |s: &Stack| {
        let st = status(s);
        let c = &st["store_counter"];
        assert_eq!(c["tpm_value"], c["store_value"], "{st}");
        c["tpm_value"].as_u64().unwrap()
    };
    let listed = |s: &Stack, u: &Uuid| s.xl_json(&["vtpm", "list"]).as_array().unwrap().iter().any(|v| v["uuid"].as_str() == Some(u.to_string().as_str()));
    let reserve = || match mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmReserve { group: None, uuid: None }) {
        AdminReply::Vtpm(v) => v.uuid,
        other => panic!("{other:?}"),
    };

    let before = counter(&s);
    let c = reserve();
    assert!(!listed(&s, &c), "a reserved identity is listed");
    assert_eq!(mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmAttach { uuid: c, pid: std::process::id() }), AdminReply::Ok);
    match mgr_call::<_, VtpmReply>(&sock(&c), &VtpmRequest::GetStateKey { version: vtpm_proto::mgr::PROTOCOL_VERSION, uuid: c }) {
        VtpmReply::StateKey { .. } => {}
        other => panic!("{other:?}"),
    }
    let anchor = VtpmRequest::AnchorState { uuid: c, generation: 1, digest: "ab".repeat(32), opening: true };
    refused(mgr_call(&sock(&c), &anchor), ErrorCode::NotFound, "reserved");
    assert_eq!(counter(&s), before, "reserving wrote the store");
    match mgr_call::<_, VtpmReply>(&sock(&c), &issue(c, &ek_a)) {
        VtpmReply::EkCert { .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(counter(&s), before + 1, "identity and EK binding: one store write");
    assert!(listed(&s, &c), "the certified identity is not listed");

    // Dropped before its certificate: no write at all.
    let d = reserve();
    assert_eq!(mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmDel { uuid: d }), AdminReply::Ok);
    assert_eq!(counter(&s), before + 1);
    // Forgotten by a restarted manager: it does not exist there.
    let e = reserve();
    s.stop_manager();
    s.start_manager();
    assert!(matches!(mgr_call::<_, AdminReply>(&admin, &AdminRequest::VtpmShow { uuid: e }), AdminReply::Error(f) if f.code == ErrorCode::NotFound));
    assert!(listed(&s, &c), "the certified identity did not survive the restart");
    assert_eq!(counter(&s), before + 1);
}
