//! Per request: one route-table snapshot, client auth, the colour, then dispatch to plain
//! HTTP (`proxy::http`) or a WebSocket stream (`proxy::websocket`).
//!
//! Phases, in order, for every request on the proxy and preview listeners:
//! 1. load the table once (`Router::load_full`); everything below uses that snapshot;
//! 2. client auth, when `[client_auth]` is set (401, not routed, no colour header);
//! 3. the colour: the active one on the proxy listener, the standby one on preview;
//! 4. pick an upstream in that colour (least outstanding work of two random choices),
//!    retrying a connect failure on another upstream of the same colour, never the other;
//! 5. forward, tagging the answer with `x-switchyard-color`.

pub mod body;
pub mod frames;
pub mod h1;
pub mod headers;
pub mod http;
pub mod pump;
pub mod stall;
pub mod websocket;
mod woken;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use ::http::{HeaderValue, Request, Response};
use futures_util::future::{self, Either};
use hyper::body::Incoming;

use crate::drain::{RequestGuard, Tracker};
use crate::error::ProxyError;
use crate::metrics::{ListenerKind, Metrics, UpstreamErrorKind, once_a_second};
use crate::route_table::{RouteTable, Router};
use crate::upstream::{Color, Upstream};

pub use body::ProxyBody;

/// The header naming the colour that served (or was tried for) a response.
pub const COLOR_HEADER: &str = "x-switchyard-color";
/// The same, as a header name made once: inserting by `&str` checks the text on every
/// response (callgrind: a fifth of `tag`'s cost).
const COLOR_HEADER_NAME: ::http::HeaderName = ::http::HeaderName::from_static(COLOR_HEADER);

/// What the listener knows about a client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// Its IP as header text, appended to `X-Forwarded-For`: formatted once per
    /// connection, not per request.
    pub client_ip: HeaderValue,
    /// Proxy (active colour) or preview (standby colour).
    pub listener: ListenerKind,
    /// Whether the client connection is TLS (`X-Forwarded-Proto`).
    pub tls: bool,
    /// The listener's open-connection count, which an upgraded stream joins for its life
    /// (`limits.max_connections` counts streams too).
    pub open: Arc<crate::listener::Open>,
    /// What the connection's requests tell its task (the HTTP/2 idle timer), so that a
    /// body read and dropped after its answer keeps the connection busy while it lasts.
    pub(crate) activity: Arc<crate::listener::Activity>,
}

impl ConnInfo {
    /// What the listener knows about a client connection from `client`.
    pub fn new(
        client: SocketAddr,
        listener: ListenerKind,
        tls: bool,
        open: Arc<crate::listener::Open>,
    ) -> ConnInfo {
        // An IP address's text is always a valid header value. An IPv4 client of a
        // dual-stack listener (`[::]:8080`) arrives as `::ffff:a.b.c.d`: named as IPv4.
        let client_ip = HeaderValue::from_str(&client.ip().to_canonical().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo {
            client,
            client_ip,
            listener,
            tls,
            open,
            activity: Arc::default(),
        }
    }

    /// Counts one more HTTP/2 request in progress on this connection until dropped.
    pub(crate) fn busy(&self) -> crate::listener::Busy {
        crate::listener::Busy::new(&self.activity)
    }
}

/// Shared state of the proxy listeners.
pub struct Proxy {
    pub(crate) router: Arc<Router>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) metrics: Metrics,
    /// Per colour, when the next "no healthy upstream" line may be written (`once_a_second`).
    no_healthy_logged: [AtomicU64; 2],
    /// The same for the "out of sockets" line.
    out_of_sockets_logged: AtomicU64,
}

impl Proxy {
    /// Builds the proxy.
    pub fn new(router: Arc<Router>, tracker: Arc<Tracker>, metrics: Metrics) -> Proxy {
        Proxy {
            router,
            tracker,
            metrics,
            no_healthy_logged: [AtomicU64::new(0), AtomicU64::new(0)],
            out_of_sockets_logged: AtomicU64::new(0),
        }
    }

