//! The tenant's chain of trust, end to end: the physical TPM is a real swtpm manufactured with
//! an RSA EK certificate by a private swtpm_localca CA (playing the TPM vendor), the manager
//! activates credentials in it, and the tenant (`xl-vtpm enroll`, `xl-vtpm verify`) starts from
//! nothing but that CA's root certificate and a host PCR policy.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vtpm_proto::evidence::Bundle;
use vtpm_proto::mgr;
use xvtpm_tests::{Options, Stack};

fn stack() -> Stack {
    Stack::start_with(Options {
        ek_cert: true,
        ..Default::default()
    })
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `xl-vtpm mgr enrollment` (with the local CA's intermediate), returns the material's path.
fn material(s: &Stack) -> PathBuf {
    let m = s.dir.path().join("material.json");
    let ca = s.ek_ca.as_ref().unwrap();
    let out = s.xl(&[
        "mgr",
        "enrollment",
        "--out",
        p(&m),
        "--ek-intermediate",
        p(&ca.intermediate_cert()),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    m
}

fn enroll(s: &Stack, material: &Path, root: &Path, store: &Path) -> Output {
    s.xl(&[
        "enroll",
        "--material",
        p(material),
        "--ek-ca",
        p(root),
        "--trust-store",
        p(store),
    ])
}

/// A TPMT_PUBLIC for a *software* P-256 key that claims every attribute of a TPM-made AK.
fn software_ak() -> Vec<u8> {
    let sk = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let pt = sk.verifying_key().to_encoded_point(false);
    let mut t = vec![0x00, 0x23, 0x00, 0x0b];
    // fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA | restricted | sign
    t.extend_from_slice(&0x0005_0472u32.to_be_bytes());
    t.extend_from_slice(&[0, 0]); // authPolicy
    t.extend_from_slice(&[0x00, 0x10]); // symmetric NULL
    t.extend_from_slice(&[0x00, 0x18, 0x00, 0x0b]); // ECDSA, SHA-256
    t.extend_from_slice(&[0x00, 0x03, 0x00, 0x10]); // NIST P-256, kdf NULL
    for c in [pt.x().unwrap(), pt.y().unwrap()] {
        t.extend_from_slice(&[0, 32]);
        t.extend_from_slice(c);
    }
    t
}

/// Rewrites the material's first group's AK public area.
fn with_ak(material: &Path, ak: &[u8], out: &Path) {
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(material).unwrap()).unwrap();
    m["groups"][0]["ak_public"] = hex::encode(ak).into();
    std::fs::write(out, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn enrolled_ak_verifies_end_to_end_from_the_vendor_root_and_a_policy() {
    let s = stack();
    let d = s.dir.path();
    let root = s.ek_ca.as_ref().unwrap().root_cert();
    let m = material(&s);
    let store = d.join("trust");
    let out = enroll(&s, &m, &root, &store);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("activated and pinned"));

    let a = s.create_vtpm();
    let ev = d.join("ev.bin");
    let out = s.xl(&[
        "guest",
        "deep-quote",
        "--tcti",
        &a.tcti(),
        "--nonce",
        "abcd01",
        "--vpcrs",
        "0-7",
        "--host-pcrs",
        "0-7",
        "--out",
        p(&ev),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let policy = d.join("host.json");
    xvtpm_tests::write_host_policy(
        &policy,
        &Bundle::decode(&std::fs::read(&ev).unwrap()).unwrap(),
    );
    let a_uuid = a.uuid.to_string();
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", p(&ev), "--nonce", "abcd01"];
        args.extend_from_slice(extra);
        s.xl(&args)
    };
    // Everything checked: 0.
    let ok = verify(&[
        "--vtpm",
        &a_uuid,
        "--trust-store",
        p(&store),
        "--host-pcrs-policy",
        p(&policy),
    ]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("enrolled for host"),
        "{}",
        text(&ok)
    );
    // No host policy: its own exit code, said loudly.
    let unchecked = verify(&["--vtpm", &a_uuid, "--trust-store", p(&store)]);
    assert_eq!(unchecked.status.code(), Some(8), "{}", text(&unchecked));
    assert!(text(&unchecked).contains("host state NOT checked"));
    // A host policy the host does not meet.
    let bad_policy = d.join("bad.json");
    std::fs::write(&bad_policy, format!("{{\"0\": \"{}\"}}", "11".repeat(32))).unwrap();
    let off = verify(&[
        "--vtpm",
        &a_uuid,
        "--trust-store",
        p(&store),
        "--host-pcrs-policy",
        p(&bad_policy),
    ]);
    assert_eq!(off.status.code(), Some(7), "{}", text(&off));
    assert!(text(&off).contains("host PCR 0"), "{}", text(&off));
    // No --vtpm: refused (usage), unless --any-vtpm says so explicitly.
    let no_vtpm = verify(&["--trust-store", p(&store), "--host-pcrs-policy", p(&policy)]);
    assert_eq!(no_vtpm.status.code(), Some(2), "{}", text(&no_vtpm));
    assert!(text(&no_vtpm).contains("--vtpm"));
    let any = verify(&[
        "--any-vtpm",
        "--trust-store",
        p(&store),
        "--host-pcrs-policy",
        p(&policy),
    ]);
    assert_eq!(any.status.code(), Some(0), "{}", text(&any));
    // A trust store without this host's AK: the AK is not enrolled.
    let empty = d.join("empty-trust");
    std::fs::create_dir(&empty).unwrap();
    let unenrolled = verify(&[
        "--vtpm",
        &a_uuid,
        "--trust-store",
        p(&empty),
        "--host-pcrs-policy",
        p(&policy),
    ]);
    assert_eq!(unenrolled.status.code(), Some(7), "{}", text(&unenrolled));
    assert!(
        text(&unenrolled).contains("AK not enrolled"),
        "{}",
        text(&unenrolled)
    );
}

#[test]
fn enrollment_refuses_a_foreign_ek_chain_a_software_ak_and_bad_attributes() {
    let s = stack();
    let d = s.dir.path();
    let root = s.ek_ca.as_ref().unwrap().root_cert();
    let m = material(&s);

    // The EK certificate does not chain to another vendor's root (same subject name, other key).
    let other = testkit::LocalCa::new();
    let _made_by_other = testkit::Swtpm::start_manufactured(&other);
    let out = enroll(&s, &m, &other.root_cert(), &d.join("t1"));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        text(&out).contains("EK certificate chain"),
        "{}",
        text(&out)
    );
    assert!(!d.join("t1").exists(), "nothing pinned");

    // A software P-256 key with every AK attribute bit: the TPM cannot activate a credential
    // made for its name.
    let soft = d.join("soft.json");
    with_ak(&m, &software_ak(), &soft);
    let out = enroll(&s, &soft, &root, &d.join("t2"));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        text(&out).contains("credential activation"),
        "{}",
        text(&out)
    );
    assert!(!d.join("t2").exists(), "nothing pinned");

    // The real AK with its fixedTPM bit cleared: refused before any activation.
    let m_json: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    let mut ak = hex::decode(m_json["groups"][0]["ak_public"].as_str().unwrap()).unwrap();
    ak[7] &= !0x02;
    let bits = d.join("bits.json");
    with_ak(&m, &ak, &bits);
    let out = enroll(&s, &bits, &root, &d.join("t3"));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        text(&out).contains("AK attributes: fixedTPM not set"),
        "{}",
        text(&out)
    );

    // And the genuine material still enrolls.
    let out = enroll(&s, &m, &root, &d.join("t4"));
    assert!(out.status.success(), "{}", text(&out));
}

/// A man in the middle on the admin socket that flips one bit of the activated secret.
fn tampering_proxy(upstream: PathBuf, listen: &Path) {
    let l = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut up = UnixStream::connect(&upstream).unwrap();
            while let Some(req) = read_frame(&mut c) {
                up.write_all(&(req.len() as u32).to_be_bytes()).unwrap();
                up.write_all(&req).unwrap();
                let Some(rsp) = read_frame(&mut up) else {
                    break;
                };
                let mut v: serde_json::Value = serde_json::from_slice(&rsp).unwrap();
                if v["result"] == "activated" {
                    let mut sec = hex::decode(v["secret"].as_str().unwrap()).unwrap();
                    sec[0] ^= 1;
                    v["secret"] = hex::encode(sec).into();
                }
                c.write_all(&mgr::encode(&v).unwrap()).unwrap();
            }
        }
    });
}

