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

pub mod anchor;
pub mod blockstore;
pub mod config;
pub mod deepquote;
pub mod dispatch;
pub mod errctx;
pub mod hostquote;
pub mod init;
pub mod mgr_client;
pub mod peer;
pub mod server;
pub mod sandbox;
pub mod store;
pub mod vtpm;
pub mod xen;

use std::rc::Rc;

use anyhow::Context;

use crate::anchor::Anchored;
use crate::blockstore::BlockStore;
use crate::config::Config;
use crate::mgr_client::MgrLink;
use crate::dispatch::Shared;
use crate::store::Store;
use crate::vtpm::Vtpm;

/// Rate-limited logging for lines a guest or a local peer can trigger (see `xvtpm-log`).
pub use xvtpm_log::{guest_error, guest_info, guest_warn};

/// The log filter for `XVTPM_LOG` (`LEVEL` and `TARGET=LEVEL` directives, comma separated);
/// unset, empty or unparsable means `info,xenstore_rs=error`.
///
/// A `Targets` filter rather than tracing-subscriber's `EnvFilter`: EnvFilter links a regex
/// engine whose Unicode tables (about 70 KiB of pointers) the dynamic loader relocates into
/// private pages of every vTPM process at start (BENCHMARKS.md, P4).
pub fn log_filter(spec: Option<&str>) -> tracing_subscriber::filter::Targets {
    const DEFAULT: &str = "info,xenstore_rs=error";
    spec.filter(|s| !s.trim().is_empty()).and_then(|s| s.parse().ok())
        .unwrap_or_else(|| DEFAULT.parse().expect("the default log filter parses"))
}

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
/// shutdown (control channel `CMD_SHUTDOWN`, SIGTERM or SIGINT; SIGUSR1 suspends: the
/// running TPM's volatile state is saved for the next start).
pub fn run(cfg: Config) -> Result<(), Fatal> {
    let fatal = |code: i32| move |error: anyhow::Error| Fatal { code, error };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")
        .map_err(fatal(1))?;
    let local = tokio::task::LocalSet::new();
    // Boxed: the whole vTPM's future is large, and block_on would otherwise move it through
    // several stack frames, leaving that many copies' worth of main-thread stack resident.
    local.block_on(&rt, Box::pin(async move {
        let link = MgrLink::open(&cfg.mgr).await.map_err(anyhow::Error::from).map_err(fatal(EXIT_MANAGER))?;
        let started = async {
            let key = mgr_client::fetch_state_key(&link, cfg.uuid, cfg.mgr_wait)
                .await
                .map_err(anyhow::Error::from)
                .map_err(fatal(EXIT_MANAGER))?;
            // The control channel's state blobs are sealed under the same key.
            let blob_key = key.clone();
            let (vtpm, ek) = if cfg.create {
                create_vtpm(&cfg, key, &link).await?
            } else {
                let (mut v, ek) = open_vtpm(&cfg, key, &link).map_err(fatal(EXIT_STATE))?;
                certify_if_missing(&mut v, &link, &cfg).await;
                (v, ek)
            };
            if cfg.manufacture_only {
                drop(vtpm);
                anchor_first_state(&cfg, blob_key, &link).map_err(fatal(EXIT_STATE))?;
                return Ok(None);
            }
            let quote = cfg.quote_socket.as_deref().map(hostquote::bind).transpose().context("binding the host-quote socket").map_err(fatal(1))?;
            let bound = server::bind(&cfg.listen, cfg.uuid, cfg.family, peer::Access { consumer_uid: cfg.consumer_uid }, cfg.ctrl_listener_stdin).await.context("binding listeners").map_err(fatal(1))?;
            Ok::<_, Fatal>(Some((vtpm, ek, (bound, quote), blob_key)))
        }
        .await;
        // Made ahead of demand: the state is written and the identity durable with its EK
        // certificate; the process ends without a listener ever bound.
        let started = match started {
            Ok(None) => {
                link.close().await;
                println!("{}", serde_json::json!({ "manufactured": true, "uuid": cfg.uuid }));
                use std::io::Write;
                std::io::stdout().flush().ok();
                return Ok(());
            }
            Ok(Some(s)) => Ok(s),
            Err(f) => Err(f),
        };
        // Setup done: from here on the process is unprivileged and reads client input.
        let started = started.and_then(|(mut vtpm, ek, bound, blob_key)| {
            if !cfg.sandbox.disabled {
                vtpm.pin_store_dir().map_err(anyhow::Error::from).map_err(fatal(EXIT_STATE))?;
                link.pin_dir().context("opening the manager socket's directory").map_err(fatal(EXIT_MANAGER))?;
            }
            sandbox::enter(&cfg.sandbox).context("entering the sandbox (--no-sandbox turns it off for debugging)").map_err(fatal(1))?;
            Ok((vtpm, ek, bound, blob_key))
        });
        let (vtpm, ek, (bound, quote), blob_key) = match started {
            Ok(s) => s,
            Err(f) => {
                // Leave the manager an orderly detach, not a page dropped mid-connection.
                link.close().await;
                return Err(f);
            }
        };
        let ready = serde_json::json!({
            "ready": true,
            "uuid": cfg.uuid,
            "pid": std::process::id(),
            "tcp_ports": bound.tcp_ports,
            "ek_public": hex_encode(&ek),
            // The TPM runs as it was suspended (PCRs kept), not powered on anew.
            "resumed": vtpm.resumed(),
        });
        println!("{ready}");
        use std::io::Write;
        std::io::stdout().flush().ok();
        if cfg.as_init {
            println!("VTPMDOM-READY uuid={} {}", cfg.uuid, init::memory_report());
            std::io::stdout().flush().ok();
            // (before readiness: whoever sees ready reads it)
            init::publish(init::XS_RESUMED, if vtpm.resumed() { "1" } else { "0" }).await;
            init::publish(init::XS_READY, &cfg.uuid.to_string()).await;
        }
        let import_floor = std::cell::Cell::new(vtpm.opened_generation());
        let shared = Rc::new(Shared {
            vtpm: std::cell::RefCell::new(vtpm),
            exit: tokio::sync::Notify::new(),
            uuid: cfg.uuid,
            mgr: link,
            // A Unix control socket without a Unix data socket beside it is QEMU's chardev (the
            // data channel arrives through CMD_SET_DATAFD): its hang-up ends the vTPM, as swtpm
            // --terminate does under libvirt. Paired with a data socket (xl-vtpm's default
            // layout) it serves the tpm2-tss `swtpm:path=` TCTI, which connects per request.
            persist: cfg.persist || cfg.listen.iter().any(|l| matches!(l, crate::config::Listen::UnixData(_))),
            blob_key,
            import_floor,
            imported: std::cell::Cell::new(None),
            import_pending: std::cell::Cell::new(None),
            device_models: std::cell::Cell::new(0),
            suspend: std::cell::Cell::new(false),
        });
        let sig = shared.clone();
        let as_init = cfg.as_init;
        tokio::task::spawn_local(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int), Ok(mut usr1)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::user_defined1()))
            else {
                return;
            };
            tokio::select! {
                // In its own domain the toolstack's poweroff request arrives as SIGTERM; what
                // dom0 wrote beside it says whether it is a suspend.
                _ = term.recv() => {
                    if as_init && init::read(init::XS_SUSPEND).await.as_deref().map(str::trim) == Some("1") {
                        xvtpm_log::host_info!("shutdown requested as a suspend (data/xvtpm/suspend): the TPM's volatile state is saved for the next start");
                        sig.suspend.set(true);
                    } else {
                        xvtpm_log::host_info!("signal received, shutting down");
                    }
                }
                _ = int.recv() => xvtpm_log::host_info!("signal received, shutting down"),
                _ = usr1.recv() => {
                    xvtpm_log::host_info!("SIGUSR1: suspending (the TPM's volatile state is saved for the next start)");
                    sig.suspend.set(true);
                }
            }
            sig.exit.notify_one();
        });
        if let Some(q) = quote {
            tokio::task::spawn_local(hostquote::serve(q, shared.clone()));
        }
        server::serve(bound, shared.clone()).await;
        // A suspend keeps the running TPM for the next start (a guest moving to another host:
        // its PCRs travel in the state file); a TPM the controller already stopped has nothing
        // running to keep and is stopped as usual.
        let stopped = {
            let mut v = shared.vtpm.borrow_mut();
            if shared.suspend.get() && v.running() { v.store_volatile() } else { v.stop() }
        };
        shared.mgr.close().await;
        stopped.map_err(anyhow::Error::from).map_err(fatal(EXIT_STATE))?;
        Ok(())
    }))
}

