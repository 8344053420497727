//! The manager's store against its rollback counter in the (software) physical TPM: older
//! copies, edited copies, interrupted writes, a deleted counter and the format-1 migration.
//! Every test has its own swtpm; crash windows are produced with the same TPM commands the
//! manager uses (no mocks, no timing).

use std::path::{Path, PathBuf};

use testkit::Swtpm;
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, StoreCounterInfo};
use vtpmmgr::deepquote::BatchConfig;
use vtpmmgr::hwtpm::{CounterProbe, HwTpm, STORE_COUNTER_FIRST};
use vtpmmgr::manager::{Config, Manager, OpenError};
use vtpmmgr::rollback::pending_path;
use vtpmmgr::store::{self, Store, StoreKeys};

fn cfg(tpm: &Swtpm, dir: &Path) -> Config {
    Config { tcti: tpm.tcti(), state_dir: dir.join("state"), run_dir: dir.join("run"), vtpm_state_dir: dir.join("state"), batch: BatchConfig::default() }
}

fn open(tpm: &Swtpm, dir: &Path) -> Manager {
    match Manager::open(cfg(tpm, dir)) {
        Ok(m) => m,
        Err(e) => panic!("manager refused to open: {e}"),
    }
}

fn refused(tpm: &Swtpm, dir: &Path) -> OpenError {
    match Manager::open(cfg(tpm, dir)) {
        Ok(_) => panic!("manager opened"),
        Err(e) => e,
    }
}

fn ok(r: AdminReply) -> AdminReply {
    assert!(matches!(r, AdminReply::Ok | AdminReply::Vtpm(_) | AdminReply::Status(_) | AdminReply::Group(_)), "{r:?}");
    r
}

fn counter(m: &mut Manager) -> StoreCounterInfo {
    match m.admin(AdminRequest::Status) {
        AdminReply::Status(s) => *s.store_counter.expect("a provisioned manager reports its store counter"),
        r => panic!("{r:?}"),
    }
}

fn create(m: &mut Manager, u: Uuid) {
    ok(m.admin(AdminRequest::VtpmCreate { group: None, uuid: Some(u) }));
}

fn vtpms(m: &mut Manager) -> Vec<Uuid> {
    match m.admin(AdminRequest::VtpmList) {
        AdminReply::Vtpms { vtpms } => vtpms.into_iter().map(|v| v.uuid).collect(),
        r => panic!("{r:?}"),
    }
}

/// A provisioned manager with vTPM `a`; returns the store path.
fn provisioned(tpm: &Swtpm, dir: &Path, a: Uuid) -> PathBuf {
    let mut m = open(tpm, dir);
    ok(m.admin(AdminRequest::Provision { pcrs: vec![16] }));
    create(&mut m, a);
    m.config().store_path()
}

/// What the manager itself would use to write the store (the TPM connection, the keys
/// unsealed from the store's own record, the verified store). The manager must be closed:
/// swtpm serves one connection at a time.
fn as_manager(tpm: &Swtpm, path: &Path) -> (HwTpm, StoreKeys, Store) {
    let mut hw = HwTpm::open(&tpm.tcti()).unwrap();
    let u = store::read(path).unwrap().unwrap();
    let master = hw.unseal_master(u.provision().unwrap()).unwrap();
    let keys = StoreKeys::derive(&master);
    let s = u.verify(&keys).unwrap();
    (hw, keys, s)
}

