//! [`Handle`]: every command and query of the Gateway API, usable from
//! handlers and from any task (timers, background jobs).
//!
//! Routing: a call naming one client goes to that client's gateway only
//! (read from the client id, no lookup). Sends to uids, groups and everyone
//! go to every connected gateway. Queries ask every gateway concurrently
//! and merge; a gateway that does not answer in time is *named* in
//! [`Error::Incomplete`], never silently left out.
//!
//! Read-your-writes: commands and queries to one gateway travel on one
//! ordered link and the gateway applies them in order, so a query issued
//! after a command (from the same worker) sees its effect.
//!
//! Sends to groups and uids go only to gateways with members for them (each
//! gateway's `Interest`). This worker's own joins and binds count at once;
//! another worker's count once this worker has applied the gateway's change
//! and acknowledged it. A gateway holds back the joining worker's next
//! frame (its reply to the client, typically) until every acknowledging
//! worker has, so once a client sees the reply to its join or bind, sends
//! from any worker include it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gw_link::discovery::GatewayList;
use gw_link::frame;
use gw_protocol::pb::{self, link_frame::Body};
use gw_protocol::{ClientId, Command, GatewayId, Payload, Query, Scope};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// What a [`Handle`] call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The client's gateway is not connected to this worker (it is gone, or
    /// not yet connected).
    #[error("gateway {0} of this client is not connected")]
    GatewayUnavailable(GatewayId),
    /// Some gateways did not take a command or answer a query in time.
    /// The others did: this says exactly which are missing.
    #[error("no answer from gateways {missing:?}")]
    Incomplete { missing: Vec<GatewayId> },
    /// No gateway is known yet (the register has not answered, or lists
    /// none): nothing can be sent or asked.
    #[error("no gateway is known: is the register reachable and the secret right?")]
    NoGateway,
    /// The gateway refused a query.
    #[error("gateway refused the query: {0}")]
    Refused(String),
    /// An argument is invalid (e.g. an empty uid or group).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// A gateway's answer to a query or a counted command.
pub(crate) enum Reply {
    Query(pb::QueryReply),
    Command(pb::CommandReply),
}

/// Sender side of one connected gateway link.
#[derive(Clone)]
pub(crate) struct LinkSender {
    pub(crate) gateway: GatewayId,
    pub(crate) tx: mpsc::Sender<pb::LinkFrame>,
    pub(crate) pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
}

/// The groups and uids a gateway has members for (its `Interest`).
#[derive(Debug, Default)]
pub(crate) struct GatewayInterest {
    pub(crate) groups: HashSet<String>,
    pub(crate) uids: HashSet<String>,
    /// Keys this worker joined or bound there and the gateway has not
    /// confirmed yet. They count as interest even if a removal sent before
    /// our join arrives in between (it is older than our join).
    /// The gateway confirms each join/bind of ours with an `Interest`
    /// frame (after any older change); an entry unconfirmed for long (the
    /// client was gone) expires.
    pending_groups: HashMap<String, std::time::Instant>,
    pending_uids: HashMap<String, std::time::Instant>,
}

/// How long an unconfirmed join or bind counts as interest.
const PENDING_TTL: Duration = Duration::from_secs(10);

impl GatewayInterest {
    /// Applies an `Interest` frame (a full set when `reset`).
    pub(crate) fn apply(&mut self, i: pb::Interest) {
        if i.reset {
            self.groups.clear();
            self.uids.clear();
        }
        for g in i.groups_removed {
            self.groups.remove(&g);
        }
        for u in i.uids_removed {
            self.uids.remove(&u);
        }
        for g in &i.groups_added {
            self.pending_groups.remove(g);
        }
        for u in &i.uids_added {
            self.pending_uids.remove(u);
        }
        self.pending_groups.retain(|_, t| t.elapsed() < PENDING_TTL);
        self.pending_uids.retain(|_, t| t.elapsed() < PENDING_TTL);
        self.groups.extend(i.groups_added);
        self.uids.extend(i.uids_added);
    }

    /// Whether this gateway may have recipients for `cmd`: only group and
    /// uid sends (and ungroup) are narrowed; everything else goes to every
    /// gateway.
    fn wants(&self, cmd: &Command) -> bool {
        match cmd {
            Command::SendToGroups { groups, .. } => groups.iter().any(|g| self.has_group(g)),
            Command::Ungroup { group } => self.has_group(group),
            Command::SendToUids { uids, .. } => uids.iter().any(|u| self.has_uid(u)),
            _ => true,
        }
    }

