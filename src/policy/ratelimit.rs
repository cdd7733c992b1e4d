//! Inbound rate limiting: a token bucket (rate + burst) per Service, or per calling identity, enforced by the
//! destination's proxy after authorization. Config: TrafficPolicy.rateLimit; state: `RateLimits`, a registry keyed by
//! Service (and identity) that survives config swaps; metrics: `ferry_rate_limited_total`; over the limit:
//! `ProxyError::RateLimited` (429 `rate-limited` with `Retry-After`, gRPC RESOURCE_EXHAUSTED).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::identity::Identity;
use ferry_api::policy::RateLimit;
use http::{Request, Response};
use tokio::time::Instant;

use super::Mechanism;
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};

/// A token bucket: `burst` tokens at most, refilled at `rate` per second; a request takes one. Kept as GCRA (the
/// theoretical arrival time of the next request, in integer nanoseconds), which is exact where adding up fractional
/// tokens drifts: at 100/s and burst 20 it admits exactly 120 over the first second, not 119.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: u32,
    /// Nanoseconds per token.
    interval: i128,
    /// The theoretical arrival time, in nanoseconds since `origin`.
    tat: i128,
    origin: Instant,
    last: Instant,
}

fn interval(rate: f64) -> i128 {
    ((1e9 / rate).round() as i128).max(1)
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket { rate, burst, interval: interval(rate), tat: 0, origin: now, last: now }
    }

    fn at(&self, now: Instant) -> i128 {
        now.saturating_duration_since(self.origin).as_nanos() as i128
    }

    /// How many nanoseconds of burst the bucket tolerates ahead of time.
    fn tolerance(&self) -> i128 {
        i128::from(self.burst.saturating_sub(1)) * self.interval
    }

    /// Tokens held at `now` (fractional).
    fn tokens(&self, now: i128) -> f64 {
        let ahead = now + self.tolerance() + self.interval - self.tat.max(now - self.tolerance() - self.interval);
        (ahead as f64 / self.interval as f64).clamp(0.0, f64::from(self.burst))
    }

    /// New limits for a live bucket: the tokens it holds stay (at most the new burst).
    pub fn reconfigure(&mut self, rate: f64, burst: u32, now: Instant) {
        let t = self.at(now);
        let held = self.tokens(t);
        self.rate = rate;
        self.burst = burst;
        self.interval = interval(rate);
        let held = held.min(f64::from(burst));
        self.tat = t + self.tolerance() + self.interval - (held * self.interval as f64) as i128;
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let t = self.at(now);
        self.last = now;
        let earliest = self.tat - self.tolerance();
        if t < earliest {
            return Err(Duration::from_nanos((earliest - t) as u64));
        }
        self.tat = self.tat.max(t) + self.interval;
        Ok(())
    }
}

/// The buckets of this proxy's inbound side, by Service and (with `perClientIdentity`) calling identity. Buckets of
/// callers not seen for a minute are dropped, so that the map stays as small as the set of active callers.
#[derive(Default)]
pub struct RateLimits {
    buckets: Mutex<HashMap<BucketKey, TokenBucket>>,
}

/// A bucket's owner: the Service (`name.namespace`) and, with `perClientIdentity`, the caller.
type BucketKey = (Arc<str>, Option<Identity>);

/// A bucket unused this long is forgotten (a returning caller starts with a full one).
const IDLE: Duration = Duration::from_secs(60);

