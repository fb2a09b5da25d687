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
//! Order survives a switch: each client counts its events not yet
//! acknowledged ([`ClientFlow`]); before its events go to a *different*
//! worker, the client waits until the old worker (or, after a crash, the
//! worker its events were redelivered to) has acknowledged every earlier one.
//!
//! Each link has a bounded queue; `dispatch` awaits room in it, so a slow
//! worker back-pressures the client's reader and from there the client's
//! TCP socket. With no routable worker at all, `dispatch` waits for one.
//!
//! The router also knows every link's interest acknowledgements (push
//! clients' links included: they are here, drained, taking no events), so
//! that a join or bind can wait until every other link's peer routes group
//! and uid sends here ([`Router::await_interest`]).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gw_protocol::pb;
use parking_lot::RwLock;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

/// A client's events not yet acknowledged by a worker.
#[derive(Debug, Default)]
pub(crate) struct ClientFlow {
    outstanding: AtomicUsize,
    idle: Notify,
}

impl ClientFlow {
    /// One event was acknowledged.
    pub(crate) fn done(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// An event on its way to a worker, with the client's sequence number for
/// re-routing and its flow for acknowledgement.
#[derive(Debug)]
pub(crate) struct RoutedEvent {
    pub(crate) seq: u64,
    pub(crate) event: pb::Event,
    pub(crate) flow: Arc<ClientFlow>,
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
    /// The peer's node id, for logs.
    pub(crate) node_id: Arc<str>,
    /// Highest interest version the peer acknowledged (`InterestAck`). 0:
    /// it never acknowledged anything (an SDK without acks) and is never
    /// waited for.
    interest_acked: AtomicU64,
    /// Non-zero: the peer did not acknowledge this interest version in
    /// time. It is not waited for again until it has.
    interest_lagging: AtomicU64,
}

impl WorkerSlot {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether a wait for interest `version` waits for this link's peer:
    /// it acknowledges interest, is not marked lagging, and is behind.
    fn holds_back(&self, version: u64) -> bool {
        let acked = self.interest_acked.load(Ordering::Acquire);
        acked != 0 && acked < version && self.interest_lagging.load(Ordering::Acquire) <= acked
    }

    fn routable(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

/// One link's interest acknowledgements (see
/// [`crate::GatewayHandle::interest_acks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterestAckState {
    /// The peer's node id.
    pub node_id: String,
    /// Highest interest version it acknowledged; 0 if it never did.
    pub acked: u64,
    /// It missed a wait and is not waited for until it catches up.
    pub lagging: bool,
}

/// The set of worker links and the routing decision.
pub(crate) struct Router {
    slots: RwLock<Vec<Arc<WorkerSlot>>>,
    /// Number of routable workers; `dispatch` waits on it when it is 0.
    routable: watch::Sender<usize>,
    next_key: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
    /// Woken when a link's acknowledged interest version grows or a link
    /// leaves: what [`Self::await_interest`] waits for.
    interest_progress: Notify,
}

impl Router {
    pub(crate) fn new() -> Self {
        Router {
            slots: RwLock::new(Vec::new()),
            routable: watch::channel(0).0,
            next_key: AtomicU64::new(1),
            hasher: Default::default(),
            interest_progress: Notify::new(),
        }
    }

    /// Adds the link of peer `node_id` with a queue of `queue` events.
    pub(crate) fn add(
        &self,
        queue: usize,
        node_id: &str,
    ) -> (Arc<WorkerSlot>, mpsc::Receiver<RoutedEvent>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let slot = Arc::new(WorkerSlot {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            tx,
            alive: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            node_id: node_id.into(),
            interest_acked: AtomicU64::new(0),
            interest_lagging: AtomicU64::new(0),
        });
        self.slots.write().push(slot.clone());
        self.recount();
        (slot, rx)
    }

    /// Takes a link out of routing (it died or left). Nobody waits for its
    /// interest acknowledgements any more.
    pub(crate) fn remove(&self, slot: &WorkerSlot) {
        slot.alive.store(false, Ordering::Release);
        self.slots.write().retain(|s| s.key != slot.key);
        self.recount();
        self.interest_progress.notify_waiters();
    }

    /// The peer of `slot` applied every interest change up to `version`.
    pub(crate) fn note_interest_ack(&self, slot: &WorkerSlot, version: u64) {
        if slot.interest_acked.fetch_max(version, Ordering::AcqRel) < version {
            self.interest_progress.notify_waiters();
        }
    }

    /// Whether every link but `except` whose peer acknowledges interest
    /// has acknowledged `version` (links marked lagging do not count).
    pub(crate) fn interest_settled(&self, except: Option<u64>, version: u64) -> bool {
        self.slots
            .read()
            .iter()
            .all(|s| Some(s.key) == except || !s.holds_back(version))
    }

    /// Waits until [`Self::interest_settled`], at most `timeout`. The links
    /// still behind then are logged and marked lagging (not waited for
    /// again until they acknowledge `version`); returns how many.
    pub(crate) async fn await_interest(
        &self,
        except: Option<u64>,
        version: u64,
        timeout: Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progress = self.interest_progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.interest_settled(except, version) {
                return 0;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                break;
            }
        }
        self.mark_lagging(except, version)
    }

    /// Marks the links (but `except`) still behind `version` as lagging: not
    /// waited for again until they acknowledge it. Returns how many.
    fn mark_lagging(&self, except: Option<u64>, version: u64) -> usize {
        let behind: Vec<Arc<WorkerSlot>> = self
            .slots
            .read()
            .iter()
            .filter(|s| Some(s.key) != except && s.holds_back(version))
            .cloned()
            .collect();
        for s in &behind {
            s.interest_lagging.fetch_max(version, Ordering::AcqRel);
            tracing::warn!(
                peer = %s.node_id,
                acked = s.interest_acked.load(Ordering::Acquire),
                version,
                "peer did not acknowledge an interest change in time; not waiting for it until it catches up"
            );
        }
        if !behind.is_empty() {
            // Other waits may have been waiting for these links only.
            self.interest_progress.notify_waiters();
        }
        behind.len()
    }

    /// Every link's interest acknowledgements.
    pub(crate) fn interest_acks(&self) -> Vec<InterestAckState> {
        self.slots
            .read()
            .iter()
            .map(|s| {
                let acked = s.interest_acked.load(Ordering::Acquire);
                InterestAckState {
                    node_id: s.node_id.to_string(),
                    acked,
                    lagging: s.interest_lagging.load(Ordering::Acquire) > acked,
                }
            })
            .collect()
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

    /// Events waiting in link queues, over all links.
    pub(crate) fn queued_events(&self) -> usize {
        self.slots
            .read()
            .iter()
            .map(|s| s.tx.max_capacity() - s.tx.capacity())
            .sum()
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
        self.dispatch_inner(sticky, event, shutdown, false).await
    }

    /// The common case without waiting: the client's worker is known,
    /// routable and has room. Otherwise the event comes back for
    /// [`Self::dispatch`] (not boxed: it is moved, not copied, and this is
    /// the per-message path).
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_dispatch(
        &self,
        sticky: &Option<Arc<WorkerSlot>>,
        event: RoutedEvent,
    ) -> Result<(), RoutedEvent> {
        match sticky {
            Some(slot) if slot.routable() => match slot.tx.try_reserve() {
                Ok(permit) => {
                    event.flow.outstanding.fetch_add(1, Ordering::AcqRel);
                    permit.send(event);
                    Ok(())
                }
                Err(_) => Err(event),
            },
            _ => Err(event),
        }
    }

    /// Re-routes an event whose worker is gone (it is still counted as
    /// outstanding, so it must not wait for its own acknowledgement).
    pub(crate) async fn redispatch(
        &self,
        event: RoutedEvent,
        shutdown: &CancellationToken,
    ) -> Result<(), RoutedEvent> {
        self.dispatch_inner(&mut None, event, shutdown, true).await
    }

    async fn dispatch_inner(
        &self,
        sticky: &mut Option<Arc<WorkerSlot>>,
        event: RoutedEvent,
        shutdown: &CancellationToken,
        redelivery: bool,
    ) -> Result<(), RoutedEvent> {
        loop {
            let slot = match sticky {
                Some(s) if s.routable() => s.clone(),
                _ => match self.pick(event.seq) {
                    Some(s) => {
                        if !redelivery {
                            // Switching workers: earlier events first.
                            tokio::select! {
                                _ = shutdown.cancelled() => return Err(event),
                                _ = event.flow.wait_idle() => {}
                            }
                            if !s.routable() {
                                continue;
                            }
                        }
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
                    if !redelivery {
                        event.flow.outstanding.fetch_add(1, Ordering::AcqRel);
                    }
                    permit.send(event);
                    return Ok(());
                }
                // The link closed its queue: it is dying and will redeliver
                // what it had; route this one anew. The slot can never take
                // an event again, so it leaves routing here too: if its task
                // ended without taking it out (dropped mid-await), `pick`
                // would hand it back forever and this loop would spin.
                Err(_) => {
                    tracing::debug!(
                        worker_slot = slot.key,
                        "worker link queue closed; slot taken out of routing"
                    );
                    self.remove(&slot);
                    *sticky = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn routed(seq: u64) -> RoutedEvent {
        RoutedEvent {
            seq,
            event: pb::Event::default(),
            flow: Arc::default(),
        }
    }

    /// Only links whose peer acknowledges interest are waited for; one that
    /// misses the wait is marked lagging until it catches up; one that
    /// leaves is not waited for any more.
    #[tokio::test(start_paused = true)]
    async fn interest_waits_for_acknowledging_links_and_marks_a_late_one_lagging() {
        use futures_util::FutureExt;
        let router = Router::new();
        let (joiner, _q1) = router.add(4, "joiner");
        let (_old_sdk, _q2) = router.add(4, "old-sdk");
        let (fast, _q3) = router.add(4, "fast");
        let (slow, _q4) = router.add(4, "slow");
        for s in [&fast, &slow] {
            router.note_interest_ack(s, 1);
        }
        let me = Some(joiner.key);
        // The joiner itself and a link that never acked do not count.
        assert!(router.interest_settled(me, 1));
        assert!(!router.interest_settled(me, 2));

        let start = tokio::time::Instant::now();
        let wait = router.await_interest(me, 2, Duration::from_secs(1));
        tokio::pin!(wait);
        assert!((&mut wait).now_or_never().is_none());
        router.note_interest_ack(&fast, 2);
        assert!((&mut wait).now_or_never().is_none());
        // `slow` never acknowledges 2: one link marked lagging, after the
        // timeout (time is paused: exactly then).
        assert_eq!(wait.await, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let slow_state = |r: &Router| {
            r.interest_acks()
                .into_iter()
                .find(|a| a.node_id == "slow")
                .expect("slow listed")
        };
        assert!(slow_state(&router).lagging);

        // Lagging: not waited for, until it acknowledges what it missed.
        router.note_interest_ack(&fast, 3);
        assert!(router.interest_settled(me, 3));
        router.note_interest_ack(&slow, 2);
        assert!(!slow_state(&router).lagging);
        assert!(!router.interest_settled(me, 3));

        // A link that leaves stops being waited for at once.
        let start = tokio::time::Instant::now();
        let (behind, ()) = tokio::join!(
            router.await_interest(me, 3, Duration::from_secs(60)),
            async { router.remove(&slow) }
        );
        assert_eq!(behind, 0);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// A link whose queue closed without leaving routing (its task was
    /// dropped mid-await) must not keep being picked: dispatch takes it out
    /// and waits for a live worker instead of spinning on the dead one.
    #[tokio::test]
    async fn closed_queue_leaves_routing_and_dispatch_waits_for_a_live_worker() {
        let router = Arc::new(Router::new());
        let (_dead, dead_rx) = router.add(4, "w");
        drop(dead_rx);
        assert_eq!(*router.routable.borrow(), 1);

        let shutdown = CancellationToken::new();
        let task = {
            let router = router.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { router.dispatch(&mut None, routed(7), &shutdown).await })
        };
        let mut routable = router.routable.subscribe();
        tokio::time::timeout(Duration::from_secs(5), routable.wait_for(|n| *n == 0))
            .await
            .expect("the dead slot left routing")
            .expect("router alive");
        assert!(router.slots.read().is_empty());

        let (_live, mut live_rx) = router.add(4, "w");
        let got = tokio::time::timeout(Duration::from_secs(5), live_rx.recv())
            .await
            .expect("the event reached the live worker")
            .expect("queue open");
        assert_eq!(got.seq, 7);
        assert!(task.await.expect("dispatch task").is_ok());
    }
}
