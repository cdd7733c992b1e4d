//! The pod suite: pods made from `ferryctl inject`'s output run in real containers of the images `deploy/Dockerfile`
//! builds, on a small test node (`node.rs`; Docker Engine, root).

#[path = "../../xds/tests/support/apiserver.rs"]
mod apiserver;
#[path = "../../xds/tests/support/mod.rs"]
mod control;
mod node;
#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use apiserver::{AUTHZ, ApiServer, NAMESPACES, PODS, SERVICES, SLICES};
use control::KubeControl;
use ferry_xds::kubernetes::inject;
use node::{APP_IMAGE, Node, Pod, docker_must, images};
use serde_json::{Value, json};

/// A Pod `shop/<name>` (service account `account`, one app container) as `ferryctl inject` writes it.
fn injected(name: &str, account: &str) -> Value {
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": {"app": account}},
        "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "example.com/app:1"}]}});
    let (out, _) = inject::inject_yaml(&pod.to_string(), &inject::Settings::default()).unwrap();
    serde_saphyr::from_str(&out).unwrap()
}

/// The node's image for an image a spec names: the proxy's is the locally built one.
fn local_image(name: &str) -> String {
    let default = inject::Settings::default().proxy_image;
    assert_eq!(name, default, "the node runs only the project's images");
    images().proxy.clone()
}

/// The pod's volumes as the node mounts them: the `ferry-ca-root` ConfigMap and the projected token, as files.
fn volumes(node: &Node, pod: &str) -> BTreeMap<String, std::path::PathBuf> {
    let ca = node.dir.path().join(format!("{pod}-ca"));
    let token = node.dir.path().join(format!("{pod}-token"));
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::create_dir_all(&token).unwrap();
    let root = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(ca.join("root.pem"), root.pem()).unwrap();
    std::fs::write(token.join("token"), format!("token-{pod}")).unwrap();
    BTreeMap::from([("ferry-ca-root".to_string(), ca), ("ferry-token".to_string(), token)])
}

