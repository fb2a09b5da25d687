//! Runs handler hooks: one client's events one at a time and in order,
//! different clients' concurrently.
//!
//! Hooks run on a small pool of runner tasks that outlive the events they
//! handle. Spawning a task per event cost an allocation of the whole hook
//! future (about 3 KiB with the chat demo's handler) and several copies of
//! it per event; a parked runner is woken instead. The pool grows while
//! every runner is busy (a hook awaiting a query must not hold up other
//! clients) and shrinks back to [`IDLE_RUNNERS`] when the burst is over.
//!
//! A client has a queue only while it has events to handle, and whichever
//! runner took its first event drains it, which keeps the client's order.
//! The number of events held here is bounded by the gateways' in-flight
//! window (they stop sending until we acknowledge).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use gw_link::frame;
use gw_protocol::pb::{self, link_frame::Body};
use gw_protocol::{ClientId, Event, EventKind};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Semaphore};

use crate::handle::Handle;
use crate::handler::{CloseInfo, Context, EventHandler, HandshakeDecision};
use crate::session::Session;

/// Runners kept parked after a burst; more than this exit when idle.
const IDLE_RUNNERS: usize = 32;

/// One event and where to acknowledge it.
pub(crate) struct Job {
    pub(crate) event: Event,
    /// The link (connection instance) the event came on.
    pub(crate) ack: mpsc::Sender<pb::LinkFrame>,
}

#[derive(Default)]
struct Schedule {
    /// Clients with an event running or waiting, and their later events.
    busy: HashMap<ClientId, VecDeque<Job>>,
    /// First events of clients that no runner has taken yet.
    ready: VecDeque<Job>,
    /// Runners parked on `wake`, not counting those already given a permit.
    idle: usize,
    /// A runner was woken or spawned and has not looked at `ready` yet; it
    /// wakes the next one if there is more, so a burst of events wakes
    /// runners one by one as they are needed rather than all at once.
    waking: bool,
}

pub(crate) struct Executor<H> {
    handler: Arc<H>,
    handle: Handle,
    metrics: Arc<crate::WorkerMetrics>,
    schedule: Mutex<Schedule>,
    /// One permit per parked runner asked to look at `ready`. A semaphore
    /// rather than `Notify` because permits add up; closed on shutdown.
    wake: Semaphore,
}

impl<H: EventHandler> Executor<H> {
    pub(crate) fn new(
        handler: Arc<H>,
        handle: Handle,
        metrics: Arc<crate::WorkerMetrics>,
    ) -> Arc<Self> {
        Arc::new(Executor {
            handler,
            handle,
            metrics,
            schedule: Mutex::new(Schedule::default()),
            wake: Semaphore::new(0),
        })
    }

    /// Nothing queued or running.
    pub(crate) fn is_idle(&self) -> bool {
        self.schedule.lock().busy.is_empty()
    }