    fn has_group(&self, g: &str) -> bool {
        self.groups.contains(g)
            || self
                .pending_groups
                .get(g)
                .is_some_and(|t| t.elapsed() < PENDING_TTL)
    }

    fn has_uid(&self, u: &str) -> bool {
        self.uids.contains(u)
            || self
                .pending_uids
                .get(u)
                .is_some_and(|t| t.elapsed() < PENDING_TTL)
    }
}

pub(crate) struct Inner {
    pub(crate) links: RwLock<HashMap<GatewayId, LinkSender>>,
    /// Interest per linked gateway; a gateway missing here has not sent
    /// its set yet and gets every group and uid message.
    pub(crate) interest: RwLock<HashMap<GatewayId, GatewayInterest>>,
    pub(crate) known: watch::Receiver<GatewayList>,
    /// `known` with its ids parsed, for the list it was parsed from: every
    /// command to all gateways asks which listed ones are not linked, and
    /// parsing the list each time showed up per relayed message.
    known_ids: Mutex<(GatewayList, Arc<[GatewayId]>)>,
    pub(crate) query_timeout: Duration,
    next_query: AtomicU64,
}

/// Cloneable access to the cluster. See the module docs for routing.
#[derive(Clone)]
pub struct Handle {
    pub(crate) inner: Arc<Inner>,
    /// Set on a [`Handle::partial`] handle: queries answer with what they
    /// got and record the gateways that did not answer here.
    partial: Option<Arc<Mutex<Vec<GatewayId>>>>,
}

fn check_name(field: &str, s: &str) -> Result<(), Error> {
    gw_protocol::domain::check_name("name", s).map_err(|_| {
        Error::InvalidArgument(format!(
            "{field} must be non-empty and at most {} bytes",
            gw_protocol::domain::MAX_NAME_LEN
        ))
    })
}

/// Answers of a query, per gateway that answered.
type Answers = Vec<(GatewayId, Vec<pb::Bucket>)>;

impl Handle {
    pub(crate) fn new(known: watch::Receiver<GatewayList>, query_timeout: Duration) -> Self {
        Handle {
            inner: Arc::new(Inner {
                links: RwLock::new(HashMap::new()),
                interest: RwLock::new(HashMap::new()),
                known,
                known_ids: Mutex::new((GatewayList::default(), Arc::from([]))),
                query_timeout,
                next_query: AtomicU64::new(1),
            }),
            partial: None,
        }
    }

    /// A handle whose queries, instead of failing with
    /// [`Error::Incomplete`], answer with what the gateways that did answer
    /// said; the ones that did not are listed in the returned cell (read it
    /// after the call). For callers that prefer a marked partial answer to
    /// none, like the HTTP API.
    pub fn partial(&self) -> (Handle, Arc<Mutex<Vec<GatewayId>>>) {
        let missing = Arc::new(Mutex::new(Vec::new()));
        (
            Handle {
                inner: self.inner.clone(),
                partial: Some(missing.clone()),
            },
            missing,
        )
    }

    /// Gateways this worker is connected to now.
    pub fn connected_gateways(&self) -> Vec<GatewayId> {
        let mut v: Vec<GatewayId> = self.inner.links.read().keys().copied().collect();
        v.sort();
        v
    }

    /// Gateways the register lists.
    pub fn known_gateways(&self) -> Vec<GatewayId> {
        self.known_ids().to_vec()
    }

    /// The listed gateways' ids, parsed once per list.
    fn known_ids(&self) -> Arc<[GatewayId]> {
        let list = self.inner.known.borrow().clone();
        let mut cache = self.inner.known_ids.lock();
        if !Arc::ptr_eq(&cache.0, &list) {
            let ids = list
                .iter()
                .filter_map(|g| g.gateway_id.parse().ok())
                .collect();
            *cache = (list, ids);
        }
        cache.1.clone()
    }

    fn link(&self, gateway: GatewayId) -> Result<LinkSender, Error> {
        self.inner
            .links
            .read()
            .get(&gateway)
            .cloned()
            .ok_or(Error::GatewayUnavailable(gateway))
    }

    fn links(&self) -> Vec<LinkSender> {
        self.inner.links.read().values().cloned().collect()
    }

    /// Known gateways that are not connected.
    fn unconnected(&self) -> Vec<GatewayId> {
        let known = self.known_ids();
        let links = self.inner.links.read();
        known
            .iter()
            .filter(|g| !links.contains_key(g))
            .copied()
            .collect()
    }

