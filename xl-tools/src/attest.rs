//! The tenant's chain of trust: `xl-vtpm mgr enrollment` (provider side), `xl-vtpm enroll`
//! and `xl-vtpm verify` (tenant side). See docs/enrollment.md and docs/deep-quote.md.
//!
//! Enrollment pins a group's AK in the tenant's trust store only after
//!
//! 1. the host's EK certificate chains to a TPM vendor root the tenant supplies (`--ek-ca`);
//! 2. the AK public area has the attributes of a TPM-made, non-exportable, restricted signing
//!    key;
//! 3. credential activation succeeded: the tenant encrypted a fresh random secret to (the
//!    certified EK, the AK's name) and the host's TPM gave it back, which only the TPM that holds
//!    both the EK and a loaded key of that name can do.
//!
//! `verify` then accepts evidence only under a pinned AK.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vtpm_attest::credential::{self, CredError};
use vtpm_proto::ekcert::Certificate;
use vtpm_proto::evidence::Bundle;
use vtpm_proto::mgr::{AdminReply, AdminRequest, EnrollmentInfo, GroupInfo};

use crate::admin::Admin;
use crate::exit::{Cause, CliError, FAILURE, HOST_UNCHECKED, USAGE};
use crate::guest::{self, NOT_VERIFIED};

/// Format tag of enrollment material files.
pub const MATERIAL_FORMAT: &str = "xvtpm-enrollment-v1";
/// Format tag of pinned-AK files in a trust store.
pub const PINNED_FORMAT: &str = "xvtpm-pinned-ak-v1";
/// Largest enrollment material, trust-store entry or certificate file read.
const MAX_FILE: u64 = 256 * 1024;
/// Largest enrollment material [`enroll_material`] takes.
pub const MAX_MATERIAL: u64 = MAX_FILE;
/// Most groups in one enrollment material, and most pinned AKs loaded from a trust store.
const MAX_ENTRIES: usize = 4096;
/// Most `--ek-ca` / intermediate certificates.
const MAX_CERTS: usize = 16;

/// Enrollment material a provider hands to tenants (`xl-vtpm mgr enrollment --out FILE`).
/// Nothing in it is trusted by the tenant: the EK certificate is checked against the tenant's
/// vendor roots and every AK by credential activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Material {
    /// [`MATERIAL_FORMAT`].
    pub format: String,
    /// SHA-256 of the EK certificate (DER), hex: the host's id.
    pub host_id: String,
    /// The physical TPM's RSA-2048 EK certificate (DER), hex.
    pub ek_cert: String,
    /// Intermediate CA certificates between the EK certificate and the vendor root (DER), hex.
    #[serde(default)]
    pub ek_intermediates: Vec<String>,
    /// Groups and their AK public areas.
    pub groups: Vec<GroupInfo>,
}

/// One AK pinned in a trust store: `<DIR>/<host id>/<group uuid>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedAk {
    /// [`PINNED_FORMAT`].
    pub format: String,
    /// SHA-256 of the host's EK certificate (DER), hex.
    pub host_id: String,
    /// Group UUID (bound into every deep-quote leaf the AK signs).
    pub group: Uuid,
    /// Group name, for display.
    pub group_name: String,
    /// The AK public area (TPMT_PUBLIC), hex.
    pub ak_public: String,
    /// The AK's TPM name, hex.
    pub ak_name: String,
    /// When the activation succeeded, seconds since the epoch.
    pub enrolled_at: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_cert(path: &Path, flag: &str) -> Result<Certificate, CliError> {
    let b = guest::read_capped(path, MAX_FILE, flag)?;
    Certificate::from_pem_or_der(&b).map_err(|e| {
        CliError::caused(USAGE, format!("{flag} {}: not an X.509 certificate", path.display()), e)
    })
}

fn read_certs(paths: &[PathBuf], flag: &str) -> Result<Vec<Certificate>, CliError> {
    if paths.len() > MAX_CERTS {
        return Err(CliError::new(
            USAGE,
            format!("{flag}: at most {MAX_CERTS} certificates"),
        ));
    }
    paths.iter().map(|p| read_cert(p, flag)).collect()
}

