//! The admin API: status, flip, rollback, commit, history, drain wait, reload, metrics and
//! probes, on `listen.admin`.
//!
//! Reads are open (the listener binds loopback by default); every mutating call needs
//! `Authorization: Bearer <token>`, compared in constant time. Bodies are parsed strictly
//! (unknown fields are 400) and limited in size. Every error is `{"error", "message"}`.
//! The listener bounds its clients as the proxy listeners do: `MAX_CONNECTIONS` at once,
//! and `limits.header_read_timeout` for each request's headers, for its body, and for an
//! answer a client takes none of; `/drain/wait` long-polls take at most half the
//! connections (`MAX_WAITERS`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Extension, Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::control::{Change, ChangeError, Control, FlipRequest};
use crate::drain::Tracker;
use crate::listener::AcceptErrors;
use crate::metrics::{ListenerKind, Metrics};
use crate::proxy::stall::ClientIo;
use crate::route_table::RouteTable;
use crate::state::rfc3339;
use crate::upstream::Color;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;
/// Longest `/drain/wait` long-poll (`ctl wait-drained` asks for longer waits in turns).
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The admin bearer token; never printed.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Wraps a token (already trimmed, non-empty).
    pub fn new(token: &str) -> Token {
        Token(token.as_bytes().into())
    }

    /// The token `SWITCHYARD_ADMIN_TOKEN` holds, else the one in `admin.token_file`,
    /// trimmed. Refused, naming the field, when both are missing or blank, and when the
    /// token holds a line break or another control character: no `Authorization` header
    /// can carry it, so every admin write would get 401.
    pub fn read(config: &crate::config::Config) -> Result<Token, crate::config::ConfigError> {
        let refused = |reason: String| config.refused("admin.token_file", reason);
        let not_text = |source: &str| {
            refused(format!(
                "the token in {source} is not UTF-8 text; a token is one line of text"
            ))
        };
        let from_file = || {
            let bytes = std::fs::read(&config.admin.token_file)
                .map_err(|e| config.no_token_error(Some(&e)))?;
            let source = config.admin.token_file.display().to_string();
            String::from_utf8(bytes)
                .map(|text| (text, source.clone()))
                .map_err(|_| not_text(&source))
        };
        // A variable that is blank (as `str::trim` sees it) is unset; one that is not text
        // is refused, not passed over for the file.
        let (text, source) = match std::env::var_os("SWITCHYARD_ADMIN_TOKEN") {
            None => from_file()?,
            Some(set) => match set.into_string() {
                Ok(text) if text.trim().is_empty() => from_file()?,
                Ok(text) => (text, "SWITCHYARD_ADMIN_TOKEN".to_owned()),
                Err(_) => return Err(not_text("SWITCHYARD_ADMIN_TOKEN")),
            },
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(config.no_token_error(None));
        }
        if text.bytes().any(|b| b.is_ascii_control()) {
            return Err(refused(format!(
                "the token in {source} holds a line break or another control character, which no Authorization header can carry; a token is one line"
            )));
        }
        Ok(Token::new(text))
    }

    fn accepts(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .and_then(|v| {
                (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
                    .then(|| v[7..].trim_ascii())
            })
            .unwrap_or_default();
        bool::from(presented.ct_eq(&self.0))
    }
}

/// What the admin handlers share.
#[derive(Clone)]
pub struct Admin {
    pub control: Control,
    pub tracker: Arc<Tracker>,
    pub metrics: Metrics,
    /// The `store` object of `/status` (`{"kind": "file"}`, or the etcd store's revision,
    /// sync and replicas).
    pub store_status: Arc<dyn Fn() -> Value + Send + Sync>,
    /// The `/drain/wait` long-polls open at once, at most `MAX_WAITERS`.
    pub waiters: Waiters,
}

/// Room for `/drain/wait` long-polls: `MAX_WAITERS`, so that waiters, which may hold a
/// connection for an hour, leave the other half of `MAX_CONNECTIONS` to everything else.
#[derive(Clone)]
pub struct Waiters(Arc<Semaphore>);

impl Default for Waiters {
    fn default() -> Waiters {
        Waiters(Arc::new(Semaphore::new(MAX_WAITERS)))
    }
}

