//! The WebSocket opening handshake, done by hand so that the upgrade can
//! wait for a worker's decision (accept with session/uid/groups, or reject
//! with an HTTP status the client sees), with a cap on header size and an
//! origin allow-list checked before anything else happens.

use std::net::{IpAddr, SocketAddr};

use super::tls::ClientStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// A parsed upgrade request.
#[derive(Debug)]
pub(crate) struct UpgradeRequest {
    pub(crate) path: String,
    pub(crate) query: String,
    /// Lower-case names, in order.
    pub(crate) headers: Vec<(String, String)>,
    key: String,
    /// Bytes the client sent after the request (rare; kept, not lost).
    pub(crate) leftover: Vec<u8>,
}

impl UpgradeRequest {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request is refused at the HTTP level.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Reads and checks the upgrade request; at most `max_bytes` of headers.
pub(crate) async fn read_request(
    stream: &mut ClientStream,
    max_bytes: usize,
) -> Result<UpgradeRequest, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| refuse(400, format!("read failed: {e}")))?;
        if n == 0 {
            return Err(refuse(400, "connection closed during the handshake"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return check(&req, buf[len..].to_vec()),
            Ok(httparse::Status::Partial) if buf.len() > max_bytes => {
                return Err(refuse(431, "request headers too large"))
            }
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many headers")),
            Err(e) => return Err(refuse(400, format!("malformed HTTP request: {e}"))),
        }
    }
}

fn check(req: &httparse::Request<'_, '_>, leftover: Vec<u8>) -> Result<UpgradeRequest, Refusal> {
    if req.method != Some("GET") {
        return Err(refuse(405, "WebSocket upgrade needs GET"));
    }
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let has_token = |name: &str, token: &str| {
        get(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(refuse(
            426,
            "this is a WebSocket endpoint: send an Upgrade: websocket request",
        ));
    }
    if get("sec-websocket-version") != Some("13") {
        return Err(refuse(426, "unsupported Sec-WebSocket-Version (need 13)"));
    }
    let key = get("sec-websocket-key")
        .filter(|k| !k.is_empty())
        .ok_or_else(|| refuse(400, "missing Sec-WebSocket-Key"))?
        .to_string();
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(UpgradeRequest {
        path: path.to_string(),
        query: query.to_string(),
        headers,
        key,
        leftover,
    })
}

/// Sends an HTTP error response and closes.
pub(crate) async fn respond_refusal(stream: &mut ClientStream, r: &Refusal) {
    let reason: String = r.reason.chars().filter(|c| !c.is_control()).collect();
    let phrase = match r.status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Refused",
    };
    let body = format!("{reason}\n");
    let resp = format!(
        "HTTP/1.1 {} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        r.status,
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Completes the upgrade (101).
pub(crate) async fn respond_upgrade(
    stream: &mut ClientStream,
    req: &UpgradeRequest,
) -> std::io::Result<()> {
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(req.key.as_bytes())
    );
    stream.write_all(resp.as_bytes()).await
}

/// The client's real address: the peer, unless the peer is a trusted
/// proxy, then the nearest untrusted hop of `X-Forwarded-For`, else
/// `X-Real-IP`.
pub(crate) fn real_remote_addr(
    peer: SocketAddr,
    req: &UpgradeRequest,
    trusted: &[IpAddr],
) -> String {
    if !trusted.contains(&peer.ip()) {
        return peer.to_string();
    }
    if let Some(xff) = req.header("x-forwarded-for") {
        let hops: Vec<IpAddr> = xff
            .split(',')
            .filter_map(|h| h.trim().parse().ok())
            .collect();
        if let Some(ip) = hops
            .iter()
            .rev()
            .find(|ip| !trusted.contains(ip))
            .or(hops.first())
        {
            return SocketAddr::new(*ip, 0).to_string();
        }
    }
    if let Some(ip) = req
        .header("x-real-ip")
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
    {
        return SocketAddr::new(ip, 0).to_string();
    }
    peer.to_string()
}
