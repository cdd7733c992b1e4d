//! Kubernetes mode's side of the API server: reflectors over Services, EndpointSlices, Pods, Namespaces, the
//! policy CRDs and (when installed) the Gateway API's HTTPRoutes and ReferenceGrants; the CA root in the Secret
//! `ferry-ca`; TokenReviews for certificate requests; what it writes back (policy and route status, the
//! `ferry-ca-root` ConfigMaps, the injector's `caBundle`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::identity::certify::{Authenticated, Refusal};
use ferry_api::identity::{Identity, PodRef};
use ferry_api::kubernetes::discovery::{ClusterView, Verdict};
use ferry_api::kubernetes::gateway::{
    GrpcRouteObject, HttpRouteObject, ReferenceGrantObject, RouteObject, RouteVerdict, merged_parents,
};
use ferry_api::kubernetes::inject::{CA_ROOT_CONFIGMAP, INJECT, TOKEN_AUDIENCE};
use ferry_api::policy::{AuthorizationPolicyResource, TrafficPolicyResource};

use ferry_api::kubernetes::{CA_SECRET, WEBHOOK_CONFIGURATION};
/// The field manager of everything the control plane writes.
const MANAGER: &str = "ferry-control";

/// `(kind, namespace, name)` of a policy object.
type PolicyKey = (&'static str, String, String);
/// The generation, error and resolution of the last status written.
type Written = (Option<i64>, Option<String>, Option<(bool, &'static str, String)>);

/// `(kind, namespace, name, uid)` of a route object.
type RouteKey = (&'static str, String, String, String);

/// The Gateway API objects, each watched from when its CRD is found installed.
#[derive(Default)]
struct Gateway {
    routes: OnceLock<Store<HttpRouteObject>>,
    grpc_routes: OnceLock<Store<GrpcRouteObject>>,
    grants: OnceLock<Store<ReferenceGrantObject>>,
}

/// What the last model concluded about each object with a status.
#[derive(Debug, Clone, Default)]
pub struct Verdicts {
    pub policies: Vec<Verdict>,
    pub routes: Vec<RouteVerdict>,
}

/// Live, watched copies of what discovery reads.
pub struct Cluster {
    client: Client,
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    traffic: Store<TrafficPolicyResource>,
    authz: Store<AuthorizationPolicyResource>,
    /// HTTPRoutes and ReferenceGrants, from when the Gateway API CRDs are found installed.
    gateway: Gateway,
    on_change: Arc<dyn Fn() + Send + Sync>,
    /// The verdict last written to each policy's status: `(kind, namespace, name)` → (generation, error).
    written: Mutex<BTreeMap<PolicyKey, Written>>,
    /// Ferry's `status.parents` entries last written to each route: (kind, namespace, name, uid) → entries.
    written_routes: Mutex<BTreeMap<RouteKey, Vec<serde_json::Value>>>,
    /// Namespaces whose `ferry-ca-root` ConfigMap holds the current bundle.
    bundles: Mutex<(Vec<String>, BTreeSet<String>)>,
}

fn watch<K>(client: &Client, on_change: Arc<dyn Fn() + Send + Sync>, trim: fn(&mut K)) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    // The watcher lists, then watches from the list's resourceVersion; on `410 Gone` or a broken stream it lists
    // again (with backoff), and the reflector replaces its copy wholesale; bookmarks only move the version on.
    // Objects are trimmed to what discovery reads before they are kept.
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(move |k| {
            k.meta_mut().managed_fields = None;
            trim(k);
        })
        .reflect(writer);
    let kind = K::kind(&()).to_string();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => on_change(),
                Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    reader
}

/// Waits (up to 30 s) until a watcher started after start-up has listed once; a list that keeps failing (the
/// ClusterRole not updated, say) is logged, and the store fills once it succeeds.
/// What a store holds now, owned.
fn owned<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.state().iter().map(|k| (**k).clone()).collect()
}

async fn listed<K>(store: &Store<K>, what: &str)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    if tokio::time::timeout(std::time::Duration::from_secs(30), store.wait_until_ready()).await.is_err() {
        tracing::error!(kind = what, "not listed within 30 s (RBAC?); served once the watch lists");
    }
}

impl Cluster {
    /// Starts the watchers; `on_change` is called after each event (the xDS publisher debounces).
    pub fn start(client: Client, on_change: Arc<dyn Fn() + Send + Sync>) -> Arc<Cluster> {
        Arc::new(Cluster {
            services: watch(&client, on_change.clone(), |_| {}),
            slices: watch(&client, on_change.clone(), |_| {}),
            pods: watch(&client, on_change.clone(), trim_pod),
            namespaces: watch(&client, on_change.clone(), |_| {}),
            traffic: watch(&client, on_change.clone(), |_| {}),
            authz: watch(&client, on_change.clone(), |_| {}),
            gateway: Gateway::default(),
            on_change,
            client,
            written: Mutex::new(BTreeMap::new()),
            written_routes: Mutex::new(BTreeMap::new()),
            bundles: Mutex::new((Vec::new(), BTreeSet::new())),
        })
    }

    /// Until every watcher has listed once (the first model must not be an empty cluster).
    pub async fn wait_until_synced(&self) {
        let _ = tokio::join!(
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.traffic.wait_until_ready(),
            self.authz.wait_until_ready(),
        );
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            services: owned(&self.services),
            slices: owned(&self.slices),
            pods: owned(&self.pods),
            traffic_policies: owned(&self.traffic),
            authorization_policies: owned(&self.authz),
        }
    }

    /// Starts watching the Gateway API kinds its discovery shows served (HTTPRoute and GRPCRoute `v1`,
    /// ReferenceGrant `v1beta1`) and not watched yet. Returns whether all are watched.
    pub async fn detect_gateway_api(&self) -> bool {
        let served = |gv: &'static str, plural: &'static str| async move {
            match self.client.list_api_group_resources(gv).await {
                Ok(list) => list.resources.iter().any(|r| r.name == plural),
                Err(kube::Error::Api(e)) if e.code == 404 => false,
                Err(e) => {
                    tracing::warn!(group_version = gv, error = %e, "Gateway API discovery failed");
                    false
                }
            }
        };
        let mut started = false;
        if self.gateway.routes.get().is_none() && served("gateway.networking.k8s.io/v1", "httproutes").await {
            let store = watch(&self.client, self.on_change.clone(), |_| {});
            listed(&store, "HTTPRoutes").await;
            started |= self.gateway.routes.set(store).is_ok();
        }
        if self.gateway.grpc_routes.get().is_none() && served("gateway.networking.k8s.io/v1", "grpcroutes").await {
            let store = watch(&self.client, self.on_change.clone(), |_| {});
            listed(&store, "GRPCRoutes").await;
            started |= self.gateway.grpc_routes.set(store).is_ok();
        }
        if self.gateway.grants.get().is_none() && served("gateway.networking.k8s.io/v1beta1", "referencegrants").await {
            let store = watch(&self.client, self.on_change.clone(), |_| {});
            listed(&store, "ReferenceGrants").await;
            started |= self.gateway.grants.set(store).is_ok();
        }
        if started {
            let grants = self.gateway.grants.get().is_some();
            tracing::info!(
                httproutes = self.routes_watched(),
                grpcroutes = self.gateway.grpc_routes.get().is_some(),
                reference_grants = grants,
                "Gateway API found: watching"
            );
            (self.on_change)();
        }
        self.routes_watched() && self.gateway.grpc_routes.get().is_some() && self.gateway.grants.get().is_some()
    }

    /// Whether HTTPRoutes are watched (the Gateway API is installed).
    pub fn routes_watched(&self) -> bool {
        self.gateway.routes.get().is_some()
    }

    /// Looks for the Gateway API every `every` until both of its kinds are watched (CRDs may come after the
    /// control plane).
    pub async fn await_gateway_api(self: Arc<Self>, every: std::time::Duration) {
        while !self.detect_gateway_api().await {
            tokio::time::sleep(every).await;
        }
    }

    /// The documents and workloads to serve now; the verdicts go to [`Cluster::write_statuses`].
    pub fn documents(&self, default_inbound: ferry_api::workload::DefaultInbound) -> (crate::ads::Sourced, Verdicts) {
        let view = self.view();
        let (mut documents, mut policies) = ferry_api::kubernetes::discovery::documents(&view);
        let workloads = ferry_api::kubernetes::discovery::workloads(&view, default_inbound);
        ferry_api::kubernetes::discovery::resolve(&mut policies, &view, &workloads);
        let mut routes = Vec::new();
        let (http, grpc) = (self.gateway.routes.get(), self.gateway.grpc_routes.get());
        if http.is_some() || grpc.is_some() {
            let grants: Vec<ReferenceGrantObject> = self.gateway.grants.get().map(owned).unwrap_or_default();
            let (http, grpc) = (http.map(owned).unwrap_or_default(), grpc.map(owned).unwrap_or_default());
            let (docs, verdicts) = ferry_api::kubernetes::gateway::documents(&http, &grpc, &grants, &documents);
            documents.extend(docs);
            routes = verdicts;
        }
        (crate::ads::Sourced { documents, workloads }, Verdicts { policies, routes })
    }

    /// Writes each policy's `Accepted` condition and each HTTPRoute's `status.parents` entries where they changed
    /// since last written (replicas write the same).
    pub async fn write_statuses(&self, verdicts: Verdicts) {
        self.write_route_statuses(verdicts.routes).await;
        for v in verdicts.policies {
            let key = (v.kind, v.namespace.clone(), v.name.clone());
            let value = (v.generation, v.error.clone(), v.resolved.clone());
            if self.written.lock().expect("status lock").get(&key) == Some(&value) {
                continue;
            }
            let conditions: Vec<Condition> =
                std::iter::once(accepted_condition(&v)).chain(resolved_condition(&v)).collect();
            let patch = Patch::Merge(json!({"status": {"conditions": conditions}}));
            let params = PatchParams::apply(MANAGER);
            let result = match v.kind {
                "TrafficPolicy" => Api::<TrafficPolicyResource>::namespaced(self.client.clone(), &v.namespace)
                    .patch_status(&v.name, &params, &patch)
                    .await
                    .map(|_| ()),
                _ => Api::<AuthorizationPolicyResource>::namespaced(self.client.clone(), &v.namespace)
                    .patch_status(&v.name, &params, &patch)
                    .await
                    .map(|_| ()),
            };
            match result {
                Ok(()) => {
                    tracing::info!(kind = v.kind, policy = %format!("{}/{}", v.namespace, v.name), accepted = v.error.is_none(), "policy status written");
                    self.written.lock().expect("status lock").insert(key, value);
                }
                Err(e) => {
                    tracing::warn!(kind = v.kind, policy = %format!("{}/{}", v.namespace, v.name), error = %e, "writing policy status failed")
                }
            }
        }
    }

    /// Replaces Ferry's entries in each route's `status.parents`, keeping other controllers' (a Gateway's): where
    /// they changed since last written to that object (by uid), or are missing from it. The patch carries the
    /// object's resourceVersion: a conflict (someone wrote in between) waits for the next event.
    async fn write_route_statuses(&self, verdicts: Vec<RouteVerdict>) {
        let now = ferry_api::meta::rfc3339(ferry_api::identity::unix_now());
        let mut seen = BTreeSet::new();
        for v in verdicts {
            let written = match v.kind {
                "GRPCRoute" => self.write_route_status(self.gateway.grpc_routes.get(), v, &now).await,
                _ => self.write_route_status(self.gateway.routes.get(), v, &now).await,
            };
            seen.extend(written);
        }
        self.written_routes.lock().expect("status lock").retain(|k, _| seen.contains(k));
    }

    /// [`Cluster::write_route_statuses`] for one route of kind `K`; the route's key when it exists.
    async fn write_route_status<K>(&self, store: Option<&Store<K>>, v: RouteVerdict, now: &str) -> Option<RouteKey>
    where
        K: RouteObject<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let current = store?.get(&reflector::ObjectRef::new(&v.name).within(&v.namespace))?;
        let key = (K::KIND, v.namespace.clone(), v.name.clone(), current.meta().uid.clone().unwrap_or_default());
        let status = current.status();
        let on_object = ferry_api::kubernetes::gateway::ours(status);
        let written = self.written_routes.lock().expect("status lock").get(&key) == Some(&v.parents);
        // Nothing of Ferry's to say (a route of Gateways only) and nothing said; or said and still there.
        if (v.parents.is_empty() && on_object == 0) || (written && on_object == v.parents.len()) {
            return Some(key);
        }
        let parents = merged_parents(status, &v.parents, now);
        let patch = Patch::Merge(json!({
            "metadata": {"resourceVersion": current.meta().resource_version},
            "status": {"parents": parents},
        }));
        let api = Api::<K>::namespaced(self.client.clone(), &v.namespace);
        let route = format!("{}/{}", v.namespace, v.name);
        match api.patch_status(&v.name, &PatchParams::apply(MANAGER), &patch).await {
            Ok(_) => {
                tracing::info!(kind = K::KIND, route = %route, "route status written");
                self.written_routes.lock().expect("status lock").insert(key.clone(), v.parents);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(kind = K::KIND, route = %route, "route changed while its status was written; next event")
            }
            Err(e) => tracing::warn!(kind = K::KIND, route = %route, error = %e, "writing route status failed"),
        }
        Some(key)
    }

    /// Namespaces that need the mesh root: labelled for injection, or running a meshed pod.
    pub fn meshed_namespaces(&self) -> BTreeSet<String> {
        let labelled =
            self.namespaces.state().into_iter().filter(|n| n.labels().get(INJECT).is_some_and(|v| v == "enabled"));
        let with_pods = self.pods.state().into_iter().filter(|p| ferry_api::kubernetes::discovery::is_meshed(p));
        labelled.map(|n| n.name_any()).chain(with_pods.filter_map(|p| p.namespace())).collect()
    }

    /// Creates or updates `ferry-ca-root` (key `root.pem`: the trust bundle) in every meshed namespace.
    pub async fn publish_bundle(&self, roots: &[String]) {
        let wanted = self.meshed_namespaces();
        let done = {
            let mut bundles = self.bundles.lock().expect("bundle lock");
            if bundles.0 != roots {
                *bundles = (roots.to_vec(), BTreeSet::new());
            }
            bundles.1.clone()
        };
        for ns in wanted.difference(&done) {
            let api = Api::<ConfigMap>::namespaced(self.client.clone(), ns);
            let cm = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(CA_ROOT_CONFIGMAP.into()),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".into(), "ferry".into())])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([("root.pem".into(), roots.concat())])),
                ..Default::default()
            };
            let result = match api.create(&PostParams::default(), &cm).await {
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    api.replace(CA_ROOT_CONFIGMAP, &PostParams::default(), &cm).await.map(|_| ())
                }
                other => other.map(|_| ()),
            };
            match result {
                Ok(()) => {
                    self.bundles.lock().expect("bundle lock").1.insert(ns.clone());
                }
                Err(e) => tracing::warn!(namespace = %ns, error = %e, "writing the ferry-ca-root ConfigMap failed"),
            }
        }
    }

    /// Checks a certificate request's ServiceAccount token with a TokenReview (audience `ferry.dev`) and matches it
    /// to the pod it was issued for.
    pub async fn review_token(&self, token: &str, peer: Option<SocketAddr>) -> Result<Authenticated, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![TOKEN_AUDIENCE.into()]) },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal { reason: "unavailable", message: format!("TokenReview failed: {e}") })?;
        let status = answer.status.unwrap_or_default();
        let (identity, pod) = token_identity(&status, peer, |ns, name| self.pod(ns, name))?;
        Ok(Authenticated {
            identity,
            token_id: None,
            credential: "service-account-token",
            not_after: None,
            pod: Some(pod),
        })
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.pods.get(&reflector::ObjectRef::new(name).within(namespace)).map(|p| (*p).clone())
    }
}

