//! Gateway API `GRPCRoute` attached to Services (GAMMA), Gateway API v1.4.0's standard channel: the document and its
//! validation (its matches, run as request-path matches with GRPCRoute's precedence, are in [`crate::route`]).

use serde::{Deserialize, Serialize};

use crate::meta::{FieldError, Metadata};
use crate::route::{
    BackendRef, HttpRouteFilter, HttpRouteMatch, ParentRef, PathMatchType, RuleShape, ValueMatchType, compile_regex,
    field, validate_backends, validate_filter_subset, validate_match, validate_route,
};
pub use crate::route::{GrpcMethodMatch, GrpcRouteMatch};

pub const GRPC_ROUTE_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// The filters a GRPCRoute rule may have (`ExtensionRef` names nothing Ferry has).
const GRPC_FILTERS: [&str; 3] = ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"];

/// A `GRPCRoute` as accepted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrpcRoute {
    pub metadata: Metadata,
    pub spec: GrpcRouteSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Ignored for Service parents (GAMMA): kept as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default = "default_rules")]
    pub rules: Vec<GrpcRouteRule>,
}

fn default_rules() -> Vec<GrpcRouteRule> {
    vec![GrpcRouteRule { name: None, matches: default_matches(), filters: Vec::new(), backend_refs: Vec::new() }]
}

