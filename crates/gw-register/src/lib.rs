//! The register: who the live gateways are, and where.
//!
//! Gateways announce their advertise address and heartbeat; every
//! subscriber (workers, gateways, push clients) gets the whole list at once
//! and again on every change (join, leave, heartbeat timeout). The register
//! is not on the data path and keeps no state worth persisting: after a
//! restart, peers reconnect with backoff and re-announce, and the list
//! rebuilds itself. Run several and give every peer all their addresses.
//!
//! The published list lives in a `watch` channel: however slow a
//! subscriber, the register holds one list for it, never a backlog.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gw_link::discovery::GatewayList;
use gw_link::{error_frame, frame, FramedLink, Peer};
use gw_protocol::pb::{self, link_frame::Body, GatewayInfo, Role};
use gw_protocol::{codes, GatewayId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The register's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegisterConfig {
    /// Listen address (HOST:PORT). Loopback by default.
    pub listen: String,
    /// The cluster secret every peer must prove.
    pub secret: String,
    /// A peer silent for this many ms is dropped (its gateway leaves the list).
    pub peer_timeout_ms: u64,
    /// Time a peer has to finish the handshake, ms.
    pub handshake_timeout_ms: u64,
    /// Admin listener (HOST:PORT) for `/metrics` and `/healthz`; off if unset.
    pub metrics: Option<String>,
    /// TLS on internal links: the register's certificate (PEM).
    pub link_tls_cert: Option<String>,
    /// TLS on internal links: its private key (PEM).
    pub link_tls_key: Option<String>,
    /// Log filter (`info`, `warn,gw_register=debug`, ...); empty = `RUST_LOG`,
    /// else `info`. Changes on SIGHUP.
    pub log_level: String,
}

impl Default for RegisterConfig {
    fn default() -> Self {
        RegisterConfig {
            listen: "127.0.0.1:1236".into(),
            secret: String::new(),
            peer_timeout_ms: 6_000,
            handshake_timeout_ms: 5_000,
            metrics: None,
            link_tls_cert: None,
            link_tls_key: None,
            log_level: String::new(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid register config: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

impl RegisterConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(message) = gw_daemon::check_log_level(&self.log_level) {
            return Err(ConfigError {
                field: "log_level",
                message,
            });
        }
        if self.secret.len() < 8 {
            return Err(ConfigError {
                field: "secret",
                message: "set a cluster secret of at least 8 characters (--secret or GW_SECRET)"
                    .into(),
            });
        }
        if self.link_tls_cert.is_some() != self.link_tls_key.is_some() {
            return Err(ConfigError {
                field: "link_tls_cert",
                message: "set both link_tls_cert and link_tls_key, or neither".into(),
            });
        }
        if self.handshake_timeout_ms < 100 {
            return Err(ConfigError {
                field: "handshake_timeout_ms",
                message: "must be at least 100".into(),
            });
        }
        if self.peer_timeout_ms < 300 {
            return Err(ConfigError {
                field: "peer_timeout_ms",
                message: "must be at least 300".into(),
            });
        }
        Ok(())
    }
}

/// Why the register could not run.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
}

struct Entry {
    info: GatewayInfo,
    /// Which connection announced it: only that connection's end removes it.
    conn: u64,
}

/// A worker's last two reports, for rates.
struct WorkerEntry {
    conn: u64,
    last: pb::WorkerReport,
    at: Instant,
    rate: f64,
}

struct State {
    config: RegisterConfig,
    gateways: Mutex<BTreeMap<String, Entry>>,
    workers: Mutex<BTreeMap<String, WorkerEntry>>,
    list: watch::Sender<GatewayList>,
    next_conn: AtomicU64,
    /// Authenticated peers connected now.
    peers: AtomicU64,
    /// Peers refused at the handshake (bad secret, bad frames, timeout).
    peers_refused: AtomicU64,
    /// Gateways that joined the list / left it, since start.
    gateway_joins: AtomicU64,
    gateway_leaves: AtomicU64,
}

impl State {
    fn render_metrics(&self) -> String {
        use gw_link::admin::metric;
        let mut out = String::new();
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        metric(
            &mut out,
            "gateworker_register_gateways",
            "gauge",
            "Gateways in the list now.",
            self.gateways.lock().len(),
        );
        metric(
            &mut out,
            "gateworker_register_peers",
            "gauge",
            "Authenticated peers connected now.",
            c(&self.peers),
        );
        metric(
            &mut out,
            "gateworker_register_peers_refused_total",
            "counter",
            "Peers refused at the handshake.",
            c(&self.peers_refused),
        );
        metric(
            &mut out,
            "gateworker_register_gateway_joins_total",
            "counter",
            "Gateways that joined the list.",
            c(&self.gateway_joins),
        );
        metric(
            &mut out,
            "gateworker_register_gateway_leaves_total",
            "counter",
            "Gateways that left the list.",
            c(&self.gateway_leaves),
        );
        out
    }
}

impl State {
    fn publish(&self, gateways: &BTreeMap<String, Entry>) {
        let list: Vec<GatewayInfo> = gateways.values().map(|e| e.info.clone()).collect();
        self.list.send_replace(Arc::new(list));
    }
}

/// Serves on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: RegisterConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RegisterError> {
    run_with_metrics(config, listener, None, shutdown).await
}