/// An admin error as JSON.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let (Some(Value::Object(extra)), Some(obj)) = (self.extra, body.as_object_mut()) {
            obj.extend(extra);
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // A 401 names the scheme it wants (RFC 9110 §11.6.1).
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(r#"Bearer realm="switchyard-admin""#),
            );
        }
        response
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> ApiError {
        let message = e.to_string();
        match e {
            ChangeError::GenerationMismatch { expected, actual } => ApiError {
                extra: Some(json!({ "expected": expected, "generation": actual })),
                ..ApiError::new(StatusCode::CONFLICT, "generation_mismatch", message)
            },
            ChangeError::TargetUnhealthy(_) => {
                ApiError::new(StatusCode::CONFLICT, "target_unhealthy", message)
            }
            ChangeError::NoRollbackTarget => {
                ApiError::new(StatusCode::CONFLICT, "no_rollback_target", message)
            }
            ChangeError::Config(c) => ApiError {
                extra: Some(json!({ "field": c.field, "file": c.file })),
                ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", message)
            },
            ChangeError::Store(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            ),
            ChangeError::ReasonTooLong(_) | ChangeError::RollbackTo => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
            }
            ChangeError::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            ChangeError::ReplicasLagging {
                generation,
                lagging,
                ..
            } => ApiError {
                extra: Some(json!({ "generation": generation, "lagging": lagging })),
                ..ApiError::new(StatusCode::GATEWAY_TIMEOUT, "replicas_lagging", message)
            },
        }
    }
}

/// The body of `/flip` and `/rollback`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    to: Option<Color>,
    #[serde(default)]
    force: bool,
    #[serde(default, with = "crate::duration::option")]
    drain_timeout: Option<Duration>,
    expect_generation: Option<u64>,
    reason: Option<String>,
    /// With the etcd store: answer once every live replica applied the change. With one
    /// file-store replica the change is applied before the answer: nothing to wait for.
    #[serde(default, with = "crate::duration::option")]
    wait_replicas: Option<Duration>,
}

impl ChangeBody {
    fn into_request(self) -> FlipRequest {
        FlipRequest {
            to: self.to,
            force: self.force,
            drain_timeout: self.drain_timeout,
            expect_generation: self.expect_generation,
            reason: self.reason,
            wait_replicas: self.wait_replicas.map(|w| w.min(MAX_WAIT)),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    expect_generation: Option<u64>,
    reason: Option<String>,
}

/// Unknown parameters are refused, as unknown body fields are: a misspelt `timeout`
/// would otherwise wait the default 60 s without a word.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    color: Option<String>,
    timeout: Option<String>,
}

/// Every (method, path) the admin API serves; the router is built from this list, and
/// `deploy/openapi.yaml` is tested against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/status"),
    ("POST", "/flip"),
    ("POST", "/rollback"),
    ("POST", "/commit"),
    ("GET", "/history"),
    ("GET", "/drain/wait"),
    ("POST", "/reload"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
];

/// The handler of one `ROUTES` entry; `None` for a pair that has none.
fn endpoint(method: &str, path: &str) -> Option<MethodRouter<Admin>> {
    Some(match (method, path) {
        ("GET", "/status") => get(status),
        ("POST", "/flip") => post(flip),
        ("POST", "/rollback") => post(rollback),
        ("POST", "/commit") => post(commit),
        ("GET", "/history") => get(history),
        ("GET", "/drain/wait") => get(drain_wait),
        ("POST", "/reload") => post(reload),
        ("GET", "/metrics") => get(metrics),
        ("GET", "/healthz") => get(healthz),
        ("GET", "/readyz") => get(readyz),
        _ => return None,
    })
}

/// Builds the admin router from `ROUTES`; tests call this directly.
pub fn router(admin: Admin) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |router, &(method, path)| {
            router.route(
                path,
                endpoint(method, path).expect("every ROUTES entry has a handler (tested)"),
            )
        })
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        })
        .with_state(admin)
}

/// The address an admin connection came from, in each of its requests' extensions.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

/// A mutating call that presented the admin token, and where it came from. Taken from the
/// request's head, so a caller without the token learns only that, before any body is read.
struct Authorized {
    client: Option<std::net::IpAddr>,
}

impl FromRequestParts<Admin> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, admin: &Admin) -> Result<Self, ApiError> {
        // The token of the current config: a reload that rotated it takes effect at once.
        let table = admin.control.router().load();
        let client = parts
            .extensions
            .get::<Peer>()
            .map(|p| p.0.ip().to_canonical());
        if table.settings.admin_token.accepts(&parts.headers) {
            return Ok(Authorized { client });
        }
        if admin.metrics.unauthorized(ListenerKind::Admin) {
            tracing::warn!(
                client = client.map(tracing::field::display),
                path = parts.uri.path(),
                "an admin call without the admin token got 401 (one line a second at most; switchyard_unauthorized_total counts them all)"
            );
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this call needs Authorization: Bearer <admin token>",
        ))
    }
}

