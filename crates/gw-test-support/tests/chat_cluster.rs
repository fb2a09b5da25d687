//! The chat demo end to end: a register, two gateways and two workers in
//! this process, real WebSocket clients spread over both gateways.

use std::time::Duration;

use gw_chat::Chat;
use gw_test_support::{Cluster, WsClient};
use serde_json::json;

async fn cluster() -> anyhow::Result<Cluster> {
    let mut c = Cluster::start(2).await?;
    c.add_worker(Chat).await?;
    c.add_worker(Chat).await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_and_whispers_cross_gateways_and_workers() -> anyhow::Result<()> {
    let c = cluster().await?;
    let (mut a, a_id) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    let (mut b, b_id) = WsClient::connect_chat(&c.gateways[1].ws_url).await?;
    let (mut outsider, _) = WsClient::connect_chat(&c.gateways[1].ws_url).await?;
    assert_ne!(a_id, b_id);
    assert_eq!(&a_id[..12], &c.gateways[0].handle.gateway_id.to_string());
    assert_eq!(&b_id[..12], &c.gateways[1].handle.gateway_id.to_string());

    for (cl, room) in [(&mut a, "r1"), (&mut b, "r1")] {
        cl.send_json(json!({"type":"join","room":room})).await?;
        assert_eq!(cl.recv_json().await?, json!({"type":"joined","room":"r1"}));
    }
    a.send_json(json!({"type":"say","room":"r1","text":{"body":"hi","n":[1,2]}}))
        .await?;
    let expected = json!({"type":"said","room":"r1","from":a_id,"text":{"body":"hi","n":[1,2]}});
    assert_eq!(a.recv_json().await?, expected);
    assert_eq!(b.recv_json().await?, expected);
    outsider.expect_silence(Duration::from_millis(200)).await?;

    // Whisper to a uid with two connections on different gateways.
    let (mut b2, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    for cl in [&mut b, &mut b2] {
        cl.send_json(json!({"type":"login","uid":"0"})).await?;
        assert_eq!(cl.recv_json().await?, json!({"type":"logged_in","uid":"0"}));
    }
    a.send_json(json!({"type":"whisper","to":"0","text":"psst"}))
        .await?;
    let w = json!({"type":"whisper","from":a_id,"text":"psst"});
    assert_eq!(b.recv_json().await?, w);
    assert_eq!(b2.recv_json().await?, w);
    a.expect_silence(Duration::from_millis(100)).await?;

    // Count sees both gateways.
    a.send_json(json!({"type":"count","room":"r1"})).await?;
    assert_eq!(
        a.recv_json().await?,
        json!({"type":"count","room":"r1","clients":2,"online":4})
    );

    // Leave: no more room traffic.
    b.send_json(json!({"type":"leave","room":"r1"})).await?;
    assert_eq!(b.recv_json().await?, json!({"type":"left","room":"r1"}));
    a.send_json(json!({"type":"say","room":"r1","text":"after"}))
        .await?;
    assert_eq!(a.recv_json().await?["text"], "after");
    b.expect_silence(Duration::from_millis(200)).await?;

    // Gone: b rejoins, a closes, b is told.
    b.send_json(json!({"type":"join","room":"r1"})).await?;
    b.recv_type("joined").await?;
    a.ws.close(None).await?;
    assert_eq!(
        b.recv_json().await?,
        json!({"type":"gone","room":"r1","client_id":a_id})
    );

    // Echo passes any JSON value through.
    for text in [json!(null), json!(1.5), json!("s"), json!({"k":[true]})] {
        b.send_json(json!({"type":"echo","text":text})).await?;
        assert_eq!(b.recv_json().await?, json!({"type":"echo","text":text}));
    }
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_an_error_and_the_connection_stays() -> anyhow::Result<()> {
    let c = cluster().await?;
    let (mut a, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    for bad in [
        "not json",
        "[1,2]",
        "{}",
        r#"{"type":"fly"}"#,
        r#"{"type":"join"}"#,
        r#"{"type":"join","room":""}"#,
        r#"{"type":"join","room":5}"#,
        r#"{"type":"login","uid":""}"#,
        r#"{"type":"whisper","text":"x"}"#,
        r#"{"type":"count"}"#,
    ] {
        a.send_text(bad).await?;
        let reply = a.recv_json().await?;
        assert_eq!(reply["type"], "error", "for {bad}: {reply}");
        assert!(reply["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
    use futures_util::SinkExt;
    a.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        vec![1, 2, 3].into(),
    ))
    .await?;
    assert_eq!(a.recv_json().await?["type"], "error");
    a.send_json(json!({"type":"echo","text":"still here"}))
        .await?;
    assert_eq!(
        a.recv_json().await?,
        json!({"type":"echo","text":"still here"})
    );
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_are_unique_across_gateways_and_restarts() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let mut seen = std::collections::HashSet::new();
    let mut clients = Vec::new();
    for i in 0..20 {
        let (cl, id) = WsClient::connect_chat(&c.gateways[i % 2].ws_url).await?;
        assert!(
            id.len() >= 20 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert!(seen.insert(id));
        clients.push(cl);
    }
    drop(clients);
    // Restart gateway 0 (a new process run gets a new gateway id).
    let old = c.gateways.remove(0);
    let old_id = old.handle.gateway_id;
    old.stop().await;
    let idx = c
        .add_gateway(gw_test_support::gateway_config(&[c.register_addr]))
        .await?;
    assert_ne!(c.gateways[idx].handle.gateway_id, old_id);
    let handle = c.workers[0].handle();
    gw_test_support::wait_until(
        Duration::from_secs(10),
        "worker links to the new gateway",
        || {
            let ok = handle.connected_gateways().len() == 2;
            async move { ok }
        },
    )
    .await?;
    for _ in 0..10 {
        let (_cl, id) = WsClient::connect_chat(&c.gateways[idx].ws_url).await?;
        assert!(seen.insert(id), "client id reused after restart");
    }
    c.stop().await;
    Ok(())
}
