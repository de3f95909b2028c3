//! Test harness: stub upstreams, a config in a temp dir, Switchyard started in-process on
//! port 0, and small HTTP and WebSocket client helpers.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use switchyard::app::Handle;
use switchyard::config::Config;
use switchyard::stub::{StubHandle, StubOptions};

/// The admin token every harness instance uses.
pub const TOKEN: &str = "test-admin-token";

/// A bound on any single wait in a test; generous for a busy 2-core CI machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A loopback port nothing listens on, for a child process that must be told its ports.
///
/// A port read off a bind to `127.0.0.1:0` and released is in the kernel's ephemeral range,
/// where any outgoing connection on the machine may take it before the child binds it (CI
/// lost a run to that). These ports come from below that range, `20000..32000`, so only
/// another listener can take one; a counter keeps them distinct within the test process, its
/// start varies with the process id, and a bind shows that nothing listens there now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = LOW + (start + n) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// A child process's log (its stderr): kept whole for failure messages, and handed over
/// line by line as it comes, the signals a test waits on.
pub struct ChildLog {
    all: std::sync::Arc<std::sync::Mutex<String>>,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ChildLog {
    /// Spawns `command` with `RUST_LOG=info` (unless it sets its own), no colours, no
    /// stdin or stdout, and its stderr read by a thread until the process closes it.
    pub fn spawn(command: &mut std::process::Command) -> (std::process::Child, ChildLog) {
        use std::process::Stdio;
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("switchyard starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let all = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let sink = all.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock()
                    .expect("log lock")
                    .push_str(&(line.clone() + "\n"));
                let _ = tx.send(line);
            }
        });
        (child, ChildLog { all, lines })
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.all.lock().expect("log lock").clone()
    }

    /// The next line containing `needle`, waited for at most `PATIENCE`; `None` if the
    /// process closed its log first or the time ran out.
    pub async fn line(&mut self, needle: &str) -> Option<String> {
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        found.ok().flatten()
    }
}

/// A WebSocket client stream as tokio-tungstenite's `connect_async` gives it.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends a chunk of audio on a listen stream and returns the text message that comes next
/// (a stub answers 3,200 bytes with a `Results`).
pub async fn answer_to_audio(ws: &mut Ws) -> String {
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        2u8;
        3200
    ]))
    .await
    .expect("audio");
    let next = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("in time")
        .expect("msg")
        .expect("ok");
    next.to_text().expect("text").to_owned()
}

/// A fresh pooled HTTP/1.1 client.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Builds a test environment.
#[derive(Clone)]
pub struct EnvBuilder {
    pub blue: usize,
    pub green: usize,
    pub drain_timeout: &'static str,
    pub grace: &'static str,
    pub health: &'static str,
    /// Extra TOML appended to the config (whole tables only).
    pub extra: String,
}

impl Default for EnvBuilder {
    fn default() -> Self {
        EnvBuilder {
            blue: 1,
            green: 1,
            drain_timeout: "30m",
            grace: "10s",
            health: "mode = \"deepgram\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1",
            extra: String::new(),
        }
    }
}

/// A running Switchyard with its stubs.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub blue: Vec<StubHandle>,
    pub green: Vec<StubHandle>,
    pub app: Option<Handle>,
    pub config_path: std::path::PathBuf,
    pub client: HttpClient,
}

async fn stubs(color: &str, n: usize) -> Vec<StubHandle> {
    let mut v = Vec::new();
    for i in 0..n {
        let name = if n == 1 {
            color.to_owned()
        } else {
            format!("{color}-{i}")
        };
        v.push(
            switchyard::stub::spawn(StubOptions {
                name,
                ..Default::default()
            })
            .await
            .expect("stub starts"),
        );
    }
    v
}

fn urls(stubs: &[StubHandle]) -> String {
    stubs
        .iter()
        .map(|s| format!("\"{}\"", s.url()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl EnvBuilder {
    /// The config text for these stubs.
    pub fn config_text(&self, dir: &std::path::Path, blue: &str, green: &str) -> String {
        format!(
            r#"[listen]
proxy = "127.0.0.1:0"
preview = "127.0.0.1:0"
admin = "127.0.0.1:0"

[pools]
blue = [{blue}]
green = [{green}]

[routing]
state_file = "{state}"

[drain]
timeout = "{timeout}"
grace = "{grace}"

[health]
{health}

[admin]
token_file = "{token}"

[limits]
connect_timeout = "1s"
{extra}
"#,
            state = dir.join("route.json").display(),
            timeout = self.drain_timeout,
            grace = self.grace,
            health = self.health,
            token = dir.join("admin.token").display(),
            extra = self.extra,
        )
    }

    /// Starts stubs and Switchyard.
    pub async fn start(self) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("admin.token"), TOKEN).expect("token file");
        let blue = stubs("blue", self.blue).await;
        let green = stubs("green", self.green).await;
        let text = self.config_text(dir.path(), &urls(&blue), &urls(&green));
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, text).expect("config file");
        let config = Config::load(&config_path).expect("valid config");
        let app = switchyard::app::start(config)
            .await
            .expect("switchyard starts");
        Env {
            dir,
            blue,
            green,
            app: Some(app),
            config_path,
            client: http_client(),
        }
    }
}

