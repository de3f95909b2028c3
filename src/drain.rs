//! Who holds traffic, and when a stream must end.
//!
//! `Tracker` counts in-flight requests and open streams per colour (the guards below keep
//! the counts honest on every exit path) and carries the shutdown order. `DrainWatch` tells
//! one stream its deadline: the earliest of its colour's drain order (a flip away from it),
//! its upstream's retirement (a reload removed it) and shutdown, counting only orders given
//! by changes after the table that routed the stream. The protocol-aware close itself is in
//! `proxy::websocket`, with the messages it sends in `deepgram`; this module takes no hyper
//! types. Plain HTTP requests on a draining colour, and on every colour at shutdown, are
//! bounded by the same deadline: `cut_requests_at_deadlines` raises a per-colour mark that
//! their guards see (the response body then ends with an error; a request still waiting for
//! its answer gets a 503 the client can retry).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntGauge;
use tokio::sync::{Notify, watch};

use crate::route_table::Router;
use crate::upstream::{Color, Upstream};

/// The longest drain deadline honoured: ten years, the longest the config takes.
pub const MAX_DRAIN: Duration = crate::config::MAX_TIMEOUT;

/// An order to drain: streams routed by a table older than `generation` end at `deadline`.
///
/// Coverage goes by the route-table generation that routed the stream, not by when the
/// stream opened: a stream whose upstream handshake was still in flight at the change, or
/// whose request loaded the table while the change was being persisted, was routed before
/// the change and must drain with the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOrder {
    /// The generation of the change that gave the order.
    pub generation: u64,
    /// When the streams it covers must start their protocol-aware close.
    pub deadline: Instant,
    /// `deadline` on the wall clock, for `/status`.
    pub deadline_at: SystemTime,
    /// After the deadline, how long a stream may take to hand over its final results:
    /// `drain.grace` when the order was given, so that a reload while it runs changes
    /// neither this nor the deadline (and shutdown's bound, reckoned from both, holds).
    pub grace: Duration,
}

impl DrainOrder {
    /// An order given now by the change that makes `generation`; it ends the streams
    /// routed before that change after `timeout`, allowing them `grace` for their finals.
    /// A timeout past `MAX_DRAIN` is taken as `MAX_DRAIN` ("never", for any real stream),
    /// so an absurd `drain_timeout` from an API caller cannot overflow the clock.
    pub fn starting_now(generation: u64, timeout: Duration, grace: Duration) -> DrainOrder {
        let timeout = timeout.min(MAX_DRAIN);
        DrainOrder {
            generation,
            deadline: Instant::now() + timeout,
            deadline_at: SystemTime::now() + timeout,
            grace,
        }
    }

    /// Whether a stream routed by a table of `generation` is covered.
    pub fn covers(&self, generation: u64) -> bool {
        generation < self.generation
    }
}

#[derive(Debug, Default)]
struct ColorCounts {
    in_flight: AtomicU64,
    open_streams: AtomicU64,
    /// Streams under a drain order: what makes a colour "draining" in `/status`, unlike
    /// streams a preview client opened on the standby colour after the flip.
    draining: AtomicU64,
    /// Open streams by the generation of the table that routed them: those a drain order
    /// covers are known at once, before each stream's task has marked itself draining
    /// (`/status` in a flip's own answer). Written when a stream opens or ends.
    routed: Mutex<BTreeMap<u64, u64>>,
    /// Their deadlines, each with how many streams it ends: the earliest is the colour's
    /// `drain_deadline` in `/status`. Written only when a stream starts or stops draining
    /// (or its order changes), so never on the data path.
    deadlines: Mutex<BTreeMap<SystemTime, u64>>,
    /// Plain HTTP requests routed by a table older than this generation are past their
    /// colour's drain deadline and end now (SPEC: in-flight requests on the old colour are
    /// "bounded by the same deadline").
    http_cut: AtomicU64,
    /// Wakes requests waiting on an upstream when `http_cut` rises.
    cut: Arc<Notify>,
}

