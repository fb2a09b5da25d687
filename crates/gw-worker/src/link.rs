//! One gateway's link, as seen from the worker: an actor task that owns the
//! socket, reconnects with backoff while the gateway is listed, hands events
//! to the executor and carries commands, queries and acks out (batched: one
//! flush for everything ready). It keeps the gateway's interest set (which
//! groups and uids have members there) and acknowledges each versioned
//! change once applied (`InterestAck`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gw_link::{frame, Backoff, FramedLink};
use gw_protocol::pb::{self, link_frame::Body, GatewayInfo};
use gw_protocol::{Event, GatewayId};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::executor::{Executor, Job};
use crate::handle::{Handle, LinkSender, Reply};
use crate::handler::EventHandler;
use crate::WorkerShared;

/// Encoded bytes after which a batch of outgoing frames is flushed (the
/// rest stays queued for the next turn).
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// How a connected session ended.
enum SessionEnd {
    /// We are stopping.
    Stopped,
    /// The gateway said goodbye (graceful shutdown): its closes were reported.
    Goodbye,
    /// The link broke.
    Lost(String),
}

pub(crate) async fn run<H: EventHandler>(
    info: GatewayInfo,
    gateway: GatewayId,
    shared: Arc<WorkerShared>,
    executor: Arc<Executor<H>>,
    handler: Arc<H>,
    handle: Handle,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(3));
    let mut addr = info.internal_addr.clone();
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = gw_link::connect_with(&addr, &shared.tls, &shared.secret, shared.role, &shared.node_id, shared.max_frame, Duration::from_secs(3)) => r,
        };
        let end = match connected {
            Ok((link, _)) => {
                backoff.reset();
                tracing::info!(%gateway, %addr, "connected to gateway");
                session(link, gateway, &shared, &executor, &handle, &stop).await
            }
            Err(e) => SessionEnd::Lost(e.to_string()),
        };
        let listed = |g: &GatewayId| {
            handle
                .inner
                .known
                .borrow()
                .iter()
                .find(|i| i.gateway_id == g.to_string())
                .map(|i| i.internal_addr.clone())
        };
        match end {
            SessionEnd::Stopped => return,
            SessionEnd::Goodbye => {
                tracing::info!(%gateway, "gateway said goodbye");
                return;
            }
            SessionEnd::Lost(e) => {
                let still_listed = listed(&gateway);
                tracing::warn!(%gateway, %addr, error = %e, listed = still_listed.is_some(), "gateway link down");
                match still_listed {
                    Some(a) => addr = a,
                    None => {
                        // Gone without saying goodbye: its clients' closes
                        // will never come. Let the application clean up.
                        handler.on_gateway_lost(&handle, gateway).await;
                        return;
                    }
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session<H: EventHandler>(
    mut link: FramedLink,
    gateway: GatewayId,
    shared: &WorkerShared,
    executor: &Arc<Executor<H>>,
    handle: &Handle,
    stop: &CancellationToken,
) -> SessionEnd {
    let (tx, mut rx) = mpsc::channel::<pb::LinkFrame>(shared.link_queue);
    let pending: Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Reply>>>> = Arc::default();
    handle.inner.links.write().insert(
        gateway,
        LinkSender {
            gateway,
            tx: tx.clone(),
            pending: pending.clone(),
        },
    );
    shared
        .metrics
        .links
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tick = tokio::time::interval(shared.heartbeat);
    let mut last_heard = Instant::now();
    let end = loop {
        tokio::select! {
            _ = stop.cancelled() => break SessionEnd::Stopped,
            out = rx.recv() => {
                let Some(f) = out else { break SessionEnd::Stopped };
                // Everything ready goes out with one flush; runs of acks
                // (one per handled event) become one frame. Encoded straight
                // into the write buffer (a `feed` per frame cost more than
                // the encoding), flushed every WRITE_BATCH_BYTES: handlers
                // may refill the queue while this runs.
                let max = link.codec().max_frame;
                let mut acks: Vec<u64> = Vec::new();
                let mut next = Some(f);
                let mut result = Ok(());
                while let Some(f) = next.take() {
                    match f.body {
                        Some(Body::Ack(a)) => acks.extend(a.ids),
                        _ => {
                            if !acks.is_empty() {
                                result = gw_protocol::frame::encode(&ack_frame(std::mem::take(&mut acks)), max, link.write_buffer_mut());
                            }
                            if result.is_ok() {
                                result = gw_protocol::frame::encode(&f, max, link.write_buffer_mut());
                            }
                        }
                    }
                    if result.is_err() || link.write_buffer().len() >= WRITE_BATCH_BYTES {
                        break;
                    }
                    next = rx.try_recv().ok();
                }
                if result.is_ok() && !acks.is_empty() {
                    result = gw_protocol::frame::encode(&ack_frame(acks), max, link.write_buffer_mut());
                }
                if let Err(e) = result {
                    break SessionEnd::Lost(e.to_string());
                }
                if let Err(e) = link.flush().await {
                    break SessionEnd::Lost(e.to_string());
                }
            }
            f = link.next() => {
                let f = match f {
                    None => break SessionEnd::Lost("gateway closed the link".into()),
                    Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                    Some(Ok(f)) => f,
                };
                last_heard = Instant::now();
                match f.body {
                    Some(Body::Event(e)) => match Event::try_from(e) {
                        Ok(event) => {
                            shared.note_event();
                            executor.submit(Job { event, ack: tx.clone() });
                        }
                        Err(e) => tracing::warn!(%gateway, error = %e, "invalid event from gateway dropped"),
                    },
                    Some(Body::QueryReply(r)) => {
                        if let Some(waiter) = pending.lock().remove(&r.id) {
                            let _ = waiter.send(Reply::Query(r));
                        }
                    }
                    Some(Body::Interest(i)) => {
                        let version = i.version;
                        handle.inner.interest.write().entry(gateway).or_default().apply(i);
                        // Applied: group and uid sends from now on include
                        // the gateway's changes up to `version`. The gateway
                        // may be holding a client's join reply until we say so.
                        if version > 0 {
                            let ack = frame(Body::InterestAck(pb::InterestAck { version }));
                            if let Err(e) = link.send(ack).await {
                                break SessionEnd::Lost(e.to_string());
                            }
                        }
                    }
                    Some(Body::CommandReply(r)) => {
                        if let Some(waiter) = pending.lock().remove(&r.id) {
                            let _ = waiter.send(Reply::Command(r));
                        }
                    }
                    Some(Body::Ping(p)) => {
                        if let Err(e) = link.send(frame(Body::Pong(pb::Pong { nonce: p.nonce }))).await {
                            break SessionEnd::Lost(e.to_string());
                        }
                    }
                    Some(Body::Pong(_)) => {}
                    Some(Body::Notice(n)) => tracing::warn!(%gateway, code = n.code, message = %n.message, "gateway notice"),
                    Some(Body::Goodbye(_)) => break SessionEnd::Goodbye,
                    Some(Body::Error(e)) => break SessionEnd::Lost(format!("gateway error {}: {}", e.code, e.message)),
                    _ => break SessionEnd::Lost("unexpected frame from gateway".into()),
                }
            }
            _ = tick.tick() => {
                if last_heard.elapsed() > shared.heartbeat * 3 {
                    break SessionEnd::Lost("gateway stopped answering".into());
                }
                if let Err(e) = link.send(frame(Body::Ping(pb::Ping { nonce: 0 }))).await {
                    break SessionEnd::Lost(e.to_string());
                }
            }
        }
    };
    handle.inner.links.write().remove(&gateway);
    handle.inner.interest.write().remove(&gateway);
    shared
        .metrics
        .links
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    if matches!(end, SessionEnd::Stopped) {
        // Whatever handlers and acks queued goes out before we close.
        rx.close();
        while let Ok(f) = rx.try_recv() {
            if link.feed(f).await.is_err() {
                break;
            }
        }
        let _ = link.flush().await;
        // Half-close and read until the gateway closes too: dropping a
        // socket with unread data resets it, and the reset could discard
        // our last acks before the gateway reads them (it would then
        // redeliver events we handled).
        use tokio::io::AsyncWriteExt;
        let _ = link.get_mut().shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = link.next().await {}
        })
        .await;
    }
    pending.lock().clear();
    end
}

fn ack_frame(ids: Vec<u64>) -> pb::LinkFrame {
    frame(Body::Ack(pb::Ack { ids }))
}
