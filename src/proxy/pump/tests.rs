//! Unit tests of `Pump` over in-memory pipes: frames passed on byte for byte, injected
//! drain messages at frame boundaries, protocol breaks, and what is counted as relayed or
//! dropped.

use super::*;
use tokio::io::{AsyncReadExt, DuplexStream, duplex};

fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = frames::encode(opcode, payload, true).to_vec();
    if !fin {
        frame[0] &= 0x7F;
    }
    frame
}

/// A client-side pump with its two peers' far ends: bytes go in at `client`, come out
/// at `upstream`.
fn client_pump() -> (Pump, DuplexStream, DuplexStream, DuplexStream, DuplexStream) {
    let (client, src) = duplex(1 << 16);
    let (dst, upstream) = duplex(1 << 16);
    let counter = IntCounter::new("t", "t").expect("counter");
    (Pump::new(true, counter), client, src, dst, upstream)
}

/// Polls the pump until it stops or would wait.
async fn run(pump: &mut Pump, src: &mut DuplexStream, dst: &mut DuplexStream) -> Option<Event> {
    std::future::poll_fn(|cx| match pump.poll(cx, src, dst) {
        Poll::Ready(event) => Poll::Ready(Some(event)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// `n` bytes from `peer`; a test that expected more than came fails instead of hanging.
async fn read_exactly(peer: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut out))
        .await
        .expect("the bytes came in time")
        .expect("bytes");
    out
}

/// What a stream does to its client's pump at the drain deadline: queues the drain
/// message and drops the client's data from then on.
fn deadline(pump: &mut Pump, message: &[u8]) {
    pump.inject(frames::encode(frames::TEXT, message, true));
    pump.drop_data = true;
}

/// Ends the pump's side of the pipe and checks that nothing more came out of the far end.
async fn nothing_more_reaches(dst: DuplexStream, peer: &mut DuplexStream) {
    drop(dst);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut rest))
        .await
        .expect("the end came in time")
        .expect("read");
    assert!(rest.is_empty(), "nothing more was to come: {rest:?}");
}

#[tokio::test]
async fn frames_pass_byte_for_byte_and_empty_binary_frames_are_dropped() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let audio = masked(frames::BINARY, true, &[1, 2, 3]);
    let empty = masked(frames::BINARY, true, &[]);
    let ping = masked(frames::PING, true, b"hi");
    let mut wire = audio.clone();
    wire.extend_from_slice(&empty);
    wire.extend_from_slice(&ping);
    client.write_all(&wire).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let mut expected = audio.clone();
    expected.extend_from_slice(&ping);
    assert_eq!(read_exactly(&mut upstream, expected.len()).await, expected);
    assert_eq!((pump.bytes, pump.dropped), (3, 1));
}

/// A binary message made of empty fragments is an empty binary message: never passed
/// on. One that starts empty and then carries data is passed on from its first
/// fragment with data, which opens it as binary.
#[tokio::test]
async fn a_binary_message_that_starts_empty_is_passed_on_from_its_first_data() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let (ping, first, last) = (
        masked(frames::PING, true, b"hi"),
        masked(frames::CONTINUATION, false, &[1, 2, 3]),
        masked(frames::CONTINUATION, true, &[4, 5]),
    );
    let mut wire = masked(frames::BINARY, false, &[]);
    wire.extend(masked(frames::CONTINUATION, true, &[]));
    wire.extend(masked(frames::BINARY, false, &[]));
    wire.extend(masked(frames::CONTINUATION, false, &[]));
    for frame in [&ping, &first, &last] {
        wire.extend_from_slice(frame);
    }
    client.write_all(&wire).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let mut opened = first.clone();
    opened[0] = frames::BINARY; // FIN clear, binary
    let expected = [ping, opened, last].concat();
    assert_eq!(read_exactly(&mut upstream, expected.len()).await, expected);
    assert_eq!((pump.bytes, pump.dropped), (5, 1));
    // The upstream's side too, unmasked and read in pieces.
    let (upstream_side, mut up_src) = duplex(1 << 16);
    let (mut up_dst, mut to_client) = duplex(1 << 16);
    let mut from_upstream = Pump::new(false, IntCounter::new("u", "u").expect("counter"));
    let mut upstream_side = upstream_side;
    let mut wire = frames::encode(frames::BINARY, &[], false).to_vec();
    wire[0] &= 0x7F;
    let mut last = frames::encode(frames::CONTINUATION, &[9], false).to_vec();
    last[0] |= 0x80;
    for piece in [&wire[..1], &wire[1..], &last[..]] {
        upstream_side.write_all(piece).await.expect("write");
        assert!(
            run(&mut from_upstream, &mut up_src, &mut up_dst)
                .await
                .is_none()
        );
    }
    let expected = frames::encode(frames::BINARY, &[9], false);
    assert_eq!(
        read_exactly(&mut to_client, expected.len()).await,
        expected.to_vec()
    );
}

