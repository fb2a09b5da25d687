//! Pushing to a gateworker cluster from a Rust backend, two ways with the
//! same calls:
//!
//! * [`GatewayClient::link`]: the fast path. Discovers gateways through the
//!   register and keeps one authenticated link to each (a push client; it
//!   needs the cluster secret and the internal ports).
//! * [`GatewayClient::http`]: the HTTP push API of any one gateway (or a
//!   load balancer over them); needs only the API URL and key.
//!
//! ```no_run
//! # async fn f() -> Result<(), gw_client::ClientError> {
//! let client = gw_client::GatewayClient::http("http://127.0.0.1:8080", "api-key-0123456789");
//! client.bind_uid("a3f0c2d94e1b00000001", "alice").await?;
//! let delivered = client.send_to_uid("alice", "hello").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod http;

use std::time::Duration;

use gw_worker::{ClientId, Command, Handle, Payload, PushClient, RunningWorker};
use serde_json::{json, Value};

pub use http::HttpClient;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the cluster: {0}")]
    Unreachable(String),
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        missing_gateways: Vec<String>,
    },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error(transparent)]
    Cluster(#[from] gw_worker::Error),
}

/// A connection to the cluster for pushing and querying.
pub enum GatewayClient {
    /// Internal links to every gateway.
    Link(RunningWorker),
    /// The HTTP push API.
    Http(HttpClient),
}

fn cid(s: &str) -> Result<ClientId, ClientError> {
    s.parse()
        .map_err(|e: gw_protocol::ParseIdError| ClientError::Invalid(e.to_string()))
}

impl GatewayClient {
    /// Connects through the register(s) to every gateway.
    pub async fn link(registers: &[String], secret: &str) -> Result<Self, ClientError> {
        Self::link_with(registers, secret, gw_link::LinkTls::default()).await
    }

    /// [`Self::link`] with a TLS setting for the internal links (when the
    /// cluster serves TLS on its internal ports).
    pub async fn link_with(
        registers: &[String],
        secret: &str,
        tls: gw_link::LinkTls,
    ) -> Result<Self, ClientError> {
        let mut b = PushClient::builder()
            .secret(secret)
            .link_tls_config(tls)
            .query_timeout(Duration::from_secs(5));
        for r in registers {
            b = b.register(r.clone());
        }
        let running = b
            .connect()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        Ok(GatewayClient::Link(running))
    }

    /// Uses the HTTP push API at `base_url` (e.g. `http://10.0.0.5:8080`).
    pub fn http(base_url: &str, api_key: &str) -> Self {
        GatewayClient::Http(HttpClient::new(base_url, api_key))
    }

    /// The SDK handle, for the link mode (every Gateway API call).
    pub fn handle(&self) -> Option<Handle> {
        match self {
            GatewayClient::Link(r) => Some(r.handle()),
            GatewayClient::Http(_) => None,
        }
    }

    async fn command(
        &self,
        method: &str,
        args: Value,
        cmd: impl FnOnce() -> Result<Command, ClientError>,
    ) -> Result<u64, ClientError> {
        match self {
            GatewayClient::Link(r) => Ok(r.handle().execute(cmd()?).await?),
            GatewayClient::Http(h) => {
                let v = h.call(method, args).await?;
                Ok(v.get("delivered")
                    .or_else(|| v.get("affected"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0))
            }
        }
    }

    /// Sends to every connection of `uid`; returns how many received it.
    pub async fn send_to_uid(&self, uid: &str, data: &str) -> Result<u64, ClientError> {
        self.command("send_to_uid", json!({"uid": uid, "data": data}), || {
            Ok(Command::SendToUids {
                uids: vec![uid.into()],
                payload: Payload::text(data),
            })
        })
        .await
    }

    /// Sends to every member of `group`; returns how many received it.
    pub async fn send_to_group(&self, group: &str, data: &str) -> Result<u64, ClientError> {
        self.command(
            "send_to_group",
            json!({"group": group, "data": data}),
            || {
                Ok(Command::SendToGroups {
                    groups: vec![group.into()],
                    payload: Payload::text(data),
                    exclude: vec![],
                })
            },
        )
        .await
    }

    /// Sends to every client; returns how many received it.
    pub async fn send_to_all(&self, data: &str) -> Result<u64, ClientError> {
        self.command("send_to_all", json!({"data": data}), || {
            Ok(Command::SendToAll {
                payload: Payload::text(data),
                exclude: vec![],
            })
        })
        .await
    }

    /// Sends to one client.
    pub async fn send_to_client(&self, client_id: &str, data: &str) -> Result<u64, ClientError> {
        self.command(
            "send_to_client",
            json!({"client_id": client_id, "data": data}),
            || {
                Ok(Command::SendToClients {
                    client_ids: vec![cid(client_id)?],
                    payload: Payload::text(data),
                })
            },
        )
        .await
    }

    /// Binds a client to a uid.
    pub async fn bind_uid(&self, client_id: &str, uid: &str) -> Result<u64, ClientError> {
        self.command(
            "bind_uid",
            json!({"client_id": client_id, "uid": uid}),
            || {
                Ok(Command::BindUid {
                    client_id: cid(client_id)?,
                    uid: uid.into(),
                })
            },
        )
        .await
    }

    /// Adds a client to a group.
    pub async fn join_group(&self, client_id: &str, group: &str) -> Result<u64, ClientError> {
        self.command(
            "join_group",
            json!({"client_id": client_id, "group": group}),
            || {
                Ok(Command::JoinGroup {
                    client_id: cid(client_id)?,
                    group: group.into(),
                })
            },
        )
        .await
    }

    /// Clients online in the whole cluster.
    pub async fn get_client_count(&self) -> Result<u64, ClientError> {
        match self {
            GatewayClient::Link(r) => Ok(r.handle().get_client_count().await? as u64),
            GatewayClient::Http(h) => Ok(h.call("get_client_count", json!({})).await?["result"]
                .as_u64()
                .unwrap_or(0)),
        }
    }

    /// Members of `group` in the whole cluster.
    pub async fn get_client_count_by_group(&self, group: &str) -> Result<u64, ClientError> {
        match self {
            GatewayClient::Link(r) => Ok(r.handle().get_client_count_by_group(group).await? as u64),
            GatewayClient::Http(h) => Ok(h
                .call("get_client_count_by_group", json!({"group": group}))
                .await?["result"]
                .as_u64()
                .unwrap_or(0)),
        }
    }

    /// Closes the links (link mode).
    pub async fn close(self) {
        if let GatewayClient::Link(r) = self {
            r.stop().await;
        }
    }
}
