//! `switchyard ctl`: a client for the admin API, with human output or `--json`.
//!
//! Exit codes are part of the contract: 0 done, 2 refused by the API (4xx), 1 the API
//! cannot be reached or failed (5xx), 3 `wait-drained` timed out.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// The largest answer read (a long history is some hundreds of KiB).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// What to ask the admin API.
#[derive(Debug, Clone)]
pub enum Command {
    Status,
    Flip {
        to: Option<String>,
        force: bool,
        drain_timeout: Option<String>,
        expect_generation: Option<u64>,
        reason: Option<String>,
        /// `wait_replicas`: with the etcd store, wait this long for every live replica.
        wait_replicas: Option<String>,
    },
    Rollback {
        force: bool,
        drain_timeout: Option<String>,
        expect_generation: Option<u64>,
        reason: Option<String>,
        wait_replicas: Option<String>,
    },
    Commit {
        expect_generation: Option<u64>,
        reason: Option<String>,
    },
    History,
    Reload,
    WaitDrained {
        color: String,
        timeout: String,
    },
}

/// Where the API is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL, e.g. `http://127.0.0.1:9901`.
    pub admin: String,
    /// The bearer token for mutating calls.
    pub token: Option<String>,
    /// Print the API's JSON instead of a summary.
    pub json: bool,
}

/// Runs one command; returns the process exit code. Output goes to stdout, errors to stderr.
pub async fn run(options: &Options, command: Command) -> i32 {
    let answer = match &command {
        Command::Status => call(options, Method::GET, "/status", None, None).await,
        Command::History => call(options, Method::GET, "/history", None, None).await,
        Command::Reload => call(options, Method::POST, "/reload", None, None).await,
        Command::Flip {
            to,
            force,
            drain_timeout,
            expect_generation,
            reason,
            wait_replicas,
        } => {
            call(
                options,
                Method::POST,
                "/flip",
                Some(compact(json!({
                    "to": to, "force": force, "drain_timeout": drain_timeout,
                    "expect_generation": expect_generation, "reason": reason,
                    "wait_replicas": wait_replicas,
                }))),
                wait_replicas.as_deref().map(wait_of),
            )
            .await
        }
        Command::Rollback {
            force,
            drain_timeout,
            expect_generation,
            reason,
            wait_replicas,
        } => {
            call(
                options,
                Method::POST,
                "/rollback",
                Some(compact(json!({
                    "force": force, "drain_timeout": drain_timeout,
                    "expect_generation": expect_generation, "reason": reason,
                    "wait_replicas": wait_replicas,
                }))),
                wait_replicas.as_deref().map(wait_of),
            )
            .await
        }
        Command::Commit {
            expect_generation,
            reason,
        } => {
            call(
                options,
                Method::POST,
                "/commit",
                Some(compact(
                    json!({"expect_generation": expect_generation, "reason": reason}),
                )),
                None,
            )
            .await
        }
        Command::WaitDrained { color, timeout } => wait_drained(options, color, timeout).await,
    };
    let (status, value) = match answer {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if !status.is_success() {
        if options.json {
            let _ = out(&format!("{value}\n"));
        }
        let code = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("error");
        let message = value.get("message").and_then(Value::as_str).unwrap_or("");
        let verb = if status.is_client_error() {
            "refused"
        } else {
            "failed"
        };
        eprintln!("{verb} ({}): {code}: {message}", status.as_u16());
        if status == http::StatusCode::UNAUTHORIZED {
            eprintln!(
                "{}",
                if options.token.is_some() {
                    "the token given was not the admin token"
                } else {
                    "no token was given: use --token-file F or SWITCHYARD_ADMIN_TOKEN"
                }
            );
        }
        return if status.is_client_error() { 2 } else { 1 };
    }
    // A 2xx from something that is not the API (a wrong --admin) is no success.
    if !answers(&command, &value) {
        eprintln!(
            "error: {} answered {} without the fields of the admin API's answer: is it Switchyard's admin listener?",
            options.admin,
            status.as_u16()
        );
        return 1;
    }
    let written = if options.json {
        out(&format!("{value}\n"))
    } else {
        out(&human(&command, &value))
    };
    if !written {
        return 1;
    }
    match command {
        Command::WaitDrained { .. } if value.get("drained") != Some(&Value::Bool(true)) => 3,
        _ => 0,
    }
}

/// Whether a successful answer has what the API's answer to `command` always has.
fn answers(command: &Command, v: &Value) -> bool {
    match command {
        Command::History => v
            .get("history")
            .and_then(Value::as_array)
            .is_some_and(|entries| {
                entries.iter().all(|e| {
                    e.get("generation").is_some_and(Value::is_u64)
                        && e.get("action").is_some_and(Value::is_string)
                })
            }),
        Command::WaitDrained { .. } => v.get("drained").is_some_and(Value::is_boolean),
        _ => {
            v.get("generation").is_some_and(Value::is_u64)
                && v.get("active").is_some_and(Value::is_string)
        }
    }
}

/// `/drain/wait` until `color` is drained or `timeout` has passed: a wait longer than the
/// API takes in one call is asked for in turns of at most an hour.
async fn wait_drained(
    options: &Options,
    color: &str,
    timeout: &str,
) -> Result<(http::StatusCode, Value), i32> {
    let path = |timeout: &str| {
        format!(
            "/drain/wait?color={}&timeout={}",
            query_value(color),
            query_value(timeout)
        )
    };
    let Ok(total) = crate::duration::parse(timeout) else {
        // The API says what is wrong with it.
        return call(
            options,
            Method::GET,
            &path(timeout),
            None,
            Some(wait_of(timeout)),
        )
        .await;
    };
    // A wait past what the clock can hold (`--timeout 500000000000y`) is as good as ten
    // years, which no drain outlasts.
    let started = std::time::Instant::now();
    let deadline = started
        .checked_add(total)
        .unwrap_or(started + crate::drain::MAX_DRAIN);
    loop {
        let asked = std::time::Instant::now();
        let left = deadline.saturating_duration_since(asked);
        // The API shortens a longer wait to its own longest.
        let turn = left.min(crate::admin::MAX_WAIT);
        let text = humantime::format_duration(turn).to_string();
        let (status, value) = call(options, Method::GET, &path(&text), None, Some(turn)).await?;
        // The API takes `admin::MAX_WAITERS` waits at once: a full house is waited out,
        // and one that lasts to the deadline is a wait that timed out.
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                eprintln!(
                    "timed out: the admin API had no room for another drain wait ({})",
                    value["message"].as_str().unwrap_or("429")
                );
                return Err(3);
            }
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            continue;
        }
        // An API that waits less than it was asked is not asked again and again.
        let cut_short = asked.elapsed() < turn / 2;
        if turn == left || cut_short || !status.is_success() || value["drained"] == true {
            return Ok((status, value));
        }
    }
}

