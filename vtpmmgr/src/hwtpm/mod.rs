//! The manager's physical-TPM layer (tss-esapi 7.7.0).
//!
//! Everything the manager asks of the host TPM goes through [`HwTpm`]:
//!
//! * **SRK** – an ECC P-256 restricted decryption primary key under the Owner hierarchy, re-created
//!   deterministically with `TPM2_CreatePrimary` every time the TPM is opened (same template + same
//!   owner seed ⇒ same key), so no persistent NV handle is needed. The SRK's name is recorded at
//!   provisioning time; a different name at unseal time means "different TPM or owner cleared".
//! * **Master secret** – 32 random bytes sealed in a keyed-hash *sealed data* object under the SRK.
//!   The object has `userWithAuth` clear and `authPolicy = PolicyAuthorize(policyKeyName, policyRef)`:
//!   it can only be unsealed in a policy session that satisfied a policy *signed by the admin's
//!   policy key*. The approved policy is `PolicyPCR(sha256: selected PCRs, their values at
//!   provisioning)`. After a host upgrade the admin signs the new PCR values ([`HwTpm::reauthorize`])
//!   and the **same** sealed object becomes unsealable again.
//! * **Attestation key** – a restricted signing key (ECDSA P-256/SHA-256, or RSA-2048 RSASSA/SHA-256)
//!   under the SRK, kept as (public, private) blobs and loaded on demand.
//! * **EK CA key** – an unrestricted ECDSA P-256 signing key under the SRK (it signs X.509 digests)
//!   with an authorisation value derived from the master secret; `TPM2_Certify` by a group AK
//!   attests that it lives in this TPM ([`HwTpm::certify_ca`]).
//!
//! Parameter encryption: the sealed object's sensitive data is sent to the TPM in an HMAC session
//! salted with the SRK (`decrypt` attribute), and `TPM2_Unseal`'s response travels in a policy
//! session salted with the SRK (`encrypt` attribute), so the master secret never crosses the TPM bus
//! in the clear.
//!
//! Transient objects and sessions are flushed after every operation; only the SRK stays loaded for
//! the lifetime of a [`HwTpm`] (and is flushed on drop). Without a resource manager (swtpm, or
//! `/dev/tpm0`) a TPM typically has only 3 transient object slots, and unseal needs exactly 3
//! (SRK + policy public key, then SRK + sealed object), so leaks would show up quickly.
//!
//! Nothing here logs key material or secrets; `Debug` of secret-holding types is redacted.
//!
//! Layout: this file holds [`HwTpm`] (opening the TPM, the SRK, sessions, PCRs, random bytes),
//! the errors and the secret wrapper; one submodule per seam does the rest: `records` (the JSON
//! records), `policy` (policy digests and the admin's policy key), `seal` (provisioning and
//! unsealing the master secret), `ak` (attestation keys and quotes), `ca` (the EK CA key) and
//! `counter` (the store's NV rollback counter).

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use tss_esapi::{
    Context, TctiNameConf,
    attributes::{ObjectAttributesBuilder, SessionAttributesBuilder},
    constants::{CapabilityType, PropertyTag, SessionType},
    handles::{KeyHandle, NvIndexHandle, ObjectHandle, PcrHandle, SessionHandle, TpmHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        resource_handles::Hierarchy,
        session_handles::AuthSession,
    },
    structures::{
        CapabilityData, Digest, DigestValues, EccPoint, PcrSelectSize, PcrSelectionList,
        PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
        PublicEccParametersBuilder, SymmetricDefinition, SymmetricDefinitionObject,
    },
    traits::UnMarshall,
};
use zeroize::{Zeroize, Zeroizing};

mod ak;
mod ca;
mod counter;
mod policy;
mod records;
mod seal;

pub use ca::CaKeyRecord;
pub use counter::{CounterProbe, STORE_COUNTER_FIRST, STORE_COUNTER_SLOTS};
pub use policy::{marshal_pcr_selection, policy_authorize_digest, policy_pcr_digest, sha256_name};
pub use records::{AkAlg, AkRecord, PcrPolicySpec, ProvisionRecord, QuoteOut};

