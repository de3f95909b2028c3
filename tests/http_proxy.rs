//! HTTP proxying through a running Switchyard: paths, headers, streaming bodies, errors,
//! per-request routing on a keep-alive connection, h2c, and table swaps under load.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::*;
use switchyard::control::{Change, FlipRequest};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// An upstream that answers with what it received, as JSON; `?status=N` sets the status.
async fn echo_upstream(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let status = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("status="))
                        .and_then(|s| s.parse::<u16>().ok())
                        .unwrap_or(200);
                    let headers: serde_json::Map<String, Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?"))))
                        .collect();
                    let method = req.method().to_string();
                    let uri = req.uri().to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let answer = json!({"name": name, "method": method, "uri": uri, "headers": headers, "body_len": body.len()});
                    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                    r.headers_mut()
                        .insert("dg-request-id", "req-123".parse().expect("value"));
                    r.headers_mut()
                        .insert("dg-error", "stub says no".parse().expect("value"));
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// An env whose blue pool is one echo upstream.
async fn echo_env() -> (Env, tokio::task::JoinHandle<()>) {
    let (addr, task) = echo_upstream("echo").await;
    (env_with_blue_at(addr).await, task)
}

async fn post(env: &Env, url: &str, body: &'static [u8]) -> (Response<Bytes>, Value) {
    let req = Request::post(url)
        .header("host", "api.example:8080")
        .header("authorization", "Token secret-key")
        .header("x-forwarded-for", "10.9.9.9")
        .header("x-forwarded-proto", "https")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("x-deepgram-session-id", "sess-1")
        .body(Full::new(Bytes::from_static(body)))
        .expect("request");
    let response = env.client.request(req).await.expect("answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (Response::from_parts(parts, body), json)
}

#[tokio::test]
async fn get_and_post_keep_path_query_and_end_to_end_headers() {
    let (env, _upstream) = echo_env().await;
    let (response, echo) = post(
        &env,
        &env.proxy_url("/v1/listen?model=nova-3&smart_format=true&keyterm=a%20b"),
        b"audio",
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(color_of(&response), "blue");
    assert_eq!(echo["method"], "POST");
    assert_eq!(
        echo["uri"],
        "/v1/listen?model=nova-3&smart_format=true&keyterm=a%20b"
    );
    assert_eq!(echo["body_len"], 5);
    let h = &echo["headers"];
    assert_eq!(h["authorization"], "Token secret-key");
    assert_eq!(h["x-deepgram-session-id"], "sess-1");
    assert_eq!(h["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example:8080");
    assert!(
        h.get("x-hop").is_none(),
        "a header named by Connection is hop-by-hop: {h}"
    );
    assert!(
        h["host"]
            .as_str()
            .is_some_and(|v| v.starts_with("127.0.0.1:")),
        "the upstream gets its own authority: {h}"
    );
    // Upstream headers pass through untouched.
    assert_eq!(response.headers()["dg-request-id"], "req-123");
    assert_eq!(response.headers()["dg-error"], "stub says no");

    let got = get(&env.client, &env.proxy_url("/v1/models?x=1&y=%2F")).await;
    let echo: Value = serde_json::from_slice(got.body()).expect("json");
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["uri"], "/v1/models?x=1&y=%2F");
}

#[tokio::test]
async fn upstream_status_codes_pass_through_untouched() {
    let (env, _upstream) = echo_env().await;
    for status in [400u16, 429, 503] {
        let got = get(
            &env.client,
            &env.proxy_url(&format!("/v1/listen?status={status}")),
        )
        .await;
        assert_eq!(got.status().as_u16(), status);
        assert_eq!(color_of(&got), "blue");
        assert_eq!(got.headers()["dg-error"], "stub says no");
        let echo: Value = serde_json::from_slice(got.body()).expect("the upstream's own body");
        assert_eq!(echo["name"], "echo");
    }
}

#[tokio::test]
async fn a_20_mib_streamed_upload_arrives_intact() {
    let env = EnvBuilder::default().start().await;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 320; // 20 MiB
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let producer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        for i in 0..CHUNKS {
            let chunk: Vec<u8> = (0..CHUNK).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
            hasher.update(&chunk);
            if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                break;
            }
        }
        hex(&hasher.finalize())
    });
    let body = StreamBody::new(tokio_stream_from(rx));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(env.proxy_url("/v1/listen"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .expect("request");
    let response = client.request(req).await.expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    let json: Value = serde_json::from_slice(
        &response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes(),
    )
    .expect("json");
    let sent = producer.await.expect("producer");
    assert_eq!(json["metadata"]["bytes"], (CHUNK * CHUNKS) as u64);
    assert_eq!(json["metadata"]["sha256"], sent.as_str());
    assert_eq!(json["metadata"]["stub"], "blue");
}

/// `limits.response_timeout` is the upstream's time to answer once the request is sent:
/// an upload slower than it is not cut, and an upstream that then says nothing is a 504.
#[tokio::test]
async fn response_timeout_runs_from_the_end_of_the_request() {
    let builder = EnvBuilder {
        extra: "response_timeout = \"1s\"".into(),
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(env.proxy_url("/v1/listen"))
        .header("content-type", "application/octet-stream")
        .body(StreamBody::new(tokio_stream_from(rx)))
        .expect("request");
    let answer = tokio::spawn(async move { client.request(req).await });
    tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
        .await
        .expect("sent");
    // The client pauses for longer than response_timeout mid-upload: a slow sender, not a
    // slow upstream (a pause is the point here; nothing to wait on instead).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    tx.send(Ok(Frame::data(Bytes::from_static(b"last"))))
        .await
        .expect("sent");
    drop(tx);
    let response = tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("in time")
        .expect("task")
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    let json = json_body(response).await;
    assert_eq!(json["metadata"]["bytes"], 9, "{json}");

    // An upstream that never answers a whole request is a 504 JSON, with the colour.
    let stalling = stalling_upstream().await;
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        ..builder
    };
    env.write_config(
        &builder,
        &format!("\"http://{stalling}\""),
        &format!("\"{}\"", env.green[0].url()),
    );
    assert_eq!(env.admin_post("/reload", None).await.0, StatusCode::OK);
    let got = get(&env.client, &env.proxy_url("/stall-head")).await;
    assert_eq!(got.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(color_of(&got), "blue");
    let json: Value = serde_json::from_slice(got.body()).expect("json");
    assert_eq!(json["error"], "upstream_timeout", "{json}");
    assert_eq!(env.upstream_errors("timeout"), 1.0);

    // An upstream that stops taking the request mid-upload is a 504 too, once it has taken
    // nothing for response_timeout: the request cannot hang for ever. (The body offers
    // 1 GiB; the sockets' buffers fill long before.)
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let endless = futures_util::stream::iter(
        std::iter::repeat_n(chunk, 16 * 1024).map(|c| Ok::<_, Infallible>(Frame::data(c))),
    );
    let req = Request::post(env.proxy_url("/stall-upload"))
        .header("content-type", "application/octet-stream")
        .body(StreamBody::new(endless))
        .expect("request");
    let uploader = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let got = tokio::time::timeout(PATIENCE, uploader.request(req))
        .await
        .expect("an answer, not a hung upload")
        .expect("answer");
    assert_eq!(got.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(color_of(&got), "blue");
    let json = json_body(got).await;
    assert_eq!(json["error"], "upstream_timeout", "{json}");
    assert_eq!(env.upstream_errors("timeout"), 2.0);
    assert_eq!(env.upstream_errors("protocol"), 0.0);
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_chunked_response_streams_before_the_upstream_finishes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let release = Arc::new(Notify::new());
    let upstream_release = release.clone();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        let release = upstream_release.clone();
        let service = service_fn(move |_req: Request<Incoming>| {
            let release = release.clone();
            async move {
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
                tokio::spawn(async move {
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
                    release.notified().await;
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"last")))).await;
                });
                Ok::<_, Infallible>(Response::new(StreamBody::new(tokio_stream_from(rx))))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(socket), service)
            .await;
    });
    let env = env_with_blue_at(addr).await;

    let req = Request::post(env.proxy_url("/v1/speak"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, env.client.request(req))
        .await
        .expect("in time")
        .expect("answer");
    let mut body = response.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("first chunk in time")
        .expect("frame")
        .expect("ok");
    assert_eq!(
        first.into_data().expect("data"),
        Bytes::from_static(b"first")
    );
    // Only now may the upstream produce the last chunk: the first arrived before it existed.
    release.notify_one();
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("in time")
        .expect("rest")
        .to_bytes();
    assert_eq!(rest, Bytes::from_static(b"last"));
}