#[test]
fn restarts_keep_working_and_every_write_moves_the_counter_once() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let path = provisioned(&tpm, dir.path(), a);
    let c0 = {
        let mut m = open(&tpm, dir.path());
        let c = counter(&mut m);
        assert_eq!(c.nv_index, STORE_COUNTER_FIRST);
        assert_eq!(c.tpm_value, Some(c.store_value));
        let t = std::time::Instant::now();
        create(&mut m, b);
        eprintln!("TIMING VtpmCreate (stage, NV increment + read-back, rename): {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        ok(m.admin(AdminRequest::GroupAdd { name: "g2".into() }));
        let c2 = counter(&mut m);
        assert_eq!((c2.store_value, c2.tpm_value), (c.store_value + 2, Some(c.store_value + 2)));
        // A refused change writes nothing.
        assert!(matches!(m.admin(AdminRequest::VtpmCreate { group: None, uuid: Some(a) }), AdminReply::Error(_)));
        assert_eq!(counter(&mut m).store_value, c.store_value + 2);
        c2
    };
    for _ in 0..3 {
        let mut m = open(&tpm, dir.path());
        assert_eq!(counter(&mut m), c0, "a start without changes moved the counter");
        let mut v = vtpms(&mut m);
        v.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(v, want);
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"version\": 2") && text.contains("\"mac\"") && text.contains("\"nv_index\": \"0x01805600\""), "{text}");
    assert!(!pending_path(&path).exists());
}

#[test]
fn an_older_copy_is_refused_untouched_until_the_newest_is_back_or_it_is_accepted() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let a = Uuid::new_v4();
    let path = provisioned(&tpm, dir.path(), a);
    let old = std::fs::read(&path).unwrap();
    let (old_value, new_value) = {
        let mut m = open(&tpm, dir.path());
        let before = counter(&mut m).store_value;
        ok(m.admin(AdminRequest::VtpmDel { uuid: a }));
        (before, counter(&mut m).store_value)
    };
    assert_eq!(new_value, old_value + 1);
    let newest = std::fs::read(&path).unwrap();

    // Put back the copy that still has vTPM `a` (one write behind: no staged write explains it).
    std::fs::write(&path, &old).unwrap();
    let e = refused(&tpm, dir.path()).to_string();
    eprintln!("expected refusal: {e}");
    for needle in [
        path.display().to_string(),
        format!("records write {old_value}"),
        format!("counter 0x01805600 is at {new_value}"),
        "vtpmmgr accept-store --yes".into(),
        "newest copy".into(),
    ] {
        assert!(e.contains(&needle), "refusal does not say {needle:?}: {e}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), old, "the refused store was modified");
    assert!(!pending_path(&path).exists());

    // The newest copy opens again, without `a`.
    std::fs::write(&path, &newest).unwrap();
    assert!(!vtpms(&mut open(&tpm, dir.path())).contains(&a));

    // Or the admin accepts the old copy knowingly: `a` is back, at a new counter value.
    std::fs::write(&path, &old).unwrap();
    let note = vtpmmgr::accept_store(&cfg(&tpm, dir.path())).unwrap();
    assert!(note.contains(&format!("is now write {}", new_value + 1)), "{note}");
    let mut m = open(&tpm, dir.path());
    assert!(vtpms(&mut m).contains(&a));
    assert_eq!(counter(&mut m).store_value, new_value + 1);
    drop(m);
    // Accepting a store that matches is a no-op.
    assert!(vtpmmgr::accept_store(&cfg(&tpm, dir.path())).unwrap().contains("nothing to do"));
}

#[test]
fn editing_the_recorded_counter_or_anything_else_is_refused() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let a = Uuid::new_v4();
    let path = provisioned(&tpm, dir.path(), a);
    let old = std::fs::read_to_string(&path).unwrap();
    let (old_value, new_value) = {
        let mut m = open(&tpm, dir.path());
        let before = counter(&mut m).store_value;
        ok(m.admin(AdminRequest::VtpmDel { uuid: a }));
        (before, counter(&mut m).store_value)
    };
    let edits = [
        // The old copy, claiming to be the newest write.
        old.replace(&format!("\"value\": {old_value}"), &format!("\"value\": {new_value}")),
        // The newest copy with another vTPM identity slipped in.
        std::fs::read_to_string(&path).unwrap().replace("\"vtpms\": []", &format!("\"vtpms\": [{{\"uuid\": \"{a}\", \"group\": \"{a}\", \"created\": 1}}]")),
        // The newest copy without its MAC.
        {
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("mac");
            serde_json::to_string(&v).unwrap()
        },
    ];
    let newest = std::fs::read(&path).unwrap();
    for edited in edits {
        assert_ne!(edited.as_bytes(), &newest[..], "the edit changed nothing");
        std::fs::write(&path, &edited).unwrap();
        let e = refused(&tpm, dir.path()).to_string();
        assert!(e.contains("fails its integrity check") && e.contains(&path.display().to_string()), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), edited, "the refused store was modified");
        // accept-store does not accept what does not verify either.
        assert!(vtpmmgr::accept_store(&cfg(&tpm, dir.path())).is_err());
    }
    std::fs::write(&path, &newest).unwrap();
    open(&tpm, dir.path());
}

