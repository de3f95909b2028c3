//! The real binary as a child process: SIGTERM drains open streams and exits 0, a second
//! signal exits at once, and secrets never reach the log.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use switchyard::stub::StubOptions;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Proc {
    child: tokio::process::Child,
    proxy: u16,
    admin: u16,
    dir: tempfile::TempDir,
    _stubs: Vec<switchyard::stub::StubHandle>,
    blue: std::sync::Arc<switchyard::stub::StubState>,
}

impl Proc {
    async fn start(drain_timeout: &str) -> Proc {
        Proc::start_with(drain_timeout, None, "").await
    }

    /// `ulimit`: a shell `ulimit` command run before the binary; `extra`: whole TOML tables
    /// added to the config.
    async fn start_with(drain_timeout: &str, ulimit: Option<&str>, extra: &str) -> Proc {
        Proc::start_on(drain_timeout, ulimit, extra, None).await
    }

    /// As `start_with`, with the blue pool at `blue_url` instead of its stub when given.
    async fn start_on(
        drain_timeout: &str,
        ulimit: Option<&str>,
        extra: &str,
        blue_url: Option<String>,
    ) -> Proc {
        let blue = switchyard::stub::spawn(StubOptions {
            name: "blue".into(),
            ..Default::default()
        })
        .await
        .expect("stub");
        let green = switchyard::stub::spawn(StubOptions {
            name: "green".into(),
            ..Default::default()
        })
        .await
        .expect("stub");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("admin.token"), TOKEN).expect("token");
        std::fs::write(dir.path().join("keys"), "very-secret-client-key\n").expect("keys");
        let (proxy, admin) = (free_port(), free_port());
        let config = format!(
            r#"[listen]
proxy = "127.0.0.1:{proxy}"
admin = "127.0.0.1:{admin}"
[pools]
blue = ["{blue}"]
green = ["{green}"]
[routing]
state_file = "{state}"
[drain]
timeout = "{drain_timeout}"
grace = "5s"
[admin]
token_file = "{token}"
[client_auth]
keys_file = "{keys}"
{extra}
"#,
            blue = blue_url.unwrap_or_else(|| blue.url()),
            green = green.url(),
            state = dir.path().join("route.json").display(),
            token = dir.path().join("admin.token").display(),
            keys = dir.path().join("keys").display(),
        );
        std::fs::write(dir.path().join("switchyard.toml"), config).expect("config");
        let mut command = match ulimit {
            // `exec`: the child's PID is the proxy's own.
            Some(ulimit) => {
                let mut c = tokio::process::Command::new("sh");
                c.arg("-c")
                    .arg(format!(r#"{ulimit} && exec "$0" "$@""#))
                    .arg(env!("CARGO_BIN_EXE_switchyard"));
                c
            }
            None => tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard")),
        };
        let child = command
            .args(["--log-format", "json", "run", "--config"])
            .arg(dir.path().join("switchyard.toml"))
            .env("RUST_LOG", "debug")
            .env_remove("SWITCHYARD_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr.log")).expect("log file"),
            ))
            .spawn()
            .expect("switchyard starts");
        let state = blue.state.clone();
        let p = Proc {
            child,
            proxy,
            admin,
            dir,
            _stubs: vec![blue, green],
            blue: state,
        };
        let client = http_client();
        let url = format!("http://127.0.0.1:{}/healthz", p.admin);
        eventually(|| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let req = http::Request::get(url)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("request");
                client.request(req).await.is_ok()
            }
        })
        .await;
        p
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().expect("running").to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// A WebSocket request to `path` on the proxy listener, with the client key.
    fn ws_request(&self, path: &str) -> http::Request<()> {
        let mut req = format!("ws://127.0.0.1:{}{path}", self.proxy)
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "authorization",
            "Token very-secret-client-key".parse().expect("value"),
        );
        req
    }

    /// Flips to the standby colour through the admin API; the answer's status line.
    async fn flip(&self) -> String {
        let mut admin = tokio::net::TcpStream::connect(("127.0.0.1", self.admin))
            .await
            .expect("admin");
        let request = format!(
            "POST /flip HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 0\r\n\r\n"
        );
        exchange(&mut admin, &request).await.0
    }

    /// The first stream's `stream ended` line, waited for (bounded). Found whole: a line
    /// read while it is being written does not parse.
    async fn stream_end_line(&self) -> serde_json::Value {
        let end_line = || {
            self.log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["message"] == "stream ended")
        };
        eventually(|| {
            let found = end_line().is_some();
            async move { found }
        })
        .await;
        end_line().expect("found above")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Waits for the child to exit, bounded.
    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait").code(),
            Err(_) => panic!("switchyard did not exit within {within:?}:\n{}", self.log()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Stops the child if a test failed before it exited; reaped by tokio.
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn sigterm_drains_open_streams_then_exits_zero() {
    let mut p = Proc::start("1s").await;
    // A plain request with the SDKs' session header: its access line names the session.
    let req = http::Request::post(format!("http://127.0.0.1:{}/v1/listen", p.proxy))
        .header("authorization", "Token very-secret-client-key")
        .header("x-deepgram-session-id", "session-http")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"audio",
        )))
        .expect("request");
    let (status, _) = send_json(&http_client(), req).await;
    assert_eq!(status, http::StatusCode::OK);
    let mut streams = Vec::new();
    for i in 0..5 {
        let mut req = p.ws_request("/v1/listen");
        req.headers_mut().insert(
            "x-deepgram-session-id",
            format!("session-{i}").parse().expect("value"),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("handshake");
        ws.send(Message::binary(vec![7u8; 3200 * 2]))
            .await
            .expect("audio");
        streams.push(ws);
    }
    tokio::time::timeout(PATIENCE, p.blue.wait_until(|s| s.audio_bytes() >= 5 * 6400))
        .await
        .expect("the stub saw it in time");
    p.signal("TERM");
    for mut ws in streams {
        let mut finals = 0;
        let mut metadata = false;
        let close = loop {
            match tokio::time::timeout(PATIENCE, ws.next())
                .await
                .expect("in time")
            {
                Some(Ok(Message::Text(t))) => {
                    if t.contains("\"Results\"") && t.contains("\"is_final\":true") {
                        finals += 1;
                    }
                    metadata |= t.contains("\"Metadata\"");
                }
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                other => panic!("stream ended without a close frame: {other:?}"),
            }
        };
        assert_eq!(finals, 3, "two chunks of audio plus the CloseStream final");
        assert!(
            metadata,
            "the Metadata after CloseStream reached the client"
        );
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1012));
    }
    assert_eq!(p.blue.close_streams(), 5);
    assert_eq!(p.exit_code(PATIENCE).await, Some(0));
    let log = p.log();
    // Every line is JSON whose `message` is the line's own text: the drain's line names
    // what it sent in another field (a second `message` key would hide the first).
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let injected: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "drain deadline: ending the stream")
        .collect();
    assert_eq!(injected.len(), 5, "{log}");
    assert!(
        injected
            .iter()
            .all(|l| l.to_string().contains("CloseStream")),
        "{log}"
    );
    // A drained stream's lines carry its session, so its reconnect can be found: from
    // the line that opened it to the one that ended it.
    for message in [
        "stream opened",
        "drain deadline: ending the stream",
        "stream ended",
    ] {
        let mut sessions: Vec<_> = lines
            .iter()
            .filter(|l| l["message"] == message)
            .map(|l| l["span"]["session"].as_str().unwrap_or("none").to_owned())
            .collect();
        sessions.sort();
        if message == "stream ended" {
            for l in lines.iter().filter(|l| l["message"] == message) {
                assert_eq!(l["close_code"], 1012, "{l}");
                assert_eq!(l["close_sent"], true, "{l}");
            }
        }
        assert_eq!(
            sessions,
            [
                "session-0",
                "session-1",
                "session-2",
                "session-3",
                "session-4"
            ],
            "{message}"
        );
    }
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "switchyard::access" && l["method"] == "POST")
        .collect();
    assert_eq!(access.len(), 1, "{log}");
    assert_eq!(access[0]["session"], "session-http", "{log}");
    // The upstream's own answer: no `error` or `blame`, which mark Switchyard's.
    assert!(access[0].get("error").is_none(), "{log}");
    assert!(access[0].get("blame").is_none(), "{log}");
    assert!(
        !log.contains("very-secret-client-key"),
        "a client key reached the log:\n{log}"
    );
    assert!(!log.contains(TOKEN), "the admin token reached the log");
}