/// No upstream of the colour accepts a connection: the upstream failed, a 502 (503 is
/// for a colour with no healthy upstream, which passive health makes of it after `fall`
/// such failures). The other colour is never tried.
#[tokio::test]
async fn every_upstream_refusing_is_a_502_json_and_never_the_other_colour() {
    let mut env = EnvBuilder {
        health: "mode = \"off\"\ninterval = \"1h\"\nfall = 2",
        ..Default::default()
    }
    .start()
    .await;
    env.blue.clear(); // stops the blue stub: connections are refused
    let got = get(&env.client, &env.proxy_url("/v1/listen")).await;
    assert_eq!(got.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(color_of(&got), "blue");
    let json: Value = serde_json::from_slice(got.body()).expect("json");
    assert_eq!(json["error"], "upstream_unreachable", "{json}");
    assert!(json["message"].is_string(), "{json}");
    // The second failure is the `fall`th: the upstream is marked down, and then the colour
    // has no healthy upstream.
    let got = get(&env.client, &env.proxy_url("/v1/listen")).await;
    assert_eq!(got.status(), StatusCode::BAD_GATEWAY);
    let got = get(&env.client, &env.proxy_url("/v1/listen")).await;
    assert_eq!(got.status(), StatusCode::SERVICE_UNAVAILABLE);
    let json: Value = serde_json::from_slice(got.body()).expect("json");
    assert_eq!(json["error"], "no_healthy_upstream", "{json}");
    // Deepgram's own names for the same, which its older SDKs show.
    assert_eq!(json["err_code"], json["error"], "{json}");
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    assert_eq!(json["err_msg"], json["message"], "{json}");
    assert_eq!(
        env.green[0].state.http_requests(),
        0,
        "traffic never crosses colours"
    );
    // An HTTP/2 upload still coming when the 503 is sent may finish (three times the
    // stream's window: the rest is read and dropped), and its client reads the answer.
    let (status, json) = h2_answer_then_upload(&env, 3 << 20, usize::MAX, Duration::ZERO).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["error"], "no_healthy_upstream", "{json}");
}

