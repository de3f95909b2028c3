//! Metrics after real traffic: `/metrics` parsed strictly, every SPEC family present with its
//! exact type and label names, label values bounded, and values that moved exactly as the
//! traffic says (requests per colour, protocol and class; a drained stream; a client-closed
//! stream; a flip; connect errors on a dead pool member).

#[path = "support/exposition.rs"]
mod exposition;
mod support;

use std::collections::BTreeSet;

use bytes::Bytes;
use exposition::{Exposition, Kind};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One audio chunk: exactly the stub's amount per `Results` (100 ms of 16 kHz linear16).
const AUDIO_CHUNK: usize = 3200;
/// The size of each plain HTTP request body.
const HTTP_BODY: usize = 1000;

/// Every `switchyard_` family SPEC lists: name, type, label names.
/// SPEC's table, plus `switchyard_store_in_sync` (0/1), which the many-replicas issue adds
/// so alerting can see a replica that lost its store, and `switchyard_unauthorized_total`,
/// the 401s, which were not routed and so have no colour for `requests_total`.
const FAMILIES: [(&str, Kind, &[&str]); 14] = [
    ("switchyard_store_in_sync", Kind::Gauge, &[]),
    (
        "switchyard_unauthorized_total",
        Kind::Counter,
        &["listener"],
    ),
    (
        "switchyard_requests_total",
        Kind::Counter,
        &["color", "protocol", "code"],
    ),
    (
        "switchyard_request_duration_seconds",
        Kind::Histogram,
        &["color", "protocol"],
    ),
    (
        "switchyard_open_streams",
        Kind::Gauge,
        &["color", "endpoint"],
    ),
    ("switchyard_draining_streams", Kind::Gauge, &["color"]),
    (
        "switchyard_stream_closes_total",
        Kind::Counter,
        &["color", "reason"],
    ),
    ("switchyard_active_color", Kind::Gauge, &["color"]),
    ("switchyard_route_generation", Kind::Gauge, &[]),
    ("switchyard_route_changes_total", Kind::Counter, &["action"]),
    (
        "switchyard_upstream_healthy",
        Kind::Gauge,
        &["color", "upstream"],
    ),
    (
        "switchyard_upstream_errors_total",
        Kind::Counter,
        &["color", "upstream", "kind"],
    ),
    (
        "switchyard_bytes_total",
        Kind::Counter,
        &["color", "direction"],
    ),
    ("switchyard_connections", Kind::Gauge, &["listener"]),
];

/// The bounded values each label may take (`upstream` is checked against the pools).
const LABEL_VALUES: [(&str, &[&str]); 10] = [
    ("color", &["blue", "green"]),
    ("protocol", &["http", "websocket"]),
    ("code", &["1xx", "2xx", "3xx", "4xx", "5xx"]),
    ("endpoint", &["listen", "speak", "other"]),
    (
        "reason",
        &[
            "client",
            "upstream",
            "drain_graceful",
            "drain_forced",
            "error",
        ],
    ),
    (
        "action",
        &["startup", "flip", "rollback", "commit", "reload"],
    ),
    ("direction", &["to_upstream", "to_client"]),
    ("listener", &["proxy", "preview", "admin"]),
    ("kind", &["connect", "timeout", "protocol"]),
    ("le", &[]),
];

/// GET `/metrics` on the admin API, parsed strictly.
async fn scrape(env: &Env) -> Exposition {
    let response = get(&env.client, &env.admin_url("/metrics")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type:?}"
    );
    let text = std::str::from_utf8(response.body()).expect("the exposition is UTF-8");
    exposition::parse(text).unwrap_or_else(|e| panic!("malformed exposition: {e}\n{text}"))
}

