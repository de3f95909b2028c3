//! Scenarios for WebSocket proxying and the protocol-aware drain: a real tokio-tungstenite
//! client, Switchyard in-process, and the Deepgram-compatible stubs as blue and green, all on
//! 127.0.0.1 port 0. Waits are on messages and on the stubs' recorded events, each bounded by
//! `PATIENCE`; drain deadlines are short, and every assertion is ordered so that it holds
//! however late the deadline fires within its bound.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, StatusCode};
use serde_json::{Value, json};
use support::{Env, EnvBuilder, PATIENCE, eventually, hand_written_upstream};
use switchyard::stub::{StubHandle, StubOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::handshake::client::Response as Handshake;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The stub answers one final `Results` per this many audio bytes.
const RESULT_BYTES: usize = 3200;

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {PATIENCE:?} waiting for {what}"),
    }
}

/// Opens a WebSocket through the proxy listener.
async fn open(url: &str) -> (Ws, Handshake) {
    open_with(url, &[]).await
}

/// Opens a WebSocket with extra request headers.
async fn open_with(url: &str, headers: &[(&'static str, &str)]) -> (Ws, Handshake) {
    let mut request = url.into_client_request().expect("a valid ws:// URL");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).expect("a header value"));
    }
    let (ws, response) = within("a WebSocket handshake", connect_async(request))
        .await
        .unwrap_or_else(|e| panic!("handshake with {url} failed: {e}"));
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    (ws, response)
}

fn color_of(response: &Handshake) -> &str {
    response
        .headers()
        .get("x-switchyard-color")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The next data or close message; pings and pongs are the transport's business.
async fn next(ws: &mut Ws) -> Message {
    loop {
        match within("a WebSocket message", ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return message,
            Some(Err(e)) => panic!("the stream failed before a close frame: {e}"),
            None => panic!("the stream ended without a close frame"),
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    json_of(&next(ws).await)
}

/// Reads every message up to the close frame, then lets the client answer the close.
async fn read_to_close(ws: &mut Ws) -> (Vec<Message>, Option<CloseFrame>) {
    let mut messages = Vec::new();
    loop {
        match next(ws).await {
            Message::Close(frame) => {
                // Drives the client's close reply out and sees the TCP end.
                within("the end of the close handshake", async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                return (messages, frame);
            }
            message => messages.push(message),
        }
    }
}

fn close_code(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| u16::from(f.code))
}

fn json_of(message: &Message) -> Value {
    match message {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("JSON text"),
        other => panic!("expected a JSON text message, got {other:?}"),
    }
}

fn transcript(result: &Value) -> &str {
    result["channel"]["alternatives"][0]["transcript"]
        .as_str()
        .expect("a transcript")
}

fn audio(bytes: usize) -> Message {
    Message::Binary(Bytes::from(vec![0x11; bytes]))
}

/// A `/v1/listen` stream and what the client sent and got on it.
struct Listen {
    ws: Ws,
    /// Audio bytes sent (every one reached the stub: each batch is confirmed by a Results).
    sent: usize,
    /// Every `Results` received, in order.
    results: Vec<Value>,
}

impl Listen {
    async fn open(url: &str) -> (Listen, Handshake) {
        let (ws, response) = open(url).await;
        let listen = Listen {
            ws,
            sent: 0,
            results: Vec::new(),
        };
        (listen, response)
    }

    /// Sends audio frames of these sizes, then waits for the `Results` they complete. The
    /// last frame must complete a result, so its arrival proves the stub read every frame.
    async fn send_confirmed(&mut self, sizes: &[usize]) -> Vec<Value> {
        assert!(sizes.last().is_some_and(|&n| n >= RESULT_BYTES));
        let before = self.sent / RESULT_BYTES;
        for &n in sizes {
            within("an audio send", self.ws.send(audio(n)))
                .await
                .expect("audio sent");
            self.sent += n;
        }
        let mut fresh = Vec::new();
        for _ in before..self.sent / RESULT_BYTES {
            let message = next_json(&mut self.ws).await;
            assert_eq!(message["type"], "Results", "{message}");
            fresh.push(message.clone());
            self.results.push(message);
        }
        fresh
    }

    /// Waits for the drain: the finals and `Metadata` from the upstream, then close 1012.
    async fn expect_drained(&mut self, stub: &str) {
        let (messages, close) = read_to_close(&mut self.ws).await;
        assert_eq!(close_code(&close), Some(1012), "drain closes with 1012");
        let (metadata, finals) = messages.split_last().expect("Metadata before the close");
        let metadata = json_of(metadata);
        assert_eq!(metadata["type"], "Metadata", "{metadata}");
        assert_eq!(metadata["stub"], stub, "{metadata}");
        let finals: Vec<Value> = finals.iter().map(json_of).collect();
        let last = finals.last().expect("a final Results after CloseStream");
        assert_eq!(last["from_finalize"], true, "{last}");
        for f in &finals {
            assert_eq!(f["type"], "Results", "{f}");
            assert!(transcript(f).starts_with(&format!("{stub} ")), "{f}");
        }
        self.results.extend(finals);
        // Nothing lost: one Results per full 3200 bytes, plus the finalize one.
        assert_eq!(
            self.results.len(),
            self.sent / RESULT_BYTES + 1,
            "results for {} bytes",
            self.sent
        );
    }

    /// Ends the stream from the client with 1000 and waits for the close reply.
    async fn close_normally(mut self) {
        within(
            "the client's close",
            self.ws.send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "done".into(),
            }))),
        )
        .await
        .expect("close sent");
        let (rest, close) = read_to_close(&mut self.ws).await;
        assert!(rest.is_empty(), "nothing after our close: {rest:?}");
        assert_eq!(close_code(&close), Some(1000));
    }
}

/// 50 STT streams on blue; a flip to green with a 4 s drain. The old streams keep working
/// on blue until the deadline, new ones land on green, and at the deadline each old stream
/// is finalized (nothing lost) and told to reconnect with 1012.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_streams_drain_to_green_with_finals_and_1012() {
    const STREAMS: usize = 50;
    let env = EnvBuilder::default().start().await;
    let url = env.ws_url("/v1/listen?encoding=linear16&sample_rate=16000");
    let ready = Arc::new(Barrier::new(STREAMS + 1));
    let flipped = Arc::new(Barrier::new(STREAMS + 1));
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (url, ready, flipped) = (url.clone(), ready.clone(), flipped.clone());
        tasks.push(tokio::spawn(async move {
            let (mut stream, response) = Listen::open(&url).await;
            assert_eq!(color_of(&response), "blue");
            stream.send_confirmed(&[100 * i + 50, RESULT_BYTES]).await;
            ready.wait().await;
            flipped.wait().await;
            // After the flip, before the deadline: still blue, still transcribing.
            let fresh = stream.send_confirmed(&[1000, RESULT_BYTES]).await;
            assert!(!fresh.is_empty());
            for r in &fresh {
                assert!(transcript(r).starts_with("blue "), "{r}");
            }
            stream.expect_drained("blue").await;
        }));
    }
    within("50 streams open on blue", ready.wait()).await;
    env.flip_draining("green", "4s").await;
    within("the streams to see the flip", flipped.wait()).await;

    // New streams land on green while blue drains.
    let mut green = Vec::new();
    for _ in 0..3 {
        let (mut stream, response) = Listen::open(&url).await;
        assert_eq!(color_of(&response), "green");
        let fresh = stream.send_confirmed(&[RESULT_BYTES]).await;
        assert_eq!(transcript(&fresh[0]), "green 1");
        green.push(stream);
    }

    for task in tasks {
        within("a blue stream to drain", task)
            .await
            .expect("the stream's scenario holds");
    }
    let blue = &env.blue[0].state;
    assert_eq!(blue.close_streams(), STREAMS as u64);
    within(
        "blue to hold no session",
        blue.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;

    // The green streams were not part of the drain.
    for mut stream in green {
        let fresh = stream.send_confirmed(&[RESULT_BYTES]).await;
        assert_eq!(transcript(&fresh[0]), "green 2");
        stream.close_normally().await;
    }
    assert_eq!(env.green[0].state.close_streams(), 0);
}

/// A rollback during the drain cancels it: blue's stream outlives the original deadline
/// and keeps transcribing until the client ends it normally. A flip back to blue does the
/// same (SPEC: a flip to a colour whose streams are draining cancels their drain).
#[tokio::test]
async fn rollback_cancels_the_drain() {
    for back in ["/rollback", "/flip"] {
        drain_cancelled_by(back).await;
    }
}

async fn drain_cancelled_by(back: &str) {
    let env = EnvBuilder::default().start().await;
    let url = env.ws_url("/v1/listen");
    let (mut on_blue, response) = Listen::open(&url).await;
    assert_eq!(color_of(&response), "blue");
    on_blue.send_confirmed(&[RESULT_BYTES]).await;

    env.flip_draining("green", "1s").await;
    let (mut on_green, response) = Listen::open(&url).await;
    assert_eq!(color_of(&response), "green");
    on_green.send_confirmed(&[RESULT_BYTES]).await;
    let order = match back {
        "/flip" => json!({ "to": "blue", "drain_timeout": "1s" }),
        _ => json!({ "drain_timeout": "1s" }),
    };
    let (status, body) = env.admin_post(back, Some(order)).await;
    assert_eq!(status, StatusCode::OK, "{back}: {body}");
    assert_eq!(body["active"], "blue", "{back}: {body}");

    // The green stream's drain was ordered after blue's, with the same timeout, so its
    // close is the signal that blue's original deadline has passed.
    on_green.expect_drained("green").await;

    let fresh = on_blue.send_confirmed(&[RESULT_BYTES]).await;
    assert_eq!(transcript(&fresh[0]), "blue 2");
    assert_eq!(env.blue[0].state.close_streams(), 0);
    on_blue.close_normally().await;
}

