//! Limits and defaults of the manager: a host lists far more vTPMs than one 1 MiB frame holds
//! (paged), a declared frame length is not allocated before its bytes arrive, the files xl-vtpm
//! and the manager write are root-only, and the manager cannot dump core.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest};
use xvtpm_tests::{Stack, get_random, mgr_call, raw_command, rc};

/// More identities than one 1 MiB frame of `VtpmList` held (about 5 000), and more than the
/// manager's descriptor limit in the test below (one listening socket per identity, as the
/// manager once bound, would not fit).
const MANY: u128 = 12_000;

/// Adds `n` identities (UUIDs 1..=n) to a stopped manager's store through its own store writer
/// (one counter increment), as many creates would, only faster.
fn add_identities(s: &Stack, n: u128) {
    use vtpmmgr::{hwtpm::HwTpm, rollback};
    let path = s.state_dir().join("mgr").join("manager.json");
    let mut hw = HwTpm::open(&s.swtpm.tcti()).unwrap();
    let opened = rollback::open(&mut hw, &path, &mut |hw, rec| hw.unseal_master(rec), rollback::Mode::Refuse).unwrap();
    let mut next = opened.store;
    let group = next.groups[0].uuid;
    for i in 1..=n {
        let e = serde_json::json!({"uuid": Uuid::from_u128(i), "group": group, "created": 1});
        next.vtpms.push(serde_json::from_value(e).unwrap());
    }
    opened.protected.unwrap().commit(&mut hw, next).unwrap();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn sockets_in(s: &Stack) -> Vec<String> {
    let dir = s.run_dir().join("vtpm");
    let mut v: Vec<String> = std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn nv_define() -> Vec<u8> {
    tpm_wire::nv_counter::define(0x0150_0077)
}

/// The manager run with a descriptor limit far below the number of identities it holds.
fn start_manager_with_nofile(s: &mut Stack, nofile: u64) {
    s.start_manager();
    let pid = s.mgr_pid().unwrap();
    let st = std::process::Command::new("prlimit").arg("--pid").arg(pid.to_string()).arg(format!("--nofile={nofile}:{nofile}")).status().unwrap();
    assert!(st.success());
}

#[test]
fn a_host_lists_more_vtpms_than_one_frame_holds() {
    let mut s = Stack::start();
    let v = s.create_vtpm();
    s.stop_vtpm(&v.uuid);
    s.stop_manager();
    add_identities(&s, MANY);
    let t = Instant::now();
    s.start_manager();
    eprintln!("manager start with {} identities: {:?}", MANY + 1, t.elapsed());
    let pid = s.mgr_pid().unwrap();
    let t = Instant::now();
    let list = s.xl_json(&["vtpm", "list"]);
    eprintln!("xl-vtpm vtpm list of {} identities: {:?}", MANY + 1, t.elapsed());
    // No vTPM runs: the manager binds no vTPM socket, whatever it holds (counted after a
    // request was answered, so after the start's socket set-up).
    let fds = open_fds(pid);
    assert!(fds < 64, "the manager holds {fds} descriptors for {} identities, none running", MANY + 1);
    assert!(sockets_in(&s).is_empty(), "{:?}", &sockets_in(&s)[..sockets_in(&s).len().min(5)]);
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

/// A vTPM's socket exists exactly while a process is attached to it: bound on attach (a vTPM
/// started under a descriptor limit far below the identities held still gets its key), kept
/// across a manager restart while the vTPM runs, removed when the process exits.
#[test]
fn a_vtpm_socket_is_bound_only_while_its_process_runs() {
    let mut s = Stack::start();
    let a = s.create_vtpm();
    let b = s.create_vtpm();
    s.stop_vtpm(&b.uuid);
    let sock = |u: &Uuid| format!("{u}.sock");
    assert_eq!(sockets_in(&s), vec![sock(&a.uuid)], "only the running vTPM has a socket");
    s.stop_manager();
    // An earlier manager's socket for every identity is cleared at start.
    std::fs::write(s.run_dir().join("vtpm").join(sock(&Uuid::from_u128(7))), b"").unwrap();
    add_identities(&s, 2_000);
    start_manager_with_nofile(&mut s, 256);
    assert_eq!(s.xl_json(&["vtpm", "list"]).as_array().unwrap().len(), 2_002);
    // A keeps running across the restart: its socket is bound again, the stale one is gone.
    assert_eq!(sockets_in(&s), vec![sock(&a.uuid)]);
    assert_eq!(rc(&raw_command(a.port.unwrap(), &nv_define())), 0, "an NV write (anchored through the socket) after the restart");
    // Starting B binds its socket; it fetches its key and answers.
    let b2 = s.start_vtpm(&b.uuid);
    assert_eq!(rc(&raw_command(b2.port.unwrap(), &get_random(8))), 0);
    let mut want = vec![sock(&a.uuid), sock(&b.uuid)];
    want.sort();
    assert_eq!(sockets_in(&s), want);
    let fds = open_fds(s.mgr_pid().unwrap());
    assert!(fds < 64, "the manager holds {fds} descriptors with 2 vTPMs running");
    // B's process exits: its socket goes.
    s.stop_vtpm(&b.uuid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sockets_in(&s).len() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(sockets_in(&s), vec![sock(&a.uuid)]);
}

/// How long a real listing of 100 000 identities takes (run once by hand:
/// `cargo test -p xvtpm-tests --release --test limits -- --ignored --nocapture`).
#[test]
#[ignore]
fn list_100k_identities() {
    const N: u128 = 100_000;
    let mut s = Stack::start();
    s.stop_manager();
    let t = Instant::now();
    add_identities(&s, N);
    eprintln!("writing {N} identities into the store: {:?}", t.elapsed());
    let t = Instant::now();
    start_manager_with_nofile(&mut s, 1024);
    eprintln!("manager start with {N} identities: {:?}", t.elapsed());
    let fds = open_fds(s.mgr_pid().unwrap());
    let t = Instant::now();
    let list = s.xl_json(&["vtpm", "list"]);
    eprintln!("xl-vtpm vtpm list --json of {N} identities: {:?}", t.elapsed());
    assert_eq!(list.as_array().unwrap().len() as u128, N);
    let t = Instant::now();
    let out = s.xl(&["vtpm", "list"]);
    assert!(out.status.success());
    eprintln!("xl-vtpm vtpm list (table) of {N} identities: {:?}, {} lines", t.elapsed(), String::from_utf8_lossy(&out.stdout).lines().count());
    let t = Instant::now();
    let v = s.create_vtpm();
    eprintln!("xl-vtpm vtpm create with {N} identities held: {:?}", t.elapsed());
    assert_eq!(rc(&raw_command(v.port.unwrap(), &get_random(8))), 0);
    eprintln!("manager descriptors: {fds} before the create, {} after", open_fds(s.mgr_pid().unwrap()));
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

/// The relayed-process requests of a manager in its own domain (`vtpmmgr bridge`'s, over the
/// Xen admin link) are refused on the admin socket: a dom0 manager names its vTPM processes by
/// `SO_PEERCRED` itself, and nothing on its admin socket may claim to be one.
#[test]
fn the_admin_socket_refuses_relayed_process_requests() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let pid = v.pid.expect("the vTPM process");
    let start = xvtpm_fsutil::start_time(pid).expect("its start time");
    let admin = s.run_dir().join("admin.sock");
    let get_key = vtpm_proto::mgr::VtpmRequest::GetStateKey { version: vtpm_proto::mgr::PROTOCOL_VERSION, uuid: v.uuid };
    for req in [
        AdminRequest::VtpmRelay { uuid: v.uuid, pid, start, request: Box::new(get_key) },
        AdminRequest::VtpmAttachRelayed { uuid: v.uuid, pid, start },
        AdminRequest::VtpmRelayedExited { uuid: v.uuid, pid, start },
    ] {
        match mgr_call::<_, AdminReply>(&admin, &req) {
            AdminReply::Error(f) => assert_eq!(f.code, vtpm_proto::mgr::ErrorCode::Refused, "{req:?}: {f:?}"),
            other => panic!("{req:?} on the admin socket: {other:?}"),
        }
    }
    // The vTPM's own attachment is untouched: it still answers.
    assert_eq!(rc(&raw_command(v.port.unwrap(), &get_random(8))), 0, "{}", s.mgr_log());
}