/// Scrapes until `cond` holds; metrics settle a moment after the client sees the outcome
/// (a stream is counted once its close handshake is through), and there is no other signal.
async fn scrape_until(env: &Env, what: &str, cond: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let metrics = scrape(env).await;
        if cond(&metrics) {
            return metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen in {PATIENCE:?}; last scrape:\n{}",
            env.app().metrics.encode()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn requests(m: &Exposition, color: &str, protocol: &str, code: &str) -> f64 {
    m.value(
        "switchyard_requests_total",
        &[("color", color), ("protocol", protocol), ("code", code)],
    )
}

fn duration_count(m: &Exposition, color: &str, protocol: &str) -> f64 {
    m.value(
        "switchyard_request_duration_seconds_count",
        &[("color", color), ("protocol", protocol)],
    )
}

fn closes(m: &Exposition, color: &str, reason: &str) -> f64 {
    m.value(
        "switchyard_stream_closes_total",
        &[("color", color), ("reason", reason)],
    )
}

fn open_streams(m: &Exposition, color: &str) -> f64 {
    m.value(
        "switchyard_open_streams",
        &[("color", color), ("endpoint", "listen")],
    )
}

fn draining(m: &Exposition, color: &str) -> f64 {
    m.value("switchyard_draining_streams", &[("color", color)])
}

fn bytes(m: &Exposition, color: &str, direction: &str) -> f64 {
    m.value(
        "switchyard_bytes_total",
        &[("color", color), ("direction", direction)],
    )
}

fn proxy_connections(m: &Exposition) -> f64 {
    m.value("switchyard_connections", &[("listener", "proxy")])
}

/// Every SPEC family with its exact type and label names, no other `switchyard_` family,
/// the `process_*` collectors, and only bounded label values.
fn assert_shape(m: &Exposition, upstreams: &BTreeSet<String>) {
    for (name, kind, labels) in FAMILIES {
        let family = m.family(name);
        assert_eq!(family.kind, kind, "{name}: type");
        assert!(
            family.help.as_deref().is_some_and(|h| !h.is_empty()),
            "{name}: HELP"
        );
        let want: BTreeSet<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        assert!(!family.samples.is_empty(), "{name}: has samples to check");
        for got in family.label_sets() {
            assert_eq!(got, want, "{name}: label names");
        }
    }
    let ours: BTreeSet<&str> = m
        .families
        .keys()
        .map(String::as_str)
        .filter(|n| n.starts_with("switchyard_"))
        .collect();
    let spec: BTreeSet<&str> = FAMILIES.iter().map(|f| f.0).collect();
    assert_eq!(ours, spec, "exactly the SPEC's families");

    for (name, kind) in [
        ("process_cpu_seconds_total", Kind::Counter),
        ("process_resident_memory_bytes", Kind::Gauge),
        ("process_virtual_memory_bytes", Kind::Gauge),
        ("process_open_fds", Kind::Gauge),
        ("process_max_fds", Kind::Gauge),
        ("process_start_time_seconds", Kind::Gauge),
    ] {
        assert_eq!(m.family(name).kind, kind, "{name}: type");
        assert_eq!(m.family(name).samples.len(), 1, "{name}: one sample");
    }

    for sample in m.samples().filter(|s| s.name.starts_with("switchyard_")) {
        for (label, value) in &sample.labels {
            let allowed = match label.as_str() {
                "upstream" => upstreams.contains(value),
                "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
                other => LABEL_VALUES
                    .iter()
                    .find(|(l, _)| *l == other)
                    .is_some_and(|(_, values)| values.contains(&value.as_str())),
            };
            assert!(
                allowed,
                "{}: label {label}={value:?} is not one of its bounded values",
                sample.name
            );
            assert!(
                !value.contains("/v1/") && !value.contains("/_stub"),
                "{}: a path in label {label}={value:?}",
                sample.name
            );
        }
    }
}

/// `upstream_errors_total` exists before any error: one zero series per upstream and kind,
/// so the first error is a visible increase.
fn assert_no_upstream_errors(m: &Exposition, upstreams: &BTreeSet<String>) {
    let family = m.family("switchyard_upstream_errors_total");
    assert_eq!(
        family.samples.len(),
        3 * upstreams.len(),
        "{:?}",
        family.samples
    );
    for s in &family.samples {
        assert_eq!(s.value, 0.0, "upstream_errors_total{:?}", s.labels);
    }
}

/// The upstream URLs `/status` lists, the only upstream label values allowed.
async fn pool_urls(env: &Env) -> BTreeSet<String> {
    let (_, status) = env.admin_get("/status").await;
    ["blue", "green"]
        .iter()
        .flat_map(|c| {
            status["colors"][c]["upstreams"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|u| u["url"].as_str().expect("url").to_owned())
        .collect()
}

async fn generation(env: &Env) -> f64 {
    let (_, status) = env.admin_get("/status").await;
    status["generation"].as_f64().expect("generation")
}

/// POSTs `HTTP_BODY` bytes to `path` on the proxy listener; returns status and colour.
async fn post(env: &Env, path: &str) -> (StatusCode, String) {
    let req = Request::post(env.proxy_url(path))
        .body(Full::new(Bytes::from(vec![1u8; HTTP_BODY])))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, env.client.request(req))
        .await
        .expect("answer in time")
        .expect("an answer");
    let (parts, body) = response.into_parts();
    body.collect().await.expect("the whole body");
    let response = http::Response::from_parts(parts, ());
    (response.status(), color_of(&response))
}

/// Opens `/v1/listen` through the proxy, sends `chunks` of audio and reads their `Results`.
async fn listen(env: &Env, chunks: usize) -> (Ws, String) {
    let (mut ws, response) =
        tokio::time::timeout(PATIENCE, connect_async(env.ws_url("/v1/listen")))
            .await
            .expect("handshake in time")
            .expect("a 101");
    let color = color_of(&response);
    for _ in 0..chunks {
        ws.send(Message::binary(vec![7u8; AUDIO_CHUNK]))
            .await
            .expect("send audio");
        let result = next_json(&mut ws).await;
        assert_eq!(result["type"], "Results", "{result}");
    }
    (ws, color)
}

async fn next_json(ws: &mut Ws) -> Value {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str(t.as_str()).expect("JSON"),
        other => panic!("expected a JSON message, got {other:?}"),
    }
}

/// Reads until the server's close; returns the text messages' types and the close code.
async fn read_to_close(ws: &mut Ws) -> (Vec<String>, Option<u16>) {
    let mut types = Vec::new();
    let mut code = None;
    tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                    types.push(v["type"].as_str().unwrap_or("").to_owned());
                }
                Message::Close(frame) => code = frame.map(|f| u16::from(f.code)),
                _ => {}
            }
        }
    })
    .await
    .expect("the stream ends in time");
    (types, code)
}