/// One call to the API: its status and JSON answer, or the exit code of a call that got
/// none (and a message on stderr).
async fn call(
    options: &Options,
    method: Method,
    path: &str,
    body: Option<Value>,
    wait: Option<Duration>,
) -> Result<(http::StatusCode, Value), i32> {
    let url = format!("{}{}", options.admin.trim_end_matches('/'), path);
    let mut req = Request::builder().method(method).uri(&url);
    if let Some(token) = &options.token {
        let Ok(value) = header::HeaderValue::from_str(&format!("Bearer {token}")) else {
            eprintln!(
                "error: the admin token holds a line break or another control character, which no Authorization header can carry"
            );
            return Err(1);
        };
        req = req.header(header::AUTHORIZATION, value);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = match req.body(Full::new(Bytes::from(body))) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: bad admin URL {url}: {e}");
            return Err(1);
        }
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let limit = wait
        .unwrap_or_default()
        .saturating_add(Duration::from_secs(30));
    // The whole exchange is timed, body included: a server that sends a head and then
    // stalls must not hold a pipeline for ever.
    let exchange = async {
        let response = client.request(req).await.map_err(|e| {
            format!(
                "cannot reach the admin API at {}: {}",
                options.admin,
                crate::proxy::http::source_chain(&e)
            )
        })?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER);
        match body.collect().await {
            Ok(b) => Ok((status, b.to_bytes())),
            Err(e) => Err(format!(
                "reading the answer of the admin API at {}: {e}",
                options.admin
            )),
        }
    };
    let (status, bytes) = match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(message)) => {
            eprintln!("error: {message}");
            return Err(1);
        }
        Err(_) => {
            eprintln!(
                "error: the admin API at {} did not answer in {}",
                options.admin,
                humantime::format_duration(Duration::from_secs(limit.as_secs_f64().ceil() as u64))
            );
            return Err(1);
        }
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(value @ Value::Object(_)) => Ok((status, value)),
        _ => {
            eprintln!(
                "error: {} answered {} with a body that is not the admin API's JSON: is it Switchyard's admin listener?",
                options.admin,
                status.as_u16()
            );
            Err(1)
        }
    }
}

/// Writes the answer to stdout; `false` (and a message) when it could not be written.
/// A reader that went away (`ctl ... | head`) is not an error of the call: the exit code
/// still says what the API did. Any other failure (a full disk) is.
fn out(text: &str) -> bool {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: writing the answer: {e}");
            false
        }
        _ => true,
    }
}

/// How long the API may take to answer a call that waits `timeout` (a humantime string the
/// API validates; an unreadable one gets the default wait).
fn wait_of(timeout: &str) -> Duration {
    crate::duration::parse(timeout).unwrap_or(Duration::from_secs(60))
}

/// Percent-encodes a query value: humantime durations contain spaces (`1h 30m`).
fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn compact(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

/// A string field of the answer, for a terminal: control characters escaped (`\r`,
/// `\u{1b}`), so that text an upstream chose (its `system_health`, or a reason) cannot
/// move the cursor or repaint a line, say to show an upstream as healthy.
fn s<'a>(v: &'a Value, key: &str) -> std::borrow::Cow<'a, str> {
    let text = v.get(key).and_then(Value::as_str).unwrap_or("-");
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown.into()
}

