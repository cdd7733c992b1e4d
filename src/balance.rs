//! Endpoint choice (pure: time and randomness are passed in; the load balancer layer comes with the outbound stack):
//! power of two choices over peak-EWMA latency (the default, as in Linkerd and Finagle), round robin, or least
//! request. Peak-EWMA jumps to a slower observation at once and decays towards faster ones, so an endpoint that turns
//! slow loses traffic immediately and wins it back gradually; the cost also counts requests in flight.

use std::time::Duration;

use tokio::time::Instant;

/// How fast old latency is forgotten.
pub const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed of an endpoint never measured (optimistic, so that new endpoints get tried).
pub const DEFAULT_RTT: Duration = Duration::from_millis(10);

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

    /// The cost of sending one more request here.
    pub fn cost(&self) -> f64 {
        self.ewma_ns * f64::from(self.pending + 1)
    }

    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns as u64)
    }
}

/// Pure: power of two choices among `loads` (the available endpoints) with two random numbers in [0, 1): the
/// cheaper of two distinct endpoints. `None` when there is none.
pub fn p2c(loads: &[&Load], r1: f64, r2: f64) -> Option<usize> {
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
            Some(if loads[b].cost() < loads[a].cost() { b } else { a })
        }
    }
}

/// Pure: the endpoint with the fewest requests in flight (the first of equals after `start`, to spread ties).
pub fn least_request(loads: &[&Load], start: usize) -> Option<usize> {
    let n = loads.len();
    (0..n).map(|i| (start + i) % n).min_by_key(|&i| loads[i].pending)
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
        assert_eq!(busy.cost(), Load::new(t0).cost() * 4.0);
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
                picks[p2c(&loads, r1, r2).unwrap()] += 1;
            }
        }
        assert_eq!(picks[2], 0, "the 10x slower endpoint loses every comparison: {picks:?}");
        assert!(picks.iter().filter(|&&p| p > 0).count() == 3, "{picks:?}");
        // With only the slow one available it is still used; with none, nothing.
        assert_eq!(p2c(&[&slow], 0.7, 0.2), Some(0));
        assert_eq!(p2c(&[], 0.5, 0.5), None);
        // Two picks always differ: with two endpoints, whichever is cheaper wins for every draw.
        for &r in &grid {
            assert_eq!(p2c(&[&slow, &fast], r, 1.0 - r), Some(1));
        }
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
}
