//! The xDS contract both sides share: type URLs, resource names, node metadata keys, and `ferry.v1` resources packed
//! into `google.protobuf.Any` (decoding validates exactly as `ferryctl apply` does).

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::config::Document;
use crate::policy::MtlsMode;
use crate::resources::{Resource, from_resource, pb, route_set_from_pb, route_set_to_pb, to_resource};
use crate::route::RouteSet;

pub const SERVICE_TYPE: &str = "type.googleapis.com/ferry.v1.Service";
pub const TRAFFIC_POLICY_TYPE: &str = "type.googleapis.com/ferry.v1.TrafficPolicy";
pub const AUTHORIZATION_POLICY_TYPE: &str = "type.googleapis.com/ferry.v1.AuthorizationPolicy";
pub const TRUST_BUNDLE_TYPE: &str = "type.googleapis.com/ferry.v1.TrustBundle";
pub const WORKLOAD_TYPE: &str = "type.googleapis.com/ferry.v1.Workload";
pub const ROUTE_SET_TYPE: &str = "type.googleapis.com/ferry.v1.RouteSet";
/// The one TrustBundle resource's name.
pub const TRUST_BUNDLE_NAME: &str = "mesh";

/// Every type a proxy subscribes to, in the order it subscribes (Services first, so policies find their targets).
/// A proxy's snapshot is built only once every type has answered: the Workload answer (what its pod serves, possibly
/// nothing) comes only once the control plane knows the pod, so a proxy never serves inbound without it.
pub const TYPES: [&str; TYPE_COUNT] =
    [SERVICE_TYPE, TRAFFIC_POLICY_TYPE, AUTHORIZATION_POLICY_TYPE, ROUTE_SET_TYPE, TRUST_BUNDLE_TYPE, WORKLOAD_TYPE];
pub const TYPE_COUNT: usize = 6;

/// The node metadata key naming the Service (`namespace/name` or `name` in the identity's namespace) whose endpoint
/// the proxy registers, and the key for the port its inbound listener takes mesh traffic on.
pub const NODE_SERVICE: &str = "service";
pub const NODE_INBOUND_PORT: &str = "inboundPort";

/// On-demand subscriptions: a proxy subscribes to the Service type by an address it was asked to reach, and the
/// control plane answers with the Services that address names (each carrying the subscribed name among its
/// `aliases`), or with the name in `removed_resources` when none does. Every other Service name is `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alias {
    /// `ip/<address>`: a Service VIP (an IP among its `addresses`) or the IP of one of its endpoints (a pod).
    Ip(std::net::IpAddr),
    /// `host/<name>`: a host among a Service's `addresses`, `<name>.<namespace>` or
    /// `<name>.<namespace>.svc.cluster.local` (lower case, no trailing dot; a bare name is qualified with the
    /// caller's namespace before it is sent).
    Host(String),
}

impl Alias {
    /// The alias of a host as a request names it (an IP literal, bracketed or not, is an `Ip` alias).
    pub fn of_host(host: &str) -> Alias {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse() {
            Ok(ip) => Alias::Ip(ip),
            Err(_) => Alias::Host(host.trim_end_matches('.').to_ascii_lowercase()),
        }
    }

    /// The subscription name.
    pub fn name(&self) -> String {
        match self {
            Alias::Ip(ip) => format!("ip/{ip}"),
            Alias::Host(host) => format!("host/{host}"),
        }
    }

    /// The alias a subscription name stands for (`None`: a plain `namespace/name`).
    pub fn parse(name: &str) -> Option<Alias> {
        if let Some(ip) = name.strip_prefix("ip/") {
            return ip.parse().ok().map(Alias::Ip);
        }
        let host = name.strip_prefix("host/")?;
        (!host.is_empty()).then(|| Alias::of_host(host)).filter(|a| matches!(a, Alias::Host(_)))
    }
}

/// The DNS name the control plane's serving certificate always carries (besides `localhost` and loopback IPs).
pub const CONTROL_PLANE_NAME: &str = "ferry-control";

/// The short name of a type URL (`Service`), as status output and metrics labels show it.
pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

