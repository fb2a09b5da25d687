//! Bounded resources: slow consumers, connection limits, several registers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use gw_chat::Chat;
use gw_test_support::{gateway_config, wait_until, Cluster, RegisterNode, WsClient};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_as_slow_consumer_and_the_room_goes_on(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.client_queue_messages = 256;
    cfg.client_queue_bytes = 256 * 1024;
    c.add_gateway(cfg).await?;
    c.add_worker(Chat).await?;
    let h = c.workers[0].handle();
    // The slow client: a raw WebSocket upgrade, then it never reads.
    let addr = c.gateways[0].ws_url.trim_start_matches("ws://").to_string();
    let mut slow = TcpStream::connect(&addr).await?;
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes()).await?;
    let (mut fast, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    wait_until(Duration::from_secs(5), "both clients connected", || {
        let h = h.clone();
        async move { h.get_client_count().await == Ok(2) }
    })
    .await?;
    for id in h.get_client_id_list().await? {
        h.join_group(id, "flood").await?;
    }
    let metrics = c.gateways[0].handle.metrics.clone();
    let before = gw_test_support::process::rss_kib();
    // Flood the room: 20,000 messages of 1 KiB (20 MiB) while the slow
    // client reads nothing; the fast one reads as it goes (in steps of 100
    // so that it keeps within its own queue).
    let body = "x".repeat(1024);
    for step in 0..200u32 {
        for i in step * 100..(step + 1) * 100 {
            h.send_to_group("flood", format!("{i:06}{body}"), &[])
                .await?;
        }
        for i in step * 100..(step + 1) * 100 {
            let m = fast.recv(Duration::from_secs(10)).await?;
            assert!(
                m.to_text()?.starts_with(&format!("{i:06}")),
                "message {i} lost or reordered for the fast client"
            );
        }
    }
    assert_eq!(metrics.slow_consumers.load(Ordering::Relaxed), 1);
    let grown = gw_test_support::process::rss_kib().saturating_sub(before);
    eprintln!("test process RSS grew {grown} KiB during a 20 MiB flood");
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB: not bounded");
    // The slow client, when it finally reads, finds its connection closed
    // (with 4008 if the close frame got through, or a plain close).
    let mut buf = vec![0u8; 1 << 16];
    let mut tail = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 8 {
                    tail.drain(..tail.len() - 8);
                }
            }
            Err(_) => anyhow::bail!("slow client's connection was not closed"),
        }
    }
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_the_others_unaffected() -> anyhow::Result<()>
{
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.max_connections = 2;
    c.add_gateway(cfg).await?;
    c.add_worker(Chat).await?;
    let (mut a, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    let (_b, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    match tokio_tungstenite::connect_async(&c.gateways[0].ws_url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 503),
        other => panic!(
            "third connection: expected HTTP 503, got {:?}",
            other.map(|_| ())
        ),
    }
    assert_eq!(
        c.gateways[0]
            .handle
            .metrics
            .connections_refused
            .load(Ordering::Relaxed),
        1
    );
    a.send_json(json!({"type":"echo","text":"fine"})).await?;
    assert_eq!(a.recv_json().await?, json!({"type":"echo","text":"fine"}));
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_registers_either_one_is_enough() -> anyhow::Result<()> {
    gw_test_support::init_logging();
    let r1 = RegisterNode::start("127.0.0.1:0").await?;
    let r2 = RegisterNode::start("127.0.0.1:0").await?;
    let regs = [r1.addr, r2.addr];
    let mut c = Cluster {
        register: None,
        register_addr: r1.addr,
        gateways: vec![],
        workers: vec![],
    };
    c.add_gateway(gateway_config(&regs)).await?;
    // Register 1 goes away before anything else starts: the worker and
    // the second gateway find each other through register 2 alone.
    r1.stop().await;
    let g2 = gw_test_support::start_gateway(gateway_config(&regs)).await?;
    let w = gw_test_support::worker_builder(&regs).start(Chat)?;
    let h = w.handle();
    wait_until(
        Duration::from_secs(10),
        "the worker to link to both gateways",
        || {
            let n = h.connected_gateways().len();
            async move { n == 2 }
        },
    )
    .await?;
    let (mut a, _) = WsClient::connect_chat(&g2.ws_url).await?;
    let (mut b, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    for cl in [&mut a, &mut b] {
        cl.send_json(json!({"type":"join","room":"r"})).await?;
        cl.recv_type("joined").await?;
    }
    a.send_json(json!({"type":"say","room":"r","text":"via register 2"}))
        .await?;
    assert_eq!(b.recv_type("said").await?["text"], "via register 2");
    w.stop().await;
    g2.stop().await;
    c.stop().await;
    r2.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_client_is_slowed_down_not_dropped() -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.client_rate_limit = 20;
    c.add_gateway(cfg).await?;
    c.add_worker(Chat).await?;
    let (mut a, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    let started = std::time::Instant::now();
    for i in 0..40 {
        a.send_json(json!({"type":"echo","text":i})).await?;
    }
    for i in 0..40 {
        assert_eq!(a.recv_json().await?, json!({"type":"echo","text":i}));
    }
    // 40 messages at 20/s with a burst of 20: the last ones wait ~1 s.
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "not limited: {:?}",
        started.elapsed()
    );
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_input_on_every_public_listener_is_refused() -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.listen = vec![
        "ws://127.0.0.1:0?max_message_bytes=1024".into(),
        "text://127.0.0.1:0?max_message_bytes=1024".into(),
        "frame://127.0.0.1:0?max_message_bytes=1024".into(),
    ];
    c.add_gateway(cfg).await?;
    c.add_worker(Chat).await?;
    let g = &c.gateways[0];
    let addr = |scheme: &str| {
        g.url(scheme)
            .unwrap()
            .split("://")
            .nth(1)
            .unwrap()
            .to_string()
    };
    async fn closed(mut s: TcpStream) -> bool {
        let mut buf = vec![0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
    // WebSocket: a message over the limit closes with 1009.
    let (mut ws, _) = WsClient::connect_chat(&g.ws_url).await?;
    ws.send_text(&"x".repeat(2048)).await?;
    assert_eq!(ws.recv_close().await?, 1009);
    // WebSocket listener, not WebSocket: HTTP error, not a crash.
    let mut s = TcpStream::connect(addr("ws")).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut resp = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut resp)).await??;
    assert!(
        String::from_utf8_lossy(&resp[..n]).starts_with("HTTP/1.1 426"),
        "{}",
        String::from_utf8_lossy(&resp[..n])
    );
    let mut s = TcpStream::connect(addr("ws")).await?;
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, b'\r', b'\n', b'\r', b'\n'])
        .await?;
    assert!(
        closed(s).await,
        "garbage on the ws listener was not refused"
    );
    // text: a line over the limit closes the connection.
    let mut s = TcpStream::connect(addr("text")).await?;
    s.write_all(&vec![b'y'; 4096]).await?;
    assert!(closed(s).await, "an oversized line was not refused");
    // frame: a declared length over the limit closes the connection.
    let mut s = TcpStream::connect(addr("frame")).await?;
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await?;
    assert!(closed(s).await, "an oversized frame was not refused");
    // The gateway still serves.
    let (mut ok, _) = WsClient::connect_chat(&g.ws_url).await?;
    ok.send_json(json!({"type":"echo","text":"fine"})).await?;
    assert_eq!(ok.recv_json().await?, json!({"type":"echo","text":"fine"}));
    assert!(
        c.gateways[0]
            .handle
            .metrics
            .closed_by_reason
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .sum::<u64>()
            >= 3
    );
    c.stop().await;
    Ok(())
}
