//! Scenarios for the Deepgram-compatible stub upstream, over real sockets with real clients.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use switchyard::stub::{self, StubHandle, StubOptions};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type ClientBody = BoxBody<Bytes, Infallible>;

/// Generous: only a broken stub ever reaches it.
const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

async fn start(name: &str) -> StubHandle {
    stub::spawn(StubOptions {
        name: name.to_owned(),
        ..StubOptions::default()
    })
    .await
    .expect("bind the stub")
}

fn client() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn empty() -> ClientBody {
    Empty::new().boxed()
}

fn full(body: impl Into<Bytes>) -> ClientBody {
    Full::new(body.into()).boxed()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

async fn send(method: Method, url: String, body: ClientBody) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(body)
        .expect("a valid request");
    within("an HTTP answer", async {
        let response = client().request(request).await.expect("an HTTP response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("the whole body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    })
    .await
}

async fn ws_connect(url: String) -> Ws {
    let (ws, response) = within("a WebSocket handshake", connect_async(url))
        .await
        .expect("a 101");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn next_message(ws: &mut Ws) -> Message {
    within("a WebSocket message", ws.next())
        .await
        .expect("the stream is open")
        .expect("a readable message")
}

async fn next_json(ws: &mut Ws) -> Value {
    match next_message(ws).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("JSON text"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

async fn next_close(ws: &mut Ws) -> Option<CloseFrame> {
    match next_message(ws).await {
        Message::Close(frame) => frame,
        other => panic!("expected a close, got {other:?}"),
    }
}

/// Keeps reading after a close so the client's close reply is flushed, as a real client would.
async fn read_to_end(ws: &mut Ws) {
    within("the stream to end", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn send_text(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string()))
        .await
        .expect("send a text message");
}

async fn send_audio(ws: &mut Ws, bytes: usize) {
    ws.send(Message::binary(vec![7u8; bytes]))
        .await
        .expect("send audio");
}

#[tokio::test]
async fn status_reports_health_and_can_be_changed_at_run_time() {
    let stub = start("blue").await;

    let status = send(Method::GET, format!("{}/v1/status", stub.url()), empty()).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.headers["x-stub-name"], "blue");
    assert_eq!(
        status.json(),
        json!({"system_health": "Healthy", "active_batch_requests": 0,
               "active_stream_requests": 0, "active_listen_v2_stream_requests": 0})
    );

    let change = send(
        Method::POST,
        format!("{}/_stub/health", stub.url()),
        full(r#"{"system_health": "Critical", "status": 503}"#),
    )
    .await;
    assert_eq!(change.status, StatusCode::OK);
    assert_eq!(change.json(), json!({"ok": true}));
    assert_eq!(stub.state.health(), "Critical");

    let status = send(Method::GET, format!("{}/v1/status", stub.url()), empty()).await;
    assert_eq!(status.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status.json()["system_health"], "Critical");

    let bad = send(
        Method::POST,
        format!("{}/_stub/health", stub.url()),
        full("not json"),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(stub.state.health(), "Critical");

    stub.state.set_health("Degraded");
    stub.state.set_status_code(200);
    let status = send(Method::GET, format!("{}/v1/status", stub.url()), empty()).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.json()["system_health"], "Degraded");

    // Health probes must not disturb what a test asserts about forwarded traffic.
    assert_eq!(stub.state.status_requests(), 3);
    assert_eq!(stub.state.http_requests(), 0);
    assert!(stub.state.last_headers().is_empty());
}

#[tokio::test]
async fn unknown_paths_answer_a_json_404_naming_the_stub() {
    let stub = start("blue").await;
    let answer = send(Method::GET, format!("{}/v1/nothing", stub.url()), empty()).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.headers["x-stub-name"], "blue");
    assert_eq!(answer.json()["err_code"], "NOT_FOUND");
}

#[tokio::test]
async fn prerecorded_listen_hashes_a_chunked_upload() {
    let stub = start("green").await;
    let audio: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let expected = Sha256::digest(&audio)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = audio
        .chunks(64 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));

    let answer = send(Method::POST, format!("{}/v1/listen", stub.url()), body).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.headers["x-stub-name"], "green");
    let json = answer.json();
    let metadata = &json["metadata"];
    assert_eq!(metadata["sha256"], expected.as_str());
    assert_eq!(metadata["bytes"], audio.len());
    assert_eq!(metadata["stub"], "green");
    assert_eq!(
        answer.headers["dg-request-id"],
        metadata["request_id"].as_str().expect("an id")
    );
    assert_eq!(
        json["results"]["channels"][0]["alternatives"][0]["transcript"],
        format!("green heard {} bytes", audio.len())
    );
    let sent = stub.state.last_headers();
    assert_eq!(sent["transfer-encoding"], "chunked");
    assert!(sent.get("content-length").is_none());
    assert_eq!(stub.state.http_requests(), 1);
}

#[tokio::test]
async fn rest_speak_streams_the_requested_chunks() {
    let stub = start("blue").await;
    let default = send(
        Method::POST,
        format!("{}/v1/speak", stub.url()),
        full(r#"{"text": "hello"}"#),
    )
    .await;
    assert_eq!(default.status, StatusCode::OK);
    assert_eq!(default.headers["content-type"], "audio/mpeg");
    assert_eq!(default.headers["dg-char-count"], "5");
    assert_eq!(default.headers["dg-model-name"], "stub");
    assert_eq!(default.headers["dg-model-uuid"], "stub");
    assert_eq!(default.body.len(), 8 * 4096);

    let three = send(
        Method::POST,
        format!("{}/v1/speak?chunks=3", stub.url()),
        full(r#"{"text": "hello"}"#),
    )
    .await;
    assert_eq!(three.body.len(), 3 * 4096);
    assert_eq!(three.headers["x-stub-name"], "blue");
}

#[tokio::test]
async fn stt_close_stream_flushes_results_then_metadata_then_close_1000() {
    let stub = start("blue").await;
    let mut ws = ws_connect(stub.ws_url("/v1/listen?model=nova-3")).await;
    for _ in 0..10 {
        send_audio(&mut ws, 3200).await;
    }
    send_text(&mut ws, json!({"type": "CloseStream"})).await;

    let mut results = Vec::new();
    let metadata = loop {
        let message = next_json(&mut ws).await;
        match message["type"].as_str() {
            Some("Results") => results.push(message),
            Some("Metadata") => break message,
            other => panic!("unexpected message type {other:?}"),
        }
    };
    assert_eq!(results.len(), 11);
    assert!(results.iter().all(|r| r["is_final"] == true));
    assert_eq!(
        results[0]["channel"]["alternatives"][0]["transcript"],
        "blue 1"
    );
    assert_eq!(results[10]["from_finalize"], true);
    assert_eq!(metadata["stub"], "blue");
    assert_eq!(metadata["transaction_key"], "deprecated");
    assert!(metadata["request_id"].is_string());

    let close = next_close(&mut ws).await.expect("a close code");
    read_to_end(&mut ws).await;
    assert_eq!(close.code, CloseCode::Normal);
    assert_eq!(stub.state.close_streams(), 1);
    assert_eq!(stub.state.audio_bytes(), 32_000);
    assert_eq!(stub.state.final_results_sent(), 11);
    within(
        "the session to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn stt_finalize_flushes_the_leftover_audio() {
    let stub = start("blue").await;
    let mut ws = ws_connect(stub.ws_url("/v1/listen")).await;
    send_text(&mut ws, json!({"type": "KeepAlive"})).await;
    send_audio(&mut ws, 4800).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "Results");
    assert_eq!(first["from_finalize"], false);

    send_text(&mut ws, json!({"type": "Finalize"})).await;
    let finalized = next_json(&mut ws).await;
    assert_eq!(finalized["type"], "Results");
    assert_eq!(finalized["from_finalize"], true);
    assert_eq!(finalized["duration"], 0.05);
    assert_eq!(
        finalized["channel"]["alternatives"][0]["transcript"],
        "blue 2"
    );
    assert_eq!(stub.state.finalizes(), 1);
    assert_eq!(stub.state.keep_alives(), 1);

    ws.close(None).await.expect("send close");
    within(
        "the session to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn stub_status_refuses_the_upgrade_with_dg_error() {
    let stub = start("blue").await;
    let refused = within(
        "a refusal",
        connect_async(stub.ws_url("/v1/listen?stub_status=429")),
    )
    .await;
    match refused {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(response.headers()["dg-error"], "stub refused");
            assert_eq!(response.headers()["x-stub-name"], "blue");
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }

    // The body, read with a plain HTTP client speaking the same handshake.
    let request = Request::builder()
        .uri(format!("{}/v1/listen?stub_status=503", stub.url()))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .expect("a valid request");
    let response = within("a refusal", client().request(request))
        .await
        .expect("an HTTP response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        body,
        json!({"err_code": "REFUSED", "err_msg": "stub refused"})
    );
    assert_eq!(stub.state.ws_refused(), 2);
    assert_eq!(stub.state.ws_opened(), 0);
}

#[tokio::test]
async fn stub_close_sends_the_requested_code_and_reason() {
    let stub = start("blue").await;
    let mut ws = ws_connect(stub.ws_url("/v1/listen")).await;
    send_text(
        &mut ws,
        json!({"type": "StubClose", "code": 1011, "reason": "NET-0001"}),
    )
    .await;
    let close = next_close(&mut ws).await.expect("a close code");
    read_to_end(&mut ws).await;
    assert_eq!(close.code, CloseCode::Error);
    assert_eq!(close.reason.as_str(), "NET-0001");
    within(
        "the session to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn stub_die_drops_the_connection_without_a_close_frame() {
    let stub = start("blue").await;
    let mut ws = ws_connect(stub.ws_url("/v1/speak")).await;
    assert_eq!(next_json(&mut ws).await["type"], "Metadata");
    send_text(&mut ws, json!({"type": "StubDie"})).await;
    match within("the connection to drop", ws.next()).await {
        None | Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {}
        Some(Err(WsError::Io(_))) => {}
        other => panic!("expected a dropped connection, got {other:?}"),
    }
    within(
        "the session to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn tts_speak_flush_clear_close() {
    let stub = start("green").await;
    let mut ws = ws_connect(stub.ws_url("/v1/speak?model=aura-2")).await;
    let metadata = next_json(&mut ws).await;
    assert_eq!(metadata["type"], "Metadata");
    assert_eq!(metadata["model_name"], "stub");
    // Named, so an SDK client (which never sees the 101's headers) can tell the colour.
    assert_eq!(metadata["stub"], "green");

    // 25 characters: three frames of audio.
    send_text(
        &mut ws,
        json!({"type": "Speak", "text": "Hello there, how are you?"}),
    )
    .await;
    send_text(&mut ws, json!({"type": "Flush"})).await;
    for _ in 0..3 {
        match next_message(&mut ws).await {
            Message::Binary(audio) => assert_eq!(audio.len(), 1920),
            other => panic!("expected audio, got {other:?}"),
        }
    }
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "Flushed", "sequence_id": 0})
    );

    send_text(&mut ws, json!({"type": "Clear"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "Cleared", "sequence_id": 0})
    );

    send_text(&mut ws, json!({"type": "Close"})).await;
    let close = next_close(&mut ws).await.expect("a close code");
    read_to_end(&mut ws).await;
    assert_eq!(close.code, CloseCode::Normal);

    let state = &stub.state;
    assert_eq!(
        (
            state.speaks(),
            state.flushes(),
            state.clears(),
            state.speak_closes()
        ),
        (1, 1, 1, 1)
    );
    within(
        "the session to end",
        state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn flux_close_stream_ends_with_a_close_frame_without_a_code() {
    let stub = start("blue").await;
    let mut ws = ws_connect(stub.ws_url("/v2/listen?model=flux-general-en")).await;
    let connected = next_json(&mut ws).await;
    assert_eq!(connected["type"], "Connected");
    assert_eq!(connected["sequence_id"], 0);

    send_audio(&mut ws, 6400).await;
    send_audio(&mut ws, 100).await;
    send_text(&mut ws, json!({"type": "CloseStream"})).await;
    for (sequence_id, transcript) in [(1, "blue 1"), (2, "blue 2"), (3, "blue 3")] {
        let update = next_json(&mut ws).await;
        assert_eq!(update["type"], "TurnInfo");
        assert_eq!(update["event"], "Update");
        assert_eq!(update["sequence_id"], sequence_id);
        assert_eq!(update["transcript"], transcript);
    }
    assert!(
        next_close(&mut ws).await.is_none(),
        "Flux closes without a code"
    );
    read_to_end(&mut ws).await;
    assert_eq!(stub.state.close_streams(), 1);
    assert_eq!(stub.state.turn_infos_sent(), 3);
    within(
        "the session to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn agent_welcomes_and_echoes() {
    let stub = start("blue").await;
    let mut ws = ws_connect(stub.ws_url("/v1/agent/converse")).await;
    assert_eq!(next_json(&mut ws).await["type"], "Welcome");
    send_text(&mut ws, json!({"type": "Settings"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "Settings"}));
    assert_eq!(next_json(&mut ws).await["type"], "SettingsApplied");
    ws.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send audio");
    assert_eq!(
        next_message(&mut ws).await,
        Message::binary(vec![1u8, 2, 3])
    );
    ws.close(None).await.expect("send close");
    within(
        "the session to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn handshake_headers_are_recorded_and_no_protocol_is_echoed_by_default() {
    let stub = start("blue").await;
    let mut request = stub
        .ws_url("/v1/listen")
        .into_client_request()
        .expect("a valid URL");
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "token, secret".parse().expect("valid"),
    );
    headers.insert("authorization", "Token secret".parse().expect("valid"));
    headers.insert("x-deepgram-session-id", "session-1".parse().expect("valid"));
    headers.insert("x-forwarded-for", "10.0.0.1".parse().expect("valid"));

    // A client that offered subprotocols rejects a 101 that picks none, as browsers do.
    let refused = within("a handshake", connect_async(request.clone())).await;
    assert!(matches!(
        refused,
        Err(WsError::Protocol(
            ProtocolError::SecWebSocketSubProtocolError(SubProtocolError::NoSubProtocol)
        ))
    ));
    let seen = stub.state.last_headers();
    assert_eq!(seen["sec-websocket-protocol"], "token, secret");
    assert_eq!(seen["authorization"], "Token secret");
    assert_eq!(seen["x-deepgram-session-id"], "session-1");
    assert_eq!(seen["x-forwarded-for"], "10.0.0.1");
    assert_eq!(stub.state.ws_opened(), 1);

    let mut echoing = stub
        .ws_url("/v1/listen?stub_echo_protocol=1")
        .into_client_request()
        .expect("a valid URL");
    echoing.headers_mut().insert(
        "sec-websocket-protocol",
        "token, secret".parse().expect("valid"),
    );
    let (mut ws, response) = within("a handshake", connect_async(echoing))
        .await
        .expect("a 101");
    assert_eq!(response.headers()["sec-websocket-protocol"], "token");
    assert_eq!(response.headers()["x-stub-name"], "blue");
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    assert_eq!(stub.state.ws_opened(), 2);
    ws.close(None).await.expect("send close");
    within(
        "both sessions to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn status_counts_open_streams_and_empty_audio_closes() {
    let stub = start("blue").await;
    let mut stt = ws_connect(stub.ws_url("/v1/listen")).await;
    let mut flux = ws_connect(stub.ws_url("/v2/listen")).await;
    let status = send(Method::GET, format!("{}/v1/status", stub.url()), empty()).await;
    assert_eq!(status.json()["active_stream_requests"], 1);
    assert_eq!(status.json()["active_listen_v2_stream_requests"], 1);

    stt.send(Message::binary(Vec::new())).await.expect("send");
    let close = next_close(&mut stt).await.expect("a close code");
    read_to_end(&mut stt).await;
    assert_eq!(close.code, CloseCode::Normal);
    flux.close(None).await.expect("send close");
    within(
        "the sessions to end",
        stub.state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let stub = start("blue").await;
    let h2: Client<HttpConnector, ClientBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = Request::builder()
        .uri(format!("{}/v1/status", stub.url()))
        .body(empty())
        .expect("a valid request");
    let response = within("an h2c answer", h2.request(request))
        .await
        .expect("an HTTP/2 response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-stub-name"], "blue");
}

#[tokio::test]
async fn dropping_the_handle_drops_open_sessions() {
    let stub = start("blue").await;
    let state = std::sync::Arc::clone(&stub.state);
    let mut ws = ws_connect(stub.ws_url("/v1/listen")).await;
    drop(stub);
    match within("the connection to drop", ws.next()).await {
        None | Some(Err(_)) => {}
        Some(Ok(other)) => panic!("expected the connection to drop, got {other:?}"),
    }
    within(
        "the session to end",
        state.wait_until(|s| s.ws_open_now() == 0),
    )
    .await;
}
