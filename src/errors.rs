//! Proxy-made errors, typed, and the one place that turns them into responses with a `ferry-proxy-error` header.

use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

pub const PROXY_ERROR_HEADER: HeaderName = HeaderName::from_static("ferry-proxy-error");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The future of a policy layer that wraps its inner service's call (boxed: one type for every layer).
pub type ResponseFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

/// A failure of the proxy itself (never the app's own error response).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    NoRoute(String),
    /// An on-demand proxy has no answer for an address inside the mesh's ranges (the control plane down or slow):
    /// refused rather than called in plaintext.
    #[error("{0}")]
    Undiscovered(String),
    /// HTTPRoutes attach to the Service and none of their rules matches (GAMMA: rejected; the HTTPRoute spec: 404).
    #[error("{0}")]
    RouteNotFound(String),
    /// The route rule's chosen backend is unresolved, or every backend has weight 0 (the HTTPRoute spec: 500).
    #[error("{0}")]
    BackendNotFound(String),
    #[error("{0}")]
    NoHealthyEndpoints(String),
    #[error("connecting to {addr}: {source}")]
    ConnectRefused { addr: SocketAddr, source: std::io::Error },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("upstream {addr} failed the request: {source}")]
    UpstreamReset { addr: SocketAddr, source: hyper::Error },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Unauthorized(String),
    #[error("the circuit breaker of {service} is open (probes again in {} ms)", retry_after.as_millis())]
    CircuitOpen { service: String, retry_after: std::time::Duration },
    #[error("{service} is at its limit of concurrent and queued requests or of open connections")]
    Overloaded { service: String },
    #[error("no response within the per-try timeout ({0:?})")]
    PerTryTimeout(std::time::Duration),
    #[error("no response within the request timeout ({0:?})")]
    RequestTimeout(std::time::Duration),
    #[error("the service's rate limit is reached; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: std::time::Duration },
}

/// Why a mesh handshake failed: the `reason` label of `ferry_tls_handshake_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no workload identity yet (the certificate has not been issued)")]
    NoIdentity,
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} presented {found}, which service {service} does not list ({expected})")]
    WrongIdentity { addr: SocketAddr, service: String, found: String, expected: String },
    #[error("{addr} presented no usable identity: {message}")]
    BadPeer { addr: SocketAddr, message: String },
}

impl TlsError {
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::NoIdentity => "no-identity",
            TlsError::Handshake { source, .. } => handshake_reason(source),
            TlsError::WrongIdentity { .. } => "wrong-identity",
            TlsError::BadPeer { .. } => "bad-certificate",
        }
    }
}

/// A short label for a failed handshake's cause.
pub fn handshake_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired) => "expired",
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => "unknown-ca",
        rustls::Error::InvalidCertificate(_) => "bad-certificate",
        rustls::Error::NoCertificatesPresented => "no-client-certificate",
        rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA) => "peer-unknown-ca",
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired) => "peer-expired",
        rustls::Error::AlertReceived(_) => "peer-alert",
        rustls::Error::NoApplicationProtocol => "alpn",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol",
    }
}

/// Whether a try's outcome counts against its destination (circuit breaker, outlier detection): a 5xx answer, or no
/// answer (connection failures, resets, TLS failures, timeouts). Refusals by the proxy itself do not count.
pub fn is_failure(result: &Result<Response<ProxyBody>, ProxyError>) -> bool {
    match result {
        Ok(resp) => resp.status().is_server_error(),
        Err(e) => matches!(
            e,
            ProxyError::ConnectRefused { .. }
                | ProxyError::ConnectTimeout(_)
                | ProxyError::UpstreamReset { .. }
                | ProxyError::Tls(_)
                | ProxyError::PerTryTimeout(_)
                | ProxyError::RequestTimeout(_)
        ),
    }
}

