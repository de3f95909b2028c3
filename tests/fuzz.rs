//! Property tests on untrusted input: config files and admin requests. Bounded case
//! counts keep them inside `cargo test`; the properties are "no panic, a clear refusal".

mod support;

use std::path::Path;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use support::*;
use switchyard::config::Config;

const VALID: &str = r#"[listen]
proxy = "127.0.0.1:8080"
preview = "127.0.0.1:8081"
admin = "127.0.0.1:9901"
[pools]
blue = ["http://127.0.0.1:9001", "https://10.0.0.2:8443"]
green = ["http://127.0.0.1:9002"]
[routing]
initial = "green"
[drain]
timeout = "30m"
grace = "10s"
[health]
mode = "http"
interval = "2s"
rise = 2
fall = 3
[limits]
max_connections = 100
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text: parsed or refused with a field and a reason, never a panic.
    #[test]
    fn config_parsing_never_panics(text in ".{0,400}") {
        match Config::parse(Path::new("fuzz.toml"), &text) {
            Ok(_) => {}
            Err(e) => {
                prop_assert_eq!(e.file.as_str(), "fuzz.toml");
                prop_assert!(!e.field.is_empty() && !e.reason.is_empty());
            }
        }
    }

    /// A valid config with one byte changed, removed or a line dropped: same property.
    #[test]
    fn mutated_configs_are_refused_cleanly(pos in 0usize..VALID.len(), byte in any::<u8>(), op in 0u8..3) {
        let mut bytes = VALID.as_bytes().to_vec();
        match op {
            0 => bytes[pos] = byte,
            1 => { bytes.remove(pos); }
            _ => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let lines: Vec<&str> = text.lines().collect();
                let drop = pos % lines.len();
                bytes = lines.iter().enumerate().filter(|(i, _)| *i != drop).map(|(_, l)| *l).collect::<Vec<_>>().join("\n").into_bytes();
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = Config::parse(Path::new("fuzz.toml"), &text) {
            prop_assert!(!e.field.is_empty() && !e.reason.is_empty(), "{}", e);
        }
    }
}

#[test]
fn the_valid_fuzz_seed_is_valid() {
    Config::parse(Path::new("fuzz.toml"), VALID).expect("the seed parses");
}

/// Admin calls with arbitrary bodies and paths: 2xx or 4xx, never 5xx, never a crash.
#[tokio::test]
async fn admin_requests_never_fail_on_the_server_side() {
    let env = EnvBuilder::default().start().await;
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    let strategy = (
        prop_oneof![Just("POST"), Just("GET"), Just("PUT"), Just("DELETE")],
        prop_oneof![
            Just("/flip".to_owned()),
            Just("/rollback".to_owned()),
            Just("/commit".to_owned()),
            Just("/reload".to_owned()),
            Just("/status".to_owned()),
            Just("/history".to_owned()),
            "/drain/wait\\?color=[a-z]{0,6}&timeout=[0-9a-z]{0,4}",
            "/[a-z/%?=&]{0,20}",
        ],
        prop_oneof![
            Just(String::new()),
            "\\PC{0,64}",
            Just(r#"{"to":"green","force":true,"drain_timeout":"1s","reason":"x"}"#.to_owned()),
            Just(r#"{"to":"purple"}"#.to_owned()),
            Just(r#"{"expect_generation":-1}"#.to_owned()),
            Just(r#"{"drain_timeout":"forever"}"#.to_owned()),
            Just(r#"{"reason":null,"force":"yes"}"#.to_owned()),
        ],
        any::<bool>(),
    );
    let mut cases: Vec<(&str, String, String, bool)> = Vec::new();
    for _ in 0..300 {
        cases.push(strategy.new_tree(&mut runner).expect("case").current());
    }
    for (method, path, body, with_token) in cases {
        let mut req = Request::builder().method(method).uri(env.admin_url(&path));
        if with_token {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        let Ok(req) = req.body(Full::new(Bytes::from(body.clone()))) else {
            continue;
        };
        let response = tokio::time::timeout(PATIENCE, env.client.request(req))
            .await
            .expect("in time")
            .expect("an answer");
        let status = response.status();
        assert!(
            !status.is_server_error(),
            "{method} {path} {body:?} → {status}"
        );
    }
    // And the server is still fine.
    assert_eq!(env.admin_get("/healthz").await.0, http::StatusCode::OK);
}
