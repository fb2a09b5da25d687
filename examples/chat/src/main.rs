//! `gw-chat`: the chat demo worker (run any number of copies).

use std::process::ExitCode;

use clap::Parser;
use gw_chat::Chat;
use gw_worker::Worker;

/// gateworker chat demo worker.
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (link protocol v1)"))]
struct Cli {
    /// Register address HOST:PORT (repeat for several registers).
    #[arg(long, env = "GW_REGISTER", value_delimiter = ',', required = true)]
    register: Vec<String>,
    /// Cluster secret shared by every daemon.
    #[arg(long, env = "GW_SECRET", hide_env_values = true)]
    secret: String,
    /// Worker name for logs.
    #[arg(long, env = "GW_NAME")]
    name: Option<String>,
    /// Also serve the chat web page on this address (HOST:PORT).
    #[arg(long, env = "GW_WEB")]
    web: Option<String>,
    /// TLS on internal links: CA certificate(s) (PEM) to check the register and gateways.
    #[arg(long, env = "GW_LINK_TLS_CA")]
    link_tls_ca: Option<String>,
    /// The name internal certificates carry.
    #[arg(long, env = "GW_LINK_TLS_NAME", default_value = "gateworker")]
    link_tls_name: String,
    /// Serve /metrics and /healthz on this address (HOST:PORT).
    #[arg(long, env = "GW_METRICS")]
    metrics: Option<String>,
    /// Require this token in the WebSocket URL (`?token=...`) at connect time.
    #[arg(long, env = "GW_CHAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "GW_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli: Cli = gw_daemon::parse_cli();
    gw_daemon::run("gw-chat", async_main(cli))
}

async fn async_main(cli: Cli) -> ExitCode {
    gw_daemon::init_logging(cli.log_json, "");
    if let Some(addr) = &cli.web {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(addr = ?l.local_addr().ok(), "serving the chat page");
                tokio::spawn(gw_chat::web::serve(l));
            }
            Err(e) => {
                eprintln!("gw-chat: binding --web {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let mut builder = Worker::builder().secret(cli.secret);
    for r in cli.register {
        builder = builder.register(r);
    }
    if let Some(n) = cli.name {
        builder = builder.name(n);
    }
    if let Some(ca) = &cli.link_tls_ca {
        builder = builder.link_tls(ca, &cli.link_tls_name);
    }
    if let Some(m) = cli.metrics {
        builder = builder.metrics(m);
    }
    let result = match cli.token {
        Some(token) => builder.run(gw_chat::TokenChat { token }).await,
        None => builder.run(Chat).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ gw_worker::WorkerError::Config(_)) => {
            eprintln!("gw-chat: {e}");
            ExitCode::from(gw_daemon::EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("gw-chat: {e}");
            ExitCode::from(1)
        }
    }
}