/// Record format version written by this code.
pub const RECORD_VERSION: u32 = 1;
/// Identifies the SRK template below; stored in records for diagnostics.
pub const SRK_TEMPLATE_ID: &str = "owner/ecc-p256/aes128cfb/noDA/v1";
/// Default policy reference (bound into the sealed object's authPolicy).
pub const DEFAULT_POLICY_REF: &[u8] = b"xvtpm-manager-master-v1";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// For a TCTI I/O error (response code `0x…000a`: the connection to the TPM failed or broke),
/// what that means; tss2 itself says only "response code not recognized".
fn io_hint(e: &tss_esapi::Error) -> &'static str {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if let Some(hex) = text.strip_prefix("Response code value: 0x")
            && u32::from_str_radix(hex.trim(), 16).is_ok_and(|rc| rc & 0xffff == 0x000a)
        {
            return " (an I/O error talking to the TPM: what answers at that address is not a TPM, or it closed the connection)";
        }
        cause = c.source();
    }
    ""
}

#[derive(Debug, thiserror::Error)]
pub enum HwTpmError {
    /// The TCTI cannot reach the TPM (checked before tss2 loads it): `reason` names the
    /// cause and the fix ([`crate::tcti::precheck`]).
    #[error("{reason}")]
    TctiUnusable { tcti: String, reason: String },
    #[error("tss2 cannot open the TCTI {tcti:?}: {source}{}", io_hint(.source))]
    Tcti {
        tcti: String,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM operation {op} failed: {source}{}", io_hint(.source))]
    Tpm {
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    /// The PCR policy is not satisfied: the selected PCRs differ from the values the admin approved.
    #[error(
        "sealed master secret: PCR policy not satisfied (sha256 PCRs {pcrs:?}; changed: {changed:?}); \
         if this is an intended upgrade, re-authorize the current PCR values with the admin policy key ({detail})"
    )]
    PolicyMismatch {
        pcrs: Vec<u8>,
        changed: Vec<u8>,
        detail: String,
    },
    /// The TPM rejected the admin's signature over the approved policy.
    #[error("policy signature rejected by the TPM: {0}")]
    PolicySignature(#[source] tss_esapi::Error),
    /// The SRK re-created now differs from the one used at provisioning.
    #[error(
        "storage root key differs from the one used at provisioning (different TPM, or TPM owner cleared)"
    )]
    SrkMismatch,
    #[error("invalid policy signing key: {0}")]
    PolicyKey(String),
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unexpected TPM response: {0}")]
    Unexpected(String),
    /// A record field does not parse: which one, and why.
    #[error("invalid record: {what}: {source}")]
    Record {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The policy signing key could not be used: for what, and why.
    #[error("invalid policy signing key: {what}: {source}")]
    PolicyKeyUse {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The TPM (or a check of what it returned) answered what it should not: where, and why.
    #[error("unexpected TPM response: {what}: {source}")]
    UnexpectedAt {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl HwTpmError {
    fn tpm(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> HwTpmError {
        move |source| HwTpmError::Tpm { op, source }
    }

    /// The record field `what` does not parse.
    pub(crate) fn record<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> HwTpmError {
        let what = what.into();
        move |e| HwTpmError::Record { what, source: Box::new(e) }
    }

    /// The TPM's answer at `what` is not what it should be.
    pub(crate) fn unexpected<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> HwTpmError {
        let what = what.into();
        move |e| HwTpmError::UnexpectedAt { what, source: Box::new(e) }
    }

    /// The policy signing key failed at `what`.
    fn policy_key<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> HwTpmError {
        move |e| HwTpmError::PolicyKeyUse { what, source: Box::new(e) }
    }
}

type Result<T> = std::result::Result<T, HwTpmError>;

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Secret bytes: zeroized on drop, redacted in `Debug`. Derefs to the inner value.
pub struct Secret<T: Zeroize>(Zeroizing<T>);

impl<T: Zeroize> Secret<T> {
    pub fn new(v: T) -> Self {
        Secret(Zeroizing::new(v))
    }
    pub fn into_inner(self) -> Zeroizing<T> {
        self.0
    }
}
impl<T: Zeroize> std::ops::Deref for Secret<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// The manager's 32-byte master secret.
pub type MasterSecret = Secret<[u8; 32]>;
/// The admin's policy-signing private key as PKCS#8 DER (write it to a root-only file).
pub type PolicySigningKey = Secret<Vec<u8>>;

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

fn normalize_pcrs(pcrs: &[u8]) -> Result<Vec<u8>> {
    let mut v = pcrs.to_vec();
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err(HwTpmError::InvalidArgument("empty PCR selection".into()));
    }
    if let Some(bad) = v.iter().find(|&&p| p > 23) {
        return Err(HwTpmError::InvalidArgument(format!(
            "PCR index {bad} out of range 0..=23"
        )));
    }
    Ok(v)
}

fn left_pad32(b: &[u8]) -> Result<[u8; 32]> {
    if b.len() > 32 {
        return Err(HwTpmError::Unexpected(
            "ECC parameter longer than 32 bytes".into(),
        ));
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Ok(out)
}

/// Attributes shared by the keys the manager creates (SRK, AKs, EK CA keys): made in this TPM
/// and never leaving it (fixedTPM, fixedParent, sensitiveDataOrigin), used with their
/// authorisation value (userWithAuth), exempt from dictionary-attack lockout (noDA).
fn made_here_attrs() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
}

fn srk_template() -> Result<Public> {
    let attrs = made_here_attrs()
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(HwTpmError::tpm("SRK attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(HwTpmError::tpm("SRK parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(HwTpmError::tpm("SRK template"))
}

fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << p).map_err(HwTpmError::tpm("PCR slot")))
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_size_of_select(PcrSelectSize::ThreeOctets)
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(HwTpmError::tpm("PCR selection"))
}

// ---------------------------------------------------------------------------------------------
// HwTpm
// ---------------------------------------------------------------------------------------------

/// A connection to the (physical) TPM with the manager's SRK loaded.
pub struct HwTpm {
    ctx: Context,
    srk: KeyHandle,
    srk_name: Vec<u8>,
    tcti: String,
    /// The store counter's ESYS handle and salted HMAC session, kept open between store writes
    /// ([`HwTpm::counter_bump`]).
    counter_link: Option<CounterLink>,
    /// The AK of the last quote, left loaded so that a deep-quote round is one TPM command
    /// (`TPM2_Quote`) instead of `Load`, `Quote`, `FlushContext`. It holds one transient slot;
    /// every other operation that loads or creates an object releases it first
    /// ([`HwTpm::release_kept_ak`]).
    kept_ak: Option<KeptAk>,
    /// Host PCR values of recent quotes, by normalised selection (most recent last, at most
    /// [`PCR_CACHE_ENTRIES`]). Used only when their SHA-256 equals the digest the TPM just
    /// signed, so a quote needs no `TPM2_PCR_Read` while the PCRs stay unchanged.
    pcr_cache: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
}

/// How many host-PCR selections [`HwTpm::quote`] remembers values for.
const PCR_CACHE_ENTRIES: usize = 16;

/// A loaded AK: which record (name and private blob) and its ESYS handle.
struct KeptAk {
    name: Vec<u8>,
    private: Vec<u8>,
    handle: KeyHandle,
}

/// An open link to the store counter: its ESYS handle (authorisation value set) and one
/// SRK-salted HMAC session (continueSession). Reusing them makes a store write's counter
/// increment one TPM command instead of five (`NV_ReadPublic` for the handle,
/// `StartAuthSession` with its ECDH salt, `NV_Increment`, `NV_Read`, `FlushContext`).
struct CounterLink {
    handle: u32,
    auth: Zeroizing<Vec<u8>>,
    nv: NvIndexHandle,
    sess: AuthSession,
}

impl fmt::Debug for HwTpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HwTpm")
            .field("tcti", &self.tcti)
            .field("srk_name", &hex::encode(&self.srk_name))
            .finish_non_exhaustive()
    }
}

