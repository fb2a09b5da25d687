//! Domain types for the data path, kept apart from the generated protobuf
//! types and bridged by validating conversions (as linkerd's
//! transport-header does): a [`Command`] always names well-formed client
//! ids, non-empty uids and groups, UTF-8 text payloads and JSON-object
//! sessions, so the code that executes it checks nothing again.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::pb;
use crate::{ClientId, ParseIdError};

/// Longest uid or group name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 512;

/// A message body for a client: text (UTF-8, checked) or binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub data: Bytes,
    pub binary: bool,
}

impl Payload {
    /// A text payload.
    pub fn text(s: impl Into<String>) -> Self {
        Payload {
            data: Bytes::from(s.into()),
            binary: false,
        }
    }

    /// A binary payload.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Payload {
            data: data.into(),
            binary: true,
        }
    }

    /// The text, if this is a text payload.
    pub fn as_text(&self) -> Option<&str> {
        if self.binary {
            None
        } else {
            // Checked when the payload was built from the wire.
            std::str::from_utf8(&self.data).ok()
        }
    }
}

impl From<&str> for Payload {
    fn from(s: &str) -> Self {
        Payload::text(s)
    }
}

impl From<String> for Payload {
    fn from(s: String) -> Self {
        Payload::text(s)
    }
}

impl From<&String> for Payload {
    fn from(s: &String) -> Self {
        Payload::text(s.as_str())
    }
}

impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Payload::binary(b)
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::binary(b)
    }
}

impl From<&serde_json::Value> for Payload {
    fn from(v: &serde_json::Value) -> Self {
        // `to_vec`, not `Display`: the formatter-based path was a large
        // share of a worker's time in profiles. A `Value` always serializes.
        Payload {
            data: Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
            binary: false,
        }
    }
}

impl From<serde_json::Value> for Payload {
    fn from(v: serde_json::Value) -> Self {
        Payload::from(&v)
    }
}

/// A protobuf message that fails validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}`: {source}")]
    BadId {
        field: &'static str,
        source: ParseIdError,
    },
    #[error("field `{0}` must not be empty")]
    Empty(&'static str),
    #[error("field `{0}` is longer than {MAX_NAME_LEN} bytes")]
    TooLong(&'static str),
    #[error("text payload is not valid UTF-8")]
    InvalidUtf8,
    #[error("field `{0}` must be a JSON object")]
    NotJsonObject(&'static str),
    #[error("unknown value {value} for `{field}`")]
    UnknownEnum { field: &'static str, value: i32 },
}

impl TryFrom<pb::Payload> for Payload {
    type Error = ConversionError;
    fn try_from(p: pb::Payload) -> Result<Self, Self::Error> {
        if !p.binary && std::str::from_utf8(&p.data).is_err() {
            return Err(ConversionError::InvalidUtf8);
        }
        Ok(Payload {
            data: p.data,
            binary: p.binary,
        })
    }
}

impl From<Payload> for pb::Payload {
    fn from(p: Payload) -> Self {
        pb::Payload {
            data: p.data,
            binary: p.binary,
        }
    }
}

fn payload(p: Option<pb::Payload>) -> Result<Payload, ConversionError> {
    p.ok_or(ConversionError::Missing("payload"))?.try_into()
}

fn client_id(field: &'static str, s: &str) -> Result<ClientId, ConversionError> {
    s.parse()
        .map_err(|source| ConversionError::BadId { field, source })
}

fn client_ids(field: &'static str, v: &[String]) -> Result<Vec<ClientId>, ConversionError> {
    v.iter().map(|s| client_id(field, s)).collect()
}

/// Checks a uid or group name: non-empty ("0" is fine) and bounded.
pub fn name(field: &'static str, s: String) -> Result<String, ConversionError> {
    check_name(field, &s).map(|()| s)
}

/// The rule of [`name`], for a borrowed name (no copy to check one).
pub fn check_name(field: &'static str, s: &str) -> Result<(), ConversionError> {
    if s.is_empty() {
        Err(ConversionError::Empty(field))
    } else if s.len() > MAX_NAME_LEN {
        Err(ConversionError::TooLong(field))
    } else {
        Ok(())
    }
}

fn names(field: &'static str, v: Vec<String>) -> Result<Vec<String>, ConversionError> {
    v.into_iter().map(|s| name(field, s)).collect()
}

fn json_object(field: &'static str, b: &[u8]) -> Result<Map<String, Value>, ConversionError> {
    if b.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice(b) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ConversionError::NotJsonObject(field)),
    }
}

fn strings(ids: &[ClientId]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

/// What happened to a client, as a worker sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Per-link sequence number, acknowledged after handling.
    pub id: u64,
    pub client_id: ClientId,
    /// The client's session, a JSON object (raw bytes; empty = `{}`).
    pub session: Bytes,
    pub remote_addr: String,
    /// An earlier delivery was not acknowledged (at-least-once redelivery).
    pub redelivered: bool,
    pub kind: EventKind,
}

/// A WebSocket upgrade request, for the worker to accept or reject.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakeRequest {
    pub path: String,
    /// The raw query string (without `?`).
    pub query: String,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
}

