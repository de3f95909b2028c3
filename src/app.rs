//! Wiring: shared handles, listeners, tasks, and the shutdown order.
//!
//! Start-up: metrics, admin token, route state and first table (`control`), proxy,
//! listeners bound (an address in use is an error naming the field), health checks, admin.
//! Shutdown (SIGTERM, SIGINT, or `Handle::shutdown`): the proxy and preview listeners stop
//! accepting; every stream gets a drain order with `drain.timeout`; open HTTP requests
//! finish, or are cut at that deadline as after a flip; once no stream is left (or the drain and grace bound passes) the admin API,
//! which stays up throughout, stops and `Handle::wait` returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin, Token};
use crate::config::{Config, ConfigError};
use crate::control::{Control, StartError as ControlStartError};
use crate::drain::Tracker;
use crate::health::Prober;
use crate::metrics::{ListenerKind, Metrics};
use crate::proxy::Proxy;
use crate::route_table::Router;
use crate::upstream::Color;

/// Why Switchyard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Control(#[from] ControlStartError),
    #[error("{field}: cannot listen on {addr}: {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running Switchyard.
pub struct Handle {
    /// Where the proxy listener is bound (useful with port 0).
    pub proxy_addr: SocketAddr,
    /// Where the preview listener is bound, if configured.
    pub preview_addr: Option<SocketAddr>,
    /// Where the admin API is bound.
    pub admin_addr: SocketAddr,
    /// Route changes.
    pub control: Control,
    /// Traffic counts.
    pub tracker: Arc<Tracker>,
    /// The metrics registry.
    pub metrics: Metrics,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Starts the graceful shutdown (idempotent).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The router (current table).
    pub fn router(&self) -> &Arc<Router> {
        self.control.router()
    }

    /// Waits until shutdown has finished.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Reads the admin token: `SWITCHYARD_ADMIN_TOKEN`, else `admin.token_file`.
pub fn load_token(config: &Config) -> Result<Token, StartError> {
    Ok(Token::read(config)?)
}

async fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            field,
            addr,
            source,
        })
}

/// Starts everything `config` describes.
pub async fn start(config: Config) -> Result<Handle, StartError> {
    let metrics = Metrics::new();
    // Checked before anything binds; the live token is the route table's (reloadable).
    load_token(&config)?;
    let prober = Prober::default();
    let proxy_listener = bind("listen.proxy", config.listen.proxy).await?;
    let preview_listener = match config.listen.preview {
        Some(addr) => Some(bind("listen.preview", addr).await?),
        None => None,
    };
    let admin_listener = bind("listen.admin", config.listen.admin).await?;
    let addr = |l: &TcpListener, configured: SocketAddr| l.local_addr().unwrap_or(configured);
    let proxy_addr = addr(&proxy_listener, config.listen.proxy);
    let preview_addr = preview_listener
        .as_ref()
        .zip(config.listen.preview)
        .map(|(l, c)| addr(l, c));
    let admin_addr = addr(&admin_listener, config.listen.admin);

    let shutdown = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let tracker = Arc::new(Tracker::default());
    let (control, router, store_tasks) = Control::start(
        config,
        metrics.clone(),
        admin_addr.port(),
        prober.clone(),
        tracker.clone(),
        stop_background.clone(),
    )
    .await?;
    let proxy = Arc::new(Proxy::new(router.clone(), tracker.clone(), metrics.clone()));

    // Every upstream's first verdict before anything is served: until a probe has judged
    // it an upstream is presumed healthy, and the flip's gate and /readyz would take a
    // pool that does not answer for a live one. At most health.timeout, and never more
    // than `health::FIRST_VERDICTS_WAIT` (signals are answered only once this returns).
    {
        let table = router.load_full();
        let upstreams: Vec<_> = table.pools.iter().flat_map(|p| p.iter().cloned()).collect();
        let settings = &table.settings;
        prober
            .first_verdicts(&upstreams, &settings.config.health, &settings.upstream_tls)
            .await;
        for upstream in &upstreams {
            metrics.upstream_health(upstream);
        }
    }
    crate::health::spawn(
        router.clone(),
        metrics.clone(),
        prober,
        stop_background.clone(),
    );
    tokio::spawn(crate::drain::cut_requests_at_deadlines(
        router.clone(),
        tracker.clone(),
        stop_background.clone(),
    ));
    let mut listeners = vec![tokio::spawn(crate::listener::serve(
        proxy_listener,
        ListenerKind::Proxy,
        proxy.clone(),
        stop_accepting.clone(),
    ))];
    if let Some(l) = preview_listener {
        listeners.push(tokio::spawn(crate::listener::serve(
            l,
            ListenerKind::Preview,
            proxy.clone(),
            stop_accepting.clone(),
        )));
    }
    let admin_state = Admin {
        control: control.clone(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        store_status: {
            let control = control.clone();
            Arc::new(move || control.store_status())
        },
        waiters: Default::default(),
    };
    let admin_stop = stop_background.clone();
    let admin_task = tokio::spawn(async move {
        if let Err(e) = admin::serve(admin_listener, admin_state, async move {
            admin_stop.cancelled().await
        })
        .await
        {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    let preview = preview_addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
    let client_auth = router.load().settings.client_auth();
    tracing::info!(proxy = %proxy_addr, %preview, admin = %admin_addr, %client_auth, "switchyard is listening");

    let done = {
        let shutdown = shutdown.clone();
        let tracker = tracker.clone();
        let router = router.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let drain = router.load().settings.config.drain;
            tracing::info!(timeout = ?drain.timeout, "shutting down: no new connections; draining streams");
            stop_accepting.cancel();
            tracker.begin_shutdown(drain.timeout, drain.grace);
            // Streams end at the deadline plus grace; the extra allows their close handshakes.
            // A stream already past an earlier order's deadline keeps that order's grace,
            // which may run longer.
            let in_grace = {
                let now = Instant::now();
                let table = router.load();
                let retired = tracker.retired();
                table
                    .drains
                    .iter()
                    .flatten()
                    .chain(retired.iter().map(|(_, order)| order))
                    .filter(|o| o.deadline <= now)
                    .map(|o| (o.deadline + o.grace).saturating_duration_since(now))
                    .max()
                    .unwrap_or_default()
            };
            let bound = (drain.timeout + drain.grace).max(in_grace) + Duration::from_secs(10);
            let streams = async {
                for color in Color::ALL {
                    tracker.wait_empty(color, bound).await;
                }
            };
            let requests = futures_util::future::join_all(listeners);
            let _ = tokio::time::timeout(bound, async { tokio::join!(streams, requests) }).await;
            stop_background.cancel();
            let _ = admin_task.await;
            // The etcd store leaves the replica list on the way out (bounded by etcd.timeout).
            let _ = futures_util::future::join_all(store_tasks).await;
            tracing::info!("shutdown complete");
        })
    };

    Ok(Handle {
        proxy_addr,
        preview_addr,
        admin_addr,
        control,
        tracker,
        metrics,
        shutdown,
        done,
    })
}
