//! Plain HTTP forwarding: the request to an upstream of the colour through `h1`, timeouts,
//! and the same-colour retry of a connect failure.

use std::sync::Arc;
use std::time::Instant;

use ::http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;

use super::body::{Access, Finish, ProxyBody, Session, Waiting};
use super::h1::{self, Failure, RequestHead};
use super::{Attempts, ConnInfo, Proxy, error_response, headers};
use crate::error::ProxyError;
use crate::metrics::{Protocol, UpstreamErrorKind};
use crate::route_table::RouteTable;
use crate::upstream::{Color, Upstream};

/// Forwards one plain HTTP request to `color`.
pub async fn forward(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    table: Arc<RouteTable>,
    color: Color,
    conn: ConnInfo,
    host: Option<HeaderValue>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let limits = super::limits(&table);
    let metrics = proxy.metrics.color(color);
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    let path = origin_form(&parts.uri);

    let mut waiting = Waiting::new(
        &conn,
        metrics,
        Protocol::Http,
        color,
        started,
        (&parts.method, &parts.uri),
        Session::Headers(&parts.headers),
    );
    let mut body = Some(body);
    let mut attempts = Attempts::new(&proxy, &table, color);
    let mut last: Option<&Upstream> = None;
    let error = loop {
        let (upstream, guard) = match attempts.next() {
            Ok(next) => next,
            Err(e) => break e,
        };
        let Some(attempt_body) = body.take() else {
            break attempts.gave_up();
        };
        last = Some(upstream);
        let access = Access::capture(
            &conn,
            &parts.method,
            &parts.uri,
            || headers::session_id(&parts.headers),
            Some(&upstream.name),
        );
        let head = RequestHead {
            method: &parts.method,
            path: &path,
            headers: &parts.headers,
            forwarding: headers::Forwarding {
                client: &conn.client_ip,
                tls: conn.tls,
                host: host.as_ref(),
            },
        };
        let exchange = h1::exchange(
            upstream,
            &table.settings.upstream_tls,
            &limits,
            head,
            attempt_body,
            &metrics.bytes_to_upstream,
            attempts.room(),
        );
        waiting.on(upstream);
        let answer = tokio::select! {
            // The exchange first: an answer that has arrived is relayed, and no random
            // start is drawn on every poll.
            biased;
            answer = exchange => answer,
            _ = guard.cut() => {
                waiting.answered();
                break ProxyError::DrainDeadline(color.as_str());
            }
        };
        waiting.answered();
        match answer {
            Ok(response) => {
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
                return Proxy::relay_answer(response, finish, &limits);
            }
            Err(Failure::Connect(e, unread)) => {
                body = Some(unread);
                if let Err(e) = attempts.connect_failed(upstream, guard, &e) {
                    break e;
                }
            }
            Err(Failure::Upstream(e)) => {
                proxy
                    .metrics
                    .upstream_error(upstream, UpstreamErrorKind::Protocol);
                tracing::warn!(upstream = %upstream.name, color = %color, error = %e, "upstream failed");
                break ProxyError::UpstreamFailed(e);
            }
            Err(Failure::Client(e)) => {
                tracing::debug!(upstream = %upstream.name, error = %e, "request body failed");
                break ProxyError::BadRequest(e);
            }
            Err(Failure::ClientStalled(period)) => {
                let e = super::stall::stalled("the client sent none of its body", period);
                tracing::debug!(upstream = %upstream.name, error = %e, "request body stalled");
                break ProxyError::RequestTimeout(period);
            }
            Err(Failure::TimedOut) => {
                proxy
                    .metrics
                    .upstream_error(upstream, UpstreamErrorKind::Timeout);
                tracing::warn!(upstream = %upstream.name, color = %color, "upstream response timed out");
                break ProxyError::UpstreamTimeout(limits.response_timeout);
            }
        }
    };
    // A body no upstream took (none healthy, none connected) may still be coming; over
    // HTTP/1.1 the lingering close takes it.
    if let Some(body) = body.take()
        && parts.version == ::http::Version::HTTP_2
    {
        super::stall::discard(body, conn.busy());
    }
    let (status, _) = error.status_and_code();
    let seconds = started.elapsed().as_secs_f64();
    metrics.request(Protocol::Http, status.as_u16(), seconds);
    // Switchyard's own answers get their access line too, naming the upstream last tried.
    let upstream = last.map(|u| &u.name);
    let session = || headers::session_id(&parts.headers);
    if let Some(access) = Access::capture(&conn, &parts.method, &parts.uri, session, upstream) {
        access.log_own(color, &error, seconds);
    }
    let mut answer = error_response(&error, color);
    // The rest of the body may still come, and cannot be told from a next request.
    if matches!(error, ProxyError::RequestTimeout(_)) && parts.version < ::http::Version::HTTP_2 {
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    answer
}

/// The host the client named, verbatim: the request target's authority when it has one
/// (HTTP/2's `:authority`, an HTTP/1.1 request in absolute form, whose `Host` is then
/// ignored: RFC 9112 §3.2.2), else its `Host`. Credentials in the target
/// (`http://user:secret@host/`) are not part of the host and never go on.
/// An HTTP/1.1 request must have exactly one `Host` (RFC 9112 §3.2): one with none or
/// several is refused, to be answered 400. One lookup of `Host` does both. So is the
/// request target `*` but for OPTIONS (RFC 9112 §3.2.4), which no upstream would read
/// as a path.
pub(crate) fn client_host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, ProxyError> {
    if req.uri().path() == "*" && req.method() != ::http::Method::OPTIONS {
        return Err(ProxyError::BadRequest(
            "the request target `*` is for OPTIONS only (RFC 9112 §3.2.4)".into(),
        ));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if req.version() == ::http::Version::HTTP_11 && (host.is_none() || hosts.next().is_some()) {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)".into(),
        ));
    }
    Ok(req
        .uri()
        .authority()
        .and_then(|a| match a.as_str().rsplit_once('@') {
            Some((_, host)) => HeaderValue::from_str(host).ok(),
            None => HeaderValue::from_str(a.as_str()).ok(),
        })
        .or_else(|| host.cloned()))
}

/// The path and query to send upstream: the client's, with `/` for an empty path (an
/// absolute-form `http://host?q` or an HTTP/2 `:path` of `?q` would otherwise go up as
/// `GET ?q`, which no server reads; RFC 9112 section 3.2.1).
pub(crate) fn origin_form(uri: &Uri) -> ::http::uri::PathAndQuery {
    match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') || pq.as_str() == "*" => pq.clone(),
        Some(pq) => format!("/{}", pq.as_str())
            .parse()
            .unwrap_or_else(|_| ::http::uri::PathAndQuery::from_static("/")),
        None => ::http::uri::PathAndQuery::from_static("/"),
    }
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
