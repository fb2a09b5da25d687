//! Client connections: accepting them on the public listeners, and the one
//! task each connection runs.
//!
//! The task reads the socket and hands each message to the client's worker
//! through [`crate::routing`]; while a worker is slow or absent it stops
//! reading (the client is back-pressured through TCP, nothing is dropped)
//! but keeps writing. It writes everything queued for the client
//! ([`crate::hub::ClientShared`]) with one vectored write, sends heartbeats
//! and closes the socket with the right code when asked. See [`conn`].
//!
//! When the connection ends, the client leaves every table and exactly one
//! `Close` event goes to its worker.

pub(crate) mod conn;
pub(crate) mod handshake;
pub(crate) mod tls;
pub(crate) mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gw_protocol::{codes, pb, ClientId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::config::{ListenSpec, Protocol};
use crate::hub::{ClientSender, ClientShared, QueueLimits, CLOSE_IMMEDIATE};
use crate::routing::{ClientFlow, RoutedEvent, WorkerSlot};
use crate::State;
use conn::{Conn, IoEvent};
use handshake::{read_request, real_remote_addr, respond_refusal, respond_upgrade, Refusal};
use tls::ClientStream;
use wire::{Decoder, Inbound, Wire};

/// Accepts clients on one public listener until the gateway stops accepting.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    spec: ListenSpec,
    state: Arc<State>,
    tracker: TaskTracker,
) {
    // Shared: a per-connection copy would be allocated for every client.
    let spec = Arc::new(spec);
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
        tracker.spawn(handle_connection(stream, addr, spec, state));
    }
}

/// Counts a connection for `max_connections`; released on drop.
struct ConnectionPermit(Arc<State>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client past its handshake.
struct Established {
    stream: ClientStream,
    wire: Wire,
    shared: ClientSender,
    flow: Arc<ClientFlow>,
    sticky: Option<Arc<WorkerSlot>>,
    client_id: ClientId,
    remote_addr: String,
    leftover: Vec<u8>,
}

/// Everything before a connection is established (TLS, limits, the
/// WebSocket handshake). Its own future, boxed by the caller: its state is
/// large and short-lived, and inline it would size every connection's task
/// for its whole life.
async fn establish(
    stream: TcpStream,
    addr: SocketAddr,
    spec: &ListenSpec,
    state: &Arc<State>,
) -> Option<Established> {
    let cfg = state.config();
    let cfg = &*cfg;
    let metrics = state.hub.metrics.clone();
    let full = state.open_connections.load(Ordering::Acquire) > cfg.max_connections;
    let _ = stream.set_nodelay(true);
    // wss: the TLS handshake first, within the handshake timeout.
    let mut stream = match (spec.protocol, &state.tls) {
        (Protocol::Wss, Some(tls)) => {
            // Boxed: a TLS handshake's state is large and short-lived.
            let accept = Box::pin(tokio::time::timeout(
                cfg.handshake_timeout(),
                tls.acceptor().accept(stream),
            ));
            match accept.await {
                Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%addr, "TLS handshake timed out");
                    return None;
                }
            }
        }
        (Protocol::Wss, None) => return None,
        _ => ClientStream::Plain(Arc::new(stream)),
    };
    if full {
        metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%addr, max = cfg.max_connections, "connection refused: max_connections reached");
        if matches!(spec.protocol, Protocol::Ws | Protocol::Wss) {
            let r = Refusal {
                status: 503,
                reason: "gateway at max_connections, retry later".into(),
            };
            Box::pin(respond_refusal(&mut stream, &r)).await;
        }
        return None;
    }

    let wire = match spec.protocol {
        Protocol::Ws | Protocol::Wss => Wire::Ws,
        Protocol::Text => Wire::Text,
        Protocol::Frame => Wire::Frame,
    };
    let shared = ClientShared::new(
        wire,
        QueueLimits {
            messages: cfg.client_queue_messages.max(1),
            bytes: cfg.client_queue_bytes,
        },
    );
    shared
        .last_heard_ms
        .store(state.now_ms(), Ordering::Relaxed);
    let flow = Arc::new(ClientFlow::default());
    let mut sticky = None;

    let (client_id, remote_addr, leftover) = if wire == Wire::Ws {
        // Registered now so that the worker can bind, join and set the
        // session while deciding; invisible to queries until accepted.
        let client_id = state.hub.add_pending_client(shared.clone());
        // Boxed: the handshake's state is needed only briefly, and kept
        // inline it would make every connection's future larger for its
        // whole life.
        let handshake = Box::pin(tokio::time::timeout(
            cfg.handshake_timeout(),
            ws_handshake(&mut stream, addr, state, client_id, &flow, &mut sticky),
        ))
        .await;
        let accepted = match handshake {
            Ok(r) => r,
            Err(_) => Err(Refusal {
                status: 503,
                reason: "handshake timed out (no worker answered)".into(),
            }),
        };
        match accepted {
            Ok((remote_addr, leftover)) => {
                state.hub.mark_ready(client_id);
                (client_id, remote_addr, leftover)
            }
            Err(refusal) => {
                state.handshakes.lock().remove(&client_id.seq());
                state.hub.remove_client(client_id);
                tracing::debug!(%addr, status = refusal.status, reason = %refusal.reason, "websocket handshake refused");
                Box::pin(respond_refusal(&mut stream, &refusal)).await;
                return None;
            }
        }
    } else {
        if !matches!(stream, ClientStream::Plain(_)) {
            return None;
        }
        (
            state.hub.add_client(shared.clone()),
            addr.to_string(),
            Vec::new(),
        )
    };
    Some(Established {
        stream,
        wire,
        shared,
        flow,
        sticky,
        client_id,
        remote_addr,
        leftover,
    })
}