fn read_frame(s: &mut UnixStream) -> Option<Vec<u8>> {
    vtpm_proto::mgr_io::read_frame(s).ok().flatten().map(|b| b.to_vec())
}

#[test]
fn a_tampered_activation_answer_is_refused() {
    let s = stack();
    let d = s.dir.path();
    let root = s.ek_ca.as_ref().unwrap().root_cert();
    let m = material(&s);
    let fake_run = d.join("fake-run");
    std::fs::create_dir(&fake_run).unwrap();
    tampering_proxy(s.run_dir().join("admin.sock"), &fake_run.join("admin.sock"));
    let out = Command::new(testkit::bin_path("xl-vtpm"))
        .args([
            "--run-dir",
            p(&fake_run),
            "enroll",
            "--material",
            p(&m),
            "--ek-ca",
            p(&root),
            "--trust-store",
            p(&d.join("t")),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        text(&out).contains("credential activation: the secret returned"),
        "{}",
        text(&out)
    );
    assert!(!d.join("t").exists(), "nothing pinned");
    // Through the real socket the same material enrolls.
    assert!(enroll(&s, &m, &root, &d.join("t")).status.success());
}

/// Runs tpm2-tools `args` against `tcti` in `dir`, then flushes transient objects (swtpm has no
/// resource manager and only 3 object slots).
/// Writes `cred` in tpm2-tools' credential file format (`cred<tag>.bin`: magic, version, then
/// the blob and the encrypted secret as TPM2Bs) and runs `tpm2_activatecredential` with the AK
/// and EK contexts in `dir`, under a fresh PolicySecret(endorsement) session; the secret lands
/// in `out<tag>.bin`.
fn activate_in_tpm(
    dir: &Path,
    tcti: &str,
    cred: &vtpm_proto::credential::Credential,
    tag: &str,
) -> Output {
    let mut f = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
    for part in [&cred.blob, &cred.encrypted_secret] {
        f.extend_from_slice(&(part.len() as u16).to_be_bytes());
        f.extend_from_slice(part);
    }
    let (file, out, session) = (
        format!("cred{tag}.bin"),
        format!("out{tag}.bin"),
        format!("s{tag}.ctx"),
    );
    std::fs::write(dir.join(&file), &f).unwrap();
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o));
    ok(tpm2_in(
        dir,
        tcti,
        &["tpm2_startauthsession", "--policy-session", "-S", &session],
    ));
    ok(tpm2_in(
        dir,
        tcti,
        &["tpm2_policysecret", "-S", &session, "-c", "e"],
    ));
    let policy = format!("session:{session}");
    let result = tpm2_in(
        dir,
        tcti,
        &[
            "tpm2_activatecredential",
            "-c",
            "ak.ctx",
            "-C",
            "ek.ctx",
            "-i",
            &file,
            "-o",
            &out,
            "-P",
            &policy,
        ],
    );
    let _ = tpm2_in(dir, tcti, &["tpm2_flushcontext", &session]);
    result
}

