//! Scenarios for the admin API, health checks and the preview listener, with Switchyard
//! in-process on port 0 and Deepgram-compatible stubs behind it.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Env, EnvBuilder, PATIENCE, TOKEN, color_of, eventually, send_json, stub_of};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// A history entry as (generation, action, from, to, reason).
type Summary<'a> = (u64, &'a str, Option<&'a str>, &'a str, Option<&'a str>);

/// The mutating calls, each of which needs the admin token.
const MUTATING: [&str; 4] = ["/flip", "/rollback", "/commit", "/reload"];

/// POST with an arbitrary `Authorization` header (or none) and a raw body.
async fn post_raw(
    env: &Env,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = Request::post(env.admin_url(path)).header("content-type", "application/json");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    send_json(&env.client, req).await
}

/// A pre-recorded transcription through `url`; returns the response with its body.
async fn transcribe(env: &Env, url: &str) -> http::Response<Bytes> {
    let req = Request::post(url)
        .header("content-type", "audio/wav")
        .body(Full::new(Bytes::from_static(b"some audio")))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, env.client.request(req))
        .await
        .expect("answer in time")
        .expect("request succeeds");
    let (parts, body) = response.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .expect("body")
        .to_bytes();
    http::Response::from_parts(parts, body)
}

/// Asserts an admin error: status, `error` code, and a non-empty `message`.
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error has a message: {body}"
    );
}

/// `/status`'s entry for the upstream at `url`.
fn upstream_entry(status: &Value, color: &str, url: &str) -> Value {
    status["colors"][color]["upstreams"]
        .as_array()
        .expect("upstreams is an array")
        .iter()
        .find(|u| u["url"] == url)
        .cloned()
        .unwrap_or_else(|| panic!("{url} not in {color}: {status}"))
}

/// Waits until `/status` shows the upstream at `url` with `healthy` and `health`.
async fn wait_health(env: &Env, color: &str, url: &str, healthy: bool, health: &str) {
    eventually(|| async {
        let (_, status) = env.admin_get("/status").await;
        let u = upstream_entry(&status, color, url);
        u["healthy"] == healthy && u["health"] == health
    })
    .await;
}

async fn generation(env: &Env) -> u64 {
    let (_, status) = env.admin_get("/status").await;
    status["generation"].as_u64().expect("generation")
}

async fn history(env: &Env) -> Vec<Value> {
    let (code, body) = env.admin_get("/history").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body["history"].as_array().expect("history array").clone()
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.ends_with('Z') && humantime::parse_rfc3339(s).is_ok())
}

