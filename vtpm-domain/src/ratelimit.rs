//! Rate limiting for logs a guest can trigger.
//!
//! A guest can send malformed commands as fast as it likes; each call site
//! that logs such an event goes through [`RateLimiter`], which lets a burst of
//! [`BURST`] messages through per [`WINDOW_SECS`] and counts the rest, so the
//! host's logs stay bounded whatever the guest does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages allowed per window and call site.
pub const BURST: u64 = 5;
/// Window length in seconds.
pub const WINDOW_SECS: u64 = 10;

/// One limiter per call site; `const`-constructible for use in statics.
pub struct RateLimiter {
    /// (window start in seconds << 20) | count in this window.
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimiter {
    /// A fresh limiter.
    pub const fn new() -> Self {
        RateLimiter { state: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// Returns `Some(suppressed_since_last)` if a message may be logged now.
    pub fn check(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let window = now / WINDOW_SECS;
        let cur = self.state.load(Ordering::Relaxed);
        let (w, n) = (cur >> 20, cur & 0xFFFFF);
        let (next, allowed) = if w != window { ((window << 20) | 1, true) } else { (cur + 1, n < BURST) };
        // A lost race only miscounts one message; that is acceptable for logs.
        self.state.store(if n < 0xFFFFF || w != window { next } else { cur }, Ordering::Relaxed);
        if allowed {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `guest_warn!("fmt", args..)`: a `tracing::warn!` limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new();
        if let Some(suppressed) = LIMIT.check() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses() {
        let l = RateLimiter::new();
        let allowed = (0..100).filter(|_| l.check().is_some()).count() as u64;
        // All 100 calls fall in at most two windows.
        assert!((BURST..=2 * BURST).contains(&allowed), "allowed {allowed}");
    }
}
