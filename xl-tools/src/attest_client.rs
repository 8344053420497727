//! `xl-vtpm attest`: the tenant's side of the attestation service (`xvtpm-attestd`,
//! docs/attestation-service.md). Starting from nothing but the TPM vendor's root and its own
//! policy, the tenant enrolls the host through the service if it has not pinned the host's AKs
//! yet (EK chain, AK attributes, credential activation answered by the host's TPM through
//! the service), fetches the host's event log, asks for a deep quote of its vTPM with a fresh
//! random nonce and verifies it with `xl-vtpm verify`'s checks and exit codes. Nothing the
//! service says is trusted: the same checks run as for files handed over out of band.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use uuid::Uuid;
use vtpm_proto::attest_api as api;

use crate::attest::{Activator, EnrollInput, VerifyArgs};
use crate::exit::{Cause, CliError, FAILURE, USAGE};

/// How long one call to the service may take (a deep quote waits for a Merkle round).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest answer read from the service (an event log is at most 8 MiB).
pub const MAX_ANSWER: usize = vtpm_attest::eventlog::MAX_LOG + 4096;

/// Options of `xl-vtpm attest`.
#[derive(clap::Args, Debug)]
pub struct AttestArgs {
    /// The provider's attestation service, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub service: String,
    /// FILE: your client certificate (PEM) — its key is how the provider knows you.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// FILE: your client certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// FILE: the CA certificate (PEM) the service's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub service_ca: PathBuf,
    /// FILE: a TPM vendor's root CA certificate (PEM or DER); repeatable. Needed when the host
    /// is not enrolled in --trust-store yet.
    #[arg(long = "ek-ca", value_name = "FILE")]
    pub ek_ca: Vec<PathBuf>,
    /// FILE: an intermediate CA certificate of the EK chain; repeatable.
    #[arg(long = "ek-intermediate", value_name = "FILE")]
    pub ek_intermediate: Vec<PathBuf>,
    /// DIR: your trust store (`xl-vtpm enroll`'s); the host's AKs are pinned there on first use.
    #[arg(long, value_name = "DIR", env = "XVTPM_TRUST_STORE")]
    pub trust_store: PathBuf,
    /// The vTPM to attest (one of yours: GET /v1/vtpms).
    #[arg(long, value_name = "UUID")]
    pub vtpm: String,
    /// vPCRs to quote (e.g. 0-7,16).
    #[arg(long, default_value = "0-7")]
    pub vpcrs: String,
    /// Host PCRs to quote.
    #[arg(long, default_value = "0-7")]
    pub host_pcrs: String,
    /// FILE: required host PCR values (as `verify --host-pcrs-policy`).
    #[arg(long, value_name = "FILE")]
    pub host_pcrs_policy: Option<PathBuf>,
    /// FILE: required vPCR values (as `verify --vpcrs-policy`).
    #[arg(long, value_name = "FILE")]
    pub vpcrs_policy: Option<PathBuf>,
    /// FILE: an event-log policy; the host's event log is fetched from the service and must
    /// replay to the quoted host PCRs (as `verify --event-log --event-log-policy`).
    #[arg(long, value_name = "FILE")]
    pub event_log_policy: Option<PathBuf>,
    /// DIR: keep the evidence (`evidence.bin`), the event log (`eventlog.bin`) and the nonce
    /// (`nonce.hex`) there for audit; default: a temporary directory, removed.
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,
}

/// A client of the service: one TLS connection per call.
pub struct Client {
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    rt: tokio::runtime::Runtime,
}

fn usage(m: String) -> CliError {
    CliError::new(USAGE, m)
}

