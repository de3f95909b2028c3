//! Colours, upstreams and the choice of an upstream within a colour.
//!
//! An `Upstream` outlives route tables: a reload that keeps a URL keeps its `Arc<Upstream>`,
//! so its health and its in-flight counts carry over. What changes per table (which
//! upstreams a colour has) lives in `route_table`.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::UpstreamUrl;
use crate::drain::DrainOrder;

/// One of the two upstream pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    /// Both colours, blue first; the index of each is `Color::index`.
    pub const ALL: [Color; 2] = [Color::Blue, Color::Green];

    /// The other colour.
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    /// A stable array index (blue 0, green 1) for per-colour counters.
    pub fn index(self) -> usize {
        match self {
            Color::Blue => 0,
            Color::Green => 1,
        }
    }

    /// The lowercase name used in headers, JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Color {
    type Err = String;

    fn from_str(s: &str) -> Result<Color, String> {
        match s {
            "blue" => Ok(Color::Blue),
            "green" => Ok(Color::Green),
            other => Err(format!(
                "`{other}` is not a colour; use \"blue\" or \"green\""
            )),
        }
    }
}

/// What the last health probe said, as shown in `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// No probe has finished yet.
    Unknown,
    /// Deepgram's `system_health` states.
    Initializing,
    Ready,
    Healthy,
    Degraded,
    Critical,
    /// A state this build does not know: fails, since it may mean anything.
    Other,
    /// A 2xx in `http` mode.
    Ok,
    /// Probe could not connect or timed out.
    Unreachable,
    /// Non-200, or a body that is not the JSON we expect.
    BadResponse,
    /// Probing is off; only live traffic judges.
    NotChecked,
}

impl Observed {
    fn from_u8(v: u8) -> Observed {
        use Observed::*;
        [
            Unknown,
            Initializing,
            Ready,
            Healthy,
            Degraded,
            Critical,
            Other,
            Ok,
            Unreachable,
            BadResponse,
            NotChecked,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(Unknown)
    }

    /// The string shown as `health` in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Unknown => "unknown",
            Observed::Initializing => "Initializing",
            Observed::Ready => "Ready",
            Observed::Healthy => "Healthy",
            Observed::Degraded => "Degraded",
            Observed::Critical => "Critical",
            Observed::Other => "unknown_state",
            Observed::Ok => "ok",
            Observed::Unreachable => "unreachable",
            Observed::BadResponse => "bad_response",
            Observed::NotChecked => "not_checked",
        }
    }

    /// Parses Deepgram's `system_health` value.
    pub fn from_system_health(s: &str) -> Observed {
        match s {
            "Initializing" => Observed::Initializing,
            "Ready" => Observed::Ready,
            "Healthy" => Observed::Healthy,
            "Degraded" => Observed::Degraded,
            "Critical" => Observed::Critical,
            _ => Observed::Other,
        }
    }

    /// Whether this observation counts as a passing probe.
    pub fn passes(self) -> bool {
        matches!(
            self,
            Observed::Ready | Observed::Healthy | Observed::Degraded | Observed::Ok
        )
    }
}

/// Rise/fall bookkeeping; a short critical section, never held across `.await`.
#[derive(Debug, Default)]
struct Streak {
    passes: u32,
    failures: u32,
    /// Of `failures`, the connect errors on live traffic since the last new connection
    /// that worked. A working connection takes them back out, so only connect errors in
    /// a row count toward `fall`: an upstream that accepts thousands of connections in a
    /// burst of new streams and times out on a few stays in. Failed probes stay until a
    /// probe passes.
    connect_errors: u32,
    /// Until the first verdict, one result decides (as HAProxy does at startup), so a dead
    /// upstream is not trusted for `fall` intervals and a live one is usable at once.
    decided: bool,
}

