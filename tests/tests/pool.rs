//! The pool of vTPMs made ahead of demand (`xl-vtpm vtpm pool`), end to end with real swtpm
//! as the physical TPM, the real manager, real `vtpm-domain` processes and tpm2-tools:
//! a claimed vTPM answers with its EK certificate in NV, certified for its own EK by its
//! group's CA; an empty pool falls back to manufacturing; concurrent creates never claim the
//! same pooled vTPM; a fill killed with SIGKILL (itself, or the vTPM it was making) leaves
//! nothing that can be claimed, and the next fill or drain removes what it left.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;
use xvtpm_tests::{Options, Stack, VtpmHandle, tpm2, wait_gone};

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fill(s: &Stack, args: &[&str]) -> Vec<Uuid> {
    let mut a = vec!["vtpm", "pool", "fill"];
    a.extend_from_slice(args);
    let v = s.xl_json(&a);
    v["made"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().parse().unwrap()).collect()
}

fn ready(s: &Stack) -> u64 {
    let st = s.xl_json(&["vtpm", "pool", "status"]);
    st["ready"].as_array().unwrap().iter().map(|c| c["ready"].as_u64().unwrap()).sum()
}

/// `vtpm create --listen tcp:127.0.0.1:0 ARGS --json`: the handle and where it came from.
fn create(s: &Stack, args: &[&str]) -> (VtpmHandle, String) {
    let mut a = vec!["vtpm", "create", "--listen", "tcp:127.0.0.1:0"];
    a.extend_from_slice(args);
    let v = s.xl_json(&a);
    (Stack::handle(&v), v["created_from"].as_str().unwrap().to_string())
}

/// How often the manager logged a new anchor for `uuid` (a first state, or a state presented
/// at start that it had not anchored).
fn anchorings(s: &Stack, uuid: &Uuid) -> usize {
    let u = uuid.to_string();
    s.mgr_log().lines().filter(|l| l.contains("anchoring vTPM state") && l.contains(&u)).count()
}

/// The manager's identities.
fn mgr_vtpms(s: &Stack) -> HashSet<Uuid> {
    s.xl_json(&["mgr", "vtpm", "list"]).as_array().unwrap().iter().map(|v| v["uuid"].as_str().unwrap().parse().unwrap()).collect()
}

