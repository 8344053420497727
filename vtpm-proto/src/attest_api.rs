//! The attestation service's HTTP API (`xvtpm-attestd`, docs/attestation-service.md): the
//! JSON bodies and path parameters of `/v1/…`, parsed here once (checked constructors) by the
//! service and built by the tenant's client (`xl-vtpm attest`). No I/O.
//!
//! | Method and path | Request | Response |
//! |---|---|---|
//! | `GET /v1/enrollment` | — | enrollment material (`xvtpm-enrollment-v1`, as `xl-vtpm mgr enrollment`) |
//! | `POST /v1/activate` | [`ActivateRequest`] | [`ActivateResponse`] |
//! | `GET /v1/eventlog` | — | the host's binary event log (`application/octet-stream`) |
//! | `GET /v1/vtpms` | — | [`VtpmList`] |
//! | `POST /v1/vtpms/{uuid}/deep-quote` | [`QuoteRequest`] | [`QuoteResponse`] |
//!
//! Every error is [`ErrorBody`] with an HTTP status.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of this API (the `/v1/` prefix and the `version` fields).
pub const API_VERSION: u32 = 1;
/// The largest request body the service reads; a longer one is refused (413) unread.
pub const MAX_BODY: usize = 8 * 1024;
/// The largest credential blob or encrypted secret (bytes) [`ActivateRequest`] carries: an
/// RSA-2048 EK's encrypted seed is 256 bytes, the blob ~ 80.
pub const MAX_CREDENTIAL: usize = 1024;
/// Largest nonce (bytes), as in the deep-quote command.
pub const MAX_NONCE: usize = crate::evidence::MAX_NONCE;

/// Path of the enrollment material.
pub const PATH_ENROLLMENT: &str = "/v1/enrollment";
/// Path of credential activation.
pub const PATH_ACTIVATE: &str = "/v1/activate";
/// Path of the host event log.
pub const PATH_EVENTLOG: &str = "/v1/eventlog";
/// Path of the tenant's vTPM list.
pub const PATH_VTPMS: &str = "/v1/vtpms";

/// The path of a vTPM's deep quote.
pub fn quote_path(vtpm: &Uuid) -> String {
    format!("{PATH_VTPMS}/{}/deep-quote", vtpm.hyphenated())
}

/// A request line the service serves, parsed from method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/enrollment`.
    Enrollment,
    /// `POST /v1/activate`.
    Activate,
    /// `GET /v1/eventlog`.
    EventLog,
    /// `GET /v1/vtpms`.
    Vtpms,
    /// `POST /v1/vtpms/{uuid}/deep-quote`.
    DeepQuote(Uuid),
}

/// Why a request line is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// No such path (404).
    NotFound,
    /// The path exists with another method (405).
    Method,
}

/// Parses a UUID path parameter: exactly the 36-character hyphenated lowercase or uppercase form.
pub fn parse_uuid_param(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

/// Routes `method` and `path` (no query string is served).
pub fn route(method: &str, path: &str) -> Result<Route, RouteError> {
    let (want, r) = match path {
        PATH_ENROLLMENT => ("GET", Route::Enrollment),
        PATH_ACTIVATE => ("POST", Route::Activate),
        PATH_EVENTLOG => ("GET", Route::EventLog),
        PATH_VTPMS => ("GET", Route::Vtpms),
        _ => {
            let uuid = path
                .strip_prefix("/v1/vtpms/")
                .and_then(|rest| rest.strip_suffix("/deep-quote"))
                .ok_or(RouteError::NotFound)?;
            ("POST", Route::DeepQuote(parse_uuid_param(uuid).ok_or(RouteError::NotFound)?))
        }
    };
    if method == want { Ok(r) } else { Err(RouteError::Method) }
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// [`API_VERSION`].
    pub version: u32,
    /// What went wrong and what to do.
    pub error: String,
}

/// `POST /v1/activate`: TPM2_ActivateCredential with a group's AK (enrollment's step 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    /// The group whose AK the credential names.
    pub group: Uuid,
    /// TPM2B_ID_OBJECT (MakeCredential's blob), hex.
    pub credential_blob: String,
    /// TPM2B_ENCRYPTED_SECRET, hex.
    pub encrypted_secret: String,
}

/// A checked [`ActivateRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The group.
    pub group: Uuid,
    /// The blob.
    pub credential_blob: Vec<u8>,
    /// The encrypted secret.
    pub encrypted_secret: Vec<u8>,
}

fn hex_field(s: &str, what: &str, max: usize) -> Result<Vec<u8>, String> {
    if s.len() > 2 * max {
        return Err(format!("{what}: more than {max} bytes"));
    }
    let b = hex::decode(s).map_err(|e| format!("{what}: not hex ({e})"))?;
    if b.is_empty() {
        return Err(format!("{what}: empty"));
    }
    Ok(b)
}

impl ActivateRequest {
    /// Parses and checks a request body.
    pub fn parse(body: &[u8]) -> Result<Activation, String> {
        let r: ActivateRequest = parse_json(body)?;
        Ok(Activation {
            group: r.group,
            credential_blob: hex_field(&r.credential_blob, "credential_blob", MAX_CREDENTIAL)?,
            encrypted_secret: hex_field(&r.encrypted_secret, "encrypted_secret", MAX_CREDENTIAL)?,
        })
    }
}

