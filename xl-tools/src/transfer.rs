//! Moving a vTPM to another manager (docs/migration.md): `xl-vtpm vtpm transfer-*` and
//! `xl-vtpm vtpm migrate`. The CLI only carries the managers' messages (and the sealed state
//! file, which is ciphertext under the vTPM's state key); every check is made by the managers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;
use vtpm_proto::ekcert::Certificate;
use vtpm_proto::mgr::{AdminReply, AdminRequest, EnrollmentInfo};
use vtpm_proto::transfer::{Challenge, Offer, Package, Receipt, MAX_STATE};

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, USAGE};
use crate::guest;
use crate::local::Local;

/// Largest transfer message file read (a package carries up to [`MAX_STATE`] as hex).
const MAX_MESSAGE: u64 = 4 * MAX_STATE as u64;

/// Reads a transfer message (JSON) from `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path, flag: &str) -> Result<T, CliError> {
    let b = guest::read_capped(path, MAX_MESSAGE, flag)?;
    serde_json::from_slice(&b).map_err(|e| CliError::new(USAGE, format!("{flag} {}: not a transfer message of this kind ({e})", path.display())))
}

/// Writes a transfer message (JSON, mode 0600, atomically).
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), CliError> {
    let b = serde_json::to_vec_pretty(v).expect("serialisable");
    xvtpm_fsutil::write_atomic(path, &b, 0o600).map_err(|e| CliError::new(FAILURE, format!("writing {}: {e}", path.display())))
}

/// Certificates (PEM or DER) as hex DER.
pub fn read_certs(paths: &[PathBuf], flag: &str) -> Result<Vec<String>, CliError> {
    if paths.len() > 16 {
        return Err(CliError::new(USAGE, format!("{flag}: at most 16 certificates")));
    }
    paths
        .iter()
        .map(|p| {
            let b = guest::read_capped(p, 64 * 1024, flag)?;
            let c = Certificate::from_pem_or_der(&b).map_err(|e| CliError::new(USAGE, format!("{flag} {}: not an X.509 certificate ({e})", p.display())))?;
            Ok(hex::encode(c.der))
        })
        .collect()
}

/// A SHA-256 host PCR policy (`{"0": "hex", …}`, as `xl-vtpm verify --host-pcrs-policy`).
pub fn read_policy(path: &Path) -> Result<BTreeMap<u8, String>, CliError> {
    let p = guest::read_policy(path, "--host-pcrs-policy")?;
    if p.hash_alg != vtpm_proto::evidence::TPM_ALG_SHA256 {
        return Err(CliError::new(USAGE, "--host-pcrs-policy: a transfer policy is over the SHA-256 bank"));
    }
    if p.values.is_empty() {
        return Err(CliError::new(USAGE, "--host-pcrs-policy: the policy names no PCR"));
    }
    Ok(p.values.into_iter().map(|(k, v)| (k as u8, hex::encode(v))).collect())
}

/// The destination's enrollment material (EK certificate, groups).
pub fn material(dst: &mut Admin) -> Result<EnrollmentInfo, CliError> {
    match dst.call(&AdminRequest::Enrollment)? {
        AdminReply::Enrollment(m) => Ok(*m),
        other => Err(CliError::new(FAILURE, format!("unexpected reply to Enrollment: {other:?}"))),
    }
}

/// What a source needs to know about its destination.
pub struct Destination<'a> {
    /// EK certificate (DER), hex.
    pub ek_cert: &'a str,
    /// Intermediates (DER), hex.
    pub ek_intermediates: Vec<String>,
    /// The destination group's AK, hex.
    pub ak_public: &'a str,
}

/// Source: a challenge for the destination.
pub fn challenge(src: &mut Admin, uuid: Uuid, dst: &Destination<'_>, roots: &[String], policy: &BTreeMap<u8, String>) -> Result<Challenge, CliError> {
    let req = AdminRequest::TransferChallenge {
        uuid,
        ek_cert: dst.ek_cert.to_string(),
        ek_intermediates: dst.ek_intermediates.clone(),
        ek_roots: roots.to_vec(),
        ak_public: dst.ak_public.to_string(),
        pcrs: policy.keys().copied().collect(),
    };
    match src.call(&req)? {
        AdminReply::TransferChallenge(c) => Ok(*c),
        other => Err(CliError::new(FAILURE, format!("unexpected reply to TransferChallenge: {other:?}"))),
    }
}

