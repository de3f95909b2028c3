//! Bodies on the request path: streamed both ways, never buffered whole.
//!
//! The client's body goes upstream as `h1` reads it. `ProxyBody` is what clients receive:
//! an upstream body that counts its bytes and records the request's metrics when it ends,
//! or a small body of our own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::IntCounter;

use super::h1;
use super::stall::{self, StallTimer};
use tokio::sync::futures::OwnedNotified;

use super::ConnInfo;
use crate::config::Limits;
use crate::drain::RequestGuard;
use crate::error::ProxyError;
use crate::metrics::{ColorMetrics, ListenerKind, Metrics, Protocol, UpstreamErrorKind};
use crate::upstream::{Color, Upstream};

/// What the access log line names; captured only when that log is enabled.
#[derive(Debug)]
pub struct Access {
    /// The client's address, and the listener it came in on (`preview` traffic is an
    /// operator's test, not users').
    pub client: http::HeaderValue,
    pub listener: ListenerKind,
    pub method: http::Method,
    /// The path without the query (queries can carry keys and personal data).
    pub path: String,
    /// The upstream that answered or was tried last; `None` when none was.
    pub upstream: Option<Arc<str>>,
    /// The client's `x-deepgram-session-id`: the SDKs send it on every call, so a
    /// session's requests can be followed across colours as its streams are.
    pub session: Option<String>,
}

impl Access {
    /// Captures the fields if `switchyard::access` logs at info; `None` costs nothing.
    pub fn capture(
        conn: &ConnInfo,
        method: &http::Method,
        uri: &http::Uri,
        session: impl FnOnce() -> Option<String>,
        upstream: Option<&Arc<str>>,
    ) -> Option<Access> {
        tracing::enabled!(target: "switchyard::access", tracing::Level::INFO).then(|| Access {
            client: conn.client_ip.clone(),
            listener: conn.listener,
            method: method.clone(),
            path: uri.path().to_owned(),
            upstream: upstream.cloned(),
            session: session(),
        })
    }

    /// Writes one access line.
    pub fn log(&self, color: Color, status: u16, seconds: f64, bytes: Option<u64>) {
        self.write(color, status, seconds, bytes, None);
    }

    /// Writes the access line of an answer of Switchyard's own: its status, and its
    /// `error` code and `blame`, which an upstream's answer of the same status lacks.
    pub fn log_own(&self, color: Color, error: &ProxyError, seconds: f64) {
        let status = error.status_and_code().0.as_u16();
        self.write(color, status, seconds, None, Some(error));
    }

    fn write(
        &self,
        color: Color,
        status: u16,
        seconds: f64,
        bytes: Option<u64>,
        own: Option<&ProxyError>,
    ) {
        tracing::info!(
            target: "switchyard::access",
            client = self.client.to_str().unwrap_or("-"),
            listener = self.listener.as_str(),
            color = color.as_str(),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            method = %self.method,
            path = %self.path,
            session = self.session.as_deref().unwrap_or("-"),
            status,
            duration_ms = seconds * 1000.0,
            bytes_to_client = bytes,
            error = own.map(|e| e.status_and_code().1),
            blame = own.map(|e| e.blame().as_str()),
            "request"
        );
    }
}

/// The status a request is counted with when its client left before the answer came:
/// nginx's 499, "client closed request" (class 4xx).
pub const CLIENT_CLOSED: u16 = 499;

/// Where a waiting request's `x-deepgram-session-id` is, for its access line.
pub enum Session<'a> {
    /// In the request's headers, read only if the line is written.
    Headers(&'a http::HeaderMap),
    /// Read already.
    Known(Option<&'a str>),
}

/// A request waiting on an upstream, counted if its client leaves meanwhile. hyper drops
/// the request's future when the client closes its connection or resets its stream, so
/// without this a request whose upstream hangs until the client gives up would count
/// nowhere: no `requests_total`, no duration, no access line. It is counted with
/// `CLIENT_CLOSED` and the time it waited.
pub struct Waiting<'a> {
    pub conn: &'a ConnInfo,
    pub metrics: &'a ColorMetrics,
    pub protocol: Protocol,
    pub color: Color,
    pub started: Instant,
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub session: Session<'a>,
    /// The upstream waited on, while one is.
    upstream: Option<&'a Upstream>,
}

