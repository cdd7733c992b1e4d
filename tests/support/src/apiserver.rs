//! A local HTTP server speaking the Kubernetes API's JSON, for tests (no API server exists here): lists with a
//! resourceVersion, watches as streamed newline-delimited events (ADDED, MODIFIED, DELETED, BOOKMARK, and an ERROR
//! `410 Gone` that makes clients list again), TokenReviews answered from a table, `pods/proxy` and `pods/portforward`
//! to local addresses, and the writes the control plane makes (Secrets, ConfigMaps, status patches, the webhook's
//! caBundle), recorded for assertions.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

/// A collection the fake serves: its list path (all namespaces), API version, kind, and plural.
#[derive(Clone, Copy)]
pub struct Kind {
    pub group_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

pub const SERVICES: Kind = Kind { group_version: "v1", kind: "Service", plural: "services" };
pub const PODS: Kind = Kind { group_version: "v1", kind: "Pod", plural: "pods" };
pub const NAMESPACES: Kind = Kind { group_version: "v1", kind: "Namespace", plural: "namespaces" };
pub const SLICES: Kind = Kind { group_version: "discovery.k8s.io/v1", kind: "EndpointSlice", plural: "endpointslices" };
pub const TRAFFIC: Kind =
    Kind { group_version: "ferry.dev/v1alpha1", kind: "TrafficPolicy", plural: "trafficpolicies" };
pub const AUTHZ: Kind =
    Kind { group_version: "ferry.dev/v1alpha1", kind: "AuthorizationPolicy", plural: "authorizationpolicies" };
pub const SECRETS: Kind = Kind { group_version: "v1", kind: "Secret", plural: "secrets" };
pub const CONFIGMAPS: Kind = Kind { group_version: "v1", kind: "ConfigMap", plural: "configmaps" };
pub const WEBHOOKS: Kind = Kind {
    group_version: "admissionregistration.k8s.io/v1",
    kind: "MutatingWebhookConfiguration",
    plural: "mutatingwebhookconfigurations",
};
pub const CRDS: Kind = Kind {
    group_version: "apiextensions.k8s.io/v1",
    kind: "CustomResourceDefinition",
    plural: "customresourcedefinitions",
};
pub const DEPLOYMENTS: Kind = Kind { group_version: "apps/v1", kind: "Deployment", plural: "deployments" };
/// Served only while its CRD (`httproutes.gateway.networking.k8s.io`) is among [`CRDS`], as on a real cluster.
pub const HTTP_ROUTES: Kind =
    Kind { group_version: "gateway.networking.k8s.io/v1", kind: "HTTPRoute", plural: "httproutes" };
/// Served only while its CRD (`grpcroutes.gateway.networking.k8s.io`) is among [`CRDS`].
pub const GRPC_ROUTES: Kind =
    Kind { group_version: "gateway.networking.k8s.io/v1", kind: "GRPCRoute", plural: "grpcroutes" };
/// Served only while its CRD (`referencegrants.gateway.networking.k8s.io`) is among [`CRDS`].
pub const REFERENCE_GRANTS: Kind =
    Kind { group_version: "gateway.networking.k8s.io/v1beta1", kind: "ReferenceGrant", plural: "referencegrants" };
const KINDS: [Kind; 14] = [
    SERVICES,
    PODS,
    NAMESPACES,
    SLICES,
    TRAFFIC,
    AUTHZ,
    SECRETS,
    CONFIGMAPS,
    WEBHOOKS,
    CRDS,
    DEPLOYMENTS,
    HTTP_ROUTES,
    GRPC_ROUTES,
    REFERENCE_GRANTS,
];

impl Kind {
    fn prefix(&self) -> String {
        if self.group_version == "v1" { "/api/v1".into() } else { format!("/apis/{}", self.group_version) }
    }

