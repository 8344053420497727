//! Tenants of the attestation service (`xvtpm-attestd`): a name, the SHA-256 of the tenant's
//! client-certificate key (SubjectPublicKeyInfo DER, hex) and the vTPMs it may ask about. A
//! vTPM belongs to at most one tenant; the database enforces it (primary key).

use uuid::Uuid;

use super::sql::{Sql, Val};
use super::{Registry, RegistryError, unix_now};

/// A tenant and its vTPMs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// SHA-256 of its client certificate's SubjectPublicKeyInfo, lowercase hex.
    pub key_sha256: String,
    /// The vTPMs bound to it, ordered.
    pub vtpms: Vec<Uuid>,
}

/// Whether `name` can be a tenant's name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_tenant_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(RegistryError::BadTenantName(name.chars().take(80).collect())) }
}

fn check_fingerprint(fp: &str) -> Result<(), RegistryError> {
    if fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(RegistryError::Corrupt { id: 0, what: format!("tenant key fingerprint {fp:?} is not 64 lowercase hex digits") })
    }
}

fn text(v: &Val) -> Option<&str> {
    match v {
        Val::Text(s) => Some(s),
        _ => None,
    }
}

fn tenant_of_vtpm(db: &mut dyn Sql, vtpm: Uuid) -> Result<Option<String>, RegistryError> {
    let rows = db.rows("SELECT tenant FROM tenant_vtpms WHERE vtpm_uuid = $1", &[vtpm.into()])?;
    Ok(rows.first().and_then(|r| r.first()).and_then(text).map(str::to_string))
}

fn vtpms_of(db: &mut dyn Sql, name: &str) -> Result<Vec<Uuid>, RegistryError> {
    db.rows("SELECT vtpm_uuid FROM tenant_vtpms WHERE tenant = $1 ORDER BY vtpm_uuid", &[name.into()])?
        .iter()
        .map(|r| {
            let s = r.first().and_then(text).unwrap_or_default();
            Uuid::parse_str(s).map_err(|_| RegistryError::Corrupt { id: 0, what: format!("tenant {name}'s vTPM `{s}` is not a UUID") })
        })
        .collect()
}

fn exists(db: &mut dyn Sql, name: &str) -> Result<bool, RegistryError> {
    Ok(!db.rows("SELECT 1 FROM tenants WHERE name = $1", &[name.into()])?.is_empty())
}

impl Registry {
    /// Registers tenant `name` with its certificate key's SHA-256 (hex). Refused if the name or
    /// the key is registered already.
    pub fn tenant_add(&mut self, name: &str, key_sha256: &str) -> Result<(), RegistryError> {
        check_tenant_name(name)?;
        check_fingerprint(key_sha256)?;
        self.write(|db, _| {
            let holder = db.rows("SELECT name, key_sha256 FROM tenants WHERE name = $1 OR key_sha256 = $2", &[name.into(), key_sha256.into()])?;
            if let Some(r) = holder.first() {
                let held = r.first().and_then(text).unwrap_or_default().to_string();
                let what = if held == name { "this name" } else { "this certificate key" };
                return Err(RegistryError::TenantExists { name: held, what });
            }
            db.exec("INSERT INTO tenants (name, key_sha256, created_at) VALUES ($1, $2, $3)", &[name.into(), key_sha256.into(), unix_now().into()])?;
            Ok(())
        })
    }

    /// Deletes tenant `name` and its bindings; returns the vTPMs it had.
    pub fn tenant_del(&mut self, name: &str) -> Result<Vec<Uuid>, RegistryError> {
        self.write(|db, _| {
            let had = vtpms_of(db, name)?;
            db.exec("DELETE FROM tenant_vtpms WHERE tenant = $1", &[name.into()])?;
            if db.exec("DELETE FROM tenants WHERE name = $1", &[name.into()])? == 0 {
                return Err(RegistryError::NoSuchTenant(name.to_string()));
            }
            Ok(had)
        })
    }

    /// Binds `vtpm` to tenant `name` (again: no change). Refused if another tenant has it.
    pub fn tenant_bind(&mut self, name: &str, vtpm: Uuid) -> Result<(), RegistryError> {
        self.write(|db, _| {
            if !exists(db, name)? {
                return Err(RegistryError::NoSuchTenant(name.to_string()));
            }
            match tenant_of_vtpm(db, vtpm)? {
                Some(t) if t == name => Ok(()),
                Some(t) => Err(RegistryError::VtpmBoundToOtherTenant { vtpm, tenant: t }),
                None => {
                    db.exec("INSERT INTO tenant_vtpms (vtpm_uuid, tenant, bound_at) VALUES ($1, $2, $3)", &[vtpm.into(), name.into(), unix_now().into()])?;
                    Ok(())
                }
            }
        })
    }

    /// Removes `vtpm`'s tenant binding; returns the tenant it had, if any.
    pub fn tenant_unbind(&mut self, vtpm: Uuid) -> Result<Option<String>, RegistryError> {
        self.write(|db, _| {
            let had = tenant_of_vtpm(db, vtpm)?;
            db.exec("DELETE FROM tenant_vtpms WHERE vtpm_uuid = $1", &[vtpm.into()])?;
            Ok(had)
        })
    }

    /// Every tenant with its vTPMs, ordered by name.
    pub fn tenants(&self) -> Result<Vec<Tenant>, RegistryError> {
        self.read(|db| {
            let rows = db.rows("SELECT name, key_sha256 FROM tenants ORDER BY name", &[])?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let name = r.first().and_then(text).unwrap_or_default().to_string();
                let key_sha256 = r.get(1).and_then(text).unwrap_or_default().to_string();
                let vtpms = vtpms_of(db, &name)?;
                out.push(Tenant { name, key_sha256, vtpms });
            }
            Ok(out)
        })
    }

    /// The tenant whose certificate key has this SHA-256 (hex), with its vTPMs.
    pub fn tenant_by_key(&self, key_sha256: &str) -> Result<Option<Tenant>, RegistryError> {
        self.read(|db| {
            let rows = db.rows("SELECT name FROM tenants WHERE key_sha256 = $1", &[key_sha256.into()])?;
            let Some(name) = rows.first().and_then(|r| r.first()).and_then(text).map(str::to_string) else { return Ok(None) };
            let vtpms = vtpms_of(db, &name)?;
            Ok(Some(Tenant { name, key_sha256: key_sha256.to_string(), vtpms }))
        })
    }

    /// The tenant `vtpm` is bound to, if any.
    pub fn tenant_of(&self, vtpm: Uuid) -> Result<Option<String>, RegistryError> {
        self.read(|db| tenant_of_vtpm(db, vtpm))
    }
}