/// The type URL a document travels as.
pub fn type_url(doc: &Document) -> &'static str {
    match doc {
        Document::Service(_) => SERVICE_TYPE,
        Document::TrafficPolicy(_) => TRAFFIC_POLICY_TYPE,
        Document::AuthorizationPolicy(_) => AUTHORIZATION_POLICY_TYPE,
        // Not sent one by one: as the route sets they make.
        Document::HttpRoute(_) | Document::GrpcRoute(_) | Document::ReferenceGrant(_) => ROUTE_SET_TYPE,
    }
}

/// A resource's xDS name: `namespace/name`.
pub fn resource_name(doc: &Document) -> String {
    let m = doc.metadata();
    format!("{}/{}", m.namespace, m.name)
}

/// Packs a document as the `Any` the control plane sends (`None` for HTTPRoutes and ReferenceGrants, which travel
/// as the route sets they make: [`encode_routes`]).
pub fn encode(doc: &Document) -> Option<Any> {
    let value = match to_resource(doc)? {
        Resource::Service(r) => r.encode_to_vec(),
        Resource::TrafficPolicy(r) => r.encode_to_vec(),
        Resource::AuthorizationPolicy(r) => r.encode_to_vec(),
    };
    Some(Any { type_url: type_url(doc).to_string(), value })
}

/// Packs a route set (named [`RouteSet::name`]).
pub fn encode_routes(set: &RouteSet) -> Any {
    Any { type_url: ROUTE_SET_TYPE.to_string(), value: route_set_to_pb(set).encode_to_vec() }
}

/// Mesh-wide settings, sent as the one TrustBundle resource: the roots proxies trust (PEM, each a CA certificate;
/// several during a root rotation), the mTLS mode of Services whose TrafficPolicy sets none, and the mesh's address
/// ranges (an on-demand proxy refuses an address there it has no answer for, rather than call it in plaintext).
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    pub roots_pem: Vec<String>,
    pub default_mtls: MtlsMode,
    pub mesh_cidrs: Vec<crate::cidr::Cidr>,
}

/// Packs the mesh-wide settings.
pub fn encode_mesh(mesh: &Mesh) -> Any {
    let default_mtls = match mesh.default_mtls {
        MtlsMode::Permissive => pb::MtlsMode::Permissive,
        MtlsMode::Strict => pb::MtlsMode::Strict,
    };
    Any {
        type_url: TRUST_BUNDLE_TYPE.to_string(),
        value: pb::TrustBundle {
            roots_pem: mesh.roots_pem.clone(),
            default_mtls: default_mtls as i32,
            mesh_cidrs: mesh.mesh_cidrs.iter().map(ToString::to_string).collect(),
        }
        .encode_to_vec(),
    }
}

/// A received resource: a policy document, or the mesh-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Document(Document),
    Mesh(Mesh),
    Workload(crate::workload::Workload),
    Routes(RouteSet),
}

/// Packs what one pod serves.
pub fn encode_workload(workload: &crate::workload::Workload) -> Any {
    Any { type_url: WORKLOAD_TYPE.to_string(), value: workload.encode() }
}

/// Why a received resource was refused; the text goes into the NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    pub name: String,
    pub message: String,
}

