//! A WebSocket test client with JSON helpers.

use std::time::Duration;

use anyhow::{anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A connected client.
pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// Default wait for an expected message.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

impl WsClient {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(WsClient { ws })
    }

    /// Connects and returns the client with the `client_id` of its welcome
    /// (chat protocol).
    pub async fn connect_chat(url: &str) -> anyhow::Result<(Self, String)> {
        let mut c = Self::connect(url).await?;
        let welcome = c.recv_json().await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        let id = welcome["client_id"]
            .as_str()
            .ok_or_else(|| anyhow!("welcome without client_id: {welcome}"))?
            .to_string();
        Ok((c, id))
    }

    pub async fn send_json(&mut self, v: Value) -> anyhow::Result<()> {
        self.ws.send(Message::Text(v.to_string().into())).await?;
        Ok(())
    }

    pub async fn send_text(&mut self, s: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(s.into())).await?;
        Ok(())
    }

    /// The next message, skipping pings and pongs.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no message within {timeout:?}"))?
                .ok_or_else(|| anyhow!("connection closed"))??;
            match m {
                Message::Ping(_) | Message::Pong(_) => continue,
                m => return Ok(m),
            }
        }
    }

    /// The next text message as JSON.
    pub async fn recv_json(&mut self) -> anyhow::Result<Value> {
        match self.recv(RECV_TIMEOUT).await? {
            Message::Text(t) => Ok(serde_json::from_str(&t)?),
            other => bail!("expected a text message, got {other:?}"),
        }
    }

    /// Receives until a message with `"type": kind`, returning it (skips others).
    pub async fn recv_type(&mut self, kind: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = match self.recv(left).await? {
                Message::Text(t) => serde_json::from_str::<Value>(&t)?,
                _ => continue,
            };
            if m["type"] == kind {
                return Ok(m);
            }
        }
    }

    /// Asserts nothing (but pings) arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) -> anyhow::Result<()> {
        match self.recv(quiet).await {
            Err(_) => Ok(()),
            Ok(m) => bail!("expected silence, got {m:?}"),
        }
    }

    /// Waits for the server's close frame and returns its code.
    pub async fn recv_close(&mut self) -> anyhow::Result<u16> {
        loop {
            match self.recv(RECV_TIMEOUT).await? {
                Message::Close(Some(f)) => return Ok(f.code.into()),
                Message::Close(None) => return Ok(1005),
                _ => continue,
            }
        }
    }
}
