//! WebSocket streams: the handshake on both sides, the frame relay, and the protocol-aware
//! close that a drain needs.
//!
//! Switchyard ends the WebSocket on both sides (it must, to inject `CloseStream`), so the
//! upstream handshake is its own: a fresh key, no extensions offered, the client's path,
//! query, `Authorization`, `x-deepgram-session-id` and `Sec-WebSocket-Protocol` passed
//! through. It is done with hyper's client connection rather than tungstenite's, because a
//! Deepgram API that picks no subprotocol is normal here and tungstenite's client refuses it.
//!
//! The relay runs two directions in one task. Each direction forwards a message before
//! reading the next, so a client that stops reading stops the upstream read too (TCP
//! back-pressure); memory per stream is bounded by one message per direction plus small
//! read buffers. The client-to-upstream direction also watches the drain deadline: at the
//! deadline it injects `CloseStream` (listen) or `Flush`/`Close` (speak) and stops
//! forwarding client audio, while the other direction keeps relaying the finals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::Instrument;

use super::body::{Access, Finish, ProxyBody};
use super::http::{client_host, source_chain};
use super::{ConnInfo, Proxy, error_response, headers, tag};
use crate::drain::{DrainWatch, Endpoint};
use crate::error::ProxyError;
use crate::metrics::{CloseReason, GaugeGuard, Protocol, UpstreamErrorKind};
use crate::route_table::RouteTable;
use crate::upstream::{Color, Upstream, pick};

/// How long a close handshake with one peer may take once Switchyard starts or answers
/// one, sending its close frame included: a peer that stopped reading must not hold a
/// stream, its drain or shutdown open.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;
const FLUSH: &str = r#"{"type":"Flush"}"#;
const CLOSE: &str = r#"{"type":"Close"}"#;

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Small read buffers (idle streams are most streams) and eager writes (each message is
/// flushed before the next is read, which is the back-pressure). Messages up to 16 MiB.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(16 << 20 | 4096)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    fn has_token(v: Option<&HeaderValue>, token: &str) -> bool {
        v.and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
    req.method() == Method::GET
        && has_token(req.headers().get(header::UPGRADE), "websocket")
        && has_token(req.headers().get(header::CONNECTION), "upgrade")
}

