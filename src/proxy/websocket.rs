//! WebSocket streams: the handshake on both sides, the frame relay, and the protocol-aware
//! close that a drain needs.
//!
//! Switchyard ends the WebSocket on both sides (it must, to inject `CloseStream`), so the
//! upstream handshake is its own: a fresh key, no extensions offered, the client's path,
//! query, `Authorization`, `x-deepgram-session-id` and `Sec-WebSocket-Protocol` passed
//! through. It is done with Switchyard's HTTP/1.1 client (`h1::upgrade`) rather than
//! tungstenite's, because a Deepgram API that picks no subprotocol is normal here and
//! tungstenite's client refuses it, and rather than hyper's, which spends a task, a channel
//! and 16 KiB of buffers on each handshake, held by every client of a burst of reconnects.
//!
//! The relay runs two directions (`pump::Pump`) in one task and passes frames on as they
//! came, without decoding or re-encoding them: the client's frames stay masked on their way
//! upstream (a client's frames must be masked, and these are), pings and pongs go through
//! to the other peer. Each direction writes what it read before reading more, so a client
//! that stops reading stops the upstream read too (TCP back-pressure); memory per stream is
//! a read buffer per direction. At the drain deadline the client-to-upstream direction gets
//! `CloseStream` (listen) or `Flush` and then `Close` (speak) at the next frame boundary and
//! drops client audio from then on, while the other direction keeps relaying the finals.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use ::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use bytes::Buf;
use hyper::body::{Body, Bytes, Incoming};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::body::{Access, Finish, ProxyBody, Session, Waiting};
use super::frames;
use super::h1::{self, RequestHead, Switched, Unanswered, Upgrade};
use super::pump::{self, Event, Pump};
use super::stall;
use super::woken::Woken;
use super::{Attempts, ConnInfo, Proxy, error_response, headers, tag};
use crate::deepgram::{self, Endpoint};
use crate::drain::DrainWatch;
use crate::error::ProxyError;
use crate::metrics::{CloseReason, GaugeGuard, Protocol, UpstreamErrorKind};
use crate::route_table::RouteTable;
use crate::upstream::{Color, Upstream};

/// How long a close handshake with one peer may take once Switchyard starts or answers
/// one, sending its close frame included: a peer that stopped reading must not hold a
/// stream, its drain or shutdown open.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

type Io = TokioIo<Upgraded>;

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    fn has_token(v: Option<&HeaderValue>, token: &str) -> bool {
        v.and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
    // An HTTP/1.0 request's `Upgrade` is ignored (RFC 9110 §7.8): it goes on as a plain
    // request, without it (a hop-by-hop field).
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req.headers().get(header::UPGRADE), "websocket")
        && has_token(req.headers().get(header::CONNECTION), "upgrade")
}

/// The client's `Sec-WebSocket-Key`, or why its opening handshake is one a server must
/// refuse (RFC 6455 §4.2.1): no key, or one that is not 16 bytes in base64; a version other
/// than 13; a body, which the upgrade would leave unread between the handshake and the
/// first frame (and which no upstream would be sent).
fn client_key(req: &Request<Incoming>) -> Result<HeaderValue, ProxyError> {
    let bad = |why: &str| ProxyError::BadRequest(why.into());
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("a WebSocket upgrade needs Sec-WebSocket-Key"))?;
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(ProxyError::WebSocketVersion);
    }
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    let bytes = key.as_bytes();
    if !(bytes.len() == 24 && bytes[..22].iter().all(base64) && bytes.ends_with(b"==")) {
        return Err(bad("Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    if !req.body().is_end_stream() {
        return Err(bad("a WebSocket handshake has no body"));
    }
    Ok(key.clone())
}

/// The upstream handshake's headers: the client's end-to-end ones, with Switchyard's own
/// `key` and version in place of the client's and no extension offered (each side's
/// handshake is its own: Switchyard reads the frames in between).
fn upstream_headers(mut headers: HeaderMap, key: &str) -> HeaderMap {
    handshake_fields(
        &mut headers,
        [
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::SEC_WEBSOCKET_ACCEPT,
            header::SEC_WEBSOCKET_VERSION,
        ],
    );
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(key).expect("a base64 key is a valid header value"),
    );
    headers
}

/// Readies the header fields of one side's handshake, copied from the other side's: the
/// hop-by-hop ones and `theirs` (the other handshake's own) taken out, `Upgrade: websocket`
/// and `Connection: Upgrade` put in.
fn handshake_fields(headers: &mut HeaderMap, theirs: [header::HeaderName; 4]) {
    headers::strip_hop_by_hop(headers);
    for name in theirs {
        headers.remove(name);
    }
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
}

/// Why the upstream's 101 cannot be relayed: it does not answer Switchyard's `key`, or it
/// accepts an extension, which was not offered and would mean frames (compressed ones,
/// say) the relay cannot pass on; RFC 6455 §4.1 says to fail the connection.
fn switch_fault(answer: &Response<()>, key: &str) -> Option<ProxyError> {
    let expected = derive_accept_key(key.as_bytes());
    let why = if answer
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_none_or(|v| v.as_bytes() != expected.as_bytes())
    {
        "the upstream's Sec-WebSocket-Accept does not match"
    } else if answer
        .headers()
        .contains_key(header::SEC_WEBSOCKET_EXTENSIONS)
    {
        "the upstream accepted a WebSocket extension that was not offered"
    } else {
        return None;
    };
    Some(ProxyError::UpstreamFailed(why.into()))
}

