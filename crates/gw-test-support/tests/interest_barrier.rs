//! The interest barrier: once a client sees the reply to its join or bind,
//! every worker that acknowledges interest routes group and uid sends to
//! its gateway. A raw link (a push client: it takes no events) stands in
//! for a worker whose acknowledgements the test controls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gw_chat::{Chat, TokenChat};
use gw_gateway::routing::InterestAckState;
use gw_link::frame;
use gw_protocol::pb::{self, link_frame::Body, Role};
use gw_test_support::{wait_until, Cluster, GatewayNode, WsClient, SECRET};
use gw_worker::Command;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A push-client link to one gateway: answers pings, hands every Interest
/// frame to the test and acknowledges only the versions the test sends.
struct RawLink {
    interests: mpsc::UnboundedReceiver<pb::Interest>,
    acks: mpsc::UnboundedSender<u64>,
    task: JoinHandle<()>,
}

impl RawLink {
    async fn connect(gw: &GatewayNode, name: &str) -> anyhow::Result<Self> {
        let (mut link, _) = gw_link::connect(
            &gw.internal_addr.to_string(),
            SECRET.as_bytes(),
            Role::PushClient,
            name,
            16 << 20,
            Duration::from_secs(2),
        )
        .await?;
        let (itx, interests) = mpsc::unbounded_channel();
        let (acks, mut arx) = mpsc::unbounded_channel::<u64>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    f = link.next() => {
                        let Some(Ok(f)) = f else { return };
                        let sent = match f.body {
                            Some(Body::Ping(p)) => link.send(frame(Body::Pong(pb::Pong { nonce: p.nonce }))).await,
                            Some(Body::Interest(i)) => {
                                let _ = itx.send(i);
                                Ok(())
                            }
                            _ => Ok(()),
                        };
                        if sent.is_err() {
                            return;
                        }
                    }
                    v = arx.recv() => {
                        let Some(version) = v else { return };
                        if link.send(frame(Body::InterestAck(pb::InterestAck { version }))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(RawLink {
            interests,
            acks,
            task,
        })
    }

    async fn next_interest(&mut self) -> anyhow::Result<pb::Interest> {
        tokio::time::timeout(Duration::from_secs(5), self.interests.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("raw link closed"))
    }

    fn ack(&self, version: u64) {
        let _ = self.acks.send(version);
    }
}

impl Drop for RawLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ack_state(gw: &GatewayNode, name: &str) -> InterestAckState {
    gw.handle
        .interest_acks()
        .into_iter()
        .find(|a| a.node_id == name)
        .unwrap_or_else(|| panic!("no link from {name}"))
}

/// Joins and binds whose reply waited for interest acknowledgements.
fn waits(gw: &GatewayNode) -> u64 {
    gw.handle.metrics.interest_waits.load(Ordering::Relaxed)
}

/// Peers marked lagging after a wait timed out.
fn timeouts(gw: &GatewayNode) -> u64 {
    gw.handle
        .metrics
        .interest_ack_timeouts
        .load(Ordering::Relaxed)
}

/// Connects the raw link and acknowledges its snapshot; returns once the
/// gateway has taken the acknowledgement.
async fn acking_raw_link(gw: &GatewayNode, name: &str) -> anyhow::Result<RawLink> {
    let mut raw = RawLink::connect(gw, name).await?;
    let snapshot = raw.next_interest().await?;
    assert!(snapshot.reset && snapshot.version >= 1, "{snapshot:?}");
    raw.ack(snapshot.version);
    wait_until(Duration::from_secs(5), "the snapshot ack", || {
        let acked = ack_state(gw, name).acked;
        async move { acked == snapshot.version }
    })
    .await?;
    Ok(raw)
}

/// The raw link takes the next Interest frame (it must pass `check`),
/// holds its acknowledgement for 300 ms and raises the flag just before
/// sending it. The task gives the link back.
fn hold_next_ack(
    mut raw: RawLink,
    check: impl Fn(&pb::Interest) -> bool + Send + 'static,
) -> (Arc<AtomicBool>, JoinHandle<anyhow::Result<RawLink>>) {
    let acked = Arc::new(AtomicBool::new(false));
    let flag = acked.clone();
    let task = tokio::spawn(async move {
        let change = raw.next_interest().await?;
        anyhow::ensure!(check(&change), "unexpected interest frame {change:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        flag.store(true, Ordering::SeqCst);
        raw.ack(change.version);
        Ok(raw)
    });
    (acked, task)
}

async fn join(c: &mut WsClient, room: &str) -> anyhow::Result<()> {
    c.send_json(json!({"type":"join","room":room})).await?;
    assert_eq!(c.recv_type("joined").await?["room"], room);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_reply_waits_until_every_acknowledging_link_has_the_new_group() -> anyhow::Result<()>
{
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let gw = &c.gateways[0];
    let raw = acking_raw_link(gw, "slow-acker").await?;
    let (mut bob, _) = WsClient::connect_chat(&gw.ws_url).await?;

    // The raw link holds its acknowledgement of the join's interest change
    // for 300 ms, and raises the flag just before sending it.
    let (acked, holder) = hold_next_ack(raw, |i| i.groups_added == ["fresh"] && i.version > 1);
    bob.send_json(json!({"type":"join","room":"fresh"})).await?;
    assert_eq!(
        bob.recv_json().await?,
        json!({"type":"joined","room":"fresh"})
    );
    assert!(
        acked.load(Ordering::SeqCst),
        "bob saw `joined` before the other link acknowledged the new group"
    );
    let raw = holder.await??;
    assert_eq!(waits(gw), 1);
    assert_eq!(timeouts(gw), 0);

    // A second member of the same group adds nothing new: no wait.
    let (mut carol, _) = WsClient::connect_chat(&gw.ws_url).await?;
    join(&mut carol, "fresh").await?;
    assert_eq!(waits(gw), 1);
    drop(raw);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_never_acknowledges_is_not_waited_for() -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let gw = &c.gateways[0];
    let mut raw = RawLink::connect(gw, "old-sdk").await?;
    assert!(raw.next_interest().await?.reset);
    let (mut bob, _) = WsClient::connect_chat(&gw.ws_url).await?;
    join(&mut bob, "fresh").await?;
    // The reply came although the link has acknowledged nothing, and
    // nothing waited.
    assert_eq!(ack_state(gw, "old-sdk").acked, 0);
    assert_eq!(waits(gw), 0);
    assert_eq!(timeouts(gw), 0);
    assert_eq!(raw.next_interest().await?.groups_added, ["fresh"]);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_stops_acknowledging_is_waited_for_once_then_marked_lagging(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let gw = &c.gateways[0];
    let mut raw = acking_raw_link(gw, "stuck").await?;
    let (mut bob, _) = WsClient::connect_chat(&gw.ws_url).await?;

    // The first join waits for the link until the timeout (1 s), then
    // the reply goes out and the link is marked lagging.
    join(&mut bob, "first").await?;
    assert_eq!(waits(gw), 1);
    assert_eq!(timeouts(gw), 1);
    assert!(ack_state(gw, "stuck").lagging);

    // Lagging: the next join does not wait for it.
    join(&mut bob, "second").await?;
    assert_eq!(waits(gw), 1);
    assert_eq!(timeouts(gw), 1);

    // Once it acknowledges what it missed, it is waited for again.
    let first = raw.next_interest().await?;
    assert_eq!(first.groups_added, ["first"]);
    let second = raw.next_interest().await?;
    assert_eq!(second.groups_added, ["second"]);
    raw.ack(second.version);
    wait_until(Duration::from_secs(5), "the late ack", || {
        let s = ack_state(gw, "stuck");
        async move { s.acked == second.version && !s.lagging }
    })
    .await?;
    join(&mut bob, "third").await?;
    assert_eq!(waits(gw), 2);
    assert_eq!(timeouts(gw), 2);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_given_at_the_handshake_is_acknowledged_before_the_upgrade() -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    c.add_worker(TokenChat {
        token: "secret-token".into(),
    })
    .await?;
    let gw = &c.gateways[0];
    let raw = acking_raw_link(gw, "slow-acker").await?;
    let (acked, holder) = hold_next_ack(raw, |i| i.uids_added == ["bob"]);
    let url = format!("{}/?token=secret-token&uid=bob", gw.ws_url);
    let (_bob, _) = WsClient::connect_chat(&url).await?;
    assert!(
        acked.load(Ordering::SeqCst),
        "bob was upgraded before the other link acknowledged his uid"
    );
    holder.await??;
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counted_join_is_answered_after_the_acknowledgements() -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let gw = &c.gateways[0];
    let raw = acking_raw_link(gw, "slow-acker").await?;
    let (_bob, bob_id) = WsClient::connect_chat(&gw.ws_url).await?;
    let push = gw_worker::PushClient::builder()
        .register(c.register_addr.to_string())
        .secret(SECRET)
        .connect()
        .await?;
    let (acked, holder) = hold_next_ack(raw, |i| i.groups_added == ["pushed"]);
    // `execute` waits for the gateway's CommandReply (the HTTP push API
    // and gwctl call it): it comes after the acknowledgement too.
    let joined = push
        .handle()
        .execute(Command::JoinGroup {
            client_id: bob_id.parse()?,
            group: "pushed".into(),
        })
        .await?;
    assert_eq!(joined, 1);
    assert!(
        acked.load(Ordering::SeqCst),
        "the join was answered before the other link acknowledged the new group"
    );
    holder.await??;
    push.stop().await;
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whisper_right_after_a_login_on_another_gateway_arrives() -> anyhow::Result<()> {
    let mut c = Cluster::start(2).await?;
    c.add_worker(Chat).await?;
    c.add_worker(Chat).await?;
    let (g1, g2) = (&c.gateways[0], &c.gateways[1]);
    let (mut alice, alice_id) = WsClient::connect_chat(&g1.ws_url).await?;
    let (mut bob, _) = WsClient::connect_chat(&g2.ws_url).await?;
    let start = g2.handle.interest_version();
    for i in 0..20 {
        let uid = format!("bob-{i}");
        bob.send_json(json!({"type":"login","uid":uid})).await?;
        assert_eq!(bob.recv_type("logged_in").await?["uid"], uid.as_str());
        // Every link but the one that bound bob has his uid already.
        let version = g2.handle.interest_version();
        let acks = g2.handle.interest_acks();
        let behind: Vec<_> = acks.iter().filter(|a| a.acked < version).collect();
        assert!(behind.len() <= 1, "at version {version}: {acks:?}");
        alice
            .send_json(json!({"type":"whisper","to":uid,"text":i}))
            .await?;
        assert_eq!(
            bob.recv_type("whisper").await?,
            json!({"type":"whisper","from":alice_id,"text":i})
        );
    }
    // Each login moved the uid: a removal and an addition.
    let end = g2.handle.interest_version();
    assert!(end >= start + 39, "{start} -> {end}");
    for g in [g1, g2] {
        wait_until(Duration::from_secs(5), "every link to acknowledge", || {
            let v = g.handle.interest_version();
            let acks = g.handle.interest_acks();
            async move { acks.len() == 2 && acks.iter().all(|a| a.acked == v) }
        })
        .await?;
    }
    assert_eq!(timeouts(g2), 0);
    c.stop().await;
    Ok(())
}

/// A raw push-client link for sending commands by hand; it acknowledges
/// nothing, so it is never waited for.
async fn pushing_link(gw: &GatewayNode) -> anyhow::Result<gw_link::FramedLink> {
    let (link, _) = gw_link::connect(
        &gw.internal_addr.to_string(),
        SECRET.as_bytes(),
        Role::PushClient,
        "pusher",
        16 << 20,
        Duration::from_secs(2),
    )
    .await?;
    Ok(link)
}

/// An uncounted command frame.
fn command(kind: pb::command::Kind) -> pb::LinkFrame {
    frame(Body::Command(pb::Command {
        id: 0,
        kind: Some(kind),
    }))
}

fn send_to_client(client_id: String, json: &str) -> pb::LinkFrame {
    command(pb::command::Kind::SendToClients(pb::SendToClients {
        client_ids: vec![client_id],
        payload: Some(pb::Payload {
            data: json.as_bytes().to_vec().into(),
            binary: false,
        }),
    }))
}

/// A peer that closes its side while its link waits: what it sent before
/// the close (held behind the wait) is still handled once the wait ends.
/// A worker stopping gracefully sends its last commands and acks, then
/// half-closes; dropping them would lose the commands and redeliver the
/// events the acks were for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_before_a_close_are_handled_after_the_wait() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut c = Cluster::start(1).await?;
    c.add_worker(Chat).await?;
    let gw = &c.gateways[0];
    // Acknowledges its snapshot, then nothing: a join of a new group waits
    // for it until the timeout (1 s).
    let stuck = acking_raw_link(gw, "stuck").await?;
    let (mut bob, bob_id) = WsClient::connect_chat(&gw.ws_url).await?;

    let mut pusher = pushing_link(gw).await?;
    pusher
        .feed(command(pb::command::Kind::JoinGroup(pb::JoinGroup {
            client_id: bob_id.clone(),
            group: "fresh".into(),
        })))
        .await?;
    pusher
        .feed(send_to_client(bob_id, r#"{"type":"after-join"}"#))
        .await?;
    pusher.flush().await?;
    // Closed while the send is held behind the join's wait.
    pusher.get_mut().shutdown().await?;
    assert_eq!(bob.recv_type("after-join").await?["type"], "after-join");
    assert_eq!(waits(gw), 1);
    assert_eq!(timeouts(gw), 1);
    // The gateway ends the link once it has handled what was held.
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = pusher.next().await {}
    })
    .await?;
    drop(stuck);
    c.stop().await;
    Ok(())
}

/// A peer that sends more than the gateway holds while its link waits ends
/// the wait early instead of being left unread (it must stay free to read
/// its events and to acknowledge), and everything it sent is handled in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_past_the_held_bound_ends_the_wait_early() -> anyhow::Result<()> {
    let mut c = Cluster::start(0).await?;
    let mut config = gw_test_support::gateway_config(&[c.register_addr]);
    // A wait this long would outlast the test: only the bound can end it.
    config.interest_ack_timeout_ms = 50_000;
    config.handshake_timeout_ms = 60_000;
    c.add_gateway(config).await?;
    c.add_worker(Chat).await?;
    let gw = &c.gateways[0];
    let stuck = acking_raw_link(gw, "stuck").await?;
    let (mut bob, bob_id) = WsClient::connect_chat(&gw.ws_url).await?;

    let mut pusher = pushing_link(gw).await?;
    pusher
        .feed(command(pb::command::Kind::JoinGroup(pb::JoinGroup {
            client_id: bob_id.clone(),
            group: "fresh".into(),
        })))
        .await?;
    // 20 sends of 64 KiB to a uid nobody has: 1.25 MiB held, past the
    // 1 MiB bound. Then one to bob, which must come after all of them.
    let big = format!("\"{}\"", "x".repeat(64 * 1024));
    for _ in 0..20 {
        pusher
            .feed(command(pb::command::Kind::SendToUids(pb::SendToUids {
                uids: vec!["nobody".into()],
                payload: Some(pb::Payload {
                    data: big.clone().into_bytes().into(),
                    binary: false,
                }),
            })))
            .await?;
    }
    pusher
        .feed(send_to_client(bob_id, r#"{"type":"after-the-burst"}"#))
        .await?;
    pusher.flush().await?;
    bob.recv_type("after-the-burst").await?;
    assert_eq!(waits(gw), 1);
    // Cut short, not timed out: nobody is marked lagging.
    assert_eq!(timeouts(gw), 0);
    assert!(!ack_state(gw, "stuck").lagging);
    drop((stuck, pusher));
    c.stop().await;
    Ok(())
}
