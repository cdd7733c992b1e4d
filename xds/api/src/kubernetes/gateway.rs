//! The Gateway API kinds Kubernetes mode reads when their CRDs are installed (Ferry does not ship them): HTTPRoute
//! and GRPCRoute (`v1`) and ReferenceGrant (`v1beta1`), kept as the API server sends them so that a field Ferry does not support
//! becomes the route's status rather than a failed watch; turned into the documents of the local store, and the
//! `status.parents` entry Ferry writes back.

use kube_core::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::{Document, ROUTE_CONTROLLER, References, RouteRef};
use crate::meta::Metadata;

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The Gateway API release whose standard channel Ferry implements.
pub const GATEWAY_API_VERSION: &str = "v1.4.0";
/// The CRDs Ferry reads, by name, with the version it watches.
pub const CRDS: [(&str, &str); 3] = [
    ("httproutes.gateway.networking.k8s.io", "v1"),
    ("grpcroutes.gateway.networking.k8s.io", "v1"),
    ("referencegrants.gateway.networking.k8s.io", "v1beta1"),
];

/// HTTPRoute fields Ferry serves that an installed Gateway API CRD may lack (an older release, or the standard channel
/// for what only the experimental one has): the field as written in a route, and where it is. An API server prunes a
/// field its CRD's schema lacks, so a route that sets it loses it silently.
pub const ROUTE_FIELDS: [(&str, &str); 4] = [
    ("spec.rules[].retry", "Gateway API's experimental channel (GEP-1731)"),
    ("spec.rules[].timeouts", "the standard channel since v1.2.0 (GEP-1742)"),
    ("spec.rules[].filters[].requestMirror.fraction", "the standard channel since v1.3.0 (GEP-3171)"),
    ("spec.rules[].name", "the standard channel since v1.4.0 (GEP-995)"),
];

/// Pure: whether an OpenAPI v3 schema has `field` (`a.b[].c`: arrays step into `items`); `None` when the schema
/// cannot say (absent, or a part that keeps unknown fields).
pub fn schema_has(schema: &Value, field: &str) -> Option<bool> {
    let mut node = schema;
    for part in field.split('.') {
        let (name, array) = match part.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (part, false),
        };
        if node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
            return None;
        }
        let Some(next) = node.get("properties")?.get(name) else { return Some(false) };
        node = if array { next.get("items")? } else { next };
    }
    Some(true)
}

/// Pure: whether `object` (a route as written) sets `field` (`a.b[].c`: in any element of an array).
pub fn sets(object: &Value, field: &str) -> bool {
    fn walk(node: &Value, parts: &[&str]) -> bool {
        let Some((part, rest)) = parts.split_first() else { return true };
        let (name, array) = match part.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (*part, false),
        };
        match node.get(name) {
            None => false,
            Some(Value::Array(items)) if array => items.iter().any(|item| walk(item, rest)),
            Some(_) if array => false,
            Some(next) => walk(next, rest),
        }
    }
    walk(object, &field.split('.').collect::<Vec<_>>())
}

