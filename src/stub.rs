//! The Deepgram-compatible stub upstream.
//!
//! Owns a small HTTP/1.1 (and h2c) server that speaks enough of the Deepgram self-hosted API for
//! Switchyard's tests, the demo and the benchmarks: `/v1/status`, pre-recorded `POST /v1/listen`,
//! REST `POST /v1/speak`, and the WebSocket sessions of streaming STT (`/v1/listen`), Flux
//! (`/v2/listen`), streaming TTS (`/v1/speak`, `/v2/speak`) and the Voice Agent
//! (`/v1/agent/converse`). It records what it saw in [`StubState`] so tests can assert on it and
//! wait for it without sleeping.
//!
//! It does not transcribe or synthesise anything: transcripts name the stub and count results,
//! audio is a fixed byte pattern. It knows nothing about the proxy.
//!
//! Test-only hooks, none of which real Deepgram has:
//! - `POST /_stub/health` changes the reported `system_health` (and optionally the status code).
//! - Query `stub_status=<code>` refuses a WebSocket upgrade with that status.
//! - Query `stub_echo_protocol=1` echoes the first offered `Sec-WebSocket-Protocol`; by default
//!   none is echoed, as self-hosted Deepgram is believed to behave.
//! - Text message `{"type":"StubClose","code":1011,"reason":"NET-0001"}` closes the session with
//!   that code; `{"type":"StubDie"}` drops the TCP connection without a close frame.
//! - Query `chunks=N` on `POST /v1/speak` sets how many audio chunks are streamed.
//! - Query `stub_ignore_flush=1` on a TTS stream counts `Flush` but never answers `Flushed`
//!   (a node too slow to finish within a drain's grace).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How a [`Stub`] presents itself.
#[derive(Debug, Clone)]
pub struct StubOptions {
    /// Named in the `x-stub-name` header, in transcripts and in metadata, so a test can tell which
    /// upstream answered.
    pub name: String,
    /// The initial `system_health` reported by `/v1/status` (e.g. `Healthy`, `Critical`).
    pub health: String,
    /// Streaming STT answers one `Results` (Flux: one `TurnInfo` update) per this many audio
    /// bytes. 3200 bytes is 100 ms of 16 kHz linear16 mono. Zero is treated as one.
    pub bytes_per_result: usize,
}

/// A Deepgram-compatible stub server. Cheap to clone; clones share one [`StubState`].
#[derive(Debug, Clone)]
pub struct Stub {
    inner: Arc<Inner>,
}

/// What a stub has seen, for tests to assert on and wait for.
///
/// Health checks (`/v1/status`) and stub control requests (`/_stub/...`) do not count as
/// requests and do not replace [`last_headers`](StubState::last_headers), so a proxy's probes
/// cannot disturb a test's assertions about the traffic it forwarded.
#[derive(Debug)]
pub struct StubState {
    health: Mutex<String>,
    /// The status `/v1/status` answers with, so health tests can fail the probe itself.
    status_code: AtomicU16,
    http_requests: AtomicU64,
    status_requests: AtomicU64,
    ws_opened: AtomicU64,
    ws_open_now: AtomicU64,
    ws_refused: AtomicU64,
    close_streams: AtomicU64,
    finalizes: AtomicU64,
    keep_alives: AtomicU64,
    speaks: AtomicU64,
    flushes: AtomicU64,
    speak_closes: AtomicU64,
    clears: AtomicU64,
    audio_bytes: AtomicU64,
    final_results_sent: AtomicU64,
    turn_infos_sent: AtomicU64,
    /// In-flight pre-recorded requests, reported as `active_batch_requests`.
    active_batch: AtomicU64,
    /// Open streams other than Flux, reported as `active_stream_requests`.
    active_stream: AtomicU64,
    /// Open Flux streams, reported as `active_listen_v2_stream_requests`.
    active_listen_v2: AtomicU64,
    last_headers: Mutex<HeaderMap>,
    /// Woken on every recorded event so [`StubState::wait_until`] needs no polling.
    notify: Notify,
}

/// A stub running on a spawned task; dropping the handle stops it and every session it holds.
#[derive(Debug)]
pub struct StubHandle {
    /// Where the stub listens (always `127.0.0.1`).
    pub addr: SocketAddr,
    /// The running stub's state.
    pub state: Arc<StubState>,
    _task: AbortOnDrop,
}

#[derive(Debug)]
struct Inner {
    options: StubOptions,
    /// Computed once: a name that is not a valid header value must not fail every response.
    name_header: HeaderValue,
    state: Arc<StubState>,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

/// Which Deepgram protocol a WebSocket session speaks, chosen by the upgrade path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WsKind {
    Listen,
    Flux,
    Speak,
    Agent,
}

