//! The README's demo command must keep working: run the built `demo` example against this build's `ferry`.

use ferry_test_support::{self as support, control};

use std::path::PathBuf;
use std::process::Command;

#[test]
fn demo_runs_and_reports_no_failures() {
    // cargo test builds the examples next to the test binaries: target/<profile>/examples/demo.
    let exe = std::env::current_exe().unwrap();
    let demo: PathBuf = exe.parent().unwrap().parent().unwrap().join("examples").join("demo");
    if !demo.exists() {
        // `cargo test --test demo` alone does not build examples; build it (same profile, same target dir).
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--example", "demo", "-p", "ferry"]);
        if exe.parent().unwrap().parent().unwrap().ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "building the demo example failed");
    }
    // The control-plane binaries live in the other package: the shared helper builds them (same profile).
    let out = Command::new(&demo)
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .env("FERRY_CONTROL_BIN", control::control_bin())
        .env("FERRYCTL_BIN", control::ctl_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("300 ok, 0 failed"), "{stdout}");
    // Resilience: the flaky service fails a fifth of its requests without a policy, none with retries; the breaker
    // opens with no request reaching the app, then half-opens and closes.
    assert!(stdout.contains("quotes without a retry policy: 80 ok, 20 failed"), "{stdout}");
    assert!(stdout.contains("quotes with retries (2 on gateway-error): 100 ok, 0 failed"), "{stdout}");
    assert!(stdout.contains("with 0 reaching the app: the breaker is open"), "{stdout}");
    assert!(stdout.contains("circuit-open"), "{stdout}");
    assert!(
        stdout.contains("quotes back: 3 ok, 0 failed; breaker transitions: open 1, half-open 1, closed 1"),
        "{stdout}"
    );
    // The rate limit answers 429 to most of a burst; a proxy with a made-up join token is refused its certificate.
    assert!(stdout.contains("answered 429 Too Many Requests") && !stdout.contains(": 0 of a burst of 30"), "{stdout}");
    assert!(stdout.contains("a proxy with an unknown join token: 1 certificate request(s) refused"), "{stdout}");
    // The canary shift by an HTTPRoute: the last step sends everything to api-v2, and nothing fails under load.
    assert!(stdout.contains("canary weights 0/100: of 200 requests api answered 0, api-v2 200, 0 failed"), "{stdout}");
    assert!(stdout.contains("canary weights 90/10:") && stdout.contains("during the shift, 0 failed"), "{stdout}");
    // Then a header routes to api-v2, and api's own traffic is mirrored to api-v2.
    assert!(stdout.contains(r#"GET api /price with x-version: v2 -> 200 OK {"price": 40"#), "{stdout}");
    assert!(stdout.contains("(api), and a copy to api-v2: mirrored copies 1"), "{stdout}");
    // Identities: api's app names its caller as web's sidecar verified it; batch is refused by the policy; status and
    // check show the certificates.
    assert!(stdout.contains(r#""caller": "spiffe://cluster.local/ns/default/sa/web""#), "{stdout}");
    assert!(stdout.contains("batch -> api (AuthorizationPolicy api allows only"), "{stdout}");
    assert!(stdout.contains("403 Forbidden"), "{stdout}");
    assert!(stdout.contains("spiffe://cluster.local/ns/default/sa/batch"), "status lists batch's identity:\n{stdout}");
    assert!(stdout.contains("CERT EXPIRY"), "{stdout}");
    assert!(stdout.matches("ok   proxy").count() >= 3, "ferryctl check:\n{stdout}");
    for line in [
        "service.ferry.dev/api created",
        "trafficpolicy.ferry.dev/api created",
        "authorizationpolicy.ferry.dev/api created",
    ] {
        assert!(stdout.contains(line), "ferryctl apply output missing {line:?}:\n{stdout}");
    }
    // 300 + the first request + the routing probes, all through web's sidecar to api's.
    let web_metrics: String =
        stdout.lines().filter_map(|l| l.trim().strip_prefix("web  ")).map(|l| format!("{l}\n")).collect();
    let routed = support::metric_value(
        &web_metrics,
        r#"ferry_requests_total{direction="outbound",service="api.default",status_class="2xx"}"#,
    );
    assert!(routed >= 302.0, "{stdout}");
    assert!(stdout.contains("service.ferry.dev/api configured"), "{stdout}");
    assert!(stdout.contains("answered 502 Bad Gateway before the apply, 200 OK"), "{stdout}");
    // The last `ferryctl status`: all five sidecars SYNCED, for every type, at the control plane's generation (its
    // number depends on how registrations and the apply fell into debounce windows).
    let last = stdout.rsplit("$ ferryctl status").next().unwrap();
    let generation = last.split("control plane generation ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    assert_eq!(
        last.matches(&format!("SYNCED {generation} ")).count(),
        25,
        "five sidecars x five types in sync after the change:\n{stdout}"
    );
    assert_eq!(stdout.matches("exited: exit status: 0").count(), 2, "{stdout}");
}
