//! Unit tests of the delta-ADS server: the model's endpoints, a session's subscriptions, ACKs, NACKs and push order,
//! the publisher's debounce, and a stream's binding to its pod.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use prost::Message;

use super::Xds;
use super::model::{Model, local_workload_name};
use super::publisher::DEBOUNCE;
use super::registry::Registration;
use super::session::{MAX_NACK_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_SUBSCRIBED_NAMES, Push, Session};
use super::status::ProxyStatus;
use super::stream::check_pod;
use crate::identity::tokens::Tokens;
use crate::metrics::ControlMetrics;
use crate::store::Store;
use ferry_api::config::Document;
use ferry_api::identity::Identity;
use ferry_api::protocol::{self, short_type};
use ferry_api::workload::{DefaultInbound, PodBinding, SelectingService, Workload, WorkloadRecord, pod_workload_name};

const DOCS: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: api, namespace: demo}
spec: {ports: [{port: 80}], identities: [api]}
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api, namespace: demo}
spec: {targetRef: {kind: Service, name: api}, defaultAction: deny}
"#;

fn test_mesh() -> protocol::Mesh {
    protocol::Mesh { roots_pem: vec![], default_mtls: ferry_api::policy::MtlsMode::Permissive, mesh_cidrs: vec![] }
}

fn reg(service: &str, addr: &str, ns: &str, sa: &str) -> Registration {
    Registration {
        service: service.into(),
        address: addr.parse().unwrap(),
        identity: Identity { namespace: ns.into(), service_account: sa.into() },
    }
}

fn endpoints(model: &Model) -> Vec<String> {
    let resource = Resource::decode(model.types[0].get("demo/api").unwrap().encoded.clone()).unwrap();
    match protocol::decode("demo/api", resource.resource.as_ref().unwrap()).unwrap() {
        protocol::Received::Document(Document::Service(s)) => s.spec.endpoints.into_iter().map(|e| e.address).collect(),
        _ => unreachable!(),
    }
}

#[test]
fn http_routes_travel_as_route_sets_per_service_and_route_namespace() {
    let routes = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a, namespace: demo}\n\
        spec: {parentRefs: [{group: '', kind: Service, name: api}]}\n---\napiVersion: gateway.networking.k8s.io/v1\n\
        kind: HTTPRoute\nmetadata: {name: b, namespace: demo}\nspec: {parentRefs: [{group: '', kind: Service, name: api}, \
        {group: '', kind: Service, name: ghost}]}\n";
    let docs = ferry_api::parse_documents(&format!("{DOCS}{routes}")).unwrap();
    let model = Model::build(1, docs, &[], None, &BTreeMap::new());
    // One set (demo/api/demo) holding both routes; nothing for a parent that does not exist.
    assert_eq!(model.counts(), [1, 0, 1, 1, 0, 0]);
    let names: Vec<&str> = model.types[super::model::ROUTES].keys().map(|k| &**k).collect();
    assert_eq!(names, ["demo/api/demo"]);
}

#[test]
fn endpoints_only_for_listed_identities() {
    let docs = ferry_api::parse_documents(DOCS).unwrap();
    let regs = [
        reg("demo/api", "127.0.0.1:1001", "demo", "api"),
        reg("demo/api", "127.0.0.1:1001", "demo", "api"),
        reg("demo/api", "127.0.0.2:1002", "demo", "web"),
        reg("demo/api", "127.0.0.3:1003", "other", "api"),
        reg("demo/web", "127.0.0.4:1004", "demo", "api"),
    ];
    let model = Model::build(1, docs.clone(), &regs, None, &BTreeMap::new());
    assert_eq!(endpoints(&model), ["127.0.0.1:1001"]);
    assert_eq!(model.counts(), [1, 0, 1, 0, 0, 0]);
    assert!(model.same_content(&Model::build(2, docs.clone(), &regs, None, &BTreeMap::new())));
    assert!(!model.same_content(&Model::build(2, docs, &regs[..0], None, &BTreeMap::new())));
}

