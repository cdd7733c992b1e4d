//! Retries: the pure decisions (which failures a TrafficPolicy's `retries.on` covers, whether a request may be retried
//! at all, the jittered exponential backoff, the retry budget — a share of the requests over a 10 s window plus a
//! per-second floor — that stops retry storms) and the `Retrying` mechanism, second in the outbound stack. A request is retried
//! only if its body fits the replay buffer (64 KiB, declared by `content-length`, or empty); streaming bodies never
//! are. Metrics: `ferry_retries_total{result}` (attempted, exhausted, budget-denied).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_api::policy::{Retries, RetryBudget};
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;

use super::Mechanism;
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};
use crate::telemetry::metrics::Metrics;
use crate::util::FastMap;

/// Bodies up to this size (by `content-length`) are kept for replay.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// How one try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The connection could not be made (refused, timed out, TLS failed): nothing reached the app.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the server did not process the request.
    RefusedStream,
    /// The connection or stream broke after the request was sent.
    Reset,
    /// An HTTP response (with its gRPC status, when it is a gRPC call).
    Response { status: u16, grpc: Option<u8> },
}

/// The `retries.on` conditions, parsed once per config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct On {
    connect_failure: bool,
    refused_stream: bool,
    reset: bool,
    any_5xx: bool,
    gateway_error: bool,
    statuses: Vec<u16>,
    grpc: Vec<u8>,
}

impl On {
    /// From validated `on` words (unknown words cannot reach here: validation refuses them).
    pub fn parse(words: &[String]) -> On {
        let mut on = On::default();
        for w in words {
            match w.as_str() {
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "reset" => on.reset = true,
                "5xx" => on.any_5xx = true,
                "gateway-error" => on.gateway_error = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                code => on.statuses.extend(code.parse::<u16>().ok()),
            }
        }
        on
    }

    /// Whether the policy names gRPC codes (then gRPC requests are retried whatever their HTTP method).
    pub fn has_grpc(&self) -> bool {
        !self.grpc.is_empty()
    }

    /// Whether `outcome` is one the policy retries on.
    pub fn covers(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::ConnectFailure => self.connect_failure,
            Outcome::RefusedStream => self.refused_stream,
            Outcome::Reset => self.reset,
            Outcome::Response { status, grpc } => {
                let gateway = matches!(status, 502..=504);
                (self.any_5xx && (500..600).contains(&status))
                    || (self.gateway_error && gateway)
                    || self.statuses.contains(&status)
                    || grpc.is_some_and(|code| self.grpc.contains(&code))
            }
        }
    }
}

/// Methods that may be repeated without changing the result (RFC 9110 §9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// Pure: may try number `tries` (1 = the first) that ended in `outcome` be followed by another? Only idempotent
/// requests, or gRPC requests when the policy names gRPC codes; a request with a body only if it was kept for replay;
/// failures that reached nothing (connect failures, refused streams) are safe to retry for any method.
pub fn may_retry(
    retries: u32,
    on: &On,
    outcome: Outcome,
    method: &Method,
    grpc: bool,
    body_replayable: bool,
    tries: u32,
) -> bool {
    if tries > retries || !on.covers(outcome) || !body_replayable {
        return false;
    }
    let nothing_processed = matches!(outcome, Outcome::ConnectFailure | Outcome::RefusedStream);
    nothing_processed || idempotent(method) || (grpc && on.has_grpc())
}

/// Pure: the wait before retry number `retry` (1 = the first): full jitter over an exponential ceiling,
/// `jitter` in [0, 1) × min(max, base × 2^(retry-1)).
pub fn backoff(retry: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32 << retry.saturating_sub(1).min(20)).min(max);
    ceiling.mul_f64(jitter.clamp(0.0, 1.0))
}

