//! Many replicas sharing one route state in etcd: three real `switchyard run` processes (the
//! binary built with `--features etcd`) per scenario, stub upstreams in-process, each
//! scenario under its own `etcd.key`. They need etcd: `SWITCHYARD_TEST_ETCD` names a shared
//! one (`.ci/run` starts it); without it each scenario starts its own `etcd` child. Scenarios
//! that stop etcd always run their own, on free ports with their own data directory.
//!
//! `cargo test --features etcd --test etcd -- --ignored`
#![cfg(feature = "etcd")]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{Value, json};
use support::{ChildLog, PATIENCE, TOKEN, color_of, free_port, get, http_client, send_json};
use switchyard::stub::{StubHandle, StubOptions};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// How soon every replica must follow a change made through another (SPEC: within a second).
const FOLLOW: Duration = Duration::from_secs(1);

/// `etcd.timeout` in these configs: how long a change may take to be refused.
const ETCD_TIMEOUT: Duration = Duration::from_secs(1);

/// The stub answers one final `Results` per this many audio bytes.
const RESULT_BYTES: usize = 3200;

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends a signal by PID with kill(1).
fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// Waits for a killed child without blocking the runtime.
async fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

/// Polls `cond` until true, bounded by `limit`; for state that has no event to wait on
/// (another process's table, a lease running out).
async fn until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `what`, bounded by PATIENCE.
async fn within_patience<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {PATIENCE:?}"))
}

// ---- etcd ------------------------------------------------------------------------------

/// An etcd child of this test, on free ports with its own data directory, so the test can
/// stop, freeze and restart it.
struct OwnEtcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl OwnEtcd {
    async fn start() -> OwnEtcd {
        let mut etcd = OwnEtcd {
            child: None,
            data: tempfile::tempdir().expect("tempdir"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.run().await;
        etcd
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("etcd running").id()
    }

    /// Starts etcd on the data directory (again) and waits until it answers.
    async fn run(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("etcd.log"))
            .expect("etcd log file");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.data.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts (is etcd-server installed?)");
        self.child = Some(child);
        wait_etcd(&client).await;
    }

    /// SIGKILL, as in a crash; the data directory stays for `run`.
    async fn kill(&mut self) {
        reap(self.child.take().expect("etcd running")).await;
    }
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The shared etcd (`SWITCHYARD_TEST_ETCD`), or this test's own.
enum Etcd {
    Shared(String),
    Own(OwnEtcd),
}

impl Etcd {
    async fn any() -> Etcd {
        match std::env::var("SWITCHYARD_TEST_ETCD") {
            Ok(endpoint) if !endpoint.trim().is_empty() => {
                let endpoint = endpoint.trim().to_owned();
                wait_etcd(&endpoint).await;
                Etcd::Shared(endpoint)
            }
            _ => Etcd::Own(OwnEtcd::start().await),
        }
    }

    fn endpoint(&self) -> String {
        match self {
            Etcd::Shared(e) => e.clone(),
            Etcd::Own(own) => own.endpoint(),
        }
    }
}

/// Waits until etcd's `/health` says so.
async fn wait_etcd(endpoint: &str) {
    let client = http_client();
    let url = format!("{endpoint}/health");
    until(&format!("etcd at {endpoint}"), PATIENCE, || {
        let req = http::Request::get(&url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let client = client.clone();
        async move {
            matches!(
                tokio::time::timeout(Duration::from_secs(1), client.request(req)).await,
                Ok(Ok(r)) if r.status() == StatusCode::OK
            )
        }
    })
    .await;
}

/// A key no other scenario (or earlier run) uses.
fn unique_key(scenario: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    format!(
        "/switchyard-test/{scenario}-{}-{nanos}/route",
        std::process::id()
    )
}

// ---- the fleet -------------------------------------------------------------------------

/// What a fleet's configs share.
struct FleetOptions {
    scenario: &'static str,
    drain_timeout: &'static str,
    lease_ttl: &'static str,
    /// Leave `replica_id` out of the third replica's config (it defaults to host:port).
    default_id_for_c: bool,
    /// `routing.initial` of the third replica (the others: blue).
    initial_for_c: &'static str,
    /// The etcd endpoints of the second replica, if not the fleet's (a `Relay`, or a
    /// member that is down beside the one that is up).
    etcd_for_b: Option<Vec<String>>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            scenario: "fleet",
            drain_timeout: "30m",
            lease_ttl: "10s",
            default_id_for_c: false,
            initial_for_c: "blue",
            etcd_for_b: None,
        }
    }
}

/// Stubs and three replicas' configs, all on one etcd key.
struct Fleet {
    dir: tempfile::TempDir,
    /// `etcd.key` of every replica.
    key: String,
    blue: StubHandle,
    green: StubHandle,
    replicas: Vec<Replica>,
}

/// One replica's config, and its process while it runs.
struct Replica {
    id: String,
    dir: PathBuf,
    proxy: String,
    admin: String,
    running: Option<Running>,
}

impl Fleet {
    /// Asserts that every replica's proxy routes new requests to `color`.
    async fn all_route_to(&self, color: &str) {
        for r in &self.replicas {
            assert_eq!(r.routes_to().await, color, "{} routes to {color}", r.id);
        }
    }

    /// Stubs and configs, then all three replicas running.
    async fn start(etcd: &str, options: FleetOptions) -> Fleet {
        let mut fleet = Fleet::new(etcd, options).await;
        for i in 0..3 {
            fleet.replicas[i].run().await;
        }
        fleet
    }

