//! The gateway's tables: connected clients, uid bindings, groups and
//! sessions, and every command and query a worker can run against them.
//!
//! Each table is split into [`SHARDS`] shards, each behind its own mutex
//! (goim's bucket idea), so two clients rarely contend. No lock is ever held
//! across an `.await`: every operation here is synchronous and only ever
//! `try_send`s to client queues. Lock order: a client shard may be held while
//! taking a uid or group shard, never the other way round.
//!
//! Group and uid tables store each member's [`ClientSender`] next to its
//! sequence number, so a fan-out takes one lock and pushes the same shared
//! [`Outbound`] bytes to every member. A worker link's fan-outs list the
//! clients they filled in a [`FlushList`] and write them out itself, in
//! turns, rather than waking one task per client.
//!
//! Interest: a group or uid gaining its first or losing its last member here
//! is a change of the gateway's *interest set*, numbered by the interest
//! version and broadcast to every link task in version order (see
//! [`Hub::interest_snapshot`]). Lock order: a client shard, then the
//! interest epoch (shared), then a group or uid shard, then the version
//! counter; a snapshot takes the epoch exclusively and then group and uid
//! shards only.

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::io::IoSlice;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use gw_protocol::domain::Payload;
use gw_protocol::pb;
use gw_protocol::{codes, ClientId, Command, GatewayId, Query, Scope};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::client::wire::{encode_message, Wire};
use crate::metrics::Metrics;

/// Interest changes buffered per link before it falls back to a snapshot.
const INTEREST_BACKLOG: usize = 4096;

/// Number of shards per table.
pub(crate) const SHARDS: usize = 32;

/// One message of a fan-out, encoded for each client wire on first use:
/// every recipient on the same wire gets the same shared bytes.
#[derive(Debug)]
pub(crate) struct Outbound {
    data: Bytes,
    binary: bool,
    encoded: [OnceCell<Bytes>; Wire::COUNT],
}

impl Outbound {
    /// `None` for a text payload that is not UTF-8 (checked once per
    /// fan-out, not once per recipient).
    pub(crate) fn from_payload(p: &Payload) -> Option<Self> {
        if !p.binary && std::str::from_utf8(&p.data).is_err() {
            return None;
        }
        Some(Outbound {
            data: p.data.clone(),
            binary: p.binary,
            encoded: Default::default(),
        })
    }

    /// The message's bytes on `wire`.
    pub(crate) fn frame(&self, wire: Wire) -> Bytes {
        self.encoded[wire.index()]
            .get_or_init(|| encode_message(wire, &self.data, self.binary))
            .clone()
    }
}

/// Per-client queue limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

/// Frames waiting for a client's connection task, or for a flush list.
#[derive(Debug, Default)]
struct OutQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// Bytes of the front frame a flush already wrote (the rest of it goes
    /// out before anything else).
    front_written: usize,
    /// The connection task has frames of its own to write (taken from here,
    /// or control frames): until it has written them all, only it writes.
    task_writing: bool,
    /// Listed in a [`FlushList`] already.
    listed: bool,
    /// The socket, for writes by a flush list: a plain TCP connection's,
    /// from when it serves until it starts closing; `None` for TLS (the
    /// session belongs to the task).
    socket: Option<Arc<tokio::net::TcpStream>>,
}

/// A client as everyone who sends to it sees it: its bounded outgoing
/// queue and its close signal. Shared (one `Arc`) between the connection
/// task and every table the client is in. Small on purpose: an idle
/// client's queue holds no allocation.
#[derive(Debug)]
pub(crate) struct ClientShared {
    pub(crate) wire: Wire,
    limits: QueueLimits,
    /// Non-zero once the client must be closed, with this close code.
    close_code: AtomicU16,
    /// Last time anything arrived from the client, in ms since gateway start
    /// (for the heartbeat check).
    pub(crate) last_heard_ms: AtomicU64,
    queue: Mutex<OutQueue>,
    /// Wakes the connection task: a frame was queued or a close asked for.
    waker: AtomicWaker,
}

/// A handle to one client's queue.
pub(crate) type ClientSender = Arc<ClientShared>;

impl ClientShared {
    pub(crate) fn new(wire: Wire, limits: QueueLimits) -> ClientSender {
        Arc::new(ClientShared {
            wire,
            limits,
            close_code: AtomicU16::new(0),
            last_heard_ms: AtomicU64::new(0),
            queue: Mutex::new(OutQueue::default()),
            waker: AtomicWaker::new(),
        })
    }

    /// Asks the connection to close with `code`; the first code set wins.
    pub(crate) fn close(&self, code: u16) {
        if self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    pub(crate) fn close_code(&self) -> Option<u16> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }

