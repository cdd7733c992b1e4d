//! Endpoint choice per try, innermost in the outbound stack: power of two choices over peak-EWMA latency (the
//! default, as in Linkerd and Finagle), round robin, or least request, over the endpoints outlier detection has not
//! ejected, preferring endpoints this request has not tried yet (a retry goes elsewhere). Peak-EWMA jumps to a slower
//! observation at once and decays towards faster ones, so an endpoint that turns slow loses traffic immediately and
//! wins it back gradually; the cost also counts requests in flight, and a failure counts as a slow answer. The choice
//! is pure (time and randomness passed in); the state per Service port outlives config swaps (`Balancers`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::policy::LoadBalancer;
use http::{Request, Response};
use serde::Serialize;
use tokio::time::Instant;

use super::Mechanism;
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};
use crate::policy::outlier::{self, Detector};
use crate::telemetry::metrics::Metrics;
use crate::util::FastMap;

/// How fast old latency is forgotten.
pub const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed of an endpoint never measured (optimistic, so that new endpoints get tried).
pub const DEFAULT_RTT: Duration = Duration::from_millis(10);
/// A failed try counts as an answer at least this slow: a fast-failing endpoint must not attract traffic.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// One endpoint's load as the balancer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Peak-EWMA latency, in nanoseconds.
    ewma_ns: f64,
    updated: Instant,
    /// Requests sent and not answered yet.
    pub pending: u32,
}

impl Load {
    pub fn new(now: Instant) -> Load {
        Load { ewma_ns: DEFAULT_RTT.as_nanos() as f64, updated: now, pending: 0 }
    }

    /// A response took `rtt`: a slower one is taken at once (peak), a faster one blended in with a weight that
    /// grows with the time since the last update.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        if sample > self.ewma_ns {
            self.ewma_ns = sample;
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            let keep = (-elapsed / DECAY.as_secs_f64()).exp();
            self.ewma_ns = self.ewma_ns * keep + sample * (1.0 - keep);
        }
        self.updated = now;
    }

    /// The cost of sending one more request here at `now`. An estimate nobody refreshed decays towards zero (as
    /// tower's and Finagle's do), so an endpoint that was slow or failing is tried again after a while, and a
    /// recovered one wins its traffic back.
    pub fn cost(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.updated).as_secs_f64();
        self.ewma_ns * (-idle / DECAY.as_secs_f64()).exp() * f64::from(self.pending + 1)
    }

    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns as u64)
    }
}

/// Pure: power of two choices among `loads` (the available endpoints) with two random numbers in [0, 1): the
/// cheaper of two distinct endpoints. `None` when there is none.
pub fn p2c(loads: &[&Load], now: Instant, r1: f64, r2: f64) -> Option<usize> {
    match loads.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = ((r1 * n as f64) as usize).min(n - 1);
            // The second pick is among the others, so the two always differ.
            let mut b = ((r2 * (n - 1) as f64) as usize).min(n - 2);
            if b >= a {
                b += 1;
            }
            Some(if loads[b].cost(now) < loads[a].cost(now) { b } else { a })
        }
    }
}

/// Pure: the endpoint with the fewest requests in flight (the first of equals after `start`, to spread ties).
pub fn least_request(loads: &[&Load], start: usize) -> Option<usize> {
    let n = loads.len();
    (0..n).map(|i| (start + i) % n).min_by_key(|&i| loads[i].pending)
}

/// One endpoint of a Service port, as the route decision found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// A meshed workload (it has an identity): reached over mTLS.
    pub meshed: bool,
}

/// The endpoints of one Service port as the balancer sees them.
#[derive(Debug, Default)]
pub struct Group {
    loads: FastMap<SocketAddr, Load>,
    outlier: Detector,
    cursor: usize,
    /// The endpoint list last reconciled with (state of endpoints that left is dropped when it changes).
    seen: Option<Arc<[Endpoint]>>,
}

