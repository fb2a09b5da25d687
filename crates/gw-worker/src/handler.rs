//! The trait a business worker implements, and what each hook receives.

use std::future::Future;

use gw_protocol::{ClientId, GatewayId, Payload};

use crate::handle::{Error, Handle};
use crate::session::Session;

/// Everything an event handler knows about the client the event is about.
pub struct Context {
    /// The client.
    pub client_id: ClientId,
    /// The client's address as the gateway saw it (`ip:port`).
    pub remote_addr: String,
    /// The gateway holding the client.
    pub gateway: GatewayId,
    /// This event was delivered before to a worker that died without
    /// acknowledging it (at-least-once delivery): make handling idempotent
    /// where it matters.
    pub redelivered: bool,
    /// The client's session; keys changed here are written back after the
    /// hook returns (only those keys).
    pub session: Session,
    handle: Handle,
}

impl Context {
    pub(crate) fn new(
        client_id: ClientId,
        remote_addr: String,
        redelivered: bool,
        session: Session,
        handle: Handle,
    ) -> Self {
        Context {
            gateway: client_id.gateway(),
            client_id,
            remote_addr,
            redelivered,
            session,
            handle,
        }
    }

    /// The cluster handle, for every other call.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Sends to the client this event is about (`sendToCurrentClient`).
    pub async fn reply(&self, msg: impl Into<Payload>) -> Result<(), Error> {
        self.handle.send_to_client(self.client_id, msg).await
    }
}

/// Why and how a client left.
#[derive(Debug, Clone)]
pub struct CloseInfo {
    /// Why the connection ended ("client closed", "heartbeat timeout", ...).
    pub reason: String,
    /// The uid it was bound to when it closed.
    pub uid: Option<String>,
    /// The groups it was in when it closed (it has already left them).
    pub groups: Vec<String>,
}

/// Your business logic. Only [`on_message`](EventHandler::on_message) is
/// required; every other hook by default does nothing.
///
/// Concurrency rule: the hooks for one client run one at a time, in the
/// order the client's events happened (connect, messages, close); hooks for
/// different clients run concurrently. See the crate docs.
pub trait EventHandler: Send + Sync + 'static {
    /// A message from a client (text or binary).
    fn on_message(&self, ctx: &mut Context, msg: Payload) -> impl Future<Output = ()> + Send;

    /// A client connected. By default this does nothing.
    fn on_connect(&self, ctx: &mut Context) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }

    /// A client is gone; sent exactly once per client seen connecting.
    /// By default this does nothing.
    fn on_close(&self, ctx: &mut Context, info: CloseInfo) -> impl Future<Output = ()> + Send {
        let _ = (ctx, info);
        async {}
    }

    /// The worker is connected to the cluster and about to take events.
    /// By default this does nothing.
    fn on_start(&self, handle: &Handle) -> impl Future<Output = ()> + Send {
        let _ = handle;
        async {}
    }

    /// The worker is stopping; events already delivered were handled.
    /// By default this does nothing.
    fn on_stop(&self, handle: &Handle) -> impl Future<Output = ()> + Send {
        let _ = handle;
        async {}
    }

    /// A gateway vanished without reporting its clients' closes (crash,
    /// network partition): clean up state keyed by its client ids.
    /// By default this does nothing.
    fn on_gateway_lost(
        &self,
        handle: &Handle,
        gateway: GatewayId,
    ) -> impl Future<Output = ()> + Send {
        let _ = (handle, gateway);
        async {}
    }
}
