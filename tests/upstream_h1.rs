//! Switchyard's own HTTP/1.1 upstream client (`src/proxy/h1.rs`) against a scripted upstream:
//! a raw TCP listener whose every byte the test reads and writes. Covered: keeping
//! connections and when not to, a kept connection that turns out closed, response framing
//! (chunked with extensions and trailers, close-delimited, bodiless), interim answers, an
//! early final answer during an upload, answers that are not HTTP, a body cut short, and the
//! request framing the upstream sees.
//!
//! Ordering comes from signals only (an accept, bytes read, an answer received), never from
//! sleeps, and every wait is bounded by `PATIENCE`, so a missing event fails an assertion
//! instead of hanging the run. The stall tests (section 12) pace a peer with sleeps, since
//! a slow peer is what they are about: 50-100 ms steps against a 1 s timer, or a pause of
//! 2.5 timer periods that only a longer timer lets pass.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------
// Harness: raw peers, the scripted upstream, clients.
// ---------------------------------------------------------------------------------------

/// `fut`, or a failed assertion naming `what` after `PATIENCE`.
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing happened in {PATIENCE:?}"))
}

/// A message head as it was on the wire: the start line, then the fields in order (names
/// lower-cased, values trimmed).
#[derive(Debug)]
struct Head {
    start: String,
    fields: Vec<(String, String)>,
}

impl Head {
    fn parse(bytes: &[u8]) -> Head {
        let text = std::str::from_utf8(bytes).expect("a head is ASCII");
        let mut lines = text.split("\r\n");
        let start = lines.next().expect("a start line").to_owned();
        let fields = lines
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("`{line}` is not a header field"));
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        Head { start, fields }
    }

    /// Every value of `name`, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of `name`, which must appear exactly once.
    fn one(&self, name: &str) -> &str {
        match self.all(name)[..] {
            [value] => value,
            ref values => panic!("expected one `{name}`, found {values:?} in {self:#?}"),
        }
    }

    fn lacks(&self, name: &str) -> bool {
        self.all(name).is_empty()
    }
}

/// One end of a raw TCP connection: an upstream connection Switchyard opened, or a client
/// connection to Switchyard. Reads are buffered so heads and bodies can be taken exactly.
struct Peer {
    io: TcpStream,
    buf: BytesMut,
}

impl Peer {
    fn new(io: TcpStream) -> Peer {
        io.set_nodelay(true).expect("nodelay");
        Peer {
            io,
            buf: BytesMut::new(),
        }
    }

    /// A client connection to Switchyard's proxy listener.
    async fn client(env: &Env) -> Peer {
        let io = within(
            "connecting to Switchyard",
            TcpStream::connect(env.app().proxy_addr),
        )
        .await
        .expect("connect to Switchyard");
        Peer::new(io)
    }

    /// Reads more into the buffer; `Ok(0)` when the other side closed.
    async fn fill(&mut self, what: &str) -> std::io::Result<usize> {
        within(what, self.io.read_buf(&mut self.buf)).await
    }

    /// Reads more, failing if the connection ends.
    async fn more(&mut self, what: &str) {
        let n = self
            .fill(what)
            .await
            .unwrap_or_else(|e| panic!("{what}: the connection failed: {e}"));
        assert!(
            n > 0,
            "{what}: the connection closed; had {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// The next message head.
    async fn read_head(&mut self, what: &str) -> Head {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                let head = self.buf.split_to(at + 4);
                return Head::parse(&head);
            }
            self.more(what).await;
        }
    }

    /// Exactly `n` bytes.
    async fn read_exact(&mut self, n: usize, what: &str) -> Bytes {
        while self.buf.len() < n {
            self.more(what).await;
        }
        self.buf.split_to(n).freeze()
    }

    /// One line without its CRLF.
    async fn read_line(&mut self, what: &str) -> String {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                let line = self.buf.split_to(at + 2);
                return String::from_utf8(line[..at].to_vec()).expect("an ASCII line");
            }
            self.more(what).await;
        }
    }

    /// One chunk of a chunked body, checked strictly (a bare hexadecimal size, CRLFs in
    /// place): `None` for the last chunk, after its trailer section, which must be empty.
    async fn read_chunk(&mut self, what: &str) -> Option<Bytes> {
        let line = self.read_line(what).await;
        let size = usize::from_str_radix(&line, 16)
            .unwrap_or_else(|_| panic!("{what}: `{line}` is not a bare chunk size"));
        if size == 0 {
            let end = self.read_line(what).await;
            assert_eq!(end, "", "{what}: no trailers were expected");
            return None;
        }
        let data = self.read_exact(size, what).await;
        let crlf = self.read_exact(2, what).await;
        assert_eq!(&crlf[..], b"\r\n", "{what}: a chunk ends with CRLF");
        Some(data)
    }

    /// Chunks until `n` bytes of data came.
    async fn read_chunked_data(&mut self, n: usize, what: &str) -> Bytes {
        let mut data = BytesMut::new();
        while data.len() < n {
            match self.read_chunk(what).await {
                Some(chunk) => data.extend_from_slice(&chunk),
                None => panic!("{what}: the body ended after {} of {n} bytes", data.len()),
            }
        }
        assert_eq!(data.len(), n, "{what}: chunks end where the data ends");
        data.freeze()
    }

    /// A whole chunked body, up to and including its last chunk.
    async fn read_chunked(&mut self, what: &str) -> Bytes {
        let mut data = BytesMut::new();
        while let Some(chunk) = self.read_chunk(what).await {
            data.extend_from_slice(&chunk);
        }
        data.freeze()
    }

    /// Reads until the other side closes (a reset counts as closed) and returns how many
    /// bytes came first.
    async fn drain_to_close(&mut self, what: &str) -> usize {
        let mut total = self.buf.len();
        self.buf.clear();
        loop {
            match self.fill(what).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => {
                    total += n;
                    self.buf.clear();
                }
            }
        }
    }

    /// The other side closes this connection without sending anything more.
    async fn expect_closed(&mut self, what: &str) {
        let extra = self.drain_to_close(what).await;
        assert_eq!(extra, 0, "{what}: bytes arrived before the close");
    }

    async fn write(&mut self, bytes: &[u8]) {
        within("writing", self.io.write_all(bytes))
            .await
            .expect("the write succeeds");
    }

    /// Writes one byte at a time, flushing after each (Nagle is off): every byte leaves
    /// in its own segment.
    async fn write_bytewise(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write(std::slice::from_ref(byte)).await;
            within("flushing", self.io.flush())
                .await
                .expect("the flush succeeds");
        }
    }

    /// Sends FIN: nothing more from this side, while it keeps reading.
    async fn shutdown_write(&mut self) {
        within("shutting down", self.io.shutdown())
            .await
            .expect("shutdown succeeds");
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The scripted upstream: each connection Switchyard opens is handed to the test.
struct Upstream {
    addr: SocketAddr,
    accepted: mpsc::UnboundedReceiver<Peer>,
}

async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let addr = listener.local_addr().expect("the upstream's address");
    let (tx, accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            if tx.send(Peer::new(io)).is_err() {
                return;
            }
        }
    });
    Upstream { addr, accepted }
}

impl Upstream {
    /// The next connection Switchyard opens.
    async fn accept(&mut self, what: &str) -> Peer {
        within(what, self.accepted.recv())
            .await
            .expect("the accept loop runs")
    }

    /// The next request head on the kept connection `conn`; fails at once if Switchyard
    /// opens a new connection instead.
    async fn next_on(&mut self, conn: &mut Peer, what: &str) -> Head {
        tokio::select! {
            biased;
            head = conn.read_head(what) => head,
            _ = self.accepted.recv() => {
                panic!("{what}: Switchyard opened a new upstream connection instead of reusing the kept one")
            }
        }
    }

    /// No connection was opened beyond those the test took.
    fn assert_no_other_connection(&mut self) {
        assert!(
            matches!(self.accepted.try_recv(), Err(TryRecvError::Empty)),
            "Switchyard opened an upstream connection the script did not expect"
        );
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }
}

/// A request body the test feeds chunk by chunk through a channel; ends when the sender is
/// dropped. Its length is unknown unless the request declares one.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(Frame::data(data))))
    }
}

fn channel_body() -> (mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = mpsc::channel(1);
    (tx, ChannelBody(rx))
}

fn channel_client() -> Client<HttpConnector, ChannelBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client speaking HTTP/2 by prior knowledge (h2c) to Switchyard.
fn h2c_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// An answer through Switchyard, its body read to the end (or to its error).
#[derive(Debug)]
struct Answer {
    parts: http::response::Parts,
    body: Result<Bytes, String>,
    trailers: Option<HeaderMap>,
}

impl Answer {
    /// Status, header names and the start of the body: enough to see what went wrong,
    /// short enough to read (a failing 64 KiB header would drown the message).
    fn summary(&self) -> String {
        let names: Vec<&str> = self.parts.headers.keys().map(|n| n.as_str()).collect();
        let body = match &self.body {
            Ok(bytes) => {
                let shown = &bytes[..bytes.len().min(200)];
                format!(
                    "{:?} ({} bytes)",
                    String::from_utf8_lossy(shown),
                    bytes.len()
                )
            }
            Err(e) => format!("failed: {e}"),
        };
        format!("{} with fields {names:?}, body {body}", self.parts.status)
    }

    fn status(&self) -> StatusCode {
        self.parts.status
    }

    fn body(&self) -> &Bytes {
        self.body.as_ref().expect("the body arrives in full")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(self.body()).expect("a JSON body")
    }
}