async fn handle_connection(
    stream: TcpStream,
    addr: SocketAddr,
    spec: Arc<ListenSpec>,
    state: Arc<State>,
) {
    state.open_connections.fetch_add(1, Ordering::AcqRel);
    let _permit = ConnectionPermit(state.clone());
    let Some(Established {
        stream,
        wire,
        shared,
        flow,
        mut sticky,
        client_id,
        remote_addr,
        leftover,
    }) = Box::pin(establish(stream, addr, &spec, &state)).await
    else {
        return;
    };
    let cfg = state.config();
    let metrics = state.hub.metrics.clone();
    let protocol = spec.protocol.name();
    metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%client_id, %remote_addr, protocol, "client connected");

    let mut conn = Conn::new(
        stream,
        shared.clone(),
        metrics.clone(),
        leftover,
        spec.ping_interval(&cfg),
    );
    let mut decoder = Decoder::new(wire, spec.max_message_bytes(&cfg));
    drop(cfg);
    let serving = serve(
        &mut conn,
        &mut decoder,
        &spec,
        &state,
        client_id,
        &remote_addr,
        protocol,
        &flow,
        &mut sticky,
    );
    let reason = serving.await;

    // Leave every table first so that no later send finds the client, then
    // close the socket, then report the close once, with what the client had.
    shared.close(1000);
    // Flush lists stop writing to the socket; the task finishes alone.
    shared.set_socket(None);
    let removed = state.hub.remove_client(client_id);
    metrics.connections_closed.fetch_add(1, Ordering::Relaxed);
    metrics.count_close(&reason.text);
    tracing::debug!(%client_id, reason = %reason.text, "client closed");
    let code = shared.close_code().unwrap_or(1000);
    if !reason.socket_failed {
        let skip_queue = code == CLOSE_IMMEDIATE || code == codes::CLOSE_SLOW_CONSUMER;
        let code = match (code, reason.client_code) {
            (CLOSE_IMMEDIATE, _) => codes::CLOSE_BY_APPLICATION,
            // The client closed first: echo its code.
            (_, Some(c)) => c,
            (c, None) => c,
        };
        let frame = (wire == Wire::Ws).then(|| wire::encode_close(code, &close_reason(code)));
        Box::pin(conn.finish(skip_queue, frame, Duration::from_secs(2))).await;
    }
    if let Some(removed) = removed {
        let event = pb::Event {
            client_id: client_id.to_string(),
            session: removed.session,
            remote_addr,
            kind: Some(pb::event::Kind::Close(pb::Close {
                reason: reason.text,
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
    if !reason.socket_failed {
        Box::pin(conn.linger(Duration::from_secs(2))).await;
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
        match apply_accept(state, client_id, reply) {
            // A uid or group given at the handshake: the client sees the
            // upgrade only once every worker that acknowledges interest
            // routes sends to it here. The deciding worker too (it does not
            // count handshake memberships as its own joins).
            Ok(interest) => {
                if let Some(wait) = state.interest_wait(None, interest) {
                    wait.await;
                }
            }
            Err(e) => {
                return Err(Refusal {
                    status: 500,
                    reason: format!("worker sent an invalid handshake reply: {e}"),
                });
            }
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
/// like the equivalent commands). Returns the newest interest version the
/// uid and groups depend on (0: none).
fn apply_accept(
    state: &State,
    client_id: ClientId,
    reply: pb::HandshakeReply,
) -> Result<u64, String> {
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
    let mut interest = 0;
    for cmd in cmds {
        let done = state.hub.execute_tracked(cmd).map_err(|e| e.to_string())?;
        interest = interest.max(done.interest);
    }
    Ok(interest)
}

/// Why a connection ended.
struct Ended {
    /// For logs, metrics and the worker's `Close` event.
    text: String,
    /// The code of the client's own close frame, echoed back.
    client_code: Option<u16>,
    /// Nothing more can be written.
    socket_failed: bool,
}

impl Ended {
    fn new(text: impl Into<String>) -> Self {
        Ended {
            text: text.into(),
            client_code: None,
            socket_failed: false,
        }
    }
}

/// The connection's life after the handshake: reads, dispatches, writes,
/// heartbeats, until something ends it.
#[allow(clippy::too_many_arguments)]
async fn serve(
    conn: &mut Conn,
    decoder: &mut Decoder,
    spec: &ListenSpec,
    state: &State,
    client_id: ClientId,
    remote_addr: &str,
    protocol: &'static str,
    flow: &Arc<ClientFlow>,
    sticky: &mut Option<Arc<WorkerSlot>>,
) -> Ended {
    let metrics = &state.hub.metrics;
    let cfg = state.config();
    // The ping frame is the same every tick: built once per connection, and
    // only with heartbeats on (a WebSocket ping without data is static, so
    // an idle connection holds no allocation for it).
    let ping = spec.ping_interval(&cfg).and_then(|_| {
        wire::encode_ping(
            conn.shared.wire,
            spec.ping_data(&cfg).map(|d| d.into_bytes()).as_deref(),
        )
    });
    let heartbeat_limit_ms = spec
        .ping_interval(&cfg)
        .map(|p| p.as_millis() as u64 * u64::from(spec.ping_missed_limit(&cfg)))
        .unwrap_or(u64::MAX);
    // Optional per-client rate limit: a token bucket of `client_rate_limit`
    // messages per second (burst of the same size). Over the limit the
    // connection stops reading, so the client is slowed by TCP
    // back-pressure; nothing is dropped.
    let rate = cfg.client_rate_limit as f64;
    drop(cfg);
    let mut tokens = rate;
    let mut refilled = tokio::time::Instant::now();
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
    // A tick: close a silent client, or ping it.
    let heartbeat = |conn: &mut Conn| -> Option<Ended> {
        let silent = state
            .now_ms()
            .saturating_sub(conn.shared.last_heard_ms.load(Ordering::Relaxed));
        if silent >= heartbeat_limit_ms {
            metrics.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%client_id, silent_ms = silent, "closing silent client");
            conn.shared.close(codes::CLOSE_HEARTBEAT_TIMEOUT);
            return Some(Ended::new(close_reason(codes::CLOSE_HEARTBEAT_TIMEOUT)));
        }
        if let Some(ping) = &ping {
            conn.send_control(ping.clone());
        }
        None
    };
    // What ends the connection while it waits for something else.
    let on_event = |conn: &mut Conn, ev: IoEvent| -> Option<Ended> {
        match ev {
            IoEvent::Tick => heartbeat(conn),
            IoEvent::Read => None,
            IoEvent::Eof => Some(Ended::new("client disconnected")),
            IoEvent::Closed(code) => Some(Ended::new(close_reason(code))),
            IoEvent::Failed(e) => {
                conn.shared.close(1006);
                Some(Ended {
                    socket_failed: true,
                    ..Ended::new(format!("i/o error: {e}"))
                })
            }
        }
    };

    let connect = event(pb::event::Kind::Connect(pb::Connect {
        protocol: protocol.to_string(),
    }));
    // The waits below are cold (a full worker queue, a client over its
    // rate) and boxed: inline, their state would size every connection's
    // future for its whole life.
    if let Some(slow) = dispatch_now(state, sticky, connect) {
        if let Err(ended) = Box::pin(dispatch_waiting(conn, slow, &on_event)).await {
            return ended;
        }
    }
    loop {
        // Every complete message in the buffer first; they all came with
        // the same read, so one clock reading serves them all.
        let mut heard_ms = state.now_ms();
        loop {
            let inbound = match decoder.decode(&mut conn.rbuf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    conn.shared.close(e.close_code());
                    return Ended::new(format!("read error: {e}"));
                }
            };
            conn.shared.last_heard_ms.store(heard_ms, Ordering::Relaxed);
            let payload = match inbound {
                Inbound::Ping(data) => {
                    conn.send_control(wire::encode_pong(&data));
                    continue;
                }
                Inbound::Pong => continue,
                Inbound::Close(code) => {
                    return Ended {
                        client_code: Some(code.unwrap_or(1000)),
                        ..Ended::new("client closed")
                    }
                }
                Inbound::Text(data) => pb::Payload {
                    data,
                    binary: false,
                },
                Inbound::Binary(data) => pb::Payload { data, binary: true },
            };
            metrics.messages_in.fetch_add(1, Ordering::Relaxed);
            metrics
                .bytes_in
                .fetch_add(payload.data.len() as u64, Ordering::Relaxed);
            if rate > 0.0 {
                let now = tokio::time::Instant::now();
                tokens = (tokens + now.duration_since(refilled).as_secs_f64() * rate).min(rate);
                refilled = now;
                if tokens < 1.0 {
                    let wait = Duration::from_secs_f64((1.0 - tokens) / rate);
                    let pause = Box::pin(tokio::time::sleep(wait));
                    if let Err((ended, _)) = Box::pin(wait_serving(conn, pause, &on_event)).await {
                        return ended;
                    }
                    heard_ms = state.now_ms();
                    let now = tokio::time::Instant::now();
                    tokens += now.duration_since(refilled).as_secs_f64() * rate;
                    refilled = now;
                }
                tokens -= 1.0;
            }
            let ev = event(pb::event::Kind::Message(pb::Message {
                payload: Some(payload),
            }));
            if let Some(slow) = dispatch_now(state, sticky, ev) {
                if let Err(ended) = Box::pin(dispatch_waiting(conn, slow, &on_event)).await {
                    return ended;
                }
            }
        }
        conn.release_idle_buffers();
        let want = decoder.wanted(&conn.rbuf).unwrap_or(0);
        let ev = std::future::poll_fn(|cx| conn.poll_io(cx, Some(want))).await;
        if let Some(ended) = on_event(conn, ev) {
            return ended;
        }
    }
}

/// A dispatch still waiting for room or for a worker; `false` if the
/// gateway stopped first.
type SlowDispatch<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// Hands `event` to the client's worker at once when its link has room
/// (the common case, no allocation). Otherwise returns the wait, boxed: an
/// event is large, and the waiting state inline would size every
/// connection's task for its whole life.
fn dispatch_now<'a>(
    state: &'a State,
    sticky: &'a mut Option<Arc<WorkerSlot>>,
    event: RoutedEvent,
) -> Option<SlowDispatch<'a>> {
    match state.router.try_dispatch(sticky, event) {
        Ok(()) => None,
        Err(event) => Some(Box::pin(async move {
            state
                .router
                .dispatch(sticky, event, &state.links_shutdown)
                .await
                .is_ok()
        })),
    }
}

/// Waits for `fut` while the connection keeps writing and ticking. If the
/// connection must end meanwhile, returns why, with `fut` unfinished.
async fn wait_serving<F: Future + Unpin>(
    conn: &mut Conn,
    mut fut: F,
    on_event: &impl Fn(&mut Conn, IoEvent) -> Option<Ended>,
) -> Result<F::Output, (Ended, F)> {
    loop {
        match conn.wait_with_io(fut).await {
            Ok(v) => return Ok(v),
            Err((ev, f)) => {
                if let Some(ended) = on_event(conn, ev) {
                    return Err((ended, f));
                }
                fut = f;
            }
        }
    }
}

/// Waits for a dispatch that could not complete at once while the
/// connection keeps writing. If the connection must end meanwhile, the
/// event is still handed over (it was received before the end) before the
/// end is reported.
async fn dispatch_waiting(
    conn: &mut Conn,
    fut: SlowDispatch<'_>,
    on_event: &impl Fn(&mut Conn, IoEvent) -> Option<Ended>,
) -> Result<(), Ended> {
    match wait_serving(conn, fut, on_event).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Ended::new("gateway shutting down")),
        Err((ended, f)) => {
            f.await;
            Err(ended)
        }
    }
}

fn close_reason(code: u16) -> String {
    match code {
        codes::CLOSE_SLOW_CONSUMER => "slow consumer".into(),
        codes::CLOSE_HEARTBEAT_TIMEOUT => "heartbeat timeout".into(),
        codes::CLOSE_GOING_AWAY => "gateway shutting down".into(),
        codes::CLOSE_BY_APPLICATION | CLOSE_IMMEDIATE => "closed by application".into(),
        codes::CLOSE_TOO_BIG => "message too big".into(),
        c => format!("closed with code {c}"),
    }
}
