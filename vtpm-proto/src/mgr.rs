//! The manager protocol: what a vTPM and an administrator say to vtpmmgr.
//!
//! Framing: a big-endian `u32` length, then that many bytes of JSON. The
//! length is checked against [`MAX_FRAME`] before anything is allocated.
//! JSON keeps the protocol inspectable (`socat` + `jq`); the only secret that
//! crosses it is a vTPM's state key, carried as [`SecretBytes`], whose
//! `Debug` is redacted and whose memory is zeroed on drop.
//!
//! ```text
//! vtpm-domain                      vtpmmgr
//!    │ connect <run>/vtpm/<uuid>.sock  │  identity = the socket + SO_PEERCRED pid
//!    │── Hello{uuid} ─────────────────▶│  uuid must equal the socket's uuid
//!    │◀─ StateKey{key} / Error ────────│  pid must be the one xl-vtpm attached
//!    │── IssueEkCert{uuid, ek, tpm} ──▶│  same checks; the manager's group CA (a key in the
//!    │◀─ EkCert{cert} / Error ─────────│  physical TPM) signs an X.509 EK certificate
//! xl-vtpm (root)
//!    │ connect <run>/admin.sock (0600)  │  peer uid must be root or the manager's
//!    │── Admin(..) ───────────────────▶│
//!    │◀─ AdminReply(..) ───────────────│
//! ```

use serde::{Deserialize, Serialize};
use uuid::Uuid;
#[cfg(test)]
use zeroize::Zeroizing;

/// Largest frame either side accepts. Deep-quote evidence bundles are the
/// biggest messages (a few KiB); 1 MiB leaves room for listings of many
/// thousands of vTPMs while bounding what a peer can make us allocate.
pub const MAX_FRAME: usize = 1 << 20;

/// Most bytes of vTPM records one [`AdminReply::VtpmPage`] carries (half a frame, so the page
/// and its envelope always fit).
pub const LIST_PAGE_BYTES: usize = MAX_FRAME / 2;

/// Protocol version carried in [`VtpmRequest::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The group of every sandboxed vTPM process. The manager's per-vTPM sockets are
/// `root:VTPM_GID` mode 0660, so vTPMs that dropped root can still connect (the manager then
/// checks the peer's pid); no other unprivileged uid can.
pub const VTPM_GID: u32 = 0x7A00_0000;
/// The first uid `xl-vtpm` gives a vTPM (one per identity, recorded as the owner of its state
/// directory). The range lies in the block systemd leaves unused (0x70000000–0x7FFDFFFF).
pub const VTPM_UID_FIRST: u32 = VTPM_GID + 1;
/// The number of vTPM uids.
pub const VTPM_UID_COUNT: u32 = 0x0010_0000 - 1;

/// Error while framing or parsing a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Checks a 4-byte length prefix and returns the payload length.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    Ok(n)
}

/// Serialises `msg` into a length-prefixed frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses a frame payload (the bytes after the length prefix).
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(payload)?)
}

pub use crate::secret::SecretBytes;

/// Machine-readable error class, so clients can map errors to exit codes
/// without parsing prose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The manager has not been provisioned yet.
    NotProvisioned,
    /// The manager is provisioned already (provision without `force`).
    AlreadyProvisioned,
    /// No such vTPM or group.
    NotFound,
    /// The caller is not entitled to this (wrong peer, forged UUID, not root).
    Refused,
    /// No process has been attached to this vTPM yet; retry shortly.
    NotAttached,
    /// The request is malformed or names a bad value.
    BadRequest,
    /// The object exists already.
    Exists,
    /// The manager is overloaded; retry.
    Busy,
    /// The physical TPM failed.
    Tpm,
    /// Anything else.
    Internal,
    /// A vTPM presented a state older than (or different from) the newest one the manager
    /// anchored for it: a restored copy. Accept it only with `xl-vtpm vtpm accept-state`.
    StaleState,
}

/// Which state of a vTPM's transfer a refusal reports, for a client that carries a move on from
/// where it stopped (`xl-vtpm migrate … --finish`) instead of reading the prose. A finer class
/// than [`ErrorCode`], present only on these refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// The vTPM is being exported: it runs nowhere until the transfer is committed or aborted.
    Exporting,
    /// The vTPM is not being transferred from here: no export was made (or it ended).
    NotExported,
    /// This copy of the vTPM was transferred to another host and is retired here.
    Retired,
    /// This package was imported here already; its receipt can be asked for again.
    AlreadyImported,
    /// The offer answers a challenge older than its lifetime: a new challenge is needed.
    ChallengeExpired,
}

