//! Accept loops: one hyper connection per socket (HTTP/1.1 with upgrades, or HTTP/2 by
//! prior knowledge or ALPN), TLS when the table has a certificate, raced against shutdown.
//!
//! `limits.max_connections` is checked before `accept` against the current table (so a
//! reload applies it), and beyond it accepting waits and the kernel's backlog holds new
//! clients; nothing is refused or crashes.
//! `limits.header_read_timeout` closes clients that never finish their headers, clients
//! that send nothing at all, and HTTP/2 connections left idle (`drive`). None of it
//! touches a stream once it is upgraded: those are tracked by `drain`, not by hyper.
//! `limits.stall_timeout` closes a connection whose client takes none of the bytes
//! written to it for that long (`proxy::stall::ClientIo`), upgraded or not, and resets an
//! HTTP/2 stream whose client stops reading it (`h2`), which also bounds such a stream
//! by its drain deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use self::h2::StreamWatch;
use crate::drain::AnswerSlot;
use crate::metrics::{GaugeGuard, ListenerKind};
use crate::proxy::body::BodyError;
use crate::proxy::stall::{self, ClientIo, deadline_after};
use crate::proxy::{ConnInfo, Proxy, ProxyBody};

mod h2;

/// Open connections of one listener, and a wake-up when one closes.
#[derive(Debug, Default)]
pub struct Open {
    count: AtomicUsize,
    released: Notify,
}

/// One counted connection; released when dropped. An upgraded stream takes its own, since
/// hyper's connection (and its slot) ends at the upgrade while the socket lives on.
#[derive(Debug)]
pub struct Slot(Arc<Open>);

impl Slot {
    /// Counts one more open connection of the listener.
    pub fn take(open: &Arc<Open>) -> Slot {
        open.count.fetch_add(1, Ordering::AcqRel);
        Slot(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.released.notify_waiters();
    }
}

/// Largest request head accepted; beyond it hyper answers 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The most of an HTTP/2 answer held here for a stream its client does not read yet: what
/// a client's socket holds unsent (`proxy::stall::UNSENT_MARK`).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// The most requests one HTTP/2 connection carries at once (HAProxy's default; nginx's is
/// 128): each holds an upstream connection, a file descriptor.
const H2_MAX_STREAMS: u32 = 100;

/// What a connection's requests tell the task that drives it.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Requests started on the connection.
    started: AtomicUsize,
    /// Whether they came over HTTP/2.
    http2: AtomicBool,
    /// HTTP/2 requests whose answer has not ended. HTTP/1.1 is not counted: hyper's own
    /// keep-alive timer closes a connection between requests.
    open_h2: AtomicUsize,
    /// HTTP/2 requests whose answer has ended.
    ended: AtomicUsize,
}

/// An HTTP/2 request in progress, counted in `open_h2` until its answer is dropped (or,
/// for a body read and dropped after its answer, until that ends: `stall::discard`).
pub(crate) struct Busy(Arc<Activity>);

