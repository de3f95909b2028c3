//! Errors Switchyard itself answers with, and who is to blame for each.
//!
//! The HTTP edge turns a `ProxyError` into a JSON response in one exhaustive match. Blame
//! goes on the answer's access line beside its code, so an operator tells Switchyard's
//! own 503 from an upstream's, and a client's fault from a colour's.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    /// Switchyard itself: its own limits, or a drain it ran.
    Internal,
}

impl Blame {
    /// The access line's `blame` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Client => "client",
            Blame::Upstream => "upstream",
            Blame::Internal => "switchyard",
        }
    }
}

/// A request Switchyard answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy upstream in {0}")]
    NoHealthyUpstream(&'static str),
    #[error("could not connect to any upstream of {0}")]
    ConnectFailed(&'static str),
    #[error("the upstream failed: {0}")]
    UpstreamFailed(String),
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    #[error(
        "the drain deadline of this request's upstream ({0}) came before it answered: a flip moved {0}'s traffic, or a reload removed the upstream; a retry goes where new traffic goes"
    )]
    DrainDeadline(&'static str),
    #[error(
        "Switchyard cannot open a connection to the upstream: {0} (a limit of the proxy's own, not the upstream's fault)"
    )]
    OutOfSockets(String),
    #[error("missing or unknown client key")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("only WebSocket version 13 is supported")]
    WebSocketVersion,
    #[error(
        "the request body stopped: none of it came for {}",
        humantime::format_duration(*.0)
    )]
    RequestTimeout(std::time::Duration),
    #[error("{0} is not proxied: Switchyard is a reverse proxy, not a tunnel")]
    MethodNotProxied(http::Method),
}

impl ProxyError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            ProxyError::NoHealthyUpstream(_)
            | ProxyError::ConnectFailed(_)
            | ProxyError::UpstreamFailed(_)
            | ProxyError::UpstreamTimeout(_) => Blame::Upstream,
            ProxyError::DrainDeadline(_) | ProxyError::OutOfSockets(_) => Blame::Internal,
            ProxyError::Unauthorized
            | ProxyError::BadRequest(_)
            | ProxyError::WebSocketVersion
            | ProxyError::RequestTimeout(_)
            | ProxyError::MethodNotProxied(_) => Blame::Client,
        }
    }

    /// The status and the JSON `error` code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoHealthyUpstream(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_upstream")
            }
            ProxyError::ConnectFailed(_) => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            ProxyError::UpstreamFailed(_) => (StatusCode::BAD_GATEWAY, "upstream_failed"),
            ProxyError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            ProxyError::DrainDeadline(_) => (StatusCode::SERVICE_UNAVAILABLE, "drain_deadline"),
            ProxyError::OutOfSockets(_) => (StatusCode::SERVICE_UNAVAILABLE, "proxy_overloaded"),
            ProxyError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            // The request is at fault, as the runbook lists it; the status says how.
            ProxyError::WebSocketVersion => (StatusCode::UPGRADE_REQUIRED, "bad_request"),
            ProxyError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ProxyError::MethodNotProxied(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
        }
    }

    /// The JSON answer; a 401 names the schemes a key is accepted in (RFC 9110 §11.6.1),
    /// a 426 the WebSocket version that is (RFC 6455 §4.4).
    pub fn to_response(&self) -> Response<Bytes> {
        let (status, code) = self.status_and_code();
        let mut response = json_error(status, code, &self.to_string());
        match self {
            ProxyError::Unauthorized => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        r#"Token realm="switchyard", Bearer realm="switchyard""#,
                    ),
                );
            }
            ProxyError::WebSocketVersion => {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            _ => {}
        }
        response
    }
}

/// `{"error": code, "message": message}` with the given status, and the same again as
/// Deepgram names them, `err_code` and `err_msg`: Deepgram's SDKs before v5 (Python) show a
/// failed call by its `err_msg`, and printed `None` for Switchyard's own answers without it.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    /// In this order, SPEC's fields first (a `json!` map would sort them).
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: &'a str,
        message: &'a str,
        err_code: &'a str,
        err_msg: &'a str,
    }
    let body = serde_json::to_string(&Body {
        error: code,
        message,
        err_code: code,
        err_msg: message,
    })
    .unwrap_or_default();
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
