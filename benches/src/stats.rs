//! Order statistics over samples in nanoseconds.

/// Summary of one series.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64
}

/// Summarises samples (ns).
pub fn summarize(samples: &[u64]) -> Summary {
    let mut s = samples.to_vec();
    s.sort_unstable();
    Summary {
        min: s.first().copied().unwrap_or(0) as f64,
        median: pct(&s, 0.5),
        p90: pct(&s, 0.9),
        p99: pct(&s, 0.99),
        max: s.last().copied().unwrap_or(0) as f64,
    }
}

/// Median of a few floats.
pub fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Nanoseconds → µs with one decimal.
pub fn us(ns: f64) -> String {
    format!("{:.1}", ns / 1e3)
}

/// Nanoseconds → ms with one decimal (two below 10 ms).
pub fn ms(ns: f64) -> String {
    let v = ns / 1e6;
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}