/// A destination that keeps each write apart, to count the system calls a socket
/// would see, and takes at most `room` bytes before it fails.
struct Writes {
    writes: Vec<Vec<u8>>,
    room: usize,
}

impl AsyncWrite for Writes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.room == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        self.writes.push(buf[..n].to_vec());
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn an_idle_stream_holds_no_read_buffer_until_bytes_come() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(pump.buf.capacity(), 0, "nothing came: nothing allocated");
    // A first burst larger than the stack read arrives whole.
    let audio = masked(frames::BINARY, true, &[7; 3000]);
    client.write_all(&audio).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(read_exactly(&mut upstream, audio.len()).await, audio);
    assert!(pump.buf.capacity() > 0);
    assert_eq!(pump.bytes, 3000);
}

/// A burst grows the read buffer; once the source pauses with everything written, the
/// grown buffer goes, and the next bytes start again at the first read size.
#[tokio::test]
async fn a_buffer_grown_for_a_burst_goes_when_the_source_pauses() {
    // Pipes that hold the whole burst: the pump reads and writes it without waiting.
    let (mut client, mut src) = duplex(1 << 18);
    let (mut dst, mut upstream) = duplex(1 << 18);
    let counter = IntCounter::new("t", "t").expect("counter");
    let mut pump = Pump::new(true, counter);
    let burst: Vec<u8> = (0..40)
        .flat_map(|_| masked(frames::BINARY, true, &[5; 4000]))
        .collect();
    client.write_all(&burst).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(read_exactly(&mut upstream, burst.len()).await, burst);
    assert_eq!(pump.bytes, 160_000);
    assert_eq!(pump.buf.capacity(), 0, "the burst's buffer is let go");
    assert_eq!(pump.read_size, FIRST_READ);
    // A small frame afterwards is read into a buffer of the first size, which stays.
    let audio = masked(frames::BINARY, true, &[9; 100]);
    client.write_all(&audio).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(read_exactly(&mut upstream, audio.len()).await, audio);
    assert!(
        (1..=FIRST_READ).contains(&pump.buf.capacity()),
        "{}",
        pump.buf.capacity()
    );
}

#[tokio::test]
async fn frames_read_together_go_on_in_one_write() {
    let (mut client, mut src) = duplex(1 << 16);
    let mut pump = Pump::new(true, IntCounter::new("t", "t").expect("counter"));
    let mut wire = masked(frames::BINARY, true, &[1; 640]);
    wire.extend_from_slice(&masked(frames::PING, true, b"p"));
    wire.extend_from_slice(&masked(frames::TEXT, false, b"frag"));
    wire.extend_from_slice(&masked(frames::CONTINUATION, true, b"ment"));
    // The start of one more frame: its bytes go on with the others as far as they came,
    // and count as far as they came (6 header bytes, then 44 of its 100).
    let last = masked(frames::BINARY, true, &[2; 100]);
    wire.extend_from_slice(&last[..50]);
    client.write_all(&wire).await.expect("write");
    let mut dst = Writes {
        writes: Vec::new(),
        room: usize::MAX,
    };
    let ran = std::future::poll_fn(|cx| Poll::Ready(pump.poll(cx, &mut src, &mut dst)));
    assert!(ran.await.is_pending());
    assert_eq!(dst.writes, vec![wire], "one write for everything read");
    assert_eq!(pump.bytes, 640 + 4 + 4 + 44);
    assert!(!pump.at_boundary(), "the last frame is not all written");
}

/// A header may claim any length: what counts is the payload that went on.
#[tokio::test]
async fn bytes_count_what_went_on_not_what_a_header_claims() {
    let (client, mut src) = duplex(1 << 16);
    let (mut dst, mut upstream) = duplex(1 << 16);
    let counter = IntCounter::new("t", "t").expect("counter");
    let mut pump = Pump::new(true, counter.clone());
    let mut wire = vec![0x82, 0x80 | 127];
    wire.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
    wire.extend_from_slice(&[0, 0, 0, 0]); // the mask
    wire.extend_from_slice(&[7; 100]);
    let mut client = client;
    client.write_all(&wire).await.expect("write");
    drop(client);
    let event = std::future::poll_fn(|cx| pump.poll(cx, &mut src, &mut dst)).await;
    assert!(matches!(event, Event::Ended), "{event:?}");
    assert_eq!(read_exactly(&mut upstream, wire.len()).await, wire);
    assert_eq!((pump.bytes, counter.get()), (100, 100));
}

#[tokio::test]
async fn frames_that_never_leave_are_not_counted() {
    let (mut client, mut src) = duplex(1 << 16);
    let counter = IntCounter::new("t", "t").expect("counter");
    let mut pump = Pump::new(true, counter.clone());
    let frame = masked(frames::BINARY, true, &[1; 100]);
    client.write_all(&frame.repeat(5)).await.expect("write");
    // The first frame leaves whole, then the destination breaks.
    let mut dst = Writes {
        writes: Vec::new(),
        room: frame.len(),
    };
    let event = std::future::poll_fn(|cx| pump.poll(cx, &mut src, &mut dst)).await;
    assert!(matches!(event, Event::DestinationLost(_)), "{event:?}");
    assert!(pump.bytes <= 100, "counted {} bytes, 100 left", pump.bytes);
    assert_eq!(counter.get(), pump.bytes);
}

