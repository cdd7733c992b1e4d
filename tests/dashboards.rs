//! The Grafana dashboards against a real Prometheus (Debian's `prometheus`, started here on a loopback port) scraping
//! the demo mesh: the demo runs as the README's command does (with a held end so it can be scraped), one NACK is
//! injected through the test build's route, and every PromQL expression in `deploy/grafana/*.json` is evaluated
//! through Prometheus's HTTP API (template variables and `$__rate_interval` substituted): an error or an empty
//! result fails. Expressions that pad an empty result (`or vector(0)`, `or on() ...`) or use no Ferry or process
//! metric are refused by the test itself.

use ferry_test_support::{self as support, control};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use support::{TempDir, free_port, http_exchange, wait_until};

/// The panels of a dashboard file that show data (rows only group them).
fn data_panels(dashboard: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    dashboard["panels"].as_array().expect("panels").iter().filter(|p| p["type"] != "row")
}

/// The PromQL of every panel target in a dashboard file: (panel title, expression).
fn expressions(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in data_panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().expect("targets") {
            out.push((title.clone(), target["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

/// Why an expression may not be in a dashboard: padded so that it can never be empty, or about no Ferry metric.
fn refusal(expr: &str) -> Option<&'static str> {
    let compact: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.contains("orvector(") {
        return Some("padded with `or vector(...)`");
    }
    if compact.contains("oron(") {
        return Some("padded with `or on(...)`");
    }
    if !(expr.contains("ferry_") || expr.contains("process_")) {
        return Some("references neither a ferry_ nor a process_ metric");
    }
    None
}

/// The expression as Grafana would send it: every variable set to all values, and the rate interval.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s").replace("$service", ".+").replace("$instance", ".+")
}

fn query(prometheus: std::net::SocketAddr, promql: &str) -> serde_json::Value {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_exchange(prometheus, "GET", &format!("/api/v1/query?query={encoded}"), &[], "")
        .expect("Prometheus answers");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("HTTP {status}, not JSON ({e}): {body}"))
}

fn dashboards() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_padding_and_metric_rules_refuse_what_they_should() {
    let cases = [
        ("sum(rate(ferry_requests_total[5m])) or vector(0)", Some("padded with `or vector(...)`")),
        ("sum(ferry_config_version) or on() vector(1)", Some("padded with `or on(...)`")),
        ("sum(rate(http_requests_total[5m]))", Some("references neither a ferry_ nor a process_ metric")),
        ("rate(process_cpu_seconds_total[1m])", None),
        ("sum by (service) (ferry_requests_total)", None),
    ];
    for (expr, want) in cases {
        assert_eq!(refusal(expr), want, "{expr}");
    }
    // And every committed dashboard passes them, with at least one expression per panel.
    for file in dashboards() {
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let exprs = expressions(&d);
        assert!(exprs.len() >= data_panels(&d).count(), "{}", file.display());
        for (title, expr) in exprs {
            assert_eq!(refusal(&expr), None, "{}: {title}: {expr}", file.display());
        }
        let datasource = &d["templating"]["list"][0];
        assert_eq!(
            (datasource["name"].as_str(), datasource["type"].as_str()),
            (Some("datasource"), Some("datasource"))
        );
    }
}

#[test]
fn every_dashboard_expression_has_data_on_a_real_prometheus_scraping_the_demo() {
    let prometheus_present = support::works("prometheus", &["--version"]);
    if !support::prerequisites("dashboards on Prometheus", &[("prometheus (Debian package)", prometheus_present)]) {
        return;
    }
    // The demo, built like tests/demo.rs does, held at its end so that Prometheus can scrape it.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let demo = profile_dir.join("examples").join("demo");
    if !demo.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--example", "demo", "-p", "ferry"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "building the demo example failed");
    }
    let dir = TempDir::new("dashboards");
    let hold = dir.path().join("hold");
    std::fs::create_dir_all(&hold).unwrap();
    let demo_log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let mut demo = Command::new(&demo)
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .env("FERRY_CONTROL_BIN", control::control_bin())
        .env("FERRYCTL_BIN", control::ctl_bin())
        .env("FERRY_DEMO_HOLD", &hold)
        .stdout(demo_log.try_clone().unwrap())
        .stderr(demo_log)
        .spawn()
        .unwrap();
    let demo_output = || std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
    let targets = hold.join("targets.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !targets.exists() {
        if let Some(status) = demo.try_wait().unwrap() {
            panic!("the demo exited ({status}) before holding:\n{}", demo_output());
        }
        assert!(Instant::now() < deadline, "the demo did not reach its hold:\n{}", demo_output());
        std::thread::sleep(Duration::from_millis(200));
    }

    // One NACK: a Service past validation (port 70000), through the test build's injection route, then withdrawn.
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hold.join("control.json")).unwrap()).unwrap();
    let api: std::net::SocketAddr = info["api"].as_str().unwrap().parse().unwrap();
    let bearer = format!("Bearer {}", info["token"].as_str().unwrap());
    let bad = ferry_api::resources::pb::Service {
        meta: Some(ferry_api::resources::pb::Meta {
            name: "quotes".into(),
            namespace: "default".into(),
            ..Default::default()
        }),
        ports: vec![ferry_api::resources::pb::Port { port: 70000, ..Default::default() }],
        identities: vec!["quotes".into()],
        ..Default::default()
    };
    let hex = ferry_api::hex(&bad.encode_to_vec());
    let body =
        serde_json::json!({"typeUrl": ferry_api::protocol::SERVICE_TYPE, "name": "default/quotes", "valueHex": hex});
    let (status, reply) =
        http_exchange(api, "POST", "/v1/testing/inject", &[("Authorization", &bearer)], &body.to_string()).unwrap();
    assert_eq!(status, 200, "the test build of ferry-control has the injection route: {reply}");

    // Prometheus on a loopback port, scraping every second from the demo's file of targets.
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: ferry\n    file_sd_configs: [{{files: [\"{}\"], refresh_interval: 1s}}]\n",
            targets.display()
        ),
    )
    .unwrap();
    let prometheus_log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(prometheus_log)
        .spawn()
        .unwrap();
    let addr = support::loopback(port);
    let prometheus_output = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("Prometheus ready", Duration::from_secs(30), || {
            http_exchange(addr, "GET", "/-/ready", &[], "").is_some_and(|(s, _)| s == 200)
        });
        // Every target up, with at least three scrapes each (rates need two).
        let expected_targets = 6;
        wait_until("every target scraped three times", Duration::from_secs(60), || {
            let r = query(addr, "count_over_time(up[1m]) >= 3 and up == 1");
            r["data"]["result"].as_array().is_some_and(|v| v.len() == expected_targets)
        });
        wait_until("the NACK scraped", Duration::from_secs(30), || {
            let r = query(addr, "sum(ferry_control_xds_nacks_total) > 0");
            r["data"]["result"].as_array().is_some_and(|v| !v.is_empty())
        });
        let mut failures = Vec::new();
        let mut evaluated = 0;
        for file in dashboards() {
            let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            for (title, expr) in expressions(&d) {
                if let Some(why) = refusal(&expr) {
                    failures.push(format!("{}: {title}: {why}: {expr}", file.display()));
                    continue;
                }
                let promql = substitute(&expr);
                let r = query(addr, &promql);
                evaluated += 1;
                let empty = r["data"]["result"].as_array().is_none_or(|v| v.is_empty());
                // The route panels must show a number, not only series: the demo keeps calling api through its
                // route while held, so a rate of 0/0 (NaN) there would mean the labels do not add up.
                let finite =
                    r["data"]["result"].as_array().into_iter().flatten().any(|s| {
                        s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite)
                    });
                if r["status"] != "success" || empty || (title.starts_with("Route") && !finite) {
                    failures.push(format!("{}: {title}: {promql}\n  -> {r}", file.display()));
                }
            }
        }
        eprintln!("{evaluated} dashboard expressions evaluated on Prometheus, {} failed", failures.len());
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert!(evaluated >= 30, "{evaluated}");
    }));
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let (status, _) = http_exchange(api, "DELETE", "/v1/testing/inject", &[("Authorization", &bearer)], "").unwrap();
    assert_eq!(status, 200);
    std::fs::write(hold.join("done"), "").unwrap();
    let exit = demo.wait().unwrap();
    if let Err(e) = result {
        eprintln!("demo output:\n{}\nprometheus log (tail):\n{}", demo_output(), tail(&prometheus_output(), 30));
        std::panic::resume_unwind(e);
    }
    assert!(exit.success(), "the demo failed after the hold:\n{}", demo_output());
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
