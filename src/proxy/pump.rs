//! One direction of a WebSocket stream: frames read from one peer and written to the
//! other as they came, header and payload bytes unchanged.
//!
//! The pump looks at each frame header, never re-encodes: it passes data and ping/pong
//! frames on, drops what the drain says to drop, stops at a close frame (the stream's
//! owner decides what follows), and writes frames of Switchyard's own only between
//! frames and never inside a fragmented message. It reads only when everything read so
//! far has been written, so a destination that stops reading stops the source (TCP
//! back-pressure): memory is one read buffer, plus a whole control frame or small text
//! frame when it must look inside one.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use super::frames::{self, FrameError, Header};

/// First read size; doubled while reads fill it, up to `MAX_READ`.
const FIRST_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;
/// Largest text frame searched for `Flushed` (Deepgram's control messages are tiny).
const MAX_WATCHED: u64 = 4 * 1024;

/// What stops a pump.
#[derive(Debug)]
pub enum Event {
    /// A close frame arrived: its code, and the frame as it came (it is not passed on).
    Close { code: Option<u16>, frame: Bytes },
    /// The source ended without a close frame.
    Ended,
    /// Reading the source failed.
    SourceLost(String),
    /// The source broke the WebSocket protocol.
    Protocol(FrameError),
    /// Writing to the destination failed.
    DestinationLost(String),
    /// A `Flushed` message (text) is being passed on; the pump goes on when polled again.
    Flushed,
}

/// One direction of a stream.
pub struct Pump {
    /// Client frames are masked; an upstream's are not.
    from_client: bool,
    buf: BytesMut,
    read_size: usize,
    /// Bytes of the current frame (header included) still to pass on or drop.
    left: u64,
    skipping: bool,
    /// Frames of Switchyard's own, written at the next frame boundary.
    own: VecDeque<Bytes>,
    /// A fragmented data message is open (its last frame not yet seen).
    in_message: bool,
    /// The destination has bytes written and not flushed.
    unflushed: bool,
    /// Drop data frames from here on (client audio after the drain message).
    pub drop_data: bool,
    /// Report `Flushed` messages (a Speak drain waits for one).
    pub watch_flushed: bool,
    /// Payload bytes passed on.
    pub bytes: u64,
    /// Data messages dropped.
    pub dropped: u64,
    counter: IntCounter,
}

impl Pump {
    /// A pump for frames from the client (`from_client`) or from the upstream; `counter`
    /// counts the payload bytes it passes on.
    pub fn new(from_client: bool, counter: IntCounter) -> Pump {
        Pump {
            from_client,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            left: 0,
            skipping: false,
            own: VecDeque::new(),
            in_message: false,
            unflushed: false,
            drop_data: false,
            watch_flushed: false,
            bytes: 0,
            dropped: 0,
            counter,
        }
    }

    /// Queues a final data frame of Switchyard's own, closing an open fragmented message
    /// first with an empty last fragment.
    pub fn inject(&mut self, frame: Bytes) {
        if self.in_message {
            self.own
                .push_back(frames::encode(frames::CONTINUATION, &[], self.from_client));
            self.in_message = false;
        }
        self.own.push_back(frame);
    }

    /// The next queued frame of Switchyard's own, to write outside `poll`.
    pub fn take_own(&mut self) -> Option<Bytes> {
        self.own.pop_front()
    }

    /// Whether a frame of Switchyard's own could be written now without landing inside
    /// one being passed on.
    pub fn at_boundary(&self) -> bool {
        self.left == 0 || self.skipping
    }