/// An error answer: a class and a sentence that names the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Error class.
    pub code: ErrorCode,
    /// Human-readable explanation naming the field and the fix.
    pub message: String,
    /// The transfer state a refusal reports, if it is one of [`Refusal`]'s (absent on the wire
    /// otherwise; a value this release does not know reads as absent).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "known_refusal")]
    pub refusal: Option<Refusal>,
}

/// A refusal class from a newer peer is no reason to drop its answer: it reads as none.
fn known_refusal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Refusal>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| serde_json::from_value(v).ok()))
}

impl Failure {
    /// Builds a failure.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure { code, message: message.into(), refusal: None }
    }

    /// A refusal of class `code` that reports transfer state `why`.
    pub fn transfer(code: ErrorCode, why: Refusal, message: impl Into<String>) -> Self {
        Failure { code, message: message.into(), refusal: Some(why) }
    }
}

/// What a vTPM process may ask on its own per-vTPM socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum VtpmRequest {
    /// Asks for the state key. `uuid` is the vTPM the caller believes it is;
    /// the manager refuses if it differs from the socket's own vTPM.
    GetStateKey {
        /// Protocol version ([`PROTOCOL_VERSION`]).
        version: u32,
        /// The UUID the caller expects to be.
        uuid: Uuid,
    },
    /// Asks for a deep quote. The manager puts the vTPM's UUID and group
    /// into the leaf from its own records; only the vTPM's own readings
    /// (vPCR values) and the guest's nonce and choices come from the caller.
    DeepQuote {
        /// The UUID the caller expects to be (checked like `GetStateKey`).
        uuid: Uuid,
        /// Guest nonce (≤ 64 bytes), hex.
        nonce: String,
        /// vPCR bank (TPM_ALG_ID).
        vpcr_alg: u16,
        /// vPCR indices.
        vpcrs: Vec<u8>,
        /// vPCR values read by the vTPM, hex, in `vpcrs` order.
        vpcr_values: Vec<String>,
        /// Host PCR indices (SHA-256 bank) to quote.
        host_pcrs: Vec<u8>,
        /// Flags bound into the leaf.
        flags: u32,
    },
    /// Asks for an X.509 certificate of the vTPM's endorsement key, issued by the EK CA of the
    /// vTPM's group ([`crate::ekcert`]). Authorised like `GetStateKey`: the manager certifies an
    /// EK only for the vTPM whose socket (or Xen link) it arrived on, and only one EK per vTPM
    /// identity (the first one it certified).
    IssueEkCert {
        /// The UUID the caller expects to be (checked like `GetStateKey`).
        uuid: Uuid,
        /// The EK's `TPM2B_PUBLIC`, hex; it must follow the TCG default template L-1 or L-2.
        ek_public: String,
        /// The vTPM's fixed TPM properties, for the certificate's TCG attributes.
        tpm: TpmInfo,
    },
    /// Anchors a state generation of this vTPM in the manager's store (covered by the physical
    /// TPM's NV counter), so that an older state is refused when the vTPM starts. Sent once when
    /// the vTPM opens its state (`opening`), before it writes anything, and after every state
    /// write, before the vTPM answers the command that caused it. The manager answers
    /// [`VtpmReply::StateAnchored`] only once the anchor is durable; it refuses a generation
    /// below its anchor, or equal to it with another digest, with [`ErrorCode::StaleState`].
    /// Authorised like `GetStateKey`.
    AnchorState {
        /// The UUID the caller expects to be (checked like `GetStateKey`).
        uuid: Uuid,
        /// The state's generation, read from the authenticated header of the sealed state.
        generation: u64,
        /// [`crate::sealed::anchor_digest`] of the state, hex (64 digits).
        digest: String,
        /// True when the vTPM is opening its state (start), false after a write.
        #[serde(default)]
        opening: bool,
    },
}