/// The wire form of the engine's TPM properties.
fn tpm_info(p: &vtpm_engine::TpmProperties) -> vtpm_proto::mgr::TpmInfo {
    vtpm_proto::mgr::TpmInfo {
        manufacturer: p.manufacturer,
        model: p.vendor.clone(),
        firmware_version: p.firmware_version_1,
        family: p.family.clone(),
        level: p.level,
        revision: p.revision,
    }
}

/// Manufactures the vTPM: EK, then (TPM 2.0) its EK certificate from the manager, stored at the
/// TCG NV index, and only then the first state. A manager that does not certify the EK fails
/// the creation and nothing is written.
async fn create_vtpm(cfg: &Config, key: zeroize::Zeroizing<[u8; 32]>, link: &MgrLink) -> Result<(Vtpm, Vec<u8>), Fatal> {
    use crate::config::StateSpec;
    let state = |e: anyhow::Error| Fatal { code: EXIT_STATE, error: e };
    let kind = match cfg.ek {
        config::EkChoice::Rsa => vtpm_engine::EkKind::Rsa2048,
        config::EkChoice::Ecc => vtpm_engine::EkKind::EccP256,
    };
    let anchored = |s| Anchored::for_create(s, link.clone(), cfg.uuid, cfg.family);
    let begun = match &cfg.state {
        StateSpec::File(p) => Store::create(p, cfg.uuid, cfg.family, key)
            .map_err(anyhow::Error::from)
            .and_then(|s| Ok(Vtpm::begin_manufacture(cfg.family, anchored(s), kind)?)),
        StateSpec::Block(p) => BlockStore::create(p, cfg.uuid, cfg.family, key)
            .map_err(anyhow::Error::from)
            .and_then(|s| Ok(Vtpm::begin_manufacture(cfg.family, Anchored::for_create(s, link.clone(), cfg.uuid, cfg.family), kind)?)),
    };
    let mut m = begun.map_err(state)?;
    if let Some(ek_kind) = m.ek_kind() {
        let props = m.tpm_properties().map_err(|e| state(e.into()))?;
        let cert = mgr_client::fetch_ek_cert(link, cfg.uuid, m.ek_public(), &tpm_info(&props)).await.map_err(|e| Fatal {
            code: EXIT_MANAGER,
            error: anyhow::Error::from(e).context("manufacturing the vTPM (no state was written)"),
        })?;
        m.install_ek_cert(&cert).map_err(|e| state(e.into()))?;
        xvtpm_log::host_info!(nv_index = %format!("{:#010x}", ek_kind.cert_index()), bytes = cert.len(), "EK certificate stored");
    }
    let made = m.finish().map_err(|e| state(e.into()))?;
    xvtpm_log::host_info!(uuid = %cfg.uuid, "manufactured a new vTPM");
    Ok(made)
}