    /// Stubs and configs; no replica runs yet.
    async fn new(etcd: &str, options: FleetOptions) -> Fleet {
        let stub = |name: &str| {
            switchyard::stub::spawn(StubOptions {
                name: name.into(),
                ..Default::default()
            })
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("admin.token");
        std::fs::write(&token, TOKEN).expect("token file");
        let blue = stub("blue").await.expect("blue stub");
        let green = stub("green").await.expect("green stub");
        let key = unique_key(options.scenario);
        let mut replicas = Vec::new();
        for name in ["a", "b", "c"] {
            let replica_dir = dir.path().join(name);
            std::fs::create_dir_all(&replica_dir).expect("replica dir");
            let proxy = format!("127.0.0.1:{}", free_port());
            let admin = format!("127.0.0.1:{}", free_port());
            let named = !(name == "c" && options.default_id_for_c);
            let id = format!("proxy-{name}");
            let endpoints = match &options.etcd_for_b {
                Some(endpoints) if name == "b" => endpoints.join("\", \""),
                _ => etcd.to_owned(),
            };
            let config = format!(
                r#"[listen]
proxy = "{proxy}"
admin = "{admin}"

[pools]
blue = ["{blue}"]
green = ["{green}"]

[routing]
initial = "{initial}"
state_file = "{state}"
store = "etcd"
etcd = {{ endpoints = ["{endpoints}"], key = "{key}", {replica_id}lease_ttl = "{lease_ttl}", timeout = "{timeout}" }}

[drain]
timeout = "{drain}"
grace = "5s"

[health]
interval = "200ms"
rise = 1
fall = 1

[admin]
token_file = "{token}"
"#,
                blue = blue.url(),
                green = green.url(),
                initial = if name == "c" {
                    options.initial_for_c
                } else {
                    "blue"
                },
                state = replica_dir.join("state").join("route.json").display(),
                replica_id = if named {
                    format!("replica_id = \"{id}\", ")
                } else {
                    String::new()
                },
                lease_ttl = options.lease_ttl,
                timeout = humantime::format_duration(ETCD_TIMEOUT),
                drain = options.drain_timeout,
                token = token.display(),
            );
            std::fs::write(replica_dir.join("switchyard.toml"), config).expect("config");
            replicas.push(Replica {
                id: if named {
                    id
                } else {
                    format!("*:{}", admin.rsplit(':').next().expect("a port"))
                },
                dir: replica_dir,
                proxy,
                admin,
                running: None,
            });
        }
        Fleet {
            dir,
            key,
            blue,
            green,
            replicas,
        }
    }

    /// Stops every running replica.
    async fn stop(&mut self) {
        for r in &mut self.replicas {
            r.kill().await;
        }
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    /// Waits until every replica follows etcd and lists all three replicas.
    async fn settled(&self) {
        for replica in &self.replicas {
            until(
                &format!("{} in sync with three replicas", replica.id),
                PATIENCE,
                || async {
                    let store = replica.status().await["store"].clone();
                    store["in_sync"] == true
                        && store["replicas"].as_array().map(Vec::len) == Some(3)
                },
            )
            .await;
        }
    }

    /// Waits until every running replica has `active` at `generation`, and returns how long
    /// the last one took.
    async fn converged(&self, active: &str, generation: u64, limit: Duration) -> Duration {
        let start = Instant::now();
        // One deadline for all of them: "every replica within `limit`", not each in turn.
        let deadline = start + limit;
        for replica in self.replicas.iter().filter(|r| r.running.is_some()) {
            until(
                &format!("{} on {active} at generation {generation}", replica.id),
                deadline.saturating_duration_since(Instant::now()),
                || async {
                    let status = replica.status().await;
                    status["active"] == active && status["generation"] == generation
                },
            )
            .await;
        }
        start.elapsed()
    }

    /// Every running replica's route state, which must be the same.
    async fn agreed(&self) -> Value {
        let mut first: Option<(String, Value)> = None;
        for replica in self.replicas.iter().filter(|r| r.running.is_some()) {
            let status = replica.status().await;
            let view = json!({
                "active": status["active"],
                "rollback_to": status["rollback_to"],
                "generation": status["generation"],
                "changed_at": status["changed_at"],
                "revision": status["store"]["revision"],
            });
            match &first {
                None => first = Some((replica.id.clone(), view)),
                Some((id, seen)) => assert_eq!(&view, seen, "{} and {id} disagree", replica.id),
            }
        }
        first.expect("a running replica").1
    }
}

impl Replica {
    fn config(&self) -> PathBuf {
        self.dir.join("switchyard.toml")
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Starts `switchyard run` and waits for its "listening" line.
    async fn run(&mut self) {
        assert!(self.running.is_none(), "{} already runs", self.id);
        self.running = Some(Running::start(&self.config()).await);
    }

    fn pid(&self) -> u32 {
        self.running.as_ref().expect("running").pid()
    }

    async fn kill(&mut self) {
        if let Some(running) = self.running.take() {
            running.kill().await;
        }
    }

    async fn status(&self) -> Value {
        let (code, status) = admin_get(&self.admin_url(), "/status").await;
        assert_eq!(code, StatusCode::OK, "{}: {status}", self.id);
        status
    }

    /// A flip with `body` that must be answered 200: its answer.
    async fn flip(&self, body: Value) -> Value {
        let (code, answer) = self.post("/flip", body).await;
        assert_eq!(code, StatusCode::OK, "{}: {answer}", self.id);
        answer
    }

    /// A mutating admin call; `Value::Null` sends no body (`/reload` takes none).
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let body = if body.is_null() {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::from(body.to_string())
        };
        let req = http::Request::post(format!("{}{path}", self.admin_url()))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(body))
            .expect("request");
        send_json(&http_client(), req).await
    }

    /// The colour a plain HTTP request through this replica's proxy lands on.
    async fn routes_to(&self) -> String {
        let response = get(&http_client(), &format!("http://{}/v1/status", self.proxy)).await;
        assert_eq!(response.status(), StatusCode::OK, "{}", self.id);
        color_of(&response)
    }

    fn log(&self) -> String {
        self.running.as_ref().map(Running::log).unwrap_or_default()
    }

    /// `/readyz`: its status and the error code of a 503.
    async fn readyz(&self) -> (StatusCode, Value) {
        let (code, body) = admin_get(&self.admin_url(), "/readyz").await;
        (code, body["error"].clone())
    }
}

async fn admin_get(base: &str, path: &str) -> (StatusCode, Value) {
    let req = http::Request::get(format!("{base}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    send_json(&http_client(), req).await
}

/// A running `switchyard run`; killed if the test ends without stopping it.
struct Running {
    child: Option<Child>,
    log: ChildLog,
}

impl Running {
    async fn start(config: &Path) -> Running {
        let mut command = Command::new(BIN);
        command
            .args(["run", "--config"])
            .arg(config)
            .env_remove("SWITCHYARD_ADMIN_TOKEN");
        let (child, mut log) = ChildLog::spawn(&mut command);
        let listening = log.line("switchyard is listening").await;
        let running = Running {
            child: Some(child),
            log,
        };
        assert!(
            listening.is_some(),
            "no \"listening\" line:\n{}",
            running.log()
        );
        running
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log(&self) -> String {
        self.log.text()
    }

    async fn kill(mut self) {
        reap(self.child.take().expect("running")).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen replica must be woken to die promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `switchyard ctl --admin URL --token-file F ARGS` → exit code and stderr.
async fn ctl(admin: &str, token_file: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(BIN)
            .args(["ctl", "--admin", admin, "--token-file"])
            .arg(token_file)
            .args(args)
            .env_remove("SWITCHYARD_ADMIN")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ctl finishes")
    .expect("ctl runs");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---- WebSocket streams -----------------------------------------------------------------

async fn next(ws: &mut Ws) -> Message {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(message))) => return message,
            Ok(Some(Err(e))) => panic!("the stream failed before a close frame: {e}"),
            Ok(None) => panic!("the stream ended without a close frame"),
            Err(_) => panic!("no WebSocket message in {PATIENCE:?}"),
        }
    }
}

fn json_of(message: &Message) -> Value {
    match message {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("JSON text"),
        other => panic!("expected a JSON text message, got {other:?}"),
    }
}

/// A `/v1/listen` stream through one replica.
struct Listen {
    ws: Ws,
    sent: usize,
    results: usize,
}

impl Listen {
    /// Opens the stream and returns it with the colour it was routed to.
    async fn open(proxy: &str) -> (Listen, String) {
        let url = format!("ws://{proxy}/v1/listen?encoding=linear16&sample_rate=16000");
        let (ws, response) = tokio::time::timeout(PATIENCE, connect_async(url.as_str()))
            .await
            .expect("handshake in time")
            .expect("handshake");
        let color = response
            .headers()
            .get("x-switchyard-color")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (
            Listen {
                ws,
                sent: 0,
                results: 0,
            },
            color,
        )
    }

    /// Sends one result's worth of audio and waits for its `Results`.
    async fn send_confirmed(&mut self) -> Value {
        self.ws
            .send(Message::Binary(Bytes::from(vec![0x11; RESULT_BYTES])))
            .await
            .expect("audio sent");
        self.sent += RESULT_BYTES;
        let message = json_of(&next(&mut self.ws).await);
        assert_eq!(message["type"], "Results", "{message}");
        self.results += 1;
        message
    }

    /// The drain as the client sees it: final `Results`, `Metadata` from `stub`, then 1012.
    async fn expect_drained(&mut self, stub: &str) {
        let mut messages = Vec::new();
        let close: Option<CloseFrame> = loop {
            match next(&mut self.ws).await {
                Message::Close(frame) => break frame,
                message => messages.push(json_of(&message)),
            }
        };
        assert_eq!(
            close.as_ref().map(|f| u16::from(f.code)),
            Some(1012),
            "a drain closes with 1012: {messages:?}"
        );
        let (metadata, finals) = messages.split_last().expect("Metadata before the close");
        assert_eq!(metadata["type"], "Metadata", "{metadata}");
        assert_eq!(metadata["stub"], stub, "{metadata}");
        let last = finals.last().expect("a final Results after CloseStream");
        assert_eq!(last["type"], "Results", "{last}");
        assert_eq!(last["from_finalize"], true, "{last}");
        assert_eq!(
            self.results + finals.len(),
            self.sent / RESULT_BYTES + 1,
            "nothing lost: one Results per {RESULT_BYTES} bytes plus the finalize one"
        );
    }
}

// ---- scenarios -------------------------------------------------------------------------

/// A flip through A: B and C follow within a second, in `/status` and in the colour of the
/// traffic they proxy. The replica without a `replica_id` is named host:admin-port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_flip_through_one_replica_reaches_every_replica_within_a_second() {
    let etcd = Etcd::any().await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "follow",
            default_id_for_c: true,
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let [a, b, c] = &fleet.replicas[..] else {
        unreachable!("three replicas")
    };
    let start = fleet.agreed().await;
    assert_eq!(start["active"], "blue");
    fleet.all_route_to("blue").await;
    let c_store = c.status().await["store"].clone();
    let c_id = c_store["replica_id"].as_str().expect("an id").to_owned();
    assert!(
        c_id.ends_with(&c.id[1..]) && c_id.len() > c.id.len() - 1,
        "host:admin-port, got {c_id}"
    );
    let ids: Vec<&str> = c_store["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 3, "{c_store}");
    assert!(ids.contains(&"proxy-a") && ids.contains(&"proxy-b") && ids.contains(&c_id.as_str()));

    let flipped = a.flip(json!({"to": "green", "reason": "release 7"})).await;
    let generation = flipped["generation"].as_u64().expect("generation");
    let took = fleet.converged("green", generation, FOLLOW).await;
    assert!(took <= FOLLOW, "followed in {took:?}");
    for r in [b, c] {
        assert_eq!(r.routes_to().await, "green", "{}", r.id);
        let (_, history) = admin_get(&r.admin_url(), "/history").await;
        let last = history["history"]
            .as_array()
            .and_then(|h| h.last())
            .cloned()
            .expect("history");
        assert_eq!(last["reason"], "release 7", "{}: {last}", r.id);
        assert_eq!(last["action"], "flip");
    }
    let agreed = fleet.agreed().await;
    assert_eq!(agreed["rollback_to"], "blue");

    // Back through C, followed by A and B just the same.
    let (code, rolled) = c.post("/rollback", json!({})).await;
    assert_eq!(code, StatusCode::OK, "{rolled}");
    fleet.converged("blue", generation + 1, FOLLOW).await;
    assert_eq!(a.routes_to().await, "blue");
    fleet.settled().await;
    fleet.agreed().await;
    let metrics = get(&http_client(), &format!("{}/metrics", b.admin_url())).await;
    let text = String::from_utf8_lossy(metrics.body()).into_owned();
    assert!(text.contains("switchyard_store_in_sync 1"), "{text}");
}

/// Flips through A and B at once with the same `expect_generation`: exactly one wins, the
/// other is 409 `generation_mismatch`, and all three replicas agree on the winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn concurrent_flips_through_two_replicas_one_wins() {
    let etcd = Etcd::any().await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "race",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let [a, b, _] = &fleet.replicas[..] else {
        unreachable!("three replicas")
    };
    // How the loser lost: etcd's conditioned transaction, or its own expect_generation
    // check (it had already followed the winner). Both are 409; the count is informative.
    let (mut races, mut lost_before) = (0, 0);
    for round in 0..5 {
        let before = fleet.agreed().await;
        let generation = before["generation"].as_u64().expect("generation");
        let target = if before["active"] == "blue" {
            "green"
        } else {
            "blue"
        };
        let body = |who: &str| json!({"to": target, "expect_generation": generation, "reason": format!("{who} round {round}")});
        let ((code_a, answer_a), (code_b, answer_b)) =
            tokio::join!(a.post("/flip", body("a")), b.post("/flip", body("b")));
        let (winner, loser) = match (code_a, code_b) {
            (StatusCode::OK, StatusCode::CONFLICT) => ("a", &answer_b),
            (StatusCode::CONFLICT, StatusCode::OK) => ("b", &answer_a),
            other => panic!("exactly one wins, got {other:?}: {answer_a} / {answer_b}"),
        };
        assert_eq!(loser["error"], "generation_mismatch", "{loser}");
        fleet.converged(target, generation + 1, PATIENCE).await;
        fleet.agreed().await;
        let lost: usize = fleet.replicas[..2]
            .iter()
            .map(|r| r.log().matches("lost a race").count())
            .sum();
        races += usize::from(lost > lost_before);
        lost_before = lost;
        for r in &fleet.replicas {
            let (_, history) = admin_get(&r.admin_url(), "/history").await;
            let history = history["history"].as_array().cloned().expect("history");
            let last = history.last().expect("an entry");
            assert_eq!(
                last["reason"],
                format!("{winner} round {round}"),
                "{}",
                r.id
            );
            assert_eq!(
                history
                    .iter()
                    .filter(|h| h["generation"] == generation + 1)
                    .count(),
                1,
                "one change per generation"
            );
        }
    }
    eprintln!("rounds decided by etcd's transaction rather than expect_generation: {races}");
}

/// etcd freezes: every replica keeps proxying on the last colour, changes are refused with
/// 503 `store_unavailable` within `etcd.timeout`, `/status` says out of sync. etcd thaws:
/// the replicas resync, a flip works again and all three converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn with_etcd_down_replicas_serve_the_last_state_and_refuse_changes() {
    let etcd = OwnEtcd::start().await;
    let mut fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "outage",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let flipped = fleet.replicas[0].flip(json!({"to": "green"})).await;
    let generation = flipped["generation"].as_u64().expect("generation");
    fleet.converged("green", generation, FOLLOW).await;

    signal(etcd.pid(), "-STOP");
    fleet.all_route_to("green").await;
    for r in &fleet.replicas[..2] {
        let asked = Instant::now();
        let (code, refused) = r.post("/flip", json!({"to": "blue"})).await;
        let took = asked.elapsed();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{}: {refused}", r.id);
        assert_eq!(refused["error"], "store_unavailable", "{refused}");
        assert!(
            took < ETCD_TIMEOUT + Duration::from_millis(1500),
            "refused in {took:?}"
        );
    }
    // Changes asked for together wait for the single writer one behind the other; each is
    // still answered within etcd.timeout of its asking, not one timeout after another.
    let a = &fleet.replicas[0];
    let asked = Instant::now();
    let answers = futures_util::future::join_all(
        (0..4).map(|_| a.post("/flip", json!({"to": "blue", "reason": "together"}))),
    )
    .await;
    let took = asked.elapsed();
    for (code, refused) in &answers {
        assert_eq!(*code, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
        assert_eq!(refused["error"], "store_unavailable", "{refused}");
    }
    assert!(
        took < ETCD_TIMEOUT + Duration::from_millis(1500),
        "four changes asked together were all refused only after {took:?}"
    );
    // A request wrong in itself is told so, etcd or not.
    let long = "r".repeat(switchyard::control::MAX_REASON + 1);
    for (path, body) in [
        ("/flip", json!({"to": "blue", "reason": long})),
        ("/rollback", json!({"to": "blue"})),
    ] {
        let (code, refused) = a.post(path, body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {refused}");
        assert_eq!(refused["error"], "bad_request", "{path}: {refused}");
    }
    // So is an `expect_generation` older than one this replica applied (generations only
    // grow); the one it holds may still be stale in etcd, which it cannot tell.
    let (code, refused) = a
        .post(
            "/flip",
            json!({"to": "blue", "expect_generation": generation - 1}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"], "generation_mismatch", "{refused}");
    assert_eq!(refused["generation"], generation, "{refused}");
    let (code, refused) = a
        .post(
            "/flip",
            json!({"to": "blue", "expect_generation": generation}),
        )
        .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"], "store_unavailable", "{refused}");
    let log = a.log();
    assert!(
        log.contains("could not read the route from etcd"),
        "a refusal for want of etcd is logged: {log}"
    );
    for r in &fleet.replicas {
        until(&format!("{} out of sync", r.id), PATIENCE, || async {
            r.status().await["store"]["in_sync"] == false
        })
        .await;
        let status = r.status().await;
        assert_eq!(status["active"], "green", "{}: {status}", r.id);
        assert_eq!(r.routes_to().await, "green", "{} keeps serving", r.id);
    }

    signal(etcd.pid(), "-CONT");
    for r in &fleet.replicas {
        until(&format!("{} back in sync", r.id), PATIENCE, || async {
            r.status().await["store"]["in_sync"] == true
        })
        .await;
    }
    // A refused write may still have reached etcd before it froze; it is conditioned, so
    // either it landed for everyone or not at all. Either way they agree, once the watch
    // has brought it (etcd may commit it just after a replica re-read the key).
    let revisions = || async {
        let mut seen = Vec::new();
        for r in &fleet.replicas {
            seen.push(r.status().await["store"]["revision"].clone());
        }
        seen
    };
    until("every replica at one revision", PATIENCE, || async {
        revisions().await.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    // A write refused during the outage may also land only now, after the replicas
    // agreed (etcd held it when it froze): a flip then loses to it with 409
    // generation_mismatch, as any change racing another does, and is asked again once
    // every replica follows what landed.
    let mut lost = 0;
    let (target, generation) = loop {
        let now = fleet.agreed().await;
        let generation = now["generation"].as_u64().expect("generation");
        let target = if now["active"] == "green" {
            "blue"
        } else {
            "green"
        };
        let (code, answer) = fleet.replicas[1].post("/flip", json!({"to": target})).await;
        if code == StatusCode::OK {
            break (target, generation);
        }
        assert_eq!(code, StatusCode::CONFLICT, "{answer}");
        assert_eq!(answer["error"], "generation_mismatch", "{answer}");
        lost += 1;
        assert!(lost < 3, "lost to late writes {lost} times: {answer}");
        let landed = answer["generation"]
            .as_u64()
            .expect("the generation that landed");
        for r in &fleet.replicas {
            until(
                &format!("{} follows the late write", r.id),
                PATIENCE,
                || async { r.status().await["generation"].as_u64() >= Some(landed) },
            )
            .await;
        }
    };
    fleet.converged(target, generation + 1, FOLLOW).await;
    fleet.agreed().await;
    fleet.all_route_to(target).await;
    fleet.stop().await;
}

/// With etcd down, a replica restarted starts on the colour in its state file, serves it,
/// refuses changes until etcd is back, then follows etcd again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_replica_restarted_while_etcd_is_down_starts_from_its_state_file() {
    let mut etcd = OwnEtcd::start().await;
    let mut fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "restart",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let flipped = fleet.replicas[0]
        .flip(json!({"to": "green", "reason": "before the outage"}))
        .await;
    let generation = flipped["generation"].as_u64().expect("generation");
    fleet.converged("green", generation, FOLLOW).await;
    let before = fleet.agreed().await;

    etcd.kill().await;
    let c = &mut fleet.replicas[2];
    c.kill().await;
    c.run().await;
    let status = c.status().await;
    assert_eq!(status["active"], "green", "from the state file: {status}");
    assert_eq!(status["generation"], generation, "{status}");
    assert_eq!(status["changed_at"], before["changed_at"], "{status}");
    assert_eq!(status["store"]["in_sync"], false, "{status}");
    assert_eq!(c.routes_to().await, "green");
    assert_eq!(
        c.readyz().await.0,
        StatusCode::OK,
        "the last state it saw is no guess"
    );
    assert!(
        c.log().contains("etcd is unreachable at start"),
        "{}",
        c.log()
    );
    let (code, refused) = c.post("/flip", json!({"to": "blue"})).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"], "store_unavailable", "{refused}");

    etcd.run().await;
    fleet.settled().await;
    let now = fleet.agreed().await;
    assert_eq!(now["active"], "green");
    assert_eq!(
        now["generation"], generation,
        "nothing changed while etcd was away"
    );
    let c = &fleet.replicas[2];
    c.flip(json!({"to": "blue"})).await;
    fleet.converged("blue", generation + 1, FOLLOW).await;
    fleet.agreed().await;
    fleet.stop().await;
}

/// etcd restored from a backup holds an older history than the one the replicas followed,
/// and an older route state. Generations only grow (drains and request cuts count on it),
/// and a restore must not move traffic: the replicas write the newest state they applied
/// back, follow it, and take the next change. Before, each kept its state but ignored
/// everything etcd held (its revision ahead of etcd's), answered every change 409 and
/// still said it was in sync; adopting the backup instead would have taken the generation
/// back, and with it cut every request on the active colour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn replicas_write_their_state_back_to_etcd_restored_from_an_older_backup() {
    let mut r = Restorable::flipped_after_a_backup("restore").await;
    let (fleet, generation) = (&r.fleet, r.generation);
    let before = fleet.agreed().await;
    r.restore().await;
    let fleet = &mut r.fleet;
    let client = etcd_client::Client::connect([r.etcd.endpoint()], None)
        .await
        .expect("an etcd client");
    until("etcd to hold the newest state again", PATIENCE, || {
        let mut client = client.clone();
        let key = fleet.key.clone();
        async move {
            let got = client.get(key, None).await.expect("get");
            let state: Value = serde_json::from_slice(got.kvs()[0].value()).expect("json");
            state["generation"] == generation + 1
        }
    })
    .await;
    fleet.settled().await;
    let now = fleet.agreed().await;
    assert_eq!(now["active"], "green", "{now}");
    assert_eq!(now["generation"], generation + 1, "{now}");
    assert_eq!(now["changed_at"], before["changed_at"], "{now}");
    fleet.all_route_to("green").await;
    assert!(
        fleet.replicas.iter().any(|r| r
            .log()
            .contains("older route state than this replica applied")),
        "one of them wrote it back"
    );

    fleet.replicas[1]
        .flip(json!({"to": "blue", "drain_timeout": "0s"}))
        .await;
    fleet.converged("blue", generation + 2, FOLLOW).await;
    fleet.agreed().await;
    fleet.all_route_to("blue").await;
    fleet.stop().await;
}

/// The same restore with every replica stopped across it: each starts with a state file
/// newer than what etcd holds, starts from it, and writes it back; before, each took the
/// backup's older state and wrote it over its own state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn replicas_restarted_over_a_restore_keep_the_newest_state() {
    let mut r = Restorable::flipped_after_a_backup("restart-restore").await;
    let generation = r.generation;
    r.fleet.stop().await;
    r.restore().await;
    let fleet = &mut r.fleet;
    for replica in &mut fleet.replicas {
        replica.run().await;
    }
    fleet.settled().await;
    fleet.converged("green", generation + 1, PATIENCE).await;
    let now = fleet.agreed().await;
    assert_eq!(now["active"], "green", "{now}");
    fleet.all_route_to("green").await;
    fleet.replicas[2].flip(json!({"to": "blue"})).await;
    fleet.converged("blue", generation + 2, FOLLOW).await;
    fleet.stop().await;
}

/// A restore after which the key is written once more and lands on the very revision a
/// replica followed, with another state: not below it, so not seen as a history gone back,
/// and not after it, so not news by number. The replica compares the state there with its
/// own, writes its newer one back, and stays in sync with etcd. Before, it ignored that
/// state and said it was in sync while etcd held another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn another_state_at_the_revision_followed_is_news() {
    let mut r = Restorable::flipped_after_a_backup("same-revision").await;
    let generation = r.generation;
    // One replica, frozen across the restore, so that it reads the key again only after
    // the write that lands on its revision.
    for replica in &mut r.fleet.replicas[1..] {
        replica.kill().await;
    }
    let a_pid = r.fleet.replicas[0].pid();
    let followed = r.fleet.replicas[0].status().await["store"]["revision"]
        .as_i64()
        .expect("revision");
    signal(a_pid, "-STOP");
    r.restore().await;
    let mut client = etcd_client::Client::connect([r.etcd.endpoint()], None)
        .await
        .expect("an etcd client");
    let got = client.get(r.fleet.key.as_str(), None).await.expect("get");
    let backed_up = got.kvs()[0].value().to_vec();
    let filler = format!("{}-filler", r.fleet.key);
    let mut revision = got.header().expect("a header").revision();
    assert!(revision < followed, "{revision} {followed}");
    while revision + 1 < followed {
        let put = client.put(filler.as_str(), "x", None).await.expect("put");
        revision = put.header().expect("a header").revision();
    }
    let put = client
        .put(r.fleet.key.as_str(), backed_up, None)
        .await
        .expect("put");
    assert_eq!(put.header().expect("a header").revision(), followed);
    signal(a_pid, "-CONT");
    let a = &r.fleet.replicas[0];

    let key = r.fleet.key.clone();
    until("etcd to hold the replica's state again", PATIENCE, || {
        let mut client = client.clone();
        let key = key.clone();
        async move {
            let got = client.get(key, None).await.expect("get");
            let state: Value = serde_json::from_slice(got.kvs()[0].value()).expect("json");
            state["generation"] == generation + 1
        }
    })
    .await;
    until("the replica in sync", PATIENCE, || async {
        a.status().await["store"]["in_sync"] == true
    })
    .await;
    let status = a.status().await;
    assert_eq!(status["active"], "green", "{status}");
    assert_eq!(status["generation"], generation + 1, "{status}");
    r.fleet.stop().await;
}

/// Changes in quick succession through one replica: the watch brings each one back after
/// the next has been stored, an older state at an older revision. That is no restore: no
/// replica writes anything back or warns of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn quick_changes_are_not_taken_for_a_restore() {
    let etcd = Etcd::any().await;
    let mut fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "quick",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let a = &fleet.replicas[0];
    for _ in 0..3 {
        let (flip, back, commit) = tokio::join!(
            a.post("/flip", json!({"to": "green"})),
            a.post("/flip", json!({"to": "blue"})),
            a.post("/commit", Value::Null),
        );
        for (code, answer) in [flip, back, commit] {
            assert_eq!(code, StatusCode::OK, "{answer}");
        }
    }
    let generation = a.status().await["generation"].as_u64().expect("generation");
    let active = a.status().await["active"]
        .as_str()
        .expect("active")
        .to_owned();
    fleet.converged(&active, generation, FOLLOW).await;
    fleet.agreed().await;
    for r in &fleet.replicas {
        assert!(
            !r.log().contains("older route state"),
            "{}: {}",
            r.id,
            r.log()
        );
    }
    fleet.stop().await;
}

/// A fleet on its own etcd, backed up at blue (the returned generation), then flipped to
/// green (blue's requests cut at once): the backup is older than what the fleet applied.
/// `restore` puts the backup back (etcd stopped).
struct Restorable {
    etcd: OwnEtcd,
    fleet: Fleet,
    generation: u64,
    data: PathBuf,
    backup: PathBuf,
}

impl Restorable {
    async fn flipped_after_a_backup(scenario: &'static str) -> Restorable {
        let mut etcd = OwnEtcd::start().await;
        let fleet = Fleet::start(
            &etcd.endpoint(),
            FleetOptions {
                scenario,
                ..Default::default()
            },
        )
        .await;
        fleet.settled().await;
        let backed_up = fleet.agreed().await;
        assert_eq!(backed_up["active"], "blue", "{backed_up}");
        let generation = backed_up["generation"].as_u64().expect("generation");
        etcd.kill().await;
        let data = etcd.data.path().join("data");
        let backup = etcd.data.path().join("backup");
        copy_dir(&data, &backup);
        etcd.run().await;
        fleet.settled().await;
        // Blue's requests are cut at once: a table that went back to `generation` would
        // have all of blue's new requests cut too.
        fleet.replicas[0]
            .flip(json!({"to": "green", "drain_timeout": "0s"}))
            .await;
        fleet.converged("green", generation + 1, FOLLOW).await;
        Restorable {
            etcd,
            fleet,
            generation,
            data,
            backup,
        }
    }

    /// etcd stopped, its data directory replaced by the backup, started again.
    async fn restore(&mut self) {
        self.etcd.kill().await;
        std::fs::remove_dir_all(&self.data).expect("the data directory goes");
        copy_dir(&self.backup, &self.data);
        self.etcd.run().await;
    }
}

/// `cp -a`: etcd's data directory as a backup tool would copy it, etcd stopped.
fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// A key that holds no valid route state (a bad hand edit): the replicas running keep
/// serving and say why they are out of sync; one restarted then starts from its state file,
/// as it would with etcd down, instead of refusing to start; changes are refused until a
/// valid state is back, and then every replica follows it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_replica_restarted_while_the_key_is_invalid_starts_from_its_state_file() {
    let etcd = Etcd::any().await;
    let mut fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "invalid",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let flipped = fleet.replicas[0].flip(json!({"to": "green"})).await;
    let generation = flipped["generation"].as_u64().expect("generation");
    fleet.converged("green", generation, FOLLOW).await;

    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("an etcd client");
    let valid = client.get(fleet.key.as_str(), None).await.expect("get");
    let valid = valid.kvs().first().expect("the key").value().to_vec();
    client
        .put(fleet.key.as_str(), "this is not json", None)
        .await
        .expect("put");
    let invalid = |status: &Value| {
        status["store"]["in_sync"] == false
            && status["store"]["problem"]
                .as_str()
                .is_some_and(|p| p.contains("not a valid route state"))
    };
    for r in &fleet.replicas {
        until(
            &format!("{} to name the invalid key", r.id),
            PATIENCE,
            || async { invalid(&r.status().await) },
        )
        .await;
    }

    let c = &mut fleet.replicas[2];
    c.kill().await;
    c.run().await;
    let status = c.status().await;
    assert!(invalid(&status), "{status}");
    assert_eq!(status["active"], "green", "from the state file: {status}");
    assert_eq!(status["generation"], generation, "{status}");
    assert_eq!(c.routes_to().await, "green");
    assert_eq!(
        c.readyz().await.0,
        StatusCode::OK,
        "its state file is no guess"
    );
    let (code, refused) = c.post("/flip", json!({"to": "blue"})).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"], "store_unavailable", "{refused}");

    client
        .put(fleet.key.as_str(), valid, None)
        .await
        .expect("put");
    fleet.settled().await;
    for r in &fleet.replicas {
        let status = r.status().await;
        assert_eq!(
            status["store"]["problem"],
            Value::Null,
            "{}: {status}",
            r.id
        );
    }
    let c = &fleet.replicas[2];
    c.flip(json!({"to": "blue"})).await;
    fleet.converged("blue", generation + 1, FOLLOW).await;
    fleet.agreed().await;
    fleet.stop().await;
}

/// A change that waits behind a slow one that etcd did answer (a reload probing an upstream
/// it adds, for up to `health.timeout`, longer than `etcd.timeout` here) is not refused:
/// only a write etcd failed refuses the changes queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_flip_queued_behind_a_slow_reload_goes_through() {
    let etcd = Etcd::any().await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "queued",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let probed = Arc::new(tokio::sync::Notify::new());
    let probing = probed.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
            probing.notify_one();
        }
    });
    let a = &fleet.replicas[0];
    let config = std::fs::read_to_string(a.config()).expect("config");
    let blue = fleet.blue.url();
    let edited = config
        .replace(
            &format!("blue = [\"{blue}\"]"),
            &format!("blue = [\"{blue}\", \"http://{hung_addr}\"]"),
        )
        .replace("fall = 1", "fall = 1\ntimeout = \"2s\"");
    assert_ne!(edited, config);
    std::fs::write(a.config(), edited).expect("config");
    let reload = {
        let admin = a.admin_url();
        tokio::spawn(async move {
            let req = http::Request::post(format!("{admin}/reload"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            send_json(&http_client(), req).await
        })
    };
    within_patience("the reload to probe the new upstream", probed.notified()).await;
    a.flip(json!({"to": "green"})).await;
    let (code, reloaded) = reload.await.expect("the reload's task");
    assert_eq!(code, StatusCode::OK, "{reloaded}");
    holder.abort();
}

/// Two live replicas with one `replica_id` (a config file shared by every pod, with the
/// id in it) overwrite each other's record, and `wait_replicas` cannot tell them apart:
/// each warns that another replica records itself under its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_replica_id_used_twice_is_warned_about() {
    let etcd = Etcd::any().await;
    let mut fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "twins",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let b = &mut fleet.replicas[1];
    b.kill().await;
    let config = std::fs::read_to_string(b.config()).expect("config");
    assert!(config.contains("replica_id = \"proxy-b\""), "{config}");
    std::fs::write(
        b.config(),
        config.replace("replica_id = \"proxy-b\"", "replica_id = \"proxy-a\""),
    )
    .expect("config");
    b.run().await;
    let warning = "another replica records itself under this replica's id";
    let a = &fleet.replicas[0];
    until("proxy-a to warn", PATIENCE, || async {
        a.log().contains(warning)
    })
    .await;
    // A change makes the second one write its record again, under its own lease.
    a.flip(json!({"to": "green"})).await;
    let b = &fleet.replicas[1];
    until("the second proxy-a to warn", PATIENCE, || async {
        b.log().contains(warning)
    })
    .await;
    assert!(!fleet.replicas[2].log().contains(warning));
    fleet.stop().await;
}