/// The answer of `POST /v1/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateResponse {
    /// [`API_VERSION`].
    pub version: u32,
    /// The secret the host's TPM recovered, hex.
    pub secret: String,
}

/// `GET /v1/vtpms`: the vTPMs this tenant may ask about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtpmList {
    /// [`API_VERSION`].
    pub version: u32,
    /// The tenant the service identified from the client certificate.
    pub tenant: String,
    /// Its vTPMs, ordered.
    pub vtpms: Vec<Uuid>,
}

/// `POST /v1/vtpms/{uuid}/deep-quote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteRequest {
    /// The verifier's fresh nonce, hex, 1 to [`MAX_NONCE`] bytes.
    pub nonce: String,
    /// vPCR indices (SHA-256 bank), 0..=23.
    pub vpcrs: Vec<u8>,
    /// Host PCR indices (SHA-256 bank), 0..=23.
    pub host_pcrs: Vec<u8>,
}

fn pcrs(v: &[u8], what: &str) -> Result<Vec<u8>, String> {
    if v.is_empty() || v.len() > 24 {
        return Err(format!("{what}: give 1 to 24 PCR indices"));
    }
    if let Some(p) = v.iter().find(|&&p| p > 23) {
        return Err(format!("{what}: {p} is not a PCR index within 0..=23"));
    }
    let mut out = v.to_vec();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl QuoteRequest {
    /// Parses and checks a request body into the deep-quote command the vTPM is sent.
    pub fn parse(body: &[u8]) -> Result<crate::deepquote_cmd::DeepQuoteCommand, String> {
        let r: QuoteRequest = parse_json(body)?;
        let nonce = hex_field(&r.nonce, "nonce", MAX_NONCE)?;
        Ok(crate::deepquote_cmd::DeepQuoteCommand {
            nonce,
            vpcr_alg: crate::evidence::TPM_ALG_SHA256,
            vpcrs: pcrs(&r.vpcrs, "vpcrs")?,
            host_pcrs: pcrs(&r.host_pcrs, "host_pcrs")?,
            flags: 0,
        })
    }
}

/// The answer of `POST /v1/vtpms/{uuid}/deep-quote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteResponse {
    /// [`API_VERSION`].
    pub version: u32,
    /// The evidence bundle (`XVDQ`, docs/deep-quote.md), hex.
    pub bundle: String,
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    if body.len() > MAX_BODY {
        return Err(format!("body of {} bytes exceeds {MAX_BODY}", body.len()));
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let u = Uuid::from_u128(7);
        assert_eq!(route("GET", "/v1/enrollment"), Ok(Route::Enrollment));
        assert_eq!(route("POST", &quote_path(&u)), Ok(Route::DeepQuote(u)));
        assert_eq!(route("GET", &quote_path(&u)), Err(RouteError::Method));
        assert_eq!(route("POST", "/v1/vtpms/00000000000000000000000000000007/deep-quote"), Err(RouteError::NotFound));
        assert_eq!(route("POST", "/v1/vtpms/../deep-quote"), Err(RouteError::NotFound));
        assert_eq!(route("GET", "/v1/enrollment/"), Err(RouteError::NotFound));
        assert_eq!(route("GET", "/v2/enrollment"), Err(RouteError::NotFound));
    }

    #[test]
    fn quote_requests_are_checked() {
        let c = QuoteRequest::parse(br#"{"nonce":"c0ffee","vpcrs":[16,0,0],"host_pcrs":[0,7]}"#).unwrap();
        assert_eq!((c.nonce, c.vpcrs, c.host_pcrs), (vec![0xc0, 0xff, 0xee], vec![0, 16], vec![0, 7]));
        for bad in [
            r#"{"nonce":"","vpcrs":[0],"host_pcrs":[0]}"#,
            r#"{"nonce":"zz","vpcrs":[0],"host_pcrs":[0]}"#,
            r#"{"nonce":"00","vpcrs":[24],"host_pcrs":[0]}"#,
            r#"{"nonce":"00","vpcrs":[],"host_pcrs":[0]}"#,
            r#"{"nonce":"00","vpcrs":[0],"host_pcrs":[0],"flags":1}"#,
            r#"{"nonce":"00","vpcrs":[0],"host_pcrs":[300]}"#,
            "[]",
        ] {
            assert!(QuoteRequest::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        let long = format!(r#"{{"nonce":"{}","vpcrs":[0],"host_pcrs":[0]}}"#, "00".repeat(65));
        assert!(QuoteRequest::parse(long.as_bytes()).unwrap_err().contains("64"));
    }

    #[test]
    fn activation_requests_are_checked() {
        let g = Uuid::from_u128(1);
        let ok = format!(r#"{{"group":"{g}","credential_blob":"0102","encrypted_secret":"03"}}"#);
        assert_eq!(ActivateRequest::parse(ok.as_bytes()).unwrap().credential_blob, vec![1, 2]);
        let big = format!(r#"{{"group":"{g}","credential_blob":"{}","encrypted_secret":"03"}}"#, "00".repeat(MAX_CREDENTIAL + 1));
        assert!(ActivateRequest::parse(big.as_bytes()).is_err());
    }
}
