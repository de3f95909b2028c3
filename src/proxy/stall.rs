//! `limits.stall_timeout` for plain HTTP: a side that moves none of the bytes waiting
//! on it for that long ends its exchange, as nginx's `send_timeout` and
//! `proxy_read_timeout` do. Without it a client that stops reading an answer, an upstream
//! that stops sending one mid-body, or a client that stops sending its request body holds
//! its connections (an upstream one among them) for ever; back-pressure keeps memory
//! bounded, but not sockets. (WebSocket streams have their own watch, in `websocket`.)
//!
//! Nothing here costs anything while bytes flow: the timer is made the first time a side
//! waits, and is then reset once per period at most, not per read or write.
//!
//! Progress is what a write hands the kernel, so a peer that reads slowly must let a
//! waiting write go on within a period. Linux reports a full socket writable again only
//! once a third of its send buffer (megabytes, after autotuning) is free, so a client
//! reading a few KB/s would look stalled; `limit_unsent` makes it report so once the
//! unsent bytes fall below a small mark instead.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::Limits;
use crate::drain::{AnswerSlot, Tracker};
use crate::listener::{Open, Slot};
use crate::metrics::GaugeGuard;
use crate::route_table::Router;

/// After Switchyard has closed its side of a client's connection, how long it goes on
/// reading (and dropping) what the client still sends, at most: nginx's `lingering_time`,
/// time for an upload cut short (at a drain deadline) to finish sending and read its
/// answer.
const LINGER: Duration = Duration::from_secs(30);
/// The longest pause between two reads while lingering. nginx's `lingering_timeout` is
/// 5 s; shorter here, since a client that has stopped sending holds one of
/// `max_connections`' places meanwhile.
const LINGER_PAUSE: Duration = Duration::from_secs(2);

/// The unsent bytes a client's or upstream's socket may hold (`TCP_NOTSENT_LOWAT`).
const UNSENT_MARK: u32 = 64 * 1024;

/// Limits the bytes waiting unsent in `socket`'s send buffer to `UNSENT_MARK` (bytes sent
/// and not yet acknowledged are not limited, so a fast peer on a long path is not slowed):
/// a write waits for the peer's reading, not for megabytes to drain, and the stall timers
/// see a slow peer's progress. A socket option the kernel may lack is left alone.
pub fn limit_unsent(socket: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(socket).set_tcp_notsent_lowat(UNSENT_MARK);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (socket, UNSENT_MARK);
}

/// `now + after`, or a time that never comes if that is past what the clock can hold.
/// The config refuses limits past ten years, so this only keeps a timer from panicking
/// should an unchecked duration ever reach it.
pub fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + crate::drain::MAX_DRAIN)
}

/// Finds a side that made no progress for a whole period while it was waited on.
///
/// Polled each time the side is left waiting, with its progress so far (a count that
/// moves whenever bytes do). The first wait arms the timer; when it fires, progress that
/// has not moved since is a stall, and otherwise the timer is armed again. So a stall is
/// found one to two periods after the last byte, and a side that is only slow costs a
/// timer reset per period.
#[derive(Default)]
pub struct StallTimer {
    /// The timer, and the progress when it was armed.
    armed: Option<(Pin<Box<Sleep>>, u64)>,
}

impl StallTimer {
    /// `Ready` with the period when the side stalled; registers the waker otherwise.
    /// `period` is read only when the timer is armed.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        progress: u64,
        period: impl Fn() -> Duration,
    ) -> Poll<Duration> {
        let (sleep, at) = self.armed.get_or_insert_with(|| {
            (
                Box::pin(tokio::time::sleep_until(deadline_after(period()))),
                progress,
            )
        });
        while sleep.as_mut().poll(cx).is_ready() {
            let period = period();
            if *at == progress {
                return Poll::Ready(period);
            }
            sleep.as_mut().reset(deadline_after(period));
            *at = progress;
        }
        Poll::Pending
    }
}