#[tonic::async_trait]
impl crate::identity::certify::BearerCheck for Cluster {
    async fn check(&self, token: &str, peer: Option<SocketAddr>) -> Result<Authenticated, Refusal> {
        self.review_token(token, peer).await
    }

    fn still_bound(&self, authenticated: &Authenticated, peer: Option<SocketAddr>) -> Result<(), Refusal> {
        let Some(pod) = &authenticated.pod else {
            return Err(Refusal {
                reason: "no-pod",
                message: "the certificate names no pod; request a new one with the ServiceAccount token".into(),
            });
        };
        let identity = &authenticated.identity;
        pod_matches(identity, pod, peer, |ns, name| self.pod(ns, name))
    }
}

/// Pods are the bulk of a cluster: keep what discovery and token checks read (name, namespace, uid, labels, the
/// default-inbound-policy annotation, the service account, container names and ports, phase and IPs), not their
/// specs' env, volumes or other annotations.
fn trim_pod(pod: &mut Pod) {
    let note = ferry_api::kubernetes::inject::annotation::DEFAULT_INBOUND_POLICY;
    pod.metadata.annotations = pod.metadata.annotations.take().and_then(|mut all| {
        let kept: BTreeMap<String, String> = all.remove_entry(note).into_iter().collect();
        (!kept.is_empty()).then_some(kept)
    });
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.take() {
        let names = |list: Vec<k8s_openapi::api::core::v1::Container>| {
            list.into_iter()
                .map(|c| k8s_openapi::api::core::v1::Container { name: c.name, ports: c.ports, ..Default::default() })
                .collect()
        };
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            service_account_name: spec.service_account_name,
            containers: names(spec.containers),
            init_containers: spec.init_containers.map(names),
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..Default::default()
        });
    }
}