/// Answers every request on `listener` with a 200 and closes the connection, so each
/// request through the proxy needs a new one.
fn serve_and_close(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                let _ = tokio::io::AsyncWriteExt::write_all(&mut socket, answer).await;
            });
        }
    })
}

/// Connect errors count toward `fall` only in a row: a new connection that works between
/// two of them takes the first back, so an upstream that times out on a few connects in a
/// burst of thousands stays in. Without that, the second refusal here would be the
/// `fall`th and the last request a 503.
#[tokio::test]
async fn connect_errors_count_toward_fall_only_in_a_row() {
    // The port stays bound by a socket that never listens while the listeners on it come
    // and go, so no other test's bind can take it in between: connects are refused then.
    let holder = tokio::net::TcpSocket::new_v4().expect("socket");
    holder.set_reuseaddr(true).expect("reuseaddr");
    holder
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = holder.local_addr().expect("addr");
    let listen = || {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(addr).expect("bind beside the holder");
        socket.listen(64).expect("listen")
    };
    let mut server = serve_and_close(listen());
    // No probes, and no cool-down within the test: only live traffic moves health.
    let env = env_with_blue_at_health(addr, "mode = \"off\"\ninterval = \"1h\"\nfall = 2").await;
    let url = env.proxy_url("/v1/status");
    for round in 0..2 {
        let got = get(&env.client, &url).await;
        assert_eq!(
            got.status(),
            StatusCode::OK,
            "round {round}: the upstream serves"
        );
        server.abort();
        let _ = server.await;
        let got = get(&env.client, &url).await;
        assert_eq!(
            got.status(),
            StatusCode::BAD_GATEWAY,
            "round {round}: refused, one connect error"
        );
        server = serve_and_close(listen());
    }
    let got = get(&env.client, &url).await;
    assert_eq!(
        got.status(),
        StatusCode::OK,
        "two connect errors, not in a row: the upstream is still in"
    );
    // And errors in a row still take it out.
    server.abort();
    let _ = server.await;
    for _ in 0..2 {
        assert_eq!(
            get(&env.client, &url).await.status(),
            StatusCode::BAD_GATEWAY
        );
    }
    assert_eq!(
        get(&env.client, &url).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    drop(holder);
}

#[tokio::test]
async fn an_upstream_that_breaks_before_answering_is_a_502_json() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            // Read the request head, then hang up without a response.
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            drop(socket);
        }
    });
    let env = env_with_blue_at(addr).await;
    let got = get(&env.client, &env.proxy_url("/v1/listen")).await;
    assert_eq!(got.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(color_of(&got), "blue");
    let json: Value = serde_json::from_slice(got.body()).expect("json");
    assert_eq!(json["error"], "upstream_failed");
}

