//! One worker's link, as seen from the gateway: a single actor task owns the
//! socket, writes events (batched: one flush for everything ready), reads
//! acknowledgements, commands and queries, and keeps the link alive.
//!
//! At most `worker_inflight` events are unacknowledged at a time; beyond
//! that the actor stops taking events from its queue, the queue fills and
//! client readers wait (back-pressure instead of unbounded buffers).
//! When the link ends, every event the worker had not acknowledged, and
//! every event still queued for it, is routed again to another worker —
//! the former flagged `redelivered` (at-least-once delivery).
//!
//! Interest: the actor sends the gateway's interest set when the link comes
//! up and every change after it, each frame carrying the interest version
//! it brings the peer up to; the peer answers `InterestAck`. When a join or
//! bind from this link depends on an interest version some other link's
//! peer has not acknowledged yet, the actor handles no further frame from
//! its peer (typically the reply to the client that joined) until they
//! have, or `interest_ack_timeout_ms` passed. Meanwhile it keeps writing
//! events and interest, handles `InterestAck`s at once and holds the other
//! frames, in order, up to [`HELD_FRAMES_MAX`] / [`HELD_BYTES_MAX`].

use std::collections::{BTreeMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gw_link::{error_frame, frame, FramedLink, Peer};
use gw_protocol::pb::{self, link_frame::Body, Role};
use gw_protocol::{codes, Command, Query};
use prost::Message as _;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::hub::{Executed, FlushList, InterestChange, InterestDelta};
use crate::routing::{RoutedEvent, WorkerSlot};
use crate::State;

/// Frames from the peer held while its link waits for interest
/// acknowledgements; reaching this ends the wait early (the link never
/// stops reading its peer).
const HELD_FRAMES_MAX: usize = 1024;
/// Bytes (encoded) of held frames that end the wait early.
const HELD_BYTES_MAX: usize = 1 << 20;
/// Frames from the peer taken in one turn of the link's loop when they are
/// already there.
const FRAMES_PER_TURN: usize = 256;
/// Clients whose queues the link writes out per turn of its loop (see
/// [`FlushList`]); between turns every other task gets its turn.
const FLUSH_PER_TURN: usize = 256;

/// A wait for other links' interest acknowledgements.
type Barrier<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What to do after a frame from the peer.
enum Step {
    Next,
    /// A join or bind depends on this interest version; its CommandReply,
    /// if it asked for one, is sent once the wait is over.
    Wait {
        version: u64,
        reply: Option<pb::LinkFrame>,
    },
    End(LinkEnd),
}

/// Why a worker link ended.
#[derive(Debug)]
enum LinkEnd {
    Shutdown,
    Failed(String),
}

/// Serves one authenticated worker link until it ends.
pub(crate) async fn serve(
    mut link: FramedLink,
    peer: Peer,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let cfg = state.config();
    let cfg = &*cfg;
    let (slot, mut queue) = state.router.add(cfg.worker_queue, &peer.node_id);
    let is_worker = peer.role == Role::Worker;
    if !is_worker {
        // A push client sends commands and queries; it takes no events.
        state.router.drain(&slot);
    }
    let metrics = state.hub.metrics.clone();
    // Leaves routing (and the link count) when the link ends, and also if
    // this task is dropped mid-await (a runtime shutting down): otherwise
    // the slot would stay listed with a closed queue.
    let mut registration = Registration::new(&state, slot.clone(), is_worker);
    tracing::info!(worker = %peer.node_id, addr = %peer.addr, "worker link up");

    // Our interest set first; changes follow as they happen.
    let (snapshot, mut interest) = state.hub.interest_snapshot();
    if let Err(e) = link.send(frame(Body::Interest(snapshot))).await {
        tracing::warn!(worker = %peer.node_id, error = %e, "worker link failed at start");
        return;
    }

    let window = cfg.worker_inflight.max(1);
    // The ring spans at most 4 windows of ids; older unacknowledged events
    // are kept aside (see Inflight).
    let mut inflight = Inflight::new(window.saturating_mul(4));
    let mut next_id: u64 = 1;
    let mut last_heard = Instant::now();
    let heartbeat = cfg.link_heartbeat();
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    // Set while a join or bind of this link waits for other links' peers to
    // acknowledge its interest change; frames that arrive meanwhile (other
    // than interest acks) wait in `held`, in order, with their sizes.
    let mut barrier: Option<Barrier<'_>> = None;
    // The interest version `barrier` waits for.
    let mut barrier_version = 0;
    let mut held: VecDeque<(usize, pb::LinkFrame)> = VecDeque::new();
    let mut held_bytes = 0;
    // The CommandReply of the join or bind being waited for.
    let mut deferred_reply: Option<pb::LinkFrame> = None;
    // The peer closed its side while frames of it were held: those are
    // still handled (its last acks and commands), then the link ends.
    let mut peer_closed = false;
    // Clients the commands of this link filled, written out by this task
    // in turns (a fan-out to a large room is a few thousand writes).
    let mut flush = FlushList::default();

    let end = 'session: loop {
        tokio::select! {
            _ = shutdown.cancelled() => break LinkEnd::Shutdown,
            ev = queue.recv(), if inflight.len() < window => {
                let Some(mut ev) = ev else { break LinkEnd::Shutdown };
                // Take everything ready (up to the window) and write it with
                // one flush.
                let mut batch = 0;
                let mut failed = None;
                let max = link.codec().max_frame;
                loop {
                    ev.event.id = next_id;
                    next_id += 1;
                    // Encoded by reference: the event is kept for
                    // redelivery until acknowledged, not cloned.
                    let fed = gw_protocol::frame::encode_event(&ev.event, max, link.write_buffer_mut());
                    inflight.push(ev.event.id, ev);
                    metrics.events_inflight.fetch_add(1, Ordering::Relaxed);
                    batch += 1;
                    if let Err(e) = fed {
                        failed = Some(e.to_string());
                        break;
                    }
                    if inflight.len() >= window {
                        break;
                    }
                    match queue.try_recv() {
                        Ok(next) => ev = next,
                        Err(_) => break,
                    }
                }
                metrics.events_out.fetch_add(batch, Ordering::Relaxed);
                if let Some(e) = failed {
                    break LinkEnd::Failed(e);
                }
                if let Err(e) = unless_blocked(link.flush(), &mut flush).await {
                    break LinkEnd::Failed(e.to_string());
                }
            }
            change = interest.recv() => {
                let body = match change {
                    Ok(first) => {
                        // Coalesce what is ready into one frame.
                        let mut delta = InterestDelta::default();
                        delta.push(first);
                        take_ready_interest(&state, &mut interest, delta)
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: start over from a full snapshot.
                        let (snapshot, rx) = state.hub.interest_snapshot();
                        interest = rx;
                        snapshot
                    }
                    Err(broadcast::error::RecvError::Closed) => break LinkEnd::Shutdown,
                };
                if let Err(e) = unless_blocked(link.send(frame(Body::Interest(body))), &mut flush).await {
                    break LinkEnd::Failed(e.to_string());
                }
            }
            f = link.next(), if !peer_closed => {
                last_heard = Instant::now();
                let mut next = Some(f);
                let mut taken = 0;
                while let Some(f) = next.take() {
                    let f = match f {
                        None if barrier.is_none() && held.is_empty() => break 'session LinkEnd::Failed("worker closed the link".into()),
                        None => {
                            peer_closed = true;
                            break;
                        }
                        Some(Err(e)) => {
                            let code = match &e { gw_link::LinkError::Frame(f) => f.code(), _ => codes::LINK_MALFORMED };
                            tracing::warn!(worker = %peer.node_id, addr = %peer.addr, error = %e, "bad frame from worker");
                            let _ = link.send(error_frame(code, e.to_string())).await;
                            break 'session LinkEnd::Failed(e.to_string());
                        }
                        Some(Ok(f)) => f,
                    };
                    taken += 1;
                    if let Some(Body::InterestAck(a)) = &f.body {
                        // Taken at once, also while this link waits: another
                        // link may be waiting for it.
                        state.router.note_interest_ack(&slot, a.version);
                    } else if barrier.is_none() && held.is_empty() {
                        // The bulk of a busy link (acks, sends that want no
                        // reply) is handled here without awaiting.
                        match handle_frame_now(&state, &peer, f, &mut inflight, &mut flush) {
                            Now::Done => {}
                            Now::Send(reply) => {
                                if let Err(e) = unless_blocked(link.send(reply), &mut flush).await {
                                    break 'session LinkEnd::Failed(e.to_string());
                                }
                            }
                            // Handled below, in order with what follows it.
                            Now::Later(f) => held.push_back((0, f)),
                        }
                    } else {
                        // Handled below, unless it has to wait (then its
                        // size counts against the bound on held frames).
                        let len = if barrier.is_some() { f.encoded_len() } else { 0 };
                        held_bytes += len;
                        held.push_back((len, f));
                        if barrier.is_some() && (held.len() >= HELD_FRAMES_MAX || held_bytes >= HELD_BYTES_MAX) {
                            // The peer is never left unread (it must stay
                            // free to read our events and to acknowledge, or
                            // two links could block each other), so one that
                            // sends this much meanwhile ends the wait early.
                            // Nobody is marked lagging: the others may just
                            // not have had the time.
                            tracing::info!(
                                worker = %peer.node_id,
                                version = barrier_version,
                                held = held.len(),
                                held_bytes,
                                "interest wait cut short: the peer sent more than is held meanwhile"
                            );
                            barrier = None;
                        }
                    }
                    // More frames already here (a busy peer sends acks and
                    // commands in bursts) are taken in this turn, without
                    // a round of the select per frame; a bounded number,
                    // so that events still go out meanwhile. Not once a
                    // frame waits to be handled below and no wait counts
                    // what is held: that frame comes first.
                    if taken < FRAMES_PER_TURN && (held.is_empty() || barrier.is_some()) {
                        next = poll_fn(|cx| match link.poll_next_unpin(cx) {
                            Poll::Ready(f) => Poll::Ready(Some(f)),
                            Poll::Pending => Poll::Ready(None),
                        })
                        .await;
                    }
                }
                flush.flush(FLUSH_PER_TURN, &metrics);
            }
            () = std::future::ready(()), if !flush.is_empty() => {
                // The rest of a large fan-out, after everyone else had a turn.
                tokio::task::yield_now().await;
                flush.flush(FLUSH_PER_TURN, &metrics);
            }
            () = async { barrier.as_mut().expect("guarded by the condition").await }, if barrier.is_some() => {
                barrier = None;
            }
            _ = tick.tick() => {
                flush.release();
                if !peer_closed && last_heard.elapsed() > heartbeat * 3 {
                    let _ = link.send(error_frame(codes::LINK_HEARTBEAT_TIMEOUT, "no frame within 3 heartbeats")).await;
                    break LinkEnd::Failed("heartbeat timeout".into());
                }
                if let Err(e) = link.send(frame(Body::Ping(pb::Ping { nonce: 0 }))).await {
                    break LinkEnd::Failed(e.to_string());
                }
            }
        }
        // Frames from the peer, in order, until one has to wait; a join's
        // or bind's own answer goes out first once its wait is over.
        if barrier.is_none() && (!held.is_empty() || deferred_reply.is_some()) {
            // What follows may wait on the peer.
            flush.release();
        }
        while barrier.is_none() {
            if let Some(reply) = deferred_reply.take() {
                if let Err(e) = link.send(reply).await {
                    break 'session LinkEnd::Failed(e.to_string());
                }
            }
            let Some((len, f)) = held.pop_front() else {
                break;
            };
            held_bytes -= len;
            match peer_frame(
                &state,
                &peer,
                &slot,
                f,
                &mut inflight,
                &mut link,
                &mut interest,
            )
            .await
            {
                Ok(Step::Next) => {}
                Ok(Step::Wait { version, reply }) => {
                    barrier_version = version;
                    barrier = state
                        .interest_wait(Some(slot.key), version)
                        .map(|w| Box::pin(w) as Barrier<'_>);
                    deferred_reply = reply;
                }
                Ok(Step::End(end)) => break 'session end,
                Err(e) => break 'session LinkEnd::Failed(e),
            }
        }
        if peer_closed && barrier.is_none() && held.is_empty() {
            break LinkEnd::Failed("worker closed the link".into());
        }
    };

    // Out of routing first, so that nobody picks this link again, then close
    // the queue and collect what it still holds.
    registration.end();
    queue.close();
    metrics
        .events_inflight
        .fetch_sub(inflight.len() as u64, Ordering::Relaxed);
    let mut pending: Vec<RoutedEvent> = inflight
        .into_events()
        .map(|mut ev| {
            ev.event.redelivered = true;
            ev
        })
        .collect();
    while let Ok(ev) = queue.try_recv() {
        pending.push(ev);
    }
    match &end {
        LinkEnd::Shutdown => {
            // Everything still queued (close events of a stopping gateway
            // above all) goes to the worker before the goodbye.
            for mut ev in pending.drain(..).filter(|e| !e.event.redelivered) {
                ev.event.id = next_id;
                next_id += 1;
                if link.feed(frame(Body::Event(ev.event))).await.is_err() {
                    break;
                }
            }
            let _ = link
                .send(frame(Body::Goodbye(pb::Goodbye {
                    reason: "gateway shutting down".into(),
                })))
                .await;
            // Wait for the worker to close its end: closing ours with its
            // acks still arriving would reset the connection and could
            // discard events it has not read yet.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(Ok(_)) = link.next().await {}
            })
            .await;
            tracing::info!(worker = %peer.node_id, "worker link closed (shutdown)");
        }
        LinkEnd::Failed(e) if slot.is_draining() => {
            tracing::info!(worker = %peer.node_id, reason = %e, pending = pending.len(), "draining worker left")
        }
        LinkEnd::Failed(e) => {
            tracing::warn!(worker = %peer.node_id, error = %e, pending = pending.len(), "worker link lost")
        }
    }
    if pending.is_empty() {
        return;
    }
    let redelivered = pending.iter().filter(|e| e.event.redelivered).count() as u64;
    metrics
        .events_redelivered
        .fetch_add(redelivered, Ordering::Relaxed);
    // Re-route in original order; each client's events stay in order among
    // themselves. Runs detached: it may have to wait for a worker.
    let state2 = state.clone();
    let stop = state.links_shutdown.clone();
    tokio::spawn(async move {
        for ev in pending {
            if state2.router.redispatch(ev, &stop).await.is_err() {
                break;
            }
        }
    });
}