impl<'a> Waiting<'a> {
    /// Bookkeeping for a request; nothing is waited on yet.
    pub fn new(
        conn: &'a ConnInfo,
        metrics: &'a ColorMetrics,
        protocol: Protocol,
        color: Color,
        started: Instant,
        (method, uri): (&'a http::Method, &'a http::Uri),
        session: Session<'a>,
    ) -> Waiting<'a> {
        Waiting {
            conn,
            metrics,
            protocol,
            color,
            started,
            method,
            uri,
            session,
            upstream: None,
        }
    }

    /// From now until `answered`, the request waits on `upstream`.
    pub fn on(&mut self, upstream: &'a Upstream) {
        self.upstream = Some(upstream);
    }

    /// The wait ended: whatever comes next counts the request itself.
    pub fn answered(&mut self) {
        self.upstream = None;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(upstream) = self.upstream else {
            return;
        };
        let seconds = self.started.elapsed().as_secs_f64();
        match self.protocol {
            Protocol::Http => self.metrics.request(self.protocol, CLIENT_CLOSED, seconds),
            Protocol::WebSocket => self.metrics.count_request(self.protocol, CLIENT_CLOSED),
        }
        let session = || match self.session {
            Session::Headers(headers) => super::headers::session_id(headers),
            Session::Known(session) => session.map(str::to_owned),
        };
        let name = Some(&upstream.name);
        if let Some(access) = Access::capture(self.conn, self.method, self.uri, session, name) {
            access.log(self.color, CLIENT_CLOSED, seconds, None);
        }
    }
}

/// A request's bookkeeping, recorded (metrics and the access line) when its response body
/// ends or is dropped; holding it keeps the request counted as in flight.
pub struct Finish {
    pub metrics: Metrics,
    pub color: Color,
    pub protocol: Protocol,
    pub status: u16,
    pub started: Instant,
    pub access: Option<Access>,
    pub guard: RequestGuard,
    bytes: u64,
}

impl Finish {
    /// Bookkeeping for a request whose answer has `status`.
    pub fn new(
        metrics: &Metrics,
        color: Color,
        protocol: Protocol,
        status: u16,
        started: Instant,
        guard: RequestGuard,
    ) -> Finish {
        Finish {
            metrics: metrics.clone(),
            color,
            protocol,
            status,
            started,
            access: None,
            guard,
            bytes: 0,
        }
    }

    /// Adds the access line's fields.
    pub fn with_access(mut self, access: Option<Access>) -> Finish {
        self.access = access;
        self
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let seconds = self.started.elapsed().as_secs_f64();
        let metrics = self.metrics.color(self.color);
        match self.protocol {
            Protocol::Http => metrics.request(self.protocol, self.status, seconds),
            // A refused upgrade: counted, but the WebSocket histogram is stream lifetimes.
            Protocol::WebSocket => metrics.count_request(self.protocol, self.status),
        }
        if let Some(access) = &self.access {
            access.log(self.color, self.status, seconds, Some(self.bytes));
        }
    }
}

/// A response body for clients.
pub enum ProxyBody {
    /// A body Switchyard wrote (errors, 101s, refusals it built).
    Full(Option<Bytes>),
    /// The upstream's body, streamed.
    Upstream {
        inner: UpstreamBody,
        to_client: IntCounter,
        finish: Option<Box<FinishHandle>>,
        /// Registered while waiting on the upstream, so a drain deadline wakes the body.
        cut: Option<Pin<Box<OwnedNotified>>>,
    },
}

