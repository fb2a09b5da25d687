//! Client-side plumbing shared by every scenario: loopback-only targets,
//! source-address spreading, connecting, the shared clock and /proc RSS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::proto::Inbound;

pub type Ws = WebSocketStream<TcpStream>;

/// How long a single connection may take from TCP connect to `welcome`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since a process-wide epoch. Senders stamp payloads with it
/// and receivers (in the same process) subtract it, so latency needs no
/// clock synchronisation.
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A validated `ws://` target on this machine.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

/// Parse `ws://HOST:PORT[/path]`, accepting only loopback hosts: the
/// generator must never send load off this machine.
pub fn parse_target(url: &str) -> Result<Target> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| {
        anyhow!("unsupported URL {url:?}: only plain ws:// URLs to loopback addresses are accepted")
    })?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| anyhow!("bad IPv6 host in {url:?}"))?;
        (h, p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port: u16 = match port {
        Some(p) => p.parse().with_context(|| format!("bad port in {url:?}"))?,
        None => 80,
    };
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse().map_err(|_| {
            anyhow!("refusing target {url:?}: host must be a literal loopback address (127.x.x.x, ::1) or localhost")
        })?
    };
    if !ip.is_loopback() {
        bail!(
            "refusing non-loopback target {url:?}: gw-bench only generates load against this machine (127.0.0.0/8 or ::1)"
        );
    }
    if port == 0 {
        bail!("port 0 in {url:?}");
    }
    Ok(Target {
        url: url.to_string(),
        addr: SocketAddr::new(ip, port),
    })
}

/// Source addresses 127.0.0.1..=127.0.0.N. Each has its own ~28k
/// ephemeral ports, so spreading clients over several lifts the limit on
/// connections to one server port.
pub fn source_addrs(n: usize, targets: &[Target]) -> Result<Vec<IpAddr>> {
    if n == 0 || n > 254 {
        bail!("--source-ips must be between 1 and 254");
    }
    let any_v6 = targets.iter().any(|t| t.addr.is_ipv6());
    if any_v6 {
        if targets.iter().any(|t| t.addr.is_ipv4()) {
            bail!("mixing IPv4 and IPv6 targets is not supported");
        }
        if n != 1 {
            bail!("--source-ips > 1 needs IPv4 targets (IPv6 loopback is a single address)");
        }
        return Ok(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    }
    Ok((1..=n as u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect())
}

/// Small per-connection buffers: the default 128 KiB read buffer would cost
/// ~12 GiB at 100k connections. Writes still batch up to `write` bytes
/// between flushes, which is all a window of small frames needs.
pub fn ws_config(read: usize, write: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read.max(256))
        .write_buffer_size(write)
        .max_write_buffer_size(usize::MAX)
}

/// Open a TCP connection from `src` (explicitly bound, so each source
/// address gets its own port range) and do the WebSocket handshake.
pub async fn connect(target: &Target, src: IpAddr, cfg: WebSocketConfig) -> Result<Ws> {
    let sock = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("socket")?;
    // Lets a new run reuse ports still in TIME_WAIT from the previous one.
    sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
    sock.bind(SocketAddr::new(src, 0))
        .with_context(|| format!("bind {src}"))?;
    let tcp = sock
        .connect(target.addr)
        .await
        .with_context(|| format!("connect {} from {src}", target.addr))?;
    // Frames are small and latency is what we measure: no Nagle delay.
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let (ws, _resp) =
        tokio_tungstenite::client_async_with_config(target.url.as_str(), tcp, Some(cfg))
            .await
            .with_context(|| format!("websocket handshake with {}", target.url))?;
    Ok(ws)
}

/// Next text frame; pings/pongs are skipped, anything else is an error.
pub async fn next_text(ws: &mut Ws) -> Result<tokio_tungstenite::tungstenite::Utf8Bytes> {
    loop {
        match ws.next().await {
            None => bail!("server closed the connection"),
            Some(Err(e)) => return Err(e).context("websocket read"),
            Some(Ok(Message::Text(t))) => return Ok(t),
            Some(Ok(Message::Close(c))) => bail!("server closed the connection: {c:?}"),
            Some(Ok(Message::Binary(_))) => bail!("unexpected binary frame"),
            Some(Ok(_)) => {}
        }
    }
}

/// Wait for the server's `welcome` and return the client id.
pub async fn expect_welcome(ws: &mut Ws) -> Result<String> {
    let text = tokio::time::timeout(WELCOME_TIMEOUT, next_text(ws))
        .await
        .map_err(|_| anyhow!("no welcome within {WELCOME_TIMEOUT:?}"))??;
    let m = Inbound::parse(&text)?;
    match (m.kind.as_ref(), m.client_id) {
        ("welcome", Some(id)) => Ok(id.into_owned()),
        _ => bail!("expected welcome, got {}", text.as_str()),
    }
}

/// Send `frames` (already-built text) and flush them as one write.
pub async fn send_all(ws: &mut Ws, frames: impl IntoIterator<Item = String>) -> Result<()> {
    for f in frames {
        ws.feed(Message::text(f)).await.context("websocket write")?;
    }
    ws.flush().await.context("websocket flush")?;
    Ok(())
}

/// Close politely (so the server, not us, holds TIME_WAIT) but never wait
/// long: the run is over and the figures are already taken.
pub async fn close_quietly(mut ws: Ws, farewell: Vec<String>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = send_all(&mut ws, farewell).await;
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// VmRSS of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))
}

/// Sum of VmRSS over `pids` in KiB.
pub fn rss_sum_kib(pids: &[String]) -> Result<u64> {
    pids.iter().map(|p| rss_kib(p)).sum()
}

/// Linux reports utime/stime in USER_HZ, which is 100 on every mainstream
/// architecture (it is fixed ABI, unlike the kernel's HZ).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds consumed so far by a process (all threads).
pub fn cpu_s(pid: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name may contain spaces and parentheses: fields are
    // counted from after the last ')'; utime and stime are fields 14 and 15,
    // i.e. the 12th and 13th after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad {path}"))?;
    let mut f = rest.split_whitespace().skip(11);
    let mut tick = || -> Result<u64> {
        f.next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("bad {path}"))
    };
    let (utime, stime) = (tick()?, tick()?);
    Ok((utime + stime) as f64 / USER_HZ)
}

