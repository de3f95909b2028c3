//! Errors Switchyard itself answers with, and who is to blame for each.
//!
//! The HTTP edge turns a `ProxyError` into a JSON response in one exhaustive match; blame
//! decides the log level (client faults are not logged as errors) and the metric label.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Internal,
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
            ProxyError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ProxyError::MethodNotProxied(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
        }
    }

    /// The JSON answer; a 401 names the schemes a key is accepted in (RFC 9110 §11.6.1).
    pub fn to_response(&self) -> Response<Bytes> {
        let (status, code) = self.status_and_code();
        let mut response = json_error(status, code, &self.to_string());
        if let ProxyError::Unauthorized = self {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Token realm="switchyard", Bearer realm="switchyard""#),
            );
        }
        response
    }
}

/// `{"error": code, "message": message}` with the given status.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