/// Per-colour traffic counts, the upstreams a reload removed, and the shutdown order.
#[derive(Debug)]
pub struct Tracker {
    colors: [ColorCounts; 2],
    /// Woken whenever a colour's traffic drops, for `/drain/wait` and shutdown.
    emptied: Notify,
    shutdown: watch::Sender<Option<DrainOrder>>,
    /// Upstreams a reload removed, while their streams or requests keep them alive: their
    /// requests are cut at the retirement's deadline, `/status` lists them, and a reload
    /// that lists one again puts it back. Changed only by reloads.
    retired: Mutex<Vec<Weak<Upstream>>>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            colors: Default::default(),
            emptied: Notify::new(),
            shutdown: watch::Sender::new(None),
            retired: Mutex::new(Vec::new()),
        }
    }
}

/// A colour's traffic at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub in_flight: u64,
    pub open_streams: u64,
    /// Of `open_streams`, those under a drain order.
    pub draining_streams: u64,
}

impl Counts {
    /// No requests and no streams.
    pub fn is_empty(&self) -> bool {
        self.in_flight == 0 && self.open_streams == 0
    }
}

impl Tracker {
    /// The colour's current counts.
    pub fn counts(&self, color: Color) -> Counts {
        let c = &self.colors[color.index()];
        Counts {
            in_flight: c.in_flight.load(Ordering::Acquire),
            open_streams: c.open_streams.load(Ordering::Acquire),
            draining_streams: c.draining.load(Ordering::Acquire),
        }
    }

    /// The earliest deadline of `color`'s draining streams, whatever ordered their drain (a
    /// flip, a reload that removed their upstream, shutdown).
    pub fn drain_deadline(&self, color: Color) -> Option<SystemTime> {
        let deadlines = self.colors[color.index()]
            .deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        deadlines.keys().next().copied()
    }

    /// Counts a request, routed by the table of `generation`, until the guard drops.
    pub fn request(self: &Arc<Self>, upstream: &Arc<Upstream>, generation: u64) -> RequestGuard {
        self.colors[upstream.color.index()]
            .in_flight
            .fetch_add(1, Ordering::AcqRel);
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard {
            cut: CutWatch {
                tracker: self.clone(),
                upstream: upstream.clone(),
                generation,
            },
        }
    }

    /// Whether the answer in `slot` is past a drain deadline that covers its request (its
    /// colour's, or its upstream's removal); registers `cx`'s waker for the colour's next
    /// cut otherwise, the registration kept in `next` between calls. Called only while a
    /// write to the client waits.
    pub fn poll_answer_cut(
        &self,
        slot: &AnswerSlot,
        next: &mut Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
        cx: &mut Context<'_>,
    ) -> bool {
        let color = usize::from(slot.color.load(Ordering::Relaxed));
        let Some(counts) = color.checked_sub(1).and_then(|i| self.colors.get(i)) else {
            *next = None;
            return false;
        };
        let generation = slot.generation.load(Ordering::Relaxed);
        let upstream = slot.upstream.load(Ordering::Relaxed);
        poll_notified(&counts.cut, next, cx, || {
            counts.http_cut.load(Ordering::Acquire) > generation
                || self.retired_cut(upstream, generation)
        })
    }

    /// Whether the removed upstream at address `upstream` (if it is one) cut its requests
    /// of `generation`.
    fn retired_cut(&self, upstream: usize, generation: u64) -> bool {
        let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired
            .iter()
            .filter(|u| Weak::as_ptr(u) as usize == upstream)
            .filter_map(Weak::upgrade)
            .any(|u| u.http_cut.load(Ordering::Acquire) > generation)
    }

    /// Ends the plain HTTP requests on `color` that `order` covers: its deadline has come.
    pub fn cut_requests(&self, color: Color, order: &DrainOrder) {
        let c = &self.colors[color.index()];
        if c.http_cut.fetch_max(order.generation, Ordering::AcqRel) < order.generation {
            c.cut.notify_waiters();
        }
    }