/// Keeps `ws_open_now` and the `/v1/status` active counts honest however a session ends,
/// including a failed upgrade or an aborted task.
struct OpenSession {
    state: Arc<StubState>,
    kind: WsKind,
}

/// Counts a pre-recorded request as active for as long as it is held, on every exit path.
struct ActiveBatch<'a>(&'a StubState);

/// What the session loop does after handling one client message.
enum Flow {
    Continue,
    Close(Option<CloseFrame>),
    Die,
}

/// How a session loop ended.
enum End {
    /// The client closed (tungstenite has queued our reply) or the stream errored.
    Peer,
    Close(Option<CloseFrame>),
    Die,
}

/// Per-session protocol state.
enum Proto {
    Listen(Listen),
    Flux(Flux),
    Speak(Speak),
    Agent,
}

struct Listen {
    buffered: usize,
    results: u64,
    start: f64,
    total: u64,
    hasher: Sha256,
}

struct Flux {
    buffered: usize,
    updates: u64,
    sequence_id: u64,
    window_end: f64,
}

struct Speak {
    flushed: u64,
    cleared: u64,
}

/// Everything a session handler needs besides its own protocol state.
struct SessionCtx {
    stub: Stub,
    request_id: String,
    created: String,
    /// `stub_ignore_flush=1`: `Flush` gets no `Flushed`.
    ignore_flush: bool,
}

#[derive(Deserialize)]
struct HealthChange {
    system_health: String,
    #[serde(default)]
    status: Option<u16>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;
type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Bytes per second of the audio the stub pretends to hear (16 kHz linear16 mono), for durations.
const AUDIO_BYTES_PER_SECOND: f64 = 32_000.0;
const SPEAK_CHUNK: [u8; 4096] = [0x55; 4096];
const SPEAK_DEFAULT_CHUNKS: usize = 8;
const SPEAK_MAX_CHUNKS: usize = 10_000;
const SPEAK_CHUNK_INTERVAL: Duration = Duration::from_millis(20);
const TTS_FRAME: [u8; 1920] = [0x2a; 1920];
const TTS_CHARS_PER_FRAME: usize = 10;
/// Control and TTS request bodies are tiny; this only stops a runaway client.
const SMALL_BODY_LIMIT: usize = 1 << 20;
/// How long a closing session waits for the client's half of the close handshake.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const X_STUB_NAME: HeaderName = HeaderName::from_static("x-stub-name");
const DG_REQUEST_ID: HeaderName = HeaderName::from_static("dg-request-id");
const DG_ERROR: HeaderName = HeaderName::from_static("dg-error");
const DG_CHAR_COUNT: HeaderName = HeaderName::from_static("dg-char-count");
const DG_MODEL_NAME: HeaderName = HeaderName::from_static("dg-model-name");
const DG_MODEL_UUID: HeaderName = HeaderName::from_static("dg-model-uuid");

impl Default for StubOptions {
    fn default() -> Self {
        StubOptions {
            name: "stub".to_owned(),
            health: "Healthy".to_owned(),
            bytes_per_result: 3200,
        }
    }
}

impl Stub {
    /// Builds a stub; nothing listens until [`Stub::serve`].
    pub fn new(mut options: StubOptions) -> Stub {
        options.bytes_per_result = options.bytes_per_result.max(1);
        let name_header = HeaderValue::from_str(&options.name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-stub-name"));
        let state = Arc::new(StubState::new(&options.health));
        Stub {
            inner: Arc::new(Inner {
                options,
                name_header,
                state,
            }),
        }
    }

    /// The shared record of what this stub has seen.
    pub fn state(&self) -> Arc<StubState> {
        Arc::clone(&self.inner.state)
    }

    /// Serves until `shutdown` resolves; each connection is a spawned task.
    ///
    /// When `shutdown` resolves (or this future is dropped) the stub stops accepting and drops
    /// every connection and WebSocket session it started, as a killed process would: no close
    /// frames, no draining. Accept errors are logged and retried, never returned.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let cancel = CancellationToken::new();
        // Dropping serve (e.g. an aborted task) must take the connections down with it.
        let _cancel_on_exit = cancel.clone().drop_guard();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "stub accept failed");
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Small messages leave at once. With Nagle on, the close frame after
            // CloseStream's last messages waited for the proxy's delayed ACK: 40 ms more
            // of a drain's window for lost audio.
            let _ = stream.set_nodelay(true);
            let stub = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let service = service_fn({
                    let cancel = cancel.clone();
                    move |req| handle(stub.clone(), cancel.clone(), req)
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::select! {
                    result = conn => {
                        if let Err(error) = result {
                            debug!(%peer, %error, "stub connection ended with an error");
                        }
                    }
                    () = cancel.cancelled() => {}
                }
            });
        }
    }

    fn state_ref(&self) -> &StubState {
        &self.inner.state
    }

    fn name(&self) -> &str {
        &self.inner.options.name
    }

    fn bytes_per_result(&self) -> usize {
        self.inner.options.bytes_per_result
    }
}

