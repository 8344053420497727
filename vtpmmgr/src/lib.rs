//! vtpmmgr: the xvtpm manager.
//!
//! It owns the physical TPM 2.0 ([`hwtpm`], through tss-esapi), keeps the
//! provisioning record, groups and vTPM identities ([`store`], authenticated and
//! covered by a monotonic counter in the TPM's NV: [`rollback`]), decides who
//! gets a vTPM's state key ([`manager`]) and serves the admin and per-vTPM
//! sockets ([`daemon`]); [`ekca`] issues vTPM EK certificates from each group's CA key in the
//! physical TPM; [`xenlink`] serves vTPMs that run in their own Xen
//! domains over tpmif. The manager refuses to serve vTPMs until it is
//! provisioned, and refuses to start at all if its master secret does not
//! unseal (the host's PCRs are not the approved ones).

pub mod akprov;
pub mod anchor;
pub mod bridge;
pub mod daemon;
pub mod deepquote;
pub mod dispatch;
pub mod ekca;
pub mod failure;
pub mod hwtpm;
pub mod instance;
pub mod manager;
pub mod peer;
pub mod rollback;
pub mod sdnotify;
pub mod store;
pub mod tcti;
pub mod xenlink;

/// `vtpmmgr reauthorize`: approve the current PCR values with the admin's
/// policy-signing key (after an intended host upgrade). The store must pass the same
/// integrity and rollback checks as at a start; the new record is written under the counter.
pub fn reauthorize(cfg: &manager::Config, policy_key: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let key = zeroize::Zeroizing::new(std::fs::read(policy_key).with_context(|| format!("reading --policy-key {}", policy_key.display()))?);
    let (mut hw, _) = hwtpm::HwTpm::open_owned(&cfg.tcti).with_context(|| format!("opening the physical TPM at {}", cfg.tcti))?;
    let mut new = None;
    let opened = rollback::open(
        &mut hw,
        &cfg.store_path(),
        &mut |hw, rec| {
            let rec = hw.reauthorize(rec, &key)?;
            let master = hw.unseal_master(&rec).map_err(hwtpm::HwTpmError::unexpected("the re-authorised policy still does not unseal"))?;
            new = Some(rec);
            Ok(master)
        },
        rollback::Mode::Refuse,
    )?;
    let (Some(mut prot), Some(new)) = (opened.protected, new) else {
        anyhow::bail!("the manager is not provisioned; nothing to reauthorize");
    };
    let mut next = opened.store;
    next.provision = Some(new);
    prot.commit(&mut hw, next)?;
    eprintln!("vtpmmgr: the current PCR values are authorised; the master secret unseals again");
    Ok(())
}

/// `vtpmmgr accept-store --yes`: the administrator accepts the store file as it is although it
/// does not match its rollback counter (an older copy, a store ahead of the counter, a missing
/// or replaced counter, a format-1 copy). Its integrity must still verify. It is bound to the
/// counter (a new one if needed) at the counter's next value. Returns what was done.
pub fn accept_store(cfg: &manager::Config) -> anyhow::Result<String> {
    use anyhow::Context;
    let (mut hw, _) = hwtpm::HwTpm::open_owned(&cfg.tcti).with_context(|| format!("opening the physical TPM at {}", cfg.tcti))?;
    let opened = rollback::open(&mut hw, &cfg.store_path(), &mut |hw, rec| hw.unseal_master(rec), rollback::Mode::Accept)?;
    let Some(prot) = opened.protected else {
        anyhow::bail!("there is no provisioned manager store at {}; nothing to accept", cfg.store_path().display());
    };
    let c = prot.counter();
    Ok(match opened.note {
        Some(note) => format!("{}: {note}", cfg.store_path().display()),
        None => format!("{} already matches its rollback counter {:#010x} (value {}); nothing to do", cfg.store_path().display(), c.nv_index, c.value),
    })
}