/// The enrollment material of the host behind `admin` (what `xl-vtpm mgr enrollment` writes and
/// the attestation service's `GET /v1/enrollment` answers), with extra intermediates.
pub fn material(admin: &mut Admin, intermediates: &[PathBuf]) -> Result<Material, CliError> {
    let AdminReply::Enrollment(info) = admin.call(&AdminRequest::Enrollment)? else {
        return Err(CliError::new(FAILURE, "unexpected reply to Enrollment"));
    };
    let EnrollmentInfo {
        host_id,
        ek_cert,
        groups,
    } = *info;
    let ek_intermediates = read_certs(intermediates, "--ek-intermediate")?
        .into_iter()
        .map(|c| hex::encode(c.der))
        .collect();
    Ok(Material {
        format: MATERIAL_FORMAT.into(),
        host_id,
        ek_cert,
        ek_intermediates,
        groups,
    })
}

/// `xl-vtpm mgr enrollment --out FILE [--ek-intermediate FILE]…`: writes the enrollment material.
pub fn write_material(
    admin: &mut Admin,
    out: &Path,
    intermediates: &[PathBuf],
) -> Result<Material, CliError> {
    let m = material(admin, intermediates)?;
    let json = serde_json::to_vec_pretty(&m).expect("serialisable");
    std::fs::write(out, json)
        .map_err(|e| CliError::caused(FAILURE, format!("--out {}", out.display()), e))?;
    Ok(m)
}

pub(crate) fn not_verified(check: &str, e: impl Into<Cause>) -> CliError {
    CliError::caused(NOT_VERIFIED, format!("enrollment refused: {check}"), e)
}

