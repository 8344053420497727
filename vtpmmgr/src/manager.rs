//! The manager's logic, independent of sockets: provisioning, groups, vTPM
//! identities, and the one decision that matters most — whether a caller
//! gets a vTPM's state key.
//!
//! A state key is `HKDF-SHA256(ikm = master secret, salt = "xvtpm/state-key/v1",
//! info = vTPM UUID)`. The master secret exists only in memory (unsealed from
//! the physical TPM under the PCR policy) and as a sealed TPM object on disk;
//! deleting a vTPM's identity therefore makes its state undecryptable for good
//! once the state file is gone too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};
use xvtpm_log::{guest_info, guest_warn};
use uuid::Uuid;
use vtpm_proto::ekcert::EkPublic;
use vtpm_proto::mgr::{
    AdminReply, AdminRequest, ErrorCode, Failure, GroupInfo, SecretBytes, StatusInfo, StoreCounterInfo, TpmInfo, VtpmInfo,
    VtpmReply, PROTOCOL_VERSION,
};
use zeroize::Zeroizing;

use crate::failure::FromError;
use crate::hwtpm::{AkAlg, HwTpm, MasterSecret, PcrPolicySpec};
use crate::peer::Peer;
use crate::rollback::{Protected, RollbackError};
use crate::store::{EkBinding, Group, GroupCa, StateAnchor, Store, StoreKeys, VtpmEntry};

#[path = "transfer.rs"]
pub mod transfer;

/// A physical quote to run outside the manager lock.
pub struct QuoteJob {
    hw: std::sync::Arc<std::sync::Mutex<HwTpm>>,
    ak: crate::hwtpm::AkRecord,
}

/// Quotes the host PCRs `pcrs` with the job's AK over `root` (holding only
/// the TPM lock). Returns the quote and the AK's TPMT_PUBLIC.
pub fn quote_with(job: QuoteJob, root: &[u8; 32], pcrs: &[u8]) -> Result<(crate::hwtpm::QuoteOut, Vec<u8>), Failure> {
    let mut hw = job.hw.lock().unwrap_or_else(|p| p.into_inner());
    let q = hw.quote(&job.ak, root, pcrs).map_err(|e| Failure::from_error(ErrorCode::Tpm, "TPM2_Quote", &e))?;
    Ok((q, job.ak.public))
}

/// Name of the default group created at provisioning.
pub const DEFAULT_GROUP: &str = "default";

/// Manager configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCTI of the physical TPM.
    pub tcti: String,
    /// Persistent state directory (store, admin policy key).
    pub state_dir: PathBuf,
    /// Runtime directory (sockets).
    pub run_dir: PathBuf,
    /// The vTPMs' state directory (`DIR/vtpms/UUID/state.xvts`, xl-vtpm's `--state-dir`): where
    /// an imported vTPM's state file is written.
    pub vtpm_state_dir: PathBuf,
    /// Deep-quote batching.
    pub batch: crate::deepquote::BatchConfig,
}

impl Config {
    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("manager.json")
    }
    /// The admin's policy-signing key written at provisioning.
    pub fn policy_key_path(&self) -> PathBuf {
        self.state_dir.join("policy-signing.key")
    }
    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }
    /// Process attachments, kept in the runtime directory (tmpfs: gone at
    /// host reboot, with the processes) so a manager restart does not orphan
    /// running vTPMs.
    pub fn attachments_path(&self) -> PathBuf {
        self.run_dir.join("attachments.json")
    }
    /// Domain attachments (vTPM domains), kept beside the process attachments for the same
    /// reason. A domain cannot be checked for liveness here; the toolstack detaches a vTPM
    /// whose domain it stops, and `xl-vtpm` clears a stale attachment before booting a vTPM.
    pub fn domain_attachments_path(&self) -> PathBuf {
        self.run_dir.join("domain-attachments.json")
    }
    /// The per-vTPM socket of `uuid`.
    pub fn vtpm_socket(&self, uuid: &Uuid) -> PathBuf {
        vtpm_socket(&self.run_dir, uuid)
    }
}

/// The per-vTPM socket path under a run directory.
pub fn vtpm_socket(run_dir: &Path, uuid: &Uuid) -> PathBuf {
    run_dir.join("vtpm").join(format!("{uuid}.sock"))
}

/// Errors opening the manager.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Physical TPM.
    #[error("physical TPM ({tcti}): {source}")]
    Tpm {
        /// TCTI.
        tcti: String,
        /// Cause.
        source: crate::hwtpm::HwTpmError,
    },
    /// Store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The store is not the newest, does not verify, or its counter is gone.
    #[error(transparent)]
    Rollback(crate::rollback::RollbackError),
    /// The master secret does not unseal: the host's PCRs are not the approved ones.
    #[error("cannot unseal the master secret: {0}. If the host was upgraded on purpose, authorise the new PCR values with `vtpmmgr reauthorize --policy-key <admin key>`; otherwise the host is not in its provisioned state")]
    Unseal(crate::hwtpm::HwTpmError),
    /// Unsealing the master secret failed for another reason than the PCR policy (the error
    /// names it; re-authorising PCR values would not help).
    #[error("cannot unseal the master secret ({tcti}): {source}")]
    UnsealTpm {
        /// TCTI.
        tcti: String,
        /// Cause.
        source: crate::hwtpm::HwTpmError,
    },
}

/// The manager.
pub struct Manager {
    cfg: Config,
    /// The physical TPM has its own lock: a quote (hundreds of ms on a
    /// discrete TPM) must not hold the manager lock that every request needs
    /// to be authorised and queued, or natural batching degenerates.
    hw: std::sync::Arc<std::sync::Mutex<HwTpm>>,
    store: Store,
    /// The store's file, keys and rollback counter (present once provisioned).
    protected: Option<Protected>,
    master: Option<MasterSecret>,
    attached: HashMap<Uuid, Attachment>,
    /// vTPM → the Xen domain attached to it (`VtpmAttachDomain`).
    attached_domains: HashMap<Uuid, u32>,
    software_tpm: bool,
    stats: std::sync::Arc<crate::deepquote::Stats>,
    /// The state each vTPM last presented and was refused as older than its anchor, for
    /// `VtpmAcceptState` ([`crate::anchor`]).
    refused_states: HashMap<Uuid, StateAnchor>,
    anchor_stats: std::sync::Arc<crate::anchor::Stats>,
    /// Identities reserved by `VtpmReserve`: in memory until their EK certificate's store
    /// write makes them durable ([`Manager::issue_ek_cert`]).
    reserved: HashMap<Uuid, VtpmEntry>,
    /// The Xen domain this manager runs in, when it is not dom0 ([`Manager::set_xen_domain`]).
    xen_domain: Option<u32>,
    /// It serves vTPM domains over its Xen link ([`Manager::set_xen_link`]).
    xen_link: bool,
}

/// At most this many identities reserved at once (each is a vTPM being manufactured now).
const MAX_RESERVED: usize = 1024;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn fail(code: ErrorCode, msg: impl Into<String>) -> AdminReply {
    AdminReply::Error(Failure::new(code, msg))
}

