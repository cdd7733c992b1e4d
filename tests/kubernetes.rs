//! Kubernetes mode for real, short of a cluster: `ferry-control --discovery kubernetes` against a local server
//! speaking the API's JSON (lists, streamed watches with deletes, bookmarks and a `410 Gone` relist, TokenReviews),
//! with a real proxy that gets its certificate with a ServiceAccount token and its config over xDS; and the proxy
//! started with the environment the injector writes, answering the app's rewritten probes on its health port while
//! the app's own port accepts only mesh mTLS.

use ferry_test_support::{self as support, apiserver, control, mesh};

use std::process::Command;
use std::time::Duration;

use apiserver::{
    AUTHZ, ApiServer, CONFIGMAPS, CRDS, DEPLOYMENTS, GRPC_ROUTES, HTTP_ROUTES, NAMESPACES, PODS, REFERENCE_GRANTS,
    SECRETS, SERVICES, SLICES, TRAFFIC, WEBHOOKS,
};
use control::{ControlPlane, KubeControl, state_dir};
use ferry_api::kubernetes::inject;
use mesh::{proxy, service};
use serde_json::{Value, json};
use support::free_addr;
use support::{Ferry, TempDir, backend, http_exchange_full, http_get, metric_value, wait_until};

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
        let addrs = [support::free_addr(), support::free_addr(), support::free_addr()];
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

fn pod(name: &str, account: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                        "labels": {"app": account, "ferry.dev/injected": "true"}},
           "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "app"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn kube_service(name: &str, cluster_ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "shop"},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"app": name},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
}

