//! Resilience policies with real `ferry` processes and real backends (loopback only, paced at <= 100 req/s, every
//! loop bounded): timeouts on a hanging backend, on one that stalls mid-body and for a gRPC caller's deadline; the
//! breaker; request caps; retries on a seeded 20 % failing backend and budgets on a dead one; outlier ejection of a
//! killed endpoint and its readmission; P2C-EWMA against a slow endpoint; policy changes under load.

use ferry_test_support::{self as support, control, mesh};

use std::time::Duration;
use support::backend;

use support::{Ferry, http_exchange_full};

fn config(backend: std::net::SocketAddr, timeout: &str) -> String {
    format!(
        "{}apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{targetRef: {{kind: Service, name: api}}, timeout: {timeout}}}\n",
        support::service_yaml("api", 80, &[backend])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_covers_slow_headers_and_a_stalled_body() {
    let app = backend::http_backend().await;
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config(app.addr, "500ms")), &[]));
    let get = |path: &str| http_exchange_full(ferry.outbound, "GET", path, &[("Host", "api")], "").expect("an answer");
    // In time: untouched.
    let ok = tokio::task::block_in_place(|| get("/delay?ms=10"));
    assert_eq!((ok.status, ok.body.as_str()), (200, "delayed"), "{ok:?}");
    // A backend that does not answer in time: 504 request-timeout.
    let hung = tokio::task::block_in_place(|| get("/delay?ms=3000"));
    assert_eq!((hung.status, hung.header("ferry-proxy-error")), (504, Some("request-timeout")), "{hung:?}");
    // A body that stalls past the deadline is cut: the first chunk arrived, the end never does.
    let stalled = tokio::task::block_in_place(|| get("/stall?ms=3000"));
    assert_eq!(stalled.status, 200, "{stalled:?}");
    assert!(stalled.body.contains("start") && !stalled.body.contains("end"), "{stalled:?}");
    assert_eq!(
        ferry.metric(r#"ferry_proxy_errors_total{direction="outbound",reason="request-timeout"}"#),
        1.0,
        "the stalled body is not a proxy-made response"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_callers_deadline_is_honoured_and_answered_with_deadline_exceeded() {
    let app = backend::http_backend().await;
    // The policy allows 5 s; the caller asks for 200 ms.
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config(app.addr, "5s")), &[]));
    let tcp = tokio::net::TcpStream::connect(ferry.outbound).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://api/delay?ms=3000")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "200m")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "gRPC errors are Trailers-Only");
    assert_eq!(resp.headers().get("grpc-status").map(|v| v.to_str().unwrap()), Some("4"), "{resp:?}");
    assert_eq!(resp.headers().get("ferry-proxy-error").map(|v| v.to_str().unwrap()), Some("request-timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_fails_fast_half_opens_and_closes() {
    let app = backend::http_backend().await;
    let config = format!(
        "{}apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{targetRef: {{kind: Service, name: api}}, circuitBreaker: {{consecutiveFailures: 3, openFor: 1s, halfOpenRequests: 1}}}}\n",
        support::service_yaml("api", 80, &[app.addr])
    );
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    let get = |path: &str| {
        tokio::task::block_in_place(|| {
            http_exchange_full(ferry.outbound, "GET", path, &[("Host", "api")], "").expect("an answer")
        })
    };
    let reached = || app.requests.load(std::sync::atomic::Ordering::SeqCst);
    let series = |to: &str| format!(r#"ferry_circuit_breaker_transitions_total{{service="api.default",to="{to}"}}"#);
    // Three failures in a row open it.
    for _ in 0..3 {
        assert_eq!(get("/status?code=500").status, 500, "the app's own 500s pass through");
    }
    assert_eq!(ferry.metric(&series("open")), 1.0);
    assert_eq!(ferry.metric(r#"ferry_circuit_breaker_state{service="api.default"}"#), 1.0);
    // Open: immediate 503 circuit-open, and the backend's own counter proves no attempt reached it.
    let before = reached();
    for _ in 0..5 {
        let r = get("/");
        assert_eq!((r.status, r.header("ferry-proxy-error")), (503, Some("circuit-open")), "{r:?}");
    }
    assert_eq!(reached(), before, "no attempt while open");
    // After openFor one probe goes through; it fails, so the breaker opens again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get("/status?code=500").status, 500);
    assert_eq!(get("/").status, 503, "open again after a failed probe");
    assert_eq!(ferry.metric(&series("half-open")), 1.0);
    assert_eq!(ferry.metric(&series("open")), 2.0);
    // The next probe succeeds: closed, and traffic flows.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get("/").status, 200);
    assert_eq!(get("/").status, 200);
    assert_eq!(ferry.metric(&series("closed")), 1.0);
    assert_eq!(ferry.metric(r#"ferry_circuit_breaker_state{service="api.default"}"#), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_caps_are_refused_without_an_attempt() {
    let app = backend::http_backend().await;
    let config = format!(
        "{}apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{targetRef: {{kind: Service, name: api}}, circuitBreaker: {{maxRequests: 2, maxPendingRequests: 1}}}}\n",
        support::service_yaml("api", 80, &[app.addr])
    );
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    let outbound = ferry.outbound;
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    // Five at once against a backend that takes a second: two run, one waits for a slot, two are refused at once.
    let threads: Vec<_> = (0..5)
        .map(|_| {
            std::thread::spawn(move || {
                http_exchange_full(outbound, "GET", "/delay?ms=1000", &[("Host", "api")], "").expect("an answer")
            })
        })
        .collect();
    let answers: Vec<_> = tokio::task::block_in_place(|| threads.into_iter().map(|t| t.join().unwrap()).collect());
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let overloaded =
        answers.iter().filter(|r| (r.status, r.header("ferry-proxy-error")) == (503, Some("overloaded"))).count();
    assert_eq!((ok, overloaded), (3, 2), "{answers:?}");
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst) - before, 3, "no attempt for the refused ones");
    assert_eq!(ferry.metric(r#"ferry_upstream_requests_limit{service="api.default"}"#), 2.0);
    assert_eq!(ferry.metric(r#"ferry_upstream_requests_active{service="api.default"}"#), 0.0);
}

fn retry_config(backend: std::net::SocketAddr, retries: &str) -> String {
    format!(
        "{}apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{targetRef: {{kind: Service, name: api}}, retries: {retries}}}\n",
        support::service_yaml("api", 80, &[backend])
    )
}

/// Sends up to `count` requests one after another, paced to at most `per_second`, each made by `each` (bounded by
/// the count and by `limit`; `each` returns false to stop early). Returns how many were sent.
fn paced(count: usize, per_second: u32, limit: Duration, mut each: impl FnMut(usize) -> bool) -> usize {
    let started = std::time::Instant::now();
    let interval = Duration::from_secs(1) / per_second;
    let mut sent = 0;
    while sent < count && started.elapsed() < limit {
        let due = started + interval * sent as u32;
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        sent += 1;
        if !each(sent - 1) {
            break;
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_a_flaky_backend_reliable_within_the_budget() {
    let app = backend::http_backend().await;
    // A seeded 20 % of answers fail; two retries on gateway errors, the default budget (20 % + 10/s).
    let config = retry_config(app.addr, "{attempts: 2, on: [gateway-error], backoff: {base: 1ms, max: 5ms}}");
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    let requests = 10_000;
    let mut ok = 0;
    let sent = tokio::task::block_in_place(|| {
        paced(requests, 100, Duration::from_secs(180), |_| {
            let r = http_exchange_full(ferry.outbound, "GET", "/flaky?percent=20&seed=7", &[("Host", "api")], "");
            ok += usize::from(r.is_some_and(|r| r.status == 200));
            true
        })
    });
    assert_eq!(sent, requests, "the load loop ran out of time");
    let attempts = app.requests.load(std::sync::atomic::Ordering::SeqCst) - before;
    eprintln!(
        "flaky 20 %: {ok}/{requests} succeeded ({:.2} %), {attempts} upstream attempts; the backend failed {} answers",
        100.0 * ok as f64 / requests as f64,
        attempts - ok
    );
    assert!(ok as f64 >= 0.99 * requests as f64, "{ok}/{requests}");
    let retried = ferry.metric(r#"ferry_retries_total{result="attempted",service="api.default"}"#);
    assert_eq!(retried as usize, attempts - requests, "every extra attempt is a counted retry");
    assert_eq!(ferry.metric(r#"ferry_retries_total{result="budget-denied",service="api.default"}"#), 0.0);
    // POST is not idempotent: its failures come back as they are.
    let app = backend::http_backend().await;
    let ferry = tokio::task::block_in_place(|| {
        Ferry::start(Some(&retry_config(app.addr, "{attempts: 2, on: [gateway-error]}")), &[])
    });
    let post_failures = tokio::task::block_in_place(|| {
        (0..50)
            .filter(|_| {
                http_exchange_full(ferry.outbound, "POST", "/flaky?every=5", &[("Host", "api")], "x")
                    .is_some_and(|r| r.status == 503)
            })
            .count()
    });
    assert_eq!(post_failures, 10, "every 5th POST fails, none retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_are_retried_for_idempotent_requests_only() {
    let app = backend::http_backend().await;
    let config = retry_config(app.addr, "{attempts: 2, on: [reset], backoff: {base: 1ms, max: 5ms}}");
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    // A seeded 20 % of the backend's answers are connections closed without a response. Requests go one after
    // another, so which tries meet a reset is known in advance: a GET fails only when all three of its tries do.
    let requests = 2_000;
    let (mut n, mut expected) = (0, 0);
    for _ in 0..requests {
        for _ in 0..3 {
            n += 1;
            if !backend::seeded_failure(11, n - 1, 20) {
                expected += 1;
                break;
            }
        }
    }
    let mut ok = 0;
    tokio::task::block_in_place(|| {
        paced(requests, 100, Duration::from_secs(60), |_| {
            let r =
                http_exchange_full(ferry.outbound, "GET", "/flaky?percent=20&seed=11&reset=1", &[("Host", "api")], "");
            match r {
                Some(r) if r.status == 200 => ok += 1,
                Some(r) => {
                    assert_eq!((r.status, r.header("ferry-proxy-error")), (502, Some("upstream-reset")), "{r:?}")
                }
                None => panic!("no answer"),
            }
            true
        })
    });
    eprintln!("resetting backend (20 %): {ok}/{requests} GETs succeeded, {expected} expected from the seeded pattern");
    assert_eq!(ok, expected);
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), n as usize, "every try reached the app");
    // A POST that meets a reset may have been processed: it is not retried.
    let app = backend::http_backend().await;
    let ferry =
        tokio::task::block_in_place(|| Ferry::start(Some(&retry_config(app.addr, "{attempts: 2, on: [reset]}")), &[]));
    let r = tokio::task::block_in_place(|| {
        http_exchange_full(ferry.outbound, "POST", "/reset", &[("Host", "api")], "x").expect("an answer")
    });
    assert_eq!((r.status, r.header("ferry-proxy-error")), (502, Some("upstream-reset")), "{r:?}");
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), 1, "one try only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_apply_live_without_failing_requests_in_flight() {
    let apps = [backend::http_backend().await, backend::http_backend().await, backend::http_backend().await];
    let ferry = tokio::task::block_in_place(|| {
        Ferry::start(Some(&support::service_yaml("api", 80, &[apps[0].addr, apps[1].addr])), &[])
    });
    // Slow requests in flight on the old endpoints while the endpoints change to the third backend only.
    let outbound = ferry.outbound;
    let slow: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                http_exchange_full(outbound, "GET", "/delay?ms=1500", &[("Host", "api")], "").map(|r| r.status)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    ferry.write_config(&support::service_yaml("api", 80, &[apps[2].addr]));
    let third = Some(apps[2].addr.port());
    tokio::task::block_in_place(|| {
        support::wait_until("the new endpoint takes the traffic", Duration::from_secs(10), || {
            call(&ferry, "/").0 == third
        })
    });
    let statuses: Vec<_> = tokio::task::block_in_place(|| slow.into_iter().map(|t| t.join().unwrap()).collect());
    assert!(statuses.iter().all(|s| *s == Some(200)), "requests in flight finish on their endpoint: {statuses:?}");
    let old = apps[0].requests.load(std::sync::atomic::Ordering::SeqCst)
        + apps[1].requests.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..20 {
        let (port, status) = tokio::task::block_in_place(|| call(&ferry, "/"));
        assert_eq!((port, status), (third, 200));
    }
    let now = apps[0].requests.load(std::sync::atomic::Ordering::SeqCst)
        + apps[1].requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(now, old, "nothing goes to the removed endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_stops_a_retry_storm_on_a_dead_backend() {
    let app = backend::http_backend().await;
    let config = retry_config(
        app.addr,
        "{attempts: 3, on: [\"503\"], backoff: {base: 1ms, max: 2ms}, budget: {percent: 20, minPerSecond: 1}}",
    );
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let requests = 10_000;
    let sent = tokio::task::block_in_place(|| {
        paced(requests, 100, Duration::from_secs(180), |_| {
            let r = http_exchange_full(ferry.outbound, "GET", "/status?code=503", &[("Host", "api")], "").unwrap();
            assert_eq!(r.status, 503);
            true
        })
    });
    assert_eq!(sent, requests, "the load loop ran out of time");
    let seconds = started.elapsed().as_secs_f64();
    let attempts = (app.requests.load(std::sync::atomic::Ordering::SeqCst) - before) as f64;
    // The issue's bound: attempts <= requests x (1 + budget) + floor x seconds.
    let bound = requests as f64 * 1.2 + 1.0 * seconds;
    eprintln!("dead backend: {requests} requests, {attempts} attempts in {seconds:.1} s (bound {bound:.0})");
    assert!(attempts <= bound, "{attempts} attempts > {bound}");
    assert!(ferry.metric(r#"ferry_retries_total{result="budget-denied",service="api.default"}"#) > 0.0);
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{targetRef: {{kind: Service, name: api}}, {spec}}}\n"
    )
}

/// Which backend (port) answered, and the status: `(None, 0)` when nothing answered.
fn call(ferry: &Ferry, path: &str) -> (Option<u16>, u16) {
    match http_exchange_full(ferry.outbound, "GET", path, &[("Host", "api")], "") {
        Some(r) => (r.header("x-backend").and_then(|p| p.parse().ok()), r.status),
        None => (None, 0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_ejected_and_readmitted_when_it_recovers() {
    let apps = [backend::http_backend().await, backend::http_backend().await, backend::http_backend().await];
    let addrs: Vec<_> = apps.iter().map(|a| a.addr).collect();
    // No retries, so that the errors before the ejection show; round robin, so that the killed endpoint keeps
    // getting its share until it is ejected (P2C would avoid it after its first failure).
    let config = format!(
        "{}{}",
        support::service_yaml("api", 80, &addrs),
        policy(
            "loadBalancer: round-robin, retries: {attempts: 0}, outlierDetection: {consecutive5xx: 3, baseEjectionTime: 5s, maxEjectionPercent: 50}"
        )
    );
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    let ejected = r#"ferry_outlier_ejections_total{event="ejected",service="api.default"}"#;
    let recovered = r#"ferry_outlier_ejections_total{event="recovered",service="api.default"}"#;
    let killed = addrs[2].port();
    // All three take traffic.
    let mut seen = std::collections::HashMap::new();
    tokio::task::block_in_place(|| {
        paced(300, 100, Duration::from_secs(30), |_| {
            let (port, status) = call(&ferry, "/");
            assert_eq!(status, 200);
            *seen.entry(port.unwrap()).or_insert(0) += 1;
            true
        })
    });
    assert_eq!(seen.len(), 3, "{seen:?}");
    // Killed mid-run: its failures until outlier detection ejects it, then only the healthy ones answer.
    apps[2].kill();
    let (mut errors, mut after) = (0, 0);
    tokio::task::block_in_place(|| {
        paced(1_000, 100, Duration::from_secs(30), |_| {
            if ferry.metric(ejected) == 0.0 {
                errors += usize::from(call(&ferry, "/").1 != 200);
                return true;
            }
            let (port, status) = call(&ferry, "/");
            assert_eq!(status, 200, "after the ejection every request succeeds");
            assert_ne!(port, Some(killed));
            after += 1;
            after < 200
        })
    });
    eprintln!("killed endpoint: {errors} failed requests before its ejection, then {after} of {after} ok");
    assert_eq!(ferry.metric(ejected), 1.0);
    assert!((1..=3).contains(&errors), "three consecutive failures eject it: {errors}");
    let (_, endpoints) = support::http_get(ferry.admin, "/endpoints").unwrap();
    let json: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    let state = json["services"][0]["ports"][0]["endpoints"].as_array().unwrap().clone();
    let dead = state.iter().find(|e| e["address"] == addrs[2].to_string()).expect("the killed endpoint is listed");
    assert_eq!(dead["ejections"], 1, "{dead}");
    assert!(dead["ejectedForMs"].as_u64().is_some_and(|ms| ms > 0 && ms <= 5_000), "{dead}");
    assert!(support::metric_value(&ferry.metrics(), ejected) == 1.0);
    // It comes back on its port; once the ejection runs out it is readmitted on probation, answers, and recovers.
    let listener = tokio::net::TcpListener::bind(addrs[2]).await.unwrap();
    let back = backend::http_backend_on(listener);
    tokio::task::block_in_place(|| {
        paced(1_000, 100, Duration::from_secs(30), |_| {
            assert_eq!(call(&ferry, "/").1, 200);
            back.requests.load(std::sync::atomic::Ordering::SeqCst) < 10
        })
    });
    assert!(back.requests.load(std::sync::atomic::Ordering::SeqCst) >= 10, "readmitted");
    assert_eq!(ferry.metric(recovered), 1.0);
    eprintln!("killed endpoint: /endpoints while ejected: {dead}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_defaults_a_dead_endpoint_costs_no_request() {
    let apps = [backend::http_backend().await, backend::http_backend().await];
    let addrs: Vec<_> = apps.iter().map(|a| a.addr).collect();
    // No TrafficPolicy: one retry (to another endpoint) when a connection fails or an idempotent request finds it
    // reset, and P2C avoids the failing one.
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&support::service_yaml("api", 80, &addrs)), &[]));
    apps[1].kill();
    let mut ok = 0;
    tokio::task::block_in_place(|| {
        paced(500, 100, Duration::from_secs(30), |_| {
            ok += usize::from(call(&ferry, "/").1 == 200);
            true
        });
    });
    let retried = ferry.metric(r#"ferry_retries_total{result="attempted",service="api.default"}"#);
    eprintln!("defaults, one of two endpoints dead: {ok}/500 ok, {retried} retries");
    assert_eq!(ok, 500);
    assert!(retried >= 1.0, "the dead endpoint was tried and the request retried elsewhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_most_load_away_from_a_slow_endpoint() {
    let apps = [backend::http_backend().await, backend::http_backend().await, backend::http_backend().await];
    let addrs: Vec<_> = apps.iter().map(|a| a.addr).collect();
    for app in &apps {
        app.delay_ms.store(2, std::sync::atomic::Ordering::SeqCst);
    }
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&support::service_yaml("api", 80, &addrs)), &[]));
    let count = |requests: usize| {
        let mut split = [0usize; 3];
        let sent = tokio::task::block_in_place(|| {
            paced(requests, 100, Duration::from_secs(150), |_| {
                let (port, status) = call(&ferry, "/");
                assert_eq!(status, 200);
                split[addrs.iter().position(|a| Some(a.port()) == port).unwrap()] += 1;
                true
            })
        });
        assert_eq!(sent, requests, "the load loop ran out of time");
        split
    };
    // Shares between equal endpoints depend on latency noise (peak-EWMA takes every peak at once), which a busy
    // machine adds: the shares themselves are asserted on simulated time in `policy::balance`'s unit tests. Here,
    // what load cannot change: a pair of endpoints never measured is drawn with probability 1/3 per request, so more
    // than one endpoint serves.
    let even = count(1_000);
    eprintln!("P2C-EWMA, three equal endpoints: {even:?}");
    assert!(even.iter().filter(|&&n| n > 0).count() >= 2, "the load is spread: {even:?}");
    // One endpoint becomes 10x slower: 18 ms more than the others on every answer, however busy the machine. P2C
    // sends a request there only when its cost is below the other pick's, so it gets less than a fair share (33 %).
    apps[1].delay_ms.store(20, std::sync::atomic::Ordering::SeqCst);
    let requests = 3_000;
    let split = count(requests);
    let slow_share = split[1] as f64 / requests as f64;
    eprintln!("P2C-EWMA, endpoint 2 made 10x slower: {split:?} ({:.2} % to the slow one)", slow_share * 100.0);
    assert!(slow_share < 1.0 / 3.0, "load goes elsewhere: {split:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_changes_under_load_without_a_failed_request() {
    let app = backend::http_backend().await;
    tokio::task::block_in_place(|| {
        let cp = control::ControlPlane::start(&control::state_dir("policies"));
        cp.ok(&["apply", "-f", "-"], Some(&mesh::service("api", "api.local", "")));
        let api = mesh::proxy(&cp, "api", Some(app.addr), &[]);
        let web = mesh::proxy(&cp, "web", None, &[]);
        support::wait_until("web routes api.local", Duration::from_secs(10), || {
            support::http_exchange(web.outbound, "GET", "/", &[("Host", "api.local")], "").map(|r| r.0) == Some(200)
        });
        let acks =
            |p: &Ferry, kind: &str| p.metric(&format!(r#"ferry_xds_updates_total{{result="ack",type="{kind}"}}"#));
        let load = support::Load::start(web.outbound, "api.local");
        // Each step sets one more policy (or changes one) on Service api; the caller's proxy enforces most, the
        // destination's the rate limit, the mTLS mode and the AuthorizationPolicy.
        let steps = [
            ("timeout", "10s"),
            (
                "retries",
                "{attempts: 2, perTryTimeout: 5s, on: [gateway-error, reset], backoff: {base: 5ms, max: 50ms}, budget: {percent: 30, minPerSecond: 5}}",
            ),
            (
                "circuitBreaker",
                "{failureRatio: 0.9, minRequests: 100, interval: 10s, consecutiveFailures: 100, openFor: 1s, halfOpenRequests: 2, maxConnections: 500, maxPendingRequests: 500, maxRequests: 500}",
            ),
            ("outlierDetection", "{consecutive5xx: 10, baseEjectionTime: 1s, maxEjectionPercent: 50}"),
            ("loadBalancer", "round-robin"),
            ("loadBalancer", "least-request"),
            ("rateLimit", "{requestsPerSecond: 100000, burst: 100000}"),
            ("rateLimit", "{requestsPerSecond: 100000, burst: 100000, perClientIdentity: true}"),
            ("mtls", "strict"),
            ("mtls", "permissive"),
            ("timeout", "20s"),
        ];
        let mut spec: Vec<(&str, &str)> = vec![("targetRef", "{kind: Service, name: api}")];
        for (key, value) in steps {
            match spec.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => spec.push((key, value)),
            }
            let fields: Vec<String> = spec.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let before = (acks(&web, "TrafficPolicy"), acks(&api, "TrafficPolicy"));
            let doc = format!(
                "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{{}}}\n",
                fields.join(", ")
            );
            cp.ok(&["apply", "-f", "-"], Some(&doc));
            support::wait_until(&format!("both proxies ACK {key}: {value}"), Duration::from_secs(10), || {
                acks(&web, "TrafficPolicy") > before.0 && acks(&api, "TrafficPolicy") > before.1
            });
            std::thread::sleep(Duration::from_millis(200));
        }
        // An AuthorizationPolicy that allows the caller, then none again; and the TrafficPolicy removed.
        let allow = "apiVersion: ferry.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: api}\nspec: {targetRef: {kind: Service, name: api}, defaultAction: deny, allow: [{from: {identities: [\"spiffe://cluster.local/ns/default/sa/web\"]}}]}\n";
        for args in
            [&["apply", "-f", "-"][..], &["delete", "AuthorizationPolicy", "api"], &["delete", "TrafficPolicy", "api"]]
        {
            let before = (acks(&api, "AuthorizationPolicy"), acks(&api, "TrafficPolicy"));
            cp.ok(args, (args[0] == "apply").then_some(allow));
            support::wait_until(&format!("api ACKs {args:?}"), Duration::from_secs(10), || {
                acks(&api, "AuthorizationPolicy") > before.0 || acks(&api, "TrafficPolicy") > before.1
            });
            std::thread::sleep(Duration::from_millis(200));
        }
        // Invalid values are refused naming the field, and change nothing.
        for (bad, field) in [
            ("rateLimit: {requestsPerSecond: -5, burst: 1}", "spec.rateLimit.requestsPerSecond"),
            ("retries: {attempts: 11}", "spec.retries.attempts"),
            ("loadBalancer: fastest", "spec.loadBalancer"),
            (
                "outlierDetection: {consecutive5xx: 5, baseEjectionTime: 30s, maxEjectionPercent: 150}",
                "spec.outlierDetection.maxEjectionPercent",
            ),
        ] {
            let doc = format!(
                "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{targetRef: {{kind: Service, name: api}}, {bad}}}\n"
            );
            let err = cp.fails(&["apply", "-f", "-"], Some(&doc));
            assert!(err.contains(field), "{bad}: {err}");
        }
        std::thread::sleep(Duration::from_millis(300));
        let (ok, failed, failures) = load.finish();
        eprintln!("every policy changed under load: {ok} ok, {failed} failed");
        assert_eq!(failed, 0, "{failures:?}");
        assert!(ok > 100, "{ok}");
    });
}
