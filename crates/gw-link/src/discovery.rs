//! The client side of the register: announce (gateways) and follow the
//! gateway list (everyone), against one or more registers.
//!
//! One task per register address keeps a session up, reconnecting with
//! [`Backoff`]. Each session's latest list is kept apart; the published list
//! is their union by gateway id, so with several registers none is a single
//! point of failure. A session that drops keeps its last list: a register
//! restart must not make workers forget gateways they are talking to (the
//! links themselves decide when a gateway is gone).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gw_protocol::pb::{self, link_frame::Body, GatewayInfo, Role};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{frame, handshake, Backoff};

/// The merged gateway list, newest first-seen order irrelevant: sorted by id.
pub type GatewayList = Arc<Vec<GatewayInfo>>;

/// How a node talks to the registers.
#[derive(Clone)]
pub struct DiscoveryConfig {
    pub registers: Vec<String>,
    pub secret: Vec<u8>,
    pub role: Role,
    pub node_id: String,
    /// Set for gateways: what to announce.
    pub announce: Option<GatewayInfo>,
    /// How often to ping the register; it drops us after 3 silent intervals.
    pub heartbeat: Duration,
    /// TLS for the register links (when the cluster uses it).
    pub tls: crate::LinkTls,
    /// Set for workers: a report sent on every heartbeat (for `gwctl status`).
    pub report: Option<Arc<dyn Fn() -> pb::WorkerReport + Send + Sync>>,
    pub connect_timeout: Duration,
}

/// Starts one session per register and returns the merged list and a watch
/// of how many registers are connected.
pub fn start(
    config: DiscoveryConfig,
    shutdown: CancellationToken,
) -> (watch::Receiver<GatewayList>, watch::Receiver<usize>) {
    let (list_tx, list_rx) = watch::channel(GatewayList::default());
    let (up_tx, up_rx) = watch::channel(0usize);
    let per_register = Arc::new(Mutex::new(vec![
        Option::<Vec<GatewayInfo>>::None;
        config.registers.len()
    ]));
    let list_tx = Arc::new(list_tx);
    let up_tx = Arc::new(up_tx);
    for (index, addr) in config.registers.iter().enumerate() {
        let session = Session {
            index,
            addr: addr.clone(),
            config: config.clone(),
            per_register: per_register.clone(),
            list_tx: list_tx.clone(),
            up_tx: up_tx.clone(),
        };
        tokio::spawn(session.run(shutdown.clone()));
    }
    (list_rx, up_rx)
}

struct Session {
    index: usize,
    addr: String,
    config: DiscoveryConfig,
    per_register: Arc<Mutex<Vec<Option<Vec<GatewayInfo>>>>>,
    list_tx: Arc<watch::Sender<GatewayList>>,
    up_tx: Arc<watch::Sender<usize>>,
}

impl Session {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.session() => r,
            };
            match result {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(register = %self.addr, error = %e, "register session failed")
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn publish(&self, list: Vec<GatewayInfo>) {
        let mut all = self.per_register.lock();
        all[self.index] = Some(list);
        let mut merged: BTreeMap<String, GatewayInfo> = BTreeMap::new();
        for g in all.iter().flatten().flatten() {
            merged
                .entry(g.gateway_id.clone())
                .or_insert_with(|| g.clone());
        }
        let merged: Vec<GatewayInfo> = merged.into_values().collect();
        self.list_tx.send_if_modified(|cur| {
            if **cur != merged {
                *cur = Arc::new(merged);
                true
            } else {
                false
            }
        });
    }

    async fn session(&self) -> Result<(), String> {
        let c = &self.config;
        let (mut link, register_id) = handshake::connect_with(
            &self.addr,
            &c.tls,
            &c.secret,
            c.role,
            &c.node_id,
            crate::DEFAULT_MAX_FRAME,
            c.connect_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(register = %self.addr, %register_id, "connected to register");
        if let Some(info) = &c.announce {
            link.feed(frame(Body::Announce(pb::Announce {
                gateway: Some(info.clone()),
            })))
            .await
            .map_err(|e| e.to_string())?;
        }
        link.send(frame(Body::Subscribe(pb::Subscribe {})))
            .await
            .map_err(|e| e.to_string())?;
        self.up_tx.send_modify(|n| *n += 1);
        let result = self.serve(&mut link).await;
        self.up_tx.send_modify(|n| *n -= 1);
        result
    }

    async fn serve(&self, link: &mut crate::FramedLink) -> Result<(), String> {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                f = link.next() => {
                    let f = match f {
                        None => return Err("register closed the link".into()),
                        Some(Err(e)) => return Err(e.to_string()),
                        Some(Ok(f)) => f,
                    };
                    last_heard = Instant::now();
                    match f.body {
                        Some(Body::GatewayList(l)) => self.publish(l.gateways),
                        Some(Body::Ping(p)) => {
                            link.send(frame(Body::Pong(pb::Pong { nonce: p.nonce }))).await.map_err(|e| e.to_string())?;
                        }
                        Some(Body::Pong(_)) => {}
                        Some(Body::Error(e)) => return Err(format!("register refused: code {}: {}", e.code, e.message)),
                        Some(Body::Goodbye(g)) => return Err(format!("register leaving: {}", g.reason)),
                        _ => return Err("unexpected frame from register".into()),
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > self.config.heartbeat * 3 {
                        return Err("register stopped answering".into());
                    }
                    let beat = match &self.config.report {
                        Some(report) => Body::WorkerReport(report()),
                        None => Body::Ping(pb::Ping { nonce: 0 }),
                    };
                    link.send(frame(beat)).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
}

/// Asks a register for the cluster as it sees it: gateways, and workers
/// with their latest reports.
pub async fn cluster_status(
    register: &str,
    secret: &[u8],
    timeout: Duration,
) -> Result<pb::StatusReply, String> {
    cluster_status_with(register, &crate::LinkTls::default(), secret, timeout).await
}

/// [`cluster_status`] over a link with the given TLS setting.
pub async fn cluster_status_with(
    register: &str,
    tls: &crate::LinkTls,
    secret: &[u8],
    timeout: Duration,
) -> Result<pb::StatusReply, String> {
    let (mut link, _) = crate::handshake::connect_with(
        register,
        tls,
        secret,
        Role::PushClient,
        &format!("status-{:08x}", rand::random::<u32>()),
        crate::DEFAULT_MAX_FRAME,
        timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    link.send(frame(Body::StatusRequest(pb::StatusRequest {})))
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(timeout, async {
        while let Some(f) = link.next().await {
            match f.map_err(|e| e.to_string())?.body {
                Some(Body::StatusReply(r)) => return Ok(r),
                Some(Body::Error(e)) => {
                    return Err(format!("register refused: {}: {}", e.code, e.message))
                }
                _ => continue,
            }
        }
        Err("register closed the link".to_string())
    })
    .await
    .map_err(|_| "register did not answer".to_string())?
}
