//! `vtpm-domain`: serve one vTPM. See the library docs for the design.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use uuid::Uuid;
use vtpm_domain::config::{Config, EkChoice, Listen, Startup};
use vtpm_proto::tpm::Family;

/// One vTPM: libtpms TPM 2.0 (or 1.2), state sealed under a key from vtpmmgr,
/// served over swtpm's socket protocol.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The vTPM's UUID (as created by `xl-vtpm vtpm create`).
    #[arg(long)]
    uuid: Uuid,
    /// Sealed state file.
    #[arg(long)]
    state: PathBuf,
    /// The manager's per-vTPM socket (`<run-dir>/vtpm/<uuid>.sock`).
    #[arg(long)]
    mgr_socket: PathBuf,
    /// Manufacture a new TPM; the state file must not exist yet.
    #[arg(long)]
    create: bool,
    /// Run a TPM 1.2 instead of TPM 2.0 (only at --create; later starts must match).
    #[arg(long)]
    tpm12: bool,
    /// Startup behaviour after a (re)start.
    #[arg(long, value_enum, default_value = "clear")]
    startup: Startup,
    /// Listener: tcp:HOST:PORT (data on PORT, control on PORT+1; port 0 picks),
    /// data:PATH or ctrl:PATH (Unix sockets). Repeatable.
    #[arg(long, required = true)]
    listen: Vec<Listen>,
    /// Endorsement key made at --create.
    #[arg(long, value_enum, default_value = "rsa")]
    ek: EkChoice,
    /// Seconds to keep retrying the manager while it has not attached us.
    #[arg(long, default_value_t = 10)]
    mgr_wait: u64,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XVTPM_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = Config {
        uuid: args.uuid,
        family: if args.tpm12 { Family::Tpm12 } else { Family::Tpm2 },
        state: args.state,
        mgr_socket: args.mgr_socket,
        create: args.create,
        startup: args.startup,
        listen: args.listen,
        mgr_wait: Duration::from_secs(args.mgr_wait),
        ek: args.ek,
    };
    if let Err(f) = vtpm_domain::run(cfg) {
        eprintln!("vtpm-domain: error: {:#}", f.error);
        std::process::exit(f.code);
    }
}
