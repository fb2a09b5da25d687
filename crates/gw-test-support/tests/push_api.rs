//! The HTTP push API: the caller talks to one gateway, clients sit on two.

use std::time::Duration;

use gw_chat::Chat;
use gw_test_support::http::{api_call, request};
use gw_test_support::{gateway_config, wait_until, Cluster, WsClient};
use serde_json::{json, Value};

const KEY: &str = "test-api-key-0123456789";

struct Api {
    c: Cluster,
    addr: String,
    /// a0, a1 on gateway 0 (the API gateway); b0 on gateway 1.
    cl: Vec<WsClient>,
    ids: Vec<String>,
}

async fn setup() -> anyhow::Result<Api> {
    let mut c = Cluster::start(0).await?;
    let mut cfg = gateway_config(&[c.register_addr]);
    cfg.api = Some("127.0.0.1:0".into());
    cfg.api_key = Some(KEY.into());
    c.add_gateway(cfg).await?;
    c.add_gateway(gateway_config(&[c.register_addr])).await?;
    c.add_worker(Chat).await?;
    c.add_worker(Chat).await?;
    let addr = c.gateways[0].api_addr.unwrap().to_string();
    let mut cl = Vec::new();
    let mut ids = Vec::new();
    for g in [0, 0, 1] {
        let (client, id) = WsClient::connect_chat(&c.gateways[g].ws_url).await?;
        cl.push(client);
        ids.push(id);
    }
    // The API gateway's own push client links to both gateways.
    let a2 = addr.clone();
    wait_until(Duration::from_secs(10), "the push API to see both gateways", || {
        let a = a2.clone();
        async move { matches!(api_call(&a, KEY, "get_client_count", &json!({})).await, Ok((200, v)) if v["result"] == 3) }
    })
    .await?;
    Ok(Api { c, addr, cl, ids })
}