/// TTS at the deadline: `Flush`, the audio and `Flushed` relayed, then `Close`, then 1012.
#[tokio::test]
async fn speak_stream_drains_with_flush_then_close() {
    let env = EnvBuilder::default().start().await;
    let (mut ws, response) = open(&env.ws_url("/v1/speak?model=aura-2-thalia-en")).await;
    assert_eq!(color_of(&response), "blue");
    assert_eq!(next_json(&mut ws).await["type"], "Metadata");
    // 25 characters → 3 frames, 10 → 1 frame, of 1920 bytes each.
    for text in ["Hello from the blue side.", "Goodbye!!!"] {
        ws.send(Message::text(
            json!({"type": "Speak", "text": text}).to_string(),
        ))
        .await
        .expect("Speak sent");
    }
    let blue = env.blue[0].state.clone();
    within("both Speak messages", blue.wait_until(|s| s.speaks() == 2)).await;
    env.flip_draining("green", "1s").await;

    let (messages, close) = read_to_close(&mut ws).await;
    let audio: usize = messages
        .iter()
        .map(|m| match m {
            Message::Binary(b) => b.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(audio, 4 * 1920, "every audio frame reached the client");
    let texts: Vec<Value> = messages
        .iter()
        .filter(|m| m.is_text())
        .map(json_of)
        .collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0]["type"], "Flushed");
    assert!(
        matches!(messages.last(), Some(Message::Text(_))),
        "Flushed comes after the audio"
    );
    assert_eq!(close_code(&close), Some(1012));
    within(
        "the stub to see Flush then Close",
        blue.wait_until(|s| s.speak_closes() == 1),
    )
    .await;
    assert_eq!(blue.flushes(), 1);
    assert_eq!(blue.speak_closes(), 1);
}

/// A speak stream on blue, whose stub ignores `Flush`, drained at once by a flip to green
/// (`drain.grace` is `grace`).
async fn speak_drained_by_a_stub_that_never_flushes(grace: &'static str) -> (Env, Ws) {
    let env = EnvBuilder {
        grace,
        ..Default::default()
    }
    .start()
    .await;
    let url = env.ws_url("/v1/speak?model=aura-2-thalia-en&stub_ignore_flush=1");
    let (mut ws, _) = open(&url).await;
    assert_eq!(next_json(&mut ws).await["type"], "Metadata");
    env.flip_draining("green", "0s").await;
    (env, ws)
}

/// A client that never finishes the `Speak` it began before the deadline holds the drain's
/// `Flush` back (half a message cannot be cut into JSON). At the end of grace the client
/// gets 1012 and the stub the close alone: no half message, no `Flush` or `Close` after it.
#[tokio::test]
async fn speak_drain_held_behind_an_unfinished_message_ends_with_the_close_alone() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let env = EnvBuilder {
        grace: "300ms",
        ..Default::default()
    }
    .start()
    .await;
    let (mut ws, _) = open(&env.ws_url("/v1/speak?model=aura-2-thalia-en")).await;
    assert_eq!(next_json(&mut ws).await["type"], "Metadata");
    let first = Frame::message(&b"{\"type\":\"Sp"[..], OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first))
        .await
        .expect("first fragment");
    // The stub's pong comes after the fragment reached it.
    ws.send(Message::Ping(Bytes::from_static(b"after")))
        .await
        .expect("ping");
    within("the pong", async {
        loop {
            if let Some(Ok(Message::Pong(_))) = ws.next().await {
                return;
            }
        }
    })
    .await;
    env.flip_draining("green", "0s").await;
    let (_, close) = read_to_close(&mut ws).await;
    assert_eq!(close_code(&close), Some(1012));
    let blue = env.blue[0].state.clone();
    within(
        "the stub's stream to end",
        blue.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
    assert_eq!(
        (blue.speaks(), blue.flushes(), blue.speak_closes()),
        (0, 0, 0)
    );
}

/// A TTS node that never answers `Flush` within `drain.grace` still gets `Close` after it,
/// then 1001; the client gets 1012.
#[tokio::test]
async fn speak_drain_sends_close_when_flushed_never_comes() {
    let (env, mut ws) = speak_drained_by_a_stub_that_never_flushes("300ms").await;
    let (messages, close) = read_to_close(&mut ws).await;
    assert!(messages.iter().all(|m| !m.is_text()), "{messages:?}");
    assert_eq!(close_code(&close), Some(1012));
    let blue = env.blue[0].state.clone();
    within(
        "the stub to see Flush, then Close",
        blue.wait_until(|s| s.speak_closes() == 1),
    )
    .await;
    assert_eq!(blue.flushes(), 1);
    eventually(|| async { closes_of(&env, "drain_forced") == Some(1.0) }).await;
    assert_eq!(closes_of(&env, "drain_graceful"), Some(0.0));
}

/// A scripted WebSocket upstream on a loopback port: `session` runs for each connection
/// it accepts; with `reset`, a connection dropped ends with a reset, not a FIN.
async fn scripted_upstream<F, Fut>(reset: bool, session: F) -> SocketAddr
where
    F: Fn(WebSocketStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let session = Arc::new(session);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let session = session.clone();
            tokio::spawn(async move {
                if reset {
                    socket.set_zero_linger().expect("linger");
                }
                if let Ok(ws) = tokio_tungstenite::accept_async(socket).await {
                    session(ws).await;
                }
            });
        }
    });
    addr
}

