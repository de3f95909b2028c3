//! The edge of the proxy: TLS termination (HTTP/1.1, h2 by ALPN, wss) and certificate
//! reload, client keys, and clients that never finish their request headers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Cert {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn self_signed() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    Cert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

fn write_cert(dir: &std::path::Path, cert: &Cert) {
    std::fs::write(dir.join("server.crt"), &cert.cert_pem).expect("cert");
    std::fs::write(dir.join("server.key"), &cert.key_pem).expect("key");
}

fn client_config(trusted: &Cert) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.der.clone()).expect("root");
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A fresh HTTP/1.1-over-TLS client trusting only `trusted` (no pooled connections shared
/// with other clients, so each one sees the certificate served at its connect).
fn https_client(trusted: &Cert) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(trusted))
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector)
}

fn tls_builder(dir: &std::path::Path) -> EnvBuilder {
    EnvBuilder {
        extra: format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        ),
        ..Default::default()
    }
}

/// Starts an env whose proxy terminates TLS with `cert`; the files live in `certs`.
async fn tls_env(certs: &tempfile::TempDir, cert: &Cert) -> Env {
    write_cert(certs.path(), cert);
    tls_builder(certs.path()).start().await
}

/// A session resumes across a reload (which builds a new TLS config): returning clients
/// do not all make a full handshake at once after each reload.
#[tokio::test]
async fn tls_sessions_resume_across_a_reload() {
    let certs = tempfile::tempdir().expect("tempdir");
    let cert = self_signed();
    let env = tls_env(&certs, &cert).await;
    // One client config, and with it one client session cache, for every connection.
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("TLS 1.2")
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der.clone()).expect("root");
        roots
    })
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = || async {
        let tcp = tokio::net::TcpStream::connect(env.app().proxy_addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("TLS");
        tls.get_ref().1.handshake_kind()
    };
    assert_eq!(handshake().await, Some(rustls::HandshakeKind::Full));
    assert_eq!(handshake().await, Some(rustls::HandshakeKind::Resumed));
    env.reload().await;
    assert_eq!(
        handshake().await,
        Some(rustls::HandshakeKind::Resumed),
        "after the reload"
    );
}

/// A client speaking plain HTTP to the TLS listener gets a 400 that says so, not a TLS
/// alert its HTTP library reports as garbage.
#[tokio::test]
async fn plain_http_on_the_tls_listener_is_told_to_use_tls() {
    let certs = tempfile::tempdir().expect("tempdir");
    let env = tls_env(&certs, &self_signed()).await;
    let response = get(&env.client, &env.proxy_url("/v1/status")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let json: serde_json::Value = serde_json::from_slice(response.body()).expect("JSON");
    assert_eq!(json["error"], "tls_required", "{json}");
    assert_eq!(json["err_code"], json["error"], "{json}");
    assert_eq!(json["err_msg"], json["message"], "{json}");

    // A client that sends a whole upload before it reads still reads the answer: the
    // socket lingers, taking what comes, instead of resetting the answer away.
    use tokio::io::AsyncWriteExt;
    const LEN: usize = 4 * 1024 * 1024;
    let mut raw = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    let head = format!("POST /v1/listen HTTP/1.1\r\nhost: x\r\ncontent-length: {LEN}\r\n\r\n");
    raw.write_all(head.as_bytes()).await.expect("head");
    // The answer has come (and the proxy's side is shut) before the upload goes on.
    raw.peek(&mut [0u8; 1]).await.expect("the answer comes");
    let text = upload_then_read_answer(&mut raw, LEN).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("tls_required"), "{text}");
}

/// A TLS handshake under way does not hold up a shutdown, however long
/// header_read_timeout is: neither a client that sent nothing nor one that sent half a
/// ClientHello.
#[tokio::test]
async fn shutdown_does_not_wait_for_tls_handshakes_under_way() {
    let certs = tempfile::tempdir().expect("tempdir");
    let mut env = tls_env(&certs, &self_signed()).await;
    set_limit(&env, "header_read_timeout = \"1h\"").await;
    let addr = env.app().proxy_addr;
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // A TLS record header announcing a 512-byte handshake message, and 4 bytes of it.
    tokio::io::AsyncWriteExt::write_all(
        &mut half,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0, 1, 0xfc],
    )
    .await
    .expect("write");
    // Both are accepted (the connections gauge counts them) before the shutdown.
    eventually(|| async {
        env.metric_sum("switchyard_connections", &["listener=\"proxy\""]) == 2.0
    })
    .await;
    let app = env.app.take().expect("running");
    app.shutdown();
    tokio::time::timeout(PATIENCE, app.wait())
        .await
        .expect("shutdown finishes");
    closed_by_proxy(&mut silent).await.expect("silent: closed");
    closed_by_proxy(&mut half)
        .await
        .expect("half a ClientHello: closed");
}

