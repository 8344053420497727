//! Deep quotes with natural batching.
//!
//! Requests queue in a bounded channel. One batcher task takes everything
//! queued (up to `max_batch`), builds an RFC 6962 Merkle tree over the
//! requests' leaves, and has the physical TPM sign the root as the
//! `qualifyingData` of one `TPM2_Quote` per (group, host PCR selection).
//! While that quote is in flight, new requests queue for the next batch, so a
//! lone request waits for nothing and a crowd shares one signature.
//! A full queue answers `Busy` instead of growing without bound.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use xvtpm_log::guest_warn;
use uuid::Uuid;
use vtpm_proto::evidence::{Bundle, HostPcrs, Leaf, LeafPosition, VpcrSelection};
use vtpm_proto::merkle::Tree;
use vtpm_proto::mgr::{ErrorCode, Failure, VtpmReply, VtpmRequest};

use crate::failure::FromError as _;

use crate::hwtpm::QuoteOut;

/// Signs one physical quote: `(group, qualifying data, host PCR indices)` → the quote and the
/// group AK's `TPMT_PUBLIC`. It blocks (a TPM command), so the batcher calls it off the async
/// threads. The manager provides it; the batcher knows nothing else of the manager.
pub type QuoteFn = Arc<dyn Fn(Uuid, [u8; 32], Vec<u8>) -> Result<(QuoteOut, Vec<u8>), Failure> + Send + Sync>;

/// Batching configuration.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most requests one physical quote covers (1 = batching off).
    pub max_batch: usize,
    /// Most requests waiting; more are refused with `Busy`.
    pub max_queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max_batch: 1024, max_queue: 4096 }
    }
}

/// Counters exposed in the manager's status.
#[derive(Debug, Default)]
pub struct Stats {
    /// Deep-quote requests answered with a bundle.
    pub answered: AtomicU64,
    /// Physical `TPM2_Quote` operations.
    pub physical_quotes: AtomicU64,
}

/// One request, its identity fields already filled from the manager's records.
pub struct Request {
    /// The vTPM (from the socket, never from the caller).
    pub vtpm: Uuid,
    /// Its group (from the manager's records).
    pub group: Uuid,
    /// vPCR bank, indices and values read by the vTPM.
    pub vpcrs: VpcrSelection,
    /// The values.
    pub vpcr_values: Vec<Vec<u8>>,
    /// Guest nonce.
    pub nonce: Vec<u8>,
    /// Flags.
    pub flags: u32,
    /// Host PCRs to quote (SHA-256 bank).
    pub host_pcrs: Vec<u8>,
    /// Where the encoded bundle goes.
    pub reply: oneshot::Sender<Result<Vec<u8>, Failure>>,
}

/// Queues a `VtpmRequest::DeepQuote` that arrived over any link, once the
/// caller has authorised the peer as vTPM `vtpm` of group `group`. Returns
/// the receiver of the encoded bundle, or the reply to send at once.
pub fn submit_request(
    batcher: &Batcher,
    vtpm: Uuid,
    group: Uuid,
    req: VtpmRequest,
) -> Result<oneshot::Receiver<Result<Vec<u8>, Failure>>, VtpmReply> {
    let VtpmRequest::DeepQuote { nonce, vpcr_alg, vpcrs, vpcr_values, host_pcrs, flags, .. } = req else {
        return Err(VtpmReply::Error(Failure::new(ErrorCode::BadRequest, "not a deep-quote request")));
    };
    let bad = |what: &str| VtpmReply::Error(Failure::new(ErrorCode::BadRequest, format!("deep-quote {what} is not hex")));
    let nonce = hex::decode(&nonce).map_err(|_| bad("nonce"))?;
    let vpcr_values = vpcr_values.iter().map(hex::decode).collect::<Result<Vec<_>, _>>().map_err(|_| bad("vPCR value"))?;
    let (tx, rx) = oneshot::channel();
    batcher
        .submit(Request {
            vtpm,
            group,
            vpcrs: VpcrSelection { hash_alg: vpcr_alg, pcrs: vpcrs },
            vpcr_values,
            nonce,
            flags,
            host_pcrs,
            reply: tx,
        })
        .map_err(VtpmReply::Error)?;
    Ok(rx)
}

