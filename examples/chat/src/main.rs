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
    let cli = parse_cli();
    // GW_THREADS sets the runtime's worker threads (default: one per core).
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("GW_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        rt.worker_threads(n);
    }
    match rt.enable_all().build() {
        Ok(rt) => rt.block_on(async_main(cli)),
        Err(e) => {
            eprintln!("gw-chat: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn async_main(cli: Cli) -> ExitCode {
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
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("gw-chat: {e}");
            ExitCode::from(1)
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
