//! Client connections: accepting them on the public listeners, and the two
//! tasks each connection runs.
//!
//! * The **reader** (the connection's own task) reads the socket and hands
//!   each message to the client's worker through [`crate::routing`]. While a
//!   worker is slow or absent, `dispatch` waits and the reader stops reading:
//!   the client is back-pressured through TCP, nothing is dropped.
//! * The **writer** drains the client's bounded queue, writing everything
//!   that is ready before one flush, sends heartbeats and closes the socket
//!   with the right code when asked ([`crate::hub::ClientControl`]).
//!
//! When the reader ends, the client leaves every table and exactly one
//! `Close` event goes to its worker.

pub(crate) mod transport;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use gw_protocol::{codes, pb, ClientId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;

use crate::config::{ListenSpec, Protocol};
use crate::hub::{ClientControl, ClientSender, Outbound, QueueLimits, CLOSE_IMMEDIATE};
use crate::routing::{ClientFlow, RoutedEvent, WorkerSlot};
use crate::State;
use transport::{ClientRead, ClientWrite, Inbound};

/// Accepts clients on one public listener until the gateway stops accepting.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    spec: ListenSpec,
    state: Arc<State>,
    tracker: TaskTracker,
) {
    loop {
        let (stream, addr) = tokio::select! {
            _ = state.accept_stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    tracing::warn!(listener = %spec, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let spec = spec.clone();
        tracker.spawn(async move {
            handle_connection(stream, addr, spec, state).await;
        });
    }
}

/// Counts a connection for `max_connections`; released on drop.
struct ConnectionPermit(Arc<State>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn handle_connection(
    stream: TcpStream,
    addr: SocketAddr,
    spec: ListenSpec,
    state: Arc<State>,
) {
    let cfg = &state.config;
    let metrics = state.hub.metrics.clone();
    let open = state.open_connections.fetch_add(1, Ordering::AcqRel) + 1;
    let _permit = ConnectionPermit(state.clone());
    let full = open > cfg.max_connections;
    let _ = stream.set_nodelay(true);

    let (read, write) = match spec.protocol {
        Protocol::Ws => {
            let ws_config = WebSocketConfig::default()
                .read_buffer_size(cfg.ws_read_buffer)
                .write_buffer_size(0)
                .max_write_buffer_size(cfg.client_queue_bytes.max(64 * 1024) * 2)
                .max_message_size(Some(cfg.max_message_bytes))
                .max_frame_size(Some(cfg.max_message_bytes));
            // Refusing at the HTTP level when full keeps existing clients
            // unaffected and tells the new one why (503).
            #[allow(clippy::result_large_err)] // the signature is tungstenite's
            let callback = |_req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                if full {
                    let mut err = ErrorResponse::new(Some("gateway at max_connections".into()));
                    *err.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    return Err(err);
                }
                Ok(resp)
            };
            let handshake =
                tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config));
            match tokio::time::timeout(cfg.handshake_timeout(), handshake).await {
                Ok(Ok(ws)) => {
                    let (w, r) = ws.split();
                    (ClientRead::Ws(r), ClientWrite::Ws(w))
                }
                Ok(Err(e)) => {
                    if full {
                        metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%addr, "connection refused: max_connections reached");
                    } else {
                        tracing::debug!(%addr, error = %e, "websocket handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "websocket handshake timed out");
                    return;
                }
            }
        }
        Protocol::Text | Protocol::Frame if full => {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%addr, "connection refused: max_connections reached");
            return;
        }
        Protocol::Text => transport::text(stream, cfg.max_message_bytes),
        Protocol::Frame => transport::frame(stream, cfg.max_message_bytes),
    };

    let (sender, queue) = ClientSender::new(QueueLimits {
        messages: cfg.client_queue_messages,
    });
    let control = sender.control.clone();
    control
        .last_heard_ms
        .store(state.now_ms(), Ordering::Relaxed);
    let protocol = spec.protocol.name();
    let client_id = state.hub.add_client(sender);
    metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%client_id, %addr, protocol, "client connected");

    let writer = tokio::spawn(write_loop(
        write,
        queue,
        control.clone(),
        state.clone(),
        client_id,
    ));
    let flow = Arc::new(ClientFlow::default());
    let (reason, mut sticky) =
        read_loop(read, &control, &state, client_id, addr, protocol, &flow).await;

    // Leave every table first so that no later send finds the client, then
    // report the close once, with what the client had.
    control.close(1000);
    let removed = state.hub.remove_client(client_id);
    metrics.connections_closed.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%client_id, %reason, "client closed");
    let _ = writer.await;
    if let Some(removed) = removed {
        let event = pb::Event {
            client_id: client_id.to_string(),
            session: removed.session,
            remote_addr: addr.to_string(),
            kind: Some(pb::event::Kind::Close(pb::Close {
                reason,
                uid: removed.uid.as_deref().unwrap_or_default().to_string(),
                groups: removed.groups,
            })),
            ..Default::default()
        };
        let routed = RoutedEvent {
            seq: client_id.seq(),
            event,
            flow,
        };
        if state
            .router
            .dispatch(&mut sticky, routed, &state.links_shutdown)
            .await
            .is_err()
        {
            tracing::warn!(%client_id, "close event not delivered: gateway stopped before a worker took it");
        }
    }
}