/// The retry budget over a sliding 10 s window of one-second slots: retries are allowed while they stay under
/// `percent` of the requests in the window plus the floor, `min_per_second` for each second of the window that has
/// passed (at least one: a fresh budget can retry at once). The same holds over the budget's whole life, checked
/// with running totals, so over any run retries ≤ percent × requests + min_per_second × max(seconds, 1) holds exactly
/// (the window alone could overshoot it by a fraction at its edges); the window keeps a long healthy past from
/// paying for a burst of retries.
#[derive(Debug, Clone)]
pub struct Budget {
    percent: f64,
    min_per_second: u32,
    /// Per slot: (the second it counts, requests, retries).
    slots: [(u64, u32, u32); WINDOW_SECONDS as usize],
    origin: Instant,
    /// Requests and retries since `origin`.
    totals: (u64, u64),
}

const WINDOW_SECONDS: u64 = 10;

impl Budget {
    pub fn new(budget: &RetryBudget, now: Instant) -> Budget {
        Budget {
            percent: budget.percent,
            min_per_second: budget.min_per_second,
            slots: [(u64::MAX, 0, 0); WINDOW_SECONDS as usize],
            origin: now,
            totals: (0, 0),
        }
    }

    /// New percentages for a live budget: the counts stay.
    pub fn reconfigure(&mut self, budget: &RetryBudget) {
        self.percent = budget.percent;
        self.min_per_second = budget.min_per_second;
    }

    fn slot(&mut self, now: Instant) -> &mut (u64, u32, u32) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let slot = &mut self.slots[(second % WINDOW_SECONDS) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    fn window(&self, now: Instant) -> (u32, u32) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        self.slots
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && second.saturating_sub(*s) < WINDOW_SECONDS)
            .fold((0, 0), |(r, t), (_, req, ret)| (r + req, t + ret))
    }

    /// Counts a request (a first try).
    pub fn deposit(&mut self, now: Instant) {
        self.slot(now).1 += 1;
        self.totals.0 += 1;
    }

    /// Takes a retry from the budget, if it has one.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        let (requests, retries) = self.window(now);
        // A fresh budget has its first second's floor at once (it can retry its very first request); from then on the
        // floor accrues per second, so over any run retries <= percent x requests + floor x max(seconds, 1).
        let lifetime = now.saturating_duration_since(self.origin).as_secs_f64().max(1.0);
        let allowed =
            |requests: f64, seconds: f64| self.percent / 100.0 * requests + f64::from(self.min_per_second) * seconds;
        let in_window = f64::from(retries) + 1.0 <= allowed(f64::from(requests), lifetime.min(WINDOW_SECONDS as f64));
        let in_life = (self.totals.1 + 1) as f64 <= allowed(self.totals.0 as f64, lifetime);
        if !(in_window && in_life) {
            return false;
        }
        self.slot(now).2 += 1;
        self.totals.1 += 1;
        true
    }
}

/// The retry settings of one Service, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub attempts: u32,
    pub on: On,
    pub base: Duration,
    pub max: Duration,
    pub per_try_timeout: Option<Duration>,
    pub budget: RetryBudget,
}

impl Policy {
    /// For a Service whose TrafficPolicy sets no `retries`: one retry on `connect-failure` and `refused-stream` (the
    /// request cannot have reached the app) and on `reset` (for idempotent requests only, as RFC 9110 §9.2.2 allows
    /// clients: typically a pooled connection the endpoint closed or a crashed endpoint), default backoff and budget.
    pub fn default_for_unconfigured() -> Policy {
        Policy::from_policy(&Retries {
            attempts: 1,
            per_try_timeout: None,
            on: vec!["connect-failure".into(), "refused-stream".into(), "reset".into()],
            backoff: None,
            budget: None,
        })
    }

    /// Defaults for what the policy leaves out: backoff 25 ms doubling to 250 ms, budget 20 % + 10/s.
    pub fn from_policy(r: &Retries) -> Policy {
        let (base, max) = r
            .backoff
            .as_ref()
            .map_or((Duration::from_millis(25), Duration::from_millis(250)), |b| (b.base.as_std(), b.max.as_std()));
        Policy {
            attempts: r.attempts,
            on: On::parse(&r.on),
            base,
            max,
            per_try_timeout: r.per_try_timeout.as_ref().map(|d| d.as_std()),
            budget: r.budget.clone().unwrap_or(RetryBudget { percent: 20.0, min_per_second: 10 }),
        }
    }
}