/// The reply for a queued request's outcome.
pub async fn reply_for(rx: oneshot::Receiver<Result<Vec<u8>, Failure>>) -> VtpmReply {
    match rx.await {
        Ok(Ok(bundle)) => VtpmReply::DeepQuote { bundle: hex::encode(bundle) },
        Ok(Err(f)) => VtpmReply::Error(f),
        Err(_) => VtpmReply::Error(Failure::new(ErrorCode::Internal, "deep-quote batcher dropped the request")),
    }
}

/// Handle to the batcher task.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Queued>,
}

/// A request with the time it was queued (for the batcher's timing summary).
struct Queued {
    req: Request,
    at: Instant,
}

impl Batcher {
    /// Starts the batcher task; `quote` signs each batch's quotes.
    pub fn spawn(quote: QuoteFn, cfg: BatchConfig, stats: Arc<Stats>) -> Batcher {
        let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
        tokio::spawn(run(quote, cfg, stats, rx));
        Batcher { tx }
    }

    /// Queues a request; `Busy` when the queue is full.
    pub fn submit(&self, req: Request) -> Result<(), Failure> {
        self.tx.try_send(Queued { req, at: Instant::now() }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Failure::new(ErrorCode::Busy, "deep-quote queue is full; retry shortly"),
            mpsc::error::TrySendError::Closed(_) => Failure::new(ErrorCode::Internal, "deep-quote batcher stopped"),
        })
    }
}

/// Longest gathering pause after a crowded batch (see [`gather_window`]).
pub const MAX_GATHER: Duration = Duration::from_millis(100);

/// How long at most to let a crowd regroup before cutting the next batch.
/// After a batch of many requests all its callers get their answers at once
/// and most ask again, spread over the time their hosts need to come back;
/// cutting the next batch before the last of them is back would sign a quote
/// for part of the crowd and make the rest wait out that quote *and* their
/// own, over two quote times, and split the crowd for good. So after a
/// crowded batch the batcher gathers for up to three quarters of the last
/// quote's duration (at most [`MAX_GATHER`]): a request that is there when
/// the gathering starts is answered within that plus its own quote, under two
/// quote times. It cuts the batch as soon as as many requests are back as the
/// last batch answered (see `run`), so a closed-loop crowd pays only the time
/// it takes to come back; after a lone request, or when idle, it waits for
/// nothing.
pub fn gather_window(last_batch: usize, last_quote: Duration) -> Duration {
    if last_batch <= 1 { Duration::ZERO } else { (last_quote * 3 / 4).min(MAX_GATHER) }
}