impl HandshakeRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }

    /// The value of cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| v.to_string())
            })
    }
}

/// Decodes `%XX` escapes and `+` (as space); invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            out.push(b' ');
        } else if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
            out.push(b'%');
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// Before a WebSocket upgrade completes (WebSocket listeners only).
    Handshake(HandshakeRequest),
    Connect {
        /// "ws", "text" or "frame".
        protocol: String,
    },
    Message(Payload),
    Close {
        reason: String,
        uid: Option<String>,
        groups: Vec<String>,
    },
}

impl TryFrom<pb::Event> for Event {
    type Error = ConversionError;
    fn try_from(e: pb::Event) -> Result<Self, Self::Error> {
        use pb::event::Kind;
        let kind = match e.kind.ok_or(ConversionError::Missing("kind"))? {
            Kind::Connect(c) => EventKind::Connect {
                protocol: c.protocol,
            },
            Kind::Handshake(h) => EventKind::Handshake(HandshakeRequest {
                path: h.path,
                query: h.query,
                headers: h.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            }),
            Kind::Message(m) => EventKind::Message(payload(m.payload)?),
            Kind::Close(c) => EventKind::Close {
                reason: c.reason,
                uid: (!c.uid.is_empty()).then_some(c.uid),
                groups: c.groups,
            },
        };
        Ok(Event {
            id: e.id,
            client_id: client_id("client_id", &e.client_id)?,
            session: e.session,
            remote_addr: e.remote_addr,
            redelivered: e.redelivered,
            kind,
        })
    }
}

impl From<Event> for pb::Event {
    fn from(e: Event) -> Self {
        use pb::event::Kind;
        let kind = match e.kind {
            EventKind::Connect { protocol } => Kind::Connect(pb::Connect { protocol }),
            EventKind::Handshake(h) => Kind::Handshake(pb::Handshake {
                path: h.path,
                query: h.query,
                headers: h
                    .headers
                    .into_iter()
                    .map(|(name, value)| pb::Header { name, value })
                    .collect(),
            }),
            EventKind::Message(p) => Kind::Message(pb::Message {
                payload: Some(p.into()),
            }),
            EventKind::Close {
                reason,
                uid,
                groups,
            } => Kind::Close(pb::Close {
                reason,
                uid: uid.unwrap_or_default(),
                groups,
            }),
        };
        pb::Event {
            id: e.id,
            client_id: e.client_id.to_string(),
            session: e.session,
            remote_addr: e.remote_addr,
            redelivered: e.redelivered,
            kind: Some(kind),
        }
    }
}

