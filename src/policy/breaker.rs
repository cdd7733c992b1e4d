//! Circuit breaking per destination Service: a pure state machine (time passed in, table-tested), a registry of one
//! breaker per Service that survives config swaps, and the `Breaking` mechanism of the outbound stack. Config:
//! TrafficPolicy.circuitBreaker. Closed → Open on a failure ratio over an interval (with a minimum of requests) or on
//! consecutive failures; Open fails fast (503 `circuit-open`, no upstream attempt) for `openFor`; then Half-open lets
//! `halfOpenRequests` probes through: all succeed → Closed, one fails → Open again. Failures: connection failures,
//! resets, timeouts and 5xx responses. Metrics: `ferry_circuit_breaker_state`, `..._transitions_total`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::policy::CircuitBreaker;
use http::{Request, Response};
use tokio::time::Instant;

use super::{Mechanism, refuse};
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};
use crate::telemetry::metrics::Metrics;

/// When a trip condition is not configured, the other one alone decides; with neither, the breaker never opens.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub failure_ratio: Option<f64>,
    pub min_requests: u32,
    pub interval: Duration,
    pub consecutive_failures: Option<u32>,
    pub open_for: Duration,
    pub half_open_requests: u32,
}

impl Config {
    /// From a TrafficPolicy's `circuitBreaker`; fields left out: `minRequests` 20, `interval` 10 s, `openFor` 5 s,
    /// `halfOpenRequests` 1 (no ratio or consecutive trip unless given).
    pub fn from_policy(p: &CircuitBreaker) -> Config {
        Config {
            failure_ratio: p.failure_ratio,
            min_requests: p.min_requests.unwrap_or(20),
            interval: p.interval.as_ref().map_or(Duration::from_secs(10), |d| d.as_std()),
            consecutive_failures: p.consecutive_failures,
            open_for: p.open_for.as_ref().map_or(Duration::from_secs(5), |d| d.as_std()),
            half_open_requests: p.half_open_requests.unwrap_or(1).max(1),
        }
    }
}

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The `state` label of the breaker metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// A change of state, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

/// One Service's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: Config,
    state: State,
    /// Open: until when.
    open_until: Instant,
    /// Closed: the current interval's start, requests and failures; and the failures in a row.
    window_start: Instant,
    requests: u32,
    failures: u32,
    consecutive: u32,
    /// Half-open: probes let through, and how many of them succeeded.
    probes: u32,
    probe_successes: u32,
}

/// Why a request was not let through, and when to expect the breaker to let probes through again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub retry_after: Duration,
}