/// Spawns a stub on 127.0.0.1:0 and returns its address and state; the task is aborted when the
/// handle drops. For tests and the demo.
pub async fn spawn(options: StubOptions) -> std::io::Result<StubHandle> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let stub = Stub::new(options);
    let state = stub.state();
    let task = tokio::spawn(async move {
        if let Err(error) = stub.serve(listener, std::future::pending()).await {
            debug!(%error, "stub stopped");
        }
    });
    Ok(StubHandle {
        addr,
        state,
        _task: AbortOnDrop(task),
    })
}

impl StubHandle {
    /// The stub's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A WebSocket URL on the stub, `ws://127.0.0.1:PORT` followed by `path_and_query`.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl StubState {
    fn new(health: &str) -> StubState {
        StubState {
            health: Mutex::new(health.to_owned()),
            status_code: AtomicU16::new(200),
            http_requests: AtomicU64::new(0),
            status_requests: AtomicU64::new(0),
            ws_opened: AtomicU64::new(0),
            ws_open_now: AtomicU64::new(0),
            ws_refused: AtomicU64::new(0),
            close_streams: AtomicU64::new(0),
            finalizes: AtomicU64::new(0),
            keep_alives: AtomicU64::new(0),
            speaks: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            speak_closes: AtomicU64::new(0),
            clears: AtomicU64::new(0),
            audio_bytes: AtomicU64::new(0),
            final_results_sent: AtomicU64::new(0),
            turn_infos_sent: AtomicU64::new(0),
            active_batch: AtomicU64::new(0),
            active_stream: AtomicU64::new(0),
            active_listen_v2: AtomicU64::new(0),
            last_headers: Mutex::new(HeaderMap::new()),
            notify: Notify::new(),
        }
    }

    /// Plain HTTP requests served, excluding `/v1/status`, `/_stub/...` and WebSocket handshakes.
    pub fn http_requests(&self) -> u64 {
        self.http_requests.load(Ordering::SeqCst)
    }

    /// `/v1/status` requests served (health probes).
    pub fn status_requests(&self) -> u64 {
        self.status_requests.load(Ordering::SeqCst)
    }

    /// WebSocket upgrades accepted (101 sent).
    pub fn ws_opened(&self) -> u64 {
        self.ws_opened.load(Ordering::SeqCst)
    }

    /// WebSocket sessions open right now.
    pub fn ws_open_now(&self) -> u64 {
        self.ws_open_now.load(Ordering::SeqCst)
    }

    /// WebSocket upgrades refused because of `stub_status`.
    pub fn ws_refused(&self) -> u64 {
        self.ws_refused.load(Ordering::SeqCst)
    }

    /// `CloseStream` messages received (STT and Flux).
    pub fn close_streams(&self) -> u64 {
        self.close_streams.load(Ordering::SeqCst)
    }

    /// `Finalize` messages received.
    pub fn finalizes(&self) -> u64 {
        self.finalizes.load(Ordering::SeqCst)
    }

    /// `KeepAlive` messages received on any WebSocket path.
    pub fn keep_alives(&self) -> u64 {
        self.keep_alives.load(Ordering::SeqCst)
    }

    /// TTS `Speak` messages received.
    pub fn speaks(&self) -> u64 {
        self.speaks.load(Ordering::SeqCst)
    }

    /// TTS `Flush` messages received.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// TTS `Close` messages received.
    pub fn speak_closes(&self) -> u64 {
        self.speak_closes.load(Ordering::SeqCst)
    }

    /// TTS `Clear` messages received.
    pub fn clears(&self) -> u64 {
        self.clears.load(Ordering::SeqCst)
    }

    /// Binary bytes received over all WebSocket sessions.
    pub fn audio_bytes(&self) -> u64 {
        self.audio_bytes.load(Ordering::SeqCst)
    }

    /// STT `Results` messages sent (all are `is_final: true`).
    pub fn final_results_sent(&self) -> u64 {
        self.final_results_sent.load(Ordering::SeqCst)
    }

    /// Flux `TurnInfo` messages sent.
    pub fn turn_infos_sent(&self) -> u64 {
        self.turn_infos_sent.load(Ordering::SeqCst)
    }