    /// The CRD that must be installed for the kind to be served (the Gateway API's; Ferry's own and the built-in
    /// kinds are always served here).
    fn crd(&self) -> Option<String> {
        let group = self.group_version.split_once('/')?.0;
        (group == "gateway.networking.k8s.io").then(|| format!("{}.{group}", self.plural))
    }
}

/// The Gateway API CRDs Ferry reads, as installed from the standard channel (name, kind, served version; no schema).
pub fn gateway_api_crds() -> Vec<Value> {
    let crd = |plural: &str, kind: &str, version: &str, schema: Value| {
        json!({"metadata": {"name": format!("{plural}.gateway.networking.k8s.io")},
               "spec": {"group": "gateway.networking.k8s.io", "names": {"kind": kind, "plural": plural},
                        "scope": "Namespaced",
                        "versions": [{"name": version, "served": true, "storage": true,
                                      "schema": {"openAPIV3Schema": schema}}]}})
    };
    // The outline of v1.4.0's standard-channel HTTPRoute schema (its rules have no `retry`: experimental only).
    let object = |properties: Value| json!({"type": "object", "properties": properties});
    let array = |items: Value| json!({"type": "array", "items": items});
    let mirror = object(json!({"backendRef": {"type": "object"}, "percent": {"type": "integer"},
                               "fraction": {"type": "object"}}));
    let filter = object(json!({"type": {"type": "string"}, "requestHeaderModifier": {"type": "object"},
                               "responseHeaderModifier": {"type": "object"}, "requestRedirect": {"type": "object"},
                               "urlRewrite": {"type": "object"}, "requestMirror": mirror}));
    let rule = object(json!({"name": {"type": "string"}, "matches": array(json!({"type": "object"})),
                             "filters": array(filter), "backendRefs": array(json!({"type": "object"})),
                             "timeouts": {"type": "object"}, "sessionPersistence": {"type": "object"}}));
    let spec =
        object(json!({"parentRefs": array(json!({"type": "object"})), "hostnames": array(json!({"type": "string"})),
                             "rules": array(rule)}));
    let http_route = object(json!({"spec": spec, "status": {"type": "object"}}));
    let open = object(json!({"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                             "status": {"type": "object"}}));
    vec![
        crd("httproutes", "HTTPRoute", "v1", http_route),
        crd("grpcroutes", "GRPCRoute", "v1", open.clone()),
        crd("referencegrants", "ReferenceGrant", "v1beta1", open),
    ]
}

#[derive(Default)]
struct State {
    version: u64,
    /// plural → (namespace, name) → object.
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    watchers: BTreeMap<&'static str, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// token → the TokenReview status to answer.
    tokens: BTreeMap<String, Value>,
    /// Every request that was not a read: (method, path, body).
    writes: Vec<(String, String, Value)>,
    /// Every TokenReview request body.
    reviews: Vec<Value>,
    /// `namespace/pod` → where its pod-proxy requests go (the API server's `pods/proxy` subresource).
    pod_proxies: BTreeMap<String, SocketAddr>,
    /// (`namespace/pod`, port) → where a `pods/portforward` of that port connects.
    pod_ports: BTreeMap<(String, u16), SocketAddr>,
    /// How many lists each collection has served (a relist after 410 shows here).
    lists: BTreeMap<&'static str, usize>,
    /// Every request: (bearer token, method, path, query).
    calls: Vec<(String, String, String, String)>,
}

/// The fake API server; stops with the test process.
#[derive(Clone)]
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

fn key(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    (meta["namespace"].as_str().unwrap_or_default().to_string(), meta["name"].as_str().unwrap_or_default().to_string())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message,
           "reason": reason, "code": code})
}

fn line(value: &Value) -> Bytes {
    let mut text = serde_json::to_vec(value).unwrap();
    text.push(b'\n');
    Bytes::from(text)
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = ApiServer { addr: listener.local_addr().unwrap(), state: Arc::default() };
        let this = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let this = this.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        server
    }

    /// A kubeconfig for this server (plain HTTP, the bearer token `control-token`, the control plane's: its calls are
    /// checked against its RBAC by [`rbac_violations`]).
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        self.kubeconfig_as(dir, CONTROL_TOKEN)
    }

