//! One direction of a WebSocket stream: frames read from one peer and written to the
//! other as they came, header and payload bytes unchanged.
//!
//! The pump looks at each frame header, never re-encodes: it passes data and ping/pong
//! frames on, drops what the drain says to drop, stops at a close frame (the stream's
//! owner decides what follows), and writes frames of Switchyard's own only between
//! frames and never inside a fragmented message. It reads only when everything read so
//! far has been written, so a destination that stops reading stops the source (TCP
//! back-pressure): memory is one read buffer, plus a whole control frame or small text
//! frame when it must look inside one (and up to 4 KiB of a fragmented text message
//! whose fragments it looks inside).
//!
//! Frames read together go on in one write: a pump that falls behind reads many frames at
//! once and then makes one system call for all of them, not one per frame, so it catches
//! up instead of falling further behind.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::frames::{self, FrameError, Header};
use crate::deepgram::{self, ClientMessages, is_type};

/// First read size; doubled while reads fill it, up to `MAX_READ`.
const FIRST_READ: usize = 4 * 1024;
/// The read that waits for a stream's first bytes, on the stack; what it misses of a
/// larger first burst comes with the next read.
const FIRST_WAIT: usize = 1024;
const MAX_READ: usize = 64 * 1024;
/// Largest text message searched for `Flushed` and the like, in one frame or in
/// fragments (Deepgram's control messages are tiny).
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
    /// A `Cleared` message (text), likewise.
    Cleared,
}

