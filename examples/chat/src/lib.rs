//! The chat demo's worker: the JSON chat protocol of `docs/protocol.md`
//! ("Chat demo protocol") on top of the gateworker SDK. Rooms are groups,
//! logins are uids.
#![forbid(unsafe_code)]

pub mod web;

use std::borrow::Cow;

use gw_worker::{CloseInfo, Context, EventHandler, Payload};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// The chat protocol handler.
#[derive(Debug, Default, Clone)]
pub struct Chat;

/// A request the client got wrong; becomes `{"type":"error","reason":...}`.
struct BadRequest(String);

fn field<'a>(msg: &'a Map<String, Value>, name: &str) -> Result<&'a str, BadRequest> {
    match msg.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(BadRequest(format!("`{name}` must not be empty"))),
        Some(_) => Err(BadRequest(format!("`{name}` must be a string"))),
        None => Err(BadRequest(format!("missing `{name}`"))),
    }
}

/// The hot requests (`echo`, `say`, `whisper`) read without building a
/// JSON tree: fields stay borrowed raw JSON and replies are spliced from
/// them. Anything unusual (other types, missing or odd fields, duplicate
/// keys) goes through the general path, which also words the errors.
#[derive(serde::Deserialize)]
struct FastRequest<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    room: Option<&'a RawValue>,
    #[serde(borrow)]
    to: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
}

/// A raw JSON value that is a non-empty string, as its text.
fn raw_name(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let json = raw?.get();
    // A string without escapes is its own text between the quotes (no
    // second parse for the common case; control characters cannot occur
    // unescaped in valid JSON, which the RawValue already is).
    let s: Cow<'_, str> = match json.strip_prefix('"').and_then(|j| j.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Cow::Borrowed(inner),
        _ => serde_json::from_str(json).ok()?,
    };
    (!s.is_empty()).then_some(s)
}

/// `{"type":"<kind>",<fields>,"text":<text>}` from raw JSON pieces.
fn splice(kind: &str, fields: &[(&str, &str)], text: Option<&RawValue>) -> Payload {
    let text = text.map_or("null", RawValue::get);
    // Sized exactly: growing the string showed up per relayed message.
    let len = 19
        + kind.len()
        + text.len()
        + fields
            .iter()
            .map(|(name, json)| 4 + name.len() + json.len())
            .sum::<usize>();
    let mut out = String::with_capacity(len);
    out.push_str("{\"type\":\"");
    out.push_str(kind);
    out.push('"');
    for (name, json) in fields {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        out.push_str(json);
    }
    out.push_str(",\"text\":");
    out.push_str(text);
    out.push('}');
    debug_assert_eq!(out.len(), len);
    Payload::text(out)
}

/// The sender as a JSON string; client ids are hex, nothing to escape.
fn quoted_id(ctx: &Context) -> String {
    let id = ctx.client_id.to_text();
    let mut s = String::with_capacity(id.len() + 2);
    s.push('"');
    s.push_str(&id);
    s.push('"');
    s
}

impl Chat {
    /// `Some` if the request was one of the hot ones and was handled.
    async fn handle_fast(&self, ctx: &Context, text: &str) -> Option<Result<(), gw_worker::Error>> {
        let req: FastRequest<'_> = serde_json::from_str(text).ok()?;
        // Only the relayed kinds name the sender.
        let from = || quoted_id(ctx);
        match req.kind {
            "echo" => Some(ctx.reply(splice("echo", &[], req.text)).await),
            "say" => {
                let room_json = req.room?.get();
                let room = raw_name(req.room)?;
                let said = splice("said", &[("room", room_json), ("from", &from())], req.text);
                Some(ctx.handle().send_to_group(&room, said, &[]).await)
            }
            "whisper" => {
                let to = raw_name(req.to)?;
                let w = splice("whisper", &[("from", &from())], req.text);
                Some(ctx.handle().send_to_uid(&to, w).await)
            }
            _ => None,
        }
    }

