//! HTTPRoute (Gateway API, GAMMA) with real `ferry` processes and two real versions of a backend (loopback only,
//! every loop bounded): weighted splits within binomial bounds, matches steering requests, and the GAMMA answers
//! for no matching rule (404) and unresolved backends (500).

use ferry_test_support as support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use support::control::ControlPlane;
use support::{Ferry, backend, control, mesh};

/// Services `api` (v1) and `api-v2` (v2), one endpoint each, and `extra` YAML.
fn config(v1: SocketAddr, v2: SocketAddr, extra: &str) -> String {
    format!("{}{}{extra}", support::service_yaml("api", 80, &[v1]), support::service_yaml("api-v2", 80, &[v2]))
}

fn route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: api}}]\n  rules:\n{rules}---\n"
    )
}

/// Sends `count` requests for `path` with `headers` through `proxy` (Host `api`) over `workers` keep-alive
/// connections, bounded at 60 s: the `x-backend` port of each answer, and any status that was not 200.
async fn spread(
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    count: usize,
    workers: usize,
) -> (BTreeMap<String, usize>, Vec<u16>) {
    spread_to(proxy, "api", path, headers, count, workers, None).await
}

/// As [`spread`], to `host`; with `stop`, each worker also ends once it is set (then `count` is only a bound).
async fn spread_to(
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    count: usize,
    workers: usize,
    stop: Option<Arc<AtomicBool>>,
) -> (BTreeMap<String, usize>, Vec<u16>) {
    let run = async {
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (path, headers) = (path.to_string(), headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let headers: Vec<(String, String)> = headers.collect();
            let share = count / workers + usize::from(w < count % workers);
            let (host, stop) = (host.to_string(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
                let (mut tx, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
                tokio::spawn(conn);
                let mut seen = Vec::with_capacity(share);
                for _ in 0..share {
                    if stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                        break;
                    }
                    let mut req = http::Request::get(path.as_str()).header("host", host.as_str());
                    for (k, v) in &headers {
                        req = req.header(k.as_str(), v.as_str());
                    }
                    let resp = tx.send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await;
                    // A failed exchange (the connection ended) counts as status 0, and ends this worker.
                    let Ok(resp) = resp else {
                        seen.push((0, String::new()));
                        break;
                    };
                    let status = resp.status().as_u16();
                    let by = resp.headers().get("x-backend").map(|v| v.to_str().unwrap().to_string());
                    let _ = resp.into_body().collect().await;
                    seen.push((status, by.unwrap_or_default()));
                }
                seen
            }));
        }
        let mut by_backend = BTreeMap::new();
        let mut failed = Vec::new();
        for t in tasks {
            for (status, by) in t.await.unwrap() {
                if status == 200 {
                    *by_backend.entry(by).or_insert(0) += 1;
                } else {
                    failed.push(status);
                }
            }
        }
        (by_backend, failed)
    };
    tokio::time::timeout(Duration::from_secs(60), run).await.expect("the requests finish within 60 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_lands_within_binomial_bounds_and_matches_steer_requests() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let (p1, p2) = (v1.addr.port().to_string(), v2.addr.port().to_string());
    let rules = "  - matches: [{path: {type: PathPrefix, value: /admin}}]\n    backendRefs: [{name: api}]\n\
                 \x20 - matches: [{path: {value: /}, headers: [{name: x-canary, value: always}]}]\n    backendRefs: [{name: api-v2}]\n\
                 \x20 - matches: [{path: {type: Exact, value: /ghost}}]\n    backendRefs: [{name: ghost}]\n\
                 \x20 - matches: [{path: {type: Exact, value: /drained}}]\n    backendRefs: [{name: api, weight: 0}]\n\
                 \x20 - backendRefs: [{name: api, weight: 90}, {name: api-v2, weight: 10}]\n";
    let ferry =
        tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, &route("split", rules))), &[]));
    // 90/10 over 10,000 requests: v2 gets 1,000 ± 99 (two-sided p < 0.001 for Binomial(10000, 0.1): 3.29 sd of 30).
    let (split, failed) = spread(ferry.outbound, "/echo", &[], 10_000, 16).await;
    assert!(failed.is_empty(), "{failed:?}");
    let (n1, n2) = (split.get(&p1).copied().unwrap_or(0), split.get(&p2).copied().unwrap_or(0));
    assert_eq!(n1 + n2, 10_000, "{split:?}");
    eprintln!("90/10 split over 10,000 requests: v1 {n1}, v2 {n2}");
    assert!((901..=1099).contains(&n2), "v2 got {n2} of 10,000 (expected 1,000 ± 99)");
    // Matches steer: a path prefix to v1 only, a header to v2 only.
    let (admin, failed) = spread(ferry.outbound, "/admin/users", &[], 200, 4).await;
    assert_eq!((admin.get(&p1).copied(), failed.len()), (Some(200), 0), "{admin:?}");
    let (canary, _) = spread(ferry.outbound, "/echo", &[("x-canary", "always")], 200, 4).await;
    assert_eq!(canary.get(&p2).copied(), Some(200), "{canary:?}");
    // An unresolved backend, and weights all 0: 500 backend-not-found, said by the proxy.
    let get = |path: &str| {
        support::http_exchange_full(ferry.outbound, "GET", path, &[("Host", "api")], "").expect("an answer")
    };
    for path in ["/ghost", "/drained"] {
        let r = tokio::task::block_in_place(|| get(path));
        assert_eq!((r.status, r.header("ferry-proxy-error")), (500, Some("backend-not-found")), "{path}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_try_of_a_retry_picks_a_backend_again_and_the_split_holds_over_tries() {
    // api-v2, the canary, answers every request 503; the Service's retries (2 on 5xx) pick a backend again for
    // each try, so a request whose first try hit v2 is served by v1 on a later try (90 % of the time each).
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    v2.fail_status.store(503, Ordering::SeqCst);
    let policy = "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api}\nspec: {targetRef: {kind: Service, name: api}, retries: {attempts: 2, on: [5xx], backoff: {base: 1ms, max: 1ms}}}\n---\n";
    let rules = "  - backendRefs: [{name: api, weight: 90}, {name: api-v2, weight: 10}]\n";
    let yaml = config(v1.addr, v2.addr, &format!("{policy}{}", route("canary", rules)));
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&yaml), &[]));
    let (split, failed) = spread(ferry.outbound, "/echo", &[], 10_000, 16).await;
    let (t1, t2) = (v1.requests.load(Ordering::SeqCst), v2.requests.load(Ordering::SeqCst));
    let tries = t1 + t2;
    eprintln!("10,000 requests: {split:?} served, {} failed; tries v1 {t1}, v2 {t2}", failed.len());
    // Each try is a fresh 90/10 draw: v2's share of ~11,110 tries is within 3.29 sd (p < 0.001) of 10 %.
    let (expected, sd) = (tries as f64 * 0.1, (tries as f64 * 0.09).sqrt());
    assert!(
        (t2 as f64 - expected).abs() <= 3.29 * sd,
        "v2 took {t2} of {tries} tries (expected {expected:.0} ± {:.0})",
        3.29 * sd
    );
    // Only a request whose three tries all drew v2 fails: 10,000 × 0.1³ = 10 expected (Poisson, P(X > 25) < 1e-5).
    // Had a retry stayed on its first try's backend, every request that drew v2 first (~1,000) would have failed.
    assert!(failed.iter().all(|s| *s == 503) && failed.len() <= 25, "{} failed: {failed:?}", failed.len());
    assert_eq!(split.values().sum::<usize>() + failed.len(), 10_000);
    // Counted under the Service the caller named, the rule it matched and the backend of its last try.
    let rule = r#"service="api.default",route="default/canary/0""#;
    let served = ferry.metric(&format!(
        r#"ferry_requests_total{{direction="outbound",{rule},backend="api.default",status_class="2xx"}}"#
    ));
    let lost = ferry.metric(&format!(
        r#"ferry_requests_total{{direction="outbound",{rule},backend="api-v2.default",status_class="5xx"}}"#
    ));
    assert_eq!((served as usize, lost as usize), (10_000 - failed.len(), failed.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_routes_with_the_same_match_the_older_wins() {
    // The HTTPRoute spec's tie-break: the oldest route by creationTimestamp, before namespace/name ("a-new" would
    // win by name).
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let routes = [("a-new", "2026-12-02T00:00:00Z", "api"), ("b-old", "2026-12-01T00:00:00Z", "api-v2")].map(
        |(name, created, to)| {
            route(name, &format!("  - backendRefs: [{{name: {to}}}]\n")).replace(
                &format!("metadata: {{name: {name}}}"),
                &format!("metadata: {{name: {name}, creationTimestamp: '{created}'}}"),
            )
        },
    );
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, &routes.concat())), &[]));
    let r = tokio::task::block_in_place(|| {
        support::http_exchange_full(ferry.outbound, "GET", "/", &[("Host", "api")], "").expect("an answer")
    });
    assert_eq!((r.status, r.header("x-backend")), (200, Some(v2.addr.port().to_string().as_str())), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_in_another_namespace_is_served_only_with_a_reference_grant() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let invoices = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: invoices, namespace: billing}}\nspec: {{ports: [{{port: 80}}], endpoints: [{{address: \"{}\"}}]}}\n---\n",
        v2.addr
    );
    let to_billing = route("bills", "  - backendRefs: [{name: invoices, namespace: billing}]\n");
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: default-routes, namespace: billing}\nspec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}], to: [{group: '', kind: Service}]}\n---\n";
    for (with_grant, want) in [(false, (500, Some("backend-not-found"))), (true, (200, None))] {
        let extra = format!("{invoices}{to_billing}{}", if with_grant { grant } else { "" });
        let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, &extra)), &[]));
        let r = tokio::task::block_in_place(|| {
            support::http_exchange_full(ferry.outbound, "GET", "/", &[("Host", "api")], "").expect("an answer")
        });
        assert_eq!((r.status, r.header("ferry-proxy-error")), want, "grant {with_grant}: {r:?}");
        if with_grant {
            assert_eq!(r.header("x-backend"), Some(v2.addr.port().to_string().as_str()));
        } else {
            assert!(r.body.contains("RefNotPermitted"), "{r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_filters_change_the_request_the_backend_sees_and_the_response_the_client_gets() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let rules = "  - matches: [{path: {type: PathPrefix, value: /headers}}]\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-env, value: canary}], add: [{name: x-tag, value: a}], remove: [x-secret]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-served-by, value: canary-route}], remove: [x-seen-version]}}\n    backendRefs: [{name: api-v2}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /headers}, headers: [{name: x-split, value: 'yes'}]}]\n    backendRefs:\n\
                 \x20   - {name: api, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-tag, value: v1}]}}, {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-picked, value: v1}]}}]}\n\
                 \x20   - {name: api-v2, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-tag, value: v2}]}}, {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-picked, value: v2}]}}]}\n";
    let ferry =
        tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, &route("filtered", rules))), &[]));
    let r = tokio::task::block_in_place(|| {
        let headers = [("Host", "api"), ("x-env", "prod"), ("x-tag", "b"), ("x-secret", "token")];
        support::http_exchange_full(ferry.outbound, "GET", "/headers", &headers, "").expect("an answer")
    });
    assert_eq!(r.status, 200, "{r:?}");
    // At the backend: set replaced, add appended, remove gone.
    let seen: Vec<&str> = r.body.lines().collect();
    assert!(seen.contains(&"x-env: canary") && !seen.contains(&"x-env: prod"), "{seen:?}");
    assert!(seen.contains(&"x-tag: b") && seen.contains(&"x-tag: a"), "{seen:?}");
    assert!(!seen.iter().any(|l| l.starts_with("x-secret")), "{seen:?}");
    // At the client: the response's header set, one of the app's removed.
    assert_eq!((r.header("x-served-by"), r.header("x-seen-version")), (Some("canary-route"), None), "{r:?}");
    // A backendRef's filters act on the tries sent to that backend only: each answer carries its own backend's.
    let ports = [(v1.addr.port().to_string(), "v1"), (v2.addr.port().to_string(), "v2")];
    let mut seen_backends = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = tokio::task::block_in_place(|| {
            let headers = [("Host", "api"), ("x-split", "yes")];
            support::http_exchange_full(ferry.outbound, "GET", "/headers", &headers, "").expect("an answer")
        });
        let version = ports.iter().find(|(p, _)| Some(p.as_str()) == r.header("x-backend")).expect("a backend").1;
        assert!(r.body.lines().any(|l| l == format!("x-tag: {version}")), "{version}: {r:?}");
        assert_eq!(r.header("x-picked"), Some(version), "{r:?}");
        seen_backends.insert(version);
    }
    assert_eq!(seen_backends.len(), 2, "40 requests split 1:1 reach both backends");
    // A filter naming a header only Ferry writes is refused, naming the field.
    let bad = route(
        "bad",
        "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Ferry-Client-Id, value: spiffe://cluster.local/ns/default/sa/admin}]}}]\n    backendRefs: [{name: api}]\n",
    );
    let err = ferry_api::parse_documents(&config(v1.addr, v2.addr, &bad)).unwrap_err().to_string();
    assert!(
        err.contains("spec.rules[0].filters[0].requestHeaderModifier.set[0].name")
            && err.contains("Ferry's own header"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_route_hits_its_own_timeout_while_a_sibling_route_is_unaffected() {
    // GEP-1742: `timeouts.request` (the whole request) and `timeouts.backendRequest` (each try) of one rule; the
    // Service itself has no timeout, so its other rule waits for the app.
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let rules = "  - matches: [{path: {value: /}, headers: [{name: x-route, value: strict}]}]\n    timeouts: {request: 300ms}\n    backendRefs: [{name: api}]\n\
                 \x20 - matches: [{path: {value: /}, headers: [{name: x-route, value: per-try}]}]\n    timeouts: {request: 5s, backendRequest: 200ms}\n    backendRefs: [{name: api}]\n\
                 \x20 - backendRefs: [{name: api}]\n";
    let ferry =
        tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, &route("timeouts", rules))), &[]));
    let get = |route: Option<&str>| {
        let mut headers = vec![("Host", "api")];
        headers.extend(route.map(|r| ("x-route", r)));
        let start = std::time::Instant::now();
        let r = support::http_exchange_full(ferry.outbound, "GET", "/delay?ms=1200", &headers, "").expect("an answer");
        (r.status, r.header("ferry-proxy-error").map(str::to_string), start.elapsed())
    };
    let (strict, per_try, sibling) =
        tokio::task::block_in_place(|| (get(Some("strict")), get(Some("per-try")), get(None)));
    assert_eq!((strict.0, strict.1.as_deref()), (504, Some("request-timeout")), "{strict:?}");
    assert_eq!((per_try.0, per_try.1.as_deref()), (504, Some("per-try-timeout")), "{per_try:?}");
    assert_eq!((sibling.0, sibling.1.as_deref()), (200, None), "{sibling:?}");
    assert!(sibling.2 >= Duration::from_millis(1200), "the sibling waited for the app: {sibling:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_answered_by_the_proxy_and_rewrites_reach_the_backend() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let rules = "  - matches: [{path: {type: PathPrefix, value: /old}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]\n\
                 \x20 - matches: [{path: {type: Exact, value: /moved}}]\n    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.com}}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /api}}]\n    filters: [{type: URLRewrite, urlRewrite: {hostname: internal.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]\n    backendRefs: [{name: api}]\n\
                 \x20 - backendRefs: [{name: api}]\n";
    let ferry =
        tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, &route("moves", rules))), &[]));
    let get = |path: &str| {
        support::http_exchange_full(ferry.outbound, "GET", path, &[("Host", "api")], "").expect("an answer")
    };
    let (old, moved, rewritten) =
        tokio::task::block_in_place(|| (get("/old/a?x=1"), get("/moved?x=1"), get("/api/headers?x=1")));
    assert_eq!((old.status, old.header("location")), (301, Some("http://api/new/a?x=1")), "{old:?}");
    assert_eq!((moved.status, moved.header("location")), (302, Some("https://example.com/moved?x=1")), "{moved:?}");
    assert_eq!(v1.requests.load(Ordering::SeqCst), 1, "redirects never reach a backend");
    // /api/headers went on as /headers (the app lists the headers it got), for Host internal.example.
    assert_eq!(rewritten.status, 200, "{rewritten:?}");
    assert!(rewritten.body.lines().any(|l| l == "host: internal.example"), "{rewritten:?}");
    assert_eq!(rewritten.header("x-seen-host"), Some("internal.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_matching_rule_the_request_is_rejected_and_without_routes_it_goes_to_the_service() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let rules = "  - matches: [{path: {type: PathPrefix, value: /v2}}]\n    backendRefs: [{name: api-v2}]\n";
    let ferry =
        tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, &route("only-v2", rules))), &[]));
    let get = |host: &str, path: &str| {
        support::http_exchange_full(ferry.outbound, "GET", path, &[("Host", host)], "").expect("an answer")
    };
    let r = tokio::task::block_in_place(|| get("api", "/v2/x"));
    assert_eq!((r.status, r.header("x-backend")), (200, Some(v2.addr.port().to_string().as_str())), "{r:?}");
    // GAMMA: a Service with routes rejects what matches none of them (404, as the HTTPRoute spec says).
    let r = tokio::task::block_in_place(|| get("api", "/other"));
    assert_eq!((r.status, r.header("ferry-proxy-error")), (404, Some("route-not-found")), "{r:?}");
    // A Service without routes (api-v2 itself): as before.
    let r = tokio::task::block_in_place(|| get("api-v2", "/other"));
    assert_eq!((r.status, r.header("ferry-proxy-error")), (200, None), "{r:?}");
    assert_eq!(ferry.metric(r#"ferry_proxy_errors_total{direction="outbound",reason="route-not-found"}"#), 1.0);
}

/// The control plane's generation (`ferryctl status`).
fn generation(cp: &ControlPlane) -> u64 {
    let status: serde_json::Value = serde_json::from_str(&cp.ok(&["status", "-o", "json"], None)).unwrap();
    status["generation"].as_u64().unwrap_or(0)
}

/// Waits (up to 20 s) until the control plane has moved past generation `before` and `node` has ACKed its route sets
/// at the new generation (`ferryctl status`).
fn wait_synced(cp: &ControlPlane, node: &str, before: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status: serde_json::Value = serde_json::from_str(&cp.ok(&["status", "-o", "json"], None)).unwrap();
        let generation = status["generation"].as_u64().unwrap_or(0);
        let proxy = status["proxies"].as_array().into_iter().flatten().find(|p| p["node"] == node);
        let synced =
            generation > before && proxy.is_some_and(|p| p["types"]["RouteSet"]["acked"].as_u64() == Some(generation));
        if synced {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{node} did not ACK generation {generation}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_shift_under_load_through_the_control_plane_without_a_failed_request() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let (p1, p2) = (v1.addr.port().to_string(), v2.addr.port().to_string());
    let dir = control::state_dir("routing-shift");
    let (cp, _api, _api_v2, web) = tokio::task::block_in_place(|| {
        let cp = ControlPlane::start(&dir);
        cp.ok(&["apply", "-f", "-"], Some(&mesh::service("api", "api.local", "")));
        cp.ok(&["apply", "-f", "-"], Some(&mesh::service("api-v2", "api-v2.local", "")));
        cp.ok(&["apply", "-f", "-"], Some(&mesh::service("web", "web.local", "")));
        let api = mesh::proxy(&cp, "api", Some(v1.addr), &[]);
        let api_v2 = mesh::proxy(&cp, "api-v2", Some(v2.addr), &[]);
        let web = mesh::proxy(&cp, "web", None, &[("FERRY_SERVICE", "web".into())]);
        (cp, api, api_v2, web)
    });
    let apply = |w1: u32, w2: u32| {
        let route = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: canary}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: api}}]\n  rules: [{{backendRefs: [{{name: api, weight: {w1}}}, {{name: api-v2, weight: {w2}}}]}}]\n"
        );
        let before = generation(&cp);
        cp.ok(&["apply", "-f", "-"], Some(&route));
        wait_synced(&cp, "web", before);
    };
    tokio::task::block_in_place(|| apply(100, 0));
    // Constant load through web's proxy for the whole test (bounded: 100,000 requests, 60 s).
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(spread_to(web.outbound, "api.local", "/echo", &[], 100_000, 2, Some(stop.clone())));
    for (w1, w2) in [(100, 0), (50, 50), (0, 100)] {
        if w1 != 100 {
            tokio::task::block_in_place(|| apply(w1, w2));
        }
        let (seen, failed) = spread_to(web.outbound, "api.local", "/echo", &[], 1_000, 4, None).await;
        assert!(failed.is_empty(), "{w1}/{w2}: {failed:?}");
        let (n1, n2) = (seen.get(&p1).copied().unwrap_or(0), seen.get(&p2).copied().unwrap_or(0));
        eprintln!("weights {w1}/{w2}: v1 {n1}, v2 {n2} of 1,000");
        match (w1, w2) {
            (100, 0) => assert_eq!((n1, n2), (1_000, 0)),
            (0, 100) => assert_eq!((n1, n2), (0, 1_000)),
            // Binomial(1000, 0.5): 500 ± 52 (3.29 sd of 15.8, two-sided p < 0.001).
            _ => assert!((448..=552).contains(&n2), "v2 got {n2} of 1,000 at 50/50"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (total, failed) = load.await.unwrap();
    let sent: usize = total.values().sum::<usize>() + failed.len();
    eprintln!("constant load: {sent} requests, {} failed", failed.len());
    assert!(failed.is_empty(), "requests failed while the weights changed: {failed:?}");
    assert!(sent > 100, "the load ran: {sent}");
}

#[test]
fn route_status_says_what_is_attached_and_resolved() {
    let cp = ControlPlane::start(&control::state_dir("routing-status"));
    cp.ok(&["apply", "-f", "-"], Some(&mesh::service("api", "api.local", "")));
    let status = |name: &str| -> Vec<(String, String, String)> {
        let out = cp.ok(&["get", "httproute", name, "-n", "default", "-o", "json"], None);
        let object: serde_json::Value = serde_json::from_str(&out).unwrap();
        let conditions = object["status"]["parents"][0]["conditions"].as_array().cloned().unwrap_or_default();
        conditions
            .iter()
            .map(|c| {
                let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (text("type"), text("status"), text("reason"))
            })
            .collect()
    };
    let route = |name: &str, parent: &str, backends: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {parent}}}]\n  rules: [{{backendRefs: [{backends}]}}]\n"
        )
    };
    let c = |t: &str, s: &str, r: &str| (t.to_string(), s.to_string(), r.to_string());
    cp.ok(&["apply", "-f", "-"], Some(&route("good", "api", "{name: api}")));
    assert_eq!(status("good"), [c("Accepted", "True", "Accepted"), c("ResolvedRefs", "True", "ResolvedRefs")]);
    cp.ok(&["apply", "-f", "-"], Some(&route("ghost-backend", "api", "{name: api}, {name: ghost}")));
    assert_eq!(
        status("ghost-backend"),
        [c("Accepted", "True", "Accepted"), c("ResolvedRefs", "False", "BackendNotFound")]
    );
    cp.ok(&["apply", "-f", "-"], Some(&route("other-ns", "api", "{name: invoices, namespace: billing}")));
    let billing = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: invoices, namespace: billing}\nspec: {ports: [{port: 80}]}\n";
    cp.ok(&["apply", "-f", "-"], Some(billing));
    assert_eq!(status("other-ns")[1], c("ResolvedRefs", "False", "RefNotPermitted"));
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: default-routes, namespace: billing}\nspec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}], to: [{group: '', kind: Service}]}\n";
    cp.ok(&["apply", "-f", "-"], Some(grant));
    assert_eq!(status("other-ns")[1], c("ResolvedRefs", "True", "ResolvedRefs"));
    // Every weight 0 (a drained rule) is valid, and its 500s are said in the message.
    cp.ok(&["apply", "-f", "-"], Some(&route("drained", "api", "{name: api, weight: 0}")));
    assert_eq!(status("drained"), [c("Accepted", "True", "Accepted"), c("ResolvedRefs", "True", "ResolvedRefs")]);
    let out = cp.ok(&["get", "httproute", "drained", "-n", "default", "-o", "json"], None);
    assert!(out.contains("requests matching rules[0] get 500"), "{out}");
    cp.ok(&["apply", "-f", "-"], Some(&route("no-parent", "nope", "{name: api}")));
    assert_eq!(status("no-parent")[0], c("Accepted", "False", "NoMatchingParent"));
    // A route that fails validation is refused outright, naming the field.
    let bad = route("bad", "api", "{name: api}")
        .replace("[{backendRefs:", "[{matches: [{path: {type: RegularExpression, value: '(('}}], backendRefs:");
    let err = cp.fails(&["apply", "-f", "-"], Some(&bad));
    assert!(err.contains("HTTPRoute default/bad") && err.contains("spec.rules[0].matches[0].path.value"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_backend_still_enforces_its_own_authorization_policy() {
    // The caller's route choice never bypasses the destination: api-v2's proxy refuses web, whatever sent it there.
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let dir = control::state_dir("routing-authz");
    let (cp, _api, _api_v2, web) = tokio::task::block_in_place(|| {
        let cp = ControlPlane::start(&dir);
        for name in ["api", "api-v2", "web"] {
            cp.ok(&["apply", "-f", "-"], Some(&mesh::service(name, &format!("{name}.local"), "")));
        }
        let deny = "apiVersion: ferry.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: api-v2}\nspec: {targetRef: {kind: Service, name: api-v2}, defaultAction: deny, allow: [{from: {identities: [\"spiffe://cluster.local/ns/default/sa/batch\"]}}]}\n";
        cp.ok(&["apply", "-f", "-"], Some(deny));
        let api = mesh::proxy(&cp, "api", Some(v1.addr), &[]);
        let api_v2 = mesh::proxy(&cp, "api-v2", Some(v2.addr), &[]);
        let web = mesh::proxy(&cp, "web", None, &[("FERRY_SERVICE", "web".into())]);
        let before = generation(&cp);
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: all-v2}\nspec:\n  parentRefs: [{group: '', kind: Service, name: api}]\n  rules: [{backendRefs: [{name: api-v2}]}]\n";
        cp.ok(&["apply", "-f", "-"], Some(route));
        wait_synced(&cp, "web", before);
        (cp, api, api_v2, web)
    });
    let r = tokio::task::block_in_place(|| {
        support::http_exchange_full(web.outbound, "GET", "/echo", &[("Host", "api.local")], "").expect("an answer")
    });
    assert_eq!((r.status, r.header("ferry-proxy-error")), (403, Some("unauthorized")), "{r:?}");
    drop(cp);
}

/// A mirror that records each request it gets as `METHOD path host body`, answering 200.
async fn recording_mirror() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
                        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let body = String::from_utf8_lossy(&body).to_string();
                        record.lock().unwrap().push(format!("{method} {path} {host} {body}"));
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"mirror"),
                        )))
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await;
            });
        }
    });
    (addr, seen, task)
}

