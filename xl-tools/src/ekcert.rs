//! `xl-vtpm mgr group ca-cert` and `xl-vtpm verify-ekcert`: a group's EK CA for trust stores,
//! and the offline check of a vTPM's EK certificate (see `vtpm_attest::ekcert`).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use vtpm_attest::ekcert::{self, EkCertInfo};
use vtpm_proto::ekcert::{CertError, Certificate};
use vtpm_proto::mgr::CaCertify;
use vtpm_proto::mgr::GroupCaInfo;

use crate::exit::{CliError, FAILURE, USAGE};
use crate::guest::{NOT_VERIFIED, read_bytes_or_hex};

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::caused(USAGE, format!("{flag} {}", path.display()), e))
}

fn write(path: &Path, bytes: &[u8], flag: &str) -> Result<(), CliError> {
    std::fs::write(path, bytes).map_err(|e| CliError::caused(FAILURE, format!("{flag} {}", path.display()), e))
}

/// Writes the CA certificate (PEM, or DER with `der`) to `out` and, with `certify`, the
/// certification evidence (JSON) to that file.
pub fn write_ca(info: &GroupCaInfo, out: &Path, der: bool, certify: Option<&Path>) -> Result<(), CliError> {
    let cert = hex::decode(&info.cert).map_err(|_| CliError::new(FAILURE, "the manager sent a CA certificate that is not hex"))?;
    if der {
        write(out, &cert, "--out")?;
    } else {
        let pem = vtpm_proto::ekcert::to_pem(&cert).map_err(|e| CliError::caused(FAILURE, "", e))?;
        write(out, pem.as_bytes(), "--out")?;
    }
    if let Some(p) = certify {
        let json = serde_json::to_vec_pretty(&info.certify).expect("serialisable");
        write(p, &json, "--certify")?;
    }
    Ok(())
}

/// What `verify-ekcert` checks besides the signature chain.
pub struct Checks<'a> {
    /// The EK's public area (`tpm2_readpublic -o`), to compare with the certified key.
    pub ek_public: Option<&'a Path>,
    /// The CA certification evidence and the group AK it must be signed by.
    pub certify: Option<(&'a Path, &'a Path)>,
}

fn not_verified(e: CertError) -> CliError {
    CliError::caused(NOT_VERIFIED, "not verified", e)
}

/// Verifies the EK certificate at `cert` against the CA certificate at `ca` (PEM or DER each),
/// then the optional [`Checks`]. Exit code 7 if anything does not verify.
pub fn verify(cert: &Path, ca: &Path, checks: &Checks<'_>) -> Result<EkCertInfo, CliError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let ca_bytes = read(ca, "--ca")?;
    let ca_cert = Certificate::from_pem_or_der(&ca_bytes).map_err(|e| CliError::caused(USAGE, format!("--ca {}", ca.display()), e))?;
    let ek_cert = Certificate::from_pem_or_der(&read(cert, "certificate")?)
        .map_err(|e| CliError::caused(NOT_VERIFIED, format!("{}: not an X.509 certificate", cert.display()), e))?;
    let info = ekcert::verify_ek_cert(&ek_cert, &ca_cert, now).map_err(not_verified)?;
    if let Some(p) = checks.ek_public {
        ekcert::check_ek_matches(&ek_cert, &read_bytes_or_hex(p, "--ek")?).map_err(not_verified)?;
    }
    if let Some((ev_path, ak_path)) = checks.certify {
        let ev: CaCertify = serde_json::from_slice(&read(ev_path, "--certify")?)
            .map_err(|e| CliError::caused(USAGE, format!("--certify {}: not CA certification evidence", ev_path.display()), e))?;
        let ak = read_bytes_or_hex(ak_path, "--ak")?;
        ekcert::verify_ca_certify(&ca_cert.der, &ev, &ak).map_err(not_verified)?;
    }
    Ok(info)
}
