//! What injection sets up, run for real: the proxy started with the environment the injector writes answers the app's
//! rewritten probes on its health port while the app's own port accepts only mesh mTLS.

#[path = "../xds/tests/support/mod.rs"]
mod control;
#[path = "support/mesh.rs"]
mod mesh;
mod support;

use std::time::Duration;

use control::{ControlPlane, state_dir};
use ferry_xds::kubernetes::inject;
use mesh::{proxy, service};
use support::{backend, http_exchange_full, http_get};

/// The `FERRY_APP_PROBES` value the injector writes for a pod whose app listens on `port`.
fn injected_app_probes(port: u16) -> String {
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: api, namespace: default}}
spec:
  containers:
  - name: app
    image: example.com/api:1
    ports: [{{name: http, containerPort: {port}}}]
    livenessProbe: {{httpGet: {{path: /status?code=200, port: http}}, periodSeconds: 5}}
    readinessProbe: {{tcpSocket: {{port: {port}}}}}
    startupProbe: {{httpGet: {{path: /status?code=500, port: {port}}}}}
"
    );
    let (out, _) = inject::inject_yaml(&pod, &inject::Settings::default()).unwrap();
    let pod: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    let proxy = pod["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "ferry-proxy").unwrap();
    let env = proxy["env"].as_array().unwrap().iter().find(|e| e["name"] == inject::APP_PROBES_ENV).unwrap();
    assert_eq!(pod["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"], 15020);
    env["value"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_app_probes_work_under_strict_mtls() {
    let app = backend::http_backend().await;
    let probes = injected_app_probes(app.addr.port());
    let cp = tokio::task::block_in_place(|| {
        let addrs = [control::free_addr(), control::free_addr(), control::free_addr()];
        ControlPlane::start_on(&state_dir("k8s-probes"), addrs, &["--mtls-mode", "strict"])
    });
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "api.local", "")));
    let api = tokio::task::block_in_place(|| {
        proxy(&cp, "api", Some(app.addr), &[("FERRY_APP_PROBES", probes), ("FERRY_POD_IP", "127.0.0.1".into())])
    });
    // What the kubelet's own probe would get without the rewrite: strict mTLS refuses plaintext.
    let direct = http_exchange_full(api.inbound, "GET", "/status?code=200", &[], "").unwrap();
    assert_eq!((direct.status, direct.header("ferry-proxy-error")), (403, Some("unauthorized")), "{direct:?}");
    // The rewritten probes, on the health port: the app's answer, or a refused connection as 503.
    let probe = |kind: &str| http_get(api.health, &format!("/app-health/app/{kind}")).unwrap();
    assert_eq!(probe("live").0, 200, "{:?}", probe("live"));
    assert_eq!(probe("ready").0, 200, "{:?}", probe("ready"));
    assert_eq!(probe("startup").0, 500, "the app's own failure is passed on: {:?}", probe("startup"));
    assert_eq!(http_get(api.health, "/app-health/other/live").unwrap().0, 404);
    app.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for kind in ["live", "ready"] {
        let (status, body) = probe(kind);
        assert_eq!(status, 503, "{kind}: {body}");
        assert!(body.contains("app probe to 127.0.0.1:"), "{body}");
    }
    // The proxy's own probes are untouched by all this.
    assert_eq!(http_get(api.health, "/health/ready").unwrap().0, 200);
}