impl Drop for HwTpm {
    fn drop(&mut self) {
        // Context's own Drop would flush it too, but be explicit: without a resource manager a
        // leaked SRK costs one of the (typically 3) transient slots until TPM reset.
        self.drop_counter_link();
        self.release_kept_ak();
        let _ = self.ctx.flush_context(self.srk.into());
    }
}

/// Flushes every transient object (0x80xxxxxx), loaded session (0x02…) and saved session
/// (0x03…) the TPM holds. Returns how many.
fn flush_all(ctx: &mut Context) -> Result<usize> {
    let mut n = 0;
    for (first, want) in [(0x8000_0000u32, &[0x80u8][..]), (0x0200_0000, &[0x02, 0x03]), (0x0300_0000, &[0x02, 0x03])] {
        let (data, _) = ctx
            .execute_without_session(|ctx| ctx.get_capability(CapabilityType::Handles, first, 64))
            .map_err(HwTpmError::tpm("GetCapability(handles)"))?;
        let CapabilityData::Handles(list) = data else {
            return Err(HwTpmError::Unexpected("GetCapability(handles) returned other data".into()));
        };
        for h in list.into_inner().into_iter().map(u32::from) {
            if !want.contains(&((h >> 24) as u8)) {
                continue;
            }
            let th = TpmHandle::try_from(h).map_err(HwTpmError::unexpected(format!("handle {h:#010x}")))?;
            let tr = ctx.tr_from_tpm_public(th).map_err(HwTpmError::tpm("TR_FromTPMPublic(leftover handle)"))?;
            ctx.flush_context(tr).map_err(HwTpmError::tpm("FlushContext(leftover handle)"))?;
            n += 1;
        }
    }
    Ok(n)
}