    /// Parked runners exit; a job submitted later still runs (on a runner
    /// spawned for it, which exits afterwards).
    pub(crate) fn close(&self) {
        self.wake.close();
    }

    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        let mut sched = self.schedule.lock();
        match sched.busy.entry(job.event.client_id) {
            Entry::Occupied(mut q) => {
                q.get_mut().push_back(job);
                return;
            }
            Entry::Vacant(v) => {
                v.insert(VecDeque::new());
            }
        }
        sched.ready.push_back(job);
        self.wake_runner(&mut sched);
    }

    /// Make sure some runner will look at `ready` (called with it non-empty).
    fn wake_runner(self: &Arc<Self>, sched: &mut Schedule) {
        let closed = self.wake.is_closed();
        if sched.waking && !closed {
            return;
        }
        sched.waking = true;
        if sched.idle > 0 && !closed {
            sched.idle -= 1;
            self.wake.add_permits(1);
        } else {
            let this = self.clone();
            tokio::spawn(async move { this.runner().await });
        }
    }

    /// Take the next first event, waking another runner if more wait.
    fn take_ready(self: &Arc<Self>, sched: &mut Schedule) -> Option<Job> {
        let job = sched.ready.pop_front()?;
        if !sched.ready.is_empty() {
            self.wake_runner(sched);
        }
        Some(job)
    }

    async fn runner(self: Arc<Self>) {
        let mut woken = true;
        loop {
            // Under one lock from looking at `ready` to counting ourselves
            // idle: a job submitted meanwhile then finds this runner idle
            // (and wakes it), or none idle (and spawns one), so no job waits
            // for a runner that left.
            let job = {
                let mut sched = self.schedule.lock();
                if woken {
                    sched.waking = false;
                }
                match self.take_ready(&mut sched) {
                    Some(job) => Some(job),
                    None if sched.idle >= IDLE_RUNNERS || self.wake.is_closed() => return,
                    None => {
                        sched.idle += 1;
                        None
                    }
                }
            };
            match job {
                Some(job) => {
                    woken = false;
                    self.drain_client(job).await;
                }
                None => match self.wake.acquire().await {
                    Ok(permit) => {
                        permit.forget();
                        woken = true;
                    }
                    // Closed: look at `ready` once more (a submit may have
                    // counted on this runner just before the close), then
                    // leave from the top of the loop.
                    Err(_) => woken = true,
                },
            }
        }
    }

    /// Run `job`, then the client's events queued meanwhile, in order.
    async fn drain_client(&self, mut job: Job) {
        let client = job.event.client_id;
        loop {
            self.run_one(job).await;
            let mut sched = self.schedule.lock();
            match sched.busy.get_mut(&client).and_then(VecDeque::pop_front) {
                Some(next) => job = next,
                None => {
                    sched.busy.remove(&client);
                    return;
                }
            }
        }
    }

    async fn run_one(&self, job: Job) {
        let Job { event, ack } = job;
        let id = event.id;
        let client_id = event.client_id;
        let mut ctx = Context::new(
            client_id,
            event.remote_addr,
            event.redelivered,
            Session::from_bytes(&event.session),
            self.handle.clone(),
        );
        let is_close = matches!(event.kind, EventKind::Close { .. });
        let counter = match event.kind {
            EventKind::Handshake(_) => &self.metrics.handshakes,
            EventKind::Connect { .. } => &self.metrics.connects,
            EventKind::Message(_) => &self.metrics.messages,
            EventKind::Close { .. } => &self.metrics.closes,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if event.redelivered {
            self.metrics
                .redelivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let started = std::time::Instant::now();
        let mut handshake_reply = None;
        let hook = async {
            match event.kind {
                EventKind::Handshake(req) => {
                    let decision = self.handler.on_handshake(&mut ctx, &req).await;
                    handshake_reply = Some(decision);
                }
                EventKind::Connect { protocol } => {
                    ctx.protocol = Some(protocol);
                    self.handler.on_connect(&mut ctx).await
                }
                EventKind::Message(p) => self.handler.on_message(&mut ctx, p).await,
                EventKind::Close {
                    reason,
                    uid,
                    groups,
                } => {
                    self.handler
                        .on_close(
                            &mut ctx,
                            CloseInfo {
                                reason,
                                uid,
                                groups,
                            },
                        )
                        .await
                }
            }
        };
        // A panicking handler must not take the worker down with it (a flaw
        // of the original); the event is logged and acknowledged so that it
        // is not redelivered forever.
        if AssertUnwindSafe(hook).catch_unwind().await.is_err() {
            self.metrics
                .panics
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(%client_id, event = id, "event handler panicked");
        }
        self.metrics.observe(started.elapsed());
        if let Some(decision) = handshake_reply {
            let mut reply = pb::HandshakeReply {
                client_id: client_id.to_string(),
                ..Default::default()
            };
            match decision {
                HandshakeDecision::Accept { uid, groups } => {
                    reply.accept = true;
                    reply.uid = uid.unwrap_or_default();
                    reply.groups = groups;
                    if !ctx.session.as_map().is_empty() {
                        reply.session = serde_json::Value::Object(ctx.session.as_map().clone())
                            .to_string()
                            .into();
                    }
                }
                HandshakeDecision::Reject { status, reason } => {
                    reply.status = u32::from(status);
                    reply.reason = reason;
                }
            }
            let _ = ack.send(frame(Body::HandshakeReply(reply))).await;
        } else if !is_close {
            if let Some((set, remove)) = ctx.session.changes() {
                if let Err(e) = self
                    .handle
                    .update_session_keys(client_id, set, remove)
                    .await
                {
                    tracing::warn!(%client_id, error = %e, "session write-back failed");
                }
            }
        }
        // The link may be gone (then the gateway redelivers): nothing to do.
        let _ = ack.send(frame(Body::Ack(pb::Ack { ids: vec![id] }))).await;
    }
}
