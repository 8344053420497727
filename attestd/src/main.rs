//! `xvtpm-attestd`: the provider's attestation service (docs/attestation-service.md).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use xvtpm_attestd::limits::RateLimiter;
use xvtpm_attestd::provider::Provider;
use xvtpm_attestd::server::State;
use xvtpm_attestd::{Limits, server, tls};

/// The provider's attestation service: tenants (client certificates registered with
/// `xl-vtpm tenant add`) enroll this host and get deep quotes of their own vTPMs over HTTPS.
#[derive(Parser, Debug)]
#[command(name = "xvtpm-attestd", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "[::]:7443")]
    listen: std::net::SocketAddr,
    /// The service's certificate chain (PEM, leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// The service's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA certificate(s) (PEM) that issue tenants' client certificates; a client must present
    /// one chaining to them, and its key must be a registered tenant's.
    #[arg(long)]
    tenant_ca: PathBuf,
    /// The manager's run directory (admin socket, vTPMs' host-quote sockets).
    #[arg(long, env = "XVTPM_RUN_DIR", default_value = "/run/xvtpm")]
    run_dir: PathBuf,
    /// xl-vtpm's state directory (the default SQLite registry is there).
    #[arg(long, env = "XVTPM_STATE_DIR", default_value = "/var/lib/xvtpm")]
    state_dir: PathBuf,
    /// The registry (as xl-vtpm --registry): a SQLite file or postgres://…
    #[arg(long, env = "XVTPM_REGISTRY")]
    registry: Option<String>,
    /// The host's binary measured-boot event log.
    #[arg(long, default_value = xl_tools::eventlog::DEFAULT_SOURCE)]
    event_log: PathBuf,
    /// Intermediate EK CA certificate added to the enrollment material; repeatable.
    #[arg(long = "ek-intermediate", value_name = "FILE")]
    ek_intermediate: Vec<PathBuf>,
    /// Most connections open at once.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Seconds a request's headers (and, separately, its body) may take to arrive.
    #[arg(long, default_value_t = 10)]
    request_timeout: u64,
    /// Requests per second a tenant may make on average.
    #[arg(long, default_value_t = Limits::default().rate_per_sec)]
    rate: f64,
    /// Requests a tenant may make at once after a quiet period.
    #[arg(long, default_value_t = Limits::default().burst)]
    burst: u32,
}

fn main() {
    xvtpm_clidoc::intercept("xvtpm-attestd", <Args as clap::CommandFactory>::command);
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("XVTPM_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    if let Err(e) = run(a) {
        eprintln!("xvtpm-attestd: error: {}", xvtpm_log::report(e.as_ref()));
        std::process::exit(1);
    }
}

fn run(a: Args) -> anyhow::Result<()> {
    let tls = tls::server_config(&a.cert, &a.key, &a.tenant_ca)?;
    let location = match &a.registry {
        Some(r) => xl_tools::registry::Location::parse(r).map_err(|e| anyhow::anyhow!("--registry: {e}"))?,
        None => xl_tools::registry::Location::Sqlite(a.state_dir.join("registry.sqlite")),
    };
    let registry = xl_tools::registry::Registry::connect(&location, &xl_tools::registry::this_host()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Duration::from_secs(a.request_timeout.max(1));
    let limits = Limits {
        max_connections: a.max_connections.max(1),
        header_timeout: t,
        body_timeout: t,
        rate_per_sec: a.rate,
        burst: a.burst,
        ..Limits::default()
    };
    let state = Arc::new(State {
        provider: Provider { run_dir: a.run_dir, registry: Mutex::new(registry), event_log: a.event_log, ek_intermediates: a.ek_intermediate },
        rate: RateLimiter::new(limits.rate_per_sec, limits.burst),
        limits,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| anyhow::anyhow!("--listen {}: {e}", a.listen))?;
        let addr = listener.local_addr()?;
        println!("{}", serde_json::json!({"ready": true, "listen": addr.to_string(), "pid": std::process::id()}));
        use std::io::Write;
        std::io::stdout().flush().ok();
        xvtpm_log::host_info!(%addr, "serving");
        notify_ready();
        tokio::select! {
            _ = server::serve(listener, tls, state) => {}
            _ = tokio::signal::ctrl_c() => xvtpm_log::host_info!("interrupted; exiting"),
        }
        Ok(())
    })
}

/// systemd `Type=notify` readiness: one datagram to `$NOTIFY_SOCKET`, if set.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let path = PathBuf::from(path);
    if let Err(e) = sock.send_to(b"READY=1", &path) {
        xvtpm_log::host_warn!(error = %e, "could not tell the service manager we are ready");
    }
}