#[tokio::test]
async fn mutating_calls_need_the_right_token() {
    let env = EnvBuilder::default().start().await;
    let wrong = [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Token {TOKEN}")),
        Some(TOKEN.to_owned()),
    ];
    for path in MUTATING {
        for authorization in &wrong {
            let answer = post_raw(&env, path, authorization.as_deref(), "").await;
            assert_error(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
        }
    }
    // A 401 names the scheme it wants (RFC 9110 §11.6.1).
    let refused = env
        .client
        .request(
            Request::post(env.admin_url("/flip"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("answer");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.headers()["www-authenticate"],
        r#"Bearer realm="switchyard-admin""#
    );
    // Each refusal is counted, on the admin listener's series.
    let refusals = MUTATING.len() * wrong.len() + 1;
    assert_eq!(
        env.metric_sum("switchyard_unauthorized_total", &["listener=\"admin\""]),
        refusals as f64
    );
    // Nothing changed, and reads need no token.
    assert_eq!(generation(&env).await, 1);
    assert_eq!(history(&env).await.len(), 1);
    let (code, status) = env.admin_get("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["active"], "blue");
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let env = EnvBuilder::default().start().await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = Some(bearer.as_str());
    for (path, body) in [
        ("/flip", "{"),
        ("/flip", "not json"),
        ("/flip", r#"{"to": "green", "colour": "green"}"#),
        ("/flip", r#"{"to": "purple"}"#),
        ("/flip", r#"{"to": "Green"}"#),
        ("/flip", r#"{"drain_timeout": "soon"}"#),
        ("/flip", r#"{"expect_generation": "one"}"#),
        ("/rollback", "{"),
        ("/rollback", r#"{"reasons": "typo"}"#),
        ("/rollback", r#"{"to": "green"}"#),
        ("/commit", "[1"),
        ("/commit", r#"{"force": true}"#),
        ("/reload", r#"{"config": "elsewhere.toml"}"#),
        ("/reload", "[]"),
    ] {
        let answer = post_raw(&env, path, auth, body).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "bad_request");
    }
    // A reason longer than the history keeps (each is written to the state file).
    let longest = "é".repeat(switchyard::control::MAX_REASON);
    for path in ["/flip", "/rollback", "/commit"] {
        let body = json!({ "reason": format!("{longest}!") }).to_string();
        let answer = post_raw(&env, path, auth, &body).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "bad_request");
        // `expect_generation` is checked before anything else.
        let body = json!({ "reason": format!("{longest}!"), "expect_generation": 0 }).to_string();
        let answer = post_raw(&env, path, auth, &body).await;
        assert_error(&answer, StatusCode::CONFLICT, "generation_mismatch");
    }
    let body = json!({ "drain_timeout": "18446744073709551615s 1000ms" }).to_string();
    let answer = post_raw(&env, "/flip", auth, &body).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "bad_request");
    // The field at fault is named.
    let message = answer.1["message"].as_str().unwrap_or_default();
    assert!(message.contains("drain_timeout: too long"), "{message}");
    // Nothing may follow the object.
    let answer = post_raw(&env, "/flip", auth, r#"{"to": "green"} {}"#).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "bad_request");
    let body = json!({ "to": "green", "expect_generation": 0 }).to_string();
    let answer = post_raw(&env, "/rollback", auth, &body).await;
    assert_error(&answer, StatusCode::CONFLICT, "generation_mismatch");
    for query in [
        "",
        "?timeout=1s",
        "?color=purple",
        "?color=blue&timeout=soon",
        "?color=blue&timeout=-1s",
        "?color=blue&timout=10s",
        // humantime panicked on this sum (u64::MAX seconds and a carry of nanoseconds).
        "?color=blue&timeout=18446744073709551615s%201000ms",
    ] {
        let answer = env.admin_get(&format!("/drain/wait{query}")).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "bad_request");
    }
    // None of it changed anything.
    assert_eq!(generation(&env).await, 1);
    let (code, status) = env.admin_get("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["active"], "blue");
    // Reload takes no body; an empty JSON object, which generic clients send, is none.
    for body in ["", " \n", "{}", " { } "] {
        let (code, answer) = post_raw(&env, "/reload", auth, body).await;
        assert_eq!(code, StatusCode::OK, "{body:?}: {answer}");
    }
    assert_eq!(generation(&env).await, 5);
    let body = json!({ "reason": longest }).to_string();
    let (status, _) = post_raw(&env, "/flip", auth, &body).await;
    assert_eq!(status, StatusCode::OK, "the longest reason is taken");
}

#[tokio::test]
async fn status_has_every_documented_key() {
    let env = EnvBuilder::default().start().await;
    let (code, status) = env.admin_get("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["active"], "blue");
    assert_eq!(status["standby"], "green");
    assert!(status.get("rollback_to").is_some_and(Value::is_null));
    assert_eq!(status["generation"], 1);
    assert!(is_rfc3339(&status["changed_at"]), "{status}");
    assert_eq!(status["store"]["kind"], "file");
    for (color, state, stub) in [
        ("blue", "active", &env.blue[0]),
        ("green", "standby", &env.green[0]),
    ] {
        let c = &status["colors"][color];
        assert_eq!(c["state"], state, "{status}");
        assert!(c.get("drain_deadline").is_some_and(Value::is_null));
        assert_eq!(c["open_streams"], 0);
        assert_eq!(c["in_flight"], 0);
        let upstreams = c["upstreams"].as_array().expect("upstreams");
        assert_eq!(upstreams.len(), 1);
        let u = &upstreams[0];
        assert_eq!(u["url"], stub.url());
        assert_eq!(u["healthy"], true);
        assert!(u["health"].is_string());
        assert_eq!(u["in_flight"], 0);
        assert_eq!(u["open_streams"], 0);
    }
    // Once probed, `health` is the stub's system_health.
    wait_health(&env, "green", &env.green[0].url(), true, "Healthy").await;
}

#[tokio::test]
async fn healthz_metrics_and_readyz() {
    let env = EnvBuilder::default().start().await;
    let (code, _) = env.admin_get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
    let metrics = support::get(&env.client, &env.admin_url("/metrics")).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = String::from_utf8_lossy(metrics.body());
    assert!(text.contains("switchyard_route_generation 1"), "{text}");

    let (code, body) = env.admin_get("/readyz").await;
    assert_eq!(code, StatusCode::OK, "{body}");

    // The active colour's only upstream turns Critical: not ready. The process still is.
    env.blue[0].state.set_health("Critical");
    eventually(|| async { env.admin_get("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE })
        .await;
    let (_, body) = env.admin_get("/readyz").await;
    assert_eq!(body["error"], "no_healthy_upstream", "{body}");
    assert!(body["message"].is_string(), "{body}");
    let (code, _) = env.admin_get("/healthz").await;
    assert_eq!(code, StatusCode::OK);

    // Green is healthy, so flipping to it makes the proxy ready again.
    env.flip("green").await;
    let (code, _) = env.admin_get("/readyz").await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn flip_rollback_flip_commit() {
    let env = EnvBuilder::default().start().await;
    let h = history(&env).await;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["generation"], 1);
    assert_eq!(h[0]["action"], "startup");
    assert!(h[0].get("from").is_some_and(Value::is_null), "{}", h[0]);
    assert_eq!(h[0]["to"], "blue");
    assert!(is_rfc3339(&h[0]["at"]));
    assert!(h[0].get("reason").is_some_and(Value::is_null));

    let (code, s) = env
        .admin_post("/flip", Some(json!({"to": "green", "reason": "deploy v2"})))
        .await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["changed"], true);
    assert_eq!(s["active"], "green");
    assert_eq!(s["standby"], "blue");
    assert_eq!(s["rollback_to"], "blue");
    assert_eq!(s["generation"], 2);
    assert_eq!(s["colors"]["green"]["state"], "active");

    let (code, s) = env
        .admin_post("/rollback", Some(json!({"reason": "errors up"})))
        .await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["changed"], true);
    assert_eq!(s["active"], "blue");
    assert_eq!(s["rollback_to"], "green");
    assert_eq!(s["generation"], 3);

    // No body: to the standby colour.
    let (code, s) = env.admin_post("/flip", None).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["changed"], true);
    assert_eq!(s["active"], "green");
    assert_eq!(s["rollback_to"], "blue");
    assert_eq!(s["generation"], 4);

    let (code, s) = env.admin_post("/commit", None).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["active"], "green");
    assert!(s.get("rollback_to").is_some_and(Value::is_null), "{s}");
    assert_eq!(s["generation"], 5);

    let h = history(&env).await;
    let summary: Vec<Summary> = h
        .iter()
        .map(|e| {
            (
                e["generation"].as_u64().expect("generation"),
                e["action"].as_str().expect("action"),
                e["from"].as_str(),
                e["to"].as_str().expect("to"),
                e["reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "startup", None, "blue", None),
            (2, "flip", Some("blue"), "green", Some("deploy v2")),
            (3, "rollback", Some("green"), "blue", Some("errors up")),
            (4, "flip", Some("blue"), "green", None),
            (5, "commit", Some("green"), "green", None),
        ]
    );
    for e in &h {
        assert!(is_rfc3339(&e["at"]), "{e}");
        let keys: Vec<&String> = e.as_object().expect("object").keys().collect();
        assert_eq!(
            keys.len(),
            6,
            "generation, action, from, to, at, reason: {e}"
        );
    }
    // `changed_at` is the time of the newest generation.
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["changed_at"], h[4]["at"]);

    // Committed: nothing to roll back to; a second commit changes nothing.
    let answer = env.admin_post("/rollback", None).await;
    assert_error(&answer, StatusCode::CONFLICT, "no_rollback_target");
    let (code, s) = env.admin_post("/commit", None).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["changed"], false);
    assert_eq!(s["generation"], 5);
    assert_eq!(history(&env).await.len(), 5);
}

#[tokio::test]
async fn rollback_on_a_fresh_start_has_no_target() {
    let env = EnvBuilder::default().start().await;
    let answer = env.admin_post("/rollback", None).await;
    assert_error(&answer, StatusCode::CONFLICT, "no_rollback_target");
    assert_eq!(generation(&env).await, 1);
    assert_eq!(history(&env).await.len(), 1);
}

#[tokio::test]
async fn flip_to_the_active_colour_changes_nothing() {
    let env = EnvBuilder::default().start().await;
    let (code, s) = env.admin_post("/flip", Some(json!({"to": "blue"}))).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["changed"], false);
    assert_eq!(s["active"], "blue");
    assert_eq!(s["generation"], 1);
    assert!(s.get("rollback_to").is_some_and(Value::is_null));
    assert_eq!(history(&env).await.len(), 1);
}

#[tokio::test]
async fn a_stale_generation_is_refused_first() {
    let env = EnvBuilder::default().start().await;
    env.flip("green").await;
    // Generation is 2 now. A stale expectation loses, whether or not the target is active.
    for body in [
        json!({"to": "blue", "expect_generation": 1}),
        json!({"to": "green", "expect_generation": 1}),
        json!({"expect_generation": 3}),
    ] {
        let answer = env.admin_post("/flip", Some(body)).await;
        assert_error(&answer, StatusCode::CONFLICT, "generation_mismatch");
        assert_eq!(answer.1["generation"], 2, "{}", answer.1);
    }
    let answer = env
        .admin_post("/rollback", Some(json!({"expect_generation": 1})))
        .await;
    assert_error(&answer, StatusCode::CONFLICT, "generation_mismatch");
    let answer = env
        .admin_post("/commit", Some(json!({"expect_generation": 1})))
        .await;
    assert_error(&answer, StatusCode::CONFLICT, "generation_mismatch");
    assert_eq!(generation(&env).await, 2);

    // The right one is accepted.
    let (code, s) = env
        .admin_post("/rollback", Some(json!({"expect_generation": 2})))
        .await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["active"], "blue");
    assert_eq!(s["generation"], 3);
}

#[tokio::test]
async fn concurrent_flips_with_one_generation_one_wins() {
    let env = EnvBuilder::default().start().await;
    let body = json!({"to": "green", "expect_generation": 1});
    let (a, b) = tokio::join!(
        env.admin_post("/flip", Some(body.clone())),
        env.admin_post("/flip", Some(body)),
    );
    let mut codes = [a.0, b.0];
    codes.sort();
    assert_eq!(codes, [StatusCode::OK, StatusCode::CONFLICT], "{a:?} {b:?}");
    let loser = if a.0 == StatusCode::CONFLICT { a } else { b };
    assert_eq!(loser.1["error"], "generation_mismatch", "{}", loser.1);
    assert_eq!(generation(&env).await, 2);
    assert_eq!(history(&env).await.len(), 2);
}

/// Every upstream gets its first verdict before the proxy serves: in its first moments
/// a pool that does not answer is not taken for healthy by the flip's gate.
#[tokio::test]
async fn upstreams_are_judged_before_the_proxy_serves() {
    let (hung, _held) = support::hung_upstream().await;
    let blue = switchyard::stub::spawn(switchyard::stub::StubOptions {
        name: "blue".into(),
        ..Default::default()
    })
    .await
    .expect("stub");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin.token"), TOKEN).expect("token file");
    // The next probe is an hour away: only the first one can judge green in this test.
    let builder = EnvBuilder {
        health: "interval = \"1h\"\ntimeout = \"1s\"\nrise = 2\nfall = 3",
        ..Default::default()
    };
    let text = builder.config_text(
        dir.path(),
        &format!("\"{}\"", blue.url()),
        &format!("\"http://{hung}\""),
    );
    let config_path = dir.path().join("switchyard.toml");
    std::fs::write(&config_path, text).expect("config file");
    let config = switchyard::config::Config::load(&config_path).expect("valid config");
    let app = switchyard::app::start(config).await.expect("starts");
    let env = Env {
        dir,
        blue: vec![blue],
        green: Vec::new(),
        app: Some(app),
        config_path,
        client: support::http_client(),
    };
    // At once: the flip would have gone to a pool whose first probe was still waiting.
    let answer = env.admin_post("/flip", Some(json!({"to": "green"}))).await;
    assert_error(&answer, StatusCode::CONFLICT, "target_unhealthy");
    let (_, status) = env.admin_get("/status").await;
    let green = &status["colors"]["green"]["upstreams"][0];
    assert_eq!(green["healthy"], false, "{status}");
    assert_eq!(green["health"], "unreachable", "{status}");
    let blue = &status["colors"]["blue"]["upstreams"][0];
    assert_eq!(blue["healthy"], true, "{status}");
    let (code, _) = env.admin_get("/readyz").await;
    assert_eq!(code, StatusCode::OK);
}

/// A probe whose connection is closed or reset before any answer (a container runtime's
/// port proxy while the API is not listening yet) finds the upstream unreachable; one
/// answered with something that is not HTTP, a bad response.
#[tokio::test]
async fn a_probe_closed_unanswered_is_unreachable_and_garbage_a_bad_response() {
    // (what the upstream writes, whether it then resets, the health shown)
    for (answer, reset, health) in [
        (&b""[..], false, "unreachable"),
        (b"", true, "unreachable"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", false, "bad_response"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _server = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut socket, answer).await;
                if reset {
                    // The request read first, then an RST rather than a FIN.
                    let mut request = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut request).await;
                    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
                }
            }
        });
        let env =
            support::env_with_blue_at_health(addr, "interval = \"1h\"\ntimeout = \"5s\"").await;
        let (_, status) = env.admin_get("/status").await;
        let upstream = &status["colors"]["blue"]["upstreams"][0];
        assert_eq!(upstream["url"], format!("http://{addr}"), "{status}");
        assert_eq!(upstream["health"], health, "reset: {reset}: {status}");
    }
}

#[tokio::test]
async fn an_unhealthy_target_needs_force() {
    let env = EnvBuilder::default().start().await;
    env.green[0].state.set_health("Critical");
    wait_health(&env, "green", &env.green[0].url(), false, "Critical").await;

    let answer = env.admin_post("/flip", Some(json!({"to": "green"}))).await;
    assert_error(&answer, StatusCode::CONFLICT, "target_unhealthy");
    let answer = env.admin_post("/flip", None).await;
    assert_error(&answer, StatusCode::CONFLICT, "target_unhealthy");
    assert_eq!(generation(&env).await, 1);

    let (code, s) = env
        .admin_post("/flip", Some(json!({"to": "green", "force": true})))
        .await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["changed"], true);
    assert_eq!(s["active"], "green");
    // Green is active but cannot serve: the proxy says so rather than crossing colours.
    let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(color_of(&response), "green");

    // A bad status code (not only a bad state) is a failure too, shown as bad_response.
    env.green[0].state.set_health("Healthy");
    wait_health(&env, "green", &env.green[0].url(), true, "Healthy").await;
    env.blue[0].state.set_status_code(503);
    wait_health(&env, "blue", &env.blue[0].url(), false, "bad_response").await;
    let answer = env.admin_post("/rollback", None).await;
    assert_error(&answer, StatusCode::CONFLICT, "target_unhealthy");
}

/// Health mode `http`: any 2xx passes, whatever the body says; anything else fails.
#[tokio::test]
async fn in_http_mode_any_2xx_passes() {
    let env = EnvBuilder {
        health: "mode = \"http\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1",
        ..Default::default()
    }
    .start()
    .await;
    let blue = env.blue[0].url();
    env.blue[0].state.set_status_code(503);
    wait_health(&env, "blue", &blue, false, "bad_response").await;
    env.blue[0].state.set_health("Critical");
    env.blue[0].state.set_status_code(204);
    wait_health(&env, "blue", &blue, true, "ok").await;
}

/// A node that takes the probe's connection and never answers fails by the probe's
/// timeout, shown as `unreachable`.
#[tokio::test]
async fn a_probe_that_times_out_fails_as_unreachable() {
    let (addr, holder) = support::hung_upstream().await;
    let health =
        "mode = \"deepgram\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\nrise = 1\nfall = 1";
    let env = support::env_with_blue_at_health(addr, health).await;
    wait_health(
        &env,
        "blue",
        &format!("http://{addr}"),
        false,
        "unreachable",
    )
    .await;
    holder.abort();
}

#[tokio::test]
async fn a_critical_upstream_stops_getting_traffic() {
    let env = EnvBuilder {
        blue: 2,
        health: "interval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 3",
        ..Default::default()
    }
    .start()
    .await;
    let (sick, well) = (&env.blue[0], &env.blue[1]);
    wait_health(&env, "blue", &sick.url(), true, "Healthy").await;

    let started = Instant::now();
    sick.state.set_health("Critical");
    wait_health(&env, "blue", &sick.url(), false, "Critical").await;
    // fall × interval is 300 ms; the rest is slack for a busy machine.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "unhealthy after {took:?}");

    let before = sick.state.http_requests();
    let well_before = well.state.http_requests();
    for _ in 0..20 {
        let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(color_of(&response), "blue");
        assert_eq!(stub_of(&response), "blue-1");
    }
    assert_eq!(sick.state.http_requests(), before);
    assert_eq!(well.state.http_requests(), well_before + 20);

    // Recovered, it is used again (rise = 1).
    sick.state.set_health("Healthy");
    wait_health(&env, "blue", &sick.url(), true, "Healthy").await;
    for _ in 0..200 {
        if sick.state.http_requests() > before {
            break;
        }
        let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert!(
        sick.state.http_requests() > before,
        "recovered upstream unused"
    );
}

#[tokio::test]
async fn degraded_passes_but_is_deprioritised() {
    let env = EnvBuilder {
        blue: 2,
        ..Default::default()
    }
    .start()
    .await;
    let (degraded, fine) = (&env.blue[0], &env.blue[1]);
    degraded.state.set_health("Degraded");
    wait_health(&env, "blue", &degraded.url(), true, "Degraded").await;
    wait_health(&env, "blue", &fine.url(), true, "Healthy").await;

    let before = degraded.state.http_requests();
    for _ in 0..20 {
        let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(stub_of(&response), "blue-1");
    }
    assert_eq!(degraded.state.http_requests(), before);

    // With the other one gone, Degraded still serves and the colour is ready.
    fine.state.set_health("Critical");
    wait_health(&env, "blue", &fine.url(), false, "Critical").await;
    let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(stub_of(&response), "blue-0");
    let (code, _) = env.admin_get("/readyz").await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn preview_serves_the_standby_colour_and_follows_a_flip() {
    let env = EnvBuilder::default().start().await;
    let preview = transcribe(&env, &env.preview_url("/v1/listen")).await;
    assert_eq!(preview.status(), StatusCode::OK);
    assert_eq!(color_of(&preview), "green");
    assert_eq!(stub_of(&preview), "green");
    let live = transcribe(&env, &env.proxy_url("/v1/listen")).await;
    assert_eq!(color_of(&live), "blue");

    env.flip("green").await;
    let preview = transcribe(&env, &env.preview_url("/v1/listen")).await;
    assert_eq!(color_of(&preview), "blue");
    assert_eq!(stub_of(&preview), "blue");
    let live = transcribe(&env, &env.proxy_url("/v1/listen")).await;
    assert_eq!(color_of(&live), "green");
    assert_eq!(stub_of(&live), "green");
}

#[tokio::test]
async fn drain_wait_reports_an_open_stream_until_it_closes() {
    let env = EnvBuilder::default().start().await;
    // Nothing on green: drained at once.
    let (code, body) = env.admin_get("/drain/wait?color=green&timeout=10s").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["drained"], true, "{body}");

    let (mut ws, _) = tokio::time::timeout(PATIENCE, connect_async(env.ws_url("/v1/listen")))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let (code, flipped) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "1h"})))
        .await;
    assert_eq!(code, StatusCode::OK, "{flipped}");

    let (_, status) = env.admin_get("/status").await;
    let blue = &status["colors"]["blue"];
    assert_eq!(blue["state"], "draining", "{status}");
    // The deadline is the flip's time plus the request's drain_timeout.
    let at = |v: &Value| humantime::parse_rfc3339(v.as_str().expect("a time")).expect("RFC 3339");
    let drain = at(&blue["drain_deadline"])
        .duration_since(at(&flipped["changed_at"]))
        .expect("deadline after the flip");
    assert!(
        drain.abs_diff(Duration::from_secs(3600)) <= Duration::from_secs(2),
        "drain_deadline - changed_at = {drain:?}"
    );
    assert_eq!(blue["open_streams"], 1);
    assert_eq!(blue["upstreams"][0]["open_streams"], 1);
    assert_eq!(status["colors"]["green"]["state"], "active");
    assert!(status["colors"]["green"]["drain_deadline"].is_null());

    let (code, body) = env.admin_get("/drain/wait?color=blue&timeout=300ms").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["drained"], false, "{body}");
    assert_eq!(body["open_streams"], 1, "{body}");
    assert_eq!(body["in_flight"], 0, "{body}");

    // A waiter that is already waiting learns of the close.
    let waiter = env.admin_get("/drain/wait?color=blue&timeout=20s");
    let closer = async {
        ws.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
            .await
            .expect("send CloseStream");
        while let Some(message) = ws.next().await {
            if message.is_err() {
                break;
            }
        }
    };
    let ((code, body), ()) = tokio::join!(waiter, closer);
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["drained"], true, "{body}");

    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["colors"]["blue"]["state"], "standby", "{status}");
    assert!(status["colors"]["blue"]["drain_deadline"].is_null());
}