#[tokio::test]
async fn metrics_follow_traffic_through_a_flip() {
    let mut env = EnvBuilder::default().start().await;
    let upstreams = pool_urls(&env).await;
    let (blue_url, green_url) = (env.blue[0].url(), env.green[0].url());

    let m = scrape(&env).await;
    assert_shape(&m, &upstreams);
    assert_eq!(
        m.value("switchyard_active_color", &[("color", "blue")]),
        1.0
    );
    assert_eq!(
        m.value("switchyard_active_color", &[("color", "green")]),
        0.0
    );
    assert_eq!(
        m.value("switchyard_route_changes_total", &[("action", "startup")]),
        1.0
    );
    assert_eq!(
        m.value("switchyard_route_generation", &[]),
        generation(&env).await
    );
    assert_no_upstream_errors(&m, &upstreams);

    // Blue: plain HTTP (N answered 2xx, one 404 from the stub), then a stream.
    const BLUE_OK: usize = 5;
    for _ in 0..BLUE_OK {
        assert_eq!(
            post(&env, "/v1/listen").await,
            (StatusCode::OK, "blue".into())
        );
    }
    assert_eq!(
        post(&env, "/v1/nothing-here").await,
        (StatusCode::NOT_FOUND, "blue".into())
    );
    let (mut blue_ws, color) = listen(&env, 2).await;
    assert_eq!(color, "blue");
    let m = scrape_until(&env, "blue requests counted", |m| {
        requests(m, "blue", "http", "2xx") == BLUE_OK as f64
            && requests(m, "blue", "http", "4xx") == 1.0
    })
    .await;
    assert_eq!(requests(&m, "blue", "websocket", "1xx"), 1.0);
    assert_eq!(duration_count(&m, "blue", "http"), BLUE_OK as f64 + 1.0);
    assert_eq!(
        duration_count(&m, "blue", "websocket"),
        0.0,
        "a stream's duration is observed when it ends"
    );
    assert_eq!(open_streams(&m, "blue"), 1.0);
    assert_eq!(draining(&m, "blue"), 0.0);
    assert!(bytes(&m, "blue", "to_upstream") >= (BLUE_OK * HTTP_BODY + 2 * AUDIO_CHUNK) as f64);
    assert!(bytes(&m, "blue", "to_client") > 0.0);

    // Flip to green; the blue stream drains for a second, and is seen draining meanwhile.
    let (status, body) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "1s"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let m = scrape_until(&env, "the blue stream draining", |m| {
        draining(m, "blue") == 1.0
    })
    .await;
    assert_eq!(
        open_streams(&m, "blue"),
        1.0,
        "open_streams includes draining streams"
    );
    assert_eq!(
        m.value("switchyard_active_color", &[("color", "green")]),
        1.0
    );
    assert_eq!(
        m.value("switchyard_active_color", &[("color", "blue")]),
        0.0
    );
    assert_eq!(
        m.value("switchyard_route_generation", &[]),
        generation(&env).await
    );
    assert_eq!(
        m.value("switchyard_route_changes_total", &[("action", "flip")]),
        1.0
    );

    let (types, code) = read_to_close(&mut blue_ws).await;
    assert_eq!(code, Some(1012), "a drained client is told to reconnect");
    assert!(
        types.contains(&"Metadata".to_owned()),
        "finals relayed: {types:?}"
    );
    let m = scrape_until(&env, "the drained stream counted", |m| {
        closes(m, "blue", "drain_graceful") == 1.0
    })
    .await;
    assert_eq!(open_streams(&m, "blue"), 0.0);
    assert_eq!(draining(&m, "blue"), 0.0);
    assert_eq!(duration_count(&m, "blue", "websocket"), 1.0);

    // Green: plain HTTP, then a stream the client closes.
    const GREEN_OK: usize = 3;
    for _ in 0..GREEN_OK {
        assert_eq!(
            post(&env, "/v1/listen").await,
            (StatusCode::OK, "green".into())
        );
    }
    // The plain requests' keep-alive connection goes first: it would close on its own
    // after header_read_timeout, at a moment the counts below could not tell from the
    // stream's.
    env.client = http_client();
    scrape_until(&env, "the keep-alive connection closed", |m| {
        proxy_connections(m) == 0.0
    })
    .await;
    let before = 0.0;
    let (mut green_ws, color) = listen(&env, 1).await;
    assert_eq!(color, "green");
    let m = scrape(&env).await;
    assert_eq!(open_streams(&m, "green"), 1.0);
    assert_eq!(
        proxy_connections(&m),
        before + 1.0,
        "an open stream is an open client connection"
    );
    assert_eq!(draining(&m, "green"), 0.0, "a stream on the active colour");
    green_ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .await
        .expect("send close");
    let (_, code) = read_to_close(&mut green_ws).await;
    assert_eq!(code, Some(1000), "the close is answered");

    let m = scrape_until(&env, "everything settled", |m| {
        closes(m, "green", "client") == 1.0
            && requests(m, "green", "http", "2xx") == 3.0
            && proxy_connections(m) == before
    })
    .await;
    assert_shape(&m, &upstreams);
    // Requests: exactly the traffic above, nothing else.
    let mut expected_requests = vec![
        (("blue", "http", "2xx"), BLUE_OK as f64),
        (("blue", "http", "4xx"), 1.0),
        (("blue", "websocket", "1xx"), 1.0),
        (("green", "http", "2xx"), GREEN_OK as f64),
        (("green", "websocket", "1xx"), 1.0),
    ];
    for s in &m.family("switchyard_requests_total").samples {
        let key = (
            s.labels["color"].as_str(),
            s.labels["protocol"].as_str(),
            s.labels["code"].as_str(),
        );
        let want = expected_requests
            .iter()
            .position(|(k, _)| *k == key)
            .map_or(0.0, |i| expected_requests.remove(i).1);
        assert_eq!(s.value, want, "requests_total{key:?}");
    }
    assert!(
        expected_requests.is_empty(),
        "missing {expected_requests:?}"
    );
    assert_eq!(duration_count(&m, "blue", "http"), BLUE_OK as f64 + 1.0);
    assert_eq!(duration_count(&m, "blue", "websocket"), 1.0);
    assert_eq!(duration_count(&m, "green", "http"), GREEN_OK as f64);
    assert_eq!(duration_count(&m, "green", "websocket"), 1.0);
    // Stream ends: one drained gracefully on blue, one closed by its client on green.
    for s in &m.family("switchyard_stream_closes_total").samples {
        let key = (s.labels["color"].as_str(), s.labels["reason"].as_str());
        let want = match key {
            ("blue", "drain_graceful") | ("green", "client") => 1.0,
            _ => 0.0,
        };
        assert_eq!(s.value, want, "stream_closes_total{key:?}");
    }
    for s in m
        .family("switchyard_open_streams")
        .samples
        .iter()
        .chain(&m.family("switchyard_draining_streams").samples)
    {
        assert_eq!(s.value, 0.0, "{} {:?}", s.name, s.labels);
    }
    assert_eq!(
        m.value("switchyard_active_color", &[("color", "green")]),
        1.0
    );
    assert_eq!(
        m.value("switchyard_active_color", &[("color", "blue")]),
        0.0
    );
    assert_eq!(
        m.value("switchyard_route_generation", &[]),
        generation(&env).await
    );
    for s in &m.family("switchyard_route_changes_total").samples {
        let want = match s.labels["action"].as_str() {
            "startup" | "flip" => 1.0,
            _ => 0.0,
        };
        assert_eq!(s.value, want, "route_changes_total{:?}", s.labels);
    }
    assert_eq!(
        m.value(
            "switchyard_upstream_healthy",
            &[("color", "blue"), ("upstream", &blue_url)]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "switchyard_upstream_healthy",
            &[("color", "green"), ("upstream", &green_url)]
        ),
        1.0
    );
    assert_eq!(
        m.family("switchyard_upstream_healthy").samples.len(),
        2,
        "one per upstream"
    );
    assert_no_upstream_errors(&m, &upstreams);
    assert!(bytes(&m, "blue", "to_upstream") >= (BLUE_OK * HTTP_BODY + 2 * AUDIO_CHUNK) as f64);
    assert!(bytes(&m, "green", "to_upstream") >= (GREEN_OK * HTTP_BODY + AUDIO_CHUNK) as f64);
    assert!(bytes(&m, "blue", "to_client") > 0.0);
    assert!(bytes(&m, "green", "to_client") > 0.0);
    assert!(
        m.value("switchyard_connections", &[("listener", "admin")]) >= 1.0,
        "this scrape's own connection"
    );
}