/// The body: at most `MAX_BODY`, within `limits.header_read_timeout`. Read after
/// `Authorized`, so a caller without the token learns only that, and cannot hold a
/// connection (one of `MAX_CONNECTIONS`) by sending a body slowly.
async fn read_body(admin: &Admin, body: Body) -> Result<Bytes, ApiError> {
    let within = admin
        .control
        .router()
        .load()
        .settings
        .config
        .limits
        .header_read_timeout;
    match tokio::time::timeout(within, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over {} KiB", MAX_BODY / 1024),
        )),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("reading the body: {e}"))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not come within {} (limits.header_read_timeout)",
                humantime::format_duration(within)
            ),
        )),
    }
}

async fn parse_body<T: Default + serde::de::DeserializeOwned>(
    admin: &Admin,
    body: Body,
) -> Result<T, ApiError> {
    let body = read_body(admin, body).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    // serde's derived structs also accept a JSON array of their fields; the API takes
    // objects only, as documented.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    // The field at fault is named: `drain_timeout: too long: ...`, not only a column.
    let mut json = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let field = e.path().to_string();
        let e = e.into_inner();
        // serde_path_to_error says "." for the top and "?" where it cannot tell.
        if field == "." || field == "?" {
            ApiError::bad_request(format!("invalid JSON body: {e}"))
        } else {
            ApiError::bad_request(format!("invalid JSON body: {field}: {e}"))
        }
    })?;
    // Nothing may follow the object, as `serde_json::from_slice` checks.
    json.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The `/status` document for a table.
pub fn status_json(admin: &Admin, table: &RouteTable) -> Value {
    let shutdown = admin.tracker.shutdown_order();
    let retired = admin.tracker.retired();
    let now = std::time::Instant::now();
    let colors: serde_json::Map<String, Value> = Color::ALL
        .iter()
        .map(|&color| {
            let counts = admin.tracker.counts(color);
            let order = table.drain_order(color);
            // Upstreams a reload removed that still hold traffic (one the table in hand
            // still lists, in the moment before a reload publishes its own, once).
            let removed: Vec<_> = retired
                .iter()
                .filter(|(u, _)| u.color == color && upstream_busy(u))
                .filter(|(u, _)| !table.pool(color).iter().any(|p| Arc::ptr_eq(p, u)))
                .collect();
            // The earliest deadline of the streams that drain (the flip's, or a reload's
            // for an upstream it removed), or of an order over in-flight requests (the
            // colour's, a removed upstream's) until it comes: those it covers are cut
            // then, so requests after it are new ones (through the preview listener),
            // which do not drain.
            // Streams the colour's order covers count from the change on: each stream's
            // task marks its own deadline only when it wakes to the change, which a
            // flip's answer may come before.
            let covered = order
                .filter(|o| admin.tracker.streams_routed_before(color, o.generation) > 0)
                .map(|o| o.deadline_at);
            let streams = [admin.tracker.drain_deadline(color), covered]
                .into_iter()
                .flatten()
                .min();
            let requests = order
                .filter(|_| counts.in_flight > 0)
                .into_iter()
                .chain(
                    removed
                        .iter()
                        .filter(|(u, _)| u.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0)
                        .map(|(_, o)| *o),
                )
                .filter(|o| o.deadline > now)
                .map(|o| o.deadline_at)
                .min();
            let state = if color == table.active {
                "active"
            } else if streams.is_some() || requests.is_some() {
                "draining"
            } else {
                "standby"
            };
            let mut deadline = [streams, requests]
                .into_iter()
                .flatten()
                .min()
                .filter(|_| state == "draining");
            // At shutdown every colour's traffic drains, the active one's too, by the
            // earlier of the two deadlines.
            if let Some(s) = shutdown
                && !counts.is_empty()
            {
                deadline = Some(deadline.map_or(s.deadline_at, |d| d.min(s.deadline_at)));
            }
            let deadline = deadline.map(rfc3339);
            // The pool's upstreams, then those a reload removed that still hold traffic,
            // with the deadline their drain ends at: the colour's counts are their sums.
            let pool = table.pool(color).iter().map(|u| (u, None));
            let removed = removed
                .iter()
                .map(|(u, o)| (u, Some(rfc3339(o.deadline_at))));
            let upstreams: Vec<Value> = pool
                .chain(removed)
                .map(|(u, removed)| {
                    json!({
                        "url": &*u.name,
                        "healthy": u.is_healthy(),
                        "health": u.health_text(),
                        "in_flight": u.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                        "open_streams": u.open_streams.load(std::sync::atomic::Ordering::Relaxed),
                        "removed": removed.is_some(),
                        "drain_deadline": removed,
                    })
                })
                .collect();
            (
                color.as_str().to_owned(),
                json!({
                    "state": state,
                    "drain_deadline": deadline,
                    "open_streams": counts.open_streams,
                    "in_flight": counts.in_flight,
                    "upstreams": upstreams,
                }),
            )
        })
        .collect();
    json!({
        "active": table.active,
        "standby": table.standby(),
        "rollback_to": table.rollback_to,
        "generation": table.generation,
        "changed_at": rfc3339(table.changed_at),
        "colors": colors,
        "store": (admin.store_status)(),
        "shutting_down": shutdown.is_some(),
        "shutdown_deadline": shutdown.map(|s| rfc3339(s.deadline_at)),
    })
}

