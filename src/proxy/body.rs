//! Bodies on the request path: streamed both ways, never buffered whole.
//!
//! `RequestBody` carries the client's body upstream and can be taken back if the upstream
//! never polled it (a connect failure), which is what makes the same-colour retry possible
//! without buffering. `ProxyBody` is what clients receive: an upstream body that counts its
//! bytes and records the request's metrics when it ends, or a small body of our own.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::IntCounter;

use crate::drain::RequestGuard;
use crate::metrics::{Metrics, Protocol};
use crate::upstream::Color;

/// The client's body on its way upstream.
pub struct RequestBody {
    /// Moved here from `slot` on the first poll, so later polls take no lock.
    inner: Option<Incoming>,
    /// Holds the body until the upstream polls it; whoever retries takes it back from here.
    slot: Option<Arc<Mutex<Option<Incoming>>>>,
    to_upstream: IntCounter,
}

/// A handle to take back a body the upstream never read.
pub struct Reclaim(Arc<Mutex<Option<Incoming>>>);

impl Reclaim {
    /// The body, if it was never polled.
    pub fn take(&self) -> Option<Incoming> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl RequestBody {
    /// A body that cannot be retried (one upstream to try).
    pub fn direct(body: Incoming, to_upstream: IntCounter) -> RequestBody {
        RequestBody {
            inner: Some(body),
            slot: None,
            to_upstream,
        }
    }

    /// A body that can be reclaimed if the upstream never polls it.
    pub fn reclaimable(body: Incoming, to_upstream: IntCounter) -> (RequestBody, Reclaim) {
        let slot = Arc::new(Mutex::new(Some(body)));
        (
            RequestBody {
                inner: None,
                slot: Some(slot.clone()),
                to_upstream,
            },
            Reclaim(slot),
        )
    }

    fn peek<T>(&self, f: impl FnOnce(&Incoming) -> T, empty: T) -> T {
        if let Some(b) = &self.inner {
            return f(b);
        }
        match &self.slot {
            Some(slot) => match &*slot.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(b) => f(b),
                None => empty,
            },
            None => empty,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.inner.is_none()
            && let Some(slot) = this.slot.take()
        {
            this.inner = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.to_upstream.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.peek(|b| b.is_end_stream(), true)
    }

    fn size_hint(&self) -> SizeHint {
        self.peek(|b| b.size_hint(), SizeHint::with_exact(0))
    }
}

/// Records a request's metrics when its response body ends or is dropped.
struct Finish {
    metrics: Metrics,
    color: Color,
    protocol: Protocol,
    status: u16,
    started: Instant,
    _guard: RequestGuard,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.metrics.color(self.color).request(
            self.protocol,
            self.status,
            self.started.elapsed().as_secs_f64(),
        );
    }
}

/// A response body for clients.
pub enum ProxyBody {
    /// A body Switchyard wrote (errors, 101s, refusals it built).
    Full(Option<Bytes>),
    /// The upstream's body, streamed.
    Upstream {
        inner: Incoming,
        to_client: IntCounter,
        finish: Option<Box<FinishHandle>>,
    },
}

/// Opaque end-of-request bookkeeping carried by an upstream body.
pub struct FinishHandle(#[allow(dead_code)] Finish);

impl ProxyBody {
    /// A complete body.
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(Some(bytes).filter(|b| !b.is_empty()))
    }

    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// The upstream's body; metrics are recorded and the guard released when it ends.
    pub fn upstream(
        inner: Incoming,
        metrics: &Metrics,
        color: Color,
        protocol: Protocol,
        status: u16,
        started: Instant,
        guard: RequestGuard,
    ) -> ProxyBody {
        ProxyBody::Upstream {
            to_client: metrics.color(color).bytes_to_client.clone(),
            finish: Some(Box::new(FinishHandle(Finish {
                metrics: metrics.clone(),
                color,
                protocol,
                status,
                started,
                _guard: guard,
            }))),
            inner,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream {
                inner,
                to_client,
                finish,
            } => {
                let polled = Pin::new(inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            to_client.inc_by(data.len() as u64);
                        }
                    }
                    // The end, or a failure: the request is over either way.
                    Poll::Ready(_) => {
                        finish.take();
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
