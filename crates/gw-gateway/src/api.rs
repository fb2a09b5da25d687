//! The HTTP/JSON push API (and health and metrics endpoints), served on its
//! own listener when `api` is configured.
//!
//! `POST /v1/<method>` with a JSON object of arguments, one route per
//! Gateway API method named as in the SDK, authenticated with
//! `Authorization: Bearer <api_key>`. The gateway carries out calls that
//! concern other gateways through its own push-client links to every
//! gateway (learned from the register), so a caller needs one address.
//! `docs/push-api.md` and `docs/openapi.yaml` describe every route.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use axum::body::Bytes as BodyBytes;
use axum::extract::{DefaultBodyLimit, Path, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use gw_protocol::domain::name;
use gw_protocol::{ClientId, Command, Payload};
use gw_worker::{Error as HandleError, Handle};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::State;

/// What the API handlers share.
pub(crate) struct ApiState {
    pub(crate) gateway: Arc<State>,
    pub(crate) push: Handle,
    key: Vec<u8>,
}

/// A refused or failed call, as JSON.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    field: Option<String>,
    message: String,
    missing: Vec<String>,
}

impl ApiError {
    fn bad(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            field: Some(field.to_string()),
            message: message.into(),
            missing: vec![],
        }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(f) = &self.field {
            e["field"] = json!(f);
        }
        if !self.missing.is_empty() {
            e["missing_gateways"] = json!(self.missing);
        }
        json!({"ok": false, "error": e})
    }
}

impl From<HandleError> for ApiError {
    fn from(e: HandleError) -> Self {
        match e {
            HandleError::Incomplete { missing } => ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                code: "incomplete",
                field: None,
                message: "some gateways did not answer in time; the others did".into(),
                missing: missing.iter().map(ToString::to_string).collect(),
            },
            HandleError::GatewayUnavailable(g) => ApiError {
                status: StatusCode::BAD_GATEWAY,
                code: "gateway_unavailable",
                field: None,
                message: format!("gateway {g} is not reachable"),
                missing: vec![g.to_string()],
            },
            HandleError::InvalidArgument(m) => ApiError::bad("arguments", m),
            HandleError::NoGateway => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "no_gateway",
                field: None,
                message: e_msg_no_gateway(),
                missing: vec![],
            },
            HandleError::Refused(m) => ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "refused",
                field: None,
                message: m,
                missing: vec![],
            },
        }
    }
}

fn e_msg_no_gateway() -> String {
    "this gateway has not yet learned the cluster from the register".into()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.to_json())).into_response()
    }
}

/// Serves the API until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    gateway: Arc<State>,
    push: Handle,
    shutdown: CancellationToken,
) {
    let key = gateway
        .config()
        .api_key
        .clone()
        .unwrap_or_default()
        .into_bytes();
    let limit = gateway.config().max_message_bytes * 2 + 64 * 1024;
    let state = Arc::new(ApiState { gateway, push, key });
    let app = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/{method}", post(call_route))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "push API server stopped");
    }
}

async fn readyz(AxState(s): AxState<Arc<ApiState>>) -> Response {
    let workers = s.gateway.hub.metrics.worker_links.load(Ordering::Relaxed);
    if workers > 0 {
        Json(json!({"status": "ready", "workers": workers})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "no worker connected"})),
        )
            .into_response()
    }
}

