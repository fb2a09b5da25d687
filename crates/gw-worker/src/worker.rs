//! Building and running a worker: discovery, one link per gateway, the
//! executor, and graceful drain.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gw_link::discovery::{self, DiscoveryConfig};
use gw_link::frame;
use gw_protocol::pb::{self, link_frame::Body, Role};
use gw_protocol::GatewayId;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;
use crate::handle::Handle;
use crate::handler::EventHandler;
use crate::{link, WorkerShared};

/// Entry point: `Worker::builder()`.
pub struct Worker;

impl Worker {
    /// Starts building a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder {
            registers: Vec::new(),
            secret: String::new(),
            name: None,
            query_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            role: Role::Worker,
            metrics_addr: None,
            tls: gw_link::LinkTls::default(),
            tls_error: None,
        }
    }
}

/// A client of the cluster that takes no events: for backends (and tools
/// like `gwctl`) that push to clients and query them through the internal
/// links, like GatewayWorker's GatewayClient but with one persistent link
/// per gateway.
///
/// ```no_run
/// # async fn f() -> anyhow::Result<()> {
/// let push = gw_worker::PushClient::builder()
///     .register("127.0.0.1:1236")
///     .secret("change-me-please")
///     .connect()
///     .await?;
/// push.handle().send_to_uid("u1", "hello").await?;
/// # Ok(()) }
/// ```
pub struct PushClient;

impl PushClient {
    /// Starts building a push client.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder {
            role: Role::PushClient,
            drain_timeout: Duration::from_millis(0),
            ..Worker::builder()
        }
    }
}

/// The handler of a push client: it never receives events.
struct NoEvents;

impl EventHandler for NoEvents {
    async fn on_message(&self, _ctx: &mut crate::Context, _msg: gw_protocol::Payload) {}
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker config: {0}")]
    Config(String),
    #[error("cluster unreachable: {0}")]
    Unreachable(String),
    #[error("cannot bind {0}")]
    Bind(String),
}

/// Settings of a worker; see each method.
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    registers: Vec<String>,
    secret: String,
    name: Option<String>,
    query_timeout: Duration,
    heartbeat: Duration,
    drain_timeout: Duration,
    role: Role,
    metrics_addr: Option<String>,
    tls: gw_link::LinkTls,
    /// A TLS file that did not load, reported by `start`.
    tls_error: Option<String>,
}