/// Whether an upstream holds a request or a stream.
fn upstream_busy(u: &crate::upstream::Upstream) -> bool {
    u.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0
        || u.open_streams.load(std::sync::atomic::Ordering::Relaxed) > 0
}

async fn status(State(admin): State<Admin>) -> Json<Value> {
    let table = admin.control.router().load_full();
    Json(status_json(&admin, &table))
}

fn change_answer(admin: &Admin, outcome: crate::control::Outcome) -> Json<Value> {
    let mut body = status_json(admin, &outcome.table);
    if let Some(obj) = body.as_object_mut() {
        obj.insert("changed".into(), Value::Bool(outcome.changed));
    }
    Json(body)
}

/// Applies a change asked for through the API. A refusal (409 and the like) is logged
/// with who asked: the caller alone has the answer, and the record of a flip that did not
/// happen belongs beside the `route changed` lines of those that did.
async fn apply(
    admin: &Admin,
    by: &Authorized,
    call: &str,
    change: Change,
) -> Result<crate::control::Outcome, ApiError> {
    admin
        .control
        .apply_from(change, by.client)
        .await
        .map_err(|e| {
            tracing::info!(
                action = call,
                client = by.client.map(tracing::field::display),
                error = %e,
                "route change refused"
            );
            e.into()
        })
}

async fn flip(
    State(admin): State<Admin>,
    by: Authorized,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let b: ChangeBody = parse_body(&admin, body).await?;
    let change = Change::Flip(b.into_request());
    let outcome = apply(&admin, &by, "flip", change).await?;
    Ok(change_answer(&admin, outcome))
}

async fn rollback(
    State(admin): State<Admin>,
    by: Authorized,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let b: ChangeBody = parse_body(&admin, body).await?;
    let change = Change::Rollback(b.into_request());
    let outcome = apply(&admin, &by, "rollback", change).await?;
    Ok(change_answer(&admin, outcome))
}

async fn commit(
    State(admin): State<Admin>,
    by: Authorized,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let b: CommitBody = parse_body(&admin, body).await?;
    let change = Change::Commit {
        expect_generation: b.expect_generation,
        reason: b.reason,
    };
    let outcome = apply(&admin, &by, "commit", change).await?;
    Ok(change_answer(&admin, outcome))
}

async fn reload(
    State(admin): State<Admin>,
    by: Authorized,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    // No body; an empty JSON object, which generic clients send, says nothing either.
    let body = read_body(&admin, body).await?;
    let text = String::from_utf8_lossy(&body);
    let empty = text.trim().is_empty()
        || serde_json::from_str::<Value>(&text)
            .is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty()));
    if !empty {
        return Err(ApiError::bad_request(
            "reload takes no body (or an empty JSON object)",
        ));
    }
    // Logged as SIGHUP's refusal is: the caller has the 400, the log keeps the record.
    let outcome = admin
        .control
        .apply_from(Change::Reload, by.client)
        .await
        .inspect_err(
            |e| tracing::warn!(error = %e, "reload refused (POST /reload); the old config stays"),
        )?;
    Ok(change_answer(&admin, outcome))
}

async fn history(State(admin): State<Admin>) -> Json<Value> {
    let state = admin.control.state();
    Json(json!({ "history": state.history }))
}

async fn drain_wait(
    State(admin): State<Admin>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let color: Color = q
        .color
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("query parameter `color` is required"))?
        .parse()
        .map_err(ApiError::bad_request)?;
    let timeout = match q.timeout.as_deref() {
        None => Duration::from_secs(60),
        Some(t) => crate::duration::parse(t)
            .map_err(|e| ApiError::bad_request(format!("timeout `{t}`: {e}")))?
            .min(MAX_WAIT),
    };
    let _waiting = admin.waiters.0.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_waiters",
            format!("{MAX_WAITERS} drain waits are open already; ask again when one has ended"),
        )
    })?;
    let counts = admin.tracker.wait_empty(color, timeout).await;
    Ok(Json(if counts.is_empty() {
        json!({ "drained": true, "color": color, "open_streams": 0, "in_flight": 0 })
    } else {
        json!({ "drained": false, "color": color, "open_streams": counts.open_streams, "in_flight": counts.in_flight })
    }))
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        admin.metrics.encode(),
    )
}