#[tokio::test]
async fn messages_let_through_and_never_written_count_as_dropped() {
    let frame = masked(frames::BINARY, true, &[1; 100]);
    let ping = masked(frames::PING, true, b"p");
    let mut wire = frame.repeat(2);
    wire.extend_from_slice(&ping);
    wire.extend_from_slice(&frame.repeat(2));
    // The destination takes the first frame whole, then one byte of the second, then
    // breaks: three messages, then two, never left.
    for (room, never_left) in [(frame.len(), 3), (frame.len() + 1, 2)] {
        let (mut client, mut src) = duplex(1 << 16);
        let mut pump = Pump::new(true, IntCounter::new("t", "t").expect("counter"));
        client.write_all(&wire).await.expect("write");
        let mut dst = Writes {
            writes: Vec::new(),
            room,
        };
        let event = std::future::poll_fn(|cx| pump.poll(cx, &mut src, &mut dst)).await;
        assert!(matches!(event, Event::DestinationLost(_)), "{event:?}");
        assert_eq!(pump.dropped(), never_left, "room {room}");
    }
}

#[tokio::test]
async fn client_messages_sent_while_waiting_for_a_close_count_as_dropped() {
    let (mut client, mut src) = duplex(1 << 16);
    let mut pump = Pump::new(true, IntCounter::new("t", "t").expect("counter"));
    let mut wire = masked(frames::BINARY, false, &[1; 10]);
    wire.extend_from_slice(&masked(frames::CONTINUATION, true, &[2; 10]));
    wire.extend_from_slice(&masked(frames::PING, true, b"p"));
    wire.extend_from_slice(&masked(frames::TEXT, true, b"{\"type\":\"KeepAlive\"}"));
    wire.extend_from_slice(&masked(frames::CLOSE, true, &1000u16.to_be_bytes()));
    client.write_all(&wire).await.expect("write");
    tokio::time::timeout(Duration::from_secs(10), pump.until_close(&mut src))
        .await
        .expect("the close came");
    assert_eq!(pump.dropped(), 1, "the fragmented audio; text is not audio");
}

#[tokio::test]
async fn dropped_speak_messages_count_as_dropped_and_control_text_does_not() {
    for (dropped_type, expected) in [(Some("Speak"), 3), (None, 1)] {
        let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
        pump.watch.end = Some("Close");
        pump.watch.content = dropped_type;
        pump.drop_data = true;
        let mut wire = Vec::new();
        for text in [
            &br#"{"type":"Speak","text":"Close the door"}"#[..],
            br#"{"type":"Flush"}"#,
            br#"{"type":"KeepAlive"}"#,
            br#"{"type":"Speak","text":"and the window"}"#,
        ] {
            wire.extend_from_slice(&masked(frames::TEXT, true, text));
        }
        wire.extend_from_slice(&masked(frames::BINARY, true, &[1; 10]));
        client.write_all(&wire).await.expect("write");
        assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
        assert_eq!(pump.dropped(), expected, "{dropped_type:?}");
        assert!(!pump.client_ended, "a Speak that says Close is not the end");
    }
}

#[tokio::test]
async fn the_clients_own_end_of_stream_is_seen_passed_on_or_dropped() {
    let keep_alive = masked(frames::TEXT, true, b"{\"type\":\"KeepAlive\"}");
    let close_stream = masked(frames::TEXT, true, b"{\"type\": \"CloseStream\"}");

    // Before any drain: passed on, and seen.
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    pump.watch.end = Some("CloseStream");
    client.write_all(&keep_alive).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        read_exactly(&mut upstream, keep_alive.len()).await,
        keep_alive
    );
    assert!(!pump.client_ended, "KeepAlive does not end the stream");
    client.write_all(&close_stream).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        read_exactly(&mut upstream, close_stream.len()).await,
        close_stream
    );
    assert!(pump.client_ended);

    // After the drain message: dropped, still seen, and not counted as lost audio.
    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    pump.watch.end = Some("CloseStream");
    pump.drop_data = true;
    client.write_all(&keep_alive).await.expect("write");
    client.write_all(&close_stream).await.expect("write");
    client
        .write_all(&masked(frames::BINARY, true, &[1; 10]))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(pump.client_ended);
    assert_eq!(pump.dropped(), 1, "only the audio counts");
}