    /// The router (for listeners that need the TLS config of the current table).
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Handles one request from a client.
    ///
    /// Not an `async fn`: the checks run here, and the future returned is the forwarding
    /// one itself rather than one that holds it. Each level of `async` nesting copies the
    /// future below it whole when it starts (callgrind: memcpy was 9 % of a request).
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        // CONNECT asks for a tunnel to the host it names, which an upstream would be
        // given as `CONNECT /`. Neither is routed: no colour, as for a 401. The
        // connection goes after the answer: what follows a CONNECT is the tunnel's, and a
        // client that framed one request wrongly may have framed its body wrongly too
        // (RFC 9112 §3.2); neither can be read as the next request.
        let refused = if req.method() == ::http::Method::CONNECT {
            Err(ProxyError::MethodNotProxied(::http::Method::CONNECT))
        } else {
            http::client_host(&req)
        };
        let host = match refused {
            Ok(host) => host,
            Err(e) => {
                let mut answer = e.to_response().map(ProxyBody::full);
                if req.version() < ::http::Version::HTTP_2 {
                    answer.headers_mut().insert(
                        ::http::header::CONNECTION,
                        HeaderValue::from_static("close"),
                    );
                } else {
                    stall::discard(req.into_body(), conn.busy());
                }
                return Either::Left(future::ready(answer));
            }
        };
        let table = self.router.load_full();
        if let Some(keys) = &table.settings.client_keys
            && !headers::client_keys(req.headers())
                .into_iter()
                .flatten()
                .any(|k| keys.accepts(k))
        {
            if self.metrics.unauthorized(conn.listener) {
                tracing::warn!(
                    listener = conn.listener.as_str(),
                    client = conn.client_ip.to_str().unwrap_or("-"),
                    path = req.uri().path(),
                    "a request without a listed client key got 401 (one line a second at most; switchyard_unauthorized_total counts them all)"
                );
            }
            let answer = ProxyError::Unauthorized.to_response().map(ProxyBody::full);
            // HTTP/1.1 has the lingering close for a body still coming.
            if req.version() == ::http::Version::HTTP_2 {
                stall::discard(req.into_body(), conn.busy());
            }
            return Either::Left(future::ready(answer));
        }
        let color = match conn.listener {
            ListenerKind::Preview => table.standby(),
            _ => table.active,
        };
        if websocket::is_upgrade(&req) {
            // Boxed: its future is larger than a plain request's, and unboxed it would set
            // the size every plain request's future is built and moved at.
            let upgrade =
                async move { websocket::forward(&self, req, table, color, conn, host).await };
            Either::Right(Either::Left(Box::pin(upgrade)))
        } else {
            Either::Right(Either::Right(http::forward(
                self, req, table, color, conn, host,
            )))
        }
    }
}

impl Proxy {
    /// Says that `color` has no healthy upstream, at most once a second per colour: seen
    /// in the log, without a line for every request refused while it lasts (the 503s are
    /// all in `requests_total`).
    pub(crate) fn no_healthy_upstream(&self, color: Color) {
        if once_a_second(&self.no_healthy_logged[color.index()]) {
            tracing::warn!(color = %color, "no healthy upstream: requests get 503");
        }
    }

    /// A connect that failed for want of a socket here (`nofile::is_local_exhaustion`):
    /// not the upstream's failure, so it is not counted against its health nor in
    /// `upstream_errors_total`, and not retried on another upstream, which would fail
    /// alike. Logged at most once a second; the 503s are all in `requests_total`.
    pub(crate) fn out_of_sockets(&self, upstream: &Upstream, error: &std::io::Error) -> ProxyError {
        if once_a_second(&self.out_of_sockets_logged) {
            tracing::error!(upstream = %upstream.name, color = %upstream.color, error = %error, "out of sockets here (open-file limit or socket memory): requests get 503; raise the open-file limit (LimitNOFILE, ulimit -n) or lower limits.max_connections");
        }
        ProxyError::OutOfSockets(error.to_string())
    }

    /// Books a connect failure on live traffic: the error metric, one failure toward
    /// `fall` (passive health; taken back if a new connection works before `fall` is
    /// reached, `Upstream::record_connect`), and a log line.
    pub(crate) fn connect_failed(&self, upstream: &Upstream, fall: u32, error: &str) {
        self.metrics
            .upstream_error(upstream, UpstreamErrorKind::Connect);
        tracing::warn!(upstream = %upstream.name, color = %upstream.color, error, "upstream connect failed");
        if let Some(healthy) = upstream.record_passive_failure(fall) {
            self.metrics.upstream_health(upstream);
            tracing::warn!(upstream = %upstream.name, color = %upstream.color, healthy, fall, "upstream health changed: connect errors on live traffic");
        }
    }

    /// Passes an upstream's answer to the client as it came (hop-by-hop headers aside),
    /// tagged with the colour; `finish` is recorded when its body ends. An upstream that
    /// stops sending the body while the client waits is cut off (`ProxyBody::upstream`).
    pub(crate) fn relay_answer(
        response: Response<impl Into<body::UpstreamBody>>,
        finish: body::Finish,
        limits: &crate::config::Limits,
    ) -> Response<ProxyBody> {
        let color = finish.color;
        let (mut parts, rbody) = response.into_parts();
        // Switchyard's own version toward the client (RFC 9110 §6.2): an HTTP/1.0
        // upstream's would make hyper answer as HTTP/1.0 and close the client's connection.
        parts.version = ::http::Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers);
        tag(
            Response::from_parts(parts, ProxyBody::upstream(rbody, finish, limits)),
            color,
        )
    }
}

/// Closes the connection kept idle longest to an upstream of `table` (the first that has
/// one), for a request that needs a socket at the open-file ceiling, and answers its place
/// under the ceiling, for that request's connect alone.
pub(crate) fn close_an_idle_connection(table: &RouteTable) -> Option<crate::nofile::Counted> {
    let mut upstreams = table.pools.iter().flat_map(|pool| pool.iter());
    upstreams.find_map(|u| u.idle.close_oldest())
}

