//! Command line: argument definitions and the process entry point.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::net::{TcpListener, TcpSocket};

use crate::client::{self, ws_config};
use crate::report::Report;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gw-bench",
    version,
    about = "Loopback-only load generator for gateworker's chat protocol",
    long_about = "Loopback-only load generator for gateworker's chat protocol. \
                  Every run is bounded by --duration-limit and stops by itself. \
                  Exit code: 0 all good, 1 loss/duplication/reordering or errors, 2 could not run."
)]
pub struct Cli {
    /// Tokio worker threads (generator, or server for `serve`). The
    /// reference figures use a one-thread generator.
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Open many idle connections at a given rate, hold them, measure connect time and server memory.
    Conns(ConnsArgs),
    /// R rooms of S members, K senders per room, closed loop: room broadcast throughput.
    Fanout(FanoutArgs),
    /// N clients each sending `echo` in a closed loop: round-trip throughput.
    Echo(EchoArgs),
    /// N clients each bound to uid u<i>, whispering to u<(i+1)%N>: uid routing throughput.
    Whisper(WhisperArgs),
    /// Run a trivial in-process chat server (to measure the generator's own ceiling).
    Serve(ServeArgs),
}

/// Options every load scenario takes.
#[derive(Args, Debug, Clone)]
pub struct CommonOpts {
    /// Target gateway URL (repeatable; clients are spread round-robin). Loopback only.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8282")]
    pub urls: Vec<String>,

    /// Spread client sockets over source addresses 127.0.0.1..127.0.0.N
    /// (each has ~28k ephemeral ports).
    #[arg(long, default_value_t = 1)]
    pub source_ips: usize,

    /// Hard limit on the whole run in seconds; the run stops by itself and
    /// reports what it has (as a failure if incomplete).
    #[arg(long, default_value_t = 120.0)]
    pub duration_limit: f64,

    /// Also write a JSON report to PATH (`-` = stdout; the table then goes to stderr).
    #[arg(long)]
    pub json: Option<String>,

    /// Connections in handshake at once (TCP connect until `welcome`).
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Bytes read per call on each connection (its read buffer while reading).
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,

    /// Write buffer capacity a connection keeps between bursts, bytes (a
    /// window of frames is always written with one call).
    #[arg(long, default_value_t = 4096)]
    pub write_buffer: usize,

    /// After the last expected delivery, keep reading this long to catch
    /// late duplicates before closing.
    #[arg(long, default_value_t = 200)]
    pub linger_ms: u64,

    /// Server process id (repeatable): VmRSS is summed before and after,
    /// CPU time over the measured phase.
    #[arg(long = "pid")]
    pub pids: Vec<String>,

    /// Also report distinct deliveries per interval of this many ms over
    /// the measured phase (0 = off): shows warm-up, pipeline bubbles and
    /// stalls that a mean rate hides. Costs the generator 8 bytes per
    /// delivery.
    #[arg(long, default_value_t = 0)]
    pub timeline_ms: u64,
}

