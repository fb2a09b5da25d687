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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs `main` on a multi-thread runtime (`GW_THREADS` worker threads, by
/// default one per core).
pub fn run<F>(name: &str, main: F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("GW_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        rt.worker_threads(n);
    }
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
