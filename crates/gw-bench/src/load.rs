//! Message scenarios (fanout, echo, whisper) on one engine.
//!
//! Each scenario is turned into one [`Plan`] per connection: what to join,
//! what to send, and whose messages to expect. Every connection is one
//! task that connects, sets up, reports ready, waits for the common start
//! (so no message is sent before every receiver is in place), then runs a
//! closed loop: at most `window` unacknowledged messages, `messages` in
//! all, while recording every delivery in a per-sender [`SeqTracker`].
//! The coordinator only counts events and enforces the duration limit.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cli::{CommonOpts, EchoArgs, FanoutArgs, WhisperArgs};
use crate::client::{self, now_ns, Sources, Target, Ws, WsOpts, WELCOME_TIMEOUT};
use crate::proto::{self, Inbound, Payload};
use crate::report::Report;
use crate::stats::{self, Histogram, SeqCounts, SeqTracker};
use crate::ws::Next;

/// What one connection does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Global client index: sender id in payloads, index into the ack cells.
    pub idx: u32,
    pub rooms: Vec<String>,
    pub login: Option<String>,
    /// Frame prefix up to the `text` value; `None` = receive only.
    pub send: Option<String>,
    /// Senders whose every message this connection must receive.
    pub expect_from: Range<u32>,
    /// Whether receiving a message acknowledges it for the sender's window
    /// (whisper: the sender never sees its own message). Otherwise only
    /// the sender's own copy acknowledges (fanout's `said`, echo).
    pub ack_remote: bool,
}

/// Parameters shared by all connections of a run.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub messages: u64,
    pub window: u64,
    pub payload: usize,
    /// Connection attempts per second during setup (0 = unlimited).
    pub rate: f64,
    /// Keep each delivery's arrival time (for `--timeline-ms`).
    pub arrivals: bool,
}

/// Per-sender count of acknowledged messages, written by whichever task
/// sees the acknowledging delivery.
#[derive(Default)]
struct AckCell {
    acked: AtomicU64,
    notify: Notify,
}

enum Event {
    Ready,
    Complete,
    Failed,
}

struct Shared {
    targets: Vec<Target>,
    sources: Sources,
    cfg: WsOpts,
    spec: Spec,
    acks: Vec<AckCell>,
    events: mpsc::UnboundedSender<Event>,
    start: watch::Receiver<bool>,
}

/// Delivery bookkeeping of one connection.
#[derive(Default)]
struct Acct {
    trackers: Vec<SeqTracker>,
    distinct: u64,
    sent: u64,
    latencies_ns: Vec<u64>,
    /// Arrival time of each distinct delivery, when a timeline is wanted.
    arrivals_ns: Vec<u64>,
    last_delivery_ns: u64,
    /// Deliveries with an unparseable payload or from a sender not expected here.
    unexpected: u64,
}

#[derive(Default)]
struct ConnState {
    ws: Option<Ws>,
    joined: Vec<String>,
    acct: Acct,
    error: Option<String>,
}

impl Acct {
    /// `now`: when the read that fetched the frame returned.
    fn on_delivery(&mut self, plan: &Plan, sh: &Shared, now: u64, payload: Option<proto::Payload>) {
        let Some(p) = payload.filter(|p| plan.expect_from.contains(&p.sender)) else {
            self.unexpected += 1;
            return;
        };
        let tracker = &mut self.trackers[(p.sender - plan.expect_from.start) as usize];
        let arrival = tracker.record(p.seq);
        if arrival.is_first() {
            self.distinct += 1;
            self.latencies_ns.push(now.saturating_sub(p.sent_ns));
            if sh.spec.arrivals {
                self.arrivals_ns.push(now);
            }
            self.last_delivery_ns = now;
            if p.sender == plan.idx || plan.ack_remote {
                let cell = &sh.acks[p.sender as usize];
                cell.acked.fetch_add(1, Ordering::AcqRel);
                if p.sender != plan.idx {
                    cell.notify.notify_one();
                }
            }
        }
    }