/// The manager's answer on a per-vTPM socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum VtpmReply {
    /// The 32-byte AES-256-GCM key for this vTPM's state.
    StateKey {
        /// The key.
        key: SecretBytes,
        /// The vTPM's group.
        group: Uuid,
    },
    /// A deep-quote evidence bundle (docs/deep-quote.md), hex.
    DeepQuote {
        /// The encoded bundle.
        bundle: String,
    },
    /// An EK certificate (X.509, DER), hex.
    EkCert {
        /// The certificate.
        cert: String,
    },
    /// The state generation is anchored durably (or was already).
    StateAnchored {
        /// The generation the manager's anchor now records.
        generation: u64,
        /// After an administrator accepted an older state: the vTPM's next write must use a
        /// generation above this one (the newest generation of the abandoned states), so that
        /// none of those can pass for a later write of the accepted state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        continue_after: Option<u64>,
    },
    /// Refused or failed.
    Error(Failure),
}

/// A group's EK CA: its self-signed certificate and the evidence that its key lives in the
/// physical TPM (the group AK's `TPM2_Certify` of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCaInfo {
    /// Group UUID.
    pub group: Uuid,
    /// Group name.
    pub name: String,
    /// The CA certificate (X.509, DER), hex.
    pub cert: String,
    /// The CA key certified by the group's AK.
    pub certify: CaCertify,
}

/// A group: a set of vTPMs sharing one attestation key in the physical TPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group UUID.
    pub uuid: Uuid,
    /// Admin-chosen name, unique.
    pub name: String,
    /// Attestation key algorithm ("ecc-p256" or "rsa-2048").
    pub ak_alg: String,
    /// The AK public area (TPM2B_PUBLIC), hex.
    pub ak_public: String,
    /// Number of vTPMs in the group.
    pub vtpms: usize,
}

/// A vTPM identity as the manager records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtpmInfo {
    /// vTPM UUID.
    pub uuid: Uuid,
    /// Group UUID.
    pub group: Uuid,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The process currently attached, if any.
    pub attached_pid: Option<u32>,
    /// The per-vTPM socket the process must use.
    pub socket: String,
}

/// Manager status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether the manager is provisioned and serving vTPMs.
    pub provisioned: bool,
    /// The TCTI of the physical TPM.
    pub tcti: String,
    /// Whether the physical TPM is a software TPM (insecure outside tests).
    pub software_tpm: bool,
    /// PCRs the master secret is sealed to.
    pub sealed_pcrs: Vec<u8>,
    /// Number of groups.
    pub groups: usize,
    /// Number of vTPMs.
    pub vtpms: usize,
    /// Manager version.
    pub version: String,
    /// Deep-quote requests answered since start.
    #[serde(default)]
    pub deep_quotes: u64,
    /// Physical TPM2_Quote operations since start.
    #[serde(default)]
    pub physical_quotes: u64,
    /// Whether deep-quote batching is on.
    #[serde(default)]
    pub batching: bool,
    /// The rollback counter covering the manager's store (once provisioned). Boxed to keep
    /// replies small.
    #[serde(default)]
    pub store_counter: Option<Box<StoreCounterInfo>>,
    /// The transfer protocol this manager speaks ([`crate::transfer::IMPORT_PROTOCOL`]; 0 from
    /// a manager that leaves the imported state file to the CLI).
    #[serde(default)]
    pub transfer_protocol: u32,
    /// The Xen domain the manager runs in when that is not dom0 (the manager domain): vTPM
    /// domains attach their manager link to `backend=<this>`. `None` in dom0 or without Xen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xen_domain: Option<u32>,
    /// Whether the manager serves vTPM domains over its Xen link (`vtpmmgr serve --xen`):
    /// without it a vTPM domain's manager link finds no backend. `false` from an older manager.
    #[serde(default)]
    pub xen_link: bool,
}

/// The monotonic counter in the physical TPM's NV that covers the manager's store: every
/// store write increments it and records the new value in the (authenticated) store, and the
/// manager refuses to start from a store whose value is not the counter's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounterInfo {
    /// The NV index handle (owner range, e.g. `0x01805600`).
    pub nv_index: u32,
    /// The value the store records (its last write).
    pub store_value: u64,
    /// The value read from the TPM just now; `None` if it could not be read (see the manager's
    /// log). It equals `store_value` unless something is wrong.
    pub tpm_value: Option<u64>,
    /// vTPM state-anchor requests (`AnchorState`) answered since the manager started.
    #[serde(default)]
    pub anchor_requests: u64,
    /// Store writes (counter increments) made for them since the manager started: group commit
    /// makes one write cover every anchor request queued while the previous write ran.
    #[serde(default)]
    pub anchor_commits: u64,
}