async fn metrics(AxState(s): AxState<Arc<ApiState>>) -> Response {
    let hub = &s.gateway.hub;
    let (queue_messages, queue_bytes, queue_max_messages) = hub.queue_depths();
    let body = hub.metrics.render(&crate::metrics::Gauges {
        clients: hub.client_count(),
        queue_messages,
        queue_bytes,
        queue_max_messages,
        link_queue_events: s.gateway.router.queued_events(),
    });
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

/// Compares in constant time (for equal lengths).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn call_route(
    AxState(s): AxState<Arc<ApiState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Result<BodyBytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same(token.as_bytes(), &s.key) {
        tracing::warn!(%method, "push API call refused: missing or wrong API key");
        return ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            field: None,
            message: "missing or wrong API key (Authorization: Bearer <key>)".into(),
            missing: vec![],
        }
        .into_response();
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status();
            return ApiError {
                status,
                code: if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "payload_too_large"
                } else {
                    "malformed_json"
                },
                field: Some("body".into()),
                message: e.body_text(),
                missing: vec![],
            }
            .into_response();
        }
    };
    let args = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return ApiError::bad("body", "expected a JSON object of arguments").into_response()
        }
        Err(e) => {
            return ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "malformed_json",
                field: Some("body".into()),
                message: e.to_string(),
                missing: vec![],
            }
            .into_response()
        }
    };
    let result = if method == "batch" {
        batch(&s, args).await
    } else {
        call(&s, &method, &args).await
    };
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Marks a query answer as partial when some gateways did not answer.
fn mark_partial(mut v: Value, missing: &Mutex<Vec<gw_protocol::GatewayId>>) -> Value {
    let missing = std::mem::take(&mut *missing.lock());
    if !missing.is_empty() && v.get("result").is_some() {
        v["complete"] = json!(false);
        v["missing_gateways"] = json!(missing.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    v
}

async fn batch(s: &ApiState, args: Map<String, Value>) -> Result<Value, ApiError> {
    let Some(Value::Array(ops)) = args.get("ops") else {
        return Err(ApiError::bad("ops", "expected an array of operations"));
    };
    let mut results = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let r = match op {
            Value::Object(o) => match o.get("op").and_then(Value::as_str) {
                Some("batch") => Err(ApiError::bad(
                    &format!("ops[{i}].op"),
                    "batches do not nest",
                )),
                Some(m) => call(s, m, o).await,
                None => Err(ApiError::bad(
                    &format!("ops[{i}].op"),
                    "missing operation name",
                )),
            },
            _ => Err(ApiError::bad(&format!("ops[{i}]"), "expected an object")),
        };
        results.push(match r {
            Ok(v) => v,
            Err(e) => e.to_json(),
        });
    }
    Ok(json!({"ok": true, "results": results}))
}

// ----- argument parsing -----

fn string(args: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match args.get(field) {
        Some(Value::String(s)) => name("x", s.clone())
            .map_err(|_| ApiError::bad(field, "must be a non-empty string of at most 512 bytes")),
        Some(_) => Err(ApiError::bad(field, "must be a string")),
        None => Err(ApiError::bad(field, "is required")),
    }
}

fn strings(args: &Map<String, Value>, field: &str) -> Result<Vec<String>, ApiError> {
    match args.get(field) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() && s.len() <= 512 => Ok(s.clone()),
                _ => Err(ApiError::bad(
                    field,
                    "must be an array of non-empty strings",
                )),
            })
            .collect(),
        Some(_) => Err(ApiError::bad(field, "must be an array of strings")),
        None => Err(ApiError::bad(field, "is required")),
    }
}

fn client_id(args: &Map<String, Value>, field: &str) -> Result<ClientId, ApiError> {
    match args.get(field) {
        Some(Value::String(s)) => s
            .parse()
            .map_err(|e: gw_protocol::ParseIdError| ApiError::bad(field, e.to_string())),
        Some(_) => Err(ApiError::bad(field, "must be a string")),
        None => Err(ApiError::bad(field, "is required")),
    }
}

fn client_ids(
    args: &Map<String, Value>,
    field: &str,
    required: bool,
) -> Result<Vec<ClientId>, ApiError> {
    match args.get(field) {
        None if !required => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| ApiError::bad(field, format!("invalid client_id {v}")))
            })
            .collect(),
        Some(_) => Err(ApiError::bad(field, "must be an array of client ids")),
        None => Err(ApiError::bad(field, "is required")),
    }
}

fn object(args: &Map<String, Value>, field: &str) -> Result<Map<String, Value>, ApiError> {
    match args.get(field) {
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(ApiError::bad(field, "must be a JSON object")),
        None => Err(ApiError::bad(field, "is required")),
    }
}

/// `data` (a string, or any JSON value sent as its JSON text), with
/// `"encoding": "base64"` for binary.
fn payload(
    s: &ApiState,
    args: &Map<String, Value>,
    required: bool,
) -> Result<Option<Payload>, ApiError> {
    let data = match args.get("data") {
        None if !required => return Ok(None),
        None => return Err(ApiError::bad("data", "is required")),
        Some(d) => d,
    };
    let encoding = match args.get("encoding") {
        None => None,
        Some(Value::String(e)) => Some(e.as_str()),
        Some(_) => {
            return Err(ApiError::bad(
                "encoding",
                "must be a string: \"text\" or \"base64\"",
            ))
        }
    };
    let p = match (encoding, data) {
        (Some("base64"), Value::String(b)) => Payload::binary(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| ApiError::bad("data", format!("invalid base64: {e}")))?,
        ),
        (Some("base64"), _) => return Err(ApiError::bad("data", "base64 data must be a string")),
        (Some(other), _) if other != "text" => {
            return Err(ApiError::bad(
                "encoding",
                format!("unknown encoding `{other}` (use text or base64)"),
            ))
        }
        (_, Value::String(t)) => Payload::text(t.clone()),
        (_, v) => Payload::text(v.to_string()),
    };
    let max = s.gateway.config().max_message_bytes;
    if p.data.len() > max {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            field: Some("data".into()),
            message: format!("{} bytes is over the limit of {max}", p.data.len()),
            missing: vec![],
        });
    }
    Ok(Some(p))
}