impl WorkerBuilder {
    /// For push clients: starts, and waits (up to `timeout`) until the
    /// register has been heard from and every listed gateway is linked.
    pub async fn connect_within(self, timeout: Duration) -> Result<RunningWorker, WorkerError> {
        let running = WorkerBuilder {
            role: Role::PushClient,
            ..self
        }
        .start(NoEvents)?;
        let handle = running.handle();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let known = handle.known_gateways();
            if !known.is_empty()
                && known
                    .iter()
                    .all(|g| handle.connected_gateways().contains(g))
            {
                return Ok(running);
            }
            if tokio::time::Instant::now() >= deadline {
                let msg = if known.is_empty() {
                    "no gateway listed: is the register reachable, and the secret right?"
                        .to_string()
                } else {
                    format!(
                        "not all gateways reachable: listed {known:?}, linked {:?}",
                        handle.connected_gateways()
                    )
                };
                running.stop().await;
                return Err(WorkerError::Unreachable(msg));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a push client without waiting for any gateway (links come up
    /// in the background as the register lists gateways).
    pub fn start_push(self) -> Result<RunningWorker, WorkerError> {
        WorkerBuilder {
            role: Role::PushClient,
            ..self
        }
        .start(NoEvents)
    }

    /// [`connect_within`](Self::connect_within) 5 seconds.
    pub async fn connect(self) -> Result<RunningWorker, WorkerError> {
        self.connect_within(Duration::from_secs(5)).await
    }

    /// A register address (HOST:PORT); call again for several registers.
    pub fn register(mut self, addr: impl Into<String>) -> Self {
        self.registers.push(addr.into());
        self
    }

    /// The cluster secret.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = secret.into();
        self
    }

    /// A name for logs (default: `worker-<random>`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How long a query waits for each gateway (default 5 s).
    pub fn query_timeout(mut self, t: Duration) -> Self {
        self.query_timeout = t;
        self
    }

    /// Link heartbeat interval (default 2 s; a link silent for 3 is dropped).
    pub fn heartbeat(mut self, t: Duration) -> Self {
        self.heartbeat = t;
        self
    }

    /// Dial every link with TLS, trusting the PEM certificate(s) in `ca`
    /// and expecting `name` in the peers' certificates (when the cluster
    /// serves TLS on its internal ports).
    pub fn link_tls(mut self, ca: &str, name: &str) -> Self {
        match gw_link::LinkTls::from_files(None, None, Some(ca), name) {
            Ok(t) => self.tls = t,
            Err(e) => self.tls_error = Some(e),
        }
        self
    }

    /// Use an already built TLS setting for every link.
    pub fn link_tls_config(mut self, tls: gw_link::LinkTls) -> Self {
        self.tls = tls;
        self
    }

    /// Serve `/metrics` (events, handler latency histogram, panics, links)
    /// and `/healthz` on this address (HOST:PORT).
    pub fn metrics(mut self, addr: impl Into<String>) -> Self {
        self.metrics_addr = Some(addr.into());
        self
    }

    /// Longest a graceful stop waits for delivered events (default 30 s).
    pub fn drain_timeout(mut self, t: Duration) -> Self {
        self.drain_timeout = t;
        self
    }

    fn validate(&self) -> Result<(), WorkerError> {
        if let Some(e) = &self.tls_error {
            return Err(WorkerError::Config(e.clone()));
        }
        if self.registers.is_empty() {
            return Err(WorkerError::Config(
                "register: give at least one register address".into(),
            ));
        }
        if self.heartbeat < Duration::from_millis(50) {
            return Err(WorkerError::Config(
                "heartbeat: must be at least 50 ms".into(),
            ));
        }
        if self.query_timeout.is_zero() {
            return Err(WorkerError::Config(
                "query_timeout: must be greater than 0".into(),
            ));
        }
        if self.registers.iter().any(|r| r.trim().is_empty()) {
            return Err(WorkerError::Config("register: an address is empty".into()));
        }
        if self.secret.len() < 8 {
            return Err(WorkerError::Config(
                "secret: set a cluster secret of at least 8 characters".into(),
            ));
        }
        Ok(())
    }

    /// Runs until SIGTERM or SIGINT, then drains gracefully.
    pub async fn run<H: EventHandler>(self, handler: H) -> Result<(), WorkerError> {
        let running = self.start(handler)?;
        let stop = running.stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received: draining");
            stop.cancel();
        });
        running.join().await;
        Ok(())
    }

    /// Starts the worker in the background.
    pub fn start<H: EventHandler>(self, handler: H) -> Result<RunningWorker, WorkerError> {
        self.validate()?;
        let node_id = self
            .name
            .clone()
            .unwrap_or_else(|| format!("worker-{:08x}", rand::random::<u32>()));
        let shared = Arc::new(WorkerShared {
            role: self.role,
            secret: self.secret.as_bytes().to_vec(),
            tls: self.tls.clone(),
            node_id: node_id.clone(),
            max_frame: gw_protocol::frame::DEFAULT_MAX_FRAME,
            link_queue: 4096,
            heartbeat: self.heartbeat,
            last_event_ms: Default::default(),
            started: std::time::Instant::now(),
            metrics: Default::default(),
        });
        if let Some(addr) = &self.metrics_addr {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| WorkerError::Bind(format!("metrics listener {addr}: {e}")))?;
            tracing::info!(metrics = ?listener.local_addr().ok(), "worker metrics listening");
            let m = shared.metrics.clone();
            tokio::spawn(gw_link::admin::serve(
                listener,
                move || {
                    let m = m.clone();
                    async move { m.render() }
                },
                CancellationToken::new(),
            ));
        }
        let stop = CancellationToken::new();
        let links_stop = CancellationToken::new();
        let discovery_stop = CancellationToken::new();
        let (known, _) = discovery::start(
            DiscoveryConfig {
                registers: self.registers.clone(),
                secret: shared.secret.clone(),
                role: self.role,
                node_id: node_id.clone(),
                announce: None,
                heartbeat: self.heartbeat,
                connect_timeout: Duration::from_secs(3),
                tls: self.tls.clone(),
                report: (self.role == Role::Worker).then(|| {
                    let m = shared.metrics.clone();
                    let id = node_id.clone();
                    Arc::new(move || m.report(&id))
                        as Arc<dyn Fn() -> pb::WorkerReport + Send + Sync>
                }),
            },
            discovery_stop.clone(),
        );
        let handle = Handle::new(known.clone(), self.query_timeout);
        let shared_metrics = shared.metrics.clone();
        let handler = Arc::new(handler);
        let executor = Executor::new(handler.clone(), handle.clone(), shared.metrics.clone());
        let drain_timeout = self.drain_timeout;

