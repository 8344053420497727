//! **P2 through the attestation service**: the same deep quotes, asked by tenants over
//! HTTPS with client certificates (`xvtpm-attestd`), so every answer also crosses TLS, HTTP,
//! the tenant lookup, the rate limiter and the vTPM's host-quote socket.
//!
//! A test CA made here (rcgen) issues the service's certificate and one client certificate per
//! tenant; every tenant is registered with `xl-vtpm tenant add`, and the N vTPMs are bound one
//! each to the first N tenants (a vTPM has at most one tenant). All tenants run as tasks of one
//! tokio runtime in this process, each with its own `rustls::ClientConfig` (its own certificate)
//! and one keep-alive connection: a tenant that owns a vTPM loops deep-quote requests for it
//! (closed loop, a fresh random 32-byte nonce each); a tenant without one polls `GET /v1/vtpms`
//! once a second (what a tenant's monitoring does), so all of them hold a live, authenticated
//! connection during the window. Answers are verified offline after the window exactly as the
//! direct requesters' are (signature under the group's AK, Merkle path, nonce, vTPM UUID).
//! A 429 is never retried silently: it is counted, reported, and the tenant waits `Retry-After`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::sync::Semaphore;
use vtpm_proto::attest_api as api;

use super::{HOST_PCRS, Sample, VPCRS, Vt, random32};
use crate::procs::Procs;
use crate::{Args, Stack};

/// What the service cell saw besides the samples.
#[derive(Default)]
pub struct SvcStats {
    /// Tenants registered and connected.
    pub tenants: usize,
    /// Of which own a vTPM (and ask for deep quotes).
    pub quoting: usize,
    /// Certificates made (s).
    pub certs_secs: f64,
    /// `xl-vtpm tenant add` + `tenant bind`, all of them (s).
    pub register_secs: f64,
    /// All tenants connected (TLS handshake + one `GET /v1/vtpms` each) before the window (s).
    pub connect_secs: f64,
    /// Deep-quote answers that were not 200, by HTTP status (429 included).
    pub quote_statuses: BTreeMap<u16, usize>,
    /// Answers 429 (any request), and the seconds tenants then waited in all.
    pub rate_limited: usize,
    pub rate_wait_secs: f64,
    /// `GET /v1/vtpms` polls of tenants without a vTPM during the window, by status.
    pub polls: BTreeMap<u16, usize>,
    /// Connections the service had closed before the window (idle past its request timeout
    /// while the other tenants connected), reopened before the window.
    pub pre_reconnects: usize,
    /// The whole cell, certificates to verification (s).
    pub cell_secs: f64,
    /// Connections lost and made again during the window (each an error of the exchange).
    pub reconnects: usize,
    /// First transport errors (text), at most 5.
    pub net_errors: Vec<String>,
    /// The service's command line flags (for the method text).
    pub flags: String,
    /// Sockets the service had open halfway through the window (its `/proc/PID/fd`): the
    /// tenants' connections, its listener, the manager's admin socket if open.
    pub service_sockets: usize,
}

/// The flags the service runs with in this cell. `--max-connections` must exceed the tenant
/// count: every tenant keeps its connection open, so with the default (512) the tenants beyond
/// it would wait in the kernel's accept queue for the whole window. Rate and burst stay at the
/// defaults (5/s, 20): a closed-loop deep-quote requester makes at most one request per
/// physical-quote round, the pollers one a second.
pub fn service_flags(tenants: usize) -> Vec<String> {
    vec![
        "--max-connections".into(),
        (tenants + 64).to_string(),
        "--rate".into(),
        "5".into(),
        "--burst".into(),
        "20".into(),
    ]
}