/// `--manufacture-only`: presents the first state just written to the manager, which anchors
/// it now (one store write, at the fill) instead of at the vTPM's first start (on the claiming
/// create's path). Nothing is resumed: the state stays as manufactured.
fn anchor_first_state(cfg: &Config, key: zeroize::Zeroizing<[u8; 32]>, link: &MgrLink) -> anyhow::Result<()> {
    let config::StateSpec::File(p) = &cfg.state else {
        anyhow::bail!("--manufacture-only needs --state FILE");
    };
    let (store, state) = Store::open(p, cfg.uuid, cfg.family, key)?;
    Anchored::new(store, link.clone(), cfg.uuid, cfg.family).present(p, &state)?;
    Ok(())
}

/// A TPM 2.0 vTPM made before EK certificates (or whose certificate could not be stored) asks
/// for one at start. Failing that is logged, not fatal: the vTPM serves as before.
async fn certify_if_missing(v: &mut Vtpm, link: &MgrLink, cfg: &Config) {
    let Some((kind, ek, props)) = v.missing_ek_cert() else { return };
    match mgr_client::fetch_ek_cert(link, cfg.uuid, &ek, &tpm_info(&props)).await {
        Ok(cert) => match v.install_ek_cert(kind, &cert) {
            Ok(()) => xvtpm_log::host_info!(nv_index = %format!("{:#010x}", kind.cert_index()), bytes = cert.len(), "EK certificate obtained and stored"),
            Err(e) => xvtpm_log::host_warn!(error = %e, "could not store the EK certificate; the vTPM serves without one"),
        },
        Err(e) => xvtpm_log::host_warn!(error = %e, "this vTPM has no EK certificate and the manager did not issue one; it serves without one"),
    }
}