/// A first start while etcd is down: the replica starts on `routing.initial` and writes
/// the key when etcd is back. A later first start (with another `initial`) while etcd is
/// down finds the key written by then, and follows it instead of writing its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_first_start_while_etcd_is_down_writes_the_key_only_if_still_missing() {
    let mut etcd = OwnEtcd::start().await;
    etcd.kill().await;
    let mut fleet = Fleet::new(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "first",
            initial_for_c: "green",
            ..Default::default()
        },
    )
    .await;
    fleet.replicas[0].run().await;
    let a = fleet.replicas[0].status().await;
    assert_eq!(a["active"], "blue", "{a}");
    assert_eq!(a["generation"], 1, "{a}");
    assert_eq!(a["store"]["in_sync"], false, "{a}");
    assert_eq!(fleet.replicas[0].routes_to().await, "blue");
    // Its state is a guess until etcd answers: it serves it, but says it is not ready,
    // also after a restart before etcd is back (the guess is no state file).
    let unknown = (
        StatusCode::SERVICE_UNAVAILABLE,
        json!("route_state_unknown"),
    );
    assert_eq!(fleet.replicas[0].readyz().await, unknown);
    fleet.replicas[0].kill().await;
    fleet.replicas[0].run().await;
    assert_eq!(fleet.replicas[0].readyz().await, unknown, "after a restart");

    etcd.run().await;
    until("A to write the missing key", PATIENCE, || async {
        let store = fleet.replicas[0].status().await["store"].clone();
        store["in_sync"] == true && store["revision"].as_i64() > Some(0)
    })
    .await;
    let written = fleet.replicas[0].status().await;
    assert_eq!(written["generation"], 1, "no new generation for writing it");
    assert_eq!(fleet.replicas[0].readyz().await.0, StatusCode::OK);

    etcd.kill().await;
    fleet.replicas[2].run().await;
    let c = fleet.replicas[2].status().await;
    assert_eq!(c["active"], "green", "its own first start: {c}");
    assert_eq!(fleet.replicas[2].routes_to().await, "green");
    assert_eq!(
        fleet.replicas[2].readyz().await,
        unknown,
        "green is a guess"
    );

    etcd.run().await;
    until("C to follow the key it found", PATIENCE, || async {
        let c = fleet.replicas[2].status().await;
        c["store"]["in_sync"] == true && c["active"] == "blue"
    })
    .await;
    assert_eq!(fleet.replicas[2].routes_to().await, "blue");
    assert_eq!(fleet.replicas[2].readyz().await.0, StatusCode::OK);
    fleet.replicas[1].run().await;
    fleet.settled().await;
    let agreed = fleet.agreed().await;
    assert_eq!(agreed["active"], "blue");
    assert_eq!(agreed["generation"], 1);
    assert_eq!(
        agreed["changed_at"], written["changed_at"],
        "A's start, not C's"
    );
    fleet.stop().await;
}

