//! A vTPM under a connection flood or a control-channel loop stays cheap and quiet:
//! bounded connections per channel, a pause (not a spin) when out of descriptors,
//! silent connections closed, every peer-triggerable log line rate-limited, and a
//! legitimate client served once the flood stops. Real process, real connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vtpm_proto::mgr::{self, ErrorCode, VtpmReply, VtpmRequest};
use xvtpm_tests::{Stack, get_random, mgr_call, rc, read_response};

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_sec() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn log_len(s: &Stack, u: &Uuid) -> usize {
    s.vtpm_log(u).len()
}

/// Polls `f` every 20 ms until it holds or `limit` passes.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One GetRandom on a fresh connection, with bounded waits; `None` if not served.
fn try_get_random(port: u16) -> Option<u32> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(&get_random(8)).ok()?;
    xvtpm_tests::try_read_response(&mut s).ok().map(|r| rc(&r))
}

/// Whether the vTPM has closed this (non-blocking) connection.
fn is_closed(c: &mut TcpStream) -> bool {
    match c.read(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

fn raise_own_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    setrlimit(Resource::Nofile, Rlimit { current: hard, maximum: hard }).unwrap();
}

#[test]
fn a_flood_of_idle_connections_on_few_descriptors_neither_spins_nor_floods_the_log() {
    raise_own_fd_limit();
    let s = Stack::start();
    let v = s.create_vtpm();
    let (pid, port) = (v.pid.unwrap(), v.port.unwrap());
    // The vTPM gets few descriptors, so the flood runs it out of them (EMFILE).
    xvtpm_tests::set_nofile(pid, 40);
    assert_eq!(try_get_random(port), Some(0));
    let log_before = log_len(&s, &v.uuid);

    // 2 000 connections (1 000 per channel: they fit the listen backlogs), held open, silent.
    let mut flood = Vec::new();
    let mut failed = 0;
    for i in 0..2000u16 {
        let p = if i % 2 == 0 { port } else { port + 1 };
        match TcpStream::connect_timeout(&([127, 0, 0, 1], p).into(), Duration::from_secs(2)) {
            Ok(c) => flood.push(c),
            Err(_) if failed < 20 => failed += 1,
            Err(_) => break,
        }
    }
    assert!(flood.len() >= 200, "only {} connections of the flood got through", flood.len());
    // Out of descriptors: the accept loop must pause, not spin.
    assert!(
        eventually(Duration::from_secs(10), || s.vtpm_log(&v.uuid).contains("Too many open files")),
        "the flood did not exhaust the vTPM's descriptors (test ineffective):\n{}",
        s.vtpm_log(&v.uuid)
    );
    let hz = clock_ticks_per_sec();
    let window = Duration::from_secs(3);
    let t0 = cpu_ticks(pid);
    let start = Instant::now();
    std::thread::sleep(window); // the measurement window, not a synchronisation
    let used = (cpu_ticks(pid) - t0) as f64 / hz as f64;
    let share = used / start.elapsed().as_secs_f64();
    let grown = log_len(&s, &v.uuid) - log_before;
    assert!(share < 0.20, "vTPM used {:.0} % of a CPU while flooded", share * 100.0);
    assert!(grown < 64 * 1024, "the flood added {grown} bytes of log");

    // The flood stops; a legitimate client is served again.
    let flooded = flood.len();
    drop(flood);
    assert!(
        eventually(Duration::from_secs(30), || try_get_random(port) == Some(0)),
        "not served after the flood stopped:\n{}",
        s.vtpm_log(&v.uuid)
    );
    let grown = log_len(&s, &v.uuid) - log_before;
    assert!(grown < 64 * 1024, "the flood added {grown} bytes of log");
    eprintln!("flood: {flooded} connections, vTPM CPU {:.1} % over {window:?}, log +{grown} bytes", share * 100.0);
}

#[test]
fn connections_per_channel_are_bounded_and_silent_ones_closed() {
    raise_own_fd_limit();
    let s = Stack::start();
    let v = s.create_vtpm();
    let (pid, port) = (v.pid.unwrap(), v.port.unwrap());
    // A client that talks keeps its connection however long the flood lasts.
    let mut active = TcpStream::connect(("127.0.0.1", port)).unwrap();
    active.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    active.write_all(&get_random(8)).unwrap();
    assert_eq!(rc(&read_response(&mut active)), 0);
    let before = open_fds(pid);

    let mut silent: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    for c in &silent {
        c.set_nonblocking(true).unwrap();
    }
    let closed = |conns: &mut [TcpStream]| conns.iter_mut().map(is_closed).filter(|&c| c).count();
    // Beyond the cap the vTPM closes connections at once.
    assert!(
        eventually(Duration::from_secs(10), || closed(&mut silent) >= 300 - 32),
        "only {} of 300 connections beyond the cap were closed",
        closed(&mut silent)
    );
    let held = open_fds(pid) - before;
    assert!(held <= 32 + 1, "the vTPM holds {held} more descriptors for 300 silent connections");
    // The ones it kept are closed when they stay silent (10 s).
    assert!(eventually(Duration::from_secs(25), || closed(&mut silent) == 300), "silent connections are kept open");
    // The talking client is still served.
    active.write_all(&get_random(8)).unwrap();
    assert_eq!(rc(&read_response(&mut active)), 0);
    assert_eq!(try_get_random(port), Some(0));
    let log = s.vtpm_log(&v.uuid);
    assert!(log.matches("too many open").count() <= 10, "{log}");
}

/// Sends one control request on a fresh TCP connection and reads `n` bytes.
fn ctrl_on(c: &mut TcpStream, req: &[u8], n: usize) -> Vec<u8> {
    c.write_all(req).unwrap();
    let mut r = vec![0u8; n];
    c.read_exact(&mut r).unwrap();
    r
}

#[test]
fn control_channel_loops_do_not_flood_the_log() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let mut c = TcpStream::connect(("127.0.0.1", v.port.unwrap() + 1)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // CMD_STOP, then CMD_STORE_VOLATILE on the stopped TPM, 2 000 times.
    assert_eq!(ctrl_on(&mut c, &0x0eu32.to_be_bytes(), 4), [0, 0, 0, 0]);
    for _ in 0..2000 {
        ctrl_on(&mut c, &0x0au32.to_be_bytes(), 4);
    }
    // CMD_INIT in a loop: every one power-cycles the engine.
    for _ in 0..100 {
        assert_eq!(ctrl_on(&mut c, &[0, 0, 0, 2, 0, 0, 0, 0], 4), [0, 0, 0, 0]);
    }
    let log = s.vtpm_log(&v.uuid);
    let volatile = log.matches("CMD_STORE_VOLATILE").count();
    let inits = log.matches("power cycle").count();
    assert!(volatile <= 15, "{volatile} CMD_STORE_VOLATILE lines for 2 000 requests");
    assert!(inits <= 15, "{inits} power-cycle lines for 100 CMD_INITs");
    assert!(log.len() < 64 * 1024, "{} bytes of log", log.len());
}

#[test]
fn manager_refusals_are_rate_limited() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let sock = s.run_dir().join("vtpm").join(format!("{}.sock", v.uuid));
    // This test process is not the vTPM's process: every request is refused, and logged.
    for _ in 0..300 {
        match mgr_call::<_, VtpmReply>(&sock, &VtpmRequest::GetStateKey { version: mgr::PROTOCOL_VERSION, uuid: v.uuid }) {
            VtpmReply::Error(f) => assert_eq!(f.code, ErrorCode::Refused),
            other => panic!("not refused: {other:?}"),
        }
    }
    let n = s.mgr_log().matches("refused a vTPM request").count();
    assert!((1..=15).contains(&n), "{n} refusal lines in the manager's log for 300 refused requests");
}