/// A short human summary of an answer.
pub fn human(command: &Command, v: &Value) -> String {
    match command {
        Command::History => {
            let mut out = String::new();
            for e in v
                .get("history")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.push_str(&format!(
                    "{:>5}  {}  {:<8} {} -> {}{}\n",
                    e.get("generation").and_then(Value::as_u64).unwrap_or(0),
                    s(e, "at"),
                    s(e, "action"),
                    e.get("from").and_then(Value::as_str).unwrap_or("-"),
                    s(e, "to"),
                    e.get("reason")
                        .and_then(Value::as_str)
                        .map(|_| format!("  ({})", s(e, "reason")))
                        .unwrap_or_default(),
                ));
            }
            out
        }
        Command::WaitDrained { color, .. } => {
            if v.get("drained") == Some(&Value::Bool(true)) {
                format!("{color} is drained: no requests, no streams\n")
            } else {
                format!(
                    "{color} is not drained yet: open streams: {}, requests in flight: {}\n",
                    v.get("open_streams").and_then(Value::as_u64).unwrap_or(0),
                    v.get("in_flight").and_then(Value::as_u64).unwrap_or(0)
                )
            }
        }
        _ => {
            let mut out = String::new();
            if let Some(changed) = v.get("changed").and_then(Value::as_bool) {
                let active = s(v, "active");
                out.push_str(&match (command, changed) {
                    (Command::Flip { .. }, true) => format!("flipped: {active} is active now\n"),
                    (Command::Rollback { .. }, true) => {
                        format!("rolled back: {active} is active now\n")
                    }
                    (Command::Flip { .. } | Command::Rollback { .. }, false) => {
                        format!("no change: {active} was active already\n")
                    }
                    (Command::Commit { .. }, true) => {
                        "committed: no rollback target now\n".to_owned()
                    }
                    (Command::Commit { .. }, false) => {
                        "no change: no rollback target to forget\n".to_owned()
                    }
                    (Command::Reload, _) => "reloaded\n".to_owned(),
                    (_, true) => "changed\n".to_owned(),
                    (_, false) => "no change: already so\n".to_owned(),
                });
            }
            out.push_str(&format!(
                "active: {}  standby: {}  rollback to: {}  generation: {}  changed at: {}\n",
                s(v, "active"),
                s(v, "standby"),
                v.get("rollback_to")
                    .and_then(Value::as_str)
                    .unwrap_or("none"),
                v.get("generation").and_then(Value::as_u64).unwrap_or(0),
                s(v, "changed_at"),
            ));
            if v.get("shutting_down") == Some(&Value::Bool(true)) {
                out.push_str(&format!(
                    "SHUTTING DOWN: listeners closed, streams drain until {}\n",
                    s(v, "shutdown_deadline")
                ));
            }
            for color in ["blue", "green"] {
                let Some(c) = v.get("colors").and_then(|c| c.get(color)) else {
                    continue;
                };
                out.push_str(&format!(
                    "{color}: {}  streams: {}  in flight: {}{}\n",
                    s(c, "state"),
                    c.get("open_streams").and_then(Value::as_u64).unwrap_or(0),
                    c.get("in_flight").and_then(Value::as_u64).unwrap_or(0),
                    c.get("drain_deadline")
                        .and_then(Value::as_str)
                        .map(|d| format!("  drain deadline: {d}"))
                        .unwrap_or_default(),
                ));
                for u in c
                    .get("upstreams")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.push_str(&format!(
                        "  {}  {}  ({})  streams: {}  in flight: {}{}\n",
                        s(u, "url"),
                        if u.get("healthy") == Some(&Value::Bool(true)) {
                            "healthy"
                        } else {
                            "UNHEALTHY"
                        },
                        s(u, "health"),
                        u.get("open_streams").and_then(Value::as_u64).unwrap_or(0),
                        u.get("in_flight").and_then(Value::as_u64).unwrap_or(0),
                        if u.get("removed") == Some(&Value::Bool(true)) {
                            format!("  REMOVED, drains by {}", s(u, "drain_deadline"))
                        } else {
                            String::new()
                        },
                    ));
                }
            }
            out.push_str(&store_line(v.get("store")));
            out
        }
    }
}

/// The etcd store's state in one line (nothing for the file store): what the runbook tells
/// operators to check before a change.
fn store_line(store: Option<&Value>) -> String {
    let Some(store) = store.filter(|s| s.get("kind").and_then(Value::as_str) == Some("etcd"))
    else {
        return String::new();
    };
    let replicas: Vec<String> = store
        .get("replicas")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{}@{}",
                s(r, "id"),
                r.get("generation").and_then(Value::as_u64).unwrap_or(0)
            )
        })
        .collect();
    format!(
        "store: etcd  revision: {}  {}  replicas: {}{}\n",
        store.get("revision").and_then(Value::as_i64).unwrap_or(0),
        if store.get("in_sync") == Some(&Value::Bool(true)) {
            "in sync"
        } else {
            "NOT IN SYNC"
        },
        if replicas.is_empty() {
            "none".to_owned()
        } else {
            replicas.join(" ")
        },
        store
            .get("problem")
            .and_then(Value::as_str)
            .map(|_| format!("\n  problem: {}", s(store, "problem")))
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests;