/// Most attempts per request: the first pick and at most two more on connect failure.
pub const MAX_ATTEMPTS: usize = 3;

/// The upstreams one request or handshake tries within its colour: a connect failure is
/// retried on another upstream of the same colour, at most `MAX_ATTEMPTS` in all, and
/// never on the other colour.
pub(crate) struct Attempts<'t> {
    proxy: &'t Proxy,
    table: &'t RouteTable,
    color: Color,
    tried: Vec<&'t Upstream>,
    /// The last failed attempt's count of work in flight, kept until the next attempt
    /// counts: in between the colour would look empty to `/drain/wait`.
    failed: Option<RequestGuard>,
    /// A connection kept idle was closed to make room for this request's (once).
    made_room: bool,
    /// The place under the open-file ceiling that closing it left, held for the next
    /// connect (`room`): a request on another thread cannot take it first.
    room: Option<crate::nofile::Counted>,
}

impl<'t> Attempts<'t> {
    pub(crate) fn new(proxy: &'t Proxy, table: &'t RouteTable, color: Color) -> Attempts<'t> {
        Attempts {
            proxy,
            table,
            color,
            tried: Vec::new(),
            failed: None,
            made_room: false,
            room: None,
        }
    }

    /// The place a closed idle connection left for this attempt's connect, if any.
    pub(crate) fn room(&mut self) -> Option<crate::nofile::Counted> {
        self.room.take()
    }

    /// The next upstream to try, with the work counted on it from now; or the answer
    /// when none is left: 503 when the colour had no healthy upstream at all, else 502.
    pub(crate) fn next(&mut self) -> Result<(&'t Arc<Upstream>, RequestGuard), ProxyError> {
        let Some(upstream) = crate::upstream::pick(self.table.pool(self.color), &self.tried) else {
            return Err(if self.tried.is_empty() {
                self.proxy.no_healthy_upstream(self.color);
                ProxyError::NoHealthyUpstream(self.color.as_str())
            } else {
                self.gave_up()
            });
        };
        let guard = self.proxy.tracker.request(upstream, self.table.generation);
        drop(self.failed.take());
        Ok((upstream, guard))
    }

    /// Books a connect to `upstream` that failed with `error`. `Ok`: try the next. A
    /// connect that failed for want of a socket here is not the upstream's failure: it is
    /// tried once more if a connection kept idle (to another upstream, or to a colour no
    /// longer active) could be closed to make room, and otherwise not retried, since
    /// another would fail alike.
    pub(crate) fn connect_failed(
        &mut self,
        upstream: &'t Upstream,
        guard: RequestGuard,
        error: &std::io::Error,
    ) -> Result<(), ProxyError> {
        if crate::nofile::is_local_exhaustion(error) {
            if !self.made_room
                && let Some(room) = close_an_idle_connection(self.table)
            {
                self.made_room = true;
                self.room = Some(room);
                self.failed = Some(guard);
                return Ok(());
            }
            return Err(self.proxy.out_of_sockets(upstream, error));
        }
        let fall = self.table.settings.config.health.fall;
        self.proxy
            .connect_failed(upstream, fall, &error.to_string());
        self.failed = Some(guard);
        self.tried.push(upstream);
        if self.tried.len() >= MAX_ATTEMPTS {
            return Err(self.gave_up());
        }
        Ok(())
    }

    /// The answer when every upstream tried refused its connect.
    pub(crate) fn gave_up(&self) -> ProxyError {
        ProxyError::ConnectFailed(self.color.as_str())
    }
}

/// Tags a response with the colour.
pub(crate) fn tag<B>(mut response: Response<B>, color: Color) -> Response<B> {
    response
        .headers_mut()
        .insert(COLOR_HEADER_NAME, HeaderValue::from_static(color.as_str()));
    response
}

/// An error answer from Switchyard, tagged with the colour it tried.
pub(crate) fn error_response(error: &ProxyError, color: Color) -> Response<ProxyBody> {
    tag(error.to_response().map(ProxyBody::full), color)
}

/// Used by `websocket` and `http` to reach the table's timeouts.
pub(crate) fn limits(table: &RouteTable) -> crate::config::Limits {
    table.settings.config.limits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_named_as_ipv4() {
        let open = Arc::new(crate::listener::Open::default());
        for (client, named) in [
            ("[::ffff:192.0.2.7]:5000", "192.0.2.7"),
            ("[2001:db8::1]:5000", "2001:db8::1"),
            ("127.0.0.1:5000", "127.0.0.1"),
        ] {
            let client = client.parse().expect("an address");
            let info = ConnInfo::new(client, ListenerKind::Proxy, false, open.clone());
            assert_eq!(info.client_ip, named);
        }
    }
}