/// Destination: an offer answering `challenge`.
pub fn offer(dst: &mut Admin, group: Option<String>, challenge: Challenge, intermediates: Vec<String>) -> Result<Offer, CliError> {
    match dst.call(&AdminRequest::TransferOffer { group, challenge: Box::new(challenge) })? {
        AdminReply::TransferOffer(o) => {
            let mut o = *o;
            if o.ek_intermediates.is_empty() {
                o.ek_intermediates = intermediates;
            }
            Ok(o)
        }
        other => Err(CliError::new(FAILURE, format!("unexpected reply to TransferOffer: {other:?}"))),
    }
}

/// Source: the package (the vTPM is marked exporting first).
pub fn export(src: &mut Admin, local: &Local, uuid: Uuid, offer: Offer, roots: &[String], policy: &BTreeMap<u8, String>, destination: String) -> Result<Package, CliError> {
    let path = local.state_file(&uuid);
    let state = guest::read_capped(&path, MAX_STATE as u64, "the vTPM's state file")?;
    let req = AdminRequest::TransferExport {
        uuid,
        offer: Box::new(offer),
        ek_roots: roots.to_vec(),
        host_policy: policy.iter().map(|(k, v)| (*k, v.clone())).collect(),
        state: hex::encode(state),
        destination,
    };
    match src.call(&req)? {
        AdminReply::TransferPackage(p) => Ok(*p),
        other => Err(CliError::new(FAILURE, format!("unexpected reply to TransferExport: {other:?}"))),
    }
}

/// Destination: imports `package` and installs the vTPM's sealed state file; returns the receipt.
pub fn import(dst: &mut Admin, local: &Local, package: Package) -> Result<Receipt, CliError> {
    let uuid = package.vtpm;
    let (receipt, state) = match dst.call(&AdminRequest::TransferImport { package: Box::new(package) })? {
        AdminReply::TransferImported { receipt, state } => (*receipt, state),
        other => return Err(CliError::new(FAILURE, format!("unexpected reply to TransferImport: {other:?}"))),
    };
    let bytes = hex::decode(&state).map_err(|_| CliError::new(FAILURE, "the manager's state is not hex"))?;
    let dir = local.vtpm_dir(&uuid);
    std::fs::create_dir_all(&dir).map_err(|e| CliError::new(FAILURE, format!("creating {}: {e}", dir.display())))?;
    let path = local.state_file(&uuid);
    xvtpm_fsutil::write_atomic(&path, &bytes, 0o600).map_err(|e| {
        CliError::new(
            FAILURE,
            format!("vTPM {uuid} was imported, but its state file {} could not be written ({e}); copy the source's state file there before starting it", path.display()),
        )
    })?;
    Ok(receipt)
}

/// Destination: the receipt of an imported vTPM again.
pub fn receipt(dst: &mut Admin, uuid: Uuid) -> Result<Receipt, CliError> {
    match dst.call(&AdminRequest::TransferReceipt { uuid })? {
        AdminReply::TransferReceipt(r) => Ok(*r),
        other => Err(CliError::new(FAILURE, format!("unexpected reply to TransferReceipt: {other:?}"))),
    }
}

/// Destination: withdraws an offer; returns the cancellation receipt.
pub fn cancel(dst: &mut Admin, offer_id: Uuid) -> Result<Receipt, CliError> {
    match dst.call(&AdminRequest::TransferCancel { offer_id })? {
        AdminReply::TransferReceipt(r) => Ok(*r),
        other => Err(CliError::new(FAILURE, format!("unexpected reply to TransferCancel: {other:?}"))),
    }
}