    /// The request headers of the last request or handshake (health probes and `/_stub/...`
    /// excluded); empty before the first.
    pub fn last_headers(&self) -> HeaderMap {
        self.last_headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets the `system_health` that `/v1/status` reports.
    pub fn set_health(&self, state: &str) {
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = state.to_owned();
        self.notify.notify_waiters();
    }

    /// The `system_health` that `/v1/status` reports.
    pub fn health(&self) -> String {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `/v1/status` answer with `code` (its JSON body unchanged); 200 restores it. A code
    /// that is not a valid HTTP status is answered as 500.
    pub fn set_status_code(&self, code: u16) {
        self.status_code.store(code, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// The status code `/v1/status` answers with.
    pub fn status_code(&self) -> u16 {
        self.status_code.load(Ordering::SeqCst)
    }

    /// Returns once `cond` holds, re-checking after every recorded event. Never times out:
    /// callers wrap it in `tokio::time::timeout`.
    pub async fn wait_until(&self, mut cond: impl FnMut(&StubState) -> bool) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before checking, so an event between the check and the await still
            // wakes us.
            notified.as_mut().enable();
            if cond(self) {
                return;
            }
            notified.await;
        }
    }

    fn bump(&self, counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn active_for(&self, kind: WsKind) -> &AtomicU64 {
        match kind {
            WsKind::Flux => &self.active_listen_v2,
            WsKind::Listen | WsKind::Speak | WsKind::Agent => &self.active_stream,
        }
    }

    fn record_headers(&self, headers: &HeaderMap) {
        *self
            .last_headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = headers.clone();
        self.notify.notify_waiters();
    }
}

impl OpenSession {
    fn open(state: Arc<StubState>, kind: WsKind) -> OpenSession {
        state.ws_opened.fetch_add(1, Ordering::SeqCst);
        state.ws_open_now.fetch_add(1, Ordering::SeqCst);
        state.active_for(kind).fetch_add(1, Ordering::SeqCst);
        state.notify.notify_waiters();
        OpenSession { state, kind }
    }
}

impl<'a> ActiveBatch<'a> {
    fn enter(state: &'a StubState) -> ActiveBatch<'a> {
        state.bump(&state.active_batch, 1);
        ActiveBatch(state)
    }
}

impl Drop for ActiveBatch<'_> {
    fn drop(&mut self) {
        self.0.active_batch.fetch_sub(1, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.state.ws_open_now.fetch_sub(1, Ordering::SeqCst);
        self.state
            .active_for(self.kind)
            .fetch_sub(1, Ordering::SeqCst);
        self.state.notify.notify_waiters();
    }
}

impl WsKind {
    fn for_path(path: &str) -> Option<WsKind> {
        match path {
            "/v1/listen" => Some(WsKind::Listen),
            "/v2/listen" => Some(WsKind::Flux),
            "/v1/speak" | "/v2/speak" => Some(WsKind::Speak),
            "/v1/agent/converse" => Some(WsKind::Agent),
            _ => None,
        }
    }
}

async fn handle(
    stub: Stub,
    cancel: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut response = route(&stub, cancel, req).await;
    response
        .headers_mut()
        .insert(X_STUB_NAME, stub.inner.name_header.clone());
    Ok(response)
}

async fn route(stub: &Stub, cancel: CancellationToken, req: Request<Incoming>) -> Response<Body> {
    let state = stub.state_ref();
    let path = req.uri().path().to_owned();
    if path == "/v1/status" {
        state.bump(&state.status_requests, 1);
        return if req.method() == Method::GET {
            status(state)
        } else {
            method_not_allowed()
        };
    }
    if path.starts_with("/_stub/") {
        return if path == "/_stub/health" && req.method() == Method::POST {
            change_health(state, req).await
        } else {
            not_found(&path)
        };
    }
    state.record_headers(req.headers());
    if req.method() == Method::GET
        && let Some(kind) = WsKind::for_path(&path)
    {
        return upgrade(stub, cancel, kind, req);
    }
    state.bump(&state.http_requests, 1);
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/listen") => batch_listen(stub, req).await,
        (&Method::POST, "/v1/speak" | "/v2/speak") => rest_speak(req).await,
        (_, p) if WsKind::for_path(p).is_some() => method_not_allowed(),
        _ => not_found(&path),
    }
}

fn status(state: &StubState) -> Response<Body> {
    let code =
        StatusCode::from_u16(state.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "system_health": state.health(),
        "active_batch_requests": state.active_batch.load(Ordering::SeqCst),
        "active_stream_requests": state.active_stream.load(Ordering::SeqCst),
        "active_listen_v2_stream_requests": state.active_listen_v2.load(Ordering::SeqCst),
    });
    json_response(code, &body)
}

async fn change_health(state: &StubState, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), SMALL_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) => return body_error(&*error),
    };
    let change: HealthChange = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &error),
    };
    let code = match change.status.map(StatusCode::from_u16) {
        None => StatusCode::OK,
        Some(Ok(code)) => code,
        Some(Err(error)) => return error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &error),
    };
    // A change without "status" means a healthy probe again, so tests need not reset it.
    state.set_status_code(code.as_u16());
    state.set_health(&change.system_health);
    json_response(StatusCode::OK, &json!({"ok": true}))
}