#[tokio::test]
async fn frames_let_through_before_an_injection_are_written_before_it() {
    let (mut client, mut src) = duplex(1 << 16);
    // A destination that takes 8 bytes at a time, so the pump waits part-way.
    let (mut dst, mut upstream) = duplex(8);
    let mut pump = Pump::new(true, IntCounter::new("t", "t").expect("counter"));
    let mut wire = masked(frames::BINARY, true, &[1; 20]);
    wire.extend_from_slice(&masked(frames::BINARY, true, &[2; 20]));
    client.write_all(&wire).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(
        !pump.at_boundary(),
        "let-through frames are not all written"
    );
    let own = frames::encode(frames::TEXT, b"{\"type\":\"CloseStream\"}", true);
    pump.inject(own.clone());
    pump.drop_data = true;
    client
        .write_all(&masked(frames::BINARY, true, &[3; 20]))
        .await
        .expect("write");
    let mut expected = wire.clone();
    expected.extend_from_slice(&own);
    let mut got = Vec::new();
    while got.len() < expected.len() {
        assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), upstream.read(&mut chunk))
            .await
            .expect("bytes came in time")
            .expect("read");
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(
        got, expected,
        "the audio read before the drain, then CloseStream"
    );
    assert!(pump.at_boundary());
    assert_eq!(pump.dropped, 1, "audio read after the drain is dropped");
}

#[tokio::test]
async fn an_injected_frame_waits_for_the_frame_boundary_and_closes_an_open_message() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    // The first fragment of a message, and the second's header (6 bytes, masked) with
    // part of its payload.
    let first = masked(frames::TEXT, false, b"hel");
    let second = masked(frames::CONTINUATION, true, b"lo!");
    client.write_all(&first).await.expect("write");
    client.write_all(&second[..8]).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    deadline(&mut pump, b"{\"type\":\"CloseStream\"}");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    // The rest of the frame in flight is passed on before the injected frame.
    client.write_all(&second[8..]).await.expect("write");
    client
        .write_all(&masked(frames::BINARY, true, &[9; 5]))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let got = read_exactly(&mut upstream, first.len() + second.len()).await;
    assert_eq!(got[..first.len()], first[..]);
    assert_eq!(got[first.len()..], second[..]);
    // `second` ended the message, so no empty fragment was needed; then our frame.
    let header = read_exactly(&mut upstream, 2).await;
    assert_eq!(header[0], 0x80 | frames::TEXT);
    assert_eq!(pump.dropped, 1, "audio after the drain message is dropped");
}

/// A drain message waits for the end of a fragmented text message the upstream has
/// begun: the message's remaining fragments go on although data is dropped from then on,
/// so the upstream never gets half a `Speak` (not JSON, perhaps not UTF-8).
#[tokio::test]
async fn an_injected_frame_waits_for_the_end_of_a_fragmented_message() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let first = masked(
        frames::TEXT,
        false,
        b"{\"type\":\"Speak\",\"text\":\"caf\xc3",
    );
    client.write_all(&first).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let flush = frames::encode(frames::TEXT, b"{\"type\":\"Flush\"}", true);
    pump.inject(flush.clone());
    pump.drop_data = true;
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(
        !pump.is_writing(),
        "the message is still open: nothing of ours is due"
    );
    let ping = masked(frames::PING, true, b"p");
    let middle = masked(frames::CONTINUATION, false, b"\xa9 ");
    let last = masked(frames::CONTINUATION, true, b"au lait\"}");
    let audio = masked(frames::BINARY, true, &[1; 3]);
    for frame in [&ping, &middle, &last, &audio] {
        client.write_all(frame).await.expect("write");
    }
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let whole = [first, ping, middle, last, flush.to_vec()].concat();
    assert_eq!(read_exactly(&mut upstream, whole.len()).await, whole);
    assert_eq!(
        pump.dropped(),
        1,
        "only the message begun after the deadline"
    );
    nothing_more_reaches(dst, &mut upstream).await;
}

/// A held text message that turns out to be the client's own end takes the queued drain
/// message with it: the upstream gets one `CloseStream`, the client's.
#[tokio::test]
async fn the_clients_own_end_in_fragments_takes_the_held_drain_message_with_it() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    pump.watch.end = Some("CloseStream");
    let first = masked(frames::TEXT, false, b"{\"type\":\"Clo");
    client.write_all(&first).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    pump.inject(frames::encode(
        frames::TEXT,
        b"{\"type\":\"CloseStream\"}",
        true,
    ));
    let at = pump.own_queued();
    pump.drop_data = true;
    let last = masked(frames::CONTINUATION, true, b"seStream\"}");
    client.write_all(&last).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(pump.client_ended);
    assert!(pump.own_written() < at, "the drain message never went");
    drop(dst);
    let mut got = Vec::new();
    upstream.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, [first, last].concat());
}