/// Unpacks and validates one received resource named `name`.
pub fn decode(name: &str, any: &Any) -> Result<Received, DecodeError> {
    let fail = |message: String| DecodeError { name: name.to_string(), message: format!("{name}: {message}") };
    if any.type_url == TRUST_BUNDLE_TYPE {
        let bundle = pb::TrustBundle::decode(any.value.as_slice())
            .map_err(|e| fail(format!("not a valid protobuf message: {e}")))?;
        if name != TRUST_BUNDLE_NAME {
            return Err(fail(format!("the trust bundle is named `{TRUST_BUNDLE_NAME}`")));
        }
        if bundle.roots_pem.is_empty() {
            return Err(fail("roots: a trust bundle holds at least one root".into()));
        }
        for (i, pem) in bundle.roots_pem.iter().enumerate() {
            check_root(pem).map_err(|e| fail(format!("roots[{i}]: {e}")))?;
        }
        let default_mtls = match pb::MtlsMode::try_from(bundle.default_mtls) {
            Ok(pb::MtlsMode::Strict) => MtlsMode::Strict,
            Ok(_) => MtlsMode::Permissive,
            Err(_) => return Err(fail(format!("default_mtls: unknown mode {}", bundle.default_mtls))),
        };
        let mesh_cidrs = bundle
            .mesh_cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| c.parse().map_err(|e| fail(format!("mesh_cidrs[{i}]: {e}"))))
            .collect::<Result<_, _>>()?;
        return Ok(Received::Mesh(Mesh { roots_pem: bundle.roots_pem, default_mtls, mesh_cidrs }));
    }
    if any.type_url == WORKLOAD_TYPE {
        return crate::workload::Workload::decode(&any.value).map(Received::Workload).map_err(fail);
    }
    if any.type_url == ROUTE_SET_TYPE {
        let set = pb::RouteSet::decode(any.value.as_slice())
            .map_err(|e| fail(format!("not a valid protobuf message: {e}")))?;
        let set = route_set_from_pb(set).map_err(|e| fail(e.to_string()))?;
        if set.name() != name {
            return Err(fail(format!("the route set is for {}", set.name())));
        }
        return Ok(Received::Routes(set));
    }
    let resource = match any.type_url.as_str() {
        SERVICE_TYPE => pb::Service::decode(any.value.as_slice()).map(Resource::Service),
        TRAFFIC_POLICY_TYPE => {
            pb::TrafficPolicy::decode(any.value.as_slice()).map(|r| Resource::TrafficPolicy(Box::new(r)))
        }
        AUTHORIZATION_POLICY_TYPE => {
            pb::AuthorizationPolicy::decode(any.value.as_slice()).map(Resource::AuthorizationPolicy)
        }
        other => return Err(fail(format!("unknown resource type `{other}`"))),
    }
    .map_err(|e| fail(format!("not a valid protobuf message: {e}")))?;
    // Validation errors name the document (`Service ns/name: spec...`) already.
    let doc = from_resource(resource).map_err(|e| DecodeError { name: name.to_string(), message: e.to_string() })?;
    if resource_name(&doc) != name {
        return Err(fail(format!("the resource's metadata names it {}", resource_name(&doc))));
    }
    Ok(Received::Document(doc))
}

