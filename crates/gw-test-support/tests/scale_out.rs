//! Interest-based routing: a group or uid message goes only to gateways
//! with members for it, and no member ever misses a message sent after it
//! joined.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gw_chat::Chat;
use gw_test_support::{wait_until, Cluster, WsClient};
use gw_worker::ClientId;
use tokio_tungstenite::tungstenite::Message;

fn commands(c: &Cluster) -> Vec<u64> {
    c.gateways
        .iter()
        .map(|g| g.handle.metrics.commands_in.load(Ordering::Relaxed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_uid_sends_reach_only_gateways_with_members() -> anyhow::Result<()> {
    let mut c = Cluster::start(8).await?;
    c.add_worker(Chat).await?;
    let h = c.workers[0].handle();
    // Five members, all on gateway 3.
    let mut members = Vec::new();
    for _ in 0..5 {
        let (cl, id) = WsClient::connect_chat(&c.gateways[3].ws_url).await?;
        let id: ClientId = id.parse()?;
        h.join_group(id, "g").await?;
        h.bind_uid(id, "u").await?;
        members.push(cl);
    }
    // A worker that joins later learns the interest set from the snapshot.
    c.add_worker(Chat).await?;
    let late = c.workers[1].handle();
    for handle in [&h, &late] {
        let before = commands(&c);
        for i in 0..50 {
            handle.send_to_group("g", format!("m{i}"), &[]).await?;
        }
        for i in 0..50 {
            handle.send_to_uid("u", format!("u{i}")).await?;
        }
        for m in members.iter_mut() {
            for i in 0..50 {
                assert_eq!(
                    m.recv(Duration::from_secs(5)).await?,
                    Message::Text(format!("m{i}").into())
                );
            }
            for i in 0..50 {
                assert_eq!(
                    m.recv(Duration::from_secs(5)).await?,
                    Message::Text(format!("u{i}").into())
                );
            }
        }
        let after = commands(&c);
        let per_gateway: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        eprintln!(
            "link commands per gateway for 100 sends (members on gateway 3): {per_gateway:?}"
        );
        for (i, n) in per_gateway.iter().enumerate() {
            assert_eq!(
                *n,
                if i == 3 { 100 } else { 0 },
                "gateway {i}: {per_gateway:?}"
            );
        }
    }
    // Send-to-all still reaches every gateway.
    let before = commands(&c);
    h.send_to_all("everyone", &[]).await?;
    wait_until(
        Duration::from_secs(5),
        "send_to_all on every gateway",
        || {
            let after = commands(&c);
            let ok = after.iter().zip(&before).all(|(a, b)| a - b == 1);
            async move { ok }
        },
    )
    .await?;
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_during_a_stream_of_sends_miss_nothing_after_their_first(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(4).await?;
    c.add_worker(Chat).await?;
    c.add_worker(Chat).await?;
    let joiner = c.workers[0].handle();
    let sender = c.workers[1].handle();
    let urls: Vec<String> = c.gateways.iter().map(|g| g.ws_url.clone()).collect();
    // The stream runs until every member has joined, then 100 sends more:
    // a fixed count raced the joins (a faster link ended it before half of
    // them had joined, and the test failed on speed, not on a lost message).
    let all_joined = Arc::new(AtomicBool::new(false));
    let stream = tokio::spawn({
        let all_joined = all_joined.clone();
        async move {
            let mut tail = None;
            let mut i = 0usize;
            while tail.is_none_or(|t| i < t) {
                sender.send_to_group("live", i.to_string(), &[]).await?;
                i += 1;
                if i.is_multiple_of(20) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if tail.is_none() && all_joined.load(Ordering::Acquire) {
                    tail = Some(i + 100);
                }
            }
            anyhow::Ok(i)
        }
    });
    // Members join on every gateway while the stream runs (the sending
    // worker learns about most of them only through interest changes).
    let mut members = Vec::new();
    for i in 0..16 {
        let (cl, id) = WsClient::connect_chat(&urls[i % urls.len()]).await?;
        joiner.join_group(id.parse()?, "live").await?;
        members.push(cl);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    all_joined.store(true, Ordering::Release);
    let sent = stream.await??;
    let mut with_messages = 0;
    for (k, m) in members.iter_mut().enumerate() {
        let mut got = Vec::new();
        while let Ok(Message::Text(t)) = m.recv(Duration::from_millis(500)).await {
            got.push(t.parse::<usize>()?);
        }
        let Some(first) = got.first().copied() else {
            continue; // joined after the last send
        };
        let expected: Vec<usize> = (first..sent).collect();
        assert_eq!(
            got, expected,
            "member {k} missed messages after its first ({first})"
        );
        with_messages += 1;
    }
    assert!(
        with_messages >= 8,
        "only {with_messages} of 16 members joined before the stream ended"
    );
    c.stop().await;
    Ok(())
}