/// Moves what is queued into `batch`, up to `max` requests.
fn take_queued(rx: &mut mpsc::Receiver<Queued>, batch: &mut Vec<Queued>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

/// Per-request timings of the rounds since the last summary line (debug log, at most one
/// line per [`SUMMARY_EVERY`]): where a request's time in the manager goes — queued behind a
/// quote in flight, gathering, building the tree, the quote, the answers.
struct Summary {
    since: Instant,
    rounds: u64,
    requests: u64,
    batch_max: usize,
    /// Requests that arrived while a quote was in flight (they waited it out).
    behind_quote: u64,
    gather: Duration,
    gather_max: Duration,
    /// Cut → physical quote sent (partition, leaves, Merkle tree), summed over parts.
    build: Duration,
    quote: Duration,
    quotes: u64,
    /// Quote returned → last answer of the part handed to its caller.
    answer: Duration,
    /// Queued → answer handed over, per request.
    in_mgr: Duration,
    in_mgr_max: Duration,
    /// Requests whose time in the manager exceeded two of their round's quote times.
    over_2q: u64,
}

/// How often at most the batcher logs its timing summary.
const SUMMARY_EVERY: Duration = Duration::from_secs(2);

impl Summary {
    fn new() -> Summary {
        Summary {
            since: Instant::now(),
            rounds: 0,
            requests: 0,
            batch_max: 0,
            behind_quote: 0,
            gather: Duration::ZERO,
            gather_max: Duration::ZERO,
            build: Duration::ZERO,
            quote: Duration::ZERO,
            quotes: 0,
            answer: Duration::ZERO,
            in_mgr: Duration::ZERO,
            in_mgr_max: Duration::ZERO,
            over_2q: 0,
        }
    }

    fn log_if_due(&mut self) {
        if self.since.elapsed() < SUMMARY_EVERY || self.rounds == 0 {
            return;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per = |d: Duration, n: u64| ms(d) / n.max(1) as f64;
        xvtpm_log::guest_debug!(
            rounds = self.rounds,
            requests = self.requests,
            batch_mean = format_args!("{:.1}", self.requests as f64 / self.rounds as f64),
            batch_max = self.batch_max,
            behind_quote = self.behind_quote,
            gather_ms_mean = format_args!("{:.1}", per(self.gather, self.rounds)),
            gather_ms_max = format_args!("{:.1}", ms(self.gather_max)),
            build_ms_mean = format_args!("{:.2}", per(self.build, self.quotes)),
            quote_ms_mean = format_args!("{:.1}", per(self.quote, self.quotes)),
            answer_ms_mean = format_args!("{:.2}", per(self.answer, self.quotes)),
            in_mgr_ms_mean = format_args!("{:.1}", per(self.in_mgr, self.requests)),
            in_mgr_ms_max = format_args!("{:.1}", ms(self.in_mgr_max)),
            over_2q = self.over_2q,
            "deep quote timings"
        );
        *self = Summary::new();
    }
}

/// When one part's quote ran and when its last answer was handed over.
struct PartTimes {
    sent: Instant,
    signed: Instant,
    answered: Instant,
}

async fn run(quote: QuoteFn, cfg: BatchConfig, stats: Arc<Stats>, mut rx: mpsc::Receiver<Queued>) {
    let max = cfg.max_batch.max(1);
    // How many requests the next batch expects (those queued while the last quote ran, plus
    // the last batch's callers asking again), and how long it waits for them at most.
    let (mut expect, mut window) = (0usize, Duration::ZERO);
    // When the last round ended: a request queued before it waited out a quote in flight.
    let mut last_end = Instant::now();
    let mut summary = Summary::new();
    while let Some(first) = rx.recv().await {
        let gather = Instant::now();
        let mut batch = vec![first];
        take_queued(&mut rx, &mut batch, max);
        if max > 1 && !window.is_zero() {
            let deadline = tokio::time::Instant::now() + window;
            while batch.len() < expect.min(max) {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => {
                        batch.push(r);
                        take_queued(&mut rx, &mut batch, max);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let cut = Instant::now();
        let gathered = cut - gather;
        // One tree and one physical quote per (group, host PCR selection).
        let mut parts: BTreeMap<(Uuid, Vec<u8>), Vec<Queued>> = BTreeMap::new();
        for q in batch {
            summary.behind_quote += u64::from(q.at < last_end);
            parts.entry((q.req.group, q.req.host_pcrs.clone())).or_default().push(q);
        }
        let size = batch_len(&parts);
        let (n_parts, started) = (parts.len() as u32, Instant::now());
        let mut ready = cut;
        for ((group, host_pcrs), queued) in parts {
            let arrivals: Vec<Instant> = queued.iter().map(|q| q.at).collect();
            let reqs = queued.into_iter().map(|q| q.req).collect();
            if let Some(t) = quote_part(&quote, &stats, group, host_pcrs, reqs).await {
                let q = t.signed - t.sent;
                summary.build += t.sent.saturating_duration_since(ready);
                summary.quote += q;
                summary.quotes += 1;
                summary.answer += t.answered - t.signed;
                for at in arrivals {
                    let d = t.answered.saturating_duration_since(at);
                    summary.in_mgr += d;
                    summary.in_mgr_max = summary.in_mgr_max.max(d);
                    summary.over_2q += u64::from(d > 2 * q);
                }
                ready = t.answered;
            }
        }
        let round = started.elapsed();
        last_end = Instant::now();
        summary.rounds += 1;
        summary.requests += size as u64;
        summary.batch_max = summary.batch_max.max(size);
        summary.gather += gathered;
        summary.gather_max = summary.gather_max.max(gathered);
        xvtpm_log::guest_debug!(
            batch = size,
            quotes = n_parts,
            gather_us = gathered.as_micros() as u64,
            round_us = round.as_micros() as u64,
            "deep quote round"
        );
        summary.log_if_due();
        let last_quote = round / n_parts.max(1);
        window = gather_window(size, last_quote);
        expect = if window.is_zero() { 0 } else { rx.len() + size };
    }
}

fn batch_len(parts: &BTreeMap<(Uuid, Vec<u8>), Vec<Queued>>) -> usize {
    parts.values().map(Vec::len).sum()
}

/// Signs one part; its timings, or None when nothing was quoted (no valid request, or the
/// quote failed: every caller has its error).
async fn quote_part(quote: &QuoteFn, stats: &Stats, group: Uuid, host_pcrs: Vec<u8>, reqs: Vec<Request>) -> Option<PartTimes> {
    let n = reqs.len() as u32;
    let mut leaves = Vec::with_capacity(reqs.len());
    let mut encoded = Vec::with_capacity(reqs.len());
    let mut waiting = Vec::with_capacity(reqs.len());
    for r in reqs {
        // Positions are assigned over the valid requests only.
        let leaf = Leaf {
            vtpm_uuid: r.vtpm,
            group_uuid: r.group,
            vpcr_selection: r.vpcrs,
            vpcr_values: r.vpcr_values,
            nonce: r.nonce,
            flags: r.flags,
            position: LeafPosition { leaf_index: 0, tree_size: n },
        };
        if let Err(e) = leaf.validate() {
            let _ = r.reply.send(Err(Failure::from_error(ErrorCode::BadRequest, "deep-quote request", &e)));
            continue;
        }
        leaves.push(leaf);
        waiting.push(r.reply);
    }
    let size = leaves.len() as u32;
    if size == 0 {
        return None;
    }
    for (i, leaf) in leaves.iter_mut().enumerate() {
        leaf.position = LeafPosition { leaf_index: i as u32, tree_size: size };
        encoded.push(leaf.encode().expect("validated leaf encodes"));
    }
    let tree = Tree::from_leaves(&encoded);
    let root = tree.root();
    let quote = quote.clone();
    let sent = Instant::now();
    let quoted = tokio::task::spawn_blocking(move || quote(group, root, host_pcrs)).await;
    let signed = Instant::now();
    stats.physical_quotes.fetch_add(1, Ordering::Relaxed);
    let (q, ak_public) = match quoted {
        Ok(Ok(x)) => x,
        Ok(Err(f)) => {
            guest_warn!(error = %f, "physical quote failed");
            for w in waiting {
                let _ = w.send(Err(f.clone()));
            }
            return None;
        }
        Err(e) => {
            for w in waiting {
                let _ = w.send(Err(Failure::from_error(ErrorCode::Internal, "", &e)));
            }
            return None;
        }
    };
    let selection = match vtpm_proto::tpms::QuoteAttest::parse(&q.attest) {
        Ok(a) => a.pcr_select,
        Err(e) => {
            for w in waiting {
                let _ = w.send(Err(Failure::from_error(ErrorCode::Tpm, "unparseable quote", &e)));
            }
            return None;
        }
    };
    xvtpm_log::guest_debug!(batch = size, "deep quote batch signed");
    for (i, (leaf, w)) in leaves.into_iter().zip(waiting).enumerate() {
        let bundle = Bundle {
            leaf,
            path: tree.inclusion_proof(i).expect("index < size"),
            attest: q.attest.clone(),
            signature: q.signature.clone(),
            ak_public: ak_public.clone(),
            host_pcrs: HostPcrs { selection: selection.clone(), values: q.pcr_values.clone() },
        };
        let out = bundle.encode().map_err(|e| Failure::from_error(ErrorCode::Internal, "encoding bundle", &e));
        if out.is_ok() {
            stats.answered.fetch_add(1, Ordering::Relaxed);
        }
        let _ = w.send(out);
    }
    Some(PartTimes { sent, signed, answered: Instant::now() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lone_requests_never_wait_and_crowds_wait_under_a_quote_time() {
        assert_eq!(gather_window(0, Duration::from_millis(400)), Duration::ZERO);
        assert_eq!(gather_window(1, Duration::from_millis(400)), Duration::ZERO);
        assert_eq!(gather_window(16, Duration::from_millis(400)), MAX_GATHER);
        assert_eq!(gather_window(16, Duration::from_millis(120)), Duration::from_millis(90));
        assert_eq!(gather_window(16, Duration::from_millis(100)), Duration::from_millis(75));
        assert_eq!(gather_window(16, Duration::from_millis(2)), Duration::from_micros(1500));
    }
}