impl Env {
    /// The running app.
    pub fn app(&self) -> &Handle {
        self.app.as_ref().expect("app running")
    }

    /// The sum of the samples of `name` whose labels include all of `labels` (`key="value"`).
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        let metrics = self.app().metrics.encode();
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The sum of `switchyard_upstream_errors_total` of `kind` over every upstream.
    pub fn upstream_errors(&self, kind: &str) -> f64 {
        let label = format!("kind=\"{kind}\"");
        self.metric_sum("switchyard_upstream_errors_total", &[&label])
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.app().proxy_addr, path)
    }

    pub fn preview_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.app().preview_addr.expect("preview"),
            path
        )
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.app().proxy_addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.app().admin_addr, path)
    }

    /// GET on the admin API → status and JSON.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        let req = Request::get(self.admin_url(path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        send_json(&self.client, req).await
    }

    /// POST with the admin token → status and JSON. `body` None sends no body.
    pub async fn admin_post(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = Request::post(self.admin_url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(
                body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
            ))
            .expect("request");
        send_json(&self.client, req).await
    }

    /// Flips to `to` and asserts it succeeded.
    pub async fn flip(&self, to: &str) -> Value {
        let (status, body) = self
            .admin_post("/flip", Some(serde_json::json!({ "to": to })))
            .await;
        assert_eq!(status, StatusCode::OK, "flip to {to}: {body}");
        body
    }

    /// Re-reads the config file through `POST /reload`, and checks that it was taken.
    pub async fn reload(&self) -> Value {
        let (status, body) = self.admin_post("/reload", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Flips to `to` with the drain timeout given, and checks that it changed the route.
    pub async fn flip_draining(&self, to: &str, drain_timeout: &str) -> Value {
        let (status, body) = self
            .admin_post(
                "/flip",
                Some(serde_json::json!({ "to": to, "drain_timeout": drain_timeout })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "flip to {to}: {body}");
        assert_eq!(body["changed"], true, "flip to {to}: {body}");
        body
    }

    /// Rewrites the config file (for reload tests).
    pub fn write_config(&self, builder: &EnvBuilder, blue: &str, green: &str) {
        std::fs::write(
            &self.config_path,
            builder.config_text(self.dir.path(), blue, green),
        )
        .expect("config file");
    }

    /// Writes a config with only the first stub of each colour: a reload of it removes
    /// the others.
    pub fn write_config_of_first_stubs(&self, builder: &EnvBuilder) {
        self.write_config(
            builder,
            &format!("\"{}\"", self.blue[0].url()),
            &format!("\"{}\"", self.green[0].url()),
        );
    }

    /// Stops Switchyard gracefully and waits.
    pub async fn shutdown(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown();
            tokio::time::timeout(PATIENCE * 3, app.wait())
                .await
                .expect("shutdown finishes");
        }
    }
}

/// Sends a request and returns status and parsed JSON (`Value::Null` if not JSON).
pub async fn send_json(client: &HttpClient, req: Request<Full<Bytes>>) -> (StatusCode, Value) {
    let response = tokio::time::timeout(PATIENCE, client.request(req))
        .await
        .expect("answer in time")
        .expect("request succeeds");
    let status = response.status();
    let body = body_bytes(response).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// A response's whole body, parsed as JSON.
pub async fn json_body(response: http::Response<hyper::body::Incoming>) -> Value {
    serde_json::from_slice(&body_bytes(response).await).expect("a JSON body")
}

async fn body_bytes(response: http::Response<hyper::body::Incoming>) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

/// A GET through any URL → the response with its body collected.
pub async fn get(client: &HttpClient, url: &str) -> http::Response<Bytes> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, client.request(req))
        .await
        .expect("answer in time")
        .expect("request succeeds");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    http::Response::from_parts(parts, body)
}