/// A mirror that accepts connections and reads what comes, never answering: the connections it holds, and the
/// bytes it read.
async fn hung_mirror() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = held.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut sink = vec![0u8; 16 * 1024];
                while tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    (addr, held, task)
}

/// Waits up to 10 s for `what` (a copy travels in its own task, after the response).
fn eventually(what: &str, ready: impl FnMut() -> bool) {
    tokio::task::block_in_place(|| support::wait_until(what, Duration::from_secs(10), ready));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_receives_a_copy_of_each_request_with_its_body() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let (mirror, seen, _task) = recording_mirror().await;
    let shadow = support::service_yaml("shadow", 80, &[mirror]);
    let rules = "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]\n    backendRefs: [{name: api}]\n";
    let yaml = config(v1.addr, v2.addr, &format!("{shadow}{}", route("mirrored", rules)));
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&yaml), &[]));
    let r = tokio::task::block_in_place(|| {
        support::http_exchange_full(ferry.outbound, "POST", "/echo", &[("Host", "api")], "payload-123")
    })
    .expect("an answer");
    assert_eq!((r.status, r.body.as_str()), (200, "payload-123"), "{r:?}");
    let copied = "POST /echo api payload-123".to_string();
    eventually(&format!("the mirror to record `{copied}`"), || seen.lock().unwrap().contains(&copied));
    let series = |outcome: &str| {
        format!(
            r#"ferry_request_mirrors_total{{route="default/mirrored/0",mirror="shadow.default",outcome="{outcome}"}}"#
        )
    };
    eventually("one mirrored copy counted", || ferry.metric(&series("mirrored")) == 1.0);
    // A body over the copy's 64 KiB buffer: the request goes on whole, its copy is dropped.
    let big = "x".repeat(100 * 1024);
    let r = tokio::task::block_in_place(|| {
        support::http_exchange_full(ferry.outbound, "POST", "/echo", &[("Host", "api")], &big)
    })
    .expect("an answer");
    assert_eq!((r.status, r.body.len()), (200, big.len()));
    eventually("one dropped copy counted", || ferry.metric(&series("dropped")) == 1.0);
    assert_eq!(seen.lock().unwrap().len(), 1, "only the first request was copied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_mirror_down_or_hung_every_request_succeeds_and_none_waits_on_its_copy() {
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let (hung, held, _task) = hung_mirror().await;
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    // The hung mirror's copies are held for its Service's timeout (120 s), past the end of this test.
    let mirrors = format!(
        "{}{}apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: hung}}\nspec: {{targetRef: {{kind: Service, name: hung}}, timeout: 120s}}\n---\n",
        support::service_yaml("hung", 80, &[hung]),
        support::service_yaml("down", 80, &[down])
    );
    let rules = "  - matches: [{path: {value: /down}}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: down, port: 80}}}]\n    backendRefs: [{name: api}]\n\
                 \x20 - matches: [{path: {value: /hung}}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: hung, port: 80}}}]\n    backendRefs: [{name: api}]\n";
    let yaml = config(v1.addr, v2.addr, &format!("{mirrors}{}", route("shadowed", rules)));
    let cap = 32;
    let ferry = tokio::task::block_in_place(|| {
        Ferry::start(Some(&yaml), &[("FERRY_MIRROR_MAX_IN_FLIGHT", cap.to_string().as_str())])
    });
    let series = |rule: usize, mirror: &str, outcome: &str| {
        ferry.metric(&format!(
            r#"ferry_request_mirrors_total{{route="default/shadowed/{rule}",mirror="{mirror}.default",outcome="{outcome}"}}"#
        ))
    };
    // Down: each copy fails to connect, in its own task; the requests do not notice.
    let (served, failed) = spread(ferry.outbound, "/down", &[], 1_000, 8).await;
    assert!(failed.is_empty(), "{} requests failed: {failed:?}", failed.len());
    assert_eq!(served.values().sum::<usize>(), 1_000);
    eventually("1,000 copies counted failed or dropped", || {
        series(0, "down", "failed") + series(0, "down", "dropped") == 1_000.0
    });
    eprintln!(
        "mirror down: 1,000 requests served; copies failed {}, dropped {}",
        series(0, "down", "failed"),
        series(0, "down", "dropped")
    );
    assert!(series(0, "down", "failed") >= 1.0 && series(0, "down", "mirrored") == 0.0);
    // Hung: the first `cap` copies are held by the mirror for the rest of the test, the others dropped at once; had
    // any request waited on its copy, it would wait 120 s, and the run would fail its 60 s bound.
    let (served, failed) = spread(ferry.outbound, "/hung", &[], 1_000, 8).await;
    assert!(failed.is_empty(), "{} requests failed: {failed:?}", failed.len());
    assert_eq!(served.values().sum::<usize>(), 1_000);
    let (dropped, in_flight) = (series(1, "hung", "dropped"), 1_000.0 - series(1, "hung", "dropped"));
    eprintln!(
        "mirror hung: 1,000 requests served; copies dropped {dropped}, held {in_flight}; the mirror holds {} connections",
        held.load(Ordering::SeqCst)
    );
    assert_eq!(in_flight, cap as f64, "every copy past the cap is dropped, and none of the held ones has ended");
    assert_eq!((series(1, "hung", "mirrored"), series(1, "hung", "failed")), (0.0, 0.0));
    assert!(held.load(Ordering::SeqCst) >= 1, "the copies reached the hung mirror");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_retry_retries_where_the_service_would_not_and_stops_at_its_budget() {
    // GEP-1731: the rule retries 503 twice; the Service's own policy retries only connection failures, and its
    // budget allows retries of 10 % of its requests (no floor).
    let (v1, v2) = (backend::http_backend().await, backend::http_backend().await);
    let policy = "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api}\nspec: {targetRef: {kind: Service, name: api}, retries: {attempts: 2, on: [connect-failure], budget: {percent: 10, minPerSecond: 0}}}\n---\n";
    let rules = "  - matches: [{path: {value: /}, headers: [{name: x-route, value: retried}]}]\n    retry: {codes: [503], attempts: 2, backoff: 1ms}\n    backendRefs: [{name: api}]\n\
                 \x20 - backendRefs: [{name: api}]\n";
    let yaml = config(v1.addr, v2.addr, &format!("{policy}{}", route("retried", rules)));
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&yaml), &[]));
    // Without the rule's retry: one try per request, as the Service's policy says.
    let (_, failed) = spread(ferry.outbound, "/status?code=503", &[], 100, 1).await;
    assert_eq!((failed.len(), v1.requests.load(Ordering::SeqCst)), (100, 100));
    // With it: retried, until the budget (10 % of the Service's requests) says no.
    let (_, failed) = spread(ferry.outbound, "/status?code=503", &[("x-route", "retried")], 100, 1).await;
    assert_eq!(failed.len(), 100);
    let retries = v1.requests.load(Ordering::SeqCst) - 200;
    let denied = ferry.metric(r#"ferry_retries_total{service="api.default",result="budget-denied"}"#);
    eprintln!("route retry: {retries} retries of 100 requests (budget 10 % of 200), {denied} denied by the budget");
    assert!((5..=20).contains(&retries), "{retries} retries: the budget allows 20 over 200 requests");
    assert!(denied >= 1.0, "the budget stopped some retries");
}

