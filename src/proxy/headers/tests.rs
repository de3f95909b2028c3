//! Unit tests of the header rewrites: forwarding headers, hop-by-hop fields, trailers and
//! client keys.

use super::*;

#[test]
fn rewrites_forwarding_headers() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-trace"),
    );
    h.insert("x-trace", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.append("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
    h.append("x-forwarded-for", HeaderValue::from_static("10.2.2.2"));
    h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    h.insert(header::HOST, HeaderValue::from_static("api.example:8080"));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Token abc"));
    h.insert("dg-thing", HeaderValue::from_static("x"));
    to_upstream(
        &mut h,
        "127.0.0.9".parse().expect("ip"),
        false,
        Some(HeaderValue::from_static("api.example:8080")),
    );
    assert!(h.get("x-trace").is_none());
    assert!(h.get("keep-alive").is_none());
    assert!(h.get(header::CONNECTION).is_none());
    assert!(h.get(header::TE).is_none());
    assert!(h.get(header::HOST).is_none());
    assert_eq!(h["x-forwarded-for"], "10.1.1.1, 10.2.2.2, 127.0.0.9");
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example:8080");
    assert_eq!(h[header::AUTHORIZATION], "Token abc");
    assert_eq!(h["dg-thing"], "x");
}

#[test]
fn each_hop_by_hop_header_alone_is_stripped() {
    let hop_by_hop = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ];
    for name in &hop_by_hop {
        let mut h = HeaderMap::new();
        h.insert(name.clone(), HeaderValue::from_static("x"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get(name).is_none(), "{name} was kept");
        assert_eq!(h["x-kept"], "1");
    }
    for name in ["content-length", "host", "x-connection", "tes", "trailer"] {
        let name = HeaderName::from_static(name);
        assert!(!is_hop_by_hop(&name), "{name}");
    }
}

#[test]
fn trailers_keep_only_what_may_be_a_trailer_field() {
    let mut t = HeaderMap::new();
    for (name, value) in [
        ("x-digest", "abc"),
        ("connection", "close, x-named"),
        ("x-named", "1"),
        ("keep-alive", "5"),
        ("transfer-encoding", "chunked"),
        ("content-length", "99"),
        ("host", "evil"),
        ("trailer", "x-digest"),
        ("server-timing", "db;dur=53"),
    ] {
        t.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    strip_from_trailers(&mut t);
    let kept: Vec<&str> = t.keys().map(|n| n.as_str()).collect();
    assert_eq!(kept, ["x-digest", "server-timing"]);
}

#[test]
fn finds_client_keys() {
    let mut h = HeaderMap::new();
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Token k1"));
    assert_eq!(client_keys(&h), [Some(&b"k1"[..]), None]);
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k2"));
    assert_eq!(client_keys(&h), [Some(&b"k2"[..]), None]);
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("x-deepgram-session-id, abc, token, k3"),
    );
    assert_eq!(client_keys(&h), [Some(&b"k2"[..]), Some(&b"k3"[..])]);
    assert_eq!(session_id(&h).as_deref(), Some("abc"));
    h.remove(header::AUTHORIZATION);
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("token"),
    );
    assert_eq!(client_keys(&h), [None, None]);
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
    assert_eq!(client_keys(&h), [None, None]);
}
