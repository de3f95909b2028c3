//! The Prometheus registry the app owns, and the handles the request path uses.
//!
//! Label values come from closed enums (colours, protocols, status classes, close reasons),
//! plus upstream URLs, which the config bounds. The request path uses children resolved at
//! start-up, so counting is an atomic add, not a label lookup.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::deepgram::Endpoint;
use crate::upstream::{Color, Upstream};

/// Which side of the proxy a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    WebSocket,
}

impl Protocol {
    fn index(self) -> usize {
        self as usize
    }
}

/// Why a stream ended, for `stream_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent the first close frame.
    Client,
    /// The upstream sent the first close frame.
    Upstream,
    /// The upstream closed within grace after the drain message.
    DrainGraceful,
    /// Grace ran out, or the endpoint has no graceful close.
    DrainForced,
    /// A transport failure on either side.
    Error,
}

impl CloseReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Upstream => "upstream",
            CloseReason::DrainGraceful => "drain_graceful",
            CloseReason::DrainForced => "drain_forced",
            CloseReason::Error => "error",
        }
    }

    const ALL: [CloseReason; 5] = [
        CloseReason::Client,
        CloseReason::Upstream,
        CloseReason::DrainGraceful,
        CloseReason::DrainForced,
        CloseReason::Error,
    ];
}

/// Kinds of upstream failure on live traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Protocol,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 3] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Proxy,
    Preview,
    Admin,
}

impl ListenerKind {
    /// The metric label, also used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Proxy => "proxy",
            ListenerKind::Preview => "preview",
            ListenerKind::Admin => "admin",
        }
    }
}

/// Per-colour handles resolved once.
#[derive(Clone)]
pub struct ColorMetrics {
    /// `[protocol][status class 1xx..5xx]`.
    requests: [[IntCounter; 5]; 2],
    duration: [Histogram; 2],
    open_streams: [IntGauge; 3],
    /// Streams of this colour under a drain order.
    pub draining_streams: IntGauge,
    closes: [IntCounter; 5],
    /// Bytes relayed from client to upstream.
    pub bytes_to_upstream: IntCounter,
    /// Bytes relayed from upstream to client.
    pub bytes_to_client: IntCounter,
}

/// Holds a gauge one higher until dropped.
pub struct GaugeGuard(IntGauge);

/// Every Switchyard metric, registered in a registry this value owns. Cheap to clone
/// (one reference count): the request path keeps a copy per request.
#[derive(Clone)]
pub struct Metrics(Arc<Families>);

/// The families and resolved handles behind `Metrics`.
pub struct Families {
    registry: Registry,
    process: Registry,
    colors: [ColorMetrics; 2],
    active_color: IntGaugeVec,
    /// The route table's generation.
    pub route_generation: IntGauge,
    route_changes: IntCounterVec,
    upstream_healthy: IntGaugeVec,
    upstream_errors: IntCounterVec,
    connections: [IntGauge; 3],
    /// Requests refused 401 per listener (never routed, so not in `requests_total`).
    unauthorized: [IntCounter; 3],
    /// Per listener, when the next log line about a 401 may be written (`once_a_second`).
    unauthorized_logged: [AtomicU64; 3],
    /// 1 while this replica's route state matches its store (always, for the file store).
    pub store_in_sync: IntGauge,
}

impl std::ops::Deref for Metrics {
    type Target = Families;

    fn deref(&self) -> &Families {
        &self.0
    }
}

/// Whether a line rate-limited by `next` may be written now: at most one a second. `next`
/// keeps the earliest time the next one may be (`monotonic_millis`; 0 for at once). The
/// monotonic clock, so that a wall clock stepped back does not silence the line.
pub(crate) fn once_a_second(next: &AtomicU64) -> bool {
    once_a_second_at(next, monotonic_millis())
}

fn once_a_second_at(next: &AtomicU64, now: u64) -> bool {
    let allowed = next.load(Ordering::Relaxed);
    now >= allowed
        && next
            .compare_exchange(allowed, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Milliseconds since the first call, on the monotonic clock.
fn monotonic_millis() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX - 1000)
}

fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

impl ColorMetrics {
    /// Counts a finished request or handshake.
    pub fn request(&self, protocol: Protocol, status: u16, seconds: f64) {
        self.requests[protocol.index()][status_class(status)].inc();
        self.duration[protocol.index()].observe(seconds);
    }

    /// Counts a request without a duration (a WebSocket handshake; its duration is the
    /// stream's lifetime, observed when it ends).
    pub fn count_request(&self, protocol: Protocol, status: u16) {
        self.requests[protocol.index()][status_class(status)].inc();
    }