/// CPU seconds summed over `pids`; `None` when no pid was given.
pub fn cpu_sum_s(pids: &[String]) -> Result<Option<f64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    pids.iter().map(|p| cpu_s(p)).sum::<Result<f64>>().map(Some)
}

/// CPU use between two readings as percent of one core.
pub fn cpu_pct(before: Option<f64>, after: Option<f64>, wall_s: f64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if wall_s > 0.0 => Some((a - b) / wall_s * 100.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        let t = parse_target("ws://127.0.0.1:8282").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8282".parse().unwrap());
        let t = parse_target("ws://127.3.4.5:1/chat?x=1").unwrap();
        assert_eq!(t.addr.port(), 1);
        let t = parse_target("ws://localhost:9000/").unwrap();
        assert!(t.addr.ip().is_loopback());
        let t = parse_target("ws://[::1]:9000").unwrap();
        assert!(t.addr.is_ipv6());
        assert_eq!(parse_target("ws://127.0.0.1/").unwrap().addr.port(), 80);
    }

    #[test]
    fn non_loopback_targets_are_refused() {
        for url in [
            "ws://10.0.0.1:8282",
            "ws://192.168.1.2:80",
            "ws://8.8.8.8:80",
            "ws://[2001:db8::1]:80",
            "ws://0.0.0.0:8282",
            "ws://example.com:80",
            "wss://127.0.0.1:443",
            "http://127.0.0.1:80",
        ] {
            let err = parse_target(url).unwrap_err().to_string();
            assert!(
                err.contains("refusing") || err.contains("only plain ws://"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn source_addresses_spread_over_loopback() {
        let t = vec![parse_target("ws://127.0.0.1:1").unwrap()];
        let s = source_addrs(3, &t).unwrap();
        assert_eq!(
            s,
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "127.0.0.2".parse().unwrap(),
                "127.0.0.3".parse().unwrap()
            ]
        );
        assert!(source_addrs(0, &t).is_err());
        let v6 = vec![parse_target("ws://[::1]:1").unwrap()];
        assert!(source_addrs(2, &v6).is_err());
    }

    #[test]
    fn rss_and_cpu_of_self_are_readable() {
        assert!(rss_kib("self").unwrap() > 0);
        let before = cpu_s("self").unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_s("self").unwrap() >= before);
        assert_eq!(cpu_sum_s(&[]).unwrap(), None);
        assert_eq!(cpu_pct(Some(1.0), Some(1.5), 1.0), Some(50.0));
    }
}