/// An admin call with a wrong token is logged with the client it came from and the path,
/// never with the token it presented.
#[tokio::test]
async fn a_refused_admin_call_is_logged_with_its_client_not_its_token() {
    let p = Proc::start("1s").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let client = socket.local_addr().expect("address");
    let mut admin = socket
        .connect(([127, 0, 0, 1], p.admin).into())
        .await
        .expect("connect");
    let (head, _) = exchange(
        &mut admin,
        "POST /flip HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer presented-wrong-token\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    let warned = |log: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("an admin call without the admin token"))
            })
    };
    eventually(|| {
        let log = p.log();
        async move { warned(&log).is_some() }
    })
    .await;
    let log = p.log();
    let line = warned(&log).expect("the warn line");
    // The address alone, as access and stream lines give it.
    assert_eq!(line["client"], client.ip().to_string(), "{line}");
    assert_eq!(line["path"], "/flip", "{line}");
    assert!(!log.contains("presented-wrong-token"), "{log}");
}

/// A drain message that waited all of grace behind a message the client never finished is
/// not sent, and the log says so (the deadline's line said what was queued).
#[tokio::test]
async fn a_drain_message_never_sent_is_logged() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let p = Proc::start("0s").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(p.ws_request("/v1/speak"))
        .await
        .expect("handshake");
    let first = Frame::message(&b"{\"type\":\"Sp"[..], OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first))
        .await
        .expect("first fragment");
    // The stub's pong comes after the fragment reached it.
    ws.send(Message::Ping(bytes::Bytes::from_static(b"after")))
        .await
        .expect("ping");
    let code = tokio::time::timeout(PATIENCE, async {
        let mut flipped = false;
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(_))) if !flipped => {
                    let status = p.flip().await;
                    assert!(status.starts_with("http/1.1 200"), "{status}");
                    flipped = true;
                }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("stream ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("closed at the end of grace");
    assert_eq!(code, Some(1012));
    let message = "the drain message waited behind a message the client never finished";
    eventually(|| {
        let log = p.log();
        async move { log.contains(message) }
    })
    .await;
}