#[tokio::test]
async fn an_invalid_reload_is_refused_and_the_old_config_stays() {
    let env = EnvBuilder::default().start().await;
    let blue = format!("\"{}\"", env.blue[0].url());
    let green = format!("\"{}\"", env.green[0].url());
    env.write_config(
        &EnvBuilder {
            health: "interval = \"200ms\"\nrise = 0",
            ..Default::default()
        },
        &blue,
        &green,
    );
    let (code, body) = env.admin_post("/reload", None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_config");
    assert_eq!(body["field"], "health.rise", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("health.rise")),
        "{body}"
    );

    // A listener address cannot change on reload; the refusal names it.
    let text = EnvBuilder::default().config_text(env.dir.path(), &blue, &green);
    std::fs::write(
        &env.config_path,
        text.replace("proxy = \"127.0.0.1:0\"", "proxy = \"127.0.0.1:1\""),
    )
    .expect("config file");
    let (code, body) = env.admin_post("/reload", None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "listen.proxy", "{body}");

    // The old config still serves and nothing was recorded.
    assert_eq!(generation(&env).await, 1);
    assert_eq!(history(&env).await.len(), 1);
    let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(stub_of(&response), "blue");
}

#[tokio::test]
async fn a_reload_adds_an_upstream_that_gets_traffic() {
    let env = EnvBuilder::default().start().await;
    let added = switchyard::stub::spawn(switchyard::stub::StubOptions {
        name: "blue-added".into(),
        ..Default::default()
    })
    .await
    .expect("stub starts");
    let blue = format!("\"{}\", \"{}\"", env.blue[0].url(), added.url());
    let green = format!("\"{}\"", env.green[0].url());
    env.write_config(&EnvBuilder::default(), &blue, &green);

    let (code, s) = env.admin_post("/reload", None).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["changed"], true);
    assert_eq!(s["generation"], 2);
    assert_eq!(s["active"], "blue");
    assert_eq!(
        s["colors"]["blue"]["upstreams"].as_array().map(Vec::len),
        Some(2)
    );
    let h = history(&env).await;
    let last = h.last().expect("entries");
    assert_eq!(last["generation"], 2);
    assert_eq!(last["action"], "reload");
    assert_eq!(last["from"], "blue");
    assert_eq!(last["to"], "blue");
    assert!(last["reason"].is_null());

    for _ in 0..200 {
        if added.state.http_requests() > 0 {
            break;
        }
        let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(color_of(&response), "blue");
    }
    assert!(
        added.state.http_requests() > 0,
        "the added upstream got no traffic"
    );
    wait_health(&env, "blue", &added.url(), true, "Healthy").await;

    // Removing the original: it gets no new traffic.
    env.write_config(
        &EnvBuilder::default(),
        &format!("\"{}\"", added.url()),
        &green,
    );
    let (code, s) = env.admin_post("/reload", None).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["generation"], 3);
    let upstreams = s["colors"]["blue"]["upstreams"]
        .as_array()
        .expect("upstreams");
    assert_eq!(upstreams.len(), 1, "{s}");
    assert_eq!(upstreams[0]["url"], added.url());
    let before = env.blue[0].state.http_requests();
    for _ in 0..20 {
        let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(stub_of(&response), "blue-added");
    }
    assert_eq!(env.blue[0].state.http_requests(), before);
    let h = history(&env).await;
    assert_eq!(h.len(), 3);
    assert_eq!(h[2]["action"], "reload");
}