/// The 101 for the client: the upstream's end-to-end headers, the accept value for the
/// client's own key, and a subprotocol from those the client `offered`. That is the
/// upstream's choice, spelt as the client offered it (a browser compares the 101's choice
/// with its offers exactly, and an upstream may answer `TOKEN` to `token`); else, when
/// the upstream chose none of them, `token` or `bearer` wherever it stands in the list (a
/// browser fails a handshake that picks none; the JS SDK may put a session id first).
fn client_switch(
    answer: &Response<()>,
    client_key: &HeaderValue,
    offered: &[String],
) -> Response<ProxyBody> {
    let chosen = answer
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|p| {
            let p = p.to_str().unwrap_or_default().trim();
            offered.iter().find(|o| o.eq_ignore_ascii_case(p))
        })
        .or_else(|| {
            offered
                .iter()
                .find(|p| p.eq_ignore_ascii_case("token") || p.eq_ignore_ascii_case("bearer"))
        })
        .and_then(|p| HeaderValue::from_str(p).ok());
    let mut reply = Response::new(ProxyBody::empty());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = reply.headers_mut();
    for (name, value) in answer.headers() {
        h.append(name, value.clone());
    }
    handshake_fields(
        h,
        [
            header::SEC_WEBSOCKET_ACCEPT,
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::SEC_WEBSOCKET_PROTOCOL,
            header::CONTENT_LENGTH,
        ],
    );
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(client_key.as_bytes()))
            .expect("base64 is a valid header value"),
    );
    if let Some(p) = chosen {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    reply
}