/// What a proxy decodes from a push: the framed bytes through the standard message type.
fn wire(push: &Push) -> DeltaDiscoveryResponse {
    let framed = push.framed();
    assert_eq!(framed[0], 0, "uncompressed");
    assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize, framed.len() - 5);
    DeltaDiscoveryResponse::decode(&framed[5..]).unwrap()
}

/// The status row of a proxy `demo/<account>`, registered for `service`.
fn proxy_status(account: &str, service: Option<&str>) -> ProxyStatus {
    ProxyStatus {
        certificate_expiry: None,
        node: "n".into(),
        identity: Identity { namespace: "demo".into(), service_account: account.into() },
        address: None,
        service: service.map(str::to_string),
        workload: local_workload_name(&service.map(str::to_string).into_iter().collect::<Vec<_>>()).into(),
        connected_since: 0,
        types: Mutex::default(),
    }
}

#[test]
fn named_subscriptions() {
    let metrics = ControlMetrics::new();
    let status = proxy_status("api", Some("demo/api"));
    let model = Model::build(1, ferry_api::parse_documents(DOCS).unwrap(), &[], None, &BTreeMap::new());
    let mut s =
        Session { id: 1, workload: status.workload.clone(), served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
    // Named: only what is named; a name that does not exist comes back as removed.
    s.on_request(request(protocol::SERVICE_TYPE, &["demo/api", "demo/nope"], "", None), &status, &metrics, "n")
        .unwrap();
    let out: Vec<DeltaDiscoveryResponse> = s.due(&model, &status).iter().map(wire).collect();
    assert_eq!(out[0].resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["demo/api"]);
    assert_eq!(out[0].removed_resources, ["demo/nope"]);
    // Legacy wildcard (first request names nothing) ends when names are subscribed without `*`.
    s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &[], "", None), &status, &metrics, "n").unwrap();
    let t = &s.types[protocol::AUTHORIZATION_POLICY_TYPE];
    assert!(t.wildcard && t.legacy_wildcard);
    s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &["demo/x"], "", None), &status, &metrics, "n").unwrap();
    assert!(!s.types[protocol::AUTHORIZATION_POLICY_TYPE].wildcard);
    s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &["*"], "", None), &status, &metrics, "n").unwrap();
    assert!(s.types[protocol::AUTHORIZATION_POLICY_TYPE].wildcard);
    // Subscriptions are bounded.
    let many: Vec<String> = (0..=MAX_SUBSCRIBED_NAMES).map(|i| format!("demo/s{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let refused = s.on_request(request(protocol::TRAFFIC_POLICY_TYPE, &many, "", None), &status, &metrics, "n");
    assert_eq!(refused.unwrap_err().code(), tonic::Code::ResourceExhausted);
    // So is every field: the versions a reconnecting proxy says it has, and each name's length.
    let mut initial = request(protocol::TRUST_BUNDLE_TYPE, &[], "", None);
    initial.initial_resource_versions = (0..=MAX_SUBSCRIBED_NAMES).map(|i| (format!("n{i}"), "1".into())).collect();
    let refused = s.on_request(initial, &status, &metrics, "n").unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    let long = "x".repeat(MAX_NAME_BYTES + 1);
    let refused = s.on_request(request(protocol::WORKLOAD_TYPE, &[&long], "", None), &status, &metrics, "n");
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
}

/// Changes that arrive within the debounce window make one generation; a change after it makes the next.
#[tokio::test(start_paused = true)]
async fn changes_are_debounced_and_coalesced() {
    let dir = std::env::temp_dir().join(format!("ferry-ads-debounce-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(Mutex::new(Store::open(&dir).unwrap()));
    let tokens = Arc::new(Mutex::new(Tokens::open(&dir).unwrap()));
    let xds = Xds::new(
        store.clone(),
        tokens,
        Arc::new(ControlMetrics::new()),
        &dir,
        Duration::from_secs(60),
        test_mesh(),
        DefaultInbound::Allow,
    );
    assert_eq!(xds.generation(), 1);
    tokio::spawn(xds.clone().run_publisher());
    let service = |name: &str| {
        ferry_api::parse_documents(&format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 80}}]}}\n"
        ))
        .unwrap()
    };
    for i in 0..5 {
        store.lock().unwrap().apply(service(&format!("s{i}")), false).unwrap();
        xds.changed();
        tokio::time::sleep(DEBOUNCE / 10).await;
    }
    tokio::time::sleep(DEBOUNCE * 3).await;
    assert_eq!(xds.generation(), 2, "five changes inside the window: one push");
    assert_eq!(xds.published.borrow().counts(), [5, 0, 0, 0, 1, 1], "and the workload of proxies declaring nothing");
    // Nothing changed: a notification publishes nothing new.
    xds.changed();
    tokio::time::sleep(DEBOUNCE * 3).await;
    assert_eq!(xds.generation(), 2);
    store.lock().unwrap().apply(service("s5"), false).unwrap();
    xds.changed();
    tokio::time::sleep(DEBOUNCE * 3).await;
    assert_eq!(xds.generation(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

fn request(type_url: &str, subscribe: &[&str], nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| envoy_types::pb::google::rpc::Status {
            code: 3,
            message: m.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn session_protocol() {
    let metrics = ControlMetrics::new();
    let status = proxy_status("web", None);
    let docs = ferry_api::parse_documents(DOCS).unwrap();
    let m1 = Model::build(1, docs.clone(), &[], None, &BTreeMap::new());
    let mut s =
        Session { id: 7, workload: status.workload.clone(), served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
    // Wildcard subscription to Services and AuthorizationPolicies.
    s.on_request(request(protocol::SERVICE_TYPE, &[], "", None), &status, &metrics, "n").unwrap();
    s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &["*"], "", None), &status, &metrics, "n").unwrap();
    let out: Vec<DeltaDiscoveryResponse> = s.due(&m1, &status).iter().map(wire).collect();
    assert_eq!(out.len(), 2, "the first response per type is sent even when empty");
    assert_eq!(out[0].type_url, protocol::AUTHORIZATION_POLICY_TYPE, "policies before Services");
    assert!(out[0].resources.is_empty(), "an AuthorizationPolicy goes only to its target's proxies");
    let out = [out[1].clone(), out[0].clone()];
    assert_eq!(out[0].resources.len(), 1);
    assert_eq!(out[0].resources[0].name, "demo/api");
    assert_eq!(out[0].type_url, protocol::SERVICE_TYPE);
    assert!(protocol::decode("demo/api", out[0].resources[0].resource.as_ref().unwrap()).is_ok());
    // At most one push in flight: a new generation waits for the ACK.
    let m2 = Model::build(2, docs.clone(), &[reg("demo/api", "127.0.0.1:1", "demo", "api")], None, &BTreeMap::new());
    assert!(s.due(&m2, &status).is_empty());
    s.on_request(request(protocol::SERVICE_TYPE, &[], &out[0].nonce, None), &status, &metrics, "n").unwrap();
    s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &[], &out[1].nonce, None), &status, &metrics, "n")
        .unwrap();
    let out2: Vec<DeltaDiscoveryResponse> = s.due(&m2, &status).iter().map(wire).collect();
    assert_eq!(out2.len(), 1, "only the changed type is pushed");
    assert_eq!(out2[0].system_version_info, "2");
    // A NACK is recorded with its message; the stale nonce of an old push is ignored.
    s.on_request(request(protocol::SERVICE_TYPE, &[], "7-1", Some("old")), &status, &metrics, "n").unwrap();
    s.on_request(request(protocol::SERVICE_TYPE, &[], &out2[0].nonce, Some("bad port")), &status, &metrics, "n")
        .unwrap();
    let json = status.to_json(Instant::now());
    assert_eq!(json["types"]["Service"]["nacked"]["message"], "bad port");
    // A NACK's message is kept only up to MAX_NACK_MESSAGE_BYTES.
    let mut other =
        Session { id: 8, workload: status.workload.clone(), served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
    let (long_status, metrics_other) = (proxy_status("web", None), ControlMetrics::new());
    other.on_request(request(protocol::SERVICE_TYPE, &[], "", None), &long_status, &metrics_other, "n").unwrap();
    let pushed: Vec<DeltaDiscoveryResponse> = other.due(&m2, &long_status).iter().map(wire).collect();
    let huge = "e".repeat(4 * 1024 * 1024);
    other
        .on_request(
            request(protocol::SERVICE_TYPE, &[], &pushed[0].nonce, Some(&huge)),
            &long_status,
            &metrics_other,
            "n",
        )
        .unwrap();
    let kept = long_status.to_json(Instant::now())["types"]["Service"]["nacked"]["message"].as_str().unwrap().len();
    assert!(kept <= MAX_NACK_MESSAGE_BYTES + 4, "{kept} bytes of a 4 MiB NACK message kept");
    assert_eq!(json["types"]["Service"]["acked"], 1);
    assert_eq!(json["stale"], true);
    // Nothing is resent at the same generation; the next one resends what the proxy refused (it kept the old).
    assert!(s.due(&m2, &status).is_empty());
    let m2b = Model::build(3, docs.clone(), &[reg("demo/api", "127.0.0.1:1", "demo", "api")], None, &BTreeMap::new());
    let again: Vec<DeltaDiscoveryResponse> = s.due(&m2b, &status).iter().map(wire).collect();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].resources[0].version, out2[0].resources[0].version, "the refused version, again");
    s.on_request(request(protocol::SERVICE_TYPE, &[], &again[0].nonce, None), &status, &metrics, "n").unwrap();
    assert_eq!(status.to_json(Instant::now())["stale"], false, "an ACK of the whole difference clears it");
    // Deleting the Service is a removal.
    let m3 = Model::build(4, docs[1..].to_vec(), &[], None, &BTreeMap::new());
    let out3: Vec<DeltaDiscoveryResponse> = s.due(&m3, &status).iter().map(wire).collect();
    assert_eq!(out3[0].removed_resources, ["demo/api"]);
    assert_eq!(metrics.xds_acks.with_label_values(&["Service"]).get(), 2);
    assert_eq!(metrics.xds_nacks.with_label_values(&["Service"]).get(), 1);
}