impl Client {
    /// Connects nothing yet: reads the certificates and keys and checks the URL.
    pub fn new(service: &str, cert: &Path, key: &Path, service_ca: &Path) -> Result<Client, CliError> {
        let rest = service
            .strip_prefix("https://")
            .ok_or_else(|| usage(format!("--service {service:?}: use https://HOST:PORT")))?
            .trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| usage(format!("--service {service:?}: use https://HOST:PORT")))?;
        let port: u16 = port.parse().map_err(|_| usage(format!("--service {service:?}: bad port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| CliError::caused(USAGE, format!("--cert {}", cert.display()), e))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| CliError::caused(USAGE, format!("--key {}", key.display()), e))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(service_ca).map_err(|e| CliError::caused(USAGE, format!("--service-ca {}", service_ca.display()), e))? {
            let c = c.map_err(|e| CliError::caused(USAGE, format!("--service-ca {}", service_ca.display()), e))?;
            roots.add(c).map_err(|e| CliError::caused(USAGE, format!("--service-ca {}", service_ca.display()), e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CliError::caused(USAGE, "TLS", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| CliError::caused(USAGE, "--cert/--key", e))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::caused(FAILURE, "runtime", e))?;
        Ok(Client { host, port, tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)), rt })
    }

    /// One request; the status and the body (at most [`MAX_ANSWER`] bytes).
    pub fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), CliError> {
        let net = |e: Cause| CliError::caused(FAILURE, format!("attestation service {}:{}", self.host, self.port), e);
        let run = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| net(e.into()))?;
            let name = ServerName::try_from(self.host.clone()).map_err(|e| CliError::caused(USAGE, "--service host", e))?;
            let tls = self.tls.connect(name, tcp).await.map_err(|e| net(CliError::caused(FAILURE, "TLS", e).into()))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| net(e.into()))?;
            let driver = tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| net(e.into()))?;
            let rsp = send.send_request(req).await.map_err(|e| net(e.into()))?;
            let status = rsp.status().as_u16();
            let b = Limited::new(rsp.into_body(), MAX_ANSWER).collect().await.map_err(|e| net(CliError::caused(FAILURE, "reading the answer", e).into()))?.to_bytes();
            driver.abort();
            Ok::<_, CliError>((status, b))
        };
        self.rt.block_on(async { tokio::time::timeout(CALL_TIMEOUT, run).await.map_err(|_| net("no answer in time".into()))? })
    }

    /// A successful call's body, or the service's error as a [`CliError`].
    pub fn ok(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, CliError> {
        let (status, b) = self.call(method, path, body)?;
        if status == 200 {
            return Ok(b);
        }
        let msg = serde_json::from_slice::<api::ErrorBody>(&b).map(|e| e.error).unwrap_or_else(|_| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned());
        let code = match status {
            400 | 401 | 404 | 405 => USAGE,
            403 => crate::exit::REFUSED,
            _ => FAILURE,
        };
        Err(CliError::new(code, format!("attestation service: {method} {path}: HTTP {status}: {msg}")))
    }
}

impl Activator for Client {
    fn activate(&mut self, group: &Uuid, blob: &[u8], encrypted_secret: &[u8]) -> Result<Vec<u8>, CliError> {
        let req = api::ActivateRequest { group: *group, credential_blob: hex::encode(blob), encrypted_secret: hex::encode(encrypted_secret) };
        let (status, b) = self.call("POST", api::PATH_ACTIVATE, Some(serde_json::to_vec(&req).expect("serialisable")))?;
        let failed = |why: Cause| crate::attest::not_verified("credential activation", CliError::caused(FAILURE, "the host's TPM did not activate the credential", why));
        if status != 200 {
            let msg = serde_json::from_slice::<api::ErrorBody>(&b).map(|e| e.error).unwrap_or_else(|_| format!("HTTP {status}"));
            return Err(failed(msg.into()));
        }
        let r: api::ActivateResponse = serde_json::from_slice(&b).map_err(|e| failed(CliError::caused(FAILURE, "malformed answer", e).into()))?;
        hex::decode(&r.secret).map_err(|_| failed("the secret is not hex".into()))
    }
}

fn write(dir: &Path, name: &str, b: &[u8]) -> Result<PathBuf, CliError> {
    let p = dir.join(name);
    std::fs::write(&p, b).map_err(|e| CliError::caused(FAILURE, p.display().to_string(), e))?;
    Ok(p)
}

/// Whether `store` has an AK pinned for `host_id`.
fn enrolled(store: &Path, host_id: &str) -> bool {
    let ok = host_id.len() == 64 && host_id.bytes().all(|b| b.is_ascii_hexdigit());
    ok && std::fs::read_dir(store.join(host_id)).is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))))
}

