//! The metric set with real `ferry` and `ferry-control` processes: bounded cardinality (distinct paths and request
//! IDs add no series), the labels of a meshed request on both sides, gRPC statuses from trailers, message sizes,
//! generated request IDs, and `promtool check metrics` (Debian's `prometheus`) clean on busy scrapes.

use ferry_test_support::{self as support, control, mesh};

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::backend;
use support::{Ferry, http_exchange_full, metric_value, wait_until};

/// The series (sample lines) of a scrape.
fn series(text: &str) -> usize {
    text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_paths_and_request_ids_add_no_series() {
    let app = backend::http_backend().await;
    let ferry = tokio::task::block_in_place(|| Ferry::start(Some(&support::service_yaml("api", 80, &[app.addr])), &[]));
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut all = vec![("Host", "api")];
        all.extend_from_slice(headers);
        let r = http_exchange_full(ferry.outbound, "GET", path, &all, "").expect("an answer");
        assert_eq!(r.status, 200, "{r:?}");
        r
    };
    tokio::task::block_in_place(|| {
        let first = get("/p0", &[]);
        assert!(first.header("x-seen-request-id").is_some_and(|id| id.len() == 36), "an ID is generated: {first:?}");
        let after_one = series(&ferry.metrics());
        for i in 0..50 {
            get(&format!("/items/{i}?page={i}"), &[]);
        }
        for i in 0..20 {
            let id = format!("request-{i}");
            let r = get("/", &[("x-request-id", &id)]);
            assert_eq!(r.header("x-seen-request-id"), Some(id.as_str()), "an ID is kept");
        }
        let after_all = ferry.metrics();
        assert_eq!(series(&after_all), after_one, "50 paths and 20 request IDs added series:\n{after_all}");
        assert!(!after_all.contains("/items") && !after_all.contains("request-1"), "{after_all}");
        assert_eq!(
            metric_value(&after_all, r#"ferry_requests_total{direction="outbound",service="api.default"}"#),
            71.0
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshed_request_is_labelled_on_both_sides_and_promtool_finds_nothing_to_report() {
    let promtool = support::works("promtool", &["--version"]);
    if !support::prerequisites("promtool check metrics", &[("promtool (Debian package prometheus)", promtool)]) {
        return;
    }
    let app = backend::http_backend().await;
    tokio::task::block_in_place(|| {
        let cp = control::ControlPlane::start(&control::state_dir("observability"));
        cp.ok(&["apply", "-f", "-"], Some(&mesh::service("api", "api.local", "")));
        cp.ok(&["apply", "-f", "-"], Some(&mesh::service("web", "web.local", "")));
        let api = mesh::proxy(&cp, "api", Some(app.addr), &[]);
        let web = mesh::proxy(&cp, "web", None, &[("FERRY_SERVICE", "web".into())]);
        wait_until("web routes api.local", Duration::from_secs(10), || {
            http_exchange_full(web.outbound, "GET", "/", &[("Host", "api.local")], "").is_some_and(|r| r.status == 200)
        });
        // Some traffic of each kind: bodies, an app error, a proxy error.
        for i in 0..20 {
            let r = http_exchange_full(web.outbound, "POST", "/echo", &[("Host", "api.local")], &"x".repeat(100 * i));
            assert_eq!(r.map(|r| r.status), Some(200));
        }
        let r = http_exchange_full(web.outbound, "GET", "/status?code=503", &[("Host", "api.local")], "").unwrap();
        assert_eq!(r.status, 503);
        let r = http_exchange_full(web.outbound, "GET", "/", &[("Host", "nowhere.local")], "").unwrap();
        assert_eq!(r.header("ferry-proxy-error"), Some("no-route"));
        let (web_text, api_text) = (web.metrics(), api.metrics());
        // The caller's side: its own Service as the source; the destination's: the caller's identity and Service.
        let outbound = r#"ferry_requests_total{direction="outbound",service="api.default",source="web.default",protocol="http1",status_class="2xx",grpc_status="",error=""}"#;
        assert_eq!(metric_value(&web_text, outbound), 21.0, "{web_text}");
        let inbound = r#"ferry_requests_total{direction="inbound",service="api.default",source="web.default",peer_identity="spiffe://cluster.local/ns/default/sa/web",status_class="2xx"}"#;
        assert_eq!(metric_value(&api_text, inbound), 21.0, "{api_text}");
        let app_error =
            r#"ferry_requests_total{direction="outbound",service="api.default",status_class="5xx",error=""}"#;
        assert_eq!(metric_value(&web_text, app_error), 1.0, "the app's own 503 has no proxy error");
        let proxy_error =
            r#"ferry_requests_total{direction="outbound",service="unknown",status_class="5xx",error="no-route"}"#;
        assert_eq!(metric_value(&web_text, proxy_error), 1.0, "{web_text}");
        let sizes = r#"ferry_request_size_bytes_sum{direction="outbound",service="api.default"}"#;
        assert_eq!(metric_value(&web_text, sizes), (0..20).map(|i| 100.0 * i as f64).sum::<f64>());
        let echoed = r#"ferry_response_size_bytes_sum{direction="inbound",service="api.default"}"#;
        assert!(metric_value(&api_text, echoed) >= 19_000.0, "{api_text}");
        // promtool's linter on the scrapes of both proxies and of the control plane: nothing to report.
        for (name, text) in [("web", web_text), ("api", api_text), ("ferry-control", cp.metrics_text())] {
            let mut child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && report.trim().is_empty(), "promtool on {name}'s scrape:\n{report}");
        }
    });
}
