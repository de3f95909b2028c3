//! Keeps `deploy/openapi.yaml` true: its operations are exactly the routes the admin API
//! serves (`switchyard::admin::ROUTES`, from which the router is built), each answers on a
//! running server, the documented request fields are the accepted ones, and real answers
//! match the documented schemas.

mod support;

use std::collections::BTreeSet;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Env, EnvBuilder, TOKEN, send_json};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/openapi.yaml is readable");
    serde_norway::from_str(&text).expect("deploy/openapi.yaml is YAML with string keys")
}

/// Every (METHOD, path) the file documents.
fn operations(spec: &Value) -> BTreeSet<(String, String)> {
    spec["paths"]
        .as_object()
        .expect("paths is a map")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item is a map")
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

/// Follows `$ref` (local references only).
fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local references: {reference}"));
            let target = spec
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling reference {reference}"));
            resolve(spec, target)
        }
        None => schema,
    }
}

/// Checks `value` against the parts of an OpenAPI 3.0 schema this file uses: `$ref`,
/// `allOf`, `type`, `nullable`, `enum`, `required`, `properties`,
/// `additionalProperties: false` and `items`. Returns what does not match.
fn violations(spec: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let schema = resolve(spec, schema);
    let mut out = Vec::new();
    if value.is_null() && schema["nullable"] == true {
        return out;
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(violations(spec, part, value, at));
    }
    if let Some(ty) = schema["type"].as_str() {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => panic!("unexpected type {other}"),
        };
        if !ok {
            out.push(format!("{at}: expected {ty}, got {value}"));
            return out;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(object) = value.as_object() {
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().expect("required names are strings");
            if !object.contains_key(key) {
                out.push(format!("{at}: missing required `{key}`"));
            }
        }
        let properties = schema["properties"].as_object();
        for (key, v) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(s) => out.extend(violations(spec, s, v, &format!("{at}.{key}"))),
                None if schema["additionalProperties"] == false => {
                    out.push(format!("{at}: `{key}` is not documented"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            out.extend(violations(spec, items, v, &format!("{at}[{i}]")));
        }
    }
    out
}

/// The JSON schema the file documents for `method path` answering `status`.
fn response_schema<'a>(spec: &'a Value, method: &str, path: &str, status: u16) -> &'a Value {
    let operation = &spec["paths"][path][method.to_lowercase()];
    let response = resolve(spec, &operation["responses"][status.to_string()]);
    assert!(
        response.is_object(),
        "{method} {path}: {status} is not documented"
    );
    &response["content"]["application/json"]["schema"]
}

fn assert_matches(spec: &Value, method: &str, path: &str, status: StatusCode, body: &Value) {
    let schema = response_schema(spec, method, path, status.as_u16());
    let problems = violations(spec, schema, body, "$");
    assert!(
        problems.is_empty(),
        "{method} {path} {status} does not match the file: {problems:#?}\n{body}"
    );
}

