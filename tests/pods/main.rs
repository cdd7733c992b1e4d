//! The pod suite: pods made from `ferryctl inject`'s output run in real containers of the images `deploy/Dockerfile`
//! builds, on a small test node (`node.rs`; Docker Engine, root).

use ferry_test_support::{self as support, apiserver, control};
mod node;

use std::collections::BTreeMap;
use std::time::Duration;

use apiserver::{AUTHZ, ApiServer, NAMESPACES, TRAFFIC};
use control::KubeControl;
use ferry_api::kubernetes::inject;
use node::{APP_IMAGE, Exit, Node, Pod, docker_must, images};
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
    let pod = node.pod("api-1", 10, injected("api-1", "api"), volumes(&node, "api-1"));
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

/// The node's own honesty: an app container starts only once the native sidecar before it passes its startup probe
/// (here a sidecar that listens only after 2 s, and an app that exits at once if the sidecar does not answer); the
/// same app started without waiting (beside a sidecar that listens only after 30 s) fails, so the check can fail.
#[test]
fn the_app_starts_only_after_the_sidecars_startup_probe_passes() {
    if !node::available("the_app_starts_only_after_the_sidecars_startup_probe_passes") {
        return;
    }
    let node = Node::new("order");
    let spec = |delay: u32, app: &str| {
        json!({"metadata": {"name": "ordered", "namespace": "shop"}, "spec": {
        "initContainers": [{"name": "side", "image": APP_IMAGE, "restartPolicy": "Always",
            "command": ["/bin/sh", "-c", format!("sleep {delay}; exec /pod_app serve 7000")],
            "startupProbe": {"httpGet": {"path": "/", "port": 7000}, "periodSeconds": 1, "failureThreshold": 30}}],
        "containers": [{"name": "app", "image": APP_IMAGE, "command": ["/bin/sh", "-c", app]}]}})
    };
    let pod = node.pod(
        "ordered",
        10,
        spec(2, "/pod_app get http://127.0.0.1:7000/ && exec /pod_app serve 8080"),
        BTreeMap::new(),
    );
    node.run_pod(&pod, &local_image).unwrap();
    let (_, apps) = node.container_names(&pod);
    wait("the app's call to the sidecar", Duration::from_secs(20), &mut || !node.logs(&apps[0]).is_empty());
    assert!(node.logs(&apps[0]).starts_with("200"), "{}", node.logs(&apps[0]));
    assert_eq!(
        docker_must(&["inspect", "--format", "{{.State.Running}}", &apps[0]]),
        "true",
        "{}",
        node.logs(&apps[0])
    );

    // Without the wait, the same call finds no sidecar and fails.
    let hasty = node.pod("hasty", 11, spec(30, "exec /pod_app get http://127.0.0.1:7000/"), BTreeMap::new());
    node.start(&hasty, &hasty.init_containers()[0], &local_image);
    let app = node.start(&hasty, &hasty.spec["spec"]["containers"][0], &local_image);
    let code = node.wait_exit(&app, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0, "the app found a sidecar that cannot listen yet: {}", node.logs(&app));
}

/// `ferry-control --discovery kubernetes` on the host, serving the node's pods on the network's gateway, and the node
/// attached to the same API server (pods resolve the control plane's Service name to the gateway).
fn start_control(api: &ApiServer, node: &mut Node, extra: &[&str]) -> KubeControl {
    let gateway = format!("{}.1", node.prefix);
    node.attach(api, &[("ferry-control.ferry-system.svc", &gateway)]);
    let xds = format!("{gateway}:15010").parse().unwrap();
    KubeControl::start_with(node.dir.path(), &api.kubeconfig(node.dir.path()), xds, extra)
}