/// One PEM certificate that may sign others (CA:TRUE).
fn check_root(pem: &str) -> Result<(), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let ders = crate::identity::pem_certificates(pem).map_err(|e| e.to_string())?;
    let [der] = ders.as_slice() else { return Err(format!("{} certificates in one entry; expected 1", ders.len())) };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("not a CA certificate (basicConstraints CA:FALSE)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: shop}
spec: {ports: [{port: 8080}], identities: [payments]}
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: payments, namespace: shop}
spec: {targetRef: {kind: Service, name: payments}, timeout: 2s}
"#;

    #[test]
    fn aliases_name_addresses() {
        let cases: [(&str, Option<Alias>); 8] = [
            ("ip/10.96.0.7", Some(Alias::Ip("10.96.0.7".parse().unwrap()))),
            ("ip/fd00::7", Some(Alias::Ip("fd00::7".parse().unwrap()))),
            ("host/payments.shop", Some(Alias::Host("payments.shop".into()))),
            ("ip/nope", None),
            ("host/", None),
            // An IP is always named as one.
            ("host/10.0.0.1", None),
            ("shop/payments", None),
            ("payments", None),
        ];
        for (name, alias) in cases {
            assert_eq!(Alias::parse(name), alias, "{name}");
            if let Some(alias) = alias {
                assert_eq!(alias.name(), name);
            }
        }
        assert_eq!(Alias::of_host("Payments.Shop."), Alias::Host("payments.shop".into()));
        assert_eq!(Alias::of_host("[::1]"), Alias::Ip("::1".parse().unwrap()));
    }

    #[test]
    fn round_trip_and_refusals() {
        for doc in crate::parse_documents(DOCS).unwrap() {
            let any = encode(&doc).unwrap();
            assert_eq!(any.type_url, type_url(&doc));
            assert_eq!(decode(&resource_name(&doc), &any).unwrap(), Received::Document(doc.clone()));
            // Deterministic bytes: the control plane's versions are digests of them.
            assert_eq!(encode(&doc).unwrap().value, any.value);
        }
        let doc = &crate::parse_documents(DOCS).unwrap()[0];
        let any = encode(doc).unwrap();
        let cases: Vec<(&str, Any, &str)> = vec![
            ("shop/other", any.clone(), "metadata names it shop/payments"),
            ("shop/payments", Any { type_url: "type.googleapis.com/x.Y".into(), value: vec![] }, "unknown resource"),
            ("shop/payments", Any { type_url: SERVICE_TYPE.into(), value: vec![0xff, 0xff] }, "not a valid protobuf"),
            (
                "shop/payments",
                Any {
                    type_url: SERVICE_TYPE.into(),
                    value: pb::Service {
                        meta: Some(pb::Meta {
                            name: "payments".into(),
                            namespace: "shop".into(),
                            ..Default::default()
                        }),
                        ports: vec![pb::Port { port: 70000, ..Default::default() }],
                        ..Default::default()
                    }
                    .encode_to_vec(),
                },
                "spec.ports[0].port",
            ),
        ];
        for (name, any, want) in cases {
            let err = decode(name, &any).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(want), "{name}: {err}");
        }
        assert_eq!(short_type(SERVICE_TYPE), "Service");
    }

    #[test]
    fn route_sets_round_trip_and_bad_ones_are_refused_naming_the_field() {
        let yaml = format!(
            "{DOCS}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\n\
             spec: {{parentRefs: [{{group: '', kind: Service, name: payments}}], rules: [{{matches: [{{path: {{type: RegularExpression, value: '/v[0-9]+'}}}}], filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-env, value: canary}}], remove: [x-secret]}}}}, {{type: RequestMirror, requestMirror: {{backendRef: {{name: payments, port: 8080}}, percent: 10}}}}, {{type: RequestMirror, requestMirror: {{backendRef: {{name: nowhere, port: 80}}}}}}], backendRefs: [{{name: payments, weight: 3}}], retry: {{codes: [503], attempts: 2, backoff: 100ms}}}}]}}\n"
        );
        let set = crate::config::route_sets(&crate::parse_documents(&yaml).unwrap()).remove(0);
        let any = encode_routes(&set);
        assert_eq!(decode("shop/payments/shop", &any).unwrap(), Received::Routes(set.clone()));
        let err = decode("shop/other/shop", &any).unwrap_err().to_string();
        assert!(err.contains("the route set is for shop/payments/shop"), "{err}");
        // A regular expression that does not compile: NACKed with the field named.
        let mut bad = crate::resources::route_set_to_pb(&set);
        bad.routes[0].rules[0].matches[0].path = "((".into();
        let any = Any { type_url: ROUTE_SET_TYPE.into(), value: bad.encode_to_vec() };
        let err = decode("shop/payments/shop", &any).unwrap_err().to_string();
        assert!(err.contains("routes[0].rules[0].matches[0].path.value: not a valid regular expression"), "{err}");
        let rule = &set.routes[0].rules[0];
        assert_eq!(rule.filters.len(), 3, "filters travel with the rule");
        let mirrors: Vec<_> = rule
            .mirrors()
            .map(|m| (m.backend.name, m.backend.unresolved.is_some(), m.numerator, m.denominator))
            .collect();
        assert_eq!(mirrors, [("payments".into(), false, 10, 100), ("nowhere".into(), true, 1, 1)]);
        assert_eq!(rule.retry.as_ref().and_then(|r| r.attempts), Some(2));
        // A filter that would change a header only Ferry writes: NACKed too.
        let mut bad = crate::resources::route_set_to_pb(&set);
        bad.routes[0].rules[0].filters[0].request_header_modifier.as_mut().unwrap().remove =
            vec!["ferry-client-id".into()];
        let any = Any { type_url: ROUTE_SET_TYPE.into(), value: bad.encode_to_vec() };
        let err = decode("shop/payments/shop", &any).unwrap_err().to_string();
        assert!(
            err.contains("routes[0].rules[0].filters[0].requestHeaderModifier.remove[0]: `ferry-client-id`"),
            "{err}"
        );
    }
}
