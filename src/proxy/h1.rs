//! The HTTP/1.1 client for plain requests and WebSocket handshakes, run inside the client
//! connection's own task.
//!
//! The request head is written, the response head read and parsed, and the response body
//! read from the upstream socket only when the client connection polls for it. Nothing is
//! handed to another task: a general-purpose client (hyper-util's) sends each request
//! through a channel to a task that owns the connection and the answer back through
//! another, and on a proxy's hot path those hand-offs cost more than the proxying.
//!
//! Connections are kept per upstream (`Idle`), most recently used first, for
//! `IDLE_TIMEOUT`. One goes back only after a complete exchange: the request body sent in
//! full, the response's framing saying where it ended (not "until close"), nothing left
//! over, and neither side asking to close. A kept connection that the upstream closed
//! while idle is seen before use when its close already arrived; otherwise, when it fails
//! before any byte of an answer, the request goes again on a new connection if no byte of
//! the client's body was read and the request was either incomplete (so the upstream cannot
//! have acted on it) or idempotent.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::io::poll_read_buf;

use super::headers::{self, Forwarding};
use super::stall::StallTimer;
use crate::config::{Limits, UpstreamUrl};
use crate::upstream::Upstream;

/// How long a kept connection may sit unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most connections kept per upstream; more are closed when their exchange ends.
const MAX_IDLE: usize = 1024;
/// Largest response head accepted (as for requests).
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line or trailer section of a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// How much is read from the upstream at a time.
const READ_CHUNK: usize = 16 * 1024;
/// How long a client may take to end a request stream whose body was sent in full (an
/// HTTP/2 END_STREAM in a frame of its own) once the answer is complete.
const CLIENT_END_WAIT: Duration = Duration::from_secs(5);

/// A connection to an upstream, plain or TLS, counted against the open-file limit.
pub struct Stream {
    io: Io,
    _socket: crate::nofile::Counted,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// A plain connection made elsewhere (tests).
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream {
            io: Io::Plain(tcp),
            _socket: crate::nofile::Counted::accepted(),
        }
    }

    /// Whether it is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }
}

/// `connect` within `limits.connect_timeout`; past it, an error of kind `TimedOut` that
/// says how long it waited.
pub async fn connect_within(
    tls: &Arc<rustls::ClientConfig>,
    url: &UpstreamUrl,
    timeout: Duration,
) -> io::Result<Stream> {
    match tokio::time::timeout(timeout, connect(tls, url)).await {
        Ok(connected) => connected,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// Opens a connection to `url` (TLS for `https://`, verified with `tls`), Nagle off; an
/// error as at the open-file limit when the descriptors left are the reserve's
/// (`nofile::Counted::to_open`).
pub async fn connect(tls: &Arc<rustls::ClientConfig>, url: &UpstreamUrl) -> io::Result<Stream> {
    let socket = crate::nofile::Counted::to_open()?;
    let host = url.authority.host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, url.port())).await?;
    tcp.set_nodelay(true)?;
    super::stall::limit_unsent(&tcp);
    if !url.is_tls() {
        return Ok(Stream {
            io: Io::Plain(tcp),
            _socket: socket,
        });
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    Ok(Stream {
        io: Io::Tls(Box::new(tls)),
        _socket: socket,
    })
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An upstream connection and what has been read from it and not yet used.
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    reused: bool,
    /// The trust a TLS connection was verified with; `None` for plain TCP.
    trust: Option<Arc<rustls::ClientConfig>>,
}

impl Conn {
    fn new(io: Stream, trust: Option<Arc<rustls::ClientConfig>>) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            reused: false,
            trust,
        }
    }

    /// Whether an idle connection is still open: nothing may arrive on it between
    /// exchanges, so readable means closed (or broken). Costs no system call unless the
    /// socket became readable.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    /// Reads more into the buffer, room for `chunk` bytes made when less than a quarter of
    /// that is left; 0 means the upstream closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, chunk: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < chunk / 4 {
            self.buf.reserve(chunk);
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Reads the answer's head (a 101 taken as one when the request asked to `upgrade`),
    /// `chunk` bytes at a time.
    async fn read_head(
        &mut self,
        method: &Method,
        upgrade: bool,
        chunk: usize,
    ) -> Result<(Response<()>, Framing, bool), Head> {
        loop {
            match parse_head(&mut self.buf, method, upgrade) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(Head::Invalid(io::Error::new(io::ErrorKind::InvalidData, e))),
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Head::Invalid(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the response head is larger than 64 KiB",
                )));
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx, chunk)).await {
                Ok(0) => {
                    return Err(Head::Lost(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before answering",
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(Head::Lost(e)),
            }
        }
    }
}

/// Connections to one upstream that finished an exchange and may carry another.
pub struct Idle {
    parked: Mutex<Parked>,
}

/// What `Idle` guards.
#[derive(Default)]
struct Parked {
    /// Oldest first: parked at the end, taken from the end.
    conns: Vec<(Conn, Instant)>,
    /// The upstream was removed from its pool: it gets no new requests, so a connection
    /// its last ones finish with is closed, not kept (its health loop, which sweeps idle
    /// connections, has stopped too).
    closed: bool,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.lock().conns.len();
        f.debug_struct("Idle").field("conns", &n).finish()
    }
}

