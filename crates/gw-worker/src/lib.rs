//! The gateworker business-worker SDK.
//!
//! Implement [`EventHandler`] (only `on_message` is required), then run it:
//!
//! ```no_run
//! use gw_worker::{Context, EventHandler, Payload, Worker};
//!
//! struct Echo;
//!
//! impl EventHandler for Echo {
//!     async fn on_message(&self, ctx: &mut Context, msg: Payload) {
//!         let _ = ctx.reply(msg).await;
//!     }
//! }
//!
//! # async fn main_() -> Result<(), gw_worker::WorkerError> {
//! Worker::builder()
//!     .register("127.0.0.1:1236")
//!     .secret("change-me-please")
//!     .run(Echo)
//!     .await
//! # }
//! ```
//!
//! The worker asks the register(s) where the gateways are, connects to every
//! one of them (and to those that come later), receives their clients'
//! events and sends commands back through a [`Handle`] — from a hook via
//! [`Context::handle`], or from any task via [`RunningWorker::handle`].
//!
//! # Ordering and concurrency
//!
//! * The hooks for **one client** run **one at a time, in order**: connect,
//!   then each message as the client sent it, then close. A hook that awaits
//!   delays that client's next event, nobody else's.
//! * Hooks for **different clients** run **concurrently** on the tokio
//!   runtime. Shared state in your handler needs its own synchronisation.
//! * A gateway routes all of a client's events to the same worker while that
//!   worker lives (sticky routing). When it dies, the client moves to another
//!   worker; events the dead worker had not finished are delivered again,
//!   with [`Context::redelivered`] set (at-least-once).
//! * Commands and queries to one gateway are applied in the order they were
//!   issued by this worker: after `bind_uid(..).await`, `is_uid_online` sees
//!   the binding (read-your-writes).
//! * Session changes made through [`Context::session`] are written back after
//!   the hook returns, key by key.
//! * A hook that panics is logged; the worker keeps running.
#![forbid(unsafe_code)]

mod executor;
mod handle;
mod handler;
mod link;
mod metrics;
mod session;
mod worker;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

pub use gw_protocol::{ClientId, GatewayId, HandshakeRequest, Payload};
pub use gw_protocol::{Command, Scope};
pub use handle::{Error, Handle};
pub use handler::{CloseInfo, Context, EventHandler, HandshakeDecision};
pub use metrics::WorkerMetrics;
pub use session::Session;
pub use worker::{PushClient, RunningWorker, Worker, WorkerBuilder, WorkerError};

/// Settings and clocks every link of one worker shares.
pub(crate) struct WorkerShared {
    /// `Worker` (takes events) or `PushClient` (commands and queries only).
    pub(crate) role: gw_protocol::pb::Role,
    pub(crate) secret: Vec<u8>,
    /// TLS for every link, when the cluster uses it.
    pub(crate) tls: gw_link::LinkTls,
    pub(crate) node_id: String,
    pub(crate) max_frame: usize,
    /// Outgoing frames queued per link before callers wait.
    pub(crate) link_queue: usize,
    pub(crate) heartbeat: Duration,
    last_event_ms: AtomicU64,
    started: Instant,
    pub(crate) metrics: std::sync::Arc<WorkerMetrics>,
}