/// The `Accepted` condition of a verdict.
pub fn accepted_condition(v: &Verdict) -> Condition {
    Condition {
        type_: "Accepted".into(),
        status: if v.error.is_none() { "True" } else { "False" }.into(),
        reason: if v.error.is_none() { "Accepted" } else { "Invalid" }.into(),
        message: v.error.clone().unwrap_or_else(|| "served to the mesh".into()),
        observed_generation: v.generation,
        last_transition_time: Time(jiff_now()),
    }
}

/// The `ResolvedRefs` condition of an accepted policy: whether its Service exists and selects a meshed pod.
pub fn resolved_condition(v: &Verdict) -> Option<Condition> {
    let (ok, reason, message) = v.resolved.clone()?;
    Some(Condition {
        type_: "ResolvedRefs".into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: v.generation,
        last_transition_time: Time(jiff_now()),
    })
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// Pure: who a reviewed token belongs to, and the pod it is bound to. It must be authenticated for the `ferry.dev`
/// audience, name a service account, and be bound to a pod that exists, runs as that account, and (when known) has
/// the caller's IP.
pub fn token_identity(
    status: &TokenReviewStatus,
    peer: Option<SocketAddr>,
    pod: impl Fn(&str, &str) -> Option<Pod>,
) -> Result<(Identity, PodRef), Refusal> {
    let refuse = |reason: &'static str, message: String| Refusal { reason, message };
    if status.authenticated != Some(true) {
        let why = status.error.clone().unwrap_or_else(|| "not authenticated".into());
        return Err(refuse("unauthenticated", format!("the ServiceAccount token was refused: {why}")));
    }
    if !status.audiences.iter().flatten().any(|a| a == TOKEN_AUDIENCE) {
        return Err(refuse("audience", format!("the token is not for the {TOKEN_AUDIENCE} audience")));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((ns, sa)) = username.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) else {
        return Err(refuse("not-a-service-account", format!("`{username}` is not a service account")));
    };
    let extra = user.extra.unwrap_or_default();
    let claim = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let (Some(pod_name), Some(pod_uid)) =
        (claim("authentication.kubernetes.io/pod-name"), claim("authentication.kubernetes.io/pod-uid"))
    else {
        return Err(refuse(
            "unbound",
            "the token is not bound to a pod (use the projected token ferry injects)".into(),
        ));
    };
    let identity = Identity::new(ns, sa);
    let bound = PodRef { name: pod_name, uid: pod_uid };
    pod_matches(&identity, &bound, peer, pod)?;
    Ok((identity, bound))
}

/// Pure: the pod `bound` names exists in the identity's namespace with that uid, runs as the identity's service
/// account and (when both are known) has the caller's IP.
pub fn pod_matches(
    identity: &Identity,
    bound: &PodRef,
    peer: Option<SocketAddr>,
    pod: impl Fn(&str, &str) -> Option<Pod>,
) -> Result<(), Refusal> {
    let refuse = |reason: &'static str, message: String| Refusal { reason, message };
    let (ns, sa, pod_name) = (&identity.namespace, &identity.service_account, &bound.name);
    let Some(pod) = pod(ns, pod_name) else {
        return Err(refuse("no-pod", format!("pod {ns}/{pod_name} does not exist")));
    };
    if pod.metadata.uid.as_deref() != Some(bound.uid.as_str()) {
        return Err(refuse("no-pod", format!("pod {ns}/{pod_name} is not the pod the credential was issued to")));
    }
    let runs_as = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    if runs_as != *sa {
        return Err(refuse("mismatch", format!("pod {ns}/{pod_name} runs as {runs_as}, not {sa}")));
    }
    let pod_ips = ferry_api::kubernetes::discovery::pod_ips(&pod);
    if let Some(peer) = peer
        && !pod_ips.is_empty()
        && !pod_ips.contains(&peer.ip().to_canonical())
    {
        return Err(refuse(
            "mismatch",
            format!("pod {ns}/{pod_name} has IP {pod_ips:?}, the request came from {}", peer.ip()),
        ));
    }
    Ok(())
}

/// Puts the mesh root into `state_dir` (`ca.crt`, `ca.key`) from the Secret `ferry-ca` in `namespace`, creating the
/// Secret from a new root if there is none. Replicas race safely: the one whose create fails uses the winner's.
pub async fn ensure_ca_secret(client: &Client, namespace: &str, state_dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let write = |secret: &Secret| -> anyhow::Result<()> {
        let data = secret.data.clone().unwrap_or_default();
        let (Some(cert), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
            anyhow::bail!("Secret {namespace}/{CA_SECRET} lacks tls.crt or tls.key");
        };
        let _ = std::fs::remove_file(state_dir.join("ca.key"));
        crate::store::write_atomic(&state_dir.join("ca.crt"), &cert.0)?;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(state_dir.join("ca.key"))?;
        f.write_all(&key.0)?;
        Ok(())
    };
    if let Some(secret) = api.get_opt(CA_SECRET).await.context("reading the CA Secret")? {
        tracing::info!(secret = %format!("{namespace}/{CA_SECRET}"), "mesh root loaded from the Secret");
        return write(&secret);
    }
    let scratch = state_dir.join("new-root");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    crate::identity::ca::Ca::ensure(&scratch, None)?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".into(), "ferry".into())])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".into(), ByteString(std::fs::read(scratch.join("ca.crt"))?)),
            ("tls.key".into(), ByteString(std::fs::read(scratch.join("ca.key"))?)),
        ])),
        ..Default::default()
    };
    let _ = std::fs::remove_dir_all(&scratch);
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(secret = %format!("{namespace}/{CA_SECRET}"), "new mesh root created in the Secret");
            write(&created)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let theirs = api.get(CA_SECRET).await.context("reading the CA Secret another replica created")?;
            tracing::info!(secret = %format!("{namespace}/{CA_SECRET}"), "another replica created the mesh root first; using it");
            write(&theirs)
        }
        Err(e) => Err(e).context("creating the CA Secret"),
    }
}