/// A TCP relay to etcd that passes requests on and can hold etcd's answers back (a write
/// is committed while the client, seeing no answer, gives up on it), or cut the client off:
/// every connection through it closed, and new ones closed as they come, until restored.
struct Relay {
    endpoint: String,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
    /// Whether connections are let through (not cut).
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Relay {
    async fn start(etcd: &str) -> Relay {
        let target = etcd.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let hold = Arc::new(tokio::sync::watch::Sender::new(false));
        let open = Arc::new(tokio::sync::watch::Sender::new(true));
        let (holding, opened) = (hold.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut cut = opened.subscribe();
                if !*cut.borrow_and_update() {
                    continue;
                }
                let Ok(etcd) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut etcd_read, mut etcd_write) = etcd.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut etcd_write).await;
                });
                let mut held = holding.subscribe();
                let down = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n @ 1..) = etcd_read.read(&mut buf).await {
                        let released = held.wait_for(|hold| !*hold).await.is_ok();
                        if !released || client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                // Cut: both halves dropped, so both sockets close.
                tokio::spawn(async move {
                    let _ = cut.wait_for(|open| !*open).await;
                    up.abort();
                    down.abort();
                });
            }
        });
        Relay {
            endpoint,
            hold,
            open,
        }
    }

    fn hold(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }
}