/// Sends a request on its own task (the test scripts the upstream meanwhile) and reads its
/// answer to the end.
fn answer(pending: ResponseFuture) -> JoinHandle<Answer> {
    tokio::spawn(async move {
        let response = pending.await.expect("Switchyard answers");
        let (parts, body) = response.into_parts();
        let (body, trailers) = match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned();
                (Ok(collected.to_bytes()), trailers)
            }
            Err(e) => (Err(e.to_string()), None),
        };
        Answer {
            parts,
            body,
            trailers,
        }
    })
}

/// The result of a task, bounded by `PATIENCE`.
async fn joined<T>(what: &str, task: JoinHandle<T>) -> T {
    within(what, task)
        .await
        .unwrap_or_else(|e| panic!("{what}: the task failed: {e}"))
}

fn get_request(env: &Env, path: &str) -> Request<Full<Bytes>> {
    Request::get(env.proxy_url(path))
        .body(Full::new(Bytes::new()))
        .expect("a request")
}

/// A GET through Switchyard on `client`, sent on its own task.
fn spawn_get(env: &Env, client: &HttpClient, path: &str) -> JoinHandle<Answer> {
    answer(client.request(get_request(env, path)))
}

/// A POST of `body` to `path` through Switchyard, answered in the background.
fn spawn_post(env: &Env, path: &str, body: &'static [u8]) -> JoinHandle<Answer> {
    answer(
        env.client.request(
            Request::post(env.proxy_url(path))
                .body(Full::new(Bytes::from_static(body)))
                .expect("a request"),
        ),
    )
}

/// A 200 from blue with exactly `body`.
fn assert_ok(answer: &Answer, body: &[u8]) {
    assert_eq!(answer.status(), StatusCode::OK, "{}", answer.summary());
    assert_eq!(color_of_parts(&answer.parts), "blue");
    assert_eq!(
        answer.body(),
        &Bytes::copy_from_slice(body),
        "the body arrives exactly"
    );
}

/// Switchyard's own 502: JSON `upstream_failed`, tagged with the colour it tried.
fn assert_upstream_failed(answer: &Answer) {
    assert_eq!(
        answer.status(),
        StatusCode::BAD_GATEWAY,
        "{}",
        answer.summary()
    );
    assert_eq!(color_of_parts(&answer.parts), "blue");
    let json = answer.json();
    assert_eq!(json["error"], "upstream_failed", "{json}");
    assert!(json["message"].is_string(), "{json}");
}

fn color_of_parts(parts: &http::response::Parts) -> &str {
    parts
        .headers
        .get("x-switchyard-color")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `n` bytes that are not all alike, so a misplaced byte shows.
fn patterned(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1-2. Keeping connections, and when not to.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let first = spawn_get(&env, &env.client, "/one");
    let mut conn = up.accept("the first request connects").await;
    let head = conn.read_head("the first request").await;
    assert_eq!(head.start, "GET /one HTTP/1.1");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        .await;
    assert_ok(&joined("the first answer", first).await, b"first");

    // Again from the same client, then from another client connection: both on `conn`.
    let second = spawn_get(&env, &env.client, "/two");
    let head = up.next_on(&mut conn, "the second request").await;
    assert_eq!(head.start, "GET /two HTTP/1.1");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")
        .await;
    assert_ok(&joined("the second answer", second).await, b"second");

    let other_client = http_client();
    let third = spawn_get(&env, &other_client, "/three");
    let head = up.next_on(&mut conn, "the third request").await;
    assert_eq!(head.start, "GET /three HTTP/1.1");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nthird")
        .await;
    assert_ok(&joined("the third answer", third).await, b"third");

    up.assert_no_other_connection();
}

/// The upstream's status line reaches an HTTP/1.1 client as it came: its own reason phrase
/// (Switchyard never rewrites an answer), an empty one, or the standard one.
#[tokio::test]
async fn the_upstreams_reason_phrase_goes_on_as_it_came() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let mut client = Peer::client(&env).await;
    let mut conn = None;
    for (line, expected) in [
        (
            "HTTP/1.1 400 Upstream Reason",
            "HTTP/1.1 400 Upstream Reason",
        ),
        ("HTTP/1.1 429 ", "HTTP/1.1 429 "),
        ("HTTP/1.1 200 OK", "HTTP/1.1 200 OK"),
        (
            "HTTP/1.1 503 Service Unavailable",
            "HTTP/1.1 503 Service Unavailable",
        ),
        // No reason and no space before it: the standard phrase stands in.
        ("HTTP/1.1 200", "HTTP/1.1 200 OK"),
        ("HTTP/1.1 404", "HTTP/1.1 404 Not Found"),
        // A code with no standard phrase keeps its own, or none (not hyper's "<none>").
        (
            "HTTP/1.1 599 Network Timeout",
            "HTTP/1.1 599 Network Timeout",
        ),
        ("HTTP/1.1 599", "HTTP/1.1 599 "),
        ("HTTP/1.1 599 ", "HTTP/1.1 599 "),
    ] {
        client
            .write(b"GET /v1/listen HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let upstream = match conn.as_mut() {
            Some(c) => c,
            None => conn.insert(up.accept("the request connects").await),
        };
        upstream.read_head("the request").await;
        upstream
            .write(format!("{line}\r\ncontent-length: 0\r\n\r\n").as_bytes())
            .await;
        let head = client.read_head("the answer").await;
        assert_eq!(head.start, expected);
    }
}

/// The first answer ends its connection by its own terms (`answer`, which the upstream
/// follows by keeping the connection open anyway); Switchyard must close it and send the
/// next request on a new connection.
async fn an_answer_that_ends_the_connection_is_not_reused(answer: &[u8], body: &[u8]) {
    not_reused_after(http::Method::GET, answer, StatusCode::OK, body).await;
}

/// `an_answer_that_ends_the_connection_is_not_reused` for a first request of `method`,
/// whose answer has `status`; returns the first answer.
async fn not_reused_after(
    method: http::Method,
    answer: &[u8],
    status: StatusCode,
    body: &[u8],
) -> Answer {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let mut request = get_request(&env, "/first");
    *request.method_mut() = method;
    let first = self::answer(env.client.request(request));
    let mut conn = up.accept("the first request connects").await;
    conn.read_head("the first request").await;
    conn.write(answer).await;
    let first = joined("the first answer", first).await;
    assert_eq!(first.status(), status, "{}", first.summary());
    assert_eq!(color_of_parts(&first.parts), "blue");
    assert_eq!(first.body(), &Bytes::copy_from_slice(body));
    // The connection is let go once the body ended: before the client saw its end.
    conn.expect_closed("Switchyard closes the connection the answer ended")
        .await;

    let second = spawn_get(&env, &env.client, "/second");
    let mut fresh = up.accept("the second request opens a new connection").await;
    let head = fresh.read_head("the second request").await;
    assert_eq!(head.start, "GET /second HTTP/1.1");
    fresh
        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nnew")
        .await;
    assert_ok(&joined("the second answer", second).await, b"new");
    up.assert_no_other_connection();
    first
}

#[tokio::test]
async fn connection_close_in_an_answer_means_the_next_request_uses_a_new_connection() {
    an_answer_that_ends_the_connection_is_not_reused(
        b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2\r\n\r\nok",
        b"ok",
    )
    .await;
}

#[tokio::test]
async fn an_http_1_0_answer_means_the_next_request_uses_a_new_connection() {
    an_answer_that_ends_the_connection_is_not_reused(
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"ok",
    )
    .await;
}