    async fn send_frame(link: &LinkSender, f: pb::LinkFrame) -> Result<(), Error> {
        link.tx
            .send(f)
            .await
            .map_err(|_| Error::GatewayUnavailable(link.gateway))
    }

    /// Whether `gateway` may have recipients for `cmd`: only group and uid
    /// sends (and ungroup) are narrowed by interest; everything else goes
    /// to every gateway.
    fn interested(&self, gateway: GatewayId, cmd: &Command) -> bool {
        self.inner
            .interest
            .read()
            .get(&gateway)
            .is_none_or(|i| i.wants(cmd))
    }

    /// Our own joins and binds count as interest at once, before the
    /// gateway's confirmation arrives: a send right after a join (from this
    /// worker) must reach the new member (read-your-writes).
    fn note_interest(&self, gateway: GatewayId, cmd: &Command) {
        let mut interest = self.inner.interest.write();
        if let Some(i) = interest.get_mut(&gateway) {
            match cmd {
                Command::JoinGroup { group, .. } => {
                    i.pending_groups
                        .insert(group.clone(), std::time::Instant::now());
                }
                Command::BindUid { uid, .. } => {
                    i.pending_uids
                        .insert(uid.clone(), std::time::Instant::now());
                }
                _ => {}
            }
        }
    }

    async fn command_to(&self, gateway: GatewayId, cmd: Command) -> Result<(), Error> {
        let link = self.link(gateway)?;
        self.note_interest(gateway, &cmd);
        Self::send_frame(&link, frame(Body::Command(cmd.into()))).await
    }

    async fn command_all(&self, cmd: Command) -> Result<(), Error> {
        self.any_gateway()?;
        // The links to send to, chosen under one lock of each table.
        let targets: Vec<LinkSender> = {
            let links = self.inner.links.read();
            let interest = self.inner.interest.read();
            links
                .values()
                .filter(|l| interest.get(&l.gateway).is_none_or(|i| i.wants(&cmd)))
                .cloned()
                .collect()
        };
        // Encoded once; every link but the last gets a clone.
        let f = frame(Body::Command(cmd.into()));
        let mut missing = self.unconnected();
        if let Some((last, rest)) = targets.split_last() {
            for link in rest {
                if Self::send_frame(link, f.clone()).await.is_err() {
                    missing.push(link.gateway);
                }
            }
            if Self::send_frame(last, f).await.is_err() {
                missing.push(last.gateway);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            missing.sort();
            missing.dedup();
            Err(Error::Incomplete { missing })
        }
    }

    async fn query_link(
        &self,
        link: &LinkSender,
        mut q: pb::Query,
    ) -> Result<Vec<pb::Bucket>, Error> {
        let id = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        q.id = id;
        let (tx, rx) = oneshot::channel();
        link.pending.lock().insert(id, tx);
        let result = async {
            Self::send_frame(link, frame(Body::Query(q))).await?;
            match tokio::time::timeout(self.inner.query_timeout, rx).await {
                Ok(Ok(Reply::Query(reply))) if reply.error_code != 0 => {
                    Err(Error::Refused(reply.error))
                }
                Ok(Ok(Reply::Query(reply))) => Ok(reply.buckets),
                _ => Err(Error::Incomplete {
                    missing: vec![link.gateway],
                }),
            }
        }
        .await;
        link.pending.lock().remove(&id);
        result
    }

    fn any_gateway(&self) -> Result<(), Error> {
        if self.inner.links.read().is_empty() && self.inner.known.borrow().is_empty() {
            Err(Error::NoGateway)
        } else {
            Ok(())
        }
    }

    /// Asks every gateway at once.
    async fn query_all(&self, q: Query) -> Result<Answers, Error> {
        self.any_gateway()?;
        let q: pb::Query = q.into();
        let links = self.links();
        let answers =
            futures_util::future::join_all(links.iter().map(|l| self.query_link(l, q.clone())))
                .await;
        let mut missing = self.unconnected();
        let mut out = Vec::new();
        for (link, answer) in links.iter().zip(answers) {
            match answer {
                Ok(b) => out.push((link.gateway, b)),
                Err(Error::Refused(e)) => return Err(Error::Refused(e)),
                Err(_) => missing.push(link.gateway),
            }
        }
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            Ok(out)
        } else if let Some(cell) = &self.partial {
            cell.lock().extend(missing);
            Ok(out)
        } else {
            Err(Error::Incomplete { missing })
        }
    }