#[test]
fn a_local_vtpm_log_is_capped_and_rotated() {
    let s = Stack::start();
    let v = s.create_vtpm();
    s.stop_vtpm(&v.uuid);
    let log = s.state_dir().join("vtpms").join(v.uuid.to_string()).join("vtpm.log");
    // Every line a peer can trigger is rate-limited, so no peer fills 1 MiB in test time: bring
    // the log to just under its cap, and let the restarted vTPM's own lines cross it.
    let cap: u64 = 1 << 20; // xvtpm_log::LOG_MAX_BYTES
    let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let fill = (cap - 64).checked_sub(len(&log)).expect("the log is already near its cap");
    std::fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(&vec![b'#'; fill as usize]).unwrap();
    // Debug logging makes every control request a log line (rate-limited per call site).
    let out = Command::new(testkit::bin_path("xl-vtpm"))
        .args(["vtpm", "start", &v.uuid.to_string(), "--json"])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .env("XVTPM_VTPM_DOMAIN", testkit::bin_path("vtpm-domain"))
        .env("XVTPM_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = Stack::handle(&serde_json::from_slice(&out.stdout).unwrap());
    let mut c = TcpStream::connect(("127.0.0.1", v.port.unwrap() + 1)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..5000 {
        ctrl_on(&mut c, &1u32.to_be_bytes(), 8);
    }
    let (cur, old) = (len(&log), len(&log.with_extension("log.1")));
    assert!(old > cap / 2 && old <= cap, "vtpm.log.1 is {old} bytes: the log did not rotate at its cap");
    assert!(cur <= 64 * 1024, "vtpm.log is {cur} bytes after 5 000 control requests at debug level");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
    // Nothing else accumulates next to the state.
    let names: Vec<String> = std::fs::read_dir(log.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| ["state.xvts", "vtpm.log", "vtpm.log.1", "access.json"].contains(&n.as_str())), "{names:?}");
}