    fn on_frame(&mut self, plan: &Plan, sh: &Shared, now: u64, text: &str) -> Result<()> {
        if let Some(p) = proto::scan_delivery(text) {
            self.on_delivery(plan, sh, now, Some(p));
            return Ok(());
        }
        let m = Inbound::parse(text)?;
        match m.kind.as_ref() {
            "said" | "whisper" | "echo" => {
                let payload = m.text.and_then(|t| proto::decode_payload(t.get()));
                self.on_delivery(plan, sh, now, payload);
                Ok(())
            }
            // Presence and bookkeeping frames carry nothing to account.
            "gone" | "joined" | "left" | "logged_in" | "count" | "welcome" => Ok(()),
            "error" => bail!(
                "server error: {}",
                m.reason.as_deref().unwrap_or("(no reason)")
            ),
            other => bail!("unexpected frame type {other:?}: {text}"),
        }
    }

    /// Handle every complete message already read. They all arrived with
    /// the same read, so one clock reading stamps them all.
    fn on_messages(&mut self, plan: &Plan, sh: &Shared, ws: &mut Ws) -> Result<()> {
        let now = now_ns();
        while let Some(next) = ws.next_message()? {
            match next {
                Next::Text(t) => self.on_frame(plan, sh, now, t)?,
                Next::Closed(code, reason) => {
                    bail!("server closed the connection: code {code:?} {reason:?}")
                }
                Next::Binary => bail!("unexpected binary frame"),
            }
        }
        Ok(())
    }

    fn counts(&self) -> SeqCounts {
        let mut c = SeqCounts::default();
        for t in &self.trackers {
            c.add(&t.counts());
        }
        c
    }
}

/// Connect, set up, wait for the start, then send and receive until the
/// coordinator's stop (which cancels this future).
async fn drive(
    plan: &Plan,
    sh: &Shared,
    st: &mut ConnState,
    permit: OwnedSemaphorePermit,
) -> Result<()> {
    let i = plan.idx as usize;
    let target = &sh.targets[i % sh.targets.len()];
    let ws = st
        .ws
        .insert(client::connect(target, &sh.sources, i, sh.cfg).await?);
    client::expect_welcome(ws).await?;
    drop(permit);

    let mut frames: Vec<String> = plan.rooms.iter().map(|r| proto::join_frame(r)).collect();
    frames.extend(plan.login.iter().map(|u| proto::login_frame(u)));
    let mut pending = frames.len();
    client::send_all(ws, frames).await?;
    while pending > 0 {
        let t = tokio::time::timeout(WELCOME_TIMEOUT, client::next_text(ws))
            .await
            .map_err(|_| anyhow!("no join/login reply within {WELCOME_TIMEOUT:?}"))??;
        let m = Inbound::parse(&t)?;
        match m.kind.as_ref() {
            "joined" | "logged_in" => pending -= 1,
            "gone" => {}
            "error" => bail!(
                "server error during setup: {}",
                m.reason.as_deref().unwrap_or("(no reason)")
            ),
            other => bail!("unexpected {other:?} during setup: {}", t.as_str()),
        }
    }
    st.joined = plan.rooms.clone();
    let _ = sh.events.send(Event::Ready);
    let mut start = sh.start.clone();
    start
        .wait_for(|s| *s)
        .await
        .map_err(|_| anyhow!("coordinator went away"))?;

    let to_send = if plan.send.is_some() {
        sh.spec.messages
    } else {
        0
    };
    let expected = plan.expect_from.len() as u64 * sh.spec.messages;
    let my_ack = &sh.acks[i];
    let acct = &mut st.acct;
    let mut reported = false;
    // Frames read together with the setup replies.
    acct.on_messages(plan, sh, ws)?;
    let mut f = String::new();
    loop {
        if let Some(prefix) = &plan.send {
            while acct.sent < to_send
                && acct.sent - my_ack.acked.load(Ordering::Acquire) < sh.spec.window
            {
                f.clear();
                f.push_str(prefix);
                let p = Payload {
                    sender: plan.idx,
                    seq: acct.sent,
                    sent_ns: now_ns(),
                };
                proto::encode_payload(&mut f, p, sh.spec.payload);
                f.push('}');
                ws.feed_text(&f);
                acct.sent += 1;
            }
        }
        // One write per burst: the whole window at once (and pongs, if
        // the server pinged).
        ws.flush().await?;
        if !reported && acct.sent == to_send && acct.distinct == expected {
            reported = true;
            let _ = sh.events.send(Event::Complete);
        }
        // Only a whisper sender depends on another task to open its window.
        let wait_remote = plan.ack_remote && acct.sent < to_send;
        tokio::select! {
            biased;
            r = ws.read_more() => {
                r?;
                // Everything one read fetched is handled before sending
                // again: a burst of acknowledgements then refills the window
                // with one write instead of one write per frame.
                acct.on_messages(plan, sh, ws)?;
            }
            _ = my_ack.notify.notified(), if wait_remote => {}
        }
    }
}