/// Something a worker (or push client) asks a gateway to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    SendToClients {
        client_ids: Vec<ClientId>,
        payload: Payload,
    },
    SendToUids {
        uids: Vec<String>,
        payload: Payload,
    },
    SendToGroups {
        groups: Vec<String>,
        payload: Payload,
        exclude: Vec<ClientId>,
    },
    SendToAll {
        payload: Payload,
        exclude: Vec<ClientId>,
    },
    BindUid {
        client_id: ClientId,
        uid: String,
    },
    UnbindUid {
        client_id: ClientId,
    },
    JoinGroup {
        client_id: ClientId,
        group: String,
    },
    LeaveGroup {
        client_id: ClientId,
        group: String,
    },
    Ungroup {
        group: String,
    },
    CloseClient {
        client_id: ClientId,
        final_message: Option<Payload>,
        immediate: bool,
    },
    UpdateSession {
        client_id: ClientId,
        /// Replace the whole session instead of merging key by key.
        replace: bool,
        set: Map<String, Value>,
        remove: Vec<String>,
    },
}

impl Command {
    /// The one client this command concerns, if it concerns exactly one
    /// (such commands go to that client's gateway only).
    pub fn target_client(&self) -> Option<ClientId> {
        match self {
            Command::BindUid { client_id, .. }
            | Command::UnbindUid { client_id }
            | Command::JoinGroup { client_id, .. }
            | Command::LeaveGroup { client_id, .. }
            | Command::CloseClient { client_id, .. }
            | Command::UpdateSession { client_id, .. } => Some(*client_id),
            Command::SendToClients { client_ids, .. } if client_ids.len() == 1 => {
                Some(client_ids[0])
            }
            _ => None,
        }
    }
}

impl TryFrom<pb::Command> for Command {
    type Error = ConversionError;
    fn try_from(c: pb::Command) -> Result<Self, Self::Error> {
        use pb::command::Kind;
        Ok(match c.kind.ok_or(ConversionError::Missing("kind"))? {
            Kind::SendToClients(m) => Command::SendToClients {
                client_ids: client_ids("client_ids", &m.client_ids)?,
                payload: payload(m.payload)?,
            },
            Kind::SendToUids(m) => Command::SendToUids {
                uids: names("uids", m.uids)?,
                payload: payload(m.payload)?,
            },
            Kind::SendToGroups(m) => Command::SendToGroups {
                groups: names("groups", m.groups)?,
                payload: payload(m.payload)?,
                exclude: client_ids("exclude", &m.exclude)?,
            },
            Kind::SendToAll(m) => Command::SendToAll {
                payload: payload(m.payload)?,
                exclude: client_ids("exclude", &m.exclude)?,
            },
            Kind::BindUid(m) => Command::BindUid {
                client_id: client_id("client_id", &m.client_id)?,
                uid: name("uid", m.uid)?,
            },
            Kind::UnbindUid(m) => Command::UnbindUid {
                client_id: client_id("client_id", &m.client_id)?,
            },
            Kind::JoinGroup(m) => Command::JoinGroup {
                client_id: client_id("client_id", &m.client_id)?,
                group: name("group", m.group)?,
            },
            Kind::LeaveGroup(m) => Command::LeaveGroup {
                client_id: client_id("client_id", &m.client_id)?,
                group: name("group", m.group)?,
            },
            Kind::Ungroup(m) => Command::Ungroup {
                group: name("group", m.group)?,
            },
            Kind::CloseClient(m) => Command::CloseClient {
                client_id: client_id("client_id", &m.client_id)?,
                final_message: m.final_message.map(TryInto::try_into).transpose()?,
                immediate: m.immediate,
            },
            Kind::UpdateSession(m) => Command::UpdateSession {
                client_id: client_id("client_id", &m.client_id)?,
                replace: m.replace,
                set: json_object("set", &m.set)?,
                remove: m.remove,
            },
        })
    }
}

