//! xvtpm-attestd: the provider's attestation service. A tenant connects over HTTPS with a
//! client certificate (mutual TLS, verified against the tenant CA the provider configures),
//! is identified by the SHA-256 of that certificate's public key in the registry's tenants
//! (`xl-vtpm tenant add`), and may then fetch the host's enrollment material, have the host's
//! TPM activate its credentials, fetch the host's event log, list its own vTPMs and get deep
//! quotes of them (docs/attestation-service.md).
//!
//! Module map: [`tls`] (server configuration), [`limits`] (per-tenant token buckets),
//! [`provider`] (what the answers are made of: the manager's admin socket, the registry, the
//! event log, each vTPM's host-quote socket), [`server`] (connections, HTTP, routing).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod limits;
pub mod provider;
pub mod server;
pub mod tls;

use std::time::Duration;

/// The service's bounds on what a peer can make it do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A TLS handshake must finish within this long.
    pub handshake_timeout: Duration,
    /// A request's headers must arrive within this long.
    pub header_timeout: Duration,
    /// A request's body must arrive within this long after its headers.
    pub body_timeout: Duration,
    /// A connection is closed after this long, whatever it does.
    pub connection_lifetime: Duration,
    /// Requests per second each tenant may make on average.
    pub rate_per_sec: f64,
    /// Requests a tenant may make at once after a quiet period (the bucket's size).
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 512,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(300),
            rate_per_sec: 5.0,
            burst: 20,
        }
    }
}
