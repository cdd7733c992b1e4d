//! The documents — `ferry.dev/v1alpha1` `Service`, `TrafficPolicy`, `AuthorizationPolicy`, and Gateway API
//! `HTTPRoute`, `GRPCRoute` and `ReferenceGrant` — parsed from multi-document YAML, with errors that name the document and the field.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::grpc_route::{GRPC_ROUTE_API_VERSION, GrpcRoute, GrpcRouteSpec, validate_grpc_route};
pub use crate::meta::{FieldError, Metadata, is_dns_label};
use crate::policy::{
    AuthorizationPolicy, AuthorizationPolicySpec, TrafficPolicy, TrafficPolicySpec, validate_authorization_policy,
    validate_traffic_policy,
};
use crate::route::{
    AttachedRoute, AttachedRule, Backend, BackendRef, HTTP_ROUTE_API_VERSION, HttpRoute, HttpRouteFilter,
    HttpRouteSpec, ParentRef, REFERENCE_GRANT_API_VERSION, ReferenceGrant, ReferenceGrantSpec, RouteSet,
    validate_http_route, validate_reference_grant,
};

pub const API_VERSION: &str = "ferry.dev/v1alpha1";

/// One accepted document.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind")]
pub enum Document {
    Service(Service),
    TrafficPolicy(Box<TrafficPolicy>),
    AuthorizationPolicy(AuthorizationPolicy),
    /// Gateway API (`gateway.networking.k8s.io/v1`), attached to a Service.
    #[serde(rename = "HTTPRoute")]
    HttpRoute(Box<HttpRoute>),
    /// Gateway API (`gateway.networking.k8s.io/v1`), attached to a Service.
    #[serde(rename = "GRPCRoute")]
    GrpcRoute(Box<GrpcRoute>),
    /// Gateway API (`gateway.networking.k8s.io/v1beta1`): cross-namespace backends of routes.
    ReferenceGrant(ReferenceGrant),
}

/// The kinds a document may have.
pub const KINDS: &[&str] =
    &["Service", "TrafficPolicy", "AuthorizationPolicy", "HTTPRoute", "GRPCRoute", "ReferenceGrant"];

/// The `apiVersion` a kind is written with.
pub fn api_version_of(kind: &str) -> &'static str {
    match kind {
        "HTTPRoute" => HTTP_ROUTE_API_VERSION,
        "GRPCRoute" => GRPC_ROUTE_API_VERSION,
        "ReferenceGrant" => REFERENCE_GRANT_API_VERSION,
        _ => API_VERSION,
    }
}

impl Document {
    pub fn metadata(&self) -> &Metadata {
        match self {
            Document::Service(s) => &s.metadata,
            Document::TrafficPolicy(p) => &p.metadata,
            Document::AuthorizationPolicy(p) => &p.metadata,
            Document::HttpRoute(r) => &r.metadata,
            Document::GrpcRoute(r) => &r.metadata,
            Document::ReferenceGrant(g) => &g.metadata,
        }
    }
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Document::Service(s) => &mut s.metadata,
            Document::TrafficPolicy(p) => &mut p.metadata,
            Document::AuthorizationPolicy(p) => &mut p.metadata,
            Document::HttpRoute(r) => &mut r.metadata,
            Document::GrpcRoute(r) => &mut r.metadata,
            Document::ReferenceGrant(g) => &mut g.metadata,
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Document::Service(_) => "Service",
            Document::TrafficPolicy(_) => "TrafficPolicy",
            Document::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Document::HttpRoute(_) => "HTTPRoute",
            Document::GrpcRoute(_) => "GRPCRoute",
            Document::ReferenceGrant(_) => "ReferenceGrant",
        }
    }
    /// `Kind namespace/name`, as errors name documents.
    pub fn display_name(&self) -> String {
        let m = self.metadata();
        format!("{} {}/{}", self.kind(), m.namespace, m.name)
    }
}

/// A mesh service: the names clients use for it, its ports, who may serve it and (file source only) where it runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub metadata: Metadata,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    /// Hostnames and VIPs that routing matches, with or without a port (`payments`, `payments.default:8080`, `10.96.0.7`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Service accounts allowed to serve this service.
    #[serde(default)]
    pub identities: Vec<String>,
    /// Where the service runs; only the proxy's file source lists these (the control plane fills them otherwise).
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    #[serde(default, skip_serializing_if = "PortProtocol::is_detected")]
    pub protocol: PortProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port the app listens on, when it differs from the service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

