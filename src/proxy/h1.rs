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
//!
//! This file holds one exchange from start to end (`exchange`) and the request head it
//! writes. The parts, in the order a request meets them:
//! - `stream`: the socket, plain or TLS, and connecting within `connect_timeout`;
//! - `idle`: connections kept between exchanges;
//! - `upload`: writing the request and its body, and reading the answer's head;
//! - `conn` and `head`: the connection's read buffer, and parsing a response head;
//! - `body`: the response body, decoded as the client polls it;
//! - `upgrade`: the upstream half of a WebSocket handshake.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Response};
use hyper::body::{Body, Incoming};
use prometheus::IntCounter;

use super::headers::{self, Forwarding};
use crate::config::Limits;
use crate::upstream::Upstream;

mod body;
mod conn;
mod head;
mod idle;
mod stream;
mod upgrade;
mod upload;

pub use body::ResponseBody;
pub use idle::{IDLE_TIMEOUT, Idle};
pub use stream::{Stream, connect, connect_within};
pub use upgrade::{Switched, Unanswered, Upgrade, upgrade};

use conn::Conn;
use head::decimal;
use upload::{Sending, Sent, Upload};

/// Largest response head accepted (as for requests).
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 128;
/// How much is read from the upstream at a time.
const READ_CHUNK: usize = 16 * 1024;

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
    mut room: Option<crate::nofile::Counted>,
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
                let connecting =
                    connect_within(tls, &upstream.url, limits.connect_timeout, room.take());
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
            upload: Upload::new(encoded.clone(), body, framing, to_upstream.clone()),
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

#[cfg(test)]
mod tests;