impl Default for Idle {
    fn default() -> Idle {
        Idle {
            parked: Mutex::new(Parked::default()),
        }
    }
}

impl Idle {
    /// The most recently parked connection that is still open, if any, and, for TLS, was
    /// verified with `trust` (a reload may have replaced the trust since).
    fn take(&self, trust: &Arc<rustls::ClientConfig>) -> Option<Conn> {
        loop {
            let (mut conn, since) = self.lock().conns.pop()?;
            if conn.trust.as_ref().is_some_and(|t| !Arc::ptr_eq(t, trust)) {
                continue;
            }
            if since.elapsed() >= IDLE_TIMEOUT {
                // Everything below it is older still (newer ones may have come on top).
                drop(conn);
                self.sweep();
                return None;
            }
            if conn.is_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    fn park(&self, conn: Conn) {
        let mut parked = self.lock();
        if parked.conns.len() < MAX_IDLE && !parked.closed {
            parked.conns.push((conn, Instant::now()));
        }
    }

    /// Closes connections unused for `IDLE_TIMEOUT` and those the upstream closed (the
    /// health loop calls this, so an upstream without traffic does not hold sockets).
    pub fn sweep(&self) {
        let gone: Vec<_> = self
            .lock()
            .conns
            .extract_if(.., |(conn, since)| {
                since.elapsed() >= IDLE_TIMEOUT || !conn.is_open()
            })
            .collect();
        drop(gone);
    }

    /// Closes the connection parked longest, if there is one; whether there was.
    pub fn close_oldest(&self) -> bool {
        let mut parked = self.lock();
        if parked.conns.is_empty() {
            return false;
        }
        let (oldest, _) = parked.conns.remove(0);
        drop(parked);
        drop(oldest);
        true
    }

    /// Closes every parked connection.
    pub fn clear(&self) {
        let gone = std::mem::take(&mut self.lock().conns);
        drop(gone);
    }

    /// Closes every parked connection, and every one parked from now on until `open`: the
    /// upstream was removed from its pool.
    pub fn close(&self) {
        let gone = {
            let mut parked = self.lock();
            parked.closed = true;
            std::mem::take(&mut parked.conns)
        };
        drop(gone);
    }

    /// Keeps connections again: the upstream is back in its pool.
    pub fn open(&self) {
        self.lock().closed = false;
    }

    /// How many connections are parked.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether none are parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The parts of a request that go upstream: the client's headers with hop-by-hop ones
/// already removed, and the `X-Forwarded-*` headers to write in place of the client's.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
    pub forwarding: Forwarding<'a>,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be made; the client's body is handed back untouched so the
    /// request can go to another upstream.
    Connect(io::Error, Incoming),
    /// The upstream broke the exchange or answered something that is not HTTP/1.1.
    Upstream(String),
    /// The client's body could not be read (the client went away or sent a bad body).
    Client(String),
    /// The upstream sent no response head within `response_timeout` of the request's end,
    /// or took none of the request for that long.
    TimedOut,
    /// The client sent none of its body for `limits.stall_timeout` (the period), while
    /// the upstream waited for it.
    ClientStalled(Duration),
}

/// How a message body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes (responses only).
    Close,
}

/// Sends one request to `upstream` on a kept connection or a new one (bounded by
/// `connect_timeout`), and reads the response head. The body is read later, as the
/// client's connection polls the returned response.
pub async fn exchange(
    upstream: &Arc<Upstream>,
    tls: &Arc<rustls::ClientConfig>,
    limits: &Limits,
    head: RequestHead<'_>,
    body: Incoming,
    to_upstream: &IntCounter,
) -> Result<Response<ResponseBody>, Failure> {
    let framing = request_framing(head.method, head.headers, &body);
    let encoded = encode_head(&head, &upstream.url.authority, framing);
    let mut body = body;
    loop {
        let conn = match upstream.idle.take(tls) {
            Some(conn) => conn,
            None => {
                // Boxed: a TLS handshake's state is large, and every request's future
                // would carry its size (and be copied with it) for this rare path.
                let connecting = connect_within(tls, &upstream.url, limits.connect_timeout);
                match Box::pin(connecting).await {
                    Ok(io) => {
                        upstream.record_connect();
                        let trust = io.is_tls().then(|| tls.clone());
                        Conn::new(io, trust)
                    }
                    Err(e) => return Err(Failure::Connect(e, body)),
                }
            }
        };
        let reused = conn.reused;
        let sending = Sending {
            conn,
            upload: Upload {
                queue: VecDeque::from([encoded.clone()]),
                body: Some(body),
                framing,
                body_read: false,
                written: false,
                unflushed: false,
                sent: 0,
                wrote: 0,
                upstream_full: false,
                to_upstream: to_upstream.clone(),
            },
        };
        match sending.run(head.method, upstream, limits).await {
            Ok(response) => return Ok(response),
            // The upstream closed a kept connection as it was reused; nothing was lost.
            Err((Sent::Stale(e), Some(unread))) if reused => {
                tracing::debug!(upstream = %upstream.name, error = %e, "kept connection was closed; sending on a new one");
                body = unread;
            }
            Err((Sent::Stale(e) | Sent::Upstream(e), _)) => {
                return Err(Failure::Upstream(e.to_string()));
            }
            Err((Sent::Client(e), _)) => return Err(Failure::Client(e)),
            Err((Sent::TimedOut, _)) => return Err(Failure::TimedOut),
            Err((Sent::ClientStalled(period), _)) => return Err(Failure::ClientStalled(period)),
        }
    }
}

/// How the request body is framed: with the client's length when it is known, chunked
/// otherwise.
fn request_framing(method: &Method, headers: &HeaderMap, body: &Incoming) -> Framing {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| decimal(v.trim()));
    let length = declared.or_else(|| {
        if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        }
    });
    match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        // CONNECT carries no body (and is not proxied as a tunnel here).
        None if *method == Method::CONNECT => Framing::Empty,
        None => Framing::Chunked,
    }
}