    /// Asks only the gateways of `ids`.
    async fn query_clients(
        &self,
        ids: &[ClientId],
        mut q: Query,
    ) -> Result<Vec<pb::Bucket>, Error> {
        let mut by_gateway: BTreeMap<GatewayId, Vec<ClientId>> = BTreeMap::new();
        for id in ids {
            by_gateway.entry(id.gateway()).or_default().push(*id);
        }
        let mut out = Vec::new();
        for (gateway, ids) in by_gateway {
            q.scope = Scope::ClientIds(ids);
            let link = self.link(gateway)?;
            out.extend(self.query_link(&link, q.clone().into()).await?);
        }
        Ok(out)
    }

    /// Sends `cmd` to `link` and waits for the gateway's count.
    async fn command_counted(&self, link: &LinkSender, cmd: &Command) -> Result<u64, Error> {
        let id = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        let mut wire: pb::Command = cmd.clone().into();
        wire.id = id;
        let (tx, rx) = oneshot::channel();
        link.pending.lock().insert(id, tx);
        let result = async {
            Self::send_frame(link, frame(Body::Command(wire))).await?;
            match tokio::time::timeout(self.inner.query_timeout, rx).await {
                Ok(Ok(Reply::Command(r))) if r.error_code != 0 => Err(Error::Refused(r.error)),
                Ok(Ok(Reply::Command(r))) => Ok(r.delivered),
                _ => Err(Error::Incomplete {
                    missing: vec![link.gateway],
                }),
            }
        }
        .await;
        link.pending.lock().remove(&id);
        result
    }

    /// Runs any command where it belongs and waits until every gateway
    /// concerned has applied it; returns how many client connections it
    /// reached (sends) or affected (membership, sessions, closes).
    /// This is what the HTTP push API uses. `execute(Command::Ungroup { group: "g".into() })`
    pub async fn execute(&self, cmd: Command) -> Result<u64, Error> {
        self.any_gateway()?;
        let targets: Vec<GatewayId> = match &cmd {
            Command::SendToClients { client_ids, .. } => {
                let mut g: Vec<GatewayId> = client_ids.iter().map(|c| c.gateway()).collect();
                g.sort();
                g.dedup();
                g
            }
            c => match c.target_client() {
                Some(id) => vec![id.gateway()],
                None => {
                    let mut all = self.known_gateways();
                    all.extend(self.connected_gateways());
                    all.sort();
                    all.dedup();
                    all
                }
            },
        };
        let mut total = 0;
        let mut missing = Vec::new();
        let mut calls = Vec::new();
        for g in &targets {
            match self.link(*g) {
                Ok(link) if self.interested(*g, &cmd) => {
                    self.note_interest(*g, &cmd);
                    calls.push(link)
                }
                Ok(_) => {}
                Err(_) => missing.push(*g),
            }
        }
        let results =
            futures_util::future::join_all(calls.iter().map(|l| self.command_counted(l, &cmd)))
                .await;
        for (link, r) in calls.iter().zip(results) {
            match r {
                Ok(n) => total += n,
                Err(Error::Refused(e)) => return Err(Error::Refused(e)),
                Err(_) => missing.push(link.gateway),
            }
        }
        // A command for one client whose gateway is gone reached nobody:
        // that is an answer (0), not a failure, when the register no longer
        // lists the gateway.
        let known = self.known_gateways();
        missing.retain(|g| known.contains(g) || self.inner.links.read().contains_key(g));
        if missing.is_empty() {
            Ok(total)
        } else {
            missing.sort();
            missing.dedup();
            Err(Error::Incomplete { missing })
        }
    }

    /// Number of clients on each connected gateway (for status displays).
    pub async fn client_count_per_gateway(&self) -> Result<BTreeMap<GatewayId, usize>, Error> {
        let answers = self
            .query_all(Self::scoped(Scope::All, true, false, false))
            .await?;
        Ok(answers
            .iter()
            .map(|(g, b)| (*g, b.iter().map(|b| b.count as usize).sum()))
            .collect())
    }

    // ----- sending -----

    /// Sends to one client. `send_to_client(id, "hi")`
    pub async fn send_to_client(
        &self,
        client_id: ClientId,
        msg: impl Into<Payload>,
    ) -> Result<(), Error> {
        self.command_to(
            client_id.gateway(),
            Command::SendToClients {
                client_ids: vec![client_id],
                payload: msg.into(),
            },
        )
        .await
    }

