//! A vTPM's state is anchored in the manager's store (covered by the physical TPM's NV counter):
//! an older copy of `state.xvts` does not start — the refusal names the file, both generations
//! and `xl-vtpm vtpm accept-state` — until an administrator accepts it; a write that was never
//! anchored (manager gone, vTPM killed) does not brick the vTPM and loses no acknowledged write;
//! and a burst of NV writes from many vTPMs shares few store writes (group commit).

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tpm_wire::nv_counter;
use xvtpm_tests::{Options, Stack, TCP_LISTEN, VtpmHandle, raw_command, rc, try_read_response};

const NV_INDEX: u32 = 0x0150_0030;

fn nv_define_counter() -> Vec<u8> {
    nv_counter::define(NV_INDEX)
}

fn nv_increment() -> Vec<u8> {
    nv_counter::increment(NV_INDEX)
}

fn nv_read_counter(port: u16) -> u64 {
    let r = raw_command(port, &nv_counter::read(NV_INDEX));
    assert_eq!(rc(&r), 0, "NV_Read failed: {:#x}", rc(&r));
    nv_counter::value(&r).expect("an NV_Read response carries the value")
}

fn increment(port: u16) {
    let r = raw_command(port, &nv_increment());
    assert_eq!(rc(&r), 0, "NV_Increment failed: {:#x}", rc(&r));
}

fn generation(v: &VtpmHandle) -> u64 {
    vtpm_proto::sealed::peek(&std::fs::read(&v.state_file).unwrap()).unwrap().2
}

fn status(s: &Stack) -> serde_json::Value {
    s.xl_json(&["mgr", "status"])
}

/// The reproduction: copy the state, increment an NV counter 5×, stop, put the copy
/// back, start. The start is refused (naming the file, both generations and the admin command)
/// and the file is untouched; `accept-state` is the only way to use it, and then the counter
/// is back where the copy had it.
#[test]
fn an_older_state_file_is_refused_until_an_admin_accepts_it() {
    let s = Stack::start();
    let v = s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]]);
    let port = v.port.unwrap();
    assert_eq!(rc(&raw_command(port, &nv_define_counter())), 0);
    increment(port);
    assert_eq!(nv_read_counter(port), 1);
    let copy = std::fs::read(&v.state_file).unwrap();
    let old_gen = generation(&v);
    for _ in 0..5 {
        increment(port);
    }
    assert_eq!(nv_read_counter(port), 6);
    s.stop_vtpm(&v.uuid);
    let newest = std::fs::read(&v.state_file).unwrap();
    let new_gen = generation(&v);
    assert!(new_gen >= old_gen + 5, "generations {old_gen} → {new_gen}");

    std::fs::write(&v.state_file, &copy).unwrap();
    let out = s.xl(&["vtpm", "start", &v.uuid.to_string()]);
    let err = format!("{}{}", String::from_utf8_lossy(&out.stderr), s.vtpm_log(&v.uuid));
    assert!(!out.status.success(), "an older state file started:\n{err}");
    let accept = format!("xl-vtpm vtpm accept-state {} --yes", v.uuid);
    for needle in [
        v.state_file.display().to_string(),
        format!("generation {old_gen}"),
        format!("generation {new_gen}"),
        accept.clone(),
    ] {
        assert!(err.contains(&needle), "the refusal does not say {needle:?}:\n{err}");
    }
    assert_eq!(std::fs::read(&v.state_file).unwrap(), copy, "the refused state file was changed");
    assert!(s.mgr_log().contains("refused an older vTPM state"), "{}", s.mgr_log());

    // The newest state still starts (the refusal changed nothing).
    std::fs::write(&v.state_file, &newest).unwrap();
    let h = s.start_vtpm(&v.uuid);
    assert_eq!(nv_read_counter(h.port.unwrap()), 6);
    s.stop_vtpm(&v.uuid);

    // The admin path: refused again, then accepted knowingly.
    std::fs::write(&v.state_file, &copy).unwrap();
    assert!(!s.xl(&["vtpm", "start", &v.uuid.to_string()]).status.success());
    let no = s.xl(&["vtpm", "accept-state", &v.uuid.to_string()]);
    assert!(!no.status.success(), "accept-state without --yes went ahead");
    let out = s.xl(&["vtpm", "accept-state", &v.uuid.to_string(), "--yes"]);
    assert!(out.status.success(), "accept-state failed: {}", String::from_utf8_lossy(&out.stderr));
    let h = s.start_vtpm(&v.uuid);
    assert_eq!(nv_read_counter(h.port.unwrap()), 1, "the accepted copy is not the state that runs");
    // Nothing left to accept; and the accepted state keeps working across restarts.
    let out = s.xl(&["vtpm", "accept-state", &v.uuid.to_string(), "--yes"]);
    assert!(!out.status.success(), "accept-state accepted with nothing refused");
    increment(h.port.unwrap());
    s.stop_vtpm(&v.uuid);
    let h = s.start_vtpm(&v.uuid);
    assert_eq!(nv_read_counter(h.port.unwrap()), 2);
    // The newest state of before the acceptance is now an older branch: refused too.
    s.stop_vtpm(&v.uuid);
    std::fs::write(&v.state_file, &newest).unwrap();
    assert!(!s.xl(&["vtpm", "start", &v.uuid.to_string()]).status.success(), "a state from the abandoned branch started");
}

