//! Accept loops: one hyper connection per socket (HTTP/1.1 with upgrades, or HTTP/2 by
//! prior knowledge or ALPN), TLS when the table has a certificate, raced against shutdown.
//!
//! `limits.max_connections` is checked before `accept` against the current table (so a
//! reload applies it), and beyond it accepting waits and the kernel's backlog holds new
//! clients; nothing is refused or crashes.
//! `limits.header_read_timeout` closes clients that never finish their headers, and
//! clients that send nothing at all: hyper's timer starts only once the first bytes have
//! told HTTP/1.1 from HTTP/2, so a connection must also bring its first request within
//! that time (`first_request_within`). Neither touches a stream once it is upgraded:
//! those are tracked by `drain`, not by hyper.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::ListenerKind;
use crate::proxy::{ConnInfo, Proxy};

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

/// A connection counted in the `connections` gauge until dropped, also by a panic that
/// unwinds its task.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(gauge: &prometheus::IntGauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Largest request head accepted; beyond it hyper answers 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Runs a connection, and drops it (closing the socket) if no request has reached the
/// service `limit` after it started: a client that connects and sends nothing, or stops
/// inside the 24 bytes that tell HTTP/1.1 from HTTP/2, or opens HTTP/2 and never sends
/// a request, would otherwise hold its `max_connections` slot for good. Once a request
/// has come, hyper's own timers take over (HTTP/1.1 closes a keep-alive connection that
/// starts no new request within `header_read_timeout`).
async fn first_request_within<F: Future>(served: F, requested: &AtomicBool, limit: Duration) {
    let mut served = std::pin::pin!(served);
    let mut deadline = std::pin::pin!(tokio::time::sleep(limit));
    std::future::poll_fn(|cx| {
        if served.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // Once a request has come the timer is left alone, so serving costs nothing more.
        if !requested.load(Ordering::Relaxed) && deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!("no request within header_read_timeout; connection closed");
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
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
    let graceful = GracefulShutdown::new();
    loop {
        let max = proxy.router().load().settings.config.limits.max_connections;
        {
            let released = open.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if open.count.load(Ordering::Acquire) >= max {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = released => {}
                }
                continue;
            }
        }
        let (socket, client) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = kind.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let table = proxy.router().load_full();
        let limits = table.settings.config.limits;
        let tls = table.settings.tls.clone();
        drop(table);
        let proxy = proxy.clone();
        let watcher = graceful.watcher();
        let slot = Slot::take(&open);
        let open_for_streams = open.clone();
        tokio::spawn(async move {
            let _counted = Counted::new(proxy.metrics().connections(kind));
            let conn_info = ConnInfo::new(client, kind, tls.is_some(), open_for_streams);
            let requested = Arc::new(AtomicBool::new(false));
            let seen = requested.clone();
            let service = service_fn(move |req| {
                seen.store(true, Ordering::Relaxed);
                let proxy = proxy.clone();
                let conn_info = conn_info.clone();
                // Boxed: the request's future is kilobytes, and HTTP/2 moves it whole
                // into a task per stream (callgrind: 11 % fewer instructions per h2c
                // request, 1 % more per HTTP/1.1 one; benches/RESULTS.md).
                Box::pin(
                    proxy
                        .handle(req, conn_info)
                        .map(Ok::<_, std::convert::Infallible>),
                )
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
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
            builder.http2().timer(TokioTimer::new());
            match tls {
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(socket))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            let served = watcher.watch(conn.into_owned());
                            first_request_within(served, &requested, limits.header_read_timeout)
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(socket), service);
                    let served = watcher.watch(conn.into_owned());
                    first_request_within(served, &requested, limits.header_read_timeout).await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