/// Puts an injected pod spec on the node as the API server and kubelet would: its name and uid, the volumes (the
/// `ferry-ca-root` ConfigMap the control plane wrote into the namespace, a projected token the fake API server's
/// TokenReview binds to the pod and its service account).
fn admit(node: &Node, api: &ApiServer, mut spec: Value, name: &str, n: u8) -> Pod {
    let namespace = spec["metadata"]["namespace"].as_str().unwrap().to_string();
    let account = spec["spec"]["serviceAccountName"].as_str().unwrap_or("default").to_string();
    spec["metadata"]["name"] = json!(name);
    spec["metadata"]["uid"] = json!(format!("uid-{name}"));
    let volumes = volumes(node, name);
    // The ConfigMap the control plane wrote into the pod's namespace, as the kubelet mounts it.
    let mut bundle = None;
    wait("the ferry-ca-root ConfigMap", Duration::from_secs(20), &mut || {
        bundle = api.get(apiserver::CONFIGMAPS, &namespace, "ferry-ca-root");
        bundle.is_some()
    });
    let bundle = bundle.unwrap()["data"]["root.pem"].as_str().unwrap().to_string();
    std::fs::write(volumes["ferry-ca-root"].join("root.pem"), bundle).unwrap();
    api.token(
        &format!("token-{name}"),
        json!({"authenticated": true, "audiences": ["ferry.dev"],
               "user": {"username": format!("system:serviceaccount:{namespace}:{account}"), "uid": "sa",
                        "extra": {"authentication.kubernetes.io/pod-name": [name],
                                  "authentication.kubernetes.io/pod-uid": [format!("uid-{name}")]}}}),
    );
    node.pod(name, n, spec, volumes)
}

/// The injection of a pod spec, as `ferryctl inject` does it (the library it runs).
fn inject(spec: Value) -> Value {
    let settings = inject::Settings::new(None, "ferry-control.ferry-system.svc:15010".into(), true);
    let (out, _) = inject::inject_yaml(&spec.to_string(), &settings).unwrap();
    serde_saphyr::from_str(&out).unwrap()
}

/// A meshed pod `shop/<name>` whose app is the tests' own server on 8080 (HTTP, gRPC, WebSocket), 7000 (raw TCP) and
/// 9999 (on loopback), as injection wrote it.
fn meshed_pod(node: &Node, api: &ApiServer, name: &str, account: &str, n: u8) -> Pod {
    let spec = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "labels": {"app": account}},
        "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": APP_IMAGE,
                 "command": ["/pod_app", "serve", "8080", "lo:9999", "tcp:7000"],
                 "ports": [{"name": "http", "containerPort": 8080}, {"name": "tcp", "containerPort": 7000}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}});
    admit(node, api, inject(spec), name, n)
}

/// A Service of namespace `shop` selecting `app: <name>`, port 80 to the pods' port named `http` (and 7000 to
/// `tcp`).
fn shop_service(name: &str, cluster_ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "shop"},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"app": name},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                              {"name": "tcp", "port": 7000, "targetPort": "tcp", "protocol": "TCP"}]}})
}

fn run(node: &Node, control: &KubeControl, pod: &Pod) {
    let started = node.run_pod(pod, &local_image);
    assert!(started.is_ok(), "{}: {started:?}\n--- control ---\n{}", pod.name, control.logs());
}

/// Waits until `what` holds, in a blocking section of the runtime.
fn wait(what: &str, limit: Duration, check: &mut dyn FnMut() -> bool) {
    tokio::task::block_in_place(|| support::wait_until(what, limit, check));
}