    /// Ends the plain HTTP requests on a removed upstream that its retirement covers.
    fn cut_upstream_requests(&self, upstream: &Upstream, order: &DrainOrder) {
        if upstream
            .http_cut
            .fetch_max(order.generation, Ordering::AcqRel)
            < order.generation
        {
            // Its colour's waiters look again; those on other upstreams wait on.
            self.colors[upstream.color.index()].cut.notify_waiters();
        }
    }

    /// A reload removed `upstream` from its pool: its streams and requests drain by `order`.
    pub fn retire(&self, upstream: &Arc<Upstream>, order: DrainOrder) {
        upstream.retire(order);
        // It gets no new requests, so its kept connections serve none, nor will those its
        // requests still running finish with.
        upstream.idle.close();
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired
            .retain(|u| u.strong_count() > 0 && !std::ptr::eq(u.as_ptr(), Arc::as_ptr(upstream)));
        retired.push(Arc::downgrade(upstream));
    }

    /// A reload listed a removed upstream again: its drain is cancelled.
    pub fn reinstate(&self, upstream: &Arc<Upstream>) {
        upstream.reinstate();
        upstream.idle.open();
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired
            .retain(|u| u.strong_count() > 0 && !std::ptr::eq(u.as_ptr(), Arc::as_ptr(upstream)));
    }

    /// The removed upstreams still alive (something still holds them: a stream, a request,
    /// an old table), each with the retirement that drains it.
    pub fn retired(&self) -> Vec<(Arc<Upstream>, DrainOrder)> {
        let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|u| u.retired().map(|o| (u, o)))
            .collect()
    }

    /// Counts a stream, routed by the table of `generation`, until the guard drops.
    pub fn stream(self: &Arc<Self>, upstream: &Arc<Upstream>, generation: u64) -> StreamGuard {
        let c = &self.colors[upstream.color.index()];
        *c.routed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(generation)
            .or_default() += 1;
        c.open_streams.fetch_add(1, Ordering::AcqRel);
        upstream.open_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            tracker: self.clone(),
            upstream: upstream.clone(),
            generation,
        }
    }

    /// How many of `color`'s open streams a table older than `generation` routed: those
    /// an order given by the change to `generation` covers.
    pub fn streams_routed_before(&self, color: Color, generation: u64) -> u64 {
        let routed = self.colors[color.index()]
            .routed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        routed.range(..generation).map(|(_, n)| n).sum()
    }

    /// Waits until `color` holds no traffic or `timeout` passes; returns the last counts.
    pub async fn wait_empty(&self, color: Color, timeout: Duration) -> Counts {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            let counts = self.counts(color);
            if counts.is_empty() {
                return counts;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return self.counts(color);
            }
        }
    }

    /// Orders every stream to drain (SIGTERM); the deadline of an earlier order stands.
    pub fn begin_shutdown(&self, timeout: Duration, grace: Duration) {
        self.shutdown.send_if_modified(|order| {
            if order.is_some() {
                return false;
            }
            // Every stream, whatever table routed it, ends at shutdown.
            *order = Some(DrainOrder::starting_now(u64::MAX, timeout, grace));
            true
        });
    }

    /// The shutdown order, once given.
    pub fn shutdown_order(&self) -> Option<DrainOrder> {
        *self.shutdown.borrow()
    }

    fn release(&self, color: Color, which: impl Fn(&ColorCounts) -> &AtomicU64) {
        // A colour can only become empty when one of its counts reaches zero, so only
        // then are waiters told (`notify_waiters` takes a lock: not on every request).
        if which(&self.colors[color.index()]).fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }
}

/// One in-flight HTTP request; counted per colour and upstream until dropped.
#[derive(Debug)]
pub struct RequestGuard {
    cut: CutWatch,
}

