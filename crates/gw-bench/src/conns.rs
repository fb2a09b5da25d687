//! The `conns` scenario: many idle connections, opened at a fixed rate.
//!
//! Measures connect time (TCP connect to `welcome`) and what holding the
//! connections costs the server (VmRSS of the given pids) and the generator.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cli::ConnsArgs;
use crate::client::{self, Sources, Target, Ws, WsOpts};
use crate::report::Report;
use crate::stats::Histogram;
use crate::ws::Next;

enum Event {
    Connected,
    Failed,
    /// Connected earlier, then lost while held (already counted as connected).
    Dropped,
}

#[derive(Default)]
struct HoldResult {
    connect_ns: Option<u64>,
    error: Option<String>,
}

/// Returns why the connection ended; only returns if the server dropped it.
async fn watch_for_drop(ws: &mut Ws) -> String {
    loop {
        loop {
            match ws.next_message() {
                Err(e) => return format!("protocol error while held: {e:#}"),
                Ok(None) => break,
                Ok(Some(Next::Closed(code, reason))) => {
                    return format!("closed by the server while held: code {code:?} {reason:?}")
                }
                // Anything else (a broadcast) is harmless for an idle client.
                Ok(Some(Next::Text(_))) => {}
                Ok(Some(Next::Binary)) => {}
            }
        }
        // Answers to pings, if any were read.
        if let Err(e) = ws.flush().await {
            return format!("write error while held: {e:#}");
        }
        if let Err(e) = ws.read_more().await {
            return format!("{e:#} while held");
        }
    }
}

async fn hold_task(
    target: Target,
    sources: Arc<Sources>,
    i: usize,
    cfg: WsOpts,
    permit: OwnedSemaphorePermit,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) -> HoldResult {
    let mut res = HoldResult::default();
    let t0 = Instant::now();
    let connecting = async {
        let mut ws = client::connect(&target, &sources, i, cfg).await?;
        client::expect_welcome(&mut ws).await?;
        anyhow::Ok(ws)
    };
    let ws = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => None,
        r = connecting => match r {
            Ok(ws) => Some(ws),
            Err(e) => {
                res.error = Some(format!("{e:#}"));
                let _ = events.send(Event::Failed);
                None
            }
        },
    };
    drop(permit);
    let Some(mut ws) = ws else { return res };
    res.connect_ns = Some(t0.elapsed().as_nanos() as u64);
    let _ = events.send(Event::Connected);
    let dropped = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => None,
        why = watch_for_drop(&mut ws) => Some(why),
    };
    if let Some(why) = dropped {
        res.error = Some(why);
        let _ = events.send(Event::Dropped);
        return res;
    }
    client::close_quietly(ws, vec![]).await;
    res
}

