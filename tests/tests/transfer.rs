//! Moving a vTPM between two managers (two "hosts": two real swtpms manufactured by private
//! vendor CAs, two `vtpmmgr serve`), driven by `xl-vtpm vtpm migrate` and the step commands
//! `xl-vtpm vtpm transfer …` (docs/migration.md). Every refusal names its check; every failure
//! point leaves the vTPM runnable on exactly one host with its state intact.

use std::path::{Path, PathBuf};
use std::process::Output;

use uuid::Uuid;
use xvtpm_tests::{Options, Stack, VtpmHandle, rc, read_public, tpm2};

fn host() -> Stack {
    Stack::start_with(Options { ek_cert: true, ..Default::default() })
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// Asserts `o` failed with exit code `code` and a message containing `what`.
fn refused(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    assert!(text(o).contains(what), "expected {what:?} in: {}", text(o));
}

/// The swtpm hosts' PCRs 0 and 7 (never extended: zero) as a policy, and one they miss.
fn policies(dir: &Path) -> (PathBuf, PathBuf) {
    let good = dir.join("policy.json");
    std::fs::write(&good, format!("{{\"0\": \"{0}\", \"7\": \"{0}\"}}", "00".repeat(32))).unwrap();
    let bad = dir.join("bad-policy.json");
    std::fs::write(&bad, format!("{{\"0\": \"{}\"}}", "11".repeat(32))).unwrap();
    (good, bad)
}

/// What a vTPM holds that must survive a move.
struct Contents {
    ek: Vec<u8>,
    key: String,
}

const NV: &str = "0x1500016";
const KEY: &str = "0x81000010";

/// Writes an NV index, a persistent key; reads the EK.
fn fill(s: &Stack, v: &VtpmHandle) -> Contents {
    let d = s.dir.path();
    let t = v.tcti();
    tpm2(&t, &["tpm2_nvdefine", NV, "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite"]);
    std::fs::write(d.join("nv.in"), b"movedNV!").unwrap();
    tpm2(&t, &["tpm2_nvwrite", NV, "-C", "o", "-i", p(&d.join("nv.in"))]);
    tpm2(&t, &["tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", p(&d.join("k.ctx"))]);
    tpm2(&t, &["tpm2_evictcontrol", "-C", "o", "-c", p(&d.join("k.ctx")), KEY]);
    tpm2(&t, &["tpm2_flushcontext", "-t"]);
    let ek = v.command(&read_public(0x8101_0001));
    assert_eq!(rc(&ek), 0);
    Contents { ek, key: tpm2(&t, &["tpm2_readpublic", "-c", KEY]) }
}

/// Checks a running vTPM holds `c`.
fn holds(v: &VtpmHandle, c: &Contents) {
    let t = v.tcti();
    assert_eq!(v.command(&read_public(0x8101_0001)), c.ek, "EK changed");
    assert_eq!(tpm2(&t, &["tpm2_nvread", NV, "-C", "o", "-s", "8"]), "movedNV!");
    assert_eq!(tpm2(&t, &["tpm2_readpublic", "-c", KEY]), c.key, "persistent key changed");
}

fn start_tcp(s: &Stack, uuid: &Uuid) -> VtpmHandle {
    Stack::handle(&s.xl_json(&["vtpm", "start", &uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]))
}

/// Runs the steps up to (excluding) the export; returns the offer file.
fn offer(a: &Stack, b: &Stack, uuid: &Uuid, policy: &Path, tag: &str) -> PathBuf {
    let d = a.dir.path();
    let ca = b.ek_ca.as_ref().unwrap();
    let material = d.join(format!("material-{tag}.json"));
    ok(b.xl(&["mgr", "enrollment", "--out", p(&material), "--ek-intermediate", p(&ca.intermediate_cert())]));
    let ch = d.join(format!("challenge-{tag}.json"));
    ok(a.xl(&["vtpm", "transfer", "challenge", &uuid.to_string(), "--material", p(&material), "--ek-ca", p(&ca.root_cert()), "--host-pcrs-policy", p(policy), "--out", p(&ch)]));
    let of = d.join(format!("offer-{tag}.json"));
    ok(b.xl(&["vtpm", "transfer", "offer", "--challenge", p(&ch), "--ek-intermediate", p(&ca.intermediate_cert()), "--out", p(&of)]));
    of
}

fn export(a: &Stack, b: &Stack, uuid: &Uuid, offer: &Path, policy: &Path, tag: &str) -> Output {
    let pkg = a.dir.path().join(format!("package-{tag}.json"));
    a.xl(&[
        "vtpm", "transfer", "export", &uuid.to_string(), "--offer", p(offer), "--ek-ca", p(&b.ek_ca.as_ref().unwrap().root_cert()),
        "--host-pcrs-policy", p(policy), "--to-name", "host-b", "--out", p(&pkg),
    ])
}

fn package(a: &Stack, tag: &str) -> PathBuf {
    a.dir.path().join(format!("package-{tag}.json"))
}

fn import(b: &Stack, pkg: &Path, receipt: &Path) -> Output {
    b.xl(&["vtpm", "transfer", "import", p(pkg), "--out", p(receipt)])
}

fn commit(a: &Stack, uuid: &Uuid, receipt: &Path) -> Output {
    a.xl(&["vtpm", "transfer", "commit", &uuid.to_string(), "--receipt", p(receipt)])
}

fn migrate(from: &Stack, to: &Stack, uuid: &Uuid, policy: &Path) -> Output {
    let ca = to.ek_ca.as_ref().unwrap();
    from.xl(&[
        "vtpm", "migrate", &uuid.to_string(), "--to-run-dir", p(&to.run_dir()), "--to-state-dir", p(&to.state_dir()), "--ek-ca", p(&ca.root_cert()),
        "--ek-intermediate", p(&ca.intermediate_cert()), "--host-pcrs-policy", p(policy), "--to-name", "host-b",
    ])
}

/// A stopped vTPM on `a` holding NV, a persistent key and its EK.
fn filled_vtpm(a: &Stack) -> (Uuid, Contents) {
    let v = a.create_vtpm();
    let c = fill(a, &v);
    a.stop_vtpm(&v.uuid);
    (v.uuid, c)
}

/// `uuid` cannot start on `s`; the refusal contains `why`.
fn cannot_start(s: &Stack, uuid: &Uuid, why: &str) {
    let o = s.xl(&["vtpm", "start", &uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]);
    refused(&o, 6, why);
}

#[test]
fn a_vtpm_moves_with_its_ek_nv_and_keys_and_the_source_copy_is_retired() {
    let (a, b) = (host(), host());
    let (good, _) = policies(a.dir.path());
    let (uuid, c) = filled_vtpm(&a);
    let out = ok(migrate(&a, &b, &uuid, &good));
    assert!(text(&out).contains("moved to host"), "{}", text(&out));
    assert!(!a.state_dir().join("vtpms").join(uuid.to_string()).join("state.xvts").exists(), "the source's state file is removed");

    let v = start_tcp(&b, &uuid);
    holds(&v, &c);
    // The moved vTPM keeps working and writing on its new host.
    tpm2(&v.tcti(), &["tpm2_getrandom", "8"]);
    cannot_start(&a, &uuid, "was transferred to host-b");
    // Its store records nothing a dom0 reader could use: the imported key is wrapped.
    let store = std::fs::read_to_string(b.state_dir().join("mgr").join("manager.json")).unwrap();
    assert!(store.contains("imported_key"), "{store}");

    // And back again: B → A, then A runs it with the same contents.
    b.stop_vtpm(&uuid);
    let a_ca = a.ek_ca.as_ref().unwrap();
    let back = b.xl(&[
        "vtpm", "migrate", &uuid.to_string(), "--to-run-dir", p(&a.run_dir()), "--to-state-dir", p(&a.state_dir()), "--ek-ca", p(&a_ca.root_cert()),
        "--ek-intermediate", p(&a_ca.intermediate_cert()), "--host-pcrs-policy", p(&good),
    ]);
    ok(back);
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
    cannot_start(&b, &uuid, "was transferred to");
}

#[test]
fn refusals_name_their_check() {
    let (a, b) = (host(), host());
    let d = a.dir.path();
    let (good, bad_policy) = policies(d);
    let (uuid, c) = filled_vtpm(&a);
    let ca = b.ek_ca.as_ref().unwrap();
    let material = d.join("material.json");
    ok(b.xl(&["mgr", "enrollment", "--out", p(&material), "--ek-intermediate", p(&ca.intermediate_cert())]));

    // A destination whose EK certificate does not chain to the roots given.
    let other = testkit::LocalCa::new();
    let _made_by_other = testkit::Swtpm::start_manufactured(&other);
    let ch = d.join("ch.json");
    let o = a.xl(&["vtpm", "transfer", "challenge", &uuid.to_string(), "--material", p(&material), "--ek-ca", p(&other.root_cert()), "--host-pcrs-policy", p(&good), "--out", p(&ch)]);
    refused(&o, 6, "EK certificate chain");

    // An unenrolled AK: a software key with every AK attribute. The challenge is made for it,
    // and the destination's TPM refuses to activate it (its AK has another name).
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&material).unwrap()).unwrap();
    m["groups"][0]["ak_public"] = hex::encode(software_ak()).into();
    let fake = d.join("fake-material.json");
    std::fs::write(&fake, serde_json::to_vec(&m).unwrap()).unwrap();
    ok(a.xl(&["vtpm", "transfer", "challenge", &uuid.to_string(), "--material", p(&fake), "--ek-ca", p(&ca.root_cert()), "--host-pcrs-policy", p(&good), "--out", p(&ch)]));
    let o = b.xl(&["vtpm", "transfer", "offer", "--challenge", p(&ch), "--out", p(&d.join("x.json"))]);
    refused(&o, 6, "credential activation");

    // A transfer key that is a software key (every attribute claimed): not certified by the AK.
    let of = offer(&a, &b, &uuid, &good, "1");
    let mut offer_v: serde_json::Value = serde_json::from_slice(&std::fs::read(&of).unwrap()).unwrap();
    let mut sw = offer_v.clone();
    sw["key_public"] = hex::encode(software_rsa_key(0x0002_0472)).into();
    let swf = d.join("sw-offer.json");
    std::fs::write(&swf, serde_json::to_vec(&sw).unwrap()).unwrap();
    refused(&export(&a, &b, &uuid, &swf, &good, "sw"), 6, "transfer key certification by the destination's AK");
    // A transfer key without fixedTPM.
    let mut loose = offer_v.clone();
    let key = hex::decode(offer_v["key_public"].as_str().unwrap()).unwrap();
    let mut k = key.clone();
    k[7] &= !0x02;
    loose["key_public"] = hex::encode(k).into();
    std::fs::write(&swf, serde_json::to_vec(&loose).unwrap()).unwrap();
    refused(&export(&a, &b, &uuid, &swf, &good, "loose"), 6, "transfer key: fixedTPM not set");
    // An activation proof that is not the destination's.
    offer_v["activation_proof"] = "00".repeat(32).into();
    std::fs::write(&swf, serde_json::to_vec(&offer_v).unwrap()).unwrap();
    refused(&export(&a, &b, &uuid, &swf, &good, "proof"), 6, "credential activation");
    // A destination whose PCRs miss the policy.
    let of_bad = offer(&a, &b, &uuid, &bad_policy, "2");
    refused(&export(&a, &b, &uuid, &of_bad, &bad_policy, "pcr"), 6, "destination host PCRs: host PCR 0 is");
    // None of these moved anything: the vTPM still runs on A.
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
    // A running vTPM is not exported.
    refused(&export(&a, &b, &uuid, &of, &good, "running"), 6, "is running");
    a.stop_vtpm(&uuid);

    // A tampered package: B refuses it, A stays "exporting" (not runnable) until B's
    // cancellation lets it abort; then A runs the vTPM again, intact.
    ok(export(&a, &b, &uuid, &of, &good, "t"));
    cannot_start(&a, &uuid, "is being transferred to host-b");
    let mut pkg: serde_json::Value = serde_json::from_slice(&std::fs::read(package(&a, "t")).unwrap()).unwrap();
    let ct = pkg["ciphertext"].as_str().unwrap().to_string();
    let flipped = format!("{}{}", if ct.starts_with('0') { "1" } else { "0" }, &ct[1..]);
    pkg["ciphertext"] = flipped.into();
    let tampered = d.join("tampered.json");
    std::fs::write(&tampered, serde_json::to_vec(&pkg).unwrap()).unwrap();
    refused(&import(&b, &tampered, &d.join("r.json")), 6, "does not authenticate");
    assert!(!b.xl(&["vtpm", "start", &uuid.to_string()]).status.success(), "B has no copy to run");
    // Abort needs the destination's cancellation, not just anything.
    let offer_id = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&of).unwrap()).unwrap()["offer_id"].as_str().unwrap().to_string();
    let cancel = d.join("cancel.json");
    ok(b.xl(&["vtpm", "transfer", "cancel", &offer_id, "--out", p(&cancel)]));
    // The cancelled offer's package can no longer be imported.
    refused(&import(&b, &package(&a, "t"), &d.join("r.json")), 6, "withdrawn");
    ok(a.xl(&["vtpm", "transfer", "abort", &uuid.to_string(), "--receipt", p(&cancel)]));
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
    a.stop_vtpm(&uuid);

    // Importing twice, and a package replayed after the vTPM came back.
    let of3 = offer(&a, &b, &uuid, &good, "3");
    ok(export(&a, &b, &uuid, &of3, &good, "3"));
    let r3 = d.join("r3.json");
    ok(import(&b, &package(&a, "3"), &r3));
    refused(&import(&b, &package(&a, "3"), &d.join("r.json")), 6, "already imported");
    // The abort refuses an import receipt; the commit refuses a cancellation.
    refused(&a.xl(&["vtpm", "transfer", "abort", &uuid.to_string(), "--receipt", p(&r3)]), 6, "abort refused");
    refused(&commit(&a, &uuid, &cancel), 6, "commit refused");
    ok(commit(&a, &uuid, &r3));
    ok(migrate(&b, &a, &uuid, &good));
    refused(&import(&b, &package(&a, "3"), &d.join("r.json")), 6, "older (replayed) package");
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
}

