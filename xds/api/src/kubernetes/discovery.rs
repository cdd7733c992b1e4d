//! Kubernetes discovery, the pure part: Services, EndpointSlices, Pods and Ferry's policy CRDs as the API server
//! holds them, turned into the same documents the local store holds (and each policy's verdict for its status).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube_core::ResourceExt;

use crate::config::{Document, Endpoint, Metadata, PortProtocol, Service, ServicePort, ServiceSpec};
use crate::policy::{AuthorizationPolicy, AuthorizationPolicyResource, TrafficPolicy, TrafficPolicyResource};
use crate::workload::{DefaultInbound, SelectingService, Workload};
use crate::workload::{PodBinding, WorkloadRecord, pod_workload_name};

/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One view of the cluster, as the watchers last saw it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub services: Vec<KubeService>,
    pub slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub traffic_policies: Vec<TrafficPolicyResource>,
    pub authorization_policies: Vec<AuthorizationPolicyResource>,
}

/// Whether a policy object was accepted; written back as its `Accepted` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// `None`: accepted; otherwise every error, each naming its field.
    pub error: Option<String>,
    /// The Service the policy targets (`spec.targetRef.name`, in the policy's namespace).
    pub target: String,
    /// Whether that Service exists and selects a meshed pod (whose proxy enforces the policy): `None` until
    /// [`resolve`] says, else `(true, "ResolvedRefs", …)` or `(false, reason, message)`.
    pub resolved: Option<(bool, &'static str, String)>,
}

/// Says, for each accepted policy, whether its Service exists and selects any meshed pod (`kubectl get` then shows
/// whether anything enforces it).
pub fn resolve(verdicts: &mut [Verdict], view: &ClusterView, workloads: &BTreeMap<String, WorkloadRecord>) {
    let served: BTreeSet<String> =
        workloads.values().flat_map(|w| w.workload.services.iter().map(SelectingService::key)).collect();
    for v in verdicts.iter_mut().filter(|v| v.error.is_none()) {
        let key = format!("{}/{}", v.namespace, v.target);
        let exists = view
            .services
            .iter()
            .any(|s| s.namespace().as_deref() == Some(v.namespace.as_str()) && s.name_any() == v.target);
        v.resolved = Some(if !exists {
            (false, "BackendNotFound", format!("Service {key} does not exist: nothing enforces this policy"))
        } else if !served.contains(&key) {
            (false, "NoMeshedPods", format!("Service {key} selects no meshed pod: nothing enforces this policy"))
        } else {
            (true, "ResolvedRefs", format!("Service {key} selects meshed pods, whose proxies enforce this policy"))
        });
    }
}

/// A pod runs Ferry's proxy (it was injected): its endpoints are called over mTLS as its service account.
pub fn is_meshed(pod: &Pod) -> bool {
    let labelled = pod.labels().get(super::inject::INJECTED_LABEL).is_some_and(|v| v == "true");
    let has_proxy = pod.spec.as_ref().is_some_and(|s| {
        s.init_containers.iter().flatten().chain(&s.containers).any(|c| c.name == super::inject::PROXY_CONTAINER)
    });
    labelled || has_proxy
}