/// The colour header of a response.
pub fn color_of<B>(response: &http::Response<B>) -> String {
    response
        .headers()
        .get("x-switchyard-color")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The stub name header of a response.
pub fn stub_of<B>(response: &http::Response<B>) -> String {
    response
        .headers()
        .get("x-stub-name")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Polls `cond` on a signal-less condition (admin state) until true, bounded by PATIENCE.
/// Used only where no event exists to wait on (e.g. a health probe's verdict).
pub async fn eventually<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A listener that accepts connections and never answers: an upstream that is up in TCP
/// terms but hung.
pub async fn hung_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

/// An env whose blue pool is the one upstream at `addr`, with health checks off: test
/// upstreams answer only what the test scripts, so only client traffic reaches them.
pub async fn env_with_blue_at(addr: std::net::SocketAddr) -> Env {
    env_with_blue_at_health(addr, "mode = \"off\"").await
}

/// `env_with_blue_at` with the given `[health]` table.
pub async fn env_with_blue_at_health(addr: std::net::SocketAddr, health: &'static str) -> Env {
    let builder = EnvBuilder {
        health,
        ..Default::default()
    };
    env_with_blue_at_built(addr, builder).await
}

/// `env_with_blue_at` with the config of `builder`.
pub async fn env_with_blue_at_built(addr: std::net::SocketAddr, builder: EnvBuilder) -> Env {
    let env = builder.clone().start().await;
    env.write_config(
        &builder,
        &format!("\"http://{addr}\""),
        &format!("\"{}\"", env.green[0].url()),
    );
    let (status, body) = env.admin_post("/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    env
}

/// Over HTTP/2 (prior knowledge), a `POST /v1/listen` whose head goes first: waits for the
/// answer's head, then sends `bytes` more of body as the window allows, at most `chunk` at
/// a time with `pause` after each, and ends it; returns the status and the JSON body.
/// Fails if the stream is reset before all is sent: for answers given before their
/// request's body all came, which must let it finish.
pub async fn h2_answer_then_upload(
    env: &Env,
    mut bytes: usize,
    chunk: usize,
    pause: Duration,
) -> (StatusCode, Value) {
    let tcp = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    let (mut h2, connection) = tokio::time::timeout(PATIENCE, h2::client::handshake(tcp))
        .await
        .expect("in time")
        .expect("h2");
    tokio::spawn(connection);
    let post = Request::post(env.proxy_url("/v1/listen"))
        .body(())
        .expect("a request");
    let (answer, mut upload) = h2.send_request(post, false).expect("sent");
    let answer = tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("in time")
        .expect("an answer");
    while bytes > 0 {
        let want = bytes.min(chunk);
        upload.reserve_capacity(want);
        // `poll_capacity` waits for more than the stream has: what it has goes first.
        let mut granted = upload.capacity();
        if granted == 0 {
            granted = tokio::time::timeout(
                PATIENCE,
                std::future::poll_fn(|cx| upload.poll_capacity(cx)),
            )
            .await
            .expect("window for the rest of the body")
            .expect("the stream is open")
            .expect("no reset");
        }
        let n = granted.min(want);
        upload
            .send_data(Bytes::from(vec![b'a'; n]), false)
            .expect("the stream takes data");
        bytes -= n;
        tokio::time::sleep(pause).await;
    }
    upload
        .send_data(Bytes::new(), true)
        .expect("the body's end");
    let status = answer.status();
    let mut body = answer.into_body();
    let mut got = Vec::new();
    while let Some(data) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("in time")
    {
        got.extend_from_slice(&data.expect("data"));
    }
    (status, serde_json::from_slice(&got).expect("json"))
}

/// On a raw HTTP/1.1 connection whose answer has come before its upload ended: sends
/// `bytes` more of the upload, all of it before reading, then reads the answer to the
/// connection's end. Fails if a write is refused or the connection is reset, which is
/// what a socket that does not linger does to an answer the client has not read yet.
pub async fn upload_then_read_answer(conn: &mut tokio::net::TcpStream, bytes: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len());
        conn.write_all(&chunk[..n])
            .await
            .unwrap_or_else(|e| panic!("the upload was refused after {sent} bytes: {e}"));
        sent += n;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut answer))
        .await
        .expect("the connection ends")
        .expect("the connection is not reset");
    String::from_utf8_lossy(&answer).into_owned()
}

/// An upstream on a loopback port that answers one WebSocket upgrade by hand, with
/// `first` in the same write as its 101, then leaves the connection to `then`.
pub async fn hand_written_upstream<F, Fut>(first: Vec<u8>, then: F) -> std::net::SocketAddr
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("the upgrade");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            socket.read_exact(&mut byte).await.expect("the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let key = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then_some(value.trim())
            })
            .expect("a key");
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        answer.extend_from_slice(&first);
        socket.write_all(&answer).await.expect("the 101");
        then(socket).await;
    });
    addr
}