#[tokio::test]
async fn a_connect_failure_is_retried_on_another_upstream_of_the_same_colour() {
    // A port nothing listens on: bind, read the port, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let builder = EnvBuilder {
        // Passive marking would take the dead upstream out after one failure; a high fall
        // keeps it in rotation so the retry path is exercised on many requests.
        health: "mode = \"off\"\nfall = 1000",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let blue_live = env.blue[0].url();
    env.write_config(
        &builder,
        &format!("\"http://{dead}\", \"{blue_live}\""),
        &format!("\"{}\"", env.green[0].url()),
    );
    assert_eq!(env.admin_post("/reload", None).await.0, StatusCode::OK);
    for _ in 0..30 {
        let got = get(&env.client, &env.proxy_url("/v1/status")).await;
        assert_eq!(got.status(), StatusCode::OK);
        assert_eq!(stub_of(&got), "blue");
    }
    let metrics = env.app().metrics.encode();
    let retried = metrics
        .lines()
        .find(|l| {
            l.starts_with("switchyard_upstream_errors_total")
                && l.contains(&dead.to_string())
                && l.contains("kind=\"connect\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        retried >= 1.0,
        "30 random picks of 2 upstreams hit the dead one at least once:\n{metrics}"
    );
    assert_eq!(env.green[0].state.http_requests(), 0);
}

/// A request is tried on at most three upstreams of its colour (a first try and two
/// retries), however many refuse.
#[tokio::test]
async fn a_request_is_tried_on_at_most_three_upstreams() {
    let mut dead = Vec::new();
    for _ in 0..5 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        dead.push(format!(
            "\"http://{}\"",
            listener.local_addr().expect("addr")
        ));
    }
    let builder = EnvBuilder {
        health: "mode = \"off\"\nfall = 1000",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    env.write_config(
        &builder,
        &dead.join(", "),
        &format!("\"{}\"", env.green[0].url()),
    );
    assert_eq!(env.admin_post("/reload", None).await.0, StatusCode::OK);
    let got = get(&env.client, &env.proxy_url("/v1/status")).await;
    assert_eq!(got.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(color_of(&got), "blue");
    assert_eq!(env.upstream_errors("connect"), 3.0);
    assert_eq!(env.green[0].state.http_requests(), 0);
}

#[tokio::test]
async fn a_swap_moves_the_next_request_on_the_same_keep_alive_connection() {
    let env = EnvBuilder::default().start().await;
    let stream = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>| {
        let req = Request::get("/v1/status")
            .header("host", "switchyard")
            .body(Full::new(Bytes::new()))
            .expect("request");
        sender.send_request(req)
    };
    let first = ask(&mut sender).await.expect("first");
    assert_eq!(color_of(&first), "blue");
    first.into_body().collect().await.expect("body");
    env.flip("green").await;
    sender.ready().await.expect("connection still open");
    let second = ask(&mut sender)
        .await
        .expect("second on the same connection");
    assert_eq!(color_of(&second), "green");
    assert_eq!(stub_of(&second), "green");
}

#[tokio::test]
async fn h2c_with_prior_knowledge_works() {
    let env = EnvBuilder::default().start().await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::post(env.proxy_url("/v1/listen?model=nova"))
        .body(Full::new(Bytes::from_static(b"abc")))
        .expect("request");
    let response = client.request(req).await.expect("answer");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(color_of(&response), "blue");
    let json: Value = serde_json::from_slice(
        &response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes(),
    )
    .expect("json");
    assert_eq!(json["metadata"]["bytes"], 3);

    // The next request on the same connection after a flip goes to the new colour.
    env.flip("green").await;
    let req = Request::get(env.proxy_url("/v1/status"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client.request(req).await.expect("answer");
    assert_eq!(color_of(&response), "green");
    assert_eq!(stub_of(&response), "green");
    let connections = env.metric_sum("switchyard_connections", &["listener=\"proxy\""]);
    assert_eq!(connections, 1.0, "one HTTP/2 connection carried both");

    // Headers up to HTTP/1.1's limit (64 KiB) pass on HTTP/2 too (hyper's default there
    // is 16 KiB): a 40 KiB token, say.
    let token = "t".repeat(40 * 1024);
    let req = Request::post(env.proxy_url("/v1/listen"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from_static(b"abc")))
        .expect("request");
    let response = client.request(req).await.expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    let seen = env.green[0].state.last_headers();
    assert_eq!(seen["authorization"].len(), token.len() + "Bearer ".len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_see_no_errors_while_the_table_swaps() {
    let env = Arc::new(EnvBuilder::default().start().await);
    const CLIENTS: usize = 64;
    const REQUESTS: usize = 150;
    let done = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let env = env.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut swaps = 0u32;
            // Bounded in count; ends early when the clients are done.
            while done.load(Ordering::Acquire) < CLIENTS && swaps < 5_000 {
                let control = &env.app().control;
                let _ = control
                    .apply(Change::Flip(FlipRequest {
                        force: true,
                        ..Default::default()
                    }))
                    .await
                    .expect("flip");
                swaps += 1;
                // Bursts of swaps a millisecond apart, then a quiet 30 ms: requests land both
                // across swaps and within one generation, where the strict colour check
                // below applies.
                let pause = if swaps.is_multiple_of(10) { 30 } else { 1 };
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            swaps
        })
    };
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let env = env.clone();
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let client = http_client();
            let mut checked = 0;
            for _ in 0..REQUESTS {
                let before = env.app().router().load_full();
                let got = get(&client, &env.proxy_url("/v1/status")).await;
                let after = env.app().router().load_full();
                assert_eq!(got.status(), StatusCode::OK, "no failed request");
                let color = color_of(&got);
                assert_eq!(stub_of(&got), color, "served by the colour it says");
                if before.generation == after.generation {
                    // No swap during the request: only the colour active throughout is valid.
                    assert_eq!(color, before.active.as_str());
                    checked += 1;
                }
            }
            done.fetch_add(1, Ordering::AcqRel);
            checked
        }));
    }
    let mut checked = 0;
    for c in clients {
        checked += tokio::time::timeout(PATIENCE * 3, c)
            .await
            .expect("clients finish")
            .expect("client ok");
    }
    let swaps = swapper.await.expect("swapper");
    assert!(
        swaps >= 10,
        "the table was swapped while clients ran ({swaps} swaps)"
    );
    assert!(
        checked > 0,
        "some requests ran between two swaps, so the strict colour check was exercised"
    );
}

#[tokio::test]
async fn a_request_with_a_huge_header_gets_431_and_the_proxy_stays_up() {
    let env = EnvBuilder::default().start().await;
    let mut stream = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    let huge = "a".repeat(1 << 20);
    let head = format!("GET /v1/status HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\n\r\n");
    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "{}",
        text.lines().next().unwrap_or("")
    );
    let got = get(&env.client, &env.proxy_url("/v1/status")).await;
    assert_eq!(got.status(), StatusCode::OK);
}