/// `xl-vtpm attest`: exit codes as `xl-vtpm verify` (0 verified with a host policy checked,
/// 7 a check failed — enrollment's included, naming the check —, 8 no host policy).
pub fn run(a: &AttestArgs, json: bool) -> Result<(), CliError> {
    let vtpm = crate::local::parse_uuid(&a.vtpm, "--vtpm")?;
    let vpcrs = crate::guest::parse_pcr_list(&a.vpcrs, "--vpcrs")?;
    let host_pcrs = crate::guest::parse_pcr_list(&a.host_pcrs, "--host-pcrs")?;
    let mut client = Client::new(&a.service, &a.cert, &a.key, &a.service_ca)?;
    let tmp;
    let dir = match &a.save {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| CliError::caused(FAILURE, format!("--save {}", d.display()), e))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| CliError::caused(FAILURE, "temporary directory", e))?;
            tmp.path().to_path_buf()
        }
    };
    // 1. Enrollment, unless the host's AKs are pinned already.
    let material = client.ok("GET", api::PATH_ENROLLMENT, None)?;
    let host_id = serde_json::from_slice::<crate::attest::Material>(&material).map(|m| m.host_id).unwrap_or_default();
    if !enrolled(&a.trust_store, &host_id) {
        if a.ek_ca.is_empty() {
            return Err(usage("the host is not enrolled in --trust-store yet: --ek-ca FILE (the TPM vendor's root) is required".into()));
        }
        let input = EnrollInput {
            material: Path::new("(the service's enrollment material)"),
            ek_cas: &a.ek_ca,
            ek_intermediates: &a.ek_intermediate,
            group: None,
            trust_store: &a.trust_store,
        };
        let pinned = crate::attest::enroll_material(&mut client, &material, &input)?;
        for p in &pinned {
            eprintln!("xl-vtpm: enrolled host {} group {} through the service: AK {} activated and pinned", p.host_id, p.group_name, p.ak_name);
        }
    }
    // 2. The host's event log, if the policy needs it.
    let event_log = match &a.event_log_policy {
        Some(_) => Some(write(&dir, "eventlog.bin", &client.ok("GET", api::PATH_EVENTLOG, None)?)?),
        None => None,
    };
    // 3. A deep quote with a fresh random nonce.
    let mut nonce = [0u8; 32];
    rand_fill(&mut nonce);
    let req = api::QuoteRequest { nonce: hex::encode(nonce), vpcrs, host_pcrs };
    let b = client.ok("POST", &api::quote_path(&vtpm), Some(serde_json::to_vec(&req).expect("serialisable")))?;
    let r: api::QuoteResponse = serde_json::from_slice(&b).map_err(|e| CliError::caused(crate::guest::NOT_VERIFIED, "the service's answer is not a deep quote", e))?;
    let bundle = hex::decode(&r.bundle).map_err(|_| CliError::new(crate::guest::NOT_VERIFIED, "the service's evidence is not hex"))?;
    let evidence = write(&dir, "evidence.bin", &bundle)?;
    write(&dir, "nonce.hex", hex::encode(nonce).as_bytes())?;
    // 4. The verifier, unchanged.
    let v = VerifyArgs {
        file: evidence,
        nonce: hex::encode(nonce),
        vtpm: Some(vtpm.to_string()),
        any_vtpm: false,
        trust_store: Some(a.trust_store.clone()),
        ak: None,
        insecure_unenrolled_ak: false,
        host_pcrs_policy: a.host_pcrs_policy.clone(),
        vpcrs_policy: a.vpcrs_policy.clone(),
        event_log,
        event_log_policy: a.event_log_policy.clone(),
        // The guest's own log lives in the guest, not with the service: verify it with
        // `xl-vtpm verify --guest-event-log` on the evidence this command keeps.
        guest_event_log: None,
        guest_event_log_policy: None,
        guest_ima_log: None,
    };
    crate::attest::run_verify(&v, json)
}

fn rand_fill(b: &mut [u8]) {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(b)).expect("read /dev/urandom");
}
