//! Least privilege for a vTPM process in dom0 or on a local host.
//!
//! [`harden`] runs first in `main` (every mode): the process is not dumpable (no core file,
//! no `/proc/<pid>/mem` or ptrace for its own uid) and its core size limit is 0, so the state
//! key and the TPM's secrets never reach a core file.
//!
//! [`enter`] runs once the process has done what needs root — read its state, bound its
//! listeners, opened the Xen devices — and before it reads anything from a client or guest:
//! it drops to the vTPM's own uid (`setgroups([])`, `setgid`, `setuid`; no capability
//! remains), sets `PR_SET_NO_NEW_PRIVS`, and installs a seccomp filter that allows only the
//! system calls listed in [`allowed`]; any other kills the process with `SIGSYS`, so a
//! missing entry is a visible crash, never a silent failure. Paths it still needs (its state
//! directory, the manager's socket directory) are opened beforehand and reached through
//! `/proc/self/fd/N/…` ([`PinnedDir`]), so the directories above them may stay root-only.
//!
//! The Xen tpmif path (`ioctl` on `/dev/xen/*`, `mmap` of grant pages) is allowed but only
//! exercised in the Xen testbed. PID 1 of a vTPM domain ([`crate::init`]) is not sandboxed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::errctx::{Failed, io_named, io_other};
use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};

/// Whom to run as, and whether to sandbox at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Drop to this (uid, gid) after setup; `None` keeps the starting uid.
    pub user: Option<(u32, u32)>,
    /// `--no-sandbox`: no uid change, no no-new-privileges, no seccomp (debugging only).
    pub disabled: bool,
}

/// Makes the process non-dumpable with a core size limit of 0. Call first thing in `main`.
pub fn harden() -> io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(io_other("prctl(PR_SET_DUMPABLE, 0)"))?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(io_other("setrlimit(RLIMIT_CORE, 0)"))?;
    Ok(())
}

/// A directory opened before the privilege drop; its entries stay reachable through
/// `/proc/self/fd/N/NAME` whatever the permissions of the directories above it.
#[derive(Debug)]
pub struct PinnedDir {
    dir: File,
}

impl PinnedDir {
    /// Opens `dir` (a directory).
    pub fn open(dir: &Path) -> io::Result<PinnedDir> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY)
            .open(dir)
            .map_err(io_named(format_args!("opening directory {}", dir.display())))?;
        Ok(PinnedDir { dir })
    }

    /// Opens the directory holding `file` and returns it with `file`'s name in it.
    pub fn for_file(file: &Path) -> io::Result<(PinnedDir, PathBuf)> {
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = file.file_name().ok_or_else(|| io::Error::other(format!("{} names no file", file.display())))?;
        let pinned = PinnedDir::open(dir)?;
        let via = pinned.path(Path::new(name));
        Ok((pinned, via))
    }

    /// The path of `name` in this directory through `/proc/self/fd`.
    pub fn path(&self, name: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd())).join(name)
    }
}

/// Drops to `spec.user`, sets no-new-privileges and installs the seccomp filter (all threads).
pub fn enter(spec: &SandboxSpec) -> io::Result<()> {
    if spec.disabled {
        return Ok(());
    }
    if let Some((uid, gid)) = spec.user {
        drop_to(uid, gid)?;
    }
    install_filter()
}

fn drop_to(uid: u32, gid: u32) -> io::Result<()> {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    if uid == 0 || gid == 0 {
        return Err(io::Error::other("refusing to run a vTPM as uid or gid 0 (--uid/--gid)"));
    }
    let err = |what: &str| {
        let what = what.to_string();
        move |e: nix::Error| io::Error::other(Failed::new(what, e).with_fix("vtpm-domain must start as root to use --uid"))
    };
    setgroups(&[]).map_err(err("setgroups([])"))?;
    setgid(Gid::from_raw(gid)).map_err(err("setgid"))?;
    setuid(Uid::from_raw(uid)).map_err(err("setuid"))?;
    // setuid(2) from root to another uid clears every capability; check it cannot come back.
    if setuid(Uid::from_raw(0)).is_ok() || nix::unistd::geteuid().as_raw() != uid {
        return Err(io::Error::other(format!("dropping to uid {uid} did not stick")));
    }
    Ok(())
}

/// Builds and installs the filters (also used by the tests).
pub fn install_filter() -> io::Result<()> {
    let (main, clone3) = filters()?;
    // clone3's filter first: once the main one is in, prctl and seccomp themselves are denied.
    seccompiler::apply_filter_all_threads(&clone3).map_err(io_other("installing the clone3 filter"))?;
    seccompiler::apply_filter_all_threads(&main).map_err(io_other("installing the seccomp filter"))?;
    Ok(())
}