impl Group {
    /// Chooses the endpoint for one try among `endpoints`: those not ejected (all of them when every one is, as
    /// Envoy's panic routing: never a black hole), preferring those not in `tried`; counts it in flight.
    /// `r1`, `r2`: random numbers in [0, 1).
    pub fn pick(
        &mut self,
        endpoints: &Arc<[Endpoint]>,
        kind: LoadBalancer,
        tried: &[SocketAddr],
        now: Instant,
        (r1, r2): (f64, f64),
    ) -> Option<Endpoint> {
        if !self.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, endpoints)) {
            let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
            self.loads.retain(|a, _| addrs.contains(a));
            self.outlier.retain(&addrs);
            self.seen = Some(endpoints.clone());
        }
        let mut available: Vec<&Endpoint> = endpoints.iter().filter(|e| self.outlier.available(e.addr, now)).collect();
        if available.is_empty() {
            available = endpoints.iter().collect();
        }
        if available.iter().any(|e| !tried.contains(&e.addr)) {
            available.retain(|e| !tried.contains(&e.addr));
        }
        for e in &available {
            self.loads.entry(e.addr).or_insert_with(|| Load::new(now));
        }
        let loads: Vec<&Load> = available.iter().map(|e| &self.loads[&e.addr]).collect();
        let index = match kind {
            LoadBalancer::P2cEwma => p2c(&loads, now, r1, r2),
            LoadBalancer::LeastRequest => least_request(&loads, self.cursor % loads.len().max(1)),
            LoadBalancer::RoundRobin => (!loads.is_empty()).then(|| self.cursor % loads.len()),
        }?;
        self.cursor = self.cursor.wrapping_add(1);
        let chosen = *available[index];
        if let Some(load) = self.loads.get_mut(&chosen.addr) {
            load.pending += 1;
        }
        Some(chosen)
    }

    /// A try on `addr` ended after `rtt`: `Some(failed)` with its outcome, `None` when it was abandoned (a timeout or
    /// a cancelled request: its latency still counts, its outcome does not). Outlier detection judges outcomes when
    /// configured.
    pub fn done(
        &mut self,
        addr: SocketAddr,
        rtt: Duration,
        failed: Option<bool>,
        outlier: Option<&outlier::Config>,
        now: Instant,
    ) -> Option<outlier::Event> {
        let total = self.seen.as_ref().map_or(1, |s| s.len());
        if let Some(load) = self.loads.get_mut(&addr) {
            load.pending = load.pending.saturating_sub(1);
            load.observe(if failed == Some(true) { rtt.max(FAILURE_PENALTY) } else { rtt }, now);
        }
        self.outlier.record(outlier?, addr, failed?, total, now)
    }

    /// Per-endpoint state for the admin port's `/endpoints`.
    pub fn state(&self, now: Instant) -> Vec<EndpointState> {
        let health: FastMap<SocketAddr, (outlier::EndpointHealth, Option<Duration>)> =
            self.outlier.snapshot(now).into_iter().map(|(a, h, left)| (a, (h, left))).collect();
        let mut v: Vec<EndpointState> = self
            .seen
            .iter()
            .flat_map(|s| s.iter())
            .map(|e| {
                let load = self.loads.get(&e.addr);
                let (health, left) = health.get(&e.addr).cloned().unwrap_or_default();
                EndpointState {
                    address: e.addr,
                    latency_ms: load.map(|l| l.latency().as_secs_f64() * 1000.0),
                    pending: load.map_or(0, |l| l.pending),
                    ejected_for_ms: left.filter(|d| !d.is_zero()).map(|d| d.as_millis() as u64),
                    health,
                }
            })
            .collect();
        v.sort_by_key(|e| e.address);
        v
    }
}

/// What `/endpoints` shows of one endpoint.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointState {
    pub address: SocketAddr,
    /// Peak-EWMA latency (none before the first request).
    pub latency_ms: Option<f64>,
    pub pending: u32,
    /// Ejected by outlier detection for this much longer.
    pub ejected_for_ms: Option<u64>,
    #[serde(flatten)]
    pub health: outlier::EndpointHealth,
}

/// The balancer state of every Service port this proxy has sent to, keyed by (`name.namespace`, port).
#[derive(Default)]
pub struct Balancers {
    map: Mutex<FastMap<GroupKey, Arc<Mutex<Group>>>>,
}

/// A destination Service (`name.namespace`) and port.
type GroupKey = (Arc<str>, u16);

impl Balancers {
    pub fn group(&self, service: &Arc<str>, port: u16) -> Arc<Mutex<Group>> {
        self.map.lock().expect("balancer lock").entry((service.clone(), port)).or_default().clone()
    }

    /// The state of the group of (`service`, `port`), if it has taken traffic.
    pub fn state(&self, service: &str, port: u16) -> Option<Vec<EndpointState>> {
        let group = self.map.lock().expect("balancer lock").get(&(Arc::from(service), port)).cloned()?;
        let state = group.lock().expect("balancer lock").state(Instant::now());
        Some(state)
    }
}

// ===== layer =====

/// Where a try goes: set by the balancer on each request it passes down, read by the upstream service.
#[derive(Debug, Clone, Copy)]
pub struct Picked(pub Endpoint);

