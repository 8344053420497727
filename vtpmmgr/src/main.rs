//! `vtpmmgr`: the vTPM manager daemon. See the library docs.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vtpmmgr::deepquote::BatchConfig;
use vtpmmgr::manager::{Config, Manager};

/// The xvtpm manager: owns the physical TPM, seals the vTPMs' keys to the
/// host's PCRs and releases each key only to the vTPM it belongs to.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TCTI of the physical TPM (e.g. device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321).
    #[arg(long, env = "XVTPM_TCTI", default_value = "device:/dev/tpmrm0", global = true)]
    tcti: String,
    /// Persistent state directory.
    #[arg(long, default_value = "/var/lib/xvtpm", global = true)]
    state_dir: PathBuf,
    /// Runtime directory for sockets.
    #[arg(long, default_value = "/run/xvtpm", global = true)]
    run_dir: PathBuf,
    /// The vTPMs' state directory (xl-vtpm's `--state-dir`; default: --state-dir), where an
    /// imported vTPM's state file is written (`DIR/vtpms/UUID/state.xvts`).
    #[arg(long, global = true)]
    vtpm_state_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve vTPMs and the admin socket (provision through `xl-vtpm mgr provision`).
    Serve {
        /// Most deep-quote requests one physical quote covers.
        #[arg(long, default_value_t = 1024)]
        batch_max: usize,
        /// One physical quote per deep-quote request (for comparison).
        #[arg(long)]
        no_batching: bool,
        /// Most deep-quote requests waiting; beyond it callers get "busy, retry".
        #[arg(long, default_value_t = 4096)]
        queue_max: usize,
        /// Also serve vTPMs running in their own Xen domains over tpmif
        /// (backend directory; vTPM domains must be attached with VtpmAttachDomain).
        /// A relative directory is under this domain's own (`backend/vtpm`: dom0's
        /// `/local/domain/0/backend/vtpm`, or the manager domain's).
        #[arg(long, num_args = 0..=1, default_missing_value = "backend/vtpm")]
        xen: Option<String>,
        /// In the manager's own domain: also serve dom0's admin CLI over a Xen link (dom0 runs
        /// `vtpmmgr bridge --domain THIS-DOMAIN`).
        #[arg(long)]
        admin_xen: bool,
    },
    /// In dom0, with the manager in its own domain: bind the admin socket here and carry every
    /// admin request to that manager over its Xen admin link (`serve --admin-xen` there).
    Bridge {
        /// The manager domain: its name (followed when it is restarted) or its domain id.
        #[arg(long)]
        domain: String,
    },
    /// After an intended host upgrade: authorise the current PCR values with the
    /// admin's policy-signing key so the master secret unseals again.
    Reauthorize {
        /// The admin's policy-signing key written at provisioning.
        #[arg(long)]
        policy_key: PathBuf,
    },
    /// Accept the store file as it is although it does not match its rollback counter in the
    /// physical TPM (an older copy, a missing counter, …): every change after the copy was
    /// made is lost. The manager refuses to start in that case and says why; stop it first.
    AcceptStore {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

fn main() {
    xvtpm_clidoc::intercept("vtpmmgr", <Args as clap::CommandFactory>::command);
    quiet_tss2();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("XVTPM_LOG").unwrap_or_else(|_| "info,xenstore_rs=error,tss_esapi=off".into()))
        .init();
    harden();
    let vtpm_state_dir = args.vtpm_state_dir.unwrap_or_else(|| args.state_dir.clone());
    let mut cfg = Config { tcti: args.tcti, state_dir: args.state_dir, run_dir: args.run_dir, vtpm_state_dir, batch: Default::default() };
    // Every command writes the store or the TPM: one manager at a time per directory pair,
    // checked before anything is touched.
    let _lock = match vtpmmgr::instance::acquire(&cfg.state_dir, &cfg.run_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vtpmmgr: error: {e}");
            std::process::exit(1);
        }
    };
    let result = match args.cmd {
        Cmd::Serve { batch_max, no_batching, queue_max, xen, admin_xen } => {
            cfg.batch = BatchConfig { max_batch: if no_batching { 1 } else { batch_max.max(1) }, max_queue: queue_max.max(1) };
            serve(cfg, xen, admin_xen)
        }
        Cmd::Bridge { domain } => bridge(&cfg, &domain),
        Cmd::Reauthorize { policy_key } => vtpmmgr::reauthorize(&cfg, &policy_key),
        Cmd::AcceptStore { yes: false } => Err(anyhow::anyhow!(
            "accept-store discards every change made after this copy of the store was written (deleted vTPMs and groups may come back); re-run with --yes to accept it"
        )),
        Cmd::AcceptStore { yes: true } => vtpmmgr::accept_store(&cfg).map(|msg| eprintln!("vtpmmgr: {msg}")),
    };
    if let Err(e) = result {
        eprintln!("vtpmmgr: error: {}", xvtpm_log::report(e.as_ref()));
        std::process::exit(1);
    }
}

/// tss2 logs its own view of every failure to stderr (`ERROR:tcti:…`) before the manager
/// reports the cause; the manager's errors say it once. tss2 reads `TSS2_LOG` from the
/// environment, so unless the user set it (to debug tss2), the process runs itself again with
/// `TSS2_LOG=all+none` (same pid, same arguments). If that fails, it continues with the noise.
fn quiet_tss2() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("TSS2_LOG").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("TSS2_LOG", "all+none").exec();
    eprintln!("vtpmmgr: warning: cannot silence tss2's log (TSS2_LOG): {err}");
}

fn serve(cfg: Config, xen: Option<String>, admin_xen: bool) -> anyhow::Result<()> {
    let mgr = Manager::open(cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(vtpmmgr::daemon::serve(mgr, xen, admin_xen))?;
    Ok(())
}

fn bridge(cfg: &Config, domain: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(vtpmmgr::bridge::run(vtpmmgr::bridge::Target::parse(domain), &cfg.run_dir))?;
    Ok(())
}

/// The manager holds the master secret and every vTPM's state key in memory: no core dump,
/// and no ptrace or /proc/PID/mem access by anything but root with CAP_SYS_PTRACE.
fn harden() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        eprintln!("vtpmmgr: warning: cannot disable core dumps (RLIMIT_CORE): {e}");
    }
    // One listening socket per vTPM identity: use every descriptor the hard limit allows.
    if let Ok((soft, hard)) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("vtpmmgr: warning: cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}");
    }
}