/// What an administrator may ask on the root-only admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum AdminRequest {
    /// Manager status.
    Status,
    /// Provisions the manager: storage key, default group AK, sealed master
    /// secret bound to `pcrs`.
    Provision {
        /// PCR indices (SHA-256 bank) the master secret is sealed to.
        pcrs: Vec<u8>,
    },
    /// Adds a group with its own attestation key.
    GroupAdd {
        /// Unique name.
        name: String,
    },
    /// Lists groups.
    GroupList,
    /// Deletes an empty group.
    GroupDel {
        /// Group UUID or name.
        group: String,
    },
    /// A group's EK CA certificate and its certification by the group AK (the CA is made on
    /// first use if the group has none yet).
    GroupCa {
        /// Group UUID or name.
        group: String,
    },
    /// Creates a vTPM identity.
    VtpmCreate {
        /// Group UUID or name; `None` = the default group.
        group: Option<String>,
        /// A chosen UUID (e.g. from an xl.cfg `vtpm=` line); `None` = random.
        uuid: Option<Uuid>,
    },
    /// Reserves a vTPM identity for a TPM 2.0 vTPM manufactured right after (`vtpm-domain
    /// --create`, attached like any vTPM process). The identity is held in the manager's
    /// memory only: it becomes durable when the vTPM's EK is certified (`IssueEkCert`), in the
    /// one store write that also records the EK, so a create increments the rollback counter
    /// once. Until then it serves that process alone (state key, EK certificate; no state
    /// anchor, transfer or listing), and a manager restart forgets it (the half-made vTPM then
    /// fails its creation, having written nothing). The reply is the identity as it will be.
    VtpmReserve {
        /// Group UUID or name; `None` = the default group.
        group: Option<String>,
        /// A chosen UUID; `None` = random.
        uuid: Option<Uuid>,
    },
    /// Lists vTPM identities in one reply (fails beyond what one frame holds, a few thousand;
    /// use [`AdminRequest::VtpmListPage`]).
    VtpmList,
    /// One page of the vTPM identities, in UUID order, after `after` (`None`: from the first).
    VtpmListPage {
        /// The `next` of the previous page.
        #[serde(default)]
        after: Option<Uuid>,
    },
    /// Shows one vTPM.
    VtpmShow {
        /// vTPM UUID.
        uuid: Uuid,
    },
    /// Deletes a vTPM identity; its state key is gone for good.
    VtpmDel {
        /// vTPM UUID.
        uuid: Uuid,
    },
    /// Binds the process `pid` to a vTPM: only that process gets its key.
    VtpmAttach {
        /// vTPM UUID.
        uuid: Uuid,
        /// Process id of the vtpm-domain serving it.
        pid: u32,
    },
    /// Binds the Xen domain `domid` to a vTPM: only a tpmif link whose
    /// frontend is that domain (as the toolstack recorded it in the manager's
    /// own backend directory, `backend/vtpm/<domid>/<devid>/{uuid,frontend-id}`)
    /// gets the vTPM's key. The Xen counterpart of [`AdminRequest::VtpmAttach`].
    VtpmAttachDomain {
        /// vTPM UUID.
        uuid: Uuid,
        /// Domain id of the vTPM domain serving it.
        domid: u32,
    },
    /// Unbinds the vTPM's process and its domain.
    VtpmDetach {
        /// vTPM UUID.
        uuid: Uuid,
    },
    /// Over the Xen admin link only (a manager in its own domain): `vtpmmgr bridge` in dom0
    /// attaches dom0's process `pid`, started at `start` (clock ticks since dom0's boot, read by
    /// the bridge in dom0), to a vTPM, as [`AdminRequest::VtpmAttach`] does for a process on
    /// the manager's own host. The bridge watches the process; the manager cannot.
    VtpmAttachRelayed {
        /// vTPM UUID.
        uuid: Uuid,
        /// dom0's process id.
        pid: u32,
        /// Its start time in dom0.
        start: u64,
    },
    /// Over the Xen admin link only: the relayed process `pid` (`start`) of the vTPM exited, as
    /// the bridge saw it; its attachment is dropped if it is still that process's.
    VtpmRelayedExited {
        /// vTPM UUID.
        uuid: Uuid,
        /// dom0's process id.
        pid: u32,
        /// Its start time in dom0.
        start: u64,
    },
    /// Over the Xen admin link only: a vTPM request from dom0's process `pid` (`start`), as the
    /// bridge's per-vTPM socket for `uuid` saw it (`SO_PEERCRED`); authorised exactly as a
    /// request on the manager's own per-vTPM socket. Answered with [`AdminReply::Relayed`].
    VtpmRelay {
        /// The vTPM whose socket the process connected to.
        uuid: Uuid,
        /// dom0's process id.
        pid: u32,
        /// Its start time in dom0.
        start: u64,
        /// The request.
        request: Box<VtpmRequest>,
    },
    /// Accepts the state the vTPM last presented and the manager refused as older than its
    /// anchor (`xl-vtpm vtpm accept-state UUID --yes`): the anchor is set to that state, and
    /// every change made after it is lost. The vTPM must be stopped.
    VtpmAcceptState {
        /// vTPM UUID.
        uuid: Uuid,
    },
    /// What a tenant needs to enroll this host: the physical TPM's EK certificate and every
    /// group's AK public area (docs/enrollment.md).
    Enrollment,
    /// `TPM2_ActivateCredential` in the physical TPM with the group's AK and the TPM's RSA-2048
    /// EK; answers the secret the credential carries ([`AdminReply::Activated`]). A tenant made
    /// the credential with `TPM2_MakeCredential` for the AK's name and the EK from the EK
    /// certificate: only a TPM holding both keys recovers the secret.
    ActivateCredential {
        /// Group UUID or name.
        group: String,
        /// Contents of `TPM2B_ID_OBJECT`, hex (at most 132 bytes).
        credential_blob: String,
        /// Contents of `TPM2B_ENCRYPTED_SECRET`, hex (at most 512 bytes).
        encrypted_secret: String,
    },
    /// Moving a vTPM to another manager (docs/migration.md): the source checks the
    /// destination's EK certificate (to `ek_roots`) and AK, and answers a
    /// [`crate::transfer::Challenge`] for it.
    TransferChallenge {
        /// The vTPM to move.
        uuid: Uuid,
        /// The destination TPM's EK certificate (DER), hex.
        ek_cert: String,
        /// Intermediates (DER), hex.
        #[serde(default)]
        ek_intermediates: Vec<String>,
        /// Trusted vendor roots (DER), hex.
        ek_roots: Vec<String>,
        /// The destination group's AK `TPMT_PUBLIC`, hex.
        ak_public: String,
        /// Host PCRs the destination must quote.
        pcrs: Vec<u8>,
    },
    /// Destination: activates the challenge's credential and offers a transfer key.
    TransferOffer {
        /// The group the vTPM will join (UUID or name; `None` = the default group).
        #[serde(default)]
        group: Option<String>,
        /// The source's challenge.
        challenge: Box<crate::transfer::Challenge>,
    },
    /// Source: every check `TransferExport` makes of the offer (the destination's EK chain,
    /// AK, transfer key and its certification, quote, host PCRs against `host_policy`,
    /// credential activation), nothing else: no mark, nothing sealed. A guest moving to another
    /// host is checked so before it leaves. Answered `Ok`.
    TransferVerify {
        /// The vTPM.
        uuid: Uuid,
        /// The destination's offer.
        offer: Box<crate::transfer::Offer>,
        /// Trusted vendor roots (DER), hex.
        ek_roots: Vec<String>,
        /// `(PCR index, SHA-256 value hex)` pairs the destination must have.
        host_policy: Vec<(u8, String)>,
    },
    /// Source: verifies the offer, marks the vTPM exporting (durably) and seals its identity
    /// and `state` to the offer's transfer key.
    TransferExport {
        /// The vTPM.
        uuid: Uuid,
        /// The destination's offer.
        offer: Box<crate::transfer::Offer>,
        /// Trusted vendor roots (DER), hex.
        ek_roots: Vec<String>,
        /// `(PCR index, SHA-256 value hex)` pairs the destination must have.
        host_policy: Vec<(u8, String)>,
        /// The vTPM's sealed state file, hex.
        state: String,
        /// A name for the destination, shown when the retired vTPM is started here.
        #[serde(default)]
        destination: String,
    },
    /// Destination: imports a package (its TPM decrypts the package key), writes the vTPM's
    /// sealed state file under its own state directory (durably) and only then answers.
    TransferImport {
        /// The package.
        package: Box<crate::transfer::Package>,
        /// The sender's [`crate::transfer::IMPORT_PROTOCOL`] (absent, 0, from an xl-vtpm that
        /// installed the state file itself: refused).
        #[serde(default)]
        protocol: u32,
    },
    /// Destination: the receipt of an imported vTPM again.
    TransferReceipt {
        /// The vTPM.
        uuid: Uuid,
    },
    /// Destination: withdraws an offer that was not imported (its key is forgotten); answers a
    /// cancellation receipt.
    TransferCancel {
        /// The offer.
        offer_id: Uuid,
    },
    /// Source: retires an exporting vTPM on the destination's import receipt.
    TransferCommit {
        /// The vTPM.
        uuid: Uuid,
        /// The destination's receipt.
        receipt: Box<crate::transfer::Receipt>,
    },
    /// Source: returns an exporting vTPM to service on the destination's cancellation receipt,
    /// or — the destination lost for good — on the administrator's declaration naming the lost
    /// destination's host id (docs/migration.md: only once its TPM can never open the package).
    TransferAbort {
        /// The vTPM.
        uuid: Uuid,
        /// The destination's cancellation receipt.
        #[serde(default)]
        receipt: Option<Box<crate::transfer::Receipt>>,
        /// Forced abort: the host id (SHA-256 of its EK certificate) of the destination the
        /// administrator declares lost; it must be the one the export was made for.
        #[serde(default)]
        lost_destination: Option<String>,
    },
}