/// A state written but never anchored (the manager is gone, so the write is answered with
/// TPM_RC_FAILURE), then `kill -9` of the vTPM: it starts again from the unanchored write, and
/// every acknowledged increment is there.
#[test]
fn an_unanchored_write_does_not_brick_the_vtpm() {
    let mut s = Stack::start();
    let v = s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]]);
    let port = v.port.unwrap();
    assert_eq!(rc(&raw_command(port, &nv_define_counter())), 0);
    for _ in 0..3 {
        increment(port);
    }
    let anchored = generation(&v);
    s.stop_manager();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    c.write_all(&nv_increment()).unwrap();
    let r = try_read_response(&mut c).unwrap();
    assert_ne!(rc(&r), 0, "a write the manager could not anchor was acknowledged");
    assert_eq!(generation(&v), anchored + 1, "the write itself should be on disk");
    kill(Pid::from_raw(v.pid.unwrap() as i32), Signal::SIGKILL).unwrap();
    assert!(xvtpm_tests::wait_gone(v.pid.unwrap(), Duration::from_secs(5)));
    s.start_manager();
    let h = s.start_vtpm(&v.uuid);
    let now = nv_read_counter(h.port.unwrap());
    assert!((3..=4).contains(&now), "counter {now}: 3 acknowledged increments (+1 unacknowledged) expected");
    increment(h.port.unwrap());
    assert_eq!(nv_read_counter(h.port.unwrap()), now + 1);
}

/// Many vTPMs writing NV at once: every acknowledged write was anchored, and group commit makes
/// the physical TPM's counter move far less often than the vTPMs write.
#[test]
fn concurrent_nv_writes_share_store_writes() {
    const VTPMS: usize = 8;
    const WRITES: usize = 20;
    // A discrete TPM's NV increment takes milliseconds; model it, so that writes pile up.
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(10)), ..Default::default() });
    let vtpms: Vec<VtpmHandle> = (0..VTPMS).map(|_| s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]])).collect();
    for v in &vtpms {
        assert_eq!(rc(&raw_command(v.port.unwrap(), &nv_define_counter())), 0);
    }
    let before = status(&s);
    let threads: Vec<_> = vtpms
        .iter()
        .map(|v| {
            let port = v.port.unwrap();
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                for _ in 0..WRITES {
                    c.write_all(&nv_increment()).unwrap();
                    assert_eq!(rc(&try_read_response(&mut c).unwrap()), 0);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let after = status(&s);
    for v in &vtpms {
        assert_eq!(nv_read_counter(v.port.unwrap()), WRITES as u64);
    }
    let delta = |k: &str| after["store_counter"][k].as_u64().unwrap() - before["store_counter"][k].as_u64().unwrap();
    let writes = (VTPMS * WRITES) as u64;
    let requests = delta("anchor_requests");
    assert!(requests >= writes, "{requests} anchor requests for {writes} acknowledged NV writes");
    let tpm = |st: &serde_json::Value| st["store_counter"]["tpm_value"].as_u64().unwrap();
    let increments = tpm(&after) - tpm(&before);
    assert_eq!(increments, delta("anchor_commits"), "only anchors wrote the store meanwhile");
    assert!(increments < writes / 2, "{increments} counter increments for {writes} NV writes: no group commit");
    eprintln!("{writes} NV writes, {requests} anchor requests, {increments} counter increments");
}

/// `kill -9` of the vTPM after its state write and before the manager anchored it (the anchor
/// waits for a slow physical TPM, so the window is wide): the command was not answered, and the
/// vTPM starts again with every acknowledged increment.
#[test]
fn kill_dash_nine_between_write_and_anchor() {
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(150)), ..Default::default() });
    let v = s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]]);
    let port = v.port.unwrap();
    assert_eq!(rc(&raw_command(port, &nv_define_counter())), 0);
    increment(port);
    increment(port);
    let written = generation(&v);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(&nv_increment()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while generation(&v) == written {
        assert!(std::time::Instant::now() < deadline, "the state was never written");
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(Pid::from_raw(v.pid.unwrap() as i32), Signal::SIGKILL).unwrap();
    assert!(try_read_response(&mut c).is_err(), "the write was answered before its anchor");
    assert!(xvtpm_tests::wait_gone(v.pid.unwrap(), Duration::from_secs(5)));
    let h = s.start_vtpm(&v.uuid);
    let now = nv_read_counter(h.port.unwrap());
    assert!((2..=3).contains(&now), "counter {now}: 2 acknowledged increments (+1 unacknowledged) expected");
    increment(h.port.unwrap());
    assert_eq!(nv_read_counter(h.port.unwrap()), now + 1);
}

/// Anchoring a vTPM's NV write costs the physical TPM one command: the manager keeps the store
/// counter's salted session open and does not read the counter back (before: NV_ReadPublic,
/// StartAuthSession, NV_Increment, NV_Read and FlushContext for every store write).
#[test]
fn an_anchored_nv_write_costs_one_physical_tpm_command() {
    const WRITES: u64 = 10;
    // A proxy without delay, to count the manager's TPM commands.
    let s = Stack::start_with(Options { tpm_delay: Some(Duration::ZERO), ..Default::default() });
    let v = s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]]);
    let port = v.port.unwrap();
    assert_eq!(rc(&raw_command(port, &nv_define_counter())), 0);
    increment(port);
    let before = s.tpm_commands();
    for _ in 0..WRITES {
        increment(port);
    }
    let commands = s.tpm_commands() - before;
    assert_eq!(nv_read_counter(port), WRITES + 1);
    let st = status(&s);
    assert_eq!(st["store_counter"]["tpm_value"], st["store_counter"]["store_value"], "{st}");
    assert_eq!(commands, WRITES, "{commands} physical TPM commands for {WRITES} anchored NV writes");
    let log = s.mgr_log();
    assert!(!log.contains("increment failed in the kept session"), "{log}");
}