/// Proxies a WebSocket handshake to `color`, then relays the stream in its own task.
pub async fn forward(
    proxy: &Arc<Proxy>,
    mut req: Request<Incoming>,
    table: Arc<RouteTable>,
    color: Color,
    conn: ConnInfo,
    host: Option<HeaderValue>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let metrics = proxy.metrics.color(color);
    // An answer of Switchyard's own instead of the handshake, counted as the handshake's,
    // with an access line as a plain request's own answer has (the upstream is not named:
    // the line says what the client got).
    let access = Access::capture(
        &conn,
        req.method(),
        req.uri(),
        || headers::session_id(req.headers()),
        None,
    );
    let refuse = |e: ProxyError| {
        let status = e.status_and_code().0.as_u16();
        metrics.count_request(Protocol::WebSocket, status);
        if let Some(access) = &access {
            let seconds = started.elapsed().as_secs_f64();
            access.log_own(color, &e, seconds);
        }
        error_response(&e, color)
    };
    let client_key = match client_key(&req) {
        Ok(key) => key,
        Err(e) => return refuse(e),
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let path = super::http::origin_form(&parts.uri);
    let endpoint = Endpoint::of_path(parts.uri.path());
    let session = headers::session_id(&parts.headers);
    // What the client offered, for the 101's choice.
    let offered: Vec<String> = headers::offered_protocols(&parts.headers)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let key = generate_key();
    let up_headers = upstream_headers(parts.headers, &key);

    let limits = super::limits(&table);
    let get = Method::GET;
    let mut waiting = Waiting::new(
        &conn,
        metrics,
        Protocol::WebSocket,
        color,
        started,
        (&get, &parts.uri),
        Session::Known(session.as_deref()),
    );
    // The handshake counts from its connect, as a request does.
    let mut attempts = Attempts::new(proxy, &table, color);
    let (picked, io, guard) = loop {
        let (upstream, guard) = match attempts.next() {
            Ok(next) => next,
            Err(e) => return refuse(e),
        };
        waiting.on(upstream);
        let tls = &table.settings.upstream_tls;
        let room = attempts.room();
        let connected = h1::connect_within(tls, &upstream.url, limits.connect_timeout, room).await;
        waiting.answered();
        match connected {
            Ok(io) => {
                upstream.record_connect();
                break (upstream, io, guard);
            }
            Err(e) => {
                if let Err(e) = attempts.connect_failed(upstream, guard, &e) {
                    return refuse(e);
                }
            }
        }
    };

    let upstream = picked.clone();
    let fail = |e: ProxyError, kind: UpstreamErrorKind| {
        proxy.metrics.upstream_error(&upstream, kind);
        tracing::warn!(upstream = %upstream.name, color = %color, session = session.as_deref().unwrap_or("-"), error = %e, "upstream handshake failed");
        refuse(e)
    };
    let head = RequestHead {
        method: &Method::GET,
        path: &path,
        headers: &up_headers,
        forwarding: headers::Forwarding {
            client: &conn.client_ip,
            tls: conn.tls,
            host: host.as_ref(),
        },
    };
    waiting.on(picked);
    let answer = tokio::select! {
        // The answer first, as for a plain request.
        biased;
        answer = h1::upgrade(io, head, &upstream.url.authority, limits.response_timeout) => answer,
        // An upstream still silent at its colour's drain deadline holds the colour no
        // longer: the client may retry, on the active colour.
        _ = guard.cut() => {
            waiting.answered();
            let e = ProxyError::DrainDeadline(color.as_str());
            return refuse(e);
        }
    };
    waiting.answered();
    let (response, upstream_io) = match answer {
        Ok(Upgrade::Switched(response, io)) => (response, io),
        Ok(Upgrade::Refused(response)) => {
            // A refusal (400 bad model, 429 over capacity, 503 no engine) goes back as it
            // came.
            let status = response.status().as_u16();
            let session = || session.clone();
            let access = Access::capture(
                &conn,
                &Method::GET,
                &parts.uri,
                session,
                Some(&upstream.name),
            );
            let finish = Finish::new(
                &proxy.metrics,
                color,
                Protocol::WebSocket,
                status,
                started,
                guard,
            )
            .with_access(access);
            return Proxy::relay_answer(response, finish, &limits);
        }
        Err(Unanswered::TimedOut) => {
            return fail(
                ProxyError::UpstreamTimeout(limits.response_timeout),
                UpstreamErrorKind::Timeout,
            );
        }
        Err(Unanswered::Failed(why)) => {
            return fail(ProxyError::UpstreamFailed(why), UpstreamErrorKind::Protocol);
        }
    };
    if let Some(e) = switch_fault(&response, &key) {
        return fail(e, UpstreamErrorKind::Protocol);
    }
    let reply = client_switch(&response, &client_key, &offered);

    metrics.count_request(Protocol::WebSocket, 101);
    let stream = Stream {
        proxy: proxy.clone(),
        color,
        endpoint,
        watch: DrainWatch::new(
            proxy.router.clone(),
            &proxy.tracker,
            upstream.clone(),
            table.generation,
        )
        .counting(metrics.draining_streams.clone()),
        _guard: proxy.tracker.stream(&upstream, table.generation),
        _connection: GaugeGuard::new(proxy.metrics.connections(conn.listener)),
        _slot: crate::listener::Slot::take(&conn.open),
        upstream,
        opened: started,
        // Entered only around its log lines: instrumenting the task would enter it on
        // every poll, which is every frame. At the level of its most severe line, so the
        // session and colour stay on a warning when `RUST_LOG` shows warnings alone.
        span: tracing::error_span!(
            "stream",
            color = %color,
            path = %parts.uri.path(),
            session = session.as_deref().unwrap_or("-"),
            client = conn.client_ip.to_str().unwrap_or("-"),
            listener = conn.listener.as_str(),
        ),
    };
    // The handshake stops counting only now that the stream counts: in between the colour
    // would look empty to `/drain/wait`.
    drop(guard);
    tokio::spawn(stream.run(client_upgrade, upstream_io));
    tag(reply, color)
}

/// One relayed stream and what it counts.
struct Stream {
    proxy: Arc<Proxy>,
    color: Color,
    endpoint: Endpoint,
    upstream: Arc<Upstream>,
    watch: DrainWatch,
    opened: Instant,
    _guard: crate::drain::StreamGuard,
    /// The client connection in `connections`: hyper lets go of a connection once it is
    /// upgraded, which ends the listener's count of it, so the stream holds it from here.
    _connection: GaugeGuard,
    /// Keeps the stream counted toward `limits.max_connections` after hyper lets go of it.
    _slot: crate::listener::Slot,
    span: tracing::Span,
}

/// The two ends of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// Finds a side that takes none of the bytes Switchyard holds for it (it stopped reading,
/// or its host is gone and TCP has not said so yet) for `limits.stall_timeout`. Back-
/// pressure stops reading the other side meanwhile, so without this such a stream would
/// hold its connections until a drain, and a client that left would never be noticed.
///
/// Armed when a pump is left waiting to write; when the timer fires, a pump that still
/// waits and wrote nothing since it was armed has stalled, and otherwise the timer is
/// armed again (or let go, when neither waits). The client is checked first, and the
/// upstream counts as stalled only while nothing waits to go to the client (an upstream
/// held up by a slow client's back-pressure is waiting on it). A stall is found within one
/// to two timeouts, and a stream that is only slow costs a timer per timeout, not per
/// frame.
#[derive(Default)]
struct StallWatch {
    /// The timer, and the bytes each pump (`up`, `down`) had written when it was armed.
    armed: Option<(Pin<Box<tokio::time::Sleep>>, u64, u64)>,
}

impl StallWatch {
    /// Called when both pumps are pending; `Ready` with the side that stalled and why.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        up: &Pump,
        down: &Pump,
        timeout: impl Fn() -> Duration,
    ) -> Poll<(Side, String)> {
        let writing = up.is_writing() || down.is_writing();
        if self.armed.is_none() {
            if !writing {
                return Poll::Pending;
            }
            let sleep = Box::pin(tokio::time::sleep(timeout()));
            self.armed = Some((sleep, up.written(), down.written()));
        }
        let Some((sleep, up_at, down_at)) = self.armed.as_mut() else {
            return Poll::Pending;
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let period = timeout();
            let why = |side: &str| {
                stall::stalled(&format!("the {side} took none of the bytes for it"), period)
            };
            // The client first: one that stops reading soon stops the upstream's reading
            // too (back-pressure), and an upstream held so while Switchyard still writes
            // to the client, however slowly, is waiting on the client, not stalled.
            if down.is_writing() && down.written() == *down_at {
                return Poll::Ready((Side::Client, why("client")));
            }
            if up.is_writing() && up.written() == *up_at && !down.is_writing() {
                return Poll::Ready((Side::Upstream, why("upstream")));
            }
            if !writing {
                self.armed = None;
                return Poll::Pending;
            }
            sleep.as_mut().reset(stall::deadline_after(period));
            (*up_at, *down_at) = (up.written(), down.written());
        }
        Poll::Pending
    }
}