/// Source: retires the vTPM on the destination's import receipt, and removes its local state file.
pub fn commit(src: &mut Admin, local: &Local, uuid: Uuid, receipt: Receipt) -> Result<(), CliError> {
    src.call(&AdminRequest::TransferCommit { uuid, receipt: Box::new(receipt) })?;
    let path = local.state_file(&uuid);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(CliError::new(FAILURE, format!("the transfer is committed, but {} could not be removed: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

/// Source: returns the vTPM to service on the destination's cancellation receipt.
pub fn abort(src: &mut Admin, uuid: Uuid, receipt: Receipt) -> Result<(), CliError> {
    src.call(&AdminRequest::TransferAbort { uuid, receipt: Box::new(receipt) })?;
    Ok(())
}

/// What `migrate` did.
#[derive(Debug, Serialize)]
pub struct Migrated {
    /// The vTPM.
    pub uuid: Uuid,
    /// The destination's host id.
    pub dest_host: String,
    /// The offer used.
    pub offer_id: Uuid,
    /// The export.
    pub export_id: Uuid,
    /// The new transfer generation.
    pub generation: u64,
}

/// `xl-vtpm vtpm migrate`: all steps, source = `src`/`src_local`, destination = `dst`/`dst_local`.
#[allow(clippy::too_many_arguments)]
pub fn migrate(
    src: &mut Admin,
    src_local: &Local,
    dst: &mut Admin,
    dst_local: &Local,
    uuid: Uuid,
    group: Option<String>,
    roots: &[String],
    intermediates: Vec<String>,
    policy: &BTreeMap<u8, String>,
    destination: String,
) -> Result<Migrated, CliError> {
    let m = material(dst)?;
    let g = match &group {
        Some(k) => m.groups.iter().find(|g| g.name == *k || g.uuid.to_string() == *k),
        None => m.groups.first(),
    }
    .ok_or_else(|| CliError::new(crate::exit::NOT_FOUND, format!("the destination has no group {:?}", group.as_deref().unwrap_or("default"))))?;
    let d = Destination { ek_cert: &m.ek_cert, ek_intermediates: intermediates.clone(), ak_public: &g.ak_public };
    let ch = challenge(src, uuid, &d, roots, policy)?;
    let o = offer(dst, Some(g.uuid.to_string()), ch, intermediates)?;
    let offer_id = o.offer_id;
    let pkg = export(src, src_local, uuid, o, roots, policy, destination)?;
    let (export_id, generation, dest_host) = (pkg.export_id, pkg.generation, pkg.dest_host.clone());
    let r = import(dst, dst_local, pkg)?;
    commit(src, src_local, uuid, r)?;
    Ok(Migrated { uuid, dest_host, offer_id, export_id, generation })
}

/// `xl-vtpm vtpm transfer …`: one step of a transfer, each run on its own host.
#[derive(clap::Subcommand, Debug)]
pub enum TransferCmd {
    /// Source: check the destination's enrollment material (`xl-vtpm mgr enrollment` there) and
    /// write a challenge for it.
    Challenge {
        /// vTPM UUID.
        uuid: String,
        /// The destination's enrollment material.
        #[arg(long)]
        material: PathBuf,
        /// The destination group (name or UUID in the material; default: its first group).
        #[arg(long)]
        group: Option<String>,
        /// Trusted TPM vendor root certificate (PEM or DER; repeatable).
        #[arg(long = "ek-ca", required = true)]
        ek_ca: Vec<PathBuf>,
        /// Intermediate certificate toward the root (repeatable; adds to the material's).
        #[arg(long)]
        ek_intermediate: Vec<PathBuf>,
        /// The SHA-256 host PCR values the destination must have (`{"0": "hex", …}`).
        #[arg(long)]
        host_pcrs_policy: PathBuf,
        /// Where to write the challenge.
        #[arg(long)]
        out: PathBuf,
    },
    /// Destination: activate the challenge's credential, make a transfer key in this TPM,
    /// certify it and quote the host PCRs; write the offer.
    Offer {
        /// The source's challenge.
        #[arg(long)]
        challenge: PathBuf,
        /// Group the vTPM joins here (default: the default group).
        #[arg(long)]
        group: Option<String>,
        /// Intermediate certificate of this TPM's EK certificate (repeatable).
        #[arg(long)]
        ek_intermediate: Vec<PathBuf>,
        /// Where to write the offer.
        #[arg(long)]
        out: PathBuf,
    },
    /// Source: verify the offer, mark the vTPM exporting (it stops being runnable here) and write
    /// its identity and state sealed to the offer's transfer key. The vTPM must be stopped.
    Export {
        /// vTPM UUID.
        uuid: String,
        /// The destination's offer.
        #[arg(long)]
        offer: PathBuf,
        /// Trusted TPM vendor root certificate (repeatable).
        #[arg(long = "ek-ca", required = true)]
        ek_ca: Vec<PathBuf>,
        /// The SHA-256 host PCR values the destination must have.
        #[arg(long)]
        host_pcrs_policy: PathBuf,
        /// A name for the destination, shown when the vTPM is started here later.
        #[arg(long, default_value = "")]
        to_name: String,
        /// Where to write the package.
        #[arg(long)]
        out: PathBuf,
    },
    /// Destination: import a package (this TPM decrypts it) and install the vTPM's state file;
    /// write the receipt for the source.
    Import {
        /// The package.
        package: PathBuf,
        /// Where to write the receipt.
        #[arg(long)]
        out: PathBuf,
    },
    /// Destination: the receipt of an imported vTPM again.
    Receipt {
        /// vTPM UUID.
        uuid: String,
        /// Where to write the receipt.
        #[arg(long)]
        out: PathBuf,
    },
    /// Destination: withdraw an offer that was not imported; write the cancellation receipt.
    Cancel {
        /// The offer's id.
        offer: String,
        /// Where to write the receipt.
        #[arg(long)]
        out: PathBuf,
    },
    /// Source: retire the vTPM here on the destination's import receipt.
    Commit {
        /// vTPM UUID.
        uuid: String,
        /// The destination's receipt.
        #[arg(long)]
        receipt: PathBuf,
    },
    /// Source: return an exporting vTPM to service on the destination's cancellation receipt.
    Abort {
        /// vTPM UUID.
        uuid: String,
        /// The destination's cancellation receipt.
        #[arg(long)]
        receipt: PathBuf,
    },
}

/// `xl-vtpm vtpm migrate`: every transfer step, for a destination manager reachable from here.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// vTPM UUID (stopped).
    pub uuid: String,
    /// The destination manager's runtime directory (its admin socket).
    #[arg(long)]
    pub to_run_dir: PathBuf,
    /// The destination's state directory (where its vTPM state files live).
    #[arg(long)]
    pub to_state_dir: PathBuf,
    /// Group the vTPM joins on the destination (default: its default group).
    #[arg(long)]
    pub group: Option<String>,
    /// Trusted TPM vendor root certificate (repeatable).
    #[arg(long = "ek-ca", required = true)]
    pub ek_ca: Vec<PathBuf>,
    /// Intermediate certificate of the destination's EK certificate (repeatable).
    #[arg(long)]
    pub ek_intermediate: Vec<PathBuf>,
    /// The SHA-256 host PCR values the destination must have.
    #[arg(long)]
    pub host_pcrs_policy: PathBuf,
    /// A name for the destination (default: its runtime directory).
    #[arg(long)]
    pub to_name: Option<String>,
}

fn uuid_arg(s: &str, what: &str) -> Result<Uuid, CliError> {
    crate::local::parse_uuid(s, what)
}

/// Runs one `transfer` step; returns a line (or JSON object) to print.
pub fn run(cmd: TransferCmd, admin: &mut Admin, local: &Local) -> Result<serde_json::Value, CliError> {
    use serde_json::json;
    Ok(match cmd {
        TransferCmd::Challenge { uuid, material, group, ek_ca, ek_intermediate, host_pcrs_policy, out } => {
            let uuid = uuid_arg(&uuid, "UUID")?;
            let m: crate::attest::Material = read_json(&material, "--material")?;
            let g = match &group {
                Some(k) => m.groups.iter().find(|g| g.name == *k || g.uuid.to_string() == *k),
                None => m.groups.first(),
            }
            .ok_or_else(|| CliError::new(USAGE, format!("--material: no group {:?}", group.as_deref().unwrap_or("(first)"))))?;
            let mut inter = m.ek_intermediates.clone();
            inter.extend(read_certs(&ek_intermediate, "--ek-intermediate")?);
            let d = Destination { ek_cert: &m.ek_cert, ek_intermediates: inter, ak_public: &g.ak_public };
            let c = challenge(admin, uuid, &d, &read_certs(&ek_ca, "--ek-ca")?, &read_policy(&host_pcrs_policy)?)?;
            write_json(&out, &c)?;
            json!({"uuid": uuid, "challenge": out})
        }
        TransferCmd::Offer { challenge, group, ek_intermediate, out } => {
            let c: Challenge = read_json(&challenge, "--challenge")?;
            let o = offer(admin, group, c, read_certs(&ek_intermediate, "--ek-intermediate")?)?;
            write_json(&out, &o)?;
            json!({"uuid": o.vtpm, "offer_id": o.offer_id, "offer": out})
        }
        TransferCmd::Export { uuid, offer, ek_ca, host_pcrs_policy, to_name, out } => {
            let uuid = uuid_arg(&uuid, "UUID")?;
            let o: Offer = read_json(&offer, "--offer")?;
            let p = export(admin, local, uuid, o, &read_certs(&ek_ca, "--ek-ca")?, &read_policy(&host_pcrs_policy)?, to_name)?;
            write_json(&out, &p)?;
            json!({"uuid": uuid, "export_id": p.export_id, "generation": p.generation, "package": out})
        }
        TransferCmd::Import { package, out } => {
            let p: Package = read_json(&package, "PACKAGE")?;
            let r = import(admin, local, p)?;
            write_json(&out, &r)?;
            json!({"uuid": r.vtpm, "imported": true, "receipt": out})
        }
        TransferCmd::Receipt { uuid, out } => {
            let r = receipt(admin, uuid_arg(&uuid, "UUID")?)?;
            write_json(&out, &r)?;
            json!({"uuid": r.vtpm, "receipt": out})
        }
        TransferCmd::Cancel { offer, out } => {
            let r = cancel(admin, uuid_arg(&offer, "OFFER")?)?;
            write_json(&out, &r)?;
            json!({"uuid": r.vtpm, "offer_id": r.offer_id, "cancelled": true, "receipt": out})
        }
        TransferCmd::Commit { uuid, receipt } => {
            let uuid = uuid_arg(&uuid, "UUID")?;
            commit(admin, local, uuid, read_json(&receipt, "--receipt")?)?;
            json!({"uuid": uuid, "committed": true})
        }
        TransferCmd::Abort { uuid, receipt } => {
            let uuid = uuid_arg(&uuid, "UUID")?;
            abort(admin, uuid, read_json(&receipt, "--receipt")?)?;
            json!({"uuid": uuid, "aborted": true})
        }
    })
}

/// Runs `xl-vtpm vtpm migrate` with `admin`/`local` as the source.
pub fn run_migrate(a: MigrateArgs, admin: &mut Admin, local: &Local) -> Result<Migrated, CliError> {
    let uuid = uuid_arg(&a.uuid, "UUID")?;
    let mut dst = Admin::connect(&a.to_run_dir)?;
    let dst_local = Local { state_dir: a.to_state_dir.clone(), run_dir: a.to_run_dir.clone(), ..local.clone() };
    let name = a.to_name.unwrap_or_else(|| a.to_run_dir.display().to_string());
    migrate(
        admin,
        local,
        &mut dst,
        &dst_local,
        uuid,
        a.group,
        &read_certs(&a.ek_ca, "--ek-ca")?,
        read_certs(&a.ek_intermediate, "--ek-intermediate")?,
        &read_policy(&a.host_pcrs_policy)?,
        name,
    )
}
