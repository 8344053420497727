//! In-memory fakes of xenstore and of the grant/event-channel transport, for tests of this crate
//! and of its dependents (feature `test-utils`). The test plays toolstack and guest through the
//! synchronous helpers; the backend under test uses the [`Xenstore`] / [`Transport`] traits.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::ids::{DomId, EvtchnPort, GrantRef};
use crate::tpmif::MemPage;
use crate::xenbus::{Connection, Transport, TransportError};
use crate::xenstore::{WatchEvents, WatchQueue, Xenstore, XsError};

fn is_at_or_below(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[derive(Default)]
struct Store {
    nodes: BTreeMap<String, String>,
    /// Watched paths and the queue of the client that registered each.
    watches: Vec<(String, Arc<WatchQueue>)>,
    ops: usize,
    log: Vec<(String, String)>,
}

/// An in-memory xenstore with xenstored's watch semantics: a watch fires for writes and
/// removals at or below its path, once right after registration, and for a removal above it.
/// Writes create missing parents with empty values. Clones share the store and the watches;
/// [`client`](FakeXenstore::client) makes a second connection (same store, own watches and
/// event queue), as a second domain or process would have.
#[derive(Clone)]
pub struct FakeXenstore {
    store: Arc<Mutex<Store>>,
    queue: Arc<WatchQueue>,
}

impl FakeXenstore {
    /// An empty store and the event queue of its watches.
    pub fn new() -> (Self, WatchEvents) {
        let queue = Arc::new(WatchQueue::default());
        let fake = Self {
            store: Arc::new(Mutex::new(Store::default())),
            queue: queue.clone(),
        };
        (fake, WatchEvents::new(queue))
    }

    /// Another client of the same store, with its own watches and event queue.
    pub fn client(&self) -> (Self, WatchEvents) {
        let queue = Arc::new(WatchQueue::default());
        let fake = Self {
            store: self.store.clone(),
            queue: queue.clone(),
        };
        (fake, WatchEvents::new(queue))
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fire(&self, store: &Store, changed: &str, removed: bool) {
        for (w, queue) in &store.watches {
            if is_at_or_below(changed, w) {
                queue.push(changed);
            } else if removed && is_at_or_below(w, changed) {
                queue.push(w);
            }
        }
    }

    /// Writes `path = value` (as the toolstack or guest would), firing watches.
    pub fn set(&self, path: &str, value: &str) {
        let mut st = self.lock();
        st.ops += 1;
        let mut parent = path;
        while let Some(idx) = parent.rfind('/') {
            parent = &parent[..idx];
            if parent.is_empty() {
                break;
            }
            st.nodes.entry(parent.to_owned()).or_default();
        }
        st.nodes.insert(path.to_owned(), value.to_owned());
        st.log.push((path.to_owned(), value.to_owned()));
        self.fire(&st, path, false);
    }

    /// Reads a node.
    pub fn get(&self, path: &str) -> Option<String> {
        self.lock().nodes.get(path).cloned()
    }

    /// Whether a node exists.
    pub fn exists(&self, path: &str) -> bool {
        self.lock().nodes.contains_key(path)
    }

    /// Removes a node and its subtree (as the toolstack would), firing watches.
    pub fn remove(&self, path: &str) {
        let mut st = self.lock();
        st.ops += 1;
        st.nodes.retain(|k, _| !is_at_or_below(k, path));
        self.fire(&st, path, true);
    }

    /// Direct children of a node.
    pub fn children(&self, path: &str) -> Option<Vec<String>> {
        let st = self.lock();
        if !st.nodes.contains_key(path) {
            return None;
        }
        let prefix = format!("{path}/");
        Some(
            st.nodes
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter(|rest| !rest.contains('/'))
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Paths currently watched (by any client).
    pub fn watched(&self) -> Vec<String> {
        self.lock().watches.iter().map(|(w, _)| w.clone()).collect()
    }

    /// Every value written to exactly `path`, oldest first (by any clone).
    pub fn history(&self, path: &str) -> Vec<String> {
        self.lock()
            .log
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Number of mutating operations so far (writes and removals, from any clone).
    pub fn mutations(&self) -> usize {
        self.lock().ops
    }
}

impl std::fmt::Debug for FakeXenstore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeXenstore")
            .field("nodes", &self.lock().nodes)
            .finish()
    }
}

impl Xenstore for FakeXenstore {
    async fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        Ok(self.get(path))
    }

    async fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        if path.is_empty() {
            return Err(XsError::new(
                "write",
                path,
                io::ErrorKind::InvalidInput.into(),
            ));
        }
        self.set(path, value);
        Ok(())
    }

    async fn rm(&self, path: &str) -> Result<(), XsError> {
        self.remove(path);
        Ok(())
    }

    async fn directory(&self, path: &str) -> Result<Option<Vec<String>>, XsError> {
        Ok(self.children(path))
    }

    async fn watch(&self, path: &str) -> Result<(), XsError> {
        let mut st = self.lock();
        if !st
            .watches
            .iter()
            .any(|(w, q)| w == path && Arc::ptr_eq(q, &self.queue))
        {
            st.watches.push((path.to_owned(), self.queue.clone()));
        }
        self.queue.push(path);
        Ok(())
    }

    async fn unwatch(&self, path: &str) -> Result<(), XsError> {
        let queue = self.queue.clone();
        self.lock()
            .watches
            .retain(|(w, q)| !(w == path && Arc::ptr_eq(q, &queue)));
        Ok(())
    }
}

/// The guest's end of a fake event channel.
#[derive(Default)]
pub struct FakeChannel {
    to_backend: Notify,
    to_guest: Notify,
    guest_notifications: AtomicUsize,
    bound: AtomicUsize,
}

impl FakeChannel {
    /// Signals the backend (the guest's `notify_remote_via_evtchn`).
    pub fn kick(&self) {
        self.to_backend.notify_one();
    }

    /// How many times the backend notified the guest.
    pub fn notifications(&self) -> usize {
        self.guest_notifications.load(Ordering::SeqCst)
    }

    /// Waits for the backend's next notification.
    pub async fn wait_notified(&self) {
        self.to_guest.notified().await;
    }

    /// Whether a backend connection is currently bound to this channel.
    pub fn is_bound(&self) -> bool {
        self.bound.load(Ordering::SeqCst) > 0
    }
}

#[derive(Default)]
struct Grants {
    pages: HashMap<(DomId, GrantRef), Arc<MemPage>>,
    ports: HashMap<(DomId, EvtchnPort), Arc<FakeChannel>>,
}

/// A transport over [`MemPage`]s and [`FakeChannel`]s that the test "grants" beforehand.
/// Connecting to an ungranted ref or unallocated port fails like the real calls do.
#[derive(Clone, Default)]
pub struct MemTransport {
    grants: Arc<Mutex<Grants>>,
    live: Arc<AtomicUsize>,
}

impl MemTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// As guest `domid`: grant a fresh zeroed page under `gref`.
    pub fn grant_page(&self, domid: DomId, gref: GrantRef) -> Arc<MemPage> {
        let page = Arc::new(MemPage::new());
        self.lock().pages.insert((domid, gref), page.clone());
        page
    }

    /// As guest `domid`: allocate an unbound port for the backend.
    pub fn alloc_port(&self, domid: DomId, port: EvtchnPort) -> Arc<FakeChannel> {
        let chan = Arc::new(FakeChannel::default());
        self.lock().ports.insert((domid, port), chan.clone());
        chan
    }

    /// Connections currently alive (mapped and bound).
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Transport for MemTransport {
    type Connection = MemConnection;

    fn connect(
        &mut self,
        frontend: DomId,
        ring_ref: GrantRef,
        port: EvtchnPort,
    ) -> Result<MemConnection, TransportError> {
        let grants = self.lock();
        let page =
            grants
                .pages
                .get(&(frontend, ring_ref))
                .cloned()
                .ok_or(TransportError::MapGrant {
                    domid: frontend,
                    gref: ring_ref,
                    source: io::Error::from_raw_os_error(libc::EINVAL),
                })?;
        let chan =
            grants
                .ports
                .get(&(frontend, port))
                .cloned()
                .ok_or(TransportError::BindEvtchn {
                    domid: frontend,
                    port,
                    source: io::Error::from_raw_os_error(libc::EINVAL),
                })?;
        chan.bound.fetch_add(1, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(MemConnection {
            page,
            chan,
            live: self.live.clone(),
        })
    }
}

/// A live fake connection; dropping it "unmaps and unbinds".
pub struct MemConnection {
    page: Arc<MemPage>,
    chan: Arc<FakeChannel>,
    live: Arc<AtomicUsize>,
}

impl Drop for MemConnection {
    fn drop(&mut self) {
        self.chan.bound.fetch_sub(1, Ordering::SeqCst);
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connection for MemConnection {
    type Page = Arc<MemPage>;

    fn page(&self) -> &Arc<MemPage> {
        &self.page
    }

    fn notify(&self) -> Result<(), TransportError> {
        self.chan.guest_notifications.fetch_add(1, Ordering::SeqCst);
        self.chan.to_guest.notify_one();
        Ok(())
    }

    async fn wait_event(&self) -> Result<(), TransportError> {
        self.chan.to_backend.notified().await;
        Ok(())
    }
}

/// The frontend side of [`MemTransport`]: "grants" pages and "allocates" ports in the shared
/// [`MemTransport`] as domain `domid`, so a [`crate::frontend::Frontend`] and a
/// [`crate::xenbus::Backend`] over clones of the same `MemTransport` see one [`MemPage`] and one
/// [`FakeChannel`]. Grant refs count up from 8, ports from 20.
pub struct FakeFrontendTransport {
    mem: MemTransport,
    domid: DomId,
    shared: u32,
    fail: bool,
}

impl FakeFrontendTransport {
    /// A frontend transport for guest `domid` over `mem`.
    pub fn new(mem: MemTransport, domid: DomId) -> Self {
        Self {
            mem,
            domid,
            shared: 0,
            fail: false,
        }
    }

    /// Makes every further [`share`](crate::frontend::FrontendTransport::share) fail like a
    /// missing `/dev/xen/gntalloc`.
    pub fn fail_shares(&mut self) {
        self.fail = true;
    }

    /// How many rings were shared so far.
    pub fn shared(&self) -> u32 {
        self.shared
    }
}

impl crate::frontend::FrontendTransport for FakeFrontendTransport {
    type Link = FakeFrontendLink;

    fn share(
        &mut self,
        backend: DomId,
    ) -> Result<crate::frontend::SharedRing<FakeFrontendLink>, TransportError> {
        if self.fail {
            return Err(TransportError::ShareGrant {
                domid: backend,
                source: io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        let n = self.shared;
        self.shared += 1;
        let ring_ref = GrantRef::new(8 + n);
        let port = EvtchnPort::new(20 + n).ok_or(TransportError::AllocEvtchn {
            domid: backend,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let page = self.mem.grant_page(self.domid, ring_ref);
        let chan = self.mem.alloc_port(self.domid, port);
        Ok(crate::frontend::SharedRing {
            ring_ref,
            port,
            link: FakeFrontendLink { page, chan },
        })
    }
}

/// The guest's end of a fake ring: the page it granted and its end of the channel.
pub struct FakeFrontendLink {
    page: Arc<MemPage>,
    chan: Arc<FakeChannel>,
}

impl FakeFrontendLink {
    /// The channel (to see whether a backend is bound).
    pub fn channel(&self) -> &Arc<FakeChannel> {
        &self.chan
    }
}

impl Connection for FakeFrontendLink {
    type Page = Arc<MemPage>;

    fn page(&self) -> &Arc<MemPage> {
        &self.page
    }

    fn notify(&self) -> Result<(), TransportError> {
        self.chan.kick();
        Ok(())
    }

    async fn wait_event(&self) -> Result<(), TransportError> {
        self.chan.wait_notified().await;
        Ok(())
    }
}
