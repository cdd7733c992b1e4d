//! Resilience policies with real `ferry` processes and real backends: the request timeout on a hanging backend, on
//! one that stalls mid-body, and for a gRPC caller with its own deadline.

mod support;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_a_flaky_backend_reliable_within_the_budget() {
    let app = backend::http_backend().await;
    // Every 5th answer fails (20 %); two retries on gateway errors.
    let config = retry_config(app.addr, "{attempts: 2, on: [gateway-error], backoff: {base: 1ms, max: 5ms}}");
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    // At about 100 req/s (paced), where the 25 % of retries needed fit the budget of 20 % + 10/s.
    let requests = 1_000;
    let ok = tokio::task::block_in_place(|| {
        (0..requests)
            .filter(|_| {
                std::thread::sleep(Duration::from_millis(9));
                http_exchange_full(ferry.outbound, "GET", "/flaky?every=5", &[("Host", "api")], "")
                    .is_some_and(|r| r.status == 200)
            })
            .count()
    });
    let attempts = app.requests.load(std::sync::atomic::Ordering::SeqCst) - before;
    eprintln!("flaky 20 %: {ok}/{requests} succeeded, {attempts} upstream attempts");
    assert!(ok as f64 >= 0.99 * requests as f64, "{ok}/{requests}");
    let retried = ferry.metric(r#"ferry_retries_total{result="attempted",service="api.default"}"#);
    assert_eq!(retried as usize, attempts - requests, "every extra attempt is a counted retry");
    // POST is not idempotent: its failures come back as they are.
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
async fn the_budget_stops_a_retry_storm_on_a_dead_backend() {
    let app = backend::http_backend().await;
    let config = retry_config(
        app.addr,
        "{attempts: 3, on: [\"503\"], backoff: {base: 1ms, max: 2ms}, budget: {percent: 20, minPerSecond: 1}}",
    );
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config), &[]));
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let requests = 500;
    tokio::task::block_in_place(|| {
        for _ in 0..requests {
            let r = http_exchange_full(ferry.outbound, "GET", "/status?code=503", &[("Host", "api")], "").unwrap();
            assert_eq!(r.status, 503);
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let attempts = (app.requests.load(std::sync::atomic::Ordering::SeqCst) - before) as f64;
    // The issue's bound: attempts <= requests x (1 + budget) + floor x seconds.
    let bound = requests as f64 * 1.2 + 1.0 * seconds;
    eprintln!("dead backend: {requests} requests, {attempts} attempts in {seconds:.1} s (bound {bound:.0})");
    assert!(attempts <= bound, "{attempts} attempts > {bound}");
    assert!(ferry.metric(r#"ferry_retries_total{result="budget-denied",service="api.default"}"#) > 0.0);
}