#[tokio::test]
async fn in_flight_requests_on_the_old_colour_end_at_the_drain_deadline() {
    // One request mid-body, one still waiting for its answer.
    let (env, body) = blue_response_stalled_mid_body().await;
    let waiting = waiting_for_its_head(&env).await;

    let (status, body_json) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "1s"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body_json}");
    assert_cut_at_the_deadline(body, waiting).await;
    // So blue holds nothing any more.
    let (_, drained) = env.admin_get("/drain/wait?color=blue&timeout=10s").await;
    assert_eq!(drained["drained"], true, "{drained}");
}

/// Over HTTP/2 the cut is a reset of the stream with CANCEL: the answer was not broken, it
/// is no longer served here (INTERNAL_ERROR would tell the client's logs otherwise).
#[tokio::test]
async fn an_http2_answer_cut_at_the_drain_deadline_is_reset_with_cancel() {
    let env = env_with_blue_at(stalling_upstream().await).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    // The client speaks HTTP/2 only.
    let body = stalled_body_via(&client, &env.proxy_url("/stall-body")).await;
    let (status, flipped) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "0s"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{flipped}");
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("the body ends at the deadline");
    let error = rest.expect_err("a cut answer is incomplete");
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let mut reason = None;
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            reason = h2.reason();
        }
        cause = e.source();
    }
    assert_eq!(reason, Some(h2::Reason::CANCEL), "{error:?}");
}

