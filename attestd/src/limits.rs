//! Per-tenant rate limits: a token bucket per tenant name (tenants are registered, so the map
//! is bounded by the registry, not by peers).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets, one per tenant.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` tokens per second, at most `burst` saved up.
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter { rate: rate.max(0.001), burst: f64::from(burst.max(1)), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `tenant` at `now`, or says how long until one is there.
    pub fn take_at(&self, tenant: &str, now: Instant) -> Result<(), Duration> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = b.entry(tenant.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }

    /// [`RateLimiter::take_at`] now.
    pub fn take(&self, tenant: &str) -> Result<(), Duration> {
        self.take_at(tenant, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_tenants_are_separate() {
        let r = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            r.take_at("a", t0).unwrap();
        }
        let wait = r.take_at("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        r.take_at("b", t0).unwrap();
        r.take_at("a", t0 + Duration::from_millis(500)).unwrap();
        assert!(r.take_at("a", t0 + Duration::from_millis(500)).is_err());
    }
}