/// A tonic client of `http://api:80` through `proxy`.
async fn grpc_client(proxy: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin(http::Uri::from_static("http://api:80"))
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_route_sends_each_method_to_its_backends_by_weight() {
    use support::grpc::{grpc_backend_named, unary};
    let (v1, v2) = (grpc_backend_named("v1").await, grpc_backend_named("v2").await);
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: echo}\nspec:\n  parentRefs: [{group: '', kind: Service, name: api}]\n  rules:\n\
                 \x20 - matches: [{method: {service: test.Echo, method: Shout}}]\n    backendRefs: [{name: api-v2}]\n\
                 \x20 - matches: [{method: {service: test.Echo, method: Say}, headers: [{name: x-version, value: v2}]}]\n    backendRefs: [{name: api-v2}]\n\
                 \x20 - matches: [{method: {service: test.Echo, method: Say}}]\n    backendRefs: [{name: api, weight: 3}, {name: api-v2, weight: 1}]\n---\n";
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&config(v1.addr, v2.addr, route)), &[]));
    let mut grpc = grpc_client(ferry.outbound).await;
    let mut answers = BTreeMap::new();
    let calls = async {
        for (method, metadata, count) in
            [("Shout", &[][..], 50), ("Say", &[("x-version", "v2")][..], 50), ("Say", &[], 800)]
        {
            for _ in 0..count {
                let answer = unary(&mut grpc, method, metadata).await.expect("served");
                *answers.entry((method, metadata.len(), answer)).or_insert(0usize) += 1;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), calls).await.expect("the calls finish within 60 s");
    eprintln!("gRPC answers: {answers:?}");
    let got = |method: &'static str, headers: usize, answer: &str| {
        answers.get(&(method, headers, answer.to_string())).copied().unwrap_or(0)
    };
    assert_eq!((got("Shout", 0, "v2/Shout"), got("Say", 1, "v2/Say")), (50, 50), "{answers:?}");
    // 3:1 over 800 calls: v2 takes 200 ± 40 (3.29 sd of 12.2 for Binomial(800, 0.25): two-sided p < 0.001).
    let (s1, s2) = (got("Say", 0, "v1/Say"), got("Say", 0, "v2/Say"));
    assert_eq!(s1 + s2, 800, "{answers:?}");
    assert!((160..=240).contains(&s2), "v2 took {s2} of 800 Say calls (expected 200 ± 40)");
    // A method no rule matches: GAMMA's 404 `route-not-found`, which a gRPC caller reads as UNIMPLEMENTED.
    let status = unary(&mut grpc, "Whisper", &[]).await.expect_err("no rule matches");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert_eq!(status.metadata().get("ferry-proxy-error").unwrap(), "route-not-found");
    // The route metrics, as for an HTTPRoute: per rule and backend, with the gRPC status.
    let series = |rule: usize, backend: &str| {
        ferry.metric(&format!(
            r#"ferry_requests_total{{direction="outbound",service="api.default",route="default/echo/{rule}",backend="{backend}.default",protocol="grpc",grpc_status="0"}}"#
        ))
    };
    assert_eq!((series(0, "api-v2"), series(1, "api-v2")), (50.0, 50.0));
    assert_eq!((series(2, "api") as usize, series(2, "api-v2") as usize), (s1, s2));
}

