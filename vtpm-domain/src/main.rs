//! `vtpm-domain`: serve one vTPM. See the library docs for the design.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use uuid::Uuid;
use vtpm_domain::init;
use vtpm_domain::config::{Config, EkChoice, Listen, MgrSpec, StateSpec, Startup};
use tpm_wire::Family;

/// One vTPM: libtpms TPM 2.0 (or 1.2), state sealed under a key from vtpmmgr,
/// served over swtpm's socket protocol.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The vTPM's UUID (as created by `xl-vtpm vtpm create`).
    #[arg(long)]
    uuid: Uuid,
    /// Sealed state file.
    #[arg(long, required_unless_present = "state_block", conflicts_with = "state_block")]
    state: Option<PathBuf>,
    /// Sealed state on a raw block device with A/B slots (a vTPM in its own Xen domain).
    #[arg(long)]
    state_block: Option<PathBuf>,
    /// The manager's per-vTPM socket (`<run-dir>/vtpm/<uuid>.sock`).
    #[arg(long, required_unless_present = "mgr_xen", conflicts_with = "mgr_xen")]
    mgr_socket: Option<PathBuf>,
    /// Reach the manager over Xen tpmif from this domain (frontend directory).
    #[arg(long, num_args = 0..=1, default_missing_value = "device/vtpm/0")]
    mgr_xen: Option<String>,
    /// Manufacture a new TPM; the state file must not exist yet.
    #[arg(long)]
    create: bool,
    /// With --create: manufacture the TPM (EK, EK certificate, first sealed state), print
    /// `{"manufactured":true,…}` and exit without listening (a vTPM made ahead of demand for
    /// `xl-vtpm vtpm pool fill`; nobody can reach it until it is started).
    #[arg(long, requires = "create", conflicts_with_all = ["listen", "ctrl_listener_stdin", "quote_socket", "state_block"])]
    manufacture_only: bool,
    /// Run a TPM 1.2 instead of TPM 2.0 (only at --create; later starts must match).
    #[arg(long)]
    tpm12: bool,
    /// Startup behaviour after a (re)start.
    #[arg(long, value_enum, default_value = "clear")]
    startup: Startup,
    /// Listener: tcp:HOST:PORT (data on PORT, control on PORT+1; port 0 picks),
    /// data:PATH or ctrl:PATH (Unix sockets). Repeatable.
    #[arg(long, required_unless_present = "manufacture_only")]
    listen: Vec<Listen>,
    /// Endorsement key made at --create.
    #[arg(long, value_enum, default_value = "rsa")]
    ek: EkChoice,
    /// Seconds to keep retrying the manager while it has not attached us.
    #[arg(long, default_value_t = 10)]
    mgr_wait: u64,
    /// Keep running when the controller (QEMU) on a ctrl:PATH control socket hangs up or
    /// sends CMD_SHUTDOWN (QEMU does at every exit, also when a Xen HVM guest reboots): the
    /// TPM is powered off, its state saved, and the next QEMU's CMD_INIT powers it on.
    /// Without it the vTPM saves its state and exits then, as swtpm --terminate does
    /// (how libvirt runs swtpm): a VM's quit or crash ends its vTPM. A ctrl:PATH paired
    /// with a data:PATH socket (the tpm2-tss swtpm TCTI opens one per request) persists
    /// too; TCP control connections end it only with CMD_SHUTDOWN.
    #[arg(long)]
    persist: bool,
    /// The one --listen ctrl:PATH socket is already bound at PATH (mode and owner set) and is
    /// this process's stdin: libvirt waits only 1 s for swtpm's socket, so xl-vtpm's libvirt
    /// entry point binds it before starting the vTPM (docs/libvirt.md).
    #[arg(long)]
    ctrl_listener_stdin: bool,
    /// Serve host-initiated deep quotes on this Unix socket (mode 0600, root only): one
    /// deep-quote vendor command per connection, nothing else (xvtpm-attestd uses it).
    #[arg(long)]
    quote_socket: Option<PathBuf>,
    /// The uid that uses this vTPM (e.g. QEMU's); besides root, the only one whose
    /// connections are accepted. Unix sockets are made mode 0600 and owned by it.
    #[arg(long)]
    consumer_uid: Option<u32>,
    /// Log to this file (stderr too is pointed at it), kept with one predecessor
    /// (`FILE.1`) each at most 1 MiB, instead of to stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// After setup, drop to this uid (with --gid; vtpm-domain must start as root).
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    /// After setup, drop to this gid (with --uid).
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    /// Debugging only: no privilege drop, no no-new-privileges, no seccomp filter.
    #[arg(long, conflicts_with_all = ["uid", "gid"])]
    no_sandbox: bool,
}