    async fn handle(&self, ctx: &Context, msg: Payload) -> Result<(), BadRequest> {
        let text = msg
            .as_text()
            .ok_or_else(|| BadRequest("binary frames are not part of the chat protocol".into()))?;
        if let Some(result) = self.handle_fast(ctx, text).await {
            if let Err(e) = result {
                tracing::warn!(client_id = %ctx.client_id, error = %e, "chat command incomplete");
            }
            return Ok(());
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| BadRequest(format!("invalid JSON: {e}")))?;
        let Value::Object(msg) = value else {
            return Err(BadRequest("expected a JSON object".into()));
        };
        let kind = match msg.get("type") {
            Some(Value::String(t)) => t.as_str(),
            _ => return Err(BadRequest("missing or non-string `type`".into())),
        };
        let handle = ctx.handle();
        let me = ctx.client_id;
        let text = msg.get("text").cloned().unwrap_or(Value::Null);
        let result = match kind {
            "join" => {
                let room = field(&msg, "room")?;
                match handle.join_group(me, room).await {
                    Ok(()) => ctx.reply(json!({"type": "joined", "room": room})).await,
                    Err(e) => Err(e),
                }
            }
            "leave" => {
                let room = field(&msg, "room")?;
                match handle.leave_group(me, room).await {
                    Ok(()) => ctx.reply(json!({"type": "left", "room": room})).await,
                    Err(e) => Err(e),
                }
            }
            "say" => {
                let room = field(&msg, "room")?;
                let said =
                    json!({"type": "said", "room": room, "from": me.to_string(), "text": text});
                handle.send_to_group(room, said, &[]).await
            }
            "login" => {
                let uid = field(&msg, "uid")?;
                match handle.bind_uid(me, uid).await {
                    Ok(()) => ctx.reply(json!({"type": "logged_in", "uid": uid})).await,
                    Err(e) => Err(e),
                }
            }
            "whisper" => {
                let to = field(&msg, "to")?;
                let w = json!({"type": "whisper", "from": me.to_string(), "text": text});
                handle.send_to_uid(to, w).await
            }
            "echo" => ctx.reply(json!({"type": "echo", "text": text})).await,
            "count" => {
                let room = field(&msg, "room")?;
                let (clients, online) = tokio::join!(
                    handle.get_client_count_by_group(room),
                    handle.get_client_count()
                );
                match (clients, online) {
                    (Ok(clients), Ok(online)) => {
                        ctx.reply(json!({"type": "count", "room": room, "clients": clients, "online": online}))
                            .await
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        return Err(BadRequest(format!("count unavailable: {e}")));
                    }
                }
            }
            "push" => {
                // A backend job on this host writing JSON lines to the
                // gateway's `text` listener (GatewayWorker's "internal text
                // gateway" pattern): only local text clients may push.
                if ctx.session.get("backend") != Some(&Value::Bool(true)) {
                    return Err(BadRequest(
                        "push is only for local backends on the text listener".into(),
                    ));
                }
                let uid = field(&msg, "uid")?;
                let n = handle
                    .execute(gw_worker::Command::SendToUids {
                        uids: vec![uid.to_string()],
                        payload: Payload::from(json!({"type": "push", "text": text})),
                    })
                    .await;
                match n {
                    Ok(n) => {
                        ctx.reply(json!({"type": "pushed", "uid": uid, "delivered": n}))
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            other => return Err(BadRequest(format!("unknown type `{other}`"))),
        };
        if let Err(e) = result {
            // A cluster problem, not the client's fault: log it. The client
            // is told when it can be (its own gateway is reachable).
            tracing::warn!(client_id = %me, kind, error = %e, "chat command incomplete");
        }
        Ok(())
    }
}

impl EventHandler for Chat {
    async fn on_connect(&self, ctx: &mut Context) {
        let local = ctx.remote_addr.starts_with("127.") || ctx.remote_addr.starts_with("[::1]");
        if ctx.protocol.as_deref() == Some("text") && local {
            ctx.session.insert("backend", true);
        }
        let welcome = json!({"type": "welcome", "client_id": ctx.client_id.to_string()});
        let _ = ctx.reply(welcome).await;
    }

    async fn on_message(&self, ctx: &mut Context, msg: Payload) {
        if let Err(BadRequest(reason)) = self.handle(ctx, msg).await {
            let _ = ctx.reply(json!({"type": "error", "reason": reason})).await;
        }
    }

    async fn on_close(&self, ctx: &mut Context, info: CloseInfo) {
        for room in &info.groups {
            let gone =
                json!({"type": "gone", "room": room, "client_id": ctx.client_id.to_string()});
            if let Err(e) = ctx.handle().send_to_group(room, gone, &[]).await {
                tracing::warn!(client_id = %ctx.client_id, room, error = %e, "gone notice incomplete");
            }
        }
    }
}

/// The chat protocol behind a token check at connect time: the WebSocket
/// upgrade succeeds only with `?token=<token>` (else HTTP 401), and the
/// client's session starts with `{"authenticated": true}`. An optional
/// `?uid=` logs the client in as part of the handshake.
#[derive(Debug, Clone)]
pub struct TokenChat {
    pub token: String,
}

impl EventHandler for TokenChat {
    async fn on_handshake(
        &self,
        ctx: &mut Context,
        req: &gw_worker::HandshakeRequest,
    ) -> gw_worker::HandshakeDecision {
        use gw_worker::HandshakeDecision;
        if req.query_param("token").as_deref() != Some(self.token.as_str()) {
            return HandshakeDecision::reject(401, "missing or wrong token");
        }
        ctx.session.insert("authenticated", true);
        match req.query_param("uid").filter(|u| !u.is_empty()) {
            Some(uid) => HandshakeDecision::accept().uid(uid),
            None => HandshakeDecision::accept(),
        }
    }

    async fn on_connect(&self, ctx: &mut Context) {
        Chat.on_connect(ctx).await
    }

    async fn on_message(&self, ctx: &mut Context, msg: Payload) {
        Chat.on_message(ctx, msg).await
    }

    async fn on_close(&self, ctx: &mut Context, info: CloseInfo) {
        Chat.on_close(ctx, info).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_string()).unwrap()
    }

    #[test]
    fn raw_names_read_plain_and_escaped_strings_and_refuse_the_rest() {
        assert_eq!(raw_name(Some(&raw(r#""lobby""#))).as_deref(), Some("lobby"));
        assert_eq!(
            raw_name(Some(&raw(r#""a\"b\u00e9""#))).as_deref(),
            Some("a\"bé")
        );
        assert_eq!(raw_name(Some(&raw(r#""""#))), None);
        assert_eq!(raw_name(Some(&raw("12"))), None);
        assert_eq!(raw_name(None), None);
    }

    #[test]
    fn spliced_replies_are_valid_json_of_the_exact_size() {
        let text = raw(r#"{"x":[1,"é"]}"#);
        let p = splice(
            "said",
            &[("room", r#""r""#), ("from", r#""id""#)],
            Some(&text),
        );
        let v: Value = serde_json::from_slice(&p.data).unwrap();
        assert_eq!(
            v,
            json!({"type": "said", "room": "r", "from": "id", "text": {"x": [1, "é"]}})
        );
        let p = splice("echo", &[], None);
        assert_eq!(&p.data[..], br#"{"type":"echo","text":null}"#);
    }
}