/// A test CA: certificate and key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn make_ca() -> Result<Ca> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "xvtpm-bench test CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// A leaf (ECDSA P-256) issued by `ca`: (certificate DER, PKCS#8 key DER, certificate PEM,
/// key PEM).
fn make_leaf(ca: &Ca, name: &str, server: bool) -> Result<(Vec<u8>, Vec<u8>, String, String)> {
    let mut p = CertificateParams::new(if server {
        vec!["localhost".to_string()]
    } else {
        vec![]
    })?;
    p.distinguished_name.push(DnType::CommonName, name);
    if server {
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    Ok((
        cert.der().to_vec(),
        key.serialize_der(),
        cert.pem(),
        key.serialize_pem(),
    ))
}

/// One tenant as the bench drives it.
struct Tenant {
    name: String,
    tls: tokio_rustls::TlsConnector,
    /// Index into the vTPMs, if it owns one.
    vtpm: Option<usize>,
}

/// The running service: its PID and port.
pub struct Service {
    pub pid: u32,
    pub port: u16,
}

/// Starts `xvtpm-attestd` on a free loopback port with `flags`; waits for its ready line.
fn start_service(
    stack: &Stack,
    procs: &mut Procs,
    dir: &Path,
    flags: &[String],
    log: &Path,
) -> Result<Service> {
    let logf = std::fs::File::create(log)?;
    let event_log = dir.join("eventlog.bin");
    std::fs::write(&event_log, b"bench: no event log")?;
    let (pid, out) = procs.spawn_piped(
        Command::new(stack.bin.join("xvtpm-attestd"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(dir.join("server.pem"))
            .arg("--key")
            .arg(dir.join("server.key"))
            .arg("--tenant-ca")
            .arg(dir.join("tenant-ca.pem"))
            .arg("--run-dir")
            .arg(&stack.run_dir)
            .arg("--state-dir")
            .arg(&stack.state_dir)
            .arg("--event-log")
            .arg(&event_log)
            .args(flags)
            .env("XVTPM_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(logf),
    )?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
        anyhow!(
            "xvtpm-attestd did not start ({e}): {}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    let port = v["listen"]
        .as_str()
        .and_then(|l| l.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| anyhow!("xvtpm-attestd ready line without a port: {line}"))?;
    Ok(Service { pid, port })
}

/// Makes the certificates, registers and binds the tenants, starts the service.
pub fn setup(
    args: &Args,
    stack: &Stack,
    procs: &mut Procs,
    vts: &[Vt],
    tenants: usize,
    stats: &mut SvcStats,
) -> Result<(Service, Vec<TenantsOut>)> {
    let dir = args.work.join("p2-service");
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let svc_ca = make_ca()?;
    let tenant_ca = make_ca()?;
    std::fs::write(dir.join("service-ca.pem"), svc_ca.cert.pem())?;
    std::fs::write(dir.join("tenant-ca.pem"), tenant_ca.cert.pem())?;
    let (_, _, spem, skey) = make_leaf(&svc_ca, "localhost", true)?;
    std::fs::write(dir.join("server.pem"), spem)?;
    std::fs::write(dir.join("server.key"), skey)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(svc_ca.cert.der().to_vec()))?;
    let roots = Arc::new(roots);
    let mut out = Vec::with_capacity(tenants);
    let certs_dir = dir.join("tenants");
    std::fs::create_dir_all(&certs_dir)?;
    for i in 0..tenants {
        let name = format!("t{i:04}");
        let (der, key, pem, _) = make_leaf(&tenant_ca, &name, false)?;
        let file = certs_dir.join(format!("{name}.pem"));
        std::fs::write(&file, pem)?;
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(
                vec![CertificateDer::from(der)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )?;
        out.push(TenantsOut {
            name,
            cert_file: file,
            cfg: Arc::new(cfg),
            vtpm: (i < vts.len()).then_some(i),
        });
    }
    stats.certs_secs = t.elapsed().as_secs_f64();
    // Registration: `xl-vtpm tenant add` and `tenant bind`, as a provider does it (8 at a time:
    // the registry's writers wait for each other, the process start-ups need not).
    let t = Instant::now();
    let register = |tn: &TenantsOut| -> Result<()> {
        let o = stack.xl(&[
            "tenant",
            "add",
            &tn.name,
            "--cert",
            tn.cert_file.to_str().unwrap_or_default(),
        ])?;
        if !o.status.success() {
            bail!(
                "xl-vtpm tenant add {}: {}",
                tn.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if let Some(v) = tn.vtpm {
            let o = stack.xl(&["tenant", "bind", &tn.name, &vts[v].uuid.to_string()])?;
            if !o.status.success() {
                bail!(
                    "xl-vtpm tenant bind {}: {}",
                    tn.name,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        Ok(())
    };
    std::thread::scope(|sc| {
        let hs: Vec<_> = out
            .chunks(out.len().div_ceil(8).max(1))
            .map(|part| sc.spawn(move || part.iter().try_for_each(register)))
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow!("registration thread panicked"))?
        })
    })?;
    stats.register_secs = t.elapsed().as_secs_f64();
    let flags = service_flags(tenants);
    stats.flags = flags.join(" ");
    let svc = start_service(
        stack,
        procs,
        &dir,
        &flags,
        &args.work.join("p2-attestd.log"),
    )?;
    Ok((svc, out))
}

/// A tenant made by [`setup`].
pub struct TenantsOut {
    name: String,
    cert_file: PathBuf,
    cfg: Arc<rustls::ClientConfig>,
    vtpm: Option<usize>,
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(port: u16, tls: &tokio_rustls::TlsConnector) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connect")?;
    tcp.set_nodelay(true).ok();
    let name = ServerName::try_from("localhost").expect("valid name");
    let s = tls.connect(name, tcp).await.context("TLS")?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .context("HTTP")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One exchange on a keep-alive connection: status, Retry-After, body.
async fn exchange(
    send: &mut Sender,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Option<u64>, Bytes)> {
    send.ready().await.context("connection")?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let rsp = send.send_request(req).await.context("request")?;
    let status = rsp.status().as_u16();
    let retry = rsp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let b = Limited::new(rsp.into_body(), 64 << 10)
        .collect()
        .await
        .map_err(|e| anyhow!("body: {e}"))?
        .to_bytes();
    Ok((status, retry, b))
}

/// What one tenant task returns.
#[derive(Default)]
struct TaskOut {
    samples: Vec<(bool, Sample)>,
    censored: Vec<u64>,
    quote_statuses: BTreeMap<u16, usize>,
    polls: BTreeMap<u16, usize>,
    rate_limited: usize,
    rate_wait: f64,
    reconnects: usize,
    errors: Vec<String>,
}

/// Runs the tenants against the service: connect all, then the window, then the drain.
/// Returns the samples (first request of each tenant flagged) and the censored ages.
#[allow(clippy::type_complexity)]
pub fn run(
    args: &Args,
    svc: &Service,
    tenants: Vec<TenantsOut>,
    vts: &[Vt],
    window: Duration,
    stats: &mut SvcStats,
) -> Result<(Vec<(bool, Sample)>, Vec<u64>, Duration)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let uuids: Arc<Vec<uuid::Uuid>> = Arc::new(vts.iter().map(|v| v.uuid).collect());
    let drain = Duration::from_secs_f64(args.p2_drain_secs);
    let (port, svc_pid) = (svc.port, svc.pid);
    stats.tenants = tenants.len();
    stats.quoting = tenants.iter().filter(|t| t.vtpm.is_some()).count();
    let tenants: Vec<Tenant> = tenants
        .into_iter()
        .map(|t| Tenant {
            name: t.name,
            tls: tokio_rustls::TlsConnector::from(t.cfg),
            vtpm: t.vtpm,
        })
        .collect();
    rt.block_on(async move {
        // 1. Every tenant connects and checks who the service thinks it is (64 handshakes at once).
        let t = Instant::now();
        let gate = Arc::new(Semaphore::new(64));
        let mut hs = Vec::with_capacity(tenants.len());
        for tn in tenants {
            let (gate, uuids) = (gate.clone(), uuids.clone());
            hs.push(tokio::spawn(async move {
                let _p = gate.acquire().await.expect("open");
                let mut send = connect(port, &tn.tls)
                    .await
                    .with_context(|| format!("tenant {}", tn.name))?;
                let (st, _, b) = exchange(&mut send, "GET", api::PATH_VTPMS, vec![]).await?;
                let l: api::VtpmList = serde_json::from_slice(&b).map_err(|e| {
                    anyhow!(
                        "tenant {}: GET /v1/vtpms: HTTP {st}: {e}: {}",
                        tn.name,
                        String::from_utf8_lossy(&b)
                    )
                })?;
                let want: Vec<uuid::Uuid> = tn.vtpm.map(|v| vec![uuids[v]]).unwrap_or_default();
                if l.tenant != tn.name || l.vtpms != want {
                    bail!(
                        "tenant {}: the service says tenant {:?} with {:?}",
                        tn.name,
                        l.tenant,
                        l.vtpms
                    );
                }
                Ok::<_, anyhow::Error>((tn, send))
            }));
        }
        let mut connected = Vec::with_capacity(hs.len());
        for h in hs {
            connected.push(h.await??);
        }
        // 2. One more request each, all at once, just before the window: the service closes a
        // connection idle for longer than its --request-timeout, and the first tenants may
        // have waited that long for the last ones. A closed connection is reopened here,
        // outside the window, and counted.
        let mut hs = Vec::with_capacity(connected.len());
        for (tn, mut send) in connected {
            hs.push(tokio::spawn(async move {
                let again = match exchange(&mut send, "GET", api::PATH_VTPMS, vec![]).await {
                    Ok((200, _, _)) => false,
                    _ => {
                        send = connect(port, &tn.tls)
                            .await
                            .with_context(|| format!("tenant {}: reconnect", tn.name))?;
                        let (st, _, _) =
                            exchange(&mut send, "GET", api::PATH_VTPMS, vec![]).await?;
                        if st != 200 {
                            bail!("tenant {}: GET /v1/vtpms: HTTP {st}", tn.name);
                        }
                        true
                    }
                };
                Ok::<_, anyhow::Error>((tn, send, again))
            }));
        }
        let mut ready = Vec::with_capacity(hs.len());
        for h in hs {
            let (tn, send, again) = h.await??;
            stats.pre_reconnects += usize::from(again);
            ready.push((tn, send));
        }
        stats.connect_secs = t.elapsed().as_secs_f64();
        // 3. The window: quoters loop, pollers poll once a second (their first poll spread
        // over the first second).
        let t0 = Instant::now();
        let n_ready = ready.len();
        // Halfway through the window: the service's open sockets (all tenants connected at once?).
        let pid = svc_pid;
        let probe = tokio::spawn(async move {
            tokio::time::sleep(window / 2).await;
            open_sockets(pid)
        });
        let mut hs = Vec::with_capacity(n_ready);
        for (k, (tn, send)) in ready.into_iter().enumerate() {
            let uuids = uuids.clone();
            let phase = Duration::from_millis((k as u64 * 1000) / n_ready.max(1) as u64);
            hs.push(tokio::spawn(tenant_loop(
                tn, send, port, uuids, t0, window, drain, phase,
            )));
        }
        let mut all = TaskOut::default();
        for h in hs {
            let o = h.await?;
            all.samples.extend(o.samples);
            all.censored.extend(o.censored);
            for (k, v) in o.quote_statuses {
                *all.quote_statuses.entry(k).or_default() += v;
            }
            for (k, v) in o.polls {
                *all.polls.entry(k).or_default() += v;
            }
            all.rate_limited += o.rate_limited;
            all.rate_wait += o.rate_wait;
            all.reconnects += o.reconnects;
            for e in o.errors {
                if all.errors.len() < 5 {
                    all.errors.push(e);
                }
            }
        }
        let stop = t0.elapsed();
        stats.service_sockets = probe.await?;
        stats.quote_statuses = all.quote_statuses;
        stats.polls = all.polls;
        stats.rate_limited = all.rate_limited;
        stats.rate_wait_secs = all.rate_wait;
        stats.reconnects = all.reconnects;
        stats.net_errors = all.errors;
        Ok((all.samples, all.censored, stop))
    })
}

#[allow(clippy::too_many_arguments)]
async fn tenant_loop(
    tn: Tenant,
    mut send: Sender,
    port: u16,
    uuids: Arc<Vec<uuid::Uuid>>,
    t0: Instant,
    window: Duration,
    drain: Duration,
    phase: Duration,
) -> TaskOut {
    let mut o = TaskOut::default();
    let deadline = tokio::time::Instant::from_std(t0 + window + drain);
    let mut next_poll = t0 + phase;
    let mut first = true;
    loop {
        if tn.vtpm.is_none() {
            // A poller: once a second.
            let now = Instant::now();
            if next_poll > now {
                tokio::time::sleep(next_poll - now).await;
            }
            next_poll += Duration::from_secs(1);
        }
        let start = t0.elapsed();
        if start >= window {
            break;
        }
        let (path, body, nonce) = match tn.vtpm {
            Some(v) => {
                let nonce = random32();
                let req = api::QuoteRequest {
                    nonce: hex::encode(nonce),
                    vpcrs: VPCRS.to_vec(),
                    host_pcrs: HOST_PCRS.to_vec(),
                };
                (
                    api::quote_path(&uuids[v]),
                    serde_json::to_vec(&req).expect("serialisable"),
                    Some((v, nonce)),
                )
            }
            None => (api::PATH_VTPMS.to_string(), vec![], None),
        };
        let method = if nonce.is_some() { "POST" } else { "GET" };
        let r = tokio::time::timeout_at(deadline, exchange(&mut send, method, &path, body)).await;
        let end = t0.elapsed();
        let r = match r {
            Err(_) => {
                // Still outstanding after the drain: censored at its age.
                if nonce.is_some() {
                    o.censored.push((end - start).as_nanos() as u64);
                }
                break;
            }
            Ok(r) => r,
        };
        match r {
            Err(e) => {
                if o.errors.len() < 5 {
                    o.errors.push(format!("tenant {}: {e:#}", tn.name));
                }
                o.reconnects += 1;
                match connect(port, &tn.tls).await {
                    Ok(s) => send = s,
                    Err(e) => {
                        o.errors
                            .push(format!("tenant {}: reconnect: {e:#}", tn.name));
                        break;
                    }
                }
            }
            Ok((status, retry, b)) => {
                if status == 429 {
                    o.rate_limited += 1;
                }
                match nonce {
                    None => *o.polls.entry(status).or_default() += 1,
                    Some((v, nonce)) if status == 200 => {
                        let bundle = serde_json::from_slice::<api::QuoteResponse>(&b)
                            .ok()
                            .and_then(|r| hex::decode(r.bundle).ok());
                        o.samples.push((
                            first,
                            Sample {
                                vtpm: v,
                                start: start.as_nanos() as u64,
                                end: Some(end.as_nanos() as u64),
                                nonce,
                                // Not a bundle: verification reports it as a failure.
                                rsp: bundle.unwrap_or_default(),
                                bundle: true,
                            },
                        ));
                        first = false;
                    }
                    Some(_) => *o.quote_statuses.entry(status).or_default() += 1,
                }
                if let Some(s) = retry.filter(|_| status == 429 || status == 503) {
                    let wait = Duration::from_secs(s.min(30));
                    o.rate_wait += wait.as_secs_f64();
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    o
}

/// Sockets the service process has open (its connections and listener).
pub fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}
