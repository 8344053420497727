//! The service's TLS: its own certificate chain and key, and client certificates required and
//! verified against the tenant CA file (TLS 1.3 only).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The server configuration: `cert` (PEM chain, leaf first), `key` (PEM), client certificates
/// required and chained to a certificate in `tenant_ca` (PEM).
pub fn server_config(cert: &Path, key: &Path, tenant_ca: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--cert {}: not PEM certificates", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("--cert {}: no certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("--key {}: no PEM private key", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tenant_ca).with_context(|| format!("--tenant-ca {}", tenant_ca.display()))? {
        roots.add(c.with_context(|| format!("--tenant-ca {}: not PEM certificates", tenant_ca.display()))?)
            .with_context(|| format!("--tenant-ca {}: not a usable CA certificate", tenant_ca.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("--tenant-ca {}: no certificate in it", tenant_ca.display());
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the client-certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("--cert/--key: the key does not fit the certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
