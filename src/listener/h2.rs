//! HTTP/2 streams hyper stops polling. A client may withhold one stream's flow-control
//! window (stop reading that stream) while it reads the rest of its connection: hyper then
//! holds the answer's next chunk until the window opens, and does not poll the body
//! meanwhile. The body's own drain cut and stall timer (`proxy::body`) act only when it
//! is polled, so such a stream would hold its upstream connection, and count as in flight
//! on its colour, for as long as the client likes, past any drain deadline.
//!
//! Each HTTP/2 stream's task is spawned through `Exec`, which wraps it. Whenever the task
//! wakes and the stream still waits, the wrapper reads the stream's `StreamWatch`: while
//! hyper owes the body a poll (the body handed over a chunk and was not asked for the
//! next), it drops the stream, and h2 resets it (CANCEL), once the request's drain
//! deadline has passed or no bytes moved for `limits.stall_timeout`. Dropping it drops the
//! answer, its upstream connection and its in-flight count. A stream whose body is being
//! polled costs the wrapper one atomic load per wake; one that waits for its window, two
//! more (the cut marks) and a timer poll.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::futures::OwnedNotified;

use crate::drain::CutWatch;
use crate::proxy::stall::{self, StallTimer};
use crate::route_table::Router;

/// What an HTTP/2 stream's answer tells the wrapper of its task.
#[derive(Debug, Default)]
pub struct StreamWatch {
    /// The request's drain cut (none for an answer Switchyard wrote itself).
    cut: OnceLock<CutWatch>,
    /// Bytes of the answer handed to hyper.
    handed: AtomicU64,
    /// Whether hyper owes the body a poll: it took a data frame and has not asked for the
    /// next yet.
    owed: AtomicBool,
}

impl StreamWatch {
    /// The answer's drain cut, once the answer is known.
    pub fn answer_cut_by(&self, cut: Option<CutWatch>) {
        if let Some(cut) = cut {
            let _ = self.cut.set(cut);
        }
    }

    /// Before hyper polls the body.
    pub fn polling(&self) {
        self.owed.store(false, Ordering::Relaxed);
    }

    /// After: a data frame handed over is owed a poll.
    pub fn polled<E>(&self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        if let Poll::Ready(Some(Ok(frame))) = polled
            && let Some(data) = frame.data_ref()
        {
            self.handed.fetch_add(data.len() as u64, Ordering::Relaxed);
            self.owed.store(true, Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// The watch of the HTTP/2 stream whose task is spawned next on this thread. hyper
    /// calls the service for a request and spawns that stream's task right after, in the
    /// same poll of the connection, on the same thread, with nothing in between; anything
    /// else spawned through `Exec` (an upgraded stream's tunnel) finds it empty.
    static NEXT: Cell<Option<Arc<StreamWatch>>> = const { Cell::new(None) };
}

/// A watch for the HTTP/2 request the service was just given, which its stream's task
/// will be spawned with.
pub fn watch_next() -> Arc<StreamWatch> {
    let watch = Arc::new(StreamWatch::default());
    NEXT.set(Some(watch.clone()));
    watch
}

/// The executor of the client connections' HTTP/2 stream tasks; see the module's text.
#[derive(Clone)]
pub struct Exec {
    router: Arc<Router>,
}

impl Exec {
    /// `router` gives the current `limits.stall_timeout`.
    pub fn new(router: Arc<Router>) -> Exec {
        Exec { router }
    }
}

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        match NEXT.take() {
            // Boxed: the wrapper's future would otherwise hold the stream's, and each
            // move of it (into the wrapper, into the task) copies the stream's whole.
            Some(watch) => tokio::spawn(watched(Box::pin(stream), watch, self.router.clone())),
            None => tokio::spawn(stream),
        };
    }
}

/// The wrapper's wait for the drain cut: registered once, and again only when a cut
/// that did not concern this request moved the marks (polling a registered `Notified`
/// takes its lock, and a transfer limited by its window waits on every chunk).
struct CutWait {
    notified: Option<Pin<Box<OwnedNotified>>>,
    marks: Option<(u64, u64)>,
}

impl CutWait {
    /// Whether `cut` has come; registers the waker for a later one otherwise.
    fn poll(&mut self, cut: &CutWatch, cx: &mut Context<'_>) -> bool {
        let marks = cut.marks();
        if self.marks == Some(marks) {
            return false;
        }
        if cut.poll_cut(&mut self.notified, cx) {
            return true;
        }
        self.marks = Some(marks);
        false
    }
}

/// Runs a stream's task until it ends, or until it must be reset (see the module's text).
async fn watched<F: Future<Output = ()>>(
    mut stream: Pin<Box<F>>,
    watch: Arc<StreamWatch>,
    router: Arc<Router>,
) {
    let mut cut_wait = CutWait {
        notified: None,
        marks: None,
    };
    let mut stall = StallTimer::default();
    std::future::poll_fn(|cx| {
        if stream.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !watch.owed.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        if let Some(cut) = watch.cut.get()
            && cut_wait.poll(cut, cx)
        {
            tracing::debug!(
                "HTTP/2 answer waiting for its client's window reached its drain deadline; stream reset"
            );
            return Poll::Ready(());
        }
        let period = || router.load().settings.config.limits.stall_timeout;
        match stall.poll(cx, watch.handed.load(Ordering::Relaxed), period) {
            Poll::Ready(period) => {
                let why = stall::stalled("the client took none of the stream's bytes", period);
                tracing::debug!(error = %why, "HTTP/2 stream reset");
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}