/// Why a side was given up, for logs and errors: `what` did not happen "in 5m".
pub fn stalled(what: &str, period: Duration) -> String {
    format!("{what} in {}", humantime::format_duration(period))
}

/// A client's connection whose writes fail when the client takes none of the bytes for
/// it for `limits.stall_timeout`, or the limit `with_period` names (read from the current
/// table when the timer is armed).
/// The failure ends hyper's connection, and with it the exchange and its upstream
/// connection. Reads pass through: a client that sends nothing is hyper's timer's
/// (`header_read_timeout`) or an idle keep-alive.
/// With `cut_by`, a waiting write also fails once the HTTP/1.1 answer being written is
/// past its drain deadline: hyper does not poll the body of an answer its client does not
/// read, so the body cannot end itself then.
/// Once its sending side was shut down, the connection lingers when dropped (`linger`).
pub struct ClientIo {
    io: TcpStream,
    router: Arc<Router>,
    /// Which limit is the period.
    period: fn(&Limits) -> Duration,
    /// Bytes written so far.
    written: u64,
    stall: StallTimer,
    /// The answer being written, and where its cut is decided.
    answer: Option<(Arc<AnswerSlot>, Arc<Tracker>)>,
    /// The wake-up for its colour's next cut, while a write waits.
    cut: Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
    /// The socket counted against the open-file limit, for as long as it is open
    /// (upgraded or not, lingering or not); admin connections are the reserve's and are
    /// not.
    socket: Option<crate::nofile::Counted>,
    /// Its sending side was shut down (an answer ended the connection).
    shut: bool,
    /// Where a lingering socket is counted (`lingering`): its listener's open connections
    /// (`limits.max_connections`) and `connections` gauge. Without it, none lingers.
    linger: Option<(Arc<Open>, IntGauge)>,
}

impl ClientIo {
    /// Wraps a client's connection; `router` gives the current `limits.stall_timeout`.
    pub fn new(io: TcpStream, router: Arc<Router>) -> ClientIo {
        ClientIo::with_period(io, router, |limits| limits.stall_timeout)
    }

    /// Wraps a client's connection whose writes give up after `period` of the current
    /// limits instead.
    pub fn with_period(
        io: TcpStream,
        router: Arc<Router>,
        period: fn(&Limits) -> Duration,
    ) -> ClientIo {
        ClientIo {
            io,
            router,
            period,
            written: 0,
            stall: StallTimer::default(),
            answer: None,
            cut: None,
            socket: None,
            shut: false,
            linger: None,
        }
    }

    /// Lingers when dropped after its sending side was shut down (`linger`), counted
    /// meanwhile in `open` and `connections` as the connection was: a lingering socket
    /// holds a descriptor, and `max_connections` is what bounds the descriptors clients
    /// hold.
    pub fn lingering(mut self, open: Arc<Open>, connections: IntGauge) -> ClientIo {
        self.linger = Some((open, connections));
        self
    }

    /// Counts the socket against the open-file limit (`nofile::Counted`) until closed.
    pub fn counted(mut self) -> ClientIo {
        self.socket = Some(crate::nofile::Counted::accepted());
        self
    }

    /// The connection it wraps.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// Also fails a waiting write once the answer in `slot` (set for each HTTP/1.1 answer)
    /// is past a drain deadline that covers it.
    pub fn cut_by(mut self, slot: Arc<AnswerSlot>, tracker: Arc<Tracker>) -> ClientIo {
        self.answer = Some((slot, tracker));
        self
    }