/// A TTS upstream that synthesizes one `Flush` at a time, 300 ms each, and closes at once
/// on `Close` (what it has not sent yet is lost). `Clear` drops the flushes not yet spoken
/// (they get no `Flushed`) and is answered `Cleared` at once. Counts the messages it
/// receives.
async fn sequential_synthesizer() -> (SocketAddr, Arc<AtomicU64>) {
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    let addr = scripted_upstream(false, move |ws| {
        let counted = counted.clone();
        async move {
            let (mut sink, mut stream) = ws.split();
            let (out, mut outbox) = tokio::sync::mpsc::unbounded_channel::<Message>();
            let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<(u64, String)>();
            let clears = Arc::new(AtomicU64::new(0));
            let synthesized = out.clone();
            let cleared = clears.clone();
            tokio::spawn(async move {
                let mut sequence_id = 0;
                while let Some((clears_before, text)) = queue.recv().await {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if cleared.load(Ordering::SeqCst) != clears_before {
                        continue;
                    }
                    if !text.is_empty() {
                        let _ = synthesized.send(Message::binary(text.into_bytes()));
                    }
                    let flushed = json!({"type": "Flushed", "sequence_id": sequence_id});
                    let _ = synthesized.send(Message::text(flushed.to_string()));
                    sequence_id += 1;
                }
            });
            tokio::spawn(async move {
                while let Some(message) = outbox.recv().await {
                    let close = message.is_close();
                    if sink.send(message).await.is_err() || close {
                        return;
                    }
                }
            });
            let mut text = String::new();
            while let Some(Ok(message)) = stream.next().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(json) = serde_json::from_str::<Value>(message.to_text().unwrap_or(""))
                else {
                    continue;
                };
                match json["type"].as_str() {
                    Some("Speak") => text.push_str(json["text"].as_str().unwrap_or("")),
                    Some("Flush") => {
                        let job = (clears.load(Ordering::SeqCst), std::mem::take(&mut text));
                        let _ = jobs.send(job);
                    }
                    Some("Clear") => {
                        clears.fetch_add(1, Ordering::SeqCst);
                        text.clear();
                        let _ = out.send(Message::text(r#"{"type":"Cleared","sequence_id":0}"#));
                    }
                    Some("Close") => {
                        let _ = out.send(Message::Close(None));
                    }
                    _ => {}
                }
            }
        }
    })
    .await;
    (addr, received)
}

/// A speak stream through Switchyard to the sequential synthesizer, `messages` sent and
/// received upstream, then drained at once: what the client got, and the environment.
async fn speak_drained_after(messages: &[&str]) -> (Env, Vec<Message>, Option<CloseFrame>) {
    let (upstream, received) = sequential_synthesizer().await;
    let env = support::env_with_blue_at(upstream).await;
    let (mut ws, _) = open(&env.ws_url("/v1/speak")).await;
    for message in messages {
        ws.send(Message::text(*message)).await.expect("sent");
    }
    let sent = messages.len() as u64;
    eventually(|| async { received.load(Ordering::SeqCst) == sent }).await;
    env.flip_draining("green", "0s").await;
    let (got, close) = read_to_close(&mut ws).await;
    (env, got, close)
}

/// A speak drain's own `Flush` is answered after the `Clear` the client sent before it:
/// the client's `Flush` before the `Clear` gets no `Flushed`, and the drain does not wait
/// for one (it would wait out `drain.grace` and end as `drain_forced`).
#[tokio::test]
async fn speak_drain_after_a_clear_does_not_wait_for_the_cleared_flush() {
    let (env, messages, close) = speak_drained_after(&[
        r#"{"type":"Speak","text":"first"}"#,
        r#"{"type":"Flush"}"#,
        r#"{"type":"Clear"}"#,
    ])
    .await;
    assert_eq!(close_code(&close), Some(1012));
    assert!(messages.iter().all(|m| !m.is_binary()), "{messages:?}");
    eventually(|| async { closes_of(&env, "drain_graceful") == Some(1.0) }).await;
    assert_eq!(closes_of(&env, "drain_forced"), Some(0.0));
}

/// A speak drain waits for the `Flushed` that answers its own `Flush`, not for one that
/// answers a `Flush` the client sent before the deadline: the text after the client's
/// `Flush` is spoken before `Close`.
#[tokio::test]
async fn speak_drain_closes_after_its_own_flush_is_answered() {
    let (_env, messages, close) = speak_drained_after(&[
        r#"{"type":"Speak","text":"first"}"#,
        r#"{"type":"Flush"}"#,
        r#"{"type":"Speak","text":"second"}"#,
    ])
    .await;
    assert_eq!(close_code(&close), Some(1012));
    let audio: Vec<Bytes> = messages
        .iter()
        .filter(|m| m.is_binary())
        .map(|m| m.clone().into_data())
        .collect();
    assert_eq!(audio, ["first", "second"], "{messages:?}");
}

/// An upstream may send its `Flushed` in fragments (a text frame and continuations): the
/// speak drain still sees it, sends `Close` at once and ends as `drain_graceful`. Before,
/// only a `Flushed` in one frame was seen, and the drain waited out `drain.grace` (10 s
/// here) and ended as `drain_forced`.
#[tokio::test]
async fn a_fragmented_flushed_ends_a_speak_drain_at_once() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let addr = scripted_upstream(false, |mut ws| async move {
        while let Some(Ok(message)) = ws.next().await {
            let text = message.to_text().unwrap_or("").to_owned();
            if text.contains("\"Flush\"") {
                let first = Frame::message(r#"{"type":"Flu"#, OpCode::Data(Data::Text), false);
                let last = Frame::message(
                    r#"shed","sequence_id":0}"#,
                    OpCode::Data(Data::Continue),
                    true,
                );
                for frame in [first, last] {
                    if ws.send(Message::Frame(frame)).await.is_err() {
                        return;
                    }
                }
            } else if text.contains("\"Close\"") {
                let _ = ws.close(None).await;
            }
        }
    })
    .await;
    let env = support::env_with_blue_at(addr).await;
    let (mut ws, _) = open(&env.ws_url("/v1/speak")).await;
    ws.send(Message::text(r#"{"type":"Speak","text":"hello"}"#))
        .await
        .expect("sent");
    env.flip_draining("green", "0s").await;
    let (got, close) = read_to_close(&mut ws).await;
    assert_eq!(close_code(&close), Some(1012));
    let flushed: Vec<String> = got
        .iter()
        .filter_map(|m| m.to_text().ok().map(str::to_owned))
        .collect();
    assert_eq!(
        flushed,
        [r#"{"type":"Flushed","sequence_id":0}"#],
        "{got:?}"
    );
    eventually(|| async { closes_of(&env, "drain_graceful") == Some(1.0) }).await;
    assert_eq!(closes_of(&env, "drain_forced"), Some(0.0));
}

/// A client that ends its stream itself while the drain is under way gets 1000, not 1012:
/// Deepgram's JS SDK reconnects on 1012, and would revive a session its app had ended.
#[tokio::test]
async fn a_client_ending_its_stream_during_the_drain_is_not_told_to_reconnect() {
    let (env, mut ws) = speak_drained_by_a_stub_that_never_flushes("2s").await;
    let blue = env.blue[0].state.clone();
    within("the drain's Flush", blue.wait_until(|s| s.flushes() == 1)).await;
    // The client's Close crosses the drain: Switchyard drops it (its own Close follows
    // the Flush), but notes that the client is done.
    ws.send(Message::text(r#"{"type":"Close"}"#))
        .await
        .expect("Close");
    let (_, close) = read_to_close(&mut ws).await;
    assert_eq!(close_code(&close), Some(1000));
    within(
        "the stub to get Switchyard's Close",
        blue.wait_until(|s| s.speak_closes() == 1),
    )
    .await;
}

/// An upstream that never answers `CloseStream` (a finalize slower than `drain.grace`)
/// and counts the `CloseStream`s it gets.
struct SlowFinalizer {
    addr: SocketAddr,
    close_streams: Arc<AtomicU64>,
}

async fn slow_finalizer() -> SlowFinalizer {
    let close_streams = Arc::new(AtomicU64::new(0));
    let counted = close_streams.clone();
    let addr = scripted_upstream(false, move |mut ws| {
        let counted = counted.clone();
        async move {
            while let Some(Ok(message)) = ws.next().await {
                if message.to_text().is_ok_and(|t| t.contains("CloseStream")) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    })
    .await;
    SlowFinalizer {
        addr,
        close_streams,
    }
}

/// An upstream that answers `CloseStream` with a last message, then ends the connection
/// without a close frame: with a FIN, or (`reset`) with a reset.
async fn ends_after_close_stream(reset: bool) -> SocketAddr {
    scripted_upstream(reset, |mut ws| async move {
        while let Some(Ok(message)) = ws.next().await {
            if message.to_text().is_ok_and(|t| t.contains("CloseStream")) {
                let last = Message::text(r#"{"type":"TurnInfo","event":"EndOfTurn"}"#);
                let _ = ws.send(last).await;
                // Dropped: the TCP connection ends, no close frame.
                return;
            }
        }
    })
    .await
}

/// The count of `stream_closes_total` for blue and `reason`.
fn closes_of(env: &Env, reason: &str) -> Option<f64> {
    let line = format!(r#"switchyard_stream_closes_total{{color="blue",reason="{reason}"}} "#);
    env.app()
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&line)?.parse::<f64>().ok())
}

/// After a client's own `CloseStream`, an upstream that sends its last message and closes
/// the connection without a close frame (as Flux may) has ended the stream normally: the
/// client gets that message and a close with no status code, which the JS SDK takes as the
/// end (1011 would make it reconnect), and the stream is not counted as an error. A reset
/// instead is an error, but the client, which ended the stream, is told the same way.
#[tokio::test]
async fn an_upstream_closing_without_a_close_frame_after_close_stream_ends_normally() {
    for reset in [false, true] {
        let env = support::env_with_blue_at(ends_after_close_stream(reset).await).await;
        let (mut ws, _) = open(&env.ws_url("/v2/listen?model=flux-general-en")).await;
        ws.send(Message::text(r#"{"type":"CloseStream"}"#))
            .await
            .expect("sent");
        let (messages, close) = read_to_close(&mut ws).await;
        assert!(close.is_none(), "a close with no status code: {close:?}");
        let (counted, not) = if reset {
            ("error", "upstream")
        } else {
            assert_eq!(json_of(&messages[0])["event"], "EndOfTurn");
            ("upstream", "error")
        };
        eventually(|| async { closes_of(&env, counted) == Some(1.0) }).await;
        assert_eq!(closes_of(&env, not), Some(0.0));
        let broke_off = if reset { 1.0 } else { 0.0 };
        assert_eq!(env.upstream_errors("protocol"), broke_off);
    }
}

/// An upstream whose connection breaks (a reset) after the drain's `CloseStream` is a
/// transport failure, counted as `error`, not as a graceful drain; the client is still
/// told to reconnect.
#[tokio::test]
async fn an_upstream_reset_after_the_drain_message_is_an_error_and_the_client_reconnects() {
    let addr = ends_after_close_stream(true).await;
    let env = support::env_with_blue_at(addr).await;
    let (mut ws, _) = open(&env.ws_url("/v1/listen")).await;
    env.flip_draining("green", "0s").await;
    let (_, close) = read_to_close(&mut ws).await;
    assert_eq!(close_code(&close), Some(1012));
    eventually(|| async { closes_of(&env, "error") == Some(1.0) }).await;
    assert_eq!(closes_of(&env, "drain_graceful"), Some(0.0));
    assert_eq!(env.upstream_errors("protocol"), 1.0);
}

/// A client that sent `CloseStream` before the drain deadline is ending its stream
/// already: no second `CloseStream` goes upstream, and when grace runs out the client
/// gets 1000, not the 1012 that would make the JS SDK reconnect.
#[tokio::test]
async fn a_client_that_ended_before_the_deadline_gets_no_drain_message_and_no_1012() {
    let upstream = slow_finalizer().await;
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        grace: "300ms",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    env.write_config(
        &builder,
        &format!("\"http://{}\"", upstream.addr),
        &format!("\"{}\"", env.green[0].url()),
    );
    env.reload().await;

    let (mut ws, _) = open(&env.ws_url("/v1/listen")).await;
    ws.send(Message::binary(vec![1u8; 640]))
        .await
        .expect("audio");
    ws.send(Message::text(r#"{"type":"CloseStream"}"#))
        .await
        .expect("CloseStream");
    eventually(|| async { upstream.close_streams.load(Ordering::SeqCst) == 1 }).await;
    env.flip_draining("green", "0s").await;

    let (_, close) = read_to_close(&mut ws).await;
    assert_eq!(close_code(&close), Some(1000));
    assert_eq!(
        upstream.close_streams.load(Ordering::SeqCst),
        1,
        "the client's CloseStream only"
    );
}

/// Forwards TCP connections to a stub and records each one's first request head, so a test
/// can see the exact request line Switchyard sent (the stub records headers only).
/// Optionally it holds `GET /v1/listen` handshakes until released, to put an upstream
/// handshake in flight across a route change.
struct Tap {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    gate: Arc<Gate>,
    task: tokio::task::JoinHandle<()>,
}

/// Holds `/v1/listen` handshakes at the tap while `closed`.
#[derive(Default)]
struct Gate {
    closed: AtomicBool,
    /// A permit per handshake that arrived and is being held.
    held: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tap(target: SocketAddr) -> Tap {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the tap");
    let addr = listener.local_addr().expect("tap address");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Gate::default());
    let (recorded, gates) = (heads.clone(), gate.clone());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let (heads, gate) = (recorded.clone(), gates.clone());
            conns.spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    match client.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                    if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end;
                    }
                };
                let text = String::from_utf8_lossy(&head[..end]).into_owned();
                let hold =
                    text.starts_with("GET /v1/listen") && gate.closed.load(Ordering::Acquire);
                heads.lock().expect("tap lock").push(text);
                if hold {
                    gate.held.notify_one();
                    gate.release.notified().await;
                }
                if upstream.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    Tap {
        addr,
        heads,
        gate,
        task,
    }
}

/// Switchyard with blue behind a `Tap`, built as `EnvBuilder::start` does.
async fn env_with_tapped_blue() -> (Env, Tap) {
    let builder = EnvBuilder::default();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin.token"), support::TOKEN).expect("token file");
    let spawn = |name: &str| {
        switchyard::stub::spawn(StubOptions {
            name: name.to_owned(),
            ..Default::default()
        })
    };
    let blue: StubHandle = spawn("blue").await.expect("blue stub");
    let green: StubHandle = spawn("green").await.expect("green stub");
    let tap = tap(blue.addr).await;
    let text = builder.config_text(
        dir.path(),
        &format!("\"http://{}\"", tap.addr),
        &format!("\"{}\"", green.url()),
    );
    let config_path = dir.path().join("switchyard.toml");
    std::fs::write(&config_path, text).expect("config file");
    let config = switchyard::config::Config::load(&config_path).expect("valid config");
    let app = switchyard::app::start(config)
        .await
        .expect("switchyard starts");
    let env = Env {
        dir,
        blue: vec![blue],
        green: vec![green],
        app: Some(app),
        config_path,
        client: support::http_client(),
    };
    (env, tap)
}

/// The browser-style handshake: `token, KEY` reaches the upstream unchanged, and although the
/// stub picks no subprotocol the client gets `token` chosen (tungstenite's client, like a
/// browser, fails a handshake that picks none of those offered). Path, query, `Authorization`
/// and the session id arrive intact.
#[tokio::test]
async fn handshake_passes_subprotocol_auth_session_path_and_query() {
    let (env, tap) = env_with_tapped_blue().await;
    let path = "/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&keywords=caf%C3%A9:2&tag=a%2Cb&tag=c";
    let (mut ws, response) = open_with(
        &env.ws_url(path),
        &[
            ("sec-websocket-protocol", "token, KEY123"),
            ("authorization", "Token KEY123"),
            (
                "x-deepgram-session-id",
                "5f0c1d2e-aaaa-bbbb-cccc-0123456789ab",
            ),
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
        ],
    )
    .await;
    assert_eq!(color_of(&response), "blue");
    assert_eq!(response.headers()["sec-websocket-protocol"], "token");
    assert!(
        response.headers().get("sec-websocket-extensions").is_none(),
        "permessage-deflate is not accepted from the client"
    );

    let seen = env.blue[0].state.last_headers();
    assert_eq!(seen["sec-websocket-protocol"], "token, KEY123");
    assert_eq!(seen["authorization"], "Token KEY123");
    assert_eq!(
        seen["x-deepgram-session-id"],
        "5f0c1d2e-aaaa-bbbb-cccc-0123456789ab"
    );
    assert!(
        seen.get("sec-websocket-extensions").is_none(),
        "no extension is offered upstream"
    );
    let heads = tap.heads.lock().expect("tap lock").clone();
    let request_line = heads
        .iter()
        .filter_map(|h| h.lines().next())
        .find(|l| l.contains("/v1/listen"))
        .unwrap_or_else(|| panic!("no /v1/listen request in {heads:?}"));
    assert_eq!(request_line, format!("GET {path} HTTP/1.1"));

    // And the stream works end to end.
    ws.send(audio(RESULT_BYTES)).await.expect("audio sent");
    let result = next_json(&mut ws).await;
    assert_eq!(transcript(&result), "blue 1");
}

/// A stream whose upstream handshake is still in flight when the flip happens was routed to
/// the old colour before the change, so it drains with the streams opened before it.
#[tokio::test]
async fn stream_whose_handshake_straddles_the_flip_is_drained() {
    let (env, tap) = env_with_tapped_blue().await;
    tap.gate.closed.store(true, Ordering::Release);
    let url = env.ws_url("/v1/listen");
    let opening = tokio::spawn(async move { Listen::open(&url).await });
    within(
        "the upstream handshake to reach blue",
        tap.gate.held.notified(),
    )
    .await;
    env.flip_draining("green", "1s").await;
    tap.gate.release.notify_one();
    let (mut stream, response) = within("the handshake", opening)
        .await
        .expect("the handshake succeeds");
    assert_eq!(color_of(&response), "blue");
    stream.expect_drained("blue").await;
    assert_eq!(env.blue[0].state.close_streams(), 1);
}

/// Frames of the flood in the back-pressure scenarios.
const FLOOD_FRAME: usize = 256 * 1024;

/// How much a client may get sent while it reads nothing: a bound on what the proxy holds,
/// with room for the loopback socket buffers on both of its connections.
const FLOOD_BOUND: u64 = 64 << 20;

/// Frame `i` of a flood: its number, then its low byte repeated.
fn flood_frame(i: u64) -> Message {
    let mut data = vec![i as u8; FLOOD_FRAME];
    data[..8].copy_from_slice(&i.to_le_bytes());
    Message::Binary(Bytes::from(data))
}

/// A client sending flood frames to `/v1/agent/converse` (which echoes them) as fast as its
/// sends complete, and reading nothing, until stopped or the connection fails.
struct Flood {
    /// Frames whose send completed.
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sender: tokio::task::JoinHandle<(SplitSink<Ws, Message>, Result<(), WsError>)>,
}

impl Flood {
    fn start(mut tx: SplitSink<Ws, Message>) -> Flood {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (sent, stop) = (sent.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = tx.send(flood_frame(i)).await {
                        return (tx, Err(e));
                    }
                    i += 1;
                    sent.store(i, Ordering::Release);
                }
                (tx, Ok(()))
            })
        };
        Flood { sent, stop, sender }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Waits until the sends stop completing, asserting all along that fewer than
    /// `FLOOD_BOUND` bytes got sent; returns the frames sent.
    ///
    /// A stall is the absence of an event, so it can only be observed by looking: the
    /// sender has stalled when ten consecutive 100 ms ticks see no send complete. A slow
    /// machine can only make this fire early, which makes the bound easier, never flaky.
    async fn until_stalled(&self) -> u64 {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let (mut last, mut still) = (u64::MAX, 0);
        within("the sender to stall", async {
            while still < 10 {
                tick.tick().await;
                let now = self.sent();
                assert!(
                    now * (FLOOD_FRAME as u64) < FLOOD_BOUND,
                    "{now} frames of {FLOOD_FRAME} bytes sent without the client reading"
                );
                if now == last {
                    still += 1;
                } else {
                    (last, still) = (now, 0);
                }
            }
        })
        .await;
        let stalled = self.sent();
        assert!(stalled > 0, "the flood started");
        stalled
    }
}

/// A client that stops reading while the upstream echoes a flood: its sends stop completing
/// after a bounded amount (the proxy does not buffer without limit), and once it reads again
/// every frame comes back, in order and intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_bounds_buffering_and_loses_nothing() {
    let env = EnvBuilder::default().start().await;
    let (mut ws, _) = open(&env.ws_url("/v1/agent/converse")).await;
    assert_eq!(next_json(&mut ws).await["type"], "Welcome");
    let (tx, mut rx) = ws.split();
    let flood = Flood::start(tx);
    let at_stall = flood.until_stalled().await;
    flood.stop.store(true, Ordering::Release);

    // Read everything back; the sender finishes its blocked send as we read.
    let mut sender = Some(flood.sender);
    let mut tx = None;
    let mut got = 0u64;
    within("every echoed frame", async {
        loop {
            if tx.is_some() && got == flood.sent.load(Ordering::Acquire) {
                break;
            }
            tokio::select! {
                joined = async { sender.as_mut().expect("running").await }, if sender.is_some() => {
                    let (sink, result) = joined.expect("the sender task ends");
                    result.expect("every send completes");
                    tx = Some(sink);
                    sender = None;
                }
                message = rx.next() => match message {
                    Some(Ok(Message::Binary(data))) => {
                        assert_eq!(data.len(), FLOOD_FRAME);
                        let i = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                        assert_eq!(i, got, "frames arrive in order");
                        assert!(data[8..].iter().all(|&b| b == i as u8), "frame {i} intact");
                        got += 1;
                    }
                    other => panic!("expected an echoed binary frame, got {other:?}"),
                },
            }
        }
    })
    .await;
    assert!(got >= at_stall);
    let mut ws = tx.expect("sender joined").reunite(rx).expect("same stream");
    ws.send(Message::Close(None)).await.expect("close sent");
    let (rest, _) = read_to_close(&mut ws).await;
    assert!(rest.is_empty(), "{rest:?}");
}

/// A client that stopped reading cannot hold a draining stream open: at the deadline its
/// stream ends on the upstream too, and the old colour drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_a_stream_whose_client_stopped_reading() {
    let env = EnvBuilder::default().start().await;
    let (mut ws, _) = open(&env.ws_url("/v1/agent/converse")).await;
    assert_eq!(next_json(&mut ws).await["type"], "Welcome");
    let (tx, _rx) = ws.split();
    let flood = Flood::start(tx);
    flood.until_stalled().await;

    env.flip_draining("green", "1s").await;
    let blue = &env.blue[0].state;
    within(
        "the upstream session to end",
        blue.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
    let (status, body) = env.admin_get("/drain/wait?color=blue&timeout=20s").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["drained"], true, "{body}");
}

/// Upstream close codes and reasons reach the client; a dead upstream becomes 1011.
#[tokio::test]
async fn upstream_close_code_and_reason_pass_through() {
    let env = EnvBuilder::default().start().await;
    let url = env.ws_url("/v1/listen");

    let (mut ws, _) = open(&url).await;
    ws.send(Message::text(
        json!({"type": "StubClose", "code": 1011, "reason": "NET-0001"}).to_string(),
    ))
    .await
    .expect("sent");
    let (rest, close) = read_to_close(&mut ws).await;
    assert!(rest.is_empty(), "{rest:?}");
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1011);
    assert_eq!(close.reason.as_str(), "NET-0001");

    // A code Switchyard never sends itself, so only passthrough can produce it.
    let (mut ws, _) = open(&url).await;
    ws.send(Message::text(
        json!({"type": "StubClose", "code": 1008, "reason": "DATA-0000"}).to_string(),
    ))
    .await
    .expect("sent");
    let (_, close) = read_to_close(&mut ws).await;
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "DATA-0000");

    let (mut ws, _) = open(&url).await;
    ws.send(audio(RESULT_BYTES)).await.expect("sent");
    assert_eq!(next_json(&mut ws).await["type"], "Results");
    ws.send(Message::text(json!({"type": "StubDie"}).to_string()))
        .await
        .expect("sent");
    let (rest, close) = read_to_close(&mut ws).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(close_code(&close), Some(1011));
    // Only the upstream that broke off, not those that closed with a code of their own,
    // counts against it.
    eventually(|| async { env.upstream_errors("protocol") == 1.0 }).await;
    assert_eq!(env.upstream_errors("timeout"), 0.0);
}

/// An upgrade the upstream refuses comes back as it was: status and Deepgram's headers,
/// tagged with the colour.
#[tokio::test]
async fn refused_upgrade_passes_through_with_its_headers() {
    let env = EnvBuilder::default().start().await;
    let url = env.ws_url("/v1/listen?model=nova-3&stub_status=429");
    let error = within("the refusal", connect_async(url))
        .await
        .expect_err("the upgrade is refused");
    let WsError::Http(response) = error else {
        panic!("expected an HTTP refusal, got {error}");
    };
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["dg-error"], "stub refused");
    assert_eq!(response.headers()["x-switchyard-color"], "blue");
    assert!(response.headers().contains_key("dg-request-id"));
    assert_eq!(env.blue[0].state.ws_refused(), 1);
}

/// The Voice Agent cannot survive a reconnect, so it is closed only at the deadline: it
/// echoes after the flip, then gets 1012 no earlier than the drain timeout.
#[tokio::test]
async fn agent_stream_closes_at_the_deadline_not_before() {
    let env = EnvBuilder::default().start().await;
    let (mut ws, response) = open(&env.ws_url("/v1/agent/converse")).await;
    assert_eq!(color_of(&response), "blue");
    assert_eq!(next_json(&mut ws).await["type"], "Welcome");

    let before_flip = Instant::now();
    env.flip_draining("green", "2s").await;
    let hello = json!({"type": "InjectUserMessage", "content": "still there?"}).to_string();
    ws.send(Message::text(hello.clone())).await.expect("sent");
    assert_eq!(next(&mut ws).await, Message::text(hello));
    ws.send(Message::Binary(Bytes::from_static(b"pcm")))
        .await
        .expect("sent");
    assert_eq!(
        next(&mut ws).await,
        Message::Binary(Bytes::from_static(b"pcm"))
    );

    let (rest, close) = read_to_close(&mut ws).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(close_code(&close), Some(1012));
    assert!(
        before_flip.elapsed() >= Duration::from_secs(2),
        "closed {:?} after the flip, before its 2 s deadline",
        before_flip.elapsed()
    );
    let blue = &env.blue[0].state;
    within(
        "the upstream session to end",
        blue.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
    // No drain message exists for it: the deadline forces the end.
    eventually(|| async { closes_of(&env, "drain_forced") == Some(1.0) }).await;
    assert_eq!(closes_of(&env, "drain_graceful"), Some(0.0));
}

/// A zero drain timeout ends old streams at once, still gracefully.
#[tokio::test]
async fn zero_drain_timeout_drains_at_once() {
    let env = EnvBuilder::default().start().await;
    let (mut stream, _) = Listen::open(&env.ws_url("/v1/listen")).await;
    stream.send_confirmed(&[1600, RESULT_BYTES]).await;
    let flipped = std::time::Instant::now();
    env.flip_draining("green", "0s").await;
    stream.expect_drained("blue").await;
    // The stub answers CloseStream at once, so the close comes without waiting out anything
    // (grace is 10 s): well under the bound even on a busy machine.
    assert!(
        flipped.elapsed() < std::time::Duration::from_secs(5),
        "drained at once, not after a delay: {:?}",
        flipped.elapsed()
    );
    assert_eq!(stream.results.len(), 2);
    assert_eq!(env.blue[0].state.close_streams(), 1);
}

/// Graceful shutdown drains open streams like a flip does, and then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_streams_then_completes() {
    let mut env = EnvBuilder {
        drain_timeout: "1s",
        ..Default::default()
    }
    .start()
    .await;
    let url = env.ws_url("/v1/listen");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let (mut stream, _) = Listen::open(&url).await;
        stream.send_confirmed(&[500, RESULT_BYTES]).await;
        streams.push(stream);
    }
    let blue = env.blue[0].state.clone();
    let drained = futures_util::future::join_all(
        streams
            .iter_mut()
            .map(|stream| async move { stream.expect_drained("blue").await }),
    );
    within("shutdown and the drained streams", async {
        tokio::join!(env.shutdown(), drained)
    })
    .await;
    assert_eq!(blue.close_streams(), 3);
}

/// An empty binary frame means end-of-stream to Deepgram; Switchyard never forwards one.
#[tokio::test]
async fn empty_binary_frames_are_not_forwarded() {
    let env = EnvBuilder::default().start().await;
    let (mut stream, _) = Listen::open(&env.ws_url("/v1/listen")).await;
    stream
        .ws
        .send(Message::Binary(Bytes::new()))
        .await
        .expect("sent");
    let fresh = stream.send_confirmed(&[RESULT_BYTES]).await;
    assert_eq!(transcript(&fresh[0]), "blue 1");
    let blue = &env.blue[0].state;
    assert_eq!(blue.audio_bytes(), RESULT_BYTES as u64);
    assert_eq!(blue.ws_open_now(), 1, "the stub did not end the stream");
    stream.close_normally().await;
}

/// `/status` shows the draining colour with its streams and deadline, and `/drain/wait`
/// answers once they are gone.
#[tokio::test]
async fn status_shows_draining_and_drain_wait_sees_the_end() {
    const STREAMS: usize = 3;
    let env = EnvBuilder::default().start().await;
    let url = env.ws_url("/v1/listen");
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (mut stream, _) = Listen::open(&url).await;
        stream.send_confirmed(&[RESULT_BYTES]).await;
        streams.push(stream);
    }
    // The default drain timeout (30 minutes) keeps them draining for the whole test.
    env.flip("green").await;
    let (status, body) = env.admin_get("/status").await;
    assert_eq!(status, StatusCode::OK);
    let blue = &body["colors"]["blue"];
    assert_eq!(blue["state"], "draining", "{body}");
    assert_eq!(blue["open_streams"], STREAMS, "{body}");
    assert!(blue["drain_deadline"].is_string(), "{body}");
    assert_eq!(body["colors"]["green"]["state"], "active", "{body}");

    let (status, body) = env.admin_get("/drain/wait?color=blue&timeout=0s").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["drained"], false, "{body}");
    assert_eq!(body["open_streams"], STREAMS, "{body}");

    let wait = env.admin_get("/drain/wait?color=blue&timeout=20s");
    let close_all = async {
        for stream in streams {
            stream.close_normally().await;
        }
    };
    let ((status, body), ()) = within("drain/wait", async { tokio::join!(wait, close_all) }).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["drained"], true, "{body}");
    let (_, body) = env.admin_get("/status").await;
    assert_eq!(body["colors"]["blue"]["state"], "standby", "{body}");
    assert_eq!(body["colors"]["blue"]["open_streams"], 0, "{body}");
}

