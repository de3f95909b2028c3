//! The upstream half of a WebSocket handshake: the upgrade request, its answer, and the
//! upgraded connection (`Switched`). Relaying frames is `proxy::pump`'s.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::uri::Authority;
use http::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::conn::Conn;
use super::head::Head;
use super::{Framing, RequestHead, ResponseBody, Stream, encode_head};

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
