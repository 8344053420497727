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
        "vtpm", "migrate", &uuid.to_string(), "--to-run-dir", p(&to.run_dir()), "--ek-ca", p(&ca.root_cert()),
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
        "vtpm", "migrate", &uuid.to_string(), "--to-run-dir", p(&a.run_dir()), "--ek-ca", p(&a_ca.root_cert()),
        "--ek-intermediate", p(&a_ca.intermediate_cert()), "--host-pcrs-policy", p(&good),
    ]);
    ok(back);
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
    cannot_start(&b, &uuid, "was transferred to");
}

/// PCR 16 of a running vTPM (SHA-256 bank), as tpm2_pcrread prints it.
fn pcr16(v: &VtpmHandle) -> String {
    tpm2(&v.tcti(), &["tpm2_pcrread", "sha256:16"])
}

/// A vTPM stopped with `--suspend` keeps its running TPM through a move: the destination's
/// first start resumes its PCRs (a guest moving with its vTPM keeps them, as across a
/// suspend), and only that start: the next one is a boot. Without `--suspend` a move resets
/// them (the control).
#[test]
fn a_suspended_vtpm_moves_with_its_pcrs_and_resumes_them_once() {
    let (a, b) = (host(), host());
    let (good, _) = policies(a.dir.path());
    let v = a.create_vtpm();
    let c = fill(&a, &v);
    let zero = pcr16(&v);
    tpm2(&v.tcti(), &["tpm2_pcrextend", &format!("16:sha256={}", "ab".repeat(32))]);
    let extended = pcr16(&v);
    assert_ne!(extended, zero);
    let out = ok(a.xl(&["vtpm", "stop", &v.uuid.to_string(), "--suspend"]));
    assert!(text(&out).contains("suspended vTPM"), "{}", text(&out));
    // Suspending a vTPM that does not run is refused.
    refused(&a.xl(&["vtpm", "stop", &v.uuid.to_string(), "--suspend"]), 6, "there is no running TPM to suspend");
    ok(migrate(&a, &b, &v.uuid, &good));

    let started = b.xl_json(&["vtpm", "start", &v.uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]);
    assert_eq!(started["runtime"]["resumed"], true, "the runtime says the TPM runs as suspended: {started}");
    let w = Stack::handle(&started);
    holds(&w, &c);
    assert_eq!(pcr16(&w), extended, "the moved vTPM resumes with the PCRs it was suspended with");
    // The control: a plain stop and a move back reset them.
    b.stop_vtpm(&v.uuid);
    let started = b.xl_json(&["vtpm", "start", &v.uuid.to_string(), "--listen", "tcp:127.0.0.1:0"]);
    assert!(started["runtime"].get("resumed").is_none(), "a boot is not a resume: {started}");
    let w = Stack::handle(&started);
    assert_eq!(pcr16(&w), zero, "the volatile state is resumed once: the next start is a boot");
    tpm2(&w.tcti(), &["tpm2_pcrextend", &format!("16:sha256={}", "cd".repeat(32))]);
    b.stop_vtpm(&v.uuid);
    let a_ca = a.ek_ca.as_ref().unwrap();
    ok(b.xl(&[
        "vtpm", "migrate", &v.uuid.to_string(), "--to-run-dir", p(&a.run_dir()), "--ek-ca", p(&a_ca.root_cert()),
        "--ek-intermediate", p(&a_ca.intermediate_cert()), "--host-pcrs-policy", p(&good),
    ]));
    let x = start_tcp(&a, &v.uuid);
    holds(&x, &c);
    assert_eq!(pcr16(&x), zero, "stopped without --suspend, the move resets the PCRs");
}