/// Injected containers run with exactly the security context the spec gives them, and no more: `ferry-init` writes
/// the pod's rules with NET_ADMIN and NET_RAW only (and fails without NET_ADMIN); the proxy runs as UID 1337, with
/// every capability dropped, on a read-only root (where a write fails), and answers its liveness probe.
#[test]
fn injected_containers_run_with_no_more_than_their_spec_grants() {
    if !node::available("injected_containers_run_with_no_more_than_their_spec_grants") {
        return;
    }
    let node = Node::new("sec");
    let pod = node.pod("api-1", 10, &[], injected("api-1", "api"), volumes(&node, "api-1"));
    let inits = pod.init_containers();
    let (init, proxy) = (&inits[0], &inits[1]);
    assert_eq!((init["name"].as_str(), proxy["name"].as_str()), (Some("ferry-init"), Some("ferry-proxy")));

    // The honesty of the node first: without NET_ADMIN, ferry init cannot write the rules, and says so.
    let mut weaker = init.clone();
    weaker["securityContext"]["capabilities"]["add"] = json!(["NET_RAW"]);
    let out = node.run_init(&pod, &weaker, &local_image);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "ferry init without NET_ADMIN succeeded: {said}");
    assert!(said.contains("not permitted") || said.contains("Permission denied"), "{said}");

    // As injected: the rules are in the pod's namespace, the reserved delivery source's RETURN among them.
    let out = node.run_init(&pod, init, &local_image);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ferry init as injected failed: {said}");
    let network = format!("container:{}", pod.pause);
    let base = &images().base;
    let rules =
        docker_must(&["run", "--rm", "--network", &network, "--cap-add=NET_ADMIN", base, "iptables-save", "-t", "nat"]);
    assert!(
        rules.contains(":FERRY_INBOUND") && rules.contains("-A FERRY_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN"),
        "{rules}"
    );

    // The proxy: UID 1337, no capability, read-only root; alive (it has no control plane here to start).
    let name = node.start(&pod, proxy, &local_image);
    let probe = node.wait_probe(&pod, &proxy["livenessProbe"], Duration::from_secs(20));
    assert!(probe.is_ok(), "{probe:?}\n{}", node.logs(&name));
    let pid = docker_must(&["inspect", "--format", "{{.State.Pid}}", &name]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = |key: &str| status.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_string();
    assert!(line("Uid:").split_whitespace().skip(1).all(|u| u == "1337"), "{}", line("Uid:"));
    assert!(line("CapEff:").ends_with("0000000000000000"), "{}", line("CapEff:"));
    // Honesty again: a container with the proxy's security context cannot write to its root.
    let mut writer = proxy.clone();
    writer["name"] = json!("writer");
    writer["command"] = json!(["/bin/sh", "-c", "echo x > /written"]);
    writer["args"] = json!([]);
    let out = node.run_init(&pod, &writer, &local_image);
    assert!(!out.status.success(), "a write to a read-only root succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
}

/// `ferry-control --discovery kubernetes` on the host, serving the node's pods on the network's gateway.
fn start_control(api: &ApiServer, node: &Node) -> KubeControl {
    let xds = format!("{}.1:15010", node.prefix).parse().unwrap();
    KubeControl::start(node.dir.path(), &api.kubeconfig(node.dir.path()), xds)
}

/// A meshed pod `shop/<name>` whose app is the tests' own server on 8080, as injection wrote it, with its Pod object
/// and its token in the API server.
fn meshed_pod(node: &Node, api: &ApiServer, control: &KubeControl, name: &str, account: &str, n: u8) -> Pod {
    let spec = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": {"app": account}},
        "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": APP_IMAGE,
                 "command": ["/pod_app", "serve", "8080", "lo:9999"], "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}});
    let settings = inject::Settings::new(None, "ferry-control.ferry-system.svc:15010".into(), true);
    let (out, _) = inject::inject_yaml(&spec.to_string(), &settings).unwrap();
    let mut spec: Value = serde_saphyr::from_str(&out).unwrap();
    let gateway = format!("{}.1", node.prefix);
    let volumes = volumes(node, name);
    std::fs::copy(control.state.join("ca.crt"), volumes["ferry-ca-root"].join("root.pem")).unwrap();
    spec["metadata"]["uid"] = json!(format!("uid-{name}"));
    let pod = node.pod(name, n, &[("ferry-control.ferry-system.svc", &gateway)], spec, volumes);
    let mut object = pod.spec.clone();
    object["status"] = json!({"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]});
    api.apply(PODS, object);
    api.token(
        &format!("token-{name}"),
        json!({"authenticated": true, "audiences": ["ferry.dev"],
               "user": {"username": format!("system:serviceaccount:shop:{account}"), "uid": "sa",
                        "extra": {"authentication.kubernetes.io/pod-name": [name],
                                  "authentication.kubernetes.io/pod-uid": [format!("uid-{name}")]}}}),
    );
    pod
}

/// Injected pods in real containers, joined to a real control plane through the fake API server: the proxy starts
/// (its startup probe passes) before the app, and the AuthorizationPolicy of `api` lets `web` in and refuses `batch`,
/// with unmodified clients calling the Service's ClusterIP from inside their pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pods_call_each_other_through_their_proxies() {
    if !node::available("injected_pods_call_each_other_through_their_proxies") {
        return;
    }
    let api = ApiServer::start().await;
    let node = tokio::task::block_in_place(|| Node::new("mesh"));
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop", "labels": {"ferry.dev/inject": "enabled"}}}));
    let mut control = tokio::task::block_in_place(|| start_control(&api, &node));
    let pods: Vec<Pod> = [("api-1", "api", 20), ("web-1", "web", 21), ("batch-1", "batch", 22)]
        .iter()
        .map(|(name, account, n)| meshed_pod(&node, &api, &control, name, account, *n))
        .collect();
    let (api_pod, web, batch) = (&pods[0], &pods[1], &pods[2]);
    api.apply(
        SERVICES,
        json!({"metadata": {"name": "api", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "selector": {"app": "api"},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}),
    );
    api.apply(
        SLICES,
        json!({"metadata": {"name": "api-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [api_pod.ip], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "shop", "uid": "uid-api-1"}}]}),
    );
    api.apply(
        AUTHZ,
        json!({"metadata": {"name": "api", "namespace": "shop", "generation": 1},
               "spec": {"targetRef": {"kind": "Service", "name": "api"}, "defaultAction": "deny",
                        "allow": [{"from": {"identities": ["spiffe://cluster.local/ns/shop/sa/web"]}}]}}),
    );
    for pod in &pods {
        let started = tokio::task::block_in_place(|| node.run_pod(pod, &local_image));
        assert!(started.is_ok(), "{}: {started:?}\n--- control ---\n{}", pod.name, control.logs());
    }
    let call = |pod: &Pod| tokio::task::block_in_place(|| node.get_from(pod, "http://10.96.0.20/"));
    tokio::task::block_in_place(|| {
        support::wait_until("web reaches api", Duration::from_secs(30), || call(web).starts_with("200"))
    });
    let answer = call(web);
    assert_eq!(answer, "200 \napp on 8080: caller spiffe://cluster.local/ns/shop/sa/web from 127.0.0.6", "{answer}");
    let refused = call(batch);
    assert!(refused.starts_with("403 unauthorized"), "{refused}");

    // A headless Service: clients dial the pod's own IP, still mTLS to the identity the pod's Service names.
    api.apply(
        SERVICES,
        json!({"metadata": {"name": "api-pods", "namespace": "shop"},
               "spec": {"clusterIP": "None", "selector": {"app": "api"},
                        "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]}}),
    );
    let direct = format!("http://{}:8080/", api_pod.ip);
    let answer = tokio::task::block_in_place(|| node.get_from(web, &direct));
    assert_eq!(answer, "200 \napp on 8080: caller spiffe://cluster.local/ns/shop/sa/web from 127.0.0.6", "{answer}");
    let refused = tokio::task::block_in_place(|| node.get_from(batch, &direct));
    assert!(refused.starts_with("403 unauthorized"), "{refused}");

    // What api's app keeps on loopback (port 9999) is not reachable from another pod.
    let private = format!("http://{}:9999/", api_pod.ip);
    let answer = tokio::task::block_in_place(|| node.get_from(web, &private));
    assert!(answer.starts_with("502 connect-refused"), "{answer}");

    // Strict mTLS on api: an unmeshed pod's plaintext is refused; api's rewritten readiness probe (the kubelet's
    // call on the health port) still passes.
    let (kind, strict) = (
        apiserver::TRAFFIC,
        json!({"metadata": {"name": "api", "namespace": "shop", "generation": 1},
        "spec": {"targetRef": {"kind": "Service", "name": "api"}, "mtls": "strict"}}),
    );
    api.apply(kind, strict);
    let outsider = node.pod("outsider", 30, &[], json!({"metadata": {"namespace": "shop"}}), BTreeMap::new());
    let refused = tokio::task::block_in_place(|| {
        let mut last = String::new();
        support::wait_until("strict mode reaches api", Duration::from_secs(20), || {
            last = node.get_from(&outsider, &direct);
            last.contains("mTLS is required")
        });
        last
    });
    assert!(refused.starts_with("403 unauthorized"), "{refused}");
    let probe = api_pod.spec["spec"]["containers"][0]["readinessProbe"].clone();
    assert_eq!(probe["httpGet"]["port"], 15020, "{probe}");
    let passed = tokio::task::block_in_place(|| node.wait_probe(api_pod, &probe, Duration::from_secs(10)));
    assert!(passed.is_ok(), "{passed:?}");

    // ferry-control SIGKILLed and started again while web calls api: no request fails (the proxies keep their config),
    // and every proxy is back in sync with the new one.
    let network = format!("container:{}", web.pause);
    let bin = format!("{}:/pod_app:ro", node::app_binary().display());
    let load_name = format!("{}-load", node.network);
    let base = &images().base;
    let load = [
        "run",
        "-d",
        "--name",
        &load_name,
        "--network",
        &network,
        "--volume",
        &bin,
        base,
        "/pod_app",
        "load",
        "http://10.96.0.20/",
        "150",
        "20",
    ];
    docker_must(&load);
    tokio::time::sleep(Duration::from_millis(800)).await;
    tokio::task::block_in_place(|| control.kill_and_restart());
    docker_must(&["wait", &load_name]);
    let report = docker_must(&["logs", &load_name]);
    let _ = node::docker_run(&["rm", "-f", &load_name]);
    assert_eq!(report.lines().next(), Some("ok 150 failed 0"), "{report}");
    tokio::task::block_in_place(|| {
        support::wait_until("every proxy back in sync", Duration::from_secs(30), || {
            let status = support::http_get(control.metrics, "/status").map(|r| r.1).unwrap_or_default();
            let status: Value = serde_json::from_str(&status).unwrap_or_default();
            let proxies = status["proxies"].as_array().cloned().unwrap_or_default();
            proxies.len() == 3 && proxies.iter().all(|p| p["stale"] == false)
        })
    });

    // A rate limit on api (burst 2, refilled every 100 s): web's third call is answered 429.
    let limited = json!({"metadata": {"name": "api", "namespace": "shop", "generation": 2},
        "spec": {"targetRef": {"kind": "Service", "name": "api"}, "mtls": "strict",
                 "rateLimit": {"requestsPerSecond": 0.01, "burst": 2}}});
    api.apply(apiserver::TRAFFIC, limited);
    tokio::task::block_in_place(|| {
        support::wait_until("the rate limit reaches api", Duration::from_secs(20), || {
            node.get_from(api_pod, "http://127.0.0.1:15000/config_dump").contains("requestsPerSecond")
        })
    });
    let statuses: Vec<String> =
        (0..3).map(|_| call(web).lines().next().unwrap_or_default().trim().to_string()).collect();
    assert_eq!(statuses, ["200", "200", "429 rate-limited"]);

    // Every call the control plane made to the API server is one `deploy/control-plane/rbac.yaml` grants.
    let rbac =
        std::fs::read_to_string(format!("{}/deploy/control-plane/rbac.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let calls = api.calls_with(apiserver::CONTROL_TOKEN);
    assert!(calls.len() > 10, "{calls:?}");
    assert_eq!(apiserver::rbac_violations(&calls, &rbac), Vec::<String>::new());
}