/// Reads until the client goes; returns why.
async fn read_loop(
    mut read: ClientRead,
    control: &ClientControl,
    state: &State,
    client_id: ClientId,
    addr: SocketAddr,
    protocol: &'static str,
    flow: &Arc<ClientFlow>,
) -> (String, Option<Arc<WorkerSlot>>) {
    let metrics = &state.hub.metrics;
    let remote_addr = addr.to_string();
    let event = |kind| RoutedEvent {
        seq: client_id.seq(),
        event: pb::Event {
            client_id: client_id.to_string(),
            session: state.hub.session(client_id),
            remote_addr: remote_addr.clone(),
            kind: Some(kind),
            ..Default::default()
        },
        flow: flow.clone(),
    };
    let mut sticky = None;
    let connect = event(pb::event::Kind::Connect(pb::Connect {
        protocol: protocol.to_string(),
    }));
    if state
        .router
        .dispatch(&mut sticky, connect, &state.links_shutdown)
        .await
        .is_err()
    {
        return ("gateway shutting down".into(), sticky);
    }
    let reason = loop {
        let inbound = tokio::select! {
            _ = control.closed.cancelled() => break close_reason(control.close_code()),
            m = read.next() => m,
        };
        let payload = match inbound {
            None => break "client disconnected".to_string(),
            Some(Err(e)) => {
                if e.too_big() {
                    control.close(codes::CLOSE_TOO_BIG);
                }
                break format!("read error: {e}");
            }
            Some(Ok(Inbound::Close)) => break "client closed".to_string(),
            Some(Ok(Inbound::Activity)) => {
                control
                    .last_heard_ms
                    .store(state.now_ms(), Ordering::Relaxed);
                continue;
            }
            Some(Ok(Inbound::Text(t))) => pb::Payload {
                data: Bytes::from(t),
                binary: false,
            },
            Some(Ok(Inbound::Binary(b))) => pb::Payload {
                data: b,
                binary: true,
            },
        };
        control
            .last_heard_ms
            .store(state.now_ms(), Ordering::Relaxed);
        metrics.messages_in.fetch_add(1, Ordering::Relaxed);
        let ev = event(pb::event::Kind::Message(pb::Message {
            payload: Some(payload),
        }));
        if state
            .router
            .dispatch(&mut sticky, ev, &state.links_shutdown)
            .await
            .is_err()
        {
            break "gateway shutting down".into();
        }
    };
    (reason, sticky)
}

fn close_reason(code: Option<u16>) -> String {
    match code {
        Some(codes::CLOSE_SLOW_CONSUMER) => "slow consumer".into(),
        Some(codes::CLOSE_HEARTBEAT_TIMEOUT) => "heartbeat timeout".into(),
        Some(codes::CLOSE_GOING_AWAY) => "gateway shutting down".into(),
        Some(codes::CLOSE_BY_APPLICATION) | Some(CLOSE_IMMEDIATE) => "closed by application".into(),
        Some(codes::CLOSE_TOO_BIG) => "message too big".into(),
        Some(c) => format!("closed with code {c}"),
        None => "closed".into(),
    }
}

/// Writes queued messages, heartbeats and finally the close.
async fn write_loop(
    mut write: ClientWrite,
    mut queue: mpsc::Receiver<Outbound>,
    control: Arc<ClientControl>,
    state: Arc<State>,
    client_id: ClientId,
) {
    let cfg = &state.config;
    let ping_every = cfg.ping_interval();
    let mut tick = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    let ping_data = cfg.ping_data.as_ref().map(|d| Bytes::from(d.clone()));
    let limit_ms = ping_every
        .map(|p| p.as_millis() as u64 * u64::from(cfg.ping_missed_limit.max(1)))
        .unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            biased;
            _ = control.closed.cancelled() => break,
            msg = queue.recv() => {
                let Some(msg) = msg else { break };
                let mut n = msg.len();
                let mut result = write.feed(msg).await;
                // Everything ready goes out with one flush.
                while result.is_ok() {
                    match queue.try_recv() {
                        Ok(m) => { n += m.len(); result = write.feed(m).await; }
                        Err(_) => break,
                    }
                }
                control.queued_bytes.fetch_sub(n, Ordering::AcqRel);
                if result.is_err() || write.flush().await.is_err() {
                    control.close(1006);
                    return;
                }
            }
            _ = tick.tick(), if ping_every.is_some() => {
                let silent = state.now_ms().saturating_sub(control.last_heard_ms.load(Ordering::Relaxed));
                if silent >= limit_ms {
                    state.hub.metrics.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%client_id, silent_ms = silent, "closing silent client");
                    control.close(codes::CLOSE_HEARTBEAT_TIMEOUT);
                    break;
                }
                if write.ping(ping_data.as_ref()).await.is_err() {
                    control.close(1006);
                    return;
                }
            }
        }
    }
    let code = control.close_code().unwrap_or(1000);
    if code != CLOSE_IMMEDIATE && code != codes::CLOSE_SLOW_CONSUMER {
        // What was queued before the close (e.g. a final message) goes first.
        while let Ok(m) = queue.try_recv() {
            if write.feed(m).await.is_err() {
                break;
            }
        }
        let _ = write.flush().await;
    }
    let code = if code == CLOSE_IMMEDIATE {
        codes::CLOSE_BY_APPLICATION
    } else {
        code
    };
    write.close(code, &close_reason(Some(code))).await;
}
