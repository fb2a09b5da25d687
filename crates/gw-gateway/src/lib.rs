//! The gateway: holds client sockets, tags each with a cluster-unique
//! `client_id`, keeps uid bindings, groups and sessions, forwards client
//! events to workers and executes their commands.
//!
//! Where things live:
//! * [`client`]: public listeners and each client's reader/writer tasks.
//! * [`routing`]: which worker a client's event goes to (sticky, bounded).
//! * `worker_link`: the actor serving one worker's link.
//! * `hub`: the sharded tables of clients, uids, groups and sessions, and the
//!   execution of commands and queries.
//! * [`config`]: the configuration, [`GatewayConfig`].
//!
//! [`run`] serves until its shutdown token is cancelled, then stops
//! gracefully: stop accepting, close every client with 1001 ("going away,
//! reconnect"), report every close to the workers, say goodbye on every link.
#![forbid(unsafe_code)]

pub mod api;
#[doc(hidden)]
pub mod bench_support;
pub mod client;
pub mod config;
mod hub;
pub mod metrics;
pub mod routing;
mod worker_link;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gw_link::discovery::{self, DiscoveryConfig, GatewayList};
use gw_protocol::pb::{GatewayInfo, Role};
use gw_protocol::{codes, GatewayId};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{GatewayConfig, ListenSpec, Protocol};
pub use metrics::Metrics;

use hub::Hub;
use routing::Router;

/// The sockets a gateway serves, bound before [`run`] so that callers (and
/// tests, with port 0) know the real addresses.
#[derive(Debug)]
pub struct Listeners {
    pub public: Vec<(ListenSpec, TcpListener)>,
    pub internal: TcpListener,
    /// The push API / health / metrics listener, if configured.
    pub api: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener of `config`.
    pub async fn bind(config: &GatewayConfig) -> std::io::Result<Self> {
        use gw_daemon::bind_listener;
        let backlog = config.listen_backlog;
        let mut public = Vec::new();
        for spec in config.listeners() {
            let l = bind_listener(&spec.addr, backlog).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("binding public listener {spec}: {e}"))
            })?;
            public.push((spec, l));
        }
        let internal = bind_listener(&config.internal, backlog)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("binding internal listener {}: {e}", config.internal),
                )
            })?;
        let api = match &config.api {
            Some(a) => Some(bind_listener(a, backlog).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("binding API listener {a}: {e}"))
            })?),
            None => None,
        };
        Ok(Listeners {
            public,
            internal,
            api,
        })
    }

    /// The public listeners as URLs with the ports actually bound.
    pub fn public_urls(&self) -> Vec<String> {
        self.public
            .iter()
            .map(|(spec, l)| {
                let addr = l
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| spec.addr.clone());
                format!("{}://{addr}", spec.protocol.name())
            })
            .collect()
    }

    /// The internal listener's bound address.
    pub fn internal_addr(&self) -> std::io::Result<SocketAddr> {
        self.internal.local_addr()
    }
}

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared by every task of one gateway.
pub(crate) struct State {
    /// The configuration; its run-time settings are replaced by
    /// [`GatewayHandle::reload`] (SIGHUP).
    config: parking_lot::RwLock<Arc<GatewayConfig>>,
    pub(crate) hub: Hub,
    pub(crate) router: Router,
    /// Cancelled when the gateway stops accepting (the start of shutdown).
    pub(crate) accept_stop: CancellationToken,
    /// Cancelled after clients are closed and their closes reported: worker
    /// links then flush and say goodbye.
    pub(crate) links_shutdown: CancellationToken,
    pub(crate) open_connections: AtomicUsize,
    /// WebSocket upgrades waiting for a worker's decision, by client sequence.
    pub(crate) handshakes: parking_lot::Mutex<
        HashMap<u64, tokio::sync::oneshot::Sender<gw_protocol::pb::HandshakeReply>>,
    >,
    /// Parsed `trusted_proxies`.
    pub(crate) trusted_proxies: Vec<std::net::IpAddr>,
    /// TLS for `wss` listeners, if any.
    pub(crate) tls: Option<Arc<client::tls::TlsConfig>>,
    started: Instant,
}