impl RateLimits {
    /// Admits one request or opaque connection to a port within the rate of every Service selecting it (a token from
    /// each bucket), counting each refusal under its Service; refused: when to retry.
    pub fn admit(
        &self,
        services: &[(Arc<str>, RateLimit)],
        caller: Option<&Identity>,
        metrics: &crate::telemetry::metrics::Metrics,
    ) -> Result<(), Duration> {
        let now = Instant::now();
        let mut refused: Option<Duration> = None;
        for (service, limit) in services {
            if let Err(retry_after) = self.check(service, caller, limit, now) {
                metrics.rate_limited.with_label_values(&[service]).inc();
                refused = Some(refused.map_or(retry_after, |r| r.max(retry_after)));
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// Takes a token for a call to `service` from `caller` under `limit`.
    pub fn check(
        &self,
        service: &Arc<str>,
        caller: Option<&Identity>,
        limit: &RateLimit,
        now: Instant,
    ) -> Result<(), Duration> {
        let key = (service.clone(), if limit.per_client_identity { caller.cloned() } else { None });
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        if buckets.len() > 1024 {
            buckets.retain(|_, b| now.saturating_duration_since(b.last) < IDLE);
        }
        let bucket =
            buckets.entry(key).or_insert_with(|| TokenBucket::new(limit.requests_per_second, limit.burst, now));
        if bucket.rate != limit.requests_per_second || bucket.burst != limit.burst {
            bucket.reconfigure(limit.requests_per_second, limit.burst, now);
        }
        bucket.try_take(now)
    }
}

// ===== layer =====

/// Admits each inbound HTTP request within the rate limits of the Services that select its port: it takes a token
/// from each one's bucket and is refused when any is empty; refused, the request never reaches the app. `Config`:
/// per selecting Service with a limit, its `service` label and its limit; and the caller, for per-caller limits.
pub struct RateLimited {
    limits: Arc<RateLimits>,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl RateLimited {
    pub fn new(limits: Arc<RateLimits>, metrics: Arc<crate::telemetry::metrics::Metrics>) -> Self {
        RateLimited { limits, metrics }
    }
}

impl Mechanism for RateLimited {
    type Config = (Arc<[(Arc<str>, RateLimit)]>, Option<Arc<Identity>>);

    fn call<S>(&self, (services, caller): Self::Config, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        match self.limits.admit(&services, caller.as_deref(), &self.metrics) {
            Ok(()) => Box::pin(inner.call(req)),
            Err(retry_after) => super::refuse(ProxyError::RateLimited { retry_after }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: f64, burst: u32, per_client: bool) -> RateLimit {
        RateLimit { requests_per_second: rate, burst, per_client_identity: per_client }
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_counts_at_exact_instants() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut b = TokenBucket::new(10.0, 3, t0);
        // (instant in ms, admitted?, retry-after when refused in ms)
        let table: &[(u64, bool, u64)] = &[
            (0, true, 0),    // 3 -> 2
            (0, true, 0),    // 2 -> 1
            (0, true, 0),    // 1 -> 0
            (0, false, 100), // empty: one token every 100 ms
            (50, false, 50), // half a token
            (100, true, 0),  // one token refilled, taken
            (100, false, 100),
            (1000, true, 0), // 900 ms refill 9 tokens, capped at 3: 3 -> 2
            (1000, true, 0),
            (1000, true, 0),
            (1000, false, 100),
            (1250, true, 0), // 2.5 tokens -> 1.5
            (1250, true, 0), // -> 0.5
            (1250, false, 50),
        ];
        for (i, (at, admitted, retry)) in table.iter().enumerate() {
            let got = b.try_take(ms(*at));
            match got {
                Ok(()) => assert!(admitted, "row {i} at {at} ms: admitted, expected refusal"),
                Err(after) => {
                    assert!(!admitted, "row {i} at {at} ms: refused, expected admission");
                    assert_eq!(after.as_millis() as u64, *retry, "row {i}: retry-after");
                }
            }
        }
        // Over any window the bucket admits at most burst + rate x seconds.
        let mut b = TokenBucket::new(100.0, 20, t0);
        let admitted = (0..=10_000u64).filter(|i| b.try_take(ms(*i / 10)).is_ok()).count();
        assert_eq!(admitted, 20 + 100, "20 at once, then 100 over the second");
    }

    #[tokio::test(start_paused = true)]
    async fn registry_keeps_state_across_config_and_splits_by_caller() {
        let limits = RateLimits::default();
        let now = Instant::now();
        let svc: Arc<str> = "api.default".into();
        let (a, b) = (Identity::new("default", "a"), Identity::new("default", "b"));
        let shared = limit(1.0, 2, false);
        assert!(limits.check(&svc, Some(&a), &shared, now).is_ok());
        assert!(limits.check(&svc, Some(&b), &shared, now).is_ok());
        assert!(limits.check(&svc, Some(&a), &shared, now).is_err(), "one bucket for the Service");
        // A config change (new burst) keeps the empty bucket empty: no burst of free tokens from a swap.
        assert!(limits.check(&svc, None, &limit(1.0, 5, false), now).is_err());
        // Per caller: each identity has its own bucket.
        let per = limit(1.0, 1, true);
        assert!(limits.check(&svc, Some(&a), &per, now).is_ok());
        assert!(limits.check(&svc, Some(&b), &per, now).is_ok());
        assert!(limits.check(&svc, Some(&a), &per, now).is_err());
        assert!(limits.check(&svc, Some(&a), &per, now + Duration::from_secs(1)).is_ok());
    }
}