/// One upstream server of a colour.
#[derive(Debug)]
pub struct Upstream {
    /// Where it is.
    pub url: UpstreamUrl,
    /// The colour whose pool lists it (fixed: a URL moved to the other pool is a new upstream).
    pub color: Color,
    /// `url` as text, kept for labels and JSON without reformatting on the request path.
    pub name: Arc<str>,
    /// Requests sent and not yet answered in full; half of "outstanding work".
    pub in_flight: AtomicU64,
    /// Open WebSocket streams; the other half of "outstanding work".
    pub open_streams: AtomicU64,
    /// Kept-alive connections for plain requests.
    pub(crate) idle: crate::proxy::h1::Idle,
    healthy: AtomicBool,
    observed: AtomicU8,
    streak: Mutex<Streak>,
    /// Set when a reload removes it from its pool: its streams drain as in a flip.
    retired: Mutex<Option<DrainOrder>>,
    /// Plain HTTP requests routed by a table older than this generation are past its
    /// retirement's deadline and end now (`drain::Tracker`).
    pub(crate) http_cut: AtomicU64,
    /// The raw `system_health` when it is a state this build does not know, so `/status`
    /// shows what the node said (at most 64 characters).
    unknown_state: Mutex<Option<Box<str>>>,
    /// Run when the last holder lets it go: set while it is removed from its pool.
    on_drop: OnDrop,
}

/// What a removed upstream does when the last stream, request or table holding it ends.
#[derive(Default)]
struct OnDrop(Mutex<Option<LastAct>>);

/// What `OnDrop` runs.
type LastAct = Box<dyn FnOnce(&Upstream) + Send>;

impl std::fmt::Debug for OnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnDrop")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let last = self
            .on_drop
            .0
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(last) = last {
            last(self);
        }
    }
}

impl Upstream {
    /// A new upstream, presumed healthy until a probe or live traffic says otherwise.
    pub fn new(url: UpstreamUrl, color: Color) -> Upstream {
        Upstream {
            name: url.to_string().into(),
            url,
            color,
            in_flight: AtomicU64::new(0),
            open_streams: AtomicU64::new(0),
            idle: Default::default(),
            healthy: AtomicBool::new(true),
            observed: AtomicU8::new(Observed::Unknown as u8),
            streak: Mutex::new(Streak::default()),
            retired: Mutex::new(None),
            http_cut: AtomicU64::new(0),
            unknown_state: Mutex::new(None),
            on_drop: OnDrop::default(),
        }
    }

    /// Whether new work may go here.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The last probe's observation.
    pub fn observed(&self) -> Observed {
        Observed::from_u8(self.observed.load(Ordering::Relaxed))
    }

    /// What `/status` shows as `health`: the last observation, with the node's own words
    /// for a state this build does not know.
    pub fn health_text(&self) -> String {
        match self.observed() {
            Observed::Other => self
                .unknown_state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                .unwrap_or(Observed::Other.as_str())
                .to_owned(),
            known => known.as_str().to_owned(),
        }
    }

