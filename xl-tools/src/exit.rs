//! Exit codes of `xl-vtpm` (documented in `xl-vtpm --help` and README.md).

use vtpm_proto::mgr::ErrorCode;

/// Success.
pub const OK: i32 = 0;
/// Any failure not listed below.
pub const FAILURE: i32 = 1;
/// Bad command line (clap's own code).
pub const USAGE: i32 = 2;
/// vtpmmgr could not be reached.
pub const NO_MANAGER: i32 = 3;
/// vtpmmgr is not provisioned.
pub const NOT_PROVISIONED: i32 = 4;
/// No such vTPM or group.
pub const NOT_FOUND: i32 = 5;
/// Refused: needs confirmation (`--yes`), exists already, or not permitted.
pub const REFUSED: i32 = 6;
/// `xl-vtpm verify`: every check passed, but no host PCR policy was given, so the host's state
/// was not checked. (7, evidence that did not verify, is `guest::NOT_VERIFIED`.)
pub const HOST_UNCHECKED: i32 = 8;

/// An error carrying its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Exit code.
    pub code: i32,
    /// Message naming the field and the fix.
    pub message: String,
}

impl CliError {
    /// Builds an error.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError { code, message: message.into() }
    }

    /// Maps a manager error class to an exit code.
    pub fn from_manager(code: ErrorCode, message: String) -> Self {
        let c = match code {
            ErrorCode::NotProvisioned => NOT_PROVISIONED,
            ErrorCode::NotFound => NOT_FOUND,
            ErrorCode::Refused | ErrorCode::Exists | ErrorCode::AlreadyProvisioned | ErrorCode::StaleState => REFUSED,
            ErrorCode::BadRequest => USAGE,
            _ => FAILURE,
        };
        CliError::new(c, message)
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::new(FAILURE, xvtpm_log::report(e.as_ref()))
    }
}