/// One direction of a stream.
pub struct Pump {
    /// Client frames are masked; an upstream's are not.
    from_client: bool,
    buf: BytesMut,
    read_size: usize,
    /// Bytes have come from the source: `buf` is allocated from then on.
    started: bool,
    /// Bytes at the front of `buf` to pass on as they are: frames (the last perhaps in
    /// part) that `start` or `gather` let through and are not yet written.
    pass: usize,
    /// Bytes of the current frame (header included) still to pass on or drop, beyond
    /// `pass`.
    left: u64,
    /// Of `left`, header bytes not yet let through: the rest is payload, counted in
    /// `bytes` as it goes (never by the length a header claims).
    header_left: u64,
    /// The current frame's payload counts in `bytes` (a data frame passed on).
    counting: bool,
    skipping: bool,
    /// Frames of Switchyard's own, written at the next frame boundary.
    own: VecDeque<Bytes>,
    /// Frames of Switchyard's own queued so far, and written whole by `poll` so far.
    own_queued: u64,
    own_written: u64,
    /// `counted` when `poll` last wrote a frame of Switchyard's own whole.
    counted_at_own: u64,
    /// A fragmented data message is open at the destination (its first frames were
    /// passed on, its last not yet).
    in_message: bool,
    /// The message open at the destination is binary (audio), not text.
    message_binary: bool,
    /// The source's open message was ended at the destination by Switchyard (`inject`):
    /// its remaining fragments are dropped.
    cut: bool,
    /// A fragmented data message is open at the source (its last frame not yet come),
    /// whether its frames are passed on or dropped.
    source_message: bool,
    /// A binary message began with empty fragments, dropped: its first fragment with data
    /// is passed on as its start, and if none comes the message is never passed on.
    empty_start: bool,
    /// The destination has bytes written and not flushed.
    unflushed: bool,
    /// Drop data frames from here on (client audio after the drain message).
    pub drop_data: bool,
    /// Report `Flushed` and `Cleared` messages (a Speak drain waits for the answer to its
    /// `Flush`).
    pub watch_flushed: bool,
    /// The client's messages looked for in its text frames (passed on or dropped): its
    /// own end, the counted and reset ones, and content that counts when dropped.
    pub watch: ClientMessages,
    /// The client sent `watch.end`: it ended the stream itself.
    pub client_ended: bool,
    /// `watch.counted` messages passed on.
    pub counted: u64,
    /// `counted` when the last `watch.reset` message was passed on.
    pub counted_at_reset: u64,
    /// The text so far of a fragmented text message being looked inside (its fragments
    /// are passed on or dropped as they come; the message is read at its last).
    watched_text: Option<Vec<u8>>,
    /// Payload bytes passed on.
    pub bytes: u64,
    /// Payload bytes of frames let through and not yet written: counted in `bytes` once
    /// `pass` is all written, so a stream that ends first does not count them.
    uncounted: u64,
    /// The client's audio (binary) messages dropped after the drain message or while
    /// Switchyard waited for the answer to its close.
    dropped: u64,
    /// Audio messages from the client whose first frame is let through and has no byte
    /// written yet; dropped if the stream ends first. (A message whose first frame has
    /// begun to go counts as sent, even if the stream ends before the rest.)
    unwritten: u64,
    /// A frame header in `buf` at or before the first of them, when there is one.
    unwritten_at: usize,
    /// Bytes written to the destination, frames of Switchyard's own included: whether it
    /// takes any (`relay`'s stall watch).
    written: u64,
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
            started: false,
            pass: 0,
            left: 0,
            header_left: 0,
            counting: false,
            skipping: false,
            own: VecDeque::new(),
            own_queued: 0,
            own_written: 0,
            counted_at_own: 0,
            in_message: false,
            message_binary: false,
            cut: false,
            source_message: false,
            empty_start: false,
            unflushed: false,
            drop_data: false,
            watch_flushed: false,
            watch: ClientMessages::default(),
            client_ended: false,
            counted: 0,
            counted_at_reset: 0,
            watched_text: None,
            bytes: 0,
            uncounted: 0,
            dropped: 0,
            unwritten: 0,
            unwritten_at: 0,
            written: 0,
            counter,
        }
    }

    /// Whether the last `poll` that returned `Pending` waits to write (or flush) to the
    /// destination, rather than to read: the loop writes all it holds before it reads.
    pub fn is_writing(&self) -> bool {
        self.pass > 0 || self.own_due() || self.unflushed
    }

    /// Bytes written to the destination so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The client's audio messages the upstream never got: dropped after the drain
    /// message, let through but not yet written, or sent while Switchyard waited for the
    /// answer to its close.
    pub fn dropped(&self) -> u64 {
        self.dropped + self.unwritten
    }

    /// Queues a final data frame of Switchyard's own, for after the fragmented message
    /// the destination may be in the middle of. A text message is finished first: its
    /// remaining fragments are passed on even once data is dropped, since half a `Speak`
    /// is not JSON (and may not even be UTF-8). An audio message is ended at once with an
    /// empty last fragment and the rest of it dropped (counted), so that a client
    /// streaming all its audio as one message cannot hold the drain's message back.
    ///
    /// A text message that turns out to be the client's own end (`watch.end`) takes the
    /// frames still queued with it: nothing of Switchyard's follows the client's end.
    pub fn inject(&mut self, frame: Bytes) {
        if self.in_message && self.message_binary {
            self.own
                .push_back(frames::encode(frames::CONTINUATION, &[], self.from_client));
            self.own_queued += 1;
            self.in_message = false;
            self.cut = true;
            // Counted once: a message whose first frame is not written yet is counted in
            // `unwritten` already (it is the latest message begun).
            if self.from_client && self.unwritten == 0 {
                self.dropped += 1;
            }
        }
        self.own.push_back(frame);
        self.own_queued += 1;
    }

    /// How many frames of Switchyard's own were queued so far; once `own_written` reaches
    /// the count read after an `inject`, that frame has gone whole.
    pub fn own_queued(&self) -> u64 {
        self.own_queued
    }

    /// How many frames of Switchyard's own `poll` has written whole.
    pub fn own_written(&self) -> u64 {
        self.own_written
    }

    /// `counted` when the last frame of Switchyard's own went: the messages its answer
    /// comes after (speak's drain `Flush` is answered by the `Flushed` after theirs).
    pub fn counted_at_own(&self) -> u64 {
        self.counted_at_own
    }

    /// Drops the frames of Switchyard's own still queued (the destination has closed:
    /// no data may follow).
    pub fn discard_own(&mut self) {
        self.own.clear();
    }

    /// The next queued frame of Switchyard's own, to write outside `poll` as the stream
    /// ends. A fragmented message the source never finished is ended first with an empty
    /// last fragment: nothing else can come before the frame inside it.
    pub fn take_own(&mut self) -> Option<Bytes> {
        if self.in_message && !self.own.is_empty() {
            self.in_message = false;
            return Some(frames::encode(frames::CONTINUATION, &[], self.from_client));
        }
        self.own.pop_front()
    }

    /// Whether the next frame of Switchyard's own goes now: at a frame boundary and
    /// outside a fragmented message.
    fn own_due(&self) -> bool {
        !self.own.is_empty() && self.at_boundary() && !self.in_message
    }

    /// Whether a frame of Switchyard's own could be written now without landing inside
    /// one being passed on, or before frames already let through. (A close may go between
    /// the fragments of a message; a data frame also waits for the message's end.)
    pub fn at_boundary(&self) -> bool {
        self.pass == 0 && (self.left == 0 || self.skipping)
    }

    /// Passes frames from `src` to `dst` until something stops it.
    pub fn poll<S, D>(&mut self, cx: &mut Context<'_>, src: &mut S, dst: &mut D) -> Poll<Event>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        loop {
            self.gather();
            if self.pass > 0 {
                if let Err(why) = ready!(self.poll_write_pass(cx, dst)) {
                    return Poll::Ready(Event::DestinationLost(why));
                }
                continue;
            }
            // Nothing is let through and unwritten: the front of `buf` is the next byte.
            if self.left > 0 && self.skipping && !self.buf.is_empty() {
                self.skip_buffered();
                continue;
            }
            // Frames of Switchyard's own go between frames, or while one is being dropped
            // (none of its bytes reach the destination), and between messages.
            if self.own_due()
                && let Some(front) = self.own.front_mut()
            {
                match ready!(Pin::new(&mut *dst).poll_write(cx, front)) {
                    Ok(0) => {
                        return Poll::Ready(Event::DestinationLost("wrote zero bytes".into()));
                    }
                    Ok(written) => {
                        self.written += written as u64;
                        front.advance(written);
                        if front.is_empty() {
                            self.own.pop_front();
                            self.own_written += 1;
                            self.counted_at_own = self.counted;
                        }
                        self.unflushed = true;
                    }
                    Err(e) => return Poll::Ready(Event::DestinationLost(e.to_string())),
                }
                continue;
            }
            if self.left == 0 {
                match frames::parse(&self.buf, self.from_client) {
                    Err(e) => return Poll::Ready(Event::Protocol(e)),
                    Ok(Some(header)) => {
                        if let Err(e) = self.in_sequence(&header) {
                            return Poll::Ready(Event::Protocol(e));
                        }
                        match self.start(header) {
                            Start::Next => continue,
                            Start::Event(event) => return Poll::Ready(event),
                            Start::NeedWhole => {}
                        }
                    }
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

    /// Lets through what is buffered beyond `pass` of the frame being passed on, and of
    /// the frames after it that go on as they are. Stops at anything that must be at the
    /// front of the buffer to be handled (a close, a frame to drop or to look inside, a
    /// header not yet whole or not valid) and where frames of Switchyard's own are due.
    fn gather(&mut self) {
        loop {
            self.gather_frame();
            if self.left > 0 || !self.own.is_empty() {
                return;
            }
            match frames::parse(&self.buf[self.pass..], self.from_client) {
                Ok(Some(header))
                    if header.opcode != frames::CLOSE
                        && self.in_sequence(&header).is_ok()
                        && !self.drops(&header)
                        && !self.watches(&header) =>
                {
                    // A fragment not looked inside: its message is no longer read whole.
                    if header.opcode == frames::CONTINUATION {
                        self.watched_text = None;
                    }
                    self.pass_on(&header);
                }
                _ => return,
            }
        }
    }

    /// Lets through what is buffered beyond `pass` of the frame being passed on.
    fn gather_frame(&mut self) {
        if self.left == 0 || self.skipping {
            return;
        }
        let buffered = self.buf.len() - self.pass;
        let n = buffered.min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.pass += n;
        self.left -= n as u64;
        let header = (n as u64).min(self.header_left);
        self.header_left -= header;
        if self.counting {
            self.uncounted += n as u64 - header;
        }
    }

    /// Writes what was let through, or some of it; the error says why the destination
    /// took none.
    fn poll_write_pass<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
    ) -> Poll<Result<(), String>> {
        match ready!(Pin::new(dst).poll_write(cx, &self.buf[..self.pass])) {
            Ok(0) => Poll::Ready(Err("wrote zero bytes".into())),
            Ok(written) => {
                self.written += written as u64;
                self.written_in_pass(written);
                self.buf.advance(written);
                self.pass -= written;
                self.unflushed = true;
                if self.pass == 0 {
                    self.bytes += self.uncounted;
                    self.counter.inc_by(self.uncounted);
                    self.uncounted = 0;
                    self.unwritten = 0;
                }
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(e.to_string())),
        }
    }

    /// Takes the pump to a frame boundary, for a close of Switchyard's own to follow:
    /// writes what was let through, then passes on the rest of the frame being passed as
    /// it comes, but starts no new frame. `false` if the source ended or either side
    /// failed first (the close then cannot go).
    pub fn poll_boundary<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
    ) -> Poll<bool>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        loop {
            self.gather_frame();
            if self.pass > 0 {
                if ready!(self.poll_write_pass(cx, dst)).is_err() {
                    return Poll::Ready(false);
                }
                continue;
            }
            if self.unflushed {
                if ready!(Pin::new(&mut *dst).poll_flush(cx)).is_err() {
                    return Poll::Ready(false);
                }
                self.unflushed = false;
            }
            if self.at_boundary() {
                return Poll::Ready(true);
            }
            match ready!(self.poll_fill(cx, src)) {
                Ok(n) if n > 0 => {}
                _ => return Poll::Ready(false),
            }
        }
    }

    /// Whether a data frame fits the source's messages so far: a continuation only inside
    /// a fragmented message, a new message only outside one (RFC 6455 §5.4).
    fn in_sequence(&self, header: &Header) -> Result<(), FrameError> {
        let continues = header.opcode == frames::CONTINUATION;
        if header.is_control() || continues == self.source_message {
            Ok(())
        } else {
            Err(FrameError::Sequence)
        }
    }

    /// Whether a frame is dropped rather than passed on.
    fn drops(&self, header: &Header) -> bool {
        if header.is_control() {
            return false;
        }
        // Deepgram reads an empty binary frame as the end of the audio, so Switchyard never
        // passes one on, either way; nor the empty fragments a binary message starts with.
        let empty_binary = header.len == 0
            && (header.opcode == frames::BINARY
                || (header.opcode == frames::CONTINUATION && self.empty_start));
        // A message the destination has begun goes on to its end, unless Switchyard ended
        // it (see `inject`).
        let continues = header.opcode == frames::CONTINUATION;
        let finishes = continues && self.in_message;
        (self.drop_data && !finishes) || (continues && self.cut) || empty_binary
    }

    /// Whether a frame is looked inside: for `Flushed` and `Cleared`, or for the client's
    /// messages in `watch`. A text message may come
    /// in fragments: each is looked inside, and the message read at its last.
    fn watches(&self, header: &Header) -> bool {
        let text = match header.opcode {
            frames::TEXT => true,
            frames::CONTINUATION => self.watched_text.is_some(),
            _ => false,
        };
        text && header.len <= MAX_WATCHED && (self.watch_flushed || self.watch.any())
    }

    /// The text of the watched message `header`'s frame ends, if it ends one: the frame's
    /// own, or its fragments' gathered. A fragment that does not end its message is kept.
    fn watched_message(&mut self, header: &Header) -> Option<Vec<u8>> {
        let frame = &self.buf[..header.size + header.len as usize];
        let payload = frames::payload(header, frame);
        let text = match self.watched_text.take() {
            // A continuation: the message so far, unless this makes it too long to read.
            Some(mut text) => {
                if (text.len() + payload.len()) as u64 > MAX_WATCHED {
                    return None;
                }
                text.extend_from_slice(&payload);
                text
            }
            None => payload,
        };
        if header.fin {
            Some(text)
        } else {
            self.watched_text = Some(text);
            None
        }
    }

    /// Starts passing a frame on.
    fn pass_on(&mut self, header: &Header) {
        let starts_audio = header.opcode == frames::BINARY
            || (header.opcode == frames::CONTINUATION && self.empty_start);
        if starts_audio && self.from_client {
            if self.unwritten == 0 {
                self.unwritten_at = self.pass;
            }
            self.unwritten += 1;
        }
        if starts_audio || header.opcode == frames::TEXT {
            self.message_binary = starts_audio;
        }
        if header.opcode == frames::CONTINUATION && self.empty_start {
            // The message's empty start was dropped, so this fragment opens it: same FIN
            // and reserved bits, binary opcode. The frame starts at `pass` (its header was
            // parsed there).
            let first = &mut self.buf[self.pass];
            *first = (*first & 0xF0) | frames::BINARY;
            self.empty_start = false;
        }
        self.skipping = false;
        self.left = header.wire_len();
        self.header_left = header.size as u64;
        self.counting = !header.is_control();
        if self.counting {
            self.in_message = !header.fin;
            self.source_message = !header.fin;
        }
    }

    /// Books `written` bytes from the front of `pass` as gone: the messages that start in
    /// them are no longer unwritten. `pass` is a run of whole frames (the last perhaps in
    /// part), so the frames after the first unwritten start are found by their headers.
    fn written_in_pass(&mut self, written: usize) {
        if written >= self.pass {
            self.unwritten = 0;
            return;
        }
        let mut at = self.unwritten_at;
        while self.unwritten > 0 && at < written {
            let Ok(Some(header)) = frames::parse(&self.buf[at..self.pass], self.from_client) else {
                break;
            };
            // An empty start passed on was rewritten to a binary frame in the buffer.
            if header.opcode == frames::BINARY {
                self.unwritten -= 1;
            }
            at = at.saturating_add(usize::try_from(header.wire_len()).unwrap_or(usize::MAX));
        }
        self.unwritten_at = at.saturating_sub(written);
    }

    /// Decides what to do with the frame whose header starts the buffer.
    fn start(&mut self, header: Header) -> Start {
        let wire = header.wire_len();
        let whole = self.buf.len() as u64 >= wire;
        if header.opcode == frames::CLOSE {
            if !whole {
                return Start::NeedWhole;
            }
            let frame = self
                .buf
                .split_to(header.size + header.len as usize)
                .freeze();
            let payload = frames::payload(&header, &frame);
            if let Err(e) = frames::check_close(&payload) {
                return Start::Event(Event::Protocol(e));
            }
            let code = frames::close_code(&payload);
            return Start::Event(Event::Close { code, frame });
        }
        let watched = self.watches(&header);
        if watched && !whole {
            return Start::NeedWhole;
        }
        if !watched && header.opcode == frames::CONTINUATION {
            self.watched_text = None;
        }
        let mut flushed = false;
        let mut cleared = false;
        let mut counts = false;
        let mut resets = false;
        let mut content = false;
        if let Some(text) = watched.then(|| self.watched_message(&header)).flatten() {
            let is = |name: Option<&str>| name.is_some_and(|name| is_type(&text, name));
            flushed = self.watch_flushed && is_type(&text, deepgram::FLUSHED);
            cleared = self.watch_flushed && is_type(&text, deepgram::CLEARED);
            if is(self.watch.end) {
                self.client_ended = true;
                self.own.clear();
            }
            counts = is(self.watch.counted);
            resets = is(self.watch.reset);
            content = self.drop_data && is(self.watch.content);
        }
        if self.drops(&header) {
            // Counted are the client's audio messages that the upstream never gets: after
            // the drain message each one at its first frame; an empty binary message at
            // its last (one that starts empty may yet carry data), or at its first data
            // if that comes after the drain message. Text (`KeepAlive`, the client's own
            // `CloseStream`) is dropped but is not audio, except `watch.content` (speak's
            // `Speak`).
            let first_data =
                header.opcode == frames::CONTINUATION && self.empty_start && header.len > 0;
            let unsent = if self.drop_data {
                header.opcode == frames::BINARY || content || first_data
            } else {
                header.fin
            };
            if unsent && self.from_client {
                self.dropped += 1;
            }
            if !self.drop_data {
                // Still nothing of this message has gone on; after its last fragment,
                // nothing ever will.
                self.empty_start = !header.fin;
            } else if header.fin || first_data {
                self.empty_start = false;
            }
            if header.fin {
                self.cut = false;
            }
            // `in_message` stays as the destination saw it: a skipped fragment opens
            // nothing there.
            if !header.is_control() {
                self.source_message = !header.fin;
            }
            self.left = wire;
            self.skipping = true;
            return Start::Next;
        }
        self.pass_on(&header);
        self.counted += u64::from(counts);
        if resets {
            self.counted_at_reset = self.counted;
        }
        if flushed {
            return Start::Event(Event::Flushed);
        }
        if cleared {
            return Start::Event(Event::Cleared);
        }
        Start::Next
    }

    /// How much of the buffer belongs to the current frame.
    fn buffered_of_frame(&self) -> usize {
        self.buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX))
    }

    /// Drops what is buffered of the current frame.
    fn skip_buffered(&mut self) {
        let n = self.buffered_of_frame();
        self.buf.advance(n);
        self.left -= n as u64;
    }

    /// Reads more of the source into the buffer; 0 means it ended.
    fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
    ) -> Poll<std::io::Result<usize>> {
        if !self.started {
            // Nothing has come yet: wait for it on the stack, so that a stream that stays
            // idle holds no read buffer (run.sh idle: 4 KiB a direction).
            let mut first = [0u8; FIRST_WAIT];
            let mut read = ReadBuf::new(&mut first);
            ready!(Pin::new(src).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n > 0 {
                self.started = true;
                self.buf.reserve(self.read_size);
                self.buf.extend_from_slice(read.filled());
            }
            return Poll::Ready(Ok(n));
        }
        let spare = self.buf.capacity() - self.buf.len();
        if spare < 1024 {
            self.buf.reserve(self.read_size);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let Poll::Ready(read) = poll_read_buf(Pin::new(src), cx, &mut self.buf) else {
            // Everything read is written and the source has paused: a buffer grown for a
            // burst (synthesized speech comes in bursts) goes, so that a quiet stream holds
            // none of it. One that never grew is kept: it saves an allocation per frame.
            if self.buf.is_empty() && self.read_size > FIRST_READ {
                self.buf = BytesMut::new();
                self.read_size = FIRST_READ;
            }
            return Poll::Pending;
        };
        let n = read?;
        if n == spare && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Reads frames from `src` and drops them until a close frame or the end (the peer's
    /// answer to a close Switchyard sent). The client's audio messages among them count
    /// as dropped.
    pub async fn until_close<S: AsyncRead + Unpin>(&mut self, src: &mut S) {
        // What was let through and not written goes nowhere now.
        self.buf.advance(self.pass);
        self.pass = 0;
        self.uncounted = 0;
        std::future::poll_fn(|cx| {
            loop {
                if self.left > 0 && !self.buf.is_empty() {
                    self.skip_buffered();
                    continue;
                }
                if self.left == 0 {
                    match frames::parse(&self.buf, self.from_client) {
                        Err(_) => return Poll::Ready(()),
                        Ok(Some(header)) if header.opcode == frames::CLOSE => {
                            return Poll::Ready(());
                        }
                        Ok(Some(header)) => {
                            if self.from_client && header.opcode == frames::BINARY {
                                self.dropped += 1;
                            }
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

#[cfg(test)]
mod tests;