/// An HTTP/1.0 upstream's answer goes to the client as HTTP/1.1 (an intermediary sends
/// its own version, RFC 9110 §6.2), so the client's connection is kept.
#[tokio::test]
async fn an_http_1_0_answer_reaches_the_client_as_http_1_1_on_a_kept_connection() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let mut client = Peer::client(&env).await;
    for path in ["/first", "/second"] {
        client
            .write(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await;
        let mut conn = up.accept("each request connects anew").await;
        conn.read_head("the request").await;
        conn.write(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let head = client.read_head("the answer").await;
        assert_eq!(head.start, "HTTP/1.1 200 OK");
        assert_eq!(client.read_exact(2, "the body").await, &b"ok"[..]);
    }
}

#[tokio::test]
async fn an_answer_with_both_transfer_encoding_and_content_length_is_relayed_but_not_reused() {
    // Both framings at once is how response smuggling starts: the chunked framing wins
    // (RFC 9112 §6.3), and the connection is not trusted with another request.
    an_answer_that_ends_the_connection_is_not_reused(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n\
          2\r\nok\r\n0\r\n\r\n",
        b"ok",
    )
    .await;
}

/// A HEAD, 204 or 304 answer has no body even when its head announces one (a HEAD's or a
/// 304's length is that of the representation, which RFC 9110 allows). A faulty upstream
/// may send that body anyway, after the head, where the next request on the connection
/// (another client's) would take it for its answer: such a connection is not kept.
#[tokio::test]
async fn a_connection_whose_answer_announces_a_body_it_has_not_is_not_reused() {
    for (method, answer, status) in [
        (
            http::Method::HEAD,
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"[..],
            StatusCode::OK,
        ),
        (
            http::Method::GET,
            b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 99\r\n\r\n",
            StatusCode::NOT_MODIFIED,
        ),
        (
            http::Method::GET,
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            StatusCode::NO_CONTENT,
        ),
        (
            http::Method::GET,
            b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
            StatusCode::NOT_MODIFIED,
        ),
    ] {
        let first = not_reused_after(method.clone(), answer, status, b"").await;
        if method == http::Method::HEAD {
            // The length of what a GET would get reaches the client as it came.
            let length = first.parts.headers.get(header::CONTENT_LENGTH);
            assert_eq!(length.map(|v| v.as_bytes()), Some(&b"1234"[..]));
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. A kept connection that turns out closed.
// ---------------------------------------------------------------------------------------

/// An env, its upstream, and the upstream connection one GET left kept.
async fn with_a_kept_connection() -> (Upstream, Env, Peer) {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let first = spawn_get(&env, &env.client, "/first");
    let mut conn = up.accept("the first request connects").await;
    conn.read_head("the first request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        .await;
    assert_ok(&joined("the first answer", first).await, b"first");
    (up, env, conn)
}

#[tokio::test]
async fn a_kept_connection_the_upstream_closed_while_idle_is_not_a_502() {
    let (mut up, env, conn) = with_a_kept_connection().await;
    // The upstream times the idle connection out. Whether Switchyard sees the close before
    // it picks the connection or only when sending on it, the request must succeed.
    drop(conn);

    let second = spawn_get(&env, &env.client, "/second");
    let mut fresh = up.accept("the second request opens a new connection").await;
    let head = fresh.read_head("the second request").await;
    assert_eq!(head.start, "GET /second HTTP/1.1");
    fresh
        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")
        .await;
    assert_ok(&joined("the second answer", second).await, b"second");
    up.assert_no_other_connection();
}

#[tokio::test]
async fn a_get_on_a_kept_connection_closed_without_an_answer_is_sent_again() {
    let (mut up, env, mut conn) = with_a_kept_connection().await;
    // The kept connection is alive when Switchyard picks it; the upstream reads the
    // request and then closes without a byte of answer (as a server whose idle timer
    // fired just as the request arrived does).
    let second = spawn_get(&env, &env.client, "/second");
    let head = up.next_on(&mut conn, "the second request").await;
    assert_eq!(head.start, "GET /second HTTP/1.1");
    drop(conn);

    let mut fresh = up
        .accept("the request is sent again on a new connection")
        .await;
    let head = fresh.read_head("the request sent again").await;
    assert_eq!(head.start, "GET /second HTTP/1.1");
    fresh
        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nretry")
        .await;
    assert_ok(&joined("the second answer", second).await, b"retry");
    up.assert_no_other_connection();
}

#[tokio::test]
async fn a_post_whose_body_was_sent_on_a_connection_then_closed_is_not_sent_again() {
    let (mut up, env, mut conn) = with_a_kept_connection().await;
    // A POST goes on the kept connection; the upstream reads its head AND its whole body
    // before closing without an answer. Switchyard has then read the client's body (it
    // only forwards what it read), so it cannot send the request again: the body is gone,
    // and the upstream may have acted on it. The guaranteed outcome is a 502, on no
    // other connection. (Had the close come before Switchyard read any of the body, a
    // new connection would be legitimate: see the next test.)
    let post = spawn_post(&env, "/upload", b"small body");
    let head = up.next_on(&mut conn, "the POST").await;
    assert_eq!(head.start, "POST /upload HTTP/1.1");
    assert_eq!(head.one("content-length"), "10");
    let body = conn.read_exact(10, "the POST's body").await;
    assert_eq!(&body[..], b"small body");
    drop(conn);

    // Were it sent again, the new connection would get no answer and this would time out.
    assert_upstream_failed(&joined("the POST's answer", post).await);
    up.assert_no_other_connection();
}

#[tokio::test]
async fn a_post_on_a_connection_closed_before_any_body_was_read_is_sent_again() {
    let (mut up, env, mut conn) = with_a_kept_connection().await;
    // The client sends the head alone; its body follows only once the request is on
    // its second connection. When the kept connection closes, Switchyard has read none of
    // the body, so the request can go again, whole.
    let mut client = Peer::client(&env).await;
    client
        .write(b"POST /upload HTTP/1.1\r\nhost: client.example\r\ncontent-length: 5\r\n\r\n")
        .await;
    let head = up.next_on(&mut conn, "the POST's head").await;
    assert_eq!(head.start, "POST /upload HTTP/1.1");
    drop(conn);

    let mut fresh = up
        .accept("the POST is sent again on a new connection")
        .await;
    let head = fresh.read_head("the POST sent again").await;
    assert_eq!(head.start, "POST /upload HTTP/1.1");
    assert_eq!(head.one("content-length"), "5");
    client.write(b"hello").await;
    let body = fresh.read_exact(5, "the POST's body").await;
    assert_eq!(&body[..], b"hello");
    fresh
        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nstored")
        .await;

    let answer = client.read_head("the POST's answer").await;
    assert_eq!(answer.start, "HTTP/1.1 200 OK");
    assert_eq!(answer.one("x-switchyard-color"), "blue");
    let body = client.read_exact(6, "the answer's body").await;
    assert_eq!(&body[..], b"stored");
    up.assert_no_other_connection();
}

#[tokio::test]
async fn an_empty_post_the_upstream_received_is_not_sent_twice() {
    let (mut up, env, mut conn) = with_a_kept_connection().await;
    // An empty POST is complete once its head is written. The upstream reads it and
    // closes without answering: it may have acted on it (e.g. started a job), and a proxy
    // must not repeat a non-idempotent request on its own (RFC 7230 §6.3.1; RFC 9110
    // §9.2.2). Expected: a 502, and no second POST.
    let post = spawn_post(&env, "/jobs", b"");
    let head = up.next_on(&mut conn, "the empty POST").await;
    assert_eq!(head.start, "POST /jobs HTTP/1.1");
    drop(conn);

    let answered = tokio::select! {
        answered = joined("the POST's answer", post) => answered,
        Some(mut again) = up.accepted.recv() => {
            let head = again.read_head("the POST sent again").await;
            panic!("the upstream got the POST a second time: {head:?}");
        }
    };
    assert_upstream_failed(&answered);
}

// ---------------------------------------------------------------------------------------
// 4-6. Response framing.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_chunked_answer_with_extensions_and_trailers_sent_bytewise_arrives_whole() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let first = spawn_get(&env, &env.client, "/chunked");
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    // Every byte in its own segment, the head too: each partial parse has to wait.
    conn.write_bytewise(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-digest\r\n\r\n\
          5;lang=en\r\nhello\r\n\
          A;name=\"quoted;value\"\r\n, chunked!\r\n\
          3 ;bws\r\n!!!\r\n\
          0;last\r\nx-digest: abc123\r\nx-more: 1\r\n\r\n",
    )
    .await;
    assert_ok(
        &joined("the chunked answer", first).await,
        b"hello, chunked!!!!",
    );

    // The connection is reused: the body ended exactly at the trailer section's end. The
    // next request comes over HTTP/2, which carries trailers to the client.
    let h2 = h2c_client::<Full<Bytes>>();
    let second = answer(h2.request(get_request(&env, "/again")));
    let head = up.next_on(&mut conn, "the second request").await;
    assert_eq!(head.start, "GET /again HTTP/1.1");
    conn.write(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
          4;x=y\r\nagai\r\n1\r\nn\r\n0\r\nx-digest: def456\r\n\r\n",
    )
    .await;
    let second = joined("the second answer", second).await;
    assert_ok(&second, b"again");
    let trailers = second.trailers.as_ref().expect("the trailers arrive");
    assert_eq!(trailers["x-digest"], "def456");

    // Lines ended by a bare LF are read too (RFC 9112 §2.2), byte by byte as well; before,
    // the answer waited for a CRLF that never came, until stall_timeout.
    let third = spawn_get(&env, &env.client, "/lf");
    let head = up.next_on(&mut conn, "the third request").await;
    assert_eq!(head.start, "GET /lf HTTP/1.1");
    conn.write_bytewise(
        b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n5;x=y\nhello\n1\r\n!\n0\nx-digest: lf\n\n",
    )
    .await;
    assert_ok(&joined("the bare-LF answer", third).await, b"hello!");
    up.assert_no_other_connection();
}

/// A length sent twice goes on once, and a 204's length not at all: HTTP/2 clients refuse
/// both (RFC 9110 §8.6, RFC 9113 §8.1.1).
#[tokio::test]
async fn a_repeated_length_goes_on_once_and_a_204_has_none() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let h2 = h2c_client::<Full<Bytes>>();
    let first = answer(h2.request(get_request(&env, "/twice")));
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the first request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let first = joined("the first answer", first).await;
    assert_ok(&first, b"ok");
    let lengths: Vec<_> = first
        .parts
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .collect();
    assert_eq!(lengths, ["2"], "{}", first.summary());

    let second = answer(h2.request(get_request(&env, "/nothing")));
    up.next_on(&mut conn, "the second request").await;
    conn.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
        .await;
    let second = joined("the second answer", second).await;
    assert_eq!(
        second.status(),
        StatusCode::NO_CONTENT,
        "{}",
        second.summary()
    );
    assert!(
        second.parts.headers.get(header::CONTENT_LENGTH).is_none(),
        "{}",
        second.summary()
    );

    let head = Request::head(env.proxy_url("/head"))
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let third = answer(h2.request(head));
    up.next_on(&mut conn, "the HEAD request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 7\r\n\r\n")
        .await;
    let third = joined("the HEAD answer", third).await;
    let lengths: Vec<_> = third
        .parts
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .collect();
    assert_eq!(lengths, ["7"], "{}", third.summary());
}

/// Trailer fields that may not be trailers (connection-specific, framing, routing) are
/// left out, so an HTTP/2 client gets the body and the rest of the trailers instead of a
/// reset stream; an HTTP/1.1 client that asked for trailers gets those its `Trailer`
/// header names.
#[tokio::test]
async fn trailers_lose_forbidden_fields_and_reach_both_kinds_of_client() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let answer_bytes: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-digest\r\n\r\n\
          5\r\nhello\r\n0\r\nx-digest: abc123\r\nconnection: close\r\nkeep-alive: 5\r\n\
          content-length: 99\r\n\r\n";

    let h2 = h2c_client::<Full<Bytes>>();
    let first = answer(h2.request(get_request(&env, "/over-h2")));
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the first request").await;
    conn.write(answer_bytes).await;
    let first = joined("the answer over HTTP/2", first).await;
    assert_ok(&first, b"hello");
    let trailers = first.trailers.as_ref().expect("the trailers arrive");
    let names: Vec<&str> = trailers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-digest"]);

    let mut client = Peer::client(&env).await;
    client
        .write(b"GET /over-h1 HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n")
        .await;
    up.next_on(&mut conn, "the second request").await;
    conn.write(answer_bytes).await;
    let head = client.read_head("the answer over HTTP/1.1").await;
    assert_eq!(head.all("trailer"), ["x-digest"]);
    assert_eq!(client.read_line("the chunk size").await, "5");
    assert_eq!(&client.read_exact(7, "the chunk").await[..], b"hello\r\n");
    assert_eq!(client.read_line("the last chunk").await, "0");
    assert_eq!(client.read_line("the trailer").await, "x-digest: abc123");
    assert_eq!(client.read_line("the end").await, "");
}

/// Whitespace between a field name and its colon is taken out, and the answer relayed:
/// RFC 9112 §5.1 has a proxy remove it rather than refuse the answer.
#[tokio::test]
async fn whitespace_before_a_colon_in_an_answer_is_taken_out() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let first = spawn_get(&env, &env.client, "/spaced");
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length : 2\r\nx-spaced\t: yes\r\n\r\nok")
        .await;
    let first = joined("the answer", first).await;
    assert_ok(&first, b"ok");
    assert_eq!(
        first.parts.headers["x-spaced"],
        "yes",
        "{}",
        first.summary()
    );
}

#[tokio::test]
async fn a_close_delimited_answer_arrives_whole_and_its_connection_is_not_reused() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let first = spawn_get(&env, &env.client, "/until-close");
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nno length, ")
        .await;
    conn.write(b"no chunks: the end is the close").await;
    drop(conn);
    assert_ok(
        &joined("the close-delimited answer", first).await,
        b"no length, no chunks: the end is the close",
    );

    let second = spawn_get(&env, &env.client, "/next");
    let mut fresh = up.accept("the next request opens a new connection").await;
    let head = fresh.read_head("the next request").await;
    assert_eq!(head.start, "GET /next HTTP/1.1");
    fresh
        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext")
        .await;
    assert_ok(&joined("the next answer", second).await, b"next");
    up.assert_no_other_connection();
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_and_keep_the_connection() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    // One raw client connection for all four requests: a stray body byte after any of the
    // bodiless answers would show up as a garbled next status line.
    let mut client = Peer::client(&env).await;

    client
        .write(b"HEAD /audio.wav HTTP/1.1\r\nhost: client.example\r\n\r\n")
        .await;
    let mut conn = up.accept("the HEAD connects").await;
    let head = conn.read_head("the HEAD").await;
    assert_eq!(head.start, "HEAD /audio.wav HTTP/1.1");
    // Answers that announce no body keep their connection (for those that announce one,
    // see `a_connection_whose_answer_announces_a_body_it_has_not_is_not_reused`).
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: audio/wav\r\n\r\n")
        .await;
    let answer = client.read_head("the HEAD's answer").await;
    assert_eq!(answer.start, "HTTP/1.1 200 OK");
    assert_eq!(answer.one("content-type"), "audio/wav");
    assert_eq!(answer.one("x-switchyard-color"), "blue");

    client
        .write(b"DELETE /thing HTTP/1.1\r\nhost: client.example\r\n\r\n")
        .await;
    let head = up.next_on(&mut conn, "the request answered 204").await;
    assert_eq!(head.start, "DELETE /thing HTTP/1.1");
    conn.write(b"HTTP/1.1 204 No Content\r\nx-done: yes\r\n\r\n")
        .await;
    let answer = client.read_head("the 204").await;
    assert_eq!(answer.start, "HTTP/1.1 204 No Content");
    assert_eq!(answer.one("x-done"), "yes");

    client
        .write(b"GET /cached HTTP/1.1\r\nhost: client.example\r\nif-none-match: \"v1\"\r\n\r\n")
        .await;
    let head = up.next_on(&mut conn, "the request answered 304").await;
    assert_eq!(head.start, "GET /cached HTTP/1.1");
    assert_eq!(head.one("if-none-match"), "\"v1\"");
    conn.write(b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n")
        .await;
    let answer = client.read_head("the 304").await;
    assert_eq!(answer.start, "HTTP/1.1 304 Not Modified");
    assert_eq!(answer.one("etag"), "\"v1\"");

    client
        .write(b"GET /after HTTP/1.1\r\nhost: client.example\r\n\r\n")
        .await;
    let head = up.next_on(&mut conn, "the request after").await;
    assert_eq!(head.start, "GET /after HTTP/1.1");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nafter")
        .await;
    let answer = client.read_head("the answer after").await;
    assert_eq!(answer.start, "HTTP/1.1 200 OK");
    let body = client.read_exact(5, "the body after").await;
    assert_eq!(&body[..], b"after");
    up.assert_no_other_connection();
}

// ---------------------------------------------------------------------------------------
// 7-8. Interim answers, and a final answer before the upload ends.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn interim_answers_before_the_final_one_are_skipped() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let first = spawn_get(&env, &env.client, "/page");
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    conn.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
        .await;
    conn.write(b"HTTP/1.1 103 Early Hints\r\nlink: </app.js>; rel=preload\r\n\r\n")
        .await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npage")
        .await;
    let answered = joined("the answer", first).await;
    assert_ok(&answered, b"page");
    assert!(
        !answered.parts.headers.contains_key("link"),
        "no field of an interim answer leaks into the final one"
    );

    // Still a clean exchange: the connection is kept.
    let second = spawn_get(&env, &env.client, "/again");
    up.next_on(&mut conn, "the second request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nagain")
        .await;
    assert_ok(&joined("the second answer", second).await, b"again");
    up.assert_no_other_connection();
}