/// Pre-recorded STT: hashes the body as it streams in, so a large chunked upload is never held.
async fn batch_listen(stub: &Stub, req: Request<Incoming>) -> Response<Body> {
    let state = stub.state_ref();
    let _active = ActiveBatch::enter(state);
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    bytes += data.len() as u64;
                }
            }
            Err(error) => {
                debug!(%error, "stub: pre-recorded upload failed");
                return error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &error);
            }
        }
    }
    let request_id = request_id();
    let name = stub.name();
    let body = json!({
        "metadata": {
            "request_id": request_id,
            "sha256": hex(&hasher.finalize()[..]),
            "created": now_rfc3339(),
            "duration": audio_seconds(bytes),
            "channels": 1,
            "models": [],
            "model_info": {},
            "stub": name,
            "bytes": bytes,
        },
        "results": {
            "channels": [{
                "alternatives": [{
                    "transcript": format!("{name} heard {bytes} bytes"),
                    "confidence": 0.99,
                    "words": [],
                }],
            }],
        },
    });
    let mut response = json_response(StatusCode::OK, &body);
    insert_request_id(&mut response, &request_id);
    response
}

/// REST TTS: a chunked `audio/mpeg` body whose chunks trickle out like synthesis would.
async fn rest_speak(req: Request<Incoming>) -> Response<Body> {
    let chunks = query_param(req.uri(), "chunks")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(SPEAK_DEFAULT_CHUNKS)
        .min(SPEAK_MAX_CHUNKS);
    let body = match Limited::new(req.into_body(), SMALL_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) => return body_error(&*error),
    };
    let char_count = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("text")
            .and_then(Value::as_str)
            .map(|t| t.chars().count())
    });
    let stream = futures_util::stream::unfold(0usize, move |sent| async move {
        if sent >= chunks {
            return None;
        }
        if sent > 0 {
            tokio::time::sleep(SPEAK_CHUNK_INTERVAL).await;
        }
        let frame = Frame::data(Bytes::from_static(&SPEAK_CHUNK));
        Some((Ok::<_, Infallible>(frame), sent + 1))
    });
    let request_id = request_id();
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("audio/mpeg"));
    if let Some(count) = char_count {
        response.headers_mut().insert(DG_CHAR_COUNT, count.into());
    }
    // Deepgram's Python SDK before v5 reads both into its answer and fails without them.
    let headers = response.headers_mut();
    headers.insert(DG_MODEL_NAME, HeaderValue::from_static("stub"));
    headers.insert(DG_MODEL_UUID, HeaderValue::from_static("stub"));
    insert_request_id(&mut response, &request_id);
    response
}

/// Answers a WebSocket handshake and spawns the session on the upgraded connection.
fn upgrade(
    stub: &Stub,
    cancel: CancellationToken,
    kind: WsKind,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let state = stub.state();
    let Some(key) = websocket_key(&req) else {
        state.bump(&state.http_requests, 1);
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"err_code": "BAD_REQUEST", "err_msg": "expected a WebSocket upgrade"}),
        );
    };
    let request_id = request_id();
    if let Some(code) = query_param(req.uri(), "stub_status") {
        state.bump(&state.ws_refused, 1);
        let code = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .filter(|c| *c != StatusCode::SWITCHING_PROTOCOLS)
            .unwrap_or(StatusCode::BAD_REQUEST);
        let mut response = json_response(
            code,
            &json!({"err_code": "REFUSED", "err_msg": "stub refused"}),
        );
        response
            .headers_mut()
            .insert(DG_ERROR, HeaderValue::from_static("stub refused"));
        insert_request_id(&mut response, &request_id);
        return response;
    }
    let accept = derive_accept_key(key.as_bytes());
    let protocol = if query_param(req.uri(), "stub_echo_protocol") == Some("1") {
        first_offered_protocol(req.headers())
    } else {
        None
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let open = OpenSession::open(Arc::clone(&state), kind);
    let ctx = SessionCtx {
        stub: stub.clone(),
        request_id: request_id.clone(),
        created: now_rfc3339(),
        ignore_flush: query_param(req.uri(), "stub_ignore_flush") == Some("1"),
    };
    tokio::spawn(async move {
        let _open = open;
        tokio::select! {
            () = cancel.cancelled() => {}
            () = async {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            Some(session_config()),
                        )
                        .await;
                        run_session(ws, kind, ctx).await;
                    }
                    Err(error) => debug!(%error, "stub: upgrade failed"),
                }
            } => {}
        }
    });

    let mut response = Response::new(empty_body());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    match HeaderValue::from_str(&accept) {
        Ok(accept) => {
            headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
        }
        Err(error) => debug!(%error, "stub: accept key is not a header value"),
    }
    if let Some(protocol) = protocol {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    insert_request_id(&mut response, &request_id);
    response
}