async fn healthz() -> Json<Value> {
    Json(json!({ "ok": true }))
}

async fn readyz(State(admin): State<Admin>) -> (StatusCode, Json<Value>) {
    let table = admin.control.router().load();
    if admin.tracker.shutdown_order().is_some() {
        // A balancer that reads this stops sending new connections, which the proxy
        // listeners no longer accept anyway.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "ready": false, "active": table.active, "error": "shutting_down",
                          "message": "switchyard is shutting down: the proxy and preview listeners no longer accept" }),
            ),
        )
    } else if let Some(why) = admin.control.not_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "ready": false, "active": table.active, "error": "route_state_unknown",
                          "message": why }),
            ),
        )
    } else if table.has_healthy(table.active) {
        (
            StatusCode::OK,
            Json(json!({ "ready": true, "active": table.active })),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "ready": false, "active": table.active, "error": "no_healthy_upstream",
                          "message": format!("{} has no healthy upstream (none a probe has judged healthy)", table.active) }),
            ),
        )
    }
}

/// Admin connections open at once. Beyond it accepting waits and the kernel's backlog
/// holds new clients, so scrapers, probes and pipelines (or anything else that reaches the
/// port) cannot take the sockets client traffic needs.
pub const MAX_CONNECTIONS: usize = 64;

/// The send buffer of an admin socket (Linux doubles it for its bookkeeping): answers are
/// small or read by scripts, and a small buffer shows a slow reader's progress in steps
/// of a few KiB.
const SEND_BUFFER: usize = 8 * 1024;

/// `/drain/wait` long-polls open at once; beyond it they are answered 429.
pub const MAX_WAITERS: usize = MAX_CONNECTIONS / 2;

/// How long a shutdown waits for admin requests under way (a drain wait answers as soon
/// as the drain it waits on is over) before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the admin API (HTTP/1.1) until `stop` resolves, then lets requests under way
/// finish for `SHUTDOWN_GRACE` at most, and drops them. A client that has not sent a
/// request's headers within `limits.header_read_timeout` of connecting, or of its last
/// answer, is closed, as on the proxy listener, and so is one that takes none of an answer
/// for as long. Connections count in `connections{listener="admin"}`.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let gauge = admin.metrics.connections(ListenerKind::Admin).clone();
    let routes = admin.control.router().clone();
    let app = router(admin);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    // Connections still open when the shutdown's grace has run out.
    let dropped = CancellationToken::new();
    let mut accept_errors = AcceptErrors::default();
    tokio::pin!(stop);
    loop {
        let (socket, peer, slot) = tokio::select! {
            () = &mut stop => break,
            accepted = accept(&listener, &slots, &mut accept_errors) => accepted,
        };
        gauge.inc();
        // An answer the client takes none of for `limits.header_read_timeout` fails its
        // connection. Progress is what a write hands the kernel, and Linux reports a full
        // socket writable again only once a third of its send buffer is free: a small
        // buffer makes that a few KiB, so a client that reads a large `/history` slowly but
        // steadily (about 1 KB/s at the default 10 s) is not cut.
        let _ = socket2::SockRef::from(&socket).set_send_buffer_size(SEND_BUFFER);
        let socket = CountedStream {
            inner: ClientIo::with_period(socket, routes.clone(), |limits| {
                limits.header_read_timeout
            }),
            gauge: gauge.clone(),
        };
        // Read per connection, so a reload applies to the next ones.
        let header_read_timeout = routes.load().settings.config.limits.header_read_timeout;
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let service = TowerToHyperService::new(app.clone().layer(Extension(Peer(peer))));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(socket), service));
        let dropped = dropped.clone();
        tokio::spawn(async move {
            tokio::select! {
                // An error is the client's (gone, too slow, bad request): nothing to report.
                _ = connection => {}
                () = dropped.cancelled() => {}
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin requests still under way at shutdown are dropped");
        dropped.cancel();
    }
    Ok(())
}

/// A free connection slot, then a connection. Accept errors (out of descriptors) are
/// retried and logged as on the proxy listeners.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    errors: &mut AcceptErrors,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => return (socket, peer, slot),
            Err(e) => errors.failed("admin", &e).await,
        }
    }
}

/// A socket counted in the `connections` gauge until dropped.
struct CountedStream {
    inner: ClientIo,
    gauge: prometheus::IntGauge,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
