//! `ResponseBody`: an upstream's response body, decoded from its framing as the client's
//! connection polls it, and the connection given back to `idle` when the body ends cleanly.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};

use super::conn::Conn;
use super::upload::{Sent, Upload};
use super::{Framing, MAX_HEADERS, READ_CHUNK};
use crate::upstream::Upstream;

/// Longest chunk-size line or trailer section of a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Where a response body is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decode {
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
    /// The body that follows a head framed as `framing` on `conn`; the connection goes
    /// back to `home` at the end if it may be kept, and `upload` is the rest of a request
    /// the upstream answered early.
    pub(super) fn new(
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
        self.upload.as_ref().is_some_and(|u| !u.waits_on_upstream())
    }

    /// Sends more of a request the upstream already answered; an upload that cannot go on
    /// is given up (the connection is then not kept) unless the connection broke.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        let (Some(upload), Some(conn)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return Ok(());
        };
        let polled = upload.poll_write(cx, &mut conn.io);
        self.uploaded = upload.wrote();
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
pub(super) fn step(
    decode: &mut Decode,
    buf: &mut BytesMut,
) -> Result<(Option<Frame<Bytes>>, bool), String> {
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
