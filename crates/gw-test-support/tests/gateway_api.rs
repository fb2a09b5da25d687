//! The Gateway API, call by call, across two gateways and two workers, with
//! clients on both gateways: exact frames clients receive, exact query
//! answers.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::SinkExt;
use gw_chat::Chat;
use gw_test_support::{Cluster, WsClient};
use gw_worker::{ClientId, Handle, Payload};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

const QUIET: Duration = Duration::from_millis(150);

struct Setup {
    c: Cluster,
    h: Handle,
    /// Clients 0 and 1 on gateway 0, 2 and 3 on gateway 1.
    cl: Vec<WsClient>,
    id: Vec<ClientId>,
}

async fn setup() -> anyhow::Result<Setup> {
    let mut c = Cluster::start(2).await?;
    c.add_worker(Chat).await?;
    c.add_worker(Chat).await?;
    let mut cl = Vec::new();
    let mut id = Vec::new();
    for i in 0..4 {
        let (client, cid) = WsClient::connect_chat(&c.gateways[i / 2].ws_url).await?;
        cl.push(client);
        id.push(cid.parse()?);
    }
    let h = c.workers[0].handle();
    Ok(Setup { c, h, cl, id })
}

async fn text(c: &mut WsClient) -> anyhow::Result<String> {
    match c.recv(Duration::from_secs(5)).await? {
        Message::Text(t) => Ok(t.to_string()),
        m => anyhow::bail!("expected text, got {m:?}"),
    }
}