/// The kept counter session is flushed behind the manager's back (by anyone with access to a
/// TPM without a resource manager): the next anchor notices, finds the counter unmoved,
/// increments it in a fresh session, and the write is acknowledged.
#[test]
fn an_anchor_survives_a_flushed_counter_session() {
    let s = Stack::start();
    let v = s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]]);
    let port = v.port.unwrap();
    assert_eq!(rc(&raw_command(port, &nv_define_counter())), 0);
    increment(port);
    // (Reading the counter for the status closes the kept session: the next write opens one.)
    let before = status(&s)["store_counter"]["tpm_value"].as_u64().unwrap();
    increment(port);
    let out = std::process::Command::new("tpm2_flushcontext").arg("--loaded-session").env("TPM2TOOLS_TCTI", s.swtpm.tcti()).output().unwrap();
    assert!(out.status.success(), "tpm2_flushcontext: {}", String::from_utf8_lossy(&out.stderr));
    increment(port);
    increment(port);
    assert_eq!(nv_read_counter(port), 4);
    let st = status(&s);
    assert_eq!(st["store_counter"]["tpm_value"], st["store_counter"]["store_value"], "{st}");
    // All three writes were anchored (one store write each).
    assert_eq!(st["store_counter"]["tpm_value"].as_u64().unwrap(), before + 3, "{st}");
    let log = s.mgr_log();
    assert!(log.contains("increment failed in the kept session"), "the flush did not reach the manager's session:\n{log}");
}

/// `vtpm create` makes two manager store writes (the identity, then its EK certificate's
/// binding): the new vTPM's first state is not anchored, because nothing older exists. It is
/// still protected: once the vTPM acknowledged a later write, that first state is refused.
#[test]
fn a_create_writes_the_store_twice_and_its_first_state_is_refused_later() {
    let s = Stack::start();
    let counter = |s: &Stack| status(s)["store_counter"]["tpm_value"].as_u64().unwrap();
    let before = counter(&s);
    let v = s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]]);
    assert_eq!(counter(&s) - before, 2, "store writes (counter increments) of one create");
    let first = std::fs::read(&v.state_file).unwrap();
    assert_eq!(generation(&v), 1);
    assert_eq!(rc(&raw_command(v.port.unwrap(), &nv_define_counter())), 0);
    s.stop_vtpm(&v.uuid);
    std::fs::write(&v.state_file, &first).unwrap();
    let out = s.xl(&["vtpm", "start", &v.uuid.to_string()]);
    assert!(!out.status.success(), "the first state started after a later acknowledged write:\n{}", s.vtpm_log(&v.uuid));
    assert!(s.mgr_log().contains("refused an older vTPM state"), "{}", s.mgr_log());

    // A vTPM stopped before its second write starts from its first state (anchored then).
    let w = s.create_vtpm_with(&["--ek", "ecc", TCP_LISTEN[0], TCP_LISTEN[1]]);
    s.stop_vtpm(&w.uuid);
    let h = s.start_vtpm(&w.uuid);
    assert_eq!(rc(&raw_command(h.port.unwrap(), &nv_define_counter())), 0);
}