/// `delta` plus every interest change ready on `interest`, as one frame
/// body; a full snapshot instead (and a fresh receiver) if the receiver
/// fell behind: `try_recv` reports a lag once and then goes on from the
/// oldest change it still has, so the changes it skipped would otherwise
/// never be sent while the frame's version claimed them.
fn take_ready_interest(
    state: &State,
    interest: &mut broadcast::Receiver<InterestChange>,
    mut delta: InterestDelta,
) -> pb::Interest {
    loop {
        match interest.try_recv() {
            Ok(c) => delta.push(c),
            Err(broadcast::error::TryRecvError::Lagged(_)) => {
                let (snapshot, rx) = state.hub.interest_snapshot();
                *interest = rx;
                return snapshot;
            }
            Err(_) => return delta.into_pb(),
        }
    }
}

/// A link's place in routing and in the `worker_links` gauge, given up
/// once: by [`Registration::end`] or, if the link's task is dropped first,
/// on drop.
struct Registration {
    state: Arc<State>,
    slot: Arc<WorkerSlot>,
    is_worker: bool,
    ended: bool,
}

impl Registration {
    fn new(state: &Arc<State>, slot: Arc<WorkerSlot>, is_worker: bool) -> Self {
        if is_worker {
            state
                .hub
                .metrics
                .worker_links
                .fetch_add(1, Ordering::Relaxed);
        }
        Registration {
            state: state.clone(),
            slot,
            is_worker,
            ended: false,
        }
    }