/// How a relay ended, before the closing handshakes.
enum Ending {
    /// The upstream sent a close frame (its code, the frame), to forward to the client.
    UpstreamClosed(Option<u16>, Bytes),
    /// The upstream finished after the drain message: the graceful end of a drain.
    /// `closed`: it sent a close frame (with `code`), which gets an answer.
    UpstreamFinished { closed: bool, code: Option<u16> },
    /// The upstream closed its connection, without a close frame, after the client's own
    /// end (`CloseStream`, `Close`): a finished stream (Flux may end so), not a failure.
    UpstreamEnded,
    /// The upstream connection broke without a close frame, or stopped taking bytes
    /// (`Timeout`), counted against the upstream as that kind of error.
    UpstreamLost(UpstreamErrorKind, String),
    /// The upstream connection broke (a reset, a frame that breaks the protocol) after
    /// the drain message: a transport failure, but the client is still told to reconnect.
    UpstreamLostInDrain(UpstreamErrorKind, String),
    /// The upstream sent frames that break the protocol: told so (1002), and counted
    /// as a protocol error against it.
    UpstreamBroke(String),
    /// The client sent a close frame (its code, the frame), to forward upstream.
    ClientClosed(Option<u16>, Bytes),
    /// The client connection broke.
    ClientLost(String),
    /// The client sent frames that break the protocol (answered with 1002).
    ClientBroke(String),
    /// The deadline came for an endpoint with no graceful protocol close.
    DrainNow,
    /// `drain.grace` ran out after the drain message.
    GraceExpired,
}

impl Ending {
    /// How an event of the upstream's direction (`down`) ends the relay, other than a
    /// `Flushed` or `Cleared` passing on. `drained`: the drain message went upstream;
    /// `client_ended`: the client sent its own end.
    fn from_upstream(event: Event, drained: bool, client_ended: bool) -> Ending {
        let lost = |why| Ending::UpstreamLost(UpstreamErrorKind::Protocol, why);
        match event {
            // No drain message went (none yet, or the client was already ending): the
            // upstream's close passes on as it came.
            Event::Close { code, frame } if !drained => Ending::UpstreamClosed(code, frame),
            Event::Close { code, .. } => Ending::UpstreamFinished { closed: true, code },
            Event::DestinationLost(why) => Ending::ClientLost(why),
            Event::SourceLost(why) if drained => {
                Ending::UpstreamLostInDrain(UpstreamErrorKind::Protocol, why)
            }
            Event::Protocol(e) => Ending::UpstreamBroke(e.to_string()),
            _ if drained => Ending::UpstreamFinished {
                closed: false,
                code: None,
            },
            Event::Ended if client_ended => Ending::UpstreamEnded,
            Event::Ended => lost("connection closed without a close frame".into()),
            Event::SourceLost(why) => lost(why),
            Event::Flushed | Event::Cleared => Ending::UpstreamBroke("unexpected".into()),
        }
    }

    /// How an event of the client's direction (`up`) ends the relay.
    fn from_client(event: Event, drained: bool) -> Ending {
        match event {
            Event::Close { code, frame } => Ending::ClientClosed(code, frame),
            Event::Ended => Ending::ClientLost("connection closed without a close frame".into()),
            Event::SourceLost(why) => Ending::ClientLost(why),
            Event::Protocol(e) => Ending::ClientBroke(e.to_string()),
            Event::DestinationLost(why) if drained => {
                Ending::UpstreamLostInDrain(UpstreamErrorKind::Protocol, why)
            }
            Event::DestinationLost(why) => Ending::UpstreamLost(UpstreamErrorKind::Protocol, why),
            Event::Flushed | Event::Cleared => Ending::ClientBroke("unexpected".into()),
        }
    }

    /// How a side that took no bytes for `limits.stall_timeout` ends the relay.
    fn stalled(side: Side, why: String, drained: bool) -> Ending {
        match side {
            Side::Upstream if drained => {
                Ending::UpstreamLostInDrain(UpstreamErrorKind::Timeout, why)
            }
            Side::Upstream => Ending::UpstreamLost(UpstreamErrorKind::Timeout, why),
            Side::Client => Ending::ClientLost(why),
        }
    }
}

/// How far a stream's drain message got by its end.
#[derive(Clone, Copy)]
struct DrainProgress {
    /// Queued to go upstream (the deadline came, and the client was not ending itself).
    queued: bool,
    /// Written whole to the upstream.
    sent: bool,
    /// Speak: the `Close` after the drain's `Flush` was queued too.
    close_sent: bool,
}

