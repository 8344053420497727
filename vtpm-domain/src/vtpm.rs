//! The transport-independent core of one vTPM: framing checks, the engine,
//! and persistence after every state-changing command.
//!
//! Every packet from a client passes [`tpm_wire::parse_command`]
//! first; a packet it rejects is answered with a TPM error and never reaches
//! libtpms. A response is only sent once the state it implies is durable: if
//! sealing or writing fails, the client gets `TPM_RC_FAILURE` instead.

use vtpm_engine::{Engine, TpmVersion};
use tpm_wire::{self as tpm, Family};

use crate::{guest_info, guest_warn};
use crate::blockstore::BlockStore;
use crate::store::{Store, StoreError};

/// Where a vTPM's sealed state lives: a file (atomic replace) or a raw
/// block device with A/B slots (a vTPM in its own domain has no file system).
pub trait StateStore {
    /// Seals and durably writes a new state.
    fn save(&mut self, permanent: &[u8], volatile: &[u8]) -> Result<(), StoreError>;
    /// The generation of the last write.
    fn generation(&self) -> u64;
    /// Opens what later writes need while the process is still privileged
    /// ([`crate::sandbox`]); nothing by default.
    fn pin_dir(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl StateStore for Store {
    fn save(&mut self, permanent: &[u8], volatile: &[u8]) -> Result<(), StoreError> {
        Store::save(self, permanent, volatile)
    }
    fn generation(&self) -> u64 {
        Store::generation(self)
    }
    fn pin_dir(&mut self) -> Result<(), StoreError> {
        Store::pin_dir(self)
    }
}

impl StateStore for BlockStore {
    fn save(&mut self, permanent: &[u8], volatile: &[u8]) -> Result<(), StoreError> {
        BlockStore::save(self, permanent, volatile)
    }
    fn generation(&self) -> u64 {
        BlockStore::generation(self)
    }
}

/// The default and largest command size. 4096 matches swtpm and a TIS/CRB
/// buffer; the Xen transport lowers it to 4088 (one page minus the header).
pub const DEFAULT_BUFFER: u32 = 4096;

/// Maps our family to the engine's.
pub fn engine_version(f: Family) -> TpmVersion {
    match f {
        Family::Tpm2 => TpmVersion::Tpm2,
        Family::Tpm12 => TpmVersion::Tpm12,
    }
}

/// Errors starting or restarting the engine.
#[derive(Debug, thiserror::Error)]
pub enum VtpmError {
    /// The vTPM cannot do what was asked in its current state.
    #[error("TPM engine: {0}")]
    Engine(String),
    /// libtpms failed.
    #[error("TPM engine: {0}")]
    Libtpms(#[source] vtpm_engine::EngineError),
    /// libtpms did not store the EK certificate.
    #[error("TPM engine: storing the EK certificate: {0}")]
    EkCert(#[source] vtpm_engine::EngineError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One vTPM.
pub struct Vtpm {
    family: Family,
    engine: Option<Engine>,
    store: Box<dyn StateStore>,
    buffer_size: u32,
    locality: u8,
    /// The permanent blob that is on disk, to skip writes that change nothing.
    last_saved: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// Volatile state loaded by `CMD_SET_STATEBLOB` (an incoming migration),
    /// resumed by the next [`Vtpm::init`].
    pending_volatile: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// The running engine's volatile state (PCRs, loaded objects, sessions) at the last
    /// control-channel stop, kept in memory only: [`Vtpm::resume_stopped`] hands it back when
    /// a migration's destination stopped the TPM and ended before it loaded its state, so the
    /// source's guest resumes with its TPM as it was. A power cycle or a loaded permanent blob
    /// drops it.
    stopped_volatile: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// The state generation this process opened (before its own writes).
    opened_generation: u64,
    /// This process started the TPM from a saved volatile state (a suspend's): it runs as it was.
    resumed: bool,
    /// TPM commands the engine ran in this process that may change its state (all but
    /// [`reads_only`]): a state loaded by `CMD_SET_STATEBLOB` on which none ran since is still
    /// exactly the state those blobs carry.
    commands: u64,
    /// The engine's permanent state when its save failed: the engine is ahead of the disk, so
    /// no command runs until this is written (see [`Vtpm::persist_if_dirty`]).
    unsaved: Option<zeroize::Zeroizing<Vec<u8>>>,
}

impl Vtpm {
    /// Manufactures a new vTPM (EK included, for TPM 2.0) and writes its first
    /// state. Returns the vTPM and the EK public area (empty for TPM 1.2).
    pub fn manufacture(family: Family, store: impl StateStore + 'static) -> Result<(Vtpm, Vec<u8>), VtpmError> {
        Vtpm::manufacture_with(family, store, vtpm_engine::EkKind::Rsa2048)
    }

    /// [`Vtpm::manufacture`] with a choice of endorsement key.
    pub fn manufacture_with(family: Family, store: impl StateStore + 'static, ek_kind: vtpm_engine::EkKind) -> Result<(Vtpm, Vec<u8>), VtpmError> {
        Vtpm::begin_manufacture(family, store, ek_kind)?.finish()
    }

    /// The first half of manufacturing: a fresh TPM with its EK, nothing written yet. The
    /// caller may add the EK certificate ([`Manufacturing::install_ek_cert`]) before
    /// [`Manufacturing::finish`] writes the first state, so a failure in between leaves no state.
    pub fn begin_manufacture(family: Family, store: impl StateStore + 'static, ek_kind: vtpm_engine::EkKind) -> Result<Manufacturing, VtpmError> {
        let store: Box<dyn StateStore> = Box::new(store);
        let mut engine = Engine::start(engine_version(family), None, None).map_err(VtpmError::Libtpms)?;
        let ek = match family {
            Family::Tpm2 => vtpm_engine::provision_ek_kind(&mut engine, ek_kind).map_err(VtpmError::Libtpms)?,
            Family::Tpm12 => Vec::new(),
        };
        let ek_kind = (family == Family::Tpm2).then_some(ek_kind);
        Ok(Manufacturing { family, engine, store, ek, ek_kind })
    }

    /// Resumes a vTPM from its opened state. A saved volatile state is used
    /// once: it is dropped from the file right after the resume, so a later
    /// crash does not replay stale PCRs (swtpm's `DELETE_VOLATILE`).
    pub fn resume(family: Family, store: impl StateStore + 'static, state: vtpm_proto::sealed::State, startup: bool) -> Result<Vtpm, VtpmError> {
        let store: Box<dyn StateStore> = Box::new(store);
        let opened_generation = state.generation;
        let vol = (!state.volatile.is_empty()).then_some(&state.volatile[..]);
        let engine = Engine::start(engine_version(family), Some(&state.permanent), vol)
            .map_err(VtpmError::Libtpms)?;
        let mut v = Vtpm {
            family,
            engine: Some(engine),
            store,
            buffer_size: DEFAULT_BUFFER,
            locality: 0,
            last_saved: Some(zeroize::Zeroizing::new(state.permanent.to_vec())),
            pending_volatile: None,
            stopped_volatile: None,
            opened_generation,
            unsaved: None,
            resumed: vol.is_some(),
            commands: 0,
        };
        if vol.is_some() {
            let perm = state.permanent.clone();
            v.store.save(&perm, &[])?;
        } else if startup && family == Family::Tpm2 {
            let rsp = v.engine_mut().map(|e| e.process(&tpm::tpm2_startup(tpm::TPM2_SU_CLEAR)));
            if let Some(rc) = rsp.as_deref().and_then(tpm::response_code)
                && rc != tpm::TPM2_RC_SUCCESS && rc != tpm::TPM2_RC_INITIALIZE {
                    return Err(VtpmError::Engine(format!("TPM2_Startup(CLEAR) returned {rc:#x}")));
                }
        }
        v.persist_if_dirty().map_err(VtpmError::Store)?;
        Ok(v)
    }

    /// Prepares the state store for the privilege drop ([`StateStore::pin_dir`]).
    pub fn pin_store_dir(&mut self) -> Result<(), StoreError> {
        self.store.pin_dir()
    }

    /// The TPM family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Whether the engine is running (not stopped by `CMD_STOP`).
    pub fn running(&self) -> bool {
        self.engine.is_some()
    }

    fn engine_mut(&mut self) -> Option<&mut Engine> {
        self.engine.as_mut()
    }

    /// The largest command accepted.
    pub fn buffer_size(&self) -> u32 {
        self.buffer_size
    }

    /// Sets the locality for following commands.
    pub fn set_locality(&mut self, loc: u8) {
        self.locality = loc;
        if let Some(e) = self.engine.as_mut() {
            e.set_locality(loc);
        }
    }

    /// Sets the I/O buffer size (swtpm `CMD_SET_BUFFERSIZE`); 0 queries.
    /// Returns (size in use, min, max).
    pub fn set_buffer_size(&mut self, wanted: u32) -> (u32, u32, u32) {
        let (min, max) = (128, DEFAULT_BUFFER);
        if wanted != 0 {
            self.buffer_size = wanted.clamp(min, max);
            if let Some(e) = self.engine.as_mut() {
                e.set_buffer_size(self.buffer_size);
            }
        }
        (self.buffer_size, min, max)
    }

    /// Runs one command packet from a client and returns the response.
    /// Never panics on client input; always returns a well-formed response.
    pub fn execute(&mut self, packet: &[u8]) -> Vec<u8> {
        let family = self.family;
        if family == Family::Tpm2 && packet.get(..2) == Some(&tpm::TPM12_TAG_RQU_COMMAND.to_be_bytes())
            && let Some(rsp) = vtpm_proto::tpm12_compat::answer(packet, |n| self.tpm2_random(n)) {
                return rsp;
            }
        if let Err(e) = tpm::parse_command(packet, family, self.buffer_size as usize) {
            guest_warn!(error = %e, "rejected malformed TPM command");
            return tpm::error_response(family, e.response_code(family)).to_vec();
        }
        let failure = || tpm::error_response(family, family.failure_code()).to_vec();
        // A state the engine holds but the disk does not: write it first, or run nothing.
        if let Err(e) = self.persist_if_dirty() {
            guest_warn!(error = %e, "vTPM state still not saved; answering TPM_RC_FAILURE without running the command");
            return failure();
        }
        let Some(engine) = self.engine.as_mut() else { return failure() };
        if !reads_only(family, packet) {
            self.commands += 1;
        }
        let mut rsp = engine.process(packet);
        if family == Family::Tpm2
            && let Some(patched) = vtpm_proto::deepquote_cmd::patch_getcap_response(packet, &rsp) {
                rsp = patched;
            }
        match self.persist_if_dirty() {
            Ok(()) => rsp,
            Err(e) => {
                guest_warn!(error = %e, "could not persist vTPM state; answering TPM_RC_FAILURE until a save succeeds");
                failure()
            }
        }
    }

    /// Writes the permanent state if libtpms changed it, or if an earlier write failed.
    ///
    /// A failed write keeps the unsaved blob and the engine as they are; every later call
    /// retries it, and [`Vtpm::execute`] runs no command until it is on disk. So a command
    /// answered `TPM_RC_FAILURE` may still take effect once the disk recovers (as on a TPM
    /// in failure mode), but no success answer ever shows state that is not durable. The
    /// engine is not rolled back: libtpms' volatile state (PCRs, cached persistent data)
    /// cannot be separated from the permanent state it was computed with.
    pub fn persist_if_dirty(&mut self) -> Result<(), StoreError> {
        let Some(engine) = self.engine.as_mut() else { return Ok(()) };
        // A newer dirty blob supersedes an unsaved one (each is the whole permanent state).
        let unsaved = self.unsaved.take();
        let Some(perm) = engine.take_dirty_permanent().or(unsaved) else { return Ok(()) };
        if self.last_saved.as_deref().map(|v| &v[..]) == Some(&perm[..]) {
            return Ok(());
        }
        match self.store.save(&perm, &[]) {
            Ok(()) => {
                self.last_saved = Some(perm);
                Ok(())
            }
            Err(e) => {
                self.unsaved = Some(perm);
                Err(e)
            }
        }
    }

    /// Saves permanent and volatile state (`CMD_STORE_VOLATILE`): the next
    /// start resumes the running TPM (PCRs, loaded objects) once.
    pub fn store_volatile(&mut self) -> Result<(), VtpmError> {
        let Some(engine) = self.engine.as_mut() else { return Err(VtpmError::Engine("TPM is stopped".into())) };
        let perm = engine.permanent_state().map_err(VtpmError::Libtpms)?;
        let vol = engine.volatile_state().map_err(VtpmError::Libtpms)?;
        self.store.save(&perm, &vol)?;
        self.last_saved = Some(perm);
        self.unsaved = None;
        Ok(())
    }

    /// Stops the engine (`CMD_STOP`, `CMD_SHUTDOWN`) after persisting. Its volatile state is
    /// kept in memory for [`Vtpm::resume_stopped`].
    pub fn stop(&mut self) -> Result<(), VtpmError> {
        self.power_off(true)
    }

    fn power_off(&mut self, keep_volatile: bool) -> Result<(), VtpmError> {
        self.persist_if_dirty()?;
        if let Some(mut e) = self.engine.take() {
            self.stopped_volatile = None;
            if keep_volatile {
                // Without it a failed move's source would find its TPM reset; the stop stands.
                match e.volatile_state() {
                    Ok(vol) => self.stopped_volatile = Some(vol),
                    Err(err) => xvtpm_log::host_warn!(error = %err, "the stopped TPM's volatile state could not be kept"),
                }
            }
            let perm = e.permanent_state().map_err(VtpmError::Libtpms)?;
            if self.last_saved.as_deref().map(|v| &v[..]) != Some(&perm[..]) {
                self.store.save(&perm, &[])?;
                self.last_saved = Some(perm);
            }
        }
        Ok(())
    }

    /// Starts a stopped engine again where it stopped, as if the stop had not happened: from
    /// the volatile state a loaded blob carries (a move's destination that loaded the state
    /// and ended before its `CMD_INIT`), or else from the one kept at the last stop. Returns
    /// whether it started; `false` if it runs, or if there is no state to resume (nothing was
    /// kept, or a permanent blob was loaded without its volatile one): then it stays off until
    /// the next `CMD_INIT`.
    pub fn resume_stopped(&mut self) -> Result<bool, VtpmError> {
        if self.engine.is_some() {
            return Ok(false);
        }
        let Some(vol) = self.pending_volatile.take().or_else(|| self.stopped_volatile.take()) else { return Ok(false) };
        self.start_engine(Some(&vol), "no persisted state to resume from")?;
        Ok(true)
    }

    /// Starts the engine from the persisted permanent state and `vol`, with this vTPM's
    /// locality and buffer size (`missing`: the error without a persisted state).
    fn start_engine(&mut self, vol: Option<&[u8]>, missing: &str) -> Result<(), VtpmError> {
        let perm = self.last_saved.clone().ok_or_else(|| VtpmError::Engine(missing.into()))?;
        let mut engine = Engine::start(engine_version(self.family), Some(&perm), vol).map_err(VtpmError::Libtpms)?;
        engine.set_locality(self.locality);
        if self.buffer_size != DEFAULT_BUFFER {
            engine.set_buffer_size(self.buffer_size);
        }
        self.engine = Some(engine);
        Ok(())
    }

    /// Power-cycles the engine (`CMD_INIT`): restart from the persisted
    /// permanent state, as a TPM reset.
    pub fn init(&mut self) -> Result<(), VtpmError> {
        self.power_off(false)?;
        self.stopped_volatile = None;
        let vol = self.pending_volatile.take();
        self.start_engine(vol.as_deref().map(|v| &v[..]), "no persisted state to initialise from")?;
        // CMD_INIT: a client can power-cycle in a loop.
        guest_info!("TPM initialised (power cycle)");
        Ok(())
    }

    /// The plaintext libtpms blob of `CMD_GET_STATEBLOB` type `kind` (1 permanent,
    /// 2 volatile, 3 savestate — empty: a TPM 2.0 keeps it in its permanent state).
    /// The caller seals it before it leaves the process.
    pub fn export_blob(&mut self, kind: u8) -> Result<zeroize::Zeroizing<Vec<u8>>, VtpmError> {
        let Some(engine) = self.engine.as_mut() else { return Err(VtpmError::Engine("TPM is stopped".into())) };
        let blob = match kind {
            1 => engine.permanent_state(),
            2 => engine.volatile_state(),
            _ => return Ok(zeroize::Zeroizing::new(Vec::new())),
        };
        blob.map_err(VtpmError::Libtpms)
    }

    /// Loads an opened (authenticated) `CMD_SET_STATEBLOB` blob into the stopped TPM:
    /// the permanent state is written to the store at once, the volatile state is
    /// resumed by the next [`Vtpm::init`].
    pub fn import_blob(&mut self, kind: u8, blob: zeroize::Zeroizing<Vec<u8>>) -> Result<(), VtpmError> {
        if self.engine.is_some() {
            return Err(VtpmError::Engine("state blobs load only into a stopped TPM".into()));
        }
        match kind {
            1 => {
                self.store.save(&blob, &[])?;
                self.last_saved = Some(blob);
                // The kept volatile state belongs to the permanent state this one replaced.
                self.stopped_volatile = None;
            }
            2 => self.pending_volatile = Some(blob),
            _ if blob.is_empty() => {}
            _ => return Err(VtpmError::Engine("a TPM 2.0 save-state blob is always empty".into())),
        }
        Ok(())
    }

    /// A platform reset (the guest booted or rebooted): power-cycle the
    /// engine and send TPM2_Startup(CLEAR), so PCRs restart from zero and
    /// keys and NV stay. TPM 1.2 engines are left for the guest to start.
    pub fn platform_reset(&mut self) -> Result<(), VtpmError> {
        self.init()?;
        if self.family == Family::Tpm2 {
            let rsp = self.engine_mut().map(|e| e.process(&tpm::tpm2_startup(tpm::TPM2_SU_CLEAR)));
            match rsp.as_deref().and_then(tpm::response_code) {
                Some(tpm::TPM2_RC_SUCCESS | tpm::TPM2_RC_INITIALIZE) => {}
                other => return Err(VtpmError::Engine(format!("TPM2_Startup(CLEAR) after reset returned {other:?}"))),
            }
        }
        self.persist_if_dirty()?;
        Ok(())
    }

    /// For a TPM 2.0 with a TCG EK but nothing at the EK certificate's NV index: the EK's kind,
    /// its `TPM2B_PUBLIC` and the TPM's properties, to ask the manager for a certificate.
    /// `None` if a certificate (or anything else) is at the index, for TPM 1.2, or if the TPM
    /// cannot say (not started).
    pub fn missing_ek_cert(&mut self) -> Option<(vtpm_engine::EkKind, Vec<u8>, vtpm_engine::TpmProperties)> {
        if self.family != Family::Tpm2 {
            return None;
        }
        let e = self.engine.as_mut()?;
        let (kind, ek) = vtpm_engine::read_ek(e).ok()?;
        if vtpm_engine::nv_size(e, kind.cert_index()).ok()?.is_some() {
            return None;
        }
        let props = vtpm_engine::tpm_properties(e).ok()?;
        Some((kind, ek, props))
    }

    /// Writes an EK certificate at `kind`'s TCG index and persists the state.
    pub fn install_ek_cert(&mut self, kind: vtpm_engine::EkKind, der: &[u8]) -> Result<(), VtpmError> {
        let e = self.engine.as_mut().ok_or_else(|| VtpmError::Engine("TPM is stopped".into()))?;
        vtpm_engine::write_ek_cert(e, kind, der).map_err(VtpmError::EkCert)?;
        self.persist_if_dirty()?;
        Ok(())
    }

    /// The EK public area at 0x81010001 (TPM 2.0), for identity checks.
    pub fn ek_public(&mut self) -> Option<Vec<u8>> {
        let e = self.engine.as_mut()?;
        vtpm_engine::read_ek_public(e).ok()
    }

    /// `n` random bytes from the TPM 2.0 engine (TPM2_GetRandom).
    fn tpm2_random(&mut self, n: u16) -> Option<Vec<u8>> {
        let engine = self.engine.as_mut()?;
        let rsp = engine.process(&tpm::tpm2_get_random(n));
        if tpm::response_code(&rsp) != Some(0) {
            return None;
        }
        let len = usize::from(u16::from_be_bytes(rsp.get(10..12)?.try_into().ok()?));
        rsp.get(12..12 + len).map(<[u8]>::to_vec)
    }

    /// Reads PCR values of one bank through the engine (TPM2_PCR_Read, which
    /// returns at most 8 digests per call, so it loops). Errors are TPM
    /// response codes to hand back to the guest.
    pub fn read_pcrs(&mut self, alg: u16, pcrs: &[u8]) -> Result<Vec<Vec<u8>>, u32> {
        let engine = self.engine.as_mut().ok_or(tpm::TPM2_RC_FAILURE)?;
        let mut remaining: Vec<u8> = pcrs.to_vec();
        let mut values: std::collections::BTreeMap<u8, Vec<u8>> = Default::default();
        while !remaining.is_empty() {
            let cmd = tpm::tpm2_pcr_read(&vtpm_proto::deepquote_cmd::selection_bytes(alg, &remaining));
            let rsp = engine.process(&cmd);
            let rc = tpm::response_code(&rsp).unwrap_or(tpm::TPM2_RC_FAILURE);
            if rc != 0 {
                return Err(rc);
            }
            let (got, digests) = parse_pcr_read(&rsp).ok_or(tpm::TPM2_RC_FAILURE)?;
            if got.is_empty() || got.len() != digests.len() {
                // The bank is not allocated, or libtpms made no progress.
                return Err(vtpm_proto::deepquote_cmd::rc::VPCRS);
            }
            for (p, d) in got.into_iter().zip(digests) {
                remaining.retain(|x| *x != p);
                values.insert(p, d);
            }
        }
        Ok(pcrs.iter().map(|p| values.remove(p).unwrap_or_default()).collect())
    }

    /// The state generation on disk.
    pub fn generation(&self) -> u64 {
        self.store.generation()
    }

    /// The state generation this process opened, before any write of its own
    /// (0 for a vTPM manufactured by this process).
    pub fn opened_generation(&self) -> u64 {
        self.opened_generation
    }

    /// How many TPM commands that may change its state the engine ran in this process.
    pub fn commands_run(&self) -> u64 {
        self.commands
    }

    /// Whether this process started the TPM from a saved volatile state (a suspend's), so it
    /// runs as it was, PCRs included, rather than powered on anew.
    pub fn resumed(&self) -> bool {
        self.resumed
    }
}

/// TPM 2.0 commands without sessions that read and change nothing a replay of older state
/// could roll back: `TPM2_ReadClock` (QEMU's start-up probe of the TPM's version),
/// `TPM2_GetCapability`, `TPM2_PCR_Read`. Every other command counts as the TPM moving on
/// (`TPM2_GetRandom` too: it advances the DRBG).
fn reads_only(family: Family, packet: &[u8]) -> bool {
    const NO_SESSIONS: [u8; 2] = [0x80, 0x01];
    const READ_CLOCK: u32 = 0x0000_0181;
    const GET_CAPABILITY: u32 = 0x0000_017A;
    const PCR_READ: u32 = 0x0000_017E;
    family == Family::Tpm2
        && packet.get(..2) == Some(&NO_SESSIONS[..])
        && packet.get(6..10).is_some_and(|c| matches!(u32::from_be_bytes([c[0], c[1], c[2], c[3]]), READ_CLOCK | GET_CAPABILITY | PCR_READ))
}

/// A TPM being manufactured ([`Vtpm::begin_manufacture`]): it has its EK, nothing is on disk.
pub struct Manufacturing {
    family: Family,
    engine: Engine,
    store: Box<dyn StateStore>,
    ek: Vec<u8>,
    ek_kind: Option<vtpm_engine::EkKind>,
}

impl Manufacturing {
    /// The EK's `TPM2B_PUBLIC` (empty for TPM 1.2).
    pub fn ek_public(&self) -> &[u8] {
        &self.ek
    }

    /// The EK's kind (`None` for TPM 1.2, which gets no EK certificate).
    pub fn ek_kind(&self) -> Option<vtpm_engine::EkKind> {
        self.ek_kind
    }

    /// The TPM's fixed properties (manufacturer, vendor strings, versions).
    pub fn tpm_properties(&mut self) -> Result<vtpm_engine::TpmProperties, VtpmError> {
        vtpm_engine::tpm_properties(&mut self.engine).map_err(VtpmError::Libtpms)
    }

    /// Writes the EK certificate (DER) at its TCG NV index, write-locked.
    pub fn install_ek_cert(&mut self, der: &[u8]) -> Result<(), VtpmError> {
        let kind = self.ek_kind.ok_or_else(|| VtpmError::Engine("a TPM 1.2 has no TPM 2.0 EK certificate index".into()))?;
        vtpm_engine::write_ek_cert(&mut self.engine, kind, der).map_err(VtpmError::EkCert)
    }

    /// Writes the first state and returns the running vTPM and the EK public area.
    pub fn finish(self) -> Result<(Vtpm, Vec<u8>), VtpmError> {
        let Manufacturing { family, mut engine, mut store, ek, .. } = self;
        let perm = engine.permanent_state().map_err(VtpmError::Libtpms)?;
        store.save(&perm, &[])?;
        let _ = engine.take_dirty_permanent();
        let v = Vtpm { family, engine: Some(engine), store, buffer_size: DEFAULT_BUFFER, locality: 0, last_saved: Some(perm), pending_volatile: None, stopped_volatile: None, opened_generation: 0, unsaved: None, resumed: false, commands: 0 };
        Ok((v, ek))
    }
}

/// Parses a TPM2_PCR_Read response: the returned PCR indices (one bank) and
/// their digests, in order.
fn parse_pcr_read(rsp: &[u8]) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut at = 10 + 4; // header, pcrUpdateCounter
    let be32 = |b: &[u8], at: usize| b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
    let banks = be32(rsp, at)?;
    at += 4;
    let mut idx = vec![];
    for _ in 0..banks.min(16) {
        at += 2; // hash alg
        let n = usize::from(*rsp.get(at)?);
        at += 1;
        let map = rsp.get(at..at + n)?;
        at += n;
        for (i, byte) in map.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    idx.push((i * 8 + bit) as u8);
                }
            }
        }
    }
    let count = be32(rsp, at)? as usize;
    at += 4;
    let mut digests = Vec::with_capacity(count.min(24));
    for _ in 0..count.min(24) {
        let n = usize::from(u16::from_be_bytes(rsp.get(at..at + 2)?.try_into().ok()?));
        at += 2;
        digests.push(rsp.get(at..at + n)?.to_vec());
        at += n;
    }
    Some((idx, digests))
}