/// `TransferVerify` makes the export's checks of an offer and nothing else: a guest moving to
/// another host is refused while it still runs (`xl-vtpm migrate GUEST HOST`), and the vTPM is
/// neither marked exporting nor stopped by it.
#[test]
fn an_offer_is_verified_before_anything_moves() {
    let (a, b) = (host(), host());
    let (good, bad) = policies(a.dir.path());
    let v = a.create_vtpm();
    let of = offer(&a, &b, &v.uuid, &good, "verify");
    let o: vtpm_proto::transfer::Offer = serde_json::from_slice(&std::fs::read(&of).unwrap()).unwrap();
    let roots = xl_tools::transfer::read_certs(&[b.ek_ca.as_ref().unwrap().root_cert()], "--ek-ca").unwrap();
    let mut admin = xl_tools::admin::Admin::connect(&a.run_dir()).unwrap();
    let policy = |p: &Path| xl_tools::transfer::read_policy(p).unwrap();
    // The running vTPM may be checked against; the destination's PCRs miss the bad policy.
    xl_tools::transfer::verify(&mut admin, v.uuid, &o, &roots, &policy(&good)).unwrap();
    let e = xl_tools::transfer::verify(&mut admin, v.uuid, &o, &roots, &policy(&bad)).unwrap_err();
    assert_eq!(e.code, 6, "{}", e.text());
    assert!(e.text().contains("destination host PCRs: host PCR 0 is"), "{}", e.text());
    // Another vendor's roots: the EK chain.
    let other = xl_tools::transfer::read_certs(&[a.ek_ca.as_ref().unwrap().root_cert()], "--ek-ca").unwrap();
    let e = xl_tools::transfer::verify(&mut admin, v.uuid, &o, &other, &policy(&good)).unwrap_err();
    assert!(e.text().contains("EK certificate"), "{}", e.text());
    // Nothing was marked: the vTPM still serves, and after a stop it starts again here.
    tpm2(&v.tcti(), &["tpm2_getrandom", "8"]);
    a.stop_vtpm(&v.uuid);
    let w = start_tcp(&a, &v.uuid);
    tpm2(&w.tcti(), &["tpm2_getrandom", "8"]);
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

/// Offers that no move used stay open on the destination (their keys in its store) until
/// withdrawn; at the cap the refusal lists each by id, vTPM and age, and names the command that
/// withdraws one, which frees a place.
#[test]
fn a_destination_full_of_unused_offers_names_them_and_how_to_withdraw_one() {
    let (a, b) = (host(), host());
    let d = a.dir.path();
    let (good, _) = policies(d);
    let v = a.create_vtpm();
    let ids: Vec<String> = (0..vtpmmgr::manager::transfer::MAX_OPEN_OFFERS)
        .map(|n| {
            let of = offer(&a, &b, &v.uuid, &good, &format!("open{n}"));
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&of).unwrap()).unwrap()["offer_id"].as_str().unwrap().to_string()
        })
        .collect();
    let material = d.join("material-open0.json");
    let ch = d.join("challenge-full.json");
    ok(a.xl(&["vtpm", "transfer", "challenge", &v.uuid.to_string(), "--material", p(&material), "--ek-ca", p(&b.ek_ca.as_ref().unwrap().root_cert()), "--host-pcrs-policy", p(&good), "--out", p(&ch)]));
    let full = b.xl(&["vtpm", "transfer", "offer", "--challenge", p(&ch), "--out", p(&d.join("full.json"))]);
    refused(&full, 1, "transfer offers are outstanding");
    for id in &ids {
        assert!(text(&full).contains(id), "the refusal names offer {id}: {}", text(&full));
    }
    // The command the refusal names, as it names it, withdraws one.
    let told = text(&full);
    let cmd = told.split('`').nth(1).expect("a command in backquotes");
    let args: Vec<String> = cmd.split_whitespace().skip(1).map(|w| match w {
        "OFFER" => ids[3].clone(),
        "FILE" => p(&d.join("withdrawn.json")).to_string(),
        w => w.to_string(),
    }).collect();
    ok(b.xl(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    ok(b.xl(&["vtpm", "transfer", "offer", "--challenge", p(&ch), "--out", p(&d.join("full.json"))]));
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

/// The destination manager writes the imported vTPM's state file itself (the CLI writes
/// nothing for it), durably, before it answers: `kill -9` of the destination manager the
/// moment the file appears — before its answer — fails the import for the CLI, and the restarted
/// destination completes the move (receipt again if the store write was made, else the import
/// again): the vTPM runs on B with its EK, NV and keys, and nowhere else.
#[test]
fn the_destination_writes_the_state_file_before_answering_and_a_kill_there_is_recoverable() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let a = host();
    // A slow physical TPM on B (a discrete TPM's pace): its store write and receipt quote after
    // the state file take many TPM commands, so the kill lands before the answer.
    let mut b = Stack::start_with(Options { ek_cert: true, tpm_delay: Some(Duration::from_millis(30)), ..Default::default() });
    let d = a.dir.path().to_path_buf();
    let (good, _) = policies(&d);
    let (uuid, c) = filled_vtpm(&a);
    let of = offer(&a, &b, &uuid, &good, "w");
    ok(export(&a, &b, &uuid, &of, &good, "w"));
    let written = b.state_dir().join("vtpms").join(uuid.to_string()).join("state.xvts");
    assert!(!written.exists());
    let receipt = d.join("rw.json");
    let pkg = package(&a, "w");
    // An older xl-vtpm (no protocol field: it would install the state file itself) is refused
    // before anything happens.
    let old_cli = serde_json::json!({"op": "transfer-import", "package": serde_json::from_slice::<serde_json::Value>(&std::fs::read(&pkg).unwrap()).unwrap()});
    let rep: serde_json::Value = xvtpm_tests::mgr_call(&b.run_dir().join("admin.sock"), &old_cli);
    assert!(rep.to_string().contains("transfer protocol 2"), "{rep}");
    assert!(!written.exists());
    let cli = b.xl_command(&["vtpm", "transfer", "import", p(&pkg), "--out", p(&receipt)]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !written.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(written.exists(), "the destination never wrote the state file");
    b.kill9_manager();
    let out = cli.wait_with_output().unwrap();
    assert!(!out.status.success(), "the import was answered before the destination wrote the state file: {}", text(&out));
    assert!(!receipt.exists());
    // What is on disk is the whole state the source anchored, mode 0600.
    let src_state = a.state_dir().join("vtpms").join(uuid.to_string()).join("state.xvts");
    assert_eq!(std::fs::read(&written).unwrap(), std::fs::read(&src_state).unwrap());
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&written).unwrap().permissions().mode() & 0o777, 0o600);
    cannot_start(&a, &uuid, "is being transferred");

    b.start_manager();
    if !b.xl(&["vtpm", "transfer", "receipt", &uuid.to_string(), "--out", p(&receipt)]).status.success() {
        ok(import(&b, &pkg, &receipt));
    }
    ok(commit(&a, &uuid, &receipt));
    cannot_start(&a, &uuid, "was transferred to host-b");
    let v = start_tcp(&b, &uuid);
    holds(&v, &c);
}