/// The pod's IPs (`status.podIPs`, and `status.podIP`).
pub fn pod_ips(pod: &Pod) -> Vec<std::net::IpAddr> {
    let status = pod.status.as_ref();
    let listed = status.into_iter().flat_map(|s| s.pod_ips.iter().flatten().map(|ip| ip.ip.clone()));
    let mut ips: Vec<std::net::IpAddr> =
        listed.chain(status.and_then(|s| s.pod_ip.clone())).filter_map(|ip| ip.parse().ok()).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// What a Service port speaks, from its `appProtocol` or, like Istio, its name's prefix (`grpc-web`, `http2-api`);
/// anything else is `Detected` per connection (HTTP/1, h2c, or opaque TCP).
pub fn port_protocol(app_protocol: Option<&str>, name: Option<&str>) -> PortProtocol {
    let word = |s: &str| match s.to_ascii_lowercase().as_str() {
        "grpc" => Some(PortProtocol::Grpc),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(PortProtocol::Http2),
        "http" | "kubernetes.io/ws" => Some(PortProtocol::Http),
        // The app's own TLS (the API server's `https` port, for one) is passed through uninspected.
        "https" | "tls" | "kubernetes.io/wss" | "tcp" | "mysql" | "mongo" | "redis" | "postgres" => {
            Some(PortProtocol::Tcp)
        }
        _ => None,
    };
    app_protocol
        .and_then(word)
        .or_else(|| name.and_then(|n| word(n.split('-').next().unwrap_or(n))))
        .unwrap_or(PortProtocol::Detected)
}

/// The Ferry `Service` of a Kubernetes Service: its TCP ports (target ports from the EndpointSlices), its names
/// and cluster IPs as addresses, its ready endpoints by pod IP with the pod's service account as identity when the
/// pod is meshed, and those accounts as the identities allowed to serve it. `None` for kinds Ferry does not route
/// (ExternalName) and Services without TCP ports.
pub fn service(
    svc: &KubeService,
    slices: &[&EndpointSlice],
    pods: &BTreeMap<(String, String), &Pod>,
    by_ip: &BTreeMap<std::net::IpAddr, &Pod>,
) -> Option<Service> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let (name, namespace) = (svc.name_any(), svc.namespace().unwrap_or_else(|| "default".into()));
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Ok(port) = u16::try_from(p.port) else { continue };
        // The slices' port of the same name is the resolved target port (named target ports included).
        let from_slices = slices
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|sp| sp.name == p.name || (sp.name.as_deref().unwrap_or("").is_empty() && p.name.is_none()))
            .and_then(|sp| sp.port)
            .and_then(|n| u16::try_from(n).ok());
        let declared = match &p.target_port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => u16::try_from(*n).ok(),
            _ => None,
        };
        let target = from_slices.or(declared).filter(|t| *t != port);
        ports.push(ServicePort {
            port,
            protocol: port_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
            name: p.name.clone(),
            target_port: target,
        });
    }
    if ports.is_empty() {
        return None;
    }
    let mut addresses: Vec<String> = vec![
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ];
    let ips = spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter());
    for ip in ips.filter(|ip| ip.parse::<std::net::IpAddr>().is_ok()) {
        if !addresses.contains(ip) {
            addresses.push(ip.clone());
        }
    }
    let mut endpoints: BTreeMap<String, Option<String>> = BTreeMap::new();
    for slice in slices {
        for ep in &slice.endpoints {
            // Ready, or not said otherwise (the API's meaning of an absent condition).
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let target =
                ep.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                    pods.get(&(r.namespace.clone().unwrap_or_else(|| namespace.clone()), r.name.clone()?))
                });
            for address in &ep.addresses {
                // Whether an address is meshed, and as whom, comes from the pod that has it, whatever the slice
                // says: a slice (of any namespace) listing a meshed pod's IP without its targetRef cannot make calls
                // to it plaintext. The targetRef only counts for a pod that has no IP yet.
                let owner = address
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .and_then(|ip| by_ip.get(&ip).copied())
                    .or(target.copied().filter(|p| pod_ips(p).is_empty()));
                endpoints
                    .insert(address.clone(), owner.filter(|p| is_meshed(p)).map(|p| identity_entry(p, &namespace)));
            }
        }
    }
    let identities: BTreeSet<String> = endpoints.values().flatten().cloned().collect();
    Some(Service {
        metadata: Metadata { name, namespace, labels: BTreeMap::new(), creation_timestamp: None },
        spec: ServiceSpec {
            ports,
            addresses,
            identities: identities.into_iter().collect(),
            endpoints: endpoints.into_iter().map(|(address, identity)| Endpoint { address, identity }).collect(),
        },
    })
}

/// The EndpointSlices of each Service, by (namespace, Service name).
fn slices_by_service(view: &ClusterView) -> BTreeMap<(String, String), Vec<&EndpointSlice>> {
    let mut out: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &view.slices {
        if let (Some(ns), Some(service)) = (slice.namespace(), slice.labels().get(SERVICE_NAME_LABEL)) {
            out.entry((ns, service.clone())).or_default().push(slice);
        }
    }
    out
}

/// How a Service of `namespace` names the identity of a meshed pod: its service account, or (a pod of another
/// namespace) its full SPIFFE ID.
fn identity_entry(pod: &Pod, namespace: &str) -> String {
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let pod_namespace = pod.namespace().unwrap_or_default();
    if pod_namespace == namespace { account } else { crate::identity::Identity::new(&pod_namespace, &account).spiffe() }
}