/// What the balancer chooses among for one request.
#[derive(Clone)]
pub struct Choice {
    pub service: Arc<str>,
    pub port: u16,
    pub endpoints: Arc<[Endpoint]>,
    pub kind: LoadBalancer,
    pub outlier: Option<Arc<outlier::Config>>,
}

/// What one request's tries went to so far, shared by its tries.
#[derive(Debug, Default)]
pub struct Tries {
    /// The endpoints, in order (a retry prefers an endpoint not tried yet); the last is the last try's (for the
    /// access log).
    pub endpoints: Vec<SocketAddr>,
    /// The route backend the last try picked (the `backend` metric label), when routes split the request.
    pub backend: Option<Arc<str>>,
}

/// A request's [`Tries`].
pub type Tried = Arc<Mutex<Tries>>;

/// Chooses each try's endpoint (`Config`: what to choose among, and the request's tries so far; a destination of one
/// fixed endpoint has nothing to choose and passes through).
pub struct Balance {
    balancers: Arc<Balancers>,
    metrics: Arc<Metrics>,
}

impl Balance {
    pub fn new(balancers: Arc<Balancers>, metrics: Arc<Metrics>) -> Self {
        Balance { balancers, metrics }
    }
}

impl Mechanism for Balance {
    type Config = (Choice, Tried);

    fn call<S>(&self, (choice, tried): Self::Config, inner: &mut S, mut req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let attempt = self.balancers.start(&choice, &mut tried.lock().expect("tried lock").endpoints);
        let (endpoint, attempt) = match attempt {
            Ok(a) => a,
            Err(e) => return super::refuse(e),
        };
        req.extensions_mut().insert(Picked(endpoint));
        let fut = inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = fut.await;
            attempt.finish(crate::errors::is_failure(&result), &metrics);
            result
        })
    }
}

impl Balancers {
    /// Starts one try (or one opaque connection) to an endpoint of `choice` not in `tried` where possible, and adds
    /// it to `tried`.
    pub fn start(&self, choice: &Choice, tried: &mut Vec<SocketAddr>) -> Result<(Endpoint, Attempt), ProxyError> {
        let group = self.group(&choice.service, choice.port);
        let now = Instant::now();
        let random = (crate::util::random_fraction(), crate::util::random_fraction());
        let picked = group.lock().expect("balancer lock").pick(&choice.endpoints, choice.kind, tried, now, random);
        let endpoint = picked
            .ok_or_else(|| ProxyError::NoHealthyEndpoints(format!("service {} has no endpoints", choice.service)))?;
        tried.push(endpoint.addr);
        let flight = InFlight {
            group,
            addr: endpoint.addr,
            started: now,
            service: choice.service.clone(),
            outlier: choice.outlier.clone(),
        };
        Ok((endpoint, Attempt(Some(flight))))
    }
}

struct InFlight {
    group: Arc<Mutex<Group>>,
    addr: SocketAddr,
    started: Instant,
    service: Arc<str>,
    outlier: Option<Arc<outlier::Config>>,
}

impl InFlight {
    fn done(&self, failed: Option<bool>) -> Option<outlier::Event> {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started);
        self.group.lock().expect("balancer lock").done(self.addr, rtt, failed, self.outlier.as_deref(), now)
    }
}

/// A try in flight: its endpoint leaves the in-flight count however it ends. Dropped before `finish` (a per-try or
/// request timeout, a cancelled request), its time counts as latency and its outcome is not judged.
pub struct Attempt(Option<InFlight>);

impl Attempt {
    /// The try ended: its outcome is judged (outlier detection) and its time observed.
    pub fn finish(mut self, failed: bool, metrics: &Metrics) {
        if let Some(f) = self.0.take()
            && let Some(event) = f.done(Some(failed))
        {
            observe(metrics, &f.service, f.addr, event);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f.done(None);
        }
    }
}

fn observe(metrics: &Metrics, service: &str, endpoint: SocketAddr, event: outlier::Event) {
    match event {
        outlier::Event::Ejected { for_ } => {
            metrics.outlier_ejections.with_label_values(&[service, "ejected"]).inc();
            tracing::warn!(service, %endpoint, seconds = for_.as_secs_f64(), "outlier detection ejected an endpoint");
        }
        outlier::Event::EjectionSkipped => {
            metrics.outlier_ejections.with_label_values(&[service, "skipped"]).inc();
            tracing::warn!(service, %endpoint, "endpoint failing, but the maximum share of endpoints is already ejected");
        }
        outlier::Event::Recovered => {
            metrics.outlier_ejections.with_label_values(&[service, "recovered"]).inc();
            tracing::info!(service, %endpoint, "ejected endpoint recovered");
        }
    }
}

#[cfg(test)]
mod tests;