fn main() {
    xvtpm_clidoc::intercept("vtpm-domain", <Args as clap::CommandFactory>::command);
    // Before anything holds a secret: no core dumps, not dumpable.
    if let Err(e) = vtpm_domain::sandbox::harden() {
        eprintln!("vtpm-domain: error: {e}");
        if !init::is_pid1() {
            std::process::exit(1);
        }
    }
    if std::env::args().nth(1).as_deref() == Some(init::POWEROFF_ARG) {
        std::process::exit(init::poweroff_helper());
    }
    let as_init = init::is_pid1();
    // PID 1 in the vTPM's own domain: argv comes from the kernel command line after `--`.
    let args = if as_init {
        match init::setup() {
            Ok(loaded) => println!(
                "VTPMDOM-INIT vtpm-domain {} as the domain's init; mounted /proc /sys /dev; modules loaded: {}",
                env!("CARGO_PKG_VERSION"),
                loaded.join(" ")
            ),
            Err(e) => {
                eprintln!("vtpm-domain: error: init: {}", xvtpm_log::report(&e));
                init::power_off(1);
            }
        }
        match Args::try_parse() {
            Ok(a) => a,
            Err(e) => {
                // clap's message names the flag; the console is the only place to say it.
                eprintln!("{e}");
                init::power_off(2);
            }
        }
    } else {
        Args::parse()
    };
    let capped = match &args.log_file {
        Some(p) => match xvtpm_log::CappedLog::open(p, xvtpm_log::LOG_MAX_BYTES, true) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("vtpm-domain: error: --log-file {}: {e}", p.display());
                std::process::exit(1);
            }
        },
        None => None,
    };
    // `Targets` (LEVEL and TARGET=LEVEL directives), not `EnvFilter`: see [`vtpm_domain::log_filter`].
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = vtpm_domain::log_filter(std::env::var("XVTPM_LOG").ok().as_deref());
    let logs = tracing_subscriber::fmt()
        .with_ansi(capped.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .with_max_level(tracing::level_filters::LevelFilter::TRACE);
    match capped {
        Some(l) => logs.with_writer(move || l.writer()).finish().with(filter).init(),
        None => logs.with_writer(std::io::stderr).finish().with(filter).init(),
    }
    if as_init {
        let mut need: Vec<&Path> = init::XEN_DEVICES.iter().map(Path::new).collect();
        if let Some(b) = &args.state_block {
            need.push(b);
        }
        match init::wait_for(&need, init::DEVICE_WAIT) {
            Ok(t) => println!("VTPMDOM-INIT devices present after {} ms", t.as_millis()),
            Err(e) => {
                eprintln!("vtpm-domain: error: {e}");
                init::power_off(1);
            }
        }
    }
    let cfg = Config {
        uuid: args.uuid,
        family: if args.tpm12 { Family::Tpm12 } else { Family::Tpm2 },
        state: match (args.state, args.state_block) {
            (Some(f), _) => StateSpec::File(f),
            (None, Some(b)) => StateSpec::Block(b),
            (None, None) => unreachable!("clap requires one of --state and --state-block"),
        },
        mgr: match (args.mgr_socket, args.mgr_xen) {
            (Some(p), _) => MgrSpec::Socket(p),
            (None, Some(d)) => MgrSpec::Xen(d),
            (None, None) => unreachable!("clap requires one of --mgr-socket and --mgr-xen"),
        },
        create: args.create,
        manufacture_only: args.manufacture_only,
        startup: args.startup,
        listen: args.listen,
        consumer_uid: args.consumer_uid,
        mgr_wait: Duration::from_secs(args.mgr_wait),
        ek: args.ek,
        as_init,
        persist: args.persist,
        ctrl_listener_stdin: args.ctrl_listener_stdin,
        quote_socket: if as_init { None } else { args.quote_socket },
        sandbox: vtpm_domain::sandbox::SandboxSpec { user: args.uid.zip(args.gid), disabled: args.no_sandbox || as_init },
    };
    let code = match vtpm_domain::run(cfg) {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("vtpm-domain: error: {}", xvtpm_log::report(f.error.as_ref()));
            f.code
        }
    };
    if as_init {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(init::publish(init::XS_EXIT, &code.to_string()));
        }
        init::power_off(code);
    }
    std::process::exit(code);
}