    /// A kubeconfig with another bearer token (a user's, for ferryctl), in its own file.
    pub fn kubeconfig_as(&self, dir: &std::path::Path, token: &str) -> std::path::PathBuf {
        let path = dir.join(format!("kubeconfig-{token}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster: {{server: \"http://{}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\nusers:\n- name: test\n  user: {{token: {token}}}\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Creates or replaces an object (a new resourceVersion) and tells the watchers (ADDED or MODIFIED).
    pub fn apply(&self, kind: Kind, obj: Value) {
        let mut s = self.state.lock().unwrap();
        let (obj, existed) = Self::store(&mut s, kind, obj);
        let event = json!({"type": if existed { "MODIFIED" } else { "ADDED" }, "object": obj});
        Self::send(&mut s, kind.plural, line(&event));
    }

    /// Stores an object at a new resourceVersion: (the stored object, whether it replaced one).
    fn store(s: &mut State, kind: Kind, mut obj: Value) -> (Value, bool) {
        s.version += 1;
        obj["apiVersion"] = json!(kind.group_version);
        obj["kind"] = json!(kind.kind);
        obj["metadata"]["resourceVersion"] = json!(s.version.to_string());
        let k = key(&obj);
        let existed = s.objects.entry(kind.plural).or_default().insert(k, obj.clone()).is_some();
        (obj, existed)
    }

    /// Deletes an object and tells the watchers (DELETED, with the object's last state).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        let removed = s.objects.entry(kind.plural).or_default().remove(&(namespace.to_string(), name.to_string()));
        if let Some(mut obj) = removed {
            obj["metadata"]["resourceVersion"] = json!(s.version.to_string());
            Self::send(&mut s, kind.plural, line(&json!({"type": "DELETED", "object": obj})));
        }
    }

    /// A BOOKMARK event: only the resourceVersion moves on.
    pub fn bookmark(&self, kind: Kind) {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        let object = json!({"apiVersion": kind.group_version, "kind": kind.kind,
                            "metadata": {"resourceVersion": s.version.to_string()}});
        Self::send(&mut s, kind.plural, line(&json!({"type": "BOOKMARK", "object": object})));
    }

    /// Ends every watch of `kind` with `410 Gone` (the resourceVersion is too old): clients must list again.
    pub fn expire_watches(&self, kind: Kind) {
        let mut s = self.state.lock().unwrap();
        let gone = status(410, "Expired", "too old resource version");
        Self::send(&mut s, kind.plural, line(&json!({"type": "ERROR", "object": gone})));
        s.watchers.remove(kind.plural);
    }

    /// Changes an object without telling anyone (what a client misses while its watch is down).
    pub fn apply_silently(&self, kind: Kind, obj: Value) {
        Self::store(&mut self.state.lock().unwrap(), kind, obj);
    }

    pub fn watchers(&self, kind: Kind) -> usize {
        self.state.lock().unwrap().watchers.get(kind.plural).map_or(0, |w| w.iter().filter(|t| !t.is_closed()).count())
    }

    pub fn lists(&self, kind: Kind) -> usize {
        self.state.lock().unwrap().lists.get(kind.plural).copied().unwrap_or(0)
    }

    /// Requests to `/api/v1/namespaces/<namespace>/pods/<pod>:<port>/proxy/<path>` go to `addr` (the port named in
    /// the path is the test's business).
    pub fn proxy_pod(&self, namespace: &str, pod: &str, addr: SocketAddr) {
        self.state.lock().unwrap().pod_proxies.insert(format!("{namespace}/{pod}"), addr);
    }

    /// A `pods/portforward` of `port` on `namespace/pod` connects to `addr` (the pod's loopback, in a cluster).
    pub fn forward_pod_port(&self, namespace: &str, pod: &str, port: u16, addr: SocketAddr) {
        self.state.lock().unwrap().pod_ports.insert((format!("{namespace}/{pod}"), port), addr);
    }

    /// What a TokenReview of `token` answers.
    pub fn token(&self, token: &str, status: Value) {
        self.state.lock().unwrap().tokens.insert(token.into(), status);
    }

    pub fn reviews(&self) -> Vec<Value> {
        self.state.lock().unwrap().reviews.clone()
    }

    pub fn writes(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().writes.clone()
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(kind.plural)?.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    fn send(s: &mut State, plural: &'static str, event: Bytes) {
        if let Some(watchers) = s.watchers.get_mut(plural) {
            watchers.retain(|w| w.send(event.clone()).is_ok());
        }
    }

    /// Every request made with `token`: (method, path, query).
    pub fn calls_with(&self, token: &str) -> Vec<(String, String, String)> {
        let calls = self.state.lock().unwrap().calls.clone();
        calls.into_iter().filter(|(t, ..)| t == token).map(|(_, m, p, q)| (m, p, q)).collect()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (method, path, query) =
            (req.method().clone(), req.uri().path().to_string(), req.uri().query().unwrap_or("").to_string());
        let token = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let token = token.strip_prefix("Bearer ").unwrap_or(token).to_string();
        self.state.lock().unwrap().calls.push((token, method.to_string(), path.clone(), query.clone()));
        if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
            && let [ns, "pods", pod, "portforward"] = rest.split('/').collect::<Vec<_>>().as_slice()
        {
            let port = query.split('&').find_map(|kv| kv.strip_prefix("ports=")).and_then(|p| p.parse::<u16>().ok());
            let upstream =
                port.and_then(|p| self.state.lock().unwrap().pod_ports.get(&(format!("{ns}/{pod}"), p)).copied());
            return match (port, upstream) {
                (Some(port), Some(upstream)) => port_forward(req, port, upstream),
                _ => json_reply(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "no such pod port (one port per forward here)"),
                ),
            };
        }
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if method != Method::GET {
            self.state.lock().unwrap().writes.push((method.to_string(), path.clone(), body.clone()));
        }
        if path == "/version" {
            return json_reply(
                StatusCode::OK,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                "gitCommit": "fake", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
            && let [ns, "pods", pod, "proxy", tail @ ..] = rest.split('/').collect::<Vec<_>>().as_slice()
        {
            let pod = pod.split(':').next().unwrap_or_default();
            let upstream = self.state.lock().unwrap().pod_proxies.get(&format!("{ns}/{pod}")).copied();
            let Some(upstream) = upstream else {
                return json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &status(503, "ServiceUnavailable", "no such pod endpoint"),
                );
            };
            // As a real API server does, the caller's credentials are not passed on to the pod (`forward_get` sends
            // none): a token check behind the pod proxy cannot work.
            let target = format!("/{}", tail.join("/"));
            let answer = tokio::task::spawn_blocking(move || forward_get(upstream, &target)).await.unwrap();
            return match answer {
                Some((code, body)) => {
                    Response::builder().status(code).body(BodyExt::boxed(Full::new(Bytes::from(body)))).unwrap()
                }
                None => {
                    json_reply(StatusCode::SERVICE_UNAVAILABLE, &status(503, "ServiceUnavailable", "pod unreachable"))
                }
            };
        }
        if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let token = body["spec"]["token"].as_str().unwrap_or_default().to_string();
            let mut s = self.state.lock().unwrap();
            s.reviews.push(body.clone());
            let answer = s
                .tokens
                .get(&token)
                .cloned()
                .unwrap_or(json!({"authenticated": false, "error": "invalid bearer token"}));
            let mut review = body;
            review["status"] = answer;
            return json_reply(StatusCode::CREATED, &review);
        }
        // API discovery of a group version: the resources served there (a CRD's only while it is installed).
        if let Some(gv) = path.strip_prefix("/apis/").filter(|gv| gv.matches('/').count() == 1) {
            let s = self.state.lock().unwrap();
            let resources: Vec<Value> = KINDS
                .iter()
                .filter(|k| k.group_version == gv && Self::installed(&s, k))
                .map(|k| {
                    json!({"name": k.plural, "singularName": "", "namespaced": true, "kind": k.kind,
                                "verbs": ["get", "list", "watch", "patch", "update"]})
                })
                .collect();
            if resources.is_empty() {
                return json_reply(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "the server could not find the requested resource"),
                );
            }
            return json_reply(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
            );
        }
        // /namespaces/<ns>/<plural>[/<name>[/status]] first, then /<plural>[/<name>[/status]] (all namespaces, or
        // cluster-scoped objects).
        for namespaced in [true, false] {
            for kind in KINDS {
                let Some(rest) = path.strip_prefix(&kind.prefix()) else { continue };
                if !Self::installed(&self.state.lock().unwrap(), &kind) {
                    continue;
                }
                let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
                let (namespace, tail): (String, &[&str]) = match (namespaced, parts.as_slice()) {
                    (true, ["namespaces", ns, plural, tail @ ..]) if *plural == kind.plural => (ns.to_string(), tail),
                    (false, [plural, tail @ ..]) if *plural == kind.plural && tail.len() <= 2 => (String::new(), tail),
                    _ => continue,
                };
                return self.collection(kind, &method, &namespace, tail, &query, body);
            }
        }
        json_reply(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("{method} {path}: not served by this fake")),
        )
    }