    /// Sends to a list of clients (one command per gateway involved).
    /// `send_to_clients(&[a, b], "hi")`
    pub async fn send_to_clients(
        &self,
        client_ids: &[ClientId],
        msg: impl Into<Payload>,
    ) -> Result<(), Error> {
        let payload = msg.into();
        let mut by_gateway: BTreeMap<GatewayId, Vec<ClientId>> = BTreeMap::new();
        for id in client_ids {
            by_gateway.entry(id.gateway()).or_default().push(*id);
        }
        let mut missing = Vec::new();
        for (gateway, ids) in by_gateway {
            let cmd = Command::SendToClients {
                client_ids: ids,
                payload: payload.clone(),
            };
            if self.command_to(gateway, cmd).await.is_err() {
                missing.push(gateway);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Incomplete { missing })
        }
    }

    /// Sends to every client, except `exclude`. `send_to_all("hi", &[])`
    pub async fn send_to_all(
        &self,
        msg: impl Into<Payload>,
        exclude: &[ClientId],
    ) -> Result<(), Error> {
        self.command_all(Command::SendToAll {
            payload: msg.into(),
            exclude: exclude.to_vec(),
        })
        .await
    }

    /// Sends to every connection bound to `uid`. `send_to_uid("u1", "hi")`
    pub async fn send_to_uid(&self, uid: &str, msg: impl Into<Payload>) -> Result<(), Error> {
        self.send_to_uids(&[uid], msg).await
    }

    /// Sends to every connection of each uid. `send_to_uids(&["u1", "u2"], "hi")`
    pub async fn send_to_uids(&self, uids: &[&str], msg: impl Into<Payload>) -> Result<(), Error> {
        for u in uids {
            check_name("uid", u)?;
        }
        self.command_all(Command::SendToUids {
            uids: uids.iter().map(|s| s.to_string()).collect(),
            payload: msg.into(),
        })
        .await
    }

    /// Sends to every member of `group` except `exclude`.
    /// `send_to_group("room1", "hi", &[])`
    pub async fn send_to_group(
        &self,
        group: &str,
        msg: impl Into<Payload>,
        exclude: &[ClientId],
    ) -> Result<(), Error> {
        self.send_to_groups(&[group], msg, exclude).await
    }

    /// Sends to the members of several groups; a client in more than one
    /// of them receives the message once. `send_to_groups(&["a", "b"], "hi", &[])`
    pub async fn send_to_groups(
        &self,
        groups: &[&str],
        msg: impl Into<Payload>,
        exclude: &[ClientId],
    ) -> Result<(), Error> {
        for g in groups {
            check_name("group", g)?;
        }
        self.command_all(Command::SendToGroups {
            groups: groups.iter().map(|s| s.to_string()).collect(),
            payload: msg.into(),
            exclude: exclude.to_vec(),
        })
        .await
    }

    /// Closes a client after sending it `last` (if any) and whatever was
    /// queued for it before. `close_client(id, Some("bye".into()))`
    pub async fn close_client(
        &self,
        client_id: ClientId,
        last: Option<Payload>,
    ) -> Result<(), Error> {
        self.command_to(
            client_id.gateway(),
            Command::CloseClient {
                client_id,
                final_message: last,
                immediate: false,
            },
        )
        .await
    }

    /// Drops a client at once, discarding anything queued for it.
    /// `destroy_client(id)`
    pub async fn destroy_client(&self, client_id: ClientId) -> Result<(), Error> {
        self.command_to(
            client_id.gateway(),
            Command::CloseClient {
                client_id,
                final_message: None,
                immediate: true,
            },
        )
        .await
    }

    // ----- membership -----

    /// Binds a client to a uid (one uid per client; many clients per uid).
    /// `bind_uid(id, "u1")`
    pub async fn bind_uid(&self, client_id: ClientId, uid: &str) -> Result<(), Error> {
        check_name("uid", uid)?;
        self.command_to(
            client_id.gateway(),
            Command::BindUid {
                client_id,
                uid: uid.to_string(),
            },
        )
        .await
    }

    /// Unbinds a client from its uid. `unbind_uid(id)`
    pub async fn unbind_uid(&self, client_id: ClientId) -> Result<(), Error> {
        self.command_to(client_id.gateway(), Command::UnbindUid { client_id })
            .await
    }

    /// Adds a client to a group. `join_group(id, "room1")`
    pub async fn join_group(&self, client_id: ClientId, group: &str) -> Result<(), Error> {
        check_name("group", group)?;
        self.command_to(
            client_id.gateway(),
            Command::JoinGroup {
                client_id,
                group: group.to_string(),
            },
        )
        .await
    }