#[tokio::test]
async fn tls_serves_http1_h2_by_alpn_and_wss_and_reloads_its_certificate() {
    let certs = tempfile::tempdir().expect("tempdir");
    let first = self_signed();
    let env = tls_env(&certs, &first).await;
    let url = format!(
        "https://localhost:{}/v1/listen",
        env.app().proxy_addr.port()
    );

    // HTTP/1.1 over TLS.
    let client = https_client(&first);
    let req = Request::post(&url)
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("request");
    let response = client.request(req).await.expect("answer over TLS");
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(color_of(&response), "blue");
    assert_eq!(
        env.blue[0].state.last_headers()["x-forwarded-proto"],
        "https"
    );

    // HTTP/2 chosen by ALPN.
    let mut config = client_config(&first);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the proxy offers h2 by ALPN"
    );
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::post(&url)
        .body(Full::new(Bytes::from_static(b"hello h2")))
        .expect("request");
    let response = sender.send_request(req).await.expect("h2 answer");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(color_of(&response), "blue");
    let json = json_body(response).await;
    assert_eq!(json["metadata"]["bytes"], 8);

    // A wss:// stream opened with the first certificate.
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(client_config(&first)));
    let ws_url = format!("wss://localhost:{}/v1/listen", env.app().proxy_addr.port());
    let (mut ws, response) = tokio_tungstenite::connect_async_tls_with_config(
        ws_url.into_client_request().expect("request"),
        None,
        false,
        Some(connector),
    )
    .await
    .expect("wss handshake");
    assert_eq!(response.headers()["x-switchyard-color"], "blue");
    assert!(
        support::answer_to_audio(&mut ws)
            .await
            .contains("\"Results\"")
    );

    // Reload with a new certificate: new connections get it, the old stream stays open.
    let second = self_signed();
    write_cert(certs.path(), &second);
    env.reload().await;
    let client = https_client(&second);
    let response = client
        .request(
            Request::get(url.replace("/v1/listen", "/v1/status"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("the new certificate is served to new connections");
    assert_eq!(response.status(), StatusCode::OK);
    let old_client = https_client(&first);
    assert!(
        old_client
            .request(
                Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .expect("request")
            )
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    // The old stream still takes audio.
    assert!(
        support::answer_to_audio(&mut ws)
            .await
            .contains("\"Results\"")
    );
    ws.close(None).await.expect("close");
}

fn auth_builder(dir: &std::path::Path) -> EnvBuilder {
    std::fs::write(dir.join("client-keys"), "# comment\nkey-one\nkey-two\n").expect("keys");
    EnvBuilder {
        extra: format!(
            "\n[client_auth]\nkeys_file = \"{}\"\n",
            dir.join("client-keys").display()
        ),
        ..Default::default()
    }
}

/// A keys file that lists no key (emptied or truncated by mistake) is refused by a
/// reload, naming the field, and the keys loaded before keep working.
#[tokio::test]
async fn a_keys_file_with_no_key_is_refused_and_the_old_keys_stay() {
    let keys = tempfile::tempdir().expect("tempdir");
    let env = auth_builder(keys.path()).start().await;
    for listing in ["", "# every key revoked\n\n"] {
        std::fs::write(keys.path().join("client-keys"), listing).expect("keys");
        let (status, body) = env.admin_post("/reload", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("client_auth.keys_file") && m.contains("no key")),
            "{body}"
        );
    }
    // A line no request could match (a comment after the key, the scheme pasted with
    // it) is refused by its number; the error does not repeat it, as it may be a key.
    for listing in ["key-one\nkey-three # ops team\n", "Token key-three\n"] {
        std::fs::write(keys.path().join("client-keys"), listing).expect("keys");
        let (status, body) = env.admin_post("/reload", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("client_auth.keys_file") && message.contains("has a space inside"),
            "{body}"
        );
        assert!(!message.contains("key-three"), "{body}");
    }
    let req = Request::post(env.proxy_url("/v1/listen"))
        .header("authorization", "Token key-one")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, _) = send_json(&env.client, req).await;
    assert_eq!(status, StatusCode::OK, "the old keys stay");
}

#[tokio::test]
async fn client_keys_are_required_in_every_accepted_form() {
    let keys = tempfile::tempdir().expect("tempdir");
    let env = auth_builder(keys.path()).start().await;
    let url = env.proxy_url("/v1/listen");
    let with_auth = |value: Option<&str>| {
        let mut req = Request::post(&url);
        if let Some(v) = value {
            req = req.header("authorization", v);
        }
        req.body(Full::new(Bytes::new())).expect("request")
    };
    for accepted in ["Token key-one", "Bearer key-two", "token key-one"] {
        let (status, _) = send_json(&env.client, with_auth(Some(accepted))).await;
        assert_eq!(status, StatusCode::OK, "{accepted}");
    }
    for refused in [
        None,
        Some("Token nope"),
        Some("Token key-on"),
        Some("Basic key-one"),
        Some("Token "),
    ] {
        let response = env
            .client
            .request(with_auth(refused))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{refused:?}");
        assert!(
            response.headers().get("x-switchyard-color").is_none(),
            "a 401 was not routed"
        );
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Token realm="switchyard", Bearer realm="switchyard""#
        );
        let body: serde_json::Value = serde_json::from_slice(
            &response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes(),
        )
        .expect("json");
        assert_eq!(body["error"], "unauthorized");
    }
    assert_eq!(
        env.blue[0].state.http_requests(),
        3,
        "only accepted requests reach the upstream"
    );
    // Not routed, so not in requests_total; counted per listener instead.
    let unauthorized = |listener: &str| {
        env.metric_sum(
            "switchyard_unauthorized_total",
            &[&format!("listener=\"{listener}\"")],
        )
    };
    assert_eq!(unauthorized("proxy"), 5.0);
    assert_eq!(unauthorized("admin"), 0.0);
    assert_eq!(env.metric_sum("switchyard_requests_total", &[]), 3.0);

    // Browsers: the key as the second subprotocol element; forwarded unchanged.
    let req = listen_request(&env, "token, key-two", None);
    let (mut ws, response) = tokio_tungstenite::connect_async(req)
        .await
        .expect("accepted handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "token");
    assert_eq!(
        env.blue[0].state.last_headers()["sec-websocket-protocol"],
        "token, key-two"
    );
    ws.close(None).await.expect("close");

    // The `bearer` form (a JWT there in Deepgram's use) is checked the same way.
    let req = listen_request(&env, "bearer, key-one", None);
    let (mut ws, response) = tokio_tungstenite::connect_async(req)
        .await
        .expect("accepted handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "bearer");
    ws.close(None).await.expect("close");
    assert_refused(listen_request(&env, "bearer, wrong", None)).await;

    // A listed key in the subprotocol lets the client in even when an Authorization
    // header (say, a stale one a library adds) names another.
    let req = listen_request(&env, "token, key-one", Some("Token stale"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("accepted handshake");
    ws.close(None).await.expect("close");

    assert_refused(listen_request(&env, "token, wrong", None)).await;
    assert_eq!(unauthorized("proxy"), 7.0, "refused handshakes count too");
}

/// An HTTP/2 client still sending its body when the 401 comes can finish sending it and
/// read the answer: the stream is not reset under it (a client that waits for window to
/// send the rest, as httpx does, would otherwise hang). Three times the stream's window,
/// so the rest must be read and dropped.
#[tokio::test]
async fn an_http2_upload_refused_401_can_finish_sending() {
    let keys = tempfile::tempdir().expect("tempdir");
    let env = auth_builder(keys.path()).start().await;
    let (status, json) = h2_answer_then_upload(&env, 3 << 20, usize::MAX, Duration::ZERO).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["error"], "unauthorized");
    assert_eq!(
        env.blue[0].state.http_requests(),
        0,
        "nothing went upstream"
    );
}

/// The same upload, slow (16 KiB every 300 ms for 6 s) on a connection whose idle timer
/// (`header_read_timeout`) is 1 s: the body still being read keeps the connection busy,
/// so it is not closed under the upload as an idle one would be.
#[tokio::test]
async fn a_slow_http2_upload_refused_401_keeps_its_connection() {
    let keys = tempfile::tempdir().expect("tempdir");
    let mut builder = auth_builder(keys.path());
    builder.extra = format!("header_read_timeout = \"1s\"\n{}", builder.extra);
    let env = builder.start().await;
    let pause = Duration::from_millis(300);
    let (status, json) = h2_answer_then_upload(&env, 20 * 16 * 1024, 16 * 1024, pause).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["error"], "unauthorized");
}

/// A `/v1/listen` handshake request offering `protocols`, with `authorization` if given.
/// A reload re-reads the keys file: a key added lets clients in, a key removed keeps
/// them out from then on, and a stream opened with the removed key runs on.
#[tokio::test]
async fn a_reload_rereads_the_client_keys() {
    let keys = tempfile::tempdir().expect("tempdir");
    let env = auth_builder(keys.path()).start().await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(listen_request(&env, "token, key-one", None))
            .await
            .expect("accepted handshake");

    std::fs::write(keys.path().join("client-keys"), "key-two\nkey-three\n").expect("keys");
    env.reload().await;

    let status_with = |key: &str| {
        let req = Request::get(env.proxy_url("/v1/status"))
            .header("authorization", format!("Token {key}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let client = env.client.clone();
        async move { client.request(req).await.expect("answer").status() }
    };
    assert_eq!(status_with("key-three").await, StatusCode::OK);
    assert_eq!(status_with("key-two").await, StatusCode::OK);
    assert_eq!(status_with("key-one").await, StatusCode::UNAUTHORIZED);

    // The stream opened with the removed key still takes audio.
    assert!(
        support::answer_to_audio(&mut ws)
            .await
            .contains("\"Results\"")
    );
    ws.close(None).await.expect("close");
}

/// Asserts that a handshake is refused 401.
async fn assert_refused(req: tokio_tungstenite::tungstenite::handshake::client::Request) {
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("a wrong key must refuse the handshake: {other:?}"),
    }
}

fn listen_request(
    env: &Env,
    protocols: &str,
    authorization: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = env
        .ws_url("/v1/listen")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().expect("value"));
    if let Some(auth) = authorization {
        req.headers_mut()
            .insert("authorization", auth.parse().expect("value"));
    }
    req
}

#[tokio::test]
async fn stalled_clients_do_not_block_others_and_are_closed_after_the_header_timeout() {
    let env = start_with_limit("header_read_timeout = \"2s\"").await;
    let mut stalled = Vec::new();
    for _ in 0..500 {
        let mut s = tokio::net::TcpStream::connect(env.app().proxy_addr)
            .await
            .expect("connect");
        tokio::io::AsyncWriteExt::write_all(
            &mut s,
            b"GET /v1/status HTTP/1.1\r\nhost: x\r\nx-half: ",
        )
        .await
        .expect("half a request");
        stalled.push(s);
    }
    let got = get(&env.client, &env.proxy_url("/v1/status")).await;
    assert_eq!(
        got.status(),
        StatusCode::OK,
        "a normal request is answered while 500 clients stall"
    );
    // Each stalled connection is closed by the proxy (EOF or a 408) once the timeout passes.
    for mut s in stalled {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
        )
        .await;
        assert!(
            read.is_ok(),
            "a stalled client is closed after the header timeout"
        );
    }
}

/// The admin listener bounds its clients as the proxy's does: one that sends no request
/// headers is closed after `limits.header_read_timeout`, and at most
/// `admin::MAX_CONNECTIONS` are open at once (the rest wait in the kernel's backlog), so
/// idle sockets on the admin port cannot use up the process's descriptors.
#[tokio::test]
async fn admin_clients_are_bounded_in_number_and_in_time() {
    let env = start_with_limit("header_read_timeout = \"1s\"").await;
    let admin = env.app().admin_addr;
    let open = || env.metric_sum("switchyard_connections", &["listener=\"admin\""]);
    let cap = switchyard::admin::MAX_CONNECTIONS;
    let mut silent = Vec::new();
    for _ in 0..cap + 8 {
        silent.push(
            tokio::net::TcpStream::connect(admin)
                .await
                .expect("connect"),
        );
    }
    eventually(|| async { open() >= cap as f64 }).await;
    assert_eq!(open(), cap as f64, "no more than the cap are accepted");
    // Every one is closed once its timeout passes, those held in the backlog after the
    // first ones leave.
    for mut s in silent {
        closed_by_proxy(&mut s)
            .await
            .expect("closed after the header timeout");
    }
    let (status, _) = env.admin_get("/status").await;
    assert_eq!(status, StatusCode::OK);
}

/// An admin request's body and its answer are bounded in time as its headers are, so a
/// client cannot hold one of the admin listener's connections by sending a body slowly
/// or by not reading; the token is checked before the body is waited for.
#[tokio::test]
async fn admin_bodies_and_answers_are_bounded_in_time() {
    let mut env = start_with_limit("header_read_timeout = \"1s\"").await;
    // A new client: the reload's connection keeps the timeout it was accepted with.
    env.client = http_client();
    let admin = env.app().admin_addr;
    let generation = env.admin_get("/status").await.1["generation"].clone();
    let head = |auth: &str| {
        format!("POST /flip HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 100\r\n\r\n{{")
    };

    // One byte of a hundred: 408, and the connection is closed.
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let with_token = head(&format!("Authorization: Bearer {TOKEN}\r\n"));
    tokio::io::AsyncWriteExt::write_all(&mut s, with_token.as_bytes())
        .await
        .expect("write");
    let answer = closed_by_proxy(&mut s)
        .await
        .expect("closed after the timeout");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"request_timeout""#), "{answer}");

    // Without the token the answer is 401 and the body is not waited for.
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    assert_eq!(send_and_read(&mut s, head(""), 12).await, b"HTTP/1.1 401");
    assert_eq!(env.admin_get("/status").await.1["generation"], generation);

    // Pipelined requests whose answers are never read, into a small receive buffer.
    let open = || env.metric_sum("switchyard_connections", &["listener=\"admin\""]);
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let mut s = socket.connect(admin).await.expect("connect");
    let requests = "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n".repeat(500);
    tokio::io::AsyncWriteExt::write_all(&mut s, requests.as_bytes())
        .await
        .expect("write");
    // Closed by the admin listener with the client still not reading, and so is every
    // other (the 401's, the test client's idle one).
    eventually(|| async { open() == 0.0 }).await;
    closed_by_proxy(&mut s)
        .await
        .expect("what was sent, then the end");
}

/// An admin answer its client reads slowly but steadily arrives whole: a `/history` of
/// over 100 KB into a 4 KiB receive buffer at about 20 KB/s, with header_read_timeout, the
/// answer's stall timer, at 1 s. (Readers of 10 KB/s pass here, of 5 KB/s not: progress
/// is counted in steps of the small send buffer.)
#[tokio::test]
async fn a_large_admin_answer_read_slowly_arrives_whole() {
    let env = start_with_limit("header_read_timeout = \"1s\"").await;
    let reason = "r".repeat(1000);
    for to in ["green", "blue"].iter().cycle().take(100) {
        let (status, body) = env
            .admin_post(
                "/flip",
                Some(serde_json::json!({ "to": to, "reason": reason })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let mut s = socket.connect(env.app().admin_addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /history HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    // A slow reader is what is tested, so the reads are paced: 2 KiB every 100 ms (ticks
    // a busy machine delays come in a burst after, so the rate holds).
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(100));
    let mut answer = Vec::new();
    for _ in 0..1000 {
        pace.tick().await;
        let mut chunk = [0u8; 2048];
        let n = tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read(&mut s, &mut chunk))
            .await
            .expect("read in time")
            .expect("read");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .parse()
        .expect("length");
    assert!(length > 100_000, "{length}");
    assert_eq!(body.len(), length, "the whole answer");
}

/// `/drain/wait` long-polls hold at most `admin::MAX_WAITERS` connections; beyond, a wait
/// is answered 429 at once, and the probes still answer.
#[tokio::test]
async fn drain_waits_take_at_most_half_the_admin_connections() {
    let env = EnvBuilder::default().start().await;
    // An open stream, so waits on blue wait.
    let (ws, _) = tokio_tungstenite::connect_async(env.ws_url("/v1/listen"))
        .await
        .expect("handshake");
    // One more than there is room for: that one, and only that one, is answered at once.
    let waits: Vec<_> = (0..=switchyard::admin::MAX_WAITERS)
        .map(|_| {
            let client = http_client();
            let req = Request::get(env.admin_url("/drain/wait?color=blue&timeout=1h"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            tokio::spawn(async move { send_json(&client, req).await })
        })
        .collect();
    let (first, _, waiting) =
        tokio::time::timeout(PATIENCE, futures_util::future::select_all(waits))
            .await
            .expect("a wait beyond the room is answered at once");
    let (status, body) = first.expect("wait");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "too_many_waiters", "{body}");
    let (status, _) = env.admin_get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    drop(ws);
    for wait in waiting {
        let (status, body) = tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("answered when the stream ends")
            .expect("wait");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["drained"], true, "{body}");
    }
    let (status, body) = env.admin_get("/drain/wait?color=blue&timeout=1ms").await;
    assert_eq!(status, StatusCode::OK, "the room is free again: {body}");
}

/// Writes `request` to `s` and reads the first `n` bytes of what comes back.
async fn send_and_read(s: &mut tokio::net::TcpStream, request: String, n: usize) -> Vec<u8> {
    tokio::io::AsyncWriteExt::write_all(s, request.as_bytes())
        .await
        .expect("write");
    let mut answer = vec![0u8; n];
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_exact(s, &mut answer),
    )
    .await
    .expect("answered in time")
    .expect("read");
    answer
}

/// Reads from `s` until the proxy closes it; `Err` if it is still open after `PATIENCE`.
async fn closed_by_proxy(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, &'static str> {
    let mut buf = Vec::new();
    match tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read_to_end(s, &mut buf)).await {
        Ok(_) => Ok(buf),
        Err(_) => Err("still open"),
    }
}

#[tokio::test]
async fn clients_that_never_send_a_request_are_closed_after_the_header_timeout() {
    let env = start_with_limit("header_read_timeout = \"1s\"").await;
    let addr = env.app().proxy_addr;
    // Nothing at all; three bytes that could still be the HTTP/2 preface; the HTTP/2
    // preface and SETTINGS with no request after them.
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut partial = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut partial, b"PRI")
        .await
        .expect("write");
    let mut h2_idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    tokio::io::AsyncWriteExt::write_all(&mut h2_idle, &preface)
        .await
        .expect("write");
    // A keep-alive connection that made one request and then stays quiet.
    let mut kept = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut kept, b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    for (name, s) in [
        ("silent", &mut silent),
        ("partial preface", &mut partial),
        ("HTTP/2 without a request", &mut h2_idle),
        ("idle keep-alive", &mut kept),
    ] {
        assert!(closed_by_proxy(s).await.is_ok(), "{name}: still open");
    }
    // A client that is served is not cut by the timer.
    let got = get(&env.client, &env.proxy_url("/v1/status")).await;
    assert_eq!(got.status(), StatusCode::OK);
}

type UploadBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// An HTTP/2 connection to the proxy with a `POST /v1/listen` upload open on it ("first"
/// sent; the stub answers once the body has ended).
struct OpenUpload {
    /// For more requests on the same connection.
    sender: hyper::client::conn::http2::SendRequest<UploadBody>,
    /// The rest of the upload, until `finish`.
    tx: Option<tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    answer: tokio::task::JoinHandle<hyper::Result<http::Response<hyper::body::Incoming>>>,
    /// The connection's task: it ends when the proxy closes the connection.
    ended: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl OpenUpload {
    async fn start(env: &Env) -> OpenUpload {
        let io = tokio::net::TcpStream::connect(env.app().proxy_addr)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("HTTP/2 handshake");
        let ended = tokio::spawn(conn);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let upload = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
            .boxed_unsync();
        let req = Request::post(env.proxy_url("/v1/listen"))
            .header("content-type", "application/octet-stream")
            .body(upload)
            .expect("request");
        let answer = tokio::spawn(sender.send_request(req));
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("sent");
        OpenUpload {
            sender,
            tx: Some(tx),
            answer,
            ended,
        }
    }

    /// Sends "last", ends the upload and checks the stub's answer: all 9 bytes came.
    async fn finish(&mut self) {
        let tx = self.tx.take().expect("not finished yet");
        tx.send(Ok(Frame::data(Bytes::from_static(b"last"))))
            .await
            .expect("sent");
        drop(tx);
        let response = tokio::time::timeout(PATIENCE, &mut self.answer)
            .await
            .expect("in time")
            .expect("task")
            .expect("the open upload is answered");
        assert_eq!(response.status(), StatusCode::OK);
        let json = json_body(response).await;
        assert_eq!(json["metadata"]["bytes"], 9, "{json}");
    }
}

/// An HTTP/2 connection outlives `header_read_timeout` while a request is open on it, and
/// takes new ones then; left idle for it, it is closed (GOAWAY), as an idle HTTP/1.1
/// keep-alive connection is.
#[tokio::test]
async fn an_http2_connection_is_kept_while_a_request_is_open_and_closed_once_idle() {
    let env = start_with_limit("header_read_timeout = \"1s\"").await;
    let addr = env.app().proxy_addr;
    let mut upload = OpenUpload::start(&env).await;
    // Three silent connections closed one after the other: three timeouts have passed,
    // more than the two in which an idle connection is closed.
    for _ in 0..3 {
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(
            closed_by_proxy(&mut silent).await.is_ok(),
            "silent: still open"
        );
    }
    // No GOAWAY came while the upload was open: the connection takes a new request.
    let status = Request::get(env.proxy_url("/v1/status"))
        .body(Full::new(Bytes::new()).boxed_unsync())
        .expect("request");
    let again = upload
        .sender
        .send_request(status)
        .await
        .expect("the same connection answers after the timeout");
    assert_eq!(again.status(), StatusCode::OK);
    drop(again);
    upload.finish().await;

    // Then idle: the proxy closes it.
    let closed = tokio::time::timeout(PATIENCE, upload.ended).await;
    assert!(closed.is_ok(), "an idle HTTP/2 connection is closed");
}

/// The HTTP/2 preface, an empty SETTINGS, and (with `request`) HEADERS on stream 1,
/// END_STREAM | END_HEADERS: GET http://x/v1/status in HPACK (:method GET, :scheme http,
/// :path from the static table with a literal value, :authority literal).
fn raw_h2_hello(request: bool) -> Vec<u8> {
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    if request {
        let mut block = vec![0x82, 0x86, 0x44, 10];
        block.extend_from_slice(b"/v1/status");
        block.extend_from_slice(&[0x41, 1, b'x']);
        hello.extend_from_slice(&[0, 0, block.len() as u8, 1, 5, 0, 0, 0, 1]);
        hello.extend_from_slice(&block);
    }
    hello
}

/// The (type, stream) of each whole HTTP/2 frame in `bytes`.
fn h2_frames(bytes: &[u8]) -> Vec<(u8, u32)> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        if rest.len() < 9 + len {
            break;
        }
        frames.push((
            rest[3],
            u32::from_be_bytes([rest[5] & 0x7f, rest[6], rest[7], rest[8]]),
        ));
        rest = &rest[9 + len..];
    }
    frames
}

