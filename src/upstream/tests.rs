//! Unit tests of `Upstream`: the balancer's pick (load, health, Degraded last) and the
//! rise/fall counting of probes and live connect errors.

use super::*;

fn upstream(port: u16) -> Arc<Upstream> {
    let url = UpstreamUrl::parse(&format!("http://127.0.0.1:{port}")).expect("valid url");
    Arc::new(Upstream::new(url, Color::Blue))
}

#[test]
fn pick_prefers_less_loaded() {
    let pool = vec![upstream(1), upstream(2)];
    pool[0].in_flight.store(5, Ordering::Relaxed);
    for _ in 0..50 {
        let chosen = pick(&pool, &[]).expect("one healthy");
        assert_eq!(chosen.url.port(), 2);
    }
}

#[test]
fn pick_skips_unhealthy_and_tried() {
    let pool = vec![upstream(1), upstream(2), upstream(3)];
    pool[0].record_probe(Observed::Critical, 2, 3);
    for _ in 0..50 {
        let first = pick(&pool, &[]).expect("healthy left");
        assert_ne!(first.url.port(), 1);
        let second = pick(&pool, &[first]).expect("one more");
        assert_ne!(second.url.port(), 1);
        assert_ne!(second.url.port(), first.url.port());
        assert!(pick(&pool, &[first, second]).is_none());
    }
}

#[test]
fn first_probe_decides_then_rise_and_fall_apply() {
    let u = upstream(1);
    assert!(u.is_healthy());
    assert_eq!(u.record_probe(Observed::Critical, 2, 3), Some(false));
    assert_eq!(u.record_probe(Observed::Ready, 2, 3), None);
    assert_eq!(u.record_probe(Observed::Healthy, 2, 3), Some(true));
    assert_eq!(u.record_probe(Observed::Critical, 2, 3), None);
    assert_eq!(u.record_passive_failure(3), None);
    assert_eq!(u.record_probe(Observed::Unreachable, 2, 3), Some(false));
    assert_eq!(u.observed(), Observed::Unreachable);
}

/// Connect errors count toward `fall` only in a row; failed probes stand until a probe
/// passes, whatever connections work in between.
#[test]
fn connect_errors_count_in_a_row_and_failed_probes_stand() {
    let u = upstream(1);
    assert_eq!(u.record_probe(Observed::Healthy, 2, 3), None);
    assert_eq!(u.record_passive_failure(3), None);
    assert_eq!(u.record_passive_failure(3), None);
    u.record_connect();
    assert_eq!(u.record_passive_failure(3), None);
    assert_eq!(u.record_passive_failure(3), None);
    assert_eq!(u.record_passive_failure(3), Some(false));

    let u = upstream(2);
    assert_eq!(u.record_probe(Observed::Healthy, 2, 3), None);
    assert_eq!(u.record_probe(Observed::Critical, 2, 3), None);
    assert_eq!(u.record_passive_failure(3), None);
    u.record_connect();
    assert_eq!(u.record_probe(Observed::Critical, 2, 3), None);
    assert_eq!(u.record_passive_failure(3), Some(false));
    u.record_connect();
    assert!(
        !u.is_healthy(),
        "a working connection does not bring it back"
    );
    assert_eq!(u.record_probe(Observed::Ready, 1, 3), Some(true));
}

/// A degraded node is not picked while a healthy one is left, however many unhealthy
/// ones the random draw meets first.
#[test]
fn degraded_serves_only_when_nothing_better_is_left() {
    let pool: Vec<_> = (1..=5).map(upstream).collect();
    pool[0].record_probe(Observed::Degraded, 1, 1);
    for down in &pool[2..] {
        down.record_probe(Observed::Critical, 1, 1);
    }
    for _ in 0..200 {
        assert_eq!(pick(&pool, &[]).expect("healthy").url.port(), 2);
    }
    let ready = &*pool[1];
    for _ in 0..20 {
        assert_eq!(pick(&pool, &[ready]).expect("degraded").url.port(), 1);
    }
}

#[test]
fn degraded_passes_but_is_deprioritised() {
    let pool = vec![upstream(1), upstream(2)];
    pool[0].record_probe(Observed::Degraded, 1, 1);
    pool[1].in_flight.store(10, Ordering::Relaxed);
    assert!(pool[0].is_healthy());
    for _ in 0..20 {
        assert_eq!(pick(&pool, &[]).expect("healthy").url.port(), 2);
    }
}