/// The usual drain: the client keeps streaming audio through the deadline. Every Results
/// the stub sent reaches the client, they cover every byte the stub got (audio after the
/// injected `CloseStream` is dropped by the proxy, not sent), then Metadata and 1012.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_drain_while_the_client_keeps_streaming() {
    let env = EnvBuilder::default().start().await;
    let (ws, _) = open(&env.ws_url("/v1/listen")).await;
    let (mut tx, mut rx) = ws.split();
    // Real-time-ish audio: 1000 bytes every 20 ms, until the stream is closed.
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if tx.send(audio(1000)).await.is_err() {
                return tx;
            }
        }
    });
    let mut messages = Vec::new();
    let close = within("the drain to end the stream", async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(message)) => {
                    let first = messages.is_empty();
                    messages.push(json_of(&message));
                    if first {
                        // Streaming is under way: flip.
                        env.flip_draining("green", "1s").await;
                    }
                }
                other => panic!("expected a message or a close, got {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(close_code(&close), Some(1012));
    let tx = within("the sender to stop", sender)
        .await
        .expect("the sender ends");
    let mut ws = tx.reunite(rx).expect("same stream");
    within("the end of the close handshake", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;

    let (metadata, results) = messages.split_last().expect("Metadata");
    assert_eq!(metadata["type"], "Metadata", "{metadata}");
    assert!(results.iter().all(|r| r["type"] == "Results"));
    assert!(results.iter().all(|r| transcript(r).starts_with("blue ")));
    assert_eq!(results.last().expect("a final")["from_finalize"], true);
    let blue = &env.blue[0].state;
    assert_eq!(blue.final_results_sent(), results.len() as u64);
    assert_eq!(
        results.len() as u64,
        blue.audio_bytes() / RESULT_BYTES as u64 + 1
    );
    assert_eq!(blue.close_streams(), 1);
}

/// Flux (`/v2/listen`) closes without a status code after `CloseStream`: a normal end of
/// its drain, which the client sees as 1012 after the last update.
#[tokio::test]
async fn flux_drain_ends_with_1012() {
    let env = EnvBuilder::default().start().await;
    let (mut ws, _) = open(&env.ws_url("/v2/listen?model=flux-general-en")).await;
    assert_eq!(next_json(&mut ws).await["type"], "Connected");
    ws.send(audio(RESULT_BYTES)).await.expect("sent");
    let update = next_json(&mut ws).await;
    assert_eq!(update["type"], "TurnInfo", "{update}");
    assert_eq!(update["transcript"], "blue 1", "{update}");
    env.flip_draining("green", "0s").await;
    let (messages, close) = read_to_close(&mut ws).await;
    assert_eq!(close_code(&close), Some(1012));
    let last = json_of(messages.last().expect("the final update"));
    assert_eq!(last["type"], "TurnInfo", "{last}");
    assert_eq!(env.blue[0].state.close_streams(), 1);
}

/// Frames are passed on as they came: a client's ping reaches the upstream, whose pong is
/// the only one the client gets (Switchyard does not answer it too), and a fragmented
/// message arrives whole.
#[tokio::test]
async fn pings_and_fragments_pass_through() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let env = EnvBuilder::default().start().await;
    let (mut ws, _) = open(&env.ws_url("/v1/agent/converse")).await;
    assert_eq!(next_json(&mut ws).await["type"], "Welcome");

    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .expect("ping sent");
    // The Voice Agent stub echoes; its echo comes after its pong.
    ws.send(Message::text("after the ping"))
        .await
        .expect("text sent");
    let mut pongs = 0;
    within("the echo after the ping", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(payload))) => {
                    assert_eq!(&payload[..], b"are you there");
                    pongs += 1;
                }
                Some(Ok(Message::Text(text))) => {
                    assert_eq!(text.as_str(), "after the ping");
                    return;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(pongs, 1, "one pong, the upstream's");

    let first = Frame::message(&b"frag"[..], OpCode::Data(Data::Text), false);
    let last = Frame::message(&b"mented"[..], OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(first))
        .await
        .expect("first fragment");
    ws.send(Message::Frame(last)).await.expect("last fragment");
    match next(&mut ws).await {
        Message::Text(text) => assert_eq!(text.as_str(), "fragmented"),
        other => panic!("expected the echoed message, got {other:?}"),
    }
    ws.close(None).await.expect("close sent");
}