impl ProxyError {
    /// The `ferry-proxy-error` value, also the `reason` metric label and log field.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "no-route",
            ProxyError::Undiscovered(_) => "undiscovered",
            ProxyError::RouteNotFound(_) => "route-not-found",
            ProxyError::BackendNotFound(_) => "backend-not-found",
            ProxyError::NoHealthyEndpoints(_) => "no-healthy-endpoints",
            ProxyError::ConnectRefused { .. } => "connect-refused",
            ProxyError::ConnectTimeout(_) => "connect-timeout",
            ProxyError::UpstreamReset { .. } => "upstream-reset",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::Tls(_) => "tls-failed",
            ProxyError::Unauthorized(_) => "unauthorized",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::RequestTimeout(_) => "request-timeout",
            ProxyError::PerTryTimeout(_) => "per-try-timeout",
            ProxyError::CircuitOpen { .. } => "circuit-open",
            ProxyError::Overloaded { .. } => "overloaded",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute(_)
            | ProxyError::ConnectRefused { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::UpstreamReset { .. }
            | ProxyError::Tls(_) => StatusCode::BAD_GATEWAY,
            ProxyError::NoHealthyEndpoints(_) | ProxyError::Undiscovered(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::BackendNotFound(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized(_) => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::RequestTimeout(_) | ProxyError::PerTryTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::CircuitOpen { .. } | ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code a gRPC caller gets instead of the HTTP status.
    pub fn grpc_status(&self) -> u8 {
        const DEADLINE_EXCEEDED: u8 = 4;
        const PERMISSION_DENIED: u8 = 7;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const UNIMPLEMENTED: u8 = 12;
        const INTERNAL: u8 = 13;
        const UNAVAILABLE: u8 = 14;
        match self {
            ProxyError::BadRequest(_) => INTERNAL,
            ProxyError::RouteNotFound(_) => UNIMPLEMENTED,
            ProxyError::Unauthorized(_) => PERMISSION_DENIED,
            ProxyError::RateLimited { .. } => RESOURCE_EXHAUSTED,
            ProxyError::RequestTimeout(_) | ProxyError::PerTryTimeout(_) => DEADLINE_EXCEEDED,
            _ => UNAVAILABLE,
        }
    }
}

/// The response a caller gets for `err`: an HTTP error with a short text body, or for gRPC a Trailers-Only response.
pub fn respond(err: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    let reason = HeaderValue::from_static(err.reason());
    if grpc {
        let message = HeaderValue::from_str(&percent_encode(&err.to_string()))
            .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(GRPC_STATUS, err.grpc_status().to_string())
            .header(GRPC_MESSAGE, message)
            .header(PROXY_ERROR_HEADER, reason)
            .body(ProxyBody::empty())
            .expect("valid response");
    }
    let body = format!("{}: {}\n", err.reason(), err);
    let mut resp = Response::builder()
        .status(err.status())
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(PROXY_ERROR_HEADER, reason);
    if let ProxyError::RateLimited { retry_after } = err {
        // Whole seconds, rounded up (RFC 9110 §10.2.3): never 0, which would invite an immediate retry.
        resp = resp.header(header::RETRY_AFTER, retry_after.as_secs_f64().ceil().max(1.0).to_string());
    }
    resp.body(ProxyBody::full(body)).expect("valid response")
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_reasons() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (ProxyError::NoRoute("x".into()), 502, "no-route", 14),
            (ProxyError::NoHealthyEndpoints("x".into()), 503, "no-healthy-endpoints", 14),
            (ProxyError::Undiscovered("x".into()), 503, "undiscovered", 14),
            (ProxyError::RouteNotFound("x".into()), 404, "route-not-found", 12),
            (ProxyError::BackendNotFound("x".into()), 500, "backend-not-found", 14),
            (
                ProxyError::ConnectRefused { addr, source: std::io::ErrorKind::ConnectionRefused.into() },
                502,
                "connect-refused",
                14,
            ),
            (ProxyError::ConnectTimeout(addr), 502, "connect-timeout", 14),
            (ProxyError::BadRequest("no authority"), 400, "bad-request", 13),
            (ProxyError::Unauthorized("x".into()), 403, "unauthorized", 7),
            (ProxyError::RateLimited { retry_after: std::time::Duration::from_millis(1500) }, 429, "rate-limited", 8),
        ];
        for (err, status, reason, grpc) in cases {
            let http = respond(&err, false);
            assert_eq!(http.status().as_u16(), status, "{reason}");
            assert_eq!(http.headers()[PROXY_ERROR_HEADER], reason);
            let g = respond(&err, true);
            assert_eq!(g.status(), StatusCode::OK);
            assert_eq!(g.headers()["grpc-status"], grpc.to_string().as_str());
            assert_eq!(g.headers()[PROXY_ERROR_HEADER], reason);
            assert!(http_body::Body::is_end_stream(g.body()), "Trailers-Only has no body");
        }
    }

    #[test]
    fn rate_limited_says_when_to_retry() {
        let at = |ms| respond(&ProxyError::RateLimited { retry_after: std::time::Duration::from_millis(ms) }, false);
        assert_eq!(at(1500).headers()[header::RETRY_AFTER], "2");
        assert_eq!(at(10).headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a b%\n"), "a b%25%0A");
    }
}
