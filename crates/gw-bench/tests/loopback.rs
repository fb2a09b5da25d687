//! End-to-end: the generator against the in-process `serve` on
//! 127.0.0.1:0, asserting exact delivery counts; plus a deliberately faulty
//! server to prove loss, duplication and reordering are caught end to end.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use gw_bench::cli::{Cli, Command};
use gw_bench::client::{self, ws_opts};
use gw_bench::proto::{self, Inbound};
use gw_bench::Report;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

async fn start_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gw_bench::serve(listener));
    format!("ws://{addr}")
}

async fn run(argv: &[&str]) -> anyhow::Result<Report> {
    let mut full = vec!["gw-bench"];
    full.extend_from_slice(argv);
    let cli = Cli::try_parse_from(full).expect("valid arguments");
    match &cli.command {
        Command::Fanout(a) => gw_bench::run_fanout(a).await,
        Command::Echo(a) => gw_bench::run_echo(a).await,
        Command::Whisper(a) => gw_bench::run_whisper(a).await,
        Command::Conns(a) => gw_bench::run_conns(a).await,
        Command::Serve(_) => unreachable!(),
    }
}

fn assert_exact(r: &Report, sent: u64, expected: u64) {
    assert!(r.ok, "run failed: {:?}\n{}", r.failure(), r.table());
    assert_eq!(r.sent, Some(sent), "{}", r.table());
    assert_eq!(r.expected, Some(expected));
    assert_eq!(r.delivered, Some(expected));
    assert_eq!(r.lost, Some(0));
    assert_eq!(r.duplicated, Some(0));
    assert_eq!(r.reordered, Some(0));
    assert_eq!(r.unexpected, Some(0));
    assert_eq!(r.error_count, 0);
    let lat = r.latency_ms.unwrap();
    assert_eq!(lat.count, expected);
    assert!(lat.p50 > 0.0 && lat.p50 <= lat.p99 && lat.p99 <= lat.max);
    assert!(r.deliveries_per_sec.unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_message_to_every_member() {
    let url = start_server().await;
    let r = run(&[
        "fanout",
        "--url",
        &url,
        "--rooms",
        "3",
        "--members",
        "20",
        "--senders",
        "2",
        "--messages",
        "50",
        "--window",
        "8",
        "--source-ips",
        "2",
        "--linger-ms",
        "50",
        "--duration-limit",
        "30",
        "--timeline-ms",
        "1",
    ])
    .await
    .unwrap();
    // 3 rooms * 2 senders * 50 messages, each delivered to 20 members.
    assert_exact(&r, 300, 6000);
    assert_eq!(r.connections, 60);
    // Every distinct delivery is in the timeline once, and it spans the
    // measured phase: it ends in the interval of the last delivery.
    assert_eq!(r.timeline_ms, Some(1));
    assert_eq!(r.timeline.iter().sum::<u64>(), 6000);
    let (len, ms) = (r.timeline.len() as f64, r.elapsed_s * 1000.0);
    assert!(len >= ms && len <= ms + 1.0 + 1e-6, "{}", r.table());
    assert!(r.table().contains("deliveries per 1 ms: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trips_are_exact() {
    let url = start_server().await;
    let r = run(&[
        "echo",
        "--url",
        &url,
        "--clients",
        "10",
        "--messages",
        "100",
        "--window",
        "4",
        "--payload",
        "128",
        "--linger-ms",
        "50",
    ])
    .await
    .unwrap();
    assert_exact(&r, 1000, 1000);
    // No timeline unless asked for.
    assert!(r.timeline_ms.is_none() && r.timeline.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whisper_ring_is_exact() {
    let url = start_server().await;
    // Two URLs to the same server exercise round-robin target spreading.
    let r = run(&[
        "whisper",
        "--url",
        &url,
        "--url",
        &url,
        "--clients",
        "10",
        "--messages",
        "50",
        "--window",
        "16",
        "--linger-ms",
        "50",
    ])
    .await
    .unwrap();
    assert_exact(&r, 500, 500);

    // A single client whispers to itself.
    let r = run(&[
        "whisper",
        "--url",
        &url,
        "--clients",
        "1",
        "--messages",
        "20",
        "--window",
        "3",
        "--linger-ms",
        "10",
    ])
    .await
    .unwrap();
    assert_exact(&r, 20, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conns_opens_and_holds() {
    let url = start_server().await;
    let r = run(&[
        "conns",
        "--url",
        &url,
        "--count",
        "50",
        "--rate",
        "1000",
        "--hold",
        "0.2",
        "--source-ips",
        "3",
        "--pid",
        "self",
    ])
    .await
    .unwrap();
    assert!(r.ok, "{}", r.table());
    assert_eq!(r.connected, Some(50));
    assert_eq!(r.failed, Some(0));
    assert_eq!(r.connect_ms.unwrap().count, 50);
    assert!(r.server_rss_after_kib.is_some());
}

#[tokio::test]
async fn non_loopback_targets_are_refused() {
    let err = run(&["echo", "--url", "ws://192.0.2.1:8282", "--clients", "1"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refusing non-loopback"), "{err}");
}

#[tokio::test]
async fn unreachable_server_is_an_error_not_a_hang() {
    // A port that is bound but never listened on: connects are refused, and
    // no other test's server can take it while we hold it.
    let holder = tokio::net::TcpSocket::new_v4().unwrap();
    holder.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("ws://{}", holder.local_addr().unwrap());
    let r = run(&[
        "echo",
        "--url",
        &url,
        "--clients",
        "3",
        "--duration-limit",
        "5",
    ])
    .await
    .unwrap();
    assert!(!r.ok);
    assert!(r.error_count > 0);
    assert!(r.failure().unwrap().contains("error"), "{:?}", r.failure());
    drop(holder);
}

/// The reference server's own protocol behaviour.
#[tokio::test]
async fn serve_speaks_the_protocol() {
    let url = start_server().await;
    let target = client::parse_target(&url).unwrap();
    let sources = client::Sources::new(1, std::slice::from_ref(&target)).unwrap();
    let cfg = ws_opts(4096, 4096);
    let mut a = client::connect(&target, &sources, 0, cfg).await.unwrap();
    let mut b = client::connect(&target, &sources, 1, cfg).await.unwrap();
    let a_id = client::expect_welcome(&mut a).await.unwrap();
    let b_id = client::expect_welcome(&mut b).await.unwrap();
    assert_ne!(a_id, b_id);

    async fn ask(ws: &mut client::Ws, frame: &str) -> serde_json::Value {
        client::send_all(ws, [frame.to_string()]).await.unwrap();
        recv(ws).await
    }
    async fn recv(ws: &mut client::Ws) -> serde_json::Value {
        let t = client::next_text(ws).await.unwrap();
        Inbound::parse(&t).unwrap();
        serde_json::from_str(&t).unwrap()
    }

    let v = ask(&mut a, &proto::join_frame("room")).await;
    assert_eq!(v, serde_json::json!({"type":"joined","room":"room"}));
    ask(&mut b, &proto::join_frame("room")).await;
    let v = ask(&mut a, &proto::count_frame("room")).await;
    assert_eq!(
        v,
        serde_json::json!({"type":"count","room":"room","clients":2,"online":2})
    );

    // say reaches every member, sender included, text verbatim.
    client::send_all(
        &mut a,
        [r#"{"type":"say","room":"room","text":{"k":[1,2]}}"#.to_string()],
    )
    .await
    .unwrap();
    let want = serde_json::json!({"type":"said","room":"room","from":a_id,"text":{"k":[1,2]}});
    assert_eq!(recv(&mut a).await, want);
    assert_eq!(recv(&mut b).await, want);

    // login + whisper
    let v = ask(&mut b, &proto::login_frame("bob")).await;
    assert_eq!(v, serde_json::json!({"type":"logged_in","uid":"bob"}));
    client::send_all(
        &mut a,
        [r#"{"type":"whisper","to":"bob","text":"hi"}"#.to_string()],
    )
    .await
    .unwrap();
    assert_eq!(
        recv(&mut b).await,
        serde_json::json!({"type":"whisper","from":a_id,"text":"hi"})
    );

    let v = ask(&mut a, r#"{"type":"echo","text":7}"#).await;
    assert_eq!(v, serde_json::json!({"type":"echo","text":7}));

    // Errors go to the offending client only.
    let v = ask(&mut a, "not json").await;
    assert_eq!(v["type"], "error");
    let v = ask(&mut a, r#"{"type":"dance"}"#).await;
    assert_eq!(v["type"], "error");
    let v = ask(&mut a, r#"{"type":"say","room":"room"}"#).await;
    assert_eq!(v["type"], "error");

    let v = ask(&mut a, &proto::leave_frame("room")).await;
    assert_eq!(v, serde_json::json!({"type":"left","room":"room"}));
    ask(&mut a, &proto::join_frame("room")).await;

    // Closing b tells the rest of the room.
    b.close().await.unwrap();
    let v = recv(&mut a).await;
    assert_eq!(
        v,
        serde_json::json!({"type":"gone","room":"room","client_id":b_id})
    );
    let v = ask(&mut a, &proto::count_frame("room")).await;
    assert_eq!(v["clients"], 1);
    assert_eq!(v["online"], 1);
}

/// An echo server that answers request #5 twice, never answers #7, and
/// answers #3 only after #4: the report must show exactly that.
async fn start_faulty_echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                ws.send(Message::text(r#"{"type":"welcome","client_id":"x"}"#))
                    .await
                    .unwrap();
                let mut held = None;
                let mut n = 0u64;
                while let Some(Ok(Message::Text(t))) = ws.next().await {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let reply = Message::text(
                        serde_json::json!({"type":"echo","text":v["text"]}).to_string(),
                    );
                    match n {
                        3 => held = Some(reply),
                        4 => {
                            ws.send(reply).await.unwrap();
                            ws.send(held.take().unwrap()).await.unwrap();
                        }
                        5 => {
                            ws.send(reply.clone()).await.unwrap();
                            ws.send(reply).await.unwrap();
                        }
                        7 => {}
                        _ => ws.send(reply).await.unwrap(),
                    }
                    n += 1;
                }
            });
        }
    });
    format!("ws://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_counted_end_to_end() {
    let url = start_faulty_echo_server().await;
    let r = run(&[
        "echo",
        "--url",
        &url,
        "--clients",
        "1",
        "--messages",
        "20",
        "--window",
        "4",
        "--duration-limit",
        "1.5",
    ])
    .await
    .unwrap();
    assert!(!r.ok);
    assert_eq!(r.sent, Some(20));
    assert_eq!(r.expected, Some(20));
    assert_eq!(r.delivered, Some(19));
    assert_eq!(r.lost, Some(1));
    assert_eq!(r.duplicated, Some(1));
    assert_eq!(r.reordered, Some(1));
    // The lost message keeps the run from completing: the limit is reported.
    assert!(r.errors.iter().any(|e| e.contains("duration limit")));
    let why = r.failure().unwrap();
    assert!(why.contains("1 lost") && why.contains("1 duplicated") && why.contains("1 reordered"));
}