#[test]
fn each_proxy_gets_its_own_workload_and_the_policies_of_the_services_selecting_it() {
    let metrics = ControlMetrics::new();
    let docs = ferry_api::parse_documents(DOCS).unwrap();
    let record = |services: &[&str]| WorkloadRecord {
        workload: Workload::new(
            services
                .iter()
                .map(|n| SelectingService {
                    namespace: "demo".into(),
                    name: n.to_string(),
                    ports: vec![(8080, ferry_api::PortProtocol::Http)],
                })
                .collect(),
            DefaultInbound::MeshOnly,
        ),
        pod: Some(PodBinding { uid: "u1".into(), ips: vec!["10.0.0.5".parse().unwrap()] }),
    };
    let workloads = BTreeMap::from([
        (pod_workload_name("demo", "api-1"), record(&["api"])),
        (pod_workload_name("demo", "web-1"), record(&[])),
    ]);
    let model = Model::build(1, docs, &[], None, &workloads);
    // (the proxy's Workload name, the AuthorizationPolicies it gets, whether its Workload is answered)
    for (workload, policies, answered) in [
        ("pod/demo/api-1", vec!["demo/api"], true),
        ("pod/demo/web-1", vec![], true),
        ("pod/demo/unknown-1", vec![], false),
    ] {
        let mut status = proxy_status("x", None);
        status.workload = workload.into();
        let mut s =
            Session { id: 1, workload: workload.into(), served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
        for t in [protocol::AUTHORIZATION_POLICY_TYPE, protocol::WORKLOAD_TYPE] {
            s.on_request(request(t, &[], "", None), &status, &metrics, "n").unwrap();
        }
        let first: Vec<DeltaDiscoveryResponse> = s.due(&model, &status).iter().map(wire).collect();
        // The policies go first; the Workload waits for their ACK (it must never arrive before them).
        assert!(first.iter().all(|r| r.type_url != protocol::WORKLOAD_TYPE), "{workload}");
        let nonce = first.iter().find(|r| r.type_url == protocol::AUTHORIZATION_POLICY_TYPE).unwrap().nonce.clone();
        s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &[], &nonce, None), &status, &metrics, "n").unwrap();
        let out: Vec<DeltaDiscoveryResponse> =
            first.into_iter().chain(s.due(&model, &status).iter().map(wire)).collect();
        let names = |t: &str| -> Option<Vec<String>> {
            out.iter().find(|r| r.type_url == t).map(|r| r.resources.iter().map(|x| x.name.clone()).collect())
        };
        assert_eq!(
            names(protocol::AUTHORIZATION_POLICY_TYPE),
            Some(policies.iter().map(|p| p.to_string()).collect()),
            "{workload}"
        );
        let own = names(protocol::WORKLOAD_TYPE);
        assert_eq!(own, answered.then(|| vec![workload.to_string()]), "{workload}: only its own, once known");
        if answered {
            let r = &out.iter().find(|r| r.type_url == protocol::WORKLOAD_TYPE).unwrap().resources[0];
            let Ok(protocol::Received::Workload(w)) = protocol::decode(&r.name, r.resource.as_ref().unwrap()) else {
                panic!("not a Workload")
            };
            assert_eq!(w.default_inbound, DefaultInbound::MeshOnly);
        }
    }
    // The Service stops selecting api-1: the Workload without it goes out before its policy is withdrawn (a
    // proxy applies responses in order, so the port never keeps the Service without its policy).
    let mut status = proxy_status("x", None);
    status.workload = "pod/demo/api-1".into();
    let mut s =
        Session { id: 2, workload: "pod/demo/api-1".into(), served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
    for t in [protocol::AUTHORIZATION_POLICY_TYPE, protocol::WORKLOAD_TYPE] {
        s.on_request(request(t, &[], "", None), &status, &metrics, "n").unwrap();
    }
    let exchange = |s: &mut Session, model: &Model| -> Vec<(String, Vec<String>, Vec<String>)> {
        let mut seen = Vec::new();
        loop {
            let out: Vec<DeltaDiscoveryResponse> = s.due(model, &status).iter().map(wire).collect();
            if out.is_empty() {
                return seen;
            }
            for r in out {
                let names = r.resources.iter().map(|x| x.name.clone()).collect();
                seen.push((short_type(&r.type_url).to_string(), names, r.removed_resources.clone()));
                s.on_request(request(&r.type_url, &[], &r.nonce, None), &status, &metrics, "n").unwrap();
            }
        }
    };
    exchange(&mut s, &model);
    let dropped = BTreeMap::from([(pod_workload_name("demo", "api-1"), record(&[]))]);
    let model2 = Model::build(2, ferry_api::parse_documents(DOCS).unwrap(), &[], None, &dropped);
    let order = exchange(&mut s, &model2);
    let workload_at = order.iter().position(|(t, _, _)| t == "Workload").expect("a new Workload");
    let withdrawn = order.iter().position(|(t, _, removed)| t == "AuthorizationPolicy" && removed == &["demo/api"]);
    assert!(withdrawn.is_some_and(|w| w > workload_at), "{order:?}");

    // A stream is bound to the pod its certificate names: same uid, from one of its IPs.
    let bound = &model.bound[&*pod_workload_name("demo", "api-1")];
    let pod = |uid: &str| ferry_api::identity::PodRef { name: "api-1".into(), uid: uid.into() };
    let from = |ip: &str| Some(SocketAddr::new(ip.parse().unwrap(), 40000));
    assert_eq!(check_pod(bound, &pod("u1"), from("10.0.0.5")), Ok(()));
    assert_eq!(check_pod(bound, &pod("u1"), from("::ffff:10.0.0.5")), Ok(()));
    assert!(check_pod(bound, &pod("u0"), from("10.0.0.5")).unwrap_err().contains("replaced"));
    assert!(check_pod(bound, &pod("u1"), from("10.0.0.9")).unwrap_err().contains("comes from 10.0.0.9"));
}