/// Proxies a WebSocket handshake to `color`, then relays the stream in its own task.
pub async fn forward(
    proxy: &Arc<Proxy>,
    mut req: Request<Incoming>,
    table: Arc<RouteTable>,
    color: Color,
    conn: ConnInfo,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let metrics = proxy.metrics.color(color);
    let Some(client_key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        let e = ProxyError::BadRequest("a WebSocket upgrade needs Sec-WebSocket-Key".into());
        return error_response(&e, color);
    };
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let e = ProxyError::BadRequest("only WebSocket version 13 is supported".into());
        let mut r = error_response(&e, color);
        *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let endpoint = Endpoint::of_path(parts.uri.path());
    let session = headers::session_id(&parts.headers);
    let fallback_protocol = headers::offered_protocols(&parts.headers)
        .first()
        .filter(|p| p.eq_ignore_ascii_case("token") || p.eq_ignore_ascii_case("bearer"))
        .and_then(|p| HeaderValue::from_str(p).ok());

    let mut up_headers = parts.headers;
    let host = client_host(&up_headers, &parts.uri);
    headers::to_upstream(&mut up_headers, conn.client.ip(), conn.tls, host);
    for h in [
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_EXTENSIONS,
        header::SEC_WEBSOCKET_ACCEPT,
        header::SEC_WEBSOCKET_VERSION,
    ] {
        up_headers.remove(h);
    }
    let key = generate_key();
    up_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    up_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    up_headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    up_headers.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).expect("a base64 key is a valid header value"),
    );

    let limits = super::limits(&table);
    let fall = table.settings.config.health.fall;
    let pool = table.pool(color);
    let mut tried: Vec<&Upstream> = Vec::new();
    let (upstream, io) = loop {
        let Some(upstream) = pick(pool, &tried) else {
            let e = if tried.is_empty() {
                ProxyError::NoHealthyUpstream(color.as_str())
            } else {
                ProxyError::ConnectFailed(color.as_str())
            };
            metrics.count_request(Protocol::WebSocket, e.status_and_code().0.as_u16());
            return error_response(&e, color);
        };
        match tokio::time::timeout(
            limits.connect_timeout,
            super::h1::connect(&proxy.upstreams.tls, &upstream.url),
        )
        .await
        {
            Ok(Ok(io)) => break (upstream.clone(), io),
            outcome => {
                let reason = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("connect timed out after {:?}", limits.connect_timeout),
                };
                proxy.connect_failed(upstream, fall, &reason);
                tried.push(upstream);
                if tried.len() >= super::http::MAX_ATTEMPTS {
                    let e = ProxyError::ConnectFailed(color.as_str());
                    metrics.count_request(Protocol::WebSocket, 503);
                    return error_response(&e, color);
                }
            }
        }
    };

    let fail = |e: ProxyError, kind: UpstreamErrorKind| {
        proxy.metrics.upstream_error(&upstream, kind);
        tracing::warn!(upstream = %upstream.name, color = %color, error = %e, "upstream handshake failed");
        metrics.count_request(Protocol::WebSocket, e.status_and_code().0.as_u16());
        error_response(&e, color)
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
            Ok(pair) => pair,
            Err(e) => {
                return fail(
                    ProxyError::UpstreamFailed(source_chain(&e)),
                    UpstreamErrorKind::Protocol,
                );
            }
        };
    tokio::spawn(async move {
        // Ends by itself once the connection is upgraded or closed.
        let _ = connection.with_upgrades().await;
    });
    let mut up_req = Request::new(Empty::<Bytes>::new());
    *up_req.uri_mut() = match path.parse() {
        Ok(uri) => uri,
        Err(_) => {
            return fail(
                ProxyError::BadRequest("bad path".into()),
                UpstreamErrorKind::Protocol,
            );
        }
    };
    *up_req.headers_mut() = up_headers;
    up_req.headers_mut().insert(
        header::HOST,
        HeaderValue::from_str(upstream.url.authority.as_str())
            .expect("an authority is a valid header value"),
    );
    let guard = proxy.tracker.request(&upstream, table.generation);
    let response =
        match tokio::time::timeout(limits.response_timeout, sender.send_request(up_req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return fail(
                    ProxyError::UpstreamFailed(source_chain(&e)),
                    UpstreamErrorKind::Protocol,
                );
            }
            Err(_) => {
                return fail(
                    ProxyError::UpstreamTimeout(limits.response_timeout),
                    UpstreamErrorKind::Timeout,
                );
            }
        };

    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // A refusal (400 bad model, 429 over capacity, 503 no engine) goes back as it came.
        let status = response.status().as_u16();
        let access = Access::capture(&Method::GET, &parts.uri, &upstream.name);
        let finish = Finish::new(
            &proxy.metrics,
            color,
            Protocol::WebSocket,
            status,
            started,
            guard,
        )
        .with_access(access);
        return Proxy::relay_answer(response, finish);
    }
    drop(guard);
    let expected = derive_accept_key(key.as_bytes());
    if response
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_none_or(|v| v.as_bytes() != expected.as_bytes())
    {
        return fail(
            ProxyError::UpstreamFailed("the upstream's Sec-WebSocket-Accept does not match".into()),
            UpstreamErrorKind::Protocol,
        );
    }

    let mut reply = Response::new(ProxyBody::empty());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let chosen = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .cloned()
        .or(fallback_protocol);
    {
        let h = reply.headers_mut();
        for (name, value) in response.headers() {
            h.append(name, value.clone());
        }
        headers::strip_hop_by_hop(h);
        for name in [
            header::SEC_WEBSOCKET_ACCEPT,
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::SEC_WEBSOCKET_PROTOCOL,
            header::CONTENT_LENGTH,
        ] {
            h.remove(name);
        }
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&derive_accept_key(client_key.as_bytes()))
                .expect("base64 is a valid header value"),
        );
        if let Some(p) = chosen {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
    }

    metrics.count_request(Protocol::WebSocket, 101);
    let stream = Stream {
        proxy: proxy.clone(),
        color,
        endpoint,
        watch: DrainWatch::new(
            proxy.router.clone(),
            &proxy.tracker,
            upstream.clone(),
            table.generation,
        )
        .counting(metrics.draining_streams.clone()),
        _guard: proxy.tracker.stream(&upstream),
        _connection: GaugeGuard::new(proxy.metrics.connections(conn.listener)),
        _slot: crate::listener::Slot::take(&conn.open),
        upstream,
        opened: started,
    };
    let span = tracing::info_span!("stream", color = %color, path = %parts.uri.path(), session = session.as_deref().unwrap_or("-"));
    let upstream_upgrade = hyper::upgrade::on(response);
    tokio::spawn(
        async move {
            let (client_io, upstream_io) = match tokio::try_join!(client_upgrade, upstream_upgrade)
            {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade failed");
                    stream.ended(CloseReason::Error, None, 0, 0, 0);
                    return;
                }
            };
            let client = WebSocketStream::from_raw_socket(
                TokioIo::new(client_io),
                Role::Server,
                Some(ws_config()),
            )
            .await;
            let upstream = WebSocketStream::from_raw_socket(
                TokioIo::new(upstream_io),
                Role::Client,
                Some(ws_config()),
            )
            .await;
            stream.relay(client, upstream).await;
        }
        .instrument(span),
    );
    tag(reply, color)
}