/// Opens the existing vTPM on its state store (never manufactures). The manager sees the
/// state's generation before anything is written, and refuses an older state ([`anchor`]).
fn open_vtpm(cfg: &Config, key: zeroize::Zeroizing<[u8; 32]>, link: &MgrLink) -> anyhow::Result<(Vtpm, Vec<u8>)> {
    use crate::config::StateSpec;
    let startup = cfg.startup == config::Startup::Clear;
    let mut v = match &cfg.state {
        StateSpec::File(p) => {
            let (store, state) = Store::open(p, cfg.uuid, cfg.family, key)?;
            let mut store = Anchored::new(store, link.clone(), cfg.uuid, cfg.family);
            store.present(p, &state)?;
            Vtpm::resume(cfg.family, store, state, startup)?
        }
        StateSpec::Block(p) => {
            let (store, state) = BlockStore::open(p, cfg.uuid, cfg.family, key)?;
            let mut store = Anchored::new(store, link.clone(), cfg.uuid, cfg.family);
            store.present(p, &state)?;
            Vtpm::resume(cfg.family, store, state, startup)?
        }
    };
    let ek = v.ek_public().unwrap_or_default();
    xvtpm_log::host_info!(uuid = %cfg.uuid, generation = v.generation(), "resumed vTPM");
    Ok((v, ek))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod log_filter_tests {
    use tracing::Level;
    use tracing::level_filters::LevelFilter;

    use super::log_filter;

    #[test]
    fn default_is_info_with_xenstore_quiet() {
        for spec in [None, Some("not a filter=="), Some("")] {
            let f = log_filter(spec);
            assert!(f.would_enable("vtpm_domain::server", &Level::INFO), "{spec:?}");
            assert!(!f.would_enable("vtpm_domain::server", &Level::DEBUG), "{spec:?}");
            assert!(!f.would_enable("xenstore_rs::wire", &Level::WARN), "{spec:?}");
            assert!(f.would_enable("xenstore_rs::wire", &Level::ERROR), "{spec:?}");
        }
    }

    #[test]
    fn directives_select_levels_per_target() {
        let f = log_filter(Some("warn,vtpm_domain::server=trace"));
        assert!(f.would_enable("vtpm_domain::server", &Level::TRACE));
        assert!(!f.would_enable("vtpm_domain::store", &Level::INFO));
        assert!(f.would_enable("vtpm_domain::store", &Level::WARN));
        assert_eq!(log_filter(Some("debug")).default_level(), Some(LevelFilter::DEBUG));
    }
}