    /// Counts what a write wrote; a pending one waits on the stall timer.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.written += n as u64;
                self.cut = None;
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.waiting(cx),
            failed => failed,
        }
    }

    /// After a write that is pending: an error once the client has stalled, or once the
    /// answer is past its drain deadline.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if let Some((slot, tracker)) = &self.answer
            && tracker.poll_answer_cut(slot, &mut self.cut, cx)
        {
            let why = "the answer it did not read is past its drain deadline";
            tracing::debug!(error = why, "client connection closed");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
        }
        let (router, limit) = (&self.router, self.period);
        let period = || limit(&router.load().settings.config.limits);
        match self.stall.poll(cx, self.written, period) {
            Poll::Ready(period) => {
                let why = stalled("the client took none of the bytes for it", period);
                tracing::debug!(error = %why, "client connection closed");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.waiting(cx),
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.io).poll_shutdown(cx);
        this.shut |= matches!(done, Poll::Ready(Ok(())));
        done
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if self.shut
            && let Some((open, connections)) = self.linger.take()
        {
            let held = (
                self.socket.take(),
                Slot::take(&open),
                GaugeGuard::new(&connections),
            );
            linger(&self.io, held);
        }
    }
}

/// Reads and drops what the client still sends on a connection whose sending side was
/// shut down, until the client closes it too, pauses for `LINGER_PAUSE`, or `LINGER` has
/// passed (nginx's lingering close). A socket closed with bytes unread, or that bytes
/// reach after it closed, resets the connection, and the reset can destroy an answer the
/// client has not read yet: an HTTP/1.1 client that reads only once its whole body is
/// sent (httpx) would lose a 503 that cut its upload short. The socket goes on in a task
/// of its own, on a duplicate of its descriptor (the original is closed as `ClientIo`
/// drops), with what counts it (`held`) until it closes.
fn linger(io: &TcpStream, held: impl Send + 'static) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Ok(duplicate) = socket2::SockRef::from(io).try_clone() else {
        return;
    };
    runtime.spawn(async move {
        let _held = held;
        let Ok(mut socket) = TcpStream::from_std(duplicate.into()) else {
            return;
        };
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(Ok(1..)) = tokio::time::timeout(LINGER_PAUSE, socket.read(&mut sink)).await
            {
            }
        })
        .await;
    });
}

/// The HTTP/2 counterpart of `linger`, for the body of a request answered before it all
/// came (a 401, a 503 with no upstream to take it). Dropping the body would reset the
/// stream (RST_STREAM NO_ERROR, which RFC 9113 §8.1 allows), and clients that are still
/// sending take that badly: curl 7.88 reports a framing error instead of the answer it
/// has, httpx waits for a window that never opens. So the rest is read and dropped, within
/// a lingering socket's bounds; a body still open after them is reset as before. `held`
/// (the stream's count in its connection's activity) goes with it.
pub(crate) fn discard(body: hyper::body::Incoming, held: impl Send + 'static) {
    use http_body_util::BodyExt;
    if hyper::body::Body::is_end_stream(&body) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let _held = held;
        let mut body = body;
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(Some(Ok(_))) = tokio::time::timeout(LINGER_PAUSE, body.frame()).await {}
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    const PERIOD: Duration = Duration::from_millis(20);

    fn poll(timer: &mut StallTimer, progress: u64) -> Poll<Duration> {
        let mut cx = Context::from_waker(Waker::noop());
        timer.poll(&mut cx, progress, || PERIOD)
    }

    // Real time, but only lower bounds are asserted: a period after the last progress the
    // timer has fired, and a timer armed again just now has not.

    #[tokio::test]
    async fn a_stall_is_a_whole_period_without_progress() {
        let mut timer = StallTimer::default();
        assert!(poll(&mut timer, 0).is_pending());
        tokio::time::sleep(PERIOD).await;
        assert_eq!(poll(&mut timer, 0), Poll::Ready(PERIOD));
    }

    #[tokio::test]
    async fn progress_within_a_period_arms_the_timer_again() {
        let mut timer = StallTimer::default();
        assert!(poll(&mut timer, 0).is_pending());
        tokio::time::sleep(PERIOD).await;
        // Bytes moved since it was armed: not a stall, and a new period starts now.
        assert!(poll(&mut timer, 5).is_pending());
        tokio::time::sleep(PERIOD).await;
        assert!(poll(&mut timer, 5).is_ready());
    }
}
