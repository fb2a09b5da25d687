//! A trivial single-process chat server speaking the gateworker protocol.
//!
//! It exists to measure the generator's own ceiling (a server that does
//! almost nothing) and to test the generator. State is one mutex-guarded
//! map; each connection has a reader (this task) and a writer task fed by
//! an unbounded channel, so one slow client never blocks a broadcast.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::client::ws_config;

/// Most frames a writer puts in one flush, so a flood to one client still
/// goes out in bounded chunks.
const WRITE_BATCH: usize = 256;

/// Accept WebSocket clients on `listener` forever, with small buffers.
pub async fn serve(listener: TcpListener) -> Result<()> {
    serve_with_config(listener, ws_config(4096, 4096)).await
}

pub async fn serve_with_config(listener: TcpListener, cfg: WebSocketConfig) -> Result<()> {
    let hub = Arc::new(Hub::default());
    loop {
        let (tcp, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE under a connection flood: back off
                // instead of spinning, and keep serving existing clients.
                eprintln!("gw-bench serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            // Errors here are a client going away; nothing to report.
            let _ = handle_conn(tcp, hub, cfg).await;
        });
    }
}

#[derive(Deserialize)]
struct Req<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    uid: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
}

#[derive(Serialize, Default)]
struct Out<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    online: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl Out<'_> {
    fn msg(&self) -> Message {
        // Only strings, numbers and already-valid raw JSON: cannot fail.
        Message::text(serde_json::to_string(self).unwrap_or_default())
    }
}

fn error_msg(reason: &str) -> Message {
    Out {
        kind: "error",
        reason: Some(reason),
        ..Default::default()
    }
    .msg()
}

struct Client {
    cid: String,
    tx: mpsc::UnboundedSender<Message>,
    rooms: HashSet<String>,
    uid: Option<String>,
}

#[derive(Default)]
struct State {
    clients: HashMap<u64, Client>,
    rooms: HashMap<String, HashSet<u64>>,
    uids: HashMap<String, HashSet<u64>>,
}

impl State {
    fn send(&self, id: u64, m: Message) {
        if let Some(c) = self.clients.get(&id) {
            // A closed receiver means the client is going away; its
            // unregister will clean up.
            let _ = c.tx.send(m);
        }
    }

    fn send_many<'a>(&self, ids: impl IntoIterator<Item = &'a u64>, m: &Message) {
        for id in ids {
            self.send(*id, m.clone());
        }
    }

    fn leave(&mut self, id: u64, room: &str) -> bool {
        let was = self
            .clients
            .get_mut(&id)
            .is_some_and(|c| c.rooms.remove(room));
        if was {
            if let Some(members) = self.rooms.get_mut(room) {
                members.remove(&id);
                if members.is_empty() {
                    self.rooms.remove(room);
                }
            }
        }
        was
    }

    fn unbind(&mut self, id: u64) {
        let old = self.clients.get_mut(&id).and_then(|c| c.uid.take());
        if let Some(uid) = old {
            if let Some(conns) = self.uids.get_mut(&uid) {
                conns.remove(&id);
                if conns.is_empty() {
                    self.uids.remove(&uid);
                }
            }
        }
    }
}