/// A drained client that reads nothing cannot take its 1012: its connection is dropped
/// after the close wait, and the stream's end line says the close was not sent.
#[tokio::test]
async fn a_close_the_client_never_took_is_logged_as_not_sent() {
    let p = Proc::start("0s").await;
    let (ws, _) = tokio_tungstenite::connect_async(p.ws_request("/v1/agent/converse"))
        .await
        .expect("handshake");
    // The stub echoes every binary message; this client sends and never reads, so the
    // echoes fill every buffer back to it until its own sends stop completing.
    let (mut tx, never_read) = ws.split();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = tokio::spawn({
        let sent = sent.clone();
        async move {
            // Bounded: far more than loopback buffers hold, so it stalls long before.
            for _ in 0..4096 {
                if tx
                    .send(Message::binary(vec![7u8; 64 * 1024]))
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::Release);
            }
        }
    });
    // Stalled: neither the client's sends nor the stub's reads moved for 3 s. The stub
    // reads only once its echo is written, so every buffer toward the client is full.
    let stalled = tokio::time::timeout(PATIENCE * 3, async {
        let mut last = (u64::MAX, u64::MAX);
        let mut still = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = (
                sent.load(std::sync::atomic::Ordering::Acquire),
                p.blue.audio_bytes(),
            );
            still = if now == last { still + 1 } else { 0 };
            last = now;
            if still >= 30 && now.0 > 0 {
                break;
            }
        }
    })
    .await;
    assert!(stalled.is_ok(), "the flood never stalled");
    assert!(!flood.is_finished(), "the flood went through unread");
    let status = p.flip().await;
    assert!(status.starts_with("http/1.1 200"), "{status}");
    let line = p.stream_end_line().await;
    assert_eq!(line["reason"], "drain_forced", "{line}");
    assert_eq!(line["close_code"], 1012, "{line}");
    assert_eq!(line["close_sent"], false, "{line}");
    flood.abort();
    // What the client sees once it reads: the echoes that got through, then a connection
    // ended without a close frame.
    let mut rx = never_read;
    tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(message)) = rx.next().await {
            assert!(
                !message.is_close(),
                "a close frame reached the client: {message:?}"
            );
        }
    })
    .await
    .expect("the connection ended");
}

/// A client that closes first gets the upstream's answering close, as on a direct
/// connection, and the stream's end line names that close, not the client's.
#[tokio::test]
async fn the_end_line_names_the_close_the_client_got() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    // An upstream that answers the first frame it reads, the client's close, with a close
    // of its own: 4000.
    let addr = hand_written_upstream(Vec::new(), |mut socket| async move {
        let mut byte = [0u8; 1];
        match socket.read(&mut byte).await {
            Ok(1) if byte[0] == 0x88 => {}
            _ => return,
        }
        // Close, unmasked, code 4000.
        let _ = socket.write_all(&[0x88, 0x02, 0x0f, 0xa0]).await;
        let mut rest = [0u8; 1024];
        while matches!(socket.read(&mut rest).await, Ok(n) if n > 0) {}
    })
    .await;
    let p = Proc::start_on(
        "30m",
        None,
        "[health]\nmode = \"off\"",
        Some(format!("http://{addr}")),
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(p.ws_request("/v1/listen"))
        .await
        .expect("handshake");
    ws.close(Some(CloseFrame {
        code: 1000.into(),
        reason: "".into(),
    }))
    .await
    .expect("close sent");
    let got = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("the stream ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("answered");
    assert_eq!(got, Some(4000), "the upstream's close reached the client");
    let line = p.stream_end_line().await;
    assert_eq!(line["reason"], "client", "{line}");
    assert_eq!(line["close_code"], 4000, "{line}");
    assert_eq!(line["close_sent"], true, "{line}");
}

/// Switchyard's own answers get an access line too: here a 502 (or 503, once a probe has
/// found it down), the upstream being gone.
#[tokio::test]
async fn an_answer_of_switchyards_own_gets_an_access_line() {
    let mut p = Proc::start("1s").await;
    // Dropped, the stubs stop and their ports refuse connections.
    p._stubs.clear();
    let req = http::Request::post(format!("http://127.0.0.1:{}/v1/listen", p.proxy))
        .header("authorization", "Token very-secret-client-key")
        .header("x-deepgram-session-id", "session-502")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"audio",
        )))
        .expect("request");
    let (status, json) = send_json(&http_client(), req).await;
    assert!([502, 503].contains(&status.as_u16()), "{status}: {json}");
    p.signal("TERM");
    assert_eq!(p.exit_code(PATIENCE).await, Some(0));
    let log = p.log();
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["target"] == "switchyard::access")
        .collect();
    assert_eq!(access.len(), 1, "{log}");
    assert_eq!(access[0]["status"], status.as_u16(), "{log}");
    assert_eq!(access[0]["session"], "session-502", "{log}");
    assert_eq!(access[0]["color"], "blue", "{log}");
}