#[test]
fn a_write_interrupted_after_the_increment_is_completed_at_start() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let path = provisioned(&tpm, dir.path(), a);
    // Steps 1 and 2 of a write adding `b`, then "the manager dies" before step 3.
    let staged = {
        let (mut hw, keys, mut s) = as_manager(&tpm, &path);
        let mut c = s.counter.unwrap();
        c.value += 1;
        s.counter = Some(c);
        s.vtpms.push(store::VtpmEntry { uuid: b, group: s.groups[0].uuid, created: 1, ek: None, state: None });
        let bytes = store::encode(&s, &keys);
        std::fs::write(pending_path(&path), &bytes).unwrap();
        assert_eq!(hw.counter_increment(c.nv_index, keys.nv_auth()).unwrap(), c.value);
        bytes
    };
    let mut m = open(&tpm, dir.path());
    assert!(vtpms(&mut m).contains(&b), "the committed write was not completed");
    let c = counter(&mut m);
    assert_eq!(c.tpm_value, Some(c.store_value));
    assert_eq!(std::fs::read(&path).unwrap(), staged);
    assert!(!pending_path(&path).exists());
}

#[test]
fn a_write_staged_before_the_increment_is_completed_at_start() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let path = provisioned(&tpm, dir.path(), a);
    let before = {
        let (mut hw, keys, mut s) = as_manager(&tpm, &path);
        let c = s.counter.unwrap();
        s.counter = Some(store::CounterRecord { value: c.value + 1, ..c });
        s.vtpms.push(store::VtpmEntry { uuid: b, group: s.groups[0].uuid, created: 1, ek: None, state: None });
        std::fs::write(pending_path(&path), store::encode(&s, &keys)).unwrap();
        assert_eq!(hw.counter_probe(c.nv_index, keys.nv_auth()).unwrap(), CounterProbe::Value(c.value));
        c.value
    };
    // Write-ahead: the staged change is applied, and the counter moves for it.
    let mut m = open(&tpm, dir.path());
    assert!(vtpms(&mut m).contains(&b));
    let c = counter(&mut m);
    assert_eq!((c.store_value, c.tpm_value), (before + 1, Some(before + 1)));
    assert!(!pending_path(&path).exists());
}

