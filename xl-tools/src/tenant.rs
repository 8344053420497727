//! `xl-vtpm tenant …`: the attestation service's tenants in the registry — who may ask
//! `xvtpm-attestd` about which vTPMs ([`crate::registry::Tenant`], docs/attestation-service.md).
//! A tenant is known by the SHA-256 of its client certificate's SubjectPublicKeyInfo
//! ([`key_fingerprint`]), the same value the service computes from the certificate a client
//! presents.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::exit::{CliError, FAILURE, NOT_FOUND, USAGE};
use crate::registry::RegistryError;
use crate::xenlife::Xen;

/// The largest certificate file read.
pub const MAX_CERT_FILE: u64 = 64 << 10;

/// `xl-vtpm tenant …`.
#[derive(clap::Subcommand, Debug)]
pub enum TenantCmd {
    /// Register a tenant by its client certificate (PEM or DER; only its public key is kept).
    Add {
        /// The tenant's name (1-64 of letters, digits, `.`, `-`, `_`).
        name: String,
        /// The tenant's client certificate.
        #[arg(long)]
        cert: PathBuf,
    },
    /// Let a tenant ask about a vTPM (by UUID, or a registered guest's name). A vTPM has at
    /// most one tenant.
    Bind {
        /// The tenant.
        name: String,
        /// vTPM UUID or guest name.
        vtpm: String,
    },
    /// Take a vTPM from its tenant.
    Unbind {
        /// vTPM UUID or guest name.
        vtpm: String,
    },
    /// Tenants, their key fingerprints and vTPMs.
    List,
    /// Delete a tenant and its bindings.
    Del {
        /// The tenant.
        name: String,
    },
}

/// SHA-256 (lowercase hex) of a certificate's SubjectPublicKeyInfo DER.
pub fn spki_fingerprint(spki_der: &[u8]) -> String {
    hex::encode(Sha256::digest(spki_der))
}

/// The tenant key fingerprint of a certificate (PEM or DER).
pub fn key_fingerprint(cert: &[u8]) -> Result<String, vtpm_proto::ekcert::CertError> {
    let c = vtpm_proto::ekcert::Certificate::from_pem_or_der(cert)?;
    Ok(spki_fingerprint(&c.spki))
}

fn reg_err(e: RegistryError) -> CliError {
    let code = match &e {
        RegistryError::NoSuchTenant(_) => NOT_FOUND,
        RegistryError::BadTenantName(_) => USAGE,
        RegistryError::TenantExists { .. } | RegistryError::VtpmBoundToOtherTenant { .. } => crate::exit::REFUSED,
        _ => FAILURE,
    };
    CliError::caused(code, "", e)
}

/// A vTPM UUID, or the vTPM of the registered guest of that name.
fn resolve(reg: &crate::registry::Registry, vtpm: &str) -> Result<Uuid, CliError> {
    if let Ok(u) = Uuid::parse_str(vtpm) {
        return Ok(u);
    }
    match reg.get_by_name(vtpm).map_err(reg_err)? {
        Some(row) => Ok(row.vtpm_uuid),
        None => Err(CliError::new(NOT_FOUND, format!("{vtpm:?} is neither a vTPM UUID nor a registered guest's name (`xl-vtpm list`)"))),
    }
}

/// Runs `xl-vtpm tenant …` on `xen`'s registry.
pub fn run(cmd: TenantCmd, xen: &Xen, json: bool) -> Result<(), CliError> {
    let mut reg = xen.open_registry()?;
    match cmd {
        TenantCmd::Add { name, cert } => {
            crate::registry::check_tenant_name(&name).map_err(reg_err)?;
            let bytes = crate::guest::read_capped(&cert, MAX_CERT_FILE, "--cert")?;
            let fp = key_fingerprint(&bytes).map_err(|e| CliError::caused(USAGE, format!("--cert {}", cert.display()), e))?;
            reg.tenant_add(&name, &fp).map_err(reg_err)?;
            if json {
                println!("{}", serde_json::json!({"version": 1, "name": name, "key_sha256": fp}));
            } else {
                println!("tenant {name} added (certificate key SHA-256 {fp})");
            }
        }
        TenantCmd::Bind { name, vtpm } => {
            let u = resolve(&reg, &vtpm)?;
            reg.tenant_bind(&name, u).map_err(reg_err)?;
            if !json {
                println!("vTPM {u} bound to tenant {name}");
            }
        }
        TenantCmd::Unbind { vtpm } => {
            let u = resolve(&reg, &vtpm)?;
            match reg.tenant_unbind(u).map_err(reg_err)? {
                Some(t) if !json => println!("vTPM {u} unbound from tenant {t}"),
                Some(_) => {}
                None => return Err(CliError::new(NOT_FOUND, format!("vTPM {u} has no tenant"))),
            }
        }
        TenantCmd::List => {
            let all = reg.tenants().map_err(reg_err)?;
            if json {
                println!("{}", serde_json::json!({"version": 1, "tenants": all}));
            } else if all.is_empty() {
                println!("no tenants (`xl-vtpm tenant add NAME --cert FILE`)");
            } else {
                for t in all {
                    let v: Vec<String> = t.vtpms.iter().map(Uuid::to_string).collect();
                    println!("{}  key-sha256={}  vtpms={}", t.name, t.key_sha256, if v.is_empty() { "-".into() } else { v.join(",") });
                }
            }
        }
        TenantCmd::Del { name } => {
            let had = reg.tenant_del(&name).map_err(reg_err)?;
            if !json {
                println!("tenant {name} deleted ({} vTPM binding(s) removed)", had.len());
            }
        }
    }
    Ok(())
}
