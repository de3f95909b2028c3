//! Active health checks, one task per upstream, following the route table.
//!
//! Results land in the shared `Upstream` (rise/fall there), which every table holds, so a
//! health change needs no new table. A supervisor starts probes for upstreams a reload
//! adds and stops those of upstreams it removes. In `deepgram` mode a pass is a 200 whose
//! `system_health` is Ready, Healthy or Degraded; a fresh node says Ready until it has
//! served traffic, so Healthy is never demanded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::config::{Health, HealthMode};
use crate::metrics::Metrics;
use crate::route_table::Router;
use crate::upstream::{Observed, Upstream};

type ProbeClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The largest status body read; Deepgram's is a few hundred bytes.
const MAX_STATUS_BODY: usize = 64 * 1024;

/// A probe client and the upstream trust it was built with.
type BuiltFor = (Arc<rustls::ClientConfig>, ProbeClient);

/// Probes upstreams as the checks do. Cloning shares the client.
#[derive(Clone, Default)]
pub struct Prober {
    /// The client, with the trust it was built for; built again when a reload brings
    /// another (`Settings::upstream_tls`). Locked only to clone or replace it.
    client: Arc<Mutex<Option<BuiltFor>>>,
}

impl Prober {
    /// The client trusting what `tls` (the table's upstream client config) trusts.
    fn client(&self, tls: &Arc<rustls::ClientConfig>) -> ProbeClient {
        let mut cached = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((built_for, client)) = &*cached
            && Arc::ptr_eq(built_for, tls)
        {
            return client.clone();
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::without_alpn(tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        // Probes must not reuse a connection: a reused socket would hide a restarted node.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(https);
        *cached = Some((tls.clone(), client.clone()));
        client
    }

    /// Probes each of `upstreams` once, at the same time, and records the result as its
    /// first verdict. Start-up calls this for every upstream, and a reload for those it
    /// adds or puts back (for all, when it turns health checks on), before they take
    /// traffic: a URL no probe has judged is not counted healthy by a flip's gate or
    /// /readyz.
    /// Waits at most `FIRST_VERDICTS_WAIT`, however long `health.timeout` is: start-up
    /// answers no signal meanwhile, and a reload holds up every other change (an urgent
    /// rollback too). An upstream not judged by then takes traffic, presumed healthy, but
    /// the flip's gate and /readyz wait for its probe loop's verdict
    /// (`RouteTable::has_healthy`); the log says so.
    /// Nothing to do with health mode `off`, where an upstream is presumed healthy.
    pub async fn first_verdicts(
        &self,
        upstreams: &[Arc<Upstream>],
        health: &Health,
        tls: &Arc<rustls::ClientConfig>,
    ) {
        self.verdicts(upstreams, health, tls, false).await;
    }

    /// As `first_verdicts`, for upstreams that have verdicts: each probe's finding
    /// replaces its upstream's verdict when it answers (the earlier ones were made with
    /// another trust); a probe that times out counts toward `fall` as any does, and one
    /// still under way after `FIRST_VERDICTS_WAIT` leaves the verdict as it was.
    pub async fn judge_afresh(
        &self,
        upstreams: &[Arc<Upstream>],
        health: &Health,
        tls: &Arc<rustls::ClientConfig>,
    ) {
        self.verdicts(upstreams, health, tls, true).await;
    }

    async fn verdicts(
        &self,
        upstreams: &[Arc<Upstream>],
        health: &Health,
        tls: &Arc<rustls::ClientConfig>,
        afresh: bool,
    ) {
        if health.mode == HealthMode::Off || upstreams.is_empty() {
            return;
        }
        let client = self.client(tls);
        let client = &client;
        let probes = upstreams.iter().map(|upstream| async move {
            // A first probe that could not be made judges against: an upstream no probe
            // has seen is not let through the flip's gate (the probe loop judges it next).
            let finding = probe(
                client,
                upstream,
                health.mode,
                &health.path,
                health.timeout,
            )
            .await
            .unwrap_or_else(|| {
                Finding::failed(Observed::Unreachable, "out of sockets here".into())
            });
            let was = upstream.is_healthy();
            // A probe that found no answer in time counts as any probe does (toward
            // `fall`): a slow moment during a reload must not take a trusted upstream out.
            if afresh && !finding.timed_out {
                upstream.forget_verdict();
            }
            upstream.record_probe(finding.observed, health.rise, health.fall);
            let healthy = upstream.is_healthy();
            if afresh && healthy != was {
                log_change(upstream, healthy);
            }
            let why = finding.why.as_deref().unwrap_or("");
            let line = if afresh {
                "health probe with the reloaded upstream trust"
            } else {
                "first health probe"
            };
            tracing::info!(upstream = %upstream.name, color = %upstream.color, healthy = upstream.is_healthy(), health = upstream.health_text(), why, "{line}");
        });
        if tokio::time::timeout(FIRST_VERDICTS_WAIT, futures_util::future::join_all(probes))
            .await
            .is_err()
        {
            tracing::warn!(waited = ?FIRST_VERDICTS_WAIT, "going on before every new upstream's first health probe answered (health.timeout is longer); those not judged yet take traffic, but a flip's gate and /readyz wait for their verdicts");
        }
    }
}

/// The line for an upstream that became healthy or unhealthy. Going down is what an
/// operator must see at a `warn` filter, as the passive check's line is; coming back is
/// news, not a warning.
fn log_change(upstream: &Upstream, healthy: bool) {
    let (name, color, health) = (&upstream.name, upstream.color, upstream.health_text());
    if healthy {
        tracing::info!(upstream = %name, %color, healthy, health, "upstream health changed");
    } else {
        tracing::warn!(upstream = %name, %color, healthy, health, "upstream health changed");
    }
}

/// A probe failure's reason with its long numbers (four digits or more) taken out, to
/// tell a new reason from the same one again: an expired certificate's error names the
/// time of each probe. A status code (502, 503) is a different reason.
fn gist(why: &str) -> String {
    let mut out = String::with_capacity(why.len());
    let mut digits = String::new();
    for c in why.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if digits.len() < 4 {
            out.push_str(&digits);
        }
        digits.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// The longest wait for upstreams' first health verdicts (`Prober::first_verdicts`).
pub const FIRST_VERDICTS_WAIT: Duration = Duration::from_secs(3);

/// Starts the supervisor; it and every probe stop when `stop` is cancelled.
pub fn spawn(router: Arc<Router>, metrics: Metrics, prober: Prober, stop: CancellationToken) {
    tokio::spawn(supervise(router, metrics, prober, stop));
}

async fn supervise(router: Arc<Router>, metrics: Metrics, prober: Prober, stop: CancellationToken) {
    let mut changes = router.subscribe();
    let mut probes: HashMap<usize, CancellationToken> = HashMap::new();
    loop {
        let table = router.load_full();
        let current: Vec<Arc<Upstream>> =
            table.pools.iter().flat_map(|p| p.iter().cloned()).collect();
        probes.retain(|ptr, token| {
            let keep = current.iter().any(|u| Arc::as_ptr(u) as usize == *ptr);
            if !keep {
                token.cancel();
            }
            keep
        });
        for upstream in current {
            probes
                .entry(Arc::as_ptr(&upstream) as usize)
                .or_insert_with(|| {
                    let token = stop.child_token();
                    tokio::spawn(probe_loop(
                        upstream,
                        router.clone(),
                        metrics.clone(),
                        prober.clone(),
                        token.clone(),
                    ));
                    token
                });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

async fn probe_loop(
    upstream: Arc<Upstream>,
    router: Arc<Router>,
    metrics: Metrics,
    prober: Prober,
    stop: CancellationToken,
) {
    let mut changes = router.subscribe();
    // Why the probes fail, as last logged (`gist`): each new reason is logged once, not
    // per probe.
    let mut failing: Option<String> = None;
    // An upstream judged already (start-up and a reload probe first) is next probed an
    // interval later, not at once.
    let mut judged = upstream.observed() != Observed::Unknown;
    loop {
        // Probes start `interval` apart, however long each takes (as HAProxy's `inter`):
        // a node that hangs is judged after `fall` intervals, not `fall` × (interval +
        // timeout).
        let probed = tokio::time::Instant::now();
        // Kept connections unused for a while are closed here, traffic or not.
        upstream.idle.sweep();
        let (health, tls) = {
            let table = router.load();
            let settings = &table.settings;
            (
                settings.config.health.clone(),
                settings.upstream_tls.clone(),
            )
        };
        let changed = match health.mode {
            HealthMode::Off => {
                // Probes that start again later start at once, and the first of them
                // decides at once, as for a new upstream: what a probe decided before
                // health checks went off no longer stands.
                judged = false;
                if upstream.observed() != Observed::NotChecked {
                    upstream.forget_verdict();
                    upstream.set_not_checked();
                }
                // Without probes, a passively failed upstream is retried after a cool-down.
                if upstream.is_healthy() {
                    None
                } else {
                    upstream.forgive()
                }
            }
            _ if std::mem::take(&mut judged) => None,
            mode => {
                let client = prober.client(&tls);
                match probe(&client, &upstream, mode, &health.path, health.timeout).await {
                    Some(finding) => {
                        let reason = finding.why.as_deref().map(gist);
                        if reason != failing {
                            if let Some(why) = &finding.why {
                                tracing::warn!(upstream = %upstream.name, color = %upstream.color, health = finding.observed.as_str(), why = %why, "health probe failed");
                            }
                            failing = reason;
                        }
                        upstream.record_probe(finding.observed, health.rise, health.fall)
                    }
                    None => None,
                }
            }
        };
        if let Some(healthy) = changed {
            metrics.upstream_health(&upstream);
            log_change(&upstream, healthy);
        }
        // The next probe is `interval` after this one began; a reload that changes the
        // interval moves it at once (a check slowed to minutes must not wait one out to
        // speed up), and one that changes the mode (checks on or off) applies it at once.
        let mut interval = health.interval;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                // An interval past what the clock holds (a config may say so) never ends.
                _ = tokio::time::sleep_until(probed.checked_add(interval).unwrap_or(probed + crate::drain::MAX_DRAIN)) => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = &router.load().settings.config.health;
                    if now.mode != health.mode {
                        break;
                    }
                    interval = now.interval;
                }
            }
        }
    }
}

/// What one probe found: the verdict, and for a failing one, why (for the log).
struct Finding {
    observed: Observed,
    why: Option<String>,
    /// No answer within `health.timeout`: a slow moment, not a verdict on the trust.
    timed_out: bool,
}

impl Finding {
    /// What an answer (or a failed connection) showed; `why` is `None` for a pass.
    fn new(observed: Observed, why: Option<String>) -> Finding {
        Finding {
            observed,
            why,
            timed_out: false,
        }
    }

    fn failed(observed: Observed, why: String) -> Finding {
        Finding::new(observed, Some(why))
    }
}

/// Probes once: what the upstream said, or `None` when no connection could be opened for
/// want of a socket here (`nofile::is_local_exhaustion`), which says nothing of it.
async fn probe(
    client: &ProbeClient,
    upstream: &Upstream,
    mode: HealthMode,
    path: &http::uri::PathAndQuery,
    timeout: Duration,
) -> Option<Finding> {
    let uri = crate::proxy::http::upstream_uri(upstream, path);
    let attempt = async {
        let response = match client.get(uri).await {
            Ok(r) => r,
            Err(e) if crate::nofile::caused_by_local_exhaustion(&e) => {
                tracing::warn!(upstream = %upstream.name, color = %upstream.color, error = %crate::proxy::http::source_chain(&e), "health probe skipped: out of sockets here (open-file limit or socket memory); the upstream's health stays as it was");
                return None;
            }
            // An answer that is not HTTP/1.1 is a bad response. Anything else is no answer:
            // no connection (refused, TLS refused), or one closed or reset before an
            // answer came (as a container runtime's port proxy does while the API is not
            // listening yet): unreachable.
            Err(e) => {
                let unreadable =
                    std::iter::successors(std::error::Error::source(&e), |s| s.source())
                        .filter_map(|s| s.downcast_ref::<hyper::Error>())
                        .any(|h| h.is_parse() || h.is_parse_too_large() || h.is_parse_status());
                let observed = if unreadable && !e.is_connect() {
                    Observed::BadResponse
                } else {
                    Observed::Unreachable
                };
                return Some(Finding::failed(
                    observed,
                    crate::proxy::http::source_chain(&e),
                ));
            }
        };
        let status = response.status();
        if mode == HealthMode::Http {
            return Some(if status.is_success() {
                Finding::new(Observed::Ok, None)
            } else {
                Finding::failed(Observed::BadResponse, format!("status {status}"))
            });
        }
        if status != http::StatusCode::OK {
            return Some(Finding::failed(
                Observed::BadResponse,
                format!("status {status}"),
            ));
        }
        let body = match Limited::new(response.into_body(), MAX_STATUS_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return Some(Finding::failed(
                    Observed::BadResponse,
                    format!("reading the body: {e}"),
                ));
            }
        };
        let observed = judge(&body);
        let why = match observed {
            Observed::BadResponse => Some("the body has no JSON `system_health` string".into()),
            Observed::Other => {
                let state = system_health(&body).unwrap_or_default();
                upstream.set_unknown_state(&state);
                Some(format!(
                    "unknown system_health {:?}",
                    upstream.health_text()
                ))
            }
            o if !o.passes() => Some(format!("system_health {}", o.as_str())),
            _ => None,
        };
        Some(Finding::new(observed, why))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Some(Finding {
                timed_out: true,
                ..Finding::failed(
                    Observed::Unreachable,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                )
            })
        })
}

/// Reads Deepgram's `/v1/status` body; unknown fields are fine, an unknown state fails.
pub fn judge(body: &[u8]) -> Observed {
    system_health(body)
        .map(|s| Observed::from_system_health(&s))
        .unwrap_or(Observed::BadResponse)
}

/// The `system_health` string of a status body, if it has one.
fn system_health(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("system_health")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_deepgram_states() {
        assert_eq!(
            judge(br#"{"system_health":"Ready","new_field":1}"#),
            Observed::Ready
        );
        assert!(judge(br#"{"system_health":"Healthy"}"#).passes());
        assert!(judge(br#"{"system_health":"Degraded"}"#).passes());
        assert!(!judge(br#"{"system_health":"Initializing"}"#).passes());
        assert!(!judge(br#"{"system_health":"Critical"}"#).passes());
        assert!(!judge(br#"{"system_health":"Sleepy"}"#).passes());
        assert_eq!(judge(b"not json"), Observed::BadResponse);
        assert_eq!(judge(br#"{"other":1}"#), Observed::BadResponse);
    }

    #[test]
    fn a_reason_that_differs_only_in_its_numbers_is_the_same_reason() {
        let expired = |now: u64| {
            format!("invalid peer certificate: Expired {{ time: UnixTime({now}) }}; {now} s ago")
        };
        assert_eq!(gist(&expired(1796601538)), gist(&expired(1796601540)));
        assert_ne!(
            gist("invalid peer certificate: UnknownIssuer"),
            gist("connection refused")
        );
        assert_ne!(gist("status 502"), gist("status 503"));
        assert_eq!(gist("status 502"), "status 502");
    }
}