/// One relayed stream and what it counts.
struct Stream {
    proxy: Arc<Proxy>,
    color: Color,
    endpoint: Endpoint,
    upstream: Arc<Upstream>,
    watch: DrainWatch,
    opened: Instant,
    _guard: crate::drain::StreamGuard,
    /// The client connection in `connections`: hyper lets go of a connection once it is
    /// upgraded, which ends the listener's count of it, so the stream holds it from here.
    _connection: GaugeGuard,
    /// Keeps the stream counted toward `limits.max_connections` after hyper lets go of it.
    _slot: crate::listener::Slot,
}

/// How a relay ended, before the closing handshakes.
enum Ending {
    /// The upstream sent a close frame, to forward to the client.
    UpstreamClosed(Option<CloseFrame>),
    /// The upstream finished after the drain message: the graceful end of a drain.
    UpstreamFinished,
    /// The upstream connection broke without a close frame.
    UpstreamLost(String),
    /// The client sent a close frame, to forward upstream.
    ClientClosed(Option<CloseFrame>),
    /// The client connection broke.
    ClientLost(String),
    /// The deadline came for an endpoint with no graceful protocol close.
    DrainNow,
    /// `drain.grace` ran out after the drain message.
    GraceExpired,
}

impl Stream {
    async fn relay(mut self, client: Ws, upstream: Ws) {
        let metrics = self.proxy.metrics.color(self.color).clone();
        metrics.open_streams(self.endpoint).inc();
        let (mut cl_tx, mut cl_rx) = client.split();
        let (mut up_tx, mut up_rx) = upstream.split();
        let injected = AtomicBool::new(false);
        let close_sent = AtomicBool::new(false);
        let flushed = Notify::new();
        let dropped = AtomicU64::new(0);
        let bytes_in = AtomicU64::new(0);
        let bytes_out = AtomicU64::new(0);
        let endpoint = self.endpoint;
        let router = self.proxy.router.clone();
        let watch = &mut self.watch;

        let ending = {
            let upstream_to_client = async {
                loop {
                    let msg = match up_rx.next().await {
                        Some(Ok(msg)) => msg,
                        Some(Err(e)) if injected.load(Ordering::Acquire) => {
                            tracing::debug!(error = %e, "upstream ended after the drain message");
                            return Ending::UpstreamFinished;
                        }
                        Some(Err(e)) => return Ending::UpstreamLost(e.to_string()),
                        None if injected.load(Ordering::Acquire) => {
                            return Ending::UpstreamFinished;
                        }
                        None => {
                            return Ending::UpstreamLost(
                                "connection closed without a close frame".into(),
                            );
                        }
                    };
                    match msg {
                        Message::Close(frame) => {
                            if injected.load(Ordering::Acquire) {
                                return Ending::UpstreamFinished;
                            }
                            return Ending::UpstreamClosed(frame);
                        }
                        Message::Binary(ref b) if b.is_empty() => continue,
                        Message::Text(ref t)
                            if endpoint == Endpoint::Speak
                                && injected.load(Ordering::Acquire)
                                && is_type(t, "Flushed") =>
                        {
                            flushed.notify_one();
                        }
                        _ => {}
                    }
                    let len = payload_len(&msg);
                    if let Err(e) = cl_tx.send(msg).await {
                        return Ending::ClientLost(e.to_string());
                    }
                    bytes_out.fetch_add(len, Ordering::Relaxed);
                    metrics.bytes_to_client.inc_by(len);
                }
            };
            let client_to_upstream = async {
                // Normal relay until the client ends or the drain deadline comes.
                {
                    let deadline = watch.deadline();
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            msg = cl_rx.next() => match msg {
                                Some(Ok(Message::Close(frame))) => return Ending::ClientClosed(frame),
                                // Deepgram reads an empty binary frame as the end of the stream.
                                Some(Ok(Message::Binary(b))) if b.is_empty() => {
                                    dropped.fetch_add(1, Ordering::Relaxed);
                                }
                                Some(Ok(msg)) => {
                                    let len = payload_len(&msg);
                                    // An upstream that does not take the message (it waits on
                                    // a client that stopped reading) must not hide the deadline.
                                    tokio::select! {
                                        sent = up_tx.send(msg) => if let Err(e) = sent {
                                            return Ending::UpstreamLost(e.to_string());
                                        },
                                        _ = &mut deadline => break,
                                    }
                                    bytes_in.fetch_add(len, Ordering::Relaxed);
                                    metrics.bytes_to_upstream.inc_by(len);
                                }
                                Some(Err(e)) => return Ending::ClientLost(e.to_string()),
                                None => return Ending::ClientLost("connection closed without a close frame".into()),
                            },
                            _ = &mut deadline => break,
                        }
                    }
                }
                let grace = router.load().settings.config.drain.grace;
                let grace_end = tokio::time::Instant::now() + grace;
                let mut closing = match endpoint {
                    Endpoint::Other => return Ending::DrainNow,
                    Endpoint::Listen => CLOSE_STREAM,
                    Endpoint::Speak => FLUSH,
                };
                injected.store(true, Ordering::Release);
                tracing::info!(message = closing, "drain deadline: ending the stream");
                loop {
                    if !closing.is_empty() {
                        let message = Message::Text(Utf8Bytes::from_static(closing));
                        match tokio::time::timeout_at(grace_end, up_tx.send(message)).await {
                            Ok(Ok(())) => {
                                if closing == CLOSE {
                                    close_sent.store(true, Ordering::Release);
                                }
                            }
                            Ok(Err(_)) => return Ending::UpstreamFinished,
                            Err(_) => return Ending::GraceExpired,
                        }
                        closing = "";
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(grace_end) => return Ending::GraceExpired,
                        _ = flushed.notified(), if endpoint == Endpoint::Speak => closing = CLOSE,
                        msg = cl_rx.next() => match msg {
                            Some(Ok(Message::Close(frame))) => return Ending::ClientClosed(frame),
                            // Audio after CloseStream cannot be transcribed any more.
                            Some(Ok(Message::Binary(_) | Message::Text(_))) => {
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Ending::ClientLost(e.to_string()),
                            None => return Ending::ClientLost("connection closed".into()),
                        },
                    }
                }
            };
            tokio::select! {
                e = upstream_to_client => e,
                e = client_to_upstream => e,
            }
        };

