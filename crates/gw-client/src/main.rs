//! `gwctl`: look at and push to a gateworker cluster.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gw_client::{ClientError, GatewayClient};

/// gateworker control: cluster status, pushes and queries.
///
/// Talk to the cluster through the register (`--register` and `--secret`:
/// internal links, full status) or through one gateway's push API (`--api`
/// and `--api-key`).
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (link protocol v1)"))]
struct Cli {
    /// Register address HOST:PORT (repeatable).
    #[arg(long, env = "GW_REGISTER", value_delimiter = ',')]
    register: Vec<String>,
    /// Cluster secret (with --register).
    #[arg(long, env = "GW_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// With --register, when the cluster serves TLS on internal links: the CA certificate(s) to trust (PEM).
    #[arg(long, env = "GW_LINK_TLS_CA")]
    link_tls_ca: Option<String>,
    /// Server name expected in the internal links' certificates.
    #[arg(long, env = "GW_LINK_TLS_NAME", default_value = "gateworker")]
    link_tls_name: String,
    /// Push API base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "GW_API_URL")]
    api: Option<String>,
    /// Push API key (with --api).
    #[arg(long, env = "GW_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Gateways (addresses, connections) and workers (events/s, handler latency), like `start.php status` (needs --register).
    Status,
    /// Clients online in the cluster.
    OnlineCount,
    /// Members of a group.
    GroupCount { group: String },
    /// Send a text message to a group.
    SendToGroup { group: String, message: String },
    /// Send a text message to every connection of a uid.
    SendToUid { uid: String, message: String },
    /// Send a text message to every client.
    SendToAll { message: String },
    /// Any push API method with JSON arguments (needs --api), e.g. `call get_uid_list '{}'`.
    Call { method: String, args: String },
}

async fn client(cli: &Cli, tls: &gw_link::LinkTls) -> Result<GatewayClient, ClientError> {
    if let Some(api) = &cli.api {
        let key = cli.api_key.clone().unwrap_or_default();
        return Ok(GatewayClient::http(api, &key));
    }
    if cli.register.is_empty() {
        return Err(ClientError::Invalid(
            "give --register and --secret, or --api and --api-key".into(),
        ));
    }
    GatewayClient::link_with(
        &cli.register,
        cli.secret.as_deref().unwrap_or_default(),
        tls.clone(),
    )
    .await
}

/// The internal links' TLS setting from `--link-tls-ca` (plain TCP without).
fn link_tls(cli: &Cli) -> Result<gw_link::LinkTls, ClientError> {
    match &cli.link_tls_ca {
        Some(ca) => gw_link::LinkTls::from_files(None, None, Some(ca), &cli.link_tls_name)
            .map_err(|e| ClientError::Invalid(format!("--link-tls-ca: {e}"))),
        None => Ok(gw_link::LinkTls::default()),
    }
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    // Read once: used by the links and by `status`'s register query.
    let tls = if cli.api.is_none() {
        link_tls(&cli)?
    } else {
        gw_link::LinkTls::default()
    };
    let c = client(&cli, &tls).await?;
    match &cli.command {
        Cmd::Status => {
            let Some(h) = c.handle() else {
                return Err(ClientError::Invalid(
                    "status needs --register and --secret".into(),
                ));
            };
            let secret = cli.secret.clone().unwrap_or_default();
            let status = gw_link::discovery::cluster_status_with(
                &cli.register[0],
                &tls,
                secret.as_bytes(),
                std::time::Duration::from_secs(5),
            )
            .await
            .map_err(ClientError::Unreachable)?;
            let counts = h.client_count_per_gateway().await?;
            println!(
                "{:<14} {:<22} {:>11}  PUBLIC",
                "GATEWAY", "INTERNAL", "CONNECTIONS"
            );
            let mut total = 0;
            for g in &status.gateways {
                let n = g
                    .gateway_id
                    .parse()
                    .ok()
                    .and_then(|id| counts.get(&id).copied());
                total += n.unwrap_or(0);
                let n = n.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
                println!(
                    "{:<14} {:<22} {:>11}  {}",
                    g.gateway_id,
                    g.internal_addr,
                    n,
                    g.public_urls.join(" ")
                );
            }
            println!();
            println!(
                "{:<20} {:>9} {:>12} {:>14} {:>8} {:>7}",
                "WORKER", "GATEWAYS", "EVENTS", "EVENTS/S", "MEAN MS", "PANICS"
            );
            for w in &status.workers {
                let Some(r) = &w.report else { continue };
                let mean_ms = if r.handler_count > 0 {
                    r.handler_seconds_sum * 1000.0 / r.handler_count as f64
                } else {
                    0.0
                };
                println!(
                    "{:<20} {:>9} {:>12} {:>14.1} {:>8.3} {:>7}",
                    r.worker_id,
                    r.gateways_linked,
                    r.events_total,
                    w.events_per_second,
                    mean_ms,
                    r.handler_panics
                );
            }
            println!();
            println!(
                "{} gateway(s), {} worker(s), {} connection(s), {} uid(s), {} group(s)",
                status.gateways.len(),
                status.workers.len(),
                total,
                h.get_uid_count().await?,
                h.get_group_id_list().await?.len()
            );
        }
        Cmd::OnlineCount => println!("{}", c.get_client_count().await?),
        Cmd::GroupCount { group } => println!("{}", c.get_client_count_by_group(group).await?),
        Cmd::SendToGroup { group, message } => {
            println!("delivered to {}", c.send_to_group(group, message).await?)
        }
        Cmd::SendToUid { uid, message } => {
            println!("delivered to {}", c.send_to_uid(uid, message).await?)
        }
        Cmd::SendToAll { message } => println!("delivered to {}", c.send_to_all(message).await?),
        Cmd::Call { method, args } => {
            let GatewayClient::Http(h) = &c else {
                return Err(ClientError::Invalid(
                    "call needs --api and --api-key".into(),
                ));
            };
            let args = serde_json::from_str(args)
                .map_err(|e| ClientError::Invalid(format!("args: {e}")))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&h.call(method, args).await?).unwrap_or_default()
            );
        }
    }
    c.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(gw_daemon::parse_cli()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::Invalid(m)) => {
            eprintln!("gwctl: {m}");
            ExitCode::from(gw_daemon::EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("gwctl: {e}");
            ExitCode::from(1)
        }
    }
}
