//! The built binaries as separate processes, started the way operators do
//! (`gw-register`, `gw-gateway`, `gw-chat` with the documented flags).
//! Needs `cargo build --workspace` first (the test script does it).

use std::time::Duration;

use gw_test_support::process::{free_port, spawn_gateway, spawn_gateway_with_env, Proc};
use gw_test_support::WsClient;
use serde_json::json;

const SECRET: &str = "process-test-secret";

async fn connect_when_ready(url: &str) -> anyhow::Result<(WsClient, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), WsClient::connect_chat(url)).await {
            Ok(Ok(c)) => return Ok(c),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => anyhow::bail!("no welcome from {url}"),
        }
    }
}

fn gateway(register: &str, ws: u16, internal: u16) -> anyhow::Result<Proc> {
    gateway_with_env(register, ws, internal, &[])
}

fn gateway_with_env(
    register: &str,
    ws: u16,
    internal: u16,
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let internal = format!("127.0.0.1:{internal}");
    spawn_gateway_with_env(register, SECRET, ws, &internal, &[], env)
}

fn chat(register: &str) -> anyhow::Result<Proc> {
    chat_with_env(register, &[])
}

fn chat_with_env(register: &str, env: &[(&str, &str)]) -> anyhow::Result<Proc> {
    Proc::spawn_with_env(
        "gw-chat",
        &["--register", register, "--secret", SECRET],
        env,
    )
}

/// `GW_THREADS=1`: the current-thread runtime (the others get the default
/// multi-thread one), through the same kill, drain and stop paths.
const ONE_THREAD: &[(&str, &str)] = &[("GW_THREADS", "1")];