/// An upstream that breaks off an answer's body is named in a warning, as every other
/// upstream failure is; before, only the access line (status 200) and a counter told.
#[tokio::test]
async fn an_upstream_that_breaks_off_a_body_is_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let broken = listener.local_addr().expect("addr");
    let upstream = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.")
                .await;
        }
    });
    let mut p = Proc::start_with("1s", None, "[health]\nmode = \"off\"").await;
    let config = p.dir.path().join("switchyard.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let blue = p._stubs[0].url();
    std::fs::write(&config, text.replace(&blue, &format!("http://{broken}"))).expect("config");
    let reload = http::Request::post(format!("http://127.0.0.1:{}/reload", p.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let (status, json) = send_json(&http_client(), reload).await;
    assert_eq!(status, 200, "{json}");

    let req = http::Request::get(format!("http://127.0.0.1:{}/v1/speak", p.proxy))
        .header("authorization", "Token very-secret-client-key")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    // hyper may drop the head it buffered with the broken body: either way, an error.
    if let Ok(response) = http_client().request(req).await {
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert!(
            body.is_err(),
            "a body cut short is an error, not a short body"
        );
    }
    p.signal("TERM");
    assert_eq!(p.exit_code(PATIENCE).await, Some(0));
    upstream.abort();
    let log = p.log();
    let warned: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| {
            l["level"] == "WARN" && l["message"] == "upstream broke off its answer's body"
        })
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert_eq!(warned[0]["upstream"], format!("http://{broken}"), "{log}");
    assert_eq!(warned[0]["bytes_to_client"], 10, "{log}");
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut p = Proc::start("30m").await;
    let mut req = format!("ws://127.0.0.1:{}/v1/listen", p.proxy)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "token, very-secret-client-key".parse().expect("value"),
    );
    let (_ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("handshake");
    tokio::time::timeout(PATIENCE, p.blue.wait_until(|s| s.ws_open_now() == 1))
        .await
        .expect("the stub saw it in time");
    p.signal("TERM");
    // The stream would hold shutdown for 30 minutes; a second signal must not wait for it.
    let client = http_client();
    let status_url = format!("http://127.0.0.1:{}/status", p.admin);
    // The admin API stays up during the drain, and shows the stream holding it.
    let status = get(&client, &status_url).await;
    assert_eq!(status.status(), http::StatusCode::OK);
    let status: serde_json::Value = serde_json::from_slice(status.body()).expect("json");
    assert_eq!(status["colors"]["blue"]["open_streams"], 1, "{status}");
    p.signal("INT");
    let code = p.exit_code(PATIENCE).await;
    assert!(
        code.is_some() && code != Some(0),
        "a forced exit is not a clean one: {code:?}"
    );
    let log = p.log();
    assert!(
        !log.contains("very-secret-client-key"),
        "a client key reached the log:\n{log}"
    );
}

/// One HTTP/1.1 exchange on a kept connection: the answer's head and its body (read by
/// `Content-Length`, which every answer here has).
async fn exchange(stream: &mut tokio::net::TcpStream, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a content-length");
                if buf.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                    return (head, body.into_owned());
                }
            }
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed before a whole answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("an answer in time")
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let p = Proc::start_with("1s", Some("ulimit -S -n 256 || true"), "").await;
    let pid = p.child.id().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-file line");
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        numbers[0], numbers[1],
        "soft limit raised to the hard one: {line}"
    );
    if numbers[1].parse::<u64>().is_ok_and(|hard| hard > 256) {
        assert!(p.log().contains("open-file limit raised"), "{}", p.log());
    }
}

