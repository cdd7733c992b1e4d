//! Outlier detection per endpoint (pure: time is passed in; the load balancer consults it): an endpoint that fails
//! `consecutive5xx` times in a row (5xx or gateway errors, connect failures) is ejected for `baseEjectionTime` ×
//! the number of times it has been ejected, never more than `maxEjectionPercent` of a Service's endpoints at once;
//! when its time is up it is readmitted on probation: one more failure ejects it again (for longer), a success clears
//! its record. Config: TrafficPolicy.outlierDetection; per-endpoint state is shown on the admin port, not as metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ferry_api::policy::OutlierDetection;
use serde::Serialize;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: f64,
    /// Ejection times stop growing here.
    pub max_ejection: Duration,
}

impl Config {
    pub fn from_policy(p: &OutlierDetection) -> Config {
        let base = p.base_ejection_time.as_std();
        Config {
            consecutive_failures: p.consecutive_5xx.max(1),
            base_ejection: base,
            max_ejection_percent: p.max_ejection_percent,
            max_ejection: (base * 10).max(Duration::from_secs(300)),
        }
    }
}

/// One endpoint's record.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHealth {
    pub consecutive_failures: u32,
    /// How many times it has been ejected (the next ejection lasts that many + 1 base times).
    pub ejections: u32,
    #[serde(skip)]
    pub ejected_until: Option<Instant>,
    /// Readmitted after an ejection and not yet proven healthy.
    pub probation: bool,
}

/// What a recorded outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Ejected {
        for_: Duration,
    },
    /// It would have been ejected, but `maxEjectionPercent` of the endpoints already are.
    EjectionSkipped,
    Recovered,
}

/// The endpoints of one Service.
#[derive(Debug, Default)]
pub struct Detector {
    endpoints: HashMap<SocketAddr, EndpointHealth>,
}

impl Detector {
    fn ejected_count(&self, now: Instant) -> usize {
        self.endpoints.values().filter(|e| e.ejected_until.is_some_and(|t| t > now)).count()
    }

    /// Whether `endpoint` may take requests at `now` (an ejection that has run out readmits it on probation).
    pub fn available(&mut self, endpoint: SocketAddr, now: Instant) -> bool {
        let Some(e) = self.endpoints.get_mut(&endpoint) else { return true };
        match e.ejected_until {
            Some(t) if t > now => false,
            Some(_) => {
                e.ejected_until = None;
                e.probation = true;
                true
            }
            None => true,
        }
    }

    /// Records a request's outcome on `endpoint` among `total` endpoints of the Service.
    pub fn record(
        &mut self,
        config: &Config,
        endpoint: SocketAddr,
        failed: bool,
        total: usize,
        now: Instant,
    ) -> Option<Event> {
        let ejected = self.ejected_count(now);
        let e = self.endpoints.entry(endpoint).or_default();
        if !failed {
            e.consecutive_failures = 0;
            if e.probation {
                e.probation = false;
                e.ejections = 0;
                return Some(Event::Recovered);
            }
            return None;
        }
        e.consecutive_failures += 1;
        if e.ejected_until.is_some_and(|t| t > now) {
            return None;
        }
        if !(e.probation || e.consecutive_failures >= config.consecutive_failures) {
            return None;
        }
        // Never more than the allowed share of the endpoints out at once (at least one may always go).
        let allowed = ((total as f64) * config.max_ejection_percent / 100.0).floor().max(1.0) as usize;
        if ejected >= allowed {
            return Some(Event::EjectionSkipped);
        }
        e.ejections += 1;
        let for_ = (config.base_ejection * e.ejections).min(config.max_ejection);
        e.ejected_until = Some(now + for_);
        e.consecutive_failures = 0;
        e.probation = false;
        Some(Event::Ejected { for_ })
    }

    /// Forgets endpoints the Service no longer has.
    pub fn retain(&mut self, endpoints: &[SocketAddr]) {
        self.endpoints.retain(|a, _| endpoints.contains(a));
    }

    /// Per-endpoint state, for the admin port's `/endpoints`.
    pub fn snapshot(&self, now: Instant) -> Vec<(SocketAddr, EndpointHealth, Option<Duration>)> {
        let mut v: Vec<_> = self
            .endpoints
            .iter()
            .map(|(a, e)| (*a, e.clone(), e.ejected_until.map(|t| t.saturating_duration_since(now))))
            .collect();
        v.sort_by_key(|(a, _, _)| *a);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50.0,
            max_ejection: Duration::from_secs(300),
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_backoff_and_probation() {
        let c = config();
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut d = Detector::default();
        let a = addr(1);
        assert_eq!(d.record(&c, a, true, 4, s(0)), None);
        assert_eq!(d.record(&c, a, false, 4, s(0)), None, "a success resets the run");
        assert_eq!(d.record(&c, a, true, 4, s(0)), None);
        assert_eq!(d.record(&c, a, true, 4, s(0)), None);
        assert_eq!(d.record(&c, a, true, 4, s(0)), Some(Event::Ejected { for_: Duration::from_secs(10) }));
        assert!(!d.available(a, s(9)));
        assert!(d.available(a, s(10)), "readmitted when the ejection runs out");
        // On probation one failure is enough, and the second ejection lasts twice as long.
        assert_eq!(d.record(&c, a, true, 4, s(10)), Some(Event::Ejected { for_: Duration::from_secs(20) }));
        assert!(!d.available(a, s(29)));
        assert!(d.available(a, s(30)));
        assert_eq!(d.record(&c, a, false, 4, s(30)), Some(Event::Recovered), "a success clears the record");
        assert_eq!(d.record(&c, a, true, 4, s(31)), None, "not on probation any more: 3 in a row again");
        assert_eq!(d.record(&c, a, true, 4, s(31)), None);
        assert_eq!(d.record(&c, a, true, 4, s(31)), Some(Event::Ejected { for_: Duration::from_secs(10) }));
        // Ejection times are capped.
        let mut capped = config();
        capped.max_ejection = Duration::from_secs(25);
        let mut d = Detector::default();
        for round in 0..4u64 {
            let at = s(round * 100);
            assert!(d.available(a, at));
            for _ in 0..3 {
                d.record(&capped, a, true, 4, at);
            }
        }
        assert_eq!(d.snapshot(s(300))[0].1.ejections, 4);
        assert_eq!(d.snapshot(s(300))[0].2, Some(Duration::from_secs(25)));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_allowed_share() {
        let c = config();
        let now = Instant::now();
        let mut d = Detector::default();
        let fail3 = |d: &mut Detector, a| {
            let mut last = None;
            for _ in 0..3 {
                last = d.record(&c, a, true, 4, now);
            }
            last
        };
        assert!(matches!(fail3(&mut d, addr(1)), Some(Event::Ejected { .. })));
        assert!(matches!(fail3(&mut d, addr(2)), Some(Event::Ejected { .. })));
        assert_eq!(fail3(&mut d, addr(3)), Some(Event::EjectionSkipped), "50 % of 4 = 2 already out");
        assert!(d.available(addr(3), now));
        // With a single endpoint, it may still be ejected (the load balancer then answers no-healthy-endpoints).
        let mut d = Detector::default();
        let mut last = None;
        for _ in 0..3 {
            last = d.record(&c, addr(9), true, 1, now);
        }
        assert!(matches!(last, Some(Event::Ejected { .. })));
        d.retain(&[]);
        assert!(d.snapshot(now).is_empty());
    }
}
