//! vtpmmgr: the xvtpm manager.
//!
//! It owns the physical TPM 2.0 ([`hwtpm`], through tss-esapi), keeps the
//! provisioning record, groups and vTPM identities ([`store`]), decides who
//! gets a vTPM's state key ([`manager`]) and serves the admin and per-vTPM
//! sockets ([`daemon`]); [`xenlink`] serves vTPMs that run in their own Xen
//! domains over tpmif. The manager refuses to serve vTPMs until it is
//! provisioned, and refuses to start at all if its master secret does not
//! unseal (the host's PCRs are not the approved ones).

pub mod daemon;
pub mod deepquote;
pub mod hwtpm;
pub mod manager;
pub mod store;
pub mod xenlink;

/// `vtpmmgr reauthorize`: approve the current PCR values with the admin's
/// policy-signing key (after an intended host upgrade).
pub fn reauthorize(cfg: &manager::Config, policy_key: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut store = store::Store::load(&cfg.store_path())?;
    let rec = store.provision.as_ref().context("the manager is not provisioned; nothing to reauthorize")?;
    let key = zeroize::Zeroizing::new(std::fs::read(policy_key).with_context(|| format!("reading --policy-key {}", policy_key.display()))?);
    let mut hw = hwtpm::HwTpm::open(&cfg.tcti).with_context(|| format!("opening the physical TPM at {}", cfg.tcti))?;
    let new = hw.reauthorize(rec, &key)?;
    hw.unseal_master(&new).context("the re-authorised policy still does not unseal")?;
    store.provision = Some(new);
    store.save(&cfg.store_path())?;
    eprintln!("vtpmmgr: the current PCR values are authorised; the master secret unseals again");
    Ok(())
}