#[tokio::test]
async fn a_100_continue_mid_upload_does_not_stop_the_upload() {
    const CHUNK: usize = 16 * 1024;
    const CHUNKS: usize = 16;
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let sent = patterned(CHUNK * CHUNKS);

    let (tx, body) = channel_body();
    let request = Request::post(env.proxy_url("/v1/listen"))
        .header(header::CONTENT_LENGTH, sent.len())
        .body(body)
        .expect("a request");
    let post = answer(channel_client().request(request));
    within(
        "the first chunk",
        tx.send(Bytes::copy_from_slice(&sent[..CHUNK])),
    )
    .await
    .expect("the body is read");

    let mut conn = up.accept("the POST connects").await;
    let head = conn.read_head("the POST").await;
    assert_eq!(head.one("content-length"), sent.len().to_string());
    // As soon as the head is in, as a server that was asked `Expect: 100-continue` would.
    conn.write(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    let mut received = conn.read_exact(CHUNK, "the first chunk").await.to_vec();
    // Only now does the rest of the body exist: the 100 came in the middle of the upload.
    for chunk in sent[CHUNK..].chunks(CHUNK) {
        within("a chunk", tx.send(Bytes::copy_from_slice(chunk)))
            .await
            .expect("the body is read");
    }
    drop(tx);
    received.extend_from_slice(&conn.read_exact(sent.len() - CHUNK, "the rest").await);
    assert!(
        received == sent,
        "the upstream got the body intact; first difference at byte {:?}",
        received.iter().zip(&sent).position(|(a, b)| a != b)
    );

    let digest = sha256_hex(&received);
    conn.write(format!("HTTP/1.1 200 OK\r\ncontent-length: 64\r\n\r\n{digest}").as_bytes())
        .await;
    assert_ok(
        &joined("the answer", post).await,
        sha256_hex(&sent).as_bytes(),
    );
}

#[tokio::test]
async fn a_final_answer_during_the_upload_reaches_the_client_and_ends_the_upload() {
    // The client declares 8 MiB and streams it, but (like a client that watches for an
    // early answer) it sends the next chunk only once it has the answer to the first. So
    // the upstream's 413 arrives while Switchyard waits for more of the body: if Switchyard
    // only looked for the answer after the upload, both sides would wait forever. And the
    // client never writes into a connection Switchyard already closed, so its own write
    // cannot fail before it reads the 413.
    const DECLARED: usize = 8 * 1024 * 1024;
    const FIRST: usize = 64 * 1024;
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let (tx, body) = channel_body();
    let request = Request::post(env.proxy_url("/v1/listen"))
        .header(header::CONTENT_LENGTH, DECLARED)
        .body(body)
        .expect("a request");
    let pending = tokio::spawn(channel_client().request(request));
    within("the first chunk", tx.send(Bytes::from(patterned(FIRST))))
        .await
        .expect("the body is read");

    let mut conn = up.accept("the upload connects").await;
    let head = conn.read_head("the upload's head").await;
    assert_eq!(head.one("content-length"), DECLARED.to_string());
    // Only the head was read; the answer comes now, and the upstream will send no more
    // (FIN), though it goes on reading so that nothing Switchyard sent is reset away.
    let refusal = br#"{"err_code":"PAYLOAD_TOO_LARGE"}"#;
    conn.write(
        format!(
            "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            refusal.len()
        )
        .as_bytes(),
    )
    .await;
    conn.write(refusal).await;
    conn.shutdown_write().await;

    let response = joined("the 413's head", pending)
        .await
        .expect("the client gets an answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(color_of(&response), "blue");
    let body = within("the 413's body", response.into_body().collect())
        .await
        .expect("the 413's body arrives in full")
        .to_bytes();
    assert_eq!(&body[..], refusal);

    // Switchyard stopped the upload and let the connection go.
    let forwarded = conn
        .drain_to_close("Switchyard closes the connection after the early answer")
        .await;
    assert!(
        forwarded <= FIRST,
        "only what the client sent before the answer was forwarded ({forwarded} bytes)"
    );
    drop(tx);
    up.assert_no_other_connection();
}

#[tokio::test]
async fn a_success_answer_during_the_upload_lets_the_upload_go_on() {
    // Full duplex: the upstream answers 200 after the first chunk and sends its body only
    // once it has the whole upload. The client waits for the answer's head before it sends
    // the rest, so Switchyard must relay the head and keep uploading at the same time.
    const CHUNK: usize = 16 * 1024;
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let sent = patterned(CHUNK * 4);
    let (tx, body) = channel_body();
    let request = Request::post(env.proxy_url("/v1/listen"))
        .header(header::CONTENT_LENGTH, sent.len())
        .body(body)
        .expect("a request");
    let pending = tokio::spawn(channel_client().request(request));
    within(
        "the first chunk",
        tx.send(Bytes::copy_from_slice(&sent[..CHUNK])),
    )
    .await
    .expect("the body is read");
    let mut conn = up.accept("the upload connects").await;
    conn.read_head("the upload's head").await;
    let first = conn.read_exact(CHUNK, "the first chunk").await;
    assert_eq!(&first[..], &sent[..CHUNK]);
    conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;

    let response = joined("the answer's head, before the upload ends", pending)
        .await
        .expect("the client gets an answer");
    assert_eq!(response.status(), StatusCode::OK);
    for chunk in sent[CHUNK..].chunks(CHUNK) {
        within("a later chunk", tx.send(Bytes::copy_from_slice(chunk)))
            .await
            .expect("the body is read");
    }
    drop(tx);
    let rest = conn
        .read_exact(sent.len() - CHUNK, "the rest of the upload")
        .await;
    assert_eq!(&rest[..], &sent[CHUNK..]);
    conn.write(b"5\r\ndone!\r\n0\r\n\r\n").await;
    let body = within("the answer's body", response.into_body().collect())
        .await
        .expect("the answer's body arrives in full")
        .to_bytes();
    assert_eq!(&body[..], b"done!");
}

// ---------------------------------------------------------------------------------------
// 9-10. Answers that are not HTTP, and bodies cut short.
// ---------------------------------------------------------------------------------------

/// A GET whose upstream answers `answer` (and keeps the connection open) is a 502, and
/// Switchyard drops that connection.
async fn a_bad_answer_is_a_502(answer: &[u8]) {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let get = spawn_get(&env, &env.client, "/v1/models");
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    // Switchyard may close before it has read all of a long answer: a failed write is
    // fine here.
    let _ = within("writing the answer", conn.io.write_all(answer)).await;
    assert_upstream_failed(&joined("the answer", get).await);
    conn.drain_to_close("Switchyard drops the connection").await;
    up.assert_no_other_connection();
}

#[tokio::test]
async fn a_garbage_status_line_is_a_502() {
    a_bad_answer_is_a_502(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
}

#[tokio::test]
async fn two_different_content_lengths_are_a_502() {
    a_bad_answer_is_a_502(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    )
    .await;
}

#[tokio::test]
async fn a_content_length_that_is_not_a_number_is_a_502() {
    a_bad_answer_is_a_502(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello!").await;
}

#[tokio::test]
async fn a_head_that_does_not_end_within_64_kib_is_a_502() {
    let mut answer = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    answer.resize(answer.len() + 70 * 1024, b'a');
    answer.extend_from_slice(b"\r\n");
    a_bad_answer_is_a_502(&answer).await;
}

#[tokio::test]
async fn a_complete_head_over_64_kib_is_a_502() {
    let mut answer = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    answer.resize(answer.len() + 70 * 1024, b'a');
    answer.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
    a_bad_answer_is_a_502(&answer).await;
}

#[tokio::test]
async fn switching_protocols_on_a_plain_request_is_a_502() {
    a_bad_answer_is_a_502(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
}

/// The upstream sends the head and part of the body (`part`, whose data is `data`), and
/// closes once the client has the head: the client must see its body fail after at most
/// `data`, never end cleanly short.
async fn a_body_cut_short_is_an_error_for_the_client(head: &[u8], part: &[u8], data: &[u8]) {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let pending = tokio::spawn(env.client.request(get_request(&env, "/v1/speak")));
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    conn.write(head).await;
    conn.write(part).await;
    // Closing only after the client has the head makes the failure land in the body (a
    // close before would fail the whole request, which is no test of the body's end).
    let response = joined("the answer's head", pending)
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(color_of(&response), "blue");
    drop(conn);

    let mut body = response.into_body();
    let mut got = Vec::new();
    loop {
        match within("the body", body.frame()).await {
            Some(Ok(frame)) => {
                if let Ok(bytes) = frame.into_data() {
                    got.extend_from_slice(&bytes);
                }
            }
            Some(Err(_)) => break,
            None => panic!(
                "the body ended cleanly after {:?}: a body cut short must fail",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    assert!(
        data.starts_with(&got),
        "what arrived is what the upstream sent: {:?}",
        String::from_utf8_lossy(&got)
    );
    up.assert_no_other_connection();
    // Counted against the upstream (the client's error came after the count).
    assert_eq!(env.upstream_errors("protocol"), 1.0);
}

#[tokio::test]
async fn an_upstream_that_closes_mid_body_leaves_the_client_an_incomplete_body() {
    a_body_cut_short_is_an_error_for_the_client(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
        b"ten bytes.",
        b"ten bytes.",
    )
    .await;
}

#[tokio::test]
async fn an_upstream_that_closes_mid_chunked_body_leaves_the_client_an_incomplete_body() {
    a_body_cut_short_is_an_error_for_the_client(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n",
        b"hello",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 11. The request framing the upstream sees.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_chunked_request_body_goes_upstream_chunked() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let mut client = Peer::client(&env).await;

    client
        .write(
            b"POST /v1/listen HTTP/1.1\r\nhost: client.example\r\n\
              transfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n",
        )
        .await;
    let mut conn = up.accept("the POST connects").await;
    let head = conn.read_head("the POST").await;
    assert_eq!(head.start, "POST /v1/listen HTTP/1.1");
    assert_eq!(head.one("host"), up.authority());
    assert_eq!(head.one("transfer-encoding"), "chunked");
    assert!(head.lacks("content-length"), "{head:#?}");
    // The body streams: the first chunk is upstream before the client sent the second.
    let first = conn.read_chunked_data(5, "the first chunk").await;
    assert_eq!(&first[..], b"hello");
    client.write(b"6\r\n world\r\n0\r\n\r\n").await;
    let rest = conn.read_chunked("the rest of the body").await;
    assert_eq!(&rest[..], b" world");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;

    let answer = client.read_head("the answer").await;
    assert_eq!(answer.start, "HTTP/1.1 200 OK");
    let body = client.read_exact(2, "the answer's body").await;
    assert_eq!(&body[..], b"ok");
}

/// The client's host is the request target's authority when it is in absolute form (its
/// `Host` is then ignored, RFC 9112 §3.2.2); an HTTP/1.1 request with no `Host` or two is
/// answered 400, not routed, and its connection closed (§3.2); HTTP/1.0 needs none.
#[tokio::test]
async fn the_host_is_the_targets_authority_and_http_1_1_needs_exactly_one() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    for request in [
        &b"GET /a HTTP/1.1\r\n\r\n"[..],
        b"GET /a HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\n\r\n",
    ] {
        let mut client = Peer::client(&env).await;
        client.write(request).await;
        let head = client.read_head("the refusal").await;
        assert_eq!(head.start, "HTTP/1.1 400 Bad Request");
        assert!(head.lacks("x-switchyard-color"), "not routed: {head:#?}");
        assert_eq!(head.one("connection"), "close");
        let body: usize = head.one("content-length").parse().expect("a length");
        client.read_exact(body, "the refusal's body").await;
        client
            .expect_closed("the connection after the refusal")
            .await;
    }

    let mut client = Peer::client(&env).await;
    client
        .write(b"GET http://user:secret@other.example:9999/echo?x=1 HTTP/1.1\r\nhost: x.example\r\n\r\n")
        .await;
    let mut conn = up.accept("the absolute-form request connects").await;
    let head = conn.read_head("the request").await;
    assert_eq!(head.start, "GET /echo?x=1 HTTP/1.1");
    assert_eq!(head.one("x-forwarded-host"), "other.example:9999");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await;
    assert_eq!(
        client.read_head("the answer").await.start,
        "HTTP/1.1 200 OK"
    );

    // An empty path goes up as `/` (RFC 9112 §3.2.1), not as `GET ?q=1`.
    client
        .write(b"GET http://other.example?q=1 HTTP/1.1\r\nhost: x.example\r\n\r\n")
        .await;
    let head = up.next_on(&mut conn, "the empty-path request").await;
    assert_eq!(head.start, "GET /?q=1 HTTP/1.1");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await;
    assert_eq!(
        client.read_head("the answer").await.start,
        "HTTP/1.1 200 OK"
    );

    client.write(b"GET /old HTTP/1.0\r\n\r\n").await;
    let head = up.next_on(&mut conn, "the HTTP/1.0 request").await;
    assert!(head.lacks("x-forwarded-host"), "{head:#?}");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await;
    // hyper answers an HTTP/1.0 client in its own version.
    assert_eq!(
        client.read_head("the answer").await.start,
        "HTTP/1.0 200 OK"
    );
    up.assert_no_other_connection();
}

/// CONNECT asks for a tunnel, which a reverse proxy does not make: 501, not routed, and
/// the connection closed (what the client sends next is the tunnel's, not a request).
#[tokio::test]
async fn connect_is_refused_and_not_sent_upstream() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let mut client = Peer::client(&env).await;
    client
        .write(b"CONNECT internal.example:443 HTTP/1.1\r\nhost: internal.example:443\r\n\r\n")
        .await;
    let head = client.read_head("the refusal").await;
    assert_eq!(head.start, "HTTP/1.1 501 Not Implemented");
    assert!(head.lacks("x-switchyard-color"), "not routed: {head:#?}");
    assert_eq!(head.one("connection"), "close");
    let body: usize = head.one("content-length").parse().expect("a length");
    let body = client.read_exact(body, "the refusal's body").await;
    assert!(
        String::from_utf8_lossy(&body).contains(r#""error":"not_implemented""#),
        "{body:?}"
    );
    client
        .expect_closed("the connection after the refusal")
        .await;
    up.assert_no_other_connection();
}

/// The request target `*` is for OPTIONS only (RFC 9112 §3.2.4): `GET *` is refused 400,
/// not sent upstream as a path no server reads; `OPTIONS *` goes on as it came.
#[tokio::test]
async fn an_asterisk_target_goes_upstream_only_for_options() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let mut client = Peer::client(&env).await;
    client
        .write(b"OPTIONS * HTTP/1.1\r\nhost: x.example\r\n\r\n")
        .await;
    let mut conn = up.accept("OPTIONS * connects").await;
    let head = conn.read_head("OPTIONS *").await;
    assert_eq!(head.start, "OPTIONS * HTTP/1.1");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await;
    assert_eq!(
        client.read_head("the answer").await.start,
        "HTTP/1.1 200 OK"
    );

    client
        .write(b"GET * HTTP/1.1\r\nhost: x.example\r\n\r\n")
        .await;
    let head = client.read_head("the refusal").await;
    assert_eq!(head.start, "HTTP/1.1 400 Bad Request");
    assert!(head.lacks("x-switchyard-color"), "not routed: {head:#?}");
    let body: usize = head.one("content-length").parse().expect("a length");
    let body = client.read_exact(body, "the refusal's body").await;
    assert!(
        String::from_utf8_lossy(&body).contains("for OPTIONS only"),
        "{body:?}"
    );
    up.assert_no_other_connection();
}

#[tokio::test]
async fn a_request_body_with_a_length_goes_upstream_with_that_length() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let post = answer(
        env.client.request(
            Request::post(env.proxy_url("/v1/listen?model=nova-3"))
                .header("host", "api.example")
                .body(Full::new(Bytes::from_static(b"exactly 17 bytes!")))
                .expect("a request"),
        ),
    );
    let mut conn = up.accept("the POST connects").await;
    let head = conn.read_head("the POST").await;
    assert_eq!(head.start, "POST /v1/listen?model=nova-3 HTTP/1.1");
    assert_eq!(head.one("host"), up.authority());
    assert_eq!(head.one("x-forwarded-host"), "api.example");
    assert_eq!(head.one("content-length"), "17");
    assert!(head.lacks("transfer-encoding"), "{head:#?}");
    let body = conn.read_exact(17, "the body").await;
    assert_eq!(&body[..], b"exactly 17 bytes!");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    assert_ok(&joined("the answer", post).await, b"ok");
}

#[tokio::test]
async fn an_empty_post_says_content_length_0_and_a_get_says_nothing() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let mut client = Peer::client(&env).await;

    // No length and no chunking from the client: an HTTP/1.1 request without a body.
    client
        .write(b"POST /v1/jobs HTTP/1.1\r\nhost: client.example\r\n\r\n")
        .await;
    let mut conn = up.accept("the POST connects").await;
    let head = conn.read_head("the empty POST").await;
    assert_eq!(head.start, "POST /v1/jobs HTTP/1.1");
    assert_eq!(head.one("content-length"), "0");
    assert!(head.lacks("transfer-encoding"), "{head:#?}");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let answer = client.read_head("the POST's answer").await;
    assert_eq!(answer.start, "HTTP/1.1 200 OK");
    client.read_exact(2, "the POST's answer body").await;

    client
        .write(b"GET /v1/models HTTP/1.1\r\nhost: client.example\r\n\r\n")
        .await;
    let head = up.next_on(&mut conn, "the GET").await;
    assert_eq!(head.start, "GET /v1/models HTTP/1.1");
    assert!(head.lacks("content-length"), "{head:#?}");
    assert!(head.lacks("transfer-encoding"), "{head:#?}");
    // Nothing follows the GET's head: the next bytes are the next request's.
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    client.read_head("the GET's answer").await;
    client.read_exact(2, "the GET's answer body").await;
    up.assert_no_other_connection();
}

#[tokio::test]
async fn the_clients_expect_100_continue_is_answered_by_switchyard_not_forwarded() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let mut client = Peer::client(&env).await;

    client
        .write(
            b"POST /v1/listen HTTP/1.1\r\nhost: client.example\r\ncontent-length: 5\r\n\
              expect: 100-continue\r\n\r\n",
        )
        .await;
    let mut conn = up.accept("the POST connects").await;
    let head = conn.read_head("the POST").await;
    assert!(head.lacks("expect"), "{head:#?}");
    assert_eq!(head.one("content-length"), "5");
    assert_eq!(head.one("host"), up.authority());
    // Switchyard asks the client for the body itself, once it wants it.
    let go_on = client.read_head("Switchyard's 100 Continue").await;
    assert_eq!(go_on.start, "HTTP/1.1 100 Continue");
    client.write(b"hello").await;
    let body = conn.read_exact(5, "the body").await;
    assert_eq!(&body[..], b"hello");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let answer = client.read_head("the answer").await;
    assert_eq!(answer.start, "HTTP/1.1 200 OK");
    let body = client.read_exact(2, "the answer's body").await;
    assert_eq!(&body[..], b"ok");
}

#[tokio::test]
async fn an_h2c_body_of_unknown_length_goes_upstream_chunked() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let h2 = h2c_client::<ChannelBody>();
    let (tx, body) = channel_body();
    let post = answer(
        h2.request(
            Request::post(env.proxy_url("/v1/listen"))
                .body(body)
                .expect("a request"),
        ),
    );
    within("the first part", tx.send(Bytes::from_static(b"over ")))
        .await
        .expect("the body is read");

    let mut conn = up.accept("the POST connects").await;
    let head = conn.read_head("the POST").await;
    assert_eq!(head.start, "POST /v1/listen HTTP/1.1");
    assert_eq!(head.one("host"), up.authority());
    assert_eq!(head.one("transfer-encoding"), "chunked");
    assert!(head.lacks("content-length"), "{head:#?}");
    let first = conn.read_chunked_data(5, "the first part").await;
    assert_eq!(&first[..], b"over ");
    within("the second part", tx.send(Bytes::from_static(b"HTTP/2")))
        .await
        .expect("the body is read");
    drop(tx);
    let rest = conn.read_chunked("the rest").await;
    assert_eq!(&rest[..], b"HTTP/2");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let answered = joined("the answer", post).await;
    assert_eq!(answered.parts.version, http::Version::HTTP_2);
    assert_ok(&answered, b"ok");
}

/// An HTTP/2 request whose body went in full by its Content-Length, its END_STREAM still
/// to come in a frame of its own (as httpx and curl send it), while the answer is already
/// complete: the stream is not reset (RFC 9113 allows NO_ERROR there, but some clients
/// then drop the answer), and the upstream connection is kept for the next request.
#[tokio::test]
async fn an_h2_body_sent_in_full_is_complete_before_its_end_of_stream() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let tcp = TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    let (mut h2, connection) = within("the h2 handshake", h2::client::handshake(tcp))
        .await
        .expect("h2");
    tokio::spawn(connection);
    let post = Request::post(env.proxy_url("/v1/listen"))
        .header(header::CONTENT_LENGTH, "5")
        .body(())
        .expect("a request");
    let (answer, mut stream) = h2.send_request(post, false).expect("sent");
    stream
        .send_data(Bytes::from_static(b"hello"), false)
        .expect("the body");
    let mut conn = up.accept("the POST connects").await;
    let head = conn.read_head("the POST").await;
    assert_eq!(head.one("content-length"), "5");
    assert_eq!(&conn.read_exact(5, "the body").await[..], b"hello");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let answer = within("the answer", answer).await.expect("an answer");
    assert_eq!(answer.status(), StatusCode::OK);
    let mut body = answer.into_body();
    let mut got = BytesMut::new();
    while let Some(data) = within("the answer's body", body.data()).await {
        got.extend_from_slice(&data.expect("data"));
    }
    assert_eq!(&got[..], b"ok");

    // A second request: it goes on the same upstream connection, and once its answer is
    // here, a reset of the first stream would have come before it.
    let get = Request::get(env.proxy_url("/v1/status"))
        .body(())
        .expect("a request");
    let (second, _) = h2.send_request(get, true).expect("sent");
    let head = conn.read_head("the GET on the kept connection").await;
    assert_eq!(head.start, "GET /v1/status HTTP/1.1");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await;
    let second = within("the second answer", second)
        .await
        .expect("an answer");
    assert_eq!(second.status(), StatusCode::OK);
    let reset =
        futures_util::FutureExt::now_or_never(std::future::poll_fn(|cx| stream.poll_reset(cx)));
    assert!(reset.is_none(), "the first stream was reset: {reset:?}");
    stream
        .send_data(Bytes::new(), true)
        .expect("the end of the first stream");
}

/// An HTTP/2 client sends each cookie in a field of its own; the upstream gets them on one
/// line, in order, joined with "; " (RFC 9113 8.2.3).
#[tokio::test]
async fn h2_cookies_reach_the_upstream_on_one_line() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;

    let h2 = h2c_client::<Full<Bytes>>();
    let get = answer(
        h2.request(
            Request::get(env.proxy_url("/v1/listen"))
                .header(header::COOKIE, "a=1")
                .header("x-between", "x")
                .header(header::COOKIE, "b=2")
                .header(header::COOKIE, "c=3")
                .body(Full::new(Bytes::new()))
                .expect("a request"),
        ),
    );
    let mut conn = up.accept("the GET connects").await;
    let head = conn.read_head("the GET").await;
    assert_eq!(head.all("cookie"), ["a=1; b=2; c=3"], "{head:#?}");
    assert_eq!(head.one("x-between"), "x");
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    assert_ok(&joined("the answer", get).await, b"ok");
}

// ---------------------------------------------------------------------------------------
// 12. Stalls: `limits.stall_timeout` on plain requests.
// ---------------------------------------------------------------------------------------

/// An env whose blue pool is the scripted upstream at `addr`, with a stall timeout of 1 s.
async fn env_with_stall_timeout(addr: SocketAddr) -> Env {
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        extra: "stall_timeout = \"1s\"".into(),
        ..Default::default()
    };
    env_with_blue_at_built(addr, builder).await
}