#[tokio::test]
async fn an_oversized_body_is_a_json_413() {
    let env = EnvBuilder::default().start().await;
    let big = format!("{{\"reason\": \"{}\"}}", "x".repeat(100_000));
    let bearer = format!("Bearer {TOKEN}");
    for path in ["/flip", "/rollback", "/commit", "/reload"] {
        let answer = post_raw(&env, path, Some(&bearer), &big).await;
        assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
        // Without the token, the token is what is wrong.
        let answer = post_raw(&env, path, None, &big).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert_eq!(generation(&env).await, 1);
}

#[tokio::test]
async fn a_change_that_cannot_be_saved_is_not_applied() {
    let env = EnvBuilder::default().start().await;
    let state_file = env.dir.path().join("route.json");
    let saved = std::fs::read_to_string(&state_file).expect("state saved at startup");
    // A directory where the file should be: the rename onto it fails.
    std::fs::remove_file(&state_file).expect("remove state");
    std::fs::create_dir(&state_file).expect("dir in the way");
    std::fs::write(state_file.join("keep"), "").expect("non-empty dir");

    let answer = env.admin_post("/flip", Some(json!({"to": "green"}))).await;
    assert_error(
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    );
    assert!(
        answer.1["message"]
            .as_str()
            .is_some_and(|m| m.contains(&state_file.display().to_string())),
        "names the file: {}",
        answer.1
    );
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["active"], "blue", "not acknowledged, not applied");
    assert_eq!(status["generation"], 1);
    assert_eq!(history(&env).await.len(), 1);
    let response = transcribe(&env, &env.proxy_url("/v1/listen")).await;
    assert_eq!(color_of(&response), "blue");
    let leftovers: Vec<String> = std::fs::read_dir(env.dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // Once the file can be written, the same flip goes through and is saved.
    std::fs::remove_dir_all(&state_file).expect("clear the way");
    let (code, s) = env.admin_post("/flip", Some(json!({"to": "green"}))).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["generation"], 2);
    let now = std::fs::read_to_string(&state_file).expect("state saved");
    assert_ne!(now, saved);
    let persisted: Value = serde_json::from_str(&now).expect("state is JSON");
    assert_eq!(persisted["active"], "green");
    assert_eq!(persisted["generation"], 2);
}

