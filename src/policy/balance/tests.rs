//! Tests of `balance`.

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