fn arch() -> io::Result<seccompiler::TargetArch> {
    std::env::consts::ARCH.try_into().map_err(io_other(format_args!("seccomp on {}", std::env::consts::ARCH)))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> io::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(io::Error::other)
}

fn rule(c: Vec<SeccompCondition>) -> io::Result<SeccompRule> {
    SeccompRule::new(c).map_err(io::Error::other)
}

/// The main filter (allow-list, kill the process otherwise) and a second one that makes
/// `clone3` fail with `ENOSYS` (its flags sit in memory a filter cannot read; libc then
/// falls back to `clone`, whose flags the main filter checks: threads only).
fn filters() -> io::Result<(seccompiler::BpfProgram, seccompiler::BpfProgram)> {
    use nix::libc;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed().iter().map(|&n| (n, vec![])).collect();
    // Sockets: only AF_UNIX ones are made after setup (the manager link, tokio's signal pipe),
    // and NETLINK_SOCK_DIAG ones: a loopback TCP peer's uid is looked up that way (`peer`).
    rules.insert(
        libc::SYS_socket,
        vec![
            rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?,
            rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?, cond(2, SeccompCmpOp::Eq, libc::NETLINK_SOCK_DIAG as u64)?])?,
        ],
    );
    rules.insert(libc::SYS_socketpair, vec![rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?]);
    // Threads (tokio's blocking pool) but no new processes.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])?]);
    rules.insert(libc::SYS_clone3, vec![]);
    let main = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, arch()?)
        .and_then(TryInto::try_into)
        .map_err(io_other("building the seccomp filter"))?;
    let only_clone3 = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let clone3 = SeccompFilter::new(only_clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch()?)
        .and_then(TryInto::try_into)
        .map_err(io_other("building the clone3 filter"))?;
    Ok((main, clone3))
}