fn required_payload(s: &ApiState, args: &Map<String, Value>) -> Result<Payload, ApiError> {
    Ok(payload(s, args, true)?.expect("required"))
}

fn ids_json(ids: &[ClientId]) -> Value {
    json!(ids.iter().map(ToString::to_string).collect::<Vec<_>>())
}

fn id_map(m: BTreeMap<String, Vec<ClientId>>) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k, ids_json(&v))).collect())
}

fn ok(result: Value) -> Value {
    json!({"ok": true, "result": result})
}

async fn exec(s: &ApiState, cmd: Command, key: &str) -> Result<Value, ApiError> {
    let n = s.push.execute(cmd).await?;
    Ok(json!({"ok": true, key: n}))
}

/// Every method of the API. Also the list the OpenAPI document covers.
pub const METHODS: &[&str] = &[
    "send_to_client",
    "send_to_clients",
    "send_to_all",
    "send_to_uid",
    "send_to_uids",
    "send_to_group",
    "send_to_groups",
    "close_client",
    "destroy_client",
    "bind_uid",
    "unbind_uid",
    "join_group",
    "leave_group",
    "ungroup",
    "set_session",
    "update_session",
    "get_session",
    "is_online",
    "get_client_count",
    "get_client_count_by_group",
    "get_client_id_list",
    "get_client_id_list_by_group",
    "get_client_sessions",
    "get_client_sessions_by_group",
    "get_uid_list",
    "get_uid_count",
    "get_uid_list_by_group",
    "get_uid_count_by_group",
    "get_group_id_list",
    "get_all_group_uid_list",
    "get_all_group_uid_count",
    "get_all_group_client_id_list",
    "get_all_group_client_id_count",
    "is_uid_online",
    "get_client_id_by_uid",
    "get_uid_by_client_id",
    "is_uids_online",
    "batch_get_client_id_by_uid",
    "batch_get_client_count_by_group",
    "batch",
];

/// Runs one method. A query some gateway did not answer in time still
/// answers, with `"complete": false` and the `missing_gateways`.
async fn call(s: &ApiState, method: &str, a: &Map<String, Value>) -> Result<Value, ApiError> {
    let (h, missing) = s.push.partial();
    let v = call_with(s, &h, method, a).await?;
    Ok(mark_partial(v, &missing))
}

