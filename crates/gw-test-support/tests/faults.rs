//! Faults the core must survive: workers leaving or dying, the register
//! restarting, peers with the wrong secret, garbage on the internal port.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use gw_chat::Chat;
use gw_test_support::{gateway_config, wait_until, Cluster, RegisterNode, WsClient};
use gw_worker::{ClientId, CloseInfo, Context, EventHandler, Payload};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `n` numbered room messages from `a` and checks `b` gets each
/// exactly once, in order.
async fn exchange(a: &mut WsClient, b: &mut WsClient, from: usize, n: usize) -> anyhow::Result<()> {
    for i in from..from + n {
        a.send_json(json!({"type":"say","room":"r","text":i}))
            .await?;
    }
    for i in from..from + n {
        let m = b.recv_type("said").await?;
        assert_eq!(m["text"], i, "message {i} lost, duplicated or reordered");
    }
    Ok(())
}

/// The chat handler, remembering which clients it saw connect.
#[derive(Clone, Default)]
struct Tagged {
    seen: Arc<Mutex<HashSet<ClientId>>>,
}

impl EventHandler for Tagged {
    async fn on_connect(&self, ctx: &mut Context) {
        self.seen.lock().unwrap().insert(ctx.client_id);
        Chat.on_connect(ctx).await
    }
    async fn on_message(&self, ctx: &mut Context, msg: Payload) {
        Chat.on_message(ctx, msg).await
    }
    async fn on_close(&self, ctx: &mut Context, info: CloseInfo) {
        Chat.on_close(ctx, info).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_has_its_clients_rerouted_without_loss() -> anyhow::Result<()> {
    let mut c = Cluster::start(2).await?;
    let tags = [Tagged::default(), Tagged::default()];
    c.add_worker(tags[0].clone()).await?;
    c.add_worker(tags[1].clone()).await?;
    let (mut a, a_id) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    let (mut b, _) = WsClient::connect_chat(&c.gateways[1].ws_url).await?;
    for cl in [&mut a, &mut b] {
        cl.send_json(json!({"type":"join","room":"r"})).await?;
        cl.recv_type("joined").await?;
    }
    exchange(&mut a, &mut b, 0, 20).await?;
    // Stop the worker that owns `a`, while `a` keeps talking.
    let a_id: ClientId = a_id.parse()?;
    let owner = if tags[0].seen.lock().unwrap().contains(&a_id) {
        0
    } else {
        1
    };
    assert!(tags[owner].seen.lock().unwrap().contains(&a_id));
    let w = c.workers.remove(owner);
    let sender =
        tokio::spawn(async move { exchange(&mut a, &mut b, 20, 300).await.map(|_| (a, b)) });
    tokio::time::sleep(Duration::from_millis(5)).await;
    w.stop().await;
    let (mut a, mut b) = sender.await??;
    exchange(&mut a, &mut b, 320, 20).await?;
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_restart_does_not_interrupt_traffic_and_new_gateways_are_found(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let (mut a, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    let (mut b, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    for cl in [&mut a, &mut b] {
        cl.send_json(json!({"type":"join","room":"r"})).await?;
        cl.recv_type("joined").await?;
    }
    let addr = c.register_addr;
    c.register.take().unwrap().stop().await;
    // Traffic keeps flowing with no register at all.
    exchange(&mut a, &mut b, 0, 50).await?;
    // Register comes back on the same address; a new gateway is found.
    c.register = Some(RegisterNode::start(&addr.to_string()).await?);
    let idx = c.add_gateway(gateway_config(&[addr])).await?;
    let handle = c.workers[0].handle();
    wait_until(
        Duration::from_secs(10),
        "worker to link to the new gateway",
        || {
            let ok = handle.connected_gateways().len() == 2;
            async move { ok }
        },
    )
    .await?;
    let (mut d, _) = WsClient::connect_chat(&c.gateways[idx].ws_url).await?;
    d.send_json(json!({"type":"join","room":"r"})).await?;
    d.recv_type("joined").await?;
    a.send_json(json!({"type":"say","room":"r","text":"hello new"}))
        .await?;
    assert_eq!(d.recv_type("said").await?["text"], "hello new");
    assert_eq!(b.recv_type("said").await?["text"], "hello new");
    exchange(&mut a, &mut b, 100, 10).await?;
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_secret_is_refused() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    // At a gateway's internal port and at the register.
    let internal = c.gateways[0].internal_addr.to_string();
    let register = c.register_addr.to_string();
    for (addr, role) in [
        (&internal, gw_protocol::pb::Role::Worker),
        (&register, gw_protocol::pb::Role::Gateway),
    ] {
        let err = gw_link::connect(
            addr,
            b"wrong-secret!",
            role,
            "intruder",
            1 << 20,
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, gw_link::HandshakeError::Refused { code: 1001, .. }),
            "{addr}: {err}"
        );
    }
    assert_eq!(
        c.gateways[0]
            .handle
            .metrics
            .links_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    c.stop().await;
    Ok(())
}

/// Reads the frames the peer sends until EOF (bounded), returning the
/// LinkError code if one came.
async fn read_error_code(s: &mut TcpStream) -> Option<u32> {
    use prost_free::decode_all;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    decode_all(&buf)
}

mod prost_free {
    use bytes::BytesMut;
    use gw_protocol::frame;
    use gw_protocol::pb::link_frame::Body;

    pub(super) fn decode_all(data: &[u8]) -> Option<u32> {
        let mut src = BytesMut::from(data);
        while let Ok(Some(f)) = frame::decode(&mut src, 1 << 20) {
            if let Some(Body::Error(e)) = f.body {
                return Some(e.code);
            }
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_are_refused_and_the_gateway_keeps_serving(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let internal = c.gateways[0].internal_addr;

    // Oversized length before the handshake: refused with 1003, no allocation.
    let mut s = TcpStream::connect(internal).await?;
    s.write_all(&[0xff, 0xff, 0xff, 0xf0]).await?;
    assert_eq!(read_error_code(&mut s).await, Some(1003));

    // Garbage protobuf in place of Hello: 1004.
    let mut s = TcpStream::connect(internal).await?;
    let mut b = BytesMut::new();
    b.put_u32(6);
    b.put_slice(&[0xff; 6]);
    s.write_all(&b).await?;
    assert_eq!(read_error_code(&mut s).await, Some(1004));

    // Plain HTTP on the internal port: refused too.
    let mut s = TcpStream::connect(internal).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(read_error_code(&mut s).await.is_some());

    // An authenticated worker sending an oversized frame loses its link,
    // with 1003, and nothing else.
    let (mut link, _) = gw_link::connect(
        &internal.to_string(),
        gw_test_support::SECRET.as_bytes(),
        gw_protocol::pb::Role::Worker,
        "big-sender",
        64 << 20,
        Duration::from_secs(2),
    )
    .await?;
    {
        // Announce a 17 MiB frame (over the 16 MiB cap) and send only its
        // first bytes: the gateway must refuse it from the length alone.
        use futures_util::StreamExt;
        let stream = link.get_mut();
        let mut b = BytesMut::new();
        b.put_u32(17 << 20);
        b.put_slice(&[0x12; 64]);
        stream.write_all(&b).await?;
        let mut code = None;
        while let Ok(Some(Ok(f))) = tokio::time::timeout(Duration::from_secs(3), link.next()).await
        {
            if let Some(gw_protocol::pb::link_frame::Body::Error(e)) = f.body {
                code = Some(e.code);
                break;
            }
        }
        assert_eq!(code, Some(1003));
    }

    // The gateway still serves clients.
    let (mut a, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    a.send_json(json!({"type":"echo","text":"alive"})).await?;
    assert_eq!(a.recv_json().await?, json!({"type":"echo","text":"alive"}));
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_worker_clients_wait_and_nothing_is_dropped() -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut config = gateway_config(&[c.register_addr]);
    // Upgrades complete without asking a worker, so the client is in
    // before any worker exists.
    config.handshake_to_worker = false;
    c.add_gateway(config).await?;
    c.add_gateway(gateway_config(&[c.register_addr])).await?;
    let mut a = WsClient::connect(&c.gateways[0].ws_url).await?;
    for i in 0..5 {
        a.send_json(json!({"type":"echo","text":i})).await?;
    }
    a.expect_silence(Duration::from_millis(300)).await?;
    // On a gateway that asks a worker at handshake, the upgrade waits too.
    let url = c.gateways[1].ws_url.clone();
    let pending = tokio::spawn(async move { WsClient::connect_chat(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished());
    c.add_worker(Chat).await?;
    assert_eq!(a.recv_json().await?["type"], "welcome");
    for i in 0..5 {
        assert_eq!(a.recv_json().await?, json!({"type":"echo","text":i}));
    }
    let (mut b, _) = pending.await??;
    b.send_json(json!({"type":"echo","text":"late"})).await?;
    assert_eq!(b.recv_json().await?, json!({"type":"echo","text":"late"}));
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_both_workers_under_load_loses_and_duplicates_nothing(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(2).await?;
    c.add_worker(Chat).await?;
    c.add_worker(Chat).await?;
    const SENDERS: usize = 4;
    const N: u64 = 300;
    let (mut rx, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    rx.send_json(json!({"type":"join","room":"roll"})).await?;
    rx.recv_type("joined").await?;
    let mut senders = Vec::new();
    let mut ids = Vec::new();
    for i in 0..SENDERS {
        let (mut s, id) = WsClient::connect_chat(&c.gateways[i % 2].ws_url).await?;
        ids.push(id);
        senders.push(tokio::spawn(async move {
            for n in 0..N {
                s.send_json(json!({"type":"say","room":"roll","text":n}))
                    .await?;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            // Still connected after the restarts: an echo round trip works.
            s.send_json(json!({"type":"echo","text":"alive"})).await?;
            s.recv_type("echo").await?;
            anyhow::Ok(())
        }));
    }
    let rss_before = gw_test_support::process::rss_kib();
    // Roll: a new worker comes, an old one drains and leaves; twice.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.add_worker(Chat).await?;
        let old = c.workers.remove(0);
        old.stop().await;
    }
    let mut got: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut peak = rss_before;
    while got.values().map(Vec::len).sum::<usize>() < SENDERS * N as usize {
        let m = rx.recv_type("said").await?;
        got.entry(m["from"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(m["text"].as_u64().unwrap());
        peak = peak.max(gw_test_support::process::rss_kib());
    }
    rx.expect_silence(Duration::from_millis(300)).await?;
    for s in senders {
        s.await??;
    }
    for id in &ids {
        let seq = got.get(id).cloned().unwrap_or_default();
        assert_eq!(
            seq,
            (0..N).collect::<Vec<_>>(),
            "sender {id}: lost, duplicated or reordered"
        );
    }
    eprintln!(
        "rolling restart: {} messages sent, {} delivered, 0 lost, 0 duplicated; test-process RSS {} -> peak {} KiB",
        SENDERS as u64 * N,
        got.values().map(Vec::len).sum::<usize>(),
        rss_before,
        peak
    );
    c.stop().await;
    Ok(())
}

/// A command that asks for no reply and is refused (here: an empty group
/// name) is answered with a `Notice` naming the
/// problem and counted; the link stays up and the commands after it in the
/// same write still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_without_reply_gets_a_notice_and_the_link_goes_on() -> anyhow::Result<()>
{
    use futures_util::{SinkExt, StreamExt};
    use gw_protocol::pb::{self, command::Kind, link_frame::Body};
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let gw = &c.gateways[0];
    let (mut bob, bob_id) = WsClient::connect_chat(&gw.ws_url).await?;
    let (mut link, _) = gw_link::connect(
        &gw.internal_addr.to_string(),
        gw_test_support::SECRET.as_bytes(),
        pb::Role::PushClient,
        "pusher",
        16 << 20,
        Duration::from_secs(2),
    )
    .await?;
    let command = |kind| {
        gw_link::frame(Body::Command(pb::Command {
            id: 0,
            kind: Some(kind),
        }))
    };
    let payload = |text: &str| {
        Some(pb::Payload {
            data: text.as_bytes().to_vec().into(),
            binary: false,
        })
    };
    link.feed(command(Kind::SendToGroups(pb::SendToGroups {
        groups: vec![String::new()],
        payload: payload(r#"{"type":"never"}"#),
        ..Default::default()
    })))
    .await?;
    link.feed(command(Kind::SendToClients(pb::SendToClients {
        client_ids: vec![bob_id],
        payload: payload(r#"{"type":"after-refusal"}"#),
    })))
    .await?;
    link.flush().await?;

    let notice = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match link.next().await {
                Some(Ok(pb::LinkFrame {
                    body: Some(Body::Notice(n)),
                })) => return Ok(n),
                Some(Ok(_)) => {}
                other => anyhow::bail!("link ended before a notice: {other:?}"),
            }
        }
    })
    .await??;
    assert_eq!(notice.code, gw_protocol::codes::NOTICE_BAD_COMMAND);
    assert!(notice.message.contains("group"), "{}", notice.message);
    assert_eq!(bob.recv_json().await?, json!({"type":"after-refusal"}));
    assert_eq!(
        gw.handle
            .metrics
            .commands_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Still up: a ping is answered.
    link.send(gw_link::frame(Body::Ping(pb::Ping { nonce: 7 })))
        .await?;
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(pb::LinkFrame {
                body: Some(Body::Pong(p)),
            })) = link.next().await
            {
                return p.nonce;
            }
        }
    })
    .await?;
    assert_eq!(pong, 7);
    c.stop().await;
    Ok(())
}