    /// Registers the connection task to be woken by [`Self::push`] and
    /// [`Self::close`].
    pub(crate) fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// Queues one encoded frame without waiting. A full queue means the
    /// client reads too slowly: it is closed as a slow consumer (never a
    /// silent drop and never a wait that would stall the fan-out for
    /// everyone else). Returns whether the frame was queued. With `list`, a
    /// client whose socket a flush list may write is listed there instead
    /// of having its task woken.
    pub(crate) fn push(
        self: &Arc<Self>,
        frame: Bytes,
        metrics: &Metrics,
        list: Option<&mut FlushList>,
    ) -> bool {
        if self.close_code().is_some() {
            return false;
        }
        let len = frame.len();
        let mut q = self.queue.lock();
        if q.frames.len() >= self.limits.messages || q.bytes + len > self.limits.bytes {
            let (messages, bytes) = (q.frames.len(), q.bytes);
            drop(q);
            metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                queued_messages = messages,
                queued_bytes = bytes,
                "client outgoing queue full: closing as slow consumer"
            );
            self.close(codes::CLOSE_SLOW_CONSUMER);
            return false;
        }
        q.frames.push_back(frame);
        q.bytes += len;
        // The task (or the flush) takes the whole queue each time, so only
        // the first frame after that needs to wake it (or list it).
        if q.frames.len() > 1 {
            return true;
        }
        if let Some(list) = list.filter(|_| q.socket.is_some() && !q.task_writing) {
            if !q.listed {
                q.listed = true;
                list.clients.push_back(self.clone());
            }
            return true;
        }
        drop(q);
        self.waker.wake();
        true
    }

    /// Moves every queued frame to the back of `out` (empty, or holding
    /// frames of the task's own); the task writes them, nobody else until
    /// it has. Returns the number of frames and bytes moved, and how much of
    /// the first one a flush already wrote.
    pub(crate) fn take(&self, out: &mut VecDeque<Bytes>) -> (usize, usize, usize) {
        let mut q = self.queue.lock();
        let front_written = std::mem::take(&mut q.front_written);
        // A flush counted what it wrote of the first frame.
        let moved = (q.frames.len(), q.bytes - front_written, front_written);
        q.bytes = 0;
        // Nothing of its own and nothing queued: others may write again.
        q.task_writing = !(out.is_empty() && q.frames.is_empty());
        if out.is_empty() {
            // Swap the allocations instead of copying.
            std::mem::swap(&mut q.frames, out);
        } else {
            out.extend(q.frames.drain(..));
        }
        moved
    }

    /// The queue's first frame if a flush wrote part of it, with how much:
    /// a connection closing without sending its queue must still finish it.
    pub(crate) fn take_partial(&self) -> Option<(Bytes, usize)> {
        let mut q = self.queue.lock();
        if q.front_written == 0 {
            return None;
        }
        let frame = q.frames.pop_front()?;
        q.bytes -= frame.len();
        Some((frame, std::mem::take(&mut q.front_written)))
    }

    /// Marks the task as writing frames of its own (control frames).
    pub(crate) fn set_task_writing(&self) {
        self.queue.lock().task_writing = true;
    }

    /// Lets flush lists write to `socket` (`None`: no longer; from then on
    /// only the task writes).
    pub(crate) fn set_socket(&self, socket: Option<Arc<tokio::net::TcpStream>>) {
        let mut q = self.queue.lock();
        if socket.is_none() {
            q.task_writing = true;
        }
        q.socket = socket;
    }

    /// Writes what is queued straight to the socket, as far as it takes it
    /// without waiting; whatever is left (or anything it may not write) goes
    /// to the task, woken. Frames and bytes written count as sent.
    fn flush_now(&self, metrics: &Metrics) {
        let mut q = self.queue.lock();
        q.listed = false;
        if q.frames.is_empty() {
            return;
        }
        let writable = !q.task_writing && self.close_code().is_none();
        if let Some(socket) = q.socket.clone().filter(|_| writable) {
            let mut slices = [IoSlice::new(&[]); FLUSH_IOVECS];
            let mut count = 0;
            for (i, frame) in q.frames.iter().take(FLUSH_IOVECS).enumerate() {
                let from = if i == 0 { q.front_written } else { 0 };
                slices[i] = IoSlice::new(&frame[from..]);
                count += 1;
            }
            // Tries only when tokio has the socket as writable (a socket
            // found full waits for the task to see it drain).
            let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
                socket2::SockRef::from(&*socket).send_vectored(&slices[..count])
            });
            if let Ok(n) = sent {
                let frames = q.advance(n);
                metrics
                    .messages_out
                    .fetch_add(frames as u64, Ordering::Relaxed);
                metrics.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                if q.frames.is_empty() {
                    if q.frames.capacity() > KEEP_QUEUE_CAPACITY {
                        // An idle client keeps no burst-sized buffer.
                        q.frames = VecDeque::new();
                    }
                    return;
                }
            }
        }
        drop(q);
        self.waker.wake();
    }

    /// Frames and bytes queued now.
    pub(crate) fn depth(&self) -> (usize, usize) {
        let q = self.queue.lock();
        (q.frames.len(), q.bytes)
    }
}

impl OutQueue {
    /// Drops `n` written bytes off the front; returns the frames completed.
    fn advance(&mut self, mut n: usize) -> usize {
        let mut done = 0;
        while n > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.len() - self.front_written;
            if n < left {
                self.front_written += n;
                break;
            }
            n -= left;
            self.bytes -= front.len();
            self.front_written = 0;
            self.frames.pop_front();
            done += 1;
        }
        done
    }
}

/// Frames handed to one direct write.
const FLUSH_IOVECS: usize = 64;
/// A queue emptied by a flush keeps its buffer up to this many frames.
const KEEP_QUEUE_CAPACITY: usize = 16;

/// Clients whose queues a fan-out filled, to be written straight to their
/// sockets by whoever ran the fan-out (a worker link, after a burst of
/// commands), instead of waking one connection task per client: the task
/// machinery per delivery (wake, schedule, poll, readiness) is most of
/// what a large room costs above the system calls. Only plain TCP
/// connections whose task is not writing are listed; a write that does not
/// take everything hands the rest to the task. Dropping the list hands
/// every client still in it to its task.
#[derive(Default)]
pub(crate) struct FlushList {
    clients: VecDeque<ClientSender>,
}

impl FlushList {
    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Writes the queues of up to `max` listed clients, oldest listed first.
    pub(crate) fn flush(&mut self, max: usize, metrics: &Metrics) {
        for _ in 0..max {
            let Some(client) = self.clients.pop_front() else {
                return;
            };
            client.flush_now(metrics);
        }
    }

    /// Hands every listed client to its task (before the owner of the list
    /// waits on something else).
    pub(crate) fn release(&mut self) {
        for client in self.clients.drain(..) {
            client.queue.lock().listed = false;
            client.waker.wake();
        }
    }
}

