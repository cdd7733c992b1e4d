//! The `ferry.v1` protobuf resources sent over xDS, and their conversion to and from the `ferry.dev/v1alpha1`
//! documents. A received resource goes through the same validation as a document from `ferryctl apply`.

use std::collections::BTreeMap;

use crate::config::{
    ConfigError, Document, Endpoint, FieldError, Metadata, PortProtocol, Service, ServicePort, ServiceSpec,
};
use crate::config::{document_json, parse_value};
use crate::grpc_route::{GrpcMethodMatch, GrpcRouteMatch};
use crate::policy::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, AuthorizationRule, Backoff, CircuitBreaker, Duration,
    LoadBalancer, MtlsMode, Operation, OutlierDetection, RateLimit, Retries, RetryBudget, Source, TargetRef,
    TrafficPolicy, TrafficPolicySpec,
};
use crate::route::{
    AttachedRoute, AttachedRule, Backend, Fraction, HeaderModifier, HeaderPair, HttpRouteFilter, HttpRouteMatch,
    HttpRouteRetry, HttpRouteTimeouts, ObjectRef, PathMatch, PathMatchType, PathModifier, PathModifierType,
    RequestMirror, RequestRedirect, RouteSet, UrlRewrite, ValueMatch, ValueMatchType,
};

/// The generated messages (`xds/api/proto/ferry/v1/resources.proto`).
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

/// One resource as sent: a Service, a TrafficPolicy or an AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Service(pb::Service),
    TrafficPolicy(Box<pb::TrafficPolicy>),
    AuthorizationPolicy(pb::AuthorizationPolicy),
}

fn meta(m: &Metadata) -> Option<pb::Meta> {
    Some(pb::Meta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone().into_iter().collect(),
    })
}

fn ms(d: &Option<Duration>) -> Option<u64> {
    d.as_ref().map(Duration::as_millis)
}

fn target(name: &str) -> TargetRef {
    TargetRef { kind: "Service".into(), name: name.to_string() }
}

/// A port's protocol on the wire.
pub fn protocol_to_pb(protocol: PortProtocol) -> pb::Protocol {
    match protocol {
        PortProtocol::Http => pb::Protocol::Http,
        PortProtocol::Http2 => pb::Protocol::Http2,
        PortProtocol::Grpc => pb::Protocol::Grpc,
        PortProtocol::Tcp => pb::Protocol::Tcp,
        PortProtocol::Detected => pb::Protocol::Detected,
    }
}

/// A port's protocol from the wire (an unknown value is detected per connection).
pub fn protocol_from_pb(protocol: i32) -> PortProtocol {
    match pb::Protocol::try_from(protocol).unwrap_or(pb::Protocol::Detected) {
        pb::Protocol::Http => PortProtocol::Http,
        pb::Protocol::Http2 => PortProtocol::Http2,
        pb::Protocol::Grpc => PortProtocol::Grpc,
        pb::Protocol::Tcp => PortProtocol::Tcp,
        pb::Protocol::Detected => PortProtocol::Detected,
    }
}