/// Connects and sends `raw_h2_hello(request)`.
async fn raw_h2_client(env: &Env, request: bool) -> tokio::net::TcpStream {
    let mut io = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut io, &raw_h2_hello(request))
        .await
        .expect("write");
    io
}

/// An idle HTTP/2 connection whose client never answers the close (h2 sends its last
/// GOAWAY only after the client's PING answer) is dropped one timeout later.
#[tokio::test]
async fn an_idle_http2_client_that_ignores_the_close_is_dropped() {
    let env = start_with_limit("header_read_timeout = \"1s\"").await;
    let mut io = raw_h2_client(&env, true).await;
    // It reads what comes (the answer, then GOAWAY and PING) and answers nothing.
    let frames = h2_frames(&closed_by_proxy(&mut io).await.expect("dropped"));
    assert!(frames.contains(&(1, 1)), "answered first: {frames:?}");
    assert!(
        frames.iter().any(|&(kind, _)| kind == 7),
        "GOAWAY sent: {frames:?}"
    );
}

/// Shutdown does not wait out the drain for HTTP/2 clients that hold nothing open: one
/// that answered its request and ignores the close, and one that never sent a request,
/// are dropped one timeout later, as without a shutdown. A request still open runs on.
#[tokio::test]
async fn shutdown_drops_idle_http2_clients_that_ignore_the_close() {
    let mut env = start_with_limit("header_read_timeout = \"1s\"").await;
    let mut answered = raw_h2_client(&env, true).await;
    let mut silent = raw_h2_client(&env, false).await;
    let mut bytes = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while !h2_frames(&bytes).contains(&(1, 1)) {
            let mut chunk = [0u8; 4096];
            let n = tokio::io::AsyncReadExt::read(&mut answered, &mut chunk)
                .await
                .expect("read");
            assert!(n > 0, "closed before the answer");
            bytes.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the answer");
    // An upload open on another HTTP/2 connection.
    let mut upload = OpenUpload::start(&env).await;
    env.blue[0]
        .state
        .wait_until(|s| s.last_headers().contains_key("x-forwarded-for"))
        .await;

    // The drain is 30 minutes; the shutdown must not need it for the idle clients.
    let app = env.app.take().expect("running");
    app.shutdown();
    assert!(
        closed_by_proxy(&mut answered).await.is_ok(),
        "answered: still open"
    );
    assert!(
        closed_by_proxy(&mut silent).await.is_ok(),
        "silent: still open"
    );
    upload.finish().await;
    tokio::time::timeout(PATIENCE, app.wait())
        .await
        .expect("shutdown finishes");
}

/// A shutdown waits a few seconds at most for admin requests under way, however long
/// their own limits: here a body that stops coming with an hour's header_read_timeout.
#[tokio::test]
async fn shutdown_does_not_wait_long_for_admin_requests_under_way() {
    let mut env = start_with_limit("header_read_timeout = \"1h\"").await;
    let mut s = tokio::net::TcpStream::connect(env.app().admin_addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /flip HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n\
         Expect: 100-continue\r\nContent-Length: 100\r\n\r\n"
    );
    // hyper asks for the body once the handler reads it: the request is under way.
    assert_eq!(
        send_and_read(&mut s, head, 25).await,
        b"HTTP/1.1 100 Continue\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, b"{")
        .await
        .expect("write");
    let app = env.app.take().expect("running");
    app.shutdown();
    tokio::time::timeout(PATIENCE, app.wait())
        .await
        .expect("shutdown finishes");
    closed_by_proxy(&mut s)
        .await
        .expect("the request is dropped with the shutdown");
}

/// Starts an env, then sets one `[limits]` key by rewriting the config and reloading: limits
/// are read from the current table per connection, so a reload applies them.
async fn start_with_limit(setting: &str) -> Env {
    let env = EnvBuilder::default().start().await;
    set_limit(&env, setting).await;
    env
}

/// Sets one `[limits]` key of a running env by rewriting its config and reloading.
async fn set_limit(env: &Env, setting: &str) {
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let text = text.replace("[limits]\n", &format!("[limits]\n{setting}\n"));
    std::fs::write(&env.config_path, text).expect("config");
    env.reload().await;
}

#[tokio::test]
async fn beyond_max_connections_accepting_waits_and_nothing_is_refused() {
    let env = start_with_limit("max_connections = 2").await;

    // Two keep-alive connections, each answered once and then held open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = tokio::net::TcpStream::connect(env.app().proxy_addr)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/v1/status")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = sender
            .send_request(req)
            .await
            .expect("answered below the limit");
        response.into_body().collect().await.expect("body");
        held.push(sender);
    }
    // A third client connects (the kernel's backlog takes it) but is not served yet.
    let third = tokio::spawn({
        let client = http_client();
        let url = env.proxy_url("/v1/status");
        async move { get(&client, &url).await.status() }
    });
    // The absence of an answer can only be observed over some time; 300 ms is ample for a
    // request that would otherwise be answered in about a millisecond.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "the third connection waits while two are open"
    );
    drop(held.pop());
    let status = tokio::time::timeout(PATIENCE, third)
        .await
        .expect("served once a slot frees")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
}

/// A socket that lingers after its answer ended the connection (Switchyard reads and
/// drops what the client still sends, so a late byte does not reset the answer away)
/// still holds a descriptor: it counts in `switchyard_connections` and takes its place in
/// `max_connections` until it ends, and a client that sends nothing more is let go.
#[tokio::test]
async fn a_lingering_socket_counts_as_a_connection_until_it_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start_with_limit("max_connections = 1").await;
    let connections = || env.metric_sum("switchyard_connections", &["listener=\"proxy\""]);
    // A request hyper refuses: the 400 ends the connection, and Switchyard closes its side.
    let mut first = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    first
        .write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, first.read_to_end(&mut answer))
        .await
        .expect("the answer ends the connection")
        .expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The client has its answer and its end of stream; the socket is open still.
    assert_eq!(connections(), 1.0);
    let second = tokio::spawn({
        let client = http_client();
        let url = env.proxy_url("/v1/status");
        async move { get(&client, &url).await.status() }
    });
    // As in `beyond_max_connections_accepting_waits_and_nothing_is_refused`: 300 ms is
    // ample for a request answered in a millisecond, and far inside the 2 s a silent
    // client lingers.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second connection waits while the first lingers"
    );
    // The first client sends nothing more and does not close: it is let go by itself.
    let status = tokio::time::timeout(PATIENCE, second)
        .await
        .expect("served once the lingering socket is let go")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
    eventually(|| async { connections() == 0.0 }).await;
    drop(first);
}

