//! Endpoint choice per try, innermost in the outbound stack: power of two choices over peak-EWMA latency (the
//! default, as in Linkerd and Finagle), round robin, or least request, over the endpoints outlier detection has not
//! ejected, preferring endpoints this request has not tried yet (a retry goes elsewhere). Peak-EWMA jumps to a slower
//! observation at once and decays towards faster ones, so an endpoint that turns slow loses traffic immediately and
//! wins it back gradually; the cost also counts requests in flight, and a failure counts as a slow answer. The choice
//! is pure (time and randomness passed in); the state per Service port outlives config swaps (`Balancers`).

use std::collections::HashMap;
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
    loads: HashMap<SocketAddr, Load>,
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
        let health: HashMap<SocketAddr, (outlier::EndpointHealth, Option<Duration>)> =
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
    map: Mutex<HashMap<GroupKey, Arc<Mutex<Group>>>>,
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

/// The endpoints of one request's tries so far, in order, shared by its tries (so that a retry prefers an endpoint
/// not tried yet); its last entry is the endpoint of the last try (for the access log).
pub type Tried = Arc<Mutex<Vec<SocketAddr>>>;

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
        let attempt = self.balancers.start(&choice, &mut tried.lock().expect("tried lock"));
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
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peak_ewma() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Load::new(t0);
        assert_eq!(l.latency(), DEFAULT_RTT);
        l.observe(ms(100), t0);
        assert_eq!(l.latency(), ms(100), "a slower sample is taken at once");
        // A faster sample right away barely moves it; after one decay period it has moved by 1 - 1/e.
        l.observe(ms(1), t0);
        assert_eq!(l.latency(), ms(100));
        l.observe(ms(1), t0 + DECAY);
        let expected = 100.0 / std::f64::consts::E + 1.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((l.latency().as_secs_f64() * 1000.0 - expected).abs() < 0.01, "{:?}", l.latency());
        // Requests in flight multiply the cost.
        let mut busy = Load::new(t0);
        busy.pending = 3;
        assert_eq!(busy.cost(t0), Load::new(t0).cost(t0) * 4.0);
        // Left alone, an estimate decays towards zero: after one decay period, by 1/e.
        let mut stale = Load::new(t0);
        stale.observe(Duration::from_secs(1), t0);
        let decayed = stale.cost(t0 + DECAY) / stale.cost(t0);
        assert!((decayed - 1.0 / std::f64::consts::E).abs() < 1e-9, "{decayed}");
    }

    #[tokio::test(start_paused = true)]
    async fn two_choices_avoid_the_slow_endpoint() {
        let t0 = Instant::now();
        let mut fast = Load::new(t0);
        fast.observe(Duration::from_millis(5), t0);
        let mut slow = Load::new(t0);
        slow.observe(Duration::from_millis(50), t0);
        let loads = [&fast, &fast, &slow, &fast];
        // Every pair of distinct picks, from a grid of random numbers.
        let grid: Vec<f64> = (0..40).map(|i| i as f64 / 40.0).collect();
        let mut picks = [0usize; 4];
        for &r1 in &grid {
            for &r2 in &grid {
                picks[p2c(&loads, t0, r1, r2).unwrap()] += 1;
            }
        }
        assert_eq!(picks[2], 0, "the 10x slower endpoint loses every comparison: {picks:?}");
        assert!(picks.iter().filter(|&&p| p > 0).count() == 3, "{picks:?}");
        // With only the slow one available it is still used; with none, nothing.
        assert_eq!(p2c(&[&slow], t0, 0.7, 0.2), Some(0));
        assert_eq!(p2c(&[], t0, 0.5, 0.5), None);
        // Two picks always differ: with two endpoints, whichever is cheaper wins for every draw.
        for &r in &grid {
            assert_eq!(p2c(&[&slow, &fast], t0, r, 1.0 - r), Some(1));
        }
    }

    /// tests/resilience.rs' scenario on simulated time: paced requests (100/s) through `Group` to three endpoints,
    /// every one measured once first. Equal endpoints share the load; one made 10x slower gets little of it.
    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_shares_under_paced_load() {
        let endpoints: Arc<[Endpoint]> =
            (1..=3).map(|i| Endpoint { addr: SocketAddr::from(([127, 0, 0, 1], 8000 + i)), meshed: false }).collect();
        let mut group = Group::default();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut draw = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        // Warm-up: a try prefers endpoints not tried yet, so three tries measure all three.
        let mut tried = Vec::new();
        for _ in 0..3 {
            let e = group.pick(&endpoints, LoadBalancer::P2cEwma, &tried, Instant::now(), (draw(), draw())).unwrap();
            group.done(e.addr, Duration::from_millis(2), Some(false), None, Instant::now());
            tried.push(e.addr);
        }
        // Each try takes its endpoint's latency, give or take 0.5 ms; one request every 10 ms.
        let mut run = async |group: &mut Group, latency_ms: [f64; 3], requests: usize, tried: &mut Vec<SocketAddr>| {
            let mut split = [0usize; 3];
            for _ in 0..requests {
                let now = Instant::now();
                let e = group.pick(&endpoints, LoadBalancer::P2cEwma, tried, now, (draw(), draw())).unwrap();
                let i = endpoints.iter().position(|x| x.addr == e.addr).unwrap();
                split[i] += 1;
                let rtt = Duration::from_secs_f64((latency_ms[i] + draw() - 0.5) / 1000.0);
                tokio::time::advance(rtt).await;
                group.done(e.addr, rtt, Some(false), None, Instant::now());
                tokio::time::advance(Duration::from_millis(10).saturating_sub(rtt)).await;
                tried.clear();
            }
            split
        };
        let even = run(&mut group, [2.0, 2.0, 2.0], 1_000, &mut tried).await;
        assert!(even.iter().all(|&n| n >= 100), "every endpoint takes a share: {even:?}");
        let split = run(&mut group, [2.0, 20.0, 2.0], 10_000, &mut tried).await;
        assert!(split[1] < 1_000, "the 10x slower endpoint gets under 10 %: {split:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_spreads_ties() {
        let t0 = Instant::now();
        let mut a = Load::new(t0);
        let mut b = Load::new(t0);
        let c = Load::new(t0);
        a.pending = 2;
        b.pending = 1;
        assert_eq!(least_request(&[&a, &b, &c], 0), Some(2));
        b.pending = 0;
        assert_eq!(least_request(&[&a, &b, &c], 0), Some(1));
        assert_eq!(least_request(&[&a, &b, &c], 2), Some(2), "ties go to the first after `start`");
        assert_eq!(least_request(&[], 0), None);
    }

    fn endpoints(n: u8) -> Arc<[Endpoint]> {
        (1..=n).map(|i| Endpoint { addr: SocketAddr::from(([10, 0, 0, i], 80)), meshed: true }).collect()
    }

    fn outlier_config() -> outlier::Config {
        outlier::Config {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50.0,
            max_ejection: Duration::from_secs(300),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn group_prefers_untried_and_skips_ejected() {
        let now = Instant::now();
        let list = endpoints(3);
        let mut g = Group::default();
        // (kind, tried, expected pick) with the round-robin cursor advancing one per pick.
        let rr = LoadBalancer::RoundRobin;
        let first = g.pick(&list, rr, &[], now, (0.0, 0.0)).unwrap();
        assert_eq!(first, list[0]);
        let second = g.pick(&list, rr, &[list[1].addr], now, (0.0, 0.0)).unwrap();
        assert_eq!(second, list[2], "a retry goes to an endpoint not tried: cursor 1 among [0, 2]");
        let all_tried: Vec<_> = list.iter().map(|e| e.addr).collect();
        assert!(g.pick(&list, rr, &all_tried, now, (0.0, 0.0)).is_some(), "all tried: any endpoint again");
        // Three picks are in flight on endpoints 0, 2 and one more.
        let pending: u32 = g.state(now).iter().map(|e| e.pending).sum();
        assert_eq!(pending, 3);
        for e in [first, second] {
            assert_eq!(g.done(e.addr, Duration::from_millis(5), Some(false), None, now), None);
        }
        // Outlier detection: two failures in a row eject endpoint 0; it is not picked until its time is up.
        let c = outlier_config();
        for _ in 0..2 {
            g.pick(&list, rr, &[], now, (0.0, 0.0));
        }
        assert_eq!(g.done(list[0].addr, Duration::ZERO, Some(true), Some(&c), now), None);
        let ejected = g.done(list[0].addr, Duration::ZERO, Some(true), Some(&c), now);
        assert_eq!(ejected, Some(outlier::Event::Ejected { for_: Duration::from_secs(10) }));
        for _ in 0..6 {
            assert_ne!(g.pick(&list, rr, &[], now, (0.0, 0.0)).unwrap(), list[0]);
        }
        let state = g.state(now);
        assert_eq!(state[0].ejected_for_ms, Some(10_000));
        assert_eq!(state[0].health.ejections, 1);
        // Abandoned tries (None) count their time but are not judged.
        assert_eq!(g.done(list[1].addr, Duration::from_secs(60), None, Some(&c), now), None);
        assert_eq!(g.done(list[1].addr, Duration::from_secs(60), None, Some(&c), now), None);
        // Readmitted after its ejection.
        let later = now + Duration::from_secs(10);
        let picks: Vec<_> = (0..3).map(|_| g.pick(&list, rr, &[], later, (0.0, 0.0)).unwrap()).collect();
        assert!(picks.contains(&list[0]), "{picks:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn group_panic_routing_and_endpoint_changes() {
        let now = Instant::now();
        let one = endpoints(1);
        let mut g = Group::default();
        let mut c = outlier_config();
        c.consecutive_failures = 1;
        g.pick(&one, LoadBalancer::P2cEwma, &[], now, (0.5, 0.5));
        assert!(matches!(
            g.done(one[0].addr, Duration::ZERO, Some(true), Some(&c), now),
            Some(outlier::Event::Ejected { .. })
        ));
        // Its only endpoint ejected, the Service is still served by it (never a black hole).
        assert_eq!(g.pick(&one, LoadBalancer::P2cEwma, &[], now, (0.5, 0.5)), Some(one[0]));
        // A failure counts as a slow answer: the failing endpoint loses the comparison.
        let two = endpoints(2);
        let mut g = Group::default();
        for e in two.iter() {
            g.pick(&two, LoadBalancer::LeastRequest, &[], now, (0.0, 0.0));
            g.done(e.addr, Duration::from_millis(20), Some(e.addr == two[0].addr), None, now);
        }
        for r in [0.1, 0.4, 0.6, 0.9] {
            let e = g.pick(&two, LoadBalancer::P2cEwma, &[], now, (r, 1.0 - r)).unwrap();
            assert_eq!(e, two[1]);
            g.done(e.addr, Duration::from_millis(20), Some(false), None, now);
        }
        // A new endpoint list drops the state of endpoints that left; no endpoints at all: no pick.
        let fewer: Arc<[Endpoint]> = two[1..].into();
        g.pick(&fewer, LoadBalancer::P2cEwma, &[], now, (0.5, 0.5));
        assert_eq!(g.state(now).len(), 1);
        let none: Arc<[Endpoint]> = Arc::new([]);
        assert_eq!(g.pick(&none, LoadBalancer::RoundRobin, &[], now, (0.5, 0.5)), None);
    }
}