/// A reload that removes an upstream drains its requests as a flip drains a colour's: at
/// the reload's deadline they are cut. Until then `/status` lists the removed upstream,
/// with its requests and that deadline, so the colour's counts add up.
#[tokio::test]
async fn in_flight_requests_on_a_removed_upstream_end_at_its_drain_deadline() {
    let (env, body) = blue_response_stalled_mid_body().await;
    let waiting = waiting_for_its_head(&env).await;
    let (_, before) = env.admin_get("/status").await;
    let stalling = before["colors"]["blue"]["upstreams"][0]["url"].clone();

    let builder = EnvBuilder {
        health: "mode = \"off\"",
        drain_timeout: "1s",
        ..Default::default()
    };
    env.write_config_of_first_stubs(&builder);
    let reloaded_at = std::time::SystemTime::now();
    let reload_started = std::time::Instant::now();
    let (status, reloaded) = env.admin_post("/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{reloaded}");
    let blue = &reloaded["colors"]["blue"];
    assert_eq!(blue["state"], "active", "{blue}");
    assert_eq!(blue["in_flight"], 2, "{blue}");
    let upstreams = blue["upstreams"].as_array().expect("upstreams");
    assert_eq!(upstreams.len(), 2, "{blue}");
    assert_eq!(upstreams[0]["url"], env.blue[0].url().trim_end_matches('/'));
    assert_eq!(upstreams[0]["removed"], false, "{blue}");
    assert_eq!(upstreams[0]["drain_deadline"], Value::Null, "{blue}");
    let removed = &upstreams[1];
    assert_eq!(removed["url"], stalling, "{blue}");
    assert_eq!(removed["removed"], true, "{blue}");
    assert_eq!(removed["in_flight"], 2, "{blue}");
    let deadline =
        humantime::parse_rfc3339(removed["drain_deadline"].as_str().expect("a deadline"))
            .expect("RFC 3339");
    assert!(deadline > reloaded_at, "{removed}");

    assert_cut_at_the_deadline(body, waiting).await;
    // At the deadline, not before: the reload's `drain.timeout` is 1 s.
    assert!(
        reload_started.elapsed() >= std::time::Duration::from_millis(990),
        "cut {:?} after the reload",
        reload_started.elapsed()
    );
    // Once its requests are gone, so is the removed upstream.
    eventually(|| async {
        let (_, after) = env.admin_get("/status").await;
        after["colors"]["blue"]["upstreams"]
            .as_array()
            .map(Vec::len)
            == Some(1)
    })
    .await;
}

/// A reload that lists a removed upstream again before its deadline puts it back: its
/// requests are not cut, as a rollback cancels a colour's drain.
#[tokio::test]
async fn a_reload_that_puts_a_removed_upstream_back_cuts_nothing() {
    let (env, mut body) = blue_response_stalled_mid_body().await;
    let (_, before) = env.admin_get("/status").await;
    let stalling = before["colors"]["blue"]["upstreams"][0]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        drain_timeout: "1s",
        ..Default::default()
    };
    let green = format!("\"{}\"", env.green[0].url());
    env.write_config(&builder, &format!("\"{}\"", env.blue[0].url()), &green);
    let (status, removed) = env.admin_post("/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    assert_eq!(removed["colors"]["blue"]["upstreams"][1]["removed"], true);
    env.write_config(&builder, &format!("\"{stalling}\""), &green);
    let (status, back) = env.admin_post("/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{back}");
    let upstreams = back["colors"]["blue"]["upstreams"].as_array().cloned();
    let upstreams = upstreams.expect("upstreams");
    assert_eq!(upstreams.len(), 1, "{back}");
    assert_eq!(upstreams[0]["url"], stalling.as_str());
    assert_eq!(upstreams[0]["removed"], false, "{back}");
    assert_eq!(upstreams[0]["in_flight"], 1, "{back}");
    // Past the cancelled deadline the response is still open: absence of the cut can only
    // be observed over time, so wait well past the 1 s deadline.
    let next = tokio::time::timeout(std::time::Duration::from_millis(2500), body.frame()).await;
    assert!(next.is_err(), "still open and waiting, not cut: {next:?}");
}

/// Shutdown bounds plain requests as a flip does: at `drain.timeout` a request still
/// waiting gets the 503 a client retries, and a response under way is cut, rather than
/// both running on until the process exits under them.
#[tokio::test]
async fn in_flight_requests_end_at_the_shutdown_deadline() {
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        drain_timeout: "1s",
        ..Default::default()
    };
    let mut env = builder.clone().start().await;
    let stalling = stalling_upstream().await;
    env.write_config(
        &builder,
        &format!("\"http://{stalling}\""),
        &format!("\"{}\"", env.green[0].url()),
    );
    assert_eq!(env.admin_post("/reload", None).await.0, StatusCode::OK);
    let body = stalled_body(&env).await;
    let waiting = waiting_for_its_head(&env).await;

    env.app().shutdown();
    assert_cut_at_the_deadline(body, waiting).await;
    env.shutdown().await;
}

