//! The real `switchyard` binary as a child process: `run` (restart persistence, start-up
//! refusals), `ctl` (every exit code, `--json`), `stub-upstream` and `check` (each broken
//! config, the shipped configs). The stub upstreams `run` proxies to run in-process.

mod support;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use support::{ChildLog, PATIENCE, TOKEN, color_of, eventually, free_port, http_client, send_json};
use switchyard::stub::{StubHandle, StubOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Stubs and a config directory for one `switchyard run`.
struct Site {
    dir: tempfile::TempDir,
    blue: StubHandle,
    green: StubHandle,
    proxy: String,
    admin: String,
}

impl Site {
    async fn new() -> Site {
        let stub = |name: &str| {
            switchyard::stub::spawn(StubOptions {
                name: name.into(),
                ..Default::default()
            })
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let site = Site {
            blue: stub("blue").await.expect("blue stub"),
            green: stub("green").await.expect("green stub"),
            proxy: format!("127.0.0.1:{}", free_port()),
            admin: format!("127.0.0.1:{}", free_port()),
            dir,
        };
        std::fs::write(site.token_file(), TOKEN).expect("token file");
        std::fs::write(site.config(), site.config_text()).expect("config file");
        site
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("switchyard.toml")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state").join("route.json")
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    fn config_text(&self) -> String {
        format!(
            r#"[listen]
proxy = "{proxy}"
admin = "{admin}"

[pools]
blue = ["{blue}"]
green = ["{green}"]

[routing]
state_file = "{state}"

[health]
interval = "200ms"
rise = 1
fall = 1

[admin]
token_file = "{token}"
"#,
            proxy = self.proxy,
            admin = self.admin,
            blue = self.blue.url(),
            green = self.green.url(),
            state = self.state_file().display(),
            token = self.token_file().display(),
        )
    }

    /// Starts `switchyard run` and waits for its "listening" log line.
    async fn run(&self) -> Running {
        self.run_with_token_env(None).await
    }

    /// `run` with `SWITCHYARD_ADMIN_TOKEN` set to `token` (unset for `None`).
    async fn run_with_token_env(&self, token: Option<&str>) -> Running {
        let mut command = Command::new(BIN);
        match token {
            Some(t) => command.env("SWITCHYARD_ADMIN_TOKEN", t),
            None => command.env_remove("SWITCHYARD_ADMIN_TOKEN"),
        };
        command.args(["run", "--config"]).arg(self.config());
        Running::start(command, "switchyard is listening").await
    }

    /// Runs `switchyard ctl --admin <this site> ARGS` → exit code, stdout, stderr.
    async fn ctl(&self, args: &[&str]) -> Output {
        let mut full = vec!["ctl", "--admin"];
        let admin = self.admin_url();
        full.push(&admin);
        full.extend_from_slice(args);
        switchyard(&full).await
    }

    /// `ctl` with the right token file.
    async fn ctl_auth(&self, args: &[&str]) -> Output {
        let token = self.token_file();
        let token = token.to_str().expect("utf-8 path");
        let mut full = vec!["--token-file", token];
        full.extend_from_slice(args);
        self.ctl(&full).await
    }

    async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        let req = Request::get(format!("{}{path}", self.admin_url()))
            .body(Full::new(Bytes::new()))
            .expect("request");
        send_json(&http_client(), req).await
    }

    async fn admin_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::post(format!("{}{path}", self.admin_url()))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        send_json(&http_client(), req).await
    }
}

/// A running `switchyard run`; killed if the test ends without stopping it.
struct Running {
    /// `None` once stopped by the test.
    child: Option<Child>,
    log: ChildLog,
}

impl Running {
    /// Spawns `command` and waits for the log line with `ready`.
    async fn start(mut command: Command, ready: &str) -> Running {
        let (child, log) = ChildLog::spawn(&mut command);
        let mut running = Running {
            child: Some(child),
            log,
        };
        running.log_line(ready).await;
        running
    }

    fn log(&self) -> String {
        self.log.text()
    }

    /// Waits for the next log line containing `needle` and returns it.
    async fn log_line(&mut self, needle: &str) -> String {
        match self.log.line(needle).await {
            Some(line) => line,
            None => {
                let status = self.child.as_mut().map(Child::try_wait);
                panic!("no log line with {needle:?} ({status:?}):\n{}", self.log())
            }
        }
    }

    /// Sends a signal by PID with kill(1).
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    async fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("reaped");
    }

    /// SIGTERM and wait for the exit.
    async fn terminate(mut self) -> ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        let waited =
            tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait())).await;
        match waited {
            Ok(status) => status.expect("join").expect("reaped"),
            Err(_) => panic!("no exit after SIGTERM:\n{}", self.log()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("--json output is JSON ({e}): {}", self.stdout))
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the binary to completion (bounded by PATIENCE).
async fn switchyard_in(dir: Option<&Path>, args: &[&str]) -> Output {
    switchyard_with(dir, None, args).await
}

/// Runs the binary in `dir` with `SWITCHYARD_ADMIN_TOKEN` set to `token` (unset for `None`).
async fn switchyard_with(dir: Option<&Path>, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    match token {
        Some(t) => command.env("SWITCHYARD_ADMIN_TOKEN", t),
        None => command.env_remove("SWITCHYARD_ADMIN_TOKEN"),
    };
    command
        .args(args)
        .env_remove("SWITCHYARD_ADMIN")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap_or_else(|_| panic!("switchyard {args:?} did not finish"))
        .expect("switchyard runs");
    Output {
        code: out.status.code().expect("exited, not signalled"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn switchyard(args: &[&str]) -> Output {
    switchyard_in(None, args).await
}

// ---- run: persistence and start-up refusals -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_survives_sigkill_and_restart() {
    let site = Site::new().await;
    let first = site.run().await;
    let (code, flipped) = site
        .admin_post("/flip", json!({"to": "green", "reason": "release 42"}))
        .await;
    assert_eq!(code, StatusCode::OK, "{flipped}");
    assert_eq!(flipped["generation"], 2);
    let (_, before) = site.admin_get("/history").await;
    first.kill().await;

    let second = site.run().await;
    let (code, status) = site.admin_get("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["active"], "green", "{status}");
    assert_eq!(status["rollback_to"], "blue");
    assert_eq!(status["generation"], 2, "a restart adds no generation");
    assert_eq!(status["changed_at"], flipped["changed_at"]);
    let (_, after) = site.admin_get("/history").await;
    assert_eq!(after, before, "history kept, nothing added");
    assert_eq!(after["history"][1]["reason"], "release 42");

    // Traffic goes where the state says.
    let req = Request::post(format!("http://{}/v1/listen", site.proxy))
        .body(Full::new(Bytes::from_static(b"audio")))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, http_client().request(req))
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(color_of(&response), "green");

    // SIGTERM is a clean exit, and the state is still there for the next start.
    let status = second.terminate().await;
    assert_eq!(status.code(), Some(0), "exit after SIGTERM");
    let third = site.run().await;
    let (_, status) = site.admin_get("/status").await;
    assert_eq!(status["active"], "green");
    assert_eq!(status["generation"], 2);
    drop(third);
}

/// Without `--config`, `run` reads `config/switchyard.toml` and names it when it is not
/// there.
#[tokio::test]
async fn run_without_a_config_flag_names_the_default_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = switchyard_in(Some(dir.path()), &["run"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("config/switchyard.toml"), "{out:?}");
}

/// A failing health probe says why, once per reason: not once per probe, and not only
/// "unreachable" or "bad_response" in /status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_probe_is_logged_with_its_reason_once() {
    let site = Site::new().await;
    let mut proxy = site.run().await;
    site.green.state.set_health("Critical");
    let line = proxy.log_line("health probe failed").await;
    assert!(
        line.contains("system_health Critical") && line.contains("green"),
        "{line}"
    );
    // Three more probes fail for the same reason, and log nothing more.
    let probes = site.green.state.status_requests();
    eventually(|| async { site.green.state.status_requests() >= probes + 3 }).await;
    site.green.state.set_health("Initializing");
    let line = proxy.log_line("health probe failed").await;
    assert!(line.contains("system_health Initializing"), "{line}");
    // A passing probe clears it: the same reason again is news.
    site.green.state.set_health("Ready");
    let line = proxy.log_line("upstream health changed").await;
    assert!(line.contains("healthy=true"), "{line}");
    site.green.state.set_health("Initializing");
    let line = proxy.log_line("health probe failed").await;
    assert!(line.contains("system_health Initializing"), "{line}");
    assert_eq!(proxy.terminate().await.code(), Some(0));
}

/// Start-up waits for the upstreams' first health verdicts, but not for a health.timeout
/// of an hour: a pool that never answers holds the start a few seconds at most, and a
/// SIGTERM is then answered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_does_not_wait_out_a_long_health_timeout() {
    let site = Site::new().await;
    let (hung, _held) = support::hung_upstream().await;
    let text = site
        .config_text()
        .replace(&site.green.url(), &format!("http://{hung}"))
        .replace("[health]\n", "[health]\ntimeout = \"1h\"\n");
    std::fs::write(site.config(), text).expect("config");
    let proxy = site.run().await;
    assert!(
        proxy
            .log()
            .contains("going on before every new upstream's first health probe answered"),
        "{}",
        proxy.log()
    );
    assert_eq!(proxy.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_stops_startup_and_is_named() {
    let site = Site::new().await;
    std::fs::create_dir_all(site.state_file().parent().expect("dir")).expect("state dir");
    std::fs::write(site.state_file(), "{\"active\": \"gre").expect("corrupt state");
    let config = site.config();
    let out = switchyard(&["run", "--config", config.to_str().expect("utf-8")]).await;
    assert_ne!(out.code, 0, "{out:?}");
    let path = site.state_file().display().to_string();
    assert!(out.stderr.contains(&path), "names {path}: {out:?}");
    // Never a silent reset: the file is left as it was.
    assert_eq!(
        std::fs::read_to_string(site.state_file()).expect("still there"),
        "{\"active\": \"gre"
    );
}

/// A start refused for a file the config names writes no route state: the next start is
/// still a first start, on `routing.initial`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_refused_for_a_missing_certificate_writes_no_state() {
    let site = Site::new().await;
    let missing = site.dir.path().join("nope.crt");
    let key = site.dir.path().join("nope.key");
    let text = format!(
        "{}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        site.config_text(),
        missing.display(),
        key.display()
    );
    std::fs::write(site.config(), text).expect("config");
    let config = site.config();
    let out = switchyard(&["run", "--config", config.to_str().expect("utf-8")]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("tls.cert"), "names the field: {out:?}");
    assert!(
        !site.state_file().exists(),
        "a refused start wrote {}",
        site.state_file().display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_token_stops_startup_and_names_the_file() {
    let site = Site::new().await;
    for token in [None, Some("  \n")] {
        match token {
            None => std::fs::remove_file(site.token_file()).expect("remove token"),
            Some(t) => std::fs::write(site.token_file(), t).expect("blank token"),
        }
        let config = site.config();
        let out = switchyard(&["run", "--config", config.to_str().expect("utf-8")]).await;
        assert_ne!(out.code, 0, "{out:?}");
        let path = site.token_file().display().to_string();
        assert!(out.stderr.contains(&path), "names {path}: {out:?}");
        assert!(out.stderr.contains("token"), "{out:?}");
    }
}

/// With `--log-format json` the reason the process stops is a JSON line too, so a log
/// pipeline can read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_is_a_json_line_with_log_format_json() {
    let site = Site::new().await;
    std::fs::remove_file(site.token_file()).expect("remove token");
    let config = site.config();
    let out = switchyard(&[
        "--log-format",
        "json",
        "run",
        "--config",
        config.to_str().expect("utf-8"),
    ])
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    let last = out.stderr.lines().last().expect("a line");
    let line: serde_json::Value = serde_json::from_str(last).expect("a JSON line");
    assert_eq!(line["level"], "ERROR", "{line}");
    let error = line["error"].as_str().expect("an error field");
    let path = site.token_file().display().to_string();
    assert!(
        error.contains("no admin token") && error.contains(&path),
        "{line}"
    );
    // Why the file could not be read: a missing mount and a permission denied differ.
    assert!(error.contains("No such file or directory"), "{line}");

    // A RUST_LOG that filters errors out does not silence why the process stopped.
    let out = run_once(&["--log-format", "json"], &config, "off").await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value =
        serde_json::from_str(stderr.lines().last().expect("a line")).expect("a JSON line");
    assert_eq!(line["level"], "ERROR", "{line}");
    let error = line["error"].as_str().expect("an error field");
    assert!(error.contains(&path), "{line}");
}

/// A RUST_LOG that does not parse is said so, and logging goes on at info: before, the
/// filter fell back to info without a word, and an operator asking for debug saw nothing
/// of why.
#[tokio::test]
async fn an_unreadable_rust_log_is_warned_about() {
    let site = Site::new().await;
    std::fs::remove_file(site.token_file()).expect("remove token");
    let out = run_once(&[], &site.config(), "switchyard=loud").await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = stderr
        .lines()
        .find(|l| l.contains("RUST_LOG is not a filter"))
        .unwrap_or_else(|| panic!("no warning:\n{stderr}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(stderr.contains("no admin token"), "{stderr}");

    // One that parses but names no level Switchyard logs at (`warning` is a target's
    // name to tracing) is said too, on stderr, since it silences every line.
    let out = run_once(&[], &site.config(), "warning").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: RUST_LOG leaves out every line"),
        "{stderr}"
    );
    let out = run_once(&[], &site.config(), "off").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("RUST_LOG"), "off is on purpose: {stderr}");
}

/// `switchyard ARGS run --config CONFIG` with `RUST_LOG` set, no admin token in the
/// environment and no colours: its output once it has exited (in time).
async fn run_once(args: &[&str], config: &Path, rust_log: &str) -> std::process::Output {
    tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(BIN)
            .args(args)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .env_remove("SWITCHYARD_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("in time")
    .expect("runs")
}

/// A worker count tokio cannot use is refused by name, where tokio would panic.
#[tokio::test]
async fn a_bad_worker_thread_count_is_refused_by_name() {
    let site = Site::new().await;
    for bad in ["0", "two"] {
        let out = tokio::time::timeout(
            PATIENCE,
            tokio::process::Command::new(BIN)
                .args(["run", "--config"])
                .arg(site.config())
                .env("TOKIO_WORKER_THREADS", bad)
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .expect("in time")
        .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "TOKIO_WORKER_THREADS must be a whole number of threads above 0, not \"{bad}\""
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_from_the_environment_overrides_the_file() {
    let site = Site::new().await;
    let proxy = site.run_with_token_env(Some("from-the-environment")).await;
    let admin = site.admin_url();
    // The file's token no longer works; the environment's does, for ctl too.
    let out = site.ctl_auth(&["flip"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = switchyard_with(
        None,
        Some("from-the-environment"),
        &["ctl", "--admin", &admin, "--json", "flip"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["active"], "green");

    // With the environment's token, no file is needed at all.
    proxy.kill().await;
    std::fs::remove_file(site.token_file()).expect("remove token file");
    let _proxy = site.run_with_token_env(Some("from-the-environment")).await;
    let out = site.ctl(&["status"]).await;
    assert_eq!(out.code, 0, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_file_is_refused_naming_the_field() {
    let site = Site::new().await;
    let mut proxy = site.run().await;

    std::fs::write(
        site.config(),
        site.config_text().replace("rise = 1", "rise = 0"),
    )
    .expect("bad config");
    proxy.signal("-HUP");
    let refused = proxy.log_line("reload refused").await;
    assert!(refused.contains("health.rise"), "{refused}");
    // The API's refusal is logged too, not only answered.
    let out = site.ctl_auth(&["reload"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let refused = proxy.log_line("reload refused (POST /reload)").await;
    assert!(refused.contains("health.rise"), "{refused}");
    let (_, status) = site.admin_get("/status").await;
    assert_eq!(status["generation"], 1, "the old config stays");

    let added = switchyard::stub::spawn(StubOptions {
        name: "blue-added".into(),
        ..Default::default()
    })
    .await
    .expect("stub");
    let blue = format!("blue = [\"{}\"]", site.blue.url());
    let both = format!("blue = [\"{}\", \"{}\"]", site.blue.url(), added.url());
    std::fs::write(site.config(), site.config_text().replace(&blue, &both)).expect("good config");
    proxy.signal("-HUP");
    proxy.log_line("reloaded the config").await;
    let (_, status) = site.admin_get("/status").await;
    assert_eq!(status["generation"], 2, "{status}");
    assert_eq!(status["colors"]["blue"]["upstreams"][1]["url"], added.url());
    let (_, history) = site.admin_get("/history").await;
    assert_eq!(history["history"][1]["action"], "reload", "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_the_admin_api_up_while_streams_drain() {
    let site = Site::new().await;
    let mut proxy = site.run().await;
    let (mut ws, _) = tokio::time::timeout(
        PATIENCE,
        connect_async(format!("ws://{}/v1/listen", site.proxy)),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");

    proxy.signal("-TERM");
    proxy.log_line("shutting down").await;
    // The proxy listener no longer accepts; the admin API still answers.
    eventually(|| async { tokio::net::TcpStream::connect(&site.proxy).await.is_err() }).await;
    let (code, status) = site.admin_get("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["colors"]["blue"]["open_streams"], 1, "{status}");
    let (code, _) = site.admin_get("/healthz").await;
    assert_eq!(code, StatusCode::OK);

    // The stream still works, and when it ends the process exits 0.
    ws.send(Message::Binary(vec![0u8; 3200].into()))
        .await
        .expect("audio");
    let reply = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("a result in time");
    assert!(matches!(reply, Some(Ok(Message::Text(_)))), "{reply:?}");
    ws.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .expect("CloseStream");
    while let Some(Ok(_)) = ws.next().await {}
    let mut child = proxy.child.take().expect("running");
    let exit = tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .unwrap_or_else(|_| panic!("no exit after the last stream:\n{}", proxy.log()))
        .expect("join")
        .expect("reaped");
    assert_eq!(exit.code(), Some(0), "{}", proxy.log());
}

/// SPEC: a stream's log lines carry its session. A warning is what an operator filtering
/// with `RUST_LOG=warn` sees, so it must carry the session there too (the stream's span
/// was at info, and vanished with the info lines).
#[tokio::test]
async fn a_streams_warning_names_its_session_when_only_warnings_are_logged() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let site = Site::new().await;
    // An upstream that takes the upgrade, reads the first audio, and drops the connection.
    let upstream = support::hand_written_upstream(Vec::new(), |mut socket| async move {
        let _ = socket.read(&mut [0u8; 64]).await;
    })
    .await;
    let config = site
        .config_text()
        .replace(&site.blue.url(), &format!("http://{upstream}"))
        .replace("[health]\n", "[health]\nmode = \"off\"\n");
    std::fs::write(site.config(), config).expect("config file");
    let mut command = Command::new(BIN);
    command
        .env("RUST_LOG", "warn")
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .args(["run", "--config"])
        .arg(site.config());
    let (child, log) = ChildLog::spawn(&mut command);
    let mut proxy = Running {
        child: Some(child),
        log,
    };
    eventually(|| async { tokio::net::TcpStream::connect(&site.proxy).await.is_ok() }).await;

    let mut req = format!("ws://{}/v1/listen", site.proxy)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "x-deepgram-session-id",
        "session-warned".parse().expect("value"),
    );
    let (mut ws, _) = tokio::time::timeout(PATIENCE, connect_async(req))
        .await
        .expect("handshake in time")
        .expect("handshake");
    ws.send(Message::Binary(vec![0u8; 3200].into()))
        .await
        .expect("audio");
    let line = proxy.log_line("upstream connection lost").await;
    assert!(line.contains(r#"session="session-warned""#), "{line}");
    assert!(line.contains("color=blue"), "{line}");
    assert!(!proxy.log().contains("INFO"), "{}", proxy.log());
}

// ---- ctl ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_walks_the_operators_story() {
    let site = Site::new().await;
    let _proxy = site.run().await;

    let out = site.ctl(&["status"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("active: blue"), "{out:?}");
    assert!(out.stdout.contains(&site.blue.url()), "{out:?}");

    let out = site.ctl(&["--json", "status"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let status = out.json();
    for key in [
        "active",
        "standby",
        "rollback_to",
        "generation",
        "changed_at",
        "colors",
        "store",
    ] {
        assert!(status.get(key).is_some(), "status has {key}: {status}");
    }
    assert_eq!(status["active"], "blue");
    for color in ["blue", "green"] {
        for key in [
            "state",
            "drain_deadline",
            "open_streams",
            "in_flight",
            "upstreams",
        ] {
            assert!(status["colors"][color].get(key).is_some(), "{color}.{key}");
        }
    }

    let out = site
        .ctl_auth(&["--json", "flip", "--to", "green", "--reason", "deploy"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let flipped = out.json();
    assert_eq!(flipped["changed"], true);
    assert_eq!(flipped["active"], "green");
    assert_eq!(flipped["generation"], 2);

    let out = site.ctl_auth(&["flip", "--to", "green"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("no change"), "{out:?}");

    let out = site
        .ctl_auth(&["--json", "rollback", "--drain-timeout", "90s"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["active"], "blue");
    assert_eq!(out.json()["generation"], 3);

    let out = site.ctl_auth(&["flip"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("active: green"), "{out:?}");

    let out = site.ctl_auth(&["--json", "commit"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.json()["rollback_to"].is_null());
    assert_eq!(out.json()["generation"], 5);

    let out = site.ctl(&["--json", "history"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let history = out.json();
    let actions: Vec<&str> = history["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["startup", "flip", "rollback", "flip", "commit"]);
    assert_eq!(
        history["history"][2]["drain_timeout"], "1m 30s",
        "rollback --drain-timeout reaches the API"
    );
    for e in history["history"].as_array().expect("history") {
        for key in ["generation", "action", "from", "to", "at", "reason"] {
            assert!(e.get(key).is_some(), "{key} in {e}");
        }
    }
    let out = site.ctl(&["history"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.lines().count(), 5, "{out:?}");
    assert!(out.stdout.contains("(deploy)"), "{out:?}");

    // A humantime value with a space, as an operator would type it.
    let out = site
        .ctl(&["--json", "wait-drained", "blue", "--timeout", "1m 30s"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["drained"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_refusals_exit_2() {
    let site = Site::new().await;
    let _proxy = site.run().await;

    // 409: nothing to roll back to.
    let out = site.ctl_auth(&["rollback"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("no_rollback_target"), "{out:?}");
    let out = site.ctl_auth(&["--json", "rollback"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(out.json()["error"], "no_rollback_target");

    // 409: a stale generation.
    let out = site
        .ctl_auth(&["flip", "--to", "green", "--expect-generation", "7"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("generation_mismatch"), "{out:?}");

    // 401: no token, and a wrong one.
    let out = site.ctl(&["flip", "--to", "green"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
    let wrong = site.dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").expect("wrong token");
    let out = site
        .ctl(&["--token-file", wrong.to_str().expect("utf-8"), "commit"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");

    // 400: an unknown colour.
    let out = site.ctl_auth(&["flip", "--to", "purple"]).await;
    assert_eq!(out.code, 2, "{out:?}");

    // A command line that is wrong is not a refusal: 64, and nothing is sent.
    let out = site.ctl_auth(&["flip", "--tooo", "green"]).await;
    assert_eq!(out.code, 64, "{out:?}");
    let out = site.ctl_auth(&["--help"]).await;
    assert_eq!(out.code, 0, "{out:?}");

    // Nothing of it changed anything.
    let out = site.ctl(&["--json", "status"]).await;
    assert_eq!(out.json()["generation"], 1);
}

/// The token from `SWITCHYARD_ADMIN_TOKEN` is trimmed as `run` trims it (`export
/// T=$(cat f)` keeps no newline, but a token set from a file read whole does), and an empty
/// token file is a local error (exit 1), not a request sent with an empty token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_trims_its_token_and_refuses_an_empty_token_file() {
    let site = Site::new().await;
    let _proxy = site.run().await;
    let admin = site.admin_url();
    let with_newline = format!("{TOKEN}\n");
    let out = switchyard_with(
        None,
        Some(&with_newline),
        &["ctl", "--admin", &admin, "commit"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");

    let empty = site.dir.path().join("empty.token");
    std::fs::write(&empty, "\n").expect("empty token file");
    let out = site
        .ctl(&["--token-file", empty.to_str().expect("utf-8"), "commit"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("is empty"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exits_1_when_the_admin_api_is_unreachable() {
    let admin = format!("http://127.0.0.1:{}", free_port());
    for args in [
        vec!["status"],
        vec!["history"],
        vec!["--json", "flip"],
        vec!["wait-drained", "blue"],
        // A wait past what the clock can hold is no panic.
        vec!["wait-drained", "blue", "--timeout", "500000000000y"],
    ] {
        let mut full = vec!["ctl", "--admin", &admin];
        full.extend(args);
        let out = switchyard(&full).await;
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains(&admin), "names the URL: {out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exits_1_on_a_server_error() {
    let site = Site::new().await;
    let _proxy = site.run().await;
    // A file where the state directory should be: the change cannot be saved (503).
    let state_dir = site.state_file().parent().expect("dir").to_owned();
    std::fs::remove_dir_all(&state_dir).expect("remove state dir");
    std::fs::write(&state_dir, "in the way").expect("file in the way");

    let out = site.ctl_auth(&["flip", "--to", "green"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("store_unavailable"), "{out:?}");
    let out = site.ctl_auth(&["--json", "flip", "--to", "green"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.json()["error"], "store_unavailable");
    let out = site.ctl(&["--json", "status"]).await;
    assert_eq!(out.json()["active"], "blue");
}

/// `--admin host:port` without a scheme means `http://host:port`, as curl takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_takes_an_admin_address_without_a_scheme() {
    let site = Site::new().await;
    let _proxy = site.run().await;
    let admin = site.admin_url();
    let bare = admin.strip_prefix("http://").expect("an http URL");
    let out = switchyard(&["ctl", "--admin", bare, "--json", "status"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["active"], "blue");
}

/// Runs `switchyard ARGS` with its stdout on `stdout` → exit code and stderr.
async fn switchyard_writing_to(stdout: Stdio, args: &[&str]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("switchyard starts")
        // Not `output()`, which would capture stdout in a pipe of its own.
        .wait_with_output();
    let out = tokio::time::timeout(PATIENCE, out)
        .await
        .unwrap_or_else(|_| panic!("switchyard {args:?} did not finish"))
        .expect("switchyard runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctl ... | head`: a reader gone before the answer is written does not turn a call the
/// API carried out into a crash (Rust ignores SIGPIPE, so the write fails instead). Any
/// other failure to write the answer (a full disk) is one: exit 1, said on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_when_its_answer_cannot_be_written() {
    let site = Site::new().await;
    let _proxy = site.run().await;
    let admin = site.admin_url();
    for args in [&["--json", "history"][..], &["status"]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut full = vec!["ctl", "--admin", &admin];
        full.extend_from_slice(args);
        let (code, stderr) = switchyard_writing_to(Stdio::from(writer), &full).await;
        assert_eq!(code, Some(0), "{full:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{full:?}: {stderr}");
    }
    let full_disk = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let args = ["ctl", "--admin", &admin, "--json", "status"];
    let (code, stderr) = switchyard_writing_to(Stdio::from(full_disk), &args).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("writing the answer"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_wait_drained_exits_3_while_a_stream_is_open() {
    let site = Site::new().await;
    let _proxy = site.run().await;
    let (mut ws, _) = tokio::time::timeout(
        PATIENCE,
        connect_async(format!("ws://{}/v1/listen", site.proxy)),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let out = site.ctl_auth(&["flip", "--to", "green"]).await;
    assert_eq!(out.code, 0, "{out:?}");

    let out = site
        .ctl(&["wait-drained", "blue", "--timeout", "300ms"])
        .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stdout.contains("open streams: 1,"), "{out:?}");
    let out = site
        .ctl(&["--json", "wait-drained", "blue", "--timeout", "300ms"])
        .await;
    assert_eq!(out.code, 3, "{out:?}");
    let answer = out.json();
    assert_eq!(answer["drained"], false);
    assert_eq!(answer["open_streams"], 1);
    assert_eq!(answer["in_flight"], 0);

    // The stream ends: a waiting ctl returns 0.
    let waiter = site.ctl(&["wait-drained", "blue", "--timeout", "20s"]);
    let closer = async {
        ws.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
            .await
            .expect("send CloseStream");
        while let Some(Ok(_)) = ws.next().await {}
    };
    let (out, ()) = tokio::join!(waiter, closer);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("blue is drained"), "{out:?}");
}

/// A fake admin API that answers each call with the next of `answers` (status, JSON body;
/// the last one again once they run out) and records each call's request line.
async fn fake_api(answers: Vec<(u16, &'static str)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = format!("http://{}", listener.local_addr().expect("addr"));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let recorded = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let line = head.lines().next().unwrap_or_default().to_owned();
            let turn = {
                let mut asked = recorded.lock().expect("lock");
                asked.push(line);
                asked.len() - 1
            };
            let (status, body) = answers[turn.min(answers.len() - 1)];
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    (admin, asked)
}

/// `switchyard ctl --admin <admin> wait-drained blue --timeout <timeout>`.
async fn wait_drained_blue(admin: &str, timeout: &str) -> Output {
    switchyard(&[
        "ctl",
        "--admin",
        admin,
        "wait-drained",
        "blue",
        "--timeout",
        timeout,
    ])
    .await
}

/// The API waits at most an hour in one call: a longer wait is asked for in turns of an
/// hour. Here an API that answers at once, not drained: `ctl` asks for an hour, and does
/// not ask again when the answer comes sooner than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_asks_for_a_wait_longer_than_an_hour_in_turns_of_an_hour() {
    let not_drained = r#"{"drained":false,"color":"blue","open_streams":1,"in_flight":0}"#;
    let (admin, asked) = fake_api(vec![(200, not_drained)]).await;
    let out = wait_drained_blue(&admin, "2h 30m").await;
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(
        *asked.lock().expect("lock"),
        ["GET /drain/wait?color=blue&timeout=1h HTTP/1.1"],
        "{out:?}"
    );
}

/// The API takes 32 waits at once and answers 429 beyond: `ctl wait-drained` waits for
/// room (asking again each second) instead of giving up, until its own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_wait_drained_waits_for_room_when_the_api_has_too_many_waiters() {
    let full = r#"{"error":"too_many_waiters","message":"32 drain waits are open already"}"#;
    let drained = r#"{"drained":true,"color":"blue","open_streams":0,"in_flight":0}"#;
    let (admin, asked) = fake_api(vec![(429, full), (200, drained)]).await;
    let out = wait_drained_blue(&admin, "1m").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(asked.lock().expect("lock").len(), 2, "{out:?}");

    // No room until the timeout: the wait timed out (3), as any other would.
    let (admin, asked) = fake_api(vec![(429, full)]).await;
    let out = wait_drained_blue(&admin, "1500ms").await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("no room"), "{out:?}");
    assert!(asked.lock().expect("lock").len() >= 2, "{out:?}");
}

/// A server that answers every connection with `answer` (raw bytes) and then keeps the
/// connection open without another byte; its URL.
async fn raw_server(answer: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(answer.as_bytes()).await;
            held.push(socket);
        }
    });
    url
}

/// A `--admin` that reaches some other server (an ingress's default page, a login page)
/// must not read as "done" to a pipeline: an answer that is not the API's JSON, or JSON
/// without the fields the API's answer always has, exits 1 whatever its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_does_not_take_another_servers_answer_for_the_apis() {
    let html = raw_server(
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 13\r\nconnection: close\r\n\r\n<html></html>",
    )
    .await;
    let not_found = raw_server(
        "HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: 13\r\nconnection: close\r\n\r\n<html></html>",
    )
    .await;
    let empty = raw_server(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    .await;
    let not_history = raw_server(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\nconnection: close\r\n\r\n{\"history\":[{}]}",
    )
    .await;
    let out = switchyard(&["ctl", "--admin", &not_history, "history"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    for admin in [&html, &not_found, &empty] {
        for args in [
            &["flip", "--to", "green"][..],
            &["commit"],
            &["status"],
            &["history"],
            &["--json", "status"],
            &["wait-drained", "blue", "--timeout", "1s"],
        ] {
            let mut full = vec!["ctl", "--admin", admin];
            full.extend(args);
            let out = switchyard_with(None, Some(TOKEN), &full).await;
            assert_eq!(out.code, 1, "{full:?}: {out:?}");
            assert!(
                out.stderr.contains("is it Switchyard's admin listener?"),
                "{full:?}: {out:?}"
            );
            assert!(out.stdout.is_empty(), "{full:?}: {out:?}");
        }
    }
}

/// The 30 s `ctl` gives the API covers the answer's body too: a server that sends a head
/// and then stalls does not hold a pipeline for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_gives_up_on_an_answer_whose_body_stalls() {
    let stalled = raw_server(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"active\":",
    )
    .await;
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(BIN)
            .args(["ctl", "--admin", &stalled, "status"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ctl gave up by itself")
    .expect("ctl runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not answer in 30s"), "{stderr}");
}

/// A token `ctl` cannot put in a header is said to be the token's fault, not the URL's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_names_a_token_no_header_can_carry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("two-lines.token");
    std::fs::write(&token, "first\nsecond\n").expect("token");
    let admin = format!("http://127.0.0.1:{}", free_port());
    let token = token.to_str().expect("utf-8");
    let out = switchyard(&["ctl", "--admin", &admin, "--token-file", token, "commit"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("the admin token holds a line break"),
        "{out:?}"
    );
}

// ---- stub-upstream --------------------------------------------------------------------

/// `switchyard stub-upstream`: it reports the `--health` it was given until told another
/// state, names itself in `x-stub-name`, and exits 0 on SIGTERM.
#[tokio::test]
async fn the_stub_upstream_reports_its_health_flag_and_stops_on_sigterm() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(BIN);
    command.args([
        "stub-upstream",
        "--listen",
        &listen,
        "--name",
        "edge-1",
        "--health",
        "Critical",
    ]);
    let stub = Running::start(command, "stub upstream listening").await;
    let status = || async {
        let req = Request::get(format!("http://{listen}/v1/status"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = http_client().request(req).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-stub-name"], "edge-1");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        let json: Value = serde_json::from_slice(&body).expect("status JSON");
        json["system_health"].clone()
    };
    assert_eq!(status().await, "Critical");
    let req = Request::post(format!("http://{listen}/_stub/health"))
        .body(Full::new(Bytes::from_static(
            br#"{"system_health":"Ready"}"#,
        )))
        .expect("request");
    let (code, body) = send_json(&http_client(), req).await;
    assert!(code.is_success(), "{code} {body}");
    assert_eq!(status().await, "Ready");
    assert_eq!(stub.terminate().await.code(), Some(0));
}

// ---- check ----------------------------------------------------------------------------

const GOOD: &str = r#"[listen]
proxy = "127.0.0.1:8080"
admin = "127.0.0.1:9901"

[pools]
blue = ["http://127.0.0.1:9001"]
green = ["http://127.0.0.1:9002"]

[health]
interval = "2s"
rise = 2
"#;

/// `switchyard check` on `text` → exit code and stderr; the config file's path is returned
/// so a test can see it named.
async fn check(text: &str) -> (Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, text).expect("config");
    let path = path.to_str().expect("utf-8").to_owned();
    let out = switchyard_with(None, Some(TOKEN), &["check", "--config", &path]).await;
    (out, path)
}

/// Asserts `check` refuses `text`, naming the file and `field`.
async fn assert_refused(text: &str, field: &str) {
    let (out, path) = check(text).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains(&path), "names the file: {out:?}");
    assert!(out.stderr.contains(field), "names {field}: {out:?}");
}

#[tokio::test]
async fn check_accepts_the_base_config() {
    let (out, path) = check(GOOD).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&path), "{out:?}");
}

/// `run` refuses to start without an admin token, so `check` refuses the config too when
/// neither its token file nor SWITCHYARD_ADMIN_TOKEN has one, naming the field and file.
#[tokio::test]
async fn check_refuses_a_config_without_an_admin_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("switchyard.toml");
    let token = dir.path().join("admin.token");
    let text = format!("{GOOD}\n[admin]\ntoken_file = \"{}\"\n", token.display());
    std::fs::write(&config, text).expect("config");
    let config = config.to_str().expect("utf-8");
    let out = switchyard_with(None, None, &["check", "--config", config]).await;
    assert_ne!(out.code, 0, "{out:?}");
    for named in [config, "admin.token_file", &token.display().to_string()] {
        assert!(out.stderr.contains(named), "names {named}: {out:?}");
    }
    let out = switchyard_with(None, Some(TOKEN), &["check", "--config", config]).await;
    assert_eq!(out.code, 0, "the environment's token will do: {out:?}");
    std::fs::write(&token, "from-the-file\n").expect("token");
    let out = switchyard_with(None, None, &["check", "--config", config]).await;
    assert_eq!(out.code, 0, "the file's token will do: {out:?}");
}

/// A token file of two lines (or with another control character inside the token) would
/// start a proxy whose every admin write gets 401, since no header can carry the token:
/// refused by `check` and `run`, naming the field, and the token is not printed.
#[tokio::test]
async fn check_and_run_refuse_a_token_no_header_can_carry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("switchyard.toml");
    let token = dir.path().join("admin.token");
    let text = format!("{GOOD}\n[admin]\ntoken_file = \"{}\"\n", token.display());
    std::fs::write(&config, text).expect("config");
    std::fs::write(&token, "secret-one\nsecret-two\n").expect("token");
    let config = config.to_str().expect("utf-8");
    for command in ["check", "run"] {
        let out = switchyard_with(None, None, &[command, "--config", config]).await;
        assert_eq!(out.code, 1, "{command}: {out:?}");
        for named in [config, "admin.token_file", "line break"] {
            assert!(
                out.stderr.contains(named),
                "{command} names {named}: {out:?}"
            );
        }
        assert!(!out.stderr.contains("secret-"), "{command}: {out:?}");
    }
    let out = switchyard_with(None, Some("tab\tinside"), &["check", "--config", config]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("SWITCHYARD_ADMIN_TOKEN"), "{out:?}");

    // A token that is not text, in the environment (which overrides a good file) or in
    // the file, is named as such, not passed over or called missing.
    std::fs::write(&token, "a-good-token\n").expect("token");
    let not_utf8 = std::ffi::OsStr::from_bytes(b"Env\xffTok");
    let out = tokio::process::Command::new(BIN)
        .args(["check", "--config", config])
        .env("SWITCHYARD_ADMIN_TOKEN", not_utf8)
        .output()
        .await
        .expect("check runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SWITCHYARD_ADMIN_TOKEN is not UTF-8"),
        "{stderr}"
    );
    // Blank by `str::trim` (a vertical tab, a no-break space): unset, so the file's.
    for blank in ["\x0b", "\u{a0}"] {
        let out = switchyard_with(None, Some(blank), &["check", "--config", config]).await;
        assert_eq!(out.code, 0, "{blank:?}: {out:?}");
    }
    std::fs::write(&token, b"file\xfftoken\n").expect("token");
    let out = switchyard_with(None, None, &["check", "--config", config]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("is not UTF-8"), "{out:?}");
}

#[tokio::test]
async fn check_refuses_a_missing_colour() {
    assert_refused(
        &GOOD.replace("green = [\"http://127.0.0.1:9002\"]\n", ""),
        "pools.green",
    )
    .await;
}

#[tokio::test]
async fn check_refuses_an_empty_pool() {
    assert_refused(
        &GOOD.replace("blue = [\"http://127.0.0.1:9001\"]", "blue = []"),
        "pools.blue",
    )
    .await;
}

#[tokio::test]
async fn check_refuses_a_bad_url() {
    assert_refused(
        &GOOD.replace("\"http://127.0.0.1:9002\"", "\"127.0.0.1:9002/v1\""),
        "pools.green[0]",
    )
    .await;
}

#[tokio::test]
async fn check_refuses_an_unknown_key() {
    let text = GOOD.replace("rise = 2", "rise = 2\nraise = 3");
    assert_refused(&text, "health").await;
    let (out, _) = check(&text).await;
    assert!(out.stderr.contains("raise"), "names the key: {out:?}");
}

#[tokio::test]
async fn check_refuses_a_zero_interval() {
    assert_refused(
        &GOOD.replace("interval = \"2s\"", "interval = \"0s\""),
        "health.interval",
    )
    .await;
}

#[tokio::test]
async fn check_refuses_rise_zero() {
    assert_refused(&GOOD.replace("rise = 2", "rise = 0"), "health.rise").await;
}

#[tokio::test]
async fn check_refuses_two_listeners_on_one_address() {
    let admin = GOOD
        .lines()
        .find(|l| l.starts_with("admin"))
        .expect("admin line");
    let proxy = GOOD
        .lines()
        .find(|l| l.starts_with("proxy"))
        .expect("proxy line");
    assert_refused(
        &GOOD.replace(admin, &proxy.replace("proxy", "admin")),
        "listen.admin",
    )
    .await;
}

/// A state file `run` would refuse at start is refused by `check` as well, named.
#[tokio::test]
async fn check_refuses_a_corrupt_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("route.json");
    std::fs::write(&state, "{\"active\":").expect("state file");
    let text = format!("{GOOD}\n[routing]\nstate_file = \"{}\"\n", state.display());
    let (out, _) = check(&text).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains(&state.display().to_string()), "{out:?}");
}

#[tokio::test]
async fn check_refuses_a_missing_upstream_ca_file() {
    let text = format!("{GOOD}\n[upstream_tls]\nca_file = \"/nonexistent/upstream-ca.pem\"\n");
    assert_refused(&text, "upstream_tls.ca_file").await;
}

/// With no CA file and no system CA certificates to be found, https:// upstreams could
/// never be verified: `check` says so, naming the field, instead of a start whose every
/// upstream turns out unreachable. Plain http:// pools need none.
#[tokio::test]
async fn check_refuses_https_upstreams_with_no_ca_certificates_to_verify_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("no-certs.pem");
    std::fs::write(&empty, "").expect("empty bundle");
    let no_certs = dir.path().join("no-certs");
    std::fs::create_dir(&no_certs).expect("empty dir");
    let run = |text: String| {
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, text).expect("config");
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["check", "--config"])
            .arg(&path)
            .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
            // Where rustls-native-certs looks instead of the system's bundle.
            .env("SSL_CERT_FILE", &empty)
            .env("SSL_CERT_DIR", &no_certs)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(PATIENCE, command.output())
                .await
                .expect("check finishes")
                .expect("check runs");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let https = GOOD.replace("http://127.0.0.1:9002", "https://localhost:9002");
    let (code, stderr) = run(https).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("upstream_tls.ca_file"), "{stderr}");
    assert!(stderr.contains("no system CA certificates"), "{stderr}");
    let (code, stderr) = run(GOOD.to_owned()).await;
    assert_eq!(code, Some(0), "plain pools need no CA: {stderr}");
}

#[tokio::test]
async fn check_accepts_the_shipped_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for config in ["config/switchyard.toml", "config/switchyard.example.toml"] {
        let out = switchyard_with(Some(root), Some(TOKEN), &["check", "--config", config]).await;
        assert_eq!(out.code, 0, "{config}: {out:?}");
        assert!(out.stdout.contains("ok"), "{config}: {out:?}");
    }
}
