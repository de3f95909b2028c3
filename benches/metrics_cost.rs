//! The cost of metrics on the request path: what a plain HTTP request pays for them.
//!
//! Per request the proxy does `ColorMetrics::request` (one counter add and one histogram
//! observation) and adds to `bytes_total` in each direction (once per body frame; one frame
//! each way for a small request), and reads the clock twice for the duration, which exists
//! only for the histogram. Measured against doing nothing with the same inputs, uncontended
//! (one thread) and contended (every core counting into the same children at once, as under
//! load, where the atomics' cache lines move between cores). Results: `benches/RESULTS.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::metrics::{ColorMetrics, Metrics, Protocol};
use switchyard::upstream::Color;

/// The metric work of one finished request, with the duration already measured.
fn count(m: &ColorMetrics, status: u16, seconds: f64, up: u64, down: u64) {
    m.request(Protocol::Http, status, seconds);
    m.bytes_to_upstream.inc_by(up);
    m.bytes_to_client.inc_by(down);
}

/// The same, plus the clock reads that exist only for the duration.
fn count_timed(m: &ColorMetrics, status: u16, up: u64, down: u64) {
    let started = Instant::now();
    let seconds = black_box(started).elapsed().as_secs_f64();
    count(m, status, seconds, up, down);
}

/// Runs `iters` requests' metric work on every core at once; returns the wall time, so
/// time per iteration is what each request paid while the others counted too.
fn contended(iters: u64, work: fn(&ColorMetrics)) -> Duration {
    let metrics = Metrics::new();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (metrics, barrier) = (&metrics, &barrier);
                s.spawn(move || {
                    let m = metrics.color(Color::Blue);
                    barrier.wait();
                    let started = Instant::now();
                    for _ in 0..iters {
                        work(m);
                    }
                    started.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread"))
            .max()
            .unwrap_or_default()
    })
}

fn bench(c: &mut Criterion) {
    let metrics = Metrics::new();
    let m = metrics.color(Color::Blue);
    let mut group = c.benchmark_group("per_request");
    group.bench_function("nothing", |b| {
        b.iter(|| {
            black_box((black_box(200u16), black_box(0.012f64), black_box(1000u64)));
        })
    });
    group.bench_function("metrics", |b| {
        b.iter(|| {
            count(
                m,
                black_box(200),
                black_box(0.012),
                black_box(1000),
                black_box(1500),
            )
        })
    });
    group.bench_function("metrics_and_clock", |b| {
        b.iter(|| count_timed(m, black_box(200), black_box(1000), black_box(1500)))
    });
    group.bench_function("metrics_contended_all_cores", |b| {
        b.iter_custom(|iters| {
            contended(iters, |m| {
                count(
                    m,
                    black_box(200),
                    black_box(0.012),
                    black_box(1000),
                    black_box(1500),
                )
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