/// A reload refused with 503 because etcd did not answer in time may still be committed
/// (the write reached etcd; its answer did not come back). The history then says the
/// reload happened, so the replica must run the config it read for it, not the one
/// before. A relay holds etcd's answers back to make that happen every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_reload_etcd_commits_after_it_was_refused_applies_on_its_replica() {
    let etcd = Etcd::any().await;
    let relay = Relay::start(&etcd.endpoint()).await;
    let mut fleet = Fleet::new(
        &relay.endpoint,
        FleetOptions {
            scenario: "late-reload",
            ..Default::default()
        },
    )
    .await;
    fleet.replicas[0].run().await;
    let a = &fleet.replicas[0];
    let in_sync = || async { a.status().await["store"]["in_sync"] == true };
    until("A in sync", PATIENCE, in_sync).await;
    let config = std::fs::read_to_string(a.config()).expect("config");
    let one = format!("blue = [\"{}\"]", fleet.blue.url());
    let two = format!(
        "blue = [\"{}\", \"{}\"]",
        fleet.blue.url(),
        fleet.green.url()
    );
    assert!(config.contains(&one));
    let blue_upstreams = |status: &Value| {
        status["colors"]["blue"]["upstreams"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    };
    // Add an upstream to blue, then take it away again, this time with the operator trying
    // again while etcd still does not answer: the first try lands, the second (conditioned
    // on the same revision) cannot, and the config both read applies.
    for (text, wants, tries) in [(config.replace(&one, &two), 2, 1), (config.clone(), 1, 2)] {
        std::fs::write(a.config(), text).expect("config");
        let before = a.status().await["generation"].as_u64().expect("generation");
        relay.hold(true);
        for _ in 0..tries {
            let (code, refused) = a.post("/reload", Value::Null).await;
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
            assert_eq!(refused["error"], "store_unavailable", "{refused}");
        }
        relay.hold(false);
        until(
            "A to follow the reload etcd committed",
            PATIENCE,
            || async {
                let status = a.status().await;
                status["store"]["in_sync"] == true && status["generation"] == before + 1
            },
        )
        .await;
        let (_, history) = admin_get(&a.admin_url(), "/history").await;
        let last = history["history"]
            .as_array()
            .and_then(|h| h.last())
            .cloned()
            .unwrap_or_default();
        assert_eq!(last["action"], "reload", "{history}");
        let status = a.status().await;
        assert_eq!(
            blue_upstreams(&status),
            wants,
            "the history has the reload, so its config applies: {status}"
        );
    }
}