/// An upstream's body: from Switchyard's own HTTP/1.1 client (plain requests), or from
/// hyper's (a refused WebSocket handshake).
pub enum UpstreamBody {
    Inline(h1::ResponseBody),
    Hyper(Incoming),
}

impl From<h1::ResponseBody> for UpstreamBody {
    fn from(body: h1::ResponseBody) -> UpstreamBody {
        UpstreamBody::Inline(body)
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(body: Incoming) -> UpstreamBody {
        UpstreamBody::Hyper(body)
    }
}

impl UpstreamBody {
    /// Bytes of the request written so far while the answer is read (full duplex).
    fn uploaded(&self) -> u64 {
        match self {
            UpstreamBody::Inline(b) => b.uploaded(),
            UpstreamBody::Hyper(_) => 0,
        }
    }

    /// Whether the upstream may be waiting for the rest of the client's body.
    fn waits_on_client(&self) -> bool {
        match self {
            UpstreamBody::Inline(b) => b.waits_on_client(),
            UpstreamBody::Hyper(_) => false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Inline(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            UpstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Inline(b) => b.is_end_stream(),
            UpstreamBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Inline(b) => b.size_hint(),
            UpstreamBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// Why Switchyard ended a response body early.
#[derive(Debug, thiserror::Error)]
#[error(
    "this request's drain deadline passed (a flip's, or a reload's that removed its upstream); the response is cut"
)]
pub struct Cut {
    /// What an HTTP/2 client is told: hyper resets the stream with the first
    /// `h2::Reason` in the error's chain, `INTERNAL_ERROR` without one. The answer is not
    /// broken; it is no longer wanted here (RFC 9113 §7).
    #[source]
    reason: h2::Error,
}

impl Cut {
    fn boxed() -> BodyError {
        Box::new(Cut {
            reason: h2::Reason::CANCEL.into(),
        })
    }
}

/// Why Switchyard ended a response body on which no bytes moved for `limits.stall_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("{0}; the response is cut")]
pub struct Stalled(String);

/// A body error: the upstream's, a cut at the drain deadline, or a stall.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Opaque end-of-request bookkeeping carried by an upstream body, and its stall timer
/// (boxed with it: the body every response carries, and moves, stays small).
pub struct FinishHandle {
    finish: Finish,
    /// Ends a body on which no bytes move for `stall_timeout`, or for `first_timeout`
    /// before its first byte.
    stall: StallTimer,
    stall_timeout: Duration,
    first_timeout: Duration,
}

impl ProxyBody {
    /// A complete body.
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(Some(bytes).filter(|b| !b.is_empty()))
    }

    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// The upstream's body; `finish` is recorded when it ends. An upstream that sends
    /// none of it for `limits.stall_timeout` while the client waits is cut off. Before the
    /// first byte the wait may be as long as for the head (`response_timeout`): an upstream
    /// may send its head at once and work before its body (or, in full duplex, after the
    /// rest of the upload).
    pub fn upstream(inner: impl Into<UpstreamBody>, finish: Finish, limits: &Limits) -> ProxyBody {
        ProxyBody::Upstream {
            to_client: finish.metrics.color(finish.color).bytes_to_client.clone(),
            finish: Some(Box::new(FinishHandle {
                finish,
                stall: StallTimer::default(),
                stall_timeout: limits.stall_timeout,
                first_timeout: limits.stall_timeout.max(limits.response_timeout),
            })),
            inner: inner.into(),
            cut: None,
        }
    }
}

impl ProxyBody {
    /// What decides the request's drain cut, while its upstream body is open.
    pub fn cut_watch(&self) -> Option<crate::drain::CutWatch> {
        match self {
            ProxyBody::Upstream {
                finish: Some(f), ..
            } => Some(f.finish.guard.cut_watch()),
            _ => None,
        }
    }

