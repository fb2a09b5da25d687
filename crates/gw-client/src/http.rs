//! A small HTTP/1.1 client for the push API (one request per connection;
//! plain `http://` only — put TLS in front with a proxy if needed).

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ClientError;

/// The push API of one gateway (or a load balancer).
#[derive(Debug, Clone)]
pub struct HttpClient {
    host: String,
    key: String,
}

impl HttpClient {
    /// `base_url` like `http://127.0.0.1:8080`.
    pub fn new(base_url: &str, key: &str) -> Self {
        let host = base_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        HttpClient {
            host,
            key: key.to_string(),
        }
    }

    /// `POST /v1/<method>` with `args`; the JSON answer, or the API's error.
    pub async fn call(&self, method: &str, args: Value) -> Result<Value, ClientError> {
        let (status, body) = self
            .request("POST", &format!("/v1/{method}"), &args.to_string())
            .await?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Unreachable(format!("not a JSON answer ({status}): {e}")))?;
        if status == 200 {
            return Ok(v);
        }
        let e = &v["error"];
        Err(ClientError::Api {
            status,
            code: e["code"].as_str().unwrap_or("error").to_string(),
            message: e["message"].as_str().unwrap_or_default().to_string(),
            missing_gateways: e["missing_gateways"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|g| g.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// A GET (health, readiness, metrics): status and body text.
    pub async fn get(&self, path: &str) -> Result<(u16, String), ClientError> {
        let (status, body) = self.request("GET", path, "").await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let unreachable =
            |e: std::io::Error| ClientError::Unreachable(format!("{}: {e}", self.host));
        let mut s = TcpStream::connect(&self.host).await.map_err(unreachable)?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host,
            self.key,
            body.len()
        );
        s.write_all(req.as_bytes()).await.map_err(unreachable)?;
        let mut buf = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut buf))
            .await
            .map_err(|_| ClientError::Unreachable(format!("{}: no answer in 30 s", self.host)))?
            .map_err(unreachable)?;
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| ClientError::Unreachable("malformed HTTP answer".into()))?;
        let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ClientError::Unreachable("malformed HTTP status".into()))?;
        let mut body = buf[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            body = dechunk(&body)
                .ok_or_else(|| ClientError::Unreachable("bad chunked body".into()))?;
        }
        Ok((status, body))
    }
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..end]).ok()?.trim(), 16).ok()?;
        b = b.get(end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}