/// A GET of `path` through `env`, answered in the background, and the upstream
/// connection it came on, its head read.
async fn a_get_taken(env: &Env, up: &mut Upstream, path: &str) -> (JoinHandle<Answer>, Peer) {
    let get = spawn_get(env, &env.client, path);
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    (get, conn)
}

#[tokio::test]
async fn an_upstream_that_stops_sending_its_body_is_cut_off_after_the_stall_timeout() {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let (get, mut conn) = a_get_taken(&env, &mut up, "/v1/speak").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.")
        .await;
    // The upstream keeps its connection open and sends nothing more: without the timer
    // the client would wait for the other 90 bytes for ever.
    let answer = joined("the answer", get).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let failed = answer.body.as_ref().expect_err("a body cut off fails");
    assert!(!failed.is_empty());
    conn.expect_closed("the upstream connection after the cut")
        .await;
    assert_eq!(env.upstream_errors("timeout"), 1.0);
    assert_eq!(env.upstream_errors("protocol"), 0.0);
}

#[tokio::test]
async fn a_body_that_keeps_coming_slowly_is_not_cut_off() {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let (get, mut conn) = a_get_taken(&env, &mut up, "/v1/speak").await;
    conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    // Three periods of the timer in all, a chunk every tenth of one: only a body that
    // stops is cut, not one that takes long.
    let mut sent = Vec::new();
    for i in 0..30u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write(format!("1\r\n{}\r\n", char::from(b'a' + i % 26)).as_bytes())
            .await;
        sent.push(b'a' + i % 26);
    }
    conn.write(b"0\r\n\r\n").await;
    assert_ok(&joined("the answer", get).await, &sent);
    assert_eq!(env.upstream_errors("timeout"), 0.0);
}