    /// Whether `kind` is served: always, unless its CRD must be installed and is not.
    fn installed(s: &State, kind: &Kind) -> bool {
        kind.crd().is_none_or(|name| s.objects.get(CRDS.plural).is_some_and(|m| m.contains_key(&(String::new(), name))))
    }

    fn collection(
        &self,
        kind: Kind,
        method: &Method,
        ns: &str,
        tail: &[&str],
        query: &str,
        body: Value,
    ) -> Response<Body> {
        let watch = query.split('&').any(|p| p == "watch=true" || p == "watch=1");
        let name = tail.first().copied();
        let mut s = self.state.lock().unwrap();
        match (method, name) {
            (&Method::GET, None) if watch => {
                let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                s.watchers.entry(kind.plural).or_default().push(tx);
                use futures_util::StreamExt;
                let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(|b| Ok(Frame::data(b)));
                let body = StreamBody::new(stream);
                Response::builder().header("content-type", "application/json").body(BodyExt::boxed(body)).unwrap()
            }
            (&Method::GET, None) => {
                *s.lists.entry(kind.plural).or_default() += 1;
                // Equality label selectors (`labelSelector=a%3Db,c%3Dd`).
                let selector: Vec<(String, String)> = query
                    .split('&')
                    .filter_map(|p| p.strip_prefix("labelSelector="))
                    .flat_map(|v| {
                        let v = v.replace("%3D", "=").replace("%2F", "/").replace("%2C", ",");
                        v.split(',')
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let matches =
                    |v: &Value| selector.iter().all(|(k, want)| v["metadata"]["labels"][k.as_str()] == want.as_str());
                let items: Vec<Value> = s
                    .objects
                    .get(kind.plural)
                    .map(|m| {
                        m.iter()
                            .filter(|((n, _), v)| (ns.is_empty() || n == ns) && matches(v))
                            .map(|(_, v)| v.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let list = json!({"apiVersion": kind.group_version, "kind": format!("{}List", kind.kind),
                                  "metadata": {"resourceVersion": s.version.to_string()}, "items": items});
                json_reply(StatusCode::OK, &list)
            }
            (&Method::GET, Some(name)) => {
                match s.objects.get(kind.plural).and_then(|m| m.get(&(ns.to_string(), name.to_string()))) {
                    Some(obj) => json_reply(StatusCode::OK, obj),
                    None => json_reply(
                        StatusCode::NOT_FOUND,
                        &status(404, "NotFound", &format!("{} \"{name}\" not found", kind.plural)),
                    ),
                }
            }
            (&Method::POST, None) => {
                let mut obj = body;
                if !ns.is_empty() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                let k = key(&obj);
                if s.objects.get(kind.plural).is_some_and(|m| m.contains_key(&k)) {
                    return json_reply(
                        StatusCode::CONFLICT,
                        &status(409, "AlreadyExists", &format!("{} \"{}\" already exists", kind.plural, k.1)),
                    );
                }
                drop(s);
                self.apply(kind, obj);
                let stored = self.get(kind, &k.0, &k.1).unwrap();
                json_reply(StatusCode::CREATED, &stored)
            }
            (&Method::PUT, Some(_)) => {
                drop(s);
                let mut obj = body;
                if !ns.is_empty() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                let k = key(&obj);
                self.apply(kind, obj);
                json_reply(StatusCode::OK, &self.get(kind, &k.0, &k.1).unwrap())
            }
            (&Method::PATCH, Some(name)) => {
                let existing =
                    s.objects.get(kind.plural).and_then(|m| m.get(&(ns.to_string(), name.to_string()))).cloned();
                // A server-side apply of an object that does not exist creates it.
                let Some(mut obj) = existing.or_else(|| query.contains("fieldManager=ferryctl").then(|| json!({})))
                else {
                    return json_reply(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
                };
                drop(s);
                // A resourceVersion in the patch is a precondition, as on a real API server.
                let expected = body.pointer("/metadata/resourceVersion");
                if expected.is_some_and(|v| Some(v) != obj.pointer("/metadata/resourceVersion")) {
                    let message = "the object has been modified; please apply your changes to the latest version";
                    return json_reply(StatusCode::CONFLICT, &status(409, "Conflict", message));
                }
                // The Gateway API's status conditions are metav1.Conditions: every field required.
                if let Some(missing) = missing_condition_field(&body) {
                    return json_reply(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &status(422, "Invalid", &format!("status.parents[].conditions[].{missing}: Required value")),
                    );
                }
                match &body {
                    // A JSON patch: the `add`/`replace` operations the control plane sends.
                    Value::Array(ops) => {
                        for op in ops {
                            let path = op["path"].as_str().unwrap_or_default();
                            let (parent, leaf) = path.rsplit_once('/').unwrap_or(("", path));
                            if let Some(Value::Object(parent)) = obj.pointer_mut(parent) {
                                parent.insert(leaf.to_string(), op["value"].clone());
                            }
                        }
                    }
                    patch => merge(&mut obj, patch),
                }
                self.apply(kind, obj.clone());
                json_reply(StatusCode::OK, &self.get(kind, ns, name).unwrap())
            }
            _ => {
                json_reply(StatusCode::METHOD_NOT_ALLOWED, &status(405, "MethodNotAllowed", "not served by this fake"))
            }
        }
    }
}

/// The first field a `metav1.Condition` requires that a status patch's `status.parents[].conditions[]` lacks.
fn missing_condition_field(patch: &Value) -> Option<&'static str> {
    let parents = patch.pointer("/status/parents")?.as_array()?;
    let conditions = parents.iter().flat_map(|p| p["conditions"].as_array().into_iter().flatten());
    for c in conditions {
        for field in ["type", "status", "reason", "message", "lastTransitionTime"] {
            if !c[field].is_string() {
                return Some(field);
            }
        }
    }
    None
}

/// Answers a `pods/portforward` upgrade as the API server does for WebSocket clients (subprotocol
/// `v4.channel.k8s.io`: binary frames whose first byte is the channel, 0 data and 1 errors of the one port, each
/// opened by a frame carrying the port number), and relays channel 0 to a TCP connection to `upstream`.
fn port_forward(req: Request<Incoming>, port: u16, upstream: SocketAddr) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key, protocol::Role};
    let Some(key) = req.headers().get(http::header::SEC_WEBSOCKET_KEY) else {
        return json_reply(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "a WebSocket upgrade is expected"));
    };
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let (mut sink, mut frames) = ws.split();
        let [lo, hi] = port.to_le_bytes();
        for channel in [0, 1] {
            if sink.send(Message::binary(vec![channel, lo, hi])).await.is_err() {
                return;
            }
        }
        let tcp = match tokio::net::TcpStream::connect(upstream).await {
            Ok(tcp) => tcp,
            Err(e) => {
                let mut error = vec![1];
                error.extend_from_slice(format!("error forwarding port {port}: {e}").as_bytes());
                let _ = sink.send(Message::binary(error)).await;
                let _ = sink.close().await;
                return;
            }
        };
        let (mut from_pod, mut to_pod) = tcp.into_split();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                frame = frames.next() => match frame {
                    Some(Ok(Message::Binary(data))) if data.first() == Some(&0) => {
                        if to_pod.write_all(&data[1..]).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                read = from_pod.read(&mut buf) => match read {
                    Ok(n) if n > 0 => {
                        let mut data = Vec::with_capacity(n + 1);
                        data.push(0);
                        data.extend_from_slice(&buf[..n]);
                        if sink.send(Message::binary(data)).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                },
            }
        }
        let _ = sink.close().await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(http::header::SEC_WEBSOCKET_PROTOCOL, "v4.channel.k8s.io")
        .body(BodyExt::boxed(http_body_util::Empty::new()))
        .unwrap()
}

/// A plain HTTP/1.0 GET to `addr`: (status, body).
fn forward_get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).ok()?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, raw[split + 4..].to_vec()))
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn json_reply(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(serde_json::to_vec(value).unwrap()))))
        .unwrap()
}

