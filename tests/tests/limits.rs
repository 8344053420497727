//! Limits and defaults of the manager: a host lists far more vTPMs than one 1 MiB frame holds
//! (paged), a declared frame length is not allocated before its bytes arrive, the files xl-vtpm
//! and the manager write are root-only, and the manager cannot dump core.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use uuid::Uuid;
use xvtpm_tests::Stack;

/// More identities than one 1 MiB frame of `VtpmList` held (about 5 000), within the
/// descriptors a test host gives the manager (one listening socket per identity).
const MANY: u128 = 12_000;

#[test]
fn a_host_lists_more_vtpms_than_one_frame_holds() {
    let mut s = Stack::start();
    let v = s.create_vtpm();
    s.stop_vtpm(&v.uuid);
    s.stop_manager();
    // Add the identities through the manager's own store writer (one counter increment), as
    // many creates would, only faster.
    {
        use vtpmmgr::{hwtpm::HwTpm, rollback};
        let path = s.state_dir().join("mgr").join("manager.json");
        let mut hw = HwTpm::open(&s.swtpm.tcti()).unwrap();
        let opened = rollback::open(&mut hw, &path, &mut |hw, rec| hw.unseal_master(rec), rollback::Mode::Refuse).unwrap();
        let mut next = opened.store;
        let group = next.groups[0].uuid;
        for i in 1..=MANY {
            let e = serde_json::json!({"uuid": Uuid::from_u128(i), "group": group, "created": 1});
            next.vtpms.push(serde_json::from_value(e).unwrap());
        }
        opened.protected.unwrap().commit(&mut hw, next).unwrap();
    }
    s.start_manager();
    let list = s.xl_json(&["vtpm", "list"]);
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len() as u128, MANY + 1);
    let mut uuids: Vec<&str> = rows.iter().map(|r| r["uuid"].as_str().unwrap()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    assert_eq!(uuids.len() as u128, MANY + 1);
    assert!(uuids.contains(&v.uuid.to_string().as_str()));
    let mgr = s.xl_json(&["mgr", "vtpm", "list"]);
    assert_eq!(mgr.as_array().unwrap().len() as u128, MANY + 1);
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = st.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The manager's connected admin-socket ends whose receive queue is empty (everything the
/// peers sent has been read).
fn drained_admin_conns(pid: u32, admin: &std::path::Path) -> usize {
    let out = std::process::Command::new("ss").args(["-x", "-n", "-p", "state", "connected"]).output().expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let admin = admin.display().to_string();
    text.lines()
        .filter(|l| l.contains(&format!("pid={pid},")) && l.contains(&admin))
        .filter(|l| l.split_whitespace().nth(2) == Some("0"))
        .count()
}

#[test]
fn a_declared_frame_length_is_not_allocated_before_its_bytes_arrive() {
    const CONNS: usize = 1000;
    let s = Stack::start_unprovisioned();
    let pid = s.mgr_pid().unwrap();
    let admin = s.run_dir().join("admin.sock");
    let before = status_kb(pid, "VmData:");
    // Each peer declares a 1 MiB frame (the limit) and sends one byte of it.
    let conns: Vec<UnixStream> = (0..CONNS)
        .map(|_| {
            let mut c = UnixStream::connect(&admin).unwrap();
            c.write_all(&[0x00, 0x10, 0x00, 0x00, b'{']).unwrap();
            c
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while drained_admin_conns(pid, &admin) < CONNS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(drained_admin_conns(pid, &admin) >= CONNS, "the manager did not read every connection's first bytes");
    let grown_mib = status_kb(pid, "VmData:").saturating_sub(before) / 1024;
    eprintln!("{CONNS} half-sent 1 MiB frames: manager VmData grew by {grown_mib} MiB");
    // Reserving every declared length would be 1 000 MiB.
    assert!(grown_mib < 200, "{CONNS} half-sent 1 MiB frames grew the manager's data by {grown_mib} MiB");
    drop(conns);
    // Still serving.
    let st: vtpm_proto::mgr::AdminReply = xvtpm_tests::mgr_call(&admin, &vtpm_proto::mgr::AdminRequest::Status);
    assert!(matches!(st, vtpm_proto::mgr::AdminReply::Status(_)), "{st:?}");
}

#[test]
fn files_are_root_only_and_the_manager_dumps_no_core() {
    // The manager inherits unlimited core dumps from us (we are root), and must drop them.
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    setrlimit(Resource::RLIMIT_CORE, RLIM_INFINITY, RLIM_INFINITY).unwrap();
    let s = Stack::start();
    let v = s.create_vtpm();
    let mode = |p: std::path::PathBuf| std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777;
    let vdir = s.state_dir().join("vtpms").join(v.uuid.to_string());
    for p in [
        vdir.join("vtpm.log"),
        vdir.join("state.xvts"),
        s.run_dir().join("vtpms").join(format!("{}.json", v.uuid)),
        s.run_dir().join("attachments.json"),
        s.state_dir().join("mgr").join("manager.json"),
    ] {
        assert_eq!(mode(p.clone()), 0o600, "{}", p.display());
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.mgr_pid().unwrap())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(), ["0", "0"], "{core}");
}