/// Document → resource (what the control plane sends). HTTPRoutes and ReferenceGrants travel as route sets
/// ([`route_set_to_pb`]), not one by one: `None`.
pub fn to_resource(doc: &Document) -> Option<Resource> {
    Some(match doc {
        Document::HttpRoute(_) | Document::GrpcRoute(_) | Document::ReferenceGrant(_) => return None,
        Document::Service(s) => Resource::Service(pb::Service {
            meta: meta(&s.metadata),
            ports: s
                .spec
                .ports
                .iter()
                .map(|p| pb::Port {
                    port: p.port.into(),
                    protocol: protocol_to_pb(p.protocol) as i32,
                    name: p.name.clone().unwrap_or_default(),
                    target_port: p.target_port.map(u32::from).unwrap_or(0),
                })
                .collect(),
            addresses: s.spec.addresses.clone(),
            identities: s.spec.identities.clone(),
            endpoints: s
                .spec
                .endpoints
                .iter()
                .map(|e| pb::Endpoint { address: e.address.clone(), identity: e.identity.clone().unwrap_or_default() })
                .collect(),
        }),
        Document::TrafficPolicy(tp) => {
            let s = &tp.spec;
            Resource::TrafficPolicy(Box::new(pb::TrafficPolicy {
                meta: meta(&tp.metadata),
                target: s.target_ref.name.clone(),
                timeout_ms: ms(&s.timeout),
                tcp_idle_timeout_ms: ms(&s.tcp_idle_timeout),
                retries: s.retries.as_ref().map(|r| pb::Retries {
                    attempts: r.attempts,
                    per_try_timeout_ms: ms(&r.per_try_timeout),
                    on: r.on.clone(),
                    backoff: r
                        .backoff
                        .as_ref()
                        .map(|b| pb::Backoff { base_ms: b.base.as_millis(), max_ms: b.max.as_millis() }),
                    budget: r
                        .budget
                        .as_ref()
                        .map(|b| pb::RetryBudget { percent: b.percent, min_per_second: b.min_per_second }),
                }),
                circuit_breaker: s.circuit_breaker.as_ref().map(|c| pb::CircuitBreaker {
                    failure_ratio: c.failure_ratio,
                    min_requests: c.min_requests,
                    interval_ms: ms(&c.interval),
                    consecutive_failures: c.consecutive_failures,
                    open_for_ms: ms(&c.open_for),
                    half_open_requests: c.half_open_requests,
                    max_connections: c.max_connections,
                    max_pending_requests: c.max_pending_requests,
                    max_requests: c.max_requests,
                }),
                outlier_detection: s.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
                    consecutive_5xx: o.consecutive_5xx,
                    base_ejection_time_ms: o.base_ejection_time.as_millis(),
                    max_ejection_percent: o.max_ejection_percent,
                }),
                rate_limit: s.rate_limit.as_ref().map(|r| pb::RateLimit {
                    requests_per_second: r.requests_per_second,
                    burst: r.burst,
                    per_client_identity: r.per_client_identity,
                }),
                load_balancer: match s.load_balancer {
                    None => pb::LoadBalancer::Unset,
                    Some(LoadBalancer::P2cEwma) => pb::LoadBalancer::P2cEwma,
                    Some(LoadBalancer::RoundRobin) => pb::LoadBalancer::RoundRobin,
                    Some(LoadBalancer::LeastRequest) => pb::LoadBalancer::LeastRequest,
                } as i32,
                mtls: match s.mtls {
                    None => pb::MtlsMode::MtlsUnset,
                    Some(MtlsMode::Permissive) => pb::MtlsMode::Permissive,
                    Some(MtlsMode::Strict) => pb::MtlsMode::Strict,
                } as i32,
            }))
        }
        Document::AuthorizationPolicy(ap) => Resource::AuthorizationPolicy(pb::AuthorizationPolicy {
            meta: meta(&ap.metadata),
            target: ap.spec.target_ref.name.clone(),
            default_allow: ap.spec.default_action == Action::Allow,
            allow: ap
                .spec
                .allow
                .iter()
                .map(|r| pb::Rule {
                    from: r
                        .from
                        .as_ref()
                        .map(|f| pb::Source { identities: f.identities.clone(), namespaces: f.namespaces.clone() }),
                    to: r.to.as_ref().map(|t| pb::Destination {
                        methods: t.methods.clone(),
                        paths: t.paths.clone(),
                        ports: t.ports.iter().map(|p| u32::from(*p)).collect(),
                    }),
                })
                .collect(),
        }),
    })
}

fn value_kind_to_pb(kind: ValueMatchType) -> i32 {
    match kind {
        ValueMatchType::Exact => pb::ValueMatchType::ValueExact as i32,
        ValueMatchType::RegularExpression => pb::ValueMatchType::ValueRegularExpression as i32,
    }
}

fn value_kind_from_pb(kind: i32) -> ValueMatchType {
    match pb::ValueMatchType::try_from(kind) {
        Ok(pb::ValueMatchType::ValueRegularExpression) => ValueMatchType::RegularExpression,
        _ => ValueMatchType::Exact,
    }
}

