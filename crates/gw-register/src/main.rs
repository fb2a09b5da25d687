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
    /// TLS on internal links: the register's certificate (PEM).
    #[arg(long, env = "GW_LINK_TLS_CERT")]
    link_tls_cert: Option<String>,
    /// TLS on internal links: its private key (PEM).
    #[arg(long, env = "GW_LINK_TLS_KEY")]
    link_tls_key: Option<String>,
    /// Admin listener HOST:PORT for /metrics and /healthz (off if unset).
    #[arg(long, env = "GW_METRICS")]
    metrics: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "GW_LOG_JSON")]
    log_json: bool,
    /// Log filter (`info`, `warn,gw_register=debug`); default `RUST_LOG`, else `info`. Re-read on SIGHUP.
    #[arg(long, env = "GW_LOG_LEVEL")]
    log_level: Option<String>,
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
    if let Some(v) = &cli.link_tls_cert {
        config.link_tls_cert = Some(v.clone());
    }
    if let Some(v) = &cli.link_tls_key {
        config.link_tls_key = Some(v.clone());
    }
    if let Some(v) = &cli.metrics {
        config.metrics = Some(v.clone());
    }
    if let Some(v) = cli.peer_timeout_ms {
        config.peer_timeout_ms = v;
    }
    if let Some(v) = &cli.log_level {
        config.log_level = v.clone();
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli: Cli = gw_daemon::parse_cli();
    gw_daemon::run("gw-register", async_main(cli))
}

async fn async_main(cli: Cli) -> ExitCode {
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gw-register: {e}");
            return ExitCode::from(gw_daemon::EXIT_CONFIG);
        }
    };
    let log = gw_daemon::init_logging(cli.log_json, &config.log_level);
    let listener = match gw_daemon::bind_listener(&config.listen, gw_daemon::DEFAULT_BACKLOG).await
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gw-register: binding {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    let metrics = match &config.metrics {
        Some(a) => match gw_daemon::bind_listener(a, gw_daemon::DEFAULT_BACKLOG).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("gw-register: binding --metrics {a}: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let shutdown = CancellationToken::new();
    // SIGHUP: the log filter is the one setting a register changes at run
    // time (everything else is an address or the secret).
    tokio::spawn(gw_daemon::signals(shutdown.clone(), move || {
        match load(&cli)
            .map_err(|e| e.to_string())
            .and_then(|c| log.set(&c.log_level))
        {
            Ok(changed) => {
                tracing::info!(log_level_changed = changed, "SIGHUP: configuration re-read")
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: new configuration refused; keeping the old one")
            }
        }
    }));
    match gw_register::run_with_metrics(config, listener, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gw-register: {e}");
            ExitCode::from(gw_daemon::EXIT_CONFIG)
        }
    }
}