impl From<Command> for pb::Command {
    fn from(c: Command) -> Self {
        use pb::command::Kind;
        let kind = match c {
            Command::SendToClients {
                client_ids,
                payload,
            } => Kind::SendToClients(pb::SendToClients {
                client_ids: strings(&client_ids),
                payload: Some(payload.into()),
            }),
            Command::SendToUids { uids, payload } => Kind::SendToUids(pb::SendToUids {
                uids,
                payload: Some(payload.into()),
            }),
            Command::SendToGroups {
                groups,
                payload,
                exclude,
            } => Kind::SendToGroups(pb::SendToGroups {
                groups,
                payload: Some(payload.into()),
                exclude: strings(&exclude),
            }),
            Command::SendToAll { payload, exclude } => Kind::SendToAll(pb::SendToAll {
                payload: Some(payload.into()),
                exclude: strings(&exclude),
            }),
            Command::BindUid { client_id, uid } => Kind::BindUid(pb::BindUid {
                client_id: client_id.to_string(),
                uid,
            }),
            Command::UnbindUid { client_id } => Kind::UnbindUid(pb::UnbindUid {
                client_id: client_id.to_string(),
            }),
            Command::JoinGroup { client_id, group } => Kind::JoinGroup(pb::JoinGroup {
                client_id: client_id.to_string(),
                group,
            }),
            Command::LeaveGroup { client_id, group } => Kind::LeaveGroup(pb::LeaveGroup {
                client_id: client_id.to_string(),
                group,
            }),
            Command::Ungroup { group } => Kind::Ungroup(pb::Ungroup { group }),
            Command::CloseClient {
                client_id,
                final_message,
                immediate,
            } => Kind::CloseClient(pb::CloseClient {
                client_id: client_id.to_string(),
                final_message: final_message.map(Into::into),
                immediate,
            }),
            Command::UpdateSession {
                client_id,
                replace,
                set,
                remove,
            } => Kind::UpdateSession(pb::UpdateSession {
                client_id: client_id.to_string(),
                replace,
                set: Bytes::from(Value::Object(set).to_string()),
                remove,
            }),
        };
        pb::Command {
            id: 0,
            kind: Some(kind),
        }
    }
}

/// Which clients a [`Query`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every client; one bucket with key "".
    All,
    /// Members of each group; one bucket per group.
    Groups(Vec<String>),
    /// Clients bound to each uid; one bucket per uid.
    Uids(Vec<String>),
    /// These clients; one bucket per client that exists.
    ClientIds(Vec<ClientId>),
    /// Every group; one bucket per group.
    EachGroup,
}

/// A question about clients, answered by each gateway for its own clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u64,
    pub scope: Scope,
    pub count_only: bool,
    pub with_uid: bool,
    pub with_session: bool,
    pub with_groups: bool,
}

impl Query {
    /// A query of `scope` that returns client ids only.
    pub fn new(scope: Scope) -> Self {
        Query {
            id: 0,
            scope,
            count_only: false,
            with_uid: false,
            with_session: false,
            with_groups: false,
        }
    }
}

impl TryFrom<pb::Query> for Query {
    type Error = ConversionError;
    fn try_from(q: pb::Query) -> Result<Self, Self::Error> {
        let scope = match pb::Scope::try_from(q.scope) {
            Ok(pb::Scope::All) => Scope::All,
            Ok(pb::Scope::EachGroup) => Scope::EachGroup,
            Ok(pb::Scope::Groups) => Scope::Groups(names("keys", q.keys)?),
            Ok(pb::Scope::Uids) => Scope::Uids(names("keys", q.keys)?),
            Ok(pb::Scope::ClientIds) => Scope::ClientIds(client_ids("keys", &q.keys)?),
            Ok(pb::Scope::Unspecified) | Err(_) => {
                return Err(ConversionError::UnknownEnum {
                    field: "scope",
                    value: q.scope,
                })
            }
        };
        Ok(Query {
            id: q.id,
            scope,
            count_only: q.count_only,
            with_uid: q.with_uid,
            with_session: q.with_session,
            with_groups: q.with_groups,
        })
    }
}