/// tungstenite's default read buffer is 128 KiB, and tungstenite zero-fills it up to its
/// capacity before every read: a memset of up to 128 KiB per frame on the core the proxy
/// under test shares, and 1.3 GB resident at 10,000 open sessions (most likely what slowed
/// the stub's accepts until a burst of streams through the proxy timed out connecting).
/// Audio frames are a few KiB; the buffer grows for a larger frame.
fn session_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(8 * 1024)
}

async fn run_session(mut ws: Ws, kind: WsKind, ctx: SessionCtx) {
    let state = ctx.stub.state();
    let mut proto = Proto::new(kind);
    let mut out = Vec::new();
    proto.greeting(&ctx, &mut out);
    if let Err(error) = send_all(&mut ws, &mut out).await {
        debug!(%error, "stub: sending the greeting failed");
        return;
    }
    let end = loop {
        let message = match ws.next().await {
            None => break End::Peer,
            Some(Err(error)) => {
                debug!(%error, "stub: WebSocket read failed");
                break End::Peer;
            }
            Some(Ok(message)) => message,
        };
        let flow = match message {
            Message::Binary(data) => {
                state.bump(&state.audio_bytes, data.len() as u64);
                proto.on_binary(data, &ctx, &mut out)
            }
            Message::Text(text) => {
                let parsed = serde_json::from_str::<Value>(text.as_str()).ok();
                let msg_type = parsed
                    .as_ref()
                    .and_then(|v| v.get("type"))
                    .and_then(Value::as_str);
                match msg_type {
                    Some("StubClose") => Flow::Close(Some(stub_close_frame(parsed.as_ref()))),
                    Some("StubDie") => Flow::Die,
                    _ => {
                        if msg_type == Some("KeepAlive") {
                            state.bump(&state.keep_alives, 1);
                        }
                        proto.on_text(text, msg_type, parsed.as_ref(), &ctx, &mut out)
                    }
                }
            }
            Message::Close(_) => break End::Peer,
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Flow::Continue,
        };
        if let Err(error) = send_all(&mut ws, &mut out).await {
            debug!(%error, "stub: WebSocket write failed");
            break End::Peer;
        }
        match flow {
            Flow::Continue => {}
            Flow::Close(frame) => break End::Close(frame),
            Flow::Die => break End::Die,
        }
    };
    match end {
        End::Die => drop(ws),
        End::Close(frame) => {
            if let Err(error) = ws.close(frame).await {
                debug!(%error, "stub: sending close failed");
                return;
            }
            finish_close(&mut ws).await;
        }
        End::Peer => finish_close(&mut ws).await,
    }
}

/// Lets tungstenite flush a queued close reply and see the handshake through, then returns so the
/// caller drops the TCP connection; a client that never answers is given up on.
async fn finish_close(ws: &mut Ws) {
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    if tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, drain)
        .await
        .is_err()
    {
        debug!("stub: client did not finish the close handshake");
    }
}

async fn send_all(ws: &mut Ws, out: &mut Vec<Message>) -> Result<(), tungstenite::Error> {
    if out.is_empty() {
        return Ok(());
    }
    for message in out.drain(..) {
        ws.feed(message).await?;
    }
    ws.flush().await
}

impl Proto {
    fn new(kind: WsKind) -> Proto {
        match kind {
            WsKind::Listen => Proto::Listen(Listen {
                buffered: 0,
                results: 0,
                start: 0.0,
                total: 0,
                hasher: Sha256::new(),
            }),
            WsKind::Flux => Proto::Flux(Flux {
                buffered: 0,
                updates: 0,
                sequence_id: 0,
                window_end: 0.0,
            }),
            WsKind::Speak => Proto::Speak(Speak {
                flushed: 0,
                cleared: 0,
            }),
            WsKind::Agent => Proto::Agent,
        }
    }