    /// Removes a client from a group. `leave_group(id, "room1")`
    pub async fn leave_group(&self, client_id: ClientId, group: &str) -> Result<(), Error> {
        check_name("group", group)?;
        self.command_to(
            client_id.gateway(),
            Command::LeaveGroup {
                client_id,
                group: group.to_string(),
            },
        )
        .await
    }

    /// Dissolves a group on every gateway. `ungroup("room1")`
    pub async fn ungroup(&self, group: &str) -> Result<(), Error> {
        check_name("group", group)?;
        self.command_all(Command::Ungroup {
            group: group.to_string(),
        })
        .await
    }

    // ----- sessions -----

    /// Replaces a client's session. `set_session(id, json!({"k":1}).as_object().unwrap().clone())`
    pub async fn set_session(
        &self,
        client_id: ClientId,
        session: Map<String, Value>,
    ) -> Result<(), Error> {
        self.command_to(
            client_id.gateway(),
            Command::UpdateSession {
                client_id,
                replace: true,
                set: session,
                remove: vec![],
            },
        )
        .await
    }

    /// Merges keys into a client's session. `update_session(id, map)`
    pub async fn update_session(
        &self,
        client_id: ClientId,
        changes: Map<String, Value>,
    ) -> Result<(), Error> {
        self.update_session_keys(client_id, changes, vec![]).await
    }

    pub(crate) async fn update_session_keys(
        &self,
        client_id: ClientId,
        set: Map<String, Value>,
        remove: Vec<String>,
    ) -> Result<(), Error> {
        self.command_to(
            client_id.gateway(),
            Command::UpdateSession {
                client_id,
                replace: false,
                set,
                remove,
            },
        )
        .await
    }

    /// A client's session; `None` if it is not online. `get_session(id)`
    pub async fn get_session(
        &self,
        client_id: ClientId,
    ) -> Result<Option<Map<String, Value>>, Error> {
        let mut q = Query::new(Scope::ClientIds(vec![client_id]));
        q.with_session = true;
        let buckets = self.query_clients(&[client_id], q).await?;
        Ok(buckets.into_iter().flat_map(|b| b.clients).next().map(|c| {
            crate::session::Session::from_bytes(&c.session)
                .as_map()
                .clone()
        }))
    }

    // ----- queries -----

