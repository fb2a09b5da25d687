//! `wss` listeners: TLS from PEM files, reloaded on SIGHUP without dropping
//! connections.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gw_chat::Chat;
use gw_test_support::{gateway_config, Cluster};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for localhost: (cert PEM, key PEM, cert DER).
fn self_signed() -> anyhow::Result<(String, String, CertificateDer<'static>)> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    Ok((
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().clone(),
    ))
}

async fn connect(
    addr: &str,
    trust: &CertificateDer<'static>,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>>
{
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (ws, _) = tokio_tungstenite::client_async("wss://localhost/", tls).await?;
    Ok(ws)
}

async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> anyhow::Result<Value>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))??
        {
            Message::Text(t) => return Ok(serde_json::from_str(&t)?),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_clients_and_reloads_its_certificate_on_sighup() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("gw-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (cert1, key1, der1) = self_signed()?;
    std::fs::write(&cert_path, cert1)?;
    std::fs::write(&key_path, key1)?;

    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.listen = vec!["wss://127.0.0.1:0".into()];
    cfg.tls_cert = Some(cert_path.to_string_lossy().into());
    cfg.tls_key = Some(key_path.to_string_lossy().into());
    c.add_gateway(cfg).await?;
    c.add_worker(Chat).await?;
    let addr = c.gateways[0]
        .url("wss")
        .unwrap()
        .trim_start_matches("wss://")
        .to_string();

    let mut a = connect(&addr, &der1).await?;
    assert_eq!(next_json(&mut a).await?["type"], "welcome");
    a.send(Message::Text(
        json!({"type":"echo","text":1}).to_string().into(),
    ))
    .await?;
    assert_eq!(next_json(&mut a).await?, json!({"type":"echo","text":1}));

    // New certificate on disk, SIGHUP: new handshakes use it, the open
    // connection carries on.
    let (cert2, key2, der2) = self_signed()?;
    std::fs::write(&cert_path, cert2)?;
    std::fs::write(&key_path, key2)?;
    std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()?;
    let mut reloaded = false;
    for _ in 0..50 {
        if connect(&addr, &der2).await.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the new certificate was not served after SIGHUP");
    assert!(
        connect(&addr, &der1).await.is_err(),
        "the old certificate is still served"
    );
    a.send(Message::Text(
        json!({"type":"echo","text":2}).to_string().into(),
    ))
    .await?;
    assert_eq!(next_json(&mut a).await?, json!({"type":"echo","text":2}));
    c.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_wss_listener_without_a_certificate_is_a_config_error() {
    let mut cfg = gateway_config(&["127.0.0.1:1".parse().unwrap()]);
    cfg.listen = vec!["wss://127.0.0.1:0".into()];
    let err = cfg.validate().unwrap_err();
    assert_eq!(err.field, "tls_cert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_links_can_run_over_tls() -> anyhow::Result<()> {
    gw_test_support::init_logging();
    let dir = std::env::temp_dir().join(format!("gw-link-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ck = rcgen::generate_simple_self_signed(vec!["gateworker".to_string()])?;
    let (cert, key) = (dir.join("link.pem"), dir.join("link.key"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    let (cert_s, key_s) = (
        cert.to_string_lossy().to_string(),
        key.to_string_lossy().to_string(),
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reg = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let rc = gw_register::RegisterConfig {
        listen: reg.to_string(),
        secret: gw_test_support::SECRET.into(),
        link_tls_cert: Some(cert_s.clone()),
        link_tls_key: Some(key_s.clone()),
        ..Default::default()
    };
    let register = tokio::spawn(gw_register::run(rc, listener, stop.clone()));
    let mut cfg = gateway_config(&[reg]);
    cfg.link_tls_cert = Some(cert_s.clone());
    cfg.link_tls_key = Some(key_s.clone());
    cfg.link_tls_ca = Some(cert_s.clone());
    let gw = gw_test_support::start_gateway(cfg).await?;
    let w = gw_test_support::worker_builder(&[reg])
        .link_tls(&cert_s, "gateworker")
        .start(Chat)?;
    let h = w.handle();
    gw_test_support::wait_until(Duration::from_secs(10), "the worker's TLS link", || {
        let n = h.connected_gateways().len();
        async move { n == 1 }
    })
    .await?;
    let (mut a, _) = gw_test_support::WsClient::connect_chat(&gw.ws_url).await?;
    a.send_json(json!({"type":"echo","text":"over tls links"}))
        .await?;
    assert_eq!(
        a.recv_json().await?,
        json!({"type":"echo","text":"over tls links"})
    );
    // gwctl over the TLS links: `status` and a push work with the CA, and
    // fail (exit 1, reason on stderr) without it.
    let gwctl = gw_test_support::process::bin_path("gwctl");
    let reg_s = reg.to_string();
    let base = ["--register", &reg_s, "--secret", gw_test_support::SECRET];
    let with_ca = tokio::process::Command::new(&gwctl)
        .args(base)
        .args(["--link-tls-ca", &cert_s, "status"])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&with_ca.stdout);
    assert!(
        with_ca.status.success(),
        "gwctl status over TLS: {with_ca:?}"
    );
    assert!(
        stdout.contains("GATEWAY") && stdout.contains(&gw.handle.gateway_id.to_string()),
        "{stdout}"
    );
    let push = tokio::process::Command::new(&gwctl)
        .args(base)
        .args(["--link-tls-ca", &cert_s, "send-to-all", "hello over tls"])
        .output()
        .await?;
    assert!(
        push.status.success(),
        "gwctl send-to-all over TLS: {push:?}"
    );
    assert_eq!(
        a.recv(Duration::from_secs(5)).await?.into_text()?.as_str(),
        "hello over tls"
    );
    let without = tokio::process::Command::new(&gwctl)
        .args(base)
        .arg("status")
        .output()
        .await?;
    assert_eq!(without.status.code(), Some(1), "{without:?}");
    // A worker that does not speak TLS gets nowhere.
    let plain = gw_test_support::worker_builder(&[reg]).start(Chat)?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(plain.handle().connected_gateways().is_empty());
    assert!(plain.handle().known_gateways().is_empty());
    plain.stop().await;
    w.stop().await;
    gw.stop().await;
    stop.cancel();
    let _ = register.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