/// A second request on blue, to `/stall-head`, which never gets its answer's head; returned
/// once blue counts both it and the stalled body as in flight.
async fn waiting_for_its_head(env: &Env) -> tokio::task::JoinHandle<http::Response<Bytes>> {
    let waiting = tokio::spawn({
        let client = http_client();
        let url = env.proxy_url("/stall-head");
        async move { get(&client, &url).await }
    });
    eventually(|| async {
        let (_, status) = env.admin_get("/status").await;
        status["colors"]["blue"]["in_flight"] == 2
    })
    .await;
    waiting
}

/// At the deadline the stalled body ends with an error (not a clean, short end), and the
/// request still waiting for its head gets a 503 a client retries.
async fn assert_cut_at_the_deadline(
    body: Incoming,
    waiting: tokio::task::JoinHandle<http::Response<Bytes>>,
) {
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("the body ends at the deadline");
    assert!(
        rest.is_err(),
        "a cut response is incomplete, not silently short"
    );
    let answer = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("answered at the deadline")
        .expect("task");
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(color_of(&answer), "blue");
    let json: Value = serde_json::from_slice(answer.body()).expect("json");
    assert_eq!(json["error"], "drain_deadline");
}

/// An env whose blue upstream has answered `/stall-body` with its first chunk and stalls;
/// returns the rest of that response's body.
async fn blue_response_stalled_mid_body() -> (Env, Incoming) {
    let env = env_with_blue_at(stalling_upstream().await).await;
    let body = stalled_body(&env).await;
    (env, body)
}

/// Asks for `/stall-body` and returns the rest of its body once the first chunk came.
async fn stalled_body(env: &Env) -> Incoming {
    stalled_body_at(env, &env.proxy_url("/stall-body")).await
}

/// `stalled_body` at `url`.
async fn stalled_body_at(env: &Env, url: &str) -> Incoming {
    stalled_body_via(&env.client, url).await
}

/// `stalled_body_at` through `client`.
async fn stalled_body_via(client: &HttpClient, url: &str) -> Incoming {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, client.request(req))
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(color_of(&response), "blue");
    let mut body = response.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("in time")
        .expect("frame")
        .expect("ok");
    assert_eq!(
        first.into_data().expect("data"),
        Bytes::from_static(b"first")
    );
    body
}

/// An upstream that never finishes: `/stall-body` sends one chunk and stalls, anything else
/// never answers at all.
async fn stalling_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() != "/stall-body" {
                        std::future::pending::<()>().await;
                    }
                    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
                    tokio::spawn(async move {
                        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
                        tx.closed().await;
                    });
                    Ok::<_, Infallible>(Response::new(StreamBody::new(tokio_stream_from(rx))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
}

/// Blue at a stalling upstream, flipped away from with a drain of 0 s, then asked for
/// `/stall-body` through the preview listener; returns the rest of that body.
async fn a_preview_request_on_blue_after_its_drain() -> (Env, Incoming) {
    let env = env_with_blue_at(stalling_upstream().await).await;
    let (status, flipped) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "0s"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{flipped}");
    let preview = env.app().preview_addr.expect("a preview listener");
    let body = stalled_body_at(&env, &format!("http://{preview}/stall-body")).await;
    (env, body)
}

/// Requests on the standby colour after its drain deadline came through the preview
/// listener: they do not make it "draining" (the flip's drain order stays in the table
/// until traffic goes back to that colour, long after its deadline).
#[tokio::test]
async fn preview_requests_after_the_deadline_leave_the_standby_colour_standby() {
    let (env, _body) = a_preview_request_on_blue_after_its_drain().await;
    let (_, status) = env.admin_get("/status").await;
    let blue = &status["colors"]["blue"];
    assert_eq!(blue["in_flight"], 1, "{blue}");
    assert_eq!(blue["state"], "standby", "{blue}");
    assert_eq!(blue["drain_deadline"], Value::Null, "{blue}");
}

/// A standby colour whose removed upstream still holds requests is draining, with that
/// upstream's deadline, as it is for streams.
#[tokio::test]
async fn a_standby_colour_with_requests_on_a_removed_upstream_is_draining() {
    let (env, _body) = a_preview_request_on_blue_after_its_drain().await;
    let builder = EnvBuilder {
        health: "mode = \"off\"",
        ..Default::default()
    };
    env.write_config_of_first_stubs(&builder);
    let (status, reloaded) = env.admin_post("/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{reloaded}");
    let blue = &reloaded["colors"]["blue"];
    assert_eq!(blue["state"], "draining", "{blue}");
    assert_eq!(
        blue["drain_deadline"], blue["upstreams"][1]["drain_deadline"],
        "{blue}"
    );
    assert!(blue["drain_deadline"].is_string(), "{blue}");
}

#[tokio::test]
async fn a_rollback_before_the_deadline_cuts_nothing() {
    let (env, mut body) = blue_response_stalled_mid_body().await;
    let (status, _) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "1s"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env.admin_post("/rollback", None).await;
    assert_eq!(status, StatusCode::OK);
    // Past the cancelled deadline the response is still open: absence of the cut can only
    // be observed over time, so wait well past the 1 s deadline.
    let next = tokio::time::timeout(std::time::Duration::from_millis(2500), body.frame()).await;
    assert!(
        next.is_err(),
        "the body is still open and waiting, not cut: {next:?}"
    );
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["colors"]["blue"]["in_flight"], 1);
}