/// Enrollment material of a host (`xl-vtpm mgr enrollment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentInfo {
    /// The host's id: SHA-256 of its EK certificate (DER), hex.
    pub host_id: String,
    /// The physical TPM's RSA-2048 EK certificate (DER), hex.
    pub ek_cert: String,
    /// The groups and their AKs.
    pub groups: Vec<GroupInfo>,
}

/// The manager's answer on the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum AdminReply {
    /// Status.
    Status(Box<StatusInfo>),
    /// One group.
    Group(GroupInfo),
    /// All groups.
    Groups {
        /// The groups.
        groups: Vec<GroupInfo>,
    },
    /// A group's EK CA.
    GroupCa(Box<GroupCaInfo>),
    /// One vTPM.
    Vtpm(VtpmInfo),
    /// All vTPMs.
    Vtpms {
        /// The vTPMs.
        vtpms: Vec<VtpmInfo>,
    },
    /// One page of vTPMs (at most [`LIST_PAGE_BYTES`] of records).
    VtpmPage {
        /// The vTPMs, in UUID order.
        vtpms: Vec<VtpmInfo>,
        /// Pass as `after` for the next page; `None` on the last page.
        next: Option<Uuid>,
    },
    /// Enrollment material.
    Enrollment(Box<EnrollmentInfo>),
    /// The secret `TPM2_ActivateCredential` released.
    Activated {
        /// The secret, hex (redacted in `Debug`).
        secret: SecretBytes,
    },
    /// A transfer challenge.
    TransferChallenge(Box<crate::transfer::Challenge>),
    /// A transfer offer.
    TransferOffer(Box<crate::transfer::Offer>),
    /// A sealed transfer package.
    TransferPackage(Box<crate::transfer::Package>),
    /// A package was imported and the vTPM's state file written durably: its receipt.
    TransferImported {
        /// The receipt for the source.
        receipt: Box<crate::transfer::Receipt>,
        /// Where the manager wrote the vTPM's sealed state file.
        state_file: String,
    },
    /// A receipt.
    TransferReceipt(Box<crate::transfer::Receipt>),
    /// The manager's answer to a relayed vTPM request ([`AdminRequest::VtpmRelay`]).
    Relayed {
        /// The reply for the vTPM process.
        reply: Box<VtpmReply>,
    },
    /// Done, nothing to report.
    Ok,
    /// Refused or failed.
    Error(Failure),
}