async fn call(api: &Api, method: &str, body: Value) -> anyhow::Result<Value> {
    let (status, v) = api_call(&api.addr, KEY, method, &body).await?;
    assert_eq!(status, 200, "{method} {body}: {v}");
    assert_eq!(v["ok"], true, "{v}");
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_flow_bind_join_push_and_query_across_gateways() -> anyhow::Result<()> {
    let mut api = setup().await?;
    let (a0, a1, b0) = (api.ids[0].clone(), api.ids[1].clone(), api.ids[2].clone());
    // The backend binds users and puts them in a room.
    assert_eq!(
        call(&api, "bind_uid", json!({"client_id": a0, "uid": "alice"})).await?["affected"],
        1
    );
    call(&api, "bind_uid", json!({"client_id": b0, "uid": "bob"})).await?;
    call(&api, "bind_uid", json!({"client_id": a1, "uid": "bob"})).await?;
    for id in [&a0, &b0] {
        call(
            &api,
            "join_group",
            json!({"client_id": id, "group": "room1"}),
        )
        .await?;
    }
    // Pushes report how many connections received them.
    let v = call(&api, "send_to_uid", json!({"uid": "bob", "data": "hi bob"})).await?;
    assert_eq!(v["delivered"], 2);
    for i in [1, 2] {
        assert_eq!(
            api.cl[i]
                .recv(Duration::from_secs(5))
                .await?
                .into_text()?
                .as_str(),
            "hi bob"
        );
    }
    let v = call(
        &api,
        "send_to_group",
        json!({"group": "room1", "data": {"k": 1}, "exclude": [a0]}),
    )
    .await?;
    assert_eq!(v["delivered"], 1);
    assert_eq!(api.cl[2].recv_json().await?, json!({"k": 1}));
    let v = call(
        &api,
        "send_to_all",
        json!({"data": "AAEC", "encoding": "base64"}),
    )
    .await?;
    assert_eq!(v["delivered"], 3);
    for i in 0..3 {
        let m = api.cl[i].recv(Duration::from_secs(5)).await?;
        assert_eq!(m.into_data().to_vec(), vec![0u8, 1, 2]);
    }
    call(
        &api,
        "send_to_client",
        json!({"client_id": b0, "data": "direct"}),
    )
    .await?;
    assert_eq!(
        api.cl[2]
            .recv(Duration::from_secs(5))
            .await?
            .into_text()?
            .as_str(),
        "direct"
    );
    assert_eq!(
        call(
            &api,
            "send_to_clients",
            json!({"client_ids": [a0, b0], "data": "x"})
        )
        .await?["delivered"],
        2
    );
    assert_eq!(
        call(
            &api,
            "send_to_uids",
            json!({"uids": ["alice", "bob"], "data": "y"})
        )
        .await?["delivered"],
        3
    );
    assert_eq!(
        call(
            &api,
            "send_to_groups",
            json!({"groups": ["room1"], "data": "z"})
        )
        .await?["delivered"],
        2
    );

    // Queries see both gateways.
    assert_eq!(
        call(&api, "get_client_count_by_group", json!({"group": "room1"})).await?["result"],
        2
    );
    assert_eq!(
        call(&api, "is_uid_online", json!({"uid": "bob"})).await?["result"],
        true
    );
    let mut bobs = vec![a1.clone(), b0.clone()];
    bobs.sort();
    assert_eq!(
        call(&api, "get_client_id_by_uid", json!({"uid": "bob"})).await?["result"],
        json!(bobs)
    );
    assert_eq!(
        call(&api, "get_uid_by_client_id", json!({"client_id": a0})).await?["result"],
        "alice"
    );
    assert_eq!(
        call(&api, "get_uid_list", json!({})).await?["result"],
        json!(["alice", "bob"])
    );
    assert_eq!(call(&api, "get_uid_count", json!({})).await?["result"], 2);
    assert_eq!(
        call(&api, "get_uid_list_by_group", json!({"group": "room1"})).await?["result"],
        json!(["alice", "bob"])
    );
    assert_eq!(
        call(&api, "get_uid_count_by_group", json!({"group": "room1"})).await?["result"],
        2
    );
    assert_eq!(
        call(&api, "get_group_id_list", json!({})).await?["result"],
        json!(["room1"])
    );
    assert_eq!(
        call(&api, "get_all_group_client_id_count", json!({})).await?["result"],
        json!({"room1": 2})
    );
    assert_eq!(
        call(&api, "get_all_group_uid_count", json!({})).await?["result"],
        json!({"room1": 2})
    );
    assert_eq!(
        call(&api, "get_all_group_uid_list", json!({})).await?["result"],
        json!({"room1": ["alice", "bob"]})
    );
    let mut room = vec![a0.clone(), b0.clone()];
    room.sort();
    assert_eq!(
        call(&api, "get_all_group_client_id_list", json!({})).await?["result"],
        json!({"room1": room})
    );
    assert_eq!(
        call(
            &api,
            "get_client_id_list_by_group",
            json!({"group": "room1"})
        )
        .await?["result"],
        json!(room)
    );
    assert_eq!(
        call(&api, "get_client_id_list", json!({})).await?["result"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        call(&api, "is_uids_online", json!({"uids": ["alice", "carol"]})).await?["result"],
        json!({"alice": true, "carol": false})
    );
    assert_eq!(
        call(
            &api,
            "batch_get_client_id_by_uid",
            json!({"uids": ["alice"]})
        )
        .await?["result"],
        json!({"alice": [a0]})
    );
    assert_eq!(
        call(
            &api,
            "batch_get_client_count_by_group",
            json!({"groups": ["room1", "none"]})
        )
        .await?["result"],
        json!({"room1": 2, "none": 0})
    );
    // Sessions.
    call(
        &api,
        "set_session",
        json!({"client_id": b0, "session": {"a": 1}}),
    )
    .await?;
    call(
        &api,
        "update_session",
        json!({"client_id": b0, "session": {"b": 2}}),
    )
    .await?;
    assert_eq!(
        call(&api, "get_session", json!({"client_id": b0})).await?["result"],
        json!({"a": 1, "b": 2})
    );
    assert_eq!(
        call(
            &api,
            "get_client_sessions_by_group",
            json!({"group": "room1"})
        )
        .await?["result"][&b0],
        json!({"a": 1, "b": 2})
    );
    assert_eq!(
        call(&api, "get_client_sessions", json!({})).await?["result"]
            .as_object()
            .unwrap()
            .len(),
        3
    );
    // Membership changes and closes.
    call(
        &api,
        "leave_group",
        json!({"client_id": b0, "group": "room1"}),
    )
    .await?;
    call(&api, "unbind_uid", json!({"client_id": a1})).await?;
    assert_eq!(
        call(&api, "get_client_id_by_uid", json!({"uid": "bob"})).await?["result"],
        json!([b0])
    );
    call(&api, "ungroup", json!({"group": "room1"})).await?;
    assert_eq!(
        call(&api, "get_group_id_list", json!({})).await?["result"],
        json!([])
    );
    assert!(call(&api, "is_online", json!({"client_id": b0})).await?["result"] == true);
    call(
        &api,
        "close_client",
        json!({"client_id": b0, "data": "bye"}),
    )
    .await?;
    call(&api, "destroy_client", json!({"client_id": a1})).await?;
    wait_until(Duration::from_secs(5), "closes", || {
        let addr = api.addr.clone();
        async move { matches!(api_call(&addr, KEY, "get_client_count", &json!({})).await, Ok((200, v)) if v["result"] == 1) }
    })
    .await?;
    assert_eq!(
        call(&api, "is_online", json!({"client_id": b0})).await?["result"],
        false
    );
    api.c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_applies_in_order_with_a_result_each() -> anyhow::Result<()> {
    let api = setup().await?;
    let b0 = api.ids[2].clone();
    let v = call(
        &api,
        "batch",
        json!({"ops": [
            {"op": "bind_uid", "client_id": b0, "uid": "u9"},
            {"op": "is_uid_online", "uid": "u9"},
            {"op": "join_group", "client_id": "nonsense", "group": "g"},
            {"op": "no_such_op"},
            {"op": "send_to_uid", "uid": "u9", "data": "batched"}
        ]}),
    )
    .await?;
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!(r[0]["affected"], 1);
    assert_eq!(r[1]["result"], true);
    assert_eq!(r[2]["error"]["field"], "client_id");
    assert_eq!(r[3]["error"]["code"], "unknown_method");
    assert_eq!(r[4]["delivered"], 1);
    api.c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_bad_input_get_precise_4xx_errors() -> anyhow::Result<()> {
    let api = setup().await?;
    let addr = api.addr.as_str();
    // Missing and wrong key.
    let r = request(addr, "POST", "/v1/get_client_count", &[], b"{}").await?;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()?["error"]["code"], "unauthorized");
    let (status, _) = api_call(addr, "wrong-key-wrong-key", "get_client_count", &json!({})).await?;
    assert_eq!(status, 401);
    // Malformed JSON, not an object.
    let auth = format!("Bearer {KEY}");
    let r = request(
        addr,
        "POST",
        "/v1/bind_uid",
        &[("Authorization", &auth)],
        b"{not json",
    )
    .await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["code"], "malformed_json");
    let (s, v) = api_call(addr, KEY, "bind_uid", &json!([1])).await?;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("body")));
    // Unknown method.
    let (s, v) = api_call(addr, KEY, "fly", &json!({})).await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("unknown_method"))
    );
    // Invalid client_id, empty uid, empty group, missing data, bad base64.
    for (method, body, field) in [
        (
            "bind_uid",
            json!({"client_id": "zzz", "uid": "u"}),
            "client_id",
        ),
        (
            "bind_uid",
            json!({"client_id": api.ids[0], "uid": ""}),
            "uid",
        ),
        (
            "join_group",
            json!({"client_id": api.ids[0], "group": ""}),
            "group",
        ),
        ("send_to_group", json!({"group": "g"}), "data"),
        (
            "send_to_uid",
            json!({"uid": "u", "data": "!!", "encoding": "base64"}),
            "data",
        ),
        ("send_to_uids", json!({"uids": "u", "data": "x"}), "uids"),
        (
            "set_session",
            json!({"client_id": api.ids[0], "session": [1]}),
            "session",
        ),
    ] {
        let (s, v) = api_call(addr, KEY, method, &body).await?;
        assert_eq!(s, 400, "{method} {body}: {v}");
        assert_eq!(v["error"]["field"], field, "{method}: {v}");
    }
    // Payload over the size limit: 413.
    let big = "x".repeat(70 * 1024);
    let (s, v) = api_call(addr, KEY, "send_to_all", &json!({"data": big})).await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    // Health and readiness need no key.
    let r = request(addr, "GET", "/healthz", &[], b"").await?;
    assert_eq!(r.status, 200);
    let r = request(addr, "GET", "/readyz", &[], b"").await?;
    assert_eq!(r.status, 200);
    let r = request(addr, "GET", "/metrics", &[], b"").await?;
    assert!(String::from_utf8_lossy(&r.body).contains("gateworker_gateway_connections 2"));
    api.c.stop().await;
    Ok(())
}