/// System calls a vTPM may make after setup, besides `socket`, `socketpair` and `clone`, which
/// are allowed with argument checks. Found by running every end-to-end test under `strace -f`
/// (after the filter: accept4 brk clock_gettime close connect epoll_ctl epoll_wait exit_group
/// fcntl fsync futex getpid getrandom getsockopt ioctl munmap openat recvfrom recvmsg rename
/// rt_sigaction rt_sigreturn sendto setsockopt sigaltstack socket unlink write); the rest
/// covers paths the local tests do not reach: the Xen tpmif backend (`ioctl`, `mmap`, `poll`
/// and `read`/`write` on `/dev/xen/*`), tokio's blocking threads, large reallocations, aborts,
/// reading `/proc` (directory listing, links).
pub fn allowed() -> Vec<i64> {
    use nix::libc::*;
    let mut v = vec![
        // memory (allocator, libtpms, grant-page mappings on Xen)
        SYS_brk, SYS_mmap, SYS_munmap, SYS_mremap, SYS_mprotect, SYS_madvise,
        // files: the sealed state (temp, write, fsync, rename, fsync dir; unlink on failure)
        SYS_openat, SYS_close, SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_fstat, SYS_newfstatat,
        SYS_statx, SYS_fsync, SYS_fdatasync, SYS_renameat2, SYS_unlinkat, SYS_fcntl,
        SYS_ioctl, SYS_lseek, SYS_getdents64, SYS_readlinkat,
        // sockets: accept, the manager link, SCM_RIGHTS (CMD_SET_DATAFD)
        SYS_accept4, SYS_connect, SYS_sendto, SYS_recvfrom, SYS_sendmsg, SYS_recvmsg, SYS_shutdown,
        SYS_getsockopt, SYS_setsockopt, SYS_getsockname, SYS_getpeername,
        // the tokio runtime and its threads
        SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_ppoll, SYS_futex, SYS_sched_yield,
        SYS_sched_getaffinity, SYS_set_robust_list, SYS_rseq, SYS_clock_gettime, SYS_clock_nanosleep,
        SYS_nanosleep, SYS_gettimeofday, SYS_getrandom, SYS_rt_sigaction, SYS_rt_sigprocmask,
        SYS_rt_sigreturn, SYS_sigaltstack, SYS_restart_syscall, SYS_getpid, SYS_gettid,
        // the capped log: stderr follows the current file after a rotation (dup2/dup3)
        SYS_dup3,
        // leaving (a panic aborts through tgkill)
        SYS_exit, SYS_exit_group, SYS_tgkill,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([SYS_open, SYS_stat, SYS_rename, SYS_renameat, SYS_unlink, SYS_poll, SYS_epoll_wait, SYS_readlink, SYS_dup2]);
    v
}

// The tests fork and make raw system calls to prove the filter kills what it must
// (`unsafe` is denied workspace-wide; the sandbox itself needs none).
#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};

    /// Runs `f` in a forked child under the filter; returns how the child ended.
    fn in_sandboxed_child(f: fn() -> i32) -> WaitStatus {
        let (main, clone3) = filters().expect("filters build");
        // SAFETY: the child only makes system calls (prctl, seccomp, the probe) and _exit; it
        // touches no lock another thread of the test harness could hold.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = if seccompiler::apply_filter(&clone3).is_ok() && seccompiler::apply_filter(&main).is_ok() { f() } else { 99 };
                // SAFETY: _exit is async-signal-safe and ends the child without unwinding.
                unsafe { nix::libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    fn killed_by_sigsys(s: WaitStatus) -> bool {
        matches!(s, WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _))
    }

    #[test]
    fn forbidden_calls_kill_with_sigsys() {
        // SAFETY: execve with NUL-terminated constant strings and a NULL-terminated argv.
        let execve = || unsafe {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            nix::libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), std::ptr::null()) as i32
        };
        // SAFETY: PTRACE_TRACEME reads no pointer argument.
        let ptrace = || unsafe { nix::libc::ptrace(nix::libc::PTRACE_TRACEME, 0, 0, 0) as i32 };
        // SAFETY: socket takes integers only.
        let raw_socket = || unsafe { nix::libc::socket(nix::libc::AF_PACKET, nix::libc::SOCK_RAW, 0) };
        // SAFETY: socket takes integers only.
        let inet_socket = || unsafe { nix::libc::socket(nix::libc::AF_INET, nix::libc::SOCK_STREAM, 0) };
        // SAFETY: clone without CLONE_VM or a new stack is fork; the child of this probe (if the
        // filter let it through) returns from the closure into the probe's `_exit`.
        let fork_ = || unsafe { nix::libc::syscall(nix::libc::SYS_clone, nix::libc::SIGCHLD as u64, 0, 0, 0, 0) as i32 };
        // SAFETY: setuid takes an integer only.
        let setuid0 = || unsafe { nix::libc::syscall(nix::libc::SYS_setuid, 0) as i32 };
        for (name, probe) in [("execve", execve as fn() -> i32), ("ptrace", ptrace), ("socket(AF_PACKET)", raw_socket), ("socket(AF_INET)", inet_socket), ("fork", fork_), ("setuid", setuid0)] {
            let s = in_sandboxed_child(probe);
            assert!(killed_by_sigsys(s), "{name} under the filter: {s:?}, expected SIGSYS");
        }
    }

    #[test]
    fn allowed_calls_work_and_clone3_falls_back() {
        fn exited_0(s: WaitStatus) -> bool {
            matches!(s, WaitStatus::Exited(_, 0))
        }
        // SAFETY: socket takes integers only.
        let unix = || unsafe { i32::from(nix::libc::socket(nix::libc::AF_UNIX, nix::libc::SOCK_STREAM, 0) < 0) };
        // SAFETY: clone3 with a NULL `clone_args` and size 0 is refused (by the kernel or the
        // filter) before it reads anything; errno is this thread's.
        let clone3 = || unsafe {
            let r = nix::libc::syscall(nix::libc::SYS_clone3, std::ptr::null::<u8>(), 0usize);
            i32::from(!(r == -1 && *nix::libc::__errno_location() == nix::libc::ENOSYS))
        };
        let s = in_sandboxed_child(unix);
        assert!(exited_0(s), "socket(AF_UNIX) must stay allowed: {s:?}");
        // SAFETY: socket takes integers only.
        let sock_diag = || unsafe { i32::from(nix::libc::socket(nix::libc::AF_NETLINK, nix::libc::SOCK_DGRAM, nix::libc::NETLINK_SOCK_DIAG) < 0) };
        let s = in_sandboxed_child(sock_diag);
        assert!(exited_0(s), "socket(AF_NETLINK, NETLINK_SOCK_DIAG) must stay allowed (TCP peer uids): {s:?}");
        let s = in_sandboxed_child(clone3);
        assert!(exited_0(s), "clone3 must fail with ENOSYS (libc falls back to clone): {s:?}");
    }
}