/// The client's `Flush` held across the deadline is counted before the drain's own goes:
/// the drain's is answered by the `Flushed` after the client's.
#[tokio::test]
async fn a_drain_message_after_a_held_flush_is_counted_after_it() {
    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    pump.watch.counted = Some("Flush");
    client
        .write_all(&masked(frames::TEXT, false, b"{\"type\":\"Fl"))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    pump.inject(frames::encode(frames::TEXT, b"{\"type\":\"Flush\"}", true));
    let at = pump.own_queued();
    pump.drop_data = true;
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        (pump.own_written(), pump.counted),
        (0, 0),
        "held behind the message"
    );
    client
        .write_all(&masked(frames::CONTINUATION, true, b"ush\"}"))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(pump.own_written(), at);
    assert_eq!(pump.counted, 1, "the client's Flush");
    assert_eq!(pump.counted_at_own(), 1, "the drain's Flush went after it");
}

/// An audio message the upstream has begun is ended at once by the drain message, with
/// an empty last fragment: a client that streams all its audio as one message cannot hold
/// `CloseStream` back. The rest of the message is dropped, and counted once.
#[tokio::test]
async fn an_injected_frame_ends_an_open_audio_message_at_once() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let first = masked(frames::BINARY, false, &[1; 4]);
    client.write_all(&first).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let close_stream = frames::encode(frames::TEXT, b"{\"type\":\"CloseStream\"}", true);
    pump.inject(close_stream.clone());
    pump.drop_data = true;
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let end = frames::encode(frames::CONTINUATION, &[], true);
    let whole = [first, end.to_vec(), close_stream.to_vec()].concat();
    let got = read_exactly(&mut upstream, whole.len()).await;
    // The masks are random: compare the frames' headers and payloads.
    let mut at = 0;
    for expected in [
        (false, frames::BINARY, 4),
        (true, frames::CONTINUATION, 0),
        (true, frames::TEXT, 22),
    ] {
        let header = frames::parse(&got[at..], true)
            .expect("valid")
            .expect("whole");
        assert_eq!((header.fin, header.opcode, header.len), expected);
        at += header.size + header.len as usize;
    }
    assert_eq!(at, whole.len());
    for frame in [
        masked(frames::CONTINUATION, false, &[2; 4]),
        masked(frames::CONTINUATION, true, &[3; 4]),
        masked(frames::BINARY, true, &[4; 4]),
    ] {
        client.write_all(&frame).await.expect("write");
    }
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        pump.dropped(),
        2,
        "the rest of the cut message, and the next one"
    );
    nothing_more_reaches(dst, &mut upstream).await;
}

/// An audio message cut while its first frame still waits for the upstream to take it is
/// counted as dropped once, not once as unwritten and once as cut.
#[tokio::test]
async fn a_cut_message_not_yet_written_counts_once() {
    let first = masked(frames::BINARY, true, &[1; 16]);
    let (mut client, mut src) = duplex(1 << 16);
    // Room for the first message only: the upstream takes nothing more.
    let (mut dst, _upstream) = duplex(first.len());
    let mut pump = Pump::new(true, IntCounter::new("t", "t").expect("counter"));
    client.write_all(&first).await.expect("write");
    client
        .write_all(&masked(frames::BINARY, false, &[2; 10]))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(pump.dropped(), 1, "let through, not written");
    deadline(&mut pump, b"{\"type\":\"CloseStream\"}");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(pump.dropped(), 1, "one message never sent");
}

/// A binary message begun with empty fragments (dropped) before the drain message, whose
/// data comes after it, counts as dropped at its first data.
#[tokio::test]
async fn audio_begun_empty_and_sent_after_the_drain_message_counts_as_dropped() {
    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    client
        .write_all(&masked(frames::BINARY, false, &[]))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    pump.drop_data = true;
    for frame in [
        masked(frames::CONTINUATION, false, &[1; 4]),
        masked(frames::CONTINUATION, true, &[2; 4]),
    ] {
        client.write_all(&frame).await.expect("write");
    }
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(pump.dropped(), 1);
}

/// A stream that ends with the client's text message still open (grace ran out) can
/// only send its last frames of Switchyard's own after ending that message, with an
/// empty last fragment.
#[tokio::test]
async fn frames_taken_at_the_end_close_a_message_left_open() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let first = masked(frames::TEXT, false, b"{\"type\":");
    client.write_all(&first).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(read_exactly(&mut upstream, first.len()).await, first);
    pump.inject(frames::encode(frames::TEXT, b"x", true));
    let taken: Vec<_> = std::iter::from_fn(|| pump.take_own()).collect();
    assert_eq!(taken.len(), 2);
    let end = frames::parse(&taken[0], true)
        .expect("valid")
        .expect("whole");
    assert_eq!(
        (end.fin, end.opcode, end.len),
        (true, frames::CONTINUATION, 0)
    );
    let own = frames::parse(&taken[1], true)
        .expect("valid")
        .expect("whole");
    assert_eq!((own.fin, own.opcode, own.len), (true, frames::TEXT, 1));
}

