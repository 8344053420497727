//! Exit codes of `xl-vtpm` (documented in `xl-vtpm --help` and README.md).

use vtpm_proto::mgr::{ErrorCode, Failure, Refusal};

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
/// `xl-vtpm libvirt-handoff`: the vTPM's move began (it was suspended here) and did not complete;
/// the guest belongs on the destination now, and `xl-vtpm migrate GUEST HOST --finish` completes
/// the move.
pub const MOVE_UNFINISHED: i32 = 9;

/// The typed cause of a [`CliError`].
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error carrying its exit code: what failed, its typed cause (if any) and the fix (if
/// any). [`CliError::text`] prints it as `message: cause: its cause…; fix`, each cause once
/// ([`xvtpm_log::report`]); sites carry the cause instead of formatting it into the message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Exit code.
    pub code: i32,
    /// What failed, naming the field (and, without a `fix`, the fix).
    message: String,
    /// Why: the error that made it fail.
    #[source]
    source: Option<Cause>,
    /// What to do about it, printed once after the causes.
    fix: Option<String>,
    /// The transfer state a manager's refusal reported (what a move carries on from).
    refusal: Option<Refusal>,
}

impl CliError {
    /// Builds an error.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError { code, message: message.into(), source: None, fix: None, refusal: None }
    }

    /// Builds an error `message` caused by `cause` (a typed error, or a text where no type exists).
    pub fn caused(code: i32, message: impl Into<String>, cause: impl Into<Cause>) -> Self {
        CliError { code, message: message.into(), source: Some(cause.into()), fix: None, refusal: None }
    }

    /// Names the fix, printed after the causes.
    #[must_use]
    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// The message without its causes and fix (to match on).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The whole text the user sees: the message, each cause once, then the fixes (this
    /// error's, then those of the `CliError`s among its causes).
    pub fn text(&self) -> String {
        let mut t = xvtpm_log::report(self);
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(c) = cause {
            if let Some(f) = c.downcast_ref::<CliError>().and_then(|e| e.fix.as_deref()) {
                t.push_str("; ");
                t.push_str(f);
            }
            cause = c.source();
        }
        t
    }

    /// The transfer state a manager's refusal reported, if it did.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    /// A manager's error answer: its class mapped to an exit code, its transfer state kept.
    pub fn from_manager(f: Failure) -> Self {
        let Failure { code, message, refusal } = f;
        let c = match code {
            ErrorCode::NotProvisioned => NOT_PROVISIONED,
            ErrorCode::NotFound => NOT_FOUND,
            ErrorCode::Refused | ErrorCode::Exists | ErrorCode::AlreadyProvisioned | ErrorCode::StaleState => REFUSED,
            ErrorCode::BadRequest => USAGE,
            _ => FAILURE,
        };
        CliError { refusal, ..CliError::new(c, message) }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::caused(FAILURE, "", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A library error whose text already quotes its cause (thiserror's `"…: {source}"`).
    #[derive(Debug, thiserror::Error)]
    #[error("registry /r.sqlite: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn each_cause_once_then_the_fix() {
        let e = CliError::caused(FAILURE, "opening the registry", Quoting(std::io::Error::other("disk full"))).fix("free space");
        assert_eq!(e.text(), "opening the registry: registry /r.sqlite: disk full; free space");
        assert_eq!(CliError::new(USAGE, "--x: bad").text(), "--x: bad");
        let nested = CliError::caused(REFUSED, "outer", CliError::caused(FAILURE, "inner", "why").fix("do this"));
        assert_eq!(nested.text(), "outer: inner: why; do this");
    }
}
