//! Client-side plumbing shared by every scenario: loopback-only targets,
//! source-address spreading, connecting, the shared clock and /proc RSS.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::proto::Inbound;
pub use crate::ws::Ws;

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
    /// `Host` header and request target of the upgrade request.
    pub host: String,
    pub path: String,
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
    let path = match &rest[authority.len()..] {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    Ok(Target {
        url: url.to_string(),
        addr: SocketAddr::new(ip, port),
        host: authority.to_string(),
        path,
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

/// Source ports tried per connection before giving up.
const PORT_TRIES: usize = 64;

/// Source addresses plus our own source-port allocation for each.
///
/// bind() with port 0 makes the kernel search for a free port, and that
/// search grows with the number of sockets already on the address: at 10k
/// connections from one address it cost seconds of system time and
/// hundreds of milliseconds per connect. Binding an explicit port is one
/// hash lookup, so each address gets a cursor over the ephemeral range;
/// a port that turns out to be taken (by anyone) is skipped.
#[derive(Debug)]
pub struct Sources {
    ips: Vec<IpAddr>,
    lo: u32,
    span: u32,
    cursors: Vec<AtomicU32>,
}

impl Sources {
    /// Addresses 127.0.0.1..=127.0.0.N (or ::1), ports from the kernel's
    /// ephemeral range starting at a per-run pseudo-random offset, so a new
    /// run does not start on the ports the last one left in TIME_WAIT.
    pub fn new(n: usize, targets: &[Target]) -> Result<Self> {
        let ips = source_addrs(n, targets)?;
        let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|v| v.parse::<u32>().ok());
                Some((it.next()??, it.next()??))
            })
            .filter(|(lo, hi)| lo < hi && *hi <= 65535)
            .unwrap_or((32768, 60999));
        let span = hi - lo + 1;
        let mut seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32);
        let cursors = ips
            .iter()
            .map(|_| AtomicU32::new((splitmix64(&mut seed) % span as u64) as u32))
            .collect();
        Ok(Sources {
            ips,
            lo,
            span,
            cursors,
        })
    }

    pub fn len(&self) -> usize {
        self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// Refuse up front a run that cannot fit in the available ports.
    pub fn check_capacity(&self, connections: usize) -> Result<()> {
        let per_ip = connections.div_ceil(self.ips.len());
        if per_ip as u64 > self.span as u64 * 9 / 10 {
            bail!(
                "{connections} connections over {} source address(es) need {per_ip} ports each, \
                 but the ephemeral range has {}: raise --source-ips",
                self.ips.len(),
                self.span
            );
        }
        Ok(())
    }

    fn next(&self, k: usize) -> SocketAddr {
        let off = self.cursors[k].fetch_add(1, Ordering::Relaxed) % self.span;
        SocketAddr::new(self.ips[k], (self.lo + off) as u16)
    }
}

/// A small fast PRNG step (SplitMix64): port offsets, handshake keys and
/// frame masks, none of which needs more.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-connection buffer sizes of the generator's client.
#[derive(Debug, Clone, Copy)]
pub struct WsOpts {
    /// Bytes fetched per read.
    pub read_buffer: usize,
    /// Write buffer capacity kept between bursts.
    pub write_buffer: usize,
}

pub fn ws_opts(read: usize, write: usize) -> WsOpts {
    WsOpts {
        read_buffer: read,
        write_buffer: write,
    }
}

/// Server-side (`gw-bench serve`) buffers: the default 128 KiB read buffer
/// would cost ~12 GiB at 100k connections. Writes still batch up to `write`
/// bytes between flushes, which is all a window of small frames needs.
pub fn ws_config(read: usize, write: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read.max(256))
        .write_buffer_size(write)
        .max_write_buffer_size(usize::MAX)
}

/// Open a TCP connection for client `i` from source address `i % N`
/// (explicitly bound, so each address has its own ports) and do the
/// WebSocket handshake.
pub async fn connect(target: &Target, sources: &Sources, i: usize, opts: WsOpts) -> Result<Ws> {
    let k = i % sources.ips.len();
    let mut last_err = None;
    let mut tcp = None;
    for _ in 0..PORT_TRIES {
        let src = sources.next(k);
        let sock = match target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .context("socket")?;
        // Lets a run reuse ports still in TIME_WAIT from the previous one;
        // a clash on the full 4-tuple is reported by connect and retried.
        sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
        match sock.bind(src) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("bind {src}")),
        }
        match sock.connect(target.addr).await {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable) => {
                last_err = Some(e);
            }
            Err(e) => return Err(e).with_context(|| format!("connect {} from {src}", target.addr)),
        }
    }
    let Some(tcp) = tcp else {
        bail!(
            "no free source port on {} after {PORT_TRIES} tries (last: {last_err:?})",
            sources.ips[k]
        );
    };
    // Frames are small and latency is what we measure: no Nagle delay.
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    Ws::handshake(
        tcp,
        &target.host,
        &target.path,
        opts.read_buffer,
        opts.write_buffer,
        i as u64 ^ now_ns().rotate_left(32),
    )
    .await
    .with_context(|| format!("websocket handshake with {}", target.url))
}

/// Next text frame; pings/pongs are skipped, anything else is an error.
pub async fn next_text(ws: &mut Ws) -> Result<String> {
    ws.next_text().await
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
        ws.feed_text(&f);
    }
    ws.flush().await
}

/// Close politely (so the server, not us, holds TIME_WAIT) but never wait
/// long: the run is over and the figures are already taken.
///
/// `farewell` frames (room leaves) go first, and their replies are awaited
/// before the close: a client that closes while still in a room makes the
/// chat server tell every other member (`gone`), and 10,000 members
/// closing at once would then queue 10,000 × 10,000 notices.
pub async fn close_quietly(mut ws: Ws, farewell: Vec<String>) {
    let replies = farewell.len();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if send_all(&mut ws, farewell).await.is_err() {
            return;
        }
        let mut seen = 0;
        while seen < replies {
            match ws.next_text().await {
                Ok(t) if Inbound::parse(&t).is_ok_and(|m| m.kind == "left") => seen += 1,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        let _ = ws.close().await;
        // Until the server's close or EOF (both end next_text with an error).
        while ws.next_text().await.is_ok() {}
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
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("127.3.4.5:1", "/chat?x=1")
        );
        let t = parse_target("ws://127.0.0.1:2?x=1").unwrap();
        assert_eq!(t.path, "/?x=1");
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
    fn source_ports_cycle_through_the_range() {
        let t = vec![parse_target("ws://127.0.0.1:1").unwrap()];
        let s = Sources::new(2, &t).unwrap();
        assert_eq!(s.len(), 2);
        let a = s.next(0);
        let b = s.next(0);
        assert_eq!(a.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(s.next(1).ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        let (pa, pb) = (a.port() as u32, b.port() as u32);
        assert!(pb == pa + 1 || pb == s.lo, "{pa} then {pb}");
        for _ in 0..2 * s.span {
            let p = s.next(0).port() as u32;
            assert!(p >= s.lo && p < s.lo + s.span);
        }
        assert!(s.check_capacity(2 * s.span as usize / 2).is_ok());
        assert!(s.check_capacity(4 * s.span as usize).is_err());
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
