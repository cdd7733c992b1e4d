//! Tests of `discovery`.

use super::*;
use serde_json::json;

fn svc() -> KubeService {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"], "selector": {"app": "api"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                           {"name": "grpc-admin", "port": 9000, "targetPort": 9000},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]}
    }))
    .unwrap()
}

fn slice() -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "api-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "grpc-admin", "port": 9000}],
        "endpoints": [
            {"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "shop"}},
            {"addresses": ["10.1.0.6"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "api-2", "namespace": "shop"}},
            {"addresses": ["10.1.0.7"], "targetRef": {"kind": "Pod", "name": "legacy-1", "namespace": "shop"}}
        ]
    }))
    .unwrap()
}

fn pod(name: &str, sa: &str, meshed: bool) -> Pod {
    let labels = if meshed { json!({"ferry.dev/injected": "true"}) } else { json!({}) };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]}
    }))
    .unwrap()
}

#[test]
fn a_service_with_its_slices_and_pods() {
    let view = ClusterView {
        services: vec![svc()],
        slices: vec![slice()],
        pods: vec![pod("api-1", "api", true), pod("api-2", "api", true), pod("legacy-1", "legacy", false)],
        ..Default::default()
    };
    let (docs, verdicts) = documents(&view);
    assert!(verdicts.is_empty());
    let [Document::Service(s)] = docs.as_slice() else { panic!("{docs:?}") };
    assert_eq!((s.metadata.name.as_str(), s.metadata.namespace.as_str()), ("api", "shop"));
    let ports: Vec<(u16, PortProtocol, Option<u16>)> =
        s.spec.ports.iter().map(|p| (p.port, p.protocol, p.target_port)).collect();
    assert_eq!(ports, [(80, PortProtocol::Http, Some(8080)), (9000, PortProtocol::Grpc, None)], "UDP left out");
    assert_eq!(s.spec.addresses, ["api.shop", "api.shop.svc", "api.shop.svc.cluster.local", "10.96.0.20", "fd00::20"]);
    // The unready endpoint is left out; the unmeshed pod is called in plaintext (no identity).
    assert_eq!(
        s.spec.endpoints,
        [
            Endpoint { address: "10.1.0.5".into(), identity: Some("api".into()) },
            Endpoint { address: "10.1.0.7".into(), identity: None },
        ]
    );
    assert_eq!(s.spec.identities, ["api"]);
}

#[test]
fn policies_get_verdicts_and_only_accepted_ones_are_served() {
    let policy = |name: &str, created: &str, spec: serde_json::Value| -> TrafficPolicyResource {
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": "shop", "generation": 3, "creationTimestamp": created},
            "spec": spec
        }))
        .unwrap()
    };
    let good = json!({"targetRef": {"kind": "Service", "name": "api"}, "timeout": "2s"});
    let second = json!({"targetRef": {"kind": "Service", "name": "api"}, "timeout": "5s"});
    // What the CRD schema cannot say: perTryTimeout longer than timeout is caught by the store's rules too.
    let bad = json!({"targetRef": {"kind": "Service", "name": "web"}, "timeout": "1s",
                     "retries": {"attempts": 2, "perTryTimeout": "3s"}});
    let view = ClusterView {
        traffic_policies: vec![
            policy("api-v2", "2026-12-01T10:00:00Z", second),
            policy("api", "2026-11-01T10:00:00Z", good),
            policy("web", "2026-11-01T10:00:00Z", bad),
        ],
        ..Default::default()
    };
    let (docs, verdicts) = documents(&view);
    assert_eq!(docs.len(), 1);
    let by_name: BTreeMap<&str, &Verdict> = verdicts.iter().map(|v| (v.name.as_str(), v)).collect();
    assert_eq!(by_name["api"].error, None);
    assert_eq!(by_name["api"].generation, Some(3));
    let err = by_name["api-v2"].error.as_deref().unwrap();
    assert!(err.contains("Service `api` already has TrafficPolicy `api`"), "{err}");
    let err = by_name["web"].error.as_deref().unwrap();
    assert!(err.starts_with("spec.retries.perTryTimeout: 3s is longer than spec.timeout 1s"), "{err}");
}