impl RequestGuard {
    /// The upstream serving the request.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.cut.upstream
    }

    /// Whether this request's colour, or its upstream's removal, reached a drain deadline
    /// that covers it.
    pub fn is_cut(&self) -> bool {
        self.cut.is_cut()
    }

    /// Resolves once this request is cut; never, if it is not.
    pub async fn cut(&self) {
        loop {
            let next = self.cut.next_cut();
            tokio::pin!(next);
            next.as_mut().enable();
            if self.is_cut() {
                return;
            }
            next.await;
        }
    }

    /// `CutWatch::poll_cut` for this request.
    pub fn poll_cut(
        &self,
        next: &mut Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
        cx: &mut Context<'_>,
    ) -> bool {
        self.cut.poll_cut(next, cx)
    }

    /// What decides this request's cut, to watch it from outside the request (an HTTP/2
    /// stream hyper does not poll: `listener::h2`). It does not count the request.
    pub fn cut_watch(&self) -> CutWatch {
        self.cut.clone()
    }

    /// Puts this request's answer in `slot`, the answer its HTTP/1.1 connection writes.
    pub fn mark(&self, slot: &AnswerSlot) {
        slot.answering(Some(&self.cut));
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let cut = &self.cut;
        cut.upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
        cut.tracker.release(cut.upstream.color, |c| &c.in_flight);
    }
}

/// A request's place in the drain: its upstream and the generation of the table that
/// routed it.
#[derive(Debug, Clone)]
pub struct CutWatch {
    tracker: Arc<Tracker>,
    upstream: Arc<Upstream>,
    generation: u64,
}

impl CutWatch {
    fn counts(&self) -> &ColorCounts {
        &self.tracker.colors[self.upstream.color.index()]
    }

    /// Whether the request's colour, or its upstream's removal, reached a drain deadline
    /// that covers it.
    pub fn is_cut(&self) -> bool {
        self.counts().http_cut.load(Ordering::Acquire) > self.generation
            || self.upstream.http_cut.load(Ordering::Acquire) > self.generation
    }

    /// The marks `is_cut` reads (the colour's cut, the upstream's): they move with every
    /// cut that could concern the request.
    pub fn marks(&self) -> (u64, u64) {
        (
            self.counts().http_cut.load(Ordering::Acquire),
            self.upstream.http_cut.load(Ordering::Acquire),
        )
    }

    /// A wake-up for the next cut on the request's colour; check `is_cut` after
    /// registering it (`Notified::enable`) so no cut is missed in between.
    pub fn next_cut(&self) -> tokio::sync::futures::OwnedNotified {
        self.counts().cut.clone().notified_owned()
    }

    /// Whether the request is cut; registers `cx`'s waker for a later cut otherwise, with
    /// the wake-up kept in `next` from one call to the next.
    pub fn poll_cut(
        &self,
        next: &mut Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
        cx: &mut Context<'_>,
    ) -> bool {
        poll_notified(&self.counts().cut, next, cx, || self.is_cut())
    }
}

/// Whether `is_cut` holds; registers `cx`'s waker for the next notification of `cut`
/// otherwise, the registration kept in `next` from one call to the next. It is enabled
/// before `is_cut` is read, so no cut is missed in between.
fn poll_notified(
    cut: &Arc<Notify>,
    next: &mut Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
    cx: &mut Context<'_>,
    is_cut: impl Fn() -> bool,
) -> bool {
    loop {
        let notified = next.get_or_insert_with(|| Box::pin(cut.clone().notified_owned()));
        notified.as_mut().enable();
        if is_cut() {
            return true;
        }
        match notified.as_mut().poll(cx) {
            // A cut of an older generation, or a spurious wake-up: register again.
            Poll::Ready(()) => *next = None,
            Poll::Pending => return false,
        }
    }
}