/// The request line and header section, with `Host` set to the upstream's authority, the
/// `X-Forwarded-*` headers, and the body's framing headers.
fn encode_head(head: &RequestHead<'_>, authority: &Authority, framing: Framing) -> Bytes {
    let mut out = BytesMut::with_capacity(256 + head.headers.len() * 48);
    out.put_slice(head.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(head.path.as_str().as_bytes());
    out.put_slice(b" HTTP/1.1\r\nhost: ");
    out.put_slice(authority.as_str().as_bytes());
    out.put_slice(b"\r\n");
    let mut had_for = false;
    let mut had_cookie = false;
    for (name, value) in head.headers {
        // The client's `Expect: 100-continue` was answered by the server side already.
        if name == header::HOST || name == header::CONTENT_LENGTH || name == header::EXPECT {
            continue;
        }
        if Forwarding::replaces(name) {
            had_for |= name == headers::X_FORWARDED_FOR;
            continue;
        }
        if name == header::COOKIE {
            // HTTP/2 clients send each cookie in a field of its own; HTTP/1.1 wants one
            // line, joined with "; " (RFC 9113 8.2.3). A map yields a name's values one
            // after another, so the line just written is the cookie line.
            if had_cookie {
                out.truncate(out.len() - 2);
                out.put_slice(b"; ");
                out.put_slice(value.as_bytes());
                out.put_slice(b"\r\n");
                continue;
            }
            had_cookie = true;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    head.forwarding.encode(head.headers, had_for, &mut out);
    match framing {
        Framing::Length(n) => {
            out.put_slice(b"content-length: ");
            out.put_slice(n.to_string().as_bytes());
            out.put_slice(b"\r\n");
        }
        Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        // Methods that normally carry a body say when theirs is empty.
        Framing::Empty
            if *head.method == Method::POST
                || *head.method == Method::PUT
                || *head.method == Method::PATCH =>
        {
            out.put_slice(b"content-length: 0\r\n");
        }
        Framing::Empty | Framing::Close => {}
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// First read of a WebSocket handshake's answer: a 101's head is a few hundred bytes.
const UPGRADE_READ: usize = 2 * 1024;

/// How an upstream answered a WebSocket upgrade request.
pub enum Upgrade {
    /// 101: the answer's head, and the connection, which now speaks the new protocol.
    Switched(Response<()>, Switched),
    /// Any other answer, with its body to pass on as it came (the connection is not kept).
    Refused(Response<ResponseBody>),
}

/// Why an upgrade request has no answer.
#[derive(Debug)]
pub enum Unanswered {
    /// The connection failed, or what came is not an HTTP/1.1 answer.
    Failed(String),
    /// No answer's head within `response_timeout`.
    TimedOut,
}

/// Sends an upgrade request on the new connection `io` and reads the answer's head, both
/// within `response_timeout`. `head.headers` carries the handshake's own headers
/// (`Connection`, `Upgrade`, the key). The head is written from a buffer its size and the
/// answer read into a small one, in the caller's task: a burst of reconnects after a drain
/// holds one handshake per client at once, and hyper's client connection took 16 KiB of
/// buffers, a task and a channel for each (benches/RESULTS.md).
pub async fn upgrade(
    io: Stream,
    head: RequestHead<'_>,
    authority: &Authority,
    response_timeout: Duration,
) -> Result<Upgrade, Unanswered> {
    let encoded = encode_head(&head, authority, Framing::Empty);
    let method = head.method;
    let mut conn = Conn::new(io, None);
    let exchange = async {
        conn.io.write_all(&encoded).await?;
        conn.io.flush().await?;
        match conn.read_head(method, true, UPGRADE_READ).await {
            Ok(answer) => Ok(answer),
            Err(Head::Invalid(e) | Head::Lost(e)) => Err(e),
        }
    };
    let (response, framing, _) = match tokio::time::timeout(response_timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(Unanswered::Failed(e.to_string())),
        Err(_) => return Err(Unanswered::TimedOut),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let body = ResponseBody::new(conn, framing, None, None);
        return Ok(Upgrade::Refused(response.map(|()| body)));
    }
    // An empty rest must not hold on to the read buffer for the stream's life.
    let early = if conn.buf.is_empty() {
        Bytes::new()
    } else {
        conn.buf.split().freeze()
    };
    Ok(Upgrade::Switched(response, Switched { io: conn.io, early }))
}

/// An upgraded upstream connection. What came after the 101's head (the upstream's first
/// frames, perhaps) is read first.
pub struct Switched {
    io: Stream,
    early: Bytes,
}

impl AsyncRead for Switched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.early.len().min(buf.remaining());
        buf.put_slice(&this.early[..n]);
        this.early.advance(n);
        if this.early.is_empty() {
            // Lets go of the buffer it was read into.
            this.early = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Switched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why sending failed.
#[derive(Debug)]
enum Sent {
    /// The connection failed before any of the answer arrived.
    Stale(io::Error),
    Upstream(io::Error),
    Client(String),
    /// No answer within `response_timeout` of the request's end, or no byte of the
    /// request taken for that long.
    TimedOut,
    /// No byte of the client's body for `limits.stall_timeout` (the period).
    ClientStalled(Duration),
}

/// Why a response head was not read.
enum Head {
    /// What came is not a valid HTTP/1.1 response head.
    Invalid(io::Error),
    /// The connection ended or failed first.
    Lost(io::Error),
}

/// What is still to be written of a request: the encoded head and framing, then the
/// client's body.
struct Upload {
    /// Encoded bytes not yet written: the head, then body frames with their framing.
    queue: VecDeque<Bytes>,
    /// The client's body, until it has been read in full.
    body: Option<Incoming>,
    framing: Framing,
    /// Whether any of `body` was read (then it cannot be sent again).
    body_read: bool,
    /// Whether the whole request was written: then the upstream may have acted on it,
    /// and only an idempotent request may be sent again.
    written: bool,
    /// Bytes written since the last flush (a TLS stream holds them until flushed).
    unflushed: bool,
    /// Body bytes queued, checked against a declared length.
    sent: u64,
    /// Bytes written to the upstream so far (progress, for the stall timer).
    wrote: u64,
    /// Whether the last `poll_write` waited on the upstream (a full socket), not on the
    /// client's body.
    upstream_full: bool,
    to_upstream: IntCounter,
}

impl Upload {
    /// Whether the request carries a body.
    fn has_body(&self) -> bool {
        self.framing != Framing::Empty
    }

    /// Whether the upstream has the whole request, its declared length all written,
    /// though the client's body has not yet said it ended.
    fn sent_in_full(&self) -> bool {
        matches!(self.framing, Framing::Length(declared) if self.sent == declared)
            && self.queue.is_empty()
            && !self.unflushed
    }

    /// Reads the client's end of stream, still to come after a body sent in full, in a
    /// task of its own for at most `CLIENT_END_WAIT`. Dropped at once instead, an HTTP/2
    /// request stream is reset (NO_ERROR), which some clients take as a failure of the
    /// answer they already have. More data than declared ends the wait.
    fn await_client_end(self) {
        let Some(mut body) = self.body else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        tokio::spawn(async move {
            let end = std::future::poll_fn(|cx| {
                loop {
                    match ready!(Pin::new(&mut body).poll_frame(cx)) {
                        Some(Ok(frame)) if frame.data_ref().is_none_or(|d| d.is_empty()) => {}
                        _ => return Poll::Ready(()),
                    }
                }
            });
            let _ = tokio::time::timeout(CLIENT_END_WAIT, end).await;
        });
    }

    /// Writes the request to `io` as far as it can; ready once all of it is written and
    /// flushed. Flushes before waiting on the client, so no byte waits in a TLS buffer
    /// for the client's next chunk.
    fn poll_write(&mut self, cx: &mut Context<'_>, io: &mut Stream) -> Poll<Result<(), Sent>> {
        loop {
            if let Some(front) = self.queue.front() {
                // A lone buffer (a request without a body: the head) goes out with
                // send(2), which costs the kernel less than writev(2) (benches/RESULTS.md).
                let written = if self.queue.len() == 1 {
                    Pin::new(&mut *io).poll_write(cx, front)
                } else {
                    let mut slices = [IoSlice::new(&[]); 16];
                    let n = self
                        .queue
                        .iter()
                        .zip(slices.iter_mut())
                        .map(|(bytes, slice)| *slice = IoSlice::new(bytes))
                        .count();
                    Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
                };
                let Poll::Ready(written) = written else {
                    self.upstream_full = true;
                    return Poll::Pending;
                };
                match written {
                    Ok(0) => {
                        let e =
                            io::Error::new(io::ErrorKind::WriteZero, "the upstream took no bytes");
                        return Poll::Ready(Err(Sent::Upstream(e)));
                    }
                    Ok(n) => {
                        self.advance(n);
                        self.wrote += n as u64;
                        self.unflushed = true;
                    }
                    Err(e) => return Poll::Ready(Err(Sent::Upstream(e))),
                }
                continue;
            }
            if self.unflushed {
                let Poll::Ready(flushed) = Pin::new(&mut *io).poll_flush(cx) else {
                    self.upstream_full = true;
                    return Poll::Pending;
                };
                if let Err(e) = flushed {
                    return Poll::Ready(Err(Sent::Upstream(e)));
                }
                self.unflushed = false;
            }
            self.upstream_full = false;
            let has_body = self.has_body();
            let body = match self.body.as_mut() {
                Some(body) if has_body => body,
                _ => {
                    self.written = true;
                    return Poll::Ready(Ok(()));
                }
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    self.body_read = true;
                    match frame.into_data() {
                        Ok(data) => self.queue_data(data)?,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                self.queue_end(Some(trailers))?;
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    return Poll::Ready(Err(Sent::Client(format!(
                        "the client's request body failed: {e}"
                    ))));
                }
                None => {
                    self.body_read = true;
                    self.queue_end(None)?;
                }
            }
        }
    }

    /// Drops `n` written bytes from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.queue.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    fn queue_data(&mut self, data: Bytes) -> Result<(), Sent> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        self.sent += len;
        self.to_upstream.inc_by(len);
        match self.framing {
            Framing::Length(declared) if self.sent > declared => Err(Sent::Client(format!(
                "the client sent more than its content-length of {declared}"
            ))),
            Framing::Chunked => {
                self.queue.push_back(Bytes::from(format!("{len:x}\r\n")));
                self.queue.push_back(data);
                self.queue.push_back(Bytes::from_static(b"\r\n"));
                Ok(())
            }
            _ => {
                self.queue.push_back(data);
                Ok(())
            }
        }
    }

    /// The body ended (with trailers, perhaps): the last chunk, or a length check.
    fn queue_end(&mut self, mut trailers: Option<HeaderMap>) -> Result<(), Sent> {
        self.body = None;
        match self.framing {
            Framing::Chunked => {
                let mut end = BytesMut::from(&b"0\r\n"[..]);
                if let Some(trailers) = trailers.as_mut() {
                    super::headers::strip_from_trailers(trailers);
                }
                for (name, value) in trailers.iter().flatten() {
                    end.put_slice(name.as_str().as_bytes());
                    end.put_slice(b": ");
                    end.put_slice(value.as_bytes());
                    end.put_slice(b"\r\n");
                }
                end.put_slice(b"\r\n");
                self.queue.push_back(end.freeze());
                Ok(())
            }
            Framing::Length(declared) if self.sent != declared => Err(Sent::Client(format!(
                "the client's body ended after {} of its {declared} bytes",
                self.sent
            ))),
            _ => Ok(()),
        }
    }
}

/// How writing the request ended.
enum Written {
    /// All of it.
    Complete,
    /// An error answer came first: the rest of the body is not sent.
    Refused,
    /// A success answer came first: the rest of the body goes on as the answer is read
    /// (full duplex).
    Duplex,
}

/// One request on one connection, until its answer's head.
struct Sending {
    conn: Conn,
    upload: Upload,
}

impl Sending {
    /// Sends the request and reads the answer's head. On failure the body comes back if
    /// the request may be sent again.
    async fn run(
        mut self,
        method: &Method,
        upstream: &Arc<Upstream>,
        limits: &Limits,
    ) -> Result<Response<ResponseBody>, (Sent, Option<Incoming>)> {
        let response_timeout = limits.response_timeout;
        let written = match self.send(response_timeout, limits.stall_timeout).await {
            Ok(written) => written,
            Err(e) => {
                let e = self.failed(e);
                return Err(self.give_back(e, method));
            }
        };
        // The upstream's time to answer runs from the end of the request: an upload may
        // be as slow as the client that sends it.
        let head = tokio::time::timeout(
            response_timeout,
            self.conn.read_head(method, false, READ_CHUNK),
        )
        .await;
        match head {
            Ok(Ok((response, framing, keep))) => {
                let keep = keep && !matches!(written, Written::Refused) && keeps_alive(&response);
                let upload = matches!(written, Written::Duplex).then(|| Box::new(self.upload));
                let home = keep.then(|| upstream.clone());
                let body = ResponseBody::new(self.conn, framing, home, upload);
                Ok(response.map(|()| body))
            }
            Ok(Err(Head::Invalid(e))) => Err((Sent::Upstream(e), None)),
            Ok(Err(Head::Lost(e))) => {
                let e = self.failed(Sent::Upstream(e));
                Err(self.give_back(e, method))
            }
            Err(_) => Err((Sent::TimedOut, None)),
        }
    }

    /// Writes the request (see `poll_send`). An upstream that takes none of it for
    /// `response_timeout` while bytes wait is given up: a client may upload slowly, but an
    /// upstream that stopped reading would otherwise hold the request for ever. So is a
    /// client that sends none of its body for `stall_timeout`, which would hold the
    /// upstream's connection as long. Each timer runs only while its side is waited on.
    async fn send(
        &mut self,
        response_timeout: Duration,
        stall_timeout: Duration,
    ) -> Result<Written, Sent> {
        if !self.upload.has_body() {
            // The head alone goes into an empty socket buffer.
            return std::future::poll_fn(|cx| self.poll_send(cx)).await;
        }
        let mut upstream = std::pin::pin!(tokio::time::sleep(response_timeout));
        // The bytes written when the upstream's timer was last set, while it runs: it
        // runs from the last byte the upstream took, as the head's timer runs from the
        // request's end (`response_timeout` is SPEC's).
        let mut armed_at = None;
        let mut client = StallTimer::default();
        std::future::poll_fn(|cx| {
            if let Poll::Ready(sent) = self.poll_send(cx) {
                return Poll::Ready(sent);
            }
            let upload = &self.upload;
            if !upload.upstream_full {
                armed_at = None;
                // Bytes the upstream took count too: its waits come between the client's.
                return client
                    .poll(cx, upload.wrote + upload.sent, || stall_timeout)
                    .map(|period| Err(Sent::ClientStalled(period)));
            }
            if armed_at != Some(upload.wrote) {
                armed_at = Some(upload.wrote);
                upstream
                    .as_mut()
                    .reset(super::stall::deadline_after(response_timeout));
            }
            match upstream.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(Sent::TimedOut)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// A connection failure is `Stale` while nothing of the answer arrived.
    fn failed(&self, e: Sent) -> Sent {
        match e {
            Sent::Upstream(e) if self.conn.buf.is_empty() => Sent::Stale(e),
            other => other,
        }
    }

    /// The error, and the body if the request may be sent again: none of the body was
    /// read, and the request was not complete or is idempotent (RFC 9110 §9.2.2).
    fn give_back(mut self, e: Sent, method: &Method) -> (Sent, Option<Incoming>) {
        let upload = &mut self.upload;
        let again = !upload.body_read && (!upload.written || method.is_idempotent());
        let unread = if again { upload.body.take() } else { None };
        (e, unread)
    }

    /// Writes the request while watching for an answer that comes before it is all sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Written, Sent>> {
        loop {
            // Reading stops at `MAX_HEAD` until the request is written: what is read
            // here is held until then.
            if self.upload.has_body() && self.conn.buf.len() < MAX_HEAD {
                match self.conn.poll_fill(cx, READ_CHUNK) {
                    Poll::Ready(Ok(0)) => {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upstream closed the connection while the request was sent",
                        );
                        return Poll::Ready(Err(Sent::Upstream(e)));
                    }
                    Poll::Ready(Ok(_)) => match early_answer(&mut self.conn.buf) {
                        Some(status) if status >= 400 => {
                            return Poll::Ready(Ok(Written::Refused));
                        }
                        Some(_) => return Poll::Ready(Ok(Written::Duplex)),
                        // Interim answers (100 Continue, 103) or an incomplete head.
                        None => continue,
                    },
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Sent::Upstream(e))),
                    Poll::Pending => {}
                }
            }
            ready!(self.upload.poll_write(cx, &mut self.conn.io))?;
            return Poll::Ready(Ok(Written::Complete));
        }
    }
}

/// How an upstream's response head is read: whitespace between a field name and its colon
/// is taken out, not refused, as a proxy must (RFC 9112 §5.1).
fn response_parser() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config
}

/// Parses a complete response head off the front of `buf`, skipping interim (1xx)
/// answers; `None` until the head is complete. A 101 is the answer when the request asked
/// to `upgrade` (framed as empty: what follows its head is the new protocol's), and an
/// error otherwise.
fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    upgrade: bool,
) -> Result<Option<(Response<()>, Framing, bool)>, String> {
    loop {
        // Uninitialized: zeroing 128 fields per response showed in profiles.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match response_parser().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                return Err("the response head is larger than 64 KiB".into());
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(format!(
                    "the upstream's answer has more than {MAX_HEADERS} header fields"
                ));
            }
            Err(e) => return Err(format!("the upstream's answer is not HTTP/1.1: {e}")),
        };
        let status = parsed
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or("the upstream's status code is not valid")?;
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if switched && !upgrade {
            return Err("the upstream switched protocols on a plain request".into());
        }
        if status.is_informational() && !switched {
            buf.advance(len);
            continue;
        }
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // Values are slices of the head, not copies; names are mostly static.
        let base = buf.as_ptr() as usize;
        // A reason phrase other than the standard one goes on as it came (hyper writes the
        // standard one otherwise); where it stands in the head, to slice after the freeze.
        // With no reason at all ("HTTP/1.1 200\r\n") httparse gives a static "", not a
        // slice of `buf`: only a slice of the head is kept.
        let reason_at = parsed
            .reason
            .filter(|r| Some(*r) != status.canonical_reason())
            .and_then(|r| {
                let start = (r.as_ptr() as usize).checked_sub(base)?;
                (start + r.len() <= len).then_some((start, r.len()))
            });
        let mut fields_at = Vec::with_capacity(parsed.headers.len());
        let (mut has_te, mut has_length) = (false, false);
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| format!("bad header name `{}` from the upstream", field.name))?;
            has_te |= name == header::TRANSFER_ENCODING;
            has_length |= name == header::CONTENT_LENGTH;
            let start = field.value.as_ptr() as usize - base;
            fields_at.push((name, start, start + field.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(fields_at.len());
        for (name, start, end) in fields_at {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| format!("bad value for header `{name}` from the upstream"))?;
            headers.append(name, value);
        }
        // Both framings at once is how request smuggling starts: answer, but do not keep.
        let ambiguous = has_te && has_length;
        // A faulty upstream may send the body a HEAD, 204 or 304 answer announces anyway,
        // after the head: the next request on the connection, maybe another client's,
        // would take it for its answer. Such an answer's connection is not kept.
        let (framing, unframed) = if switched {
            (Framing::Empty, false)
        } else {
            response_framing(method, status, has_te, &mut headers)?
        };
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some((start, len)) = reason_at
            && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(head.slice(start..start + len))
        {
            response.extensions_mut().insert(reason);
        } else if reason_at.is_none() && status.canonical_reason().is_none() {
            // A code with no standard phrase and none of its own ("HTTP/1.1 599"): an
            // empty one, which hyper would otherwise write as "<none>".
            response
                .extensions_mut()
                .insert(hyper::ext::ReasonPhrase::from_static(b""));
        }
        return Ok(Some((response, framing, !ambiguous && !unframed)));
    }
}

