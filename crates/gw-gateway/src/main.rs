//! `gw-gateway`: flags and config in, `gw_gateway::run` out.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gw_gateway::{GatewayConfig, Listeners};
use tokio_util::sync::CancellationToken;

/// gateworker gateway: holds client connections and routes them to workers.
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (link protocol v1)"))]
struct Cli {
    /// TOML config file; environment variables and flags override it.
    #[arg(long, env = "GW_CONFIG")]
    config: Option<PathBuf>,
    /// Register address HOST:PORT (repeat for several registers).
    #[arg(long, env = "GW_REGISTER", value_delimiter = ',')]
    register: Vec<String>,
    /// Cluster secret shared by every daemon.
    #[arg(long, env = "GW_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Public listener URL: ws://, wss://, text:// or frame:// HOST:PORT (repeatable).
    #[arg(long, env = "GW_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Internal listener for worker links, HOST:PORT.
    #[arg(long, env = "GW_INTERNAL")]
    internal: Option<String>,
    /// Address workers dial for the internal listener, when it differs from --internal.
    #[arg(long, env = "GW_ADVERTISE")]
    advertise: Option<String>,
    /// Most client connections held at once.
    #[arg(long, env = "GW_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Client heartbeat interval in ms (0: off).
    #[arg(long, env = "GW_PING_INTERVAL_MS")]
    ping_interval_ms: Option<u64>,
    /// Missed heartbeat intervals before a silent client is closed.
    #[arg(long, env = "GW_PING_MISSED_LIMIT")]
    ping_missed_limit: Option<u32>,
    /// HTTP push API, /healthz, /readyz and /metrics listener, HOST:PORT (off if unset).
    #[arg(long, env = "GW_API")]
    api: Option<String>,
    /// Bearer token the push API requires.
    #[arg(long, env = "GW_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// PEM certificate chain for wss:// listeners (re-read on SIGHUP).
    #[arg(long, env = "GW_TLS_CERT")]
    tls_cert: Option<String>,
    /// PEM private key for wss:// listeners (re-read on SIGHUP).
    #[arg(long, env = "GW_TLS_KEY")]
    tls_key: Option<String>,
    /// TLS on internal links: this gateway's certificate (PEM).
    #[arg(long, env = "GW_LINK_TLS_CERT")]
    link_tls_cert: Option<String>,
    /// TLS on internal links: its private key (PEM).
    #[arg(long, env = "GW_LINK_TLS_KEY")]
    link_tls_key: Option<String>,
    /// TLS on internal links: CA certificate(s) to check the register and other gateways.
    #[arg(long, env = "GW_LINK_TLS_CA")]
    link_tls_ca: Option<String>,
    /// The name internal certificates carry (default gateworker).
    #[arg(long, env = "GW_LINK_TLS_NAME")]
    link_tls_name: Option<String>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "GW_LOG_JSON")]
    log_json: bool,
    /// Log filter (`info`, `warn,gw_gateway=debug`); default `RUST_LOG`, else `info`. Re-read on SIGHUP.
    #[arg(long, env = "GW_LOG_LEVEL")]
    log_level: Option<String>,
}

fn load(cli: &Cli) -> anyhow::Result<GatewayConfig> {
    let mut config: GatewayConfig = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => GatewayConfig::default(),
    };
    if !cli.register.is_empty() {
        config.register = cli.register.clone();
    }
    if let Some(s) = &cli.secret {
        config.secret = s.clone();
    }
    if !cli.listen.is_empty() {
        config.listen = cli.listen.clone();
    }
    if let Some(v) = &cli.internal {
        config.internal = v.clone();
    }
    if let Some(v) = &cli.advertise {
        config.advertise = Some(v.clone());
    }
    if let Some(v) = cli.max_connections {
        config.max_connections = v;
    }
    if let Some(v) = cli.ping_interval_ms {
        config.ping_interval_ms = v;
    }
    if let Some(v) = &cli.link_tls_cert {
        config.link_tls_cert = Some(v.clone());
    }
    if let Some(v) = &cli.link_tls_key {
        config.link_tls_key = Some(v.clone());
    }
    if let Some(v) = &cli.link_tls_ca {
        config.link_tls_ca = Some(v.clone());
    }
    if let Some(v) = &cli.link_tls_name {
        config.link_tls_name = v.clone();
    }
    if let Some(v) = &cli.tls_cert {
        config.tls_cert = Some(v.clone());
    }
    if let Some(v) = &cli.tls_key {
        config.tls_key = Some(v.clone());
    }
    if let Some(v) = &cli.api {
        config.api = Some(v.clone());
    }
    if let Some(v) = &cli.api_key {
        config.api_key = Some(v.clone());
    }
    if let Some(v) = cli.ping_missed_limit {
        config.ping_missed_limit = v;
    }
    if let Some(v) = &cli.log_level {
        config.log_level = v.clone();
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli: Cli = gw_daemon::parse_cli();
    gw_daemon::run("gw-gateway", async_main(cli))
}

async fn async_main(cli: Cli) -> ExitCode {
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gw-gateway: {e}");
            return ExitCode::from(gw_daemon::EXIT_CONFIG);
        }
    };
    let log = gw_daemon::init_logging(cli.log_json, &config.log_level);
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gw-gateway: {e}");
            return ExitCode::from(1);
        }
    };
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let gateway = tokio::spawn(gw_gateway::run_with(
        config,
        listeners,
        shutdown.clone(),
        ready_tx,
    ));
    // SIGHUP: re-read the config file, environment and flags, and apply
    // what can change at run time (the gateway itself reloads TLS).
    if let Ok(handle) = ready_rx.await {
        tokio::spawn(gw_daemon::signals(shutdown.clone(), move || {
            match load(&cli) {
                Ok(new) => match log
                    .set(&new.log_level)
                    .and_then(|_| handle.reload(new).map_err(|e| e.to_string()))
                {
                    Ok((changed, ignored)) => {
                        tracing::info!(?changed, "SIGHUP: configuration reloaded");
                        if !ignored.is_empty() {
                            tracing::warn!(?ignored, "SIGHUP: these settings only change with a restart; kept as they were");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: new configuration refused; keeping the old one")
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: new configuration refused; keeping the old one")
                }
            }
        }));
    }
    match gateway.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("gw-gateway: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("gw-gateway: {e}");
            ExitCode::from(1)
        }
    }
}