const MESH: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: api, namespace: demo}
spec: {ports: [{port: 80}], addresses: ["10.96.0.10", "api.example:80"], endpoints: [{address: "10.0.0.1:8080", identity: api}]}
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: canary, namespace: demo}
spec: {ports: [{port: 80}]}
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: web, namespace: demo}
spec: {ports: [{port: 80}]}
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: db, namespace: demo}
spec: {ports: [{port: 5432}], addresses: ["10.96.0.20"]}
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: demo}
spec: {targetRef: {kind: Service, name: api}, timeout: 2s}
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: db, namespace: demo}
spec: {targetRef: {kind: Service, name: db}, timeout: 3s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-canary, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules: [{backendRefs: [{name: api, port: 80, weight: 9}, {name: canary, port: 80, weight: 1}]}]
"#;

/// One round of an on-demand session: (type, names, removed, aliases per name) of each push, each then ACKed.
fn round(s: &mut Session, model: &Model, status: &ProxyStatus) -> Vec<(String, Vec<String>, Vec<String>)> {
    let metrics = ControlMetrics::new();
    let mut seen = Vec::new();
    for push in s.due(model, status) {
        let wire = wire(&push);
        let mut names: Vec<String> = wire
            .resources
            .iter()
            .map(|r| if r.aliases.is_empty() { r.name.clone() } else { format!("{} {}", r.name, r.aliases.join(" ")) })
            .collect();
        names.sort();
        seen.push((short_type(&wire.type_url).to_string(), names, wire.removed_resources.clone()));
        s.on_request(request(&wire.type_url, &[], &wire.nonce, None), status, &metrics, "n").unwrap();
    }
    seen
}

#[test]
fn an_on_demand_proxy_gets_what_it_subscribes_to_and_what_that_depends_on() {
    let metrics = ControlMetrics::new();
    let status = proxy_status("web", Some("demo/web"));
    let selecting = SelectingService {
        namespace: "demo".into(),
        name: "web".into(),
        ports: vec![(80, ferry_api::PortProtocol::Http)],
    };
    let record = WorkloadRecord { workload: Workload::new(vec![selecting], DefaultInbound::Deny), pod: None };
    let workloads = BTreeMap::from([(status.workload.to_string(), record)]);
    let docs = ferry_api::parse_documents(MESH).unwrap();
    let model = |generation, docs: &[Document]| Model::build(generation, docs.to_vec(), &[], None, &workloads);
    let m1 = model(1, &docs);
    let mut s =
        Session { id: 1, workload: status.workload.clone(), served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
    let subscribe = |s: &mut Session, names: &[&str], unsubscribe: &[&str]| {
        let mut r = request(protocol::SERVICE_TYPE, names, "", None);
        r.resource_names_unsubscribe = unsubscribe.iter().map(|n| n.to_string()).collect();
        s.on_request(r, &status, &metrics, "n").unwrap();
    };
    // The first request opts out of the wildcard and names nothing: the proxy gets what its pod serves.
    subscribe(&mut s, &[], &["*"]);
    for t in [protocol::TRAFFIC_POLICY_TYPE, protocol::ROUTE_SET_TYPE, protocol::WORKLOAD_TYPE] {
        s.on_request(request(t, &["*"], "", None), &status, &metrics, "n").unwrap();
    }
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let first = round(&mut s, &m1, &status);
    assert_eq!(
        first,
        [
            ("TrafficPolicy".into(), v(&[]), v(&[])),
            ("RouteSet".into(), v(&[]), v(&[])),
            ("Service".into(), v(&["demo/web"]), v(&[])),
        ]
    );
    // (The Workload waits for the policies' ACK.)
    assert_eq!(round(&mut s, &m1, &status), [("Workload".into(), v(&["local/demo/web"]), v(&[]))]);
    // A VIP: its Service (carrying the alias), the canary its route sends to, the policy and the route set.
    subscribe(&mut s, &["ip/10.96.0.10"], &[]);
    assert_eq!(
        round(&mut s, &m1, &status),
        [
            ("TrafficPolicy".into(), v(&["demo/api"]), v(&[])),
            // (the route set before the Service that answers: the first call finds its routes)
            ("RouteSet".into(), v(&["demo/api/demo"]), v(&[])),
            ("Service".into(), v(&["demo/api ip/10.96.0.10", "demo/canary"]), v(&[])),
        ]
    );
    // The same Service by a pod's IP and by host: sent again with the alias; a name nothing has: removed.
    subscribe(&mut s, &["ip/10.0.0.1", "host/api.example", "host/nothing.demo"], &[]);
    let mut again = round(&mut s, &m1, &status);
    again[0].2.sort();
    assert_eq!(again, [("Service".into(), v(&["demo/api host/api.example ip/10.0.0.1"]), v(&["host/nothing.demo"]))]);
    // A refused answer is answered again with the next generation's push.
    subscribe(&mut s, &["host/api.demo"], &[]);
    let refused = s.due(&m1, &status);
    let service = refused.iter().find(|p| p.type_url == protocol::SERVICE_TYPE).map(wire).unwrap();
    assert_eq!(service.resources[0].aliases, ["host/api.demo"], "{service:?}");
    for push in &refused {
        let error = (push.type_url == protocol::SERVICE_TYPE).then_some("no");
        s.on_request(request(push.type_url, &[], &push.nonce, error), &status, &metrics, "n").unwrap();
    }
    let again = round(&mut s, &model(9, &docs), &status);
    assert_eq!(again, [("Service".into(), v(&["demo/api host/api.demo"]), v(&[]))]);
    // A change to a Service this proxy does not call reaches it not at all; a change to one it calls does.
    let mut changed = docs.clone();
    for doc in &mut changed {
        if let Document::Service(svc) = doc
            && svc.metadata.name == "db"
        {
            svc.spec.ports[0].port = 5433;
        }
    }
    assert!(round(&mut s, &model(2, &changed), &status).is_empty());
    for doc in &mut changed {
        if let Document::Service(svc) = doc
            && svc.metadata.name == "canary"
        {
            svc.spec.addresses.push("canary.example".into());
        }
    }
    assert_eq!(round(&mut s, &model(3, &changed), &status), [("Service".into(), v(&["demo/canary"]), v(&[]))]);
    // Released: what only those names brought is removed, what the pod serves stays.
    subscribe(&mut s, &[], &["ip/10.96.0.10", "ip/10.0.0.1", "host/api.example", "host/nothing.demo", "host/api.demo"]);
    let mut released = round(&mut s, &model(3, &changed), &status);
    for r in &mut released {
        r.2.sort();
    }
    assert_eq!(
        released,
        [
            ("TrafficPolicy".into(), v(&[]), v(&["demo/api"])),
            ("RouteSet".into(), v(&[]), v(&["demo/api/demo"])),
            ("Service".into(), v(&[]), v(&["demo/api", "demo/canary"])),
        ]
    );
}