// ---------------------------------------------------------------------------------------------
// EK certificates: what a vTPM tells the manager about itself, and the evidence a group's EK CA
// carries (the certificates themselves are `crate::ekcert`)
// ---------------------------------------------------------------------------------------------

/// Format version of [`CaCertify`].
pub const CA_CERTIFY_VERSION: u32 = 1;

/// A [`TpmInfo`] field out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TPM properties: {0}")]
pub struct TpmInfoError(pub String);

/// What a vTPM reports about itself (its fixed TPM properties), for the EK certificate's TCG
/// attributes. The values describe the vTPM's TPM implementation; they are descriptive, not
/// an identity (the identity is the vTPM UUID the manager authenticated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmInfo {
    /// `TPM_PT_MANUFACTURER` (libtpms: `0x49424D00`, "IBM").
    pub manufacturer: u32,
    /// `TPM_PT_VENDOR_STRING_1..4`, trimmed (libtpms: "SW   TPM").
    pub model: String,
    /// `TPM_PT_FIRMWARE_VERSION_1`.
    pub firmware_version: u32,
    /// `TPM_PT_FAMILY_INDICATOR` ("2.0").
    pub family: String,
    /// `TPM_PT_LEVEL`.
    pub level: u32,
    /// `TPM_PT_REVISION` (e.g. 164 for 1.64).
    pub revision: u32,
}

