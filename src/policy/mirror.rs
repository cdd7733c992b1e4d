//! Request mirroring (HTTPRoute `RequestMirror`): a copy of a request goes to another Service in its own task, fire
//! and forget — its body copied into a small buffer as the request streams, copies in flight capped, each bounded in
//! time — so the request itself never waits on, nor fails because of, its copy.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::Mechanism;
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};
use crate::telemetry::metrics::Metrics;

/// The most body a copy carries: a request with a longer body is not copied (counted as dropped).
pub const BODY_LIMIT: usize = 64 * 1024;
/// How long a copy may take, its response body included, before it is given up (counted as failed), when the
/// mirror Service's TrafficPolicy sets no `timeout`.
pub const COPY_TIMEOUT: Duration = Duration::from_secs(10);

/// Marks a copy, for the layers that act once per real request (retries do not retry a copy).
#[derive(Debug, Clone, Copy)]
pub struct Mirrored;

/// Where one request's copies may go: the share of requests copied, the mirror Service (the `mirror` label), and its
/// destination (`D`), or why it cannot go.
pub struct Target<D> {
    pub name: Arc<str>,
    pub numerator: u32,
    pub denominator: u32,
    /// How long a copy may take, its response body included.
    pub timeout: Duration,
    pub dest: Result<D, String>,
}

/// Pure: whether a request is copied, for `numerator` of every `denominator` requests (`draw` uniform over `u64`).
pub fn sampled(numerator: u32, denominator: u32, draw: u64) -> bool {
    numerator >= denominator || ((u128::from(draw) * u128::from(denominator)) >> 64) < u128::from(numerator)
}

/// How a copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Mirrored,
    Failed,
    Dropped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Mirrored => "mirrored",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Sends copies beside each request (`Config`: the rule, the `route` label; the request's own `P`; its mirror
/// targets), through the layers under this one with what `copy` makes of `P` and a target's destination (`X`, an
/// extension of the copy's request) — made only for the copies actually sent.
pub struct Mirroring<P, D, X> {
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    copy: fn(&P, &D) -> X,
}

impl<P, D, X> Mirroring<P, D, X> {
    /// At most `in_flight` copies at once.
    pub fn new(in_flight: usize, metrics: Arc<Metrics>, copy: fn(&P, &D) -> X) -> Self {
        Mirroring { in_flight: Arc::new(Semaphore::new(in_flight)), metrics, copy }
    }
}

/// Counts one copy's outcome.
fn count(metrics: &Metrics, route: &str, mirror: &str, outcome: Outcome) {
    metrics.mirrors.with_label_values(&[route, mirror, outcome.as_str()]).inc();
}

impl<P, D, X> Mechanism for Mirroring<P, D, X>
where
    P: Send + 'static,
    D: Send + 'static,
    X: Clone + Send + Sync + 'static,
{
    type Config = (Arc<str>, P, Vec<Target<D>>);

    fn call<S>(&self, (route, parent, targets): Self::Config, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        // An upgrade or a tunnel is a connection, not a request to copy.
        let upgrade = req.method() == http::Method::CONNECT || req.headers().contains_key(http::header::UPGRADE);
        let mut copies = Vec::new();
        for target in
            targets.into_iter().filter(|t| !upgrade && sampled(t.numerator, t.denominator, crate::util::random_u64()))
        {
            let dest = match &target.dest {
                Ok(dest) => dest,
                Err(_) => {
                    count(&self.metrics, &route, &target.name, Outcome::Failed);
                    continue;
                }
            };
            match self.in_flight.clone().try_acquire_owned() {
                Ok(permit) => copies.push((target.name, target.timeout, (self.copy)(&parent, dest), permit)),
                Err(_) => count(&self.metrics, &route, &target.name, Outcome::Dropped),
            }
        }
        if copies.is_empty() {
            return Box::pin(inner.call(req));
        }
        let (parts, body) = req.into_parts();
        // The copy's body comes from the request's as it streams to the backend: the copy waits for it, never the
        // request for the copy.
        let (body, mut bodies) = match body.is_end_stream() {
            true => (body, Vec::new()),
            false => {
                let (teed, receivers) = body.teed(BODY_LIMIT, copies.len());
                (teed, receivers.into_iter().map(Some).collect())
            }
        };
        bodies.resize_with(copies.len(), || None);
        for ((name, timeout, copy, permit), body) in copies.into_iter().zip(bodies) {
            let mut head = Request::new(());
            *head.method_mut() = parts.method.clone();
            *head.uri_mut() = parts.uri.clone();
            *head.version_mut() = parts.version;
            *head.headers_mut() = parts.headers.clone();
            head.extensions_mut().insert(copy);
            head.extensions_mut().insert(Mirrored);
            let (svc, metrics, route) = (inner.clone(), self.metrics.clone(), route.clone());
            tokio::spawn(async move {
                let outcome = tokio::time::timeout(timeout, send_copy(svc, head, body)).await;
                count(&metrics, &route, &name, outcome.unwrap_or(Outcome::Failed));
                drop(permit);
            });
        }
        Box::pin(inner.call(Request::from_parts(parts, body)))
    }
}

/// Sends one copy once its body is complete (`None`: the request had none), and reads its response to the end.
async fn send_copy<S>(svc: S, head: Request<()>, body: Option<tokio::sync::oneshot::Receiver<bytes::Bytes>>) -> Outcome
where
    S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
{
    let body = match body {
        None => ProxyBody::empty(),
        Some(rx) => match rx.await {
            Ok(bytes) => ProxyBody::full(bytes),
            // Over the buffer, or the request's body never ended.
            Err(_) => return Outcome::Dropped,
        },
    };
    let resp = match svc.oneshot(head.map(|()| body)).await {
        Ok(resp) => resp,
        Err(_) => return Outcome::Failed,
    };
    let server_error = resp.status().is_server_error();
    match resp.into_body().collect().await {
        Ok(_) if !server_error => Outcome::Mirrored,
        _ => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_sampled_uniformly() {
        // (numerator, denominator, draw) -> copied.
        let cases = [
            (1, 1, 0, true),
            (1, 1, u64::MAX, true),
            (0, 100, 0, false),
            (0, 1, u64::MAX, false),
            (10, 100, 0, true),
            (10, 100, u64::MAX / 10 - 1, true),
            (10, 100, u64::MAX / 10 + 1, false),
            (50, 100, u64::MAX / 2 + 1, false),
            (100, 100, u64::MAX, true),
            (3, 2, 7, true),
        ];
        for (n, d, draw, want) in cases {
            assert_eq!(sampled(n, d, draw), want, "{n}/{d} at {draw}");
        }
    }
}
