//! The gateway's configuration: one `serde(default)` struct, loaded from a
//! TOML file, then environment (`GW_...`), then flags (see `main.rs`), and
//! checked by [`GatewayConfig::validate`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A client protocol, named by a listener URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// WebSocket (`ws://host:port`).
    Ws,
    /// WebSocket over TLS (`wss://host:port`; needs `tls_cert` and `tls_key`).
    Wss,
    /// Newline-delimited text over TCP (`text://host:port`).
    Text,
    /// `u32` big-endian length-prefixed frames over TCP (`frame://host:port`).
    Frame,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Ws => "ws",
            Protocol::Wss => "wss",
            Protocol::Text => "text",
            Protocol::Frame => "frame",
        }
    }
}

/// A public listener: `ws://127.0.0.1:7272`, `text://0.0.0.0:7273`, ...
///
/// Heartbeat and size settings can be set per listener in the URL's query,
/// overriding the gateway-wide ones:
/// `text://0.0.0.0:7273?ping_interval_ms=30000&ping_missed_limit=3&ping_data={"type":"ping"}&max_message_bytes=4096`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub protocol: Protocol,
    pub addr: String,
    /// Per-listener overrides.
    pub options: ListenerOptions,
}

/// Per-listener overrides of gateway-wide settings (unset: the gateway's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerOptions {
    pub ping_interval_ms: Option<u64>,
    pub ping_missed_limit: Option<u32>,
    pub ping_data: Option<String>,
    pub max_message_bytes: Option<usize>,
}

impl ListenSpec {
    /// Largest client message on this listener.
    pub(crate) fn max_message_bytes(&self, cfg: &GatewayConfig) -> usize {
        self.options
            .max_message_bytes
            .unwrap_or(cfg.max_message_bytes)
    }

    /// Heartbeat interval on this listener (`None`: off).
    pub(crate) fn ping_interval(&self, cfg: &GatewayConfig) -> Option<Duration> {
        let ms = self
            .options
            .ping_interval_ms
            .unwrap_or(cfg.ping_interval_ms);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    pub(crate) fn ping_missed_limit(&self, cfg: &GatewayConfig) -> u32 {
        self.options
            .ping_missed_limit
            .unwrap_or(cfg.ping_missed_limit)
            .max(1)
    }

    pub(crate) fn ping_data(&self, cfg: &GatewayConfig) -> Option<String> {
        self.options
            .ping_data
            .clone()
            .or_else(|| cfg.ping_data.clone())
    }
}

impl FromStr for ListenSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, addr) = s.split_once("://").ok_or_else(|| {
            format!("`{s}`: expected SCHEME://HOST:PORT with scheme ws, wss, text or frame")
        })?;
        let protocol = match scheme {
            "ws" => Protocol::Ws,
            "wss" => Protocol::Wss,
            "text" => Protocol::Text,
            "frame" => Protocol::Frame,
            other => {
                return Err(format!(
                    "`{s}`: unknown scheme `{other}` (use ws, wss, text or frame)"
                ))
            }
        };
        let (addr, query) = addr.split_once('?').unwrap_or((addr, ""));
        let addr = addr.trim_end_matches('/');
        if addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("`{s}`: expected HOST:PORT after the scheme"));
        }
        let mut options = ListenerOptions::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = |what: &str| format!("`{s}`: `{k}` must be {what}, got `{v}`");
            match k {
                "ping_interval_ms" => options.ping_interval_ms = Some(v.parse().map_err(|_| bad("a number of ms"))?),
                "ping_missed_limit" => match v.parse::<u32>() {
                    Ok(n) if n > 0 => options.ping_missed_limit = Some(n),
                    _ => return Err(bad("at least 1")),
                },
                "ping_data" => options.ping_data = Some(v.to_string()),
                "max_message_bytes" => match v.parse::<usize>() {
                    Ok(n) if n > 0 => options.max_message_bytes = Some(n),
                    _ => return Err(bad("a number of bytes, at least 1")),
                },
                other => {
                    return Err(format!(
                        "`{s}`: unknown listener option `{other}` (ping_interval_ms, ping_missed_limit, ping_data, max_message_bytes)"
                    ))
                }
            }
        }
        Ok(ListenSpec {
            protocol,
            addr: addr.to_string(),
            options,
        })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.protocol.name(), self.addr)
    }
}