    fn end(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.state.router.remove(&self.slot);
        if self.is_worker {
            self.state
                .hub
                .metrics
                .worker_links
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.end();
    }
}

/// Awaits `fut` (a write to the peer); if it cannot complete at once, the
/// clients listed in `flush` are first handed to their own tasks, so that a
/// peer slow to read never holds up deliveries to clients.
async fn unless_blocked<F: Future>(fut: F, flush: &mut FlushList) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(out) => out,
        Poll::Pending => {
            flush.release();
            fut.await
        }
    }
}

/// What [`handle_frame_now`] did with a frame.
enum Now {
    Done,
    /// Handled; this answer must go to the peer.
    Send(pb::LinkFrame),
    /// Not a frame it handles: it goes the full way ([`peer_frame`]).
    Later(pb::LinkFrame),
}

/// Handles, without awaiting, the frames a busy link is mostly made of: an
/// `Ack`, and a `Command` that asks for no reply and is no join or bind
/// (those take part in interest confirmation and waits). Everything else
/// is given back. Keeping these off the async path spares each one the
/// moves of the frame through [`peer_frame`]'s and [`handle_frame`]'s
/// futures.
fn handle_frame_now(
    state: &State,
    peer: &Peer,
    f: pb::LinkFrame,
    inflight: &mut Inflight,
    flush: &mut FlushList,
) -> Now {
    let metrics = &state.hub.metrics;
    match f.body {
        Some(Body::Ack(a)) => {
            for id in a.ids {
                if inflight.ack(id, |ev| ev.flow.done()) {
                    metrics.events_inflight.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Now::Done
        }
        Some(Body::Command(c))
            if c.id == 0
                && !matches!(
                    c.kind,
                    Some(pb::command::Kind::JoinGroup(_) | pb::command::Kind::BindUid(_))
                ) =>
        {
            metrics.commands_in.fetch_add(1, Ordering::Relaxed);
            let result = Command::try_from(c)
                .map_err(|e| e.to_string())
                .and_then(|cmd| {
                    state
                        .hub
                        .execute_listed(cmd, flush)
                        .map_err(|e| e.to_string())
                });
            match result {
                Ok(_) => Now::Done,
                Err(e) => {
                    metrics.commands_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(worker = %peer.node_id, error = %e, "command refused");
                    Now::Send(frame(Body::Notice(pb::Notice {
                        code: codes::NOTICE_BAD_COMMAND,
                        message: e,
                    })))
                }
            }
        }
        body => Now::Later(pb::LinkFrame { body }),
    }
}

/// Handles one frame from the peer (an `InterestAck` is taken before).
/// A join or bind from this link is confirmed to it as interest, after
/// every older interest change: the worker counts its own joins as
/// interest until then (those confirmations carry no version: the peer's
/// acknowledgement of them would claim changes it has not seen).
async fn peer_frame(
    state: &State,
    peer: &Peer,
    slot: &WorkerSlot,
    f: pb::LinkFrame,
    inflight: &mut Inflight,
    link: &mut FramedLink,
    interest: &mut broadcast::Receiver<InterestChange>,
) -> Result<Step, String> {
    let confirm = match &f.body {
        Some(Body::Command(pb::Command {
            kind: Some(pb::command::Kind::JoinGroup(j)),
            ..
        })) => Some(pb::Interest {
            groups_added: vec![j.group.clone()],
            ..Default::default()
        }),
        Some(Body::Command(pb::Command {
            kind: Some(pb::command::Kind::BindUid(b)),
            ..
        })) => Some(pb::Interest {
            uids_added: vec![b.uid.clone()],
            ..Default::default()
        }),
        _ => None,
    };
    if confirm.is_some() {
        let older = take_ready_interest(state, interest, InterestDelta::default());
        if older != pb::Interest::default() {
            link.send(frame(Body::Interest(older)))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let mut executed = None;
    if let Some(end) = handle_frame(state, peer, slot, f, inflight, link, &mut executed).await? {
        return Ok(Step::End(end));
    }
    let Some((done, reply)) = executed else {
        return Ok(Step::Next);
    };
    if let Some(confirm) = confirm.filter(|_| done.count > 0) {
        link.send(frame(Body::Interest(confirm)))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(if done.interest > 0 {
        Step::Wait {
            version: done.interest,
            reply,
        }
    } else {
        Step::Next
    })
}

/// Handles one frame from the worker. `Ok(Some(_))` ends the link. A
/// command that ran leaves its outcome in `executed`, with its
/// CommandReply when it is a join or bind (whose answer may have to wait
/// for interest acknowledgements); other replies are sent here.
async fn handle_frame(
    state: &State,
    peer: &Peer,
    slot: &WorkerSlot,
    f: pb::LinkFrame,
    inflight: &mut Inflight,
    link: &mut FramedLink,
    executed: &mut Option<(Executed, Option<pb::LinkFrame>)>,
) -> Result<Option<LinkEnd>, String> {
    let metrics = &state.hub.metrics;
    match f.body {
        Some(Body::Ack(a)) => {
            for id in a.ids {
                if inflight.ack(id, |ev| ev.flow.done()) {
                    metrics.events_inflight.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        Some(Body::Command(c)) => {
            metrics.commands_in.fetch_add(1, Ordering::Relaxed);
            let id = c.id;
            let result = Command::try_from(c)
                .map_err(|e| e.to_string())
                .and_then(|cmd| state.hub.execute_tracked(cmd).map_err(|e| e.to_string()));
            let result = result.map(|done| {
                *executed = Some((done, None));
                done.count
            });
            if let Err(e) = &result {
                metrics.commands_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %peer.node_id, error = %e, "command refused");
            }
            let reply = match (id, result) {
                (0, Ok(_)) => None,
                (0, Err(e)) => Some(Body::Notice(pb::Notice {
                    code: codes::NOTICE_BAD_COMMAND,
                    message: e,
                })),
                (id, Ok(n)) => Some(Body::CommandReply(pb::CommandReply {
                    id,
                    delivered: n as u64,
                    ..Default::default()
                })),
                (id, Err(e)) => Some(Body::CommandReply(pb::CommandReply {
                    id,
                    error_code: codes::NOTICE_BAD_COMMAND,
                    error: e,
                    ..Default::default()
                })),
            };
            match (reply, executed.as_mut()) {
                (Some(reply), Some((done, later))) if done.interest > 0 => {
                    *later = Some(frame(reply));
                }
                (Some(reply), _) => link.send(frame(reply)).await.map_err(|e| e.to_string())?,
                (None, _) => {}
            }
        }
        Some(Body::Query(q)) => {
            metrics.queries_in.fetch_add(1, Ordering::Relaxed);
            let id = q.id;
            let reply = match Query::try_from(q) {
                Ok(q) => pb::QueryReply {
                    id,
                    buckets: state.hub.query(&q),
                    ..Default::default()
                },
                Err(e) => pb::QueryReply {
                    id,
                    error_code: codes::NOTICE_BAD_QUERY,
                    error: e.to_string(),
                    ..Default::default()
                },
            };
            link.send(frame(Body::QueryReply(reply)))
                .await
                .map_err(|e| e.to_string())?;
        }
        Some(Body::HandshakeReply(r)) => {
            let seq = r
                .client_id
                .parse::<gw_protocol::ClientId>()
                .ok()
                .map(|c| c.seq());
            match seq.and_then(|seq| state.handshakes.lock().remove(&seq)) {
                Some(waiter) => {
                    let _ = waiter.send(r);
                }
                None => {
                    tracing::debug!(worker = %peer.node_id, client_id = %r.client_id, "late or unknown handshake reply")
                }
            }
        }
        Some(Body::Ping(p)) => {
            link.send(frame(Body::Pong(pb::Pong { nonce: p.nonce })))
                .await
                .map_err(|e| e.to_string())?;
        }
        Some(Body::Pong(_)) => {}
        Some(Body::Goodbye(g)) => {
            // A draining worker finishes what it has; new events for its
            // clients go elsewhere. The link stays up until it closes it.
            tracing::info!(worker = %peer.node_id, reason = %g.reason, "worker draining");
            state.router.drain(slot);
        }
        _ => {
            let _ = link
                .send(error_frame(
                    codes::LINK_UNEXPECTED,
                    "unexpected frame on a worker link",
                ))
                .await;
            return Ok(Some(LinkEnd::Failed("unexpected frame".into())));
        }
    }
    Ok(None)
}

/// Events sent on a link and not yet acknowledged, by id.
///
/// Ids are given out in sequence and mostly acknowledged in order, so a
/// ring indexed by `id - first` does what a map would without a node
/// allocation and rebalancing per event; a hole stays until the events
/// before it are acknowledged. An event left unacknowledged for long (a
/// handler that hangs) would make the ring grow by one slot per later
/// event, so once the ring spans `span_limit` ids its oldest entry moves
/// to a small map of stragglers instead: memory stays bounded by the
/// window either way.
struct Inflight {
    /// Id of `slots[0]`.
    first: u64,
    slots: VecDeque<Option<RoutedEvent>>,
    /// Unacknowledged events older than `first`.
    stragglers: BTreeMap<u64, RoutedEvent>,
    span_limit: usize,
    len: usize,
}

impl Inflight {
    /// `span_limit`: most ids the ring spans (a few times the window).
    fn new(span_limit: usize) -> Self {
        Inflight {
            first: 0,
            slots: VecDeque::new(),
            stragglers: BTreeMap::new(),
            span_limit: span_limit.max(1),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// `id` must follow the last one pushed (ids are sequential per link).
    fn push(&mut self, id: u64, ev: RoutedEvent) {
        if self.slots.is_empty() {
            self.first = id;
        }
        debug_assert_eq!(id, self.first + self.slots.len() as u64);
        self.slots.push_back(Some(ev));
        self.len += 1;
        while self.slots.len() > self.span_limit {
            if let Some(Some(old)) = self.slots.pop_front() {
                self.stragglers.insert(self.first, old);
            }
            self.first += 1;
            self.skip_acknowledged();
        }
    }

    /// Acknowledges `id`: calls `done` with its event, if it is still
    /// unacknowledged, and drops it where it lies (an event is large; the
    /// ack path never moves it out). Returns whether it was there: acks
    /// for unknown or already acknowledged ids are ignored.
    fn ack(&mut self, id: u64, done: impl FnOnce(&RoutedEvent)) -> bool {
        if id < self.first {
            let Some(ev) = self.stragglers.remove(&id) else {
                return false;
            };
            done(&ev);
        } else {
            let Some(slot) = usize::try_from(id - self.first)
                .ok()
                .and_then(|i| self.slots.get_mut(i))
            else {
                return false;
            };
            let Some(ev) = slot.as_ref() else {
                return false;
            };
            done(ev);
            *slot = None;
            self.skip_acknowledged();
        }
        self.len -= 1;
        true
    }

    fn skip_acknowledged(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.first += 1;
        }
    }

    /// What is left, oldest first.
    fn into_events(self) -> impl Iterator<Item = RoutedEvent> {
        // Every straggler is older than every event in the ring.
        self.stragglers
            .into_values()
            .chain(self.slots.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acknowledges `id`; the id of the event it found, if any.
    fn acked(inflight: &mut Inflight, id: u64) -> Option<u64> {
        let mut found = None;
        inflight.ack(id, |ev| found = Some(ev.event.id));
        found
    }

    fn routed(id: u64) -> RoutedEvent {
        RoutedEvent {
            seq: id,
            event: pb::Event {
                id,
                ..Default::default()
            },
            flow: Arc::default(),
        }
    }

    #[test]
    fn inflight_acks_in_any_order_and_keeps_the_rest_oldest_first() {
        let mut inflight = Inflight::new(64);
        for id in 10..20 {
            inflight.push(id, routed(id));
        }
        assert_eq!(inflight.len(), 10);
        // Out of order, a duplicate, and ids never sent.
        assert_eq!(acked(&mut inflight, 12), Some(12));
        assert!(acked(&mut inflight, 12).is_none());
        assert!(acked(&mut inflight, 9).is_none());
        assert!(acked(&mut inflight, 20).is_none());
        assert!(acked(&mut inflight, u64::MAX).is_none());
        assert_eq!(acked(&mut inflight, 10), Some(10));
        assert_eq!(acked(&mut inflight, 11), Some(11));
        // 10..=12 acknowledged: the ring starts at 13 now.
        assert_eq!(inflight.first, 13);
        assert_eq!(inflight.len(), 7);
        inflight.push(20, routed(20));
        assert_eq!(acked(&mut inflight, 19), Some(19));
        let left: Vec<u64> = inflight.into_events().map(|e| e.event.id).collect();
        assert_eq!(left, vec![13, 14, 15, 16, 17, 18, 20]);
    }

    #[test]
    fn inflight_restarts_at_the_next_id_when_empty() {
        let mut inflight = Inflight::new(64);
        inflight.push(1, routed(1));
        assert!(acked(&mut inflight, 1).is_some());
        assert_eq!(inflight.len(), 0);
        inflight.push(2, routed(2));
        assert!(acked(&mut inflight, 1).is_none());
        assert_eq!(acked(&mut inflight, 2), Some(2));
    }

    #[test]
    fn an_event_never_acknowledged_does_not_grow_the_ring() {
        let mut inflight = Inflight::new(8);
        inflight.push(1, routed(1));
        for id in 2..10_000 {
            inflight.push(id, routed(id));
            assert!(acked(&mut inflight, id).is_some());
            assert!(
                inflight.slots.len() <= 8,
                "ring spans {}",
                inflight.slots.len()
            );
        }
        assert_eq!(inflight.len(), 1);
        assert_eq!(inflight.stragglers.len(), 1);
        // A few more unacknowledged ones, then the straggler's late ack.
        for id in 10_000..10_003 {
            inflight.push(id, routed(id));
        }
        assert_eq!(acked(&mut inflight, 1), Some(1));
        assert!(acked(&mut inflight, 1).is_none());
        inflight.push(10_003, routed(10_003));
        let left: Vec<u64> = inflight.into_events().map(|e| e.event.id).collect();
        assert_eq!(left, vec![10_000, 10_001, 10_002, 10_003]);
    }

    #[test]
    fn stragglers_come_out_first_in_id_order() {
        let mut inflight = Inflight::new(4);
        for id in 1..=10 {
            inflight.push(id, routed(id));
        }
        assert_eq!(inflight.len(), 10);
        assert!(inflight.slots.len() <= 4);
        assert_eq!(acked(&mut inflight, 3), Some(3));
        assert_eq!(acked(&mut inflight, 9), Some(9));
        let left: Vec<u64> = inflight.into_events().map(|e| e.event.id).collect();
        assert_eq!(left, vec![1, 2, 4, 5, 6, 7, 8, 10]);
    }
}