/// What [`enroll`] needs from the host: `TPM2_ActivateCredential` for a group (the admin socket
/// in dom0 today; a network service later).
pub trait Activator {
    /// Activates (credential blob, encrypted secret) with `group`'s AK; returns the secret.
    fn activate(
        &mut self,
        group: &Uuid,
        blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, CliError>;
}

impl Activator for Admin {
    fn activate(
        &mut self,
        group: &Uuid,
        blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, CliError> {
        let req = AdminRequest::ActivateCredential {
            group: group.to_string(),
            credential_blob: hex::encode(blob),
            encrypted_secret: hex::encode(encrypted_secret),
        };
        match self.call(&req) {
            Ok(AdminReply::Activated { secret }) => Ok(secret.0.to_vec()),
            Ok(other) => Err(CliError::new(
                FAILURE,
                format!("unexpected reply to ActivateCredential: {other:?}"),
            )),
            Err(e) => Err(not_verified(
                "credential activation",
                CliError::caused(e.code, "the host's TPM did not activate the credential", e),
            )),
        }
    }
}

/// Inputs of [`enroll`].
pub struct EnrollInput<'a> {
    /// The provider's enrollment material.
    pub material: &'a Path,
    /// Trusted TPM vendor root certificates.
    pub ek_cas: &'a [PathBuf],
    /// Extra intermediates (besides those in the material).
    pub ek_intermediates: &'a [PathBuf],
    /// Only this group (name or UUID); all groups when `None`.
    pub group: Option<&'a str>,
    /// The trust store directory.
    pub trust_store: &'a Path,
}

/// `xl-vtpm enroll`: verifies the EK chain, activates a credential for each selected group's AK
/// and pins the AKs that passed. Fails (exit 7, naming the check) on the first that does not.
pub fn enroll(act: &mut dyn Activator, input: &EnrollInput<'_>) -> Result<Vec<PinnedAk>, CliError> {
    let raw = guest::read_capped(input.material, MAX_FILE, "--material")?;
    enroll_material(act, &raw, input)
}

/// [`enroll`] with the material's bytes already read (at most [`MAX_MATERIAL`]; `input.material`
/// only names them in errors): `xl-vtpm attest` fetches them from the attestation service.
pub fn enroll_material(act: &mut dyn Activator, raw: &[u8], input: &EnrollInput<'_>) -> Result<Vec<PinnedAk>, CliError> {
    if raw.len() as u64 > MAX_FILE {
        return Err(CliError::new(USAGE, format!("--material: more than {MAX_FILE} bytes")));
    }
    let m: Material = serde_json::from_slice(raw).map_err(|e| {
        CliError::caused(USAGE, format!("--material {}: not enrollment material", input.material.display()), e)
    })?;
    if m.format != MATERIAL_FORMAT {
        return Err(CliError::new(
            USAGE,
            format!(
                "--material: format {:?}, expected {MATERIAL_FORMAT:?}",
                m.format
            ),
        ));
    }
    if m.groups.len() > MAX_ENTRIES || m.ek_intermediates.len() > MAX_CERTS {
        return Err(CliError::new(
            USAGE,
            "--material: too many groups or intermediates",
        ));
    }
    if input.ek_cas.is_empty() {
        return Err(CliError::new(
            USAGE,
            "--ek-ca FILE is required: the TPM vendor's root certificate anchors the host's EK",
        ));
    }
    // 1. The EK certificate chains to a vendor root.
    let leaf_der = hex::decode(&m.ek_cert)
        .map_err(|_| CliError::new(USAGE, "--material: ek_cert is not hex"))?;
    let leaf = Certificate::parse(&leaf_der).map_err(|e| not_verified("EK certificate", e))?;
    let mut inter = read_certs(input.ek_intermediates, "--ek-intermediate")?;
    for h in &m.ek_intermediates {
        let der = hex::decode(h).map_err(|_| {
            CliError::new(USAGE, "--material: an ek_intermediates entry is not hex")
        })?;
        inter.push(
            Certificate::parse(&der).map_err(|e| not_verified("intermediate certificate", e))?,
        );
    }
    let roots = read_certs(input.ek_cas, "--ek-ca")?;
    let chain = credential::verify_ek_chain(&leaf, &inter, &roots, now())
        .map_err(|e| not_verified("EK certificate chain", e))?;
    let ek =
        credential::ek_rsa_key(&chain.ek_spki).map_err(|e| not_verified("EK public key", e))?;
    let host_id = chain.ek_cert_sha256.clone();
    let groups: Vec<&GroupInfo> = match input.group {
        Some(g) => {
            let found: Vec<_> = m
                .groups
                .iter()
                .filter(|x| x.name == g || x.uuid.to_string() == g)
                .collect();
            if found.is_empty() {
                return Err(CliError::new(
                    crate::exit::NOT_FOUND,
                    format!("--group {g:?}: not in the enrollment material"),
                ));
            }
            found
        }
        None => m.groups.iter().collect(),
    };
    let mut pinned = vec![];
    for g in groups {
        // 2. The AK public area: its name, and the attributes of a TPM-made restricted key.
        let ak = hex::decode(&g.ak_public).map_err(|_| {
            CliError::new(
                USAGE,
                format!("--material: group {}: ak_public is not hex", g.name),
            )
        })?;
        let name = credential::ak_name(&ak)
            .map_err(|e: CredError| not_verified(&format!("group {:?}", g.name), e))?;
        // 3. Credential activation in the host's TPM.
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        rand_fill(secret.as_mut());
        let cred = credential::make_credential(&ek, &name, secret.as_ref())
            .map_err(|e| not_verified("MakeCredential", e))?;
        let answer =
            zeroize::Zeroizing::new(act.activate(&g.uuid, &cred.blob, &cred.encrypted_secret)?);
        if !ct_eq(answer.as_slice(), secret.as_ref()) {
            return Err(not_verified(
                "credential activation",
                format!("the secret returned for group {:?} is not the one sent: the AK is not proven to be in the TPM of the certified EK", g.name),
            ));
        }
        let p = PinnedAk {
            format: PINNED_FORMAT.into(),
            host_id: host_id.clone(),
            group: g.uuid,
            group_name: g.name.clone(),
            ak_public: hex::encode(&ak),
            ak_name: hex::encode(&name),
            enrolled_at: now(),
        };
        let dir = input.trust_store.join(&host_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| CliError::caused(FAILURE, format!("--trust-store {}", dir.display()), e))?;
        let file = dir.join(format!("{}.json", g.uuid));
        xvtpm_fsutil::write_atomic(
            &file,
            &serde_json::to_vec_pretty(&p).expect("serialisable"),
            0o644,
        )
        .map_err(|e| CliError::caused(FAILURE, format!("--trust-store {}", file.display()), e))?;
        pinned.push(p);
    }
    Ok(pinned)
}

fn rand_fill(b: &mut [u8]) {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .expect("read /dev/urandom");
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Every pinned AK in `dir` (`<dir>/<host id>/<group>.json`).
pub fn load_trust_store(dir: &Path) -> Result<Vec<PinnedAk>, CliError> {
    let bad = |e: Cause| CliError::caused(USAGE, format!("--trust-store {}", dir.display()), e);
    let mut out = vec![];
    for host in std::fs::read_dir(dir).map_err(|e| bad(e.into()))? {
        let host = host.map_err(|e| bad(e.into()))?;
        if !host.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(host.path()).map_err(|e| bad(e.into()))? {
            let p = f.map_err(|e| bad(e.into()))?.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let raw = guest::read_capped(&p, MAX_FILE, "--trust-store entry")?;
            let e: PinnedAk = serde_json::from_slice(&raw)
                .map_err(|e| bad(CliError::caused(USAGE, format!("{}: not a pinned AK", p.display()), e).into()))?;
            if e.format != PINNED_FORMAT {
                return Err(bad(format!("{}: format {:?}", p.display(), e.format).into()));
            }
            out.push(e);
            if out.len() > MAX_ENTRIES {
                return Err(bad(format!("more than {MAX_ENTRIES} pinned AKs").into()));
            }
        }
    }
    Ok(out)
}

/// Options of `xl-vtpm verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The evidence bundle file.
    pub file: PathBuf,
    /// The nonce you sent, hex.
    #[arg(long)]
    pub nonce: String,
    /// Required vTPM UUID: the evidence must come from this vTPM.
    #[arg(long, value_name = "UUID", required_unless_present = "any_vtpm")]
    pub vtpm: Option<String>,
    /// Accept evidence from any vTPM of the host (explicit opt-out of --vtpm).
    #[arg(long, conflicts_with = "vtpm")]
    pub any_vtpm: bool,
    /// DIR: the trust store directory written by `xl-vtpm enroll`; the evidence's AK must be
    /// pinned there (EK chain to the vendor root and credential activation passed).
    #[arg(long, value_name = "DIR", env = "XVTPM_TRUST_STORE")]
    pub trust_store: Option<PathBuf>,
    /// FILE: a raw AK public area (TPMT_PUBLIC, raw or hex) instead of the trust store. Refused
    /// unless --insecure-unenrolled-ak: nothing shows such a key lives in the host's TPM.
    #[arg(long, value_name = "FILE", conflicts_with = "trust_store")]
    pub ak: Option<PathBuf>,
    /// Accept --ak FILE without enrollment (testing only).
    #[arg(long, requires = "ak")]
    pub insecure_unenrolled_ak: bool,
    /// FILE: JSON of required host PCR values, {"0": "hex", ...} (SHA-256). Without it the host's
    /// state is not checked and verify exits with code 8, not 0.
    #[arg(long, value_name = "FILE")]
    pub host_pcrs_policy: Option<PathBuf>,
    /// FILE: JSON of required vPCR values, {"hash_alg": "sha256", "pcrs": {"0": "hex"}}.
    #[arg(long, value_name = "FILE")]
    pub vpcrs_policy: Option<PathBuf>,
    /// FILE: the host's measured-boot event log (`xl-vtpm eventlog export` on the host); it
    /// must replay to the quoted host PCRs the policy names. Requires --event-log-policy.
    #[arg(long, value_name = "FILE", requires = "event_log_policy")]
    pub event_log: Option<PathBuf>,
    /// FILE: an event-log policy (`xl-vtpm eventlog policy`, xvtpm-eventlog-policy-v1): which
    /// host PCRs the log must replay to, their allowed values and allowed event digests. A
    /// host policy like --host-pcrs-policy: with it, verify can exit 0.
    #[arg(long, value_name = "FILE", requires = "event_log")]
    pub event_log_policy: Option<PathBuf>,
    /// FILE: the guest firmware's measured-boot event log (in the guest:
    /// /sys/kernel/security/tpm0/binary_bios_measurements); it must replay to the vPCRs the
    /// deep quote carries (`guest deep-quote --vpcrs 0-7`). Requires --guest-event-log-policy.
    #[arg(long, value_name = "FILE", requires = "guest_event_log_policy")]
    pub guest_event_log: Option<PathBuf>,
    /// FILE: an event-log policy (`xl-vtpm eventlog policy`) for the guest's log: which vPCRs
    /// it must replay to, their allowed values and allowed event digests. It checks the
    /// guest, not the host.
    #[arg(long, value_name = "FILE", requires = "guest_event_log")]
    pub guest_event_log_policy: Option<PathBuf>,
    /// FILE: the guest's IMA log (in the guest:
    /// /sys/kernel/security/ima/binary_runtime_measurements); it must replay to the vPCRs the
    /// deep quote carries (`guest deep-quote --vpcrs 10`). Judging the files it lists is yours.
    #[arg(long, value_name = "FILE")]
    pub guest_ima_log: Option<PathBuf>,
}

/// `xl-vtpm verify`. Exit 0 only if every check passed *and* a host policy was checked; 7 if a
/// check failed; 8 if every check passed but no host policy was given.
pub fn run_verify(a: &VerifyArgs, json: bool) -> Result<(), CliError> {
    // Every input is read (size-capped) and checked before the evidence is judged, so a bad
    // option is a usage error (2) and never reported as evidence that did not verify (7).
    let bytes = guest::read_capped(&a.file, guest::MAX_EVIDENCE, "evidence")?;
    let nonce = guest::parse_hex(&a.nonce, "--nonce")?;
    let vtpm = a
        .vtpm
        .as_deref()
        .map(|u| crate::local::parse_uuid(u, "--vtpm"))
        .transpose()?;
    let host_pcrs = a
        .host_pcrs_policy
        .as_deref()
        .map(|p| guest::read_policy(p, "--host-pcrs-policy"))
        .transpose()?;
    let vpcrs = a
        .vpcrs_policy
        .as_deref()
        .map(|p| guest::read_policy(p, "--vpcrs-policy"))
        .transpose()?;
    let event_log = match (&a.event_log, &a.event_log_policy) {
        (Some(log), Some(policy)) => Some((
            crate::eventlog::read_log(log, "--event-log")?,
            crate::eventlog::read_policy(policy, "--event-log-policy")?,
        )),
        _ => None,
    };
    let guest_log = match (&a.guest_event_log, &a.guest_event_log_policy) {
        (Some(log), Some(policy)) => Some((
            crate::eventlog::read_log(log, "--guest-event-log")?,
            crate::eventlog::read_policy(policy, "--guest-event-log-policy")?,
        )),
        _ => None,
    };
    let ima = a.guest_ima_log.as_deref().map(|p| crate::eventlog::read_ima_log(p, "--guest-ima-log")).transpose()?;
    let store = a.trust_store.as_deref().map(load_trust_store).transpose()?;
    let raw_ak = match (&a.ak, a.insecure_unenrolled_ak) {
        (Some(ak), true) => Some(guest::read_bytes_or_hex(ak, "--ak")?),
        _ => None,
    };
    let bundle = Bundle::decode(&bytes)
        .map_err(|e| CliError::caused(NOT_VERIFIED, "evidence does not decode", e))?;
    let (ak_public, group, pinned) = match (store, raw_ak, &a.ak) {
        (Some(store), _, _) => {
            let dir = a.trust_store.as_deref().expect("store read from it");
            let p = store.into_iter().find(|p| hex::decode(&p.ak_public).is_ok_and(|k| k == bundle.ak_public)).ok_or_else(|| {
                CliError::new(
                    NOT_VERIFIED,
                    format!(
                        "evidence did not verify: AK not enrolled: the evidence's AK is not pinned in the trust store {} (enroll the host with `xl-vtpm enroll`)",
                        dir.display()
                    ),
                )
            })?;
            (
                hex::decode(&p.ak_public).expect("checked"),
                Some(p.group),
                Some(p),
            )
        }
        (None, Some(ak), _) => {
            eprintln!("xl-vtpm: WARNING: --insecure-unenrolled-ak: the AK was not enrolled; nothing shows it lives in the host's TPM");
            (ak, None, None)
        }
        (None, None, Some(_)) => {
            return Err(CliError::new(
                USAGE,
                "--ak FILE refused: a raw AK proves nothing about the host's TPM (any software key can carry the restricted/fixedTPM bits); \
                 enroll the host (`xl-vtpm enroll`) and pass --trust-store DIR, or --insecure-unenrolled-ak for testing",
            ));
        }
        (None, None, None) => {
            return Err(CliError::new(
                USAGE,
                "--trust-store DIR is required (the AKs `xl-vtpm enroll` pinned)",
            ));
        }
    };
    let mut exp = vtpm_attest::verify::Expectations::new(nonce, ak_public);
    exp.group_uuid = group;
    exp.host_pcrs = host_pcrs;
    exp.vpcrs = vpcrs;
    exp.vtpm_uuid = vtpm;
    let v = vtpm_attest::verify::verify(&bundle, &exp)
        .map_err(|e| CliError::caused(NOT_VERIFIED, "evidence did not verify", e))?;
    let replayed = event_log
        .as_ref()
        .map(|(log, policy)| crate::eventlog::check_against_quote(log, policy, &v.host_pcrs))
        .transpose()?;
    let guest_replayed = guest_log
        .as_ref()
        .map(|(log, policy)| crate::eventlog::check_guest_against_quote(log, policy, &v.leaf))
        .transpose()?;
    let ima_replayed = ima.as_ref().map(|l| crate::eventlog::check_ima_against_quote(l, &v.leaf)).transpose()?;
    let host_checked = exp.host_pcrs.is_some() || replayed.is_some();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "verified": true,
                "host_state_checked": host_checked,
                "event_log": replayed.as_ref().map(|r| serde_json::json!({
                    "events": r.events,
                    "pcrs": r.pcrs.iter().map(|(p, v)| (p.to_string(), hex::encode(v))).collect::<std::collections::BTreeMap<_, _>>(),
                })),
                "guest_event_log": guest_replayed.as_ref().map(|r| serde_json::json!({
                    "events": r.events,
                    "vpcrs": r.pcrs.iter().map(|(p, v)| (p.to_string(), hex::encode(v))).collect::<std::collections::BTreeMap<_, _>>(),
                })),
                "guest_ima_log": ima.as_ref().zip(ima_replayed.as_ref()).map(|(l, r)| serde_json::json!({
                    "entries": l.entries.len(),
                    "vpcrs": r.iter().map(|(p, v)| (p.to_string(), hex::encode(v))).collect::<std::collections::BTreeMap<_, _>>(),
                })),
                "ak_enrolled": pinned.is_some(),
                "host_id": pinned.as_ref().map(|p| p.host_id.clone()),
                "vtpm": v.leaf.vtpm_uuid,
                "vtpm_checked": exp.vtpm_uuid.is_some(),
                "group": v.leaf.group_uuid,
                "leaf_index": v.leaf.position.leaf_index,
                "tree_size": v.leaf.position.tree_size,
                "root": hex::encode(v.root),
                "vpcrs": v.leaf.vpcr_selection.pcrs.iter().zip(&v.leaf.vpcr_values).map(|(p, val)| (p.to_string(), hex::encode(val))).collect::<std::collections::BTreeMap<_, _>>(),
                "host_pcr_values": v.host_pcrs.values.iter().map(hex::encode).collect::<Vec<_>>(),
            }))
            .expect("serialisable")
        );
    } else {
        println!(
            "verified: vTPM {} (group {}), leaf {} of {}; AK {}",
            v.leaf.vtpm_uuid,
            v.leaf.group_uuid,
            v.leaf.position.leaf_index,
            v.leaf.position.tree_size,
            match &pinned {
                Some(p) => format!("enrolled for host {}", p.host_id),
                None => "NOT enrolled (--insecure-unenrolled-ak)".into(),
            }
        );
        if let Some(r) = &replayed {
            println!(
                "host event log: {} events replay to the quoted PCRs {:?}; the policy allows them",
                r.events,
                r.pcrs.keys().collect::<Vec<_>>()
            );
        }
        if let (Some(l), Some(r)) = (&ima, &ima_replayed) {
            println!(
                "guest IMA log: {} entries replay to the quoted vPCRs {:?}",
                l.entries.len(),
                r.keys().collect::<Vec<_>>()
            );
        }
        if let Some(r) = &guest_replayed {
            println!(
                "guest event log: {} events replay to the quoted vPCRs {:?}; the policy allows them",
                r.events,
                r.pcrs.keys().collect::<Vec<_>>()
            );
        }
    }
    if !host_checked {
        eprintln!(
            "xl-vtpm: WARNING: host state NOT checked: no --host-pcrs-policy FILE or --event-log-policy FILE was given, so nothing says the \
             host runs software you trust; exit code {HOST_UNCHECKED}"
        );
        if json {
            std::process::exit(HOST_UNCHECKED);
        }
        return Err(CliError::new(HOST_UNCHECKED, "the evidence verified, but the host's PCRs were not checked against a policy (--host-pcrs-policy FILE, or --event-log FILE --event-log-policy FILE)"));
    }
    Ok(())
}