/// An HTTPRoute object as the API server holds it (any spec: Ferry's own parser decides, naming the fields).
#[derive(kube_derive::CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    root = "HttpRouteObject",
    namespaced,
    status = "Value",
    schema = "disabled"
)]
pub struct HttpRouteObjectSpec {
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// A GRPCRoute object as the API server holds it.
#[derive(kube_derive::CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    plural = "grpcroutes",
    root = "GrpcRouteObject",
    namespaced,
    status = "Value",
    schema = "disabled"
)]
pub struct GrpcRouteObjectSpec {
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// What Ferry reads of a route object of either kind.
pub trait RouteObject: kube_core::Resource<DynamicType = ()> {
    /// `HTTPRoute` or `GRPCRoute`.
    const KIND: &'static str;
    fn fields(&self) -> &Map<String, Value>;
    fn status(&self) -> Option<&Value>;
}

impl RouteObject for HttpRouteObject {
    const KIND: &'static str = "HTTPRoute";
    fn fields(&self) -> &Map<String, Value> {
        &self.spec.fields
    }
    fn status(&self) -> Option<&Value> {
        self.status.as_ref()
    }
}

impl RouteObject for GrpcRouteObject {
    const KIND: &'static str = "GRPCRoute";
    fn fields(&self) -> &Map<String, Value> {
        &self.spec.fields
    }
    fn status(&self) -> Option<&Value> {
        self.status.as_ref()
    }
}

/// A ReferenceGrant object as the API server holds it.
#[derive(kube_derive::CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "gateway.networking.k8s.io",
    version = "v1beta1",
    kind = "ReferenceGrant",
    plural = "referencegrants",
    root = "ReferenceGrantObject",
    namespaced,
    schema = "disabled"
)]
pub struct ReferenceGrantObjectSpec {
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// An object's document through the same parser and validation as `ferryctl apply` (the error names the fields).
fn document(api_version: &str, kind: &str, meta: &Metadata, spec: &Map<String, Value>) -> Result<Document, String> {
    let value = json!({"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec});
    crate::config::parse_value(value).map_err(|e| {
        e.documents.iter().flat_map(|(_, errors)| errors.iter().map(|f| f.to_string())).collect::<Vec<_>>().join("; ")
    })
}

/// What Ferry concluded about one route: written to its `status.parents` (Ferry's entries only).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteVerdict {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// Ferry's `status.parents` entries, one per parentRef that is a Service.
    pub parents: Vec<Value>,
}

/// The documents of the accepted routes and grants, and each route's verdict (ReferenceGrants have no status).
/// `docs` are the other documents of the cluster (the Services routes attach to and point at).
pub fn documents(
    http_routes: &[HttpRouteObject],
    grpc_routes: &[GrpcRouteObject],
    grants: &[ReferenceGrantObject],
    docs: &[Document],
) -> (Vec<Document>, Vec<RouteVerdict>) {
    let meta = |m: &kube_core::ObjectMeta| super::discovery::metadata(m);
    let mut out: Vec<Document> = Vec::new();
    for g in grants {
        match document(&format!("{GROUP}/v1beta1"), "ReferenceGrant", &meta(&g.metadata), &g.spec.fields) {
            Ok(doc) => out.push(doc),
            Err(e) => {
                tracing::warn!(grant = %format!("{}/{}", g.namespace().unwrap_or_default(), g.name_any()), error = %e, "ReferenceGrant ignored")
            }
        }
    }
    let objects = http_routes.iter().map(parts).chain(grpc_routes.iter().map(parts));
    let parsed: Vec<_> = objects
        .map(|(kind, m, fields)| (kind, m, fields, document(&format!("{GROUP}/v1"), kind, &meta(m), fields)))
        .collect();
    out.extend(parsed.iter().filter_map(|(.., d)| d.as_ref().ok().cloned()));
    let refs = References::of(docs.iter().chain(&out));
    let verdicts = parsed.iter().map(|(kind, m, fields, parsed)| verdict(kind, m, fields, parsed, &refs)).collect();
    (out, verdicts)
}

/// A route object's kind, metadata and spec.
fn parts<R: RouteObject>(r: &R) -> (&'static str, &kube_core::ObjectMeta, &Map<String, Value>) {
    (R::KIND, r.meta(), r.fields())
}

/// Ferry's `status.parents` of one route: its route status for an accepted one; for one Ferry cannot take, each
/// Service parentRef `Accepted: False` (`UnsupportedValue`, every refused field in the message), not served.
fn verdict(
    kind: &'static str,
    meta: &kube_core::ObjectMeta,
    fields: &Map<String, Value>,
    parsed: &Result<Document, String>,
    refs: &References<'_>,
) -> RouteVerdict {
    let generation = meta.generation.unwrap_or(0);
    let parents = match parsed.as_ref().ok().and_then(RouteRef::of) {
        Some(route) => {
            let status = refs.route_status(route, generation);
            status["parents"].as_array().cloned().unwrap_or_default()
        }
        None => {
            let message = parsed.as_ref().err().cloned().unwrap_or_default();
            let refs = fields.get("parentRefs").and_then(Value::as_array).cloned().unwrap_or_default();
            refs.into_iter()
                .filter(|p| p["kind"] == "Service" && matches!(p["group"].as_str(), Some("" | "core")))
                .map(|p| {
                    let condition = json!({"type": "Accepted", "status": "False", "reason": "UnsupportedValue",
                                           "message": message, "observedGeneration": generation});
                    json!({"parentRef": p, "controllerName": ROUTE_CONTROLLER, "conditions": [condition]})
                })
                .collect()
        }
    };
    let (namespace, name) = (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
    RouteVerdict { kind, namespace, name, parents }
}

/// Pure: a route's `status.parents` with Ferry's entries replaced by `ours` and every other controller's kept;
/// each of our conditions gets its `lastTransitionTime` (required of a `metav1.Condition`): the one it had when its
/// status is unchanged, else `now`.
pub fn merged_parents(current: Option<&Value>, ours: &[Value], now: &str) -> Vec<Value> {
    let existing: Vec<&Value> = current.and_then(|s| s["parents"].as_array()).into_iter().flatten().collect();
    let theirs = existing.iter().filter(|p| p["controllerName"] != ROUTE_CONTROLLER).map(|p| (*p).clone());
    let stamped = ours.iter().map(|entry| {
        let mut entry = entry.clone();
        let before = existing
            .iter()
            .find(|p| p["controllerName"] == ROUTE_CONTROLLER && p["parentRef"] == entry["parentRef"])
            .and_then(|p| p["conditions"].as_array());
        for c in entry["conditions"].as_array_mut().into_iter().flatten() {
            let kept = before
                .into_iter()
                .flatten()
                .find(|b| b["type"] == c["type"] && b["status"] == c["status"])
                .and_then(|b| b["lastTransitionTime"].as_str());
            c["lastTransitionTime"] = json!(kept.unwrap_or(now));
        }
        entry
    });
    theirs.chain(stamped).collect()
}

/// How many of a route's `status.parents` entries are Ferry's.
pub fn ours(current: Option<&Value>) -> usize {
    let parents = current.and_then(|s| s["parents"].as_array()).into_iter().flatten();
    parents.filter(|p| p["controllerName"] == ROUTE_CONTROLLER).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_a_crd_schema_lacks_and_fields_a_route_sets() {
        let standard = json!({"properties": {"spec": {"properties": {"rules": {"type": "array", "items": {"properties": {
            "name": {"type": "string"}, "timeouts": {"type": "object"},
            "filters": {"type": "array", "items": {"properties": {"requestMirror": {"properties": {"percent": {}}}}}}}}}}}}});
        let open = json!({"properties": {"spec": {"x-kubernetes-preserve-unknown-fields": true}}});
        // (schema, field) -> has it.
        let cases = [
            (&standard, "spec.rules[].retry", Some(false)),
            (&standard, "spec.rules[].timeouts", Some(true)),
            (&standard, "spec.rules[].name", Some(true)),
            (&standard, "spec.rules[].filters[].requestMirror.fraction", Some(false)),
            (&standard, "spec.rules[].filters[].requestMirror.percent", Some(true)),
            (&open, "spec.rules[].retry", None),
            (&Value::Null, "spec.rules[].retry", None),
        ];
        for (schema, field, want) in cases {
            assert_eq!(schema_has(schema, field), want, "{field}");
        }
        let route = json!({"spec": {"rules": [{"name": "a"}, {"retry": {"attempts": 2},
            "filters": [{"type": "RequestMirror", "requestMirror": {"fraction": {"numerator": 1}}}]}]}});
        for (field, want) in [
            ("spec.rules[].retry", true),
            ("spec.rules[].name", true),
            ("spec.rules[].timeouts", false),
            ("spec.rules[].filters[].requestMirror.fraction", true),
            ("spec.rules.retry", false),
        ] {
            assert_eq!(sets(&route, field), want, "{field}");
        }
    }

    #[test]
    fn status_merge_keeps_other_controllers_and_transition_times_of_unchanged_conditions() {
        let parent = json!({"group": "", "kind": "Service", "name": "api"});
        let condition = |t: &str, s: &str| json!({"type": t, "status": s, "reason": "R", "message": "m"});
        let entry = |conditions: Vec<Value>| json!({"parentRef": parent, "controllerName": ROUTE_CONTROLLER, "conditions": conditions});
        let gateway = json!({"parentRef": {"name": "gw"}, "controllerName": "example.com/gw", "conditions": []});
        let mut old = entry(vec![condition("Accepted", "True"), condition("ResolvedRefs", "True")]);
        for c in old["conditions"].as_array_mut().unwrap() {
            c["lastTransitionTime"] = json!("2026-12-01T00:00:00Z");
        }
        let current = json!({"parents": [gateway.clone(), old]});
        // ResolvedRefs turned False: only its time moves.
        let ours = [entry(vec![condition("Accepted", "True"), condition("ResolvedRefs", "False")])];
        let merged = merged_parents(Some(&current), &ours, "2026-12-03T00:00:00Z");
        assert_eq!(merged[0], gateway, "another controller's entry is kept as it was");
        let times: Vec<&str> = merged[1]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["lastTransitionTime"].as_str().unwrap())
            .collect();
        assert_eq!(times, ["2026-12-01T00:00:00Z", "2026-12-03T00:00:00Z"]);
        assert_eq!((super::ours(Some(&current)), super::ours(None)), (1, 0));
        // No status yet: every condition is new.
        let fresh = merged_parents(None, &ours, "2026-12-03T00:00:00Z");
        assert_eq!(fresh.len(), 1);
        assert!(
            fresh[0]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["lastTransitionTime"] == "2026-12-03T00:00:00Z")
        );
    }
}
