//! The Xen testbed's dom0 scenario (`ci/testbed`): started by dom0's `/init`, runs the phases
//! in order, prints `RESULT`/`MARK`/`CHECK`/`PERF`/`INFO` lines for `run.sh`, dumps the logs and
//! exits 0 iff no phase FAILed.
//!
//! Switches come from dom0's kernel command line (run.sh sets them):
//! `xvtpm_mgr=auto|1|0`, `xvtpm_vtpm=dom0|0`, `xvtpm_life=1|0`, `xvtpm_vtpmdom=1|0`,
//! `xvtpm_lifedom=1|0`, `xvtpm_migrate=1|0`, `xvtpm_libvirt=1|0`, `xvtpm_hvm=1|0`, `xvtpm_mgrdom=1|0`, `xvtpm_xhost=1|0`, `xvtpm_twohost=1|0`, `xvtpm_role=hostb` (the second Xen host's dom0: phases::twohost), `xvtpm_deadline=S` (dom0 uptime by which every wait gives up).
//! The environment (PATH, LD_LIBRARY_PATH, TPM2TOOLS_TCTI, XENSTORED_ROOTDIR, the vTPM domain's
//! boot files) comes from the launcher, `dom0-init.sh`.
#![forbid(unsafe_code)]

mod cmd;
mod phases;
mod remote;
mod runner;
mod xen;

use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        // the two-host phases' stand-in for ssh (remote.rs)
        Some("ssh") => remote::client(&args[1..]),
        Some("sshd") => remote::server(&args[1..]),
        _ if xen::cmdline_arg("xvtpm_role").as_deref() == Some("hostb") => phases::twohost::hostb_main(),
        _ => phases::run_all(),
    };
    std::process::exit(code);
}

/// Seconds as a Duration.
pub fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}
