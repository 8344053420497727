//! An error that names what was being done and keeps its cause as its `source()`, so the one
//! `error:` line ([`xvtpm_log::report`]) names the cause once and a caller can still see it.
//! Its text is `WHAT: CAUSE` (then ` (FIX)` where there is one): the message a log line or a
//! client sees with `{}` alone is whole.

use std::error::Error;
use std::fmt;
use std::io;

/// `what` failed because of `source`.
#[derive(Debug)]
pub struct Failed {
    what: String,
    source: Box<dyn Error + Send + Sync + 'static>,
    fix: Option<&'static str>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)?;
        if let Some(fix) = self.fix {
            write!(f, " ({fix})")?;
        }
        Ok(())
    }
}

impl Error for Failed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

impl Failed {
    /// `what` failed because of `source`.
    pub fn new(what: impl Into<String>, source: impl Into<Box<dyn Error + Send + Sync + 'static>>) -> Self {
        Failed { what: what.into(), source: source.into(), fix: None }
    }

    /// The same, with what to do about it.
    pub fn with_fix(mut self, fix: &'static str) -> Self {
        self.fix = Some(fix);
        self
    }
}

/// Maps an I/O error to one that names `what` (keeping its kind, and the error as its cause).
pub fn io_named(what: impl fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    let what = what.to_string();
    move |e| io::Error::new(e.kind(), Failed::new(what, e))
}

/// Maps any error to an I/O error (kind `Other`) that names `what`, keeping the error as its cause.
pub fn io_other<E: Error + Send + Sync + 'static>(what: impl fmt::Display) -> impl FnOnce(E) -> io::Error {
    let what = what.to_string();
    move |e| io::Error::other(Failed::new(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_kept_as_the_source_and_printed_once() {
        let e = io_named("/run/x.sock")(io::Error::new(io::ErrorKind::PermissionDenied, "denied"));
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(e.to_string(), "/run/x.sock: denied");
        assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("denied"));
        assert_eq!(xvtpm_log::report(&e), "/run/x.sock: denied");
        let e = io::Error::other(Failed::new("setuid", io::Error::other("EPERM")).with_fix("start as root"));
        assert_eq!(xvtpm_log::report(&e), "setuid: EPERM (start as root)");
    }
}