        let restart = || {
            Message::Close(Some(CloseFrame {
                code: CloseCode::Restart,
                reason: Utf8Bytes::from_static("switchyard: draining, reconnect"),
            }))
        };
        let going_away = |why: &'static str| {
            Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: Utf8Bytes::from_static(why),
            }))
        };
        let code = |frame: &Option<CloseFrame>| frame.as_ref().map(|f| u16::from(f.code));
        let (reason, client_code) = match ending {
            Ending::UpstreamClosed(frame) => {
                let client_code = code(&frame);
                tokio::join!(
                    finish_close(&mut cl_tx, &mut cl_rx, Some(Message::Close(frame))),
                    finish_close(&mut up_tx, &mut up_rx, None)
                );
                (CloseReason::Upstream, client_code)
            }
            Ending::ClientClosed(frame) => {
                let client_code = code(&frame);
                tokio::join!(
                    finish_close(&mut cl_tx, &mut cl_rx, None),
                    finish_close(&mut up_tx, &mut up_rx, Some(Message::Close(frame)))
                );
                (CloseReason::Client, client_code)
            }
            Ending::UpstreamFinished => {
                tokio::join!(
                    finish_close(&mut cl_tx, &mut cl_rx, Some(restart())),
                    finish_close(&mut up_tx, &mut up_rx, None)
                );
                (CloseReason::DrainGraceful, Some(1012))
            }
            Ending::DrainNow | Ending::GraceExpired => {
                // TTS: `Close` follows `Flush` even when `Flushed` never came within grace.
                if self.endpoint == Endpoint::Speak
                    && injected.load(Ordering::Acquire)
                    && !close_sent.load(Ordering::Acquire)
                {
                    let close = Message::Text(Utf8Bytes::from_static(CLOSE));
                    let _ = tokio::time::timeout(CLOSE_WAIT, up_tx.send(close)).await;
                }
                tokio::join!(
                    finish_close(&mut cl_tx, &mut cl_rx, Some(restart())),
                    finish_close(
                        &mut up_tx,
                        &mut up_rx,
                        Some(going_away("switchyard: draining"))
                    )
                );
                (CloseReason::DrainForced, Some(1012))
            }
            Ending::UpstreamLost(why) => {
                tracing::warn!(upstream = %self.upstream.name, error = %why, "upstream connection lost mid-stream");
                let lost = Message::Close(Some(CloseFrame {
                    code: CloseCode::Error,
                    reason: Utf8Bytes::from_static("switchyard: upstream connection lost"),
                }));
                finish_close(&mut cl_tx, &mut cl_rx, Some(lost)).await;
                (CloseReason::Error, Some(1011))
            }
            Ending::ClientLost(why) => {
                tracing::debug!(error = %why, "client connection lost");
                let away = going_away("client went away");
                finish_close(&mut up_tx, &mut up_rx, Some(away)).await;
                (CloseReason::Error, None)
            }
        };
        metrics.open_streams(self.endpoint).dec();
        self.ended(
            reason,
            client_code,
            dropped.load(Ordering::Relaxed),
            bytes_in.load(Ordering::Relaxed),
            bytes_out.load(Ordering::Relaxed),
        );
    }

    fn ended(
        &self,
        reason: CloseReason,
        code: Option<u16>,
        dropped: u64,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let seconds = self.opened.elapsed().as_secs_f64();
        self.proxy
            .metrics
            .color(self.color)
            .stream_ended(reason, seconds);
        tracing::info!(
            upstream = %self.upstream.name,
            reason = reason.as_str(),
            close_code = code,
            duration_s = seconds,
            bytes_to_upstream = bytes_in,
            bytes_to_client = bytes_out,
            dropped_frames = dropped,
            "stream ended"
        );
    }
}

/// Completes a close handshake with one peer: sends `close` if we start one (or flushes
/// the reply tungstenite queued to the peer's close), then reads until the peer's close
/// arrives; all within `CLOSE_WAIT`.
async fn finish_close<S, R>(tx: &mut S, rx: &mut R, close: Option<Message>)
where
    S: futures_util::Sink<Message> + Unpin,
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let _ = match close {
            Some(close) => tx.send(close).await,
            None => tx.flush().await,
        };
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_close() {
                break;
            }
        }
        let _ = tx.close().await;
    })
    .await;
}

fn payload_len(msg: &Message) -> u64 {
    match msg {
        Message::Text(t) => t.len() as u64,
        Message::Binary(b) => b.len() as u64,
        _ => 0,
    }
}

/// Whether a JSON text message has `"type": name`, without a full parse on the hot path.
fn is_type(text: &str, name: &str) -> bool {
    text.contains(name)
        && serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(|t| t == name))
            .unwrap_or(false)
}