async fn call(
    env: &Env,
    method: &str,
    path: &str,
    token: bool,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("a method"))
        .uri(env.admin_url(path));
    if token {
        req = req.header("authorization", format!("Bearer {TOKEN}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
        .expect("request");
    send_json(&env.client, req).await
}

#[test]
fn documented_operations_are_exactly_the_served_routes() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.0.3");
    let served: BTreeSet<(String, String)> = switchyard::admin::ROUTES
        .iter()
        .map(|&(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(operations(&spec), served);
}

#[test]
fn mutating_operations_need_the_bearer_token() {
    let spec = spec();
    let scheme = &spec["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    for (method, path) in operations(&spec) {
        let op = &spec["paths"][&path][method.to_lowercase()];
        if method == "POST" {
            assert_eq!(
                op["security"],
                json!([{"bearerAuth": []}]),
                "{method} {path}"
            );
            assert!(
                op["responses"]["401"].is_object(),
                "{method} {path} documents 401"
            );
        } else {
            assert!(op.get("security").is_none(), "{method} {path} is open");
        }
    }
    let error = &spec["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["error", "message"]));
}

#[tokio::test]
async fn every_documented_operation_answers() {
    let spec = spec();
    let env = EnvBuilder::default().start().await;
    // The probe tells a missing route from a served one.
    assert_eq!(
        call(&env, "GET", "/no-such-route", false, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&env, "DELETE", "/status", false, None).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    for (method, path) in operations(&spec) {
        let (status, body) = call(&env, &method, &path, false, None).await;
        assert_ne!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {body}"
        );
        assert!(
            spec["paths"][&path][method.to_lowercase()]["responses"][status.as_str()].is_object(),
            "{method} {path} answered {status}, which the file does not document"
        );
    }
}

#[tokio::test]
async fn documented_request_fields_are_the_accepted_ones() {
    let spec = spec();
    let env = EnvBuilder::default().start().await;
    for (method, path) in operations(&spec) {
        let op = &spec["paths"][&path][method.to_lowercase()];
        let Some(schema) = op["requestBody"]["content"]["application/json"]
            .get("schema")
            .map(|s| resolve(&spec, s))
        else {
            if method == "POST" {
                // No documented body: any body is refused.
                let (status, body) = call(&env, &method, &path, true, Some(r#"{"a": 1}"#)).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {body}");
            }
            continue;
        };
        assert_eq!(schema["additionalProperties"], false, "{path} is strict");
        let properties = schema["properties"].as_object().expect("properties");
        for field in properties.keys() {
            // An object is the wrong type for every field, so nothing is applied; the
            // refusal must be about the type, not an unknown field.
            let body = json!({ field: {"wrong": [1]} }).to_string();
            let (status, answer) = call(&env, &method, &path, true, Some(&body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {field}: {answer}");
            let message = answer["message"].as_str().expect("a message");
            assert!(
                !message.contains("unknown field"),
                "{path} does not accept documented `{field}`: {message}"
            );
        }
        let (status, answer) =
            call(&env, &method, &path, true, Some(r#"{"undocumented": 1}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("unknown field")),
            "{path}: {answer}"
        );
    }
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["generation"], 1, "nothing was applied");
}

#[tokio::test]
async fn answers_match_the_documented_schemas() {
    let spec = spec();
    let env = EnvBuilder::default().start().await;
    for path in ["/status", "/history", "/healthz", "/readyz"] {
        let (status, body) = env.admin_get(path).await;
        assert_matches(&spec, "GET", path, status, &body);
    }
    let (status, body) = env.admin_get("/drain/wait?color=green&timeout=1s").await;
    assert_matches(&spec, "GET", "/drain/wait", status, &body);
    let (status, body) = env.admin_get("/drain/wait?color=purple").await;
    assert_matches(&spec, "GET", "/drain/wait", status, &body);

    let (status, body) = call(&env, "POST", "/flip", false, None).await;
    assert_matches(&spec, "POST", "/flip", status, &body);
    let big = format!("{{\"reason\": \"{}\"}}", "x".repeat(100_000));
    let (status, body) = call(&env, "POST", "/commit", true, Some(&big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_matches(&spec, "POST", "/commit", status, &body);
    let (status, body) = env.admin_post("/rollback", None).await;
    assert_matches(&spec, "POST", "/rollback", status, &body);
    let (status, body) = env
        .admin_post("/flip", Some(json!({"to": "green", "reason": "schema"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_matches(&spec, "POST", "/flip", status, &body);
    let (status, body) = env
        .admin_post("/flip", Some(json!({"expect_generation": 1})))
        .await;
    assert_matches(&spec, "POST", "/flip", status, &body);
    let (status, body) = env.admin_post("/rollback", None).await;
    assert_matches(&spec, "POST", "/rollback", status, &body);
    let (status, body) = env.admin_post("/commit", None).await;
    assert_matches(&spec, "POST", "/commit", status, &body);
    let (status, body) = env.admin_post("/reload", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_matches(&spec, "POST", "/reload", status, &body);
    let (status, body) = env.admin_get("/history").await;
    assert_matches(&spec, "GET", "/history", status, &body);
    let (status, body) = env.admin_get("/status").await;
    assert_matches(&spec, "GET", "/status", status, &body);

    let metrics = support::get(&env.client, &env.admin_url("/metrics")).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]["text/plain"].is_object()
    );
}