/// Everything a gateway can be told. Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Register addresses (host:port). Announce to all of them.
    pub register: Vec<String>,
    /// The cluster secret every internal link proves.
    pub secret: String,
    /// Public client listeners, e.g. `ws://0.0.0.0:7272`, `text://0.0.0.0:7273`.
    pub listen: Vec<String>,
    /// Internal listener for worker links (host:port). Loopback by default.
    pub internal: String,
    /// Address workers should dial for the internal listener, when it differs
    /// from the bind address (containers, NAT). Port 0 or unset: the bound port.
    pub advertise: Option<String>,
    /// Most client connections held at once; more are refused (WebSocket: 503).
    pub max_connections: usize,
    /// Accept queue of each listener (connections the kernel completes
    /// before the gateway accepts them). Capped by `net.core.somaxconn`.
    pub listen_backlog: u32,
    /// Messages queued per client before it is closed as a slow consumer.
    pub client_queue_messages: usize,
    /// Bytes queued per client before it is closed as a slow consumer.
    pub client_queue_bytes: usize,
    /// Largest client message (WebSocket message, text line or frame), bytes.
    pub max_message_bytes: usize,
    /// Time a client has to finish the protocol handshake, ms.
    pub handshake_timeout_ms: u64,
    /// Heartbeat interval, ms; 0 turns heartbeats off.
    pub ping_interval_ms: u64,
    /// Intervals without anything from a client before it is closed.
    pub ping_missed_limit: u32,
    /// Sent as an ordinary message instead of a WebSocket ping, if set (for
    /// clients and TCP protocols that want application-level pings).
    pub ping_data: Option<String>,
    /// Events queued per worker link before client readers wait.
    pub worker_queue: usize,
    /// Events a worker may hold unacknowledged.
    pub worker_inflight: usize,
    /// Largest internal link frame, bytes.
    pub link_max_frame: usize,
    /// Link heartbeat interval, ms (a peer silent for 3 intervals is dropped).
    pub link_heartbeat_ms: u64,
    /// Longest wait, ms, for the other workers to acknowledge that a join
    /// or bind gave this gateway a new group or uid before the next frame
    /// of the joining link (typically the reply to the client) is handled.
    /// A peer that misses it is logged, counted and not waited for until
    /// it catches up. 0 turns the wait off.
    pub interest_ack_timeout_ms: u64,
    /// Grace period for a graceful stop, ms.
    pub shutdown_grace_ms: u64,
    /// Largest WebSocket upgrade request (headers), bytes; more gets 431.
    pub max_header_bytes: usize,
    /// Proxies whose `X-Forwarded-For` / `X-Real-IP` are believed (IP addresses).
    pub trusted_proxies: Vec<String>,
    /// Allowed `Origin` values for WebSocket handshakes (e.g.
    /// `https://chat.example.com`); empty allows any. Others get 403.
    pub allowed_origins: Vec<String>,
    /// Ask a worker (`on_handshake`) before completing each WebSocket
    /// upgrade. Off: every upgrade is accepted at once.
    pub handshake_to_worker: bool,
    /// HTTP push API, health and metrics listener (HOST:PORT). Off if unset.
    pub api: Option<String>,
    /// Bearer token the push API requires. Required when `api` is set.
    pub api_key: Option<String>,
    /// Log filter (`info`, `warn,gw_gateway=debug`, ...); empty = `RUST_LOG`,
    /// else `info`. Changes on SIGHUP.
    pub log_level: String,
    /// Most messages per second one client may send (burst of the same
    /// size); beyond it the gateway reads from that client more slowly
    /// (TCP back-pressure, nothing dropped). 0 = no limit.
    pub client_rate_limit: u32,
    /// TLS on internal links: this gateway's certificate (PEM) for its
    /// internal listener. With `link_tls_key`.
    pub link_tls_cert: Option<String>,
    /// TLS on internal links: the private key for `link_tls_cert`.
    pub link_tls_key: Option<String>,
    /// TLS on internal links: CA certificate(s) (PEM) to check the register
    /// and other gateways against when dialing them.
    pub link_tls_ca: Option<String>,
    /// The name every internal certificate carries (checked when dialing).
    pub link_tls_name: String,
    /// PEM certificate chain for `wss` listeners (re-read on SIGHUP).
    pub tls_cert: Option<String>,
    /// PEM private key for `wss` listeners (re-read on SIGHUP).
    pub tls_key: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            register: vec!["127.0.0.1:1236".into()],
            secret: String::new(),
            listen: vec!["ws://127.0.0.1:7272".into()],
            internal: "127.0.0.1:2900".into(),
            advertise: None,
            max_connections: 200_000,
            listen_backlog: gw_daemon::DEFAULT_BACKLOG,
            client_queue_messages: 1024,
            client_queue_bytes: 1024 * 1024,
            max_message_bytes: 64 * 1024,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            ping_missed_limit: 2,
            ping_data: None,
            worker_queue: 1024,
            worker_inflight: 4096,
            link_max_frame: gw_protocol::frame::DEFAULT_MAX_FRAME,
            link_heartbeat_ms: 2_000,
            interest_ack_timeout_ms: 1_000,
            shutdown_grace_ms: 10_000,
            max_header_bytes: 8 * 1024,
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            handshake_to_worker: true,
            api: None,
            api_key: None,
            log_level: String::new(),
            tls_cert: None,
            tls_key: None,
            client_rate_limit: 0,
            link_tls_cert: None,
            link_tls_key: None,
            link_tls_ca: None,
            link_tls_name: "gateworker".into(),
        }
    }
}