    /// Passes frames from `src` to `dst` until something stops it.
    pub fn poll<S, D>(&mut self, cx: &mut Context<'_>, src: &mut S, dst: &mut D) -> Poll<Event>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        loop {
            if self.left > 0 && !self.buf.is_empty() {
                let n = self
                    .buf
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                if self.skipping {
                    self.buf.advance(n);
                    self.left -= n as u64;
                    continue;
                }
                match ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[..n])) {
                    Ok(0) => return Poll::Ready(Event::DestinationLost("wrote zero bytes".into())),
                    Ok(written) => {
                        self.buf.advance(written);
                        self.left -= written as u64;
                        self.unflushed = true;
                    }
                    Err(e) => return Poll::Ready(Event::DestinationLost(e.to_string())),
                }
                continue;
            }
            if self.left == 0 {
                if let Some(front) = self.own.front_mut() {
                    match ready!(Pin::new(&mut *dst).poll_write(cx, front)) {
                        Ok(0) => {
                            return Poll::Ready(Event::DestinationLost("wrote zero bytes".into()));
                        }
                        Ok(written) => {
                            front.advance(written);
                            if front.is_empty() {
                                self.own.pop_front();
                            }
                            self.unflushed = true;
                        }
                        Err(e) => return Poll::Ready(Event::DestinationLost(e.to_string())),
                    }
                    continue;
                }
                match frames::parse(&self.buf, self.from_client) {
                    Err(e) => return Poll::Ready(Event::Protocol(e)),
                    Ok(Some(header)) => match self.start(header) {
                        Start::Next => continue,
                        Start::Event(event) => return Poll::Ready(event),
                        Start::NeedWhole => {}
                    },
                    Ok(None) => {}
                }
            }
            // Everything read is written: flush, then read more.
            if self.unflushed {
                if let Err(e) = ready!(Pin::new(&mut *dst).poll_flush(cx)) {
                    return Poll::Ready(Event::DestinationLost(e.to_string()));
                }
                self.unflushed = false;
            }
            match ready!(self.poll_fill(cx, src)) {
                Ok(0) => return Poll::Ready(Event::Ended),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Event::SourceLost(e.to_string())),
            }
        }
    }

    /// Decides what to do with the frame whose header starts the buffer.
    fn start(&mut self, header: Header) -> Start {
        let wire = header.wire_len();
        let whole = self.buf.len() as u64 >= wire;
        let data = !header.is_control();
        if header.opcode == frames::CLOSE {
            if !whole {
                return Start::NeedWhole;
            }
            let frame = self
                .buf
                .split_to(header.size + header.len as usize)
                .freeze();
            let code = frames::close_code(&frames::payload(&header, &frame));
            return Start::Event(Event::Close { code, frame });
        }
        let starts_message = header.opcode != frames::CONTINUATION && data;
        // Deepgram reads an empty binary frame as the end of the audio: only Switchyard
        // ends a stream on a client's behalf, so those are dropped.
        let empty_binary =
            self.from_client && header.opcode == frames::BINARY && header.fin && header.len == 0;
        if data && (self.drop_data || empty_binary) {
            if starts_message {
                self.dropped += 1;
            }
            self.in_message = !header.fin;
            self.left = wire;
            self.skipping = true;
            return Start::Next;
        }
        let watched = self.watch_flushed
            && header.opcode == frames::TEXT
            && header.fin
            && header.len <= MAX_WATCHED;
        if watched && !whole {
            return Start::NeedWhole;
        }
        let flushed = watched
            && super::websocket::is_type(
                &self.buf[header.size..header.size + header.len as usize],
                "Flushed",
            );
        self.skipping = false;
        self.left = wire;
        if data {
            self.in_message = !header.fin;
            self.bytes += header.len;
            self.counter.inc_by(header.len);
        }
        if flushed {
            return Start::Event(Event::Flushed);
        }
        Start::Next
    }

    /// Reads more of the source into the buffer; 0 means it ended.
    fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
    ) -> Poll<std::io::Result<usize>> {
        let spare = self.buf.capacity() - self.buf.len();
        if spare < 1024 {
            self.buf.reserve(self.read_size);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = ready!(poll_read_buf(Pin::new(src), cx, &mut self.buf))?;
        if n == spare && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Reads frames from `src` and drops them until a close frame or the end (the peer's
    /// answer to a close Switchyard sent).
    pub async fn until_close<S: AsyncRead + Unpin>(&mut self, src: &mut S) {
        std::future::poll_fn(|cx| {
            loop {
                if self.left > 0 && !self.buf.is_empty() {
                    let n = self
                        .buf
                        .len()
                        .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    self.buf.advance(n);
                    self.left -= n as u64;
                    continue;
                }
                if self.left == 0 {
                    match frames::parse(&self.buf, self.from_client) {
                        Err(_) => return Poll::Ready(()),
                        Ok(Some(header)) if header.opcode == frames::CLOSE => {
                            return Poll::Ready(());
                        }
                        Ok(Some(header)) => {
                            self.left = header.wire_len();
                            continue;
                        }
                        Ok(None) => {}
                    }
                }
                match ready!(self.poll_fill(cx, src)) {
                    Ok(n) if n > 0 => {}
                    _ => return Poll::Ready(()),
                }
            }
        })
        .await;
    }
}

/// What a frame header leads to.
enum Start {
    /// Pass it on or drop it (`left` and `skipping` say which).
    Next,
    /// Wait until the whole frame is buffered.
    NeedWhole,
    Event(Event),
}

/// Writes one frame of Switchyard's own and flushes it, within `wait`.
pub async fn send<D: AsyncWrite + Unpin>(dst: &mut D, frame: &[u8], wait: Duration) -> bool {
    let sent = tokio::time::timeout(wait, async {
        dst.write_all(frame).await?;
        dst.flush().await
    });
    matches!(sent.await, Ok(Ok(())))
}