/// The HTTP/1.1 answer a client connection is writing, as plain numbers set for each
/// answer (nothing reference-counted, nothing locked, on the request path). hyper stops
/// polling an answer's body while its client reads nothing, so the body's own drain cut
/// (`proxy::body`) would wait for the stall timer; the connection's write that waits then
/// checks the cut here instead (`Tracker::poll_answer_cut`, from `proxy::stall::ClientIo`).
#[derive(Debug, Default)]
pub struct AnswerSlot {
    /// 0: an answer Switchyard wrote itself, never cut; else the colour's index + 1.
    color: AtomicU8,
    generation: AtomicU64,
    /// The upstream's address, to find it among the retired ones; never dereferenced.
    upstream: AtomicUsize,
}

impl AnswerSlot {
    /// The answer now written is `cut`'s request's, or one of Switchyard's own (`None`).
    pub fn answering(&self, cut: Option<&CutWatch>) {
        match cut {
            Some(cut) => {
                let color = cut.upstream.color.index() as u8 + 1;
                self.upstream
                    .store(Arc::as_ptr(&cut.upstream) as usize, Ordering::Relaxed);
                self.generation.store(cut.generation, Ordering::Relaxed);
                self.color.store(color, Ordering::Relaxed);
            }
            None => self.color.store(0, Ordering::Relaxed),
        }
    }
}

/// One open stream; counted per colour and upstream until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    tracker: Arc<Tracker>,
    upstream: Arc<Upstream>,
    /// The generation of the table that routed it.
    generation: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        {
            let mut routed = self.tracker.colors[self.upstream.color.index()]
                .routed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = routed.get_mut(&self.generation) {
                *n -= 1;
                if *n == 0 {
                    routed.remove(&self.generation);
                }
            }
        }
        self.upstream.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.tracker
            .release(self.upstream.color, |c| &c.open_streams);
    }
}

/// What a deadline ends: a colour's requests (a flip's order, or shutdown's), or a
/// removed upstream's (a reload's).
enum Cut {
    Color(Color),
    /// Weak: waiting for its deadline must not keep a removed upstream (and its kept
    /// connections) alive once its traffic is gone.
    Upstream(Weak<Upstream>),
}

