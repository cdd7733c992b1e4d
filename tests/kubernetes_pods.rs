//! Kubernetes mode as injected pods run it, short of a kubelet: each pod is a network namespace behind a "node"
//! namespace that routes between them and runs the fake API server and a real `ferry-control --discovery
//! kubernetes`. A meshed pod runs `ferry init` with the arguments injection writes and `ferry run` (UID 1337) with the
//! environment `ferryctl inject --control-addr` writes, the downward-API values filled in (the CA root and the
//! ServiceAccount token are read from test files rather than their volume mounts, and the control plane's name is
//! resolved by the namespace's /etc/hosts, as cluster DNS would). Policies are CRD objects; callers are unmodified
//! clients (curl) in their pods, meshed or not.

use ferry_test_support::{self as support, apiserver, control};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use apiserver::{AUTHZ, ApiServer, CRDS, HTTP_ROUTES, NAMESPACES, PODS, SERVICES, SLICES, TRAFFIC};
use ferry_api::kubernetes::inject;
use serde_json::{Value, json};
use support::TempDir;
use support::netns::{self, Background, NetNs, must};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// The name injection tells proxies to reach the control plane by.
const CONTROL_NAME: &str = "ferry-control.ferry-system.svc";

/// One pod: a namespace linked to the node by a veth pair; its address is `198.18.<n>.2`.
struct Pod {
    name: &'static str,
    ns: NetNs,
    ip: String,
    hosts: PathBuf,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.hosts.parent().unwrap());
    }
}

/// The node: the API server and the control plane, routing between the pods.
struct Node {
    ns: NetNs,
    api: ApiServer,
    _api: Background,
    dir: TempDir,
    id: String,
}

impl Node {
    fn new(tag: &str) -> Node {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let ns = NetNs::new(&format!("ferry-{id}-node"));
        ns.must("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let (tx, rx) = std::sync::mpsc::channel();
        let background = ns.background(move || async move {
            tx.send(ApiServer::start().await).unwrap();
            std::future::pending::<()>().await
        });
        let api = rx.recv().unwrap();
        Node { ns, api, _api: background, dir: TempDir::new(&format!("k8s-pods-{tag}")), id }
    }

    /// A pod namespace `198.18.<n>.2/24`, routed through the node (`198.18.<n>.1`), which its /etc/hosts names as
    /// the control plane.
    fn pod(&self, n: u8, name: &'static str) -> Pod {
        let ns = NetNs::new(&format!("ferry-{}-{name}", self.id));
        let (node_dev, pod_dev) = (format!("kn{}{n}", self.id), format!("kp{}{n}", self.id));
        must("ip", &["link", "add", &node_dev, "type", "veth", "peer", "name", &pod_dev]);
        must("ip", &["link", "set", &node_dev, "netns", &self.ns.name]);
        must("ip", &["link", "set", &pod_dev, "netns", &ns.name]);
        let (gateway, ip) = (format!("198.18.{n}.1"), format!("198.18.{n}.2"));
        must("ip", &["-n", &self.ns.name, "addr", "add", &format!("{gateway}/24"), "dev", &node_dev]);
        must("ip", &["-n", &self.ns.name, "link", "set", &node_dev, "up"]);
        must("ip", &["-n", &ns.name, "addr", "add", &format!("{ip}/24"), "dev", &pod_dev]);
        must("ip", &["-n", &ns.name, "link", "set", &pod_dev, "up"]);
        must("ip", &["-n", &ns.name, "route", "add", "default", "via", &gateway]);
        // `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts for what it runs.
        let hosts = PathBuf::from(format!("/etc/netns/{}/hosts", ns.name));
        std::fs::create_dir_all(hosts.parent().unwrap()).unwrap();
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{gateway} {CONTROL_NAME}\n")).unwrap();
        Pod { name, ns, ip, hosts }
    }

    /// `ferry-control --discovery kubernetes` in the node namespace, serving every pod on :15010.
    fn start_control(&self, args: &[&str]) {
        let state = self.dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let kubeconfig = self.api.kubeconfig(self.dir.path());
        let log = std::fs::File::create(self.dir.path().join("control.log")).unwrap();
        let mut full = vec![
            format!("KUBECONFIG={}", kubeconfig.display()),
            "FERRY_LOG_LEVEL=info,ferry_api=debug".into(),
            control::control_bin().display().to_string(),
        ];
        full.extend(["serve", "--discovery", "kubernetes", "--state-dir"].map(String::from));
        full.push(state.display().to_string());
        full.extend(["--xds-addr", "0.0.0.0:15010", "--server-name", CONTROL_NAME].map(String::from));
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.ns.spawn("env", &full, &[], log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ns.run("curl", &["-sf", "-m", "1", "http://127.0.0.1:15014/health/ready"]).status.success() {
            assert!(Instant::now() < deadline, "ferry-control did not start:\n{}", self.control_log());
            std::thread::sleep(Duration::from_millis(100));
        }
        // The proxies run as UID 1337 and read a copy of the root, as from the ferry-ca-root ConfigMap.
        std::fs::copy(state.join("ca.crt"), self.dir.path().join("root.pem")).unwrap();
    }

    fn control_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default()
    }

    /// Creates the Pod object for `pod` (service account `account`, `labels`, `annotations`) and its token.
    fn pod_object(&self, pod: &Pod, account: &str, labels: Value, annotations: Value) {
        let mut labels = labels;
        labels["ferry.dev/injected"] = json!("true");
        self.api.apply(
            PODS,
            json!({"metadata": {"name": pod.name, "namespace": "shop", "uid": format!("uid-{}", pod.name),
                                "labels": labels, "annotations": annotations},
                   "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "app",
                            "ports": [{"name": "http", "containerPort": 8080}]}]},
                   "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}}),
        );
        self.api.token(
            &format!("token-{}", pod.name),
            json!({"authenticated": true, "audiences": ["ferry.dev"],
                   "user": {"username": format!("system:serviceaccount:shop:{account}"), "uid": "sa",
                            "extra": {"authentication.kubernetes.io/pod-name": [pod.name],
                                      "authentication.kubernetes.io/pod-uid": [format!("uid-{}", pod.name)]}}}),
        );
    }