/// How a stream's end is told to each side (`Stream::close_plan`).
struct ClosePlan {
    /// For `stream_closes_total` and the end line.
    reason: CloseReason,
    /// The close code the client gets, for the end line.
    client_code: Option<u16>,
    /// Switchyard's close frame to the client, if one goes, and whether to wait for the
    /// client's answer to it.
    client_close: Option<Bytes>,
    client_waits: bool,
    /// The same toward the upstream.
    upstream_close: Option<Bytes>,
    upstream_waits: bool,
    /// The client's own close, passed to the upstream with its answer passed back.
    forwarded: Option<Bytes>,
}

impl ClosePlan {
    /// Nothing said to either side yet.
    fn of(reason: CloseReason) -> ClosePlan {
        ClosePlan {
            reason,
            client_code: None,
            client_close: None,
            client_waits: false,
            upstream_close: None,
            upstream_waits: false,
            forwarded: None,
        }
    }

    /// The client gets `close` (with `code`), and its answer is waited for.
    fn client(self, code: Option<u16>, close: Bytes) -> ClosePlan {
        ClosePlan {
            client_code: code,
            client_close: Some(close),
            client_waits: true,
            ..self
        }
    }

    /// The upstream gets `close`; `waits`: its answer is waited for.
    fn upstream(self, close: Bytes, waits: bool) -> ClosePlan {
        ClosePlan {
            upstream_close: Some(close),
            upstream_waits: waits,
            ..self
        }
    }
}

/// A close frame answering one with `code` (none: an empty close), toward the upstream
/// (masked) or the client.
fn echo_close(code: Option<u16>, to_upstream: bool) -> Bytes {
    match code {
        Some(code) => frames::close(code, "", to_upstream),
        None => frames::encode(frames::CLOSE, &[], to_upstream),
    }
}

impl Stream {
    /// Waits for hyper to hand over the client's upgraded connection (once the 101 is
    /// written), then relays until the stream ends.
    async fn run(self, client_upgrade: OnUpgrade, upstream: Switched) {
        let client = match client_upgrade.await {
            Ok(io) => io,
            // The client's connection ended between the 101 and the upgrade: a client
            // lost, as one lost mid-stream is.
            Err(e) => {
                self.span.in_scope(
                    || tracing::debug!(error = %e, "client connection lost before the upgrade completed"),
                );
                self.ended(CloseReason::Error, None, false, Carried::default());
                return;
            }
        };
        // The session's first line on its colour: a drained session's reconnect shows
        // here at once, not only when it ends.
        self.span
            .in_scope(|| tracing::info!(upstream = %self.upstream.name, "stream opened"));
        self.relay(TokioIo::new(client), upstream).await;
    }

