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
use vtpm_proto::transfer::{Challenge, Offer, Package, Receipt, IMPORT_PROTOCOL, MAX_STATE};

use crate::admin::Admin;
use crate::exit::{CliError, FAILURE, REFUSED, USAGE};
use crate::guest;
use crate::local::Local;
use crate::registry::Registry;
use crate::xenlife::{reg_err, Xen};

/// Largest transfer message file read (a package carries up to [`MAX_STATE`] as hex).
const MAX_MESSAGE: u64 = 4 * MAX_STATE as u64;

/// Reads a transfer message (JSON) from `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path, flag: &str) -> Result<T, CliError> {
    let b = guest::read_capped(path, MAX_MESSAGE, flag)?;
    serde_json::from_slice(&b).map_err(|e| CliError::caused(USAGE, format!("{flag} {}: not a transfer message of this kind", path.display()), e))
}

/// Writes a transfer message (JSON, mode 0600, atomically).
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), CliError> {
    let b = serde_json::to_vec_pretty(v).expect("serialisable");
    xvtpm_fsutil::write_atomic(path, &b, 0o600).map_err(|e| CliError::caused(FAILURE, format!("writing {}", path.display()), e))
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
            let c = Certificate::from_pem_or_der(&b).map_err(|e| CliError::caused(USAGE, format!("{flag} {}: not an X.509 certificate", p.display()), e))?;
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

/// Source: every check of `offer` that the export makes, and nothing else (the vTPM may run).
pub fn verify(src: &mut Admin, uuid: Uuid, offer: &Offer, roots: &[String], policy: &BTreeMap<u8, String>) -> Result<(), CliError> {
    let req = AdminRequest::TransferVerify {
        uuid,
        offer: Box::new(offer.clone()),
        ek_roots: roots.to_vec(),
        host_policy: policy.iter().map(|(k, v)| (*k, v.clone())).collect(),
    };
    src.call(&req).map(drop)
}

/// Refuses a manager that does not write an imported vTPM's state file itself (an older
/// release): checked before anything is exported or imported.
pub fn require_protocol(admin: &mut Admin, role: &str) -> Result<(), CliError> {
    match admin.call(&AdminRequest::Status)? {
        AdminReply::Status(s) if s.transfer_protocol >= IMPORT_PROTOCOL => Ok(()),
        AdminReply::Status(s) => Err(CliError::new(
            REFUSED,
            format!(
                "the {role} manager (vtpmmgr {}) speaks transfer protocol {}, this xl-vtpm needs {IMPORT_PROTOCOL} (the destination writes the imported state file itself): upgrade that manager first",
                s.version, s.transfer_protocol
            ),
        )),
        other => Err(CliError::new(FAILURE, format!("unexpected reply to Status: {other:?}"))),
    }
}

/// Destination: imports `package`; the manager writes the vTPM's state file durably before it
/// answers. Returns the receipt.
pub fn import(dst: &mut Admin, package: Package) -> Result<Receipt, CliError> {
    require_protocol(dst, "destination")?;
    match dst.call(&AdminRequest::TransferImport { package: Box::new(package), protocol: IMPORT_PROTOCOL })? {
        AdminReply::TransferImported { receipt, .. } => Ok(*receipt),
        other => Err(CliError::new(FAILURE, format!("unexpected reply to TransferImport: {other:?}"))),
    }
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
            Err(CliError::caused(FAILURE, format!("the transfer is committed, but {} could not be removed", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Source: returns the vTPM to service on the destination's cancellation receipt.
pub fn abort(src: &mut Admin, uuid: Uuid, receipt: Receipt) -> Result<(), CliError> {
    src.call(&AdminRequest::TransferAbort { uuid, receipt: Some(Box::new(receipt)), lost_destination: None })?;
    Ok(())
}

/// Source: returns the vTPM to service without the destination, declared lost (`host`: its id).
pub fn force_abort(src: &mut Admin, uuid: Uuid, host: String) -> Result<(), CliError> {
    src.call(&AdminRequest::TransferAbort { uuid, receipt: None, lost_destination: Some(host) })?;
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
    /// The host the registry names now (`--to-host`), if the vTPM is registered.
    pub registry_host: Option<String>,
}

/// The registry side of a move: the registry and the destination's name in it.
pub struct RegistryMove<'a> {
    /// The registry (shared by the hosts: `--registry postgres://…`).
    pub registry: &'a mut Registry,
    /// The destination's name in it (`--to-host`).
    pub to_host: String,
}

/// Source: records the move in the registry (before the export marks the vTPM exporting);
/// `false` if the vTPM has no pair there.
pub fn registry_begin(r: &mut RegistryMove<'_>, uuid: Uuid, offer: Uuid) -> Result<bool, CliError> {
    Ok(r.registry.begin_move(uuid, &r.to_host, offer).map_err(reg_err)?.is_some())
}

/// Source, after the manager retired its copy: the registry's commit point (the pair's host
/// becomes the destination, in one transaction). Returns the host it names now.
pub fn registry_commit(registry: &mut Registry, uuid: Uuid, offer: Uuid) -> Result<Option<String>, CliError> {
    registry.finish_move(uuid, offer).map_err(|e| {
        let e = reg_err(e);
        CliError::new(e.code, format!("the transfer of vTPM {uuid} is committed, but the registry was not updated ({}); run `xl-vtpm vtpm transfer commit` again", e.text()))
    })
}

/// The steps before the export, which need neither the vTPM stopped nor anything moved: the
/// destination's protocol and enrollment material (its group `group`, else its default), the
/// source's challenge, the destination's offer.
pub fn prepare(
    src: &mut Admin,
    dst: &mut Admin,
    uuid: Uuid,
    group: Option<&str>,
    roots: &[String],
    intermediates: Vec<String>,
    policy: &BTreeMap<u8, String>,
) -> Result<Offer, CliError> {
    require_protocol(dst, "destination")?;
    let m = material(dst)?;
    let g = match group {
        Some(k) => m.groups.iter().find(|g| g.name == k || g.uuid.to_string() == k),
        None => m.groups.first(),
    }
    .ok_or_else(|| CliError::new(crate::exit::NOT_FOUND, format!("the destination has no group {:?}", group.unwrap_or("default"))))?;
    let d = Destination { ek_cert: &m.ek_cert, ek_intermediates: intermediates.clone(), ak_public: &g.ak_public };
    let ch = challenge(src, uuid, &d, roots, policy)?;
    offer(dst, Some(g.uuid.to_string()), ch, intermediates)
}

/// `xl-vtpm vtpm migrate`: all steps, source = `src`/`src_local`, destination = `dst` (its
/// manager writes the imported state file). With `reg`, the move is recorded in the registry
/// before the export and committed there after the source retired its copy.
#[allow(clippy::too_many_arguments)]
pub fn migrate(
    src: &mut Admin,
    src_local: &Local,
    dst: &mut Admin,
    uuid: Uuid,
    group: Option<String>,
    roots: &[String],
    intermediates: Vec<String>,
    policy: &BTreeMap<u8, String>,
    destination: String,
    mut reg: Option<RegistryMove<'_>>,
) -> Result<Migrated, CliError> {
    let o = prepare(src, dst, uuid, group.as_deref(), roots, intermediates, policy)?;
    let offer_id = o.offer_id;
    let registered = match reg.as_mut() {
        Some(r) => registry_begin(r, uuid, offer_id)?,
        None => false,
    };
    let pkg = match export(src, src_local, uuid, o, roots, policy, destination) {
        Ok(p) => p,
        Err(e) => {
            if registered && let Some(r) = reg.as_mut() {
                abort_if_refused(&e, r.registry, uuid, offer_id);
            }
            return Err(e);
        }
    };
    let (export_id, generation, dest_host) = (pkg.export_id, pkg.generation, pkg.dest_host.clone());
    let r = import(dst, pkg)?;
    commit(src, src_local, uuid, r)?;
    let registry_host = match reg.as_mut() {
        Some(r) if registered => registry_commit(r.registry, uuid, offer_id)?,
        _ => None,
    };
    Ok(Migrated { uuid, dest_host, offer_id, export_id, generation, registry_host })
}

/// After a failed export: ends the registry's move if the source manager refused before it
/// marked the vTPM exporting (a refusal names a check; only an internal failure or a lost
/// connection can come after the mark — then the move stays open for `transfer abort`).
fn abort_if_refused(e: &CliError, registry: &mut Registry, uuid: Uuid, offer: Uuid) {
    if e.code != FAILURE && e.code != crate::exit::NO_MANAGER {
        let _ = registry.abort_move(uuid, Some(offer));
    }
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
        /// The destination's name in the registry (its `--host`): the move is recorded there
        /// before the export, and `transfer commit` makes it the vTPM's host.
        #[arg(long)]
        to_host: Option<String>,
        /// Where to write the package.
        #[arg(long)]
        out: PathBuf,
    },
    /// Destination: import a package (this TPM decrypts it; the manager writes the vTPM's state
    /// file durably before it answers); write the receipt for the source.
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
    /// Source: return an exporting vTPM to service on the destination's cancellation receipt
    /// or, with --force, without it: only for a destination lost for good (its TPM can never
    /// open the package — destroyed or cleared; docs/migration.md).
    Abort {
        /// vTPM UUID.
        uuid: String,
        /// The destination's cancellation receipt.
        #[arg(long, required_unless_present = "force", conflicts_with = "force")]
        receipt: Option<PathBuf>,
        /// Abort without the destination's receipt (needs --destination-lost).
        #[arg(long, requires = "destination_lost")]
        force: bool,
        /// The lost destination's host id (SHA-256 of its EK certificate; the refusal to start
        /// the vTPM here names it).
        #[arg(long, requires = "force")]
        destination_lost: Option<String>,
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
    /// The destination's name in the registry (its `--host`): the move is recorded before the
    /// export and the registry names the destination from the commit on.
    #[arg(long)]
    pub to_host: Option<String>,
}

fn uuid_arg(s: &str, what: &str) -> Result<Uuid, CliError> {
    crate::local::parse_uuid(s, what)
}

/// Runs one `transfer` step; returns a line (or JSON object) to print.
pub fn run(cmd: TransferCmd, admin: &mut Admin, local: &Local, xen: &Xen) -> Result<serde_json::Value, CliError> {
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
        TransferCmd::Export { uuid, offer, ek_ca, host_pcrs_policy, to_name, to_host, out } => {
            let uuid = uuid_arg(&uuid, "UUID")?;
            let o: Offer = read_json(&offer, "--offer")?;
            let (roots, policy) = (read_certs(&ek_ca, "--ek-ca")?, read_policy(&host_pcrs_policy)?);
            let offer_id = o.offer_id;
            let mut registry = match &to_host {
                Some(_) => xen.transfer_registry(true)?,
                None => None,
            };
            let registered = match (registry.as_mut(), to_host) {
                (Some(registry), Some(to_host)) => registry_begin(&mut RegistryMove { registry, to_host }, uuid, offer_id)?,
                _ => false,
            };
            let p = export(admin, local, uuid, o, &roots, &policy, to_name).inspect_err(|e| {
                if registered && let Some(r) = registry.as_mut() {
                    abort_if_refused(e, r, uuid, offer_id);
                }
            })?;
            write_json(&out, &p)?;
            json!({"uuid": uuid, "export_id": p.export_id, "generation": p.generation, "package": out, "registry_move": registered})
        }
        TransferCmd::Import { package, out } => {
            let p: Package = read_json(&package, "PACKAGE")?;
            let r = import(admin, p)?;
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
            let r: Receipt = read_json(&receipt, "--receipt")?;
            let offer_id = r.offer_id;
            commit(admin, local, uuid, r)?;
            let registry_host = match xen.transfer_registry(false)? {
                Some(mut registry) => registry_commit(&mut registry, uuid, offer_id)?,
                None => None,
            };
            json!({"uuid": uuid, "committed": true, "registry_host": registry_host})
        }
        TransferCmd::Abort { uuid, receipt, force: _, destination_lost } => {
            let uuid = uuid_arg(&uuid, "UUID")?;
            let done = match (receipt, destination_lost) {
                (Some(r), _) => abort(admin, uuid, read_json(&r, "--receipt")?),
                (None, Some(host)) => force_abort(admin, uuid, host),
                (None, None) => return Err(CliError::new(USAGE, "give --receipt FILE, or --force --destination-lost HOST_ID")),
            };
            // A vTPM the source never marked exporting (its export was never made): the
            // registry's move, if one was begun, ends all the same.
            let never_exported = matches!(&done, Err(e) if e.refusal() == Some(vtpm_proto::mgr::Refusal::NotExported));
            if !never_exported {
                done?;
            }
            let registry_move_ended = match xen.transfer_registry(false)? {
                Some(mut registry) => registry.abort_move(uuid, None).map_err(|e| {
                    let e = reg_err(e);
                    CliError::new(e.code, format!("the transfer of vTPM {uuid} is aborted, but the registry's move was not ended ({}); run the abort again", e.text()))
                })?,
                None => false,
            };
            json!({"uuid": uuid, "aborted": !never_exported, "registry_move_ended": registry_move_ended})
        }
    })
}

/// Runs `xl-vtpm vtpm migrate` with `admin`/`local` as the source.
pub fn run_migrate(a: MigrateArgs, admin: &mut Admin, local: &Local, xen: &Xen) -> Result<Migrated, CliError> {
    let uuid = uuid_arg(&a.uuid, "UUID")?;
    let (roots, intermediates, policy) = (read_certs(&a.ek_ca, "--ek-ca")?, read_certs(&a.ek_intermediate, "--ek-intermediate")?, read_policy(&a.host_pcrs_policy)?);
    if let Some(h) = &a.to_host {
        crate::registry::check_host(h).map_err(|e| CliError::caused(USAGE, "--to-host", e))?;
    }
    let mut registry = match &a.to_host {
        Some(_) => xen.transfer_registry(true)?,
        None => None,
    };
    let reg = match (registry.as_mut(), a.to_host) {
        (Some(registry), Some(to_host)) => Some(RegistryMove { registry, to_host }),
        _ => None,
    };
    let mut dst = Admin::connect(&a.to_run_dir)?;
    let name = a.to_name.unwrap_or_else(|| a.to_run_dir.display().to_string());
    migrate(admin, local, &mut dst, uuid, a.group, &roots, intermediates, &policy, name, reg)
}