    /// Whether a client is connected. `is_online(id)`
    pub async fn is_online(&self, client_id: ClientId) -> Result<bool, Error> {
        let mut q = Query::new(Scope::ClientIds(vec![client_id]));
        q.count_only = true;
        match self.query_clients(&[client_id], q).await {
            Ok(b) => Ok(b.iter().any(|b| b.count > 0)),
            // Its gateway is gone, so is the client.
            Err(Error::GatewayUnavailable(_))
                if !self.known_gateways().contains(&client_id.gateway()) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn count_of(answers: &Answers) -> usize {
        answers
            .iter()
            .flat_map(|(_, b)| b)
            .map(|b| b.count as usize)
            .sum()
    }

    fn ids_of(answers: Answers) -> Vec<ClientId> {
        let mut v: Vec<ClientId> = answers
            .into_iter()
            .flat_map(|(_, b)| b)
            .flat_map(|b| b.clients)
            .filter_map(|c| c.client_id.parse().ok())
            .collect();
        v.sort();
        v
    }

    fn uids_of(answers: Answers) -> Vec<String> {
        let set: BTreeSet<String> = answers
            .into_iter()
            .flat_map(|(_, b)| b)
            .flat_map(|b| b.clients)
            .filter(|c| !c.uid.is_empty())
            .map(|c| c.uid)
            .collect();
        set.into_iter().collect()
    }

    fn sessions_of(answers: Answers) -> BTreeMap<ClientId, Map<String, Value>> {
        answers
            .into_iter()
            .flat_map(|(_, b)| b)
            .flat_map(|b| b.clients)
            .filter_map(|c| {
                let id = c.client_id.parse().ok()?;
                Some((
                    id,
                    crate::session::Session::from_bytes(&c.session)
                        .as_map()
                        .clone(),
                ))
            })
            .collect()
    }

    /// Merges per-key buckets across gateways.
    fn by_key(answers: Answers) -> BTreeMap<String, Vec<pb::ClientRecord>> {
        let mut out: BTreeMap<String, Vec<pb::ClientRecord>> = BTreeMap::new();
        for b in answers.into_iter().flat_map(|(_, b)| b) {
            out.entry(b.key).or_default().extend(b.clients);
        }
        out
    }

    fn counts_by_key(answers: &Answers) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for b in answers.iter().flat_map(|(_, b)| b) {
            *out.entry(b.key.clone()).or_default() += b.count as usize;
        }
        out
    }

    fn scoped(scope: Scope, count_only: bool, with_uid: bool, with_session: bool) -> Query {
        let mut q = Query::new(scope);
        q.count_only = count_only;
        q.with_uid = with_uid;
        q.with_session = with_session;
        q
    }

    /// Number of clients online. `get_client_count()`
    pub async fn get_client_count(&self) -> Result<usize, Error> {
        Ok(Self::count_of(
            &self
                .query_all(Self::scoped(Scope::All, true, false, false))
                .await?,
        ))
    }

    /// Number of members of a group. `get_client_count_by_group("room1")`
    pub async fn get_client_count_by_group(&self, group: &str) -> Result<usize, Error> {
        check_name("group", group)?;
        let q = Self::scoped(Scope::Groups(vec![group.into()]), true, false, false);
        Ok(Self::count_of(&self.query_all(q).await?))
    }

    /// Every client id online. `get_client_id_list()`
    pub async fn get_client_id_list(&self) -> Result<Vec<ClientId>, Error> {
        Ok(Self::ids_of(
            self.query_all(Self::scoped(Scope::All, false, false, false))
                .await?,
        ))
    }

    /// Client ids in a group. `get_client_id_list_by_group("room1")`
    pub async fn get_client_id_list_by_group(&self, group: &str) -> Result<Vec<ClientId>, Error> {
        check_name("group", group)?;
        let q = Self::scoped(Scope::Groups(vec![group.into()]), false, false, false);
        Ok(Self::ids_of(self.query_all(q).await?))
    }

    /// Every client's session. `get_client_sessions()`
    pub async fn get_client_sessions(
        &self,
    ) -> Result<BTreeMap<ClientId, Map<String, Value>>, Error> {
        Ok(Self::sessions_of(
            self.query_all(Self::scoped(Scope::All, false, false, true))
                .await?,
        ))
    }

    /// Sessions of a group's members. `get_client_sessions_by_group("room1")`
    pub async fn get_client_sessions_by_group(
        &self,
        group: &str,
    ) -> Result<BTreeMap<ClientId, Map<String, Value>>, Error> {
        check_name("group", group)?;
        let q = Self::scoped(Scope::Groups(vec![group.into()]), false, false, true);
        Ok(Self::sessions_of(self.query_all(q).await?))
    }

    /// Every bound uid, once each. `get_uid_list()`
    pub async fn get_uid_list(&self) -> Result<Vec<String>, Error> {
        Ok(Self::uids_of(
            self.query_all(Self::scoped(Scope::All, false, true, false))
                .await?,
        ))
    }

    /// Number of distinct uids online. `get_uid_count()`
    pub async fn get_uid_count(&self) -> Result<usize, Error> {
        Ok(self.get_uid_list().await?.len())
    }

    /// Distinct uids in a group. `get_uid_list_by_group("room1")`
    pub async fn get_uid_list_by_group(&self, group: &str) -> Result<Vec<String>, Error> {
        check_name("group", group)?;
        let q = Self::scoped(Scope::Groups(vec![group.into()]), false, true, false);
        Ok(Self::uids_of(self.query_all(q).await?))
    }

    /// Number of distinct uids in a group. `get_uid_count_by_group("room1")`
    pub async fn get_uid_count_by_group(&self, group: &str) -> Result<usize, Error> {
        Ok(self.get_uid_list_by_group(group).await?.len())
    }

    /// Every group with at least one member. `get_group_id_list()`
    pub async fn get_group_id_list(&self) -> Result<Vec<String>, Error> {
        let answers = self
            .query_all(Self::scoped(Scope::EachGroup, true, false, false))
            .await?;
        Ok(Self::counts_by_key(&answers).into_keys().collect())
    }

    /// Distinct uids of every group. `get_all_group_uid_list()`
    pub async fn get_all_group_uid_list(&self) -> Result<BTreeMap<String, Vec<String>>, Error> {
        let answers = self
            .query_all(Self::scoped(Scope::EachGroup, false, true, false))
            .await?;
        Ok(Self::by_key(answers)
            .into_iter()
            .map(|(g, recs)| {
                let uids: BTreeSet<String> = recs
                    .into_iter()
                    .filter(|r| !r.uid.is_empty())
                    .map(|r| r.uid)
                    .collect();
                (g, uids.into_iter().collect())
            })
            .collect())
    }

    /// Number of distinct uids of every group. `get_all_group_uid_count()`
    pub async fn get_all_group_uid_count(&self) -> Result<BTreeMap<String, usize>, Error> {
        Ok(self
            .get_all_group_uid_list()
            .await?
            .into_iter()
            .map(|(g, u)| (g, u.len()))
            .collect())
    }

    /// Client ids of every group. `get_all_group_client_id_list()`
    pub async fn get_all_group_client_id_list(
        &self,
    ) -> Result<BTreeMap<String, Vec<ClientId>>, Error> {
        let answers = self
            .query_all(Self::scoped(Scope::EachGroup, false, false, false))
            .await?;
        Ok(Self::by_key(answers)
            .into_iter()
            .map(|(g, recs)| {
                let mut ids: Vec<ClientId> = recs
                    .iter()
                    .filter_map(|r| r.client_id.parse().ok())
                    .collect();
                ids.sort();
                (g, ids)
            })
            .collect())
    }

    /// Member count of every group. `get_all_group_client_id_count()`
    pub async fn get_all_group_client_id_count(&self) -> Result<BTreeMap<String, usize>, Error> {
        let answers = self
            .query_all(Self::scoped(Scope::EachGroup, true, false, false))
            .await?;
        Ok(Self::counts_by_key(&answers))
    }

    /// Whether any connection is bound to `uid`. `is_uid_online("u1")`
    pub async fn is_uid_online(&self, uid: &str) -> Result<bool, Error> {
        Ok(self
            .is_uids_online(&[uid])
            .await?
            .get(uid)
            .copied()
            .unwrap_or(false))
    }

    /// For each uid, whether it is online. `is_uids_online(&["u1", "u2"])`
    pub async fn is_uids_online(&self, uids: &[&str]) -> Result<BTreeMap<String, bool>, Error> {
        for u in uids {
            check_name("uid", u)?;
        }
        let q = Self::scoped(
            Scope::Uids(uids.iter().map(|s| s.to_string()).collect()),
            true,
            false,
            false,
        );
        let counts = Self::counts_by_key(&self.query_all(q).await?);
        Ok(uids
            .iter()
            .map(|u| (u.to_string(), counts.get(*u).copied().unwrap_or(0) > 0))
            .collect())
    }

    /// Client ids bound to `uid`. `get_client_id_by_uid("u1")`
    pub async fn get_client_id_by_uid(&self, uid: &str) -> Result<Vec<ClientId>, Error> {
        Ok(self
            .batch_get_client_id_by_uid(&[uid])
            .await?
            .remove(uid)
            .unwrap_or_default())
    }

    /// Client ids of each uid. `batch_get_client_id_by_uid(&["u1", "u2"])`
    pub async fn batch_get_client_id_by_uid(
        &self,
        uids: &[&str],
    ) -> Result<BTreeMap<String, Vec<ClientId>>, Error> {
        for u in uids {
            check_name("uid", u)?;
        }
        let q = Self::scoped(
            Scope::Uids(uids.iter().map(|s| s.to_string()).collect()),
            false,
            false,
            false,
        );
        let mut by_key = Self::by_key(self.query_all(q).await?);
        Ok(uids
            .iter()
            .map(|u| {
                let mut ids: Vec<ClientId> = by_key
                    .remove(*u)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|r| r.client_id.parse().ok())
                    .collect();
                ids.sort();
                (u.to_string(), ids)
            })
            .collect())
    }

    /// The uid a client is bound to. `get_uid_by_client_id(id)`
    pub async fn get_uid_by_client_id(&self, client_id: ClientId) -> Result<Option<String>, Error> {
        let mut q = Query::new(Scope::ClientIds(vec![client_id]));
        q.with_uid = true;
        let buckets = self.query_clients(&[client_id], q).await?;
        Ok(buckets
            .into_iter()
            .flat_map(|b| b.clients)
            .next()
            .map(|c| c.uid)
            .filter(|u| !u.is_empty()))
    }

    /// Member count of each group. `batch_get_client_count_by_group(&["a", "b"])`
    pub async fn batch_get_client_count_by_group(
        &self,
        groups: &[&str],
    ) -> Result<BTreeMap<String, usize>, Error> {
        for g in groups {
            check_name("group", g)?;
        }
        let q = Self::scoped(
            Scope::Groups(groups.iter().map(|s| s.to_string()).collect()),
            true,
            false,
            false,
        );
        let counts = Self::counts_by_key(&self.query_all(q).await?);
        Ok(groups
            .iter()
            .map(|g| (g.to_string(), counts.get(*g).copied().unwrap_or(0)))
            .collect())
    }
}
