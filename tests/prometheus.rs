//! Switchyard against the real tools: `promtool check metrics` accepts a scrape as it is
//! (no lint problem at all), and a real Prometheus server scraping the admin listener sees
//! `switchyard_active_color` follow a flip and a flip back.
//!
//! Ignored by default: it needs `promtool` and `prometheus` on PATH (Debian's `prometheus`
//! package ships both in /usr/bin). `.ci/run` installs them and runs
//! `cargo test --test prometheus -- --ignored`.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// How long Prometheus may take to start and to scrape a change (it scrapes every second).
const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(30);

/// A Prometheus server, stopped by its PID when dropped (also when an assertion fails).
struct PrometheusServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    /// Starts `binary` on a free loopback port, scraping `target` every second, with its
    /// config, storage and log under `dir`.
    fn start(binary: &Path, dir: &Path, target: SocketAddr) -> PrometheusServer {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: switchyard\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write the Prometheus config");
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("create the log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone the log handle"))
            .stderr(log_file)
            .spawn()
            .expect("start prometheus");
        PrometheusServer { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on Prometheus' HTTP API; `None` while it is not answering yet.
    async fn get(&self, client: &HttpClient, path_and_query: &str) -> Option<(StatusCode, Value)> {
        let req = Request::get(format!("http://{}{path_and_query}", self.addr))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .ok()?
            .ok()?;
        let status = response.status();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// The colours `switchyard_active_color == 1` names now, and `switchyard_route_generation`.
    async fn active(&self, client: &HttpClient) -> Option<(Vec<String>, Option<String>)> {
        let (status, body) = self
            .get(client, "/api/v1/query?query=switchyard_active_color%3D%3D1")
            .await?;
        if status != StatusCode::OK || body["status"] != "success" {
            return None;
        }
        let colors = body["data"]["result"]
            .as_array()?
            .iter()
            .filter_map(|r| r["metric"]["color"].as_str().map(str::to_owned))
            .collect();
        let (_, body) = self
            .get(client, "/api/v1/query?query=switchyard_route_generation")
            .await?;
        let generation = body["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_owned);
        Some((colors, generation))
    }

    /// Polls once a second (Prometheus scrapes on a timer) until it reports `color` as the
    /// only active colour, at `generation`.
    async fn wait_for(&self, client: &HttpClient, color: &str, generation: u64) {
        let deadline = tokio::time::Instant::now() + PROMETHEUS_PATIENCE;
        let want = (vec![color.to_owned()], Some(generation.to_string()));
        loop {
            let seen = self.active(client).await;
            if seen.as_ref() == Some(&want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Prometheus did not report {want:?} in {PROMETHEUS_PATIENCE:?}; last {seen:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The path of a tool, via `which`.
fn which(tool: &str) -> PathBuf {
    let out = Command::new("which")
        .arg(tool)
        .output()
        .expect("run `which`");
    assert!(
        out.status.success(),
        "`{tool}` is not on PATH; install Debian's `prometheus` package (see .ci/run)"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

async fn status(env: &Env) -> (String, u64) {
    let (_, status) = env.admin_get("/status").await;
    (
        status["active"].as_str().expect("active").to_owned(),
        status["generation"].as_u64().expect("generation"),
    )
}

#[tokio::test]
#[ignore = "needs prometheus (promtool and a server)"]
async fn promtool_accepts_a_scrape_and_prometheus_follows_flips() {
    let promtool = which("promtool");
    let prometheus = which("prometheus");
    let env = EnvBuilder::default().start().await;

    // A little traffic on blue, a stream, and a flip, so every family has samples.
    for _ in 0..3 {
        let response = get(&env.client, &env.proxy_url("/v1/status")).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(env.ws_url("/v1/listen"))
        .await
        .expect("a stream");
    ws.send(Message::binary(vec![0u8; 3200]))
        .await
        .expect("audio");
    ws.next().await.expect("a result").expect("readable");
    ws.close(None).await.expect("close");
    while let Some(Ok(_)) = ws.next().await {}
    env.flip("green").await;

    // promtool: the scrape as served, with no lint problem.
    let dir = tempfile::tempdir().expect("tempdir");
    let scrape = get(&env.client, &env.admin_url("/metrics")).await;
    assert_eq!(scrape.status(), StatusCode::OK);
    let scrape_file = dir.path().join("scrape.prom");
    std::fs::write(&scrape_file, scrape.body()).expect("write the scrape");
    let checked = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&scrape_file).expect("open the scrape"))
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}",
        checked.status
    );

    // A real server scraping the admin listener follows the flips.
    let server = PrometheusServer::start(&prometheus, dir.path(), env.app().admin_addr);
    let (active, generation) = status(&env).await;
    assert_eq!(active, "green");
    server.wait_for(&env.client, &active, generation).await;

    env.flip("blue").await;
    let (active, generation) = status(&env).await;
    assert_eq!(active, "blue");
    server.wait_for(&env.client, &active, generation).await;
    drop(server);
}