    fn greeting(&mut self, ctx: &SessionCtx, out: &mut Vec<Message>) {
        match self {
            Proto::Listen(_) => {}
            Proto::Flux(flux) => {
                out.push(json_message(&json!({
                    "type": "Connected",
                    "request_id": ctx.request_id,
                    "sequence_id": flux.next_sequence_id(),
                })));
            }
            Proto::Speak(_) => out.push(json_message(&json!({
                "type": "Metadata",
                "request_id": ctx.request_id,
                "model_name": "stub",
                "model_version": "0",
                "model_uuid": "stub",
                "stub": ctx.stub.name(),
            }))),
            Proto::Agent => out.push(json_message(&json!({
                "type": "Welcome",
                "request_id": ctx.request_id,
            }))),
        }
    }

    fn on_binary(&mut self, data: Bytes, ctx: &SessionCtx, out: &mut Vec<Message>) -> Flow {
        let state = ctx.stub.state_ref();
        let per_result = ctx.stub.bytes_per_result();
        match self {
            // Deepgram reads an empty binary frame as the end of the stream.
            Proto::Listen(_) | Proto::Flux(_) if data.is_empty() => {
                Flow::Close(Some(normal_close()))
            }
            Proto::Listen(listen) => {
                listen.hasher.update(&data);
                listen.total += data.len() as u64;
                listen.buffered += data.len();
                while listen.buffered >= per_result {
                    listen.buffered -= per_result;
                    out.push(listen.result(per_result, false, ctx));
                    state.bump(&state.final_results_sent, 1);
                }
                Flow::Continue
            }
            Proto::Flux(flux) => {
                flux.buffered += data.len();
                while flux.buffered >= per_result {
                    flux.buffered -= per_result;
                    out.push(flux.update(per_result, ctx));
                    state.bump(&state.turn_infos_sent, 1);
                }
                Flow::Continue
            }
            Proto::Speak(_) => Flow::Continue,
            Proto::Agent => {
                out.push(Message::Binary(data));
                Flow::Continue
            }
        }
    }

    fn on_text(
        &mut self,
        text: tungstenite::Utf8Bytes,
        kind: Option<&str>,
        parsed: Option<&Value>,
        ctx: &SessionCtx,
        out: &mut Vec<Message>,
    ) -> Flow {
        let state = ctx.stub.state_ref();
        match self {
            Proto::Listen(listen) => match kind {
                Some("Finalize") => {
                    state.bump(&state.finalizes, 1);
                    out.push(listen.flush_leftover(ctx));
                    state.bump(&state.final_results_sent, 1);
                    Flow::Continue
                }
                Some("CloseStream") => {
                    state.bump(&state.close_streams, 1);
                    out.push(listen.flush_leftover(ctx));
                    state.bump(&state.final_results_sent, 1);
                    out.push(json_message(&json!({
                        "type": "Metadata",
                        "transaction_key": "deprecated",
                        "request_id": ctx.request_id,
                        "sha256": hex(&listen.hasher.clone().finalize()[..]),
                        "created": ctx.created,
                        "duration": audio_seconds(listen.total),
                        "channels": 1,
                        "stub": ctx.stub.name(),
                    })));
                    Flow::Close(Some(normal_close()))
                }
                _ => Flow::Continue,
            },
            Proto::Flux(flux) => match kind {
                Some("CloseStream") => {
                    state.bump(&state.close_streams, 1);
                    let leftover = std::mem::take(&mut flux.buffered);
                    out.push(flux.update(leftover, ctx));
                    state.bump(&state.turn_infos_sent, 1);
                    // Flux ends with a close frame that carries no status code.
                    Flow::Close(None)
                }
                _ => Flow::Continue,
            },
            Proto::Speak(speak) => match kind {
                Some("Speak") => {
                    state.bump(&state.speaks, 1);
                    let chars = parsed
                        .and_then(|v| v.get("text"))
                        .and_then(Value::as_str)
                        .map_or(0, |t| t.chars().count());
                    let frames = chars.div_ceil(TTS_CHARS_PER_FRAME).max(1);
                    out.extend(
                        std::iter::repeat_with(|| Message::Binary(Bytes::from_static(&TTS_FRAME)))
                            .take(frames),
                    );
                    Flow::Continue
                }
                Some("Flush") => {
                    state.bump(&state.flushes, 1);
                    if !ctx.ignore_flush {
                        out.push(json_message(
                            &json!({"type": "Flushed", "sequence_id": speak.flushed}),
                        ));
                        speak.flushed += 1;
                    }
                    Flow::Continue
                }
                Some("Clear") => {
                    state.bump(&state.clears, 1);
                    out.push(json_message(
                        &json!({"type": "Cleared", "sequence_id": speak.cleared}),
                    ));
                    speak.cleared += 1;
                    Flow::Continue
                }
                Some("Close") => {
                    state.bump(&state.speak_closes, 1);
                    Flow::Close(Some(normal_close()))
                }
                _ => Flow::Continue,
            },
            Proto::Agent => {
                out.push(Message::Text(text));
                // Deepgram confirms the settings; an agent app waits for this.
                if kind == Some("Settings") {
                    out.push(json_message(&json!({"type": "SettingsApplied"})));
                }
                Flow::Continue
            }
        }
    }
}