/// The status of a complete final answer at the front of `buf`, once the complete
/// interim (1xx) answers before it are dropped; `None` while there is none yet.
fn early_answer(buf: &mut BytesMut) -> Option<u16> {
    loop {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        match response_parser().parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(len))
                if parsed
                    .code
                    .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                buf.advance(len);
            }
            Ok(httparse::Status::Complete(_)) => return Some(parsed.code.unwrap_or(0)),
            Ok(httparse::Status::Partial) => return None,
            // Not HTTP: stop sending, as for an error answer; the head parser reports it.
            Err(_) => return Some(u16::MAX),
        }
    }
}

/// How a response body is delimited (RFC 9112 §6.3), and whether the head announces a
/// body that the method or status says is not there (a HEAD's, 204's or 304's non-zero
/// length, or a transfer coding).
fn response_framing(
    method: &Method,
    status: StatusCode,
    has_te: bool,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), String> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // The length is that of the body not sent; repeated, it is still sent once (one
        // that is not valid is passed on: it frames nothing here).
        let announced = has_te || !matches!(content_length(headers), Ok(None | Some(0)));
        if status == StatusCode::NO_CONTENT {
            // A 204 has no Content-Length (RFC 9110 §8.6); HTTP/2 clients refuse one.
            headers.remove(header::CONTENT_LENGTH);
        }
        return Ok((Framing::Empty, announced));
    }
    // `has_te` spares the common answer (Content-Length only) a hashed lookup.
    if has_te
        && let Some(codings) = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
    {
        let chunked = codings
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        // Transfer-Encoding overrides any Content-Length.
        headers.remove(header::CONTENT_LENGTH);
        let framing = if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        };
        return Ok((framing, false));
    }
    let framing = match content_length(headers)? {
        None => Framing::Close,
        Some(0) => Framing::Empty,
        Some(length) => Framing::Length(length),
    };
    Ok((framing, false))
}