#[test]
fn grpc_route_status_is_written_and_an_http_route_on_its_port_is_conflicted() {
    let cp = ControlPlane::start(&control::state_dir("routing-grpc-status"));
    cp.ok(&["apply", "-f", "-"], Some(&mesh::service("api", "api.local", "")));
    let conditions = |kind: &str, name: &str| -> Vec<(String, String)> {
        let out = cp.ok(&["get", kind, name, "-n", "default", "-o", "json"], None);
        let object: serde_json::Value = serde_json::from_str(&out).unwrap();
        let conditions = object["status"]["parents"][0]["conditions"].as_array().cloned().unwrap_or_default();
        let text = |c: &serde_json::Value, k: &str| c[k].as_str().unwrap_or_default().to_string();
        conditions.iter().map(|c| (text(c, "status"), text(c, "reason"))).collect()
    };
    let route = |kind: &str, name: &str, backends: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: api}}]\n  rules: [{{backendRefs: [{backends}]}}]\n"
        )
    };
    let c = |s: &str, r: &str| (s.to_string(), r.to_string());
    cp.ok(&["apply", "-f", "-"], Some(&route("HTTPRoute", "web", "{name: api}")));
    assert_eq!(conditions("httproute", "web")[0], c("True", "Accepted"));
    cp.ok(&["apply", "-f", "-"], Some(&route("GRPCRoute", "rpc", "{name: api}, {name: ghost}")));
    assert_eq!(conditions("grpcroute", "rpc"), [c("True", "Accepted"), c("False", "BackendNotFound")]);
    // GEP-1426: the GRPCRoute takes the Service from the HTTPRoute of the same namespace.
    assert_eq!(conditions("httproute", "web")[0], c("False", "Conflicted"));
    cp.ok(&["delete", "grpcroute", "rpc", "-n", "default"], None);
    assert_eq!(conditions("httproute", "web")[0], c("True", "Accepted"));
    // Refused with the field named.
    let bad = route("GRPCRoute", "bad", "{name: api}")
        .replace("[{backendRefs:", "[{matches: [{method: {service: 'not a service'}}], backendRefs:");
    let err = cp.fails(&["apply", "-f", "-"], Some(&bad));
    assert!(err.contains("GRPCRoute default/bad") && err.contains("spec.rules[0].matches[0].method.service"), "{err}");
}