impl Policy {
    /// An HTTPRoute rule's `retry` (GEP-1731) over its Service's policy (`service`, the TrafficPolicy's or the
    /// default): a try that fails to connect, is refused or reset, or answers one of `codes` is retried, `attempts`
    /// times (1 when unset), `backoff` apart at least (else the Service's backoff); the Service's per-try timeout and
    /// retry budget stay (the budget is the Service's own: a route's retries spend it).
    pub fn for_route(r: &ferry_api::route::HttpRouteRetry, service: Option<&Policy>) -> Policy {
        let fallback = Policy::default_for_unconfigured();
        let service = service.unwrap_or(&fallback);
        let mut on: Vec<String> = ["connect-failure", "refused-stream", "reset"].map(String::from).to_vec();
        on.extend(r.codes.iter().map(u16::to_string));
        let base = r.backoff.as_deref().and_then(ferry_api::route::gateway_duration).unwrap_or(service.base);
        Policy {
            attempts: r.attempts.unwrap_or(1),
            on: On::parse(&on),
            base,
            max: service.max.max(base),
            per_try_timeout: service.per_try_timeout,
            budget: service.budget.clone(),
        }
    }
}

/// How a try ended, for the retry decision (`None`: an error retrying cannot help, such as an open breaker).
pub fn classify(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<Outcome> {
    match result {
        Ok(resp) => {
            let grpc = resp
                .headers()
                .get(crate::errors::GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            Some(Outcome::Response { status: resp.status().as_u16(), grpc })
        }
        Err(ProxyError::ConnectRefused { .. } | ProxyError::ConnectTimeout(_) | ProxyError::Tls(_)) => {
            Some(Outcome::ConnectFailure)
        }
        Err(ProxyError::UpstreamReset { source, .. }) => {
            let refused = std::error::Error::source(source)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .is_some_and(|e| e.reason() == Some(h2::Reason::REFUSED_STREAM));
            Some(if refused { Outcome::RefusedStream } else { Outcome::Reset })
        }
        Err(ProxyError::PerTryTimeout(_)) => Some(Outcome::Response { status: 504, grpc: Some(4) }),
        Err(_) => None,
    }
}

/// Under a route split, a try the backend it picked refused (its breaker open, its caps full, no healthy endpoint):
/// nothing reached an app and the next try picks a backend again, so it counts as a connect failure. (An unresolved
/// backend's 500 is not retried: the HTTPRoute spec gives its share of requests that answer.)
pub fn refused_by_backend(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<Outcome> {
    matches!(
        result,
        Err(ProxyError::CircuitOpen { .. } | ProxyError::Overloaded { .. } | ProxyError::NoHealthyEndpoints(_))
    )
    .then_some(Outcome::ConnectFailure)
}

// ===== registry =====

/// One budget per destination Service, kept across config swaps.
#[derive(Default)]
pub struct Budgets {
    map: Mutex<FastMap<Arc<str>, Budget>>,
}

impl Budgets {
    fn with<T>(&self, service: &Arc<str>, budget: &RetryBudget, f: impl FnOnce(&mut Budget, Instant) -> T) -> T {
        let now = Instant::now();
        let mut map = self.map.lock().expect("budget lock");
        let b = map.entry(service.clone()).or_insert_with(|| Budget::new(budget, now));
        b.reconfigure(budget);
        f(b, now)
    }
}

// ===== mechanism =====

/// Retries failed tries of a destination's requests within its policy and budget (`Config`: the destination's retry
/// policy, the Service whose budget it spends, and whether a route splits the request across backends).
pub struct Retrying {
    budgets: Arc<Budgets>,
    metrics: Arc<Metrics>,
}

impl Retrying {
    pub fn new(budgets: Arc<Budgets>, metrics: Arc<Metrics>) -> Self {
        Retrying { budgets, metrics }
    }
}

/// A copy of a request for another try: upgrades are never retried, so the extensions (which carry what the stack
/// below needs of the request) are plain values that clone.
fn replay(parts: &http::request::Parts, body: &Bytes) -> Request<ProxyBody> {
    let mut req = Request::new(ProxyBody::full(body.clone()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}

impl Mechanism for Retrying {
    type Config = (Arc<Policy>, Arc<str>, bool);

    fn call<S>(&self, (policy, service, split): Self::Config, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (budgets, metrics) = (self.budgets.clone(), self.metrics.clone());
        budgets.with(&service, &policy.budget, |b, now| b.deposit(now));
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let upgrade = req.headers().contains_key(http::header::UPGRADE)
            || req.extensions().get::<hyper::ext::Protocol>().is_some();
        let eligible = policy.attempts > 0 && !upgrade;
        let length = req.body().size_hint().exact();
        if !eligible || length.is_none_or(|n| n > REPLAY_LIMIT) {
            // Not retryable (or a body too large or of unknown length to keep): one try, the body streamed.
            return Box::pin(inner.call(req));
        }
        let inner = inner.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = http_body_util::Limited::new(body, REPLAY_LIMIT as usize)
                .collect()
                .await
                .map_err(|_| ProxyError::BadRequest("the request body does not match its content-length"))?
                .to_bytes();
            let mut tries = 0;
            loop {
                tries += 1;
                let result = inner.clone().oneshot(replay(&parts, &body)).await;
                let outcome = classify(&result).or_else(|| if split { refused_by_backend(&result) } else { None });
                let Some(outcome) = outcome else { return result };
                if !policy.on.covers(outcome) {
                    return result;
                }
                if tries > policy.attempts {
                    metrics.retries.with_label_values(&[&*service, "exhausted"]).inc();
                    return result;
                }
                if !may_retry(policy.attempts, &policy.on, outcome, &parts.method, grpc, true, tries) {
                    return result;
                }
                if !budgets.with(&service, &policy.budget, |b, now| b.withdraw(now)) {
                    metrics.retries.with_label_values(&[&*service, "budget-denied"]).inc();
                    return result;
                }
                metrics.retries.with_label_values(&[&*service, "attempted"]).inc();
                tokio::time::sleep(backoff(tries, policy.base, policy.max, crate::util::random_fraction())).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(words: &[&str]) -> On {
        On::parse(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn which_outcomes_are_retried() {
        let resp = |status, grpc| Outcome::Response { status, grpc };
        let cases: Vec<(&[&str], Outcome, bool)> = vec![
            (&["connect-failure"], Outcome::ConnectFailure, true),
            (&["connect-failure"], Outcome::Reset, false),
            (&["refused-stream"], Outcome::RefusedStream, true),
            (&["reset"], Outcome::Reset, true),
            (&["5xx"], resp(500, None), true),
            (&["5xx"], resp(404, None), false),
            (&["gateway-error"], resp(503, None), true),
            (&["gateway-error"], resp(500, None), false),
            (&["503"], resp(503, None), true),
            (&["503"], resp(502, None), false),
            (&["unavailable"], resp(200, Some(14)), true),
            (&["unavailable"], resp(200, Some(4)), false),
            (&["deadline-exceeded", "internal"], resp(200, Some(13)), true),
            (&[], resp(503, None), false),
        ];
        for (words, outcome, want) in cases {
            assert_eq!(on(words).covers(outcome), want, "{words:?} {outcome:?}");
        }
    }

    #[test]
    fn under_a_split_only_a_backends_own_refusals_count_as_connect_failures() {
        let open = ProxyError::CircuitOpen { service: "api-v2".into(), retry_after: Duration::from_secs(1) };
        let cases: Vec<(ProxyError, Option<Outcome>)> = vec![
            (open, Some(Outcome::ConnectFailure)),
            (ProxyError::Overloaded { service: "api-v2".into() }, Some(Outcome::ConnectFailure)),
            (ProxyError::NoHealthyEndpoints("api-v2".into()), Some(Outcome::ConnectFailure)),
            (ProxyError::BackendNotFound("ghost".into()), None),
            (ProxyError::Unauthorized("no".into()), None),
            (ProxyError::RequestTimeout(Duration::from_secs(1)), None),
        ];
        for (error, want) in cases {
            let why = error.to_string();
            assert_eq!(refused_by_backend(&Err(error)), want, "{why}");
        }
    }

    #[test]
    fn which_requests_may_be_retried() {
        let all = on(&["connect-failure", "5xx", "unavailable"]);
        let r500 = Outcome::Response { status: 500, grpc: None };
        let grpc14 = Outcome::Response { status: 200, grpc: Some(14) };
        // (outcome, method, grpc, replayable body, tries so far, expected) with 2 retries allowed.
        let cases = [
            (r500, Method::GET, false, true, 1, true),
            (r500, Method::GET, false, true, 2, true),
            (r500, Method::GET, false, true, 3, false),  // retries used up
            (r500, Method::POST, false, true, 1, false), // not idempotent
            (Outcome::ConnectFailure, Method::POST, false, true, 1, true), // nothing reached the app
            (grpc14, Method::POST, true, true, 1, true), // gRPC with a gRPC code in `on`
            (r500, Method::PUT, false, false, 1, false), // the body was not kept for replay
        ];
        for (outcome, method, grpc, replayable, tries, want) in cases {
            assert_eq!(
                may_retry(2, &all, outcome, &method, grpc, replayable, tries),
                want,
                "{outcome:?} {method} grpc={grpc} replayable={replayable} tries={tries}"
            );
        }
        let no_grpc = on(&["5xx"]);
        assert!(!may_retry(2, &no_grpc, grpc14, &Method::POST, true, true, 1));
    }

    #[test]
    fn backoff_bounds() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        for retry in 1..=10 {
            let ceiling = Duration::from_millis((25u64 << (retry - 1)).min(250));
            assert_eq!(backoff(retry, base, max, 0.0), Duration::ZERO);
            assert_eq!(backoff(retry, base, max, 0.5), ceiling / 2, "retry {retry}");
            assert!(backoff(retry, base, max, 0.999_999) <= ceiling);
        }
        assert_eq!(backoff(40, base, max, 0.999_999).as_millis(), 249, "no overflow far out");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_accounting() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        // 20 % of requests, floor 1/s (10 over the window).
        let mut b = Budget::new(&RetryBudget { percent: 20.0, min_per_second: 1 }, t0);
        // No requests yet: the floor alone, 1 per second passed (at least 1, at most the window's 10).
        assert_eq!((0..20).filter(|_| b.withdraw(s(0))).count(), 1, "a fresh budget can retry at once");
        assert_eq!((0..20).filter(|_| b.withdraw(s(3))).count(), 2, "3 by second 3, 1 taken");
        // The window (second 0 has left it) would allow 8 more; the lifetime total, 10 by second 10 with 3 taken, 7.
        assert_eq!((0..20).filter(|_| b.withdraw(s(10))).count(), 7);
        // 100 requests add 20: the window (slots 2-11) holds 9 of the 10 retries taken and allows 30, so 21 more.
        for _ in 0..100 {
            b.deposit(s(11));
        }
        assert_eq!((0..40).filter(|_| b.withdraw(s(11))).count(), 21);
        // After the window has slid past everything, the budget is back to the floor.
        assert_eq!((0..20).filter(|_| b.withdraw(s(25))).count(), 10);
        // A 100 %-failing workload at 50 req/s for 30 s: retries stay within 20 % + the floor.
        let mut b = Budget::new(&RetryBudget { percent: 20.0, min_per_second: 10 }, t0);
        let mut retries = 0;
        for ms in (0..30_000).step_by(20) {
            let now = t0 + Duration::from_millis(ms);
            b.deposit(now);
            retries += usize::from(b.withdraw(now));
        }
        let bound = (0.2 * 1500.0 + 10.0 * 30.0) as usize;
        assert!(retries <= bound && retries >= 550, "{retries} retries for 1500 requests (bound {bound})");
    }
}