impl Drop for FlushList {
    fn drop(&mut self) {
        self.release();
    }
}

/// What the gateway keeps per connected client.
#[derive(Debug)]
pub(crate) struct ClientEntry {
    pub(crate) sender: ClientSender,
    pub(crate) uid: Option<Arc<str>>,
    pub(crate) groups: HashSet<Arc<str>>,
    /// The session as serialized JSON (empty = `{}`), shared with every
    /// event that carries it.
    pub(crate) session: Bytes,
    /// False while a WebSocket handshake awaits the worker's decision:
    /// such a client is left out of query answers.
    ready: bool,
}

/// What is left of a client after it is removed.
#[derive(Debug)]
pub(crate) struct RemovedClient {
    pub(crate) uid: Option<Arc<str>>,
    pub(crate) groups: Vec<String>,
    pub(crate) session: Bytes,
}

struct Sharded<K, V, S = std::collections::hash_map::RandomState> {
    shards: Box<[Mutex<HashMap<K, V, S>>]>,
    hasher: S,
}

impl<K: Hash + Eq, V, S: BuildHasher + Default> Sharded<K, V, S> {
    fn new() -> Self {
        Sharded {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            hasher: S::default(),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> &Mutex<HashMap<K, V, S>> {
        // The high bits: a multiplicative hash mixes into those.
        &self.shards[(self.hasher.hash_one(key) >> 32) as usize % SHARDS]
    }
}

/// Hashing for the gateway's own client sequence numbers. They are given
/// out in order by the gateway, never chosen by a peer, so SipHash's
/// defence against chosen keys buys nothing here while costing two hashes
/// per lookup on the per-message path (session, sends to clients); one
/// multiplication spreads sequential numbers over buckets and shards.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SeqHashState;

#[derive(Debug, Default)]
pub(crate) struct SeqHasher(u64);

impl BuildHasher for SeqHashState {
    type Hasher = SeqHasher;
    fn build_hasher(&self) -> SeqHasher {
        SeqHasher(0)
    }
}

impl std::hash::Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64 keys; correct (if slow) for anything else.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The members of one group or uid here.
#[derive(Debug, Default)]
struct Members {
    clients: HashMap<u64, ClientSender, SeqHashState>,
    /// The interest version that announced this key here (its first
    /// member): a join or bind of the key is visible to the workers that
    /// acknowledged it.
    announced: u64,
}

/// The gateway's client tables.
pub(crate) struct Hub {
    pub(crate) gateway_id: GatewayId,
    next_seq: AtomicU64,
    clients: Sharded<u64, ClientEntry, SeqHashState>,
    uids: Sharded<Arc<str>, Members>,
    groups: Sharded<Arc<str>, Members>,
    pub(crate) metrics: Arc<Metrics>,
    /// A group or uid gained its first or lost its last member here.
    interest: broadcast::Sender<InterestChange>,
    /// Held shared while a change is made and announced, exclusively while
    /// a link takes a snapshot and subscribes: so a snapshot never misses,
    /// nor is overtaken by, a change.
    interest_epoch: RwLock<()>,
    /// The version of the last interest change. Taken (after the table
    /// shard) around numbering a change *and* sending it, so changes enter
    /// the broadcast in version order. Starts at 1, the empty set the
    /// gateway starts with: every snapshot has a version a peer can
    /// acknowledge (a peer that acknowledged nothing is never waited for).
    interest_version: Mutex<u64>,
}

/// Which membership table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Table {
    Groups,
    Uids,
}

/// A change of this gateway's interest set.
#[derive(Debug, Clone)]
pub(crate) struct InterestChange {
    pub(crate) table: Table,
    pub(crate) key: Arc<str>,
    pub(crate) added: bool,
    /// Its number: one more than the change before it.
    pub(crate) version: u64,
}

/// Interest changes folded into one delta frame: the last change of each
/// key wins (a group added then removed is only removed), and the frame's
/// version is the newest change's.
#[derive(Debug, Default)]
pub(crate) struct InterestDelta {
    keys: HashMap<(Table, Arc<str>), bool>,
    version: u64,
}

impl InterestDelta {
    pub(crate) fn push(&mut self, c: InterestChange) {
        self.version = self.version.max(c.version);
        self.keys.insert((c.table, c.key), c.added);
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The delta as a link frame body.
    pub(crate) fn into_pb(self) -> pb::Interest {
        let mut i = pb::Interest {
            version: self.version,
            ..Default::default()
        };
        for ((table, key), added) in self.keys {
            let k = key.to_string();
            match (table, added) {
                (Table::Groups, true) => i.groups_added.push(k),
                (Table::Groups, false) => i.groups_removed.push(k),
                (Table::Uids, true) => i.uids_added.push(k),
                (Table::Uids, false) => i.uids_removed.push(k),
            }
        }
        i
    }
}

/// What a command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Executed {
    /// Client queues a send reached, or clients a command affected.
    pub(crate) count: usize,
    /// For a join or bind: the interest version that announced the group
    /// or uid here. A worker that has not applied it may still leave this
    /// gateway out of sends to it. 0 for every other command.
    pub(crate) interest: u64,
}

/// A command that names something it cannot act on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error("client {0} belongs to another gateway")]
    ForeignClient(ClientId),
}

impl Hub {
    pub(crate) fn new(gateway_id: GatewayId, metrics: Arc<Metrics>) -> Self {
        Hub {
            gateway_id,
            next_seq: AtomicU64::new(1),
            clients: Sharded::new(),
            uids: Sharded::new(),
            groups: Sharded::new(),
            metrics,
            interest: broadcast::channel(INTEREST_BACKLOG).0,
            interest_epoch: RwLock::new(()),
            interest_version: Mutex::new(1),
        }
    }

