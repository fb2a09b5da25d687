//! Connection lifecycle: handshake decisions, TCP text/frame clients,
//! heartbeats, close events exactly once, lost gateways, partial answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gw_chat::{Chat, TokenChat};
use gw_test_support::process::{free_port, spawn_gateway};
use gw_test_support::{gateway_config, wait_until, Cluster, WsClient};
use gw_worker::{
    ClientId, CloseInfo, Context, EventHandler, GatewayId, Handle, HandshakeDecision,
    HandshakeRequest, Payload,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Chat, plus a record of every hook call.
#[derive(Clone, Default)]
struct Recorder {
    connects: Arc<Mutex<Vec<(ClientId, String)>>>,
    closes: Arc<Mutex<Vec<(ClientId, String)>>>,
    handshakes: Arc<Mutex<Vec<HandshakeRequest>>>,
    lost: Arc<Mutex<Vec<GatewayId>>>,
}

impl EventHandler for Recorder {
    async fn on_handshake(&self, ctx: &mut Context, req: &HandshakeRequest) -> HandshakeDecision {
        self.handshakes.lock().unwrap().push(req.clone());
        ctx.session.insert("addr", ctx.remote_addr.clone());
        HandshakeDecision::accept()
    }
    async fn on_connect(&self, ctx: &mut Context) {
        let proto = ctx
            .session
            .get("addr")
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.connects.lock().unwrap().push((ctx.client_id, proto));
        Chat.on_connect(ctx).await
    }
    async fn on_message(&self, ctx: &mut Context, msg: Payload) {
        Chat.on_message(ctx, msg).await
    }
    async fn on_close(&self, ctx: &mut Context, info: CloseInfo) {
        self.closes
            .lock()
            .unwrap()
            .push((ctx.client_id, info.reason.clone()));
        Chat.on_close(ctx, info).await
    }
    async fn on_gateway_lost(&self, _handle: &Handle, gateway: GatewayId) {
        self.lost.lock().unwrap().push(gateway);
    }
}

/// Sends a raw upgrade request and returns the status line and body.
async fn raw_upgrade(addr: &str, target: &str, extra: &str) -> anyhow::Result<(String, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_accept_with_uid_and_session_or_reject_with_status() -> anyhow::Result<()> {
    let mut c = Cluster::start(2).await?;
    c.add_worker(TokenChat {
        token: "t0k".into(),
    })
    .await?;
    let h = c.workers[0].handle();
    let url = &c.gateways[1].ws_url;
    // Wrong token: a real client sees the HTTP status.
    let err = tokio_tungstenite::connect_async(format!("{url}/?token=bad"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 401);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("wrong token"), "{body}");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
    let (status, body) = raw_upgrade(url.trim_start_matches("ws://"), "/chat", "").await?;
    assert!(status.contains("401"), "{status}");
    assert!(body.contains("missing or wrong token"));
    assert_eq!(
        h.get_client_count().await?,
        0,
        "a rejected client must not exist"
    );
    // Right token: bound to the uid and authenticated from the first moment.
    let (mut a, a_id) = WsClient::connect_chat(&format!("{url}/?token=t0k&uid=alice")).await?;
    let a_id: ClientId = a_id.parse()?;
    assert!(h.is_uid_online("alice").await?);
    assert_eq!(h.get_session(a_id).await?.unwrap()["authenticated"], true);
    a.send_json(json!({"type":"echo","text":1})).await?;
    assert_eq!(a.recv_json().await?, json!({"type":"echo","text":1}));
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_event_carries_path_query_headers_cookies_and_real_address() -> anyhow::Result<()>
{
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.trusted_proxies = vec!["127.0.0.1".into()];
    cfg.allowed_origins = vec!["https://ok.example".into()];
    c.add_gateway(cfg).await?;
    let rec = Recorder::default();
    c.add_worker(rec.clone()).await?;
    let addr = c.gateways[0].ws_url.trim_start_matches("ws://").to_string();
    let (status, _) = raw_upgrade(&addr, "/x", "Origin: https://evil.example\r\n").await?;
    assert!(status.contains("403"), "{status}");
    assert!(
        rec.handshakes.lock().unwrap().is_empty(),
        "refused origin reached the worker"
    );

    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{addr}/room/7?token=a%20b&x=1"),
    )?;
    let hdrs = req.headers_mut();
    hdrs.insert("Origin", "https://ok.example".parse()?);
    hdrs.insert("Cookie", "sid=s1; theme=dark".parse()?);
    hdrs.insert("X-Forwarded-For", "203.0.113.9, 127.0.0.1".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let _welcome = ws.next().await;
    let hs = rec.handshakes.lock().unwrap()[0].clone();
    assert_eq!(hs.path, "/room/7");
    assert_eq!(hs.query_param("token").as_deref(), Some("a b"));
    assert_eq!(hs.cookie("theme").as_deref(), Some("dark"));
    assert_eq!(hs.header("origin"), Some("https://ok.example"));
    // The peer (127.0.0.1) is a trusted proxy: the real client is the
    // nearest untrusted hop.
    let connects = rec.connects.lock().unwrap().clone();
    assert!(connects[0].1.contains("203.0.113.9"), "{connects:?}");
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_frame_clients_chat_with_a_websocket_client() -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.listen = vec![
        "ws://127.0.0.1:0".into(),
        "text://127.0.0.1:0".into(),
        "frame://127.0.0.1:0".into(),
    ];
    c.add_gateway(cfg).await?;
    c.add_worker(Chat).await?;
    let g = &c.gateways[0];
    let (mut ws, ws_id) = WsClient::connect_chat(&g.ws_url).await?;

    let text_addr = g
        .url("text")
        .unwrap()
        .trim_start_matches("text://")
        .to_string();
    let (r, mut text_w) = TcpStream::connect(&text_addr).await?.into_split();
    let mut text_r = BufReader::new(r).lines();
    let line = |l: Option<String>| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap();
    let welcome = line(text_r.next_line().await?);
    assert_eq!(welcome["type"], "welcome");

    let frame_addr = g
        .url("frame")
        .unwrap()
        .trim_start_matches("frame://")
        .to_string();
    let mut frame = tokio_util::codec::Framed::new(
        TcpStream::connect(&frame_addr).await?,
        tokio_util::codec::LengthDelimitedCodec::new(),
    );
    let fjson = |b: bytes::BytesMut| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
    assert_eq!(fjson(frame.next().await.unwrap()?)["type"], "welcome");

    for m in [json!({"type":"join","room":"mix"})] {
        ws.send_json(m.clone()).await?;
        text_w.write_all(format!("{m}\n").as_bytes()).await?;
        frame.send(bytes::Bytes::from(m.to_string())).await?;
    }
    ws.recv_type("joined").await?;
    assert_eq!(line(text_r.next_line().await?)["type"], "joined");
    assert_eq!(fjson(frame.next().await.unwrap()?)["type"], "joined");

    ws.send_json(json!({"type":"say","room":"mix","text":"from ws"}))
        .await?;
    let expect = json!({"type":"said","room":"mix","from":ws_id,"text":"from ws"});
    assert_eq!(line(text_r.next_line().await?), expect);
    assert_eq!(fjson(frame.next().await.unwrap()?), expect);
    ws.recv_type("said").await?;
    text_w
        .write_all(b"{\"type\":\"say\",\"room\":\"mix\",\"text\":\"from text\"}\r\n")
        .await?;
    assert_eq!(ws.recv_type("said").await?["text"], "from text");
    assert_eq!(fjson(frame.next().await.unwrap()?)["text"], "from text");
    frame
        .send(bytes::Bytes::from(
            r#"{"type":"say","room":"mix","text":"from frame"}"#,
        ))
        .await?;
    assert_eq!(ws.recv_type("said").await?["text"], "from frame");
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_by_heartbeat_and_workers_see_it() -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    // Heartbeats are set per listener: fast on text, the default on ws.
    cfg.listen = vec![
        "ws://127.0.0.1:0?ping_interval_ms=100&ping_missed_limit=3".into(),
        "text://127.0.0.1:0?ping_interval_ms=100&ping_missed_limit=3&ping_data={}".into(),
    ];
    c.add_gateway(cfg).await?;
    let rec = Recorder::default();
    c.add_worker(rec.clone()).await?;
    // A WebSocket client that talks (and answers pings while it reads) stays.
    let (mut alive, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    let talker = tokio::spawn(async move {
        for i in 0..30 {
            alive.send_json(json!({"type":"echo","text":i})).await?;
            assert_eq!(alive.recv_json().await?, json!({"type":"echo","text":i}));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(alive)
    });
    // A text client that never writes is closed.
    let text_addr = c.gateways[0]
        .url("text")
        .unwrap()
        .trim_start_matches("text://")
        .to_string();
    let mut silent = TcpStream::connect(&text_addr).await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "silent client not closed");
    wait_until(Duration::from_secs(5), "the close event", || {
        let n = rec
            .closes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r == "heartbeat timeout")
            .count();
        async move { n == 1 }
    })
    .await?;
    let mut alive = talker.await??;
    alive
        .send_json(json!({"type":"echo","text":"still"}))
        .await?;
    assert_eq!(
        alive.recv_json().await?,
        json!({"type":"echo","text":"still"})
    );
    assert_eq!(
        c.gateways[0]
            .handle
            .metrics
            .heartbeat_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connect_gets_exactly_one_close_across_a_graceful_gateway_stop() -> anyhow::Result<()>
{
    let mut c = Cluster::start(2).await?;
    let rec = Recorder::default();
    c.add_worker(rec.clone()).await?;
    c.add_worker(Chat).await?;
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(WsClient::connect(&c.gateways[0].ws_url).await?);
    }
    // Some close on their own first.
    for mut cl in clients.drain(..5) {
        cl.ws.close(None).await?;
    }
    let gw = c.gateways.remove(0);
    let stop = tokio::spawn(gw.stop());
    for cl in clients.iter_mut() {
        assert_eq!(cl.recv_close().await?, 1001);
    }
    stop.await?;
    // The recorder owns some of the clients; each it saw connect closed once.
    let r = wait_until(Duration::from_secs(5), "closes", || {
        let n = rec.closes.lock().unwrap().len();
        let m = rec.connects.lock().unwrap().len();
        async move { n == m }
    })
    .await;
    if r.is_err() {
        eprintln!(
            "connects {:?}\ncloses {:?}",
            rec.connects.lock().unwrap(),
            rec.closes.lock().unwrap()
        );
    }
    r?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connects: Vec<ClientId> = rec.connects.lock().unwrap().iter().map(|c| c.0).collect();
    let mut closes: Vec<ClientId> = rec.closes.lock().unwrap().iter().map(|c| c.0).collect();
    closes.sort();
    let mut expected = connects.clone();
    expected.sort();
    assert!(!expected.is_empty());
    assert_eq!(closes, expected, "each connect must get exactly one close");
    c.stop().await;
    Ok(())
}

const SECRET: &str = gw_test_support::SECRET;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_answers_name_the_silent_gateway_and_lost_gateways_are_reported(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    let register = c.register_addr.to_string();
    let ws = free_port();
    let proc_gw = spawn_gateway(&register, SECRET, ws, "127.0.0.1:0", &[])?;
    let rec = Recorder::default();
    c.add_worker(rec.clone()).await?;
    let h = c.workers[0].handle();
    wait_until(Duration::from_secs(10), "links to both gateways", || {
        let n = h.connected_gateways().len();
        async move { n == 2 }
    })
    .await?;
    let (_a, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    let (_b, b_id) = WsClient::connect_chat(&format!("ws://127.0.0.1:{ws}")).await?;
    let proc_id: GatewayId = b_id[..12].parse()?;
    assert_eq!(h.get_client_count().await?, 2);

    // A gateway that stops answering (SIGSTOP) is named, not silently left out.
    proc_gw.signal("STOP");
    let started = std::time::Instant::now();
    let err = h.get_client_count().await.unwrap_err();
    assert_eq!(
        err,
        gw_worker::Error::Incomplete {
            missing: vec![proc_id]
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "query waited past its timeout"
    );
    proc_gw.signal("CONT");
    wait_until(
        Duration::from_secs(5),
        "the gateway to answer again",
        || {
            let h = h.clone();
            async move { h.get_client_count().await == Ok(2) }
        },
    )
    .await?;

    // A gateway that dies without goodbye is reported to the application.
    proc_gw.signal("KILL");
    wait_until(Duration::from_secs(10), "on_gateway_lost", || {
        let lost = rec.lost.lock().unwrap().clone();
        async move { lost == vec![proc_id] }
    })
    .await?;
    assert_eq!(h.get_client_count().await?, 1);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_listener_backend_pushes_to_a_uid() -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.listen = vec!["ws://127.0.0.1:0".into(), "text://127.0.0.1:0".into()];
    c.add_gateway(cfg).await?;
    c.add_worker(Chat).await?;
    let (mut user, _) = WsClient::connect_chat(&c.gateways[0].ws_url).await?;
    user.send_json(json!({"type":"login","uid":"alice"}))
        .await?;
    user.recv_type("logged_in").await?;
    // A WebSocket client may not push.
    user.send_json(json!({"type":"push","uid":"alice","text":"x"}))
        .await?;
    assert_eq!(user.recv_json().await?["type"], "error");
    // The example script, as a backend job would run it.
    let text = c.gateways[0]
        .url("text")
        .unwrap()
        .trim_start_matches("text://")
        .to_string();
    let (host, port) = text.rsplit_once(':').unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/push-text/push.sh"
    );
    let out = tokio::process::Command::new("bash")
        .args([script, host, port, "alice", r#"{"report":42}"#])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(reply, json!({"type":"pushed","uid":"alice","delivered":1}));
    assert_eq!(
        user.recv_json().await?,
        json!({"type":"push","text":{"report":42}})
    );
    c.stop().await;
    Ok(())
}

/// Holds every message starting with "hold" until released; replies to
/// each message with its own text once handled.
#[derive(Clone)]
struct Gate {
    release: Arc<tokio::sync::Semaphore>,
}

impl EventHandler for Gate {
    async fn on_message(&self, ctx: &mut Context, msg: Payload) {
        let text = msg.as_text().unwrap_or_default().to_string();
        if text.starts_with("hold") {
            self.release.acquire().await.unwrap().forget();
        }
        ctx.reply(text).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_handler_holds_up_only_its_own_client_and_order_is_kept() -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    c.add_worker(Gate {
        release: release.clone(),
    })
    .await?;
    let url = &c.gateways[0].ws_url;
    // Two clients held at once (more waiting hooks than idle runners at
    // first), each with messages queued behind the held one.
    let mut held = Vec::new();
    for name in ["a", "b"] {
        let mut ws = WsClient::connect(url).await?;
        ws.send_text(&format!("hold-{name}")).await?;
        for i in 0..20 {
            ws.send_text(&format!("{name}{i}")).await?;
        }
        held.push(ws);
    }
    // Meanwhile many other clients are served, in order, without waiting.
    for round in 0..3 {
        let mut free = Vec::new();
        for _ in 0..20 {
            free.push(WsClient::connect(url).await?);
        }
        for (n, ws) in free.iter_mut().enumerate() {
            for i in 0..5 {
                ws.send_text(&format!("r{round}c{n}m{i}")).await?;
            }
        }
        for (n, ws) in free.iter_mut().enumerate() {
            for i in 0..5 {
                let got = ws.recv(Duration::from_secs(5)).await?;
                assert_eq!(got.to_text()?, format!("r{round}c{n}m{i}"));
            }
        }
    }
    for ws in &mut held {
        ws.expect_silence(Duration::from_millis(200)).await?;
    }
    // Released: each held client gets its messages, in the order sent.
    release.add_permits(2);
    for (ws, name) in held.iter_mut().zip(["a", "b"]) {
        let got = ws.recv(Duration::from_secs(5)).await?;
        assert_eq!(got.to_text()?, format!("hold-{name}"));
        for i in 0..20 {
            let got = ws.recv(Duration::from_secs(5)).await?;
            assert_eq!(got.to_text()?, format!("{name}{i}"));
        }
    }
    c.stop().await;
    Ok(())
}