#[tokio::test]
async fn a_dead_pool_member_counts_connect_errors() {
    // Health probes would mark the dead member unhealthy before traffic reaches it; without
    // them only live traffic judges, and `fall = 1` takes it out after its first failure.
    let builder = EnvBuilder {
        health: "mode = \"off\"\ninterval = \"1h\"\nfall = 1",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("addr"))
    };
    let live = env.blue[0].url();
    env.write_config(
        &builder,
        &format!("\"{live}\", \"{dead}\""),
        &format!("\"{}\"", env.green[0].url()),
    );
    env.reload().await;
    let upstreams = pool_urls(&env).await;
    assert!(upstreams.contains(&dead));
    let m = scrape(&env).await;
    assert_eq!(
        m.value(
            "switchyard_upstream_healthy",
            &[("color", "blue"), ("upstream", &dead)]
        ),
        1.0,
        "presumed healthy until traffic says otherwise"
    );
    assert_eq!(
        m.get(
            "switchyard_upstream_errors_total",
            &[("color", "blue"), ("upstream", &dead), ("kind", "connect")],
        ),
        Some(0.0),
        "an added upstream's error series start at zero"
    );

    // Each request picks the dead member half the time; it is retried on the live one.
    let errors = |m: &Exposition| {
        m.get(
            "switchyard_upstream_errors_total",
            &[("color", "blue"), ("upstream", &dead), ("kind", "connect")],
        )
        .unwrap_or(0.0)
    };
    let mut sent: u32 = 0;
    while errors(&scrape(&env).await) == 0.0 {
        assert!(sent < 200, "the dead member was never picked");
        assert_eq!(
            post(&env, "/v1/listen").await,
            (StatusCode::OK, "blue".into())
        );
        sent += 1;
    }
    for _ in 0..5 {
        assert_eq!(
            post(&env, "/v1/listen").await,
            (StatusCode::OK, "blue".into())
        );
        sent += 1;
    }

    let m = scrape_until(&env, "every request counted", |m| {
        requests(m, "blue", "http", "2xx") == f64::from(sent)
    })
    .await;
    assert_shape(&m, &upstreams);
    assert_eq!(errors(&m), 1.0, "out of the pool after its first failure");
    for s in &m.family("switchyard_upstream_errors_total").samples {
        let want = if s.labels["upstream"] == dead && s.labels["kind"] == "connect" {
            1.0
        } else {
            0.0
        };
        assert_eq!(s.value, want, "upstream_errors_total{:?}", s.labels);
    }
    assert_eq!(
        m.value(
            "switchyard_upstream_healthy",
            &[("color", "blue"), ("upstream", &dead)]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "switchyard_upstream_healthy",
            &[("color", "blue"), ("upstream", &live)]
        ),
        1.0
    );
    assert_eq!(
        requests(&m, "blue", "http", "5xx"),
        0.0,
        "a retried connect failure is one request, answered"
    );
    assert_eq!(duration_count(&m, "blue", "http"), f64::from(sent));
    assert_eq!(
        m.value("switchyard_route_changes_total", &[("action", "reload")]),
        1.0
    );
    assert_eq!(
        m.value("switchyard_route_generation", &[]),
        generation(&env).await
    );
}