    async fn relay(mut self, mut client: Io, mut upstream: Switched) {
        let metrics = self.proxy.metrics.color(self.color).clone();
        // Counted until the stream ends, whatever way it ends (a panic, the runtime
        // dropping the task at exit).
        let open = GaugeGuard::new(metrics.open_streams(self.endpoint));
        // `up` carries the client's frames upstream, `down` the upstream's to the client.
        let mut up = Pump::new(true, metrics.bytes_to_upstream.clone());
        let mut down = Pump::new(false, metrics.bytes_to_client.clone());
        let endpoint = self.endpoint;
        // A client that ends the stream itself is not sent 1012, even when its end crosses
        // the drain deadline; on speak, the drain's `Flush` is answered after the client's.
        up.watch = endpoint.client_messages();
        down.watch_flushed = endpoint.flushes();
        // The client's `Flush` messages answered (by `Flushed`, or dropped by a `Clear`:
        // `Cleared`); the drain's own is answered once this passes the count of them the
        // pump had passed on when it went (`Pump::counted_at_own`).
        let mut flushed = 0u64;
        let router = self.proxy.router.clone();
        let span = self.span.clone();
        // The drain deadline has come (and was acted on).
        let mut deadline_passed = false;
        // `up.own_queued()` once the drain message was queued. When it has gone (`went`),
        // the upstream's end is the drain's graceful end.
        let mut drain_at: Option<u64> = None;
        let mut close_sent = false;
        let mut stall = StallWatch::default();
        let ending = {
            // The drain's deadline (put in `fired`), then the end of its grace.
            let fired = std::sync::atomic::AtomicBool::new(false);
            let drain = self.watch.drain(&fired);
            tokio::pin!(drain);
            // Polled when the drain watch or its timer woke the task, not for every frame.
            let drain_woken = Woken::default();
            std::future::poll_fn(|cx| {
                let grace_over = drain_woken.poll(drain.as_mut(), cx).is_ready();
                // At the drain deadline: the protocol's own end, then only the finals flow.
                if !deadline_passed && fired.load(std::sync::atomic::Ordering::Acquire) {
                    let Some(message) = endpoint.drain_message() else {
                        return Poll::Ready(Ending::DrainNow);
                    };
                    if up.client_ended {
                        // Its own end is under way upstream: wait for that, within grace.
                        span.in_scope(|| {
                            tracing::info!(
                                "drain deadline: the client is already ending the stream"
                            )
                        });
                    } else {
                        // Not a field named `message`: that is the line's own text, and a
                        // JSON line would carry the key twice.
                        span.in_scope(|| {
                            tracing::info!(sent = message, "drain deadline: ending the stream")
                        });
                        up.inject(frames::encode(frames::TEXT, message.as_bytes(), true));
                        drain_at = Some(up.own_queued());
                    }
                    up.drop_data = true;
                    deadline_passed = true;
                }
                if grace_over {
                    return Poll::Ready(Ending::GraceExpired);
                }
                loop {
                    let event = match down.poll(cx, &mut upstream, &mut client) {
                        Poll::Pending => break,
                        Poll::Ready(event @ (Event::Flushed | Event::Cleared)) => {
                            flushed = match event {
                                Event::Flushed => flushed + 1,
                                _ => flushed.max(up.counted_at_reset),
                            };
                            // The drain's `Flush` is answered after the client's before it.
                            if went(&up, drain_at) && flushed > up.counted_at_own() && !close_sent {
                                up.inject(frames::encode(
                                    frames::TEXT,
                                    deepgram::CLOSE.as_bytes(),
                                    true,
                                ));
                                close_sent = true;
                            }
                            continue;
                        }
                        Poll::Ready(event) => event,
                    };
                    let drained = went(&up, drain_at);
                    if matches!(event, Event::Close { .. }) {
                        // What of Switchyard's own is still queued cannot follow its close.
                        up.discard_own();
                    }
                    let ending = Ending::from_upstream(event, drained, up.client_ended);
                    return Poll::Ready(ending);
                }
                let polled = up.poll(cx, &mut client, &mut upstream);
                // After the poll, which may have written the drain message.
                let drained = went(&up, drain_at);
                let ending = match polled {
                    Poll::Pending => {
                        let timeout = || router.load().settings.config.limits.stall_timeout;
                        let (side, why) = ready!(stall.poll(cx, &up, &down, timeout));
                        Ending::stalled(side, why, drained)
                    }
                    Poll::Ready(event) => Ending::from_client(event, drained),
                };
                Poll::Ready(ending)
            })
            .await
        };
        let drain_sent = went(&up, drain_at);

        let lost_in_drain = matches!(ending, Ending::UpstreamLostInDrain(..))
            || (drain_sent && matches!(ending, Ending::UpstreamBroke(_)));
        // Whether the rest of a frame can still come and go: from the upstream to the
        // client (`down`), from the client to the upstream (`up`).
        let upstream_gone = matches!(
            ending,
            Ending::UpstreamEnded
                | Ending::UpstreamLost(..)
                | Ending::UpstreamLostInDrain(..)
                | Ending::UpstreamFinished { closed: false, .. }
        );
        let client_gone = matches!(ending, Ending::ClientLost(_));
        let down_open =
            !upstream_gone && !client_gone && !matches!(ending, Ending::UpstreamBroke(_));
        let up_open = !upstream_gone && !client_gone && !matches!(ending, Ending::ClientBroke(_));
        let drain = DrainProgress {
            queued: drain_at.is_some(),
            sent: drain_sent,
            close_sent,
        };
        let ClosePlan {
            reason,
            client_code,
            client_close,
            client_waits,
            upstream_close,
            upstream_waits,
            forwarded,
        } = self
            .span
            .in_scope(|| self.close_plan(ending, &mut up, drain));
        // The client asked to end: the drain ended it too, but it must not reconnect. Only
        // Switchyard's own 1012 is changed; an upstream's or the client's passes as it came.
        let drain_end = lost_in_drain
            || matches!(
                reason,
                CloseReason::DrainGraceful | CloseReason::DrainForced
            );
        let (client_code, client_close) = if up.client_ended && drain_end {
            (Some(1000), Some(frames::close(1000, "", false)))
        } else {
            (client_code, client_close)
        };
        if let Some(close) = forwarded {
            let echo = client_close.map(|frame| (client_code, frame));
            let (told, sent) =
                close_through(&mut client, &mut upstream, &mut down, close, echo).await;
            drop(open);
            self.ended(reason, told, sent, Carried::by(&up, &down));
            return;
        }
        // Each side's closing frames go as soon as it can take them, neither waiting on
        // the other, all within CLOSE_WAIT; then both wait for the answers to their closes.
        let mut to_client = Closing::new(client_close, down_open);
        let mut to_upstream = Closing::new(upstream_close, up_open);
        let closing = std::future::poll_fn(|cx| {
            let client_done = to_client.poll(cx, &mut down, &mut upstream, &mut client);
            let upstream_done = to_upstream.poll(cx, &mut up, &mut client, &mut upstream);
            if client_done.is_ready() && upstream_done.is_ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
        tokio::join!(
            finish(&mut client, &mut up, client_waits && to_client.sent),
            finish(&mut upstream, &mut down, upstream_waits && to_upstream.sent),
        );
        drop(open);
        self.ended(
            reason,
            client_code,
            to_client.close_sent(),
            Carried::by(&up, &down),
        );
    }

    /// How `ending` is told to each side; books what it says of the upstream (its error
    /// metric and line). Runs in the stream's span.
    fn close_plan(&self, ending: Ending, up: &mut Pump, drain: DrainProgress) -> ClosePlan {
        let reconnect = || frames::close(1012, "switchyard: draining, reconnect", false);
        match ending {
            Ending::UpstreamClosed(code, frame) => ClosePlan::of(CloseReason::Upstream)
                .client(code, frame)
                .upstream(echo_close(code, true), false),
            Ending::ClientClosed(code, frame) => ClosePlan {
                client_code: code,
                client_close: Some(echo_close(code, false)),
                forwarded: Some(frame),
                ..ClosePlan::of(CloseReason::Client)
            },
            Ending::UpstreamFinished { closed, code } => {
                let plan =
                    ClosePlan::of(CloseReason::DrainGraceful).client(Some(1012), reconnect());
                if closed {
                    plan.upstream(echo_close(code, true), false)
                } else {
                    plan
                }
            }
            Ending::DrainNow | Ending::GraceExpired => {
                if drain.queued && !drain.sent {
                    // The drain message could not go within grace: it waited behind a
                    // text message the client never finished, or for an upstream that
                    // took nothing. The upstream gets the close alone (it may come
                    // between fragments), not half a message and what followed it.
                    tracing::info!(
                        "drain grace over: the drain message waited behind a message the client never finished, or for the upstream to read, and was not sent"
                    );
                    up.discard_own();
                } else if self.endpoint.flushes() && drain.sent && !drain.close_sent {
                    // TTS: `Close` follows `Flush` even when `Flushed` never came.
                    up.inject(frames::encode(
                        frames::TEXT,
                        deepgram::CLOSE.as_bytes(),
                        true,
                    ));
                }
                ClosePlan::of(CloseReason::DrainForced)
                    .client(Some(1012), reconnect())
                    .upstream(frames::close(1001, "switchyard: draining", true), true)
            }
            // The client is told the same way: a close frame with no status code,
            // which the JS SDK takes as the end after `CloseStream` (DEEPGRAM.md 5.8).
            Ending::UpstreamEnded => {
                ClosePlan::of(CloseReason::Upstream).client(None, echo_close(None, false))
            }
            Ending::UpstreamLostInDrain(kind, why) => {
                self.proxy.metrics.upstream_error(&self.upstream, kind);
                tracing::warn!(upstream = %self.upstream.name, error = %why, "upstream connection lost after the drain message");
                ClosePlan::of(CloseReason::Error).client(Some(1012), reconnect())
            }
            Ending::UpstreamBroke(why) => {
                let kind = UpstreamErrorKind::Protocol;
                self.proxy.metrics.upstream_error(&self.upstream, kind);
                tracing::warn!(upstream = %self.upstream.name, error = %why, "the upstream broke the WebSocket protocol");
                let plan = ClosePlan::of(CloseReason::Error)
                    .upstream(frames::close(1002, "protocol error", true), false);
                if drain.sent {
                    plan.client(Some(1012), reconnect())
                } else if up.client_ended {
                    // As for a lost upstream: the client ended the stream itself.
                    plan.client(None, echo_close(None, false))
                } else {
                    let close =
                        frames::close(1011, "switchyard: upstream broke the protocol", false);
                    plan.client(Some(1011), close)
                }
            }
            Ending::UpstreamLost(kind, why) => {
                self.proxy.metrics.upstream_error(&self.upstream, kind);
                tracing::warn!(upstream = %self.upstream.name, error = %why, "upstream connection lost mid-stream");
                let plan = ClosePlan::of(CloseReason::Error);
                if up.client_ended {
                    // The client ended the stream itself: told as when the upstream
                    // ends it without a close frame, not with 1011, on which the JS
                    // SDK would reconnect a session its app ended.
                    plan.client(None, echo_close(None, false))
                } else {
                    let close = frames::close(1011, "switchyard: upstream connection lost", false);
                    plan.client(Some(1011), close)
                }
            }
            Ending::ClientLost(why) => {
                tracing::debug!(error = %why, "client connection lost");
                ClosePlan::of(CloseReason::Error)
                    .upstream(frames::close(1001, "client went away", true), true)
            }
            Ending::ClientBroke(why) => {
                tracing::debug!(error = %why, "client broke the WebSocket protocol");
                ClosePlan::of(CloseReason::Error)
                    .client(Some(1002), frames::close(1002, "protocol error", false))
                    .upstream(frames::close(1001, "client went away", true), true)
            }
        }
    }

    /// Books the stream's end: `code` is the close code the client was told, and
    /// `close_sent` whether that close frame reached its socket (a client that does not
    /// read by `CLOSE_WAIT` has its connection dropped without one).
    fn ended(&self, reason: CloseReason, code: Option<u16>, close_sent: bool, carried: Carried) {
        let _entered = self.span.enter();
        let seconds = self.opened.elapsed().as_secs_f64();
        self.proxy
            .metrics
            .color(self.color)
            .stream_ended(reason, seconds);
        tracing::info!(
            upstream = %self.upstream.name,
            reason = reason.as_str(),
            close_code = code,
            close_sent,
            duration_s = seconds,
            bytes_to_upstream = carried.to_upstream,
            bytes_to_client = carried.to_client,
            dropped_frames = carried.dropped,
            "stream ended"
        );
    }
}

/// What a stream carried, for its end line.
#[derive(Default)]
struct Carried {
    to_upstream: u64,
    to_client: u64,
    /// The client's messages the upstream never got (`Pump::dropped`).
    dropped: u64,
}

impl Carried {
    /// What the pumps toward the upstream (`up`) and the client (`down`) carried.
    fn by(up: &Pump, down: &Pump) -> Carried {
        Carried {
            to_upstream: up.bytes,
            to_client: down.bytes,
            dropped: up.dropped(),
        }
    }
}

/// Switchyard's last frames to one side: its own frames still queued, then `close`. A
/// frame being passed to that side goes first: one cut short by the stream's end is
/// finished while its source can still send the rest (a close cannot go inside a frame,
/// and without one a client sees its stream fail, 1006, instead of being told to
/// reconnect); if it cannot be, nothing more goes.
struct Closing {
    close: Option<Bytes>,
    /// The frame's source can still send: wait for the rest of a frame cut short.
    source_open: bool,
    /// The frames, once the writer is at a frame boundary (or gave up on reaching one).
    frames: Option<VecDeque<Bytes>>,
    done: bool,
    /// Whether it was given a close to send (`close` is taken once the frames are made).
    closes: bool,
    /// Every frame, a close among them, was written and flushed.
    sent: bool,
}

impl Closing {
    fn new(close: Option<Bytes>, source_open: bool) -> Closing {
        Closing {
            closes: close.is_some(),
            close,
            source_open,
            frames: None,
            done: false,
            sent: false,
        }
    }

    /// Whether a close frame reached the other side's connection.
    fn close_sent(&self) -> bool {
        self.closes && self.sent
    }

    /// Writes the frames to `dst`; `writer` is the pump that passes `src`'s frames to it.
    /// Ready once done, whether or not everything went (`sent` says).
    fn poll<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut Pump,
        src: &mut S,
        dst: &mut D,
    ) -> Poll<()>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(());
        }
        let frames = match &mut self.frames {
            Some(frames) => frames,
            None => {
                if self.source_open && !writer.at_boundary() {
                    std::task::ready!(writer.poll_boundary(cx, src, dst));
                }
                let frames = if writer.at_boundary() {
                    std::iter::from_fn(|| writer.take_own())
                        .chain(self.close.take())
                        .collect()
                } else {
                    VecDeque::new()
                };
                self.frames.insert(frames)
            }
        };
        if frames.is_empty() {
            self.done = true;
            return Poll::Ready(());
        }
        while let Some(front) = frames.front_mut() {
            match std::task::ready!(Pin::new(&mut *dst).poll_write(cx, front)) {
                Ok(written) if written > 0 => {
                    front.advance(written);
                    if front.is_empty() {
                        frames.pop_front();
                    }
                }
                _ => {
                    self.done = true;
                    return Poll::Ready(());
                }
            }
        }
        self.sent = std::task::ready!(Pin::new(&mut *dst).poll_flush(cx)).is_ok();
        self.done = true;
        Poll::Ready(())
    }
}

