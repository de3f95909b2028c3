//! `Conn`: an upstream connection with its read buffer, and reading a response head from
//! it. Parsing the head is `head`'s; keeping the connection between exchanges, `idle`'s.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use http::{Method, Response};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::head::{Head, parse_head};
use super::{Framing, MAX_HEAD, Stream};

/// An upstream connection and what has been read from it and not yet used.
pub(super) struct Conn {
    pub(super) io: Stream,
    /// Read from `io` and not yet used: the rest of a head, or body bytes.
    pub(super) buf: BytesMut,
    /// Whether it was taken from `Idle`: then a failure before any answer may be the
    /// upstream's close of an idle connection, crossing the request.
    pub(super) reused: bool,
    /// The trust a TLS connection was verified with; `None` for plain TCP.
    pub(super) trust: Option<Arc<rustls::ClientConfig>>,
}

impl Conn {
    /// A connection just opened.
    pub(super) fn new(io: Stream, trust: Option<Arc<rustls::ClientConfig>>) -> Conn {
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
    pub(super) fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    /// Reads more into the buffer, room for `chunk` bytes made when less than a quarter of
    /// that is left; 0 means the upstream closed.
    pub(super) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < chunk / 4 {
            self.buf.reserve(chunk);
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Reads the answer's head (a 101 taken as one when the request asked to `upgrade`),
    /// `chunk` bytes at a time.
    pub(super) async fn read_head(
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