impl CommonOpts {
    /// Defaults with the given target URL, for library users and tests.
    pub fn for_url(url: &str) -> Self {
        CommonOpts {
            urls: vec![url.to_string()],
            source_ips: 1,
            duration_limit: 120.0,
            json: None,
            connect_concurrency: 256,
            read_buffer: 4096,
            write_buffer: 4096,
            linger_ms: 200,
            pids: Vec::new(),
            timeline_ms: 0,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub common: CommonOpts,
    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub count: usize,
    /// Connection attempts per second (0 = as fast as --connect-concurrency allows).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds to hold all connections open once established.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonOpts,
    /// Number of rooms.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Members per room (each member is one connection).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Senders per room (the first K members).
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 100)]
    pub messages: u64,
    /// Unacknowledged messages a sender may have in flight (acknowledged =
    /// the sender received its own `said`).
    #[arg(long, default_value_t = 16)]
    pub window: u64,
    /// Size of the `text` JSON value in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Connection attempts per second during setup (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: CommonOpts,
    /// Number of clients.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Echo requests per client.
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Requests a client may have in flight.
    #[arg(long, default_value_t = 8)]
    pub window: u64,
    /// Size of the `text` JSON value in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Connection attempts per second during setup (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

#[derive(Args, Debug, Clone)]
pub struct WhisperArgs {
    #[command(flatten)]
    pub common: CommonOpts,
    /// Number of clients (client i logs in as u<i>).
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Whispers per client.
    #[arg(long, default_value_t = 100)]
    pub messages: u64,
    /// Whispers a client may have in flight (acknowledged = the target
    /// connection received it; both ends are in this process).
    #[arg(long, default_value_t = 16)]
    pub window: u64,
    /// Size of the `text` JSON value in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Connection attempts per second during setup (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (loopback only; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8282")]
    pub listen: SocketAddr,
    /// Stop serving after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub duration_limit: f64,
    /// WebSocket read buffer per connection, bytes.
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// WebSocket write buffer per connection, bytes.
    #[arg(long, default_value_t = 4096)]
    pub write_buffer: usize,
}

/// Bind a loopback listener with a deep accept backlog, so a burst of
/// connects is queued rather than refused.
pub fn bind_loopback(addr: SocketAddr) -> Result<TcpListener> {
    if !addr.ip().is_loopback() {
        bail!("refusing to listen on non-loopback address {addr}: gw-bench serve is for loopback benchmarks only");
    }
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr).with_context(|| format!("bind {addr}"))?;
    Ok(sock.listen(4096)?)
}

async fn run_serve(a: &ServeArgs) -> Result<()> {
    let listener = bind_loopback(a.listen)?;
    let local = listener.local_addr()?;
    // On stdout so scripts can pick up the port and pid.
    println!("listening ws://{local} pid {}", std::process::id());
    let cfg = ws_config(a.read_buffer, a.write_buffer);
    tokio::select! {
        r = crate::server::serve_with_config(listener, cfg) => r,
        _ = tokio::time::sleep(Duration::from_secs_f64(a.duration_limit)) => {
            eprintln!("gw-bench serve: duration limit of {}s reached, stopping", a.duration_limit);
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Run one parsed command; `None` for `serve`, which has no report.
pub async fn run(cli: &Cli) -> Result<Option<(Report, Option<String>)>> {
    let (mut report, json) = match &cli.command {
        Command::Serve(a) => {
            run_serve(a).await?;
            return Ok(None);
        }
        Command::Conns(a) => (crate::conns::run_conns(a).await?, a.common.json.clone()),
        Command::Fanout(a) => (crate::load::run_fanout(a).await?, a.common.json.clone()),
        Command::Echo(a) => (crate::load::run_echo(a).await?, a.common.json.clone()),
        Command::Whisper(a) => (crate::load::run_whisper(a).await?, a.common.json.clone()),
    };
    report.threads = cli.threads;
    Ok(Some((report, json)))
}

/// Process entry point: 0 = passed, 1 = ran but found loss/dup/reorder or
/// errors, 2 = could not run.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Pin the latency epoch before anything is stamped.
    client::now_ns();
    // One thread = the current-thread scheduler: its run queue is
    // unbounded and in wake order, where a one-worker multi-thread runtime
    // would move all but 256 of the connections a burst wakes to a queue
    // it polls rarely (which showed as a tail of tens of milliseconds).
    let mut builder = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cli.threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gw-bench: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let res = rt.block_on(run(&cli));
    // Server tasks (serve) or stragglers must not keep the process alive.
    rt.shutdown_timeout(Duration::from_secs(1));
    match res {
        Err(e) => {
            eprintln!("gw-bench: error: {e:#}");
            ExitCode::from(2)
        }
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some((report, json))) => {
            let table = report.table();
            match json.as_deref() {
                Some("-") => eprint!("{table}"),
                _ => print!("{table}"),
            }
            if let Some(path) = json.as_deref() {
                if let Err(e) = report.write_json(path) {
                    eprintln!("gw-bench: error: {e:#}");
                    return ExitCode::from(2);
                }
            }
            match report.failure() {
                None => ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("gw-bench: FAILED: {why}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