/// A raw client's GET through an env with a 1 s stall timeout, and the upstream
/// connection it came on, after the upstream sent the head of a chunked answer.
async fn a_chunked_answer_begun() -> (Env, Peer, Peer) {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let request = b"GET /v1/speak HTTP/1.1\r\nhost: switchyard\r\n\r\n";
    let (client, mut conn, _) = a_raw_request(&env, &mut up, request).await;
    conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    (env, client, conn)
}

/// A raw client connection to Switchyard that sent `request`, the upstream connection it
/// came on, and the request's head as the upstream read it.
async fn a_raw_request(env: &Env, up: &mut Upstream, request: &[u8]) -> (Peer, Peer, Head) {
    let mut client = Peer::client(env).await;
    client.write(request).await;
    let mut conn = up.accept("the request connects").await;
    let head = conn.read_head("the request").await;
    (client, conn, head)
}

/// One 64 KiB chunk of a chunked body.
fn big_chunk() -> String {
    format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024))
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_dropped_after_the_stall_timeout() {
    let (env, mut client, mut conn) = a_chunked_answer_begun().await;
    // An endless answer the client never reads: the socket buffers on both sides fill,
    // and then the upstream's writes wait, until Switchyard gives the client up and
    // closes the upstream's connection, which fails them.
    let chunk = big_chunk();
    let failed = within("the upstream's writes fail", async {
        loop {
            if let Err(e) = conn.io.write_all(chunk.as_bytes()).await {
                return e;
            }
        }
    })
    .await;
    assert!(
        matches!(
            failed.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{failed}"
    );
    // The client's connection is closed too, after what was already on its way.
    client.drain_to_close("the client's connection").await;
    drop(client);
    assert_eq!(env.upstream_errors("timeout"), 0.0);
}

/// An answer its HTTP/1.1 client stopped reading is cut at its colour's drain deadline, as
/// one on HTTP/2 is. hyper no longer polls the body of such an answer, so the body cannot
/// see the deadline; the client's waiting write does. Before, the request stayed in flight
/// on the old colour (`/drain/wait`: not drained) until `stall_timeout`, 5 minutes here.
#[tokio::test]
async fn an_answer_its_client_stopped_reading_is_cut_at_the_drain_deadline() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let request = b"GET /v1/speak HTTP/1.1\r\nhost: switchyard\r\n\r\n";
    let (client, mut conn, _) = a_raw_request(&env, &mut up, request).await;
    conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    // Until a write of the upstream's waits: every buffer on the way is full, and the
    // body is no longer polled. (At most 256 MiB.)
    let chunk = big_chunk();
    let mut waiting = false;
    for _ in 0..4096 {
        let write = conn.io.write_all(chunk.as_bytes());
        if tokio::time::timeout(Duration::from_millis(300), write)
            .await
            .is_err()
        {
            waiting = true;
            break;
        }
    }
    assert!(waiting, "the client's buffers never filled");
    let blue = |status: &Value| status["colors"]["blue"]["in_flight"].clone();
    assert_eq!(blue(&env.admin_get("/status").await.1), 1);

    let (code, flipped) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "1s"})))
        .await;
    assert_eq!(code, StatusCode::OK, "{flipped}");
    let (code, drained) = env.admin_get("/drain/wait?color=blue&timeout=15s").await;
    assert_eq!(code, StatusCode::OK, "{drained}");
    assert_eq!(drained["drained"], true, "{drained}");
    assert_eq!(blue(&env.admin_get("/status").await.1), 0);
    // The upstream's connection went with it.
    let closed = within("the upstream connection to close", async {
        loop {
            if let Err(e) = conn.io.write_all(b"0\r\n\r\n").await {
                return e;
            }
        }
    })
    .await;
    assert!(
        matches!(
            closed.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{closed}"
    );
    drop(client);
}

