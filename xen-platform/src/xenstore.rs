//! The small xenstore interface the xenbus backend needs, and the real client behind it.
//!
//! [`Xenstore`] has six operations (read, write, rm, directory, watch, unwatch). Watch events of
//! every watch arrive on one [`WatchEvents`] queue that the client hands out when it is opened.
//! The queue coalesces: a path that is already pending is not queued twice, and when more than
//! [`MAX_PENDING_EVENTS`] distinct paths are pending the queue collapses into a single
//! [`WatchEvent::Resync`]. That is safe because the backend is level-triggered — an event only
//! means "re-read" — and it bounds the memory a guest can make us spend by writing its own
//! frontend directory in a loop.
//!
//! # The real client: xenstore-rs 0.8.0
//!
//! [`XsClient`] wraps `xenstore_rs::tokio::XsTokio` (GPL-3.0-only, like this project). It talks
//! the xenstored wire protocol itself over `$XENSTORED_PATH` (default `/run/xenstored/socket`)
//! or `/dev/xen/xenbus`. What it lacks and how we cope:
//! - **No transactions** (tx id is always 0). The backend never needs one: every decision is
//!   re-derived from the current values on each watch event, and the keys a frontend publishes
//!   together (`ring-ref`, `event-channel`, `feature-protocol-v2`) are only read once it reports
//!   Initialised/Connected, after its own transaction committed.
//! - **No permissions** (GET_PERMS/SET_PERMS). The toolstack (libxl) creates both device
//!   directories with the right permissions; the backend only writes inside its own backend
//!   directory, which it owns.
//! - **No `mkdir`, `get_domain_path`, `DIRECTORY_PART`**; watches only on the async client.
//!   Write creates parents implicitly; paths are given absolute (or relative, which xenstored
//!   resolves against `/local/domain/<our domid>`); device directories are tiny.
//! - **Non-UTF-8 values** are an `InvalidData` error, which surfaces as an [`XsError`].
//! - Its mux task dies if more than 32 requests are in flight at once. If the task dies every
//!   call fails with `BrokenPipe` and [`WatchEvents::next`] returns `None`.
//!
//! # One request at a time (a Linux `/dev/xen/xenbus` deadlock)
//!
//! In a domU the client talks through the kernel's `/dev/xen/xenbus`. There, a WATCH or UNWATCH
//! is executed inside `write()` while the file's `msgbuffer_mutex` is held, and waits for
//! xenstored's answer; but the kernel thread that reads xenstored's answers first delivers the
//! reply to any *other* request still outstanding on the same file, and that delivery
//! (`xenbus_dev_queue_reply`) takes the same `msgbuffer_mutex`. With a read in flight when an
//! UNWATCH is written, both wait forever (seen in the testbed: `vtpm-domain` and `xenbus` hung
//! after a guest went away). So [`XsClient`] keeps at most one request outstanding: every
//! operation holds `one_at_a_time` until its answer is in, and `unwatch` waits until
//! xenstore-rs has sent the UNWATCH (it does so when the watch stream is dropped) by following
//! it with a read of `domid` and awaiting that answer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures_core::Stream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use xenstore_rs::{AsyncWatch, AsyncXs};

/// Most distinct pending watch paths before the queue collapses into [`WatchEvent::Resync`].
pub const MAX_PENDING_EVENTS: usize = 256;

/// A failed xenstore operation.
#[derive(Debug, thiserror::Error)]
#[error("xenstore {op} {path:?}: {source}")]
pub struct XsError {
    /// The operation (`read`, `write`, …).
    pub op: &'static str,
    /// The path it was applied to.
    pub path: String,
    /// What xenstored (or the transport) said.
    #[source]
    pub source: io::Error,
}