impl State {
    /// The current configuration.
    pub(crate) fn config(&self) -> Arc<GatewayConfig> {
        self.config.read().clone()
    }

    /// Milliseconds since the gateway started (a cheap clock for heartbeats).
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The wait a join or bind needs before its outcome is shown to the
    /// client: until every link but `except` (the joining link, whose
    /// worker counts its own joins at once) whose peer acknowledges
    /// interest has acknowledged `version`, at most
    /// `interest_ack_timeout_ms`. `None` when nothing needs waiting for:
    /// no version, the wait turned off, or every such peer is there
    /// already. Counted in the metrics.
    pub(crate) fn interest_wait(
        &self,
        except: Option<u64>,
        version: u64,
    ) -> Option<impl std::future::Future<Output = ()> + Send + '_> {
        if version == 0 {
            return None;
        }
        let timeout = self.config().interest_ack_timeout()?;
        if self.router.interest_settled(except, version) {
            return None;
        }
        let metrics = &self.hub.metrics;
        metrics
            .interest_waits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(async move {
            let lagging = self.router.await_interest(except, version, timeout).await;
            metrics
                .interest_ack_timeouts
                .fetch_add(lagging as u64, std::sync::atomic::Ordering::Relaxed);
        })
    }
}

/// A fresh gateway id: 48 random bits, never zero.
fn new_gateway_id() -> GatewayId {
    loop {
        if let Some(id) = GatewayId::new(rand::random::<u64>() & GatewayId::MAX) {
            return id;
        }
    }
}

/// What a running gateway exposes to whoever started it.
#[derive(Clone)]
pub struct GatewayHandle {
    pub gateway_id: GatewayId,
    pub metrics: Arc<Metrics>,
    /// The gateway list learned from the register(s).
    pub peers: watch::Receiver<GatewayList>,
    state: Arc<State>,
}

/// Settings that take effect only at start-up; a reload that changes them
/// keeps the running values and says so.
const RESTART_ONLY: &[&str] = &[
    "register",
    "secret",
    "listen",
    "internal",
    "advertise",
    "api",
    "api_key",
    "tls_cert",
    "tls_key",
    "worker_queue",
    "link_max_frame",
];

impl GatewayHandle {
    /// The version of the gateway's last interest change (a group or uid
    /// gaining its first or losing its last member here); 1: none yet.
    pub fn interest_version(&self) -> u64 {
        self.state.hub.interest_version()
    }

    /// Every link's interest acknowledgements (worker and push-client
    /// links).
    pub fn interest_acks(&self) -> Vec<routing::InterestAckState> {
        self.state.router.interest_acks()
    }