impl Breaker {
    pub fn new(config: Config, now: Instant) -> Breaker {
        Breaker {
            config,
            state: State::Closed,
            open_until: now,
            window_start: now,
            requests: 0,
            failures: 0,
            consecutive: 0,
            probes: 0,
            probe_successes: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// New config for a live breaker: its state stays.
    pub fn reconfigure(&mut self, config: Config) {
        self.config = config;
    }

    fn go(&mut self, to: State, now: Instant) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        match to {
            State::Open => self.open_until = now + self.config.open_for,
            State::HalfOpen => (self.probes, self.probe_successes) = (0, 0),
            State::Closed => {
                (self.window_start, self.requests, self.failures, self.consecutive) = (now, 0, 0, 0);
            }
        }
        (from != to).then_some(Transition { from, to })
    }

    /// May a request go to the Service at `now`? Open fails fast; once `openFor` has passed the breaker half-opens
    /// and lets up to `halfOpenRequests` probes through.
    pub fn admit(&mut self, now: Instant) -> (Result<(), Rejected>, Option<Transition>) {
        let mut transition = None;
        if self.state == State::Open {
            if now < self.open_until {
                return (Err(Rejected { retry_after: self.open_until - now }), None);
            }
            transition = self.go(State::HalfOpen, now);
        }
        if self.state == State::HalfOpen {
            if self.probes >= self.config.half_open_requests {
                // Probes are out; the rest fail fast until they are answered.
                return (Err(Rejected { retry_after: Duration::ZERO }), transition);
            }
            self.probes += 1;
        }
        (Ok(()), transition)
    }

    /// The outcome of a request that `admit` let through. Trip conditions are evaluated as failures are recorded.
    pub fn record(&mut self, now: Instant, success: bool) -> Option<Transition> {
        match self.state {
            State::HalfOpen if !success => self.go(State::Open, now),
            State::HalfOpen => {
                self.probe_successes += 1;
                if self.probe_successes >= self.config.half_open_requests { self.go(State::Closed, now) } else { None }
            }
            // A late answer from before the trip changes nothing.
            State::Open => None,
            State::Closed => {
                if now.saturating_duration_since(self.window_start) >= self.config.interval {
                    (self.window_start, self.requests, self.failures) = (now, 0, 0);
                }
                self.requests += 1;
                if success {
                    self.consecutive = 0;
                    return None;
                }
                self.failures += 1;
                self.consecutive += 1;
                let by_count = self.config.consecutive_failures.is_some_and(|n| self.consecutive >= n);
                let by_ratio = self.config.failure_ratio.is_some_and(|r| {
                    self.requests >= self.config.min_requests
                        && f64::from(self.failures) >= r * f64::from(self.requests)
                });
                if by_count || by_ratio { self.go(State::Open, now) } else { None }
            }
        }
    }
}

// ===== registry =====

/// One breaker per destination Service, kept across config swaps (a new config reconfigures the live breaker).
#[derive(Default)]
pub struct Breakers {
    map: Mutex<HashMap<Arc<str>, Breaker>>,
}

impl Breakers {
    fn with<T>(&self, service: &Arc<str>, config: &Config, now: Instant, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut map = self.map.lock().expect("breaker lock");
        let b = map.entry(service.clone()).or_insert_with(|| Breaker::new(config.clone(), now));
        if b.config != *config {
            b.reconfigure(config.clone());
        }
        f(b)
    }
}

fn observe(metrics: &Metrics, service: &str, transition: Option<Transition>) {
    if let Some(t) = transition {
        metrics.breaker_transitions.with_label_values(&[service, t.to.as_str()]).inc();
        metrics.breaker_state.with_label_values(&[service]).set(match t.to {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        });
        tracing::info!(service, from = t.from.as_str(), to = t.to.as_str(), "circuit breaker");
    }
}

// ===== layer =====

/// Fails fast while the destination's breaker is open; counts every outcome. `Config`: the destination Service's
/// breaker settings and the Service (one breaker each).
pub struct Breaking {
    breakers: Arc<Breakers>,
    metrics: Arc<Metrics>,
}

impl Breaking {
    pub fn new(breakers: Arc<Breakers>, metrics: Arc<Metrics>) -> Self {
        Breaking { breakers, metrics }
    }
}

impl Mechanism for Breaking {
    type Config = (Arc<Config>, Arc<str>);