#[tokio::test]
async fn a_close_frame_stops_the_pump_and_is_not_passed_on() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let close = frames::close(1000, "bye", true);
    client.write_all(&close).await.expect("write");
    match run(&mut pump, &mut src, &mut dst).await {
        Some(Event::Close { code, frame }) => {
            assert_eq!(code, Some(1000));
            assert_eq!(frame, close);
        }
        other => panic!("expected a close, got {other:?}"),
    }
    nothing_more_reaches(dst, &mut upstream).await;
}

#[tokio::test]
async fn unmasked_client_frames_break_the_protocol() {
    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    client
        .write_all(&frames::encode(frames::BINARY, &[1], false))
        .await
        .expect("write");
    assert!(matches!(
        run(&mut pump, &mut src, &mut dst).await,
        Some(Event::Protocol(FrameError::Unmasked))
    ));
}

/// Frames out of sequence, and close frames no peer may send, break the protocol;
/// what came before them goes on.
#[tokio::test]
async fn frames_out_of_sequence_and_bad_closes_break_the_protocol() {
    let text = |fin| masked(frames::TEXT, fin, b"{}");
    let cases: [(Vec<u8>, FrameError, usize); 4] = [
        (
            masked(frames::CONTINUATION, true, b"x"),
            FrameError::Sequence,
            0,
        ),
        ([text(false), text(true)].concat(), FrameError::Sequence, 1),
        (
            masked(frames::CLOSE, true, &999u16.to_be_bytes()),
            FrameError::BadClose,
            0,
        ),
        (
            [
                text(true),
                masked(frames::CLOSE, true, &[0x03, 0xE8, 0xC3, 0x28]),
            ]
            .concat(),
            FrameError::BadClose,
            1,
        ),
    ];
    for (wire, error, before) in cases {
        let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
        client.write_all(&wire).await.expect("write");
        let event = run(&mut pump, &mut src, &mut dst).await;
        assert!(
            matches!(event, Some(Event::Protocol(e)) if e == error),
            "{event:?}, expected {error:?}"
        );
        let passed = text(true).len() * before;
        assert_eq!(read_exactly(&mut upstream, passed).await.len(), passed);
    }
}

#[tokio::test]
async fn a_watched_upstream_reports_flushed_and_still_passes_it_on() {
    let (mut upstream, mut src) = duplex(1 << 16);
    let (mut dst, mut client) = duplex(1 << 16);
    let counter = IntCounter::new("t", "t").expect("counter");
    let mut pump = Pump::new(false, counter);
    pump.watch_flushed = true;
    let flushed = frames::encode(
        frames::TEXT,
        br#"{"type":"Flushed","sequence_id":1}"#,
        false,
    );
    // Split so the pump must wait for the whole frame before it can look inside.
    upstream.write_all(&flushed[..5]).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    upstream.write_all(&flushed[5..]).await.expect("write");
    assert!(matches!(
        run(&mut pump, &mut src, &mut dst).await,
        Some(Event::Flushed)
    ));
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        read_exactly(&mut client, flushed.len()).await,
        flushed.to_vec()
    );
}

#[tokio::test]
async fn an_upstreams_empty_binary_frame_is_not_passed_on_either() {
    let (mut upstream, mut src) = duplex(1 << 16);
    let (mut dst, mut client) = duplex(1 << 16);
    let mut pump = Pump::new(false, IntCounter::new("t", "t").expect("counter"));
    let empty = frames::encode(frames::BINARY, &[], false);
    let text = frames::encode(frames::TEXT, b"after", false);
    upstream.write_all(&empty).await.expect("write");
    upstream.write_all(&text).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(read_exactly(&mut client, text.len()).await, text.to_vec());
    assert_eq!(
        pump.dropped, 0,
        "only the client's dropped messages are counted"
    );
}

#[tokio::test]
async fn a_skipped_fragment_does_not_make_an_injection_close_a_message() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let flush = frames::encode(frames::TEXT, b"F", true);
    pump.inject(flush.clone());
    pump.drop_data = true;
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        read_exactly(&mut upstream, flush.len()).await,
        flush.to_vec()
    );
    // A fragmented message begun after the drain message is dropped whole...
    client
        .write_all(&masked(frames::TEXT, false, b"abc"))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    // ...so the next frame of Switchyard's own needs no empty last fragment first.
    let close = frames::encode(frames::TEXT, b"C", true);
    pump.inject(close.clone());
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        read_exactly(&mut upstream, close.len()).await,
        close.to_vec()
    );
}

