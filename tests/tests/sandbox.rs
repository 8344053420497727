//! Least privilege: every vTPM `xl-vtpm` starts runs as its own uid (kept across restarts,
//! different from every other vTPM's), in the vTPM group, with no capability, no-new-privileges
//! and a seccomp filter; it is not dumpable and its core size limit is 0. A system call outside
//! the filter kills the running vTPM with SIGSYS (injected with gdb into the real process).

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use vtpm_proto::mgr::{VTPM_GID, VTPM_UID_COUNT, VTPM_UID_FIRST};
use xvtpm_tests::{Stack, VtpmHandle, tpm2, wait_gone};

fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

/// The value of `name:` in /proc/<pid>/status, whitespace-normalised.
fn field(status: &str, name: &str) -> String {
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("no {name} in:\n{status}"));
    line[name.len() + 1..].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The vTPM's uid, after checking everything the sandbox promises about its process.
fn assert_confined(v: &VtpmHandle) -> u32 {
    let pid = v.pid.expect("running");
    let st = status(pid);
    let uids: Vec<u32> = field(&st, "Uid").split(' ').map(|u| u.parse().unwrap()).collect();
    let uid = uids[0];
    assert!(uids.iter().all(|&u| u == uid), "real, effective, saved and fs uid must agree: {uids:?}");
    assert!((VTPM_UID_FIRST..VTPM_UID_FIRST + VTPM_UID_COUNT).contains(&uid), "uid {uid} is not a vTPM uid");
    assert_eq!(field(&st, "Gid"), format!("{VTPM_GID} {VTPM_GID} {VTPM_GID} {VTPM_GID}"));
    assert_eq!(field(&st, "Groups"), "", "no supplementary groups");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(&st, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    assert_eq!(field(&st, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(field(&st, "Seccomp_filters"), "2", "the allow-list and the clone3 filter");
    // Not dumpable: the kernel gives a non-dumpable process's /proc files to root.
    let owner = std::fs::metadata(format!("/proc/{pid}/status")).unwrap().uid();
    assert_eq!(owner, 0, "/proc/{pid}/status owned by {owner}: the vTPM (uid {uid}) is dumpable");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().collect::<Vec<_>>()[4..6], ["0", "0"], "{core}");
    uid
}

/// Lets children inherit a non-zero core limit, so a vTPM's own limit of 0 is its doing.
fn allow_core_dumps_here() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_CORE).unwrap();
    setrlimit(Resource::RLIMIT_CORE, hard, hard).unwrap();
}

#[test]
fn every_vtpm_runs_as_its_own_uid_confined_and_undumpable() {
    allow_core_dumps_here();
    let s = Stack::start();
    let a = s.create_vtpm();
    let b = s.create_vtpm();
    let uid_a = assert_confined(&a);
    let uid_b = assert_confined(&b);
    assert_ne!(uid_a, uid_b, "two vTPMs share a uid");

    // The vTPM, not root, writes its state: the replaced file belongs to its uid.
    tpm2(&a.tcti(), &["tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "8"]);
    let dir = a.state_file.parent().unwrap();
    let (d, f) = (std::fs::metadata(dir).unwrap(), std::fs::metadata(&a.state_file).unwrap());
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o777), (uid_a, VTPM_GID, 0o700), "state directory");
    assert_eq!((f.uid(), f.mode() & 0o777), (uid_a, 0o600), "state file written by the vTPM");

    // The uid stays with the vTPM across a restart, and the state still opens.
    s.stop_vtpm(&a.uuid);
    let a2 = s.start_vtpm(&a.uuid);
    assert_eq!(assert_confined(&a2), uid_a);
    let out = tpm2(&a2.tcti(), &["tpm2_nvreadpublic"]);
    assert!(out.contains("0x1500016"), "{out}");
}

/// Makes the running vTPM call `expr` (through gdb, as root) and returns gdb's output.
fn inject(pid: u32, expr: &str) -> String {
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-p", &pid.to_string(), "-ex", &format!("call {expr}")])
        .output()
        .expect("run gdb (apt-get install gdb)");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_forbidden_system_call_kills_the_running_vtpm_with_sigsys() {
    let s = Stack::start();
    for (what, expr) in [
        ("a raw packet socket", "(int)socket(17, 3, 0)"), // AF_PACKET, SOCK_RAW
        ("execve", "(int)execve(\"/bin/true\", 0, 0)"),
        ("ptrace", "(long)ptrace(0, 0, 0, 0)"), // PTRACE_TRACEME
    ] {
        let v = s.create_vtpm();
        let pid = v.pid.unwrap();
        let out = inject(pid, expr);
        assert!(out.contains("SIGSYS"), "{what} in the vTPM did not end in SIGSYS:\n{out}");
        assert!(wait_gone(pid, Duration::from_secs(10)), "vTPM {pid} survived {what}");
    }
}
