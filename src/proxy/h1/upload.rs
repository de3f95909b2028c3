//! Sending one request on one connection: the head and the client's body written as the
//! upstream takes them (`Upload`), while an answer that comes early is watched for, then
//! the answer's head read (`Sending`). The answer's body is `body`'s.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Response};
use hyper::body::{Body, Incoming};
use prometheus::IntCounter;
use tokio::io::AsyncWrite;

use super::conn::Conn;
use super::head::{Head, early_answer, keeps_alive};
use super::{Framing, MAX_HEAD, READ_CHUNK, ResponseBody, Stream};
use crate::config::Limits;
use crate::proxy::stall::{self, StallTimer};
use crate::upstream::Upstream;

/// How long a client may take to end a request stream whose body was sent in full (an
/// HTTP/2 END_STREAM in a frame of its own) once the answer is complete.
const CLIENT_END_WAIT: Duration = Duration::from_secs(5);

/// Why sending failed.
#[derive(Debug)]
pub(super) enum Sent {
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

/// What is still to be written of a request: the encoded head and framing, then the
/// client's body.
pub(super) struct Upload {
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
    /// The request to send: its encoded head, then `body` framed as `framing`, counted in
    /// `to_upstream` as it goes.
    pub(super) fn new(
        head: Bytes,
        body: Incoming,
        framing: Framing,
        to_upstream: IntCounter,
    ) -> Upload {
        Upload {
            queue: VecDeque::from([head]),
            body: Some(body),
            framing,
            body_read: false,
            written: false,
            unflushed: false,
            sent: 0,
            wrote: 0,
            upstream_full: false,
            to_upstream,
        }
    }

    /// Bytes written to the upstream so far.
    pub(super) fn wrote(&self) -> u64 {
        self.wrote
    }

    /// Whether the last write waited on the upstream (a full socket), not on the client.
    pub(super) fn waits_on_upstream(&self) -> bool {
        self.upstream_full
    }

    /// Whether the request carries a body.
    fn has_body(&self) -> bool {
        self.framing != Framing::Empty
    }

    /// Whether the upstream has the whole request, its declared length all written,
    /// though the client's body has not yet said it ended.
    pub(super) fn sent_in_full(&self) -> bool {
        matches!(self.framing, Framing::Length(declared) if self.sent == declared)
            && self.queue.is_empty()
            && !self.unflushed
    }

    /// Reads the client's end of stream, still to come after a body sent in full, in a
    /// task of its own for at most `CLIENT_END_WAIT`. Dropped at once instead, an HTTP/2
    /// request stream is reset (NO_ERROR), which some clients take as a failure of the
    /// answer they already have. More data than declared ends the wait.
    pub(super) fn await_client_end(self) {
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
    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut Stream,
    ) -> Poll<Result<(), Sent>> {
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
pub(super) struct Sending {
    pub(super) conn: Conn,
    pub(super) upload: Upload,
}

impl Sending {
    /// Sends the request and reads the answer's head. On failure the body comes back if
    /// the request may be sent again.
    pub(super) async fn run(
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
                    .reset(stall::deadline_after(response_timeout));
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