impl TpmInfo {
    /// Bounds every field: model 1–16 printable ASCII characters, family 1–4 of `[0-9.]`,
    /// level and revision below 10000.
    pub fn validate(&self) -> Result<(), TpmInfoError> {
        let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
        if self.model.is_empty() || self.model.len() > 16 || !printable(&self.model) {
            return Err(TpmInfoError(format!("model {:?}: 1-16 printable ASCII characters", self.model)));
        }
        if self.family.is_empty() || self.family.len() > 4 || !self.family.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(TpmInfoError(format!("family {:?}: 1-4 characters of [0-9.]", self.family)));
        }
        if self.level >= 10_000 || self.revision >= 10_000 {
            return Err(TpmInfoError(format!("level {} / revision {} out of range", self.level, self.revision)));
        }
        Ok(())
    }

    /// `tcg-at-tpmManufacturer`: `id:` and eight upper-case hex digits.
    pub fn manufacturer_id(&self) -> String {
        format!("id:{:08X}", self.manufacturer)
    }

    /// `tcg-at-tpmVersion`: `id:` and eight upper-case hex digits.
    pub fn version_id(&self) -> String {
        format!("id:{:08X}", self.firmware_version)
    }
}


/// Evidence that a group's EK CA key lives in the physical TPM: `TPM2_Certify` of the CA key by
/// the group's AK, with `qualifyingData = SHA-256(CA certificate DER)`. Byte fields are hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaCertify {
    /// [`CA_CERTIFY_VERSION`].
    pub version: u32,
    /// The group.
    pub group: Uuid,
    /// The group AK's `TPMT_PUBLIC`.
    pub ak_public: String,
    /// The CA key's `TPMT_PUBLIC`.
    pub ca_public: String,
    /// `TPMS_ATTEST` of type `TPM_ST_ATTEST_CERTIFY`: exactly the bytes the AK signed.
    pub attest: String,
    /// `TPMT_SIGNATURE` by the AK over `attest`.
    pub signature: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let req = AdminRequest::VtpmCreate { group: Some("g".into()), uuid: None };
        let f = encode(&req).unwrap();
        let n = frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, f.len() - 4);
        let back: AdminRequest = decode(&f[4..]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn attach_domain_wire_form() {
        let uuid = Uuid::nil();
        let req = AdminRequest::VtpmAttachDomain { uuid, domid: 7 };
        let json = String::from_utf8(encode(&req).unwrap()[4..].to_vec()).unwrap();
        assert_eq!(json, r#"{"op":"vtpm-attach-domain","uuid":"00000000-0000-0000-0000-000000000000","domid":7}"#);
        assert_eq!(decode::<AdminRequest>(json.as_bytes()).unwrap(), req);
    }

    #[test]
    fn ek_cert_wire_form() {
        let tpm = TpmInfo {
            manufacturer: 0x4942_4D00,
            model: "SW   TPM".into(),
            firmware_version: 1,
            family: "2.0".into(),
            level: 0,
            revision: 164,
        };
        let req = VtpmRequest::IssueEkCert { uuid: Uuid::nil(), ek_public: "0001".into(), tpm };
        let json = String::from_utf8(encode(&req).unwrap()[4..].to_vec()).unwrap();
        assert!(json.starts_with(r#"{"op":"issue-ek-cert","uuid":"00000000-0000-0000-0000-000000000000","ek_public":"0001","tpm":{"manufacturer":1229081856,"#), "{json}");
        assert_eq!(decode::<VtpmRequest>(json.as_bytes()).unwrap(), req);
        let reply = VtpmReply::EkCert { cert: "3000".into() };
        let json = String::from_utf8(encode(&reply).unwrap()[4..].to_vec()).unwrap();
        assert_eq!(json, r#"{"result":"ek-cert","cert":"3000"}"#);
        let admin = AdminRequest::GroupCa { group: "default".into() };
        let json = String::from_utf8(encode(&admin).unwrap()[4..].to_vec()).unwrap();
        assert_eq!(json, r#"{"op":"group-ca","group":"default"}"#);
    }

    #[test]
    fn state_anchor_wire_form() {
        let req = VtpmRequest::AnchorState { uuid: Uuid::nil(), generation: 7, digest: "ab".repeat(32), opening: true };
        let json = String::from_utf8(encode(&req).unwrap()[4..].to_vec()).unwrap();
        assert!(json.starts_with(r#"{"op":"anchor-state","uuid":"00000000-0000-0000-0000-000000000000","generation":7,"digest":"abab"#), "{json}");
        assert_eq!(decode::<VtpmRequest>(json.as_bytes()).unwrap(), req);
        // `opening` defaults to false; `continue_after` is omitted while unset.
        let after = decode::<VtpmRequest>(br#"{"op":"anchor-state","uuid":"00000000-0000-0000-0000-000000000000","generation":8,"digest":""}"#).unwrap();
        assert!(matches!(after, VtpmRequest::AnchorState { opening: false, generation: 8, .. }));
        let reply = VtpmReply::StateAnchored { generation: 7, continue_after: None };
        assert_eq!(String::from_utf8(encode(&reply).unwrap()[4..].to_vec()).unwrap(), r#"{"result":"state-anchored","generation":7}"#);
        let f = VtpmReply::Error(Failure::new(ErrorCode::StaleState, "older"));
        assert!(String::from_utf8(encode(&f).unwrap()[4..].to_vec()).unwrap().contains(r#""code":"stale-state""#));
        let admin = AdminRequest::VtpmAcceptState { uuid: Uuid::nil() };
        assert_eq!(String::from_utf8(encode(&admin).unwrap()[4..].to_vec()).unwrap(), r#"{"op":"vtpm-accept-state","uuid":"00000000-0000-0000-0000-000000000000"}"#);
    }

    #[test]
    fn a_refusal_class_is_optional_on_the_wire() {
        // Without one the answer is what an older peer sends and reads.
        let plain = serde_json::to_value(Failure::new(ErrorCode::Refused, "no")).unwrap();
        assert_eq!(plain, serde_json::json!({"code": "refused", "message": "no"}));
        let f: Failure = serde_json::from_value(plain).unwrap();
        assert_eq!(f.refusal, None);
        let t = Failure::transfer(ErrorCode::Exists, Refusal::AlreadyImported, "again");
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["refusal"], "already-imported");
        assert_eq!(serde_json::from_value::<Failure>(v).unwrap(), t);
        // A class a newer peer knows and this release does not: the answer still reads.
        let newer: Failure = serde_json::from_value(serde_json::json!({"code": "refused", "message": "m", "refusal": "moved-to-the-moon"})).unwrap();
        assert_eq!((newer.code, newer.refusal), (ErrorCode::Refused, None));
    }

    #[test]
    fn oversized_prefix_is_refused_before_allocation() {
        assert!(matches!(frame_len([0xff; 4]), Err(FrameError::TooLarge(_))));
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()).is_err());
        assert!(frame_len((MAX_FRAME as u32).to_be_bytes()).is_ok());
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bad in [&b""[..], b"{", b"{\"op\":\"nope\"}", b"\xff\xfe", b"[]"] {
            assert!(decode::<AdminRequest>(bad).is_err());
            assert!(decode::<VtpmRequest>(bad).is_err());
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_hex_on_the_wire() {
        let r = VtpmReply::StateKey {
            key: SecretBytes(Zeroizing::new(vec![0xab; 4])),
            group: Uuid::nil(),
        };
        assert!(!format!("{r:?}").contains("ab"));
        let json = String::from_utf8(encode(&r).unwrap()[4..].to_vec()).unwrap();
        assert!(json.contains("abababab"));
        let back: VtpmReply = decode(json.as_bytes()).unwrap();
        assert_eq!(back, r);
    }
}