    fn table(&self, t: Table) -> &Sharded<Arc<str>, Members> {
        match t {
            Table::Groups => &self.groups,
            Table::Uids => &self.uids,
        }
    }

    /// Numbers an interest change and broadcasts it, in that order for
    /// every change. Called with the key's table shard held.
    fn announce(&self, table: Table, key: Arc<str>, added: bool) -> u64 {
        let mut version = self.interest_version.lock();
        *version += 1;
        let _ = self.interest.send(InterestChange {
            table,
            key,
            added,
            version: *version,
        });
        *version
    }

    /// Adds a member, announcing the key if it is new here. Returns the
    /// interest version that announced the key (now or earlier).
    fn add_member(&self, t: Table, key: Arc<str>, seq: u64, sender: ClientSender) -> u64 {
        let _epoch = self.interest_epoch.read();
        let mut shard = self.table(t).shard(&*key).lock();
        let members = shard.entry(key.clone()).or_default();
        if members.clients.is_empty() {
            members.announced = self.announce(t, key, true);
        }
        members.clients.insert(seq, sender);
        members.announced
    }

    /// The interest version that announced `key` here (0: no member).
    fn announced(&self, t: Table, key: &str) -> u64 {
        self.table(t)
            .shard(key)
            .lock()
            .get(key)
            .map_or(0, |m| m.announced)
    }

    /// Removes a member, announcing the key if it has no member left.
    fn remove_member(&self, t: Table, key: &str, seq: u64) {
        let _epoch = self.interest_epoch.read();
        let mut shard = self.table(t).shard(key).lock();
        if let Some(members) = shard.get_mut(key) {
            members.clients.remove(&seq);
            if members.clients.is_empty() {
                if let Some((k, _)) = shard.remove_entry(key) {
                    self.announce(t, k, false);
                }
            }
        }
    }

    /// The full interest set now, carrying the interest version it is
    /// current at, and the changes after it.
    pub(crate) fn interest_snapshot(&self) -> (pb::Interest, broadcast::Receiver<InterestChange>) {
        let _epoch = self.interest_epoch.write();
        let rx = self.interest.subscribe();
        let keys = |t: &Sharded<Arc<str>, Members>| -> Vec<String> {
            t.shards
                .iter()
                .flat_map(|s| s.lock().keys().map(|k| k.to_string()).collect::<Vec<_>>())
                .collect()
        };
        let snapshot = pb::Interest {
            reset: true,
            groups_added: keys(&self.groups),
            uids_added: keys(&self.uids),
            version: self.interest_version(),
            ..Default::default()
        };
        (snapshot, rx)
    }

    /// The version of the last interest change (1: none yet).
    pub(crate) fn interest_version(&self) -> u64 {
        *self.interest_version.lock()
    }

    /// Registers a new, ready client and returns its id.
    pub(crate) fn add_client(&self, sender: ClientSender) -> ClientId {
        let id = self.add_pending_client(sender);
        self.mark_ready(id);
        id
    }

    /// Makes a pending client visible to queries.
    pub(crate) fn mark_ready(&self, id: ClientId) {
        let seq = id.seq();
        if let Some(e) = self.clients.shard(&seq).lock().get_mut(&seq) {
            e.ready = true;
        }
    }

    /// Registers a client whose handshake is not decided yet.
    pub(crate) fn add_pending_client(&self, sender: ClientSender) -> ClientId {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let id = ClientId::new(self.gateway_id, seq).expect("sequence starts at 1");
        self.clients.shard(&seq).lock().insert(
            seq,
            ClientEntry {
                sender,
                uid: None,
                groups: HashSet::new(),
                session: Bytes::new(),
                ready: false,
            },
        );
        id
    }

    /// Removes a client from every table.
    pub(crate) fn remove_client(&self, id: ClientId) -> Option<RemovedClient> {
        let seq = id.seq();
        let entry = self.clients.shard(&seq).lock().remove(&seq)?;
        if let Some(uid) = &entry.uid {
            self.remove_member(Table::Uids, uid, seq);
        }
        let mut groups = Vec::with_capacity(entry.groups.len());
        for g in entry.groups {
            self.remove_member(Table::Groups, &g, seq);
            groups.push(g.to_string());
        }
        groups.sort();
        Some(RemovedClient {
            uid: entry.uid,
            groups,
            session: entry.session,
        })
    }

    /// The client's current session bytes.
    pub(crate) fn session(&self, id: ClientId) -> Bytes {
        let seq = id.seq();
        self.clients
            .shard(&seq)
            .lock()
            .get(&seq)
            .map(|e| e.session.clone())
            .unwrap_or_default()
    }