/// The answer's Content-Length, if it has one. The same length repeated is one length
/// (RFC 9110 §8.6), left in `headers` once: HTTP/2 clients refuse a repeated field.
fn content_length(headers: &mut HeaderMap) -> Result<Option<u64>, String> {
    let mut lengths = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.to_str().ok().and_then(|v| decimal(v.trim())));
    let Some(first) = lengths.next() else {
        return Ok(None);
    };
    let bad = || "the upstream's content-length is not valid".to_string();
    let length = first.ok_or_else(bad)?;
    let mut repeated = false;
    for other in lengths {
        if other != Some(length) {
            return Err(bad());
        }
        repeated = true;
    }
    if repeated {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(Some(length))
}

/// A length of decimal digits only (`parse` would also take a sign).
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Whether the connection may carry another exchange after this answer.
fn keeps_alive(response: &Response<()>) -> bool {
    response.version() == Version::HTTP_11
        && !response
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// Where a response body is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    Close,
    Done,
}

/// An upstream's response body, read from its connection as the client polls. When it
/// ends cleanly on a connection that may be kept, the connection goes back to its
/// upstream's idle set; dropped early, the connection is closed.
pub struct ResponseBody {
    conn: Option<Conn>,
    decode: Decode,
    /// The upstream to park the connection with at the end; `None` if it is not kept.
    home: Option<Arc<Upstream>>,
    /// The rest of the request, when the upstream answered before all of it was sent
    /// (rare: boxed so that the common body stays small).
    upload: Option<Box<Upload>>,
    /// Bytes of that rest written so far (progress, for the stall timer).
    uploaded: u64,
}