fn slice(service: &str, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
                                "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
        })
        .collect();
    json!({"metadata": {"name": format!("{service}-abcde"), "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}

/// A bound ServiceAccount token's review, as the API server answers it.
fn reviewed(account: &str, pod: &str) -> Value {
    json!({"authenticated": true, "audiences": ["ferry.dev"],
           "user": {"username": format!("system:serviceaccount:shop:{account}"), "uid": "sa-uid",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:shop"],
                    "extra": {"authentication.kubernetes.io/pod-name": [pod],
                              "authentication.kubernetes.io/pod-uid": [format!("uid-{pod}")]}}})
}

/// A real `ferry-control --discovery kubernetes` against `api`, once it has synced and serves: (it, its xDS address,
/// its state directory).
fn start_control(api: &ApiServer, dir: &TempDir) -> (KubeControl, std::net::SocketAddr, std::path::PathBuf) {
    let cp = tokio::task::block_in_place(|| KubeControl::start(dir.path(), &api.kubeconfig(dir.path()), free_addr()));
    let (xds, state) = (cp.xds, cp.state.clone());
    (cp, xds, state)
}

/// A series of the control plane's metrics (0 when absent).
fn control_metric(cp: &KubeControl, series: &str) -> f64 {
    metric_value(&http_get(cp.metrics, "/metrics").map(|r| r.1).unwrap_or_default(), series)
}

/// The environment of a Kubernetes-mode proxy for pod `shop/<pod>`, whose projected token (`token-<pod>`) is in the
/// returned file.
fn proxy_env(
    dir: &TempDir,
    xds: std::net::SocketAddr,
    state: &std::path::Path,
    pod: &str,
) -> (std::path::PathBuf, [(&'static str, String); 6]) {
    let token = dir.path().join("token");
    std::fs::write(&token, format!("token-{pod}")).unwrap();
    let env = [
        ("FERRY_CONTROL_ADDR", xds.to_string()),
        ("FERRY_CA_ROOT", state.join("ca.crt").display().to_string()),
        ("FERRY_SERVICE_ACCOUNT_TOKEN", token.display().to_string()),
        ("FERRY_NODE_ID", format!("{pod}.shop")),
        ("FERRY_NAMESPACE", "shop".into()),
        // These tests read the cluster's objects as the mesh model has them: through a proxy that subscribes to the
        // whole mesh (on-demand proxies hold only what they call; the pod harness and tests/xds.rs cover those).
        ("FERRY_ON_DEMAND", "off".into()),
    ];
    (token, env)
}

/// Fail closed: a proxy whose pod the control plane does not know as meshed yet holds its certificate but is told
/// nothing of what it serves: it is not ready, and an inbound request waits. Once the pod is known, the request is
/// decided by its Service's policy (here: refused), never served without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_waits_for_what_the_pod_serves_and_is_never_served_without_its_policy() {
    let app = backend::http_backend().await;
    let api = ApiServer::start().await;
    let dir = TempDir::new("k8s-fail-closed");
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop"}}));
    let mut late = pod("late-1", "late", "127.0.0.1");
    late["metadata"]["labels"] = json!({"app": "late"});
    api.apply(PODS, late.clone());
    api.token("token-late-1", reviewed("late", "late-1"));
    api.apply(
        SERVICES,
        json!({"metadata": {"name": "late", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.50", "selector": {"app": "late"},
                        "ports": [{"name": "http", "port": 80, "targetPort": app.addr.port(), "protocol": "TCP"}]}}),
    );
    api.apply(
        AUTHZ,
        json!({"metadata": {"name": "late", "namespace": "shop", "generation": 1},
               "spec": {"targetRef": {"kind": "Service", "name": "late"}, "defaultAction": "deny",
                        "allow": [{"from": {"namespaces": ["shop"]}}]}}),
    );
    let (cp, xds, state) = start_control(&api, &dir);
    let (_, env) = proxy_env(&dir, xds, &state, "late-1");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let proxy = Ferry::spawn(None, &env);
    let connected = || cp.logs().contains("proxy connected");
    tokio::task::block_in_place(|| wait_until("the proxy's stream opens", Duration::from_secs(20), connected));
    let inbound = proxy.inbound;
    let held = std::thread::spawn(move || http_exchange_full(inbound, "GET", "/", &[], ""));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!held.is_finished(), "the request waits for the pod's policy");
    assert_ne!(http_get(proxy.health, "/health/ready").map(|r| r.0), Some(200), "not ready: {}", proxy.logs());
    // Injected: the pod is meshed, its Workload (Service `late`, deny by default) reaches the proxy.
    late["metadata"]["labels"]["ferry.dev/injected"] = json!("true");
    api.apply(PODS, late);
    let answer = tokio::task::block_in_place(|| held.join().unwrap()).expect("an answer");
    assert_eq!((answer.status, answer.header("ferry-proxy-error")), (403, Some("unauthorized")), "{answer:?}");
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "the app was never reached");
    tokio::task::block_in_place(|| {
        wait_until("ready", Duration::from_secs(10), || {
            http_get(proxy.health, "/health/ready").is_some_and(|r| r.0 == 200)
        })
    });
}

/// The services a proxy's snapshot holds: `name` → (endpoints, addresses).
fn proxy_services(p: &Ferry) -> std::collections::BTreeMap<String, (Vec<Value>, Vec<Value>)> {
    let dump: Value = serde_json::from_str(&http_get(p.admin, "/config_dump").unwrap().1).unwrap();
    dump["snapshot"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let spec = &s["spec"];
            (
                s["name"].as_str().unwrap().to_string(),
                (spec["endpoints"].as_array().unwrap().clone(), spec["addresses"].as_array().unwrap().clone()),
            )
        })
        .collect()
}

fn proxy_policies(p: &Ferry) -> Vec<Value> {
    let dump: Value = serde_json::from_str(&http_get(p.admin, "/config_dump").unwrap().1).unwrap();
    dump["snapshot"]["policies"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_discovery_and_identity_through_the_api_server() {
    let api = ApiServer::start().await;
    let dir = TempDir::new("k8s-discovery");
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop", "labels": {"ferry.dev/inject": "enabled"}}}));
    api.apply(NAMESPACES, json!({"metadata": {"name": "ferry-system"}}));
    api.apply(
        WEBHOOKS,
        json!({"metadata": {"name": "ferry-injector"}, "webhooks": [{"name": "inject.ferry.dev",
        "admissionReviewVersions": ["v1"], "sideEffects": "None",
        "clientConfig": {"service": {"name": "ferry-control", "namespace": "ferry-system", "path": "/inject"}}}]}),
    );
    api.apply(SERVICES, kube_service("api", "10.96.0.20"));
    api.apply(SLICES, slice("api", &[("10.1.0.5", "api-1")]));
    api.apply(PODS, pod("api-1", "api", "10.1.0.5"));
    // The proxy under test runs as web-1, whose pod IP is where its connections come from.
    api.apply(PODS, pod("web-1", "web", "127.0.0.1"));
    api.token("token-web-1", reviewed("web", "web-1"));
    api.token("token-ghost", reviewed("web", "ghost-1"));

    let (cp, xds, state) = start_control(&api, &dir);
    for kind in [SERVICES, SLICES, PODS, NAMESPACES, TRAFFIC, AUTHZ] {
        assert_eq!(api.lists(kind), 1, "{} listed once: {}", kind.plural, cp.logs());
    }

    // The mesh root: created in the Secret ferry-ca, published to the labelled namespace, set as the webhook's CA.
    let secret = api.get(SECRETS, "ferry-system", "ferry-ca").expect("the Secret ferry-ca was created");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let root = String::from_utf8(b64.decode(secret["data"]["tls.crt"].as_str().unwrap()).unwrap()).unwrap();
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(std::fs::read_to_string(state.join("ca.crt")).unwrap(), root);
    tokio::task::block_in_place(|| {
        wait_until("the ferry-ca-root ConfigMap and the webhook caBundle", Duration::from_secs(20), || {
            let cm = api.get(CONFIGMAPS, "shop", "ferry-ca-root");
            let hook = api.get(WEBHOOKS, "", "ferry-injector").unwrap();
            cm.is_some_and(|c| c["data"]["root.pem"] == root.as_str())
                && hook["webhooks"][0]["clientConfig"]["caBundle"]
                    .as_str()
                    .is_some_and(|b| b64.decode(b).unwrap() == root.as_bytes())
        })
    });

    // A proxy with web-1's projected token gets its certificate (TokenReview, matched to the pod) and its config.
    let (token, env) = proxy_env(&dir, xds, &state, "web-1");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let web = tokio::task::block_in_place(|| Ferry::start(None, &env_refs));
    let reviews = api.reviews();
    assert_eq!(reviews[0]["spec"], json!({"token": "token-web-1", "audiences": ["ferry.dev"]}), "{reviews:?}");
    let status = cp.proxies();
    assert_eq!(status["proxies"][0]["identity"], "spiffe://cluster.local/ns/shop/sa/web", "{status}");
    let services = proxy_services(&web);
    let (endpoints, addresses) = &services["api"];
    assert_eq!(endpoints, &vec![json!({"address": "10.1.0.5", "identity": "api"})]);
    assert!(
        addresses.contains(&json!("10.96.0.20")) && addresses.contains(&json!("api.shop.svc.cluster.local")),
        "{addresses:?}"
    );

    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        tokio::task::block_in_place(|| wait_until(what, Duration::from_secs(20), f));
    };
    // MODIFIED: a second endpoint; a BOOKMARK changes nothing; DELETED: the Service goes.
    api.apply(PODS, pod("api-2", "api", "10.1.0.6"));
    api.apply(SLICES, slice("api", &[("10.1.0.5", "api-1"), ("10.1.0.6", "api-2")]));
    wait("the new endpoint reaches the proxy", &mut || proxy_services(&web)["api"].0.len() == 2);
    api.bookmark(SERVICES);
    api.bookmark(SLICES);
    api.apply(SERVICES, kube_service("cart", "10.96.0.30"));
    wait("cart arrives after the bookmarks", &mut || proxy_services(&web).contains_key("cart"));
    assert_eq!(proxy_services(&web)["api"].0.len(), 2);
    api.delete(SERVICES, "shop", "cart");
    wait("the deleted Service leaves the proxy", &mut || !proxy_services(&web).contains_key("cart"));

    // 410 Gone: what changed while the watch was down arrives with the relist.
    api.apply_silently(SERVICES, kube_service("orders", "10.96.0.40"));
    api.expire_watches(SERVICES);
    wait("the relist after 410 Gone brings orders", &mut || proxy_services(&web).contains_key("orders"));
    assert!(api.lists(SERVICES) >= 2, "services listed again");

    // Policies: an invalid one is refused in its status (and not served), fixed it is Accepted and served.
    let mut policy = json!({"metadata": {"name": "orders", "namespace": "shop", "generation": 1,
                                          "creationTimestamp": "2026-12-01T00:00:00Z"},
                            "spec": {"targetRef": {"kind": "Service", "name": "orders"}, "timeout": "1s",
                                     "retries": {"attempts": 2, "perTryTimeout": "3s"}}});
    api.apply(TRAFFIC, policy.clone());
    let condition = |api: &ApiServer| api.get(TRAFFIC, "shop", "orders").map(|p| p["status"]["conditions"][0].clone());
    wait("the Accepted=False condition", &mut || condition(&api).is_some_and(|c| c["status"] == "False"));
    let c = condition(&api).unwrap();
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str(), c["observedGeneration"].as_i64()),
        (Some("Accepted"), Some("Invalid"), Some(1))
    );
    assert!(
        c["message"].as_str().unwrap().contains("spec.retries.perTryTimeout: 3s is longer than spec.timeout 1s"),
        "{c}"
    );
    assert!(proxy_policies(&web).is_empty(), "nothing invalid reaches a proxy");
    policy["metadata"]["generation"] = json!(2);
    policy["spec"]["retries"]["perTryTimeout"] = json!("500ms");
    api.apply(TRAFFIC, policy);
    wait("the Accepted=True condition", &mut || condition(&api).is_some_and(|c| c["status"] == "True"));
    assert_eq!(condition(&api).unwrap()["observedGeneration"], 2);
    wait("the accepted policy reaches the proxy", &mut || !proxy_policies(&web).is_empty());

    // ferryctl in Kubernetes mode, through the same API server: the CRDs and the control plane installed (its
    // replica's /v1/status reached through pods/portforward).
    for crd in ["trafficpolicies", "authorizationpolicies"] {
        let text = std::fs::read_to_string(format!("{}/deploy/crds/{crd}.ferry.dev.yaml", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
        api.apply(CRDS, serde_saphyr::from_str(&text).unwrap());
    }
    let labels = json!({"app.kubernetes.io/name": "ferry-control"});
    api.apply(DEPLOYMENTS, json!({"metadata": {"name": "ferry-control", "namespace": "ferry-system"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "ferry-control", "image": "control"}]}}},
        "status": {"replicas": 1, "readyReplicas": 1}}));
    api.apply(
        PODS,
        json!({"metadata": {"name": "ferry-control-0", "namespace": "ferry-system", "uid": "uid-cp", "labels": labels},
        "spec": {"containers": [{"name": "ferry-control", "image": "control"}]}, "status": {"phase": "Running"}}),
    );
    api.forward_pod_port("ferry-system", "ferry-control-0", 15011, cp.status);
    let kubeconfig = api.kubeconfig_as(dir.path(), "admin-token");
    let ctl = |args: &[&str]| {
        let out = Command::new(control::ctl_bin())
            .arg("--kubernetes")
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The api pods are meshed and running but have no proxy here: check says so, with a hint, and fails.
    let (ok, out, err) = tokio::task::block_in_place(|| ctl(&["check"]));
    assert!(!ok, "{out}{err}");
    for line in [
        "\u{2714} Kubernetes API server reachable (v1.33)",
        "\u{2714} CRD trafficpolicies.ferry.dev installed",
        "\u{2714} CRD authorizationpolicies.ferry.dev installed",
        "\u{2714} control plane ready (1/1 replicas of ferry-system/ferry-control)",
        "\u{2714} injector webhook ferry-injector configured with the mesh root",
        "\u{2714} proxy web-1.shop (spiffe://cluster.local/ns/shop/sa/web) in sync",
        "\u{2718} 2 meshed pod(s) not connected to the control plane: api-1.shop, api-2.shop",
        "    hint: kubectl logs <pod> -c ferry-proxy",
        // The Gateway API is optional: without its CRDs, a warning (routing by HTTPRoute is off), not a failure.
        "\u{203c} Gateway API CRD httproutes.gateway.networking.k8s.io not installed: routing by HTTPRoute is off",
        "\u{203c} Gateway API CRD grpcroutes.gateway.networking.k8s.io not installed: routing by GRPCRoute is off",
        "\u{203c} Gateway API CRD referencegrants.gateway.networking.k8s.io not installed: no ReferenceGrant can permit a route's backend in another namespace",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
    for crd in apiserver::gateway_api_crds() {
        api.apply(CRDS, crd);
    }
    assert!(out.contains("\u{2714} mesh root (ferry-system/ferry-ca) valid for 36"), "{out}");
    api.delete(PODS, "shop", "api-1");
    api.delete(PODS, "shop", "api-2");
    let (ok, out, err) = tokio::task::block_in_place(|| ctl(&["check"]));
    assert!(ok, "{out}{err}");
    assert!(out.lines().filter(|l| !l.starts_with("all ")).all(|l| l.starts_with('\u{2714}')), "{out}");
    assert!(out.contains("\u{2714} every running meshed pod's proxy connected (1)"), "{out}");
    assert!(
        out.contains("\u{2714} Gateway API CRD httproutes.gateway.networking.k8s.io installed (serving v1)"),
        "{out}"
    );
    // A route applied with a field the installed (standard-channel) CRD lacks: the API server pruned it, and check
    // names the route with a warning (the check still passes).
    let applied = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "retried", "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                 "rules": [{"retry": {"codes": [503]}, "backendRefs": [{"name": "api", "port": 80}]}]}});
    let mut pruned = applied.clone();
    pruned["spec"]["rules"][0].as_object_mut().unwrap().remove("retry");
    pruned["metadata"]["annotations"] =
        json!({"kubectl.kubernetes.io/last-applied-configuration": applied.to_string()});
    api.apply(HTTP_ROUTES, pruned);
    let (ok, out, err) = tokio::task::block_in_place(|| ctl(&["check"]));
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("\u{203c} the installed HTTPRoute CRD lacks spec.rules[].retry, which HTTPRoute shop/retried set: the API server dropped it"),
        "{out}"
    );
    assert!(out.contains("experimental-install.yaml"), "{out}");
    api.delete(HTTP_ROUTES, "shop", "retried");
    // A stale CRD is noticed.
    let mut crd = api.get(CRDS, "", "trafficpolicies.ferry.dev").unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = json!("an older release");
    api.apply(CRDS, crd);
    let (ok, out, _) = tokio::task::block_in_place(|| ctl(&["check"]));
    assert!(!ok && out.contains("\u{2718} CRD trafficpolicies.ferry.dev installed but not this version's"), "{out}");

    // ferryctl apply writes the CRD object (server-side apply) after the control plane's own checks.
    let file = dir.path().join("authz.yaml");
    std::fs::write(&file, "apiVersion: ferry.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders, namespace: shop}\nspec: {targetRef: {kind: Service, name: orders}, defaultAction: deny, allow: [{from: {namespaces: [shop]}}]}\n").unwrap();
    let (ok, out, err) = tokio::task::block_in_place(|| ctl(&["apply", "-f", file.to_str().unwrap()]));
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("authorizationpolicy.ferry.dev/orders serverside-applied"), "{out}");
    assert_eq!(api.get(AUTHZ, "shop", "orders").unwrap()["spec"]["defaultAction"], "deny");
    wait("the applied AuthorizationPolicy is accepted", &mut || {
        api.get(AUTHZ, "shop", "orders").is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
    });
    std::fs::write(&file, "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: cart, namespace: shop}\nspec: {targetRef: {kind: Service, name: cart}, retries: {attempts: 11}}\n").unwrap();
    let (ok, _, err) = tokio::task::block_in_place(|| ctl(&["apply", "-f", file.to_str().unwrap()]));
    assert!(!ok && err.contains("spec.retries.attempts: must be 0-10"), "{err}");
    assert!(api.get(TRAFFIC, "shop", "cart").is_none(), "nothing invalid is written");
    let (ok, out, err) = tokio::task::block_in_place(|| ctl(&["status", "-o", "json"]));
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (status["proxies"][0]["node"].as_str(), status["proxies"][0]["controlPlane"].as_str()),
        (Some("web-1.shop"), Some("ferry-control-0"))
    );
    // ...read through pods/portforward to the replica's loopback, with the caller's credentials; the pod's metrics
    // port, which anyone in the cluster reaches, lists no proxy.
    let forwarded = "/api/v1/namespaces/ferry-system/pods/ferry-control-0/portforward";
    assert!(
        api.calls_with("admin-token").iter().any(|(m, p, q)| m == "GET" && p == forwarded && q.contains("ports=15011"))
    );
    assert_eq!(http_get(cp.metrics, "/status").map(|r| r.0), Some(404));

    // A token bound to a pod that does not exist gets no certificate.
    std::fs::write(&token, "token-ghost").unwrap();
    let ghost = Ferry::spawn(None, &env_refs);
    wait("the ghost's certificate request is refused", &mut || {
        control_metric(&cp, "ferry_control_certificate_requests_refused_total{reason=\"no-pod\"}") >= 1.0
    });
    assert_ne!(http_get(ghost.health, "/health/startup").map(|r| r.0), Some(200), "no identity, not started");
    assert!(cp.logs().contains("pod shop/ghost-1 does not exist"), "{}", cp.logs());

    // Lineage: a certificate issued on web-1's token names the pod (any replica, or a restarted control plane, can
    // check it); its renewal re-checks that the pod still exists with that uid.
    let root = state.join("ca.crt");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr =
        || rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    let issued = mesh::certify_at(xds, &root, csr(), Some("token-web-1"), None).await.unwrap();
    let leaf = ferry_api::identity::pem_certificates(&issued.chain_pem[0]).unwrap().remove(0);
    let info = ferry_api::identity::inspect(&leaf).unwrap();
    assert_eq!(info.pod, Some(ferry_api::identity::PodRef { name: "web-1".into(), uid: "uid-web-1".into() }));
    let client = Some((issued.chain_pem[0].clone(), key.serialize_pem()));
    assert!(mesh::certify_at(xds, &root, csr(), None, client.clone()).await.is_ok(), "renewed while the pod exists");
    // The pod is deleted: no renewal, and its proxy's xDS stream is closed.
    api.delete(PODS, "shop", "web-1");
    wait("the deleted pod's stream is closed", &mut || {
        cp.logs().contains("pod shop/web-1 was deleted; closing its stream")
    });
    let refused = mesh::certify_at(xds, &root, csr(), None, client).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("pod shop/web-1 does not exist"), "{refused:?}");
    drop(web);

    // RBAC: every call the control plane made here (lists, watches, TokenReviews, the CA Secret, ConfigMaps, policy
    // status, the webhook) is one `deploy/control-plane/rbac.yaml` grants; the check itself refuses what it does not.
    let rbac =
        std::fs::read_to_string(format!("{}/deploy/control-plane/rbac.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let calls = api.calls_with(apiserver::CONTROL_TOKEN);
    assert!(calls.len() > 20, "{calls:?}");
    assert_eq!(apiserver::rbac_violations(&calls, &rbac), Vec::<String>::new());
    let forbidden = [
        ("DELETE", "/api/v1/namespaces/shop/pods/web-1", ""),
        ("GET", "/api/v1/namespaces/shop/secrets/other", ""),
        ("PATCH", "/api/v1/namespaces/ferry-system/secrets/ferry-ca", ""),
        ("PATCH", "/api/v1/namespaces/shop/configmaps/other", ""),
        ("PATCH", "/apis/ferry.dev/v1alpha1/namespaces/shop/trafficpolicies/orders", ""),
    ];
    let forbidden: Vec<(String, String, String)> =
        forbidden.iter().map(|(m, p, q)| (m.to_string(), p.to_string(), q.to_string())).collect();
    let refused = apiserver::rbac_violations(&forbidden, &rbac);
    assert_eq!(refused.len(), 5, "{refused:?}");
    let granted = [("PUT", "/api/v1/namespaces/ferry-system/secrets/ferry-ca", "")]
        .map(|(m, p, q)| (m.into(), p.into(), q.into()));
    assert_eq!(apiserver::rbac_violations(&granted, &rbac), Vec::<String>::new());
}

/// A flood of junk ServiceAccount tokens from one address costs the API server at most the refusal burst plus the
/// configured rate in TokenReviews, while a proxy on another address still gets its certificate; an accepted token is
/// reviewed once and reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tokens_from_one_address_cost_the_api_server_at_most_the_refusal_rate() {
    let api = ApiServer::start().await;
    let dir = TempDir::new("k8s-reviews");
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop", "labels": {"ferry.dev/inject": "enabled"}}}));
    api.apply(PODS, pod("web-1", "web", "127.0.0.2"));
    // A JWT-shaped token: its `exp` (2100) bounds how long an accepted review is reused.
    let token = "e30.eyJleHAiOjQxMDI0NDQ4MDB9.c2ln";
    api.token(token, reviewed("web", "web-1"));
    let (cp, xds, state) = start_control(&api, &dir);
    let root = state.join("ca.crt");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    let csr = csr.pem().unwrap();

    let started = std::time::Instant::now();
    let attacker = mesh::identity_channel(xds, &root, None, Some("127.0.0.1".parse().unwrap())).await;
    let mut refused = 0;
    for i in 0..1000 {
        let junk = format!("junk-{i}");
        let answer = mesh::certify_on(attacker.clone(), csr.clone(), Some(&junk)).await;
        // Reviewed and refused: UNAUTHENTICATED; refused without a review: RESOURCE_EXHAUSTED.
        let code = answer.err().map(|s| s.code());
        refused += usize::from(matches!(code, Some(tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted)));
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(refused, 1000);
    // The legitimate proxy's pod is on another address: its token is reviewed and accepted, twice over one review.
    let legit = mesh::identity_channel(xds, &root, None, Some("127.0.0.2".parse().unwrap())).await;
    for _ in 0..2 {
        mesh::certify_on(legit.clone(), csr.clone(), Some(token)).await.expect("the legitimate proxy's certificate");
    }
    let reviews = api.reviews();
    let junk = reviews.iter().filter(|r| r["spec"]["token"].as_str().is_some_and(|t| t.starts_with("junk-"))).count();
    // The default: a burst of 10, then 1 per second.
    let allowed = 10.0 + elapsed.ceil();
    assert!((junk as f64) <= allowed, "{junk} TokenReviews for junk tokens in {elapsed:.1} s (allowed {allowed})");
    let legit_reviews = reviews.iter().filter(|r| r["spec"]["token"] == token).count();
    assert_eq!(legit_reviews, 1, "an accepted token is reviewed once, then reused");
    let limited = control_metric(&cp, r#"ferry_control_token_reviews_total{result="rate-limited"}"#);
    assert!(limited >= 1000.0 - allowed, "{limited}");
    assert_eq!(control_metric(&cp, r#"ferry_control_token_reviews_total{result="cached"}"#), 1.0);
}

/// An HTTPRoute object in `ns` attached to Service `parent` (generation 1), with `rules` and `status`.
fn http_route(ns: &str, name: &str, parent: &str, rules: Value, status: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": name, "namespace": ns, "generation": 1, "creationTimestamp": "2026-12-01T00:00:00Z"},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}], "rules": rules},
           "status": status})
}

/// Ferry's `status.parents` conditions of a route of `kind`: (type, status, reason) per condition, and the number of
/// other controllers' entries.
fn conditions_of(api: &ApiServer, kind: apiserver::Kind, name: &str) -> (Vec<(String, String, String)>, usize) {
    let Some(route) = api.get(kind, "shop", name) else { return (Vec::new(), 0) };
    let parents = route["status"]["parents"].as_array().cloned().unwrap_or_default();
    let (ours, theirs): (Vec<Value>, Vec<Value>) =
        parents.into_iter().partition(|p| p["controllerName"] == "ferry.dev/mesh");
    let conditions = ours
        .iter()
        .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("status"), s("reason"))
        })
        .collect();
    (conditions, theirs.len())
}