/// The live pods (not finished: a finished pod's IP may be another pod's now) by IP.
fn pods_by_ip(pods: &[Pod]) -> BTreeMap<std::net::IpAddr, &Pod> {
    let live = pods
        .iter()
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded") | Some("Failed")));
    let mut by_ip = BTreeMap::new();
    for pod in live {
        for ip in pod_ips(pod) {
            // Pods sharing an IP (the node's, with hostNetwork) are never meshed: a meshed one wins.
            let slot = by_ip.entry(ip).or_insert(pod);
            if is_meshed(pod) {
                *slot = pod;
            }
        }
    }
    by_ip
}

/// The documents for one view of the cluster, each validated by the same rules as the local store; the policies'
/// verdicts. A refused policy is left out (the proxies keep what they have for its Service: nothing invalid reaches a
/// proxy), and a second TrafficPolicy for one Service is refused in favour of the older one.
pub fn documents(view: &ClusterView) -> (Vec<Document>, Vec<Verdict>) {
    let pods: BTreeMap<(String, String), &Pod> =
        view.pods.iter().map(|p| ((p.namespace().unwrap_or_default(), p.name_any()), p)).collect();
    let by_ip = pods_by_ip(&view.pods);
    let slices_of = slices_by_service(view);
    let mut docs = Vec::new();
    for svc in &view.services {
        let (name, namespace) = (svc.name_any(), svc.namespace().unwrap_or_default());
        let slices: Vec<&EndpointSlice> =
            slices_of.get(&(namespace.clone(), name.clone())).cloned().unwrap_or_default();
        if let Some(service) = service(svc, &slices, &pods, &by_ip) {
            match validated(Document::Service(service)) {
                Ok(doc) => docs.push(doc),
                Err(e) => tracing::warn!(service = %format!("{namespace}/{name}"), error = %e, "Service not routable"),
            }
        }
    }
    let mut verdicts = Vec::new();
    // Oldest first, so that of two TrafficPolicies for one Service the first one stays.
    let mut traffic: Vec<&TrafficPolicyResource> = view.traffic_policies.iter().collect();
    traffic.sort_by_key(|p| (p.metadata.creation_timestamp.clone().map(|t| t.0), p.name_any()));
    let mut targets: BTreeMap<(String, String), String> = BTreeMap::new();
    for p in traffic {
        let meta = metadata(&p.metadata);
        let doc = TrafficPolicy { metadata: meta.clone(), spec: p.spec.clone() };
        let mut result = validated(Document::TrafficPolicy(Box::new(doc)));
        if result.is_ok() {
            let key = (meta.namespace.clone(), p.spec.target_ref.name.clone());
            match targets.get(&key) {
                Some(existing) => {
                    result = Err(crate::one_traffic_policy_error(&key.1, existing).to_string());
                }
                None => {
                    targets.insert(key, meta.name.clone());
                }
            }
        }
        verdicts.push(verdict("TrafficPolicy", &p.metadata, &p.spec.target_ref.name, &result));
        if let Ok(doc) = result {
            docs.push(doc);
        }
    }
    for p in &view.authorization_policies {
        let doc = AuthorizationPolicy { metadata: metadata(&p.metadata), spec: p.spec.clone() };
        let result = validated(Document::AuthorizationPolicy(doc));
        verdicts.push(verdict("AuthorizationPolicy", &p.metadata, &p.spec.target_ref.name, &result));
        if let Ok(doc) = result {
            docs.push(doc);
        }
    }
    (docs, verdicts)
}