impl ResponseBody {
    fn new(
        conn: Conn,
        framing: Framing,
        home: Option<Arc<Upstream>>,
        upload: Option<Box<Upload>>,
    ) -> ResponseBody {
        let decode = match framing {
            Framing::Empty => Decode::Done,
            Framing::Length(n) => Decode::Length(n),
            Framing::Chunked => Decode::ChunkSize,
            Framing::Close => Decode::Close,
        };
        let mut body = ResponseBody {
            conn: Some(conn),
            decode,
            home: home.filter(|_| framing != Framing::Close),
            upload,
            uploaded: 0,
        };
        if decode == Decode::Done {
            body.finish();
        }
        body
    }

    /// The body is complete: keep the connection if it may be kept, the request was sent
    /// in full, and nothing more came.
    fn finish(&mut self) {
        self.decode = Decode::Done;
        // A body sent in full waits only for the client's end of stream: the upstream has
        // the whole request, and the connection may be kept.
        if let Some(upload) = self.upload.take_if(|u| u.sent_in_full()) {
            upload.await_client_end();
        }
        let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) else {
            return;
        };
        if conn.buf.is_empty() && self.upload.take().is_none() {
            home.idle.park(conn);
        }
    }

    /// Bytes of the request written since the answer began (full duplex).
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }

    /// Whether the rest of the request waits on the client's body, which the upstream
    /// may be waiting for in turn.
    pub fn waits_on_client(&self) -> bool {
        self.upload.as_ref().is_some_and(|u| !u.upstream_full)
    }

    /// Sends more of a request the upstream already answered; an upload that cannot go on
    /// is given up (the connection is then not kept) unless the connection broke.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        let (Some(upload), Some(conn)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return Ok(());
        };
        let polled = upload.poll_write(cx, &mut conn.io);
        self.uploaded = upload.wrote;
        match polled {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(())) => {
                self.upload = None;
                Ok(())
            }
            Poll::Ready(Err(Sent::Client(e))) => {
                tracing::debug!(error = %e, "request body failed after the answer began");
                self.home = None;
                self.upload = None;
                Ok(())
            }
            Poll::Ready(Err(Sent::Upstream(e) | Sent::Stale(e))) => Err(e),
            // Not from `poll_write`: the timers are `send`'s. A duplex upload's stall
            // is the response body's (`ProxyBody`).
            Poll::Ready(Err(Sent::TimedOut | Sent::ClientStalled(_))) => {
                Err(io::ErrorKind::TimedOut.into())
            }
        }
    }

    /// The next frame from what has been read already; `None` when more must be read
    /// (or the body is done).
    fn decode(&mut self) -> Result<Option<Frame<Bytes>>, String> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let (frame, ended) = step(&mut self.decode, &mut conn.buf)?;
        if ended {
            self.finish();
        }
        Ok(frame)
    }
}