/// A client that breaks the WebSocket protocol gets close code 1002: an unmasked frame, a
/// continuation with no message open, a close code no peer may send.
#[tokio::test]
async fn a_client_breaking_the_protocol_gets_1002() {
    let env = EnvBuilder::default().start().await;
    // Masked with a zero key, so the payload reads as written.
    let masked = |b0: u8, payload: &[u8]| {
        let mut frame = vec![b0, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        frame
    };
    let cases = [
        ("an unmasked binary frame", vec![0x82, 0x01, 0x00]),
        ("a continuation with no message", masked(0x80, b"x")),
        ("close code 999", masked(0x88, &999u16.to_be_bytes())),
    ];
    for (what, wire) in cases {
        client_gets_1002_after(&env, &wire)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// Opens an agent stream with a raw handshake: the socket just after the answer's head,
/// or the head if it is not a 101.
async fn raw_agent_stream(env: &Env) -> Result<TcpStream, String> {
    let addr = env.app().proxy_addr;
    let mut socket = within("a connection", TcpStream::connect(addr))
        .await
        .expect("connected");
    let handshake = format!(
        "GET /v1/agent/converse HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    socket
        .write_all(handshake.as_bytes())
        .await
        .expect("handshake sent");
    let mut head = Vec::new();
    within("the 101", async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            socket.read_exact(&mut byte).await.expect("the answer");
            head.push(byte[0]);
        }
    })
    .await;
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(String::from_utf8_lossy(&head).into_owned());
    }
    Ok(socket)
}

/// Opens an agent stream with a raw handshake, writes `wire`, and reads until a 1002 close
/// frame comes (the stub's Welcome may come first).
async fn client_gets_1002_after(env: &Env, wire: &[u8]) -> Result<(), String> {
    let mut socket = raw_agent_stream(env).await?;
    socket.write_all(wire).await.expect("sent");
    let is_1002 = |w: &[u8]| w[0] == 0x88 && w[2..4] == 1002u16.to_be_bytes();
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(PATIENCE, async {
        while !received.windows(4).any(is_1002) {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    if read != Ok(true) {
        return Err(format!("no 1002 close frame: {received:?}"));
    }
    let close = received.windows(4).position(is_1002).expect("found above");
    if received[close + 1] & 0x80 != 0 {
        return Err("server frames are unmasked".into());
    }
    Ok(())
}

/// A masked close frame's code, as the upstream reads it.
fn masked_close_code(frame: &[u8]) -> Option<u16> {
    (frame.first() == Some(&0x88) && frame.len() >= 8).then(|| {
        let mask = &frame[2..6];
        u16::from_be_bytes([frame[6] ^ mask[0], frame[7] ^ mask[1]])
    })
}

/// A drain deadline that comes while an upstream frame is half relayed: the rest of the
/// frame goes on, then the 1012, so the client is told to reconnect rather than seeing its
/// stream fail; the upstream gets its 1001 as always.
#[tokio::test]
async fn a_frame_half_relayed_at_the_deadline_is_finished_before_the_1012() {
    // A binary frame of 1,000 bytes, unmasked as an upstream sends it.
    let mut frame = vec![0x82, 126, 0x03, 0xE8];
    frame.extend((0..1000).map(|i| (i % 251) as u8));
    let (rest_tx, rest_rx) = tokio::sync::oneshot::channel::<()>();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let sent = frame.clone();
    let addr = hand_written_upstream(frame[..504].to_vec(), |mut socket| async move {
        let _ = rest_rx.await;
        socket.write_all(&sent[504..]).await.expect("the rest");
        // What comes back: Switchyard's close (masked), then nothing.
        let mut back = Vec::new();
        let _ = socket.read_to_end(&mut back).await;
        let _ = close_tx.send(back);
    })
    .await;
    let env = support::env_with_blue_at(addr).await;
    let mut client = raw_agent_stream(&env).await.expect("a 101");
    let mut received = vec![0u8; 504];
    within("half the frame", client.read_exact(&mut received))
        .await
        .expect("half the frame");

    env.flip_draining("green", "0s").await;
    rest_tx.send(()).expect("the upstream waits");
    within("the rest and the close", client.read_to_end(&mut received))
        .await
        .expect("read to the end");
    assert!(
        received.len() > frame.len(),
        "{} bytes, no close after the frame",
        received.len()
    );
    assert_eq!(received[..frame.len()], frame[..], "the frame, whole");
    let close = &received[frame.len()..];
    assert_eq!(close[0], 0x88, "a close frame follows: {close:?}");
    assert_eq!(close[2..4], 1012u16.to_be_bytes(), "{close:?}");

    let back = within("the upstream's close", close_rx)
        .await
        .expect("sent");
    assert_eq!(masked_close_code(&back), Some(1001), "{back:?}");
}

/// An upstream that closes while a client frame is half relayed: the client gets the close
/// at once (it need not first send the rest of its frame), and the upstream gets the rest
/// of the frame and then the answer to its close.
#[tokio::test]
async fn an_upstream_close_reaches_a_client_halfway_through_a_frame() {
    // A masked binary frame of 1,000 bytes, the mask all zeros.
    let mut frame = vec![0x82, 0x80 | 126, 0x03, 0xE8, 0, 0, 0, 0];
    frame.extend((0..1000).map(|i| (i % 251) as u8));
    let (back_tx, back_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let addr = hand_written_upstream(Vec::new(), |mut socket| async move {
        let mut back = vec![0u8; 108];
        socket
            .read_exact(&mut back)
            .await
            .expect("the start of a frame");
        let mut close = vec![0x88, 10, 0x03, 0xF3];
        close.extend_from_slice(b"NET-0001");
        socket.write_all(&close).await.expect("the close");
        let _ = socket.read_to_end(&mut back).await;
        let _ = back_tx.send(back);
    })
    .await;
    let env = support::env_with_blue_at(addr).await;
    let mut client = raw_agent_stream(&env).await.expect("a 101");
    client.write_all(&frame[..108]).await.expect("sent");
    let mut close = [0u8; 12];
    within("the upstream's close", client.read_exact(&mut close))
        .await
        .expect("a close");
    assert_eq!(close[..4], [0x88, 10, 0x03, 0xF3]);
    assert_eq!(&close[4..], b"NET-0001");
    // The rest of the frame, then the answer to the close.
    client.write_all(&frame[108..]).await.expect("sent");
    client
        .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xF3])
        .await
        .expect("sent");
    let back = within("what the upstream got", back_rx)
        .await
        .expect("sent");
    assert_eq!(
        back.len().min(frame.len()),
        frame.len(),
        "{} bytes",
        back.len()
    );
    assert_eq!(back[..frame.len()], frame[..]);
    assert_eq!(masked_close_code(&back[frame.len()..]), Some(1011));
}

/// An upstream that breaks the protocol (a reserved opcode) is told so with 1002 before
/// its connection is closed, and the client gets 1011 and reconnects.
#[tokio::test]
async fn an_upstream_breaking_the_protocol_gets_1002_and_the_client_1011() {
    let (back_tx, back_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let addr = hand_written_upstream(vec![0x83, 0x00], |mut socket| async move {
        let mut back = Vec::new();
        let _ = socket.read_to_end(&mut back).await;
        let _ = back_tx.send(back);
    })
    .await;
    let env = support::env_with_blue_at(addr).await;
    let (mut ws, _) = open(&env.ws_url("/v1/agent/converse")).await;
    let (messages, close) = read_to_close(&mut ws).await;
    assert!(messages.is_empty(), "{messages:?}");
    assert_eq!(close_code(&close), Some(1011));
    let back = within("what the upstream got", back_rx)
        .await
        .expect("sent");
    assert_eq!(masked_close_code(&back), Some(1002), "{back:?}");
    assert_eq!(env.upstream_errors("protocol"), 1.0);
}

/// A client's close goes to the upstream, and the client gets what the upstream sends
/// until it answers (a last result), then the upstream's own close, code and reason: the
/// closing handshake passes through as on a direct connection.
#[tokio::test]
async fn a_clients_close_is_answered_by_the_upstream_after_its_last_messages() {
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let addr = hand_written_upstream(Vec::new(), |mut socket| async move {
        let mut back = Vec::new();
        let mut chunk = [0u8; 256];
        while masked_close_code(&back).is_none() {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => back.extend_from_slice(&chunk[..n]),
            }
        }
        let mut answer = upstream_text(r#"{"type":"Results","is_final":true}"#);
        answer.extend_from_slice(&[0x88, 6, 0x0F, 0xA0]);
        answer.extend_from_slice(b"done");
        socket.write_all(&answer).await.expect("the last words");
        let _ = close_tx.send(back);
    })
    .await;
    let env = support::env_with_blue_at(addr).await;
    let (mut ws, _) = open(&env.ws_url("/v1/listen")).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close sent");
    let (messages, close) = read_to_close(&mut ws).await;
    assert_eq!(
        messages,
        [Message::text(r#"{"type":"Results","is_final":true}"#)]
    );
    let close = close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4000, "done")
    );
    let back = within("the client's close upstream", close_rx)
        .await
        .expect("sent");
    assert_eq!(masked_close_code(&back), Some(1000), "{back:?}");
    eventually(|| async { closes_of(&env, "client") == Some(1.0) }).await;
}

/// A handshake whose upstream has not answered by its colour's drain deadline holds the
/// colour no longer: the client gets 503 `drain_deadline` (and may retry, on the active
/// colour), and the old colour drains.
#[tokio::test]
async fn a_handshake_unanswered_at_the_drain_deadline_gets_503() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (read_tx, read) = tokio::sync::oneshot::channel();
    // Reads the upgrade request and never answers it.
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if socket.read_exact(&mut byte).await.is_err() {
                return;
            }
            head.push(byte[0]);
        }
        let _ = read_tx.send(());
        let _ = socket.read_to_end(&mut head).await;
    });
    let env = support::env_with_blue_at(addr).await;
    let url = env.ws_url("/v1/listen");
    let handshake = tokio::spawn(async move { connect_async(url).await.map(|_| ()) });
    within("the upgrade request upstream", read)
        .await
        .expect("read");
    env.flip_draining("green", "0s").await;
    let answer = within("the handshake's answer", handshake)
        .await
        .expect("the task");
    match answer {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body = response.body().as_deref().unwrap_or_default();
            let body: Value = serde_json::from_slice(body).expect("JSON");
            assert_eq!(body["error"], "drain_deadline", "{body}");
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    let (code, body) = env.admin_get("/drain/wait?color=blue&timeout=20s").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["drained"], true, "{body}");
}