impl XsError {
    /// Builds an error for `op` on `path`.
    pub fn new(op: &'static str, path: &str, source: io::Error) -> Self {
        Self {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// The xenstore operations the backend uses. Implemented by [`XsClient`] (real) and by
/// `FakeXenstore` (tests, feature `test-utils`).
pub trait Xenstore: Send + Sync {
    /// Reads a node; `Ok(None)` when it does not exist.
    fn read(&self, path: &str) -> impl Future<Output = Result<Option<String>, XsError>> + Send;

    /// Writes a node, creating missing parents.
    fn write(&self, path: &str, value: &str) -> impl Future<Output = Result<(), XsError>> + Send;

    /// Removes a node and everything below it; removing a missing node succeeds.
    fn rm(&self, path: &str) -> impl Future<Output = Result<(), XsError>> + Send;

    /// Lists a node's children; `Ok(None)` when the node does not exist.
    fn directory(
        &self,
        path: &str,
    ) -> impl Future<Output = Result<Option<Vec<String>>, XsError>> + Send;

    /// Watches a node and everything below it. Events go to this client's [`WatchEvents`].
    /// As with xenstored, one event fires right after registration.
    fn watch(&self, path: &str) -> impl Future<Output = Result<(), XsError>> + Send;

    /// Removes a watch set with [`watch`](Self::watch); unknown paths are ignored.
    fn unwatch(&self, path: &str) -> impl Future<Output = Result<(), XsError>> + Send;
}

/// One item from [`WatchEvents`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Something at or below this path changed (or was removed).
    Changed(String),
    /// Too many events were pending and were dropped: re-read everything.
    Resync,
}

#[derive(Default)]
struct QueueState {
    pending: VecDeque<String>,
    queued: HashSet<String>,
    overflowed: bool,
    closed: bool,
}

/// The shared, coalescing queue behind [`WatchEvents`]. Producers are the xenstore clients.
#[derive(Default)]
pub(crate) struct WatchQueue {
    state: Mutex<QueueState>,
    notify: Notify,
}

impl WatchQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // The state stays consistent even if a holder panicked (no multi-step invariants).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn push(&self, path: &str) {
        {
            let mut st = self.lock();
            if st.overflowed || st.queued.contains(path) {
                return;
            }
            if st.pending.len() >= MAX_PENDING_EVENTS {
                st.pending.clear();
                st.queued.clear();
                st.overflowed = true;
            } else {
                st.pending.push_back(path.to_owned());
                st.queued.insert(path.to_owned());
            }
        }
        self.notify.notify_one();
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Option<WatchEvent>> {
        let mut st = self.lock();
        if st.overflowed {
            st.overflowed = false;
            return Some(Some(WatchEvent::Resync));
        }
        if let Some(path) = st.pending.pop_front() {
            st.queued.remove(&path);
            return Some(Some(WatchEvent::Changed(path)));
        }
        if st.closed { Some(None) } else { None }
    }
}

/// The receiving end of all watches of one xenstore client.
pub struct WatchEvents {
    queue: Arc<WatchQueue>,
}

impl WatchEvents {
    pub(crate) fn new(queue: Arc<WatchQueue>) -> Self {
        Self { queue }
    }

    /// Waits for the next event; `None` once the xenstore connection is gone.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(item) = self.queue.pop() {
                return item;
            }
            // `notify_one` stores a permit, so a push between `pop` and here is not lost.
            self.queue.notify.notified().await;
        }
    }

    /// Returns an event if one is pending, without waiting.
    pub fn try_next(&mut self) -> Option<WatchEvent> {
        self.queue.pop().flatten()
    }
}

impl std::fmt::Debug for WatchEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchEvents").finish_non_exhaustive()
    }
}

/// The real xenstore client (xenstore-rs 0.8.0, tokio). Needs a tokio runtime.
pub struct XsClient {
    xs: xenstore_rs::tokio::XsTokio,
    queue: Arc<WatchQueue>,
    watches: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Held across each request and its answer (see the module docs).
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl XsClient {
    /// Connects to xenstored (`$XENSTORED_PATH`, `/run/xenstored/socket`, then
    /// `/dev/xen/xenbus`). Without Xen this fails with `NotFound`.
    pub async fn open() -> Result<(Self, WatchEvents), XsError> {
        let xs = xenstore_rs::tokio::XsTokio::new()
            .await
            .map_err(|e| XsError::new("open", "/run/xenstored/socket or /dev/xen/xenbus", e))?;
        let queue = Arc::new(WatchQueue::default());
        let client = Self {
            xs,
            queue: queue.clone(),
            watches: Mutex::new(HashMap::new()),
            one_at_a_time: tokio::sync::Mutex::new(()),
        };
        Ok((client, WatchEvents::new(queue)))
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.watches.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for XsClient {
    fn drop(&mut self) {
        for (_, task) in self.watches().drain() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for XsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XsClient").finish_non_exhaustive()
    }
}

fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

impl Xenstore for XsClient {
    async fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        let _one = self.one_at_a_time.lock().await;
        match self.xs.read(path).await {
            Ok(v) => Ok(Some(v.into())),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(XsError::new("read", path, e)),
        }
    }

    async fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        let _one = self.one_at_a_time.lock().await;
        self.xs
            .write(path, value)
            .await
            .map_err(|e| XsError::new("write", path, e))
    }

    async fn rm(&self, path: &str) -> Result<(), XsError> {
        let _one = self.one_at_a_time.lock().await;
        match self.xs.rm(path).await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(XsError::new("rm", path, e)),
        }
    }