#[test]
fn protocols_from_app_protocol_or_name() {
    for (app, name, want) in [
        (Some("kubernetes.io/h2c"), None, PortProtocol::Http2),
        (Some("grpc"), Some("tcp-x"), PortProtocol::Grpc),
        (None, Some("grpc-web"), PortProtocol::Grpc),
        (None, Some("tcp"), PortProtocol::Tcp),
        (None, Some("postgres"), PortProtocol::Tcp),
        (None, Some("https"), PortProtocol::Tcp),
        (Some("kubernetes.io/wss"), None, PortProtocol::Tcp),
        (Some("http"), Some("tcp"), PortProtocol::Http),
        (None, Some("http-api"), PortProtocol::Http),
        // Declared by neither: detected per connection.
        (None, Some("web"), PortProtocol::Detected),
        (None, None, PortProtocol::Detected),
    ] {
        assert_eq!(port_protocol(app, name), want, "{app:?} {name:?}");
    }
}

fn pod_at(ns: &str, name: &str, sa: &str, ip: &str, labels: serde_json::Value, meshed: bool) -> Pod {
    let mut labels = labels;
    if meshed {
        labels["ferry.dev/injected"] = json!("true");
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app",
                 "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9102}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn kube_service(ns: &str, name: &str, selector: serde_json::Value, ports: serde_json::Value) -> KubeService {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "10.96.0.9", "selector": selector, "ports": ports}}))
    .unwrap()
}

fn slice_for(ns: &str, service: &str, endpoints: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({"addressType": "IPv4",
        "metadata": {"name": format!("{service}-x"), "namespace": ns, "labels": {SERVICE_NAME_LABEL: service}},
        "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints}))
    .unwrap()
}

#[test]
fn what_each_meshed_pod_serves() {
    let http = json!([{"name": "http", "port": 80, "targetPort": "http"},
                      {"name": "grpc-admin", "port": 9000, "targetPort": 9090}]);
    let view = ClusterView {
        services: vec![
            kube_service("shop", "api", json!({"app": "api"}), http.clone()),
            // Selects by label only.
            kube_service(
                "shop",
                "metrics",
                json!({"app": "api"}),
                json!([{"name": "tcp-m", "port": 9102, "targetPort": "metrics"}]),
            ),
            // No selector: its slice targets api-2 (not ready yet), which counts.
            kube_service("shop", "manual", json!(null), json!([{"name": "http", "port": 80, "targetPort": 8080}])),
            // Another namespace's Service with the same selector selects nothing here.
            kube_service("other", "api", json!({"app": "api"}), http),
        ],
        slices: vec![slice_for(
            "shop",
            "manual",
            json!([{"addresses": ["10.1.0.6"], "conditions": {"ready": false},
                    "targetRef": {"kind": "Pod", "name": "api-2", "namespace": "shop", "uid": "uid-api-2"}}]),
        )],
        pods: vec![
            pod_at("shop", "api-1", "api", "10.1.0.5", json!({"app": "api"}), true),
            pod_at("shop", "api-2", "api", "10.1.0.6", json!({"app": "canary"}), true),
            pod_at("shop", "legacy-1", "legacy", "10.1.0.7", json!({"app": "api"}), false),
        ],
        ..Default::default()
    };
    let mut annotated = view.clone();
    annotated.pods[1].metadata.annotations =
        Some([("ferry.dev/default-inbound-policy".to_string(), "deny".to_string())].into());
    let served_by = workloads(&annotated, DefaultInbound::MeshOnly);
    let served = |pod: &str| -> Vec<(String, Vec<(u16, PortProtocol)>)> {
        served_by[&pod_workload_name("shop", pod)]
            .workload
            .services
            .iter()
            .map(|s| (s.key(), s.ports.clone()))
            .collect()
    };
    assert_eq!(
        served("api-1"),
        [
            ("shop/api".to_string(), vec![(8080, PortProtocol::Http), (9090, PortProtocol::Grpc)]),
            ("shop/metrics".to_string(), vec![(9102, PortProtocol::Tcp)]),
        ]
    );
    assert_eq!(served("api-2"), [("shop/manual".to_string(), vec![(8080, PortProtocol::Http)])]);
    assert!(!served_by.contains_key("pod/shop/legacy-1"), "unmeshed pods have no workload");
    let api1 = &served_by["pod/shop/api-1"];
    assert_eq!(api1.workload.default_inbound, DefaultInbound::MeshOnly);
    assert_eq!(api1.pod, Some(PodBinding { uid: "uid-api-1".into(), ips: vec!["10.1.0.5".parse().unwrap()] }));
    assert_eq!(served_by["pod/shop/api-2"].workload.default_inbound, DefaultInbound::Deny, "the annotation wins");

    // The policies' status: a missing Service, one selecting only an unmeshed pod, one enforced.
    let mut with_legacy = view.clone();
    with_legacy.services.push(kube_service("shop", "legacy", json!({"app": "legacy"}), json!([{"port": 80}])));
    with_legacy.pods[2].metadata.labels = Some([("app".to_string(), "legacy".to_string())].into());
    let mut verdicts: Vec<Verdict> = ["api", "legacy", "nope"]
        .iter()
        .map(|target| Verdict {
            kind: "AuthorizationPolicy",
            namespace: "shop".into(),
            name: target.to_string(),
            generation: Some(1),
            error: None,
            target: target.to_string(),
            resolved: None,
        })
        .collect();
    resolve(&mut verdicts, &with_legacy, &workloads(&with_legacy, DefaultInbound::Allow));
    let reasons: Vec<(bool, &str)> =
        verdicts.iter().map(|v| v.resolved.as_ref().map(|r| (r.0, r.1)).unwrap()).collect();
    assert_eq!(reasons, [(true, "ResolvedRefs"), (false, "NoMeshedPods"), (false, "BackendNotFound")]);
}

#[test]
fn a_slice_cannot_make_a_meshed_pod_plaintext() {
    // A Service of another namespace lists the meshed pod shop/api-1's IP without a targetRef (or with a
    // targetRef of its own): calls to the IP stay mTLS to api-1's identity, whichever Service comes first.
    let view = ClusterView {
        services: vec![
            kube_service("evil", "grab", json!(null), json!([{"name": "http", "port": 80, "targetPort": 8080}])),
            kube_service(
                "shop",
                "api",
                json!({"app": "api"}),
                json!([{"name": "http", "port": 80, "targetPort": 8080}]),
            ),
        ],
        slices: vec![
            slice_for(
                "evil",
                "grab",
                json!([{"addresses": ["10.1.0.5"]},
                {"addresses": ["10.1.0.5"], "targetRef": {"kind": "Pod", "name": "decoy", "namespace": "evil"}}]),
            ),
            slice_for(
                "shop",
                "api",
                json!([{"addresses": ["10.1.0.5"],
                "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "shop"}}]),
            ),
        ],
        pods: vec![
            pod_at("shop", "api-1", "api", "10.1.0.5", json!({"app": "api"}), true),
            pod_at("evil", "decoy", "decoy", "10.9.9.9", json!({}), false),
        ],
        ..Default::default()
    };
    let (docs, _) = documents(&view);
    for doc in &docs {
        let Document::Service(s) = doc else { continue };
        assert_eq!(s.spec.endpoints.len(), 1, "{s:?}");
        let want = if s.metadata.namespace == "shop" { "api" } else { "spiffe://cluster.local/ns/shop/sa/api" };
        assert_eq!(s.spec.endpoints[0].identity.as_deref(), Some(want), "{}", s.metadata.namespace);
        assert_eq!(s.spec.identities, [want]);
    }
    assert_eq!(docs.len(), 2, "both Services validate");
}