    /// Puts this answer in `slot`, the answer its HTTP/1.1 connection writes now: a
    /// proxied one with its request's drain cut, or one of Switchyard's own.
    pub fn mark_answer(&self, slot: &crate::drain::AnswerSlot) {
        match self {
            ProxyBody::Upstream {
                finish: Some(f), ..
            } => f.finish.guard.mark(slot),
            _ => slot.answering(None),
        }
    }

    /// Whether the request is past its colour's drain deadline; registers the waker for a
    /// later cut otherwise. An error ends the body, so the client sees an incomplete
    /// response rather than a silently short one.
    fn check_cut(
        finish: &Option<Box<FinishHandle>>,
        cut: &mut Option<Pin<Box<OwnedNotified>>>,
        cx: &mut Context<'_>,
    ) -> bool {
        finish
            .as_ref()
            .is_some_and(|f| f.finish.guard.poll_cut(cut, cx))
    }
}

impl ProxyBody {
    /// The end of a body nothing moved on for `period` (body bytes passed on, or a duplex
    /// upload's bytes sent; framing alone, such as chunk sizes, is no progress): the
    /// upstream's fault, counted as its timeout, unless it waits for the rest of the
    /// client's body.
    fn stalled(
        inner: &UpstreamBody,
        finish: &mut Option<Box<FinishHandle>>,
        period: Duration,
    ) -> BodyError {
        let client = inner.waits_on_client();
        let why = if client {
            stall::stalled("the client sent none of its body", period)
        } else {
            stall::stalled("the upstream sent none of the body", period)
        };
        if let Some(f) = finish.take() {
            let f = &f.finish;
            let upstream = f.guard.upstream();
            if client {
                tracing::debug!(upstream = %upstream.name, error = %why, "request body stalled");
            } else {
                f.metrics
                    .upstream_error(upstream, UpstreamErrorKind::Timeout);
                tracing::warn!(upstream = %upstream.name, color = %f.color, error = %why, "upstream body stalled");
            }
        }
        Box::new(Stalled(why))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream {
                inner,
                to_client,
                finish,
                cut,
            } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if polled.is_pending() {
                    if Self::check_cut(finish, cut, cx) {
                        finish.take();
                        return Poll::Ready(Some(Err(Cut::boxed())));
                    }
                    if let Some(f) = finish.as_mut() {
                        // Bytes passed on, and a duplex upload's bytes sent.
                        let progress = f.finish.bytes + inner.uploaded();
                        let timeout = match f.finish.bytes {
                            0 => f.first_timeout,
                            _ => f.stall_timeout,
                        };
                        if let Poll::Ready(period) = f.stall.poll(cx, progress, || timeout) {
                            return Poll::Ready(Some(Err(Self::stalled(inner, finish, period))));
                        }
                    }
                }
                match &polled {
                    // A body the client takes as fast as it comes is cut at the deadline
                    // too, not only one that waits on its upstream.
                    Poll::Ready(Some(Ok(_)))
                        if finish.as_ref().is_some_and(|f| f.finish.guard.is_cut()) =>
                    {
                        finish.take();
                        return Poll::Ready(Some(Err(Cut::boxed())));
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            to_client.inc_by(data.len() as u64);
                            if let Some(f) = finish.as_mut() {
                                if f.finish.bytes == 0 {
                                    // The first bytes: the wait for them is over, and the
                                    // timer is armed anew with the shorter period.
                                    f.stall = StallTimer::default();
                                }
                                f.finish.bytes += data.len() as u64;
                            }
                        }
                    }
                    // The upstream broke off its body (closed mid-body, bad chunking).
                    Poll::Ready(Some(Err(e))) => {
                        if let Some(f) = finish.take() {
                            let f = &f.finish;
                            let upstream = f.guard.upstream();
                            f.metrics
                                .upstream_error(upstream, UpstreamErrorKind::Protocol);
                            tracing::warn!(upstream = %upstream.name, color = %f.color, error = %e, bytes_to_client = f.bytes, "upstream broke off its answer's body");
                        }
                    }
                    // The end: the request is over.
                    Poll::Ready(None) => {
                        finish.take();
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
