//! `gw-register`: flags and config in, `gw_register::run` out.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gw_register::RegisterConfig;
use tokio_util::sync::CancellationToken;

/// gateworker register: tells workers and gateways where every gateway is.
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (link protocol v1)"))]
struct Cli {
    /// TOML config file; environment variables and flags override it.
    #[arg(long, env = "GW_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address HOST:PORT.
    #[arg(long, env = "GW_LISTEN")]
    listen: Option<String>,
    /// Cluster secret shared by every daemon.
    #[arg(long, env = "GW_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Drop a peer silent for this many ms.
    #[arg(long, env = "GW_PEER_TIMEOUT_MS")]
    peer_timeout_ms: Option<u64>,
    /// Admin listener HOST:PORT for /metrics and /healthz (off if unset).
    #[arg(long, env = "GW_METRICS")]
    metrics: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "GW_LOG_JSON")]
    log_json: bool,
}

fn load(cli: &Cli) -> anyhow::Result<RegisterConfig> {
    let mut config: RegisterConfig = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => RegisterConfig::default(),
    };
    if let Some(v) = &cli.listen {
        config.listen = v.clone();
    }
    if let Some(v) = &cli.secret {
        config.secret = v.clone();
    }
    if let Some(v) = &cli.metrics {
        config.metrics = Some(v.clone());
    }
    if let Some(v) = cli.peer_timeout_ms {
        config.peer_timeout_ms = v;
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = parse_cli();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gw-register: {e}");
            return ExitCode::from(64);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gw-register: binding {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    let metrics = match &config.metrics {
        Some(a) => match tokio::net::TcpListener::bind(a).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("gw-register: binding --metrics {a}: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => tracing::info!("SIGHUP: nothing to reload"),
            }
        }
        stop.cancel();
    });
    match gw_register::run_with_metrics(config, listener, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gw-register: {e}");
            ExitCode::from(64)
        }
    }
}

/// Parses flags; a flag error is a configuration error (exit 64), help and
/// version exit 0.
fn parse_cli() -> Cli {
    match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 64,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}