impl From<Query> for pb::Query {
    fn from(q: Query) -> Self {
        let (scope, keys) = match q.scope {
            Scope::All => (pb::Scope::All, vec![]),
            Scope::EachGroup => (pb::Scope::EachGroup, vec![]),
            Scope::Groups(k) => (pb::Scope::Groups, k),
            Scope::Uids(k) => (pb::Scope::Uids, k),
            Scope::ClientIds(ids) => (pb::Scope::ClientIds, strings(&ids)),
        };
        pb::Query {
            id: q.id,
            scope: scope as i32,
            keys,
            count_only: q.count_only,
            with_uid: q.with_uid,
            with_session: q.with_session,
            with_groups: q.with_groups,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GatewayId;

    fn cid(seq: u64) -> ClientId {
        ClientId::new(GatewayId::new(0x1234).unwrap(), seq).unwrap()
    }

    #[test]
    fn commands_round_trip() {
        let mut set = Map::new();
        set.insert("k".into(), Value::from(1));
        for cmd in [
            Command::SendToGroups {
                groups: vec!["0".into(), "room".into()],
                payload: Payload::text("hi"),
                exclude: vec![cid(3)],
            },
            Command::UpdateSession {
                client_id: cid(1),
                replace: false,
                set,
                remove: vec!["gone".into()],
            },
            Command::CloseClient {
                client_id: cid(9),
                final_message: Some(Payload::binary(vec![0, 159])),
                immediate: false,
            },
        ] {
            let wire: pb::Command = cmd.clone().into();
            assert_eq!(Command::try_from(wire).unwrap(), cmd);
        }
    }

    #[test]
    fn invalid_commands_are_refused_with_the_field_named() {
        let bad_id = pb::Command {
            id: 0,
            kind: Some(pb::command::Kind::BindUid(pb::BindUid {
                client_id: "nope".into(),
                uid: "u".into(),
            })),
        };
        let err = Command::try_from(bad_id).unwrap_err();
        assert!(err.to_string().contains("client_id"), "{err}");

        let empty_uid = pb::Command {
            id: 0,
            kind: Some(pb::command::Kind::BindUid(pb::BindUid {
                client_id: cid(1).to_string(),
                uid: String::new(),
            })),
        };
        assert_eq!(
            Command::try_from(empty_uid).unwrap_err(),
            ConversionError::Empty("uid")
        );

        let bad_text = pb::Command {
            id: 0,
            kind: Some(pb::command::Kind::SendToAll(pb::SendToAll {
                payload: Some(pb::Payload {
                    data: Bytes::from_static(&[0xff, 0xfe]),
                    binary: false,
                }),
                exclude: vec![],
            })),
        };
        assert_eq!(
            Command::try_from(bad_text).unwrap_err(),
            ConversionError::InvalidUtf8
        );
        assert_eq!(
            Command::try_from(pb::Command { id: 0, kind: None }).unwrap_err(),
            ConversionError::Missing("kind")
        );
    }

    #[test]
    fn handshake_helpers_decode_query_and_cookies() {
        let h = HandshakeRequest {
            path: "/ws".into(),
            query: "token=a%2Bb%20c&x=1&bad=%zz&tail=%4".into(),
            headers: vec![
                ("cookie".into(), "sid=42; theme=dark".into()),
                ("x-a".into(), "v".into()),
            ],
        };
        assert_eq!(h.query_param("token").as_deref(), Some("a+b c"));
        assert_eq!(h.query_param("bad").as_deref(), Some("%zz"));
        assert_eq!(h.query_param("tail").as_deref(), Some("%4"));
        assert_eq!(h.query_param("nope"), None);
        assert_eq!(h.cookie("theme").as_deref(), Some("dark"));
        assert_eq!(h.header("X-A"), Some("v"));
    }

    #[test]
    fn unknown_scope_is_refused() {
        let q = pb::Query {
            scope: 99,
            ..Default::default()
        };
        assert!(matches!(
            Query::try_from(q),
            Err(ConversionError::UnknownEnum { field: "scope", .. })
        ));
    }
}