/// Streams open on blue through every replica; a flip through A alone. Each replica drains
/// its own streams at its own `drain.timeout` from when it applied the flip: the finals,
/// `Metadata`, then 1012. New streams land on green everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn every_replica_drains_its_own_streams_after_a_flip_through_one() {
    let etcd = Etcd::any().await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "drain",
            drain_timeout: "3s",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let mut streams = Vec::new();
    for r in &fleet.replicas {
        for _ in 0..2 {
            let (mut stream, color) = Listen::open(&r.proxy).await;
            assert_eq!(color, "blue", "{}", r.id);
            stream.send_confirmed().await;
            streams.push(stream);
        }
    }
    let flipped = fleet.replicas[0].flip(json!({"to": "green"})).await;
    let generation = flipped["generation"].as_u64().expect("generation");
    fleet.converged("green", generation, FOLLOW).await;
    for r in &fleet.replicas {
        let status = r.status().await;
        assert_eq!(
            status["colors"]["blue"]["state"], "draining",
            "{}: {status}",
            r.id
        );
        assert_eq!(status["colors"]["blue"]["open_streams"], 2, "{status}");
        assert!(
            status["colors"]["blue"]["drain_deadline"].is_string(),
            "{status}"
        );
        let (mut fresh, color) = Listen::open(&r.proxy).await;
        assert_eq!(color, "green", "{}", r.id);
        fresh.send_confirmed().await;
    }
    // Before the deadline the old streams still transcribe on blue.
    for stream in &mut streams {
        let result = stream.send_confirmed().await;
        let transcript = result["channel"]["alternatives"][0]["transcript"]
            .as_str()
            .expect("a transcript");
        assert!(transcript.starts_with("blue "), "{result}");
    }
    let drained =
        futures_util::future::join_all(streams.iter_mut().map(|s| s.expect_drained("blue")));
    tokio::time::timeout(PATIENCE, drained)
        .await
        .expect("every stream drained in time");
    assert_eq!(fleet.blue.state.close_streams(), 6);
    for r in &fleet.replicas {
        until(&format!("{} blue empty", r.id), PATIENCE, || async {
            r.status().await["colors"]["blue"]["open_streams"] == 0
        })
        .await;
    }
    assert_eq!(fleet.green.state.close_streams(), 0);
}