    pub(crate) fn client_count(&self) -> usize {
        self.clients.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Asks every client to close with `code` (graceful shutdown).
    pub(crate) fn close_all(&self, code: u16) {
        for shard in self.clients.shards.iter() {
            for entry in shard.lock().values() {
                entry.sender.close(code);
            }
        }
    }

    fn local_seq(&self, id: ClientId) -> Result<u64, CommandError> {
        if id.gateway() == self.gateway_id {
            Ok(id.seq())
        } else {
            Err(CommandError::ForeignClient(id))
        }
    }

    fn push(&self, sender: &ClientSender, msg: &Outbound, list: Option<&mut FlushList>) -> bool {
        sender.push(msg.frame(sender.wire), &self.metrics, list)
    }

    /// Outgoing queue depth over all clients: (frames, bytes, deepest
    /// queue in frames). Walks every client: for scrapes, not hot paths.
    pub(crate) fn queue_depths(&self) -> (usize, usize, usize) {
        let mut total = (0, 0, 0);
        for shard in self.clients.shards.iter() {
            let senders: Vec<ClientSender> =
                shard.lock().values().map(|e| e.sender.clone()).collect();
            for s in senders {
                let (frames, bytes) = s.depth();
                total.0 += frames;
                total.1 += bytes;
                total.2 = total.2.max(frames);
            }
        }
        total
    }

    /// Runs one command. Returns how many client queues a send reached.
    pub(crate) fn execute(&self, cmd: Command) -> Result<usize, CommandError> {
        self.execute_tracked(cmd).map(|done| done.count)
    }

    /// Runs one command and says which interest version its outcome
    /// depends on.
    pub(crate) fn execute_tracked(&self, cmd: Command) -> Result<Executed, CommandError> {
        let mut interest = 0;
        let count = self.run(cmd, &mut interest, None)?;
        Ok(Executed { count, interest })
    }

    /// Runs one command; the clients its sends fill are listed in `list`
    /// for their caller to flush (see [`FlushList`]) rather than woken.
    pub(crate) fn execute_listed(
        &self,
        cmd: Command,
        list: &mut FlushList,
    ) -> Result<Executed, CommandError> {
        let mut interest = 0;
        let count = self.run(cmd, &mut interest, Some(list))?;
        Ok(Executed { count, interest })
    }

    fn run(
        &self,
        cmd: Command,
        interest: &mut u64,
        mut list: Option<&mut FlushList>,
    ) -> Result<usize, CommandError> {
        match cmd {
            Command::SendToClients {
                client_ids,
                payload,
            } => {
                let Some(msg) = Outbound::from_payload(&payload) else {
                    return Ok(0);
                };
                let mut n = 0;
                for id in client_ids {
                    // A list may span gateways: each gateway takes its own.
                    let Ok(seq) = self.local_seq(id) else {
                        continue;
                    };
                    let sender = self
                        .clients
                        .shard(&seq)
                        .lock()
                        .get(&seq)
                        .map(|e| e.sender.clone());
                    if let Some(s) = sender {
                        n += self.push(&s, &msg, list.as_deref_mut()) as usize;
                    }
                }
                Ok(n)
            }
            Command::SendToUids { uids, payload } => {
                let Some(msg) = Outbound::from_payload(&payload) else {
                    return Ok(0);
                };
                let mut n = 0;
                for uid in uids {
                    let shard = self.uids.shard(uid.as_str()).lock();
                    if let Some(members) = shard.get(uid.as_str()) {
                        for s in members.clients.values() {
                            n += self.push(s, &msg, list.as_deref_mut()) as usize;
                        }
                    }
                }
                Ok(n)
            }
            Command::SendToGroups {
                groups,
                payload,
                exclude,
            } => {
                let Some(msg) = Outbound::from_payload(&payload) else {
                    return Ok(0);
                };
                let exclude = self.local_set(&exclude);
                let mut n = 0;
                // A client in several of the groups gets the message once.
                let mut seen = HashSet::new();
                let dedup = groups.len() > 1;
                for g in groups {
                    let shard = self.groups.shard(g.as_str()).lock();
                    if let Some(members) = shard.get(g.as_str()) {
                        for (seq, s) in &members.clients {
                            if exclude.contains(seq) || (dedup && !seen.insert(*seq)) {
                                continue;
                            }
                            n += self.push(s, &msg, list.as_deref_mut()) as usize;
                        }
                    }
                }
                Ok(n)
            }
            Command::SendToAll { payload, exclude } => {
                let Some(msg) = Outbound::from_payload(&payload) else {
                    return Ok(0);
                };
                let exclude = self.local_set(&exclude);
                let mut n = 0;
                for shard in self.clients.shards.iter() {
                    for (seq, e) in shard.lock().iter() {
                        if !exclude.contains(seq) {
                            n += self.push(&e.sender, &msg, list.as_deref_mut()) as usize;
                        }
                    }
                }
                Ok(n)
            }
            Command::BindUid { client_id, uid } => {
                let seq = self.local_seq(client_id)?;
                let uid: Arc<str> = uid.into();
                let mut clients = self.clients.shard(&seq).lock();
                let Some(entry) = clients.get_mut(&seq) else {
                    return Ok(0);
                };
                // One uid per client: binding again moves it.
                if let Some(old) = entry.uid.take() {
                    self.remove_member(Table::Uids, &old, seq);
                }
                *interest = self.add_member(Table::Uids, uid.clone(), seq, entry.sender.clone());
                entry.uid = Some(uid);
                Ok(1)
            }
            Command::UnbindUid { client_id } => {
                let seq = self.local_seq(client_id)?;
                let mut clients = self.clients.shard(&seq).lock();
                if let Some(old) = clients.get_mut(&seq).and_then(|e| e.uid.take()) {
                    self.remove_member(Table::Uids, &old, seq);
                    return Ok(1);
                }
                Ok(0)
            }
            Command::JoinGroup { client_id, group } => {
                let seq = self.local_seq(client_id)?;
                let group: Arc<str> = group.into();
                let mut clients = self.clients.shard(&seq).lock();
                let Some(entry) = clients.get_mut(&seq) else {
                    return Ok(0);
                };
                if entry.groups.insert(group.clone()) {
                    *interest = self.add_member(Table::Groups, group, seq, entry.sender.clone());
                } else {
                    // Already a member: its key was announced when it joined.
                    *interest = self.announced(Table::Groups, &group);
                }
                Ok(1)
            }
            Command::LeaveGroup { client_id, group } => {
                let seq = self.local_seq(client_id)?;
                let mut clients = self.clients.shard(&seq).lock();
                let Some(entry) = clients.get_mut(&seq) else {
                    return Ok(0);
                };
                if entry.groups.remove(group.as_str()) {
                    self.remove_member(Table::Groups, group.as_str(), seq);
                    return Ok(1);
                }
                Ok(0)
            }
            Command::Ungroup { group } => {
                let members = {
                    let _epoch = self.interest_epoch.read();
                    let mut shard = self.groups.shard(group.as_str()).lock();
                    let removed = shard.remove_entry(group.as_str());
                    // The group is gone here: workers stop sending it to
                    // this gateway, as when its last member leaves.
                    removed.map(|(key, members)| {
                        self.announce(Table::Groups, key, false);
                        members
                    })
                };
                let members = members.unwrap_or_default().clients;
                for seq in members.keys() {
                    if let Some(e) = self.clients.shard(seq).lock().get_mut(seq) {
                        e.groups.remove(group.as_str());
                    }
                }
                Ok(members.len())
            }
            Command::CloseClient {
                client_id,
                final_message,
                immediate,
            } => {
                let seq = self.local_seq(client_id)?;
                let sender = self
                    .clients
                    .shard(&seq)
                    .lock()
                    .get(&seq)
                    .map(|e| e.sender.clone());
                let Some(sender) = sender else { return Ok(0) };
                if !immediate {
                    if let Some(msg) = final_message.as_ref().and_then(Outbound::from_payload) {
                        self.push(&sender, &msg, None);
                    }
                }
                // The writer sends what is queued before the close frame
                // unless `immediate`; see `Conn::finish`.
                sender.close(if immediate {
                    CLOSE_IMMEDIATE
                } else {
                    codes::CLOSE_BY_APPLICATION
                });
                Ok(1)
            }
            Command::UpdateSession {
                client_id,
                replace,
                set,
                remove,
            } => {
                let seq = self.local_seq(client_id)?;
                let mut clients = self.clients.shard(&seq).lock();
                let Some(entry) = clients.get_mut(&seq) else {
                    return Ok(0);
                };
                let mut session = if replace {
                    Map::new()
                } else {
                    parse_session(&entry.session)
                };
                session.extend(set);
                for k in &remove {
                    session.remove(k);
                }
                entry.session = if session.is_empty() {
                    Bytes::new()
                } else {
                    Bytes::from(Value::Object(session).to_string())
                };
                Ok(1)
            }
        }
    }

    fn local_set(&self, ids: &[ClientId]) -> HashSet<u64> {
        ids.iter()
            .filter(|id| id.gateway() == self.gateway_id)
            .map(|id| id.seq())
            .collect()
    }

    fn record(&self, seq: u64, e: &ClientEntry, q: &Query) -> pb::ClientRecord {
        let mut groups: Vec<String> = if q.with_groups {
            e.groups.iter().map(|g| g.to_string()).collect()
        } else {
            Vec::new()
        };
        groups.sort();
        pb::ClientRecord {
            client_id: ClientId::new(self.gateway_id, seq)
                .expect("stored sequences are non-zero")
                .to_string(),
            uid: if q.with_uid {
                e.uid.as_deref().unwrap_or_default().to_string()
            } else {
                String::new()
            },
            session: if q.with_session {
                e.session.clone()
            } else {
                Bytes::new()
            },
            groups,
        }
    }

    /// Builds a bucket from a set of member sequences.
    fn bucket_of(&self, key: &str, seqs: impl Iterator<Item = u64>, q: &Query) -> pb::Bucket {
        let mut bucket = pb::Bucket {
            key: key.to_string(),
            ..Default::default()
        };
        for seq in seqs {
            if q.count_only {
                let ready = self
                    .clients
                    .shard(&seq)
                    .lock()
                    .get(&seq)
                    .is_some_and(|e| e.ready);
                bucket.count += ready as u64;
                continue;
            }
            if let Some(e) = self
                .clients
                .shard(&seq)
                .lock()
                .get(&seq)
                .filter(|e| e.ready)
            {
                bucket.count += 1;
                bucket.clients.push(self.record(seq, e, q));
            }
        }
        bucket
    }

    fn member_seqs(table: &Sharded<Arc<str>, Members>, key: &str) -> Vec<u64> {
        table
            .shard(key)
            .lock()
            .get(key)
            .map(|m| m.clients.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Answers a query about this gateway's clients.
    pub(crate) fn query(&self, q: &Query) -> Vec<pb::Bucket> {
        match &q.scope {
            Scope::All => {
                let mut bucket = pb::Bucket::default();
                for shard in self.clients.shards.iter() {
                    for (seq, e) in shard.lock().iter().filter(|(_, e)| e.ready) {
                        bucket.count += 1;
                        if !q.count_only {
                            bucket.clients.push(self.record(*seq, e, q));
                        }
                    }
                }
                vec![bucket]
            }
            Scope::Groups(keys) => keys
                .iter()
                .map(|k| self.bucket_of(k, Self::member_seqs(&self.groups, k).into_iter(), q))
                .collect(),
            Scope::Uids(keys) => keys
                .iter()
                .map(|k| self.bucket_of(k, Self::member_seqs(&self.uids, k).into_iter(), q))
                .collect(),
            Scope::ClientIds(ids) => ids
                .iter()
                .filter(|id| id.gateway() == self.gateway_id)
                .map(|id| self.bucket_of(&id.to_string(), std::iter::once(id.seq()), q))
                .filter(|b| b.count > 0)
                .collect(),
            Scope::EachGroup => {
                let mut all: Vec<(String, Vec<u64>)> = Vec::new();
                for shard in self.groups.shards.iter() {
                    for (g, m) in shard.lock().iter() {
                        all.push((g.to_string(), m.clients.keys().copied().collect()));
                    }
                }
                all.sort();
                all.into_iter()
                    .map(|(g, seqs)| self.bucket_of(&g, seqs.into_iter(), q))
                    .collect()
            }
        }
    }
}

/// Close code the writer treats as "drop now, skip the queue".
pub(crate) const CLOSE_IMMEDIATE: u16 = 4501;

pub(crate) fn parse_session(b: &[u8]) -> Map<String, Value> {
    if b.is_empty() {
        return Map::new();
    }
    match serde_json::from_slice(b) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        let id = GatewayId::new(0x0123_4567_89ab).expect("valid id");
        Hub::new(id, Arc::new(Metrics::default()))
    }

    fn join(hub: &Hub, id: ClientId, group: &str) -> Executed {
        hub.execute_tracked(Command::JoinGroup {
            client_id: id,
            group: group.into(),
        })
        .unwrap()
    }

    #[test]
    fn interest_changes_are_numbered_in_order_and_joins_report_the_version_they_depend_on() {
        let hub = hub();
        let limits = QueueLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        let (snapshot, mut changes) = hub.interest_snapshot();
        // Version 1 is the empty set a gateway starts with.
        assert_eq!((snapshot.version, hub.interest_version()), (1, 1));
        let a = hub.add_client(ClientShared::new(Wire::Ws, limits));
        let b = hub.add_client(ClientShared::new(Wire::Ws, limits));

        // The first member announces the group; later joins (and a join
        // again) depend on that same announcement.
        assert_eq!(join(&hub, a, "g").interest, 2);
        assert_eq!(join(&hub, b, "g").interest, 2);
        assert_eq!(join(&hub, a, "g").interest, 2);
        let bind = hub
            .execute_tracked(Command::BindUid {
                client_id: a,
                uid: "u".into(),
            })
            .unwrap();
        assert_eq!(
            bind,
            Executed {
                count: 1,
                interest: 3
            }
        );
        for id in [a, b] {
            hub.execute(Command::LeaveGroup {
                client_id: id,
                group: "g".into(),
            })
            .unwrap();
        }
        let send = hub
            .execute_tracked(Command::SendToUids {
                uids: vec!["u".into()],
                payload: Payload::text("x"),
            })
            .unwrap();
        assert_eq!(
            send,
            Executed {
                count: 1,
                interest: 0
            }
        );
        assert_eq!(hub.interest_version(), 4);

        let mut seen = Vec::new();
        while let Ok(c) = changes.try_recv() {
            seen.push((c.version, c.table, c.key.to_string(), c.added));
        }
        assert_eq!(
            seen,
            vec![
                (2, Table::Groups, "g".into(), true),
                (3, Table::Uids, "u".into(), true),
                (4, Table::Groups, "g".into(), false),
            ]
        );
        let (snapshot, _) = hub.interest_snapshot();
        assert_eq!(snapshot.version, 4);
        assert!(snapshot.reset && snapshot.groups_added.is_empty());
        assert_eq!(snapshot.uids_added, vec!["u".to_string()]);
        // Announced again after it was gone: a new version.
        assert_eq!(join(&hub, b, "g").interest, 5);
    }

    #[test]
    fn ungroup_announces_that_the_group_is_gone_and_a_new_join_announces_it_again() {
        let hub = hub();
        let limits = QueueLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        let (_, mut changes) = hub.interest_snapshot();
        let a = hub.add_client(ClientShared::new(Wire::Ws, limits));
        let b = hub.add_client(ClientShared::new(Wire::Ws, limits));
        join(&hub, a, "g");
        join(&hub, b, "g");
        let ungroup = |group: &str| {
            hub.execute(Command::Ungroup {
                group: group.into(),
            })
            .unwrap()
        };
        assert_eq!(ungroup("g"), 2);
        // A group unknown here changes nothing and announces nothing.
        assert_eq!(ungroup("nobody-here"), 0);
        assert_eq!(join(&hub, a, "g").interest, 4);

        let mut seen = Vec::new();
        while let Ok(c) = changes.try_recv() {
            seen.push((c.version, c.key.to_string(), c.added));
        }
        assert_eq!(
            seen,
            vec![
                (2, "g".into(), true),
                (3, "g".into(), false),
                (4, "g".into(), true),
            ]
        );
        let (snapshot, _) = hub.interest_snapshot();
        assert_eq!(snapshot.groups_added, vec!["g".to_string()]);
        // The members' own entries dropped it too; a joined again.
        let groups_of = |id: ClientId| {
            let seq = id.seq();
            let shard = hub.clients.shard(&seq).lock();
            let mut g: Vec<String> = shard[&seq].groups.iter().map(|g| g.to_string()).collect();
            g.sort();
            g
        };
        assert_eq!(groups_of(a), vec!["g".to_string()]);
        assert!(groups_of(b).is_empty());
    }

    #[test]
    fn a_delta_keeps_the_last_change_of_each_key_and_the_newest_version() {
        let change = |table, key: &str, added, version| InterestChange {
            table,
            key: key.into(),
            added,
            version,
        };
        let mut delta = InterestDelta::default();
        assert!(delta.is_empty());
        delta.push(change(Table::Groups, "g", true, 7));
        delta.push(change(Table::Uids, "u", true, 8));
        delta.push(change(Table::Groups, "g", false, 9));
        delta.push(change(Table::Groups, "h", true, 10));
        delta.push(change(Table::Uids, "u", false, 11));
        delta.push(change(Table::Uids, "u", true, 12));
        let i = delta.into_pb();
        assert_eq!(i.version, 12);
        assert!(!i.reset);
        assert_eq!(i.groups_added, vec!["h".to_string()]);
        assert_eq!(i.groups_removed, vec!["g".to_string()]);
        assert_eq!(i.uids_added, vec!["u".to_string()]);
        assert!(i.uids_removed.is_empty());
    }

    #[test]
    fn queue_depth_gauges_count_what_waits_and_a_full_queue_closes_its_client() {
        let hub = hub();
        let limits = QueueLimits {
            messages: 3,
            bytes: 1 << 20,
        };
        let a = ClientShared::new(Wire::Ws, limits);
        let b = ClientShared::new(Wire::Text, limits);
        let (ida, idb) = (hub.add_client(a.clone()), hub.add_client(b.clone()));
        for id in [ida, idb] {
            hub.execute(Command::JoinGroup {
                client_id: id,
                group: "g".into(),
            })
            .unwrap();
        }
        let send = || {
            hub.execute(Command::SendToGroups {
                groups: vec!["g".into()],
                payload: Payload::text("hi"),
                exclude: vec![],
            })
            .unwrap()
        };
        assert_eq!(send(), 2);
        assert_eq!(send(), 2);
        // Each wire got its own encoding: "hi" as a WebSocket frame (4
        // bytes) and as a line (3 bytes).
        assert_eq!(hub.queue_depths(), (4, 2 * 4 + 2 * 3, 2));
        let mut out = VecDeque::new();
        assert_eq!(a.take(&mut out), (2, 8, 0));
        assert_eq!(&out[0][..], b"\x81\x02hi");
        assert_eq!(hub.queue_depths(), (2, 6, 2));
        // b's queue holds 3: the next two sends fill it, then overflow.
        assert_eq!(send(), 2);
        assert_eq!(send(), 1);
        assert_eq!(b.close_code(), Some(codes::CLOSE_SLOW_CONSUMER));
        assert_eq!(hub.metrics.slow_consumers.load(Ordering::Relaxed), 1);
        assert_eq!(a.close_code(), None);
    }

    /// Counts wake-ups, to see whether a client's task was woken.
    struct Wakes(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A connected pair on loopback: the gateway's end (shared, as a plain
    /// client's is) and the client's.
    async fn socket_pair() -> (Arc<tokio::net::TcpStream>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Arc::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test]
    async fn a_flush_list_writes_fanned_out_frames_straight_to_the_socket_and_hands_leftovers_to_the_task(
    ) {
        use tokio::io::AsyncReadExt;
        let hub = hub();
        let limits = QueueLimits {
            messages: 1 << 20,
            bytes: 1 << 30,
        };
        let (socket, mut peer) = socket_pair().await;
        let client = ClientShared::new(Wire::Ws, limits);
        let wakes = Arc::new(Wakes(Default::default()));
        client.register(&Waker::from(wakes.clone()));
        let id = hub.add_client(client.clone());
        join(&hub, id, "g");
        let send = |list: &mut FlushList, text: String| {
            hub.execute_listed(
                Command::SendToGroups {
                    groups: vec!["g".into()],
                    payload: Payload::text(text),
                    exclude: vec![],
                },
                list,
            )
            .unwrap()
            .count
        };

        // Without a socket (TLS, or not serving yet) the task is woken.
        let mut list = FlushList::default();
        assert_eq!(send(&mut list, "early".into()), 1);
        assert!(list.is_empty());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        let mut out = VecDeque::new();
        assert_eq!(client.take(&mut out), (1, 7, 0));
        out.clear();
        assert_eq!(
            client.take(&mut out),
            (0, 0, 0),
            "the task has nothing left: others may write"
        );

        // With one: listed once however many frames, written in one go by
        // the flush, nobody woken.
        client.set_socket(Some(socket.clone()));
        assert_eq!(send(&mut list, "one".into()), 1);
        assert_eq!(send(&mut list, "two".into()), 1);
        assert_eq!(list.clients.len(), 1);
        list.flush(16, &hub.metrics);
        assert!(list.is_empty());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(client.depth(), (0, 0));
        assert_eq!(hub.metrics.messages_out.load(Ordering::Relaxed), 2);
        let mut got = [0u8; 10];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x81\x03one\x81\x03two");

        // While the task writes frames of its own, a flush only wakes it
        // (a woken task registers again when it next waits).
        let rearm = || client.register(&Waker::from(wakes.clone()));
        rearm();
        client.set_task_writing();
        assert_eq!(send(&mut list, "three".into()), 1);
        assert!(list.is_empty(), "not listed: the task is writing");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert_eq!(client.take(&mut out), (1, 7, 0));
        out.clear();
        assert_eq!(client.take(&mut out), (0, 0, 0));

        // A socket that takes only part: the rest, the partly written frame
        // first, goes to the task, and the peer gets every byte in order.
        rearm();
        let big = "x".repeat(60_000);
        let mut expected = Vec::new();
        for i in 0..200 {
            let text = format!("{i:03}{big}");
            expected.extend_from_slice(&encode_message(Wire::Ws, text.as_bytes(), false));
            send(&mut list, text);
        }
        list.flush(16, &hub.metrics);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            3,
            "left over: the task was woken"
        );
        let (frames, _, front_written) = client.take(&mut out);
        assert!(frames > 0 && frames < 200, "{frames}");
        let reader = tokio::spawn(async move {
            let mut all = vec![0u8; expected.len()];
            peer.read_exact(&mut all).await.unwrap();
            (peer, all, expected)
        });
        // What the task does: the rest of the first frame, then the others.
        let mut first = true;
        for frame in out.drain(..) {
            let from = if std::mem::take(&mut first) {
                front_written
            } else {
                0
            };
            let mut rest = &frame[from..];
            while !rest.is_empty() {
                socket.writable().await.unwrap();
                match socket.try_write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let (_peer, all, expected) = reader.await.unwrap();
        assert!(all == expected, "bytes out of order or lost");

        // A client asked to close is not written to any more.
        assert_eq!(client.take(&mut out), (0, 0, 0));
        client.close(1000);
        assert_eq!(send(&mut list, "late".into()), 0);
        assert!(list.is_empty());
    }
}
