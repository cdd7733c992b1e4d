//! Retry decisions (pure; the layer that replays requests comes with the outbound stack): which failures a
//! TrafficPolicy's `retries.on` covers and whether a request may be retried at all, the jittered exponential backoff,
//! and the retry budget (a share of the requests over a 10 s window, plus a per-second floor) that stops retry storms.

use std::time::Duration;

use ferry_xds::policy::{Retries, RetryBudget};
use http::Method;
use tokio::time::Instant;

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
/// `percent` of the requests in the window plus `min_per_second` × 10.
#[derive(Debug, Clone)]
pub struct Budget {
    percent: f64,
    min_per_second: u32,
    /// Per slot: (the second it counts, requests, retries).
    slots: [(u64, u32, u32); WINDOW_SECONDS as usize],
    origin: Instant,
}

const WINDOW_SECONDS: u64 = 10;

impl Budget {
    pub fn new(budget: &RetryBudget, now: Instant) -> Budget {
        Budget {
            percent: budget.percent,
            min_per_second: budget.min_per_second,
            slots: [(u64::MAX, 0, 0); WINDOW_SECONDS as usize],
            origin: now,
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
    }

    /// Takes a retry from the budget, if it has one.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        let (requests, retries) = self.window(now);
        let allowed =
            self.percent / 100.0 * f64::from(requests) + f64::from(self.min_per_second) * WINDOW_SECONDS as f64;
        if f64::from(retries) + 1.0 > allowed {
            return false;
        }
        self.slot(now).2 += 1;
        true
    }
}

/// The retry settings of one Service, parsed.
#[derive(Debug, Clone)]
pub struct Policy {
    pub attempts: u32,
    pub on: On,
    pub base: Duration,
    pub max: Duration,
}

impl Policy {
    /// Backoff defaults when the policy gives none: 25 ms doubling to 250 ms.
    pub fn from_policy(r: &Retries) -> Policy {
        let (base, max) = r
            .backoff
            .as_ref()
            .map_or((Duration::from_millis(25), Duration::from_millis(250)), |b| (b.base.as_std(), b.max.as_std()));
        Policy { attempts: r.attempts, on: On::parse(&r.on), base, max }
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
        // No requests yet: the floor alone allows 10 retries in the window.
        assert_eq!((0..20).filter(|_| b.withdraw(s(0))).count(), 10);
        // 100 requests add 20 more.
        for _ in 0..100 {
            b.deposit(s(1));
        }
        assert_eq!((0..40).filter(|_| b.withdraw(s(1))).count(), 20);
        // After the window has slid past everything, the budget is back to the floor.
        assert_eq!((0..20).filter(|_| b.withdraw(s(12))).count(), 10);
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