/// A TLS front for a plain upstream: terminates TLS with `cert` and copies bytes both ways.
async fn tls_front(cert: &Cert, backend: std::net::SocketAddr) -> std::net::SocketAddr {
    let certs = vec![cert.der.clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(
        rustls_pemfile::private_key(&mut cert.key_pem.as_bytes())
            .expect("pem")
            .expect("a key")
            .secret_der()
            .to_vec(),
    )
    .expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstreams_are_reached_over_tls_with_the_configured_ca() {
    let cert = self_signed();
    let dir = tempfile::tempdir().expect("tempdir");
    // First a CA that did not sign the upstream's certificate.
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, self_signed().cert_pem).expect("ca file");
    let builder = EnvBuilder {
        health: "mode = \"deepgram\"\ninterval = \"200ms\"\nrise = 1\nfall = 1",
        extra: format!(
            "\n[upstream_tls]\nca_file = \"{}\"\n",
            dir.path().join("upstream-ca.pem").display()
        ),
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let front = tls_front(&cert, env.blue[0].addr).await;
    // The certificate names localhost, so the pool URL does too.
    env.write_config(
        &builder,
        &format!("\"https://localhost:{}\"", front.port()),
        &format!("\"{}\"", env.green[0].url()),
    );
    env.reload().await;
    let over_tls = || {
        Request::post(env.proxy_url("/v1/listen"))
            .body(Full::new(Bytes::from_static(b"over tls")))
            .expect("request")
    };
    let (status, json) = send_json(&env.client, over_tls()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(
        status["colors"]["blue"]["upstreams"][0]["health"], "unreachable",
        "the probe does not trust the upstream either"
    );

    // The right CA, in the same file: a reload applies it to requests and probes.
    std::fs::write(&ca_file, &cert.cert_pem).expect("ca file");
    env.reload().await;
    eventually(|| async {
        let (_, status) = env.admin_get("/status").await;
        status["colors"]["blue"]["upstreams"][0]["health"] == "Healthy"
    })
    .await;
    let (status, json) = send_json(&env.client, over_tls()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["metadata"]["stub"], "blue");
    assert_eq!(json["metadata"]["bytes"], 8);

    // A stream to a wss:// upstream.
    let (mut ws, response) = tokio_tungstenite::connect_async(env.ws_url("/v1/listen"))
        .await
        .expect("handshake");
    assert_eq!(response.headers()["x-switchyard-color"], "blue");
    assert!(
        support::answer_to_audio(&mut ws)
            .await
            .contains("\"Results\"")
    );
    ws.close(None).await.expect("close");

    // The health probe goes over TLS too: the upstream reads as healthy, not unreachable.
    eventually(|| async {
        let (_, status) = env.admin_get("/status").await;
        status["colors"]["blue"]["upstreams"][0]["health"] == "Healthy"
    })
    .await;
}

/// A reload that changes the upstream CA judges the https upstreams again before it
/// answers: with a CA that did not sign their certificate they are unhealthy at once, and a
/// flip right after is refused (409), not let through on the old CA's verdict. Probes are
/// 10 s apart, so only the reload's own can find it.
#[tokio::test]
async fn a_reload_that_changes_the_upstream_ca_judges_https_upstreams_again() {
    let cert = self_signed();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, &cert.cert_pem).expect("ca file");
    let builder = EnvBuilder {
        health: "mode = \"deepgram\"\ninterval = \"10s\"\nrise = 2\nfall = 3",
        extra: format!("\n[upstream_tls]\nca_file = \"{}\"\n", ca_file.display()),
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let front = tls_front(&cert, env.green[0].addr).await;
    env.write_config(
        &builder,
        &format!("\"{}\"", env.blue[0].url()),
        &format!("\"https://localhost:{}\"", front.port()),
    );
    let reloaded = env.reload().await;
    let green = &reloaded["colors"]["green"]["upstreams"][0];
    assert_eq!(green["health"], "Healthy", "{reloaded}");

    std::fs::write(&ca_file, self_signed().cert_pem).expect("another CA");
    let reloaded = env.reload().await;
    let green = &reloaded["colors"]["green"]["upstreams"][0];
    assert_eq!(green["healthy"], false, "{reloaded}");
    assert_eq!(green["health"], "unreachable", "{reloaded}");
    let (status, refused) = env
        .admin_post("/flip", Some(serde_json::json!({ "to": "green" })))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"], "target_unhealthy", "{refused}");
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(
        status["colors"]["blue"]["upstreams"][0]["health"], "Healthy",
        "a plain upstream keeps its verdict: {status}"
    );
}

/// A reload that raises `max_connections` lets a waiting connection in at once, without
/// waiting for one of those open to end.
#[tokio::test]
async fn raising_max_connections_by_reload_lets_a_waiting_connection_in() {
    let env = start_with_limit("max_connections = 1").await;
    let (_ws, _) = tokio_tungstenite::connect_async(env.ws_url("/v1/listen"))
        .await
        .expect("handshake");
    env.blue[0].state.wait_until(|s| s.ws_open_now() == 1).await;
    let second = tokio::spawn({
        let client = http_client();
        let url = env.proxy_url("/v1/status");
        async move { get(&client, &url).await.status() }
    });
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let raised = text.replace("max_connections = 1\n", "max_connections = 2\n");
    assert_ne!(raised, text);
    std::fs::write(&env.config_path, raised).expect("config");
    env.reload().await;
    let status = tokio::time::timeout(PATIENCE, second)
        .await
        .expect("served once the limit is raised, the stream still open")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn open_streams_count_toward_max_connections() {
    let env = start_with_limit("max_connections = 2").await;

    // Two upgraded streams: hyper is done with their connections, the sockets are not.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (ws, _) = tokio_tungstenite::connect_async(env.ws_url("/v1/listen"))
            .await
            .expect("handshake");
        streams.push(ws);
    }
    env.blue[0].state.wait_until(|s| s.ws_open_now() == 2).await;
    let third = tokio::spawn({
        let client = http_client();
        let url = env.proxy_url("/v1/status");
        async move { get(&client, &url).await.status() }
    });
    // As above: the absence of an answer is observed over a short, ample window.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "two open streams fill max_connections = 2"
    );
    let mut ws = streams.pop().expect("a stream");
    ws.close(None).await.expect("close");
    while let Some(Ok(_)) = ws.next().await {}
    let status = tokio::time::timeout(PATIENCE, third)
        .await
        .expect("served once a stream ends")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
}
