//! Unit tests of `ctl`: its human output of the admin API's answers, and its query strings.

use super::*;

#[test]
fn status_names_the_etcd_stores_sync_and_replicas() {
    let status = json!({"active": "blue", "colors": {}, "store": {
        "kind": "etcd", "revision": 42, "in_sync": false,
        "replicas": [{"id": "proxy-a", "generation": 7}, {"id": "proxy-b", "generation": 6}]}});
    let text = human(&Command::Status, &status);
    assert!(
        text.contains("store: etcd  revision: 42  NOT IN SYNC  replicas: proxy-a@7 proxy-b@6"),
        "{text}"
    );
    let file = json!({"active": "blue", "colors": {}, "store": {"kind": "file"}});
    assert!(!human(&Command::Status, &file).contains("store"));
    let broken = json!({"active": "blue", "colors": {}, "store": {
        "kind": "etcd", "revision": 42, "in_sync": false, "replicas": [],
        "problem": "etcd key /k: not a valid route state"}});
    let text = human(&Command::Status, &broken);
    assert!(
        text.contains("\n  problem: etcd key /k: not a valid route state"),
        "{text}"
    );
}

/// What the runbook tells operators to watch shows without `--json`: an upstream a
/// reload removed, with its deadline, and a proxy shutting down.
#[test]
fn status_shows_removed_upstreams_and_a_shutdown() {
    let status = json!({"active": "green", "shutting_down": true,
        "shutdown_deadline": "2026-12-06T09:00:00Z", "colors": {"blue": {
        "state": "draining", "open_streams": 1, "in_flight": 0, "upstreams": [
            {"url": "http://10.0.0.2:8080", "healthy": true, "health": "Ready",
             "open_streams": 0, "in_flight": 0},
            {"url": "http://10.0.0.1:8080", "healthy": true, "health": "Ready",
             "open_streams": 1, "in_flight": 0, "removed": true,
             "drain_deadline": "2026-12-06T08:30:00Z"}]}},
        "store": {"kind": "file"}});
    let text = human(&Command::Status, &status);
    assert!(
        text.contains("SHUTTING DOWN: listeners closed, streams drain until 2026-12-06T09:00:00Z"),
        "{text}"
    );
    assert!(
        text.contains(
            "  http://10.0.0.1:8080  healthy  (Ready)  streams: 1  in flight: 0  REMOVED, drains by 2026-12-06T08:30:00Z\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("  http://10.0.0.2:8080  healthy  (Ready)  streams: 0  in flight: 0\n"),
        "{text}"
    );
}

/// Text an upstream or a caller chose reaches the terminal with its control characters
/// escaped: a `system_health` of "\r\x1b[2K ... healthy" cannot repaint its line.
#[test]
fn status_escapes_control_characters() {
    let status = json!({"active": "blue", "colors": {"blue": {
        "state": "active", "open_streams": 0, "in_flight": 0, "upstreams": [
            {"url": "http://10.0.0.2:8080", "healthy": false,
             "health": "\r\u{1b}[2K  http://10.0.0.2:8080  healthy  (Healthy",
             "open_streams": 0, "in_flight": 0}]}},
        "store": {"kind": "file"}});
    let text = human(&Command::Status, &status);
    assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
    assert!(
        text.contains("UNHEALTHY  (\\r\\u{1b}[2K  http://10.0.0.2:8080  healthy  (Healthy)"),
        "{text}"
    );
    let history = json!({"history": [{"generation": 2, "action": "flip", "from": "blue",
        "to": "green", "at": "2026-12-06T08:00:00Z", "reason": "ok\u{1b}[31m"}]});
    let text = human(&Command::History, &history);
    assert!(text.contains("(ok\\u{1b}[31m)"), "{text}");
}

/// The counts read the same whatever they are ("1 open streams" was the old line).
#[test]
fn wait_drained_names_what_is_left() {
    let command = Command::WaitDrained {
        color: "blue".into(),
        timeout: "60s".into(),
    };
    let left = json!({"drained": false, "open_streams": 1, "in_flight": 2});
    assert_eq!(
        human(&command, &left),
        "blue is not drained yet: open streams: 1, requests in flight: 2\n"
    );
    let done = json!({"drained": true});
    assert_eq!(
        human(&command, &done),
        "blue is drained: no requests, no streams\n"
    );
}

#[test]
fn query_values_are_percent_encoded() {
    assert_eq!(query_value("1h 30m"), "1h%2030m");
    assert_eq!(query_value("blue&timeout=1s"), "blue%26timeout%3D1s");
    assert_eq!(query_value("60s"), "60s");
}