/// Sets the injector webhook's `caBundle` to the mesh roots (a JSON patch: the webhook list itself is untouched).
pub async fn patch_webhook_ca(client: &Client, roots: &[String]) -> Result<(), kube::Error> {
    use base64::Engine;
    let api = Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(client.clone());
    let current = api.get(WEBHOOK_CONFIGURATION).await?;
    let bundle = base64::engine::general_purpose::STANDARD.encode(roots.concat());
    let ops: Vec<serde_json::Value> = (0..current.webhooks.as_ref().map_or(0, Vec::len))
        .map(|i| json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}))
        .collect();
    let patch: json_patch::Patch = serde_json::from_value(json!(ops)).expect("a JSON patch");
    api.patch(WEBHOOK_CONFIGURATION, &PatchParams::default(), &Patch::Json::<()>(patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reviewed(username: &str, extra: serde_json::Value, audiences: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(json!({
            "authenticated": true,
            "audiences": audiences,
            "user": {"username": username, "uid": "u1", "groups": ["system:serviceaccounts"], "extra": extra}
        }))
        .unwrap()
    }

    fn bound(name: &str, uid: &str) -> serde_json::Value {
        json!({"authentication.kubernetes.io/pod-name": [name], "authentication.kubernetes.io/pod-uid": [uid]})
    }

    fn pod(sa: &str, uid: &str, ip: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": uid},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "web"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    #[test]
    fn tokens_are_matched_to_their_pod() {
        let peer: SocketAddr = "10.1.0.5:41000".parse().unwrap();
        let pods = |sa: &'static str, uid: &'static str| {
            move |ns: &str, name: &str| (ns == "shop" && name == "web-1").then(|| pod(sa, uid, "10.1.0.5"))
        };
        let good = reviewed("system:serviceaccount:shop:web", bound("web-1", "p1"), json!(["ferry.dev"]));
        let (identity, pod) = token_identity(&good, Some(peer), pods("web", "p1")).unwrap();
        assert_eq!((identity, pod.name.as_str(), pod.uid.as_str()), (Identity::new("shop", "web"), "web-1", "p1"));
        let cases = [
            (
                TokenReviewStatus {
                    authenticated: Some(false),
                    error: Some("token expired".into()),
                    ..Default::default()
                },
                Some(peer),
                pods("web", "p1"),
                "token expired",
            ),
            (
                reviewed(
                    "system:serviceaccount:shop:web",
                    bound("web-1", "p1"),
                    json!(["https://kubernetes.default.svc"]),
                ),
                Some(peer),
                pods("web", "p1"),
                "not for the ferry.dev audience",
            ),
            (
                reviewed("alice@example.com", bound("web-1", "p1"), json!(["ferry.dev"])),
                Some(peer),
                pods("web", "p1"),
                "is not a service account",
            ),
            (
                reviewed("system:serviceaccount:shop:web", json!({}), json!(["ferry.dev"])),
                Some(peer),
                pods("web", "p1"),
                "not bound to a pod",
            ),
            (
                reviewed("system:serviceaccount:shop:web", bound("web-2", "p1"), json!(["ferry.dev"])),
                Some(peer),
                pods("web", "p1"),
                "does not exist",
            ),
            (good.clone(), Some(peer), pods("web", "p0"), "not the pod the credential was issued to"),
            (good.clone(), Some(peer), pods("admin", "p1"), "runs as admin, not web"),
            (
                good.clone(),
                Some("10.1.0.9:41000".parse().unwrap()),
                pods("web", "p1"),
                "the request came from 10.1.0.9",
            ),
        ];
        for (status, peer, pods, want) in cases {
            let err = token_identity(&status, peer, pods).unwrap_err();
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
    }
}