#[test]
fn the_parser_refuses_malformed_expositions() {
    let good = "# HELP a_total A counter.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n\
                # HELP h A histogram.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\n\
                h_bucket{le=\"+Inf\"} 2\nh_sum 4.5\nh_count 2\n";
    let parsed = exposition::parse(good).expect("a good exposition");
    assert_eq!(parsed.value("a_total", &[("x", "1")]), 3.0);
    assert_eq!(parsed.value("h_count", &[]), 2.0);
    for (bad, why) in [
        ("a_total 1\n", "a sample before its TYPE"),
        ("# TYPE a counter\na 1", "no final newline"),
        ("# TYPE a counter\na{x=\"1\",x=\"2\"} 1\n", "label twice"),
        ("# TYPE a counter\na{x=1} 1\n", "unquoted label"),
        ("# TYPE a counter\na{x=\"\\t\"} 1\n", "unknown escape"),
        ("# TYPE a counter\na{__x=\"1\"} 1\n", "reserved label"),
        ("# TYPE a counter\na  1\n", "two spaces"),
        ("# TYPE a counter\na one\n", "not a number"),
        ("# TYPE a counter\na inf\n", "not Go's spelling"),
        ("# TYPE a counter\na -1\n", "negative counter"),
        ("# TYPE a counter\na 1\na 2\n", "the same series twice"),
        ("# TYPE a counter\nb 1\n", "a foreign sample"),
        ("# TYPE a counter\n# TYPE a counter\na 1\n", "TYPE twice"),
        (
            "# TYPE a counter\na 1\n# HELP a late\n",
            "HELP after samples",
        ),
        (
            "# TYPE a counter\na 1\n# TYPE b gauge\nb 1\n# TYPE a counter\n",
            "a family split",
        ),
        ("# TYPE a counter\n# a comment\na 1\n", "a free comment"),
        ("# TYPE a meter\na 1\n", "an unknown type"),
        ("# HELP a help\na 1\n", "HELP without TYPE"),
        (
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
            "no +Inf",
        ),
        (
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "not cumulative",
        ),
        (
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
            "+Inf differs from _count",
        ),
        ("# TYPE h histogram\nh 1\n", "a bare histogram sample"),
    ] {
        assert!(exposition::parse(bad).is_err(), "accepted ({why}): {bad:?}");
    }
}