    async fn directory(&self, path: &str) -> Result<Option<Vec<String>>, XsError> {
        let _one = self.one_at_a_time.lock().await;
        match self.xs.directory(path).await {
            Ok(list) => Ok(Some(list.into_iter().map(String::from).collect())),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(XsError::new("directory", path, e)),
        }
    }

    async fn watch(&self, path: &str) -> Result<(), XsError> {
        let _one = self.one_at_a_time.lock().await;
        if self.watches().contains_key(path) {
            return Ok(());
        }
        let mut stream = self
            .xs
            .watch(path)
            .await
            .map_err(|e| XsError::new("watch", path, e))?;
        let queue = self.queue.clone();
        // One forwarding task per watch keeps xenstore-rs's per-watch channel (capacity 8, whose
        // fullness would stall its mux task) drained into our coalescing queue.
        let task = tokio::spawn(async move {
            while let Some(changed) = poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await {
                queue.push(&changed);
            }
            // The stream only ends when the connection's mux task died.
            queue.close();
        });
        if let Some(old) = self.watches().insert(path.to_owned(), task) {
            old.abort();
        }
        Ok(())
    }

    async fn unwatch(&self, path: &str) -> Result<(), XsError> {
        // Aborting the task drops the stream, which makes xenstore-rs send UNWATCH.
        let _one = self.one_at_a_time.lock().await;
        let task = self.watches().remove(path);
        if let Some(task) = task {
            task.abort();
            // Once the task is gone its stream is dropped, and the UNWATCH is queued.
            let _ = task.await;
            // The mux sends in order: when this answer is in, the UNWATCH was written and done.
            let _ = self.xs.read("domid").await;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "xenstore_wire_tests.rs"]
mod wire_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_coalesces_and_overflows_into_resync() {
        let queue = Arc::new(WatchQueue::default());
        let mut events = WatchEvents::new(queue.clone());
        queue.push("/a");
        queue.push("/a");
        queue.push("/b");
        assert_eq!(events.next().await, Some(WatchEvent::Changed("/a".into())));
        assert_eq!(events.next().await, Some(WatchEvent::Changed("/b".into())));
        assert_eq!(events.try_next(), None);
        for i in 0..=MAX_PENDING_EVENTS {
            queue.push(&format!("/spam/{i}"));
        }
        assert_eq!(events.next().await, Some(WatchEvent::Resync));
        assert_eq!(events.try_next(), None);
        queue.close();
        assert_eq!(events.next().await, None);
    }

    #[tokio::test]
    async fn wakes_a_waiting_consumer() {
        let queue = Arc::new(WatchQueue::default());
        let mut events = WatchEvents::new(queue.clone());
        let producer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            queue.push("/x");
        });
        assert_eq!(events.next().await, Some(WatchEvent::Changed("/x".into())));
        producer.await.unwrap();
    }

    #[tokio::test]
    async fn open_without_xen_is_a_clear_error() {
        if std::path::Path::new("/dev/xen/xenbus").exists()
            || std::path::Path::new("/run/xenstored/socket").exists()
            || std::env::var_os("XENSTORED_PATH").is_some()
        {
            return; // a real (or configured) xenstore is present
        }
        let err = XsClient::open().await.unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("xenstore open"), "{err}");
    }
}