async fn silent(cls: &mut [WsClient], which: &[usize]) -> anyhow::Result<()> {
    for &i in which {
        cls[i].expect_silence(QUIET).await?;
    }
    Ok(())
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_client_and_clients_and_binary() -> anyhow::Result<()> {
    let mut s = setup().await?;
    s.h.send_to_client(s.id[2], "one").await?;
    assert_eq!(text(&mut s.cl[2]).await?, "one");
    silent(&mut s.cl, &[0, 1, 3]).await?;
    s.h.send_to_clients(&[s.id[0], s.id[3]], "two").await?;
    assert_eq!(text(&mut s.cl[0]).await?, "two");
    assert_eq!(text(&mut s.cl[3]).await?, "two");
    silent(&mut s.cl, &[1, 2]).await?;
    s.h.send_to_client(s.id[1], Payload::binary(vec![0u8, 255, 7]))
        .await?;
    assert_eq!(
        s.cl[1].recv(Duration::from_secs(5)).await?,
        Message::Binary(vec![0u8, 255, 7].into())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_all_with_exclude() -> anyhow::Result<()> {
    let mut s = setup().await?;
    s.h.send_to_all("all", &[]).await?;
    for i in 0..4 {
        assert_eq!(text(&mut s.cl[i]).await?, "all");
    }
    s.h.send_to_all("most", &[s.id[1], s.id[2]]).await?;
    assert_eq!(text(&mut s.cl[0]).await?, "most");
    assert_eq!(text(&mut s.cl[3]).await?, "most");
    silent(&mut s.cl, &[1, 2]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_bind_send_query_unbind() -> anyhow::Result<()> {
    let mut s = setup().await?;
    s.h.bind_uid(s.id[0], "u1").await?;
    s.h.bind_uid(s.id[2], "u1").await?;
    s.h.bind_uid(s.id[3], "u2").await?;
    // Read-your-writes: the query right after the command sees it.
    assert!(s.h.is_uid_online("u1").await?);
    assert!(!s.h.is_uid_online("nobody").await?);
    assert_eq!(s.h.get_client_id_by_uid("u1").await?, {
        let mut v = vec![s.id[0], s.id[2]];
        v.sort();
        v
    });
    assert_eq!(
        s.h.get_uid_by_client_id(s.id[3]).await?.as_deref(),
        Some("u2")
    );
    assert_eq!(s.h.get_uid_by_client_id(s.id[1]).await?, None);
    assert_eq!(
        s.h.get_uid_list().await?,
        vec!["u1".to_string(), "u2".to_string()]
    );
    assert_eq!(s.h.get_uid_count().await?, 2);
    assert_eq!(
        s.h.is_uids_online(&["u1", "u2", "u3"]).await?,
        BTreeMap::from([
            ("u1".into(), true),
            ("u2".into(), true),
            ("u3".into(), false)
        ])
    );
    let batch = s.h.batch_get_client_id_by_uid(&["u2", "u3"]).await?;
    assert_eq!(batch["u2"], vec![s.id[3]]);
    assert!(batch["u3"].is_empty());

    s.h.send_to_uid("u1", "for u1").await?;
    assert_eq!(text(&mut s.cl[0]).await?, "for u1");
    assert_eq!(text(&mut s.cl[2]).await?, "for u1");
    silent(&mut s.cl, &[1, 3]).await?;
    s.h.send_to_uids(&["u1", "u2"], "both").await?;
    for i in [0, 2, 3] {
        assert_eq!(text(&mut s.cl[i]).await?, "both");
    }
    // Rebinding moves a client; unbinding removes it.
    s.h.bind_uid(s.id[2], "u2").await?;
    assert_eq!(s.h.get_client_id_by_uid("u1").await?, vec![s.id[0]]);
    s.h.unbind_uid(s.id[0]).await?;
    assert!(!s.h.is_uid_online("u1").await?);
    assert!(matches!(
        s.h.bind_uid(s.id[0], "").await,
        Err(gw_worker::Error::InvalidArgument(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_join_send_exclude_leave_ungroup_and_queries() -> anyhow::Result<()> {
    let mut s = setup().await?;
    for (i, g) in [(0, "g1"), (2, "g1"), (3, "g1"), (1, "g2"), (3, "g2")] {
        s.h.join_group(s.id[i], g).await?;
    }
    s.h.bind_uid(s.id[0], "a").await?;
    s.h.bind_uid(s.id[3], "b").await?;
    s.h.send_to_group("g1", "g1 msg", &[s.id[2]]).await?;
    assert_eq!(text(&mut s.cl[0]).await?, "g1 msg");
    assert_eq!(text(&mut s.cl[3]).await?, "g1 msg");
    silent(&mut s.cl, &[1, 2]).await?;
    // A client in both groups gets a multi-group send once.
    s.h.send_to_groups(&["g1", "g2"], "multi", &[]).await?;
    for i in 0..4 {
        assert_eq!(text(&mut s.cl[i]).await?, "multi");
    }
    silent(&mut s.cl, &[3]).await?;

    assert_eq!(s.h.get_client_count_by_group("g1").await?, 3);
    assert_eq!(s.h.get_client_count().await?, 4);
    let mut g1 = vec![s.id[0], s.id[2], s.id[3]];
    g1.sort();
    assert_eq!(s.h.get_client_id_list_by_group("g1").await?, g1);
    let mut all = s.id.clone();
    all.sort();
    assert_eq!(s.h.get_client_id_list().await?, all);
    assert_eq!(
        s.h.get_uid_list_by_group("g1").await?,
        vec!["a".to_string(), "b".to_string()]
    );
    assert_eq!(s.h.get_uid_count_by_group("g2").await?, 1);
    assert_eq!(
        s.h.get_group_id_list().await?,
        vec!["g1".to_string(), "g2".to_string()]
    );
    let counts = s.h.get_all_group_client_id_count().await?;
    assert_eq!(counts, BTreeMap::from([("g1".into(), 3), ("g2".into(), 2)]));
    let lists = s.h.get_all_group_client_id_list().await?;
    assert_eq!(lists["g1"], g1);
    let uids = s.h.get_all_group_uid_list().await?;
    assert_eq!(uids["g2"], vec!["b".to_string()]);
    assert_eq!(s.h.get_all_group_uid_count().await?["g1"], 2);
    assert_eq!(
        s.h.batch_get_client_count_by_group(&["g1", "g2", "none"])
            .await?,
        BTreeMap::from([("g1".into(), 3), ("g2".into(), 2), ("none".into(), 0)])
    );

    s.h.leave_group(s.id[3], "g1").await?;
    assert_eq!(s.h.get_client_count_by_group("g1").await?, 2);
    s.h.ungroup("g1").await?;
    assert_eq!(s.h.get_client_count_by_group("g1").await?, 0);
    assert_eq!(s.h.get_group_id_list().await?, vec!["g2".to_string()]);
    s.h.send_to_group("g1", "nobody", &[]).await?;
    silent(&mut s.cl, &[0, 1, 2, 3]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_set_update_get_and_by_group() -> anyhow::Result<()> {
    let s = setup().await?;
    s.h.set_session(s.id[2], obj(json!({"a":1,"b":2}))).await?;
    s.h.update_session(s.id[2], obj(json!({"b":3,"c":[true]})))
        .await?;
    assert_eq!(
        s.h.get_session(s.id[2]).await?,
        Some(obj(json!({"a":1,"b":3,"c":[true]})))
    );
    s.h.set_session(s.id[2], obj(json!({"z":0}))).await?;
    assert_eq!(s.h.get_session(s.id[2]).await?, Some(obj(json!({"z":0}))));
    s.h.join_group(s.id[2], "g").await?;
    s.h.set_session(s.id[0], obj(json!({"x":"y"}))).await?;
    let all = s.h.get_client_sessions().await?;
    assert_eq!(all.len(), 4);
    assert_eq!(all[&s.id[0]], obj(json!({"x":"y"})));
    assert!(all[&s.id[1]].is_empty());
    let g = s.h.get_client_sessions_by_group("g").await?;
    assert_eq!(g.len(), 1);
    assert_eq!(g[&s.id[2]], obj(json!({"z":0})));
    // Two workers updating different keys of one client: both land.
    let h2 = s.c.workers[1].handle();
    let (r1, r2) = tokio::join!(
        s.h.update_session(s.id[1], obj(json!({"from_w1":1}))),
        h2.update_session(s.id[1], obj(json!({"from_w2":2})))
    );
    r1?;
    r2?;
    // Each worker reads its own writes; after both have, both keys are there.
    h2.get_session(s.id[1]).await?;
    assert_eq!(
        s.h.get_session(s.id[1]).await?,
        Some(obj(json!({"from_w1":1,"from_w2":2})))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_online_close_and_destroy() -> anyhow::Result<()> {
    let mut s = setup().await?;
    assert!(s.h.is_online(s.id[3]).await?);
    s.h.close_client(s.id[3], Some("bye".into())).await?;
    assert_eq!(text(&mut s.cl[3]).await?, "bye");
    assert_eq!(s.cl[3].recv_close().await?, 4500);
    // Queued messages go before a normal close, not before a destroy.
    s.h.send_to_client(s.id[1], "queued").await?;
    s.h.close_client(s.id[1], None).await?;
    assert_eq!(text(&mut s.cl[1]).await?, "queued");
    assert_eq!(s.cl[1].recv_close().await?, 4500);
    s.h.destroy_client(s.id[0]).await?;
    let closed = s.cl[0].recv(Duration::from_secs(5)).await;
    assert!(
        matches!(closed, Ok(Message::Close(_)) | Err(_)),
        "{closed:?}"
    );
    gw_test_support::wait_until(Duration::from_secs(5), "closes to be seen", || {
        let h = s.h.clone();
        let ids = [s.id[0], s.id[1], s.id[3]];
        async move {
            for id in ids {
                if h.is_online(id).await.unwrap_or(true) {
                    return false;
                }
            }
            true
        }
    })
    .await?;
    assert!(s.h.is_online(s.id[2]).await?);
    assert_eq!(s.h.get_client_count().await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_reach_workers_and_text_frames_reach_clients() -> anyhow::Result<()> {
    let mut s = setup().await?;
    // The chat worker answers binary input with an error (exact frame).
    s.cl[0].ws.send(Message::Binary(vec![9, 9].into())).await?;
    let m = s.cl[0].recv_json().await?;
    assert_eq!(m["type"], "error");
    Ok(())
}
