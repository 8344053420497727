//! vtpm-domain: one process, one vTPM.
//!
//! The process holds exactly one libtpms TPM (libtpms is process-global),
//! fetches its state key from vtpmmgr over its own per-vTPM socket, keeps its
//! state sealed on disk after every state-changing command, and serves the
//! TPM over swtpm's socket protocol (data channel + control channel) so that
//! QEMU's `-tpmdev emulator` and the tpm2-tss `swtpm` TCTI use it unchanged.
//!
//! Module map: [`store`] seals and atomically writes state; [`mgr_client`]
//! asks the manager for the key; [`vtpm`] is the transport-independent core
//! (framing checks, engine, persistence); [`server`] is the swtpm protocol;
//! [`xen`] the tpmif backend; [`init`] the PID 1 duties in a vTPM's own Xen domain.
#![deny(missing_docs)]

pub mod blockstore;
pub mod config;
pub mod deepquote;
pub mod init;
pub mod mgr_client;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod vtpm;
pub mod xen;

use std::rc::Rc;

use anyhow::Context;
use tracing::info;

use crate::blockstore::BlockStore;
use crate::config::Config;
use crate::mgr_client::MgrLink;
use crate::server::Shared;
use crate::store::Store;
use crate::vtpm::Vtpm;

/// Exit code: the state could not be opened or created (never regenerated).
pub const EXIT_STATE: i32 = 3;
/// Exit code: the manager refused or could not be reached.
pub const EXIT_MANAGER: i32 = 4;

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Fatal {
    /// Process exit code.
    pub code: i32,
    /// The error chain.
    pub error: anyhow::Error,
}

/// Runs one vTPM until it is shut down. On success returns after a clean
/// shutdown (control channel `CMD_SHUTDOWN`, SIGTERM or SIGINT).
pub fn run(cfg: Config) -> Result<(), Fatal> {
    let fatal = |code: i32| move |error: anyhow::Error| Fatal { code, error };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")
        .map_err(fatal(1))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let link = MgrLink::open(&cfg.mgr).await.map_err(anyhow::Error::from).map_err(fatal(EXIT_MANAGER))?;
        let key = mgr_client::fetch_state_key(&link, cfg.uuid, cfg.mgr_wait)
            .await
            .map_err(anyhow::Error::from)
            .map_err(fatal(EXIT_MANAGER))?;
        let (vtpm, ek) = open_vtpm(&cfg, key).map_err(fatal(EXIT_STATE))?;
        let bound = server::bind(&cfg.listen, cfg.uuid).await.context("binding listeners").map_err(fatal(1))?;
        let ready = serde_json::json!({
            "ready": true,
            "uuid": cfg.uuid,
            "pid": std::process::id(),
            "tcp_ports": bound.tcp_ports,
            "ek_public": hex_encode(&ek),
        });
        println!("{ready}");
        use std::io::Write;
        std::io::stdout().flush().ok();
        if cfg.as_init {
            println!("VTPMDOM-READY uuid={} {}", cfg.uuid, init::memory_report());
            std::io::stdout().flush().ok();
            init::publish(init::XS_READY, &cfg.uuid.to_string()).await;
        }
        let shared = Rc::new(Shared {
            vtpm: std::cell::RefCell::new(vtpm),
            exit: tokio::sync::Notify::new(),
            uuid: cfg.uuid,
            mgr: link,
        });
        let sig = shared.clone();
        tokio::task::spawn_local(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            info!("signal received, shutting down");
            sig.exit.notify_one();
        });
        server::serve(bound, shared.clone()).await;
        shared.vtpm.borrow_mut().stop().map_err(anyhow::Error::from).map_err(fatal(EXIT_STATE))?;
        Ok(())
    })
}

/// Creates (manufactures) or opens the vTPM on its state store.
fn open_vtpm(cfg: &Config, key: zeroize::Zeroizing<[u8; 32]>) -> anyhow::Result<(Vtpm, Vec<u8>)> {
    use crate::config::StateSpec;
    if cfg.create {
        let kind = match cfg.ek {
            config::EkChoice::Rsa => vtpm_engine::EkKind::Rsa2048,
            config::EkChoice::Ecc => vtpm_engine::EkKind::EccP256,
        };
        let made = match &cfg.state {
            StateSpec::File(p) => Vtpm::manufacture_with(cfg.family, Store::create(p, cfg.uuid, cfg.family, key)?, kind)?,
            StateSpec::Block(p) => Vtpm::manufacture_with(cfg.family, BlockStore::create(p, cfg.uuid, cfg.family, key)?, kind)?,
        };
        info!(uuid = %cfg.uuid, "manufactured a new vTPM");
        return Ok(made);
    }
    let startup = cfg.startup == config::Startup::Clear;
    let mut v = match &cfg.state {
        StateSpec::File(p) => {
            let (store, state) = Store::open(p, cfg.uuid, cfg.family, key)?;
            Vtpm::resume(cfg.family, store, state, startup)?
        }
        StateSpec::Block(p) => {
            let (store, state) = BlockStore::open(p, cfg.uuid, cfg.family, key)?;
            Vtpm::resume(cfg.family, store, state, startup)?
        }
    };
    let ek = v.ek_public().unwrap_or_default();
    info!(uuid = %cfg.uuid, generation = v.generation(), "resumed vTPM");
    Ok((v, ek))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
