//! Criterion benches of the per-request hot path: one route-table load, one upstream pick,
//! one header rewrite; then the same while a background thread keeps publishing new tables,
//! as a burst of flips or health changes would.
//!
//! Run with `cargo bench --bench hot_path`. Figures are in `benches/RESULTS.md`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use http::header::{HeaderMap, HeaderValue};
use switchyard::config::Config;
use switchyard::route_table::{RouteTable, Router, Settings};
use switchyard::state::RouteState;
use switchyard::upstream::{Color, pick};

/// A config with `n` upstreams per colour; nothing is read from disk.
fn config(n: u16) -> Config {
    let pool = |base: u16| {
        (0..n)
            .map(|i| format!("\"http://127.0.0.1:{}\"", base + i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[pools]
blue = [{blue}]
green = [{green}]

[routing]
state_file = "/nonexistent/route.json"

[admin]
token_file = "/nonexistent/admin.token"
"#,
        blue = pool(20000),
        green = pool(30000),
    );
    Config::parse(Path::new("bench.toml"), &text).expect("the bench config is valid")
}

fn table(config: &Arc<Config>, previous: Option<&RouteTable>, generation: u64) -> RouteTable {
    RouteTable {
        active: if generation.is_multiple_of(2) {
            Color::Blue
        } else {
            Color::Green
        },
        rollback_to: None,
        generation,
        changed_at: SystemTime::now(),
        pools: RouteTable::pools_for(config, previous),
        drains: [None, None],
        settings: Arc::new(Settings {
            config: config.clone(),
            client_keys: None,
            tls: None,
            admin_token: switchyard::admin::Token::new("bench"),
            upstream_tls: switchyard::tls::upstream_client_config(&config.upstream_tls, false)
                .expect("upstream TLS"),
            upstream_ca: None,
        }),
        state: Arc::new(RouteState::first_start(Color::Blue, SystemTime::now())),
    }
}

/// The headers a typical Deepgram SDK request carries.
fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("api.example.com"));
    h.insert(
        "user-agent",
        HeaderValue::from_static("deepgram-python-sdk/3.7"),
    );
    h.insert("accept", HeaderValue::from_static("*/*"));
    h.insert(
        "authorization",
        HeaderValue::from_static("Token 0123456789abcdef"),
    );
    h.insert("content-type", HeaderValue::from_static("audio/wav"));
    h.insert("connection", HeaderValue::from_static("keep-alive"));
    h
}

/// One request's routing work: load the table, pick within the active colour, rewrite headers.
/// `to_upstream` is the WebSocket upgrade's rewrite; plain requests write `X-Forwarded-*`
/// into the upstream head instead (`proxy::h1`), which `benches/load/callgrind.sh` counts.
fn request(router: &Router, headers: &HeaderMap, client: IpAddr) -> bool {
    let table = router.load();
    let chosen = pick(table.pool(table.active), &[]).is_some();
    let mut h = headers.clone();
    let host = h.get(http::header::HOST).cloned();
    switchyard::proxy::headers::to_upstream(&mut h, client, false, host);
    chosen && !h.is_empty()
}

fn hot_path(c: &mut Criterion) {
    let client = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    let headers = client_headers();
    for n in [1u16, 4, 16] {
        let config = Arc::new(config(n));
        let router = Router::new(table(&config, None, 0));

        c.bench_function(&format!("route_table_load/{n}"), |b| {
            b.iter(|| black_box(router.load().generation))
        });
        c.bench_function(&format!("pick/{n}"), |b| {
            let t = router.load_full();
            b.iter(|| black_box(pick(black_box(t.pool(Color::Blue)), &[]).is_some()))
        });
        if n == 1 {
            c.bench_function("to_upstream", |b| {
                b.iter(|| {
                    let mut h = headers.clone();
                    let host = h.get(http::header::HOST).cloned();
                    switchyard::proxy::headers::to_upstream(&mut h, client, false, host);
                    black_box(h)
                })
            });
            c.bench_function("to_upstream/existing_xff", |b| {
                let mut with_xff = headers.clone();
                with_xff.insert(
                    "x-forwarded-for",
                    HeaderValue::from_static("203.0.113.7, 198.51.100.2"),
                );
                b.iter(|| {
                    let mut h = with_xff.clone();
                    switchyard::proxy::headers::to_upstream(&mut h, client, true, None);
                    black_box(h)
                })
            });
        }
        c.bench_function(&format!("request/{n}"), |b| {
            b.iter(|| black_box(request(&router, &headers, client)))
        });

        // The same under a writer that publishes a new table as fast as it can: the worst
        // case for `ArcSwap::load` (its debt slots churn) and for cache lines of the pools.
        let router = Arc::new(router);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (router, stop, config) = (router.clone(), stop.clone(), config.clone());
            std::thread::spawn(move || {
                let mut generation = 1;
                while !stop.load(Ordering::Relaxed) {
                    let previous = router.load_full();
                    router.store(table(&config, Some(&previous), generation));
                    generation += 1;
                }
                generation
            })
        };
        c.bench_function(&format!("route_table_load_under_swaps/{n}"), |b| {
            b.iter(|| black_box(router.load().generation))
        });
        c.bench_function(&format!("request_under_swaps/{n}"), |b| {
            b.iter(|| black_box(request(&router, &headers, client)))
        });
        stop.store(true, Ordering::Relaxed);
        let swaps = writer.join().expect("the writer thread does not panic");
        eprintln!("  ({swaps} tables published during the swap benches for n={n})");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = hot_path
}
criterion_main!(benches);
