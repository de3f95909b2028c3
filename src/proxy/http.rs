//! Plain HTTP forwarding: pooled upstream connections, timeouts, and the same-colour retry
//! of a connect failure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::body::{Access, Finish, ProxyBody, RequestBody};
use super::{ConnInfo, Proxy, error_response, headers};
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::{Protocol, UpstreamErrorKind};
use crate::route_table::RouteTable;
use crate::tls::TlsError;
use crate::upstream::{Color, Upstream, pick};

/// Most attempts per request: the first pick and at most two more on connect failure.
pub const MAX_ATTEMPTS: usize = 3;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connections to upstreams: a pooled HTTP/1.1 client for requests, and the TLS client
/// config that WebSocket upgrades use for `https://` upstreams.
pub struct Upstreams {
    client: Client<TimedConnector, RequestBody>,
    /// `limits.connect_timeout` in nanoseconds; reloadable without rebuilding the pool.
    connect_timeout: Arc<AtomicU64>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// Bounds each new upstream connection by the current `limits.connect_timeout`.
#[derive(Clone)]
struct TimedConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Arc<AtomicU64>,
}

impl tower_service::Service<Uri> for TimedConnector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = Duration::from_nanos(self.timeout.load(Ordering::Relaxed));
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                )) as BoxError),
            }
        })
    }
}

impl Upstreams {
    /// Builds the client from the config's upstream TLS settings.
    pub fn new(config: &Config) -> Result<Upstreams, TlsError> {
        let tls = crate::tls::upstream_client_config(&config.upstream_tls)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::without_alpn(&tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let connect_timeout = Arc::new(AtomicU64::new(nanos(config.limits.connect_timeout)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(TimedConnector {
                inner: https,
                timeout: connect_timeout.clone(),
            });
        Ok(Upstreams {
            client,
            connect_timeout,
            tls,
        })
    }

    /// Forwards one plain HTTP request to `color`.
    pub async fn forward(
        &self,
        proxy: &Arc<Proxy>,
        req: Request<Incoming>,
        table: &RouteTable,
        color: Color,
        conn: ConnInfo,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let limits = super::limits(table);
        let timeout = nanos(limits.connect_timeout);
        if self.connect_timeout.load(Ordering::Relaxed) != timeout {
            self.connect_timeout.store(timeout, Ordering::Relaxed);
        }
        let metrics = proxy.metrics.color(color);
        let (mut parts, body) = req.into_parts();
        let host = client_host(&parts.headers, &parts.uri);
        headers::to_upstream(&mut parts.headers, conn.client.ip(), conn.tls, host);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| ::http::uri::PathAndQuery::from_static("/"));

        let pool = table.pool(color);
        let retry = pool.len() > 1;
        let to_upstream = metrics.bytes_to_upstream.clone();
        let (mut next_body, mut reclaim) = if retry {
            let (b, r) = RequestBody::reclaimable(body, to_upstream.clone());
            (Some(b), Some(r))
        } else {
            (Some(RequestBody::direct(body, to_upstream.clone())), None)
        };
        let mut tried: Vec<&Upstream> = Vec::new();
        let mut headers_left = Some(parts.headers);
        let error = loop {
            let Some(upstream) = pick(pool, &tried) else {
                break if tried.is_empty() {
                    ProxyError::NoHealthyUpstream(color.as_str())
                } else {
                    ProxyError::ConnectFailed(color.as_str())
                };
            };
            let Some(body) = next_body.take() else {
                // The body was read by an upstream that then failed: nothing to resend.
                break ProxyError::ConnectFailed(color.as_str());
            };
            let last_attempt = tried.len() + 1 >= MAX_ATTEMPTS || !retry;
            let headers = if last_attempt {
                headers_left.take().unwrap_or_default()
            } else {
                headers_left.clone().unwrap_or_default()
            };
            let mut up_req = Request::new(body);
            *up_req.method_mut() = parts.method.clone();
            *up_req.version_mut() = Version::HTTP_11;
            *up_req.uri_mut() = upstream_uri(upstream, &path);
            *up_req.headers_mut() = headers;

            let guard = proxy.tracker.request(upstream, table.generation);
            let access = Access::capture(&parts.method, &parts.uri, &upstream.name);
            let answer = tokio::select! {
                answer = tokio::time::timeout(limits.response_timeout, self.client.request(up_req)) => answer,
                _ = guard.cut() => break ProxyError::DrainDeadline(color.as_str()),
            };
            match answer {
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let finish = Finish::new(
                        &proxy.metrics,
                        color,
                        Protocol::Http,
                        status,
                        started,
                        guard,
                    )
                    .with_access(access);
                    return Proxy::relay_answer(response, finish);
                }
                Ok(Err(e)) if e.is_connect() => {
                    drop(guard);
                    proxy.connect_failed(
                        upstream,
                        table.settings.config.health.fall,
                        &source_chain(&e),
                    );
                    tried.push(upstream);
                    if tried.len() >= MAX_ATTEMPTS || !retry {
                        break ProxyError::ConnectFailed(color.as_str());
                    }
                    next_body = reclaim.take().and_then(|r| r.take()).map(|b| {
                        let (b, r) = RequestBody::reclaimable(b, to_upstream.clone());
                        reclaim = Some(r);
                        b
                    });
                }
                Ok(Err(e)) => {
                    proxy
                        .metrics
                        .upstream_error(upstream, UpstreamErrorKind::Protocol);
                    tracing::warn!(upstream = %upstream.name, color = %color, error = %source_chain(&e), "upstream failed");
                    break ProxyError::UpstreamFailed(source_chain(&e));
                }
                Err(_) => {
                    proxy
                        .metrics
                        .upstream_error(upstream, UpstreamErrorKind::Timeout);
                    tracing::warn!(upstream = %upstream.name, color = %color, "upstream response timed out");
                    break ProxyError::UpstreamTimeout(limits.response_timeout);
                }
            }
        };
        let (status, _) = error.status_and_code();
        metrics.request(
            Protocol::Http,
            status.as_u16(),
            started.elapsed().as_secs_f64(),
        );
        error_response(&error, color)
    }
}

/// The client's `Host`, or the HTTP/2 `:authority`, verbatim.
pub(crate) fn client_host(headers: &::http::HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    headers.get(header::HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The upstream's URL for a client's path and query.
pub(crate) fn upstream_uri(upstream: &Upstream, path: &::http::uri::PathAndQuery) -> Uri {
    Uri::from_parts({
        let mut p = ::http::uri::Parts::default();
        p.scheme = Some(upstream.url.scheme.clone());
        p.authority = Some(upstream.url.authority.clone());
        p.path_and_query = Some(path.clone());
        p
    })
    .expect("scheme, authority and path were each parsed already")
}

/// An error and its causes on one line; hyper's top-level messages alone are vague.
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
