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

pub(crate) mod handshake;
pub(crate) mod tls;
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
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;

use crate::config::{ListenSpec, Protocol};
use crate::hub::{ClientControl, ClientSender, Outbound, QueueLimits, CLOSE_IMMEDIATE};
use crate::routing::{ClientFlow, RoutedEvent, WorkerSlot};
use crate::State;
use handshake::{read_request, real_remote_addr, respond_refusal, respond_upgrade, Refusal};
use tls::ClientStream;
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
    let cfg = state.config();
    let cfg = &*cfg;
    let metrics = state.hub.metrics.clone();
    let open = state.open_connections.fetch_add(1, Ordering::AcqRel) + 1;
    let _permit = ConnectionPermit(state.clone());
    let full = open > cfg.max_connections;
    let _ = stream.set_nodelay(true);
    // wss: the TLS handshake first, within the handshake timeout.
    let mut stream = match (spec.protocol, &state.tls) {
        (Protocol::Wss, Some(tls)) => {
            match tokio::time::timeout(cfg.handshake_timeout(), tls.acceptor().accept(stream)).await
            {
                Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "TLS handshake timed out");
                    return;
                }
            }
        }
        (Protocol::Wss, None) => return,
        _ => ClientStream::Plain(stream),
    };
    if full {
        metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%addr, max = cfg.max_connections, "connection refused: max_connections reached");
        if matches!(spec.protocol, Protocol::Ws | Protocol::Wss) {
            let r = Refusal {
                status: 503,
                reason: "gateway at max_connections, retry later".into(),
            };
            respond_refusal(&mut stream, &r).await;
        }
        return;
    }

    let (sender, queue) = ClientSender::new(QueueLimits {
        messages: cfg.client_queue_messages,
    });
    let control = sender.control.clone();
    control
        .last_heard_ms
        .store(state.now_ms(), Ordering::Relaxed);
    let flow = Arc::new(ClientFlow::default());
    let mut sticky = None;

    let (read, write, client_id, remote_addr) = match spec.protocol {
        Protocol::Ws | Protocol::Wss => {
            // Registered now so that the worker can bind, join and set the
            // session while deciding; invisible to queries until accepted.
            let client_id = state.hub.add_pending_client(sender);
            // Boxed: the handshake's state is needed only briefly, and kept
            // inline it would make every connection's future larger for
            // its whole life.
            let handshake = tokio::time::timeout(
                cfg.handshake_timeout(),
                Box::pin(ws_handshake(
                    &mut stream,
                    addr,
                    &state,
                    client_id,
                    &flow,
                    &mut sticky,
                )),
            )
            .await;
            let refusal = match handshake {
                Ok(Ok(accepted)) => Ok(accepted),
                Ok(Err(r)) => Err(r),
                Err(_) => Err(Refusal {
                    status: 503,
                    reason: "handshake timed out (no worker answered)".into(),
                }),
            };
            let (remote_addr, leftover) = match refusal {
                Ok(accepted) => accepted,
                Err(refusal) => {
                    state.handshakes.lock().remove(&client_id.seq());
                    state.hub.remove_client(client_id);
                    tracing::debug!(%addr, status = refusal.status, reason = %refusal.reason, "websocket handshake refused");
                    respond_refusal(&mut stream, &refusal).await;
                    return;
                }
            };
            state.hub.mark_ready(client_id);
            let ws_config = WebSocketConfig::default()
                .read_buffer_size(cfg.ws_read_buffer)
                .write_buffer_size(0)
                .max_write_buffer_size(cfg.client_queue_bytes.max(64 * 1024) * 2)
                .max_message_size(Some(spec.max_message_bytes(cfg)))
                .max_frame_size(Some(spec.max_message_bytes(cfg)));
            let ws = WebSocketStream::from_partially_read(
                stream,
                leftover,
                Role::Server,
                Some(ws_config),
            )
            .await;
            let (w, r) = ws.split();
            (
                ClientRead::Ws(r),
                ClientWrite::Ws(w),
                client_id,
                remote_addr,
            )
        }
        Protocol::Text | Protocol::Frame => {
            let ClientStream::Plain(stream) = stream else {
                return;
            };
            let client_id = state.hub.add_client(sender);
            let (r, w) = if spec.protocol == Protocol::Text {
                transport::text(stream, spec.max_message_bytes(cfg))
            } else {
                transport::frame(stream, spec.max_message_bytes(cfg))
            };
            (r, w, client_id, addr.to_string())
        }
    };
    let protocol = spec.protocol.name();
    metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%client_id, %remote_addr, protocol, "client connected");

    let writer = tokio::spawn(write_loop(
        write,
        queue,
        control.clone(),
        state.clone(),
        client_id,
        spec.clone(),
    ));
    let reason = read_loop(
        read,
        &control,
        &state,
        client_id,
        &remote_addr,
        protocol,
        &flow,
        &mut sticky,
    )
    .await;

    // Leave every table first so that no later send finds the client, then
    // report the close once, with what the client had.
    control.close(1000);
    let removed = state.hub.remove_client(client_id);
    metrics.connections_closed.fetch_add(1, Ordering::Relaxed);
    metrics.count_close(&reason);
    tracing::debug!(%client_id, %reason, "client closed");
    let _ = writer.await;
    if let Some(removed) = removed {
        let event = pb::Event {
            client_id: client_id.to_string(),
            session: removed.session,
            remote_addr,
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
        if Box::pin(
            state
                .router
                .dispatch(&mut sticky, routed, &state.links_shutdown),
        )
        .await
        .is_err()
        {
            tracing::warn!(%client_id, "close event not delivered: gateway stopped before a worker took it");
        }
    }
}

