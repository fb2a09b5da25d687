//! Runs handler hooks: one client's events one at a time and in order,
//! different clients' concurrently.
//!
//! No task waits per idle client: a client has a queue only while it has
//! events to handle, and one runner task drains it and then exits. The
//! number of events held here is bounded by the gateways' in-flight window
//! (they stop sending until we acknowledge).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use gw_link::frame;
use gw_protocol::pb::{self, link_frame::Body};
use gw_protocol::{ClientId, Event, EventKind};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::handle::Handle;
use crate::handler::{CloseInfo, Context, EventHandler, HandshakeDecision};
use crate::session::Session;

/// One event and where to acknowledge it.
pub(crate) struct Job {
    pub(crate) event: Event,
    /// The link (connection instance) the event came on.
    pub(crate) ack: mpsc::Sender<pb::LinkFrame>,
}

pub(crate) struct Executor<H> {
    handler: Arc<H>,
    handle: Handle,
    metrics: Arc<crate::WorkerMetrics>,
    queues: Mutex<HashMap<ClientId, VecDeque<Job>>>,
    pub(crate) tracker: TaskTracker,
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
            queues: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
        })
    }

    /// Nothing queued or running.
    pub(crate) fn is_idle(&self) -> bool {
        self.queues.lock().is_empty()
    }

    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        let client = job.event.client_id;
        match self.queues.lock().entry(client) {
            Entry::Occupied(mut q) => {
                q.get_mut().push_back(job);
                return;
            }
            Entry::Vacant(v) => {
                v.insert(VecDeque::new());
            }
        }
        let this = self.clone();
        self.tracker
            .spawn(async move { this.drain(client, job).await });
    }

    async fn drain(self: Arc<Self>, client: ClientId, mut job: Job) {
        loop {
            self.run_one(job).await;
            let mut queues = self.queues.lock();
            match queues.get_mut(&client).and_then(VecDeque::pop_front) {
                Some(next) => job = next,
                None => {
                    queues.remove(&client);
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