async fn call_with(
    s: &ApiState,
    h: &Handle,
    method: &str,
    a: &Map<String, Value>,
) -> Result<Value, ApiError> {
    let sessions = |m: BTreeMap<ClientId, Map<String, Value>>| {
        Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.to_string(), Value::Object(v)))
                .collect(),
        )
    };
    Ok(match method {
        "send_to_client" => {
            exec(
                s,
                Command::SendToClients {
                    client_ids: vec![client_id(a, "client_id")?],
                    payload: required_payload(s, a)?,
                },
                "delivered",
            )
            .await?
        }
        "send_to_clients" => {
            exec(
                s,
                Command::SendToClients {
                    client_ids: client_ids(a, "client_ids", true)?,
                    payload: required_payload(s, a)?,
                },
                "delivered",
            )
            .await?
        }
        "send_to_all" => {
            exec(
                s,
                Command::SendToAll {
                    payload: required_payload(s, a)?,
                    exclude: client_ids(a, "exclude", false)?,
                },
                "delivered",
            )
            .await?
        }
        "send_to_uid" => {
            exec(
                s,
                Command::SendToUids {
                    uids: vec![string(a, "uid")?],
                    payload: required_payload(s, a)?,
                },
                "delivered",
            )
            .await?
        }
        "send_to_uids" => {
            exec(
                s,
                Command::SendToUids {
                    uids: strings(a, "uids")?,
                    payload: required_payload(s, a)?,
                },
                "delivered",
            )
            .await?
        }
        "send_to_group" => {
            exec(
                s,
                Command::SendToGroups {
                    groups: vec![string(a, "group")?],
                    payload: required_payload(s, a)?,
                    exclude: client_ids(a, "exclude", false)?,
                },
                "delivered",
            )
            .await?
        }
        "send_to_groups" => {
            exec(
                s,
                Command::SendToGroups {
                    groups: strings(a, "groups")?,
                    payload: required_payload(s, a)?,
                    exclude: client_ids(a, "exclude", false)?,
                },
                "delivered",
            )
            .await?
        }
        "close_client" => {
            exec(
                s,
                Command::CloseClient {
                    client_id: client_id(a, "client_id")?,
                    final_message: payload(s, a, false)?,
                    immediate: false,
                },
                "affected",
            )
            .await?
        }
        "destroy_client" => {
            exec(
                s,
                Command::CloseClient {
                    client_id: client_id(a, "client_id")?,
                    final_message: None,
                    immediate: true,
                },
                "affected",
            )
            .await?
        }
        "bind_uid" => {
            exec(
                s,
                Command::BindUid {
                    client_id: client_id(a, "client_id")?,
                    uid: string(a, "uid")?,
                },
                "affected",
            )
            .await?
        }
        "unbind_uid" => {
            exec(
                s,
                Command::UnbindUid {
                    client_id: client_id(a, "client_id")?,
                },
                "affected",
            )
            .await?
        }
        "join_group" => {
            exec(
                s,
                Command::JoinGroup {
                    client_id: client_id(a, "client_id")?,
                    group: string(a, "group")?,
                },
                "affected",
            )
            .await?
        }
        "leave_group" => {
            exec(
                s,
                Command::LeaveGroup {
                    client_id: client_id(a, "client_id")?,
                    group: string(a, "group")?,
                },
                "affected",
            )
            .await?
        }
        "ungroup" => {
            exec(
                s,
                Command::Ungroup {
                    group: string(a, "group")?,
                },
                "affected",
            )
            .await?
        }
        "set_session" => {
            exec(
                s,
                Command::UpdateSession {
                    client_id: client_id(a, "client_id")?,
                    replace: true,
                    set: object(a, "session")?,
                    remove: vec![],
                },
                "affected",
            )
            .await?
        }
        "update_session" => {
            exec(
                s,
                Command::UpdateSession {
                    client_id: client_id(a, "client_id")?,
                    replace: false,
                    set: object(a, "session")?,
                    remove: vec![],
                },
                "affected",
            )
            .await?
        }
        "get_session" => ok(h
            .get_session(client_id(a, "client_id")?)
            .await?
            .map(Value::Object)
            .unwrap_or(Value::Null)),
        "is_online" => ok(json!(h.is_online(client_id(a, "client_id")?).await?)),
        "get_client_count" => ok(json!(h.get_client_count().await?)),
        "get_client_count_by_group" => ok(json!(
            h.get_client_count_by_group(&string(a, "group")?).await?
        )),
        "get_client_id_list" => ok(ids_json(&h.get_client_id_list().await?)),
        "get_client_id_list_by_group" => ok(ids_json(
            &h.get_client_id_list_by_group(&string(a, "group")?).await?,
        )),
        "get_client_sessions" => ok(sessions(h.get_client_sessions().await?)),
        "get_client_sessions_by_group" => ok(sessions(
            h.get_client_sessions_by_group(&string(a, "group")?).await?,
        )),
        "get_uid_list" => ok(json!(h.get_uid_list().await?)),
        "get_uid_count" => ok(json!(h.get_uid_count().await?)),
        "get_uid_list_by_group" => ok(json!(h.get_uid_list_by_group(&string(a, "group")?).await?)),
        "get_uid_count_by_group" => {
            ok(json!(h.get_uid_count_by_group(&string(a, "group")?).await?))
        }
        "get_group_id_list" => ok(json!(h.get_group_id_list().await?)),
        "get_all_group_uid_list" => ok(json!(h.get_all_group_uid_list().await?)),
        "get_all_group_uid_count" => ok(json!(h.get_all_group_uid_count().await?)),
        "get_all_group_client_id_list" => ok(id_map(h.get_all_group_client_id_list().await?)),
        "get_all_group_client_id_count" => ok(json!(h.get_all_group_client_id_count().await?)),
        "is_uid_online" => ok(json!(h.is_uid_online(&string(a, "uid")?).await?)),
        "get_client_id_by_uid" => ok(ids_json(&h.get_client_id_by_uid(&string(a, "uid")?).await?)),
        "get_uid_by_client_id" => ok(json!(
            h.get_uid_by_client_id(client_id(a, "client_id")?).await?
        )),
        "is_uids_online" => {
            let uids = strings(a, "uids")?;
            let refs: Vec<&str> = uids.iter().map(String::as_str).collect();
            ok(json!(h.is_uids_online(&refs).await?))
        }
        "batch_get_client_id_by_uid" => {
            let uids = strings(a, "uids")?;
            let refs: Vec<&str> = uids.iter().map(String::as_str).collect();
            ok(id_map(h.batch_get_client_id_by_uid(&refs).await?))
        }
        "batch_get_client_count_by_group" => {
            let groups = strings(a, "groups")?;
            let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
            ok(json!(h.batch_get_client_count_by_group(&refs).await?))
        }
        other => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                code: "unknown_method",
                field: Some("method".into()),
                message: format!("unknown method `{other}`"),
                missing: vec![],
            })
        }
    })
}