/// The destination is lost for good while the vTPM is exporting (its host and TPM destroyed:
/// nothing can open the package any more, and no cancellation can be had): the source's
/// administrator returns the vTPM to service with `transfer abort --force --destination-lost
/// HOST_ID`, naming the destination the export was made for (another host id is refused, and
/// so is an abort with neither receipt nor force). The vTPM runs on the source intact, and its
/// next move (to a new host) carries a transfer generation past the abandoned package's.
#[test]
fn a_vtpm_exporting_to_a_lost_destination_is_returned_by_a_forced_abort() {
    let a = host();
    let b = host();
    let d = a.dir.path().to_path_buf();
    let (good, _) = policies(&d);
    let (uuid, c) = filled_vtpm(&a);
    let of = offer(&a, &b, &uuid, &good, "lost");
    ok(export(&a, &b, &uuid, &of, &good, "lost"));
    let lost_host = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&of).unwrap()).unwrap()["host_id"].as_str().unwrap().to_string();
    let abandoned: serde_json::Value = serde_json::from_slice(&std::fs::read(package(&a, "lost")).unwrap()).unwrap();
    // B is destroyed: its manager, its TPM (the transfer key and its master secret with it).
    drop(b);
    cannot_start(&a, &uuid, &lost_host);

    let u = uuid.to_string();
    let o = a.xl(&["vtpm", "transfer", "abort", &u]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    refused(&a.xl(&["vtpm", "transfer", "abort", &u, "--force", "--destination-lost", &"ab".repeat(32)]), 6, "not to host");
    cannot_start(&a, &uuid, "is being transferred");
    ok(a.xl(&["vtpm", "transfer", "abort", &u, "--force", "--destination-lost", &lost_host]));
    let v = start_tcp(&a, &uuid);
    holds(&v, &c);
    a.stop_vtpm(&uuid);

    // The next move goes to a new host, at a generation past the abandoned package's.
    let c2 = host();
    let of = offer(&a, &c2, &uuid, &good, "next");
    ok(export(&a, &c2, &uuid, &of, &good, "next"));
    let next: serde_json::Value = serde_json::from_slice(&std::fs::read(package(&a, "next")).unwrap()).unwrap();
    assert!(next["generation"].as_u64().unwrap() > abandoned["generation"].as_u64().unwrap(), "{next} {abandoned}");
    let r = d.join("r-next.json");
    ok(import(&c2, &package(&a, "next"), &r));
    ok(commit(&a, &uuid, &r));
    let v = start_tcp(&c2, &uuid);
    holds(&v, &c);
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