/// Polls `poll_boundary` once: whether it reached a boundary, or `None` if it would wait.
async fn boundary(pump: &mut Pump, src: &mut DuplexStream, dst: &mut DuplexStream) -> Option<bool> {
    std::future::poll_fn(|cx| match pump.poll_boundary(cx, src, dst) {
        Poll::Ready(reached) => Poll::Ready(Some(reached)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// At a stream's end, a frame in flight is finished before a close can follow it: the
/// rest of its bytes are passed on as they come, and the next frame is not started.
#[tokio::test]
async fn a_frame_cut_short_by_the_end_is_finished_and_no_other_begun() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    let audio = masked(frames::BINARY, true, &[7; 300]);
    client.write_all(&audio[..100]).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(!pump.at_boundary());
    // The rest has not come: the pump waits for it.
    assert_eq!(boundary(&mut pump, &mut src, &mut dst).await, None);
    let mut rest = audio[100..].to_vec();
    rest.extend(masked(frames::BINARY, true, &[8; 10]));
    client.write_all(&rest).await.expect("write");
    assert_eq!(boundary(&mut pump, &mut src, &mut dst).await, Some(true));
    assert!(pump.at_boundary());
    assert_eq!(read_exactly(&mut upstream, audio.len()).await, audio);
    drop(dst);
    let mut more = Vec::new();
    upstream.read_to_end(&mut more).await.expect("read");
    assert!(more.is_empty(), "the next frame was not begun: {more:?}");
    assert_eq!(pump.bytes, 300);

    // A source that ends first leaves the frame unfinished.
    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    client.write_all(&audio[..100]).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    drop(client);
    assert_eq!(boundary(&mut pump, &mut src, &mut dst).await, Some(false));
    assert!(!pump.at_boundary());
}

/// A frame of Switchyard's own does not wait behind one being dropped: after the drain
/// message, speak's `Close` goes while the client is still halfway through a `Speak`.
#[tokio::test]
async fn an_injected_frame_does_not_wait_for_the_rest_of_a_dropped_one() {
    let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
    pump.drop_data = true;
    let speak = masked(frames::TEXT, true, &[b'x'; 200]);
    client.write_all(&speak[..50]).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    let close = frames::encode(frames::TEXT, b"{\"type\":\"Close\"}", true);
    pump.inject(close.clone());
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(
        read_exactly(&mut upstream, close.len()).await,
        close.to_vec()
    );
    // The rest of the frame is dropped still, and the audio after it: nothing follows.
    let audio = masked(frames::BINARY, true, &[1, 2]);
    client.write_all(&speak[50..]).await.expect("write");
    client.write_all(&audio).await.expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    nothing_more_reaches(dst, &mut upstream).await;
}

/// An upstream frame, unmasked; `fin` false for a fragment that does not end its message.
fn plain(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = frames::encode(opcode, payload, false).to_vec();
    if !fin {
        frame[0] &= 0x7F;
    }
    frame
}

/// A `Flushed` the upstream sends in fragments, with a ping between them, is seen at its
/// last fragment, and every fragment still passes on as it came.
#[tokio::test]
async fn a_fragmented_flushed_is_reported_at_its_last_fragment() {
    let (mut upstream, mut src) = duplex(1 << 16);
    let (mut dst, mut client) = duplex(1 << 16);
    let counter = IntCounter::new("t", "t").expect("counter");
    let mut pump = Pump::new(false, counter);
    pump.watch_flushed = true;
    let parts = [
        plain(frames::TEXT, false, br#"{"type":"Flu"#),
        plain(frames::PING, true, b"p"),
        plain(frames::CONTINUATION, false, br#"shed","seq"#),
        plain(frames::CONTINUATION, true, br#"uence_id":1}"#),
    ];
    let mut sent = Vec::new();
    for part in &parts[..3] {
        upstream.write_all(part).await.expect("write");
        sent.extend_from_slice(part);
        assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    }
    upstream.write_all(&parts[3]).await.expect("write");
    sent.extend_from_slice(&parts[3]);
    assert!(matches!(
        run(&mut pump, &mut src, &mut dst).await,
        Some(Event::Flushed)
    ));
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert_eq!(read_exactly(&mut client, sent.len()).await, sent);
}

/// The client's own end of stream in fragments is seen too; a message whose text passes
/// 4 KiB, or whose fragments are not all looked inside, is not read at all.
#[tokio::test]
async fn a_fragmented_message_is_read_whole_or_not_at_all() {
    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    pump.watch.end = Some("CloseStream");
    client
        .write_all(&masked(frames::TEXT, false, br#"{"type": "Clo"#))
        .await
        .expect("write");
    client
        .write_all(&masked(frames::CONTINUATION, true, br#"seStream"}"#))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(
        pump.client_ended,
        "a fragmented CloseStream ends the stream"
    );

    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    pump.watch.end = Some("CloseStream");
    let padding = vec![b' '; 4 * 1024];
    client
        .write_all(&masked(frames::TEXT, false, br#"{"type": "#))
        .await
        .expect("write");
    client
        .write_all(&masked(frames::CONTINUATION, false, &padding))
        .await
        .expect("write");
    client
        .write_all(&masked(frames::CONTINUATION, true, br#""CloseStream"}"#))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(!pump.client_ended, "past 4 KiB the message is not read");

    let (mut pump, mut client, mut src, mut dst, _upstream) = client_pump();
    pump.watch.end = Some("CloseStream");
    let large = vec![b' '; 5 * 1024];
    client
        .write_all(&masked(frames::TEXT, false, br#"{"type": "CloseStream""#))
        .await
        .expect("write");
    client
        .write_all(&masked(frames::CONTINUATION, false, &large))
        .await
        .expect("write");
    client
        .write_all(&masked(frames::CONTINUATION, true, b"}"))
        .await
        .expect("write");
    assert!(run(&mut pump, &mut src, &mut dst).await.is_none());
    assert!(
        !pump.client_ended,
        "a fragment not looked inside leaves no half text to match"
    );
}

/// The drain message in the random runs below.
const DRAIN: &[u8] = b"{\"type\":\"CloseStream\",\"drain\":true}";

/// A client's frames: one to five messages, audio (perhaps beginning with empty
/// fragments) or one of Deepgram's control messages cut anywhere, in one to four
/// fragments, with pings between some of them.
fn random_client_frames(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut wire = Vec::new();
    for _ in 0..rng.usize(1..=5) {
        let parts = rng.usize(1..=4);
        let binary = rng.u8(..3) != 0;
        let payloads: Vec<Vec<u8>> = if binary {
            (0..parts)
                .map(|_| vec![7; [0, 3, 200][rng.usize(..3)]])
                .collect()
        } else {
            let texts: [&[u8]; 3] = [
                b"{\"type\":\"CloseStream\"}",
                b"{\"type\":\"KeepAlive\"}",
                b"{\"type\":\"Finalize\"}",
            ];
            let text = texts[rng.usize(..3)];
            let mut bounds: Vec<usize> = (1..parts).map(|_| rng.usize(..=text.len())).collect();
            bounds.extend([0, text.len()]);
            bounds.sort_unstable();
            bounds
                .windows(2)
                .map(|w| text[w[0]..w[1]].to_vec())
                .collect()
        };
        for (i, payload) in payloads.iter().enumerate() {
            let opcode = match (i, binary) {
                (0, true) => frames::BINARY,
                (0, false) => frames::TEXT,
                _ => frames::CONTINUATION,
            };
            wire.extend(masked(opcode, i + 1 == parts, payload));
            if rng.u8(..4) == 0 {
                wire.extend(masked(frames::PING, true, b"p"));
            }
        }
    }
    wire
}

/// Runs the pump until it waits, letting the runtime's co-operative budget (which makes
/// an in-memory pipe return `Pending` after many operations in one poll) refill first.
async fn settle(pump: &mut Pump, src: &mut DuplexStream, dst: &mut DuplexStream) {
    for _ in 0..3 {
        tokio::task::yield_now().await;
        assert!(run(pump, src, dst).await.is_none(), "no event");
    }
}

/// Random client traffic, arriving a few bytes at a time, with the drain message injected
/// at a random byte (in a header, in a payload, between fragments): whatever the timing,
/// the upstream gets a valid sequence of frames (no continuation outside a message, no
/// message inside another, no empty binary start), no client data after the drain
/// message, and the drain message once, unless the client's own `CloseStream` took its
/// place.
#[tokio::test]
async fn any_drain_timing_leaves_the_upstream_a_valid_stream() {
    for seed in 0..5_000 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let wire = random_client_frames(&mut rng);
        let drain_at = rng.usize(..=wire.len());
        let (mut pump, mut client, mut src, mut dst, mut upstream) = client_pump();
        pump.watch.end = Some("CloseStream");
        let (mut at, mut injected) = (0, false);
        while at < wire.len() || !injected {
            if !injected && at == drain_at {
                pump.inject(frames::encode(frames::TEXT, DRAIN, true));
                pump.drop_data = true;
                injected = true;
            } else {
                let end = if injected { wire.len() } else { drain_at };
                let n = rng.usize(1..=40).min(end - at);
                client.write_all(&wire[at..at + n]).await.expect("write");
                at += n;
            }
            settle(&mut pump, &mut src, &mut dst).await;
        }
        drop(dst);
        let mut out = Vec::new();
        upstream.read_to_end(&mut out).await.expect("read");
        let (mut pos, mut open, mut drains) = (0, false, 0);
        while pos < out.len() {
            let header = frames::parse(&out[pos..], true)
                .expect("valid")
                .unwrap_or_else(|| panic!("seed {seed}: a frame cut short"));
            let frame = &out[pos..pos + header.size + header.len as usize];
            pos += frame.len();
            if header.is_control() {
                continue;
            }
            let continues = header.opcode == frames::CONTINUATION;
            assert_eq!(continues, open, "seed {seed}: out of sequence at {pos}");
            assert!(
                !(header.opcode == frames::BINARY && header.len == 0),
                "seed {seed}: an empty binary start"
            );
            if frames::payload(&header, frame) == DRAIN {
                drains += 1;
            } else {
                assert_eq!(
                    drains, 0,
                    "seed {seed}: client data after the drain message"
                );
            }
            open = !header.fin;
        }
        assert!(
            drains == 1 || (drains == 0 && pump.client_ended),
            "seed {seed}: {drains} drain messages"
        );
    }
}