#[test]
fn an_increment_whose_store_is_lost_is_refused() {
    // Step 2 without a durable step 1 cannot come from a crash (the stage is fsynced first):
    // store == counter - 1 with nothing staged is treated like any older copy.
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let path = provisioned(&tpm, dir.path(), Uuid::new_v4());
    let before = std::fs::read(&path).unwrap();
    let v = {
        let (mut hw, keys, s) = as_manager(&tpm, &path);
        let c = s.counter.unwrap();
        hw.counter_increment(c.nv_index, keys.nv_auth()).unwrap();
        c.value
    };
    let e = refused(&tpm, dir.path()).to_string();
    assert!(e.contains(&format!("records write {v}")) && e.contains(&format!("is at {}", v + 1)), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn torn_or_stale_pending_files_are_dropped() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let path = provisioned(&tpm, dir.path(), a);
    let old = std::fs::read(&path).unwrap();
    {
        let mut m = open(&tpm, dir.path());
        create(&mut m, b);
    }
    let newest = std::fs::read(&path).unwrap();
    // A stage torn by a crash; then an older store posing as a staged write.
    for pending in [b"{\"version\": 2, \"provi".to_vec(), old] {
        std::fs::write(pending_path(&path), &pending).unwrap();
        let mut m = open(&tpm, dir.path());
        assert!(vtpms(&mut m).contains(&b));
        drop(m);
        assert!(!pending_path(&path).exists());
        assert_eq!(std::fs::read(&path).unwrap(), newest);
    }
}

#[test]
fn a_deleted_counter_is_refused_until_the_store_is_accepted() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let a = Uuid::new_v4();
    let path = provisioned(&tpm, dir.path(), a);
    {
        let (mut hw, _, s) = as_manager(&tpm, &path);
        hw.counter_undefine(s.counter.unwrap().nv_index).unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let e = refused(&tpm, dir.path()).to_string();
    assert!(e.contains("0x01805600") && e.contains("does not exist") && e.contains("accept-store"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    vtpmmgr::accept_store(&cfg(&tpm, dir.path())).unwrap();
    let mut m = open(&tpm, dir.path());
    assert!(vtpms(&mut m).contains(&a));
    let c = counter(&mut m);
    assert_eq!(c.tpm_value, Some(c.store_value));
}

#[test]
fn a_format_1_store_is_migrated_once_and_never_again() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let a = Uuid::new_v4();
    let path = provisioned(&tpm, dir.path(), a);
    // The same store as a manager from before the counter wrote it, on a TPM without the counter.
    let v1 = {
        let (mut hw, _, s) = as_manager(&tpm, &path);
        hw.counter_undefine(s.counter.unwrap().nv_index).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("mac");
        o.remove("counter");
        o.insert("version".into(), 1.into());
        serde_json::to_vec_pretty(&v).unwrap()
    };
    std::fs::write(&path, &v1).unwrap();
    {
        let mut m = open(&tpm, dir.path());
        assert!(vtpms(&mut m).contains(&a));
        let c = counter(&mut m);
        assert_eq!(c.nv_index, STORE_COUNTER_FIRST);
        assert_eq!(c.tpm_value, Some(c.store_value));
    }
    let migrated = std::fs::read_to_string(&path).unwrap();
    assert!(migrated.contains("\"version\": 2") && migrated.contains("\"mac\""), "{migrated}");
    // Putting the format-1 copy back is a downgrade: refused, file untouched.
    std::fs::write(&path, &v1).unwrap();
    let e = refused(&tpm, dir.path()).to_string();
    assert!(e.contains("format 1") && e.contains("0x01805600") && e.contains("accept-store"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), v1);
    // Unless the admin accepts it.
    vtpmmgr::accept_store(&cfg(&tpm, dir.path())).unwrap();
    let mut m = open(&tpm, dir.path());
    let c = counter(&mut m);
    assert_eq!(c.tpm_value, Some(c.store_value));
}

#[test]
fn reauthorize_writes_under_the_counter_and_refuses_an_older_copy() {
    let tpm = Swtpm::start();
    let dir = testkit::tempdir();
    let a = Uuid::new_v4();
    let path = provisioned(&tpm, dir.path(), a);
    let c = cfg(&tpm, dir.path());
    let old = std::fs::read(&path).unwrap();
    {
        let mut m = open(&tpm, dir.path());
        ok(m.admin(AdminRequest::VtpmDel { uuid: a }));
    }
    // The host "upgrades": PCR 16 (the sealed set) moves.
    HwTpm::open(&tpm.tcti()).unwrap().pcr_extend(16, &[7; 32]).unwrap();
    assert!(matches!(refused(&tpm, dir.path()), OpenError::Unseal(_)));
    let newest = std::fs::read(&path).unwrap();
    std::fs::write(&path, &old).unwrap();
    let e = vtpmmgr::reauthorize(&c, &c.policy_key_path()).unwrap_err().to_string();
    assert!(e.contains("older copy"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), old);
    std::fs::write(&path, &newest).unwrap();
    vtpmmgr::reauthorize(&c, &c.policy_key_path()).unwrap();
    let mut m = open(&tpm, dir.path());
    assert!(!vtpms(&mut m).contains(&a));
    let s = counter(&mut m);
    assert_eq!(s.tpm_value, Some(s.store_value));
}