/// `fail` for an internal error: `context: cause: …`, each cause once ([`FromError`]).
pub(crate) fn fail_because(code: ErrorCode, context: &str, e: &(dyn std::error::Error + 'static)) -> AdminReply {
    AdminReply::Error(Failure::from_error(code, context, e))
}

/// The one process instance attached to a vTPM: its pid and its start time, taken at attach.
/// Checked on every request, so a process that later obtains the same pid is not the vTPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    /// Process id.
    pub pid: u32,
    /// Start time (clock ticks since boot, [`xvtpm_fsutil::start_time`]).
    pub start: u64,
    /// A process in dom0 attached through `vtpmmgr bridge` (a manager in its own domain): its
    /// pid means nothing here; the bridge watches it and reports its exit
    /// ([`AdminRequest::VtpmRelayedExited`]). Kept in memory only: after a restart of this
    /// manager the bridge attaches its live processes again.
    pub relayed: bool,
}

impl Attachment {
    /// Whether this process instance still runs (a relayed one: until the bridge says not).
    pub fn alive(&self) -> bool {
        self.relayed || xvtpm_fsutil::instance_alive(self.pid, self.start)
    }
}

impl Manager {
    /// Opens the physical TPM and the store; unseals the master secret if
    /// provisioned. An unprovisioned manager opens fine and refuses to serve.
    pub fn open(cfg: Config) -> Result<Manager, OpenError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| crate::store::StoreError::Io {
            what: "creating",
            path: cfg.state_dir.clone(),
            source,
        })?;
        let (mut hw, flushed) = HwTpm::open_owned(&cfg.tcti).map_err(|source| OpenError::Tpm { tcti: cfg.tcti.clone(), source })?;
        if flushed > 0 {
            xvtpm_log::host_info!(tcti = %cfg.tcti, handles = flushed, "flushed the transient objects and sessions an earlier manager left in the TPM (no resource manager)");
        }
        let software_tpm = hw.is_software_tpm();
        if software_tpm {
            xvtpm_log::host_warn!("INSECURE: the physical TPM is a software TPM; use this only for tests");
        }
        let opened = crate::rollback::open(
            &mut hw,
            &cfg.store_path(),
            &mut |hw, rec| hw.unseal_master(rec),
            crate::rollback::Mode::Refuse,
        )
        .map_err(|e| match e {
            RollbackError::Unseal(e @ crate::hwtpm::HwTpmError::PolicyMismatch { .. }) => OpenError::Unseal(e),
            RollbackError::Unseal(source) => OpenError::UnsealTpm { tcti: cfg.tcti.clone(), source },
            RollbackError::Store(e) => OpenError::Store(e),
            e => OpenError::Rollback(e),
        })?;
        let (store, master, protected) = (opened.store, opened.master, opened.protected);
        if let Some(p) = &protected {
            let c = p.counter();
            xvtpm_log::host_info!(store = %cfg.store_path().display(), nv_index = %format!("{:#010x}", c.nv_index), value = c.value, "store matches its rollback counter");
        }
        if master.is_none() {
            xvtpm_log::host_warn!("manager is not provisioned; it serves no vTPM until `xl-vtpm mgr provision`");
        }
        let hw = std::sync::Arc::new(std::sync::Mutex::new(hw));
        let attached = load_attachments(&cfg.attachments_path());
        let attached_domains = load_domain_attachments(&cfg.domain_attachments_path(), &store);
        Ok(Manager {
            cfg,
            hw,
            store,
            protected,
            master,
            attached,
            attached_domains,
            software_tpm,
            stats: Default::default(),
            refused_states: HashMap::new(),
            anchor_stats: Default::default(),
            reserved: HashMap::new(),
            xen_domain: None,
            xen_link: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether provisioned (and unsealed).
    pub fn provisioned(&self) -> bool {
        self.master.is_some()
    }

    /// UUIDs of the vTPMs whose socket should be bound now: those attached to a running
    /// process. Only such a process may use the socket (`authorize`), so an identity without
    /// one needs no socket, and a host with any number of identities holds one listening
    /// descriptor per *running* vTPM.
    pub fn served_vtpms(&self) -> Vec<Uuid> {
        if !self.provisioned() {
            return vec![];
        }
        // Relayed processes (dom0's, through the bridge) have their socket in dom0.
        self.attached.iter().filter(|(u, a)| !a.relayed && a.alive() && self.identity(u).is_some()).map(|(u, _)| *u).collect()
    }

    /// The identity `uuid`: durable in the store, or reserved for the vTPM being created.
    fn identity(&self, uuid: &Uuid) -> Option<&VtpmEntry> {
        self.store.vtpm(uuid).or_else(|| self.reserved.get(uuid))
    }

    fn derive_key(&self, uuid: &Uuid) -> Option<Zeroizing<Vec<u8>>> {
        if let Some(imported) = self.imported_state_key(uuid) {
            return imported;
        }
        let master = self.master.as_ref()?;
        let hk = Hkdf::<Sha256>::new(Some(b"xvtpm/state-key/v1"), &master[..]);
        let mut okm = Zeroizing::new(vec![0u8; 32]);
        hk.expand(uuid.as_bytes(), &mut okm).expect("32 bytes is a valid HKDF-SHA256 output length");
        Some(okm)
    }

    /// Decides whether `peer` — which believes it is vTPM `claimed` — is the vTPM its link
    /// serves: the process xl-vtpm attached to that vTPM (same pid and start time), or the
    /// domain attached to it (`VtpmAttachDomain`). Returns the vTPM's group.
    pub fn authorize(&self, peer: &Peer, claimed: Uuid) -> Result<Uuid, Failure> {
        let vtpm = peer.vtpm();
        let link = match peer {
            Peer::Process { .. } => "socket",
            Peer::Domain { .. } => "link",
        };
        if claimed != vtpm {
            guest_warn!(vtpm = %vtpm, claimed = %claimed, peer = %peer, "refused a vTPM request: caller claimed another vTPM's UUID");
            return Err(Failure::new(ErrorCode::Refused, format!("this {link} serves vTPM {vtpm}, not {claimed}")));
        }
        let Some(entry) = self.identity(&vtpm) else {
            return Err(Failure::new(ErrorCode::NotFound, format!("vTPM {vtpm} does not exist")));
        };
        if let Some(why) = self.transfer_refusal(&vtpm) {
            return Err(why);
        }
        match *peer {
            Peer::Process { pid, start, .. } => {
                // A dead attached process is no attachment: its successor may
                // ask before xl-vtpm has attached it, and should retry.
                let Some(expected) = self.attachment(&vtpm) else {
                    return Err(Failure::new(ErrorCode::NotAttached, format!("no process is attached to vTPM {vtpm} yet (xl-vtpm attaches it after spawning)")));
                };
                if pid != Some(expected.pid) || start.is_some_and(|s| s != expected.start) {
                    guest_warn!(vtpm = %vtpm, pid = ?pid, expected = expected.pid, "refused a vTPM request: caller is not the attached process");
                    return Err(Failure::new(ErrorCode::Refused, format!("process {pid:?} is not the process attached to vTPM {vtpm}")));
                }
            }
            Peer::Domain { domid, .. } => {
                let Some(expected) = self.attached_domains.get(&vtpm).copied() else {
                    return Err(Failure::new(ErrorCode::NotAttached, format!("no domain is attached to vTPM {vtpm} yet (xl-vtpm attaches the vTPM domain after creating it)")));
                };
                if domid != expected {
                    guest_warn!(vtpm = %vtpm, domid, expected, "refused: frontend domain is not the domain attached to this vTPM");
                    return Err(Failure::new(ErrorCode::Refused, format!("domain {domid} is not the domain attached to vTPM {vtpm}")));
                }
            }
        }
        if self.master.is_none() {
            return Err(Failure::new(ErrorCode::NotProvisioned, "the manager is not provisioned"));
        }
        Ok(entry.group)
    }

    /// Answers a `GetStateKey` from `peer`.
    pub fn state_key(&self, peer: &Peer, version: u32, claimed: Uuid) -> VtpmReply {
        if version != PROTOCOL_VERSION {
            return VtpmReply::Error(Failure::new(ErrorCode::BadRequest, format!("protocol version {version} not supported (manager speaks {PROTOCOL_VERSION})")));
        }
        let vtpm = peer.vtpm();
        match self.authorize(peer, claimed) {
            Ok(group) => match self.derive_key(&vtpm) {
                Some(key) => {
                    guest_info!(vtpm = %vtpm, peer = %peer, "released state key");
                    VtpmReply::StateKey { key: SecretBytes(key), group }
                }
                None => VtpmReply::Error(Failure::new(ErrorCode::NotProvisioned, "the manager is not provisioned")),
            },
            Err(f) => VtpmReply::Error(f),
        }
    }

    /// `group`'s EK CA; made (and committed) first if the group has none, as in stores written
    /// before EK certificates.
    fn ensure_ca(&mut self, group: Uuid) -> Result<GroupCa, Failure> {
        let g = self
            .store
            .groups
            .iter()
            .find(|g| g.uuid == group)
            .cloned()
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("group {group} does not exist")))?;
        if let Some(ca) = g.ca {
            return Ok(ca);
        }
        let master = self.master.as_ref().ok_or_else(|| Failure::new(ErrorCode::NotProvisioned, "the manager is not provisioned"))?;
        let ca = crate::ekca::make_ca(&mut self.hw(), master, &g, now())?;
        let mut next = self.store.clone();
        if let Some(x) = next.groups.iter_mut().find(|x| x.uuid == group) {
            x.ca = Some(ca.clone());
        }
        self.commit(next).map_err(into_failure)?;
        xvtpm_log::host_info!(group = %group, name = %g.name, "EK CA created for the group");
        Ok(ca)
    }

    /// Issues an EK certificate for vTPM `vtpm` of `group` (the caller has authorised the
    /// peer as that vTPM). The EK must be a TCG default EK; the first EK certified for an
    /// identity is the only one it ever gets certified (a repeated request for the same EK
    /// gets a fresh certificate).
    fn issue_ek_cert(&mut self, vtpm: Uuid, group: Uuid, ek_public: &str, tpm: &TpmInfo) -> Result<Vec<u8>, Failure> {
        let bad = |m: String| Failure::new(ErrorCode::BadRequest, m);
        if ek_public.len() > 2048 {
            return Err(bad(format!("ek_public of {} hex digits is too long for an EK", ek_public.len())));
        }
        let bytes = hex::decode(ek_public).map_err(|_| bad("ek_public is not hex".into()))?;
        let ek = EkPublic::parse(&bytes).map_err(|e| {
            Failure::from_error_fix(ErrorCode::BadRequest, "", &e, "only a TCG default EK (template L-1 RSA-2048 or L-2 ECC P-256, as `vtpm-domain --create` makes it) is certified")
        })?;
        tpm.validate().map_err(|e| Failure::from_error(ErrorCode::BadRequest, "", &e))?;
        let ek_sha256 = hex::encode(Sha256::digest(ek.tpmt()));
        let entry = self.identity(&vtpm).cloned().ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("vTPM {vtpm} does not exist")))?;
        // Reserved and not (since) in the store: this write creates it.
        let reserved = self.store.vtpm(&vtpm).is_none() && self.reserved.contains_key(&vtpm);
        if let Some(b) = &entry.ek
            && b.ek_sha256 != ek_sha256
        {
            guest_warn!(vtpm = %vtpm, "refused EK certificate: this vTPM identity was certified for another EK");
            return Err(Failure::new(
                ErrorCode::Refused,
                format!(
                    "vTPM {vtpm} was certified for another EK (certificate serial {}, issued at {} s since the epoch); an identity's EK is certified once: for a new EK, destroy the vTPM (`xl-vtpm vtpm destroy {vtpm}`) and create a new one",
                    b.serial, b.issued
                ),
            ));
        }
        let ca = self.ensure_ca(group)?;
        let g = self.store.groups.iter().find(|g| g.uuid == group).cloned().ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("group {group} does not exist")))?;
        let master = self.master.as_ref().ok_or_else(|| Failure::new(ErrorCode::NotProvisioned, "the manager is not provisioned"))?;
        let (cert, serial) = crate::ekca::issue(&mut self.hw(), master, &g, &ca, &ek, tpm, now())?;
        if entry.ek.is_none() {
            let binding = EkBinding { ek_sha256, serial: serial.clone(), issued: now() };
            let mut next = self.store.clone();
            if reserved {
                // A reserved identity becomes durable in this write, with its EK binding: the
                // create's one store write (one rollback-counter increment).
                next.vtpms.push(VtpmEntry { ek: Some(binding), ..entry.clone() });
            } else if let Some(v) = next.vtpms.iter_mut().find(|v| v.uuid == vtpm) {
                v.ek = Some(binding);
            }
            self.commit(next).map_err(into_failure)?;
            if reserved {
                self.reserved.remove(&vtpm);
                xvtpm_log::host_info!(vtpm = %vtpm, group = %entry.group, "vTPM identity created (with its EK certificate)");
            }
        }
        guest_info!(vtpm = %vtpm, group = %group, serial = %serial, ek = %ek.ek_type(), "issued an EK certificate");
        Ok(cert)
    }

    /// Answers an `IssueEkCert` from `peer` (authorised exactly like a state-key request). A
    /// TPM signature (and, the first time, a CA key): callers run it off the async threads.
    pub fn ek_cert(&mut self, peer: &Peer, claimed: Uuid, ek_public: &str, tpm: &TpmInfo) -> VtpmReply {
        let vtpm = peer.vtpm();
        match self.authorize(peer, claimed).and_then(|g| self.issue_ek_cert(vtpm, g, ek_public, tpm)) {
            Ok(cert) => VtpmReply::EkCert { cert: hex::encode(cert) },
            Err(f) => {
                guest_warn!(vtpm = %vtpm, code = ?f.code, error = %f.message, "EK certificate not issued");
                VtpmReply::Error(f)
            }
        }
    }

    /// The live process instance attached to vTPM `uuid`, if any.
    pub fn attachment(&self, uuid: &Uuid) -> Option<Attachment> {
        self.attached.get(uuid).copied().filter(Attachment::alive)
    }

    /// Every process attachment (live or not yet noticed dead).
    pub fn attachments(&self) -> Vec<(Uuid, Attachment)> {
        self.attached.iter().map(|(u, a)| (*u, *a)).collect()
    }

    /// Binds `att` to `uuid` unless another live process holds it.
    fn attach_process(&mut self, uuid: Uuid, att: Attachment) -> Result<AdminReply, AdminReply> {
        if let Some(old) = self.attachment(&uuid)
            && old != att
        {
            return Err(fail(ErrorCode::Exists, format!("vTPM {uuid} is already served by process {}; stop it first", old.pid)));
        }
        self.attached.insert(uuid, att);
        if !att.relayed {
            self.save_attachments();
        }
        xvtpm_log::host_info!(vtpm = %uuid, pid = att.pid, relayed = att.relayed, "process attached");
        Ok(AdminReply::Ok)
    }

    /// Drops the attachment of `uuid` if it is still `att` (its process exited).
    pub fn detach_exited(&mut self, uuid: Uuid, att: Attachment) {
        if self.attached.get(&uuid) == Some(&att) {
            self.attached.remove(&uuid);
            self.save_attachments();
            xvtpm_log::host_info!(vtpm = %uuid, pid = att.pid, "attached process exited; attachment dropped");
            if self.reserved.remove(&uuid).is_some() {
                xvtpm_log::host_info!(vtpm = %uuid, "its reserved identity was never certified; dropped");
            }
        }
    }

    /// Prepares the physical TPM for the first deep quote ([`HwTpm::warm_quote`] with the
    /// default group's AK, or the first group's): called once at start, before the manager
    /// serves, so the first round is one TPM command like every later one. A failure is
    /// logged and costs only that: the first quote loads and reads what it needs.
    pub fn warm_deep_quote(&self) {
        let groups = &self.store.groups;
        let Some(g) = groups.iter().find(|g| g.name == DEFAULT_GROUP).or(groups.first()) else {
            return;
        };
        match self.hw().warm_quote(&g.ak) {
            Ok(()) => xvtpm_log::host_info!(group = %g.uuid, "deep-quote path warm: AK loaded, host PCRs read"),
            Err(e) => xvtpm_log::host_warn!(group = %g.uuid, error = %e, "could not prepare the first deep quote; it will load the AK itself"),
        }
    }

    /// The domain attached to vTPM `uuid`, if any.
    pub fn attached_domain(&self, uuid: &Uuid) -> Option<u32> {
        self.attached_domains.get(uuid).copied()
    }

    /// What a quote for `group` needs, taken under the manager lock: the
    /// physical TPM handle and the group's AK. The quote itself then runs
    /// under the TPM lock only ([`quote_with`]).
    pub fn quote_job(&self, group: Uuid) -> Result<QuoteJob, Failure> {
        let g = self.store.groups.iter().find(|g| g.uuid == group).ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("group {group} does not exist")))?;
        Ok(QuoteJob { hw: self.hw.clone(), ak: g.ak.clone() })
    }

    fn hw(&self) -> std::sync::MutexGuard<'_, HwTpm> {
        self.hw.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shared state-anchor counters.
    pub fn anchor_stats(&self) -> std::sync::Arc<crate::anchor::Stats> {
        self.anchor_stats.clone()
    }

    /// Shared deep-quote counters.
    pub fn stats(&self) -> std::sync::Arc<crate::deepquote::Stats> {
        self.stats.clone()
    }

    fn group_info(&self, g: &Group) -> GroupInfo {
        GroupInfo {
            uuid: g.uuid,
            name: g.name.clone(),
            ak_alg: g.ak.alg.to_string(),
            ak_public: hex::encode(&g.ak.public),
            vtpms: self.store.vtpms.iter().filter(|v| v.group == g.uuid).count(),
        }
    }

    /// The vTPMs after `after` in UUID order, as many as fit in [`vtpm_proto::mgr::LIST_PAGE_BYTES`].
    fn vtpm_page(&self, after: Option<Uuid>) -> AdminReply {
        let mut rest: Vec<&VtpmEntry> = self.store.vtpms.iter().filter(|v| after.is_none_or(|a| v.uuid > a)).collect();
        rest.sort_unstable_by_key(|v| v.uuid);
        let (mut vtpms, mut bytes, mut next) = (Vec::new(), 0, None);
        for v in rest {
            let info = self.vtpm_info(v);
            let n = serde_json::to_vec(&info).map(|b| b.len() + 1).unwrap_or(usize::MAX);
            if !vtpms.is_empty() && bytes + n > vtpm_proto::mgr::LIST_PAGE_BYTES {
                next = vtpms.last().map(|i: &VtpmInfo| i.uuid);
                break;
            }
            bytes = bytes.saturating_add(n);
            vtpms.push(info);
        }
        AdminReply::VtpmPage { vtpms, next }
    }

    fn vtpm_info(&self, v: &VtpmEntry) -> VtpmInfo {
        VtpmInfo {
            uuid: v.uuid,
            group: v.group,
            created: v.created,
            attached_pid: self.attachment(&v.uuid).map(|a| a.pid),
            socket: self.cfg.vtpm_socket(&v.uuid).display().to_string(),
        }
    }

    /// Makes `next` the store: written durably under the rollback counter
    /// ([`crate::rollback`]) first, adopted in memory only once that worked.
    fn commit(&mut self, next: Store) -> Result<(), AdminReply> {
        let Some(prot) = self.protected.as_mut() else {
            return Err(fail(ErrorCode::NotProvisioned, "the manager is not provisioned"));
        };
        let mut hw = self.hw.lock().unwrap_or_else(|p| p.into_inner());
        let code = |e: &RollbackError| match e {
            RollbackError::Tpm(_) | RollbackError::Staged { .. } => ErrorCode::Tpm,
            _ => ErrorCode::Internal,
        };
        self.store = prot.commit(&mut hw, next).map_err(|e| fail_because(code(&e), "writing the manager store", &e))?;
        Ok(())
    }

    /// The store's rollback counter: the value the store records and the TPM's now.
    fn store_counter(&self) -> Option<Box<StoreCounterInfo>> {
        let p = self.protected.as_ref()?;
        let c = p.counter();
        let tpm = match p.tpm_value(&mut self.hw()) {
            Ok(crate::hwtpm::CounterProbe::Value(v)) => Some(v),
            Ok(other) => {
                xvtpm_log::host_warn!(nv_index = %format!("{:#010x}", c.nv_index), state = ?other, "store counter unreadable");
                None
            }
            Err(e) => {
                xvtpm_log::host_warn!(nv_index = %format!("{:#010x}", c.nv_index), error = %e, "store counter unreadable");
                None
            }
        };
        Some(Box::new(StoreCounterInfo {
            nv_index: c.nv_index,
            store_value: c.value,
            tpm_value: tpm,
            anchor_requests: self.anchor_stats.requests.load(std::sync::atomic::Ordering::Relaxed),
            anchor_commits: self.anchor_stats.commits.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    fn status(&mut self) -> StatusInfo {
        StatusInfo {
            provisioned: self.provisioned(),
            tcti: self.cfg.tcti.clone(),
            software_tpm: self.software_tpm,
            sealed_pcrs: self.store.provision.as_ref().map(|p| p.pcrs.clone()).unwrap_or_default(),
            groups: self.store.groups.len(),
            vtpms: self.store.vtpms.len(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            deep_quotes: self.stats.answered.load(std::sync::atomic::Ordering::Relaxed),
            physical_quotes: self.stats.physical_quotes.load(std::sync::atomic::Ordering::Relaxed),
            batching: self.cfg.batch.max_batch > 1,
            store_counter: self.store_counter(),
            transfer_protocol: vtpm_proto::transfer::IMPORT_PROTOCOL,
            xen_domain: self.xen_domain,
            xen_link: self.xen_link,
        }
    }

    /// Records that the manager serves vTPM domains over its Xen link (`serve --xen`): `Status`
    /// reports it, so the toolstack refuses to boot a vTPM domain that no backend would serve.
    pub fn set_xen_link(&mut self) {
        self.xen_link = true;
    }

    /// Records that the manager runs in Xen domain `domid` (not dom0): `Status` reports it, so
    /// the toolstack attaches vTPM domains' manager links to that backend.
    pub fn set_xen_domain(&mut self, domid: u32) {
        self.xen_domain = Some(domid);
    }

    /// Answers an admin request (the caller has checked the peer is root).
    pub fn admin(&mut self, req: AdminRequest) -> AdminReply {
        match self.admin_inner(req) {
            Ok(r) | Err(r) => r,
        }
    }

    fn admin_inner(&mut self, req: AdminRequest) -> Result<AdminReply, AdminReply> {
        if !self.provisioned() && !matches!(req, AdminRequest::Status | AdminRequest::Provision { .. }) {
            return Err(fail(ErrorCode::NotProvisioned, "the manager is not provisioned: run `xl-vtpm mgr provision` first"));
        }
        Ok(match req {
            AdminRequest::Status => AdminReply::Status(Box::new(self.status())),
            AdminRequest::Provision { pcrs } => return self.provision(&pcrs),
            AdminRequest::GroupAdd { name } => {
                validate_name(&name)?;
                if self.store.group(&name).is_some() {
                    return Err(fail(ErrorCode::Exists, format!("group {name:?} exists already; pick another name")));
                }
                let ak = self.hw().create_ak(AkAlg::EccP256).map_err(|e| fail_because(ErrorCode::Tpm, "creating the group's AK", &e))?;
                let mut g = Group { uuid: Uuid::new_v4(), name, ak, ca: None };
                let master = self.master.as_ref().ok_or_else(|| fail(ErrorCode::NotProvisioned, "the manager is not provisioned"))?;
                g.ca = Some(crate::ekca::make_ca(&mut self.hw(), master, &g, now()).map_err(AdminReply::Error)?);
                let mut next = self.store.clone();
                next.groups.push(g.clone());
                self.commit(next)?;
                xvtpm_log::host_info!(group = %g.uuid, name = %g.name, "group added");
                AdminReply::Group(self.group_info(&g))
            }
            AdminRequest::GroupCa { group } => {
                let g = self.store.group(&group).cloned().ok_or_else(|| fail(ErrorCode::NotFound, format!("no group {group:?}; see `xl-vtpm mgr group list`")))?;
                let ca = self.ensure_ca(g.uuid).map_err(AdminReply::Error)?;
                AdminReply::GroupCa(Box::new(crate::ekca::info(&g, &ca)))
            }
            AdminRequest::GroupList => AdminReply::Groups { groups: self.store.groups.iter().map(|g| self.group_info(g)).collect() },
            AdminRequest::GroupDel { group } => {
                let g = self.store.group(&group).cloned().ok_or_else(|| fail(ErrorCode::NotFound, format!("no group {group:?}; see `xl-vtpm mgr group list`")))?;
                if g.name == DEFAULT_GROUP {
                    return Err(fail(ErrorCode::BadRequest, "the default group cannot be deleted"));
                }
                let members = self.store.vtpms.iter().chain(self.reserved.values()).filter(|v| v.group == g.uuid).count();
                if members > 0 {
                    return Err(fail(ErrorCode::BadRequest, format!("group {:?} still has {members} vTPM(s); delete them first", g.name)));
                }
                let mut next = self.store.clone();
                next.groups.retain(|x| x.uuid != g.uuid);
                self.commit(next)?;
                AdminReply::Ok
            }
            AdminRequest::VtpmCreate { group, uuid } => {
                let g = match &group {
                    Some(k) => self.store.group(k).ok_or_else(|| fail(ErrorCode::NotFound, format!("--group {k:?}: no such group; see `xl-vtpm mgr group list`")))?,
                    None => self.store.groups.first().ok_or_else(|| fail(ErrorCode::Internal, "no default group"))?,
                };
                let uuid = uuid.unwrap_or_else(Uuid::new_v4);
                if self.identity(&uuid).is_some() {
                    return Err(fail(ErrorCode::Exists, format!("vTPM {uuid} exists already")));
                }
                let v = VtpmEntry { uuid, group: g.uuid, created: now(), ek: None, state: None };
                let mut next = self.store.clone();
                next.vtpms.push(v.clone());
                self.commit(next)?;
                xvtpm_log::host_info!(vtpm = %uuid, group = %v.group, "vTPM identity created");
                AdminReply::Vtpm(self.vtpm_info(&v))
            }
            AdminRequest::VtpmReserve { group, uuid } => return self.reserve(group, uuid),
            AdminRequest::VtpmList => AdminReply::Vtpms { vtpms: self.store.vtpms.iter().map(|v| self.vtpm_info(v)).collect() },
            AdminRequest::VtpmListPage { after } => self.vtpm_page(after),
            AdminRequest::VtpmShow { uuid } => {
                let v = self.store.vtpm(&uuid).ok_or_else(|| not_found(&uuid))?;
                AdminReply::Vtpm(self.vtpm_info(v))
            }
            AdminRequest::VtpmDel { uuid } => {
                self.identity(&uuid).ok_or_else(|| not_found(&uuid))?;
                if let Some(a) = self.attachment(&uuid) {
                    return Err(fail(ErrorCode::BadRequest, format!("vTPM {uuid} is still served by process {}; stop it first (`xl-vtpm vtpm stop {uuid}`)", a.pid)));
                }
                if self.reserved.remove(&uuid).is_some() {
                    // Never written: nothing to remove from the store.
                    self.attached.remove(&uuid);
                    self.save_attachments();
                    xvtpm_log::host_info!(vtpm = %uuid, "reserved vTPM identity dropped");
                    return Ok(AdminReply::Ok);
                }
                let mut next = self.store.clone();
                next.vtpms.retain(|v| v.uuid != uuid);
                next.transfers.retain(|t| t.uuid != uuid);
                self.commit(next)?;
                self.refused_states.remove(&uuid);
                self.attached.remove(&uuid);
                self.save_attachments();
                self.attached_domains.remove(&uuid);
                self.save_domain_attachments();
                xvtpm_log::host_info!(vtpm = %uuid, "vTPM identity deleted");
                AdminReply::Ok
            }
            AdminRequest::VtpmAttach { uuid, pid } => {
                self.identity(&uuid).ok_or_else(|| not_found(&uuid))?;
                if let Some(why) = self.transfer_refusal(&uuid) {
                    return Err(AdminReply::Error(why));
                }
                // The instance is named now, while the caller (the vTPM's parent) keeps the
                // child unreaped, so the pid cannot have been reused yet.
                let Some(start) = xvtpm_fsutil::start_time(pid).filter(|_| xvtpm_fsutil::pid_alive(pid)) else {
                    return Err(fail(ErrorCode::BadRequest, format!("process {pid} is not running; attach a vTPM's process while it runs")));
                };
                self.attach_process(uuid, Attachment { pid, start, relayed: false })?
            }
            AdminRequest::VtpmAttachRelayed { uuid, pid, start } => {
                self.identity(&uuid).ok_or_else(|| not_found(&uuid))?;
                if let Some(why) = self.transfer_refusal(&uuid) {
                    return Err(AdminReply::Error(why));
                }
                // The bridge is the authority on dom0's processes: it refuses a second live
                // process itself, so an older relayed attachment here is one whose exit did not
                // reach this manager (the link was down): replaced.
                if let Some(old) = self.attached.get(&uuid).copied().filter(|a| a.relayed) {
                    xvtpm_log::host_info!(vtpm = %uuid, old_pid = old.pid, pid, "relayed attachment replaced (the bridge's earlier process is gone)");
                    self.attached.remove(&uuid);
                }
                self.attach_process(uuid, Attachment { pid, start, relayed: true })?
            }
            AdminRequest::VtpmRelayedExited { uuid, pid, start } => {
                self.detach_exited(uuid, Attachment { pid, start, relayed: true });
                AdminReply::Ok
            }
            AdminRequest::VtpmRelay { .. } => {
                return Err(fail(ErrorCode::BadRequest, "a relayed vTPM request is answered by the manager's admin link, not here"));
            }
            AdminRequest::VtpmAttachDomain { uuid, domid } => {
                self.store.vtpm(&uuid).ok_or_else(|| not_found(&uuid))?;
                if let Some(why) = self.transfer_refusal(&uuid) {
                    return Err(AdminReply::Error(why));
                }
                // DOMID_FIRST_RESERVED (0x7FF0) and above are never real domains; dom0 is
                // the manager's own domain, never a vTPM domain.
                if domid == 0 || domid >= 0x7FF0 {
                    return Err(fail(ErrorCode::BadRequest, format!("domid {domid}: a vTPM domain is a domU (1..=32751)")));
                }
                // Unlike a process, the manager cannot tell whether a domain still runs:
                // a stale attachment must be removed explicitly (`VtpmDetach`).
                if let Some(old) = self.attached_domains.get(&uuid).copied()
                    && old != domid
                {
                    return Err(fail(ErrorCode::Exists, format!("vTPM {uuid} is already attached to domain {old}; detach it first (`xl-vtpm vtpm stop {uuid}`)")));
                }
                if let Some((other, _)) = self.attached_domains.iter().find(|(u, d)| **d == domid && **u != uuid) {
                    return Err(fail(ErrorCode::Exists, format!("domain {domid} is already attached to vTPM {other}; one vTPM per domain")));
                }
                self.attached_domains.insert(uuid, domid);
                self.save_domain_attachments();
                xvtpm_log::host_info!(vtpm = %uuid, domid, "domain attached");
                AdminReply::Ok
            }
            AdminRequest::VtpmAcceptState { uuid } => return self.accept_state(uuid),
            req @ (AdminRequest::TransferChallenge { .. }
            | AdminRequest::TransferOffer { .. }
            | AdminRequest::TransferVerify { .. }
            | AdminRequest::TransferExport { .. }
            | AdminRequest::TransferImport { .. }
            | AdminRequest::TransferReceipt { .. }
            | AdminRequest::TransferCancel { .. }
            | AdminRequest::TransferCommit { .. }
            | AdminRequest::TransferAbort { .. }) => return self.transfer_admin(req),
            AdminRequest::Enrollment => return self.enrollment(),
            AdminRequest::ActivateCredential { group, credential_blob, encrypted_secret } => {
                return self.activate_credential(&group, &credential_blob, &encrypted_secret);
            }
            AdminRequest::VtpmDetach { uuid } => {
                self.attached.remove(&uuid);
                self.save_attachments();
                if let Some(domid) = self.attached_domains.remove(&uuid) {
                    self.save_domain_attachments();
                    xvtpm_log::host_info!(vtpm = %uuid, domid, "domain detached");
                }
                AdminReply::Ok
            }
        })
    }

    /// `VtpmReserve`: an identity for the vTPM manufactured next, durable with its EK
    /// certificate (see [`AdminRequest::VtpmReserve`]).
    fn reserve(&mut self, group: Option<String>, uuid: Option<Uuid>) -> Result<AdminReply, AdminReply> {
        let g = match &group {
            Some(k) => self.store.group(k).ok_or_else(|| fail(ErrorCode::NotFound, format!("--group {k:?}: no such group; see `xl-vtpm mgr group list`")))?,
            None => self.store.groups.first().ok_or_else(|| fail(ErrorCode::Internal, "no default group"))?,
        };
        let group = g.uuid;
        let uuid = uuid.unwrap_or_else(Uuid::new_v4);
        if self.identity(&uuid).is_some() {
            return Err(fail(ErrorCode::Exists, format!("vTPM {uuid} exists already")));
        }
        if self.reserved.len() >= MAX_RESERVED {
            // Reservations whose process is gone will never be certified.
            let live: std::collections::HashSet<Uuid> = self.reserved.keys().filter(|u| self.attachment(u).is_some()).copied().collect();
            self.reserved.retain(|u, _| live.contains(u));
            if self.reserved.len() >= MAX_RESERVED {
                return Err(fail(ErrorCode::Busy, format!("{MAX_RESERVED} vTPMs are being created at once; retry when some have finished")));
            }
        }
        let v = VtpmEntry { uuid, group, created: now(), ek: None, state: None };
        self.reserved.insert(uuid, v.clone());
        xvtpm_log::host_info!(vtpm = %uuid, group = %group, "vTPM identity reserved (written with its EK certificate)");
        Ok(AdminReply::Vtpm(self.vtpm_info(&v)))
    }

    fn enrollment(&mut self) -> Result<AdminReply, AdminReply> {
        let cert = crate::akprov::ek_certificate(&mut self.hw()).map_err(|e| fail_because(ErrorCode::Tpm, "", &e))?;
        let host_id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&cert));
        let groups = self.store.groups.iter().map(|g| self.group_info(g)).collect();
        Ok(AdminReply::Enrollment(Box::new(vtpm_proto::mgr::EnrollmentInfo { host_id, ek_cert: hex::encode(cert), groups })))
    }

    fn activate_credential(&mut self, group: &str, blob: &str, secret: &str) -> Result<AdminReply, AdminReply> {
        let g = self.store.group(group).cloned().ok_or_else(|| fail(ErrorCode::NotFound, format!("no group {group:?}; see `xl-vtpm mgr group list`")))?;
        let bad = |what: &str| fail(ErrorCode::BadRequest, format!("{what} is not hex"));
        let (cap_b, cap_s) = (2 * crate::akprov::MAX_CREDENTIAL_BLOB, 2 * crate::akprov::MAX_ENCRYPTED_SECRET);
        if blob.len() > cap_b || secret.len() > cap_s {
            return Err(fail(ErrorCode::BadRequest, format!("credential_blob (≤ {cap_b} hex digits) or encrypted_secret (≤ {cap_s}) too long")));
        }
        let blob = hex::decode(blob).map_err(|_| bad("credential_blob"))?;
        let secret = hex::decode(secret).map_err(|_| bad("encrypted_secret"))?;
        let out = crate::akprov::activate_credential(&mut self.hw(), &g.ak, &blob, &secret).map_err(|e| {
            let code = if matches!(e, crate::hwtpm::HwTpmError::InvalidArgument(_)) { ErrorCode::BadRequest } else { ErrorCode::Tpm };
            fail_because(code, &format!("TPM2_ActivateCredential with the AK of group {:?}", g.name), &e)
        })?;
        xvtpm_log::host_info!(group = %g.uuid, "credential activated for a verifier");
        Ok(AdminReply::Activated { secret: vtpm_proto::mgr::SecretBytes(zeroize::Zeroizing::new(out)) })
    }

    fn provision(&mut self, pcrs: &[u8]) -> Result<AdminReply, AdminReply> {
        if self.store.provision.is_some() {
            return Err(fail(ErrorCode::AlreadyProvisioned, "the manager is provisioned already"));
        }
        if pcrs.iter().any(|p| *p > 23) {
            return Err(fail(ErrorCode::BadRequest, "--pcrs: PCR indices must be 0..=23"));
        }
        let spec = PcrPolicySpec::with_pcrs(pcrs);
        let (rec, policy_key, master) = self.hw().provision(&spec).map_err(|e| fail_because(ErrorCode::Tpm, "provisioning", &e))?;
        let ak = self.hw().create_ak(AkAlg::EccP256).map_err(|e| fail_because(ErrorCode::Tpm, "creating the default AK", &e))?;
        // The admin's policy-signing key: needed only to authorise new PCR
        // values after a host upgrade. Root-only; admins should move it offline.
        let key_path = self.cfg.policy_key_path();
        xvtpm_fsutil::write_atomic(&key_path, &policy_key[..], 0o600)
            .map_err(|e| fail_because(ErrorCode::Internal, &format!("writing {}", key_path.display()), &e))?;
        let mut group = Group { uuid: Uuid::new_v4(), name: DEFAULT_GROUP.into(), ak, ca: None };
        group.ca = Some(crate::ekca::make_ca(&mut self.hw(), &master, &group, now()).map_err(AdminReply::Error)?);
        let first = Store { provision: Some(rec), groups: vec![group], ..Store::empty() };
        let path = self.cfg.store_path();
        let (store, prot) = crate::rollback::bind_new_counter(&mut self.hw(), &path, StoreKeys::derive(&master), first)
            .map_err(|e| fail_because(ErrorCode::Tpm, "provisioning: writing the store under its rollback counter", &e))?;
        let c = prot.counter();
        self.store = store;
        self.protected = Some(prot);
        self.master = Some(master);
        xvtpm_log::host_info!(pcrs = ?pcrs, nv_index = %format!("{:#010x}", c.nv_index), counter = c.value, "manager provisioned");
        Ok(AdminReply::Status(Box::new(self.status())))
    }
}

fn load_attachments(path: &Path) -> HashMap<Uuid, Attachment> {
    let Ok(bytes) = std::fs::read(path) else { return HashMap::new() };
    let saved: Vec<(Uuid, u32, u64)> = serde_json::from_slice(&bytes).unwrap_or_default();
    let kept: HashMap<Uuid, Attachment> = saved
        .into_iter()
        .map(|(u, pid, start)| (u, Attachment { pid, start, relayed: false }))
        .filter(|(_, a)| a.alive())
        .collect();
    if !kept.is_empty() {
        xvtpm_log::host_info!(count = kept.len(), "re-attached running vTPM processes after restart");
    }
    kept
}

/// Domain attachments of vTPMs that still exist (see [`Config::domain_attachments_path`]).
fn load_domain_attachments(path: &Path, store: &crate::store::Store) -> HashMap<Uuid, u32> {
    let Ok(bytes) = std::fs::read(path) else { return HashMap::new() };
    let saved: Vec<(Uuid, u32)> = serde_json::from_slice(&bytes).unwrap_or_default();
    let kept: HashMap<Uuid, u32> = saved
        .into_iter()
        .filter(|(u, d)| store.vtpm(u).is_some() && (1..0x7FF0).contains(d))
        .collect();
    if !kept.is_empty() {
        xvtpm_log::host_info!(count = kept.len(), "kept vTPM domain attachments after restart");
    }
    kept
}

impl Manager {
    fn save_domain_attachments(&self) {
        let list: Vec<(Uuid, u32)> = self.attached_domains.iter().map(|(u, d)| (*u, *d)).collect();
        let bytes = serde_json::to_vec(&list).expect("serialisable");
        if let Err(e) = xvtpm_fsutil::write_atomic(&self.cfg.domain_attachments_path(), &bytes, 0o600) {
            xvtpm_log::host_warn!(error = %e, "could not record vTPM domain attachments; a manager restart will need them re-attached");
        }
    }

    fn save_attachments(&self) {
        let list: Vec<(Uuid, u32, u64)> = self.attached.iter().filter(|(_, a)| !a.relayed).map(|(u, a)| (*u, a.pid, a.start)).collect();
        let bytes = serde_json::to_vec(&list).expect("serialisable");
        if let Err(e) = xvtpm_fsutil::write_atomic(&self.cfg.attachments_path(), &bytes, 0o600) {
            xvtpm_log::host_warn!(error = %e, "could not record vTPM attachments; a manager restart will need them re-attached");
        }
    }
}

impl Manager {
    /// Decides a batch of state-anchor requests ([`crate::anchor`]) and makes one durable store
    /// write for every anchor it moves; answers each request (after that write, if it needed it).
    pub fn anchor_batch(&mut self, batch: Vec<crate::anchor::Request>) {
        let n = batch.len();
        let mut next: Option<Store> = None;
        let mut changed: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
        let mut waiting: Vec<(Uuid, u64, Option<u64>, tokio::sync::oneshot::Sender<VtpmReply>)> = Vec::new();
        for r in batch {
            if let Err(f) = self.authorize(&r.peer, r.claimed) {
                let _ = r.reply.send(VtpmReply::Error(f));
                continue;
            }
            if self.store.vtpm(&r.vtpm).is_none() {
                // Nothing to anchor into until the identity is durable (its EK certificate).
                let f = Failure::new(ErrorCode::NotFound, format!("vTPM {} is reserved, not yet created: its identity is written with its EK certificate, before its first state", r.vtpm));
                let _ = r.reply.send(VtpmReply::Error(f));
                continue;
            }
            let current = next.as_ref().unwrap_or(&self.store).vtpm(&r.vtpm).and_then(|v| v.state.clone());
            let presented = StateAnchor { generation: r.generation, digest: r.digest, fence: None };
            let g = presented.generation;
            let refusal = match &current {
                None => None,
                Some(a) if g < a.generation => Some(format!("state generation {g} is older than generation {}, the newest the manager anchored for vTPM {}", a.generation, r.vtpm)),
                Some(a) if g == a.generation && presented.digest != a.digest => Some(format!(
                    "state generation {g} of vTPM {} has other contents than the generation {} the manager anchored (a copy kept from an interrupted write, or a different state)",
                    r.vtpm, a.generation
                )),
                Some(a) if g > a.generation && a.fence.is_some_and(|f| g <= f) => Some(format!(
                    "state generation {g} of vTPM {} is one of the states abandoned when an administrator accepted generation {} (they reached generation {})",
                    r.vtpm,
                    a.generation,
                    a.fence.unwrap_or_default()
                )),
                Some(_) => None,
            };
            if let Some(what) = refusal {
                let anchored = current.as_ref().map(|a| a.generation).unwrap_or_default();
                xvtpm_log::guest_warn!(vtpm = %r.vtpm, presented = g, anchored, opening = r.opening, "refused an older vTPM state");
                let f = stale(r.vtpm, &what, g, r.opening);
                self.refused_states.insert(r.vtpm, presented);
                let _ = r.reply.send(VtpmReply::Error(f));
                continue;
            }
            let mut continue_after = None;
            match &current {
                Some(a) if g == a.generation => continue_after = a.fence,
                _ => {
                    if current.is_none() || r.opening {
                        xvtpm_log::guest_info!(vtpm = %r.vtpm, generation = g, previous = ?current.as_ref().map(|a| a.generation), opening = r.opening, "anchoring vTPM state");
                    }
                    let store = next.get_or_insert_with(|| self.store.clone());
                    if let Some(v) = store.vtpms.iter_mut().find(|v| v.uuid == r.vtpm) {
                        v.state = Some(presented.clone());
                    }
                    changed.insert(r.vtpm);
                }
            }
            if r.opening {
                self.refused_states.remove(&r.vtpm);
            }
            waiting.push((r.vtpm, g, continue_after, r.reply));
        }
        let committed = match next {
            Some(next) => {
                crate::anchor::count(&self.anchor_stats, 0, 1);
                self.commit(next).map_err(into_failure)
            }
            None => Ok(()),
        };
        if let Err(f) = &committed {
            xvtpm_log::guest_warn!(error = %f, "could not anchor vTPM states; their writes are not acknowledged");
        }
        for (vtpm, generation, continue_after, reply) in waiting {
            let answer = match &committed {
                Err(f) if changed.contains(&vtpm) => VtpmReply::Error(Failure::new(f.code, format!("anchoring state generation {generation}: {}", f.message))),
                _ => VtpmReply::StateAnchored { generation, continue_after },
            };
            let _ = reply.send(answer);
        }
        crate::anchor::count(&self.anchor_stats, n, 0);
    }

    /// `VtpmAcceptState`: makes the state vTPM `uuid` last presented (and was refused) its anchor.
    fn accept_state(&mut self, uuid: Uuid) -> Result<AdminReply, AdminReply> {
        let entry = self.store.vtpm(&uuid).cloned().ok_or_else(|| not_found(&uuid))?;
        if let Some(pid) = self.attached.get(&uuid).filter(|a| a.alive()).map(|a| a.pid) {
            return Err(fail(ErrorCode::BadRequest, format!("vTPM {uuid} is running (process {pid}); stop it first (`xl-vtpm vtpm stop {uuid}`)")));
        }
        let Some(presented) = self.refused_states.get(&uuid).cloned() else {
            return Err(fail(
                ErrorCode::NotFound,
                format!(
                    "the manager has refused no state of vTPM {uuid} since it started, so there is nothing to accept: start the vTPM (`xl-vtpm vtpm start {uuid}`) so that the manager sees its state, then run accept-state again"
                ),
            ));
        };
        // Every generation the abandoned states reached stays refused; the vTPM's next write
        // skips above them (`continue_after`).
        let old = entry.state.as_ref();
        let fence = old.map(|a| a.generation.max(a.fence.unwrap_or(0))).filter(|f| *f > presented.generation);
        let accepted = StateAnchor { fence, ..presented.clone() };
        let mut next = self.store.clone();
        if let Some(v) = next.vtpms.iter_mut().find(|v| v.uuid == uuid) {
            v.state = Some(accepted);
        }
        self.commit(next)?;
        self.refused_states.remove(&uuid);
        xvtpm_log::host_warn!(vtpm = %uuid, accepted = presented.generation, was = ?entry.state.map(|a| a.generation), fence = ?fence, "administrator accepted an older vTPM state");
        Ok(AdminReply::Ok)
    }
}

/// The refusal of a presented state of vTPM `uuid` at generation `g`, `what` saying why:
/// names the remedies.
fn stale(uuid: Uuid, what: &str, g: u64, opening: bool) -> Failure {
    let how = if opening {
        "the state was restored from an older copy (backup, snapshot) or the disk lost writes; the vTPM did not start and the state was left untouched"
    } else {
        "another writer changed this vTPM's state"
    };
    Failure::new(
        ErrorCode::StaleState,
        format!(
            "{what}: {how}. Put back the newest state, or — knowing that every change after generation {g} is lost — accept this one with `xl-vtpm vtpm accept-state {uuid} --yes` and start the vTPM again"
        ),
    )
}

fn into_failure(r: AdminReply) -> Failure {
    match r {
        AdminReply::Error(f) => f,
        other => Failure::new(ErrorCode::Internal, format!("unexpected {other:?}")),
    }
}

fn not_found(uuid: &Uuid) -> AdminReply {
    fail(ErrorCode::NotFound, format!("no vTPM {uuid}; see `xl-vtpm vtpm list`"))
}

fn validate_name(name: &str) -> Result<(), AdminReply> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(fail(ErrorCode::BadRequest, format!("group name {name:?}: use 1-64 characters from [A-Za-z0-9._-]")))
    }
}