fn tpm2_in(dir: &Path, tcti: &str, args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap();
    let _ = Command::new("tpm2_flushcontext")
        .arg("-t")
        .env("TPM2TOOLS_TCTI", tcti)
        .output();
    out
}

/// Our software MakeCredential, activated by tpm2-tools (`tpm2_activatecredential`) in a real
/// swtpm whose EK certificate came from the local CA: the credential format, the EK taken from
/// the certificate and the AK name computed from the public area all agree with the TPM.
#[test]
fn tpm2_activatecredential_in_swtpm_releases_our_credential() {
    use vtpm_proto::credential;
    let ca = testkit::LocalCa::new();
    let t = testkit::Swtpm::start_manufactured(&ca);
    let tcti = t.tcti();
    let dir = testkit::tempdir();
    let d = dir.path();
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o));
    ok(tpm2_in(
        d,
        &tcti,
        &["tpm2_nvread", "0x1c00002", "-o", "ek.der"],
    ));
    ok(tpm2_in(
        d,
        &tcti,
        &["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    ));
    ok(tpm2_in(
        d,
        &tcti,
        &[
            "tpm2_createak",
            "-C",
            "ek.ctx",
            "-c",
            "ak.ctx",
            "-G",
            "ecc",
            "-g",
            "sha256",
            "-s",
            "ecdsa",
            "-u",
            "ak.pub",
            "-n",
            "ak.name",
        ],
    ));
    ok(tpm2_in(
        d,
        &tcti,
        &["tpm2_readpublic", "-c", "ak.ctx", "-o", "ak.tpm2b"],
    ));

    let cert =
        vtpm_proto::ekcert::Certificate::parse(&std::fs::read(d.join("ek.der")).unwrap()).unwrap();
    let roots =
        [
            vtpm_proto::ekcert::Certificate::from_pem_or_der(
                &std::fs::read(ca.root_cert()).unwrap(),
            )
            .unwrap(),
        ];
    let inter = [vtpm_proto::ekcert::Certificate::from_pem_or_der(
        &std::fs::read(ca.intermediate_cert()).unwrap(),
    )
    .unwrap()];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let chain = credential::verify_ek_chain(&cert, &inter, &roots, now).unwrap();
    // Without the intermediate the chain does not reach the root.
    let e = credential::verify_ek_chain(&cert, &[], &roots, now).unwrap_err();
    assert!(e.to_string().contains("does not chain"), "{e}");
    let ek = credential::ek_rsa_key(&chain.ek_spki).unwrap();
    let ak_tpm2b = std::fs::read(d.join("ak.tpm2b")).unwrap();
    let name = credential::ak_name(&ak_tpm2b[2..]).unwrap();
    assert_eq!(
        name,
        std::fs::read(d.join("ak.name")).unwrap(),
        "our AK name is the TPM's"
    );

    let secret = *b"0123456789abcdef0123456789abcdef";
    let cred = credential::make_credential(&ek, &name, &secret).unwrap();
    ok(activate_in_tpm(d, &tcti, &cred, "1"));
    assert_eq!(std::fs::read(d.join("out1.bin")).unwrap(), secret);

    // A credential made for another name is refused by the TPM (integrity check).
    let mut other = name.clone();
    other[10] ^= 1;
    let cred = credential::make_credential(&ek, &other, &secret).unwrap();
    let out = activate_in_tpm(d, &tcti, &cred, "2");
    assert!(
        !out.status.success(),
        "a credential for another name must not activate"
    );
}