async fn conn_task(
    plan: Plan,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) -> ConnState {
    let mut st = ConnState {
        acct: Acct {
            trackers: (0..plan.expect_from.len())
                .map(|_| SeqTracker::new(sh.spec.messages))
                .collect(),
            ..Default::default()
        },
        ..Default::default()
    };
    let res = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => Ok(()),
        r = drive(&plan, &sh, &mut st, permit) => r,
    };
    if let Err(e) = res {
        st.error = Some(format!("client {}: {e:#}", plan.idx));
        let _ = sh.events.send(Event::Failed);
    }
    if let Some(ws) = st.ws.take() {
        // Leave first so the server has no `gone` storm to broadcast while
        // everyone disconnects at once.
        let farewell = st.joined.iter().map(|r| proto::leave_frame(r)).collect();
        client::close_quietly(ws, farewell).await;
    }
    st
}

#[derive(Default)]
struct Tally {
    ready: usize,
    complete: usize,
    failed: usize,
}

impl Tally {
    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Ready => self.ready += 1,
            Event::Complete => self.complete += 1,
            Event::Failed => self.failed += 1,
        }
    }
}

/// Process events until `done` holds (true), a client fails or the
/// deadline passes (false).
async fn wait_until(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    tally: &mut Tally,
    deadline: Instant,
    done: impl Fn(&Tally) -> bool,
) -> bool {
    loop {
        if tally.failed > 0 {
            return false;
        }
        if done(tally) {
            return true;
        }
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => tally.apply(ev),
                None => return false,
            },
            _ = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

/// Run `plans` and summarise them into a report.
pub async fn execute(
    scenario: &str,
    params: serde_json::Value,
    common: &CommonOpts,
    spec: Spec,
    plans: Vec<Plan>,
) -> Result<Report> {
    if spec.window == 0 {
        bail!("--window must be at least 1");
    }
    let targets = common
        .urls
        .iter()
        .map(|u| client::parse_target(u))
        .collect::<Result<Vec<_>>>()?;
    if targets.is_empty() {
        bail!("no --url given");
    }
    let sources = Sources::new(common.source_ips, &targets)?;
    sources.check_capacity(plans.len())?;
    // Fail before connecting anything if a --pid is wrong.
    client::cpu_sum_s(&common.pids)?;
    let n = plans.len();
    let expected: u64 = plans
        .iter()
        .map(|p| p.expect_from.len() as u64 * spec.messages)
        .sum();
    let run_start = Instant::now();
    let deadline = run_start + Duration::from_secs_f64(common.duration_limit);

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (start_tx, start_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let sh = Arc::new(Shared {
        targets,
        sources,
        cfg: client::ws_opts(common.read_buffer, common.write_buffer),
        spec,
        acks: (0..n).map(|_| AckCell::default()).collect(),
        events: ev_tx,
        start: start_rx,
    });
    let sem = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let mut tally = Tally::default();
    let mut errors: Vec<String> = Vec::new();

    let mut handles = Vec::with_capacity(n);
    for (i, plan) in plans.into_iter().enumerate() {
        if spec.rate > 0.0 {
            tokio::time::sleep_until(run_start + Duration::from_secs_f64(i as f64 / spec.rate))
                .await;
        }
        while let Ok(ev) = ev_rx.try_recv() {
            tally.apply(ev);
        }
        if tally.failed > 0 {
            break;
        }
        let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await
        else {
            break;
        };
        handles.push(tokio::spawn(conn_task(
            plan,
            sh.clone(),
            stop_rx.clone(),
            permit,
        )));
    }

    let mut ready =
        handles.len() == n && wait_until(&mut ev_rx, &mut tally, deadline, |t| t.ready == n).await;
    let setup_s = run_start.elapsed().as_secs_f64();
    if !ready && tally.failed == 0 {
        errors.push(format!(
            "duration limit of {}s reached during setup ({} of {n} clients ready)",
            common.duration_limit, tally.ready
        ));
    }
    let server_cpu_before = client::cpu_sum_s(&common.pids)?;
    let gen_cpu_before = client::cpu_s("self").ok();
    let start_ns = now_ns();
    let mut complete = false;
    let mut cpu = (None, None);
    if ready {
        let _ = start_tx.send(true);
        complete = wait_until(&mut ev_rx, &mut tally, deadline, |t| t.complete == n).await;
        let wall_s = (now_ns() - start_ns) as f64 / 1e9;
        cpu = (
            client::cpu_pct(gen_cpu_before, client::cpu_s("self").ok(), wall_s),
            client::cpu_pct(server_cpu_before, client::cpu_sum_s(&common.pids)?, wall_s),
        );
        if !complete && tally.failed == 0 {
            errors.push(format!(
                "duration limit of {}s reached before all deliveries ({} of {n} clients complete)",
                common.duration_limit, tally.complete
            ));
        }
        if complete {
            // Late duplicates would arrive now; keep reading briefly.
            tokio::time::sleep(Duration::from_millis(common.linger_ms)).await;
        }
    }
    let stop_ns = now_ns();
    let _ = stop_tx.send(true);
    ready &= tally.failed == 0;

    let mut counts = SeqCounts::default();
    let mut hist = Histogram::new();
    let mut sent = 0u64;
    let mut unexpected = 0u64;
    let mut last_ns = start_ns;
    let mut arrivals: Vec<u64> = Vec::new();
    for h in handles {
        match h.await {
            Ok(st) => {
                counts.add(&st.acct.counts());
                for &l in &st.acct.latencies_ns {
                    hist.record(l);
                }
                sent += st.acct.sent;
                unexpected += st.acct.unexpected;
                last_ns = last_ns.max(st.acct.last_delivery_ns);
                arrivals.extend_from_slice(&st.acct.arrivals_ns);
                errors.extend(st.error);
            }
            Err(e) => errors.push(format!("client task failed: {e}")),
        }
    }
    // Throughput is measured from the start signal to the last delivery;
    // an incomplete run is charged up to when it was stopped.
    let end_ns = if complete { last_ns } else { stop_ns };
    let elapsed_s = if ready {
        end_ns.saturating_sub(start_ns) as f64 / 1e9
    } else {
        0.0
    };
    let per_sec = |v: u64| {
        if elapsed_s > 0.0 {
            v as f64 / elapsed_s
        } else {
            0.0
        }
    };
    let mut report = Report {
        scenario: scenario.to_string(),
        params,
        urls: common.urls.clone(),
        connections: n as u64,
        setup_s,
        elapsed_s,
        sent: Some(sent),
        expected: Some(expected),
        delivered: Some(counts.delivered),
        lost: Some(expected - counts.delivered),
        duplicated: Some(counts.duplicated),
        reordered: Some(counts.reordered),
        unexpected: Some(unexpected + counts.out_of_range),
        sent_per_sec: Some(per_sec(sent)),
        deliveries_per_sec: Some(per_sec(counts.delivered)),
        latency_ms: Some(hist.summary_ms()),
        timeline_ms: (common.timeline_ms > 0).then_some(common.timeline_ms),
        timeline: if common.timeline_ms > 0 {
            stats::timeline(&arrivals, start_ns, common.timeline_ms * 1_000_000)
        } else {
            Vec::new()
        },
        generator_cpu_pct: cpu.0,
        server_cpu_pct: cpu.1,
        server_pids: (!common.pids.is_empty()).then(|| common.pids.clone()),
        ..Default::default()
    };
    for e in errors {
        report.add_error(e);
    }
    report.finish();
    Ok(report)
}

/// Fanout: R rooms of S members; the first K members of each room send.
pub async fn run_fanout(a: &FanoutArgs) -> Result<Report> {
    if a.rooms == 0 || a.members == 0 {
        bail!("--rooms and --members must be at least 1");
    }
    if a.senders == 0 || a.senders > a.members {
        bail!("--senders must be between 1 and --members");
    }
    let n = a.rooms * a.members;
    let plans = (0..n)
        .map(|c| {
            let room = c / a.members;
            let pos = c % a.members;
            let first = (room * a.members) as u32;
            let name = format!("r{room}");
            Plan {
                idx: c as u32,
                send: (pos < a.senders).then(|| proto::say_prefix(&name)),
                rooms: vec![name],
                login: None,
                expect_from: first..first + a.senders as u32,
                ack_remote: false,
            }
        })
        .collect();
    let params = json!({
        "rooms": a.rooms, "members": a.members, "senders": a.senders,
        "messages": a.messages, "window": a.window, "payload": a.payload,
        "source_ips": a.common.source_ips,
    });
    let spec = Spec {
        messages: a.messages,
        window: a.window,
        payload: a.payload,
        rate: a.rate,
        arrivals: a.common.timeline_ms > 0,
    };
    execute("fanout", params, &a.common, spec, plans).await
}

/// Echo: every client sends `echo` and receives its own copies back.
pub async fn run_echo(a: &EchoArgs) -> Result<Report> {
    if a.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let plans = (0..a.clients as u32)
        .map(|c| Plan {
            idx: c,
            rooms: vec![],
            login: None,
            send: Some(proto::echo_prefix()),
            expect_from: c..c + 1,
            ack_remote: false,
        })
        .collect();
    let params = json!({
        "clients": a.clients, "messages": a.messages, "window": a.window,
        "payload": a.payload, "source_ips": a.common.source_ips,
    });
    let spec = Spec {
        messages: a.messages,
        window: a.window,
        payload: a.payload,
        rate: a.rate,
        arrivals: a.common.timeline_ms > 0,
    };
    execute("echo", params, &a.common, spec, plans).await
}

/// Whisper: client i logs in as u<i> and whispers to u<(i+1)%N>.
pub async fn run_whisper(a: &WhisperArgs) -> Result<Report> {
    if a.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let n = a.clients as u32;
    let plans = (0..n)
        .map(|c| {
            let from = (c + n - 1) % n;
            Plan {
                idx: c,
                rooms: vec![],
                login: Some(format!("u{c}")),
                send: Some(proto::whisper_prefix(&format!("u{}", (c + 1) % n))),
                expect_from: from..from + 1,
                ack_remote: true,
            }
        })
        .collect();
    let params = json!({
        "clients": a.clients, "messages": a.messages, "window": a.window,
        "payload": a.payload, "source_ips": a.common.source_ips,
    });
    let spec = Spec {
        messages: a.messages,
        window: a.window,
        payload: a.payload,
        rate: a.rate,
        arrivals: a.common.timeline_ms > 0,
    };
    execute("whisper", params, &a.common, spec, plans).await
}
