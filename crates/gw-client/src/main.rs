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
    /// Gateways, their addresses and connection counts (needs --register).
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

async fn client(cli: &Cli) -> Result<GatewayClient, ClientError> {
    if let Some(api) = &cli.api {
        let key = cli.api_key.clone().unwrap_or_default();
        return Ok(GatewayClient::http(api, &key));
    }
    if cli.register.is_empty() {
        return Err(ClientError::Invalid(
            "give --register and --secret, or --api and --api-key".into(),
        ));
    }
    GatewayClient::link(&cli.register, cli.secret.as_deref().unwrap_or_default()).await
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    let c = client(&cli).await?;
    match &cli.command {
        Cmd::Status => {
            let Some(h) = c.handle() else {
                return Err(ClientError::Invalid(
                    "status needs --register and --secret".into(),
                ));
            };
            let counts = h.client_count_per_gateway().await?;
            println!("{:<14} {:>11}", "GATEWAY", "CONNECTIONS");
            let mut total = 0;
            for (g, n) in &counts {
                println!("{:<14} {:>11}", g.to_string(), n);
                total += n;
            }
            println!(
                "{} gateway(s), {} connection(s), {} uid(s), {} group(s)",
                counts.len(),
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
    match run(parse_cli()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::Invalid(m)) => {
            eprintln!("gwctl: {m}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("gwctl: {e}");
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
