//! The trait a business worker implements, and what each hook receives.

use std::future::Future;

use gw_protocol::{ClientId, GatewayId, HandshakeRequest, Payload};

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
    /// The client protocol (`ws`, `text`, `frame`), on connect events only.
    pub protocol: Option<String>,
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
            protocol: None,
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

/// A worker's answer to a WebSocket handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeDecision {
    /// Complete the upgrade; the client starts bound to `uid` (if any) and
    /// in `groups`, with the session the hook set on its context.
    Accept {
        uid: Option<String>,
        groups: Vec<String>,
    },
    /// Refuse with an HTTP status (400–599) and a reason the client receives.
    Reject { status: u16, reason: String },
}

impl HandshakeDecision {
    /// Accept as is.
    pub fn accept() -> Self {
        HandshakeDecision::Accept {
            uid: None,
            groups: Vec::new(),
        }
    }

    /// Accept, bound to `uid`.
    pub fn uid(self, uid: impl Into<String>) -> Self {
        match self {
            HandshakeDecision::Accept { groups, .. } => HandshakeDecision::Accept {
                uid: Some(uid.into()),
                groups,
            },
            reject => reject,
        }
    }

    /// Accept, also in `group`.
    pub fn group(self, group: impl Into<String>) -> Self {
        match self {
            HandshakeDecision::Accept { uid, mut groups } => {
                groups.push(group.into());
                HandshakeDecision::Accept { uid, groups }
            }
            reject => reject,
        }
    }

    /// Refuse with `status` and `reason`.
    pub fn reject(status: u16, reason: impl Into<String>) -> Self {
        HandshakeDecision::Reject {
            status,
            reason: reason.into(),
        }
    }
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

    /// A WebSocket client asks to connect (path, query, headers, cookies in
    /// `req`, its real address in `ctx.remote_addr`). The upgrade waits for
    /// the answer, so authenticate here: a rejected client never exists for
    /// anyone, an accepted one starts with the uid, groups and session given.
    /// By default this accepts everyone.
    fn on_handshake(
        &self,
        ctx: &mut Context,
        req: &HandshakeRequest,
    ) -> impl Future<Output = HandshakeDecision> + Send {
        let _ = (ctx, req);
        async { HandshakeDecision::accept() }
    }

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

    /// The worker has started; gateway links come up in the background
    /// right after (a send from here may find no gateway yet). Spawn
    /// background jobs here. By default this does nothing.
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