/// Whether the drain message queued when `up.own_queued()` was `at` has gone whole to
/// the upstream. Until it has, the upstream's end is its own, not the drain's.
fn went(up: &Pump, at: Option<u64>) -> bool {
    at.is_some_and(|at| up.own_written() >= at)
}

/// Ends a stream the client closed as a direct connection would: the client's `close`
/// goes to the upstream, and the client gets what the upstream sends until its close (a
/// last result), then that close, or `echo` (a code and its frame) if none comes within
/// `CLOSE_WAIT`. Answers the code of the close the client was sent, and whether it was
/// written to the client's connection.
async fn close_through<C, U>(
    client: &mut C,
    upstream: &mut U,
    down: &mut Pump,
    close: Bytes,
    echo: Option<(Option<u16>, Bytes)>,
) -> (Option<u16>, bool)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let answered = tokio::time::timeout(CLOSE_WAIT, async {
        if !pump::send(upstream, &close, CLOSE_WAIT).await {
            return None;
        }
        std::future::poll_fn(|cx| {
            loop {
                match std::task::ready!(down.poll(cx, upstream, client)) {
                    Event::Flushed | Event::Cleared => {}
                    Event::Close { code, frame } => return Poll::Ready(Some((code, frame))),
                    _ => return Poll::Ready(None),
                }
            }
        })
        .await
    })
    .await;
    // The upstream's close, or, if none came, Switchyard's echo after the frame in flight.
    let (code, close) = answered.ok().flatten().or(echo).unzip();
    let mut to_client = Closing::new(close, true);
    let closing = std::future::poll_fn(|cx| to_client.poll(cx, down, upstream, client));
    let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let _ = tokio::join!(client.shutdown(), upstream.shutdown());
    })
    .await;
    (code.flatten(), to_client.close_sent())
}

/// Ends one side within `CLOSE_WAIT`: if `wait` (a close went to it), reads (`reader`)
/// until the peer's close arrives, then shuts the connection down. When the time runs out
/// the connection is simply dropped.
async fn finish<S>(io: &mut S, reader: &mut Pump, wait: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if wait {
            reader.until_close(io).await;
        }
        let _ = io.shutdown().await;
    })
    .await;
}