/// A handshake counts as traffic on its colour from its connect on: while the upstream's
/// TLS handshake is still under way, `/status` shows it in flight and the colour is not
/// drained.
#[tokio::test]
async fn a_handshake_still_connecting_counts_as_traffic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (accepted_tx, accepted) = tokio::sync::oneshot::channel();
    // Takes the connection and never answers its TLS hello.
    tokio::spawn(async move {
        if let Ok((socket, _)) = listener.accept().await {
            let _ = accepted_tx.send(socket);
        }
    });
    // A CA to name, so the https:// pool does not rest on the machine's own bundle.
    let ca = tempfile::tempdir().expect("tempdir");
    let ca_file = ca.path().join("ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a cert");
    std::fs::write(&ca_file, cert.cert.pem()).expect("ca file");
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        extra: format!("\n[upstream_tls]\nca_file = \"{}\"\n", ca_file.display()),
        ..Default::default()
    };
    let env = builder.clone().start().await;
    env.write_config(
        &builder,
        &format!("\"https://127.0.0.1:{}\"", addr.port()),
        &format!("\"{}\"", env.green[0].url()),
    );
    env.reload().await;
    let url = env.ws_url("/v1/listen");
    let client = tokio::spawn(async move { connect_async(url).await.map(|_| ()) });
    let _held = within("the upstream connection", accepted)
        .await
        .expect("accepted");

    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["colors"]["blue"]["in_flight"], 1, "{status}");
    let (code, body) = env.admin_get("/drain/wait?color=blue&timeout=0s").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["drained"], false, "{body}");
    client.abort();
}