/// A request still running on an upstream a reload removed finishes with its connection
/// closed, not kept: the upstream gets no new requests, and its health loop, which sweeps
/// kept connections, has stopped. Before, the connection stayed open until the upstream's
/// last stream or request ended (up to the removal's drain deadline, 30 minutes).
#[tokio::test]
async fn a_connection_to_a_removed_upstream_is_not_kept() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    let (get, mut conn) = a_get_taken(&env, &mut up, "/v1/listen").await;
    // A second request keeps the removed upstream alive after the first ends (as a stream
    // on it would); without one, the upstream goes whole when its last request ends.
    let (other, mut other_conn) = a_get_taken(&env, &mut up, "/v1/listen").await;
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        ..Default::default()
    };
    env.write_config(
        &builder,
        &format!("\"{}\"", env.blue[0].url()),
        &format!("\"{}\"", env.green[0].url()),
    );
    env.reload().await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let answer = joined("the answer", get).await;
    assert_eq!(answer.status(), StatusCode::OK);
    conn.expect_closed("Switchyard closes the removed upstream's connection")
        .await;
    other_conn
        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    assert_eq!(
        joined("the other answer", other).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_client_that_reads_slowly_but_steadily_is_not_dropped() {
    let (env, mut client, mut conn) = a_chunked_answer_begun().await;
    // More than the client will read, so every buffer on the way stays full.
    let chunk = big_chunk();
    let writer = tokio::spawn(async move {
        for _ in 0..1024 {
            conn.io.write_all(chunk.as_bytes()).await?;
        }
        Ok::<_, std::io::Error>(conn)
    });
    // 8 KiB every 50 ms (160 KB/s) for four periods of the timer: a writable socket
    // must be reported long before a third of a multi-megabyte send buffer is free.
    let mut buf = vec![0u8; 8 * 1024];
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = within("a read", client.io.read(&mut buf))
            .await
            .expect("the client's connection stays open");
        assert!(
            n > 0,
            "Switchyard closed the connection of a client that reads"
        );
        assert!(!writer.is_finished(), "the upstream's writes ended");
    }
    writer.abort();
    assert_eq!(env.upstream_errors("timeout"), 0.0);
}