/// A client that gives up while the upstream is silent is still counted: hyper drops the
/// request then, and before, nothing recorded it, so a colour whose upstreams hang until
/// clients time out showed no traffic at all. It counts as 499 (class 4xx), as nginx
/// logs it, for a plain request and for a WebSocket handshake alike.
#[tokio::test]
async fn a_request_whose_client_leaves_while_the_upstream_is_silent_is_counted() {
    use tokio::io::AsyncWriteExt;
    let (hung, task) = support::hung_upstream().await;
    let env = support::env_with_blue_at(hung).await;
    let requests = |protocol: &str, code: &str| {
        env.metric_sum(
            "switchyard_requests_total",
            &[
                "color=\"blue\"",
                &format!("protocol=\"{protocol}\""),
                &format!("code=\"{code}\""),
            ],
        )
    };
    let heads = [
        (
            "http",
            "GET /v1/listen HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        ),
        (
            "websocket",
            "GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .to_owned(),
        ),
    ];
    for (protocol, head) in heads {
        let mut client = tokio::net::TcpStream::connect(env.app().proxy_addr)
            .await
            .expect("connect");
        client.write_all(head.as_bytes()).await.expect("write");
        eventually(|| async {
            env.admin_get("/status").await.1["colors"]["blue"]["in_flight"] == 1
        })
        .await;
        drop(client);
        eventually(|| async { requests(protocol, "4xx") == 1.0 }).await;
        eventually(|| async {
            env.admin_get("/status").await.1["colors"]["blue"]["in_flight"] == 0
        })
        .await;
        assert_eq!(requests(protocol, "5xx"), 0.0, "{protocol}");
        let durations = env.metric_sum(
            "switchyard_request_duration_seconds_count",
            &["color=\"blue\"", &format!("protocol=\"{protocol}\"")],
        );
        let expected = if protocol == "http" { 1.0 } else { 0.0 };
        assert_eq!(
            durations, expected,
            "{protocol}: a handshake has no duration of its own"
        );
    }
    task.abort();
}

/// An HTTP/1.1 client still uploading when its request is cut at the drain deadline gets
/// the 503 even when it reads nothing until its whole body is sent (httpx, which
/// Deepgram's Python SDK uses, does so): after answering, Switchyard reads and drops the
/// rest of the upload for a while before it closes. Bytes that reach a closed socket
/// reset the connection, and the reset loses the answer the client has not read yet.
#[tokio::test]
async fn a_client_uploading_at_the_drain_deadline_reads_its_503() {
    use tokio::io::AsyncWriteExt;
    const LEN: usize = 4 * 1024 * 1024;
    let (hung, _task) = hung_upstream().await;
    let env = env_with_blue_at(hung).await;
    let mut client = tokio::net::TcpStream::connect(env.app().proxy_addr)
        .await
        .expect("connect");
    let head = format!("POST /v1/listen HTTP/1.1\r\nhost: x\r\ncontent-length: {LEN}\r\n\r\n");
    client.write_all(head.as_bytes()).await.expect("head");
    let chunk = vec![7u8; 64 * 1024];
    client.write_all(&chunk).await.expect("first chunk");
    let in_flight = |n: u64| {
        let env = &env;
        async move { env.admin_get("/status").await.1["colors"]["blue"]["in_flight"] == n }
    };
    eventually(|| in_flight(1)).await;
    let (status, flipped) = env
        .admin_post("/flip", Some(json!({"to": "green", "drain_timeout": "0s"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{flipped}");
    // Answered and closed on Switchyard's side.
    eventually(|| in_flight(0)).await;

    // The rest of the upload, all of it, before reading anything.
    let text = upload_then_read_answer(&mut client, LEN - chunk.len()).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"drain_deadline\""), "{text}");
}