    /// Applies a new configuration to what can change at run time (limits,
    /// heartbeats, queues of new clients, rate limit, origins, proxies,
    /// timeouts, the handshake policy). New values apply to new connections
    /// and, for the rate limit, queue and size limits, to new clients; open
    /// connections keep running. Returns the fields changed and the
    /// start-up-only fields that differ (kept as they were).
    pub fn reload(
        &self,
        new: GatewayConfig,
    ) -> Result<(Vec<String>, Vec<String>), config::ConfigError> {
        new.validate()?;
        let old = self.state.config();
        let as_map = |c: &GatewayConfig| match toml::Value::try_from(c) {
            Ok(toml::Value::Table(t)) => t,
            _ => Default::default(),
        };
        let (old_map, mut new_map) = (as_map(&old), as_map(&new));
        let mut changed = Vec::new();
        let mut ignored = Vec::new();
        for (k, v) in new_map.iter_mut() {
            if old_map.get(k) != Some(v) {
                if RESTART_ONLY.contains(&k.as_str()) {
                    ignored.push(k.clone());
                    if let Some(o) = old_map.get(k) {
                        *v = o.clone();
                    }
                } else {
                    changed.push(k.clone());
                }
            }
        }
        // Fields unset in the new file but set before are start-up-only
        // (optional addresses): keep them too.
        for (k, v) in &old_map {
            if !new_map.contains_key(k) && RESTART_ONLY.contains(&k.as_str()) {
                new_map.insert(k.clone(), v.clone());
            }
        }
        let merged: GatewayConfig =
            toml::Value::Table(new_map)
                .try_into()
                .map_err(|e| config::ConfigError {
                    field: "config",
                    message: e.to_string(),
                })?;
        *self.state.config.write() = Arc::new(merged);
        Ok((changed, ignored))
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<GatewayConfig> {
        self.state.config()
    }
}

/// Serves until `shutdown` is cancelled, then stops gracefully.
pub async fn run(
    config: GatewayConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let (ready_tx, _ready_rx) = tokio::sync::oneshot::channel();
    run_with(config, listeners, shutdown, ready_tx).await
}

/// Like [`run`], and hands a [`GatewayHandle`] to `ready` once serving.
pub async fn run_with(
    config: GatewayConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
    ready: tokio::sync::oneshot::Sender<GatewayHandle>,
) -> Result<(), GatewayError> {
    config.validate()?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(Arc::new(client::tls::TlsConfig::load(c, k).map_err(
            |e| config::ConfigError {
                field: "tls_cert",
                message: e,
            },
        )?)),
        _ => None,
    };
    let link_tls = gw_link::LinkTls::from_files(
        config.link_tls_cert.as_deref(),
        config.link_tls_key.as_deref(),
        config.link_tls_ca.as_deref(),
        &config.link_tls_name,
    )
    .map_err(|e| config::ConfigError {
        field: "link_tls_cert",
        message: e,
    })?;
    let gateway_id = new_gateway_id();
    let internal_bound = listeners.internal_addr()?;
    let advertise = advertise_addr(config.advertise.as_deref(), internal_bound);
    if internal_bound.ip().is_unspecified() && config.advertise.is_none() {
        tracing::warn!(%advertise, "internal listener binds all addresses but no --advertise is set: workers on other hosts cannot reach {advertise}");
    }
    let public_urls = listeners.public_urls();
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(State {
        hub: Hub::new(gateway_id, metrics.clone()),
        router: Router::new(),
        accept_stop: shutdown.clone(),
        links_shutdown: CancellationToken::new(),
        open_connections: AtomicUsize::new(0),
        handshakes: Default::default(),
        trusted_proxies: config.trusted_proxy_ips(),
        tls: tls.clone(),
        started: Instant::now(),
        config: parking_lot::RwLock::new(Arc::new(config)),
    });
    tracing::info!(gateway = %gateway_id, internal = %internal_bound, %advertise, public = ?public_urls, "gateway listening");

    let links = TaskTracker::new();
    let clients = TaskTracker::new();
    let secret = state.config().secret.as_bytes().to_vec();