/// Ends plain HTTP requests on a draining colour at its deadline, following the route
/// table (a rollback before the deadline cancels the order, so nothing is cut), those on
/// an upstream a reload removed at its retirement's deadline (unless a reload put it back),
/// and every colour's at the shutdown deadline. Runs until `stop` is cancelled.
pub async fn cut_requests_at_deadlines(
    router: Arc<Router>,
    tracker: Arc<Tracker>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut changes = router.subscribe();
    let mut shutdown = tracker.shutdown.subscribe();
    loop {
        let table = router.load_full();
        let at_shutdown = *shutdown.borrow_and_update();
        let colors = Color::ALL
            .into_iter()
            .filter_map(|c| table.drain_order(c).map(|o| (c, o)))
            .chain(
                at_shutdown
                    .into_iter()
                    .flat_map(|o| Color::ALL.map(|c| (c, o))),
            )
            .filter(|(c, o)| {
                tracker.colors[c.index()].http_cut.load(Ordering::Acquire) < o.generation
            })
            .map(|(c, o)| (Cut::Color(c), o));
        // A reload retires upstreams before it publishes its table, so the change that
        // wakes this loop finds them.
        let upstreams = tracker
            .retired()
            .into_iter()
            .filter(|(u, o)| u.http_cut.load(Ordering::Acquire) < o.generation)
            .map(|(u, o)| (Cut::Upstream(Arc::downgrade(&u)), o));
        let next = colors.chain(upstreams).min_by_key(|(_, o)| o.deadline);
        drop(table);
        let due = async {
            match &next {
                Some((_, order)) => tokio::time::sleep_until(order.deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            r = shutdown.changed() => if r.is_err() { return },
            _ = due => match next {
                Some((Cut::Color(color), order))
                    if router.load().drain_order(color) == Some(order)
                        || tracker.shutdown_order() == Some(order) =>
                {
                    // What the deadline found still there (streams end on their own
                    // deadline, each with its line).
                    let Counts { in_flight, open_streams, .. } = tracker.counts(color);
                    if at_shutdown == Some(order) {
                        tracing::info!(color = %color, in_flight, open_streams, "shutdown deadline: ending in-flight requests");
                    } else {
                        tracing::info!(color = %color, in_flight, open_streams, "drain deadline: ending in-flight requests on the old colour");
                    }
                    tracker.cut_requests(color, &order);
                }
                Some((Cut::Upstream(upstream), order)) => {
                    if let Some(upstream) = upstream.upgrade()
                        && upstream.retired() == Some(order)
                    {
                        tracing::info!(upstream = %upstream.name, color = %upstream.color, "drain deadline: ending in-flight requests on the removed upstream");
                        tracker.cut_upstream_requests(&upstream, &order);
                    }
                }
                _ => {}
            },
        }
    }
}

/// Tells one stream when it must end, following route changes and shutdown.
pub struct DrainWatch {
    /// The generation of the route table that routed the stream.
    generation: u64,
    upstream: Arc<Upstream>,
    router: Arc<Router>,
    changes: watch::Receiver<u64>,
    shutdown: watch::Receiver<Option<DrainOrder>>,
    tracker: Arc<Tracker>,
    /// `draining_streams` for the stream's colour, raised while an order covers it.
    gauge: Option<IntGauge>,
    /// The deadline this stream is counted as draining with (in the tracker and the
    /// gauge), if it is.
    counted: Option<SystemTime>,
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        self.mark(None);
    }
}

impl DrainWatch {
    /// Keeps `gauge` raised by one while this stream is under a drain order.
    pub fn counting(mut self, gauge: IntGauge) -> DrainWatch {
        self.mark(None);
        self.gauge = Some(gauge);
        self.mark(self.current());
        self
    }

    /// Counts this stream as draining under `order`, or as not draining.
    fn mark(&mut self, order: Option<DrainOrder>) {
        let deadline = order.map(|o| o.deadline_at);
        if self.counted == deadline {
            return;
        }
        let counts = &self.tracker.colors[self.upstream.color.index()];
        // The count and the deadlines change together, under the lock: `/status` reads
        // them as one.
        let mut deadlines = counts
            .deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = self.counted
            && let Some(n) = deadlines.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                deadlines.remove(&old);
            }
        }
        if let Some(new) = deadline {
            *deadlines.entry(new).or_default() += 1;
        }
        let step = match (self.counted, deadline) {
            (None, Some(_)) => 1,
            (Some(_), None) => -1,
            _ => 0,
        };
        match step {
            1 => counts.draining.fetch_add(1, Ordering::AcqRel),
            -1 => counts.draining.fetch_sub(1, Ordering::AcqRel),
            _ => 0,
        };
        drop(deadlines);
        if step != 0
            && let Some(gauge) = &self.gauge
        {
            gauge.add(step);
        }
        self.counted = deadline;
    }

    /// Watches for a stream on `upstream` routed by the table of `generation`.
    pub fn new(
        router: Arc<Router>,
        tracker: &Arc<Tracker>,
        upstream: Arc<Upstream>,
        generation: u64,
    ) -> DrainWatch {
        DrainWatch {
            tracker: tracker.clone(),
            counted: None,
            generation,
            changes: router.subscribe(),
            shutdown: tracker.shutdown.subscribe(),
            upstream,
            router,
            gauge: None,
        }
    }

    /// What ends this stream, if any order covers it now: the order with the soonest
    /// deadline, its grace shortened so that the stream's end (deadline and grace) is the
    /// soonest any covering order allows. So a flip's drain, a reload's retirement of the
    /// upstream and a shutdown each keep their promised end, whichever grace each was
    /// given. A flip back to the stream's colour clears its colour's order, which is how a
    /// rollback cancels a drain.
    pub fn current(&self) -> Option<DrainOrder> {
        let table = self.router.load();
        let orders = [
            table.drain_order(self.upstream.color),
            self.upstream.retired(),
            *self.shutdown.borrow(),
        ];
        let covering = || {
            orders
                .into_iter()
                .flatten()
                .filter(|o| o.covers(self.generation))
        };
        let first = covering().min_by_key(|o| o.deadline)?;
        // Each order's end, counted from the first deadline (no instant to overflow).
        let grace = covering()
            .map(|o| {
                o.deadline
                    .saturating_duration_since(first.deadline)
                    .saturating_add(o.grace)
            })
            .min()?;
        Some(DrainOrder { grace, ..first })
    }

    /// Resolves when the route table or the shutdown order changes. Cancel-safe.
    pub async fn changed(&mut self) {
        tokio::select! {
            r = self.changes.changed() => {
                if r.is_err() { std::future::pending::<()>().await }
            }
            r = self.shutdown.changed() => {
                if r.is_err() { std::future::pending::<()>().await }
            }
        }
    }

    /// Resolves at this stream's drain deadline, following changes until then; returns the
    /// order that fired (`drain`'s first part).
    async fn deadline(&mut self) -> DrainOrder {
        loop {
            let current = self.current();
            self.mark(current);
            match current {
                Some(order) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(order.deadline.into()) => {
                            // As it is now: a change that came with the deadline counts.
                            if let Some(now) = self.current().filter(|now| now.deadline <= Instant::now()) {
                                self.mark(Some(now));
                                return now;
                            }
                        }
                        _ = self.changed() => {}
                    }
                }
                None => self.changed().await,
            }
        }
    }

    /// A stream's whole drain: waits for its deadline and sets `fired` (the stream then
    /// starts its protocol's close), then resolves when its grace is over. The end can
    /// only come sooner meanwhile: a reload that removes the stream's upstream, or a
    /// shutdown, can bring it forward. Once the close has started, nothing moves it later:
    /// not an order cancelled (a rollback, the upstream put back), nor a new one with a
    /// later end (a flip after a rollback), since the client's audio is no longer passed on
    /// and only its 1012 lets it reconnect.
    pub async fn drain(&mut self, fired: &AtomicBool) {
        let order = self.deadline().await;
        fired.store(true, Ordering::Release);
        let end_of = |o: DrainOrder| {
            o.deadline
                .checked_add(o.grace)
                .unwrap_or(o.deadline + MAX_DRAIN)
        };
        let mut end = end_of(order);
        loop {
            if let Some(now) = self.current() {
                end = end.min(end_of(now));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(end.into()) => return,
                _ = self.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamUrl;

    /// The count `/status` reads to call a colour draining in a flip's own answer, before
    /// any stream has marked itself: the open streams older tables routed, as they open
    /// and end.
    #[test]
    fn streams_routed_before_a_change_are_counted_as_they_open_and_end() {
        let tracker = Arc::new(Tracker::default());
        let url = UpstreamUrl::parse("http://127.0.0.1:1").expect("valid url");
        let upstream = Arc::new(Upstream::new(url, Color::Blue));
        let first = tracker.stream(&upstream, 3);
        let second = tracker.stream(&upstream, 3);
        let later = tracker.stream(&upstream, 5);
        assert_eq!(tracker.streams_routed_before(Color::Blue, 3), 0);
        assert_eq!(tracker.streams_routed_before(Color::Blue, 4), 2);
        assert_eq!(tracker.streams_routed_before(Color::Blue, 6), 3);
        assert_eq!(tracker.streams_routed_before(Color::Green, 6), 0);
        drop(first);
        assert_eq!(tracker.streams_routed_before(Color::Blue, 4), 1);
        drop(second);
        drop(later);
        assert_eq!(tracker.streams_routed_before(Color::Blue, 6), 0);
        assert_eq!(tracker.counts(Color::Blue).open_streams, 0);
    }
}
