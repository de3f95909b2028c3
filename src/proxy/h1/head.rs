//! Parsing an upstream's response head, and what it says about the body's framing and the
//! connection's reuse. Reading the bytes is `conn`'s.

use std::io;
use std::mem::MaybeUninit;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

use super::{Framing, MAX_HEAD, MAX_HEADERS};

/// Why a response head was not read.
pub(super) enum Head {
    /// What came is not a valid HTTP/1.1 response head.
    Invalid(io::Error),
    /// The connection ended or failed first.
    Lost(io::Error),
}

/// How an upstream's response head is read: whitespace between a field name and its colon
/// is taken out, not refused, as a proxy must (RFC 9112 §5.1).
fn response_parser() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config
}

/// Parses a complete response head off the front of `buf`, skipping interim (1xx)
/// answers; `None` until the head is complete. A 101 is the answer when the request asked
/// to `upgrade` (framed as empty: what follows its head is the new protocol's), and an
/// error otherwise.
pub(super) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    upgrade: bool,
) -> Result<Option<(Response<()>, Framing, bool)>, String> {
    loop {
        // Uninitialized: zeroing 128 fields per response showed in profiles.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match response_parser().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                return Err("the response head is larger than 64 KiB".into());
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(format!(
                    "the upstream's answer has more than {MAX_HEADERS} header fields"
                ));
            }
            Err(e) => return Err(format!("the upstream's answer is not HTTP/1.1: {e}")),
        };
        let status = parsed
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or("the upstream's status code is not valid")?;
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if switched && !upgrade {
            return Err("the upstream switched protocols on a plain request".into());
        }
        if status.is_informational() && !switched {
            buf.advance(len);
            continue;
        }
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // Values are slices of the head, not copies; names are mostly static.
        let base = buf.as_ptr() as usize;
        // A reason phrase other than the standard one goes on as it came (hyper writes the
        // standard one otherwise); where it stands in the head, to slice after the freeze.
        // With no reason at all ("HTTP/1.1 200\r\n") httparse gives a static "", not a
        // slice of `buf`: only a slice of the head is kept.
        let reason_at = parsed
            .reason
            .filter(|r| Some(*r) != status.canonical_reason())
            .and_then(|r| {
                let start = (r.as_ptr() as usize).checked_sub(base)?;
                (start + r.len() <= len).then_some((start, r.len()))
            });
        let mut fields_at = Vec::with_capacity(parsed.headers.len());
        let (mut has_te, mut has_length) = (false, false);
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| format!("bad header name `{}` from the upstream", field.name))?;
            has_te |= name == header::TRANSFER_ENCODING;
            has_length |= name == header::CONTENT_LENGTH;
            let start = field.value.as_ptr() as usize - base;
            fields_at.push((name, start, start + field.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(fields_at.len());
        for (name, start, end) in fields_at {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| format!("bad value for header `{name}` from the upstream"))?;
            headers.append(name, value);
        }
        // Both framings at once is how request smuggling starts: answer, but do not keep.
        let ambiguous = has_te && has_length;
        // A faulty upstream may send the body a HEAD, 204 or 304 answer announces anyway,
        // after the head: the next request on the connection, maybe another client's,
        // would take it for its answer. Such an answer's connection is not kept.
        let (framing, unframed) = if switched {
            (Framing::Empty, false)
        } else {
            response_framing(method, status, has_te, &mut headers)?
        };
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some((start, len)) = reason_at
            && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(head.slice(start..start + len))
        {
            response.extensions_mut().insert(reason);
        } else if reason_at.is_none() && status.canonical_reason().is_none() {
            // A code with no standard phrase and none of its own ("HTTP/1.1 599"): an
            // empty one, which hyper would otherwise write as "<none>".
            response
                .extensions_mut()
                .insert(hyper::ext::ReasonPhrase::from_static(b""));
        }
        return Ok(Some((response, framing, !ambiguous && !unframed)));
    }
}

/// The status of a complete final answer at the front of `buf`, once the complete
/// interim (1xx) answers before it are dropped; `None` while there is none yet.
pub(super) fn early_answer(buf: &mut BytesMut) -> Option<u16> {
    loop {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        match response_parser().parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(len))
                if parsed
                    .code
                    .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                buf.advance(len);
            }
            Ok(httparse::Status::Complete(_)) => return Some(parsed.code.unwrap_or(0)),
            Ok(httparse::Status::Partial) => return None,
            // Not HTTP: stop sending, as for an error answer; the head parser reports it.
            Err(_) => return Some(u16::MAX),
        }
    }
}

/// How a response body is delimited (RFC 9112 §6.3), and whether the head announces a
/// body that the method or status says is not there (a HEAD's, 204's or 304's non-zero
/// length, or a transfer coding).
fn response_framing(
    method: &Method,
    status: StatusCode,
    has_te: bool,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), String> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // The length is that of the body not sent; repeated, it is still sent once (one
        // that is not valid is passed on: it frames nothing here).
        let announced = has_te || !matches!(content_length(headers), Ok(None | Some(0)));
        if status == StatusCode::NO_CONTENT {
            // A 204 has no Content-Length (RFC 9110 §8.6); HTTP/2 clients refuse one.
            headers.remove(header::CONTENT_LENGTH);
        }
        return Ok((Framing::Empty, announced));
    }
    // `has_te` spares the common answer (Content-Length only) a hashed lookup.
    if has_te
        && let Some(codings) = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
    {
        let chunked = codings
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        // Transfer-Encoding overrides any Content-Length.
        headers.remove(header::CONTENT_LENGTH);
        let framing = if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        };
        return Ok((framing, false));
    }
    let framing = match content_length(headers)? {
        None => Framing::Close,
        Some(0) => Framing::Empty,
        Some(length) => Framing::Length(length),
    };
    Ok((framing, false))
}

/// The answer's Content-Length, if it has one. The same length repeated is one length
/// (RFC 9110 §8.6), left in `headers` once: HTTP/2 clients refuse a repeated field.
fn content_length(headers: &mut HeaderMap) -> Result<Option<u64>, String> {
    let mut lengths = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.to_str().ok().and_then(|v| decimal(v.trim())));
    let Some(first) = lengths.next() else {
        return Ok(None);
    };
    let bad = || "the upstream's content-length is not valid".to_string();
    let length = first.ok_or_else(bad)?;
    let mut repeated = false;
    for other in lengths {
        if other != Some(length) {
            return Err(bad());
        }
        repeated = true;
    }
    if repeated {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(Some(length))
}

/// A length of decimal digits only (`parse` would also take a sign).
pub(super) fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Whether the connection may carry another exchange after this answer.
pub(super) fn keeps_alive(response: &Response<()>) -> bool {
    response.version() == Version::HTTP_11
        && !response
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("close"))
}