    // Internal listener: worker links.
    let link_tls_accept = link_tls.acceptor.clone();
    {
        let state = state.clone();
        let links2 = links.clone();
        let listener = listeners.internal;
        let node_id = gateway_id.to_string();
        links.spawn(async move {
            loop {
                let (stream, addr) = tokio::select! {
                    _ = state.accept_stop.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "internal accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let state = state.clone();
                let secret = secret.clone();
                let node_id = node_id.clone();
                let acceptor = link_tls_accept.clone();
                links2.spawn(async move {
                    let accepted = gw_link::accept_with(
                        stream,
                        acceptor.as_ref(),
                        &secret,
                        &node_id,
                        &[Role::Worker, Role::PushClient],
                        state.config().link_max_frame,
                        state.config().handshake_timeout(),
                    )
                    .await;
                    match accepted {
                        Ok((link, peer)) => {
                            worker_link::serve(
                                link,
                                peer,
                                state.clone(),
                                state.links_shutdown.clone(),
                            )
                            .await
                        }
                        Err(e) => {
                            state
                                .hub
                                .metrics
                                .links_refused
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(%addr, error = %e, "internal link refused");
                        }
                    }
                });
            }
        });
    }

    // SIGHUP re-reads the TLS certificate and key; open connections keep
    // theirs, new handshakes use the new ones.
    if let Some(tls) = tls {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = hup.recv() => match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate"),
                    },
                }
            }
        });
    }

    // Public listeners.
    for (spec, listener) in listeners.public {
        clients.spawn(client::accept_loop(
            listener,
            spec,
            state.clone(),
            clients.clone(),
        ));
    }

    // Discovery: announce ourselves, learn our peers.
    let discovery_stop = CancellationToken::new();
    let (peers, _registers_up) = discovery::start(
        DiscoveryConfig {
            registers: state.config().register.clone(),
            secret: state.config().secret.as_bytes().to_vec(),
            role: Role::Gateway,
            node_id: gateway_id.to_string(),
            announce: Some(GatewayInfo {
                gateway_id: gateway_id.to_string(),
                internal_addr: advertise.clone(),
                public_urls,
            }),
            heartbeat: state.config().link_heartbeat(),
            connect_timeout: Duration::from_secs(3),
            tls: link_tls.clone(),
            report: None,
        },
        discovery_stop.clone(),
    );
    // Push API: a push client of the whole cluster (ourselves included).
    let api_stop = CancellationToken::new();
    let mut push_client = None;
    if let Some(api_listener) = listeners.api {
        tracing::info!(api = ?api_listener.local_addr().ok(), "push API listening");
        let mut builder = gw_worker::PushClient::builder()
            .secret(state.config().secret.clone())
            .name(format!("api-{gateway_id}"))
            .heartbeat(state.config().link_heartbeat())
            .link_tls_config(link_tls.clone());
        for r in &state.config().register {
            builder = builder.register(r.clone());
        }
        match builder.start_push() {
            Ok(client) => {
                tokio::spawn(api::serve(
                    api_listener,
                    state.clone(),
                    client.handle(),
                    api_stop.clone(),
                ));
                push_client = Some(client);
            }
            Err(e) => tracing::error!(error = %e, "push API not started"),
        }
    }
    let _ = ready.send(GatewayHandle {
        gateway_id,
        metrics: metrics.clone(),
        peers,
        state: state.clone(),
    });

    shutdown.cancelled().await;
    let grace = state.config().shutdown_grace();
    tracing::info!(gateway = %gateway_id, clients = state.hub.client_count(), "gateway stopping: closing clients");
    // Leave the register first so workers stop sending us new work.
    discovery_stop.cancel();
    api_stop.cancel();
    if let Some(p) = push_client {
        p.stop().await;
    }
    state.hub.close_all(codes::CLOSE_GOING_AWAY);
    clients.close();
    if tokio::time::timeout(grace, clients.wait()).await.is_err() {
        tracing::warn!("grace period over with clients still closing");
    }
    state.links_shutdown.cancel();
    links.close();
    if tokio::time::timeout(Duration::from_secs(2), links.wait())
        .await
        .is_err()
    {
        tracing::warn!("worker links did not close in time");
    }
    tracing::info!(gateway = %gateway_id, "gateway stopped");
    Ok(())
}

/// The address workers dial: the configured advertise address, with its
/// port filled in from the bound one when it is 0, or else the bound address.
fn advertise_addr(configured: Option<&str>, bound: SocketAddr) -> String {
    match configured {
        Some(a) => match a.rsplit_once(':') {
            Some((host, "0")) => format!("{host}:{}", bound.port()),
            _ => a.to_string(),
        },
        None => bound.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_fills_in_the_port() {
        let bound: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert_eq!(advertise_addr(Some("10.0.0.5:0"), bound), "10.0.0.5:4000");
        assert_eq!(
            advertise_addr(Some("10.0.0.5:2900"), bound),
            "10.0.0.5:2900"
        );
        assert_eq!(advertise_addr(None, bound), "0.0.0.0:4000");
    }
}