/// Kill -9 of either manager between any two steps: the vTPM ends on exactly one host, intact.
#[test]
fn killed_managers_leave_exactly_one_runnable_copy() {
    let (mut a, mut b) = (host(), host());
    let d = a.dir.path().to_path_buf();
    let (good, _) = policies(&d);
    let (uuid, c) = filled_vtpm(&a);

    // 1. The source is killed after export, before commit: it restarts "exporting" (not
    //    runnable); the destination imports; the commit completes the move.
    let of = offer(&a, &b, &uuid, &good, "k1");
    ok(export(&a, &b, &uuid, &of, &good, "k1"));
    a.kill9_manager();
    a.start_manager();
    cannot_start(&a, &uuid, "is being transferred");
    // 2. The destination is killed before the import: the offer survives its restart.
    b.kill9_manager();
    b.start_manager();
    let r = d.join("r1.json");
    ok(import(&b, &package(&a, "k1"), &r));
    cannot_start(&a, &uuid, "is being transferred");
    ok(commit(&a, &uuid, &r));
    cannot_start(&a, &uuid, "was transferred to host-b");
    let v = start_tcp(&b, &uuid);
    holds(&v, &c);
    b.stop_vtpm(&uuid);

    // 3. Back to A; the destination (A) is killed right after its import, and the receipt is
    //    lost: the restarted A issues it again and B commits.
    let of = offer(&b, &a, &uuid, &good, "k2");
    let pkg = b.dir.path().join("package-k2.json");
    let a_ca = a.ek_ca.as_ref().unwrap();
    ok(b.xl(&[
        "vtpm", "transfer", "export", &uuid.to_string(), "--offer", p(&of), "--ek-ca", p(&a_ca.root_cert()), "--host-pcrs-policy", p(&good),
        "--out", p(&pkg),
    ]));
    let lost = d.join("lost.json");
    ok(import(&a, &pkg, &lost));
    std::fs::remove_file(&lost).unwrap();
    a.kill9_manager();
    a.start_manager();
    cannot_start(&b, &uuid, "is being transferred");
    let again = d.join("again.json");
    ok(a.xl(&["vtpm", "transfer", "receipt", &uuid.to_string(), "--out", p(&again)]));
    ok(commit(&b, &uuid, &again));
    cannot_start(&b, &uuid, "was transferred to");
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
    a.stop_vtpm(&uuid);

    // 4. The destination is killed after the offer and the export, and comes back; it
    //    withdraws the offer instead of importing: the source aborts and keeps the vTPM.
    let of = offer(&a, &b, &uuid, &good, "k4");
    ok(export(&a, &b, &uuid, &of, &good, "k4"));
    b.kill9_manager();
    b.start_manager();
    let offer_id = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&of).unwrap()).unwrap()["offer_id"].as_str().unwrap().to_string();
    let cancel = d.join("cancel4.json");
    ok(b.xl(&["vtpm", "transfer", "cancel", &offer_id, "--out", p(&cancel)]));
    a.kill9_manager();
    a.start_manager();
    ok(a.xl(&["vtpm", "transfer", "abort", &uuid.to_string(), "--receipt", p(&cancel)]));
    refused(&import(&b, &package(&a, "k4"), &d.join("r4.json")), 6, "withdrawn");
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
    assert!(!b.xl(&["vtpm", "start", &uuid.to_string()]).status.success(), "B has no copy to run");
}

/// A TPMT_PUBLIC for a *software* P-256 key that claims every attribute of a TPM-made AK.
fn software_ak() -> Vec<u8> {
    let sk = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let pt = sk.verifying_key().to_encoded_point(false);
    let mut t = vec![0x00, 0x23, 0x00, 0x0b];
    t.extend_from_slice(&0x0005_0472u32.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0x00, 0x10, 0x00, 0x18, 0x00, 0x0b, 0x00, 0x03, 0x00, 0x10]);
    for c in [pt.x().unwrap(), pt.y().unwrap()] {
        t.extend_from_slice(&[0, 32]);
        t.extend_from_slice(c);
    }
    t
}

/// A TPMT_PUBLIC for a *software* RSA-2048 OAEP decryption key with attributes `attrs`.
fn software_rsa_key(attrs: u32) -> Vec<u8> {
    use rsa::traits::PublicKeyParts as _;
    let sk = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let mut t = vec![0x00, 0x01, 0x00, 0x0b];
    t.extend_from_slice(&attrs.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0x00, 0x10, 0x00, 0x17, 0x00, 0x0b, 0x08, 0x00, 0, 0, 0, 0, 0x01, 0x00]);
    t.extend_from_slice(&sk.n().to_bytes_be());
    t
}
