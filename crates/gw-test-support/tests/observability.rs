//! Metrics of every daemon, scraped over HTTP as Prometheus would.

use std::time::Duration;

use gw_chat::Chat;
use gw_register::RegisterConfig;
use gw_test_support::http::request;
use gw_test_support::process::free_port;
use gw_test_support::{
    gateway_config, start_gateway, wait_until, worker_builder, WsClient, SECRET,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

async fn scrape(addr: &str) -> String {
    match request(addr, "GET", "/metrics", &[], b"").await {
        Ok(r) => String::from_utf8_lossy(&r.body).into_owned(),
        Err(e) => format!("error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_gateway_and_worker_expose_prometheus_metrics() -> anyhow::Result<()> {
    gw_test_support::init_logging();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reg_addr = listener.local_addr()?;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reg_metrics = metrics.local_addr()?.to_string();
    let stop = CancellationToken::new();
    let config = RegisterConfig {
        listen: reg_addr.to_string(),
        secret: SECRET.into(),
        ..Default::default()
    };
    let reg = tokio::spawn(gw_register::run_with_metrics(
        config,
        listener,
        Some(metrics),
        stop.clone(),
    ));

    let mut cfg = gateway_config(&[reg_addr]);
    cfg.api = Some("127.0.0.1:0".into());
    cfg.api_key = Some("observability-api-key".into());
    let gw = start_gateway(cfg).await?;
    let gw_api = gw.api_addr.unwrap().to_string();
    let worker_metrics = format!("127.0.0.1:{}", free_port());
    let w = worker_builder(&[reg_addr])
        .metrics(worker_metrics.clone())
        .start(Chat)?;
    let h = w.handle();
    wait_until(Duration::from_secs(10), "the worker link", || {
        let n = h.connected_gateways().len();
        async move { n == 1 }
    })
    .await?;

    let (mut a, _) = WsClient::connect_chat(&gw.ws_url).await?;
    a.send_json(json!({"type":"echo","text":"x"})).await?;
    a.recv_json().await?;
    a.ws.close(None).await?;

    let m = worker_metrics.clone();
    let r = wait_until(Duration::from_secs(5), "worker metrics", || {
        let m = m.clone();
        async move {
            let t = scrape(&m).await;
            t.contains("gateworker_worker_events_total{kind=\"message\"} 1")
                && t.contains("gateworker_worker_events_total{kind=\"close\"} 1")
                && t.contains("gateworker_worker_handler_duration_seconds_count 4")
                && t.contains("gateworker_worker_gateway_links 1")
        }
    })
    .await;
    if let Err(e) = r {
        anyhow::bail!("{e}: {}", scrape(&worker_metrics).await);
    }
    let g = scrape(&gw_api).await;
    assert!(
        g.contains("gateworker_gateway_connections_closed_by_reason_total{reason=\"client\"} 1"),
        "{g}"
    );
    assert!(
        g.contains("gateworker_gateway_client_messages_in_total 1"),
        "{g}"
    );
    assert!(g.contains("gateworker_gateway_worker_links 1"), "{g}");
    // Queue depths (counted in hub unit tests): nothing waits once idle.
    for gauge in [
        "gateworker_gateway_client_queue_messages 0",
        "gateworker_gateway_client_queue_bytes 0",
        "gateworker_gateway_client_queue_max_messages 0",
        "gateworker_gateway_link_queue_events 0",
    ] {
        assert!(g.contains(gauge), "{gauge} missing: {g}");
    }
    let r = scrape(&reg_metrics).await;
    assert!(r.contains("gateworker_register_gateways 1"), "{r}");
    assert!(
        r.contains("gateworker_register_gateway_joins_total 1"),
        "{r}"
    );
    w.stop().await;
    gw.stop().await;
    stop.cancel();
    let _ = reg.await;
    Ok(())
}