impl Busy {
    pub(crate) fn new(activity: &Arc<Activity>) -> Busy {
        activity.open_h2.fetch_add(1, Ordering::AcqRel);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::AcqRel);
        self.0.open_h2.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body for a client, holding its HTTP/2 stream's `Busy` until hyper drops it
/// (at its end, or at a reset), and telling the stream's task what it hands over (`h2`).
pub struct Answer {
    body: ProxyBody,
    _busy: Option<Busy>,
    watch: Option<Arc<StreamWatch>>,
    /// HTTP/1.1: the connection's slot holding this answer's drain cut, emptied once the
    /// body has ended (the rest of it may still be on its way to a slow client, but the
    /// request is no longer in flight).
    answering: Option<Arc<AnswerSlot>>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(watch) = &this.watch else {
            let polled = Pin::new(&mut this.body).poll_frame(cx);
            if let Some(slot) = &this.answering
                && (matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.body.is_end_stream())
            {
                slot.answering(None);
                this.answering = None;
            }
            return polled;
        };
        watch.polling();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        watch.polled(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What the connection's timer is for.
#[derive(Clone, Copy)]
enum Timer {
    /// The connection has `limit` to bring its first request.
    FirstRequest,
    /// HTTP/2: a tick every `limit`; the connection is idle when no request started or
    /// ended since the last one (`seen`) and none is open.
    Idle { seen: usize },
    /// HTTP/2, closed for idleness: a client that does not take part in the close (h2
    /// waits for its PING answer before the last GOAWAY) is dropped after one more `limit`.
    Closing,
    /// No timer: HTTP/1.1 after its first request.
    Off,
}

/// Drives one connection to its end, closing it when it holds a `max_connections` slot
/// for nothing:
/// - a shutdown of the listener closes it gracefully, as hyper-util's `GracefulShutdown`
///   does (open requests finish; the shutdown bounds how long), and the timers below
///   still drop clients that hold nothing open and ignore the close;
/// - a connection with no request `limit` after it started is dropped, closing the
///   socket: a client that connects and sends nothing, stops inside the 24 bytes that tell
///   HTTP/1.1 from HTTP/2, or opens HTTP/2 and never sends a request. hyper's header timer
///   starts only after those bytes;
/// - an HTTP/2 connection with no request open, started or ended over a whole `limit` is
///   closed gracefully (GOAWAY), so between one and two `limit`s after its last answer
///   ended. hyper's HTTP/2 server has no idle timer of its own.
///
/// HTTP/1.1 connections are left to hyper's timer once a request has come (it closes a
/// keep-alive connection that starts no new request within `header_read_timeout`), and
/// the timer here is no longer polled, so serving them costs nothing more.
async fn drive<C: GracefulConnection>(
    conn: C,
    activity: &Activity,
    limit: Duration,
    shutdown: &mut watch::Receiver<()>,
) {
    let mut conn = std::pin::pin!(conn);
    let mut stop = std::pin::pin!(shutdown.changed());
    let mut stopped = false;
    let mut timer = std::pin::pin!(tokio::time::sleep(limit));
    let mut state = Timer::FirstRequest;
    std::future::poll_fn(|cx| {
        let started = activity.started.load(Ordering::Relaxed);
        if matches!(state, Timer::FirstRequest)
            && started > 0
            && !activity.http2.load(Ordering::Relaxed)
        {
            state = Timer::Off;
        }
        if !stopped && stop.as_mut().poll(cx).is_ready() {
            stopped = true;
            state = match state {
                Timer::Closing => Timer::Closing,
                // Still waiting for a first request: the timer drops it as before.
                Timer::FirstRequest if started == 0 => {
                    conn.as_mut().graceful_shutdown();
                    Timer::FirstRequest
                }
                // HTTP/1.1: hyper closes an idle connection at once, and open requests
                // are bounded by the shutdown's deadline.
                Timer::Off => {
                    conn.as_mut().graceful_shutdown();
                    Timer::Off
                }
                // HTTP/2: as for an idle close, a client that ignores it is dropped one
                // `limit` later once nothing is open (open requests run on, bounded by
                // the shutdown's deadline).
                _ => {
                    conn.as_mut().graceful_shutdown();
                    timer.as_mut().reset(deadline_after(limit));
                    Timer::Closing
                }
            };
        }
        if !matches!(state, Timer::Off) && timer.as_mut().poll(cx).is_ready() {
            let open = activity.open_h2.load(Ordering::Acquire);
            // Both counters only grow: their sum moves whenever either does.
            let marker = started.wrapping_add(activity.ended.load(Ordering::Acquire));
            state = match state {
                Timer::FirstRequest if started == 0 => {
                    tracing::debug!("no request within header_read_timeout; connection closed");
                    return Poll::Ready(());
                }
                Timer::Idle { seen } if seen == marker && open == 0 => {
                    tracing::debug!("HTTP/2 connection idle for header_read_timeout; closing it");
                    conn.as_mut().graceful_shutdown();
                    Timer::Closing
                }
                Timer::Closing if open == 0 => {
                    tracing::debug!("HTTP/2 connection did not finish its close; dropped");
                    return Poll::Ready(());
                }
                Timer::Closing => Timer::Closing,
                _ => Timer::Idle { seen: marker },
            };
            timer.as_mut().reset(deadline_after(limit));
            // Registers the waker for the new deadline (always pending here).
            let _ = timer.as_mut().poll(cx);
        }
        conn.as_mut().poll(cx).map(|_| ())
    })
    .await
}

/// Failed accepts (EMFILE and friends) of one listener: each backs off 50 ms instead of
/// spinning, and they are logged once a second, not on every retry.
#[derive(Default)]
pub struct AcceptErrors {
    logged: Option<Instant>,
}

impl AcceptErrors {
    /// Logs `error` unless one was logged in the last second, then backs off.
    pub async fn failed(&mut self, listener: &str, error: &std::io::Error) {
        if self
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(listener, %error, "accept failed; retrying every 50 ms");
            self.logged = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why a client listener waits before accepting.
#[derive(Clone, Copy)]
enum Full {
    /// The listener holds `limits.max_connections`.
    Connections(usize),
    /// Client and upstream sockets have reached the open-file limit less its reserve
    /// (`nofile::at_ceiling`).
    Descriptors,
}

/// A listener's waits at a limit, logged as one begins, once a minute at most for each
/// limit: at the limit each close lets one client in, and the next waits again.
#[derive(Default)]
struct Waits {
    /// When a wait at `Full::Connections` and at `Full::Descriptors` was last logged.
    logged: [Option<Instant>; 2],
}

impl Waits {
    fn began(&mut self, listener: &str, full: Full) {
        let logged = &mut self.logged[match full {
            Full::Connections(_) => 0,
            Full::Descriptors => 1,
        }];
        if logged.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
            return;
        }
        *logged = Some(Instant::now());
        match full {
            Full::Connections(max_connections) => tracing::warn!(
                listener,
                max_connections,
                "limits.max_connections reached: new connections wait to be accepted until one closes (logged once a minute at most)"
            ),
            Full::Descriptors => tracing::warn!(
                listener,
                "the open-file limit is used up but for the reserve kept for the admin API, health probes and the state file: new connections wait to be accepted until a socket closes; raise LimitNOFILE or ulimit -n, or lower limits.max_connections (logged once a minute at most)"
            ),
        }
    }
}

/// Serves `listener` until `stop` is cancelled, then lets open requests finish.
/// Upgraded streams are not waited for here; `drain` ends them.
pub async fn serve(
    listener: TcpListener,
    kind: ListenerKind,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
) {
    let open = Arc::new(Open::default());
    // Connections are told to close by a send, and each holds a receiver until it ends:
    // so `closed` is when the last one has.
    let (shutdown, _) = watch::channel(());
    let mut accept_errors = AcceptErrors::default();
    // A reload may raise the limit: a loop waiting at it looks again.
    let mut changes = proxy.router().subscribe();
    let mut waits = Waits::default();
    loop {
        let max = proxy.router().load().settings.config.limits.max_connections;
        {
            let released = open.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let freed = crate::nofile::freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let full = if open.count.load(Ordering::Acquire) >= max {
                Some(Full::Connections(max))
            } else if crate::nofile::at_ceiling() {
                // Connections kept idle to upstreams stay: the clients already in reuse
                // them, and a request that needs a socket closes one (`Attempts`); a
                // connection that has sent nothing yet is not worth their 503s.
                Some(Full::Descriptors)
            } else {
                None
            };
            if let Some(full) = full {
                waits.began(kind.as_str(), full);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = released => {}
                    _ = freed => {}
                    _ = changes.changed() => {}
                }
                continue;
            }
        }
        let (socket, client) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_errors.failed(kind.as_str(), &e).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        stall::limit_unsent(&socket);
        let table = proxy.router().load_full();
        let limits = table.settings.config.limits;
        let tls = table.settings.tls.clone();
        drop(table);
        // Writes to a client that stops reading give up after `limits.stall_timeout`, or
        // at the drain deadline of the HTTP/1.1 answer they wait to write.
        let answering = Arc::new(AnswerSlot::default());
        let socket = ClientIo::new(socket, proxy.router().clone())
            .counted()
            .cut_by(answering.clone(), proxy.tracker.clone())
            .lingering(open.clone(), proxy.metrics().connections(kind).clone());
        let proxy = proxy.clone();
        let mut watch = shutdown.subscribe();
        let slot = Slot::take(&open);
        let open_for_streams = open.clone();
        tokio::spawn(async move {
            // In the `connections` gauge until the task ends, also by a panic.
            let _counted = GaugeGuard::new(proxy.metrics().connections(kind));
            let activity = Arc::new(Activity::default());
            let mut conn_info = ConnInfo::new(client, kind, tls.is_some(), open_for_streams);
            conn_info.activity = activity.clone();
            let seen = activity.clone();
            let exec = h2::Exec::new(proxy.router().clone());
            let service = service_fn(move |req: Request<Incoming>| {
                seen.started.fetch_add(1, Ordering::Relaxed);
                let (busy, watch) = if req.version() == Version::HTTP_2 {
                    seen.http2.store(true, Ordering::Relaxed);
                    (Some(Busy::new(&seen)), Some(h2::watch_next()))
                } else {
                    (None, None)
                };
                let proxy = proxy.clone();
                let conn_info = conn_info.clone();
                // Boxed: the request's future is kilobytes, and HTTP/2 moves it whole
                // into a task per stream (callgrind: 11 % fewer instructions per h2c
                // request, 1 % more per HTTP/1.1 one; benches/RESULTS.md).
                // HTTP/1.1 only: an HTTP/2 stream's cut is its watch's.
                let answering = watch.is_none().then(|| answering.clone());
                Box::pin(proxy.handle(req, conn_info).map(move |response| {
                    Ok::<_, std::convert::Infallible>(response.map(|body| {
                        if let Some(watch) = &watch {
                            watch.answer_cut_by(body.cut_watch());
                        }
                        // An answer hyper will not poll (no body) is none to cut.
                        let answering = answering.and_then(|slot| {
                            if body.is_end_stream() {
                                slot.answering(None);
                                return None;
                            }
                            body.mark_answer(&slot);
                            Some(slot)
                        });
                        Answer {
                            body,
                            _busy: busy,
                            watch,
                            answering,
                        }
                    }))
                }))
            });
            let mut builder = auto::Builder::new(exec);
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_HEADER_BYTES)
                // A response's head and body leave in one buffer through send(2), not as
                // pieces through writev(2), which costs the kernel more per call
                // (benches/RESULTS.md). The price is a copy of the body into hyper's
                // buffer, which holds `MAX_HEADER_BYTES` and one more chunk at most.
                .writev(false)
                .keep_alive(true);
            // HTTP/2 takes the header section HTTP/1.1 takes (hyper's default is 16 KiB).
            // Per stream, an answer its client reads slowly holds `H2_SEND_BUFFER` here
            // (hyper's default, 400 KiB, let one connection of slow streams hold 110 MB),
            // and each stream holds an upstream connection: `H2_MAX_STREAMS` bounds both.
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .max_send_buf_size(H2_SEND_BUFFER)
                .max_concurrent_streams(H2_MAX_STREAMS);
            match tls {
                Some(config) => {
                    let handshake = tokio::time::timeout(
                        limits.header_read_timeout,
                        tls_handshake(tokio_rustls::TlsAcceptor::from(config), socket),
                    );
                    // A handshake under way does not hold up a shutdown.
                    let handshake = tokio::select! {
                        done = handshake => done,
                        _ = watch.changed() => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            drive(conn, &activity, limits.header_read_timeout, &mut watch).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(socket), service);
                    drive(conn, &activity, limits.header_read_timeout, &mut watch).await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = shutdown.send(());
    shutdown.closed().await;
}

/// The server side of a TLS handshake. A client whose first byte is a letter sent an HTTP
/// request in the clear (a TLS record starts with 0x16): it gets a 400 saying so.
async fn tls_handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    mut socket: ClientIo,
) -> std::io::Result<tokio_rustls::server::TlsStream<ClientIo>> {
    let mut first = [0u8; 1];
    if socket.get_ref().peek(&mut first).await? == 1 && first[0].is_ascii_uppercase() {
        use tokio::io::AsyncWriteExt;
        // Instead of a TLS alert, which its HTTP library would report as garbage.
        let body = crate::error::json_error(
            http::StatusCode::BAD_REQUEST,
            "tls_required",
            "this listener speaks TLS: use https:// or wss:// on this port",
        )
        .into_body();
        let mut answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        socket.write_all(&answer).await?;
        // Shut down, the socket lingers as it drops (`ClientIo`): what the client still
        // sends is read until it closes, so no reset overtakes the answer.
        socket.shutdown().await?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "plain HTTP on the TLS listener; answered 400",
        ));
    }
    acceptor.accept(socket).await
}