    /// Records the raw text of an unknown `system_health`.
    pub fn set_unknown_state(&self, raw: &str) {
        let text: String = raw.chars().take(64).collect();
        *self.unknown_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.into());
    }

    /// Outstanding work: in-flight requests plus open streams.
    pub fn load(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed) + self.open_streams.load(Ordering::Relaxed)
    }

    /// Degraded upstreams still serve, but the balancer prefers others.
    fn degraded(&self) -> bool {
        self.observed() == Observed::Degraded
    }

    /// Records a probe result; returns the new health if it changed.
    pub fn record_probe(&self, observed: Observed, rise: u32, fall: u32) -> Option<bool> {
        self.observed.store(observed as u8, Ordering::Relaxed);
        self.record(observed.passes(), true, rise, fall)
    }

    /// A connect error on live traffic: one failure toward `fall`, until a new connection
    /// works (`record_connect`).
    pub fn record_passive_failure(&self, fall: u32) -> Option<bool> {
        self.record(false, false, 0, fall)
    }

    /// A new connection on live traffic worked: the connect errors before it were not in
    /// a row, and no longer count toward `fall`. Health itself is left to the probes,
    /// since a connection that works says nothing of the node's `system_health`.
    pub fn record_connect(&self) {
        let mut streak = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        streak.failures = streak.failures.saturating_sub(streak.connect_errors);
        streak.connect_errors = 0;
    }

    /// Marks the upstream healthy for good (health mode `off` has no probes to do it).
    pub fn set_not_checked(&self) {
        self.observed
            .store(Observed::NotChecked as u8, Ordering::Relaxed);
    }

    /// Marks a passively failed upstream usable again (health mode `off` has no probe to
    /// do it, so it retries after a cool-down, as nginx's `fail_timeout` does).
    pub fn forgive(&self) -> Option<bool> {
        let mut streak = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        streak.failures = 0;
        streak.connect_errors = 0;
        let was = self.healthy.swap(true, Ordering::Relaxed);
        (!was).then_some(true)
    }

    fn record(&self, pass: bool, probe: bool, rise: u32, fall: u32) -> Option<bool> {
        let mut streak = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        let was = self.healthy.load(Ordering::Relaxed);
        // Passive failures alone do not settle the startup verdict: one refused connection
        // should not outweigh the first probe.
        let undecided = probe && !streak.decided;
        let now = if pass {
            streak.failures = 0;
            streak.connect_errors = 0;
            streak.passes = streak.passes.saturating_add(1);
            if undecided || streak.passes >= rise {
                true
            } else {
                was
            }
        } else {
            streak.passes = 0;
            streak.failures = streak.failures.saturating_add(1);
            if !probe {
                streak.connect_errors = streak.connect_errors.saturating_add(1);
            }
            if undecided || streak.failures >= fall {
                false
            } else {
                was
            }
        };
        if probe {
            streak.decided = true;
        }
        self.healthy.store(now, Ordering::Relaxed);
        (now != was).then_some(now)
    }

    /// Marks the upstream as removed from its pool by a reload.
    pub fn retire(&self, order: DrainOrder) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.get_or_insert(order);
    }

    /// Puts a removed upstream back in its pool (a reload lists it again while its streams
    /// still drain): their drain is cancelled, as a rollback cancels a colour's.
    pub fn reinstate(&self) {
        *self.retired.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.on_drop
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Runs `last` when the last holder of this removed upstream lets it go (its last
    /// stream or request ends); a reload that puts it back cancels it.
    pub fn when_gone(&self, last: impl FnOnce(&Upstream) + Send + 'static) {
        *self.on_drop.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(last));
    }

    /// Forgets the verdict of earlier probes, so the next one decides alone, as for an
    /// upstream never seen: one put back after a while out of its pool is judged afresh,
    /// and shows `unknown` (which the flip's gate does not count) until it is.
    pub fn forget_verdict(&self) {
        let mut streak = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        *streak = Streak::default();
        self.observed
            .store(Observed::Unknown as u8, Ordering::Relaxed);
    }

    /// The drain order a reload gave this upstream, if it was removed.
    pub fn retired(&self) -> Option<DrainOrder> {
        *self.retired.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Picks by least outstanding work among two random candidates (power of two choices),
/// drawn from the healthy, untried upstreams that are not degraded, or from the degraded
/// ones when no other is left: a degraded node serves only when nothing better can.
/// Returns `None` when no healthy, untried upstream is left.
pub fn pick<'a>(pool: &'a [Arc<Upstream>], tried: &[&Upstream]) -> Option<&'a Arc<Upstream>> {
    let usable =
        |u: &&Arc<Upstream>| u.is_healthy() && !tried.iter().any(|t| std::ptr::eq(*t, &***u));
    // One upstream, the common case in small deployments (and the benchmarks): no draw.
    if let [only] = pool {
        return Some(only).filter(usable);
    }
    let preferred = |u: &&Arc<Upstream>| usable(u) && !u.degraded();
    two_choices(pool, preferred).or_else(|| two_choices(pool, usable))
}

/// The less loaded of two distinct random upstreams of `pool` that pass `ok` (the only
/// one, if one does).
fn two_choices(
    pool: &[Arc<Upstream>],
    ok: impl Fn(&&Arc<Upstream>) -> bool + Copy,
) -> Option<&Arc<Upstream>> {
    let n = pool.iter().filter(ok).count();
    let nth = |i: usize| pool.iter().filter(ok).nth(i);
    match n {
        0 => None,
        1 => nth(0),
        n => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            // Health may change between the count and the draw (probes run meanwhile):
            // whichever of the two is still there, or any that is.
            match (nth(a), nth(b)) {
                (Some(ua), Some(ub)) => Some(if ub.load() < ua.load() { ub } else { ua }),
                (Some(one), None) | (None, Some(one)) => Some(one),
                (None, None) => nth(0),
            }
        }
    }
}

#[cfg(test)]
mod tests;