/// Options of `xl-vtpm enroll`.
#[derive(clap::Args, Debug)]
pub struct EnrollArgs {
    /// FILE: the host's enrollment material (`xl-vtpm mgr enrollment --out FILE` on the host).
    #[arg(long, value_name = "FILE")]
    pub material: PathBuf,
    /// FILE: a TPM vendor's root CA certificate (PEM or DER); repeatable.
    #[arg(long = "ek-ca", value_name = "FILE", required = true)]
    pub ek_ca: Vec<PathBuf>,
    /// FILE: an intermediate CA certificate (PEM or DER) of the EK chain; repeatable.
    #[arg(long = "ek-intermediate", value_name = "FILE")]
    pub ek_intermediate: Vec<PathBuf>,
    /// Only this group (name or UUID); default: every group in the material.
    #[arg(long)]
    pub group: Option<String>,
    /// DIR: where pinned AKs are written (`<DIR>/<host id>/<group>.json`).
    #[arg(long, value_name = "DIR", env = "XVTPM_TRUST_STORE")]
    pub trust_store: PathBuf,
}

/// Runs `xl-vtpm enroll` against the manager at `run_dir`.
pub fn run_enroll(a: &EnrollArgs, run_dir: &Path, json: bool) -> Result<(), CliError> {
    let mut admin = Admin::connect(run_dir)?;
    let input = EnrollInput {
        material: &a.material,
        ek_cas: &a.ek_ca,
        ek_intermediates: &a.ek_intermediate,
        group: a.group.as_deref(),
        trust_store: &a.trust_store,
    };
    let pinned = enroll(&mut admin, &input)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&pinned).expect("serialisable")
        );
    } else {
        for p in &pinned {
            println!(
                "enrolled: host {} group {} ({}): AK {} activated and pinned",
                p.host_id, p.group_name, p.group, p.ak_name
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