#[tokio::test]
async fn an_upstream_may_send_its_head_long_before_its_body() {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let (get, mut conn) = a_get_taken(&env, &mut up, "/v1/listen").await;
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        .await;
    // Two and a half periods of the stall timer before the first byte of the body: that
    // wait is bounded by `response_timeout`, as the wait for the head is.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    conn.write(b"hello").await;
    assert_ok(&joined("the answer", get).await, b"hello");
    assert_eq!(env.upstream_errors("timeout"), 0.0);
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_after_the_stall_timeout() {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let request =
        b"POST /v1/listen HTTP/1.1\r\nhost: switchyard\r\ncontent-length: 100\r\n\r\nten bytes.";
    let (mut client, mut conn, head) = a_raw_request(&env, &mut up, request).await;
    assert_eq!(head.one("content-length"), "100");
    conn.read_exact(10, "the first ten bytes of the body").await;
    // The client sends nothing more and keeps its connection open.
    let answer = client.read_head("Switchyard's answer").await;
    assert_eq!(answer.start, "HTTP/1.1 408 Request Timeout");
    assert_eq!(answer.one("connection"), "close");
    assert_eq!(answer.one("x-switchyard-color"), "blue");
    let length: usize = answer.one("content-length").parse().expect("a length");
    let body = client.read_exact(length, "the answer's body").await;
    let json: Value = serde_json::from_slice(&body).expect("a JSON body");
    assert_eq!(json["error"], "request_timeout", "{json}");
    client.expect_closed("the client's connection").await;
    conn.expect_closed("the upstream connection").await;
    // The client's fault, not the upstream's.
    assert_eq!(env.upstream_errors("timeout"), 0.0);
}

/// The stream window the HTTP/2 client below gives Switchyard, and never opens further
/// while its answer goes unread.
const H2_WINDOW: u32 = 64 * 1024;

/// An h2c client that gives Switchyard a stream window of `H2_WINDOW` and opens it
/// further only as its answers are read.
fn h2_client_with_a_small_window() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(H2_WINDOW)
        .http2_adaptive_window(false)
        .build_http()
}

/// An h2c GET through `env` on `client`, whose answer's head the client takes: unless
/// the body is read, after `H2_WINDOW` bytes Switchyard may send no more on that stream,
/// while the client keeps reading its connection. Returns the answer and the upstream
/// connection, after the upstream began an endless chunked answer.
async fn an_unread_http2_answer(
    env: &Env,
    up: &mut Upstream,
    client: &Client<HttpConnector, Full<Bytes>>,
) -> (http::Response<hyper::body::Incoming>, Peer) {
    let pending = tokio::spawn(client.request(get_request(env, "/v1/speak")));
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    let response = joined("the answer's head", pending)
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), StatusCode::OK);
    (response, conn)
}

/// Writes an endless chunked body until the connection fails; the error.
fn write_until_it_fails(mut conn: Peer) -> JoinHandle<std::io::Error> {
    let chunk = big_chunk();
    tokio::spawn(async move {
        loop {
            if let Err(e) = conn.io.write_all(chunk.as_bytes()).await {
                return e;
            }
        }
    })
}

#[tokio::test]
async fn an_http2_stream_whose_client_stops_reading_it_is_reset_after_the_stall_timeout() {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let client = h2_client_with_a_small_window();
    let (response, conn) = an_unread_http2_answer(&env, &mut up, &client).await;
    // hyper holds the next chunk for a window that never opens, and stops polling the
    // body, so only the stream's task can see the stall.
    let failed = joined("the upstream's writes fail", write_until_it_fails(conn)).await;
    assert!(
        matches!(
            failed.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{failed}"
    );
    // The client sees its stream reset after what arrived.
    let body = within("the body", response.into_body().collect()).await;
    assert!(body.is_err(), "the stream is reset, not ended");
    assert_eq!(env.upstream_errors("timeout"), 0.0);
}

#[tokio::test]
async fn an_http2_answer_its_client_does_not_read_ends_at_the_drain_deadline() {
    let mut up = upstream().await;
    // The default stall timeout (5m): only the drain can end the stream in this test.
    let env = env_with_blue_at(up.addr).await;
    let client = h2_client_with_a_small_window();
    let (response, conn) = an_unread_http2_answer(&env, &mut up, &client).await;
    let writer = write_until_it_fails(conn);
    // A window's worth handed over: the next chunk waits in hyper, which no longer polls
    // the body (the upstream has megabytes more on their way, so the body never waits).
    eventually(|| async {
        let labels = ["color=\"blue\"", "direction=\"to_client\""];
        env.metric_sum("switchyard_bytes_total", &labels) >= f64::from(H2_WINDOW)
    })
    .await;
    let (status, body) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "0s"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let failed = joined("the upstream's writes fail", writer).await;
    assert!(
        matches!(
            failed.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{failed}"
    );
    let (status, drained) = env.admin_get("/drain/wait?color=blue&timeout=10s").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drained["drained"], true, "{drained}");
    let body = within("the body", response.into_body().collect()).await;
    assert!(body.is_err(), "the stream is reset, not ended");
}

#[tokio::test]
async fn after_a_stream_reset_the_http2_connection_serves_the_next_request() {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let client = h2_client_with_a_small_window();
    let (response, conn) = an_unread_http2_answer(&env, &mut up, &client).await;
    joined("the upstream's writes fail", write_until_it_fails(conn)).await;
    let body = within("the body", response.into_body().collect()).await;
    assert!(body.is_err(), "the stream is reset, not ended");
    // The reset gave the connection's window back: the same connection carries more than
    // a window's worth again.
    let second = tokio::spawn(client.request(get_request(&env, "/v1/speak")));
    let mut conn = up.accept("the second request connects").await;
    conn.read_head("the second request").await;
    let data = patterned(100_000);
    conn.write(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", data.len()).as_bytes())
        .await;
    conn.write(&data).await;
    let response = joined("the second answer", second)
        .await
        .expect("the second head");
    assert_eq!(response.status(), StatusCode::OK);
    let body = within("the second body", response.into_body().collect())
        .await
        .expect("the second body arrives whole");
    assert_eq!(body.to_bytes(), Bytes::from(data));
    let open = env.metric_sum("switchyard_connections", &["listener=\"proxy\""]);
    assert_eq!(open, 1.0, "one client connection served both");
}

#[tokio::test]
async fn an_answer_its_client_reads_slowly_is_cut_at_the_drain_deadline() {
    let mut up = upstream().await;
    let env = env_with_blue_at(up.addr).await;
    // A small receive buffer: what is on its way to the client at any moment is small.
    let mut connector = HttpConnector::new();
    connector.set_recv_buffer_size(Some(64 * 1024));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let pending = tokio::spawn(client.request(get_request(&env, "/v1/speak")));
    let mut conn = up.accept("the request connects").await;
    conn.read_head("the request").await;
    conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    let response = joined("the answer's head", pending)
        .await
        .expect("the head arrives");
    let writer = write_until_it_fails(conn);
    // A frame every 50 ms: the upstream stays ahead of the client, so the body hardly
    // ever waits on it, and the cut must come between the frames it hands over.
    let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = read.clone();
    let mut body = response.into_body();
    let reader = tokio::spawn(async move {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let n = frame.data_ref().map_or(0, |d| d.len());
                    counted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(Err(e)) => return Some(format!("{e:?}")),
                None => return None,
            }
        }
    });
    let (status, body) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "0s"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let at_the_flip = read.load(std::sync::atomic::Ordering::Relaxed);
    let ended = joined("the slow reader", reader).await;
    assert!(ended.is_some(), "the answer is cut, not ended cleanly");
    // After the cut the client gets what was already on its way (its receive buffer,
    // the proxy's unsent bytes, hyper's buffer): a few hundred KiB, where an answer not
    // cut would go on at the client's 300 KB/s until the body happened to wait.
    let after = read.load(std::sync::atomic::Ordering::Relaxed) - at_the_flip;
    assert!(
        after < 1024 * 1024,
        "{after} bytes reached the client after the cut"
    );
    joined("the upstream's writes fail", writer).await;
    let (status, drained) = env.admin_get("/drain/wait?color=blue&timeout=10s").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drained["drained"], true, "{drained}");
}

#[tokio::test]
async fn an_http2_stream_its_client_reads_slowly_is_not_reset() {
    let mut up = upstream().await;
    let env = env_with_stall_timeout(up.addr).await;
    let client = h2_client_with_a_small_window();
    let (response, conn) = an_unread_http2_answer(&env, &mut up, &client).await;
    let writer = write_until_it_fails(conn);
    // A frame every 50 ms, each opening the window a little, for four periods of the
    // stall timer: the stream waits for its window all along, and moves.
    let mut body = response.into_body();
    for _ in 0..80 {
        let frame = within("a frame", body.frame()).await;
        assert!(matches!(frame, Some(Ok(_))), "the stream ended: {frame:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!writer.is_finished(), "the upstream's writes ended");
    writer.abort();
}