/// What a port speaks. `http` is detected per connection (HTTP/1 or h2c); `tcp` is never inspected. A port that says
/// nothing is `Detected`: handled as `http`, except that a mesh peer may open an opaque stream to it (a caller whose
/// own detection timed out), which a port declared HTTP refuses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    /// Not a value users write: the absence of one.
    #[default]
    #[serde(skip)]
    Detected,
}

impl PortProtocol {
    pub fn is_detected(&self) -> bool {
        *self == PortProtocol::Detected
    }

    /// Declared HTTP (`http`, `http2`, `grpc`): every connection to it is handled as HTTP.
    pub fn is_declared_http(&self) -> bool {
        matches!(self, PortProtocol::Http | PortProtocol::Http2 | PortProtocol::Grpc)
    }

    /// How a connection to it is handled: a detected port as an `http` one.
    pub fn handled_as(self) -> PortProtocol {
        match self {
            PortProtocol::Detected => PortProtocol::Http,
            p => p,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port`, `[ipv6]:port`, or a bare IP (then the service port is dialled).
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl Endpoint {
    /// The socket address to dial for a request to `service_port` (validated documents always have one).
    pub fn socket_addr(&self, service_port: u16) -> Option<SocketAddr> {
        parse_endpoint_address(&self.address, service_port)
    }
}

fn parse_endpoint_address(text: &str, default_port: u16) -> Option<SocketAddr> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Some(sa);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, default_port))
}

// ===== errors =====

/// Every error of every refused document; a document is named by kind, namespace/name and position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub documents: Vec<(String, Vec<FieldError>)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (doc, errors)) in self.documents.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{doc}: ")?;
            for (j, e) in errors.iter().enumerate() {
                if j > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{e}")?;
            }
        }
        Ok(())
    }
}

// ===== parsing =====

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<serde_json::Value>,
    spec: Option<serde_json::Value>,
}

/// Parses a multi-document YAML stream; empty documents are ignored. All documents must be valid, or none is taken.
pub fn parse_documents(yaml: &str) -> Result<Vec<Document>, ConfigError> {
    let values: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).map_err(|e| ConfigError {
        documents: vec![("YAML".to_string(), vec![FieldError { path: String::new(), message: e.to_string() }])],
    })?;
    let mut documents = Vec::new();
    let mut refused = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        match parse_document(value) {
            Ok(doc) => documents.push(doc),
            Err((name, errors)) => refused.push((format!("{name} (document {})", index + 1), errors)),
        }
    }
    if refused.is_empty() {
        refused = cross_document_errors(&documents);
    }
    if refused.is_empty() { Ok(documents) } else { Err(ConfigError { documents: refused }) }
}

/// Parses one document given as JSON (the control plane's stored form), with the same rules as YAML.
pub fn parse_value(value: serde_json::Value) -> Result<Document, ConfigError> {
    let doc = parse_document(value).map_err(|(name, errors)| ConfigError { documents: vec![(name, errors)] })?;
    let refused = cross_document_errors(std::slice::from_ref(&doc));
    if refused.is_empty() { Ok(doc) } else { Err(ConfigError { documents: refused }) }
}

/// The document in its `apiVersion`/`kind`/`metadata`/`spec` form, as JSON.
pub fn document_json(doc: &Document) -> serde_json::Value {
    let spec = match doc {
        Document::Service(s) => serde_json::to_value(&s.spec),
        Document::TrafficPolicy(p) => serde_json::to_value(&p.spec),
        Document::AuthorizationPolicy(p) => serde_json::to_value(&p.spec),
        Document::HttpRoute(r) => serde_json::to_value(&r.spec),
        Document::GrpcRoute(r) => serde_json::to_value(&r.spec),
        Document::ReferenceGrant(g) => serde_json::to_value(&g.spec),
    }
    .expect("specs serialize");
    serde_json::json!({
        "apiVersion": api_version_of(doc.kind()),
        "kind": doc.kind(),
        "metadata": serde_json::to_value(doc.metadata()).expect("metadata serializes"),
        "spec": spec,
    })
}

/// The canonical kind for what a user typed: case-insensitive, singular or plural, or a short name.
pub fn canonical_kind(input: &str) -> Option<&'static str> {
    match input.to_ascii_lowercase().as_str() {
        "service" | "services" | "svc" => Some("Service"),
        "trafficpolicy" | "trafficpolicies" | "tp" => Some("TrafficPolicy"),
        "authorizationpolicy" | "authorizationpolicies" | "authz" | "ap" => Some("AuthorizationPolicy"),
        "httproute" | "httproutes" | "route" | "routes" => Some("HTTPRoute"),
        "grpcroute" | "grpcroutes" => Some("GRPCRoute"),
        "referencegrant" | "referencegrants" | "refgrant" => Some("ReferenceGrant"),
        _ => None,
    }
}

fn field(path: &str, message: impl Into<String>) -> FieldError {
    FieldError { path: path.to_string(), message: message.into() }
}

/// Deserializes `value` as `T`, naming the nested field on failure (`spec.ports[0].port: invalid type ...`).
fn typed<T: serde::de::DeserializeOwned>(prefix: &str, value: serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." { prefix.to_string() } else { format!("{prefix}.{inner}") };
        field(&path, e.into_inner().to_string())
    })
}

fn parse_document(value: serde_json::Value) -> Result<Document, (String, Vec<FieldError>)> {
    let header: Header = match typed("", value) {
        Ok(h) => h,
        Err(e) => return Err(("document".to_string(), vec![e])),
    };
    let kind = header.kind.clone().unwrap_or_default();
    let mut errors = Vec::new();
    let want = api_version_of(&kind);
    match header.api_version.as_deref() {
        Some(v) if v == want => {}
        Some(other) => errors.push(field("apiVersion", format!("must be {want}, got `{other}`"))),
        None => errors.push(field("apiVersion", format!("required ({want})"))),
    }
    let metadata = match header.metadata {
        Some(m) => match typed::<Metadata>("metadata", m) {
            Ok(m) => {
                check_name("metadata.name", &m.name, &mut errors);
                check_name("metadata.namespace", &m.namespace, &mut errors);
                if m.creation_timestamp.as_deref().is_some_and(|t| crate::meta::unix_seconds(t).is_none()) {
                    errors.push(field(
                        "metadata.creationTimestamp",
                        "must be an RFC 3339 time in UTC (2026-12-03T16:10:25Z)",
                    ));
                }
                Some(m)
            }
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => {
            errors.push(field("metadata", "required"));
            None
        }
    };
    let name = match &metadata {
        Some(m) => format!("{} {}/{}", if kind.is_empty() { "document" } else { &kind }, m.namespace, m.name),
        None => {
            if kind.is_empty() {
                "document".to_string()
            } else {
                kind.clone()
            }
        }
    };
    let spec = match header.spec {
        Some(s) => Some(s),
        None => {
            errors.push(field("spec", "required"));
            None
        }
    };
    let doc = match kind.as_str() {
        "Service" => spec_of::<ServiceSpec>(spec, &mut errors, validate_service)
            .zip(metadata)
            .map(|(spec, metadata)| Document::Service(Service { metadata, spec })),
        "TrafficPolicy" => spec_of::<TrafficPolicySpec>(spec, &mut errors, validate_traffic_policy)
            .zip(metadata)
            .map(|(spec, metadata)| Document::TrafficPolicy(Box::new(TrafficPolicy { metadata, spec }))),
        "AuthorizationPolicy" => spec_of::<AuthorizationPolicySpec>(spec, &mut errors, validate_authorization_policy)
            .zip(metadata)
            .map(|(spec, metadata)| Document::AuthorizationPolicy(AuthorizationPolicy { metadata, spec })),
        "HTTPRoute" => spec_of::<HttpRouteSpec>(spec, &mut errors, validate_http_route)
            .zip(metadata)
            .map(|(spec, metadata)| Document::HttpRoute(Box::new(HttpRoute { metadata, spec }))),
        "GRPCRoute" => spec_of::<GrpcRouteSpec>(spec, &mut errors, validate_grpc_route)
            .zip(metadata)
            .map(|(spec, metadata)| Document::GrpcRoute(Box::new(GrpcRoute { metadata, spec }))),
        "ReferenceGrant" => spec_of::<ReferenceGrantSpec>(spec, &mut errors, validate_reference_grant)
            .zip(metadata)
            .map(|(spec, metadata)| Document::ReferenceGrant(ReferenceGrant { metadata, spec })),
        "" => {
            errors.push(field("kind", format!("required ({})", KINDS.join(", "))));
            None
        }
        other => {
            errors.push(field("kind", format!("unknown kind `{other}` (expected one of {})", KINDS.join(", "))));
            None
        }
    };
    match doc {
        Some(doc) if errors.is_empty() => Ok(doc),
        _ => Err((name, errors)),
    }
}

/// Deserializes a spec (naming the field on failure), then runs the kind's semantic checks.
fn spec_of<T: serde::de::DeserializeOwned>(
    spec: Option<serde_json::Value>,
    errors: &mut Vec<FieldError>,
    validate: fn(&T, &mut Vec<FieldError>),
) -> Option<T> {
    match typed::<T>("spec", spec?) {
        Ok(spec) => {
            validate(&spec, errors);
            Some(spec)
        }
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

fn check_name(path: &str, name: &str, errors: &mut Vec<FieldError>) {
    if !is_dns_label(name) {
        errors.push(field(path, format!("`{name}` must be a DNS label: 1-63 of a-z, 0-9, '-'")));
    }
}

fn validate_service(spec: &ServiceSpec, errors: &mut Vec<FieldError>) {
    if spec.ports.is_empty() {
        errors.push(field("spec.ports", "at least one port is required"));
    }
    let mut seen = HashSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.port == 0 {
            errors.push(field(&format!("spec.ports[{i}].port"), "must be 1-65535"));
        } else if !seen.insert(p.port) {
            errors.push(field(&format!("spec.ports[{i}].port"), format!("port {} is listed twice", p.port)));
        }
        if p.target_port == Some(0) {
            errors.push(field(&format!("spec.ports[{i}].targetPort"), "must be 1-65535"));
        }
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        if let Err(msg) = check_address(a) {
            errors.push(field(&format!("spec.addresses[{i}]"), msg));
        }
    }
    for (i, id) in spec.identities.iter().enumerate() {
        // A service account of the Service's namespace, or (a pod of another namespace) its full SPIFFE ID.
        if id.starts_with("spiffe://") {
            if let Err(e) = crate::identity::Identity::parse(id) {
                errors.push(field(&format!("spec.identities[{i}]"), e.to_string()));
            }
        } else {
            check_name(&format!("spec.identities[{i}]"), id, errors);
        }
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        if parse_endpoint_address(&e.address, 1).is_none() {
            errors.push(field(
                &format!("spec.endpoints[{i}].address"),
                format!("`{}` must be an IP address with an optional port (127.0.0.1:8080, [::1]:8080)", e.address),
            ));
        }
    }
}

/// A routing address: a hostname or IP, optionally with `:port`.
fn check_address(address: &str) -> Result<(), String> {
    let (host, port) = split_host_port(address);
    if let Some(port) = port {
        match port_number(port) {
            Some(p) if p > 0 => {}
            _ => return Err(format!("`{address}`: port must be 1-65535")),
        }
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<IpAddr>().is_ok() || is_hostname(host) {
        Ok(())
    } else {
        Err(format!("`{address}` must be a hostname or IP, with an optional port"))
    }
}

/// A hostname as a Service address may be: at most 253 bytes of labels of 1-63 letters, digits and hyphens.
pub fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A port as written in an address: decimal digits only (`u16::from_str` alone also takes a leading `+`).
pub fn port_number(text: &str) -> Option<u16> {
    text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten()
}

/// Splits `host:port`, `[v6]:port`, `host`, `v6`, `[v6]` (a bare IPv6 address has no port).
pub fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let host = &authority[..end + 2];
            return match authority[end + 2..].strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => (host, None),
            };
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// Errors that need all documents: duplicates, two services claiming one address, two TrafficPolicies for one Service.
fn cross_document_errors(documents: &[Document]) -> Vec<(String, Vec<FieldError>)> {
    let mut refused = Vec::new();
    let mut names = HashSet::new();
    let mut addresses: std::collections::HashMap<String, String> = Default::default();
    let mut traffic_targets: std::collections::HashMap<(String, String), String> = Default::default();
    for doc in documents {
        let m = doc.metadata();
        let name = doc.display_name();
        if !names.insert((doc.kind(), m.namespace.clone(), m.name.clone())) {
            refused.push((name.clone(), vec![field("metadata.name", "defined twice in this file")]));
        }
        match doc {
            Document::Service(svc) => {
                for (i, a) in svc.spec.addresses.iter().enumerate() {
                    let key = a.to_ascii_lowercase();
                    match addresses.get(&key) {
                        Some(other) if other != &name => refused.push((
                            name.clone(),
                            vec![field(
                                &format!("spec.addresses[{i}]"),
                                format!("`{a}` is already an address of {other}"),
                            )],
                        )),
                        Some(_) => {}
                        None => {
                            addresses.insert(key, name.clone());
                        }
                    }
                }
            }
            Document::TrafficPolicy(p) => {
                let target = (m.namespace.clone(), p.spec.target_ref.name.clone());
                if let Some(first) = traffic_targets.get(&target) {
                    refused.push((name.clone(), vec![one_traffic_policy_error(&target.1, first)]));
                } else {
                    traffic_targets.insert(target, m.name.clone());
                }
            }
            Document::AuthorizationPolicy(_)
            | Document::HttpRoute(_)
            | Document::GrpcRoute(_)
            | Document::ReferenceGrant(_) => {}
        }
    }
    refused
}

// ===== routes =====

/// An HTTPRoute or a GRPCRoute: what route sets and statuses read of either.
#[derive(Debug, Clone, Copy)]
pub enum RouteRef<'a> {
    Http(&'a HttpRoute),
    Grpc(&'a GrpcRoute),
}

impl<'a> RouteRef<'a> {
    pub fn of(doc: &'a Document) -> Option<Self> {
        match doc {
            Document::HttpRoute(r) => Some(RouteRef::Http(r)),
            Document::GrpcRoute(r) => Some(RouteRef::Grpc(r)),
            _ => None,
        }
    }

    pub fn metadata(self) -> &'a Metadata {
        match self {
            RouteRef::Http(r) => &r.metadata,
            RouteRef::Grpc(r) => &r.metadata,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            RouteRef::Http(_) => "HTTPRoute",
            RouteRef::Grpc(_) => "GRPCRoute",
        }
    }

    fn parent_refs(self) -> &'a [ParentRef] {
        match self {
            RouteRef::Http(r) => &r.spec.parent_refs,
            RouteRef::Grpc(r) => &r.spec.parent_refs,
        }
    }

    /// Each rule's filters and backendRefs.
    fn rule_parts(self) -> Vec<(&'a [HttpRouteFilter], &'a [BackendRef])> {
        match self {
            RouteRef::Http(r) => r.spec.rules.iter().map(|r| (&r.filters[..], &r.backend_refs[..])).collect(),
            RouteRef::Grpc(r) => r.spec.rules.iter().map(|r| (&r.filters[..], &r.backend_refs[..])).collect(),
        }
    }

    /// Its rules as proxies receive them, backends resolved against `refs`.
    fn attached_rules(self, refs: &References<'_>) -> Vec<AttachedRule> {
        let route_ns = self.metadata().namespace.as_str();
        // What both kinds' rules carry alike: filters, backends and mirrors, resolved.
        let resolved = |filters: &[HttpRouteFilter], backend_refs: &[BackendRef]| AttachedRule {
            filters: filters.iter().map(|f| attached_filter(f, route_ns)).collect(),
            backends: backend_refs.iter().map(|b| refs.resolve(b, self.kind(), route_ns)).collect(),
            mirrors: mirror_refs(filters).map(|m| refs.resolve(&m, self.kind(), route_ns)).collect(),
            ..AttachedRule::default()
        };
        match self {
            RouteRef::Http(route) => (route.spec.rules.iter())
                .map(|rule| AttachedRule {
                    name: rule.name.clone(),
                    matches: rule.matches.clone(),
                    timeouts: rule.timeouts.clone().unwrap_or_default(),
                    retry: rule.retry.clone(),
                    ..resolved(&rule.filters, &rule.backend_refs)
                })
                .collect(),
            RouteRef::Grpc(route) => (route.spec.rules.iter())
                .map(|rule| AttachedRule {
                    name: rule.name.clone(),
                    grpc_matches: rule.matches.clone(),
                    ..resolved(&rule.filters, &rule.backend_refs)
                })
                .collect(),
        }
    }
}

/// Pure: the route sets `docs` make — every accepted HTTPRoute and GRPCRoute attached to a Service, grouped by
/// (Service, route namespace), each backend resolved against the Services and ReferenceGrants among `docs`. A parent
/// Service that does not exist attaches nothing (the route's status says `NoMatchingParent`), nor does an HTTPRoute
/// parent a GRPCRoute of its namespace also takes (`Conflicted`).
pub fn route_sets(docs: &[Document]) -> Vec<RouteSet> {
    let refs = References::of(docs);
    let mut sets: BTreeMap<(String, String, String), Vec<AttachedRoute>> = BTreeMap::new();
    for route in docs.iter().filter_map(RouteRef::of) {
        let route_ns = route.metadata().namespace.as_str();
        let mut parents: BTreeMap<(String, String), Vec<u16>> = BTreeMap::new();
        let mut every_port: std::collections::BTreeSet<(String, String)> = Default::default();
        for p in route.parent_refs().iter().filter(|p| p.is_service()) {
            let key = (p.namespace.clone().unwrap_or_else(|| route_ns.to_string()), p.name.clone());
            if !refs.services.contains_key(&(key.0.as_str(), key.1.as_str())) || refs.conflict(route, p).is_some() {
                continue;
            }
            match p.port {
                Some(port) => parents.entry(key).or_default().push(port),
                None => {
                    every_port.insert(key.clone());
                    parents.entry(key).or_default();
                }
            }
        }
        if parents.is_empty() {
            continue;
        }
        let rules = route.attached_rules(&refs);
        for ((svc_ns, svc), mut ports) in parents {
            if every_port.contains(&(svc_ns.clone(), svc.clone())) {
                ports.clear();
            }
            ports.sort_unstable();
            ports.dedup();
            let attached = AttachedRoute {
                namespace: route_ns.to_string(),
                name: route.metadata().name.clone(),
                created: route.metadata().created(),
                ports,
                rules: rules.clone(),
            };
            sets.entry((svc_ns, svc, route_ns.to_string())).or_default().push(attached);
        }
    }
    sets.into_iter()
        .map(|((service_namespace, service, route_namespace), routes)| RouteSet {
            service_namespace,
            service,
            route_namespace,
            routes,
        })
        .collect()
}

/// The `status.parents` of a route as Gateway API writes it (`RouteParentStatus`): per parentRef, `Accepted`
/// (`False`, `NoMatchingParent`, when the Service does not exist; `Conflicted` for an HTTPRoute whose Service port a
/// GRPCRoute of its namespace takes) and `ResolvedRefs` (`False` with the first unresolved backend's reason,
/// `BackendNotFound` or `RefNotPermitted`, every unresolved one in the message), for `generation`.
pub fn route_status(route: RouteRef<'_>, docs: &[Document], generation: i64) -> serde_json::Value {
    References::of(docs).route_status(route, generation)
}

impl References<'_> {
    /// [`route_status`] against these references (built once for many routes).
    pub fn route_status(&self, route: RouteRef<'_>, generation: i64) -> serde_json::Value {
        let refs = self;
        let route_ns = route.metadata().namespace.as_str();
        let rules = route.rule_parts();
        let unresolved: Vec<String> = rules
            .iter()
            .flat_map(|(filters, backends)| backends.iter().cloned().chain(mirror_refs(filters)))
            .filter_map(|b| refs.resolve(&b, route.kind(), route_ns).unresolved)
            .collect();
        // Valid, and said: a rule with no backend to send to (none listed, or every weight 0: drained) answers 500.
        let drained: Vec<String> = rules
            .iter()
            .enumerate()
            .filter(|(_, (_, backends))| backends.iter().all(|b| b.weight == 0))
            .map(|(i, _)| format!("rules[{i}]"))
            .collect();
        let note = match drained.as_slice() {
            [] => String::new(),
            rules => format!("; requests matching {} get 500 (no backendRefs, or every weight 0)", rules.join(", ")),
        };
        let condition = |kind: &str, ok: bool, reason: &str, message: String| {
            serde_json::json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason,
                           "message": message, "observedGeneration": generation})
        };
        let parents: Vec<serde_json::Value> = route
            .parent_refs()
            .iter()
            .map(|p| {
                let namespace = p.namespace.as_deref().unwrap_or(route_ns);
                let found = refs.services.contains_key(&(namespace, p.name.as_str()));
                let accepted = match (found, refs.conflict(route, p)) {
                    (false, _) => condition(
                        "Accepted",
                        false,
                        "NoMatchingParent",
                        format!("Service {namespace}/{} does not exist", p.name),
                    ),
                    (true, Some(grpc)) => condition(
                        "Accepted",
                        false,
                        "Conflicted",
                        format!(
                            "GRPCRoute {grpc} attaches to the same Service port; a GRPCRoute takes precedence over an HTTPRoute (GEP-1426)"
                        ),
                    ),
                    (true, None) => condition("Accepted", true, "Accepted", "attached to the Service".into()),
                };
                let resolved = match unresolved.first() {
                    None => condition("ResolvedRefs", true, "ResolvedRefs", format!("every backend resolved{note}")),
                    Some(first) => condition(
                        "ResolvedRefs",
                        false,
                        first.split(':').next().unwrap_or("BackendNotFound"),
                        unresolved.join("; "),
                    ),
                };
                serde_json::json!({"parentRef": p, "controllerName": ROUTE_CONTROLLER, "conditions": [accepted, resolved]})
            })
            .collect();
        serde_json::json!({ "parents": parents })
    }
}

/// A filter as proxies receive it: a RequestMirror's share as a fraction and its Service's namespace written out
/// (what the xDS resource carries).
fn attached_filter(f: &HttpRouteFilter, route_ns: &str) -> HttpRouteFilter {
    let mut f = f.clone();
    if let Some(m) = &mut f.request_mirror {
        let (numerator, denominator) = m.share();
        m.backend_ref.group = None;
        m.backend_ref.kind = None;
        m.backend_ref.namespace.get_or_insert_with(|| route_ns.to_string());
        m.percent = None;
        m.fraction = Some(crate::route::Fraction { numerator, denominator: Some(denominator) });
    }
    f
}

/// The backends of a rule's RequestMirror filters, as backendRefs (resolved the same way: the Service, its port, a
/// ReferenceGrant for another namespace).
fn mirror_refs(filters: &[HttpRouteFilter]) -> impl Iterator<Item = BackendRef> + '_ {
    filters.iter().filter_map(|f| f.request_mirror.as_ref()).map(|m| BackendRef {
        group: m.backend_ref.group.clone(),
        kind: m.backend_ref.kind.clone(),
        name: m.backend_ref.name.clone(),
        namespace: m.backend_ref.namespace.clone(),
        port: m.backend_ref.port,
        weight: 1,
        filters: Vec::new(),
    })
}

/// The `controllerName` of the route statuses Ferry writes.
pub const ROUTE_CONTROLLER: &str = "ferry.dev/mesh";

/// What routes refer to among a set of documents: the Services (parents and backends), the ReferenceGrants, and the
/// GRPCRoutes' parents (which HTTPRoutes of their namespace yield to).
pub struct References<'d> {
    services: BTreeMap<(&'d str, &'d str), &'d Service>,
    grants: Vec<&'d ReferenceGrant>,
    grpc: Vec<&'d GrpcRoute>,
}

impl<'d> References<'d> {
    pub fn of(docs: impl IntoIterator<Item = &'d Document>) -> Self {
        let mut refs = References { services: BTreeMap::new(), grants: Vec::new(), grpc: Vec::new() };
        for doc in docs {
            match doc {
                Document::Service(s) => {
                    refs.services.insert((s.metadata.namespace.as_str(), s.metadata.name.as_str()), s);
                }
                Document::ReferenceGrant(g) => refs.grants.push(g),
                Document::GrpcRoute(r) => refs.grpc.push(r),
                _ => {}
            }
        }
        refs
    }

    /// GEP-1426: an HTTPRoute parent that a GRPCRoute of the same namespace also attaches to (the same Service, a
    /// port in common) is the GRPCRoute's; its `namespace/name`.
    fn conflict(&self, route: RouteRef<'_>, parent: &ParentRef) -> Option<String> {
        let RouteRef::Http(http) = route else { return None };
        let route_ns = http.metadata.namespace.as_str();
        let service = (parent.namespace.as_deref().unwrap_or(route_ns), parent.name.as_str());
        self.grpc.iter().filter(|g| g.metadata.namespace == route_ns).find_map(|g| {
            let takes = g.spec.parent_refs.iter().any(|p| {
                p.is_service()
                    && (p.namespace.as_deref().unwrap_or(route_ns), p.name.as_str()) == service
                    && (p.port.is_none() || parent.port.is_none() || p.port == parent.port)
            });
            (takes && self.services.contains_key(&service))
                .then(|| format!("{}/{}", g.metadata.namespace, g.metadata.name))
        })
    }

    /// A backendRef of a route of kind `kind` resolved: the Service must exist, in the route's namespace or in one
    /// whose ReferenceGrant lets that kind of the route's namespace name it, and have the port named.
    fn resolve(&self, b: &BackendRef, kind: &str, route_ns: &str) -> Backend {
        let namespace = b.namespace.clone().unwrap_or_else(|| route_ns.to_string());
        let unresolved = match self.services.get(&(namespace.as_str(), b.name.as_str())) {
            None => Some(format!("BackendNotFound: Service {namespace}/{} does not exist", b.name)),
            Some(_)
                if namespace != route_ns
                    && !self
                        .grants
                        .iter()
                        .any(|g| g.metadata.namespace == namespace && g.permits(kind, route_ns, &b.name)) =>
            {
                Some(format!(
                    "RefNotPermitted: no ReferenceGrant in {namespace} lets {kind}s of {route_ns} name Service {}",
                    b.name
                ))
            }
            Some(s) if b.port.is_some_and(|p| !s.spec.ports.iter().any(|sp| sp.port == p)) => Some(format!(
                "BackendNotFound: Service {namespace}/{} has no port {}",
                b.name,
                b.port.unwrap_or_default()
            )),
            Some(_) => None,
        };
        let filters = b.filters.clone().into();
        Backend { namespace, name: b.name.clone(), port: b.port, weight: b.weight, unresolved, filters }
    }
}

/// The error for a second TrafficPolicy targeting one Service: it names the existing one.
pub fn one_traffic_policy_error(service: &str, existing: &str) -> FieldError {
    field(
        "spec.targetRef.name",
        format!("Service `{service}` already has TrafficPolicy `{existing}` (one TrafficPolicy per Service)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}, {port: 9090, protocol: grpc}]
  addresses: [payments, payments.shop, "10.96.0.7", "payments.shop.svc.cluster.local:8080"]
  identities: [payments]
  endpoints: [{address: "127.0.0.1:18006", identity: payments}, {address: "::1"}]
---
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {ports: [{port: 80}]}
"#;

    #[test]
    fn parses_multi_document_streams() {
        let docs = parse_documents(GOOD).unwrap();
        assert_eq!(docs.len(), 2);
        let Document::Service(p) = &docs[0] else { panic!("a Service") };
        assert_eq!(p.metadata.namespace, "shop");
        assert_eq!(p.spec.ports[1].protocol, PortProtocol::Grpc);
        assert_eq!(p.spec.endpoints[1].socket_addr(8080), Some("[::1]:8080".parse().unwrap()));
        let Document::Service(o) = &docs[1] else { panic!("a Service") };
        assert_eq!(o.metadata.namespace, "default");
        assert_eq!(o.spec.ports[0].protocol, PortProtocol::Detected, "no protocol: detected");
        assert_eq!(parse_documents("").unwrap(), vec![]);
    }

    /// Each bad input and the text that must appear in the error.
    #[test]
    fn errors_name_document_and_field() {
        let cases = [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 1}]}",
                "apiVersion: must be ferry.dev/v1alpha1",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Gateway\nmetadata: {name: a}\nspec: {}",
                "kind: unknown kind `Gateway`",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}",
                "Service default/a (document 1): spec.ports[0].port: must be 1-65535",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 70000}]}",
                "spec.ports[0].port",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80, protocol: udp}]}",
                "spec.ports[0].protocol",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}], endpoints: [{address: nowhere}]}",
                "spec.endpoints[0].address",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}], addresses: [\"bad host\"]}",
                "spec.addresses[0]",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: A_b}\nspec: {ports: [{port: 80}]}",
                "metadata.name",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}], colour: red}",
                "spec.colour: unknown field `colour`",
            ),
            (
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: []}",
                "spec.ports: at least one port",
            ),
            ("kind: [", "YAML"),
        ];
        for (yaml, want) in cases {
            let err = parse_documents(yaml).unwrap_err().to_string();
            assert!(err.contains(want), "for {yaml:?}\n  got: {err}\n want: {want}");
        }
    }

    #[test]
    fn collects_every_error_of_a_document() {
        let yaml = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}, {port: 80}, {port: 80}], endpoints: [{address: x}]}";
        let err = parse_documents(yaml).unwrap_err();
        assert_eq!(err.documents[0].1.len(), 3, "{err}");
    }

    #[test]
    fn cross_document_conflicts() {
        let yaml = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}], addresses: [shared]}\n---\napiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 80}], addresses: [Shared]}\n---\napiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 81}]}";
        let err = parse_documents(yaml).unwrap_err().to_string();
        assert!(err.contains("`Shared` is already an address of Service default/a"), "{err}");
        assert!(err.contains("defined twice"), "{err}");
    }

    #[test]
    fn host_port_split() {
        let cases = [
            ("a", ("a", None)),
            ("a:80", ("a", Some("80"))),
            ("[::1]:80", ("[::1]", Some("80"))),
            ("[::1]", ("[::1]", None)),
            ("::1", ("::1", None)),
        ];
        for (input, want) in cases {
            assert_eq!(split_host_port(input), want, "{input}");
        }
        let ports = [("80", Some(80)), ("080", Some(80)), ("0", Some(0)), ("+80", None), ("", None), ("65536", None)];
        for (input, want) in ports {
            assert_eq!(port_number(input), want, "{input}");
        }
    }
}