/// Reads the upgrade request, asks a worker, and on acceptance gives the
/// client the session, uid and groups the worker chose, then answers 101.
/// Returns the client's real address and any bytes read past the request.
async fn ws_handshake(
    stream: &mut ClientStream,
    addr: SocketAddr,
    state: &Arc<State>,
    client_id: ClientId,
    flow: &Arc<ClientFlow>,
    sticky: &mut Option<Arc<WorkerSlot>>,
) -> Result<(String, Vec<u8>), Refusal> {
    let cfg = state.config();
    let cfg = &*cfg;
    let req = read_request(stream, cfg.max_header_bytes).await?;
    if !cfg.allowed_origins.is_empty() {
        let origin = req.header("origin").unwrap_or("");
        if !cfg.allowed_origins.iter().any(|o| o == origin) {
            tracing::warn!(%addr, origin, "websocket origin refused");
            return Err(Refusal {
                status: 403,
                reason: format!("origin `{origin}` not allowed"),
            });
        }
    }
    let remote_addr = real_remote_addr(addr, &req, &state.trusted_proxies);
    if cfg.handshake_to_worker {
        let (tx, rx) = oneshot::channel();
        state.handshakes.lock().insert(client_id.seq(), tx);
        let event = RoutedEvent {
            seq: client_id.seq(),
            event: pb::Event {
                client_id: client_id.to_string(),
                remote_addr: remote_addr.clone(),
                kind: Some(pb::event::Kind::Handshake(pb::Handshake {
                    path: req.path.clone(),
                    query: req.query.clone(),
                    headers: req
                        .headers
                        .iter()
                        .map(|(n, v)| pb::Header {
                            name: n.clone(),
                            value: v.clone(),
                        })
                        .collect(),
                })),
                ..Default::default()
            },
            flow: flow.clone(),
        };
        let dispatched = state
            .router
            .dispatch(sticky, event, &state.links_shutdown)
            .await;
        let reply = match dispatched {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        state.handshakes.lock().remove(&client_id.seq());
        let Some(reply) = reply else {
            return Err(Refusal {
                status: 503,
                reason: "no worker answered the handshake".into(),
            });
        };
        if !reply.accept {
            let status = if (400..600).contains(&reply.status) {
                reply.status as u16
            } else {
                403
            };
            return Err(Refusal {
                status,
                reason: reply.reason,
            });
        }
        if let Err(e) = apply_accept(state, client_id, reply) {
            return Err(Refusal {
                status: 500,
                reason: format!("worker sent an invalid handshake reply: {e}"),
            });
        }
    }
    if let Err(e) = respond_upgrade(stream, &req).await {
        return Err(Refusal {
            status: 400,
            reason: e.to_string(),
        });
    }
    Ok((remote_addr, req.leftover))
}

/// Applies what an accepting worker set: session, uid, groups (validated
/// like the equivalent commands).
fn apply_accept(
    state: &State,
    client_id: ClientId,
    reply: pb::HandshakeReply,
) -> Result<(), String> {
    use gw_protocol::domain::name;
    use gw_protocol::Command;
    let mut cmds = Vec::new();
    if !reply.session.is_empty() {
        let set = match serde_json::from_slice(&reply.session) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err("session must be a JSON object".into()),
        };
        cmds.push(Command::UpdateSession {
            client_id,
            replace: false,
            set,
            remove: vec![],
        });
    }
    if !reply.uid.is_empty() {
        let uid = name("uid", reply.uid).map_err(|e| e.to_string())?;
        cmds.push(Command::BindUid { client_id, uid });
    }
    for group in reply.groups {
        let group = name("group", group).map_err(|e| e.to_string())?;
        cmds.push(Command::JoinGroup { client_id, group });
    }
    for cmd in cmds {
        state.hub.execute(cmd).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut read: ClientRead,
    control: &ClientControl,
    state: &State,
    client_id: ClientId,
    remote_addr: &str,
    protocol: &'static str,
    flow: &Arc<ClientFlow>,
    sticky: &mut Option<Arc<WorkerSlot>>,
) -> String {
    let metrics = &state.hub.metrics;
    // Formatted once per connection, not once per message.
    let client_id_text = client_id.to_string();
    let event = |kind| RoutedEvent {
        seq: client_id.seq(),
        event: pb::Event {
            client_id: client_id_text.clone(),
            session: state.hub.session(client_id),
            remote_addr: remote_addr.to_string(),
            kind: Some(kind),
            ..Default::default()
        },
        flow: flow.clone(),
    };
    let connect = event(pb::event::Kind::Connect(pb::Connect {
        protocol: protocol.to_string(),
    }));
    if state
        .router
        .dispatch(sticky, connect, &state.links_shutdown)
        .await
        .is_err()
    {
        return "gateway shutting down".into();
    }
    // Optional per-client rate limit: a token bucket of `client_rate_limit`
    // messages per second (burst of the same size). Over the limit the
    // reader pauses, so the client is slowed by TCP back-pressure; nothing
    // is dropped.
    let rate = state.config().client_rate_limit as f64;
    let mut tokens = rate;
    let mut refilled = tokio::time::Instant::now();
    let reason = loop {
        if rate > 0.0 {
            let now = tokio::time::Instant::now();
            tokens = (tokens + now.duration_since(refilled).as_secs_f64() * rate).min(rate);
            refilled = now;
            if tokens < 1.0 {
                let wait = std::time::Duration::from_secs_f64((1.0 - tokens) / rate);
                tokio::select! {
                    _ = control.closed.cancelled() => break close_reason(control.close_code()),
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            tokens -= 1.0;
        }
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
        metrics
            .bytes_in
            .fetch_add(payload.data.len() as u64, Ordering::Relaxed);
        let ev = event(pb::event::Kind::Message(pb::Message {
            payload: Some(payload),
        }));
        if state
            .router
            .dispatch(sticky, ev, &state.links_shutdown)
            .await
            .is_err()
        {
            break "gateway shutting down".into();
        }
    };
    reason
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
    spec: ListenSpec,
) {
    let cfg = state.config();
    let cfg = &*cfg;
    let ping_every = spec.ping_interval(cfg);
    let mut tick = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    let ping_data = spec.ping_data(cfg).map(Bytes::from);
    let limit_ms = ping_every
        .map(|p| p.as_millis() as u64 * u64::from(spec.ping_missed_limit(cfg)))
        .unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            biased;
            _ = control.closed.cancelled() => break,
            msg = queue.recv() => {
                let Some(msg) = msg else { break };
                // Everything ready goes out with one flush. A client that
                // stops reading blocks this write; the close signal (e.g.
                // slow consumer once its queue overflows) must still win.
                let batch = async {
                    let mut n = msg.len();
                    let mut result = write.feed(msg).await;
                    while result.is_ok() {
                        match queue.try_recv() {
                            Ok(m) => { n += m.len(); result = write.feed(m).await; }
                            Err(_) => break,
                        }
                    }
                    control.queued_bytes.fetch_sub(n, Ordering::AcqRel);
                    match result {
                        Ok(()) => write.flush().await,
                        Err(e) => Err(e),
                    }
                };
                let written = tokio::select! {
                    r = batch => Some(r),
                    _ = control.closed.cancelled() => None,
                };
                match written {
                    Some(Ok(())) => {}
                    Some(Err(_)) => {
                        control.close(1006);
                        return;
                    }
                    None => break,
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
    // Bounded: a client that does not read cannot hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
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
    })
    .await;
}