/// While a shutdown drains, `/readyz` says so (a balancer stops sending connections) and
/// `/status` shows the deadline the open streams now have, the active colour's included.
#[tokio::test]
async fn status_and_readyz_show_a_shutdown_in_progress() {
    let mut env = EnvBuilder::default().start().await;
    let (status, body) = env.admin_get("/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["shutting_down"], false, "{body}");
    assert_eq!(body["shutdown_deadline"], Value::Null, "{body}");
    let (mut stream, _) = Listen::open(&env.ws_url("/v1/listen")).await;
    stream.send_confirmed(&[RESULT_BYTES]).await;

    env.app().shutdown();
    eventually(|| async { env.admin_get("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE })
        .await;
    let (_, ready) = env.admin_get("/readyz").await;
    assert_eq!(ready["error"], "shutting_down", "{ready}");
    let (_, body) = env.admin_get("/status").await;
    assert_eq!(body["shutting_down"], true, "{body}");
    let deadline = body["shutdown_deadline"].as_str().expect("a deadline");
    assert_eq!(body["colors"]["blue"]["state"], "active", "{body}");
    assert_eq!(body["colors"]["blue"]["drain_deadline"], deadline, "{body}");
    assert_eq!(
        body["colors"]["green"]["drain_deadline"],
        Value::Null,
        "{body}"
    );

    // The stream is still served until it ends (the drain timeout is 30 minutes).
    let more = stream.send_confirmed(&[RESULT_BYTES]).await;
    assert_eq!(transcript(&more[0]), "blue 2");
    stream.close_normally().await;
    env.shutdown().await;
}

/// An upstream that answers every handshake with `name: value` added to its 101, and then
/// holds the stream.
#[allow(clippy::result_large_err)] // the callback's type is tungstenite's
async fn upstream_adding(name: &'static str, value: &'static str) -> SocketAddr {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let add = |_: &Request, mut response: Response| {
                    response
                        .headers_mut()
                        .insert(name, HeaderValue::from_static(value));
                    Ok(response)
                };
                if let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(socket, add).await {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    addr
}

/// An upstream that accepts an extension nobody offered is refused with a 502: it would
/// send frames (compressed ones) that the relay cannot pass on.
#[tokio::test]
async fn an_upstream_accepting_an_extension_not_offered_is_a_502() {
    let upstream = upstream_adding("sec-websocket-extensions", "permessage-deflate").await;
    let env = support::env_with_blue_at(upstream).await;
    match tokio_tungstenite::connect_async(env.ws_url("/v1/listen")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
            assert_eq!(response.headers()["x-switchyard-color"], "blue");
        }
        other => panic!("the handshake must fail with 502: {other:?}"),
    }
}

/// The 101 names only a subprotocol the client offered, spelt as offered: an upstream's
/// other choice is replaced by the `token` or `bearer` the client offered (found wherever it stands in the
/// list), or left out, since a browser (and tungstenite's client) fails the handshake
/// otherwise.
#[tokio::test]
async fn the_101_names_only_a_subprotocol_the_client_offered() {
    let env = EnvBuilder::default().start().await;
    let (_ws, response) = open_with(
        &env.ws_url("/v1/listen"),
        &[(
            "sec-websocket-protocol",
            "x-deepgram-session-id, 5f0c1d2e, token, KEY123",
        )],
    )
    .await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "token");

    let env =
        support::env_with_blue_at(upstream_adding("sec-websocket-protocol", "bearer").await).await;
    let (_ws, response) = open_with(
        &env.ws_url("/v1/listen"),
        &[("sec-websocket-protocol", "token, KEY123")],
    )
    .await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "token");
    // The upstream's choice, spelt as the client offered it.
    let (_ws, response) = open_with(
        &env.ws_url("/v1/listen"),
        &[("sec-websocket-protocol", "Bearer, JWT")],
    )
    .await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "Bearer");
    let (_ws, response) = open_with(&env.ws_url("/v1/listen"), &[]).await;
    assert!(
        response.headers().get("sec-websocket-protocol").is_none(),
        "{:?}",
        response.headers()
    );
    let (_ws, response) = open_with(
        &env.ws_url("/v1/listen"),
        &[("sec-websocket-protocol", "bearer, JWT")],
    )
    .await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "bearer");
}