fn default_matches() -> Vec<GrpcRouteMatch> {
    vec![GrpcRouteMatch::default()]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one of them selects the rule; none written means every call.
    #[serde(default = "default_matches")]
    pub matches: Vec<GrpcRouteMatch>,
    /// `GRPCRouteFilter`: the header modifiers and RequestMirror, as in an HTTPRoute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// The upstream CRD's bounds on a service or method name.
const MAX_NAME: usize = 1024;

/// Pure: whether `s` is a gRPC service name as the upstream CRD takes it (`package.Service`, a leading `.` allowed).
fn is_service_name(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    !s.is_empty() && s.split('.').all(is_identifier)
}

/// Pure: a protobuf identifier (`[A-Za-z_][A-Za-z_0-9]*`), as a method name is.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Validates one match (`path` = `spec.rules[i].matches[j]`).
pub(crate) fn validate_grpc_match(path: &str, m: &GrpcRouteMatch, errors: &mut Vec<FieldError>) {
    if let Some(method) = &m.method {
        let at = format!("{path}.method");
        if method.service.is_none() && method.method.is_none() {
            errors.push(field(at.clone(), "one or both of `service` and `method` must be set"));
        }
        for (name, value) in [("service", &method.service), ("method", &method.method)] {
            let Some(value) = value else { continue };
            let ok = match method.kind {
                _ if value.len() > MAX_NAME => Err(format!("at most {MAX_NAME} characters")),
                ValueMatchType::Exact if name == "service" && !is_service_name(value) => {
                    Err(format!("`{value}` must be a gRPC service name (`package.Service`)"))
                }
                ValueMatchType::Exact if name == "method" && !is_identifier(value) => {
                    Err(format!("`{value}` must be a gRPC method name"))
                }
                ValueMatchType::Exact => Ok(()),
                ValueMatchType::RegularExpression => compile_regex(value).map(drop),
            };
            if let Err(e) = ok {
                errors.push(field(format!("{at}.{name}"), e));
            }
        }
        // Both expressions together make the path expression the table runs: it must compile too.
        let translated = m.to_http();
        if translated.path.kind == PathMatchType::RegularExpression
            && let Err(e) = compile_regex(&translated.path.value)
            && !errors.iter().any(|f| f.path.starts_with(&at))
        {
            errors.push(field(at, format!("service and method together: {e}")));
        }
    }
    // Headers as an HTTPRoute's (names unique, bounded, expressions compiled).
    let headers = HttpRouteMatch { headers: m.headers.clone(), ..HttpRouteMatch::default() };
    validate_match(path, &headers, errors);
}

pub fn validate_grpc_route(spec: &GrpcRouteSpec, errors: &mut Vec<FieldError>) {
    let rules: Vec<(Option<&str>, usize)> = spec.rules.iter().map(|r| (r.name.as_deref(), r.matches.len())).collect();
    validate_route(&spec.parent_refs, &rules, errors);
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            validate_grpc_match(&format!("{path}.matches[{j}]"), m, errors);
        }
        let shape = RuleShape { all_prefix: false, backends: rule.backend_refs.len() };
        let filters = format!("{path}.filters");
        validate_filter_subset(&filters, &rule.filters, &GRPC_FILTERS, "a GRPCRoute filter", shape, errors);
        validate_backends(&format!("{path}.backendRefs"), &rule.backend_refs, errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{AttachedRoute, AttachedRule, Backend, RequestView, RouteTable, ValueMatch};

    fn method(kind: ValueMatchType, service: Option<&str>, method: Option<&str>) -> GrpcRouteMatch {
        GrpcRouteMatch {
            method: Some(GrpcMethodMatch { kind, service: service.map(Into::into), method: method.map(Into::into) }),
            headers: Vec::new(),
        }
    }

    /// Each match, and the request paths it must and must not take.
    #[test]
    fn method_matches_become_path_matches() {
        use ValueMatchType::*;
        let cases = [
            (
                method(Exact, Some("echo.Echo"), Some("Say")),
                &["/echo.Echo/Say"][..],
                &["/echo.Echo/Shout", "/echo.Echo/SayMore", "/x.Echo/Say"][..],
            ),
            (
                method(Exact, Some("echo.Echo"), None),
                &["/echo.Echo/Say", "/echo.Echo/Shout"],
                &["/echo.EchoV2/Say", "/other/Say"],
            ),
            (
                method(Exact, None, Some("Say")),
                &["/echo.Echo/Say", "/a.B/Say"],
                &["/echo.Echo/Shout", "/Say", "/a/b/Say"],
            ),
            (
                method(RegularExpression, Some(r"echo\..*"), Some("S.*")),
                &["/echo.Echo/Say", "/echo.V2/Shout"],
                &["/other.Echo/Say", "/echo.Echo/Whisper"],
            ),
            (method(RegularExpression, None, Some("Say|Shout")), &["/a.B/Say", "/a.B/Shout"], &["/a.B/Sayx"]),
            (GrpcRouteMatch::default(), &["/a.B/C", "/"], &[]),
        ];
        for (m, take, refuse) in cases {
            let mut errors = Vec::new();
            validate_grpc_match("m", &m, &mut errors);
            assert!(errors.is_empty(), "{m:?}: {errors:?}");
            let route = AttachedRoute {
                namespace: "ns".into(),
                name: "r".into(),
                created: 0,
                ports: vec![],
                rules: vec![AttachedRule { grpc_matches: vec![m.clone()], ..AttachedRule::default() }],
            };
            let table = RouteTable::build(&[&route]);
            for (path, want) in take.iter().map(|p| (p, true)).chain(refuse.iter().map(|p| (p, false))) {
                let req = RequestView { method: "POST", path, query: None, header: &|_| None };
                assert_eq!(table.select(&req).is_some(), want, "{m:?} on {path}");
            }
        }
    }

    #[test]
    fn precedence_follows_the_grpcroute_spec() {
        use ValueMatchType::*;
        // Listed in the order they must win; each also matches `/echo.Echo/Say`.
        let mut header = method(Exact, Some("echo.Echo"), None);
        header.headers.push(ValueMatch { kind: Exact, name: "x-v".into(), value: "2".into() });
        let ordered = [
            method(Exact, Some("echo.Echo"), Some("Say")),
            header,
            method(Exact, Some("echo.Echo"), None),
            method(RegularExpression, Some("ech.*"), None),
            method(Exact, None, Some("Say")),
            GrpcRouteMatch::default(),
        ];
        // Written in reverse, as rules of one route: the table still picks them in spec order.
        let rules = ordered.iter().rev().map(|m| AttachedRule {
            grpc_matches: vec![m.clone()],
            backends: vec![Backend { namespace: "ns".into(), name: format!("{m:?}"), weight: 1, ..Backend::default() }],
            ..AttachedRule::default()
        });
        let mut route = AttachedRoute {
            namespace: "ns".into(),
            name: "r".into(),
            created: 0,
            ports: vec![],
            rules: rules.collect(),
        };
        for want in &ordered {
            let table = RouteTable::build(&[&route]);
            let header = |n: &str| (n == "x-v").then(|| "2".into());
            let req = RequestView { method: "POST", path: "/echo.Echo/Say", query: None, header: &header };
            assert_eq!(table.select(&req).unwrap().backends[0].name, format!("{want:?}"));
            route.rules.retain(|r| r.grpc_matches[0] != *want);
        }
    }

    /// Each bad route and the field its error names.
    #[test]
    fn errors_name_the_field() {
        let route = |rules: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: api}}]\n  rules: {rules}"
            )
        };
        let cases = [
            ("[{matches: [{method: {}}]}]", "spec.rules[0].matches[0].method: one or both"),
            (
                "[{matches: [{method: {service: \"a b\"}}]}]",
                "spec.rules[0].matches[0].method.service: `a b` must be a gRPC service",
            ),
            (
                "[{matches: [{method: {method: \"a.b\"}}]}]",
                "spec.rules[0].matches[0].method.method: `a.b` must be a gRPC method",
            ),
            (
                "[{matches: [{method: {type: RegularExpression, method: \"(\"}}]}]",
                "spec.rules[0].matches[0].method.method: not a valid regular expression",
            ),
            (
                "[{matches: [{headers: [{name: x, value: a}, {name: X, value: b}]}]}]",
                "spec.rules[0].matches[0].headers[1].name",
            ),
            (
                "[{filters: [{type: URLRewrite, urlRewrite: {hostname: a}}]}]",
                "spec.rules[0].filters[0].type: `URLRewrite` is not a GRPCRoute filter",
            ),
            (
                "[{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: ferry-client-id, value: x}]}}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            ),
            ("[{backendRefs: [{name: api, port: 0}]}]", "spec.rules[0].backendRefs[0].port"),
            ("[{sessionPersistence: {}}]", "spec.rules[0].sessionPersistence: unknown field"),
            ("[{name: a}, {name: a}]", "spec.rules[1].name"),
        ];
        for (rules, want) in cases {
            let err = crate::config::parse_documents(&route(rules)).unwrap_err().to_string();
            assert!(err.contains(want), "{rules}\n  got: {err}\n want: {want}");
        }
        let good = route(
            "[{matches: [{method: {service: echo.Echo, method: Say}}], backendRefs: [{name: api, port: 80, weight: 3}]}]",
        );
        crate::config::parse_documents(&good).unwrap();
    }

    /// GEP-1426: a GRPCRoute takes a Service port from an HTTPRoute of its namespace (the HTTPRoute is `Conflicted`
    /// and not served there); a cross-namespace backend needs a ReferenceGrant from GRPCRoutes.
    #[test]
    fn grpc_routes_attach_and_win_over_http_routes() {
        let services = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 8080}, {port: 9090}]}\n---\napiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: v2, namespace: billing}\nspec: {ports: [{port: 8080}]}\n";
        let route = |kind: &str, name: &str, port: &str| {
            format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{parentRefs: [{{group: '', kind: Service, name: api{port}}}], rules: [{{backendRefs: [{{name: api}}, {{name: v2, namespace: billing}}]}}]}}\n"
            )
        };
        let grant = |kind: &str| {
            format!(
                "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: billing}}\nspec: {{from: [{{group: gateway.networking.k8s.io, kind: {kind}, namespace: shop}}], to: [{{group: '', kind: Service}}]}}\n"
            )
        };
        let yaml = [
            services.to_string(),
            route("GRPCRoute", "grpc", ", port: 8080"),
            route("HTTPRoute", "all-ports", ""),
            route("HTTPRoute", "other-port", ", port: 9090"),
            grant("HTTPRoute"),
        ]
        .concat();
        let docs = crate::parse_documents(&yaml).unwrap();
        let sets = crate::config::route_sets(&docs);
        let names: Vec<&str> = sets[0].routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["grpc", "other-port"], "the HTTPRoute on every port (8080 too) yields");
        let grpc = &sets[0].routes[0].rules[0];
        assert_eq!(grpc.grpc_matches, [GrpcRouteMatch::default()], "no matches written: every call");
        assert!(grpc.backends[1].unresolved.as_deref().unwrap().contains("lets GRPCRoutes of shop"), "{grpc:?}");
        let status = |name: &str, docs: &[crate::Document]| {
            let doc = docs.iter().find(|d| d.metadata().name == name).unwrap();
            let status = crate::config::route_status(crate::config::RouteRef::of(doc).unwrap(), docs, 1);
            status["parents"][0]["conditions"].clone()
        };
        let conflicted = status("all-ports", &docs);
        assert_eq!(
            (conflicted[0]["status"].as_str(), conflicted[0]["reason"].as_str()),
            (Some("False"), Some("Conflicted"))
        );
        assert!(conflicted[0]["message"].as_str().unwrap().contains("GRPCRoute shop/grpc"));
        assert_eq!(status("other-port", &docs)[0]["status"], "True");
        assert_eq!(status("grpc", &docs)[1]["reason"], "RefNotPermitted");
        let docs =
            crate::parse_documents(&format!("{yaml}{}", grant("GRPCRoute").replace("name: g,", "name: g2,"))).unwrap();
        assert_eq!(status("grpc", &docs)[1]["status"], "True", "a grant from GRPCRoutes");
        // Through xDS and back, matches included.
        let yaml = format!("{services}{}", route("GRPCRoute", "m", "").replace("rules: [{", "rules: [{matches: [{method: {service: echo.Echo, method: Say}, headers: [{name: x-v, value: '2'}]}, {method: {type: RegularExpression, method: 'S.*'}}], "));
        let set = crate::config::route_sets(&crate::parse_documents(&yaml).unwrap()).remove(0);
        let back = crate::resources::route_set_from_pb(crate::resources::route_set_to_pb(&set)).unwrap();
        assert_eq!(back, set);
        assert_eq!(back.routes[0].rules[0].grpc_matches.len(), 2);
    }
}
