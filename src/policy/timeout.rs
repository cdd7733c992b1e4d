//! The request timeout of a destination Service (TrafficPolicy.timeout), covering the whole exchange: the response
//! must begin in time, and its body must end in time (a body still streaming at the deadline is cut). A gRPC
//! caller's own `grpc-timeout` is honoured when shorter and passed on as the time left. Expiry: `RequestTimeout`
//! (504 `request-timeout`; gRPC: DEADLINE_EXCEEDED).

use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use tokio::time::Instant;

use super::Mechanism;
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};

pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Pure: a `grpc-timeout` value (`<up to 8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Pure: `d` as a `grpc-timeout` value, in milliseconds (rounded up, so that the next hop never gets more time).
pub fn format_grpc_timeout(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000).min(99_999_999);
    format!("{ms}m")
}

/// The request timeout: `Config` is the destination's timeout (none: only a gRPC caller's own deadline applies).
#[derive(Clone, Copy, Debug)]
pub struct RequestTimeout;

impl Mechanism for RequestTimeout {
    type Config = Option<Duration>;

    fn call<S>(&self, configured: Option<Duration>, inner: &mut S, mut req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let caller = req.headers().get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let timeout = match (configured, caller) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(timeout) = timeout else { return Box::pin(inner.call(req)) };
        if caller.is_some() {
            // The next hop learns how long it really has.
            let value = HeaderValue::from_str(&format_grpc_timeout(timeout)).expect("digits and a unit");
            req.headers_mut().insert(GRPC_TIMEOUT, value);
        }
        let deadline = Instant::now() + timeout;
        let call = inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, call).await {
                Err(_) => Err(ProxyError::RequestTimeout(timeout)),
                Ok(Ok(resp)) => Ok(resp.map(|body| body.with_deadline(deadline, timeout))),
                Ok(Err(e)) => Err(e),
            }
        })
    }
}

/// The per-try timeout of a destination's retry policy (`Config`): each try must get its response headers in time,
/// else it ends as `PerTryTimeout` (which the retry layer may retry).
#[derive(Clone, Copy, Debug)]
pub struct PerTryTimeout;

impl Mechanism for PerTryTimeout {
    type Config = Duration;

    fn call<S>(&self, timeout: Duration, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let call = inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Err(_) => Err(ProxyError::PerTryTimeout(timeout)),
                Ok(result) => result,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Layer;
    use tower::{Layer as _, Service, ServiceExt};

    #[test]
    fn grpc_timeout_values() {
        let cases = [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("3M", Some(Duration::from_secs(180))),
            ("5u", Some(Duration::from_micros(5))),
            ("7n", Some(Duration::from_nanos(7))),
            ("123456789m", None),
            ("m", None),
            ("10x", None),
            ("-1m", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_grpc_timeout(text), want, "{text:?}");
        }
        assert_eq!(format_grpc_timeout(Duration::from_micros(1500)), "2m");
        assert_eq!(format_grpc_timeout(Duration::from_secs(3)), "3000m");
    }

    #[tokio::test(start_paused = true)]
    async fn the_response_must_begin_in_time_and_grpc_callers_are_heard() {
        // Headers after 300 ms, against a 200 ms timeout.
        let slow = tower::service_fn(|_req: Request<ProxyBody>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, ProxyError>(Response::new(ProxyBody::empty()))
        });
        let err = Layer::new(RequestTimeout, |_| Some(Some(Duration::from_millis(200))))
            .layer(slow)
            .oneshot(Request::new(ProxyBody::empty()))
            .await
            .unwrap_err();
        assert_eq!((err.reason(), err.status().as_u16(), err.grpc_status()), ("request-timeout", 504, 4));
        // A gRPC caller's shorter deadline wins and is passed on as the time left.
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let s = seen.clone();
        let upstream = tower::service_fn(move |req: Request<ProxyBody>| {
            *s.lock().unwrap() = req.headers().get(GRPC_TIMEOUT).cloned();
            async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok::<_, ProxyError>(Response::new(ProxyBody::empty()))
            }
        });
        let req = Request::builder().header(GRPC_TIMEOUT, "100m").body(ProxyBody::empty()).unwrap();
        let err = Layer::new(RequestTimeout, |_| Some(Some(Duration::from_secs(2))))
            .layer(upstream)
            .oneshot(req)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "request-timeout");
        assert_eq!(seen.lock().unwrap().as_ref().unwrap(), "100m");
        // In time: the response passes, its body now bounded by the same deadline.
        let quick = tower::service_fn(|_req: Request<ProxyBody>| async {
            Ok::<_, ProxyError>(Response::new(ProxyBody::full("ok")))
        });
        let mut svc = Layer::new(RequestTimeout, |_| Some(Some(Duration::from_secs(1)))).layer(quick);
        let resp = svc.ready().await.unwrap().call(Request::new(ProxyBody::empty())).await.unwrap();
        assert!(matches!(resp.body(), ProxyBody::Timed(_)));
        // Nothing configured, nothing asked: nothing applied.
        let plain = tower::service_fn(|_req: Request<ProxyBody>| async {
            Ok::<_, ProxyError>(Response::new(ProxyBody::full("ok")))
        });
        let resp = Layer::new(RequestTimeout, |_| Some(None))
            .layer(plain)
            .oneshot(Request::new(ProxyBody::empty()))
            .await
            .unwrap();
        assert!(matches!(resp.body(), ProxyBody::Full(_)));
    }
}
