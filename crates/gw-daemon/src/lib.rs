//! The parts of `main` every gateworker binary shares, so that they behave
//! the same: flag errors exit 64 (configuration error) while `--help` and
//! `--version` exit 0; logs go to stderr, human-readable or JSON, filtered
//! by `RUST_LOG`; `GW_THREADS` sets the runtime's worker threads; SIGTERM
//! and Ctrl-C start a graceful stop, SIGHUP calls a reload hook and never
//! kills the process.
#![forbid(unsafe_code)]

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Exit code for an invalid configuration (as linkerd does: EX_CONFIG).
pub const EXIT_CONFIG: u8 = 64;

/// Parses flags; a flag error exits 64, help and version exit 0.
pub fn parse_cli<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => i32::from(EXIT_CONFIG),
            };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

/// The filter for a `log_level` setting: the setting itself when given
/// (`info`, `warn,gw_gateway=debug`, ...), else `RUST_LOG`, else `info`.
fn log_filter(level: &str) -> Result<EnvFilter, String> {
    if level.trim().is_empty() {
        return Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    }
    EnvFilter::try_new(level).map_err(|e| format!("`{level}` is not a log filter: {e}"))
}

/// Checks a `log_level` setting (for `validate()`).
pub fn check_log_level(level: &str) -> Result<(), String> {
    log_filter(level).map(drop)
}

/// Changes the log filter of a running process (SIGHUP).
#[derive(Clone)]
pub struct LogControl(reload::Handle<EnvFilter, Registry>);

impl LogControl {
    /// Applies `level` (see [`init_logging`]); returns whether it changed.
    pub fn set(&self, level: &str) -> Result<bool, String> {
        let new = log_filter(level)?;
        let text = new.to_string();
        let mut changed = false;
        self.0
            .modify(|f| {
                changed = f.to_string() != text;
                *f = new;
            })
            .map_err(|e| e.to_string())?;
        Ok(changed)
    }
}

/// Logs to stderr, human-readable or JSON lines, filtered by `level` (the
/// daemon's `log_level` setting; empty = `RUST_LOG`, default `info`). The
/// filter can be changed later through the returned [`LogControl`].
pub fn init_logging(json: bool, level: &str) -> LogControl {
    let filter = log_filter(level).unwrap_or_else(|e| {
        eprintln!("log_level: {e}; using `info`");
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    LogControl(handle)
}

/// Runs `main` on a tokio runtime with `GW_THREADS` worker threads (by
/// default one per core).
///
/// `GW_THREADS=1` gives a current-thread runtime rather than a
/// multi-thread one with one worker: the multi-thread scheduler keeps at
/// most 256 woken tasks in its local queue and moves the rest to a shared
/// queue it visits only every few dozen polls, so when one fan-out wakes
/// a thousand connections some of them waited for many rounds (tens of
/// milliseconds). The current-thread queue is unbounded and strictly in
/// wake order.
pub fn run<F>(name: &str, main: F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let threads = std::env::var("GW_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let mut rt = if threads == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = threads {
            b.worker_threads(n);
        }
        b
    };
    match rt.enable_all().build() {
        Ok(rt) => rt.block_on(main),
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C; calls `on_hup` on SIGHUP.
pub async fn signals(shutdown: CancellationToken, on_hup: impl Fn() + Send + 'static) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => on_hup(),
        }
    }
    tracing::info!("signal received: stopping gracefully");
    shutdown.cancel();
}

/// Accept-queue length for listeners that do not configure their own.
///
/// `TcpListener::bind` asks for 128: a burst of a few hundred connects
/// (clients reconnecting after a restart) overflows it, and every SYN the
/// kernel drops costs that client a 1 s (then 3 s, 7 s) retransmit.
pub const DEFAULT_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` (`HOST:PORT`, resolved; the first address
/// that binds wins) with an accept queue of `backlog` connections. The
/// kernel caps the queue at `net.core.somaxconn`.
pub async fn bind_listener(addr: &str, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let mut last_err = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std does for listeners: a restarted daemon can bind its port
        // while connections of the previous one are still in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(backlog)) {
            Ok(l) => return Ok(l),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{addr}` resolves to no address"),
        )
    }))
}

#[cfg(test)]
mod listener_tests {
    use super::*;

    #[tokio::test]
    async fn bind_listener_binds_port_zero_and_accepts() {
        let l = bind_listener("127.0.0.1:0", 16).await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let (c, a) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        assert_eq!(a.unwrap().1, c.unwrap().local_addr().unwrap());
    }

    /// Nobody accepts here, so the kernel completes only as many connects
    /// as the queue holds; with std's 128 the rest would hang (their SYNs
    /// dropped) until the timeout.
    #[tokio::test]
    async fn the_accept_queue_holds_the_backlog_asked_for() {
        // The kernel caps the queue at somaxconn: a host set below 300 could
        // not hold it whatever we ask for.
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if somaxconn.is_some_and(|n| n < 300) {
            eprintln!("skipped: net.core.somaxconn is {somaxconn:?}, below 300");
            return;
        }
        let l = bind_listener("127.0.0.1:0", 512).await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..300 {
            connects.spawn(tokio::net::TcpStream::connect(addr));
        }
        let mut held = Vec::new();
        let all = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while let Some(r) = connects.join_next().await {
                held.push(r.unwrap().unwrap());
            }
        })
        .await;
        assert!(all.is_ok(), "only {} of 300 connects completed", held.len());
        drop(l);
    }

    #[tokio::test]
    async fn bind_listener_reports_an_address_in_use_and_bad_hosts() {
        let l = bind_listener("127.0.0.1:0", 16).await.unwrap();
        let taken = l.local_addr().unwrap().to_string();
        let e = bind_listener(&taken, 16).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(bind_listener("no-port-here", 16).await.is_err());
    }
}