impl Listen {
    fn result(&mut self, bytes: usize, from_finalize: bool, ctx: &SessionCtx) -> Message {
        self.results += 1;
        let duration = audio_seconds(bytes as u64);
        let message = json_message(&json!({
            "type": "Results",
            "channel_index": [0, 1],
            "duration": duration,
            "start": self.start,
            "is_final": true,
            "speech_final": false,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [{
                    "transcript": format!("{} {}", ctx.stub.name(), self.results),
                    "confidence": 0.99,
                    "words": [],
                }],
            },
            "metadata": {
                "request_id": ctx.request_id,
                "model_info": {"name": "stub", "version": "0", "arch": "stub"},
                "model_uuid": "stub",
            },
        }));
        self.start += duration;
        message
    }

    fn flush_leftover(&mut self, ctx: &SessionCtx) -> Message {
        let leftover = std::mem::take(&mut self.buffered);
        self.result(leftover, true, ctx)
    }
}

impl Flux {
    fn next_sequence_id(&mut self) -> u64 {
        let id = self.sequence_id;
        self.sequence_id += 1;
        id
    }

    fn update(&mut self, bytes: usize, ctx: &SessionCtx) -> Message {
        self.updates += 1;
        let window_start = self.window_end;
        self.window_end += audio_seconds(bytes as u64);
        json_message(&json!({
            "type": "TurnInfo",
            "event": "Update",
            "request_id": ctx.request_id,
            "sequence_id": self.next_sequence_id(),
            "turn_index": 0,
            "audio_window_start": window_start,
            "audio_window_end": self.window_end,
            "transcript": format!("{} {}", ctx.stub.name(), self.updates),
            "words": [],
            "end_of_turn_confidence": 0.0,
        }))
    }
}

fn stub_close_frame(parsed: Option<&Value>) -> CloseFrame {
    let code = parsed
        .and_then(|v| v.get("code"))
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .unwrap_or(1000);
    let reason = parsed
        .and_then(|v| v.get("reason"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }
}

fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

fn websocket_key(req: &Request<Incoming>) -> Option<HeaderValue> {
    let wants_websocket = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        });
    if !wants_websocket {
        return None;
    }
    req.headers().get(SEC_WEBSOCKET_KEY).cloned()
}

fn first_offered_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| !p.is_empty())
        .and_then(|p| HeaderValue::from_str(p).ok())
}

/// The raw (not percent-decoded) value of `key` in the query; the stub's own parameters are
/// plain numbers, so decoding is not needed.
fn query_param<'a>(uri: &'a Uri, key: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(
    status: StatusCode,
    err_code: &str,
    error: &dyn std::fmt::Display,
) -> Response<Body> {
    json_response(
        status,
        &json!({"err_code": err_code, "err_msg": error.to_string()}),
    )
}

/// A request body that could not be read: too large, or the client went away mid-upload.
fn body_error(error: &(dyn std::error::Error + 'static)) -> Response<Body> {
    if error.is::<LengthLimitError>() {
        error_response(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", &error)
    } else {
        error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &error)
    }
}

fn not_found(path: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"err_code": "NOT_FOUND", "err_msg": format!("no route for {path}")}),
    )
}

fn method_not_allowed() -> Response<Body> {
    json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"err_code": "METHOD_NOT_ALLOWED", "err_msg": "method not allowed"}),
    )
}

fn empty_body() -> Body {
    Full::new(Bytes::new()).boxed_unsync()
}

fn insert_request_id<B>(response: &mut Response<B>, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(DG_REQUEST_ID, value);
    }
}

fn json_message(value: &Value) -> Message {
    Message::text(value.to_string())
}

/// A random UUID-v4-shaped id, like Deepgram's `request_id`.
fn request_id() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        0x8000 | fastrand::u16(..0x4000),
        fastrand::u64(..1 << 48),
    )
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn audio_seconds(bytes: u64) -> f64 {
    bytes as f64 / AUDIO_BYTES_PER_SECOND
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
