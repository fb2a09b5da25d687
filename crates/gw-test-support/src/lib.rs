//! Real gateworker clusters for tests: a register, N gateways and M workers
//! started in-process on `127.0.0.1:0` (or the built binaries as separate
//! processes), plus a small WebSocket client. Nothing here is a mock.
#![forbid(unsafe_code)]

pub mod http;
pub mod process;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use gw_gateway::{GatewayConfig, GatewayHandle, Listeners};
use gw_register::RegisterConfig;
use gw_worker::{EventHandler, RunningWorker, Worker};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use ws::WsClient;

/// The secret test clusters use.
pub const SECRET: &str = "test-cluster-secret";

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A register running in this process.
pub struct RegisterNode {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RegisterNode {
    /// Starts a register on `addr` (use port 0 for a fresh one).
    pub async fn start(addr: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let config = RegisterConfig {
            listen: addr.to_string(),
            secret: SECRET.into(),
            peer_timeout_ms: 1_500,
            ..Default::default()
        };
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            gw_register::run(config, listener, stop)
                .await
                .expect("register failed");
        });
        Ok(RegisterNode {
            addr,
            shutdown,
            task,
        })
    }

    /// Stops it (its address can be reused for a restart).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A gateway running in this process.
pub struct GatewayNode {
    /// `ws://127.0.0.1:PORT` of the first public listener.
    pub ws_url: String,
    /// Every public listener URL (e.g. `text://...` too).
    pub urls: Vec<String>,
    pub internal_addr: SocketAddr,
    /// The push API address, if configured.
    pub api_addr: Option<SocketAddr>,
    pub handle: GatewayHandle,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl GatewayNode {
    /// The URL of the first listener with `scheme`.
    pub fn url(&self, scheme: &str) -> Option<&str> {
        self.urls
            .iter()
            .find(|u| u.starts_with(&format!("{scheme}://")))
            .map(String::as_str)
    }

    /// Stops it gracefully and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Number of worker links up.
    pub fn worker_links(&self) -> u64 {
        self.handle
            .metrics
            .worker_links
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A gateway config for tests: loopback, port 0, fast heartbeats.
pub fn gateway_config(registers: &[SocketAddr]) -> GatewayConfig {
    GatewayConfig {
        register: registers.iter().map(ToString::to_string).collect(),
        secret: SECRET.into(),
        listen: vec!["ws://127.0.0.1:0".into()],
        internal: "127.0.0.1:0".into(),
        link_heartbeat_ms: 300,
        shutdown_grace_ms: 3_000,
        ..Default::default()
    }
}

/// Starts a gateway with `config`.
pub async fn start_gateway(config: GatewayConfig) -> anyhow::Result<GatewayNode> {
    let listeners = Listeners::bind(&config).await?;
    let urls = listeners.public_urls();
    let internal_addr = listeners.internal_addr()?;
    let api_addr = listeners.api.as_ref().and_then(|l| l.local_addr().ok());
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        gw_gateway::run_with(config, listeners, stop, ready_tx)
            .await
            .expect("gateway failed");
    });
    let handle = ready_rx.await.context("gateway did not start")?;
    Ok(GatewayNode {
        ws_url: urls
            .iter()
            .find(|u| u.starts_with("ws://"))
            .cloned()
            .unwrap_or_default(),
        urls,
        internal_addr,
        api_addr,
        handle,
        shutdown,
        task,
    })
}

/// A worker builder pointed at `registers` with test timings.
pub fn worker_builder(registers: &[SocketAddr]) -> gw_worker::WorkerBuilder {
    let mut b = Worker::builder()
        .secret(SECRET)
        .heartbeat(Duration::from_millis(300))
        .query_timeout(Duration::from_secs(2))
        .drain_timeout(Duration::from_secs(5));
    for r in registers {
        b = b.register(r.to_string());
    }
    b
}

/// A register, gateways and workers, all in this process.
pub struct Cluster {
    pub register: Option<RegisterNode>,
    pub register_addr: SocketAddr,
    pub gateways: Vec<GatewayNode>,
    pub workers: Vec<RunningWorker>,
}

impl Cluster {
    /// A register and `gateways` gateways, with no worker yet.
    pub async fn start(gateways: usize) -> anyhow::Result<Self> {
        init_logging();
        let register = RegisterNode::start("127.0.0.1:0").await?;
        let register_addr = register.addr;
        let mut cluster = Cluster {
            register: Some(register),
            register_addr,
            gateways: Vec::new(),
            workers: Vec::new(),
        };
        for _ in 0..gateways {
            cluster
                .add_gateway(gateway_config(&[register_addr]))
                .await?;
        }
        Ok(cluster)
    }

    /// Adds a gateway and waits until the register lists it.
    pub async fn add_gateway(&mut self, config: GatewayConfig) -> anyhow::Result<usize> {
        let node = start_gateway(config).await?;
        let id = node.handle.gateway_id.to_string();
        let peers = node.handle.peers.clone();
        wait_until(
            Duration::from_secs(5),
            "the register to list the gateway",
            || {
                let listed = peers.borrow().iter().any(|g| g.gateway_id == id);
                async move { listed }
            },
        )
        .await?;
        self.gateways.push(node);
        Ok(self.gateways.len() - 1)
    }

    /// Adds a worker and waits until it is linked to every gateway (and
    /// every gateway sees it).
    pub async fn add_worker<H: EventHandler>(&mut self, handler: H) -> anyhow::Result<usize> {
        let before: Vec<u64> = self.gateways.iter().map(|g| g.worker_links()).collect();
        let worker = worker_builder(&[self.register_addr]).start(handler)?;
        let handle = worker.handle();
        let n = self.gateways.len();
        wait_until(
            Duration::from_secs(10),
            "the worker to link to every gateway",
            || {
                let ok = handle.connected_gateways().len() >= n;
                async move { ok }
            },
        )
        .await?;
        let gws = &self.gateways;
        wait_until(
            Duration::from_secs(10),
            "every gateway to see the worker",
            || {
                let ok = gws.iter().zip(&before).all(|(g, b)| g.worker_links() > *b);
                async move { ok }
            },
        )
        .await?;
        self.workers.push(worker);
        Ok(self.workers.len() - 1)
    }

    /// Stops everything gracefully.
    pub async fn stop(mut self) {
        for w in self.workers.drain(..) {
            w.stop().await;
        }
        for g in self.gateways.drain(..) {
            g.stop().await;
        }
        if let Some(r) = self.register.take() {
            r.stop().await;
        }
    }
}