/// Decodes from `buf` what can be decoded: a frame, and whether the body ended.
fn step(decode: &mut Decode, buf: &mut BytesMut) -> Result<(Option<Frame<Bytes>>, bool), String> {
    loop {
        match *decode {
            Decode::Done => return Ok((None, false)),
            Decode::Length(left) | Decode::ChunkData(left) => {
                if buf.is_empty() {
                    return Ok((None, false));
                }
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let data = Frame::data(buf.split_to(n).freeze());
                let left = left - n as u64;
                let chunked = matches!(*decode, Decode::ChunkData(_));
                *decode = match (chunked, left) {
                    (false, 0) => return Ok((Some(data), true)),
                    (false, left) => Decode::Length(left),
                    (true, 0) => Decode::ChunkEnd,
                    (true, left) => Decode::ChunkData(left),
                };
                return Ok((Some(data), false));
            }
            Decode::Close => {
                if buf.is_empty() {
                    return Ok((None, false));
                }
                return Ok((Some(Frame::data(buf.split().freeze())), false));
            }
            Decode::ChunkSize => {
                let Some(end) = find_lf(buf) else {
                    return too_long(buf.len(), "chunk-size line");
                };
                let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
                let digits = line.split(|b| *b == b';').next().unwrap_or_default();
                let digits = std::str::from_utf8(digits)
                    .map(|s| s.trim_matches([' ', '\t']))
                    .unwrap_or_default();
                let significant = digits.trim_start_matches('0');
                let valid = !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_hexdigit())
                    && significant.len() <= 15;
                let size = valid
                    .then(|| u64::from_str_radix(significant, 16).unwrap_or(0))
                    .ok_or("the upstream sent a bad chunk size")?;
                buf.advance(end + 1);
                *decode = if size == 0 {
                    Decode::Trailers
                } else {
                    Decode::ChunkData(size)
                };
            }
            Decode::ChunkEnd => {
                let end = match &buf[..] {
                    [b'\n', ..] => 1,
                    [b'\r', b'\n', ..] => 2,
                    [] | [b'\r'] => return Ok((None, false)),
                    _ => return Err("the upstream's chunk is longer than its size".into()),
                };
                buf.advance(end);
                *decode = Decode::ChunkSize;
            }
            Decode::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::new();
                        for field in fields {
                            if let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(field.name.as_bytes()),
                                HeaderValue::from_bytes(field.value),
                            ) {
                                trailers.append(name, value);
                            }
                        }
                        super::headers::strip_from_trailers(&mut trailers);
                        (len, trailers)
                    }
                    Ok(httparse::Status::Partial) => {
                        return too_long(buf.len(), "trailer section");
                    }
                    Err(e) => return Err(format!("the upstream sent bad trailers: {e}")),
                };
                buf.advance(len);
                let frame = (!trailers.is_empty()).then(|| Frame::trailers(trailers));
                return Ok((frame, true));
            }
        }
    }
}

/// Waiting for more of a line is fine up to `MAX_CHUNK_LINE`.
fn too_long<T>(buffered: usize, what: &str) -> Result<(Option<T>, bool), String> {
    if buffered > MAX_CHUNK_LINE {
        Err(format!("the upstream's {what} is too long"))
    } else {
        Ok((None, false))
    }
}

/// Where a line ends: its LF. A CR before it is the line's to strip; lines ended by a
/// bare LF are read too, as RFC 9112 section 2.2 allows and nginx does.
fn find_lf(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|b| *b == b'\n')
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Err(e) = this.poll_upload(cx) {
            this.conn = None;
            this.decode = Decode::Done;
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match this.decode() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    this.decode = Decode::Done;
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if this.decode == Decode::Done {
                return Poll::Ready(None);
            }
            match ready!(conn.poll_fill(cx, READ_CHUNK)) {
                Ok(0) if this.decode == Decode::Close => {
                    this.conn = None;
                    this.decode = Decode::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    this.decode = Decode::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the body ended",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    this.decode = Decode::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decode == Decode::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Length(left) => SizeHint::with_exact(left),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