    /// Injects the pod's spec with `ferryctl inject`'s transformation, then runs what it added: `ferry init` with
    /// the init container's arguments, and `ferry run` as UID 1337 with the proxy container's environment.
    fn run_sidecar(&self, pod: &Pod, account: &str) {
        let spec = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": "shop"},
            "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "app"}]}});
        let settings = inject::Settings::new(None, format!("{CONTROL_NAME}:15010"), true);
        let (out, _) = inject::inject_yaml(&spec.to_string(), &settings).unwrap();
        let injected: Value = serde_saphyr::from_str(&out).unwrap();
        let inits = injected["spec"]["initContainers"].as_array().unwrap();
        let init = inits.iter().find(|c| c["name"] == inject::INIT_CONTAINER).unwrap();
        let args: Vec<&str> = init["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        pod.ns.must(FERRY, &args);
        let proxy = inits.iter().find(|c| c["name"] == inject::PROXY_CONTAINER).unwrap();
        let token = self.dir.path().join(format!("token-{}", pod.name));
        std::fs::write(&token, format!("token-{}", pod.name)).unwrap();
        let fields = |path: &str| match path {
            "metadata.namespace" => "shop".to_string(),
            "metadata.name" => pod.name.to_string(),
            "spec.serviceAccountName" => account.to_string(),
            "status.podIP" => pod.ip.clone(),
            other => panic!("no downward-API value for {other}"),
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for var in proxy["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap().to_string();
            let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => {
                    // $(VAR) refers to an earlier variable, as the kubelet expands it.
                    env.iter().fold(v.clone(), |v, (k, val)| v.replace(&format!("$({k})"), val))
                }
                (_, Value::String(path)) => fields(path),
                other => panic!("{name}: {other:?}"),
            };
            let value = match name.as_str() {
                "FERRY_CA_ROOT" => self.dir.path().join("root.pem").display().to_string(),
                "FERRY_SERVICE_ACCOUNT_TOKEN" => token.display().to_string(),
                _ => value,
            };
            env.push((name, value));
        }
        assert!(env.iter().all(|(k, _)| k != "FERRY_SERVICE"), "injection declares no Service: {env:?}");
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", pod.name))).unwrap();
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        pod.ns.spawn(
            "setpriv",
            &["--reuid", "1337", "--regid", "1337", "--clear-groups", "--", FERRY, "run"],
            &env,
            log,
        );
    }

    fn wait_ready(&self, pod: &Pod) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pod.ns.run("curl", &["-sf", "-m", "1", "http://127.0.0.1:15020/health/ready"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "{} not ready:\n{}\n--- control ---\n{}",
                pod.name,
                self.proxy_log(pod),
                self.control_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn proxy_log(&self, pod: &Pod) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", pod.name))).unwrap_or_default()
    }

    fn wait(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "{what}\n--- control ---\n{}", self.control_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An HTTP app on `port` answering with who called (`ferry-client-id`) and from where.
async fn app(port: u16) {
    named_app("app", port).await
}

/// As [`app`], its answers starting with `name` (one version of a Service).
async fn named_app(name: &'static str, port: u16) {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.unwrap();
    loop {
        let Ok((stream, from)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                let caller = req.headers().get("ferry-client-id").and_then(|v| v.to_str().ok()).unwrap_or("none");
                // An `x-env` header, when the request has one (what a route's filter set), and `/slow` takes 2 s.
                let env = req.headers().get("x-env").and_then(|v| v.to_str().ok()).map(|e| format!(" env {e}"));
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                let body = format!("{name} on {port}: caller {caller} from {}{}\n", from.ip(), env.unwrap_or_default());
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                    body,
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `curl` from inside `pod`: (status, `ferry-proxy-error`, body).
fn call(pod: &Pod, url: &str) -> (u16, String, String) {
    call_with(pod, url, &[])
}

/// As [`call`], with request headers (`name: value`).
fn call_with(pod: &Pod, url: &str, headers: &[&str]) -> (u16, String, String) {
    let mut args = vec!["-sS", "-m", "10", "-D", "-"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = pod.ns.run("curl", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let error =
        head.lines().find_map(|l| l.strip_prefix("ferry-proxy-error: ")).map(str::to_string).unwrap_or_default();
    (status, error, body.to_string())
}

fn kube_service(name: &str, cluster_ip: &str, selector: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "shop"},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": selector,
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
}

fn slice(service: &str, ip: &str, pod: &str, ready: bool) -> Value {
    json!({"metadata": {"name": format!("{service}-abcde"), "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                          "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop", "uid": format!("uid-{pod}")}}]})
}

fn policy(kind: apiserver::Kind, name: &str, spec: Value) -> (apiserver::Kind, Value) {
    (
        kind,
        json!({"metadata": {"name": name, "namespace": "shop", "generation": 1,
                               "creationTimestamp": "2026-12-01T00:00:00Z"}, "spec": spec}),
    )
}

/// The conditions of a policy object, by type: (status, reason).
fn conditions(api: &ApiServer, kind: apiserver::Kind, name: &str) -> Vec<(String, String, String)> {
    let Some(obj) = api.get(kind, "shop", name) else { return Vec::new() };
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("status"), s("reason"))
        })
        .collect()
}

#[test]
fn injected_pods_enforce_their_services_policies_and_fail_closed() {
    if !netns::available("injected_pods_enforce_their_services_policies_and_fail_closed") {
        return;
    }
    let node = Node::new("k");
    let (api_pod, web, other, job, client) = (
        node.pod(1, "api-1"),
        node.pod(2, "web-1"),
        node.pod(3, "other-1"),
        node.pod(4, "job-1"),
        node.pod(5, "client"),
    );
    let _apps =
        (api_pod.ns.background(|| app(8080)), api_pod.ns.background(|| app(9100)), job.ns.background(|| app(9000)));
    let api = &node.api;
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop", "labels": {"ferry.dev/inject": "enabled"}}}));
    node.pod_object(&api_pod, "api", json!({"app": "api"}), json!({}));
    node.pod_object(&web, "web", json!({"app": "web"}), json!({}));
    node.pod_object(&other, "other", json!({"app": "other"}), json!({}));
    // job-1: no Service selects it.
    node.pod_object(&job, "job", json!({"app": "job"}), json!({}));
    // Two Services select api-1's port 8080: `api` (strict mTLS, only web may call) and `api-public` (no policy). The
    // pod is starting: its endpoints are not ready yet.
    api.apply(SERVICES, kube_service("api", "10.96.0.20", json!({"app": "api"})));
    api.apply(SERVICES, kube_service("api-public", "10.96.0.21", json!({"app": "api"})));
    api.apply(SLICES, slice("api", &api_pod.ip, "api-1", false));
    api.apply(SLICES, slice("api-public", &api_pod.ip, "api-1", false));
    // A Service that selects no meshed pod, for the policies' status.
    api.apply(SERVICES, kube_service("legacy", "10.96.0.30", json!({"app": "legacy"})));
    for (kind, obj) in [
        policy(TRAFFIC, "api", json!({"targetRef": {"kind": "Service", "name": "api"}, "mtls": "strict"})),
        policy(
            AUTHZ,
            "api",
            json!({"targetRef": {"kind": "Service", "name": "api"}, "defaultAction": "deny",
                   "allow": [{"from": {"identities": ["spiffe://cluster.local/ns/shop/sa/web"]}}]}),
        ),
        policy(AUTHZ, "ghost", json!({"targetRef": {"kind": "Service", "name": "nope"}, "defaultAction": "deny"})),
        policy(AUTHZ, "legacy", json!({"targetRef": {"kind": "Service", "name": "legacy"}, "defaultAction": "deny"})),
    ] {
        api.apply(kind, obj);
    }
    node.start_control(&["--default-inbound-policy", "mesh-only"]);
    for (pod, account) in [(&api_pod, "api"), (&web, "web"), (&other, "other"), (&job, "job")] {
        node.run_sidecar(pod, account);
    }
    for pod in [&api_pod, &web, &other, &job] {
        node.wait_ready(pod);
    }
    let logs = |pod: &Pod| format!("{}\n--- control ---\n{}", node.proxy_log(pod), node.control_log());

    // The starting pod already enforces its Services' policy: an unmeshed caller's plaintext is refused (strict mTLS,
    // the stricter of the two Services selecting the port), and the app is never reached.
    let api_url = format!("http://{}:8080/", api_pod.ip);
    let (status, error, body) = call(&client, &api_url);
    assert_eq!((status, error.as_str()), (403, "unauthorized"), "{body}\n{}", logs(&api_pod));
    assert!(body.contains("mTLS is required"), "{body}");

    // Ready: web (allowed by the AuthorizationPolicy) reaches the app over mTLS through the Service's address.
    api.apply(SLICES, slice("api", &api_pod.ip, "api-1", true));
    api.apply(SLICES, slice("api-public", &api_pod.ip, "api-1", true));
    node.wait("web reaches api", || call(&web, "http://10.96.0.20/").0 == 200);
    let (_, _, body) = call(&web, "http://10.96.0.20/");
    assert_eq!(body.trim(), "app on 8080: caller spiffe://cluster.local/ns/shop/sa/web from 127.0.0.6", "{body}");
    // Another meshed caller is refused, also when it calls the laxer Service (its SNI names api-public): the SNI
    // only names the port, and the port's policy is that of every Service selecting it.
    node.wait("other's proxy routes to api-public", || call(&other, "http://10.96.0.21/").0 == 403);
    for url in ["http://10.96.0.20/", "http://10.96.0.21/"] {
        let (status, error, body) = call(&other, url);
        assert_eq!((status, error.as_str()), (403, "unauthorized"), "{url}: {body}\n{}", logs(&api_pod));
        assert!(body.contains("spiffe://cluster.local/ns/shop/sa/other may not call"), "{body}");
    }
    assert!(call(&web, "http://10.96.0.21/").2.contains("caller spiffe://cluster.local/ns/shop/sa/web"));

    // A rate limit on api-public: every request to the port takes a token from its bucket too.
    let (kind, limit) = policy(
        TRAFFIC,
        "api-public",
        json!({"targetRef": {"kind": "Service", "name": "api-public"}, "rateLimit": {"requestsPerSecond": 0.01, "burst": 2}}),
    );
    api.apply(kind, limit);
    let dump = || {
        String::from_utf8_lossy(&api_pod.ns.run("curl", &["-s", "http://127.0.0.1:15000/config_dump"]).stdout)
            .into_owned()
    };
    node.wait("the rate limit reaches api-1", || dump().contains("requestsPerSecond"));
    let statuses: Vec<(u16, String)> =
        (0..3).map(|_| call(&web, "http://10.96.0.20/")).map(|(s, e, _)| (s, e)).collect();
    assert_eq!(
        statuses,
        [(200, String::new()), (200, String::new()), (429, "rate-limited".to_string())],
        "{}",
        logs(&api_pod)
    );

    // api-1's port 9100, which no Service selects, has the mesh's default (`mesh-only`): a meshed caller reaches it
    // over mTLS (the pod's address is a meshed endpoint's, on any port), an unmeshed one is refused.
    let unselected = format!("http://{}:9100/", api_pod.ip);
    let (status, _, body) = call(&web, &unselected);
    assert_eq!(status, 200, "{body}\n{}", logs(&api_pod));
    assert!(body.starts_with("app on 9100: caller spiffe://cluster.local/ns/shop/sa/web"), "{body}");
    let (status, error, body) = call(&client, &unselected);
    assert_eq!((status, error.as_str()), (403, "unauthorized"), "{body}");

    // job-1: no Service selects it, yet it became ready; its ports get the mesh's default inbound policy
    // (`mesh-only` here): an unmeshed caller is refused...
    let job_url = format!("http://{}:9000/", job.ip);
    let (status, error, body) = call(&client, &job_url);
    assert_eq!((status, error.as_str()), (403, "unauthorized"), "{body}\n{}", logs(&job));
    assert!(body.contains("default inbound policy `mesh-only`"), "{body}");
    // ...until the pod's annotation says otherwise (read live from the pod by the control plane).
    node.pod_object(&job, "job", json!({"app": "job"}), json!({"ferry.dev/default-inbound-policy": "allow"}));
    node.wait("the annotation opens job-1's ports", || call(&client, &job_url).0 == 200);
    assert!(call(&client, &job_url).2.starts_with("app on 9000: caller none from 127.0.0.6"));

    // The policies' status says what is enforced: Accepted, and whether a meshed pod's proxy enforces them.
    let want = |reason: &str, ok: &str| {
        vec![
            ("Accepted".to_string(), "True".to_string(), "Accepted".to_string()),
            ("ResolvedRefs".to_string(), ok.to_string(), reason.to_string()),
        ]
    };
    node.wait("the policies' status", || conditions(api, AUTHZ, "legacy") == want("NoMeshedPods", "False"));
    assert_eq!(conditions(api, AUTHZ, "api"), want("ResolvedRefs", "True"));
    assert_eq!(conditions(api, AUTHZ, "ghost"), want("BackendNotFound", "False"));
    assert_eq!(conditions(api, TRAFFIC, "api-public"), want("ResolvedRefs", "True"));

    // Each proxy's stream was bound to its pod by its certificate (never by a claim).
    let status =
        String::from_utf8_lossy(&node.ns.run("curl", &["-s", "http://127.0.0.1:15011/v1/status"]).stdout).into_owned();
    for pod in [&api_pod, &web, &other, &job] {
        assert!(status.contains(&format!("\"workload\":\"pod/shop/{}\"", pod.name)), "{status}");
    }
    // Every call the control plane made is one its ClusterRole and Role grant.
    let rbac =
        std::fs::read_to_string(format!("{}/deploy/control-plane/rbac.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let calls = api.calls_with(apiserver::CONTROL_TOKEN);
    assert_eq!(apiserver::rbac_violations(&calls, &rbac), Vec::<String>::new(), "{calls:?}");
}

/// An HTTPRoute (Gateway API, GAMMA) from the API server steers an injected pod's calls to a Service between the
/// pods of two Services (transparent interception, mTLS between the proxies), its status written back; a change of
/// weights moves the traffic.
#[test]
fn an_httproute_from_the_api_server_steers_calls_between_injected_pods() {
    if !netns::available("an_httproute_from_the_api_server_steers_calls_between_injected_pods") {
        return;
    }
    let node = Node::new("r");
    let (v1, v2, web) = (node.pod(1, "api-1"), node.pod(2, "api-v2-1"), node.pod(3, "web-1"));
    let _apps = (v1.ns.background(|| named_app("v1", 8080)), v2.ns.background(|| named_app("v2", 8080)));
    let api = &node.api;
    for crd in apiserver::gateway_api_crds() {
        api.apply(CRDS, crd);
    }
    api.apply(NAMESPACES, json!({"metadata": {"name": "shop", "labels": {"ferry.dev/inject": "enabled"}}}));
    node.pod_object(&v1, "api", json!({"app": "api"}), json!({}));
    node.pod_object(&v2, "api-v2", json!({"app": "api-v2"}), json!({}));
    node.pod_object(&web, "web", json!({"app": "web"}), json!({}));
    api.apply(SERVICES, kube_service("api", "10.96.0.20", json!({"app": "api"})));
    api.apply(SERVICES, kube_service("api-v2", "10.96.0.22", json!({"app": "api-v2"})));
    api.apply(SLICES, slice("api", &v1.ip, "api-1", true));
    api.apply(SLICES, slice("api-v2", &v2.ip, "api-v2-1", true));
    let canary = |generation: i64, w1: u32, w2: u32| {
        json!({"metadata": {"name": "canary", "namespace": "shop", "generation": generation,
                            "creationTimestamp": "2026-12-01T00:00:00Z"},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
                        "rules": [{"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
                                   "filters": [{"type": "RequestHeaderModifier",
                                                "requestHeaderModifier": {"set": [{"name": "x-env", "value": "canary"}]}}],
                                   "backendRefs": [{"name": "api-v2", "port": 80}]},
                                  {"matches": [{"path": {"type": "Exact", "value": "/slow"}}],
                                   "timeouts": {"request": "300ms"},
                                   "backendRefs": [{"name": "api", "port": 80}]},
                                  {"matches": [{"path": {"type": "Exact", "value": "/mirrored"}}],
                                   "filters": [{"type": "RequestMirror",
                                                "requestMirror": {"backendRef": {"name": "api-v2", "port": 80}}}],
                                   "backendRefs": [{"name": "api", "port": 80}]},
                                  {"backendRefs": [{"name": "api", "port": 80, "weight": w1},
                                                   {"name": "api-v2", "port": 80, "weight": w2}]}]}})
    };
    api.apply(HTTP_ROUTES, canary(1, 100, 0));
    node.start_control(&[]);
    for (pod, account) in [(&v1, "api"), (&v2, "api-v2"), (&web, "web")] {
        node.run_sidecar(pod, account);
    }
    for pod in [&v1, &v2, &web] {
        node.wait_ready(pod);
    }
    let logs = || format!("{}\n--- control ---\n{}", node.proxy_log(&web), node.control_log());
    // web calls api's cluster IP, as an app does; its proxy routes by the HTTPRoute.
    let url = "http://10.96.0.20/";
    node.wait("web reaches api", || call(&web, url).0 == 200);
    for _ in 0..5 {
        let (status, _, body) = call(&web, url);
        assert_eq!(status, 200, "{body}\n{}", logs());
        assert!(body.starts_with("v1 on 8080: caller spiffe://cluster.local/ns/shop/sa/web"), "{body}");
        let (status, _, body) = call_with(&web, url, &["x-canary: yes"]);
        assert_eq!(status, 200, "{body}\n{}", logs());
        assert!(body.starts_with("v2 on 8080: caller spiffe://cluster.local/ns/shop/sa/web"), "{body}");
        // The rule's filter set x-env on the way (the caller's proxy), what the route object says.
        assert!(body.trim_end().ends_with(" env canary"), "{body}");
    }
    // The /slow rule's own timeout (300 ms) cuts a 2 s answer; the same app answers the default rule's requests.
    let (status, error, body) = call(&web, "http://10.96.0.20/slow");
    assert_eq!((status, error.as_str()), (504, "request-timeout"), "{body}\n{}", logs());
    // The /mirrored rule answers from api and sends a copy to api-v2 (through api-v2's proxy, over mTLS): web's proxy
    // counts each copy api-v2 answered.
    for _ in 0..5 {
        let (status, _, body) = call(&web, "http://10.96.0.20/mirrored");
        assert!(status == 200 && body.starts_with("v1 on 8080"), "{status} {body}\n{}", logs());
    }
    let mirrored = r#"ferry_request_mirrors_total{route="shop/canary/2",mirror="api-v2.shop",outcome="mirrored"}"#;
    node.wait("api-v2 answers the 5 copies", || {
        support::metric_value(&call(&web, "http://127.0.0.1:15020/metrics").2, mirrored) == 5.0
    });
    // Status written back to the object.
    let parents = |api: &ApiServer| -> Vec<(String, String, String)> {
        let route = api.get(HTTP_ROUTES, "shop", "canary").unwrap_or_default();
        let ours = route["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["controllerName"] == "ferry.dev/mesh")
            .cloned();
        ours.map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
            .unwrap_or_default()
            .iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("type"), s("status"), s("reason"))
            })
            .collect()
    };
    let c = |t: &str, s: &str, r: &str| (t.to_string(), s.to_string(), r.to_string());
    node.wait("the route's status", || {
        parents(api) == [c("Accepted", "True", "Accepted"), c("ResolvedRefs", "True", "ResolvedRefs")]
    });
    // The canary takes all of the default rule's traffic.
    api.apply(HTTP_ROUTES, canary(2, 0, 100));
    node.wait("the new weights reach web", || call(&web, url).2.starts_with("v2 "));
    for _ in 0..5 {
        let (status, _, body) = call(&web, url);
        assert!(status == 200 && body.starts_with("v2 on 8080"), "{status} {body}\n{}", logs());
    }
    let rbac =
        std::fs::read_to_string(format!("{}/deploy/control-plane/rbac.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let calls = api.calls_with(apiserver::CONTROL_TOKEN);
    assert_eq!(apiserver::rbac_violations(&calls, &rbac), Vec::<String>::new(), "{calls:?}");
}