/// The mechanism under the race above, without its timing: two replicas' stores read the
/// same revision, then both write a change conditioned on it. etcd's transaction lets
/// exactly one in; the other is told what won.
#[tokio::test]
#[ignore = "needs etcd"]
async fn the_conditioned_write_lets_exactly_one_of_two_writers_in() {
    use std::time::SystemTime;
    use switchyard::config::Config;
    use switchyard::metrics::Metrics;
    use switchyard::state::{Action, RouteState};
    use switchyard::store::{Saved, Store};
    use switchyard::upstream::Color;

    let etcd = Etcd::any().await;
    let fleet = Fleet::new(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "txn",
            ..Default::default()
        },
    )
    .await;
    let mut stores = Vec::new();
    for replica in &fleet.replicas[..2] {
        let config = Config::load(&replica.dir.join("switchyard.toml")).expect("config");
        let (store, _) = Store::open(&config, &Metrics::new(), 0)
            .await
            .expect("store");
        stores.push(store);
    }
    let [a, b] = &mut stores[..] else {
        unreachable!("two stores")
    };
    let first = || RouteState::first_start(Color::Blue, SystemTime::now());
    let (base, first_start) = a.load(first).await.expect("a loads");
    assert!(first_start, "a fresh key");
    let (seen_by_b, _) = b.load(first).await.expect("b loads");
    assert_eq!(seen_by_b, base, "b follows what a stored");
    let change = |who: &str| {
        base.next(
            Action::Flip,
            Color::Green,
            Some(Color::Blue),
            SystemTime::now(),
            Some(who.to_owned()),
        )
    };
    let (change_a, change_b) = (change("a"), change("b"));
    let (saved_a, saved_b) = tokio::join!(a.save(&change_a), b.save(&change_b));
    let (won, lost_to) = match (saved_a.expect("a's write"), saved_b.expect("b's write")) {
        (Saved::Done, Saved::Conflict(seen)) => (&change_a, seen),
        (Saved::Conflict(seen), Saved::Done) => (&change_b, seen),
        _ => panic!("exactly one write goes in"),
    };
    assert_eq!(
        lost_to.state.as_ref(),
        Some(won),
        "the loser is told what won"
    );
}

/// A flip through A that names its own `drain_timeout` drains every replica's streams with
/// it, not with each replica's configured `drain.timeout` (30 minutes here), and the
/// history shows what the flip asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_flips_own_drain_timeout_applies_on_every_replica() {
    let etcd = Etcd::any().await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "drain-timeout",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let mut streams = Vec::new();
    for r in &fleet.replicas {
        let (mut stream, color) = Listen::open(&r.proxy).await;
        assert_eq!(color, "blue", "{}", r.id);
        stream.send_confirmed().await;
        streams.push(stream);
    }
    let flipped = fleet.replicas[0]
        .flip(json!({"to": "green", "drain_timeout": "0s"}))
        .await;
    let generation = flipped["generation"].as_u64().expect("generation");
    fleet.converged("green", generation, FOLLOW).await;
    // With the configured 30 minutes these would not end within PATIENCE.
    let drained =
        futures_util::future::join_all(streams.iter_mut().map(|s| s.expect_drained("blue")));
    tokio::time::timeout(PATIENCE, drained)
        .await
        .expect("every replica drained at once");
    assert_eq!(fleet.blue.state.close_streams(), 3);
    for r in &fleet.replicas {
        let (status, history) = admin_get(&r.admin_url(), "/history").await;
        assert_eq!(status, StatusCode::OK, "{history}");
        let last = history
            .as_array()
            .and_then(|h| h.last())
            .or_else(|| history["history"].as_array().and_then(|h| h.last()))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(last["generation"], generation, "{}: {history}", r.id);
        assert_eq!(last["drain_timeout"], "0s", "{}: {last}", r.id);
    }
}