/// The vTPM directories under the state directory.
fn vtpm_dirs(s: &Stack) -> HashSet<Uuid> {
    std::fs::read_dir(s.state_dir().join("vtpms"))
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The claimed vTPM's EK certificate is in its NV, chains to its group's CA and certifies
/// the EK this vTPM has (not some other pooled vTPM's).
fn check_ek_cert(s: &Stack, v: &VtpmHandle, dir: &Path) {
    let ca = dir.join("ca.pem");
    s.xl_json(&["mgr", "group", "ca-cert", "default", "--out", ca.to_str().unwrap()]);
    let der = dir.join(format!("{}.der", v.uuid));
    let pem = dir.join(format!("{}.pem", v.uuid));
    let ekpub = dir.join(format!("{}-ek.pem", v.uuid));
    tpm2(&v.tcti(), &["tpm2_nvread", "0x1c00002", "-o", der.to_str().unwrap()]);
    ok("openssl", &["x509", "-inform", "der", "-in", der.to_str().unwrap(), "-out", pem.to_str().unwrap()]);
    let verify = ok("openssl", &["verify", "-CAfile", ca.to_str().unwrap(), pem.to_str().unwrap()]);
    assert!(verify.contains(": OK"), "{verify}");
    tpm2(&v.tcti(), &["tpm2_readpublic", "-c", "0x81010001", "-f", "pem", "-o", ekpub.to_str().unwrap()]);
    let cert_key = ok("openssl", &["x509", "-in", pem.to_str().unwrap(), "-pubkey", "-noout"]);
    assert_eq!(cert_key.trim(), std::fs::read_to_string(&ekpub).unwrap().trim(), "the certificate in NV is not for this vTPM's EK");
}

#[test]
fn a_claimed_vtpm_answers_with_its_ek_certificate_and_an_empty_pool_falls_back() {
    let s = Stack::start();
    let dir = s.dir.path().join("t");
    std::fs::create_dir_all(&dir).unwrap();
    let made = fill(&s, &["--count", "2"]);
    assert_eq!(made.len(), 2);
    assert_eq!(ready(&s), 2);
    // Pooled: complete, never started, never served: no process, no socket, no runtime record.
    let list = s.xl_json(&["vtpm", "list"]);
    for u in &made {
        let row = list.as_array().unwrap().iter().find(|r| r["uuid"] == u.to_string()).unwrap_or_else(|| panic!("{u} not listed: {list}"));
        assert_eq!(row["state"], "pooled", "{row}");
        assert!(row["attached_pid"].is_null(), "{row}");
        assert!(s.state_dir().join("vtpms").join(u.to_string()).join("state.xvts").exists());
        assert!(!s.run_dir().join("vtpms").join(u.to_string()).exists(), "a pooled vTPM has a socket directory");
        assert!(!s.run_dir().join("vtpms").join(format!("{u}.json")).exists());
    }
    // The fill anchored each one's first state: a claim's start presents it without a store write.
    for u in &made {
        assert_eq!(anchorings(&s, u), 1, "{}", s.mgr_log());
    }
    // `registry check` counts them and does not take them for drift (they belong to no guest by
    // design); a stand-in for `xl` says no domain runs.
    let fake_xl = s.dir.path().join("xl");
    std::fs::write(&fake_xl, "#!/bin/sh\ncase \"$1\" in domid) exit 1;; list) echo 'Name ID Mem VCPUs State Time(s) UUID'; exit 0;; esac\nexit 0\n").unwrap();
    std::fs::set_permissions(&fake_xl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let check = s.xl_command(&["registry", "check"]).env("XVTPM_XL", &fake_xl).output().unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{text}{}", String::from_utf8_lossy(&check.stderr));
    assert!(text.contains("pool: 2 ready"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("drift:")), "{text}");
    // Only a claim takes a vTPM out of the pool: starting one by UUID is refused.
    let out = s.xl(&["vtpm", "start", &made[0].to_string()]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in the pool"), "{}", String::from_utf8_lossy(&out.stderr));

    // Two creates claim the two pooled vTPMs, under the UUIDs their certificates were made for.
    let (a, from_a) = create(&s, &[]);
    let (b, from_b) = create(&s, &[]);
    assert_eq!((from_a.as_str(), from_b.as_str()), ("pool", "pool"));
    assert_eq!([a.uuid, b.uuid].into_iter().collect::<HashSet<_>>(), made.iter().copied().collect());
    for v in [&a, &b] {
        assert_eq!(anchorings(&s, &v.uuid), 1, "the claim anchored the first state again: {}", s.mgr_log());
        let hex = tpm2(&v.tcti(), &["tpm2_getrandom", "--hex", "8"]);
        assert_eq!(hex.trim().len(), 16, "{hex}");
        check_ek_cert(&s, v, &dir);
    }
    assert_eq!(ready(&s), 0);
    // The pool is empty: the next create manufactures, and says so.
    let (c, from_c) = create(&s, &[]);
    assert_eq!(from_c, "new");
    check_ek_cert(&s, &c, &dir);
    // A claimed vTPM is an ordinary one: it stops and starts again with its state.
    s.stop_vtpm(&a.uuid);
    let a2 = s.start_vtpm(&a.uuid);
    check_ek_cert(&s, &a2, &dir);

    // --no-pool and --uuid manufacture even with a pooled vTPM ready (a UUID is never re-labelled).
    let more = fill(&s, &["--min", "1"]);
    assert_eq!(more.len(), 1);
    assert_eq!(fill(&s, &["--min", "1"]).len(), 0, "--min tops up, it does not add");
    assert_eq!(create(&s, &["--no-pool"]).1, "new");
    let mine = Uuid::new_v4().to_string();
    let (d, from_d) = create(&s, &["--uuid", &mine]);
    assert_eq!((d.uuid.to_string(), from_d.as_str()), (mine, "new"));
    // An ECC create does not take the RSA pool's vTPM.
    assert_eq!(create(&s, &["--ek", "ecc"]).1, "new");
    assert_eq!(ready(&s), 1);

    // Drain destroys the pooled vTPM: identity, state and entry.
    s.xl_json(&["vtpm", "pool", "drain", "--yes"]);
    assert_eq!(ready(&s), 0);
    assert!(!mgr_vtpms(&s).contains(&more[0]));
    assert!(!vtpm_dirs(&s).contains(&more[0]));
}

#[test]
fn concurrent_creates_never_claim_the_same_pooled_vtpm() {
    let s = Stack::start();
    for round in 0..3 {
        let made: HashSet<Uuid> = fill(&s, &["--count", "2"]).into_iter().collect();
        // Four creates at once for two pooled vTPMs.
        let children: Vec<_> = (0..4)
            .map(|_| s.xl_command(&["vtpm", "create", "--listen", "tcp:127.0.0.1:0", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
            .collect();
        let mut pooled = vec![];
        let mut fresh = vec![];
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: create failed: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let u: Uuid = v["uuid"].as_str().unwrap().parse().unwrap();
            match v["created_from"].as_str().unwrap() {
                "pool" => pooled.push(u),
                "new" => fresh.push(u),
                o => panic!("created_from {o}"),
            }
            let h = Stack::handle(&v);
            assert_eq!(tpm2(&h.tcti(), &["tpm2_getrandom", "--hex", "4"]).trim().len(), 8);
        }
        assert_eq!(pooled.len(), 2, "round {round}: {pooled:?} {fresh:?}");
        assert_eq!(pooled.iter().copied().collect::<HashSet<_>>(), made, "round {round}: a pooled vTPM claimed twice or not at all");
        assert!(fresh.iter().all(|u| !made.contains(u)));
        assert_eq!(ready(&s), 0);
        let st = s.xl_json(&["vtpm", "pool", "status"]);
        assert_eq!((st["claiming"].as_u64(), st["abandoned"].as_u64()), (Some(0), Some(0)), "{st}");
    }
}

/// Waits until the manager has reserved `n` identities in total (a fill's vTPM is then being
/// manufactured: its EK certificate is several commands on the slow physical TPM away).
fn wait_reserved(s: &Stack, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.mgr_log().matches("vTPM identity reserved").count() < n {
        assert!(Instant::now() < deadline, "no reservation: {}", s.mgr_log());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every file a vTPM's directory holds besides its log, markers and access record is sealed
/// state (`XVTS`, or still empty): no plaintext TPM state on disk.
fn assert_sealed_only(s: &Stack, u: &Uuid) {
    let d = s.state_dir().join("vtpms").join(u.to_string());
    let mut sealed = 0;
    for e in std::fs::read_dir(&d).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // (the access record's temporary file too: a create killed inside its atomic write
        // leaves `.access.json.tmp.<pid>`, the same listeners-and-uid JSON, no TPM state)
        if ["vtpm.log", "creating", "access.json"].contains(&name.as_str()) || name.starts_with(".access.json.tmp.") {
            continue;
        }
        let b = std::fs::read(e.path()).unwrap();
        assert!(b.is_empty() || b.starts_with(b"XVTS"), "{name} in {} is not sealed state ({} bytes)", d.display(), b.len());
        sealed += usize::from(!b.is_empty());
    }
    assert!(sealed <= 2, "{sealed} state files in {}", d.display());
}

#[test]
fn a_fill_killed_with_sigkill_leaves_nothing_claimable() {
    // A slow physical TPM (50 ms per command) keeps each vTPM's EK certificate well behind its
    // reservation, so the kill lands while a vTPM is half-made.
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(50)), ..Default::default() });
    let mut fill_cmd = s.xl_command(&["vtpm", "pool", "fill", "--count", "3"]);
    let mut filler = fill_cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // The second vTPM is being made (the first is complete, or nearly).
    wait_reserved(&s, 2);
    filler.kill().unwrap(); // SIGKILL
    filler.wait().unwrap();
    // The manufacturing process it left finishes or fails on its own.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Command::new("pgrep").args(["-f", &format!("{}.*manufacture-only", s.state_dir().display())]).output().is_ok_and(|o| o.status.success()) {
        // Matching only this test's state directory: other tests' vTPMs are not ours.
        assert!(Instant::now() < deadline, "the vTPM being made never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = s.xl_json(&["vtpm", "pool", "status"]);
    assert_eq!(st["abandoned"].as_u64(), Some(1), "the kill left no half-made vTPM: {st}");
    let complete = ready(&s);
    assert!(complete <= 1, "{st}");
    let half_made: Vec<Uuid> = std::fs::read_dir(s.state_dir().join("pool/making"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_str().unwrap().split('.').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(half_made.len(), 1);
    if s.state_dir().join("vtpms").join(half_made[0].to_string()).exists() {
        assert_sealed_only(&s, &half_made[0]);
    }

    // Creates claim only complete vTPMs: the half-made one never.
    let mut claimed = vec![];
    for _ in 0..2 {
        let (v, from) = create(&s, &[]);
        assert_ne!(v.uuid, half_made[0], "a half-made vTPM was claimed");
        if from == "pool" {
            claimed.push(v.uuid);
        }
        tpm2(&v.tcti(), &["tpm2_getrandom", "--hex", "4"]);
    }
    assert_eq!(claimed.len() as u64, complete);

    // The next fill removes what the killed one left (identity, state, marker) first.
    let made = fill(&s, &["--count", "1"]);
    let st = s.xl_json(&["vtpm", "pool", "status"]);
    assert_eq!((st["abandoned"].as_u64(), st["making"].as_u64()), (Some(0), Some(0)), "{st}");
    assert!(!mgr_vtpms(&s).contains(&half_made[0]), "the half-made identity survived the next fill");
    assert!(!vtpm_dirs(&s).contains(&half_made[0]), "the half-made state directory survived the next fill");
    assert_eq!(create(&s, &[]).0.uuid, made[0]);
}

#[test]
fn a_vtpm_killed_while_it_is_made_for_the_pool_leaves_nothing() {
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(50)), ..Default::default() });
    let before = mgr_vtpms(&s);
    let filler = s.xl_command(&["vtpm", "pool", "fill", "--count", "1"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_reserved(&s, 1);
    // The manufacturing vtpm-domain is the filler's only child.
    let deadline = Instant::now() + Duration::from_secs(30);
    let child: u32 = loop {
        let o = Command::new("pgrep").args(["-P", &filler.id().to_string()]).output().unwrap();
        if let Some(p) = String::from_utf8_lossy(&o.stdout).split_whitespace().next() {
            break p.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no vtpm-domain child");
        std::thread::sleep(Duration::from_millis(2));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(wait_gone(child, Duration::from_secs(10)));
    let out = filler.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not manufactured"), "{}", String::from_utf8_lossy(&out.stderr));
    // Nothing left: no pool entry, no identity, no state, no marker.
    let st = s.xl_json(&["vtpm", "pool", "status"]);
    assert_eq!((ready(&s), st["making"].as_u64(), st["abandoned"].as_u64()), (0, Some(0), Some(0)), "{st}");
    assert_eq!(mgr_vtpms(&s), before);
    assert!(vtpm_dirs(&s).is_empty(), "{:?}", vtpm_dirs(&s));
    // And the next create manufactures.
    assert_eq!(create(&s, &[]).1, "new");
}

/// The EK public key (PEM) of a running vTPM.
fn ek_pem(v: &VtpmHandle, dir: &Path) -> String {
    let p = dir.join(format!("{}-ekpub.pem", v.uuid));
    tpm2(&v.tcti(), &["tpm2_readpublic", "-c", "0x81010001", "-f", "pem", "-o", p.to_str().unwrap()]);
    std::fs::read_to_string(&p).unwrap()
}

/// The pids of this stack's background refills (`vtpm pool fill --background`).
fn fillers(s: &Stack) -> Vec<u32> {
    let o = Command::new("pgrep").args(["-f", &format!("{}.* --background", s.state_dir().display())]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Waits until the pool holds `n` ready vTPMs and no refill runs; returns the niceness of
/// every refill process seen meanwhile.
fn wait_topped_up(s: &Stack, n: u64) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut nice = vec![];
    loop {
        let running = fillers(s);
        for p in &running {
            // Field 19 of /proc/PID/stat (after the parenthesised command name) is the niceness.
            if let Some(v) = std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|st| st.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(16).and_then(|f| f.parse().ok()))) {
                nice.push(v);
            }
        }
        if running.is_empty() && ready(s) == n {
            return nice;
        }
        assert!(Instant::now() < deadline, "the pool never reached {n} ready: {}; fill.log: {}", s.xl_json(&["vtpm", "pool", "status"]), std::fs::read_to_string(s.state_dir().join("pool/fill.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_pool_size_is_kept_by_a_background_refill_and_0_turns_it_off() {
    let s = Stack::start();
    let dir = s.dir.path().join("t");
    std::fs::create_dir_all(&dir).unwrap();
    // Setting a size fills the pool in the background at once.
    let st = s.xl_json(&["vtpm", "pool", "size", "2"]);
    assert_eq!(st["ready"][0]["size"].as_u64(), Some(2), "{st}");
    let mut nice = wait_topped_up(&s, 2);
    // Each create claims a ready vTPM and leaves a refill behind it, at the lowest CPU priority;
    // every vTPM made has its own EK, certified for it.
    let mut eks = HashSet::new();
    let mut uuids = HashSet::new();
    for round in 0..3 {
        let (v, from) = create(&s, &[]);
        assert_eq!(from, "pool", "round {round}");
        check_ek_cert(&s, &v, &dir);
        assert!(uuids.insert(v.uuid), "round {round}: {} claimed twice", v.uuid);
        assert!(eks.insert(ek_pem(&v, &dir)), "round {round}: two vTPMs with one EK");
        nice.extend(wait_topped_up(&s, 2));
    }
    assert!(!nice.is_empty() && nice.iter().all(|&n| n == 19), "refills ran at niceness {nice:?}, not 19");
    assert_eq!(s.xl_json(&["vtpm", "pool", "status"])["abandoned"].as_u64(), Some(0));
    // The pooled ones left have EKs of their own too.
    let rest: Vec<_> = (0..2).map(|_| create(&s, &["--no-pool"])).collect();
    assert!(rest.iter().all(|(_, f)| f == "new"));
    assert_eq!(ready(&s), 2);

    // Size 0: no refill; the ready vTPMs are still claimed, then creates manufacture.
    s.xl_json(&["vtpm", "pool", "size", "0"]);
    for (i, want) in ["pool", "pool", "new"].into_iter().enumerate() {
        let (v, from) = create(&s, &[]);
        assert_eq!(from, want, "create {i}");
        // A refill would have been started before the create exited.
        assert!(fillers(&s).is_empty(), "a refill runs with the pool size 0");
        assert!(eks.insert(ek_pem(&v, &dir)), "two vTPMs with one EK");
    }
    assert_eq!(ready(&s), 0);
    assert!(s.xl(&["vtpm", "pool", "size", "1025"]).status.code() == Some(2), "a pool larger than 1024 accepted");
}

#[test]
fn a_create_killed_after_its_claim_leaves_its_vtpm_to_nobody() {
    // A slow physical TPM (50 ms per command) keeps the claimed vTPM's start (its Startup's
    // anchored state write) well after the claim's rename.
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(50)), ..Default::default() });
    let dir = s.dir.path().join("t");
    std::fs::create_dir_all(&dir).unwrap();
    let made = fill(&s, &["--count", "1"]);
    let u = made[0].to_string();
    let mut creator = s.xl_command(&["vtpm", "create", "--listen", "tcp:127.0.0.1:0", "--json"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let claimed = s.state_dir().join("pool/claimed");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(&claimed).is_ok_and(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&u))) {
        assert!(Instant::now() < deadline, "the create never claimed {u}");
        std::thread::sleep(Duration::from_millis(1));
    }
    creator.kill().unwrap(); // SIGKILL, between the claim and its answer
    creator.wait().unwrap();
    let st = s.xl_json(&["vtpm", "pool", "status"]);
    assert_eq!((ready(&s), st["abandoned"].as_u64()), (0, Some(1)), "{st}");
    // Nobody was given it, and nobody can take it now: not a start by UUID, not another create.
    let out = s.xl(&["vtpm", "start", &u]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "a killed claim's vTPM was started: {err}");
    assert!(err.contains("killed before it answered"), "{err}");
    assert_sealed_only(&s, &made[0]);
    let (other, from) = create(&s, &[]);
    assert_eq!((from.as_str(), other.uuid == made[0]), ("new", false));
    // The next fill destroys it (process, identity, state) and makes a new one, claimable once.
    let again = fill(&s, &["--count", "1"]);
    let st = s.xl_json(&["vtpm", "pool", "status"]);
    assert_eq!((st["abandoned"].as_u64(), st["claiming"].as_u64()), (Some(0), Some(0)), "{st}");
    assert!(!mgr_vtpms(&s).contains(&made[0]), "the killed claim's identity survived the next fill");
    assert!(!vtpm_dirs(&s).contains(&made[0]), "the killed claim's state survived the next fill");
    let left = Command::new("pgrep").args(["-f", "--", &format!("--uuid {u}")]).output().unwrap();
    assert_eq!(left.status.code(), Some(1), "the killed claim's vTPM process still runs (or pgrep failed): {}", String::from_utf8_lossy(&left.stderr));
    let (v, from) = create(&s, &[]);
    assert_eq!((v.uuid, from.as_str()), (again[0], "pool"));
    // The same search finds a running vTPM's process.
    let running = Command::new("pgrep").args(["-f", "--", &format!("--uuid {}", v.uuid)]).output().unwrap();
    assert_eq!(running.status.code(), Some(0), "{}", String::from_utf8_lossy(&running.stderr));
    check_ek_cert(&s, &v, &dir);
    assert_ne!(ek_pem(&v, &dir), ek_pem(&other, &dir));
}

#[test]
fn a_pool_entry_naming_a_claimed_vtpm_is_never_served_again() {
    let s = Stack::start();
    let dir = s.dir.path().join("t");
    std::fs::create_dir_all(&dir).unwrap();
    let made = fill(&s, &["--count", "1"]);
    let ready_dir = std::fs::read_dir(s.state_dir().join("pool")).unwrap().flatten().map(|e| e.path()).find(|p| p.to_string_lossy().ends_with("-rsa")).unwrap();
    let entry = ready_dir.join(made[0].to_string());
    assert!(entry.exists());
    let (a, from) = create(&s, &[]);
    assert_eq!((a.uuid, from.as_str()), (made[0], "pool"));
    let a_ek = ek_pem(&a, &dir);
    // The entry comes back (a pool directory restored from a backup taken before the claim):
    // the running vTPM is not handed out again, nor disturbed.
    std::fs::write(&entry, b"").unwrap();
    let (b, from) = create(&s, &[]);
    assert_eq!(from, "new");
    assert_ne!(b.uuid, a.uuid, "one vTPM handed to two consumers");
    assert!(!entry.exists(), "the stale entry is still claimable");
    assert_eq!(tpm2(&a.tcti(), &["tpm2_getrandom", "--hex", "4"]).trim().len(), 8);
    check_ek_cert(&s, &a, &dir);
    assert_ne!(ek_pem(&b, &dir), a_ek);
    // Stopped, the same: its access record says it was claimed.
    s.stop_vtpm(&a.uuid);
    std::fs::write(&entry, b"").unwrap();
    let (c, from) = create(&s, &[]);
    assert_eq!((from.as_str(), c.uuid == a.uuid), ("new", false));
    let a2 = s.start_vtpm(&a.uuid);
    assert_eq!(ek_pem(&a2, &dir), a_ek);
}