/// An env whose blue pool is the upstream at `addr`, with `limits.stall_timeout` of 1 s.
async fn env_with_stall_timeout_at(addr: SocketAddr) -> Env {
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        extra: "stall_timeout = \"1s\"".into(),
        ..Default::default()
    };
    support::env_with_blue_at_built(addr, builder).await
}

/// Sends audio on `sink` until the sockets on the way are full and a send waits, on a
/// task of its own (bounded: 4,000 frames of 64 KiB, far more than they hold).
fn flood<S>(mut sink: S) -> tokio::task::JoinHandle<()>
where
    S: futures_util::Sink<Message> + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        for _ in 0..4000 {
            if sink
                .send(Message::binary(vec![7u8; 64 * 1024]))
                .await
                .is_err()
            {
                break;
            }
        }
    })
}

/// An upstream that stops reading (a hung node) would hold the stream until a drain:
/// back-pressure stops Switchyard reading the client, so it would not even see the client
/// leave. After `limits.stall_timeout` with no byte taken, the stream ends as an error and
/// the client is told 1011, so it reconnects.
#[tokio::test]
async fn an_upstream_that_stops_reading_ends_its_stream_after_the_stall_timeout() {
    let addr = scripted_upstream(false, |ws| async move {
        // Holds the connection and never reads it.
        std::future::pending::<()>().await;
        drop(ws);
    })
    .await;
    let env = env_with_stall_timeout_at(addr).await;
    let (ws, _) = open(&env.ws_url("/v1/listen")).await;
    let (sink, mut stream) = ws.split();
    let flood = flood(sink);
    let close = within("the close after the stall", async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await;
    flood.abort();
    assert_eq!(close_code(&close), Some(1011));
    eventually(|| async { closes_of(&env, "error") == Some(1.0) }).await;
    assert_eq!(env.upstream_errors("timeout"), 1.0);
    assert_eq!(env.upstream_errors("protocol"), 0.0);
}

/// A client that sends on but stops reading, to an upstream that answers each message
/// before it reads the next (as a single-threaded session loop does): back-pressure from
/// the client soon stops the upstream's reading too, and the stall is the client's.
#[tokio::test]
async fn a_client_that_stops_reading_is_blamed_when_its_upstream_stops_reading_too() {
    let addr = scripted_upstream(false, |mut ws| async move {
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close()
                || ws
                    .send(Message::binary(vec![9u8; 64 * 1024]))
                    .await
                    .is_err()
            {
                break;
            }
        }
    })
    .await;
    let env = env_with_stall_timeout_at(addr).await;
    let (ws, _) = open(&env.ws_url("/v1/listen")).await;
    let (sink, _never_read) = ws.split();
    let flood = flood(sink);
    eventually(|| async { closes_of(&env, "error") == Some(1.0) }).await;
    flood.abort();
    assert_eq!(env.upstream_errors("timeout"), 0.0);
    assert_eq!(env.upstream_errors("protocol"), 0.0);
}

/// A client that stops reading is found the same way: the upstream is told the client
/// went away (1001), and the stream ends as an error.
#[tokio::test]
async fn a_client_that_stops_reading_ends_its_stream_after_the_stall_timeout() {
    let (closed, mut told) = tokio::sync::mpsc::unbounded_channel();
    let addr = scripted_upstream(false, move |ws| {
        let closed = closed.clone();
        async move {
            let (sink, mut stream) = ws.split();
            // Audio until Switchyard takes no more, while this half waits for the close.
            let flood = flood(sink);
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Close(frame) = message {
                    let _ = closed.send(close_code(&frame));
                    break;
                }
            }
            flood.abort();
        }
    })
    .await;
    let env = env_with_stall_timeout_at(addr).await;
    // Opened and never read.
    let (_ws, _) = open(&env.ws_url("/v1/speak")).await;
    let code = within("the upstream told of the stall", told.recv()).await;
    assert_eq!(code, Some(Some(1001)));
    eventually(|| async { closes_of(&env, "error") == Some(1.0) }).await;
    // The client's fault: nothing counts against the upstream.
    assert_eq!(env.upstream_errors("timeout"), 0.0);
    assert_eq!(env.upstream_errors("protocol"), 0.0);
}

/// An upstream on a loopback port that reads each upgrade request's head, keeps it
/// (lowercased) in the returned list, and writes, in one write, what `answer` makes of the
/// accept value for the request's `Sec-WebSocket-Key`; then it holds the connection until
/// the peer leaves.
async fn raw_upstream(answer: fn(&str) -> Vec<u8>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match socket.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let key = head
                    .split("\r\n")
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| value.trim().to_owned())
                    })
                    .unwrap_or_default();
                seen.lock().expect("heads").push(head.to_lowercase());
                let accept = derive_accept_key(key.as_bytes());
                let _ = socket.write_all(&answer(&accept)).await;
                let mut rest = [0u8; 1024];
                while matches!(socket.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, heads)
}

/// An unmasked text frame, as an upstream sends it.
fn upstream_text(text: &str) -> Vec<u8> {
    let mut frame = vec![0x81, u8::try_from(text.len()).expect("a short text")];
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// An upstream may send its first frames in the same packet as its 101 (Deepgram's Voice
/// Agent greets at once): they reach the client, in order. The upgrade request names the
/// upstream as `Host` and carries the `X-Forwarded-*` headers.
#[tokio::test]
async fn frames_that_come_with_the_101_are_relayed() {
    let (addr, heads) = raw_upstream(|accept| {
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        answer.extend(upstream_text(r#"{"type":"Welcome"}"#));
        answer.extend(upstream_text(r#"{"type":"SettingsApplied"}"#));
        answer
    })
    .await;
    let env = support::env_with_blue_at(addr).await;
    let url = env.ws_url("/v1/agent/converse?x=1");
    let (mut ws, response) = open(&url).await;
    assert_eq!(color_of(&response), "blue");
    assert_eq!(next_json(&mut ws).await["type"], "Welcome");
    assert_eq!(next_json(&mut ws).await["type"], "SettingsApplied");
    let head = heads.lock().expect("heads")[0].clone();
    let proxy = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    for line in [
        "get /v1/agent/converse?x=1 http/1.1\r\n".to_owned(),
        format!("\r\nhost: {addr}\r\n"),
        "\r\nx-forwarded-for: 127.0.0.1\r\n".to_owned(),
        "\r\nx-forwarded-proto: http\r\n".to_owned(),
        format!("\r\nx-forwarded-host: {proxy}\r\n"),
        "\r\nconnection: upgrade\r\n".to_owned(),
        "\r\nupgrade: websocket\r\n".to_owned(),
        "\r\nsec-websocket-version: 13\r\n".to_owned(),
    ] {
        assert!(
            head.contains(&line),
            "{line:?} is not in the upgrade request:\n{head}"
        );
    }
    assert_eq!(head.matches("\r\nhost: ").count(), 1, "{head}");
}

/// A refused upgrade comes back with its body, and the next upgrade is answered as well
/// (the refusal's connection is not reused for it).
#[tokio::test]
async fn a_refused_upgrade_passes_its_body_on() {
    let (addr, heads) = raw_upstream(|_| {
        let body = r#"{"err_code":"INVALID_QUERY_PARAMETER","err_msg":"No such model"}"#;
        format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ndg-error: No such model\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
    .await;
    let env = support::env_with_blue_at(addr).await;
    for _ in 0..2 {
        let req = http::Request::get(env.proxy_url("/v1/listen?model=nope"))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(http_body_util::Full::new(Bytes::new()))
            .expect("request");
        let response = within("the refusal", env.client.request(req))
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()["dg-error"], "No such model");
        assert_eq!(response.headers()["x-switchyard-color"], "blue");
        let json = support::json_body(response).await;
        assert_eq!(json["err_code"], "INVALID_QUERY_PARAMETER", "{json}");
    }
    assert_eq!(heads.lock().expect("heads").len(), 2);
}

/// An upstream that takes the upgrade request and never answers is a 504 after
/// `response_timeout`, counted as a timeout; one that answers something other than HTTP
/// is a 502, counted as a protocol error.
#[tokio::test]
async fn an_unanswered_upgrade_is_a_504_and_a_garbled_one_a_502() {
    let (hung, _task) = support::hung_upstream().await;
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        extra: "response_timeout = \"1s\"".into(),
        ..Default::default()
    };
    let env = support::env_with_blue_at_built(hung, builder.clone()).await;
    match within("the timeout", connect_async(env.ws_url("/v1/listen"))).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(response.headers()["x-switchyard-color"], "blue");
        }
        other => panic!("the handshake must fail with 504: {other:?}"),
    }
    assert_eq!(env.upstream_errors("timeout"), 1.0);

    let (garbled, _) = raw_upstream(|_| b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()).await;
    env.write_config(
        &builder,
        &format!("\"http://{garbled}\""),
        &format!("\"{}\"", env.green[0].url()),
    );
    env.reload().await;
    match within("the refusal", connect_async(env.ws_url("/v1/listen"))).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        }
        other => panic!("the handshake must fail with 502: {other:?}"),
    }
    assert_eq!(env.upstream_errors("protocol"), 1.0);
}
