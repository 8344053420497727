//! Connections and requests: TLS with a client certificate, one HTTP/1.1 connection per TLS
//! session, every request routed ([`vtpm_proto::attest_api::route`]), its tenant identified by
//! the client certificate's key, rate-limited, its body bounded before it is read.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use vtpm_proto::attest_api::{self as api, Route, RouteError};
use xl_tools::registry::Tenant;
use xvtpm_log::{guest_info, guest_warn};

use crate::Limits;
use crate::limits::RateLimiter;
use crate::provider::{ApiError, Provider};

/// The one answer for a vTPM the tenant is not bound to, whether or not it exists: the tenant
/// learns nothing about other tenants' vTPMs.
pub const NOT_YOURS: &str = "this vTPM is not one of yours (GET /v1/vtpms lists yours)";

/// Everything a request handler needs.
pub struct State {
    /// The provider side.
    pub provider: Provider,
    /// Bounds.
    pub limits: Limits,
    /// Per-tenant rate limits.
    pub rate: RateLimiter,
}

/// Serves `listener` until the process ends.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(state.limits.max_connections.max(1)));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        // Only accept with a free slot: past the cap, connections wait in the kernel's queue.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                guest_warn!(error = %e, "accept failed; pausing");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tcp.set_nodelay(true).ok();
        let (acceptor, st) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(st.limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    guest_info!(%peer, error = %e, "TLS handshake refused (a client certificate from the tenant CA is required)");
                    return;
                }
                Err(_) => {
                    guest_info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let key = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| fingerprint(c.as_ref()));
            let s2 = st.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (st, key) = (s2.clone(), key.clone());
                async move { Ok::<_, Infallible>(handle(&st, key.as_deref(), req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(st.limits.header_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tls), svc);
            if tokio::time::timeout(st.limits.connection_lifetime, conn).await.is_err() {
                guest_info!(%peer, "closed a connection at the end of its lifetime");
            }
        });
    }
}

/// SHA-256 (hex) of a certificate's SubjectPublicKeyInfo; `None`-equivalent (empty) if the
/// certificate does not parse (the tenant then is unknown).
pub fn fingerprint(cert_der: &[u8]) -> String {
    xl_tools::tenant::key_fingerprint(cert_der).unwrap_or_default()
}

fn json_response(status: u16, body: Vec<u8>, content_type: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_str(content_type).expect("ASCII"));
    r
}

fn error_response(e: ApiError) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&api::ErrorBody { version: api::API_VERSION, error: e.message }).expect("serialisable");
    let mut r = json_response(e.status, body, "application/json");
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(hyper::header::RETRY_AFTER, s.into());
    }
    if e.status == 413 || e.status == 408 {
        // The rest of the body is never read: the connection cannot carry another request.
        r.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    }
    r
}

/// Answers one request.
pub async fn handle(st: &State, key: Option<&str>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match answer(st, key, req).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn read_body(st: &State, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_big = || ApiError::new(413, format!("request body larger than {} bytes", api::MAX_BODY));
    // Checked before anything is read: a declared length over the cap is refused unread.
    if let Some(n) = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && n > api::MAX_BODY as u64
    {
        return Err(too_big());
    }
    match tokio::time::timeout(st.limits.body_timeout, Limited::new(req.into_body(), api::MAX_BODY).collect()).await {
        Err(_) => Err(ApiError::new(408, "the request body did not arrive in time")),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Ok(Err(e)) => Err(ApiError::new(400, format!("reading the request body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn answer(st: &State, key: Option<&str>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let route = api::route(req.method().as_str(), req.uri().path()).map_err(|e| match e {
        RouteError::NotFound => ApiError::new(404, "no such endpoint (the API is under /v1/)"),
        RouteError::Method => ApiError::new(405, "method not allowed on this endpoint"),
    })?;
    let key = key.filter(|k| !k.is_empty()).ok_or_else(|| ApiError::new(401, "a client certificate is required"))?.to_string();
    let tenant: Tenant = {
        // The registry is a blocking client; one lookup per request.
        let found = tokio::task::block_in_place(|| st.provider.tenant(&key))?;
        found.ok_or_else(|| {
            guest_info!(key_sha256 = %key, "refused a client certificate whose key is not a registered tenant's");
            ApiError::new(403, "this client certificate's key is not registered as a tenant (the provider adds it with `xl-vtpm tenant add`)")
        })?
    };
    if let Err(wait) = st.rate.take(&tenant.name) {
        guest_info!(tenant = %tenant.name, "rate limit reached");
        return Err(ApiError { status: 429, message: "rate limit reached; retry after the time in Retry-After".into(), retry_after: Some(wait.as_secs().max(1)) });
    }
    let body = read_body(st, req).await?;
    let bad = |m: String| ApiError::new(400, m);
    match route {
        Route::Enrollment => {
            let m = tokio::task::block_in_place(|| st.provider.material())?;
            Ok(json_response(200, m, "application/json"))
        }
        Route::Activate => {
            let a = api::ActivateRequest::parse(&body).map_err(bad)?;
            let secret = tokio::task::block_in_place(|| st.provider.activate(&a))?;
            let r = api::ActivateResponse { version: api::API_VERSION, secret: hex::encode(secret) };
            Ok(json_response(200, serde_json::to_vec(&r).expect("serialisable"), "application/json"))
        }
        Route::EventLog => {
            let log = tokio::task::block_in_place(|| st.provider.event_log())?;
            Ok(json_response(200, log, "application/octet-stream"))
        }
        Route::Vtpms => {
            let r = api::VtpmList { version: api::API_VERSION, tenant: tenant.name, vtpms: tenant.vtpms };
            Ok(json_response(200, serde_json::to_vec(&r).expect("serialisable"), "application/json"))
        }
        Route::DeepQuote(vtpm) => {
            if !tenant.vtpms.contains(&vtpm) {
                return Err(ApiError::new(403, NOT_YOURS));
            }
            let cmd = api::QuoteRequest::parse(&body).map_err(bad)?;
            let bundle = st.provider.deep_quote(vtpm, &cmd).await?;
            let r = api::QuoteResponse { version: api::API_VERSION, bundle: hex::encode(bundle) };
            Ok(json_response(200, serde_json::to_vec(&r).expect("serialisable"), "application/json"))
        }
    }
}