/// [`conditions_of`] an HTTPRoute.
fn route_conditions(api: &ApiServer, name: &str) -> (Vec<(String, String, String)>, usize) {
    conditions_of(api, HTTP_ROUTES, name)
}

/// The Gateway API is optional and may come after the control plane: once its CRDs are installed, HTTPRoutes and
/// ReferenceGrants are watched, their routes reach the proxies, and each route's status says what Ferry made of it
/// (other controllers' entries kept). Every call stays within the ClusterRole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_are_watched_once_the_gateway_api_is_installed_and_their_status_written() {
    let api = ApiServer::start().await;
    let dir = TempDir::new("k8s-routes");
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop"}}));
    api.apply(NAMESPACES, json!({"metadata": {"name": "billing"}}));
    for (name, ip) in [("api", "10.96.0.20"), ("api-v2", "10.96.0.21")] {
        api.apply(SERVICES, kube_service(name, ip));
    }
    let mut invoices = kube_service("invoices", "10.96.0.30");
    invoices["metadata"]["namespace"] = json!("billing");
    api.apply(SERVICES, invoices);
    api.apply(PODS, pod("web-1", "web", "127.0.0.1"));
    api.token("token-web-1", reviewed("web", "web-1"));
    let cp = tokio::task::block_in_place(|| {
        KubeControl::start_with(dir.path(), &api.kubeconfig(dir.path()), free_addr(), &["--gateway-api-poll", "1s"])
    });
    let (_, env) = proxy_env(&dir, cp.xds, &cp.state, "web-1");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let web = Ferry::spawn(None, &env);
    let route_sets = |p: &Ferry| -> Vec<String> {
        let dump: Value = serde_json::from_str(&http_get(p.admin, "/config_dump").unwrap().1).unwrap();
        dump["snapshot"]["route_sets"].as_array().into_iter().flatten().map(|s| s.to_string()).collect()
    };
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        tokio::task::block_in_place(|| wait_until(what, Duration::from_secs(20), f))
    };
    wait("web's proxy is ready", &mut || http_get(web.health, "/health/ready").is_some_and(|r| r.0 == 200));
    assert!(cp.logs().contains("Gateway API not installed"), "{}", cp.logs());

    // The CRDs arrive, then the objects: a canary split, a route using a field Ferry does not support, one to a
    // Service that does not exist, one attached to a Service that does not exist, one across namespaces.
    for crd in apiserver::gateway_api_crds() {
        api.apply(CRDS, crd);
    }
    let other = json!({"parents": [{"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway",
                                    "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                                    "message": "", "lastTransitionTime": "2026-12-01T00:00:00Z"}]}]});
    let weights = json!([{"backendRefs": [{"name": "api", "weight": 90}, {"name": "api-v2", "weight": 10}]}]);
    api.apply(HTTP_ROUTES, http_route("shop", "canary", "api", weights, other));
    let filters = json!([{"filters": [{"type": "RequestHeaderModifier"}], "backendRefs": [{"name": "api"}]}]);
    api.apply(HTTP_ROUTES, http_route("shop", "fancy", "api", filters, json!({})));
    api.apply(
        HTTP_ROUTES,
        http_route("shop", "ghost", "api", json!([{"backendRefs": [{"name": "ghost"}]}]), json!({})),
    );
    api.apply(
        HTTP_ROUTES,
        http_route("shop", "nowhere", "nope", json!([{"backendRefs": [{"name": "api"}]}]), json!({})),
    );
    let billing = json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/bills"}}],
                          "backendRefs": [{"name": "invoices", "namespace": "billing"}]}]);
    api.apply(HTTP_ROUTES, http_route("shop", "bills", "api", billing, json!({})));

    wait("web's proxy holds api's routes", &mut || route_sets(&web) == ["\"shop/api/shop\""]);
    let c = |t: &str, s: &str, r: &str| (t.to_string(), s.to_string(), r.to_string());
    let ok = vec![c("Accepted", "True", "Accepted"), c("ResolvedRefs", "True", "ResolvedRefs")];
    wait("the canary's status", &mut || route_conditions(&api, "canary") == (ok.clone(), 1));
    // Each route's status is written as the control plane gets to it.
    for (route, want) in [
        ("fancy", vec![c("Accepted", "False", "UnsupportedValue")]),
        ("ghost", vec![c("Accepted", "True", "Accepted"), c("ResolvedRefs", "False", "BackendNotFound")]),
        ("nowhere", vec![c("Accepted", "False", "NoMatchingParent"), c("ResolvedRefs", "True", "ResolvedRefs")]),
        ("bills", vec![c("Accepted", "True", "Accepted"), c("ResolvedRefs", "False", "RefNotPermitted")]),
    ] {
        wait(&format!("{route}'s status"), &mut || route_conditions(&api, route).0 == want);
    }
    let message = api.get(HTTP_ROUTES, "shop", "fancy").unwrap()["status"]["parents"][0]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("spec.rules[0]") && message.contains("filters"), "{message}");
    // The ReferenceGrant in billing lets shop's routes point at its Services.
    api.apply(
        REFERENCE_GRANTS,
        json!({"metadata": {"name": "shop-routes", "namespace": "billing"},
               "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
                        "to": [{"group": "", "kind": "Service"}]}}),
    );
    wait("the grant resolves bills", &mut || route_conditions(&api, "bills").0 == ok);
    // A GRPCRoute on api takes it from shop's HTTPRoutes (GEP-1426), which say so (which routes a set then holds:
    // ferry-api's `grpc_routes_attach_and_win_over_http_routes`).
    let mut rpc = http_route(
        "shop",
        "rpc",
        "api",
        json!([{"matches": [{"method": {"service": "test.Echo"}}],
                                                            "backendRefs": [{"name": "api-v2"}]}]),
        json!({}),
    );
    rpc["kind"] = json!("GRPCRoute");
    api.apply(GRPC_ROUTES, rpc);
    wait("the GRPCRoute's status", &mut || conditions_of(&api, GRPC_ROUTES, "rpc").0 == ok);
    let conflicted = vec![c("Accepted", "False", "Conflicted"), c("ResolvedRefs", "True", "ResolvedRefs")];
    wait("the canary yields", &mut || route_conditions(&api, "canary").0 == conflicted);
    api.delete(GRPC_ROUTES, "shop", "rpc");
    wait("the canary is back", &mut || route_conditions(&api, "canary").0 == ok);
    // A deleted route leaves the proxy.
    for name in ["canary", "fancy", "ghost", "nowhere", "bills"] {
        api.delete(HTTP_ROUTES, "shop", name);
    }
    wait("the routes leave web's proxy", &mut || route_sets(&web).is_empty());

    let rbac =
        std::fs::read_to_string(format!("{}/deploy/control-plane/rbac.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let calls = api.calls_with(apiserver::CONTROL_TOKEN);
    assert!(calls.iter().any(|(m, p, _)| m == "PATCH" && p.ends_with("/httproutes/canary/status")), "{calls:?}");
    assert!(calls.iter().any(|(m, p, _)| m == "PATCH" && p.ends_with("/grpcroutes/rpc/status")), "{calls:?}");
    assert_eq!(apiserver::rbac_violations(&calls, &rbac), Vec::<String>::new());
}