fn value_match_to_pb(v: &ValueMatch) -> pb::ValueMatch {
    pb::ValueMatch { r#type: value_kind_to_pb(v.kind), name: v.name.clone(), value: v.value.clone() }
}

fn value_match_from_pb(v: pb::ValueMatch) -> ValueMatch {
    ValueMatch { kind: value_kind_from_pb(v.r#type), name: v.name, value: v.value }
}

fn grpc_match_to_pb(m: &GrpcRouteMatch) -> pb::GrpcRouteMatch {
    pb::GrpcRouteMatch {
        method: m.method.as_ref().map(|m| pb::GrpcMethodMatch {
            r#type: value_kind_to_pb(m.kind),
            service: m.service.clone().unwrap_or_default(),
            method: m.method.clone().unwrap_or_default(),
        }),
        headers: m.headers.iter().map(value_match_to_pb).collect(),
    }
}

fn grpc_match_from_pb(m: pb::GrpcRouteMatch) -> GrpcRouteMatch {
    let set = |t: String| (!t.is_empty()).then_some(t);
    GrpcRouteMatch {
        method: m.method.map(|m| GrpcMethodMatch {
            kind: value_kind_from_pb(m.r#type),
            service: set(m.service),
            method: set(m.method),
        }),
        headers: m.headers.into_iter().map(value_match_from_pb).collect(),
    }
}

fn backend_to_pb(b: &Backend) -> pb::RouteBackend {
    pb::RouteBackend {
        namespace: b.namespace.clone(),
        name: b.name.clone(),
        port: b.port.map_or(0, u32::from),
        weight: b.weight,
        unresolved: b.unresolved.clone().unwrap_or_default(),
        filters: b.filters.iter().map(|f| filter_to_pb(f, None)).collect(),
    }
}

/// A filter as the control plane sends it; a RequestMirror's backend is `mirror`, resolved.
fn filter_to_pb(f: &HttpRouteFilter, mirror: Option<&Backend>) -> pb::RouteFilter {
    let modifier = |m: &HeaderModifier| pb::HeaderModifier {
        set: m.set.iter().map(|h| pb::HeaderPair { name: h.name.clone(), value: h.value.clone() }).collect(),
        add: m.add.iter().map(|h| pb::HeaderPair { name: h.name.clone(), value: h.value.clone() }).collect(),
        remove: m.remove.clone(),
    };
    let path = |p: &PathModifier| pb::PathModifier {
        r#type: format!("{:?}", p.kind),
        value: p.replace_full_path.clone().or_else(|| p.replace_prefix_match.clone()).unwrap_or_default(),
    };
    pb::RouteFilter {
        r#type: f.kind.clone(),
        request_header_modifier: f.request_header_modifier.as_ref().map(modifier),
        response_header_modifier: f.response_header_modifier.as_ref().map(modifier),
        request_redirect: f.request_redirect.as_ref().map(|r| pb::RequestRedirect {
            scheme: r.scheme.clone().unwrap_or_default(),
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().map(path),
            port: r.port.map_or(0, u32::from),
            status_code: r.status_code.map_or(0, u32::from),
        }),
        url_rewrite: f.url_rewrite.as_ref().map(|r| pb::UrlRewrite {
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().map(path),
        }),
        request_mirror: f.request_mirror.as_ref().zip(mirror).map(|(m, b)| {
            let (numerator, denominator) = m.share();
            pb::RequestMirror { backend: Some(backend_to_pb(b)), numerator, denominator }
        }),
    }
}

/// A received filter, and a RequestMirror's resolved backend.
fn filter_from_pb(f: pb::RouteFilter) -> (HttpRouteFilter, Option<Backend>) {
    let pairs =
        |list: Vec<pb::HeaderPair>| list.into_iter().map(|h| HeaderPair { name: h.name, value: h.value }).collect();
    let modifier = |m: pb::HeaderModifier| HeaderModifier { set: pairs(m.set), add: pairs(m.add), remove: m.remove };
    let text = |s: String| (!s.is_empty()).then_some(s);
    // An unknown type or an out-of-range number is kept so that validation names it.
    let path = |p: pb::PathModifier| {
        let full = p.r#type == "ReplaceFullPath";
        PathModifier {
            kind: if full { PathModifierType::ReplaceFullPath } else { PathModifierType::ReplacePrefixMatch },
            replace_full_path: full.then(|| p.value.clone()),
            replace_prefix_match: (!full).then_some(p.value),
        }
    };
    let number = |n: u32| (n != 0).then(|| u16::try_from(n).unwrap_or(0));
    let mirror = f.request_mirror.map(|m| {
        let b = m.backend.unwrap_or_default();
        let backend = backend_from_pb(b.clone());
        let filter = RequestMirror {
            backend_ref: ObjectRef {
                group: None,
                kind: None,
                name: b.name,
                namespace: Some(b.namespace),
                port: Some(u16::try_from(b.port).unwrap_or(0)),
            },
            percent: None,
            fraction: Some(Fraction { numerator: m.numerator, denominator: Some(m.denominator) }),
        };
        (filter, backend)
    });
    let (request_mirror, mirror) = mirror.unzip();
    let filter = HttpRouteFilter {
        kind: f.r#type,
        request_header_modifier: f.request_header_modifier.map(modifier),
        response_header_modifier: f.response_header_modifier.map(modifier),
        request_redirect: f.request_redirect.map(|r| RequestRedirect {
            scheme: text(r.scheme),
            hostname: text(r.hostname),
            path: r.path.map(path),
            port: number(r.port),
            status_code: number(r.status_code),
        }),
        url_rewrite: f.url_rewrite.map(|r| UrlRewrite { hostname: text(r.hostname), path: r.path.map(path) }),
        request_mirror,
    };
    (filter, mirror)
}

/// A received backend; an out-of-range port becomes 0, which validation refuses with the field named.
fn backend_from_pb(b: pb::RouteBackend) -> Backend {
    Backend {
        namespace: b.namespace,
        name: b.name,
        port: (b.port != 0).then(|| u16::try_from(b.port).unwrap_or(0)),
        weight: b.weight,
        unresolved: (!b.unresolved.is_empty()).then_some(b.unresolved),
        filters: b.filters.into_iter().map(|f| filter_from_pb(f).0).collect(),
    }
}

pub fn route_set_to_pb(set: &RouteSet) -> pb::RouteSet {
    pb::RouteSet {
        service_namespace: set.service_namespace.clone(),
        service: set.service.clone(),
        route_namespace: set.route_namespace.clone(),
        routes: set
            .routes
            .iter()
            .map(|r| pb::HttpRoute {
                meta: Some(pb::Meta {
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                    labels: Default::default(),
                }),
                created: r.created,
                ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                rules: r
                    .rules
                    .iter()
                    .map(|rule| pb::RouteRule {
                        name: rule.name.clone().unwrap_or_default(),
                        filters: {
                            let mut mirrors = rule.mirrors.iter();
                            let mut each = |f: &HttpRouteFilter| {
                                filter_to_pb(f, f.request_mirror.as_ref().and_then(|_| mirrors.next()))
                            };
                            rule.filters.iter().map(&mut each).collect()
                        },
                        retry: rule.retry.as_ref().map(|r| pb::RouteRetry {
                            codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                            attempts: r.attempts,
                            backoff: r.backoff.clone().unwrap_or_default(),
                        }),
                        timeout_request: rule.timeouts.request.clone().unwrap_or_default(),
                        timeout_backend_request: rule.timeouts.backend_request.clone().unwrap_or_default(),
                        matches: rule
                            .matches
                            .iter()
                            .map(|m| pb::RouteMatch {
                                path_type: match m.path.kind {
                                    PathMatchType::PathPrefix => pb::PathMatchType::PathPrefix,
                                    PathMatchType::Exact => pb::PathMatchType::PathExact,
                                    PathMatchType::RegularExpression => pb::PathMatchType::PathRegularExpression,
                                } as i32,
                                path: m.path.value.clone(),
                                headers: m.headers.iter().map(value_match_to_pb).collect(),
                                query_params: m.query_params.iter().map(value_match_to_pb).collect(),
                                method: m.method.clone().unwrap_or_default(),
                            })
                            .collect(),
                        backends: rule.backends.iter().map(backend_to_pb).collect(),
                        grpc_matches: rule.grpc_matches.iter().map(grpc_match_to_pb).collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A received route set, validated as `ferryctl apply` validates routes (paths, regular expressions, methods,
/// names, weights): an invalid one is an error naming its fields (the proxy NACKs it with that text).
pub fn route_set_from_pb(set: pb::RouteSet) -> Result<RouteSet, ConfigError> {
    let mut errors = Vec::new();
    let port = |p: u32, path: String, errors: &mut Vec<FieldError>| match u16::try_from(p) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            errors.push(FieldError { path, message: format!("{p} must be 1-65535") });
            None
        }
    };
    let mut routes = Vec::new();
    for (i, r) in set.routes.into_iter().enumerate() {
        let meta = r.meta.unwrap_or_default();
        let ports = r.ports.iter().filter_map(|p| port(*p, format!("routes[{i}].ports"), &mut errors)).collect();
        let mut rules = Vec::new();
        for (j, rule) in r.rules.into_iter().enumerate() {
            let matches: Vec<HttpRouteMatch> = rule
                .matches
                .into_iter()
                .map(|m| HttpRouteMatch {
                    path: PathMatch {
                        kind: match pb::PathMatchType::try_from(m.path_type) {
                            Ok(pb::PathMatchType::PathExact) => PathMatchType::Exact,
                            Ok(pb::PathMatchType::PathRegularExpression) => PathMatchType::RegularExpression,
                            _ => PathMatchType::PathPrefix,
                        },
                        value: m.path,
                    },
                    headers: m.headers.into_iter().map(value_match_from_pb).collect(),
                    query_params: m.query_params.into_iter().map(value_match_from_pb).collect(),
                    method: (!m.method.is_empty()).then_some(m.method),
                })
                .collect();
            for (k, m) in matches.iter().enumerate() {
                crate::route::validate_match(&format!("routes[{i}].rules[{j}].matches[{k}]"), m, &mut errors);
            }
            let grpc_matches: Vec<GrpcRouteMatch> = rule.grpc_matches.into_iter().map(grpc_match_from_pb).collect();
            for (k, m) in grpc_matches.iter().enumerate() {
                let path = format!("routes[{i}].rules[{j}].grpcMatches[{k}]");
                crate::grpc_route::validate_grpc_match(&path, m, &mut errors);
            }
            let backends: Vec<Backend> = rule.backends.into_iter().map(backend_from_pb).collect();
            for (k, b) in backends.iter().enumerate() {
                if b.port == Some(0) {
                    errors.push(FieldError {
                        path: format!("routes[{i}].rules[{j}].backends[{k}].port"),
                        message: "must be 1-65535".into(),
                    });
                }
                let path = format!("routes[{i}].rules[{j}].backends[{k}].filters");
                crate::route::validate_backend_filters(&path, &b.filters, &mut errors);
            }
            let (filters, mirrors): (Vec<HttpRouteFilter>, Vec<Option<Backend>>) =
                rule.filters.into_iter().map(filter_from_pb).unzip();
            let mirrors: Vec<Backend> = mirrors.into_iter().flatten().collect();
            let shape = crate::route::RuleShape::of(&matches, backends.len());
            crate::route::validate_filters(&format!("routes[{i}].rules[{j}].filters"), &filters, shape, &mut errors);
            let set = |t: String| (!t.is_empty()).then_some(t);
            let timeouts = HttpRouteTimeouts {
                request: set(rule.timeout_request),
                backend_request: set(rule.timeout_backend_request),
            };
            crate::route::validate_timeouts(&format!("routes[{i}].rules[{j}].timeouts"), &timeouts, &mut errors);
            let retry = rule.retry.map(|r| HttpRouteRetry {
                // An out-of-range code becomes 0, which validation refuses.
                codes: r.codes.into_iter().map(|c| u16::try_from(c).unwrap_or(0)).collect(),
                attempts: r.attempts,
                backoff: set(r.backoff),
            });
            if let Some(r) = &retry {
                crate::route::validate_retry(&format!("routes[{i}].rules[{j}].retry"), r, &mut errors);
            }
            let name = (!rule.name.is_empty()).then_some(rule.name);
            rules.push(AttachedRule { name, matches, grpc_matches, filters, timeouts, retry, backends, mirrors });
        }
        routes.push(AttachedRoute { namespace: meta.namespace, name: meta.name, created: r.created, ports, rules });
    }
    let set = RouteSet {
        service_namespace: set.service_namespace,
        service: set.service,
        route_namespace: set.route_namespace,
        routes,
    };
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ConfigError { documents: vec![(format!("RouteSet {}", set.name()), errors)] })
    }
}

fn metadata(m: Option<pb::Meta>) -> Metadata {
    let m = m.unwrap_or_default();
    Metadata {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels.into_iter().collect::<BTreeMap<_, _>>(),
        creation_timestamp: None,
    }
}

fn duration(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

/// Resource → document (what a proxy receives), validated exactly as `ferryctl apply` input is: an invalid resource
/// is an error naming its fields (the proxy NACKs it with that text).
pub fn from_resource(resource: Resource) -> Result<Document, ConfigError> {
    let doc = match resource {
        Resource::Service(s) => Document::Service(Service {
            metadata: metadata(s.meta),
            spec: ServiceSpec {
                ports: s
                    .ports
                    .into_iter()
                    .map(|p| ServicePort {
                        // Out-of-range ports become 0, which validation refuses with the field named.
                        port: u16::try_from(p.port).unwrap_or(0),
                        protocol: protocol_from_pb(p.protocol),
                        name: (!p.name.is_empty()).then_some(p.name),
                        target_port: (p.target_port != 0).then(|| u16::try_from(p.target_port).unwrap_or(0)),
                    })
                    .collect(),
                addresses: s.addresses,
                identities: s.identities,
                endpoints: s
                    .endpoints
                    .into_iter()
                    .map(|e| Endpoint { address: e.address, identity: (!e.identity.is_empty()).then_some(e.identity) })
                    .collect(),
            },
        }),
        Resource::TrafficPolicy(tp) => Document::TrafficPolicy(Box::new({
            let tp = *tp;
            TrafficPolicy {
                metadata: metadata(tp.meta),
                spec: TrafficPolicySpec {
                    target_ref: target(&tp.target),
                    timeout: duration(tp.timeout_ms),
                    tcp_idle_timeout: duration(tp.tcp_idle_timeout_ms),
                    retries: tp.retries.map(|r| Retries {
                        attempts: r.attempts,
                        per_try_timeout: duration(r.per_try_timeout_ms),
                        on: r.on,
                        backoff: r.backoff.map(|b| Backoff {
                            base: Duration::from_millis(b.base_ms),
                            max: Duration::from_millis(b.max_ms),
                        }),
                        budget: r.budget.map(|b| RetryBudget { percent: b.percent, min_per_second: b.min_per_second }),
                    }),
                    circuit_breaker: tp.circuit_breaker.map(|c| CircuitBreaker {
                        failure_ratio: c.failure_ratio,
                        min_requests: c.min_requests,
                        interval: duration(c.interval_ms),
                        consecutive_failures: c.consecutive_failures,
                        open_for: duration(c.open_for_ms),
                        half_open_requests: c.half_open_requests,
                        max_connections: c.max_connections,
                        max_pending_requests: c.max_pending_requests,
                        max_requests: c.max_requests,
                    }),
                    outlier_detection: tp.outlier_detection.map(|o| OutlierDetection {
                        consecutive_5xx: o.consecutive_5xx,
                        base_ejection_time: Duration::from_millis(o.base_ejection_time_ms),
                        max_ejection_percent: o.max_ejection_percent,
                    }),
                    rate_limit: tp.rate_limit.map(|r| RateLimit {
                        requests_per_second: r.requests_per_second,
                        burst: r.burst,
                        per_client_identity: r.per_client_identity,
                    }),
                    load_balancer: match pb::LoadBalancer::try_from(tp.load_balancer).unwrap_or(pb::LoadBalancer::Unset)
                    {
                        pb::LoadBalancer::Unset => None,
                        pb::LoadBalancer::P2cEwma => Some(LoadBalancer::P2cEwma),
                        pb::LoadBalancer::RoundRobin => Some(LoadBalancer::RoundRobin),
                        pb::LoadBalancer::LeastRequest => Some(LoadBalancer::LeastRequest),
                    },
                    mtls: match pb::MtlsMode::try_from(tp.mtls).unwrap_or(pb::MtlsMode::MtlsUnset) {
                        pb::MtlsMode::MtlsUnset => None,
                        pb::MtlsMode::Permissive => Some(MtlsMode::Permissive),
                        pb::MtlsMode::Strict => Some(MtlsMode::Strict),
                    },
                },
            }
        })),
        Resource::AuthorizationPolicy(ap) => Document::AuthorizationPolicy(AuthorizationPolicy {
            metadata: metadata(ap.meta),
            spec: AuthorizationPolicySpec {
                target_ref: target(&ap.target),
                default_action: if ap.default_allow { Action::Allow } else { Action::Deny },
                allow: ap
                    .allow
                    .into_iter()
                    .map(|r| AuthorizationRule {
                        from: r.from.map(|s| Source { identities: s.identities, namespaces: s.namespaces }),
                        to: r.to.map(|t| Operation {
                            methods: t.methods,
                            paths: t.paths,
                            // Out-of-range ports become 0, which validation refuses with the field named.
                            ports: t.ports.into_iter().map(|p| u16::try_from(p).unwrap_or(0)).collect(),
                        }),
                    })
                    .collect(),
            },
        }),
    };
    // One validation path for everything: the document form goes through the same parser as YAML input.
    parse_value(document_json(&doc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const ALL: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: shop, labels: {team: pay}}
spec:
  ports: [{port: 8080, protocol: http, name: web}, {port: 5432, protocol: tcp, targetPort: 15432}]
  addresses: [payments, "10.96.0.7"]
  identities: [payments]
  endpoints: [{address: "10.0.0.5:8080", identity: payments}, {address: "10.0.0.6"}]
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: payments, namespace: shop}
spec:
  targetRef: {kind: Service, name: payments}
  timeout: 1m30s
  retries: {attempts: 2, perTryTimeout: 500ms, on: [connect-failure, "503"], backoff: {base: 25ms, max: 250ms}, budget: {percent: 20, minPerSecond: 10}}
  circuitBreaker: {failureRatio: 0.6, minRequests: 3, interval: 60s, consecutiveFailures: 5, openFor: 10s, halfOpenRequests: 3, maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 1024}
  outlierDetection: {consecutive5xx: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}
  rateLimit: {requestsPerSecond: 100, burst: 200, perClientIdentity: true}
  loadBalancer: round-robin
  mtls: strict
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: minimal, namespace: shop}
spec: {targetRef: {kind: Service, name: other}}
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec: {targetRef: {kind: Service, name: payments}, defaultAction: deny, allow: [{from: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"], namespaces: [billing]}}]}
"#;

    #[test]
    fn every_kind_survives_the_wire() {
        for doc in crate::parse_documents(ALL).unwrap() {
            let resource = to_resource(&doc).unwrap();
            // Through protobuf bytes, as xDS carries it.
            let decoded = match &resource {
                Resource::Service(m) => Resource::Service(pb::Service::decode(m.encode_to_vec().as_slice()).unwrap()),
                Resource::TrafficPolicy(m) => {
                    Resource::TrafficPolicy(Box::new(pb::TrafficPolicy::decode(m.encode_to_vec().as_slice()).unwrap()))
                }
                Resource::AuthorizationPolicy(m) => Resource::AuthorizationPolicy(
                    pb::AuthorizationPolicy::decode(m.encode_to_vec().as_slice()).unwrap(),
                ),
            };
            assert_eq!(decoded, resource);
            assert_eq!(from_resource(decoded).unwrap(), doc, "{}", doc.display_name());
        }
    }

    #[test]
    fn invalid_resources_are_refused_naming_the_field() {
        let docs = crate::parse_documents(ALL).unwrap();
        let Resource::Service(mut svc) = to_resource(&docs[0]).unwrap() else { unreachable!() };
        svc.ports[0].port = 70000;
        let err = from_resource(Resource::Service(svc)).unwrap_err().to_string();
        assert!(err.contains("Service shop/payments") && err.contains("spec.ports[0].port: must be 1-65535"), "{err}");
        let Resource::TrafficPolicy(mut tp) = to_resource(&docs[1]).unwrap() else { unreachable!() };
        tp.retries.as_mut().unwrap().budget.as_mut().unwrap().percent = 150.0;
        tp.circuit_breaker.as_mut().unwrap().failure_ratio = Some(1.5);
        let err = from_resource(Resource::TrafficPolicy(tp)).unwrap_err().to_string();
        assert!(
            err.contains("spec.retries.budget.percent") && err.contains("spec.circuitBreaker.failureRatio"),
            "{err}"
        );
        let Resource::AuthorizationPolicy(mut ap) = to_resource(&docs[3]).unwrap() else { unreachable!() };
        ap.allow[0].from.as_mut().unwrap().identities[0] = "orders".into();
        ap.meta = None;
        let err = from_resource(Resource::AuthorizationPolicy(ap)).unwrap_err().to_string();
        assert!(err.contains("metadata.name") && err.contains("spec.allow[0].from.identities[0]"), "{err}");
    }

    #[test]
    fn durations_take_the_largest_exact_unit() {
        for (ms, text) in [(0, "0s"), (250, "250ms"), (2000, "2s"), (90_000, "90s"), (60_000, "1m"), (7_200_000, "2h")]
        {
            assert_eq!(Duration::from_millis(ms).to_string(), text);
        }
    }
}