/// Injected pods in real containers, joined to a real control plane through the fake API server, with the node's
/// Services, slices and names: the AuthorizationPolicy of `api` lets `web` in and refuses `batch`; a headless Service;
/// api's loopback-only listener; strict and permissive mTLS with an unmeshed pod; ferry-control SIGKILLed under load;
/// a Job; a rate limit; a deleted pod's certificate renewal; and every control-plane call checked against its RBAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pods_call_each_other_through_their_proxies() {
    if !node::available("injected_pods_call_each_other_through_their_proxies") {
        return;
    }
    let api = ApiServer::start().await;
    let mut node = tokio::task::block_in_place(|| Node::new("mesh"));
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop", "labels": {"ferry.dev/inject": "enabled"}}}));
    // Certificates of 20 s: every proxy renews its own every ~10 s while the test runs.
    let mut control = tokio::task::block_in_place(|| start_control(&api, &mut node, &["--cert-lifetime", "20s"]));
    node.service(shop_service("api", "10.96.0.20"));
    let pods: Vec<Pod> = [("api-1", "api", 20), ("web-1", "web", 21), ("batch-1", "batch", 22)]
        .iter()
        .map(|(name, account, n)| meshed_pod(&node, &api, name, account, *n))
        .collect();
    let (api_pod, web, batch) = (&pods[0], &pods[1], &pods[2]);
    api.apply(
        AUTHZ,
        json!({"metadata": {"name": "api", "namespace": "shop", "generation": 1},
               "spec": {"targetRef": {"kind": "Service", "name": "api"}, "defaultAction": "deny",
                        "allow": [{"from": {"identities": ["spiffe://cluster.local/ns/shop/sa/web"]}}]}}),
    );
    for pod in &pods {
        tokio::task::block_in_place(|| run(&node, &control, pod));
    }
    tokio::task::block_in_place(|| node.wait_ready(api_pod, Duration::from_secs(30))).unwrap();
    // web's app calls the Service by name (the node's /etc/hosts) and port 80; its proxy picks api's pod.
    let call = |pod: &Pod| tokio::task::block_in_place(|| node.get_from(pod, "http://api.shop/"));
    wait("web reaches api", Duration::from_secs(30), &mut || call(web).starts_with("200"));
    let answer = call(web);
    assert_eq!(answer, "200 \napp on 8080: caller spiffe://cluster.local/ns/shop/sa/web from 127.0.0.6", "{answer}");
    let refused = call(batch);
    assert!(refused.starts_with("403 unauthorized"), "{refused}");
    // The same policy for gRPC (PERMISSION_DENIED), WebSocket (the upgrade refused) and raw TCP (closed).
    let client = |pod: &Pod, args: &[&str]| tokio::task::block_in_place(|| node.client(pod, args));
    let web_id = "caller spiffe://cluster.local/ns/shop/sa/web";
    assert_eq!(client(web, &["grpc", "http://api.shop", "hi"]), format!("OK echo hi {web_id}"));
    let refused = client(batch, &["grpc", "http://api.shop", "hi"]);
    assert!(refused.starts_with("PermissionDenied"), "{refused}");
    assert_eq!(client(web, &["ws", "ws://api.shop/", "hi"]), format!("echo hi {web_id}"));
    assert_eq!(client(batch, &["ws", "ws://api.shop/", "hi"]), "refused 403");
    assert_eq!(client(web, &["tcp", "api.shop:7000", "hi"]), "echo hi");
    assert_eq!(client(batch, &["tcp", "api.shop:7000", "hi"]), "closed");
    let slice = api.get(apiserver::SLICES, "shop", "api-node").unwrap();
    assert_eq!(slice["endpoints"][0]["conditions"], json!({"ready": true, "serving": true, "terminating": false}));
    assert_eq!(slice["ports"][0]["port"], 8080, "{slice}");

    // A headless Service: clients dial the pod's own IP, still mTLS to the identity the pod's Service names.
    node.service(json!({"metadata": {"name": "api-pods", "namespace": "shop"},
        "spec": {"clusterIP": "None", "selector": {"app": "api"},
                 "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]}}));
    let direct = "http://api-pods.shop:8080/";
    let answer = tokio::task::block_in_place(|| node.get_from(web, direct));
    assert_eq!(answer, "200 \napp on 8080: caller spiffe://cluster.local/ns/shop/sa/web from 127.0.0.6", "{answer}");
    let refused = tokio::task::block_in_place(|| node.get_from(batch, direct));
    assert!(refused.starts_with("403 unauthorized"), "{refused}");

    // What api's app keeps on loopback (port 9999) is not reachable from another pod.
    let private = format!("http://{}:9999/", api_pod.ip);
    let answer = tokio::task::block_in_place(|| node.get_from(web, &private));
    assert!(answer.starts_with("502 connect-refused"), "{answer}");

    // Strict mTLS on api: an unmeshed pod's plaintext, through kube-proxy's DNAT of the ClusterIP, is refused; api's
    // rewritten readiness probe (the kubelet's call on the health port) still passes. web, permissive (the default)
    // and without an AuthorizationPolicy, serves the same call.
    let policy = |target: &str, generation: u32, spec: Value| {
        let mut spec = spec;
        spec["targetRef"] = json!({"kind": "Service", "name": target});
        json!({"metadata": {"name": target, "namespace": "shop", "generation": generation}, "spec": spec})
    };
    api.apply(TRAFFIC, policy("api", 1, json!({"mtls": "strict"})));
    node.service(shop_service("web", "10.96.0.21"));
    let outsider = node.pod("outsider", 30, json!({"metadata": {"namespace": "shop"}}), BTreeMap::new());
    let mut last = String::new();
    wait("strict mode reaches api", Duration::from_secs(20), &mut || {
        last = node.get_from(&outsider, "http://api.shop/");
        last.contains("mTLS is required")
    });
    assert!(last.starts_with("403 unauthorized"), "{last}");
    let probe = api_pod.spec["spec"]["containers"][0]["readinessProbe"].clone();
    assert_eq!(probe["httpGet"]["port"], 15020, "{probe}");
    // The kubelet's call itself, now (the node's prober would take a few periods to count failures).
    let addr = format!("{}:15020", api_pod.ip).parse().unwrap();
    let path = probe["httpGet"]["path"].as_str().unwrap();
    let answer = tokio::task::block_in_place(|| support::http_get(addr, path));
    assert_eq!(answer.map(|a| a.0), Some(200), "api's rewritten probe {path} under strict mTLS");
    assert!(node.ready(api_pod), "api's rewritten probe fails under strict mTLS");
    wait("web serves the outsider", Duration::from_secs(20), &mut || {
        last = node.get_from(&outsider, "http://web.shop/");
        last.starts_with("200")
    });
    assert_eq!(last, "200 \napp on 8080: caller none from 127.0.0.6", "{last}");
    api.apply(TRAFFIC, policy("web", 1, json!({"mtls": "strict"})));
    wait("strict mode reaches web", Duration::from_secs(20), &mut || {
        node.get_from(&outsider, "http://web.shop/").contains("mTLS is required")
    });

    // ferry-control SIGKILLed and started again while web calls api: no request fails (the proxies keep their config),
    // and every proxy is back in sync with the new one.
    let load = node.spawn_client(web, "load", &["load", "http://api.shop/", "150", "20"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    tokio::task::block_in_place(|| control.kill_and_restart());
    tokio::task::block_in_place(|| node.wait_exit(&load, Duration::from_secs(120))).unwrap();
    let report = node.logs(&load);
    assert_eq!(report.lines().next(), Some("ok 150 failed 0"), "{report}");
    wait("every proxy back in sync", Duration::from_secs(30), &mut || {
        let status = control.proxies();
        let proxies = status["proxies"].as_array().cloned().unwrap_or_default();
        proxies.len() == 3 && proxies.iter().all(|p| p["stale"] == false)
    });

    // A Job's pod (no Service selects it): its app calls api and ends; its sidecar, started first, exits after it.
    let job = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "labels": {"job-name": "report"}},
        "spec": {"serviceAccountName": "web", "restartPolicy": "Never", "containers": [{"name": "report",
                 "image": APP_IMAGE, "command": ["/pod_app", "get", "http://api.shop/"]}]}});
    let job = admit(&node, &api, inject(job), "report-1", 40);
    let exits = tokio::task::block_in_place(|| node.run_to_completion(&job, &local_image, Duration::from_secs(60)));
    let exits = exits.unwrap();
    let order: Vec<(&str, i64)> = exits.iter().map(|e: &Exit| (e.name.rsplit('-').next().unwrap(), e.code)).collect();
    assert_eq!(order, [("report", 0), ("proxy", 0)], "{exits:?}");
    let said = node.logs(&exits[0].name);
    assert!(said.starts_with("200 \napp on 8080: caller spiffe://cluster.local/ns/shop/sa/web"), "{said}");

    // A rate limit on api (burst 2, refilled every 100 s): web's third call is answered 429.
    api.apply(
        TRAFFIC,
        policy("api", 2, json!({"mtls": "strict", "rateLimit": {"requestsPerSecond": 0.01, "burst": 2}})),
    );
    wait("the rate limit reaches api", Duration::from_secs(20), &mut || {
        node.get_from(api_pod, "http://127.0.0.1:15000/config_dump").contains("requestsPerSecond")
    });
    let statuses: Vec<String> =
        (0..3).map(|_| call(web).lines().next().unwrap_or_default().trim().to_string()).collect();
    assert_eq!(statuses, ["200", "200", "429 rate-limited"]);

    // batch's Pod object is deleted while its containers still run (a node cut off from the API server): its stream
    // is closed, and its next renewal, over its still-valid certificate from its own IP, is refused; web's renewal
    // (every ~10 s) went on.
    tokio::task::block_in_place(|| node.delete_object(batch));
    wait("batch's stream closed", Duration::from_secs(20), &mut || {
        control.logs().contains("pod shop/batch-1 was deleted; closing its stream")
    });
    wait("batch's renewal refused", Duration::from_secs(30), &mut || {
        control.logs().contains("pod shop/batch-1 does not exist")
    });
    let scrape = format!("{}:15020", web.ip).parse().unwrap();
    let renewed = || {
        let metrics = support::http_get(scrape, "/metrics").unwrap_or_default().1;
        let line = metrics.lines().find(|l| l.starts_with("ferry_identity_certificate_requests_total{result=\"ok\"}"));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or_default()
    };
    wait("web's first certificate and a renewal", Duration::from_secs(30), &mut || renewed() >= 2.0);

    // Every call the control plane made to the API server is one `deploy/control-plane/rbac.yaml` grants.
    let rbac =
        std::fs::read_to_string(format!("{}/deploy/control-plane/rbac.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let calls = api.calls_with(apiserver::CONTROL_TOKEN);
    assert!(calls.len() > 10, "{calls:?}");
    assert_eq!(apiserver::rbac_violations(&calls, &rbac), Vec::<String>::new());
}

/// The documents of a `deploy/example` file.
fn example(file: &str) -> Vec<Value> {
    let path = format!("{}/deploy/example/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_saphyr::from_multiple(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The pod a Deployment's template makes (namespace from the Deployment), its app container running the tests'
/// `pod_app` with `command` in place of the example's image, everything else (ports, probes, security context) kept.
fn pod_of(deployment: &Value, command: &[&str]) -> Value {
    let template = &deployment["spec"]["template"];
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"].clone(),
                         "spec": template["spec"].clone()});
    pod["metadata"]["namespace"] = deployment["metadata"]["namespace"].clone();
    let app = &mut pod["spec"]["containers"][0];
    app["image"] = json!(APP_IMAGE);
    app["command"] = json!(command);
    app.as_object_mut().unwrap().remove("args");
    pod
}

/// The pod through the control plane's admission webhook (its review and patch, applied as the API server does).
fn through_webhook(pod: Value) -> Value {
    use base64::Engine;
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "review-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": pod["metadata"]["namespace"],
        "operation": "CREATE", "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod.clone()}});
    let settings = inject::Settings::new(None, "ferry-control.ferry-system.svc:15010".into(), true);
    let answer = ferry_control::kubernetes::webhook::review(review.to_string().as_bytes(), &settings).unwrap();
    let answer = ferry_control::kubernetes::webhook::wire(answer);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(answer["response"]["patchType"], "JSONPatch", "{answer}");
    let patch =
        base64::engine::general_purpose::STANDARD.decode(answer["response"]["patch"].as_str().unwrap()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = pod;
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

/// `deploy/example` as a user applies it: its namespace, Services and policies as objects in the API server; api's
/// Deployment injected by the `ferryctl inject` binary, web's pod by the admission webhook's patch. web's app is a
/// constant load on `api.ferry-demo` while api's two replicas are replaced one by one as the Deployment controller
/// would (a new pod ready before an old one terminates): no request fails, and each old pod's sidecar exits after its
/// app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_survives_a_rolling_update_under_load() {
    if !node::available("the_example_survives_a_rolling_update_under_load") {
        return;
    }
    let api = ApiServer::start().await;
    let mut node = tokio::task::block_in_place(|| Node::new("demo"));
    let control = tokio::task::block_in_place(|| start_control(&api, &mut node, &[]));
    for doc in ["namespace.yaml", "api.yaml", "web.yaml", "policies.yaml"].iter().flat_map(|f| example(f)) {
        let mut doc = doc;
        match doc["kind"].as_str().unwrap() {
            "Namespace" => api.apply(NAMESPACES, doc),
            "Service" => {
                doc["spec"]["clusterIP"] = json!("10.96.1.10");
                tokio::task::block_in_place(|| node.service(doc));
            }
            "TrafficPolicy" | "AuthorizationPolicy" => {
                doc["metadata"]["generation"] = json!(1);
                api.apply(if doc["kind"] == "TrafficPolicy" { TRAFFIC } else { AUTHZ }, doc);
            }
            "ServiceAccount" | "Deployment" => {}
            other => panic!("deploy/example has a {other}: the test does not know it"),
        }
    }
    let file = format!("{}/deploy/example/api.yaml", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(control::ctl_bin()).args(["inject", "-f", &file]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let injected: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let deployment = injected.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let api_spec = pod_of(deployment, &["/pod_app", "serve", "8080"]);
    let web_deployment = example("web.yaml").into_iter().find(|d| d["kind"] == "Deployment").unwrap();
    let web_spec =
        through_webhook(pod_of(&web_deployment, &["/pod_app", "load", "http://api.ferry-demo/", "4000", "10"]));
    assert_eq!(web_spec["spec"]["initContainers"][1]["name"], "ferry-proxy", "{web_spec}");

    let replica = |name: &str, n: u8| {
        let pod = admit(&node, &api, api_spec.clone(), name, n);
        run(&node, &control, &pod);
        node.wait_ready(&pod, Duration::from_secs(30)).unwrap();
        pod
    };
    let old = tokio::task::block_in_place(|| [replica("api-1", 20), replica("api-2", 21)]);
    let web = admit(&node, &api, web_spec, "web-1", 30);
    tokio::task::block_in_place(|| run(&node, &control, &web));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The rolling update: maxSurge 1, maxUnavailable 0 (the Deployment defaults for 2 replicas).
    for (old, (name, n)) in old.iter().zip([("api-3", 22), ("api-4", 23)]) {
        tokio::task::block_in_place(|| replica(name, n));
        let exits = tokio::task::block_in_place(|| node.delete(old, Duration::from_secs(30)));
        let order: Vec<(&str, i64)> = exits.iter().map(|e| (e.name.rsplit('-').next().unwrap(), e.code)).collect();
        assert_eq!(order, [("api", 0), ("proxy", 0)], "{exits:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let slice = api.get(apiserver::SLICES, "ferry-demo", "api-node").unwrap();
    let ready: Vec<&Value> = slice["endpoints"].as_array().unwrap().iter().map(|e| &e["targetRef"]["name"]).collect();
    assert_eq!(ready, ["api-3", "api-4"], "{slice}");

    // web's load (4,000 calls, 10 ms apart: 40 s at least) still runs: it spanned the whole update. It ends on
    // SIGTERM and reports.
    let (_, web_apps) = node.container_names(&web);
    let running = docker_must(&["inspect", "--format", "{{.State.Running}}", &web_apps[0]]);
    assert_eq!(running, "true", "web's load ended before the update did: {}", node.logs(&web_apps[0]));
    let exits = tokio::task::block_in_place(|| node.delete(&web, Duration::from_secs(30)));
    let report = node.logs(&exits.iter().find(|e| e.name.ends_with("-web")).unwrap().name);
    let ok: usize = report.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(report.starts_with("ok ") && report.lines().next().unwrap().ends_with(" failed 0"), "{report}");
    eprintln!("web load: {report}");
    assert!(ok >= 100, "the load ran through the update: {report}");
}