/// A configuration that cannot work, with what to change.
#[derive(Debug, thiserror::Error)]
#[error("invalid gateway config: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl GatewayConfig {
    /// Checks the configuration; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = gw_daemon::check_log_level(&self.log_level) {
            return Err(bad("log_level", e));
        }
        if self.secret.len() < 8 {
            return Err(bad(
                "secret",
                "set a cluster secret of at least 8 characters (--secret or GW_SECRET)",
            ));
        }
        if self.register.is_empty() {
            return Err(bad(
                "register",
                "give at least one register address (--register HOST:PORT)",
            ));
        }
        if self.listen.is_empty() {
            return Err(bad(
                "listen",
                "give at least one public listener, e.g. --listen ws://0.0.0.0:7272",
            ));
        }
        for l in &self.listen {
            let spec = l.parse::<ListenSpec>().map_err(|e| bad("listen", e))?;
            if spec.protocol == Protocol::Wss && (self.tls_cert.is_none() || self.tls_key.is_none())
            {
                return Err(bad(
                    "tls_cert",
                    format!("listener {l} needs tls_cert and tls_key (PEM files)"),
                ));
            }
        }
        for (field, v) in [
            ("max_connections", self.max_connections),
            ("listen_backlog", self.listen_backlog as usize),
            ("client_queue_messages", self.client_queue_messages),
            ("client_queue_bytes", self.client_queue_bytes),
            ("max_message_bytes", self.max_message_bytes),
            ("worker_queue", self.worker_queue),
            ("worker_inflight", self.worker_inflight),
        ] {
            if v == 0 {
                return Err(bad(field, "must be greater than 0"));
            }
        }
        for p in &self.trusted_proxies {
            p.parse::<std::net::IpAddr>()
                .map_err(|_| bad("trusted_proxies", format!("`{p}` is not an IP address")))?;
        }
        if self.api.is_some() && self.api_key.as_deref().is_none_or(|k| k.len() < 16) {
            return Err(bad("api_key", "set an API key of at least 16 characters for the push API (--api-key or GW_API_KEY)"));
        }
        if self.link_tls_cert.is_some() != self.link_tls_key.is_some() {
            return Err(bad(
                "link_tls_cert",
                "set both link_tls_cert and link_tls_key, or neither",
            ));
        }
        if self.handshake_timeout_ms < 100 {
            return Err(bad("handshake_timeout_ms", "must be at least 100"));
        }
        if self.ping_interval_ms > 0 && self.ping_missed_limit == 0 {
            return Err(bad(
                "ping_missed_limit",
                "must be at least 1 when ping_interval_ms is set",
            ));
        }
        if self.register.iter().any(|r| r.trim().is_empty()) {
            return Err(bad("register", "an address is empty"));
        }
        if self.max_header_bytes < 1024 {
            return Err(bad("max_header_bytes", "must be at least 1024"));
        }
        if self.link_max_frame < 64 * 1024 {
            return Err(bad("link_max_frame", "must be at least 65536"));
        }
        if self.link_heartbeat_ms < 100 {
            return Err(bad("link_heartbeat_ms", "must be at least 100"));
        }
        if self.interest_ack_timeout_ms > 60_000 {
            return Err(bad(
                "interest_ack_timeout_ms",
                "must be at most 60000 (a join's reply waits that long for a stuck worker); 0 turns the wait off",
            ));
        }
        if self.interest_ack_timeout_ms > 0
            && self.interest_ack_timeout_ms >= self.handshake_timeout_ms
        {
            // An upgrade that binds or joins waits inside the handshake
            // timeout: a longer wait would be cut off by it, the late peer
            // never marked lagging, and every such upgrade refused.
            return Err(bad(
                "interest_ack_timeout_ms",
                "must be below handshake_timeout_ms (or 0 to turn the wait off)",
            ));
        }
        if let Some(a) = &self.advertise {
            if a.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(bad("advertise", format!("`{a}`: expected HOST:PORT")));
            }
        }
        Ok(())
    }

    pub(crate) fn listeners(&self) -> Vec<ListenSpec> {
        self.listen.iter().filter_map(|l| l.parse().ok()).collect()
    }

    pub(crate) fn trusted_proxy_ips(&self) -> Vec<std::net::IpAddr> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub(crate) fn link_heartbeat(&self) -> Duration {
        Duration::from_millis(self.link_heartbeat_ms)
    }

    /// The interest acknowledgement wait; `None` when off.
    pub(crate) fn interest_ack_timeout(&self) -> Option<Duration> {
        (self.interest_ack_timeout_ms > 0)
            .then(|| Duration::from_millis(self.interest_ack_timeout_ms))
    }

    pub(crate) fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_urls_parse_with_per_listener_options() {
        let l: ListenSpec = "text://0.0.0.0:7273?ping_interval_ms=100&ping_missed_limit=3&ping_data=hb&max_message_bytes=99"
            .parse()
            .unwrap();
        assert_eq!(l.protocol, Protocol::Text);
        assert_eq!(l.addr, "0.0.0.0:7273");
        assert_eq!(l.options.ping_interval_ms, Some(100));
        assert_eq!(l.options.ping_data.as_deref(), Some("hb"));
        let cfg = GatewayConfig::default();
        assert_eq!(l.max_message_bytes(&cfg), 99);
        assert_eq!(l.ping_missed_limit(&cfg), 3);
        let plain: ListenSpec = "ws://127.0.0.1:7272".parse().unwrap();
        assert_eq!(plain.max_message_bytes(&cfg), cfg.max_message_bytes);
        for bad in [
            "http://x:1",
            "ws://x",
            "ws://x:1?nope=1",
            "text://x:1?ping_missed_limit=0",
            "ws://x:1?max_message_bytes=big",
        ] {
            assert!(bad.parse::<ListenSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_interest_wait_must_fit_in_the_handshake_timeout() {
        let base = GatewayConfig {
            secret: "long-enough-secret".into(),
            ..GatewayConfig::default()
        };
        let with = |ack: u64, handshake: u64| GatewayConfig {
            interest_ack_timeout_ms: ack,
            handshake_timeout_ms: handshake,
            ..base.clone()
        };
        assert!(with(1_000, 10_000).validate().is_ok());
        assert!(with(0, 1_000).validate().is_ok());
        let err = with(1_000, 1_000).validate().unwrap_err().to_string();
        assert!(err.contains("interest_ack_timeout_ms"), "{err}");
        assert!(with(5_000, 2_000).validate().is_err());
    }
}