/// Like [`run`], also serving `/metrics` and `/healthz` on `metrics`.
pub async fn run_with_metrics(
    config: RegisterConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RegisterError> {
    config.validate()?;
    let tls = gw_link::LinkTls::from_files(
        config.link_tls_cert.as_deref(),
        config.link_tls_key.as_deref(),
        None,
        "gateworker",
    )
    .map_err(|e| ConfigError {
        field: "link_tls_cert",
        message: e,
    })?;
    let node_id = format!("register-{:08x}", rand::random::<u32>());
    tracing::info!(listen = ?listener.local_addr().ok(), %node_id, "register listening");
    let state = Arc::new(State {
        config,
        gateways: Mutex::new(BTreeMap::new()),
        workers: Mutex::new(BTreeMap::new()),
        list: watch::channel(GatewayList::default()).0,
        next_conn: AtomicU64::new(1),
        peers: AtomicU64::new(0),
        peers_refused: AtomicU64::new(0),
        gateway_joins: AtomicU64::new(0),
        gateway_leaves: AtomicU64::new(0),
    });
    if let Some(m) = metrics {
        tracing::info!(metrics = ?m.local_addr().ok(), "register metrics listening");
        let st = state.clone();
        tokio::spawn(gw_link::admin::serve(
            m,
            move || {
                let st = st.clone();
                async move { st.render_metrics() }
            },
            shutdown.clone(),
        ));
    }
    let tracker = TaskTracker::new();
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        let node_id = node_id.clone();
        let acceptor = tls.acceptor.clone();
        tracker.spawn(async move {
            let accepted = gw_link::accept_with(
                stream,
                acceptor.as_ref(),
                state.config.secret.as_bytes(),
                &node_id,
                &[Role::Gateway, Role::Worker, Role::PushClient],
                gw_protocol::frame::DEFAULT_MAX_FRAME,
                Duration::from_millis(state.config.handshake_timeout_ms),
            )
            .await;
            match accepted {
                Ok((link, peer)) => {
                    state.peers.fetch_add(1, Ordering::Relaxed);
                    serve_peer(link, peer, state.clone(), shutdown).await;
                    state.peers.fetch_sub(1, Ordering::Relaxed);
                }
                Err(e) => {
                    state.peers_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%addr, error = %e, "peer refused")
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    tracing::info!("register stopped");
    Ok(())
}

async fn serve_peer(
    mut link: FramedLink,
    peer: Peer,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    tracing::info!(node = %peer.node_id, role = ?peer.role, addr = %peer.addr, "peer connected");
    let timeout = Duration::from_millis(state.config.peer_timeout_ms);
    let mut list_rx = state.list.subscribe();
    let mut subscribed = false;
    let mut announced: Option<String> = None;
    let mut reported: Option<String> = None;
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(timeout / 3);
    let reason: String = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = link.send(frame(Body::Goodbye(pb::Goodbye { reason: "register shutting down".into() }))).await;
                break "register shutting down".into();
            }
            changed = list_rx.changed(), if subscribed => {
                if changed.is_err() { break "register stopping".into(); }
                let list = list_rx.borrow_and_update().clone();
                if let Err(e) = link.send(frame(Body::GatewayList(pb::GatewayList { gateways: list.to_vec() }))).await {
                    break e.to_string();
                }
            }
            _ = tick.tick() => {
                if last_heard.elapsed() > timeout {
                    let _ = link.send(error_frame(codes::LINK_HEARTBEAT_TIMEOUT, "silent for too long")).await;
                    break "heartbeat timeout".into();
                }
            }
            f = link.next() => {
                let f = match f {
                    None => break "peer closed the link".into(),
                    Some(Err(e)) => {
                        let code = match &e { gw_link::LinkError::Frame(f) => f.code(), _ => codes::LINK_MALFORMED };
                        let _ = link.send(error_frame(code, e.to_string())).await;
                        break e.to_string();
                    }
                    Some(Ok(f)) => f,
                };
                last_heard = Instant::now();
                match f.body {
                    Some(Body::Ping(p)) => {
                        if link.send(frame(Body::Pong(pb::Pong { nonce: p.nonce }))).await.is_err() {
                            break "write failed".into();
                        }
                    }
                    Some(Body::Pong(_)) => {}
                    Some(Body::Subscribe(_)) => {
                        subscribed = true;
                        let list = list_rx.borrow_and_update().clone();
                        if link.send(frame(Body::GatewayList(pb::GatewayList { gateways: list.to_vec() }))).await.is_err() {
                            break "write failed".into();
                        }
                    }
                    Some(Body::Announce(a)) if peer.role == Role::Gateway => {
                        match announce(&state, conn, a.gateway) {
                            Ok(id) => {
                                if announced.as_deref() != Some(id.as_str()) {
                                    tracing::info!(gateway = %id, addr = %peer.addr, "gateway joined");
                                }
                                announced = Some(id);
                            }
                            Err((code, msg)) => {
                                tracing::warn!(node = %peer.node_id, addr = %peer.addr, error = %msg, "announce refused");
                                let _ = link.send(error_frame(code, msg.clone())).await;
                                break msg;
                            }
                        }
                    }
                    Some(Body::WorkerReport(r)) if peer.role == Role::Worker => {
                        let mut workers = state.workers.lock();
                        let now = Instant::now();
                        let rate = match workers.get(&r.worker_id) {
                            Some(prev) if prev.conn == conn => {
                                let dt = now.duration_since(prev.at).as_secs_f64();
                                if dt > 0.0 { r.events_total.saturating_sub(prev.last.events_total) as f64 / dt } else { prev.rate }
                            }
                            _ => 0.0,
                        };
                        reported = Some(r.worker_id.clone());
                        workers.insert(r.worker_id.clone(), WorkerEntry { conn, last: r, at: now, rate });
                    }
                    Some(Body::StatusRequest(_)) => {
                        let reply = pb::StatusReply {
                            gateways: list_rx.borrow().to_vec(),
                            workers: state
                                .workers
                                .lock()
                                .values()
                                .map(|w| pb::WorkerStatus { report: Some(w.last.clone()), events_per_second: w.rate })
                                .collect(),
                        };
                        if link.send(frame(Body::StatusReply(reply))).await.is_err() {
                            break "write failed".into();
                        }
                    }
                    Some(Body::Goodbye(_)) => break "peer said goodbye".into(),
                    _ => {
                        tracing::warn!(node = %peer.node_id, addr = %peer.addr, "unexpected frame from peer");
                        let _ = link.send(error_frame(codes::LINK_UNEXPECTED, "unexpected frame on a register link")).await;
                        break "unexpected frame".into();
                    }
                }
            }
        }
    };
    if let Some(id) = reported {
        let mut workers = state.workers.lock();
        if workers.get(&id).is_some_and(|w| w.conn == conn) {
            workers.remove(&id);
        }
    }
    if let Some(id) = announced {
        let mut gateways = state.gateways.lock();
        if gateways.get(&id).is_some_and(|e| e.conn == conn) {
            gateways.remove(&id);
            state.gateway_leaves.fetch_add(1, Ordering::Relaxed);
            state.publish(&gateways);
            tracing::info!(gateway = %id, %reason, "gateway left");
        }
    }
    tracing::info!(node = %peer.node_id, %reason, "peer disconnected");
}

/// Records an announcement; refuses a malformed one or a second live
/// gateway with the same id at another address.
fn announce(state: &State, conn: u64, info: Option<GatewayInfo>) -> Result<String, (u32, String)> {
    let info = info.ok_or((
        codes::LINK_MALFORMED,
        "announce without gateway".to_string(),
    ))?;
    info.gateway_id
        .parse::<GatewayId>()
        .map_err(|e| (codes::LINK_MALFORMED, e.to_string()))?;
    if info
        .internal_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err((
            codes::LINK_MALFORMED,
            format!("bad internal_addr `{}`", info.internal_addr),
        ));
    }
    let mut gateways = state.gateways.lock();
    if let Some(existing) = gateways.get(&info.gateway_id) {
        if existing.conn != conn && existing.info.internal_addr != info.internal_addr {
            return Err((
                codes::LINK_DUPLICATE_GATEWAY,
                format!(
                    "gateway id {} is already live at {}",
                    info.gateway_id, existing.info.internal_addr
                ),
            ));
        }
        if existing.conn == conn && existing.info == info {
            return Ok(info.gateway_id);
        }
    }
    let id = info.gateway_id.clone();
    if !gateways.contains_key(&id) {
        state.gateway_joins.fetch_add(1, Ordering::Relaxed);
    }
    gateways.insert(id.clone(), Entry { info, conn });
    state.publish(&gateways);
    Ok(id)
}