impl HwTpm {
    /// Connects via `tcti` (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=N`, …) and
    /// re-creates the SRK.
    pub fn open(tcti: &str) -> Result<Self> {
        Self::open_inner(tcti, false).map(|(hw, _)| hw)
    }

    /// Whether `tcti` reaches the TPM through a resource manager (`/dev/tpmrm*`, tpm2-abrmd),
    /// which gives each connection its own transient objects and sessions and flushes them
    /// when the connection closes.
    pub fn has_resource_manager(tcti: &str) -> bool {
        tcti.contains("tpmrm") || tcti.starts_with("tabrmd")
    }

    /// [`open`](Self::open) for the manager, which owns the TPM: without a resource manager
    /// (swtpm, `/dev/tpm0`) the transient objects and sessions a killed manager left behind
    /// stay loaded until the TPM resets and fill its few slots, so every transient object and
    /// every loaded or saved session is flushed first. Only the manager's instance lock
    /// (`crate::instance`) makes this safe. Returns how many handles were flushed.
    pub fn open_owned(tcti: &str) -> Result<(Self, usize)> {
        Self::open_inner(tcti, !Self::has_resource_manager(tcti))
    }

    fn open_inner(tcti: &str, flush_leftovers: bool) -> Result<(Self, usize)> {
        crate::tcti::precheck(tcti).map_err(|reason| HwTpmError::TctiUnusable { tcti: tcti.to_string(), reason })?;
        let conf = TctiNameConf::from_str(tcti).map_err(|source| HwTpmError::Tcti {
            tcti: tcti.to_string(),
            source,
        })?;
        let mut ctx = Context::new(conf).map_err(|source| HwTpmError::Tcti {
            tcti: tcti.to_string(),
            source,
        })?;
        let flushed = if flush_leftovers { flush_all(&mut ctx)? } else { 0 };
        let t = Instant::now();
        let srk = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
                    .map_err(HwTpmError::tpm("CreatePrimary(SRK)"))
            })?
            .key_handle;
        let srk_name = match ctx.tr_get_name(srk.into()) {
            Ok(n) => n.value().to_vec(),
            Err(e) => {
                let _ = ctx.flush_context(srk.into());
                return Err(HwTpmError::Tpm {
                    op: "TR_GetName(SRK)",
                    source: e,
                });
            }
        };
        xvtpm_log::host_debug!(elapsed_ms = t.elapsed().as_millis() as u64, "SRK created");
        Ok((
            HwTpm {
                ctx,
                srk,
                srk_name,
                tcti: tcti.to_string(),
                counter_link: None,
                kept_ak: None,
                pcr_cache: Vec::new(),
            },
            flushed,
        ))
    }

    /// TCTI string this connection was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Name of the SRK (0x000b ‖ SHA-256(TPMT_PUBLIC)).
    pub fn srk_name(&self) -> &[u8] {
        &self.srk_name
    }

    /// The ESAPI context and the loaded SRK, for the manager's other TPM modules
    /// (`crate::akprov`); they must flush whatever they load.
    pub(crate) fn context_and_srk(&mut self) -> (&mut Context, KeyHandle) {
        self.release_kept_ak();
        (&mut self.ctx, self.srk)
    }

    /// Is this a software TPM? True if the vendor strings contain "SW" (swtpm/libtpms report
    /// "SW   TPM", the Microsoft simulator "Microsoft" + "SW"…). The daemon should log
    /// "INSECURE: software TPM" when this is true.
    pub fn is_software_tpm(&mut self) -> bool {
        match tss_esapi::utils::get_tpm_vendor(&mut self.ctx) {
            Ok(v) => v.contains("SW") || v.contains("Simulator") || v.contains("SIMULATOR"),
            Err(_) => false,
        }
    }

    /// TPM manufacturer id (e.g. "IBM", "INTC", "STM ") as a 4-character string.
    pub fn manufacturer(&mut self) -> Result<String> {
        let v = self
            .ctx
            .get_tpm_property(PropertyTag::Manufacturer)
            .map_err(HwTpmError::tpm("GetCapability(manufacturer)"))?
            .unwrap_or(0);
        Ok(v.to_be_bytes().iter().map(|&b| b as char).collect())
    }

    /// `n` bytes from the TPM RNG (several commands if n > 32 / the TPM's per-call limit).
    pub fn get_random(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let want = (n - out.len()).min(32);
            let d = self
                .ctx
                .execute_without_session(|ctx| ctx.get_random(want))
                .map_err(HwTpmError::tpm("GetRandom"))?;
            if d.value().is_empty() {
                return Err(HwTpmError::Unexpected("GetRandom returned no bytes".into()));
            }
            out.extend_from_slice(d.value());
        }
        out.truncate(n);
        Ok(out)
    }

    /// Reads sha256 PCR values, returned in ascending PCR order of the normalised selection.
    /// Several `TPM2_PCR_Read` calls are issued when more than 8 PCRs are selected.
    pub fn pcr_read(&mut self, pcrs: &[u8]) -> Result<Vec<Vec<u8>>> {
        let pcrs = normalize_pcrs(pcrs)?;
        let mut out = Vec::with_capacity(pcrs.len());
        for chunk in pcrs.chunks(8) {
            let sel = pcr_selection(chunk)?;
            let (_, read_sel, digests) = self
                .ctx
                .execute_without_session(|ctx| ctx.pcr_read(sel.clone()))
                .map_err(HwTpmError::tpm("PCR_Read"))?;
            if read_sel != sel || digests.value().len() != chunk.len() {
                return Err(HwTpmError::Unexpected(format!(
                    "PCR_Read returned {} values for {} selected sha256 PCRs (bank not allocated?)",
                    digests.value().len(),
                    chunk.len()
                )));
            }
            out.extend(digests.value().iter().map(|d| d.value().to_vec()));
        }
        Ok(out)
    }

    /// `TPM2_PCR_Extend` of one sha256 PCR with a 32-byte digest (tests, measured events).
    pub fn pcr_extend(&mut self, pcr: u8, digest: &[u8; 32]) -> Result<()> {
        // ESYS_TR_PCRn == n.
        let handle = PcrHandle::try_from(u32::from(pcr))
            .ok()
            .filter(|_| pcr <= 23)
            .ok_or_else(|| HwTpmError::InvalidArgument(format!("PCR {pcr}")))?;
        let mut vals = DigestValues::new();
        vals.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(HwTpmError::tpm("digest"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(handle, vals)
            })
            .map_err(HwTpmError::tpm("PCR_Extend"))
    }

    /// Starts an SRK-salted session (AES-128-CFB parameter encryption, SHA-256).
    pub(crate) fn start_salted_session(&mut self, ty: SessionType) -> Result<AuthSession> {
        self.ctx
            .start_auth_session(
                Some(self.srk),
                None,
                None,
                ty,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(HwTpmError::tpm("StartAuthSession"))?
            .ok_or_else(|| HwTpmError::Unexpected("StartAuthSession returned no handle".into()))
    }

    pub(crate) fn flush_session(&mut self, s: AuthSession) {
        if let Err(e) = self.ctx.flush_context(SessionHandle::from(s).into()) {
            xvtpm_log::guest_warn!(error = %e, "failed to flush session");
        }
    }

    /// Flushes the AK that [`HwTpm::quote`] kept loaded, if any: called before anything else
    /// loads or creates an object, so the kept AK never takes a slot another operation needs.
    pub(crate) fn release_kept_ak(&mut self) {
        if let Some(k) = self.kept_ak.take() {
            self.flush_object(k.handle.into());
        }
    }

    pub(crate) fn flush_object(&mut self, h: ObjectHandle) {
        if let Err(e) = self.ctx.flush_context(h) {
            xvtpm_log::guest_warn!(error = %e, "failed to flush transient object");
        }
    }

    /// Loads a key blob created under the SRK (`what` names it in errors), after checking that
    /// the recorded name is the name of the recorded public area.
    pub(crate) fn load_under_srk(
        &mut self,
        what: &str,
        op: &'static str,
        public: &[u8],
        private: &[u8],
        name: &[u8],
    ) -> Result<KeyHandle> {
        self.release_kept_ak();
        let public_area = Public::unmarshall(public)
            .map_err(HwTpmError::record(format!("{what} public")))?;
        let private = Private::try_from(private.to_vec())
            .map_err(HwTpmError::record(format!("{what} private")))?;
        if sha256_name(public) != name {
            return Err(HwTpmError::InvalidRecord(format!(
                "{what} name does not match its public area"
            )));
        }
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(self.srk, private, public_area)
            })
            .map_err(HwTpmError::tpm(op))
    }

    /// An HMAC session salted with the SRK that stays open until flushed: the CA key's
    /// authorisation is proven by HMAC, never sent in the clear.
    pub(crate) fn hmac_session(&mut self) -> Result<AuthSession> {
        let sess = self.start_salted_session(SessionType::Hmac)?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(sess, attrs, mask) {
            self.flush_session(sess);
            return Err(HwTpmError::Tpm { op: "TRSess_SetAttributes", source: e });
        }
        Ok(sess)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_unexpected_errors_keep_their_cause_and_name_it_once() {
        use std::error::Error as _;
        let e = tss_esapi::structures::Public::unmarshall(&[1, 2, 3]).map_err(HwTpmError::record("AK public")).unwrap_err();
        let cause = e.source().expect("the parse error is kept as the source").to_string();
        assert_eq!(e.to_string(), format!("invalid record: AK public: {cause}"));
        // The printed line: the message, then only causes it does not already quote (tss2's own
        // detail below its text), each once.
        let line = xvtpm_log::report(&e);
        assert!(line.starts_with(&e.to_string()), "{line}");
        assert_eq!(line.matches(&cause).count(), 1, "the cause once: {line}");
        let e = HwTpmError::unexpected("self-verify")(std::io::Error::other("bad signature"));
        assert_eq!(xvtpm_log::report(&e), "unexpected TPM response: self-verify: bad signature");
    }

    #[test]
    fn selection_marshalling() {
        assert_eq!(
            marshal_pcr_selection(&[0, 2, 4, 7, 23]),
            vec![0, 0, 0, 1, 0, 0x0b, 3, 0x95, 0, 0x80]
        );
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_pcrs(&[7, 0, 7, 2]).unwrap(), vec![0, 2, 7]);
        assert!(normalize_pcrs(&[]).is_err());
        assert!(normalize_pcrs(&[24]).is_err());
    }

    #[test]
    fn secret_debug_redacts() {
        let s = Secret::new([0x41u8; 32]);
        let d = format!("{s:?}");
        assert!(!d.contains("65") && !d.contains("41"), "{d}");
    }

    #[test]
    fn record_json_roundtrip() {
        let r = AkRecord {
            version: 1,
            alg: AkAlg::EccP256,
            public: vec![1, 2],
            private: vec![0xff],
            name: vec![],
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"ecc-p256\"") && j.contains("\"0102\""), "{j}");
        assert_eq!(serde_json::from_str::<AkRecord>(&j).unwrap(), r);
    }
}