/// Sends numbered messages a -> room and collects them at b: returns how
/// many arrived more than once; fails on loss or reordering.
async fn exchange(a: &mut WsClient, b: &mut WsClient, from: u64, n: u64) -> anyhow::Result<u64> {
    for i in from..from + n {
        a.send_json(json!({"type":"say","room":"r","text":i}))
            .await?;
    }
    let mut next = from;
    let mut dups = 0;
    while next < from + n {
        let m = b.recv_type("said").await?;
        let i = m["text"].as_u64().unwrap();
        if i < next {
            dups += 1;
        } else {
            assert_eq!(i, next, "message {next} lost or reordered");
            next += 1;
        }
    }
    Ok(dups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_form_a_cluster_and_survive_worker_kill_and_restart() -> anyhow::Result<()> {
    let rport = free_port();
    let register_addr = format!("127.0.0.1:{rport}");
    let _register = Proc::spawn(
        "gw-register",
        &["--listen", &register_addr, "--secret", SECRET],
    )?;
    let (ws1, ws2) = (free_port(), free_port());
    let _g1 = gateway(&register_addr, ws1, free_port())?;
    let mut g2 = gateway_with_env(&register_addr, ws2, free_port(), ONE_THREAD)?;
    let w1 = chat(&register_addr)?;
    let mut w2 = chat_with_env(&register_addr, ONE_THREAD)?;

    let url1 = format!("ws://127.0.0.1:{ws1}");
    let url2 = format!("ws://127.0.0.1:{ws2}");
    let (mut a, a_id) = connect_when_ready(&url1).await?;
    let (mut b, _) = connect_when_ready(&url2).await?;
    for cl in [&mut a, &mut b] {
        cl.send_json(json!({"type":"join","room":"r"})).await?;
        cl.recv_type("joined").await?;
    }
    // Both workers must be linked to both gateways before we count on it:
    // wait until a room message crosses reliably.
    assert_eq!(exchange(&mut a, &mut b, 0, 10).await?, 0);
    b.send_json(json!({"type":"login","uid":"bob"})).await?;
    b.recv_type("logged_in").await?;
    a.send_json(json!({"type":"whisper","to":"bob","text":"hi"}))
        .await?;
    assert_eq!(
        b.recv_type("whisper").await?,
        json!({"type":"whisper","from":a_id,"text":"hi"})
    );

    // kill -9 one worker under traffic: nothing lost (redelivery may
    // duplicate: at-least-once).
    let sender =
        tokio::spawn(async move { exchange(&mut a, &mut b, 10, 300).await.map(|d| (a, b, d)) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    w1.signal("KILL");
    drop(w1);
    let (mut a, mut b, dups) = sender.await??;
    eprintln!("after kill -9: {dups} duplicate(s) of 300 messages (at-least-once)");

    // A new worker joins; the old survivor leaves gracefully (SIGTERM):
    // nothing lost, nothing duplicated.
    let _w3 = chat(&register_addr)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sender =
        tokio::spawn(async move { exchange(&mut a, &mut b, 310, 300).await.map(|d| (a, b, d)) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    w2.signal("TERM");
    let status = tokio::task::spawn_blocking(move || w2.wait_exit(Duration::from_secs(20))).await?;
    assert!(
        status.is_some_and(|s| s.success()),
        "worker did not exit cleanly: {status:?}"
    );
    let (mut a, mut b, dups) = sender.await??;
    assert_eq!(dups, 0, "graceful worker stop duplicated messages");

    // A gateway stopped with SIGTERM tells its clients to reconnect (1001).
    g2.signal("TERM");
    assert_eq!(b.recv_close().await?, 1001);
    let status = tokio::task::spawn_blocking(move || g2.wait_exit(Duration::from_secs(15))).await?;
    assert!(
        status.is_some_and(|s| s.success()),
        "gateway did not exit cleanly: {status:?}"
    );
    a.send_json(json!({"type":"echo","text":1})).await?;
    assert_eq!(a.recv_type("echo").await?, json!({"type":"echo","text":1}));
    Ok(())
}

#[test]
fn invalid_config_exits_with_64_and_names_the_field() -> anyhow::Result<()> {
    for (bin, args) in [
        ("gw-gateway", vec!["--secret", "short"]),
        (
            "gw-gateway",
            vec!["--secret", SECRET, "--listen", "http://127.0.0.1:1"],
        ),
        ("gw-register", vec!["--secret", ""]),
    ] {
        let out = std::process::Command::new(gw_test_support::process::bin_path(bin))
            .args(&args)
            .output()?;
        assert_eq!(out.status.code(), Some(64), "{bin} {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("secret") || err.contains("listen"), "{err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_gateways_and_sixteen_workers_link_fully_and_follow_changes() -> anyhow::Result<()>
{
    use gw_test_support::http::request;
    const N: usize = 16;
    let rport = free_port();
    let register_addr = format!("127.0.0.1:{rport}");
    let _register = Proc::spawn(
        "gw-register",
        &["--listen", &register_addr, "--secret", SECRET],
    )?;
    let mut gateways = Vec::new();
    let mut apis = Vec::new();
    let mut wss = Vec::new();
    for _ in 0..N {
        let (ws, api) = (free_port(), free_port());
        gateways.push(spawn_gateway(
            &register_addr,
            SECRET,
            ws,
            "127.0.0.1:0",
            &[
                "--api",
                &format!("127.0.0.1:{api}"),
                "--api-key",
                "sixteen-gateways-api-key",
            ],
        )?);
        apis.push(format!("127.0.0.1:{api}"));
        wss.push(ws);
    }
    let mut workers = Vec::new();
    for _ in 0..N {
        workers.push(chat(&register_addr)?);
    }
    // Every gateway sees all 16 workers (its /metrics), within the bound.
    let started = std::time::Instant::now();
    for api in &apis {
        let api = api.clone();
        let r = gw_test_support::wait_until(
            Duration::from_secs(40),
            "16 worker links on every gateway",
            || {
                let api = api.clone();
                async move {
                    match request(&api, "GET", "/metrics", &[], b"").await {
                        Ok(r) => String::from_utf8_lossy(&r.body)
                            .contains(&format!("gateworker_gateway_worker_links {N}\n")),
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
        if let Err(e) = r {
            let m = request(&api, "GET", "/metrics", &[], b"").await;
            panic!("{e}: {api}: {m:?}");
        }
    }
    eprintln!("16x16 mesh complete after {:?}", started.elapsed());
    // A client on each gateway; a cluster query answers in time and counts them.
    let mut clients = Vec::new();
    for ws in &wss {
        clients.push(connect_when_ready(&format!("ws://127.0.0.1:{ws}")).await?.0);
    }
    let push = gw_worker::PushClient::builder()
        .register(register_addr.clone())
        .secret(SECRET)
        .query_timeout(Duration::from_secs(5))
        .connect_within(Duration::from_secs(20))
        .await?;
    let h = push.handle();
    let t = std::time::Instant::now();
    assert_eq!(h.get_client_count().await?, N);
    eprintln!("cluster-wide count over 16 gateways took {:?}", t.elapsed());
    // A gateway leaving is noticed within a couple of seconds...
    let gone = gateways.remove(0);
    let t = std::time::Instant::now();
    gone.signal("TERM");
    gw_test_support::wait_until(
        Duration::from_secs(3),
        "the register to drop the gateway",
        || {
            let n = h.known_gateways().len();
            async move { n == N - 1 }
        },
    )
    .await?;
    eprintln!("gateway leave seen after {:?}", t.elapsed());
    // ...and so is one joining.
    let t = std::time::Instant::now();
    let ws = free_port();
    gateways.push(spawn_gateway(
        &register_addr,
        SECRET,
        ws,
        "127.0.0.1:0",
        &[],
    )?);
    gw_test_support::wait_until(
        Duration::from_secs(3),
        "the new gateway to be linked",
        || {
            let ok = h.known_gateways().len() == N && h.connected_gateways().len() == N;
            async move { ok }
        },
    )
    .await?;
    eprintln!("gateway join linked after {:?}", t.elapsed());
    push.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_run_time_settings_without_dropping_clients() -> anyhow::Result<()> {
    let register_addr = format!("127.0.0.1:{}", free_port());
    let _register = Proc::spawn(
        "gw-register",
        &["--listen", &register_addr, "--secret", SECRET],
    )?;
    let ws = free_port();
    let dir = std::env::temp_dir().join(format!("gw-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("gateway.toml");
    let write = |max: u32| {
        std::fs::write(
            &file,
            format!(
                "register = [\"{register_addr}\"]\nsecret = \"{SECRET}\"\nlisten = [\"ws://127.0.0.1:{ws}\"]\ninternal = \"127.0.0.1:0\"\nmax_connections = {max}\n"
            ),
        )
    };
    write(1)?;
    let gw = Proc::spawn("gw-gateway", &["--config", file.to_str().unwrap()])?;
    let _w = chat(&register_addr)?;
    let url = format!("ws://127.0.0.1:{ws}");
    let (mut a, _) = connect_when_ready(&url).await?;
    // At the limit: a second client is refused.
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    // Raise the limit in the file and SIGHUP: new clients get in, the open
    // one is untouched.
    write(10)?;
    gw.signal("HUP");
    let mut second = None;
    for _ in 0..50 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(2), WsClient::connect_chat(&url)).await
        {
            second = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        second.is_some(),
        "the new limit was not applied after SIGHUP"
    );
    a.send_json(json!({"type":"echo","text":"still here"}))
        .await?;
    assert_eq!(
        a.recv_type("echo").await?,
        json!({"type":"echo","text":"still here"})
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_log_level_and_a_bad_one_exits_64() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("gw-loglevel-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("register.toml");
    let log = dir.join("register.log");
    let addr = format!("127.0.0.1:{}", free_port());
    let write = |level: &str| {
        std::fs::write(
            &file,
            format!("listen = \"{addr}\"\nsecret = \"{SECRET}\"\nlog_level = \"{level}\"\n"),
        )
    };
    write("warn")?;
    let mut child = std::process::Command::new(gw_test_support::process::bin_path("gw-register"))
        .args(["--config", file.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = std::fs::read_to_string(&log)?;
    assert!(!before.contains("INFO"), "info logged at warn: {before}");
    write("debug")?;
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    let mut after = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = std::fs::read_to_string(&log)?;
        if after.contains("configuration re-read") {
            break;
        }
    }
    assert!(
        after.contains("log_level_changed") && after.contains("true"),
        "no log level change after SIGHUP: {after}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // A filter that does not parse is a configuration error naming the field.
    let out = std::process::Command::new(gw_test_support::process::bin_path("gw-register"))
        .args(["--secret", SECRET, "--log-level", "gw_register=loud"])
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log_level"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