    /// Observes a stream's lifetime.
    pub fn stream_ended(&self, reason: CloseReason, seconds: f64) {
        self.closes[reason as usize].inc();
        self.duration[Protocol::WebSocket.index()].observe(seconds);
    }

    /// The open-streams gauge for an endpoint.
    pub fn open_streams(&self, endpoint: Endpoint) -> &IntGauge {
        &self.open_streams[endpoint as usize]
    }
}

impl GaugeGuard {
    /// Raises `gauge` by one until the guard drops.
    pub fn new(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Registers every family in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("switchyard".into()), None)
            .expect("a fixed prefix is a valid namespace");
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry
                .register(c)
                .expect("each family is registered once with a fixed valid name");
        };

        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests routed, by colour, protocol and status class.",
            ),
            &["color", "protocol", "code"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "HTTP: time to the end of the response. WebSocket: the stream's lifetime.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
            ]),
            &["color", "protocol"],
        )
        .expect("valid metric");
        let open_streams = IntGaugeVec::new(
            Opts::new(
                "open_streams",
                "Open WebSocket streams, draining ones included.",
            ),
            &["color", "endpoint"],
        )
        .expect("valid metric");
        let draining = IntGaugeVec::new(
            Opts::new("draining_streams", "Streams under a drain order."),
            &["color"],
        )
        .expect("valid metric");
        let closes = IntCounterVec::new(
            Opts::new(
                "stream_closes_total",
                "Stream ends, by who or what ended them.",
            ),
            &["color", "reason"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new("bytes_total", "Body and message bytes relayed."),
            &["color", "direction"],
        )
        .expect("valid metric");
        let active_color = IntGaugeVec::new(
            Opts::new("active_color", "1 for the active colour, 0 for the other."),
            &["color"],
        )
        .expect("valid metric");
        let route_generation = IntGauge::new("route_generation", "The route table's generation.")
            .expect("valid metric");
        let route_changes = IntCounterVec::new(
            Opts::new("route_changes_total", "Route changes by action."),
            &["action"],
        )
        .expect("valid metric");
        let upstream_healthy = IntGaugeVec::new(
            Opts::new("upstream_healthy", "1 when the upstream takes new work."),
            &["color", "upstream"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "upstream_errors_total",
                "Upstream failures on live traffic.",
            ),
            &["color", "upstream", "kind"],
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new("connections", "Open client connections per listener."),
            &["listener"],
        )
        .expect("valid metric");
        let unauthorized = IntCounterVec::new(
            Opts::new(
                "unauthorized_total",
                "Requests refused 401: no listed client key (proxy, preview) or no admin token (admin).",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let store_in_sync = IntGauge::new(
            "store_in_sync",
            "1 while this replica follows the route store's latest state (always for the file store).",
        )
        .expect("valid metric");

        let colors = Color::ALL.map(|color| {
            let c = color.as_str();
            let protos = ["http", "websocket"];
            let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
            ColorMetrics {
                requests: protos.map(|p| classes.map(|k| requests.with_label_values(&[c, p, k]))),
                duration: protos.map(|p| duration.with_label_values(&[c, p])),
                open_streams: [Endpoint::Listen, Endpoint::Speak, Endpoint::Other]
                    .map(|e| open_streams.with_label_values(&[c, e.as_str()])),
                draining_streams: draining.with_label_values(&[c]),
                closes: CloseReason::ALL.map(|r| closes.with_label_values(&[c, r.as_str()])),
                bytes_to_upstream: bytes.with_label_values(&[c, "to_upstream"]),
                bytes_to_client: bytes.with_label_values(&[c, "to_client"]),
            }
        });
        for action in ["startup", "flip", "rollback", "commit", "reload"] {
            route_changes.with_label_values(&[action]);
        }
        let connections_by = [
            ListenerKind::Proxy,
            ListenerKind::Preview,
            ListenerKind::Admin,
        ]
        .map(|l| connections.with_label_values(&[l.as_str()]));
        let unauthorized_by = [
            ListenerKind::Proxy,
            ListenerKind::Preview,
            ListenerKind::Admin,
        ]
        .map(|l| unauthorized.with_label_values(&[l.as_str()]));

        reg(Box::new(requests));
        reg(Box::new(duration));
        reg(Box::new(open_streams));
        reg(Box::new(draining));
        reg(Box::new(closes));
        reg(Box::new(bytes));
        reg(Box::new(active_color.clone()));
        reg(Box::new(route_generation.clone()));
        reg(Box::new(route_changes.clone()));
        reg(Box::new(upstream_healthy.clone()));
        reg(Box::new(upstream_errors.clone()));
        reg(Box::new(connections));
        reg(Box::new(unauthorized));
        reg(Box::new(store_in_sync.clone()));
        // The process collector carries no prefix: `process_*` is the name scrapers know.
        let process = Registry::new();
        if let Err(e) = process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }

        Metrics(Arc::new(Families {
            registry,
            process,
            colors,
            active_color,
            route_generation,
            route_changes,
            upstream_healthy,
            upstream_errors,
            connections: connections_by,
            unauthorized: unauthorized_by,
            unauthorized_logged: Default::default(),
            store_in_sync,
        }))
    }

    /// Handles for one colour.
    pub fn color(&self, color: Color) -> &ColorMetrics {
        &self.colors[color.index()]
    }

    /// Sets `active_color` and `route_generation` from a table.
    pub fn route(&self, active: Color, generation: u64) {
        for c in Color::ALL {
            self.active_color
                .with_label_values(&[c.as_str()])
                .set(i64::from(c == active));
        }
        self.route_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// Counts a route change.
    pub fn route_change(&self, action: &str) {
        self.route_changes.with_label_values(&[action]).inc();
    }

    /// Publishes an upstream's health.
    pub fn upstream_health(&self, upstream: &Upstream) {
        self.upstream_healthy
            .with_label_values(&[upstream.color.as_str(), &upstream.name])
            .set(i64::from(upstream.is_healthy()));
    }

    /// Publishes an upstream a route table lists: its health, and its error counters at
    /// zero. Without them `upstream_errors_total` would be missing from the exposition until
    /// an error, and that first error would be invisible to `increase()` and `rate()`,
    /// which need a sample before the change.
    pub fn publish_upstream(&self, upstream: &Upstream) {
        self.upstream_health(upstream);
        for kind in UpstreamErrorKind::ALL {
            self.upstream_errors.with_label_values(&[
                upstream.color.as_str(),
                &upstream.name,
                kind.as_str(),
            ]);
        }
    }

    /// Forgets the health of an upstream a reload removed: it takes no new work, and a
    /// stale 1 would hide a colour left with no healthy upstream.
    pub fn forget_upstream_health(&self, upstream: &Upstream) {
        let labels = [upstream.color.as_str(), &*upstream.name];
        let _ = self.upstream_healthy.remove_label_values(&labels);
    }

    /// Forgets an upstream a reload removed, once nothing runs on it.
    pub fn forget_upstream(&self, upstream: &Upstream) {
        let labels = [upstream.color.as_str(), &*upstream.name];
        let _ = self.upstream_healthy.remove_label_values(&labels);
        for kind in UpstreamErrorKind::ALL {
            let _ =
                self.upstream_errors
                    .remove_label_values(&[labels[0], labels[1], kind.as_str()]);
        }
    }

    /// Counts an upstream failure on live traffic.
    pub fn upstream_error(&self, upstream: &Upstream, kind: UpstreamErrorKind) {
        self.upstream_errors
            .with_label_values(&[upstream.color.as_str(), &upstream.name, kind.as_str()])
            .inc();
    }

    /// The open-connections gauge of a listener.
    pub fn connections(&self, listener: ListenerKind) -> &IntGauge {
        &self.connections[listener as usize]
    }

    /// Counts a request refused 401, and says whether to log it: at most once a second
    /// per listener, so that a client trying keys cannot flood the log (the counter has
    /// every refusal).
    pub fn unauthorized(&self, listener: ListenerKind) -> bool {
        self.unauthorized[listener as usize].inc();
        once_a_second(&self.unauthorized_logged[listener as usize])
    }

    /// The text exposition of every family.
    pub fn encode(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut out = Vec::new();
        if TextEncoder::new().encode(&families, &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_line_waits_a_whole_second() {
        let next = AtomicU64::new(0);
        assert!(once_a_second_at(&next, 5_000), "the first line is written");
        assert!(!once_a_second_at(&next, 5_000), "the next, at once, is not");
        assert!(!once_a_second_at(&next, 5_900), "nor 900 ms after");
        assert!(once_a_second_at(&next, 6_000), "a second after, it is");
        assert!(!once_a_second_at(&next, 6_999), "and then not for a second");
        assert!(once_a_second(&AtomicU64::new(0)), "on the real clock too");
    }
}