/// `wait_replicas`: a flip answers once all three applied it. One replica frozen: 504
/// `replicas_lagging` naming it; once its lease runs out it leaves the list and flips wait
/// only for the live ones; woken, it catches up and is listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn wait_replicas_answers_when_every_live_replica_applied_the_flip() {
    let etcd = Etcd::any().await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "ack",
            lease_ttl: "2s",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let [a, b, c] = &fleet.replicas[..] else {
        unreachable!("three replicas")
    };
    let generations = |status: &Value| -> Vec<(String, u64)> {
        status["store"]["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().expect("id").to_owned(),
                    r["generation"].as_u64().expect("generation"),
                )
            })
            .collect()
    };

    let flipped = a.flip(json!({"to": "green", "wait_replicas": "10s"})).await;
    let generation = flipped["generation"].as_u64().expect("generation");
    let listed = generations(&a.status().await);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|(_, g)| *g == generation), "{listed:?}");
    for r in [b, c] {
        assert_eq!(
            r.status().await["generation"],
            generation,
            "{} applied it",
            r.id
        );
    }

    // The same through ctl: exit 0 once every replica applied it.
    let (code, out, err) = ctl(
        &b.admin_url(),
        &fleet.token_file(),
        &["rollback", "--wait-all"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let generation = generation + 1;
    assert!(
        generations(&b.status().await)
            .iter()
            .all(|(_, g)| *g == generation)
    );

    signal(c.pid(), "-STOP");
    // Well inside the 2 s lease: C is still listed when the wait runs out.
    let (code, lagging) = a
        .post("/flip", json!({"to": "green", "wait_replicas": "700ms"}))
        .await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT, "{lagging}");
    assert_eq!(lagging["error"], "replicas_lagging", "{lagging}");
    assert_eq!(lagging["lagging"], json!(["proxy-c"]), "{lagging}");
    let generation = generation + 1;
    assert_eq!(lagging["generation"], generation, "{lagging}");
    assert_eq!(
        b.status().await["generation"],
        generation,
        "the flip stands"
    );
    // The replica that answers applied the change before it answered, whether or not its
    // own record has reached etcd yet.
    let (code, lagging) = b
        .post("/flip", json!({"to": "blue", "wait_replicas": "1ms"}))
        .await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT, "{lagging}");
    let listed = lagging["lagging"].as_array().expect("lagging");
    assert!(listed.contains(&json!("proxy-c")), "{lagging}");
    assert!(!listed.contains(&json!("proxy-b")), "{lagging}");
    let generation = generation + 1;

    until("C's lease to run out", PATIENCE, || async {
        generations(&a.status().await)
            .iter()
            .all(|(id, _)| id != "proxy-c")
    })
    .await;
    assert_eq!(generations(&b.status().await).len(), 2);
    let (code, out, err) = ctl(
        &a.admin_url(),
        &fleet.token_file(),
        &["flip", "--to", "green", "--wait-all=5s"],
    )
    .await;
    assert_eq!(code, 0, "only live replicas are waited for: {out}{err}");
    let generation = generation + 1;

    signal(c.pid(), "-CONT");
    until("C to catch up and register again", PATIENCE, || async {
        generations(&a.status().await).contains(&("proxy-c".to_owned(), generation))
    })
    .await;
    let status = c.status().await;
    assert_eq!(status["active"], "green", "{status}");
    assert_eq!(status["generation"], generation, "{status}");
    fleet.settled().await;
    fleet.agreed().await;
}

/// A replica's table trails etcd by its watch. B, cut off from etcd while a flip goes
/// through A, is asked to commit: from its own table there is nothing to commit (200,
/// "changed": false, and the flip never committed). It asks etcd first, so it refuses
/// with 503 while it cannot, and once back it commits the flip it had not seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_replica_behind_etcd_decides_a_change_on_what_etcd_holds() {
    let etcd = Etcd::any().await;
    let relay = Relay::start(&etcd.endpoint()).await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "behind",
            etcd_for_b: Some(vec![relay.endpoint.clone()]),
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    relay.cut();
    let flipped = a.flip(json!({"to": "green"})).await;
    let generation = flipped["generation"].as_u64().expect("generation");
    assert_eq!(
        b.status().await["active"],
        "blue",
        "B has not seen the flip"
    );
    let (status, body) = b.post("/commit", json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    relay.restore();
    until("B back in sync", PATIENCE, || async {
        b.status().await["store"]["in_sync"] == true
    })
    .await;
    let (status, committed) = b.post("/commit", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{committed}");
    assert_eq!(committed["changed"], true, "{committed}");
    assert_eq!(committed["generation"], generation + 1, "{committed}");
    assert_eq!(committed["active"], "green", "{committed}");
    assert_eq!(committed["rollback_to"], Value::Null, "{committed}");
    fleet.converged("green", generation + 1, FOLLOW).await;
}

/// B, cut off from etcd, misses a flip with `drain_timeout` "1s" and the commit after it;
/// back, it reads only the commit's state. Its blue stream still drains at the flip's
/// drain timeout (from when B applied it), not at B's own `drain.timeout` of 30 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_replica_that_missed_a_flip_drains_at_the_flips_drain_timeout() {
    let etcd = Etcd::any().await;
    let relay = Relay::start(&etcd.endpoint()).await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "missed-flip",
            drain_timeout: "30m",
            etcd_for_b: Some(vec![relay.endpoint.clone()]),
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    let (mut stream, color) = Listen::open(&b.proxy).await;
    assert_eq!(color, "blue");
    stream.send_confirmed().await;
    relay.cut();
    let flipped = a.flip(json!({"to": "green", "drain_timeout": "1s"})).await;
    let generation = flipped["generation"].as_u64().expect("generation");
    let (status, body) = a.post("/commit", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(b.status().await["active"], "blue", "B has seen neither");
    relay.restore();
    fleet.converged("green", generation + 1, PATIENCE).await;
    let status = b.status().await;
    let deadline = status["colors"]["blue"]["drain_deadline"]
        .as_str()
        .expect("blue drains on B");
    let deadline = humantime::parse_rfc3339(deadline).expect("RFC 3339");
    assert!(
        deadline < std::time::SystemTime::now() + Duration::from_secs(60),
        "the flip's 1 s, not drain.timeout's 30 min: {status}"
    );
    tokio::time::timeout(PATIENCE, stream.expect_drained("blue"))
        .await
        .expect("drained at the flip's drain_timeout");
}

/// An etcd cluster with a member down still takes every change: B lists a member that
/// refuses connections first and the live one second, and the client sends some calls
/// to the dead one. A call that could not be sent goes again, within `etcd.timeout`,
/// instead of refusing the change with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_member_down_refuses_no_change() {
    let etcd = Etcd::any().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "member-down",
            etcd_for_b: Some(vec![dead, etcd.endpoint()]),
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let b = &fleet.replicas[1];
    let mut generation = b.status().await["generation"].as_u64().expect("generation");
    for to in ["green", "blue"].into_iter().cycle().take(20) {
        let (code, answer) = b.post("/flip", json!({"to": to})).await;
        assert_eq!(code, StatusCode::OK, "flip to {to}: {answer}");
        generation += 1;
        assert_eq!(answer["generation"], generation, "{answer}");
    }
    fleet.converged("blue", generation, FOLLOW).await;
}

/// SIGTERM while a flip waits for a frozen replica (`wait_replicas`): the flip stands, and
/// its caller is answered 504 `replicas_lagging` as the replica shuts down, not left with
/// a connection closed under the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd"]
async fn a_flip_waiting_for_replicas_is_answered_when_its_replica_shuts_down() {
    let etcd = Etcd::any().await;
    let fleet = Fleet::start(
        &etcd.endpoint(),
        FleetOptions {
            scenario: "term-wait",
            ..Default::default()
        },
    )
    .await;
    fleet.settled().await;
    let (a, c) = (&fleet.replicas[0], &fleet.replicas[2]);
    let before = a.status().await["generation"].as_u64().expect("generation");
    signal(c.pid(), "-STOP");
    let flip = {
        let admin = a.admin_url();
        tokio::spawn(async move {
            let body = json!({"to": "green", "wait_replicas": "60s"}).to_string();
            let req = http::Request::post(format!("{admin}/flip"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .expect("request");
            send_json(&http_client(), req).await
        })
    };
    until("A applied the flip and waits", PATIENCE, || async {
        a.status().await["generation"] == before + 1
    })
    .await;
    signal(a.pid(), "-TERM");
    let (code, answer) = tokio::time::timeout(PATIENCE, flip)
        .await
        .expect("answered before the wait's 60 s")
        .expect("the flip's task");
    signal(c.pid(), "-CONT");
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT, "{answer}");
    assert_eq!(answer["error"], "replicas_lagging", "{answer}");
    assert_eq!(answer["lagging"], json!(["proxy-c"]), "{answer}");
    assert_eq!(answer["generation"], before + 1, "{answer}");
}