#[derive(Default)]
struct Hub {
    state: Mutex<State>,
    next_id: AtomicU64,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still
        // structurally valid; keep serving rather than cascade panics.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, tx: mpsc::UnboundedSender<Message>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        // Fixed-width hex like GatewayWorker's ids, unique per process.
        let cid = format!("{id:020x}");
        let welcome = Out {
            kind: "welcome",
            client_id: Some(&cid),
            ..Default::default()
        }
        .msg();
        let _ = tx.send(welcome);
        self.lock().clients.insert(
            id,
            Client {
                cid,
                tx,
                rooms: HashSet::new(),
                uid: None,
            },
        );
        id
    }

    fn unregister(&self, id: u64) {
        let mut st = self.lock();
        st.unbind(id);
        let Some(client) = st.clients.remove(&id) else {
            return;
        };
        for room in &client.rooms {
            let Some(members) = st.rooms.get_mut(room) else {
                continue;
            };
            members.remove(&id);
            if members.is_empty() {
                st.rooms.remove(room);
                continue;
            }
            let gone = Out {
                kind: "gone",
                room: Some(room),
                client_id: Some(&client.cid),
                ..Default::default()
            }
            .msg();
            st.send_many(&st.rooms[room], &gone);
        }
    }

    fn dispatch(&self, id: u64, text: &str) {
        let req: Req = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                self.lock()
                    .send(id, error_msg(&format!("malformed message: {e}")));
                return;
            }
        };
        let mut st = self.lock();
        match (req.kind.as_ref(), req.room, req.uid, req.to, req.text) {
            ("join", Some(room), ..) => {
                let room = room.into_owned();
                if let Some(c) = st.clients.get_mut(&id) {
                    c.rooms.insert(room.clone());
                }
                st.rooms.entry(room.clone()).or_default().insert(id);
                let m = Out {
                    kind: "joined",
                    room: Some(&room),
                    ..Default::default()
                };
                st.send(id, m.msg());
            }
            ("leave", Some(room), ..) => {
                st.leave(id, &room);
                let m = Out {
                    kind: "left",
                    room: Some(&room),
                    ..Default::default()
                };
                st.send(id, m.msg());
            }
            ("say", Some(room), _, _, Some(text)) => {
                let Some(members) = st.rooms.get(room.as_ref()) else {
                    return;
                };
                let from = st.clients.get(&id).map(|c| c.cid.as_str());
                let m = Out {
                    kind: "said",
                    room: Some(&room),
                    from,
                    text: Some(text),
                    ..Default::default()
                }
                .msg();
                st.send_many(members, &m);
            }
            ("login", _, Some(uid), ..) => {
                let uid = uid.into_owned();
                st.unbind(id);
                if let Some(c) = st.clients.get_mut(&id) {
                    c.uid = Some(uid.clone());
                }
                st.uids.entry(uid.clone()).or_default().insert(id);
                let m = Out {
                    kind: "logged_in",
                    uid: Some(&uid),
                    ..Default::default()
                };
                st.send(id, m.msg());
            }
            ("whisper", _, _, Some(to), Some(text)) => {
                // Like sendToUid: nobody bound to the uid means nothing to do.
                let Some(conns) = st.uids.get(to.as_ref()) else {
                    return;
                };
                let from = st.clients.get(&id).map(|c| c.cid.as_str());
                let m = Out {
                    kind: "whisper",
                    from,
                    text: Some(text),
                    ..Default::default()
                }
                .msg();
                st.send_many(conns, &m);
            }
            ("echo", _, _, _, Some(text)) => {
                let m = Out {
                    kind: "echo",
                    text: Some(text),
                    ..Default::default()
                };
                st.send(id, m.msg());
            }
            ("count", Some(room), ..) => {
                let m = Out {
                    kind: "count",
                    room: Some(&room),
                    clients: Some(st.rooms.get(room.as_ref()).map_or(0, |m| m.len())),
                    online: Some(st.clients.len()),
                    ..Default::default()
                };
                st.send(id, m.msg());
            }
            (kind @ ("join" | "leave" | "say" | "login" | "whisper" | "echo" | "count"), ..) => {
                st.send(id, error_msg(&format!("missing field(s) for {kind}")));
            }
            (kind, ..) => {
                st.send(id, error_msg(&format!("unknown type {kind:?}")));
            }
        }
    }
}

async fn handle_conn(tcp: TcpStream, hub: Arc<Hub>, cfg: WebSocketConfig) -> Result<()> {
    tcp.set_nodelay(true)?;
    let ws = tokio_tungstenite::accept_async_with_config(tcp, Some(cfg)).await?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let id = hub.register(tx);

    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(first).await.is_err() {
                return;
            }
            // Whatever else is already queued goes out in the same write.
            for _ in 1..WRITE_BATCH {
                let Ok(m) = rx.try_recv() else { break };
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });

    let result: Result<()> = async {
        while let Some(msg) = stream.next().await {
            match msg? {
                Message::Text(t) => hub.dispatch(id, t.as_str()),
                Message::Binary(_) => hub
                    .lock()
                    .send(id, error_msg("binary frames are not supported")),
                Message::Close(_) => break,
                _ => {}
            }
        }
        Ok(())
    }
    .await;

    // Dropping the client's sender (inside unregister) ends the writer once
    // it has drained; bound the wait in case the peer stopped reading.
    hub.unregister(id);
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
    result
}