pub async fn run_conns(a: &ConnsArgs) -> Result<Report> {
    let common = &a.common;
    let targets = common
        .urls
        .iter()
        .map(|u| client::parse_target(u))
        .collect::<Result<Vec<_>>>()?;
    if targets.is_empty() {
        bail!("no --url given");
    }
    let sources = Arc::new(Sources::new(common.source_ips, &targets)?);
    sources.check_capacity(a.count)?;
    let cfg = client::ws_opts(common.read_buffer, common.write_buffer);
    let n = a.count;
    // Read once up front so a wrong pid fails before any load is sent.
    let pids = &common.pids;
    let server_before = if pids.is_empty() {
        None
    } else {
        Some(client::rss_sum_kib(pids)?)
    };
    let gen_before = client::rss_kib("self").ok();
    let server_cpu_before = client::cpu_sum_s(pids)?;
    let gen_cpu_before = client::cpu_s("self").ok();

    let run_start = Instant::now();
    let deadline = run_start + Duration::from_secs_f64(common.duration_limit);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let mut connected = 0usize;
    let mut failed = 0usize;
    let mut errors = Vec::new();

    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        if a.rate > 0.0 {
            tokio::time::sleep_until(run_start + Duration::from_secs_f64(i as f64 / a.rate)).await;
        }
        let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await
        else {
            errors.push(format!(
                "duration limit of {}s reached after starting {i} of {n} connections",
                common.duration_limit
            ));
            break;
        };
        handles.push(tokio::spawn(hold_task(
            targets[i % targets.len()].clone(),
            sources.clone(),
            i,
            cfg,
            permit,
            ev_tx.clone(),
            stop_rx.clone(),
        )));
    }
    let spawned = handles.len();
    // Failures during the hold are counted too, so stop counting at the
    // first moment every attempt has an outcome.
    while connected + failed < spawned {
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(Event::Connected) => connected += 1,
                Some(Event::Failed) => failed += 1,
                Some(Event::Dropped) => {}
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                errors.push(format!(
                    "duration limit of {}s reached with {} of {spawned} connections established",
                    common.duration_limit, connected
                ));
                break;
            }
        }
    }
    let connect_elapsed = run_start.elapsed().as_secs_f64();
    let server_cpu_pct =
        client::cpu_pct(server_cpu_before, client::cpu_sum_s(pids)?, connect_elapsed);
    let generator_cpu_pct =
        client::cpu_pct(gen_cpu_before, client::cpu_s("self").ok(), connect_elapsed);

    let wanted_until = Instant::now() + Duration::from_secs_f64(a.hold);
    let hold_until = wanted_until.min(deadline);
    if hold_until < wanted_until {
        errors.push(format!(
            "hold cut short by the duration limit of {}s",
            common.duration_limit
        ));
    }
    let hold_start = Instant::now();
    tokio::time::sleep_until(hold_until).await;
    let hold_s = hold_start.elapsed().as_secs_f64();
    // Measured while every connection is still open.
    let server_after = if pids.is_empty() {
        None
    } else {
        Some(client::rss_sum_kib(pids)?)
    };
    let gen_after = client::rss_kib("self").ok();
    let _ = stop_tx.send(true);

    let mut hist = Histogram::new();
    let mut established = 0u64;
    let mut lost_conns = 0u64;
    for h in handles {
        match h.await {
            Ok(r) => {
                if let Some(ns) = r.connect_ns {
                    hist.record(ns);
                    established += 1;
                }
                if let Some(e) = r.error {
                    lost_conns += 1;
                    errors.push(e);
                }
            }
            Err(e) => {
                lost_conns += 1;
                errors.push(format!("connection task failed: {e}"));
            }
        }
    }
    // Attempts never made (deadline) count as failed connections too.
    let not_started = (n - spawned) as u64;
    let per_conn = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) if established > 0 => Some((a as f64 - b as f64) / established as f64),
        _ => None,
    };
    let mut report = Report {
        scenario: "conns".into(),
        params: json!({
            "count": n, "rate": a.rate, "hold": a.hold,
            "source_ips": common.source_ips, "connect_concurrency": common.connect_concurrency,
            "read_buffer": common.read_buffer, "write_buffer": common.write_buffer,
        }),
        urls: common.urls.clone(),
        connections: n as u64,
        setup_s: connect_elapsed,
        elapsed_s: connect_elapsed,
        connected: Some(established),
        failed: Some(lost_conns + not_started),
        connects_per_sec: Some(if connect_elapsed > 0.0 {
            established as f64 / connect_elapsed
        } else {
            0.0
        }),
        connect_ms: Some(hist.summary_ms()),
        hold_s: Some(hold_s),
        server_pids: (!pids.is_empty()).then(|| pids.clone()),
        generator_cpu_pct,
        server_cpu_pct,
        server_rss_before_kib: server_before,
        server_rss_after_kib: server_after,
        server_kib_per_conn: per_conn(server_before, server_after),
        generator_rss_before_kib: gen_before,
        generator_rss_after_kib: gen_after,
        generator_kib_per_conn: per_conn(gen_before, gen_after),
        ..Default::default()
    };
    for e in errors {
        report.add_error(e);
    }
    report.finish();
    Ok(report)
}