/// A WebSocket handshake Switchyard refuses itself (no key or a bad one; a version other
/// than 13; a body) is a routed answer, with the colour header, and counted as one. Over
/// HTTP/1.0 the upgrade is ignored (RFC 9110 §7.8): a plain request.
#[tokio::test]
async fn a_refused_websocket_handshake_is_counted() {
    let env = EnvBuilder::default().start().await;
    let handshake = |version: &'static str, key: Option<&'static str>| {
        let mut req = Request::get(env.proxy_url("/v1/listen"))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", version);
        if let Some(key) = key {
            req = req.header("sec-websocket-key", key);
        }
        req.body(Full::new(Bytes::new())).expect("request")
    };
    let key = Some("dGhlIHNhbXBsZSBub25jZQ==");
    let mut http_1_0 = handshake("13", key);
    *http_1_0.version_mut() = http::Version::HTTP_10;
    let with_a_body = handshake("13", key).map(|_| Full::new(Bytes::from_static(b"0123456789")));
    for (what, req) in [
        (
            "a key that is not 16 bytes",
            handshake("13", Some("not-base64!!")),
        ),
        ("a body", with_a_body),
    ] {
        let refused = env.client.request(req).await.expect("answer");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(color_of(&refused), "blue", "{what}");
    }
    // The stub answers a plain GET of its WebSocket path with 400.
    let plain = env.client.request(http_1_0).await.expect("answer");
    assert_eq!(plain.status(), StatusCode::BAD_REQUEST);
    assert_eq!(color_of(&plain), "blue");
    assert_eq!(env.blue[0].state.ws_open_now(), 0);
    let old = env
        .client
        .request(handshake("8", Some("dGhlIHNhbXBsZSBub25jZQ==")))
        .await
        .expect("answer");
    assert_eq!(old.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(old.headers()["sec-websocket-version"], "13");
    assert_eq!(color_of(&old), "blue");
    let keyless = env
        .client
        .request(handshake("13", None))
        .await
        .expect("answer");
    assert_eq!(keyless.status(), StatusCode::BAD_REQUEST);
    assert_eq!(color_of(&keyless), "blue");
    let m = scrape(&env).await;
    assert_eq!(requests(&m, "blue", "websocket", "4xx"), 4.0);
    assert_eq!(requests(&m, "blue", "http", "4xx"), 1.0);
}