/// With `admin`, a connection to the admin API kept open: waits until it is the only one
/// (the start-up check's connection closing later would free a descriptor), then opens
/// more client connections than the proxy has descriptors, which it accepts until only
/// the reserve is left. The clients are returned to be kept open.
async fn exhaust(p: &Proc, admin: &mut tokio::net::TcpStream) -> Vec<tokio::net::TcpStream> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = exchange(admin, "GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n").await;
        if metrics.contains(r#"switchyard_connections{listener="admin"} 1"#) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut clients = Vec::new();
    for _ in 0..80 {
        clients.push(
            tokio::net::TcpStream::connect(("127.0.0.1", p.proxy))
                .await
                .expect("connect"),
        );
    }
    eventually(|| async { p.log().contains("the open-file limit is used up") }).await;
    clients
}

#[tokio::test]
async fn out_of_sockets_answers_503_and_leaves_the_upstream_healthy() {
    // 64 descriptors in all, and `fall = 1` with no probes (`interval` far off): one
    // connect error counted against blue would take it out until the test is over.
    let p = Proc::start_with(
        "1s",
        Some("ulimit -n 64"),
        "[health]\nmode = \"off\"\nfall = 1\ninterval = \"1h\"\n[limits]\nheader_read_timeout = \"60s\"",
    )
    .await;
    assert!(
        p.log().contains("the open-file limit is below"),
        "{}",
        p.log()
    );
    let status = "GET /status HTTP/1.1\r\nhost: admin\r\n\r\n";
    let mut admin = tokio::net::TcpStream::connect(("127.0.0.1", p.admin))
        .await
        .expect("admin");
    let (head, _) = exchange(&mut admin, status).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut clients = exhaust(&p, &mut admin).await;

    let key = "authorization: Token very-secret-client-key\r\n";
    for client in clients.iter_mut().take(3) {
        let request = format!("GET /v1/status HTTP/1.1\r\nhost: proxy\r\n{key}\r\n");
        let (head, body) = exchange(client, &request).await;
        assert!(head.starts_with("http/1.1 503"), "{head}\n{body}");
        assert!(head.contains("x-switchyard-color: blue"), "{head}");
        assert!(body.contains(r#""error":"proxy_overloaded""#), "{body}");
    }
    let upgrade = format!(
        "GET /v1/listen HTTP/1.1\r\nhost: proxy\r\n{key}connection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let (head, body) = exchange(&mut clients[3], &upgrade).await;
    assert!(head.starts_with("http/1.1 503"), "{head}\n{body}");
    assert!(body.contains(r#""error":"proxy_overloaded""#), "{body}");
    // The refused handshake has its access line, as a refused plain request has, each
    // saying whose the 503 is.
    let own_503 = |path: &str| {
        p.log().lines().any(|l| {
            l.contains("switchyard::access")
                && l.contains(&format!(r#""path":"{path}""#))
                && l.contains(r#""status":503"#)
                && l.contains(r#""error":"proxy_overloaded""#)
                && l.contains(r#""blame":"switchyard""#)
        })
    };
    assert!(own_503("/v1/listen"), "{}", p.log());
    assert!(own_503("/v1/status"), "{}", p.log());

    let (_, body) = exchange(&mut admin, status).await;
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(
        status["colors"]["blue"]["upstreams"][0]["healthy"],
        serde_json::json!(true),
        "{status}"
    );
    assert!(p.log().contains("out of sockets"), "{}", p.log());
    // The other clients wait to be accepted: the listener stopped at the reserve, so the
    // kernel never refused it a descriptor (before, clients took the reserve too, and
    // accept failed with EMFILE every 50 ms).
    let (_, metrics) = exchange(&mut admin, "GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n").await;
    assert!(
        metrics.contains(r#"switchyard_connections{listener="proxy"} 32"#),
        "64 descriptors less a reserve of 32:\n{metrics}"
    );
    assert!(!p.log().contains("accept failed"), "{}", p.log());

    // With the clients gone, blue serves again, and no error was booked against it.
    drop(clients);
    let client = http_client();
    let url = format!("http://127.0.0.1:{}/v1/status", p.proxy);
    eventually(|| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let req = http::Request::get(url)
                .header("authorization", "Token very-secret-client-key")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            client
                .request(req)
                .await
                .is_ok_and(|r| r.status() == http::StatusCode::OK)
        }
    })
    .await;
    let (_, metrics) = exchange(&mut admin, "GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n").await;
    let value = |prefix: &str| -> Vec<f64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    };
    let errors = value("switchyard_upstream_errors_total{");
    assert!(
        errors.iter().all(|v| *v == 0.0),
        "no upstream error for a socket this process could not open:\n{metrics}"
    );
    // Three at least: the first retries above may have come while clients still waiting
    // to be accepted held every descriptor.
    let http_5xx = value(r#"switchyard_requests_total{code="5xx",color="blue",protocol="http"}"#);
    assert!(
        http_5xx.iter().all(|v| *v >= 3.0) && http_5xx.len() == 1,
        "{http_5xx:?}"
    );
    assert_eq!(
        value(r#"switchyard_requests_total{code="5xx",color="blue",protocol="websocket"}"#),
        [1.0]
    );
}

/// At the open-file ceiling, a request that needs a new upstream connection closes one
/// kept idle (here, to the colour no longer active) and goes on: before, it got 503
/// `proxy_overloaded` while idle connections held the sockets until they timed out.
#[tokio::test]
async fn a_connect_at_the_ceiling_closes_an_idle_connection_to_make_room() {
    use tokio::io::AsyncWriteExt;
    // 64 descriptors: 32 client and upstream sockets at most.
    let p = Proc::start_with(
        "1s",
        Some("ulimit -n 64"),
        "[health]\nmode = \"off\"\n[limits]\nheader_read_timeout = \"60s\"",
    )
    .await;
    let client = http_client();
    let admin = |method: http::Method, path: &str, body: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", p.admin))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .expect("request")
    };
    let count = |color: &'static str, field: &'static str| {
        let client = client.clone();
        let req = admin(http::Method::GET, "/status", "");
        async move {
            let (_, status) = send_json(&client, req).await;
            status["colors"][color][field].as_u64()
        }
    };
    // Uploads of two bytes, one sent: each holds its client and upstream connection.
    let upload = "POST /v1/listen HTTP/1.1\r\nhost: proxy\r\n\
                  authorization: Token very-secret-client-key\r\ncontent-length: 2\r\n\r\na";
    let metrics = format!("http://127.0.0.1:{}/metrics", p.admin);
    let connections = |n: usize| {
        let (client, metrics) = (client.clone(), metrics.clone());
        async move {
            let m = get(&client, &metrics).await;
            let line = format!(r#"switchyard_connections{{listener="proxy"}} {n}"#);
            String::from_utf8_lossy(m.body()).contains(&line)
        }
    };
    // All `n` are accepted before any upload starts: the listener stops at the ceiling
    // too, and the uploads' connects must be what finds it.
    let start = |n: usize| async move {
        let mut clients = Vec::new();
        for _ in 0..n {
            let c = tokio::net::TcpStream::connect(("127.0.0.1", p.proxy))
                .await
                .expect("connect");
            clients.push(c);
        }
        eventually(|| connections(n)).await;
        for c in &mut clients {
            c.write_all(upload.as_bytes()).await.expect("write");
        }
        clients
    };
    // Ten at once on blue leave ten connections kept idle to it.
    let mut clients = start(10).await;
    eventually(|| async { count("blue", "in_flight").await == Some(10) }).await;
    for c in &mut clients {
        let (head, body) = exchange(c, "a").await;
        assert!(head.starts_with("http/1.1 200"), "{head}\n{body}");
    }
    drop(clients);
    eventually(|| connections(0)).await;
    let (status, body) = send_json(
        &client,
        admin(
            http::Method::POST,
            "/flip",
            r#"{"to": "green", "force": true}"#,
        ),
    )
    .await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    // Twelve on green: with ten sockets kept idle to blue, the last two find the ceiling.
    let mut clients = start(12).await;
    eventually(|| async { count("green", "in_flight").await == Some(12) }).await;
    for c in &mut clients {
        let (head, body) = exchange(c, "a").await;
        assert!(head.starts_with("http/1.1 200"), "{head}\n{body}");
    }
}

/// One HTTP/2 client with 100 requests at once holds 100 upstream sockets: with 64
/// descriptors in all, those past the reserve are answered 503 `proxy_overloaded`, and
/// the descriptors left stay the admin API's (before, the streams took every descriptor
/// and the admin listener accepted nothing until they ended).
#[tokio::test]
async fn http2_streams_leave_the_reserve_to_the_admin_api() {
    use http_body_util::StreamBody;
    let p = Proc::start_with("1s", Some("ulimit -n 64"), "").await;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.proxy))
        .await
        .expect("connect");
    type Body = StreamBody<
        futures_util::stream::Pending<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>,
    >;
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    // Uploads whose bodies never come: the stub waits for them, holding its connection.
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let mut sender = sender.clone();
        let req = http::Request::post(format!("http://127.0.0.1:{}/v1/listen", p.proxy))
            .header("authorization", "Token very-secret-client-key")
            .body(StreamBody::new(futures_util::stream::pending()))
            .expect("request");
        answers.spawn(async move {
            sender.ready().await.ok()?;
            sender.send_request(req).await.ok().map(|r| r.status())
        });
    }
    // Some are refused for want of descriptors past the reserve.
    let refused = tokio::time::timeout(PATIENCE, async {
        while let Some(answer) = answers.join_next().await {
            if answer.expect("task") == Some(http::StatusCode::SERVICE_UNAVAILABLE) {
                return;
            }
        }
        panic!("no request was refused");
    })
    .await;
    assert!(refused.is_ok(), "no 503 in time:\n{}", p.log());
    // A new admin connection is accepted and answered while the rest stay open.
    let mut admin = tokio::net::TcpStream::connect(("127.0.0.1", p.admin))
        .await
        .expect("admin");
    let (head, body) = exchange(&mut admin, "GET /status HTTP/1.1\r\nhost: admin\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 200"), "{head}\n{body}");
    assert!(!p.log().contains("accept failed"), "{}", p.log());
}

/// A reload that raises `limits.max_connections` past what the open-file limit allows is
/// warned about, as a start is.
#[tokio::test]
async fn a_reload_past_the_open_file_limit_is_warned_about() {
    let warning = "the open-file limit is below";
    let p = Proc::start_with(
        "1s",
        Some("ulimit -n 256"),
        "[limits]\nmax_connections = 20",
    )
    .await;
    assert!(!p.log().contains(warning), "{}", p.log());
    let path = p.dir.path().join("switchyard.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    let raised = config.replace("max_connections = 20", "max_connections = 1000");
    assert_ne!(raised, config);
    std::fs::write(&path, raised).expect("config");
    let reload = || async {
        let (status, body) = send_json(
            &http_client(),
            http::Request::post(format!("http://127.0.0.1:{}/reload", p.admin))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request"),
        )
        .await;
        assert_eq!(status, http::StatusCode::OK, "{body}");
    };
    reload().await;
    eventually(|| async { p.log().contains(warning) }).await;

    // A reload that leaves `max_connections` as it is says nothing more of it. Its own
    // "route changed" line comes after where the warning would be.
    let changes = p.log().matches("route changed").count();
    reload().await;
    eventually(|| async { p.log().matches("route changed").count() > changes }).await;
    assert_eq!(p.log().matches(warning).count(), 1, "{}", p.log());
}

/// The log says who changed the route and how: the caller's address, its reason, and
/// whether the health gate was skipped; a change the API refused is logged too, with who
/// asked (before, only the caller knew of it).
#[tokio::test]
async fn route_changes_and_refusals_name_the_caller() {
    let p = Proc::start("1s").await;
    let post = |path: &str, body: serde_json::Value| {
        http::Request::post(format!("http://127.0.0.1:{}{path}", p.admin))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .expect("request")
    };
    let flip = serde_json::json!({"to": "green", "force": true, "reason": "release 7"});
    let (status, body) = send_json(&http_client(), post("/flip", flip)).await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    let stale = serde_json::json!({"expect_generation": 1});
    let (status, body) = send_json(&http_client(), post("/rollback", stale)).await;
    assert_eq!(status, http::StatusCode::CONFLICT, "{body}");
    eventually(|| async { p.log().contains("route change refused") }).await;
    let lines: Vec<serde_json::Value> = p
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let changed = lines
        .iter()
        .find(|l| l["message"] == "route changed" && l["action"] == "flip")
        .unwrap_or_else(|| panic!("{}", p.log()));
    assert_eq!(changed["client"], "127.0.0.1", "{changed}");
    assert_eq!(changed["forced"], true, "{changed}");
    assert_eq!(changed["reason"], "release 7", "{changed}");
    assert_eq!(changed["from"], "blue", "{changed}");
    let refused = lines
        .iter()
        .find(|l| l["message"] == "route change refused")
        .unwrap_or_else(|| panic!("{}", p.log()));
    assert_eq!(refused["action"], "rollback", "{refused}");
    assert_eq!(refused["client"], "127.0.0.1", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("expected generation 1")),
        "{refused}"
    );
    assert!(!p.log().contains(TOKEN), "{}", p.log());
}

#[tokio::test]
async fn a_health_probe_without_a_socket_judges_nothing() {
    let p = Proc::start_with(
        "1s",
        Some("ulimit -n 64"),
        "[health]\nmode = \"http\"\ninterval = \"100ms\"\nrise = 1\nfall = 1",
    )
    .await;
    let status = "GET /status HTTP/1.1\r\nhost: admin\r\n\r\n";
    let mut admin = tokio::net::TcpStream::connect(("127.0.0.1", p.admin))
        .await
        .expect("admin");
    let blue_healthy = async |admin: &mut tokio::net::TcpStream| {
        let (_, body) = exchange(admin, status).await;
        let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        status["colors"]["blue"]["upstreams"][0]["healthy"] == serde_json::json!(true)
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !blue_healthy(&mut admin).await {
        assert!(tokio::time::Instant::now() < deadline, "blue never healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Client connections stop at the reserve, which is the probes' own; admin
    // connections take from it, until the process has no descriptor left.
    let mut others = Vec::new();
    for _ in 0..64 {
        others.push(
            tokio::net::TcpStream::connect(("127.0.0.1", p.admin))
                .await
                .expect("connect"),
        );
    }
    eventually(|| async { p.log().contains("health probe skipped") }).await;
    assert!(blue_healthy(&mut admin).await, "{}", p.log());
    drop(others);
}

/// `switchyard demo` on these ports (proxy, preview, admin), killed if the test drops it.
fn demo(proxy: u16, preview: u16, admin: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .arg("demo")
        .args(["--proxy-port", &proxy.to_string()])
        .args(["--preview-port", &preview.to_string()])
        .args(["--admin-port", &admin.to_string()])
        .kill_on_drop(true);
    command
}

/// The scratch directory a running demo keeps its config and token in.
fn scratch_of(child: &tokio::process::Child) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("switchyard-demo-{}", child.id().expect("pid")))
}

/// `switchyard demo` serves the story on the ports it is given, prints commands that name
/// this binary, and on SIGINT or SIGTERM exits 0 leaving no scratch directory behind.
#[tokio::test]
async fn demo_runs_prints_runnable_commands_and_cleans_up() {
    for signal in ["-INT", "-TERM"] {
        demo_story_ended_by(signal).await;
    }
}

async fn demo_story_ended_by(signal: &str) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let (proxy, preview, admin) = (free_port(), free_port(), free_port());
    let mut child = demo(proxy, preview, admin)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let scratch = scratch_of(&child);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut printed = String::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("stdout") {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Ctrl-C to stop") {
                return;
            }
        }
    })
    .await
    .expect("the demo prints its commands");
    assert!(
        printed.contains(&format!("{bin} ctl --admin http://127.0.0.1:{admin}")),
        "{printed}"
    );
    assert!(scratch.join("admin.token").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&scratch)
            .expect("scratch dir")
            .permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o700,
        "the demo's token is private to its user"
    );
    let response = get(
        &http_client(),
        &format!("http://127.0.0.1:{proxy}/v1/status"),
    )
    .await;
    assert_eq!(color_of(&response), "blue");
    let response = get(
        &http_client(),
        &format!("http://127.0.0.1:{preview}/v1/status"),
    )
    .await;
    assert_eq!(color_of(&response), "green");

    let status = Command::new("kill")
        .args([signal, &child.id().expect("running").to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the demo exits")
        .expect("wait");
    assert_eq!(exit.code(), Some(0), "after kill {signal}");
    assert!(!scratch.exists(), "{} is left behind", scratch.display());
}

/// As with `run`, a second Ctrl-C ends the demo without waiting for its open streams'
/// 20 s drain, still exiting 0 and removing its scratch directory.
#[tokio::test]
async fn a_second_signal_ends_the_demo_without_waiting_for_its_streams() {
    let (proxy, preview, admin) = (free_port(), free_port(), free_port());
    let mut child = demo(proxy, preview, admin)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let scratch = scratch_of(&child);
    let client = http_client();
    let status_url = format!("http://127.0.0.1:{admin}/status");
    eventually(|| async {
        matches!(client.get(status_url.parse().expect("url")).await, Ok(r) if r.status() == 200)
    })
    .await;
    let (_stream, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{proxy}/v1/listen"))
            .await
            .expect("a stream opens");
    let pid = child.id().expect("running").to_string();
    let interrupt = || {
        let status = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    };
    interrupt();
    // The first signal is taken: the demo is draining its stream.
    eventually(|| async {
        let status: serde_json::Value =
            serde_json::from_slice(get(&client, &status_url).await.body()).expect("JSON");
        status["shutting_down"] == true && status["colors"]["blue"]["open_streams"] == 1
    })
    .await;
    interrupt();
    // Well inside the 20 s the drain would take.
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the second signal ends the demo")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
    assert!(!scratch.exists(), "{} is left behind", scratch.display());
}

/// A demo port already taken is named by its flag, and the scratch directory is removed.
#[tokio::test]
async fn demo_names_the_flag_of_a_taken_port_and_leaves_nothing_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = taken.local_addr().expect("addr").port();
    let child = demo(free_port(), free_port(), admin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("demo starts");
    let scratch = scratch_of(&child);
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("the demo exits")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--admin-port: cannot listen on 127.0.0.1:{admin}")),
        "{stderr}"
    );
    assert!(!scratch.exists(), "{} is left behind", scratch.display());
}
