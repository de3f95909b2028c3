//! Header rewriting between client and upstream: hop-by-hop headers out, `X-Forwarded-*`
//! in, and the client key found wherever Deepgram clients put it.

use std::net::IpAddr;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (no hashing) decides that, instead
    // of nine hashed removals per message.
    let any = headers.keys().any(is_hop_by_hop);
    if !any {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .chain(headers.keys().filter(|name| is_hop_by_hop(name)).cloned())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `upgrade`
/// which the WebSocket path sets itself. Matched as a string: comparing with an array of
/// `HeaderName`s builds and drops the array for every header checked. `Trailer` is not
/// among them (RFC 9110 drops it from RFC 2616's list): it names the trailer fields that
/// pass on, and without it hyper sends an HTTP/1.1 client none.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes from trailer fields what may not be sent as one (RFC 9110 §6.5.1): hop-by-hop
/// fields, and those that frame, route, authenticate or describe the content (the list
/// hyper's own HTTP/1.1 encoder keeps out). An HTTP/2 peer resets a stream whose trailers
/// carry a connection-specific field, and the body with it.
pub fn strip_from_trailers(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers);
    for name in [
        header::AUTHORIZATION,
        header::CACHE_CONTROL,
        header::CONTENT_ENCODING,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
        header::CONTENT_TYPE,
        header::HOST,
        header::MAX_FORWARDS,
        header::SET_COOKIE,
        header::TRAILER,
    ] {
        trailers.remove(name);
    }
}

/// Rewrites a client request's headers for the upstream: hop-by-hop out, the client
/// address appended to `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host`
/// replaced, and `Host` dropped so the upstream's authority is sent.
/// `host` is the client's `Host` (or HTTP/2 `:authority`), verbatim.
pub fn to_upstream(headers: &mut HeaderMap, client: IpAddr, tls: bool, host: Option<HeaderValue>) {
    strip_hop_by_hop(headers);
    let forwarded_for = {
        let mut prior = prior_hops(headers).peekable();
        if prior.peek().is_some() {
            let mut joined = prior.collect::<Vec<_>>().join(", ");
            joined.push_str(", ");
            joined.push_str(&client.to_string());
            HeaderValue::from_str(&joined).ok()
        } else {
            HeaderValue::from_str(&client.to_string()).ok()
        }
    };
    match forwarded_for {
        Some(v) => {
            headers.insert(X_FORWARDED_FOR, v);
        }
        None => {
            headers.remove(X_FORWARDED_FOR);
        }
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    headers.remove(header::HOST);
}

/// The client's own `X-Forwarded-For` hops that are kept: readable text, trimmed, not empty.
fn prior_hops(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(X_FORWARDED_FOR)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The `X-Forwarded-*` headers of one plain request, written straight into the head that
/// goes upstream (`proxy::h1`) instead of into the client's header map: the same headers
/// `to_upstream` sets, with no allocation, and a hashed lookup only when the client sent
/// an `X-Forwarded-For` of its own.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The client's address as header text, formatted once per connection.
    pub client: &'a HeaderValue,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// The client's `Host` (or HTTP/2 `:authority`), verbatim.
    pub host: Option<&'a HeaderValue>,
}

impl Forwarding<'_> {
    /// Whether the client's own `name` header is left out of the head: these are replaced,
    /// or (`X-Forwarded-For`) appended to by `encode`.
    pub fn replaces(name: &HeaderName) -> bool {
        name == X_FORWARDED_FOR || name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST
    }

    /// Writes the header lines: `X-Forwarded-For` with the client's earlier hops (from
    /// `headers`, looked up only when `had_for` says there are some) and then the client,
    /// `X-Forwarded-Proto`, and `X-Forwarded-Host` when the client named a host.
    pub fn encode(&self, headers: &HeaderMap, had_for: bool, out: &mut BytesMut) {
        out.put_slice(b"x-forwarded-for: ");
        if had_for {
            for hop in prior_hops(headers) {
                out.put_slice(hop.as_bytes());
                out.put_slice(b", ");
            }
        }
        out.put_slice(self.client.as_bytes());
        out.put_slice(if self.tls {
            b"\r\nx-forwarded-proto: https\r\n"
        } else {
            b"\r\nx-forwarded-proto: http\r\n"
        });
        if let Some(host) = self.host {
            out.put_slice(b"x-forwarded-host: ");
            out.put_slice(host.as_bytes());
            out.put_slice(b"\r\n");
        }
    }
}

/// The client keys a Deepgram client presented: in `Authorization: Token <key>` or
/// `Bearer <key>`, and after `token` or `bearer` in `Sec-WebSocket-Protocol` (browsers
/// cannot set headers on a WebSocket). A client is let in when either is a listed key.
pub fn client_keys(headers: &HeaderMap) -> [Option<&[u8]>; 2] {
    let from_header = headers.get(header::AUTHORIZATION).and_then(|auth| {
        let bytes = auth.as_bytes();
        [&b"token "[..], &b"bearer "[..]]
            .into_iter()
            .find_map(|scheme| {
                (bytes.len() > scheme.len() && bytes[..scheme.len()].eq_ignore_ascii_case(scheme))
                    .then(|| trim_ascii(&bytes[scheme.len()..]))
            })
    });
    let from_protocol = headers
        .contains_key(header::SEC_WEBSOCKET_PROTOCOL)
        .then(|| {
            let protocols = offered_protocols(headers);
            let mut it = protocols.into_iter();
            while let Some(p) = it.next() {
                if p.eq_ignore_ascii_case("token") || p.eq_ignore_ascii_case("bearer") {
                    return it.next().map(str::as_bytes);
                }
            }
            None
        })
        .flatten();
    [from_header, from_protocol]
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// The `Sec-WebSocket-Protocol` values a client offered, in order.
pub fn offered_protocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// The session id a Deepgram SDK sent, as a header or in the subprotocol list.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get("x-deepgram-session-id")
        .and_then(|v| v.to_str().ok())
    {
        return Some(v.chars().take(128).collect());
    }
    let protocols = offered_protocols(headers);
    let mut it = protocols.iter();
    while let Some(p) = it.next() {
        if p.eq_ignore_ascii_case("x-deepgram-session-id") {
            return it.next().map(|s| s.chars().take(128).collect());
        }
    }
    None
}

#[cfg(test)]
mod tests;