    fn call<S>(&self, (config, service): Self::Config, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let (breakers, metrics) = (self.breakers.clone(), self.metrics.clone());
        let (admitted, transition) = breakers.with(&service, &config, Instant::now(), |b| b.admit(Instant::now()));
        observe(&metrics, &service, transition);
        if let Err(rejected) = admitted {
            return refuse(ProxyError::CircuitOpen { service: service.to_string(), retry_after: rejected.retry_after });
        }
        let call = inner.call(req);
        Box::pin(async move {
            let result = call.await;
            let ok = !crate::errors::is_failure(&result);
            let transition = breakers.with(&service, &config, Instant::now(), |b| b.record(Instant::now(), ok));
            observe(&metrics, &service, transition);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ratio: Option<f64>, min: u32, consecutive: Option<u32>, probes: u32) -> Config {
        Config {
            failure_ratio: ratio,
            min_requests: min,
            interval: Duration::from_secs(10),
            consecutive_failures: consecutive,
            open_for: Duration::from_secs(5),
            half_open_requests: probes,
        }
    }

    /// Steps: (ms since start, action, expected state after, expected admit result for `Admit`).
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Ok,
        Fail,
        Admit(bool),
    }

    fn run(mut b: Breaker, t0: Instant, steps: &[(u64, Step, State)]) -> Vec<Transition> {
        let mut transitions = Vec::new();
        for (i, (ms, step, state)) in steps.iter().enumerate() {
            let now = t0 + Duration::from_millis(*ms);
            match step {
                Step::Ok | Step::Fail => transitions.extend(b.record(now, matches!(step, Step::Ok))),
                Step::Admit(expect) => {
                    let (admitted, t) = b.admit(now);
                    transitions.extend(t);
                    assert_eq!(admitted.is_ok(), *expect, "step {i} at {ms} ms: admit");
                }
            }
            assert_eq!(b.state(), *state, "step {i} at {ms} ms");
        }
        transitions
    }

    #[tokio::test(start_paused = true)]
    async fn every_transition() {
        use State::*;
        use Step::*;
        let t0 = Instant::now();
        // Consecutive failures trip it; open fails fast; after openFor one probe; its failure reopens; after
        // openFor again two probes succeed and it closes.
        let b = Breaker::new(config(None, 0, Some(3), 2), t0);
        let transitions = run(
            b,
            t0,
            &[
                (0, Fail, Closed),
                (1, Ok, Closed), // a success resets the run
                (2, Fail, Closed),
                (3, Fail, Closed),
                (4, Fail, Open), // 3 in a row: open until 5004
                (5, Admit(false), Open),
                (5003, Admit(false), Open),
                (5003, Ok, Open),              // a late answer from before the trip changes nothing
                (5004, Admit(true), HalfOpen), // openFor passed: the first probe
                (5006, Admit(true), HalfOpen),
                (5007, Admit(false), HalfOpen), // only 2 probes at a time
                (5008, Fail, Open),             // a probe failed: open again, until 10_008
                (10_007, Admit(false), Open),
                (10_008, Admit(true), HalfOpen),
                (10_009, Admit(true), HalfOpen),
                (10_010, Ok, HalfOpen),
                (10_011, Ok, Closed), // both probes succeeded
                (10_012, Admit(true), Closed),
            ],
        );
        let pairs: Vec<(State, State)> = transitions.iter().map(|t| (t.from, t.to)).collect();
        assert_eq!(pairs, [(Closed, Open), (Open, HalfOpen), (HalfOpen, Open), (Open, HalfOpen), (HalfOpen, Closed)]);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_ratio_needs_min_requests_within_the_interval() {
        use State::*;
        use Step::*;
        let t0 = Instant::now();
        let b = Breaker::new(config(Some(0.5), 4, None, 1), t0);
        run(
            b.clone(),
            t0,
            &[
                (0, Fail, Closed),
                (1, Fail, Closed),
                (2, Fail, Closed), // 3/3 failed, but fewer than min_requests
                (3, Fail, Open),   // 4 requests, all failed: over 50% with enough requests
            ],
        );
        run(
            b.clone(),
            t0,
            &[
                (0, Fail, Closed),
                (1, Ok, Closed),
                (2, Ok, Closed),
                (3, Ok, Closed),   // 1/4 failed
                (4, Fail, Closed), // 2/5 = 40%
                (5, Fail, Open),   // 3/6 = 50%
            ],
        );
        // A new interval starts the count over: failures spread thinner than the interval never trip it.
        run(
            b,
            t0,
            &[
                (0, Fail, Closed),
                (1, Fail, Closed),
                (2, Fail, Closed),
                (10_000, Fail, Closed), // new window: 1 request
                (10_001, Ok, Closed),
                (10_002, Ok, Closed),
                (10_003, Ok, Closed), // 1/4
            ],
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unconfigured_never_opens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config(None, 0, None, 1), t0);
        for i in 0..1000 {
            assert_eq!(b.record(t0 + Duration::from_millis(i), false), None);
        }
        assert_eq!(b.state(), State::Closed);
    }
}