#[tokio::test]
async fn probe_verdicts_show_in_status() {
    let mut env = EnvBuilder::default().start().await;
    let url = env.green[0].url();
    wait_health(&env, "green", &url, true, "Healthy").await;
    // A fresh Deepgram node says Ready until it has served traffic: that passes.
    env.green[0].state.set_health("Ready");
    wait_health(&env, "green", &url, true, "Ready").await;
    env.green[0].state.set_health("Initializing");
    wait_health(&env, "green", &url, false, "Initializing").await;
    env.green[0].state.set_health("Healthy");
    wait_health(&env, "green", &url, true, "Healthy").await;
    // A state this build does not know fails, and /status shows what the node said.
    env.green[0].state.set_health("Sleepy");
    wait_health(&env, "green", &url, false, "Sleepy").await;
    env.green[0].state.set_health("Healthy");
    wait_health(&env, "green", &url, true, "Healthy").await;
    // A stopped upstream refuses connections.
    drop(env.green.pop());
    wait_health(&env, "green", &url, false, "unreachable").await;
    let answer = env.admin_post("/flip", None).await;
    assert_error(&answer, StatusCode::CONFLICT, "target_unhealthy");
}

#[tokio::test]
async fn preview_streams_on_the_standby_colour_are_not_draining() {
    let env = EnvBuilder::default().start().await;
    env.flip("green").await;
    // After the flip, preview routes to blue: a stream opened there is new work on the
    // standby colour, not an old stream under the flip's drain order.
    let url = format!(
        "ws://{}/v1/listen",
        env.app().preview_addr.expect("preview")
    );
    let (mut ws, response) = connect_async(url).await.expect("preview handshake");
    assert_eq!(response.headers()["x-switchyard-color"], "blue");
    tokio::time::timeout(
        PATIENCE,
        env.blue[0].state.wait_until(|s| s.ws_open_now() == 1),
    )
    .await
    .expect("the stub saw it in time");
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["colors"]["blue"]["open_streams"], 1);
    assert_eq!(status["colors"]["blue"]["state"], "standby", "{status}");
    assert_eq!(status["colors"]["blue"]["drain_deadline"], Value::Null);
    ws.send(Message::Close(None)).await.expect("close");
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test]
async fn an_absurd_drain_timeout_and_a_non_object_body_are_handled() {
    let env = EnvBuilder::default().start().await;
    // Instant + 999,999,999 years would overflow; the deadline is capped instead.
    let (status, body) = env
        .admin_post(
            "/flip",
            Some(json!({"to": "green", "drain_timeout": "999999999y"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = env.admin_post("/rollback", None).await;
    assert_eq!(status, StatusCode::OK, "the writer survived: {body}");
    // serde would read [null, null] as a CommitBody; the API takes objects only.
    let (status, body) = env.admin_post("/commit", Some(json!([null, null]))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "bad_request");
}