        let task = {
            let handle = handle.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tracing::info!(worker = %node_id, "worker starting");
                handler.on_start(&handle).await;
                let running: Arc<Mutex<HashSet<GatewayId>>> = Arc::default();
                let mut known = known;
                loop {
                    // Start a link for every listed gateway without one.
                    let list = known.borrow_and_update().clone();
                    for info in list.iter() {
                        let Ok(gateway) = info.gateway_id.parse::<GatewayId>() else {
                            continue;
                        };
                        if !running.lock().insert(gateway) {
                            continue;
                        }
                        let (shared, executor, handler, handle, links_stop, running) = (
                            shared.clone(),
                            executor.clone(),
                            handler.clone(),
                            handle.clone(),
                            links_stop.clone(),
                            running.clone(),
                        );
                        let info = info.clone();
                        tokio::spawn(async move {
                            link::run(info, gateway, shared, executor, handler, handle, links_stop)
                                .await;
                            running.lock().remove(&gateway);
                        });
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        r = known.changed() => if r.is_err() { break },
                    }
                }
                drain(&handle, &shared, &executor, drain_timeout).await;
                handler.on_stop(&handle).await;
                discovery_stop.cancel();
                links_stop.cancel();
                executor.close();
                // Give link actors a moment to flush acks and close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                tracing::info!(worker = %node_id, "worker stopped");
            })
        };
        Ok(RunningWorker {
            handle,
            stop,
            task,
            metrics: shared_metrics,
        })
    }
}

/// Graceful stop: tell every gateway we are leaving (they route new events
/// elsewhere), then handle everything already delivered, and acknowledge it.
async fn drain<H: EventHandler>(
    handle: &Handle,
    shared: &WorkerShared,
    executor: &Executor<H>,
    timeout: Duration,
) {
    let links: Vec<_> = handle.inner.links.read().values().cloned().collect();
    for l in &links {
        let _ =
            l.tx.send(frame(Body::Goodbye(pb::Goodbye {
                reason: "worker draining".into(),
            })))
            .await;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // Done when nothing is being handled and no event arrived for a while
    // (events the gateways sent before reading our goodbye are still coming).
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let quiet = shared.ms_since_last_event() > 300;
        if (executor.is_idle() && quiet) || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
}

/// A worker running in the background.
pub struct RunningWorker {
    handle: Handle,
    stop: CancellationToken,
    task: JoinHandle<()>,
    metrics: Arc<crate::WorkerMetrics>,
}

impl RunningWorker {
    /// The worker's counters.
    pub fn metrics(&self) -> Arc<crate::WorkerMetrics> {
        self.metrics.clone()
    }

    /// The worker's cluster handle.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// A token that, when cancelled, drains and stops the worker.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Drains gracefully and waits until the worker has stopped.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Waits until the worker stops.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

impl WorkerShared {
    pub(crate) fn note_event(&self) {
        self.last_event_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn ms_since_last_event(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64)
            .saturating_sub(self.last_event_ms.load(Ordering::Relaxed))
    }
}
