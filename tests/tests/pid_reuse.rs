//! A vTPM's attachment names one process instance for its whole life: after `kill -9` of a
//! vTPM, a new process that obtains the same pid (real pid reuse through
//! `/proc/sys/kernel/ns_last_pid`) gets no state key, is not shown as the vTPM's process, and
//! does not stop `xl-vtpm vtpm start`; the manager drops the attachment as soon as the vTPM exits.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;
use vtpm_proto::mgr::{self, VtpmReply, VtpmRequest};
use xvtpm_tests::{Stack, get_random, raw_command, rc, try_mgr_call};

/// Helper mode (run by the test below as a child process on a recycled pid): on a line from
/// stdin, asks the vTPM socket named in the environment for that vTPM's state key, prints
/// the outcome, then lives until stdin closes.
#[test]
fn squatter() {
    let (Ok(sock), Ok(uuid)) = (std::env::var("XVTPM_SQUAT_SOCK"), std::env::var("XVTPM_SQUAT_UUID")) else { return };
    let uuid: Uuid = uuid.parse().unwrap();
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    // The manager unbinds a vTPM's socket once its process is gone: nothing to connect to is a
    // refusal too.
    match try_mgr_call::<_, VtpmReply>(std::path::Path::new(&sock), &VtpmRequest::GetStateKey { version: mgr::PROTOCOL_VERSION, uuid }) {
        Err(e) => println!("SQUAT:refused (no socket: {e})"),
        Ok(VtpmReply::StateKey { .. }) => println!("SQUAT:granted"),
        Ok(VtpmReply::Error(f)) => println!("SQUAT:refused {:?}: {}", f.code, f.message),
        Ok(other) => println!("SQUAT:other {other:?}"),
    }
    std::io::stdout().flush().unwrap();
    line.clear();
    let _ = stdin.read_line(&mut line);
}

/// Starts the helper on pid `pid` (which must be free): sets the kernel's last pid to
/// `pid - 1` and forks, until the helper lands on it (other processes on the host fork too).
fn squat_on(pid: u32, sock: &std::path::Path, uuid: &Uuid) -> Child {
    let exe = std::env::current_exe().unwrap();
    for _ in 0..2000 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).expect("write ns_last_pid (needs root)");
        let mut c = Command::new(&exe)
            .args(["squatter", "--exact", "--nocapture", "--test-threads=1"])
            .env("XVTPM_SQUAT_SOCK", sock)
            .env("XVTPM_SQUAT_UUID", uuid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        if c.id() == pid {
            return c;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    panic!("could not get a process onto pid {pid} in 2000 forks");
}

fn attachments_name(s: &Stack, uuid: &Uuid) -> bool {
    std::fs::read_to_string(s.run_dir().join("attachments.json")).unwrap_or_default().contains(&uuid.to_string())
}

#[test]
fn a_process_on_a_dead_vtpms_pid_is_not_that_vtpm() {
    // Orphaned vTPMs (xl-vtpm exits after spawning them) become our children, so the killed
    // one can be reaped here and its pid becomes free for reuse.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let s = Stack::start();
    let v = s.create_vtpm();
    let pid = v.pid.unwrap();
    assert!(attachments_name(&s, &v.uuid));

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None).unwrap();
    // The manager drops the attachment as soon as the process is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while attachments_name(&s, &v.uuid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!attachments_name(&s, &v.uuid), "the dead vTPM's attachment was kept:\n{}", s.mgr_log());

    let sock = s.run_dir().join("vtpm").join(format!("{}.sock", v.uuid));
    let mut squatter = squat_on(pid, &sock, &v.uuid);
    let mut out = BufReader::new(squatter.stdout.take().unwrap());
    let mut stdin = squatter.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    let outcome = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "the helper on pid {pid} exited without an answer");
        // (libtest prints "test squatter ... " on the same line first.)
        if let Some((_, o)) = line.split_once("SQUAT:") {
            break o.trim().to_string();
        }
    };
    assert!(outcome.starts_with("refused"), "process on recycled pid {pid}: {outcome}");

    // It is not reported as the vTPM's process, and does not block a start.
    let shown = s.xl_json(&["vtpm", "show", &v.uuid.to_string()]);
    assert!(shown["attached_pid"].is_null(), "{shown}");
    assert_eq!(shown["state"], "stopped", "{shown}");
    let v2 = s.start_vtpm(&v.uuid);
    assert_ne!(v2.pid, Some(pid));
    assert_eq!(rc(&raw_command(v2.port.unwrap(), &get_random(8))), 0);
    drop(stdin);
    let _ = squatter.kill();
    let _ = squatter.wait();
}
