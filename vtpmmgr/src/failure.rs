//! The manager's wire answer for an internal error: one helper builds its text, so the text
//! names each cause of the error's chain once (through [`xvtpm_log::report`]) instead of each
//! site formatting the error, and its causes, in its own way.

use vtpm_proto::mgr::{ErrorCode, Failure};

/// Builds a [`Failure`] from an error (brought into scope, it reads `Failure::from_error`).
pub trait FromError {
    /// `context: cause: its cause: …`, every cause of `e` named once; no context: the chain alone.
    fn from_error(code: ErrorCode, context: &str, e: &(dyn std::error::Error + 'static)) -> Failure;
    /// As [`FromError::from_error`], followed by `; fix`.
    fn from_error_fix(code: ErrorCode, context: &str, e: &(dyn std::error::Error + 'static), fix: &str) -> Failure;
}

impl FromError for Failure {
    fn from_error(code: ErrorCode, context: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
        let chain = xvtpm_log::report(e);
        Failure::new(code, if context.is_empty() { chain } else { format!("{context}: {chain}") })
    }

    fn from_error_fix(code: ErrorCode, context: &str, e: &(dyn std::error::Error + 'static), fix: &str) -> Failure {
        let mut f = Failure::from_error(code, context, e);
        f.message = format!("{}; {fix}", f.message);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose text quotes its cause, above an I/O error: the cause is named once.
    #[derive(Debug, thiserror::Error)]
    #[error("writing /s/store: {0}")]
    struct Quoting(#[source] std::io::Error);

    /// An error whose text leaves its cause out: the cause is still named.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot start the Xen manager link")]
    struct Silent(#[source] std::io::Error);

    #[test]
    fn each_cause_once() {
        let io = || std::io::Error::other("no space left");
        let f = Failure::from_error(ErrorCode::Internal, "writing the manager store", &Quoting(io()));
        assert_eq!(f.message, "writing the manager store: writing /s/store: no space left");
        let f = Failure::from_error(ErrorCode::Internal, "", &Silent(io()));
        assert_eq!(f.message, "cannot start the Xen manager link: no space left");
        let f = Failure::from_error_fix(ErrorCode::Refused, "abort refused", &Silent(io()), "cancel on the destination");
        assert_eq!(f.message, "abort refused: cannot start the Xen manager link: no space left; cancel on the destination");
    }
}