/// The bearer token of the control plane's kubeconfig.
pub const CONTROL_TOKEN: &str = "control-token";

/// One request as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub name: String,
    pub namespace: String,
}

/// Pure: the RBAC attributes of a request (`None`: a non-resource URL such as `/version`, allowed to everyone
/// authenticated).
pub fn access(method: &str, path: &str, query: &str) -> Option<Access> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (ns.to_string(), more),
        other => (String::new(), other),
    };
    let (resource, name, sub) = match rest {
        [r] => (r.to_string(), String::new(), None),
        [r, n] => (r.to_string(), n.to_string(), None),
        [r, n, s, ..] => (r.to_string(), n.split(':').next().unwrap_or(n).to_string(), Some(s.to_string())),
        [] => return None,
    };
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match method {
        "GET" if watch => "watch",
        "GET" if name.is_empty() => "list",
        "GET" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if name.is_empty() => "deletecollection",
        "DELETE" => "delete",
        other => other,
    };
    let resource = match sub {
        Some(s) => format!("{resource}/{s}"),
        None => resource,
    };
    Some(Access { verb: verb.into(), group, resource, name, namespace })
}

/// The calls of `calls` (method, path, query) that the ClusterRoles and Roles of `rbac_yaml` do not grant, one line
/// each (Roles grant in their own namespace only; `resourceNames` restrict everything but create, list and watch,
/// which they cannot name).
pub fn rbac_violations(calls: &[(String, String, String)], rbac_yaml: &str) -> Vec<String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(rbac_yaml).unwrap();
    let rules: Vec<(Option<String>, &Value)> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .flat_map(|d| {
            let scope = (d["kind"] == "Role").then(|| d["metadata"]["namespace"].as_str().unwrap_or("").to_string());
            d["rules"].as_array().into_iter().flatten().map(move |r| (scope.clone(), r))
        })
        .collect();
    let has = |list: &Value, item: &str| list.as_array().is_some_and(|l| l.iter().any(|v| v == item || v == "*"));
    let mut out = Vec::new();
    for (method, path, query) in calls {
        let Some(a) = access(method, path, query) else { continue };
        let granted = rules.iter().any(|(scope, r)| {
            scope.as_ref().is_none_or(|ns| *ns == a.namespace)
                && has(&r["verbs"], &a.verb)
                && has(&r["apiGroups"], &a.group)
                && has(&r["resources"], &a.resource)
                && (r["resourceNames"].as_array().is_none_or(|n| n.is_empty())
                    || (!["create", "list", "watch"].contains(&a.verb.as_str()) && has(&r["resourceNames"], &a.name)))
        });
        if !granted {
            let line =
                format!("{} {}/{} {:?} in {:?} ({method} {path})", a.verb, a.group, a.resource, a.name, a.namespace);
            if !out.contains(&line) {
                out.push(line);
            }
        }
    }
    out
}
