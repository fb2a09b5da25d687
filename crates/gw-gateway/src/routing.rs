//! Where a client's event goes: choosing a worker and handing the event to
//! that worker's link.
//!
//! Routing is sticky: a client's reader task remembers the worker it was
//! given and sends every event there while that worker is up and not
//! draining, so per-client order holds. A new choice uses rendezvous
//! hashing over the routable workers: every party that re-routes a client
//! (its reader, or a dying link redelivering its unacknowledged events)
//! arrives at the same worker without asking anyone.
//!
//! Each link has a bounded queue; `dispatch` awaits room in it, so a slow
//! worker back-pressures the client's reader and from there the client's
//! TCP socket. With no routable worker at all, `dispatch` waits for one.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use gw_protocol::pb;
use parking_lot::RwLock;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// An event on its way to a worker, with the client's sequence number for
/// re-routing.
#[derive(Debug)]
pub(crate) struct RoutedEvent {
    pub(crate) seq: u64,
    pub(crate) event: pb::Event,
}

/// One connected worker link, as routing sees it.
#[derive(Debug)]
pub(crate) struct WorkerSlot {
    /// Local number of this link (unique for the gateway's lifetime).
    pub(crate) key: u64,
    tx: mpsc::Sender<RoutedEvent>,
    alive: AtomicBool,
    /// The worker said it is leaving: send its clients elsewhere.
    draining: AtomicBool,
}

impl WorkerSlot {
    fn routable(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

/// The set of worker links and the routing decision.
pub(crate) struct Router {
    slots: RwLock<Vec<Arc<WorkerSlot>>>,
    /// Number of routable workers; `dispatch` waits on it when it is 0.
    routable: watch::Sender<usize>,
    next_key: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
}

impl Router {
    pub(crate) fn new() -> Self {
        Router {
            slots: RwLock::new(Vec::new()),
            routable: watch::channel(0).0,
            next_key: AtomicU64::new(1),
            hasher: Default::default(),
        }
    }

    /// Adds a worker link with a queue of `queue` events.
    pub(crate) fn add(
        &self,
        queue: usize,
    ) -> (Arc<WorkerSlot>, mpsc::Receiver<RoutedEvent>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let slot = Arc::new(WorkerSlot {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            tx,
            alive: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        });
        self.slots.write().push(slot.clone());
        self.recount();
        (slot, rx)
    }

    /// Takes a link out of routing (it died or left).
    pub(crate) fn remove(&self, slot: &WorkerSlot) {
        slot.alive.store(false, Ordering::Release);
        self.slots.write().retain(|s| s.key != slot.key);
        self.recount();
    }

    /// Marks a link as draining: no new events go to it.
    pub(crate) fn drain(&self, slot: &WorkerSlot) {
        slot.draining.store(true, Ordering::Release);
        self.recount();
    }

    fn recount(&self) {
        let n = self.slots.read().iter().filter(|s| s.routable()).count();
        self.routable.send_replace(n);
    }

    /// Rendezvous choice for client `seq` among routable workers.
    fn pick(&self, seq: u64) -> Option<Arc<WorkerSlot>> {
        let slots = self.slots.read();
        slots
            .iter()
            .filter(|s| s.routable())
            .max_by_key(|s| {
                let mut h = self.hasher.build_hasher();
                h.write_u64(seq);
                h.write_u64(s.key);
                h.finish()
            })
            .cloned()
    }

    /// Hands `event` to the client's worker, choosing one if needed and
    /// waiting for room or for a worker. Gives the event back only when
    /// `shutdown` fires first.
    pub(crate) async fn dispatch(
        &self,
        sticky: &mut Option<Arc<WorkerSlot>>,
        event: RoutedEvent,
        shutdown: &CancellationToken,
    ) -> Result<(), RoutedEvent> {
        loop {
            let slot = match sticky {
                Some(s) if s.routable() => s.clone(),
                _ => match self.pick(event.seq) {
                    Some(s) => {
                        *sticky = Some(s.clone());
                        s
                    }
                    None => {
                        let mut routable = self.routable.subscribe();
                        tokio::select! {
                            _ = shutdown.cancelled() => return Err(event),
                            _ = routable.wait_for(|n| *n > 0) => continue,
                        }
                    }
                },
            };
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return Err(event),
                r = slot.tx.reserve() => r,
            };
            match permit {
                Ok(permit) => {
                    permit.send(event);
                    return Ok(());
                }
                // The link closed its queue: it is dying and will redeliver
                // what it had; route this one anew.
                Err(_) => *sticky = None,
            }
        }
    }
}