/// What each meshed pod serves, by Workload name: the Services of its namespace that select it — by their selector
/// against its labels, or by an EndpointSlice endpoint that targets it, ready or not (a starting pod gets its
/// policies before it is ready) — with the pod ports each selects (its target ports; a named one resolved against
/// the pod's container ports); and who may call its other ports (its annotation, else `default`).
pub fn workloads(view: &ClusterView, default: DefaultInbound) -> BTreeMap<String, WorkloadRecord> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let slices_of = slices_by_service(view);
    let mut services_in: BTreeMap<String, Vec<&KubeService>> = BTreeMap::new();
    for svc in &view.services {
        services_in.entry(svc.namespace().unwrap_or_default()).or_default().push(svc);
    }
    let mut out = BTreeMap::new();
    for pod in view.pods.iter().filter(|p| is_meshed(p)) {
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let labels = pod.labels();
        let container_port = |port_name: &str| {
            let spec = pod.spec.as_ref()?;
            let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
            containers.flat_map(|c| c.ports.iter().flatten()).find_map(|p| {
                (p.name.as_deref() == Some(port_name) && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                    .then(|| u16::try_from(p.container_port).ok())
                    .flatten()
            })
        };
        let mut selecting = Vec::new();
        for svc in services_in.get(&namespace).into_iter().flatten() {
            let Some(spec) = svc.spec.as_ref().filter(|s| s.type_.as_deref() != Some("ExternalName")) else {
                continue;
            };
            let by_selector = spec
                .selector
                .as_ref()
                .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
            let svc_name = svc.name_any();
            let slices = slices_of.get(&(namespace.clone(), svc_name.clone())).into_iter().flatten();
            // The slices' own port numbers are the resolved target ports of the Service ports of the same name.
            let mut slice_ports: BTreeMap<String, u16> = BTreeMap::new();
            let mut by_slice = false;
            for slice in slices {
                let targets_pod = slice.endpoints.iter().any(|e| {
                    e.target_ref.as_ref().is_some_and(|r| {
                        r.kind.as_deref() == Some("Pod")
                            && r.name.as_deref() == Some(name.as_str())
                            && r.namespace.as_deref().unwrap_or(namespace.as_str()) == namespace
                            && r.uid.as_ref().is_none_or(|uid| pod.metadata.uid.as_ref() == Some(uid))
                    })
                });
                if targets_pod {
                    by_slice = true;
                    for p in slice.ports.iter().flatten() {
                        if let Some(port) = p.port.and_then(|n| u16::try_from(n).ok()) {
                            slice_ports.insert(p.name.clone().unwrap_or_default(), port);
                        }
                    }
                }
            }
            if !by_selector && !by_slice {
                continue;
            }
            let mut ports = Vec::new();
            for p in spec.ports.iter().flatten() {
                if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                    continue;
                }
                let target = match &p.target_port {
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(port_name)) => container_port(port_name),
                    None => u16::try_from(p.port).ok(),
                }
                .or_else(|| slice_ports.get(p.name.as_deref().unwrap_or("")).copied());
                if let Some(target) = target.filter(|t| *t != 0) {
                    ports.push((target, port_protocol(p.app_protocol.as_deref(), p.name.as_deref())));
                }
            }
            selecting.push(SelectingService { namespace: namespace.clone(), name: svc_name, ports });
        }
        let note = pod.annotations().get(super::inject::annotation::DEFAULT_INBOUND_POLICY);
        let default_inbound = match note.map(|v| v.parse::<DefaultInbound>()) {
            None => default,
            Some(Ok(policy)) => policy,
            Some(Err(e)) => {
                // Admission refuses such a value; one that got past it (a pod created before) fails closed.
                tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "bad {} annotation: denying its unselected ports", super::inject::annotation::DEFAULT_INBOUND_POLICY);
                DefaultInbound::Deny
            }
        };
        let binding = PodBinding { uid: pod.metadata.uid.clone().unwrap_or_default(), ips: pod_ips(pod) };
        let record = WorkloadRecord { workload: Workload::new(selecting, default_inbound), pod: Some(binding) };
        out.insert(pod_workload_name(&namespace, &name), record);
    }
    out
}

pub(crate) fn metadata(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Metadata {
    Metadata {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        labels: BTreeMap::new(),
        creation_timestamp: meta.creation_timestamp.as_ref().map(|t| crate::meta::rfc3339(t.0.as_second())),
    }
}

fn verdict(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    target: &str,
    result: &Result<Document, String>,
) -> Verdict {
    Verdict {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        generation: meta.generation,
        error: result.as_ref().err().cloned(),
        target: target.to_string(),
        resolved: None,
    }
}

/// The document through the store's own validation (field paths in the error, without the document's name: the
/// condition sits on the object already).
fn validated(doc: Document) -> Result<Document, String> {
    crate::parse_value(crate::document_json(&doc)).map_err(|e| {
        e.documents.iter().flat_map(|(_, errors)| errors.iter().map(|f| f.to_string())).collect::<Vec<_>>().join("; ")
    })
}

#[cfg(test)]
mod tests;