/// Runs gwctl (blocking: call from `block_in_place`).
fn gwctl(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = std::process::Command::new(gw_test_support::process::bin_path("gwctl"))
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gwctl_shows_status_and_pushes_over_links_and_http() -> anyhow::Result<()> {
    let mut api = setup().await?;
    let reg = api.c.register_addr.to_string();
    let secret = gw_test_support::SECRET;
    api.cl[2]
        .send_json(json!({"type":"join","room":"ops"}))
        .await?;
    api.cl[2].recv_type("joined").await?;
    let link = ["--register", reg.as_str(), "--secret", secret];
    let (code, out, err) =
        tokio::task::block_in_place(|| gwctl(&[&link[..], &["status"]].concat()))?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 gateway(s), 2 worker(s), 3 connection(s)"),
        "{out}"
    );
    assert!(out.contains("WORKER"), "{out}");
    let (code, out, _) =
        tokio::task::block_in_place(|| gwctl(&[&link[..], &["online-count"]].concat()))?;
    assert_eq!((code, out.trim()), (0, "3"));
    let (code, out, _) = tokio::task::block_in_place(|| {
        gwctl(&[&link[..], &["send-to-group", "ops", "from gwctl"]].concat())
    })?;
    assert_eq!((code, out.trim()), (0, "delivered to 1"));
    assert_eq!(
        api.cl[2]
            .recv(Duration::from_secs(5))
            .await?
            .into_text()?
            .as_str(),
        "from gwctl"
    );
    let url = format!("http://{}", api.addr);
    let http = ["--api", url.as_str(), "--api-key", KEY];
    let (code, out, _) =
        tokio::task::block_in_place(|| gwctl(&[&http[..], &["group-count", "ops"]].concat()))?;
    assert_eq!((code, out.trim()), (0, "1"));
    let (code, out, _) = tokio::task::block_in_place(|| {
        gwctl(&[&http[..], &["call", "get_group_id_list", "{}"]].concat())
    })?;
    assert_eq!(code, 0);
    assert!(out.contains("\"ops\""), "{out}");
    // Useful errors when the cluster is unreachable or the key is wrong.
    let (code, _, err) = tokio::task::block_in_place(|| {
        gwctl(&[
            "--register",
            "127.0.0.1:1",
            "--secret",
            "whatever-secret",
            "online-count",
        ])
    })?;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the cluster"), "{err}");
    let (code, _, err) = tokio::task::block_in_place(|| {
        gwctl(&["--api", &url, "--api-key", "nope", "online-count"])
    })?;
    assert_eq!(code, 1);
    assert!(err.contains("unauthorized"), "{err}");
    api.c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_a_gateway_does_not_answer_is_marked_partial() -> anyhow::Result<()> {
    let api = setup().await?;
    let reg = api.c.register_addr.to_string();
    let ws = gw_test_support::process::free_port();
    let proc_gw = gw_test_support::process::spawn_gateway(
        &reg,
        gw_test_support::SECRET,
        ws,
        "127.0.0.1:0",
        &[],
    )?;
    let (_c, id) = loop {
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_secs(2),
            WsClient::connect_chat(&format!("ws://127.0.0.1:{ws}")),
        )
        .await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let addr = api.addr.clone();
    wait_until(Duration::from_secs(10), "the API to count 4 clients", || {
        let a = addr.clone();
        async move { matches!(api_call(&a, KEY, "get_client_count", &json!({})).await, Ok((200, v)) if v["result"] == 4) }
    })
    .await?;
    proc_gw.signal("STOP");
    let v = call(&api, "get_client_count", json!({})).await?;
    proc_gw.signal("CONT");
    assert_eq!(v["result"], 3, "{v}");
    assert_eq!(v["complete"], false);
    assert_eq!(v["missing_gateways"], json!([&id[..12]]));
    api.c.stop().await;
    Ok(())
}
