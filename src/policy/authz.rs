//! Inbound authorization: the destination's proxy decides whether a caller may make a call to its Service, from the
//! Service's mTLS mode (strict refuses callers without a mesh identity) and its AuthorizationPolicies. Applied per
//! HTTP request (the `Authz` mechanism) and per opaque connection; metrics: `ferry_authz_decisions_total`; a denial is
//! `ProxyError::Unauthorized` (403 `unauthorized`, gRPC PERMISSION_DENIED) or a closed connection.

use std::sync::Arc;

use ferry_api::identity::Identity;
use ferry_api::policy::{Action, AuthorizationPolicy, MtlsMode};
use http::{Method, Request, Response};

use super::Mechanism;
use super::path::ambiguous;
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};

/// The compiled AuthorizationPolicies of one Service (several merge: any rule of any policy may allow; a call no
/// rule allows is denied when any policy's default is deny).
#[derive(Debug, Clone, PartialEq)]
pub struct Authorization {
    default_allow: bool,
    rules: Vec<Rule>,
    /// Some rule matches on paths: an ambiguous path is refused before any rule is judged.
    path_rules: bool,
    /// `namespace/name` of the policies, for messages.
    policies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// None: any caller, with or without an identity.
    from: Option<Vec<Caller>>,
    methods: Vec<Method>,
    paths: Vec<String>,
    ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
enum Caller {
    Exact(Identity),
    /// `spiffe://<td>/ns/<ns>/sa/*`, or `namespaces: [<ns>]`.
    Namespace(String),
    /// `spiffe://<td>/ns/*/sa/*`: any mesh identity.
    AnyIdentity,
}

/// One call as the decision sees it: who (a verified mesh identity, or none), and what.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub peer: Option<&'a Identity>,
    /// HTTP only.
    pub method: Option<&'a Method>,
    pub path: Option<&'a str>,
    /// The target port (the app's).
    pub port: u16,
}

/// The outcome, with the reason a denial gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
    /// Rules match on paths, and this request's path is one servers resolve differently (`path::ambiguous`): 400.
    Ambiguous(&'static str),
}

impl Authorization {
    /// Compiles the policies that target one Service.
    pub fn compile(policies: &[&AuthorizationPolicy]) -> Authorization {
        let mut rules = Vec::new();
        for policy in policies {
            for rule in &policy.spec.allow {
                let from = rule.from.as_ref().map(|f| {
                    let mut callers: Vec<Caller> = f.identities.iter().filter_map(|id| caller(id)).collect();
                    callers.extend(f.namespaces.iter().map(|ns| Caller::Namespace(ns.clone())));
                    callers
                });
                let to = rule.to.clone().unwrap_or_default();
                rules.push(Rule {
                    from,
                    methods: to.methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect(),
                    paths: to.paths,
                    ports: to.ports,
                });
            }
        }
        Authorization {
            default_allow: policies.iter().all(|p| p.spec.default_action == Action::Allow),
            path_rules: rules.iter().any(|r| !r.paths.is_empty()),
            rules,
            policies: policies.iter().map(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name)).collect(),
        }
    }

    /// The default inbound policy of ports no Service selects (`None`: `allow`, no check at all).
    pub fn for_unselected(default: ferry_api::workload::DefaultInbound) -> Option<Authorization> {
        use ferry_api::workload::DefaultInbound;
        let any_identity =
            Rule { from: Some(vec![Caller::AnyIdentity]), methods: vec![], paths: vec![], ports: vec![] };
        let rules = match default {
            DefaultInbound::Allow => return None,
            DefaultInbound::MeshOnly => vec![any_identity],
            DefaultInbound::Deny => vec![],
        };
        Some(Authorization {
            default_allow: false,
            rules,
            path_rules: false,
            policies: vec![format!("the default inbound policy `{default}` of ports no Service selects")],
        })
    }

    fn allows(&self, call: &Call<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(call))
    }
}

/// A policy's identity pattern; one outside this mesh's trust domain never matches.
fn caller(pattern: &str) -> Option<Caller> {
    let rest = pattern.strip_prefix(&format!("spiffe://{}/", ferry_api::TRUST_DOMAIN))?;
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["ns", "*", "sa", "*"] => Some(Caller::AnyIdentity),
        ["ns", ns, "sa", "*"] => Some(Caller::Namespace(ns.to_string())),
        ["ns", ns, "sa", sa] => Some(Caller::Exact(Identity::new(ns, sa))),
        _ => None,
    }
}

impl Rule {
    fn matches(&self, call: &Call<'_>) -> bool {
        let from = match (&self.from, call.peer) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(callers), Some(peer)) => callers.iter().any(|c| match c {
                Caller::Exact(id) => id == peer,
                Caller::Namespace(ns) => *ns == peer.namespace,
                Caller::AnyIdentity => true,
            }),
        };
        let method = self.methods.is_empty() || call.method.is_some_and(|m| self.methods.contains(m));
        let path = self.paths.is_empty()
            || call.path.is_some_and(|p| ambiguous(p).is_none() && self.paths.iter().any(|prefix| under(prefix, p)));
        let port = self.ports.is_empty() || self.ports.contains(&call.port);
        from && method && path && port
    }
}

/// Whether `path` is `prefix` or below it, segment-wise: `/api` covers `/api` and `/api/x`, not `/apix` (a prefix
/// ending in `/` covers everything under it).
fn under(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Pure: may `call` reach a Service in `mode` with `authorization` (None: no policy, so allowed)?
pub fn decide(mode: MtlsMode, authorization: Option<&Authorization>, call: &Call<'_>) -> Decision {
    if mode == MtlsMode::Strict && call.peer.is_none() {
        return Decision::Deny("mTLS is required (strict mode): the caller presented no mesh identity".into());
    }
    match authorization {
        None => Decision::Allow,
        Some(a)
            if a.path_rules
                && let Some(why) = call.path.and_then(ambiguous) =>
        {
            Decision::Ambiguous(why)
        }
        Some(a) if a.allows(call) || a.default_allow => Decision::Allow,
        Some(a) => Decision::Deny(format!(
            "{} may not call this service ({} allows no such call)",
            call.peer.map(Identity::spiffe).unwrap_or_else(|| "a caller without a mesh identity".into()),
            a.policies.join(", ")
        )),
    }
}

/// What the inbound side enforces on one port of its pod: that of every Service selecting the port (the strictest
/// mTLS mode, every AuthorizationPolicy merged, each Service's rate limit), or the default inbound policy of ports no
/// Service selects. Compiled once per snapshot (`Snapshot::inbound_policy`).
#[derive(Debug, Clone)]
pub struct InboundPolicy {
    pub mode: MtlsMode,
    pub authorization: Option<Arc<Authorization>>,
    /// The selecting Services' TrafficPolicy rateLimits with their `service` labels (the destination's proxy enforces
    /// them, after authorization; a request takes a token from each).
    pub rate_limits: Arc<[(Arc<str>, ferry_api::policy::RateLimit)]>,
    /// The shortest `tcpIdleTimeout` of the selecting Services' TrafficPolicies: opaque connections to the port are
    /// closed after that long without bytes.
    pub tcp_idle_timeout: Option<std::time::Duration>,
    /// The `service` label of the decision metric and of inbound requests: the selecting Service first in
    /// `namespace/name` order, or `unselected`.
    pub service: Arc<str>,
    /// The Services disagree on the port's protocol, or declare it `tcp`: it is forwarded uninspected.
    pub opaque: bool,
    /// A Service declares the port HTTP (`http`, `http2`, `grpc`: `appProtocol`, a port name's prefix, or Ferry's
    /// `protocol`) and it is not opaque: nothing is forwarded to it as opaque bytes, not even from a mesh peer.
    pub declared_http: bool,
}

impl InboundPolicy {
    /// Decides and counts.
    pub fn check(&self, call: &Call<'_>, metrics: &crate::telemetry::metrics::Metrics) -> Decision {
        let decision = decide(self.mode, self.authorization.as_deref(), call);
        let label = match decision {
            Decision::Allow => "allow",
            Decision::Deny(_) => "deny",
            Decision::Ambiguous(_) => "bad-request",
        };
        metrics.authz_decisions.with_label_values(&[&self.service, label]).inc();
        decision
    }
}

// ===== layer =====

/// Refuses a request its destination port's policy does not allow (`Config`: that policy, the caller's verified
/// identity, the port).
pub struct Authz {
    metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl Authz {
    pub fn new(metrics: Arc<crate::telemetry::metrics::Metrics>) -> Self {
        Authz { metrics }
    }
}

impl Mechanism for Authz {
    type Config = (Arc<InboundPolicy>, Option<Arc<Identity>>, u16);

    fn call<S>(&self, (policy, peer, port): Self::Config, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        // An HTTP/1 upgrade (WebSocket) travels between proxies as an extended CONNECT; the app gets a GET again.
        let extended = req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some();
        let method = if extended && peer.is_some() { &Method::GET } else { req.method() };
        let call = Call { peer: peer.as_deref(), method: Some(method), path: Some(req.uri().path()), port };
        match policy.check(&call, &self.metrics) {
            Decision::Allow => Box::pin(inner.call(req)),
            Decision::Deny(why) => super::refuse(ProxyError::Unauthorized(why)),
            Decision::Ambiguous(_) => super::refuse(ProxyError::BadRequest(
                "the path is one servers resolve differently (a `;`, dot segments, encoded dots, separators or `%`) and authorization rules match on paths",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::Document;

    fn policy(yaml_spec: &str) -> AuthorizationPolicy {
        let doc = format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {yaml_spec}\n"
        );
        match ferry_api::parse_documents(&doc).unwrap().remove(0) {
            Document::AuthorizationPolicy(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decision_table() {
        let orders = Identity::new("shop", "orders");
        let web = Identity::new("web", "frontend");
        let billing = Identity::new("billing", "worker");
        let stranger = Identity::new("x", "y");
        let rules = policy(
            r#"{targetRef: {kind: Service, name: payments}, defaultAction: deny, allow: [
                {from: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}},
                {from: {identities: ["spiffe://cluster.local/ns/web/sa/*"]}, to: {methods: [GET], paths: [/public]}},
                {from: {namespaces: [billing]}, to: {ports: [9090]}},
                {to: {paths: [/healthz]}},
                {from: {identities: ["spiffe://other.org/ns/shop/sa/orders"]}}]}"#,
        );
        let a = Authorization::compile(&[&rules]);
        let (get, post) = (Method::GET, Method::POST);
        let http = |peer, method, path| Call { peer, method: Some(method), path: Some(path), port: 8080 };
        let tcp = |peer, port| Call { peer, method: None, path: None, port };
        let cases: Vec<(&str, MtlsMode, Call<'_>, bool)> = vec![
            ("exact identity, anything", MtlsMode::Permissive, http(Some(&orders), &post, "/pay"), true),
            ("exact identity over opaque TCP", MtlsMode::Permissive, tcp(Some(&orders), 8080), true),
            ("namespace wildcard, GET under /public", MtlsMode::Permissive, http(Some(&web), &get, "/public/x"), true),
            ("namespace wildcard, POST", MtlsMode::Permissive, http(Some(&web), &post, "/public/x"), false),
            ("namespace wildcard, other path", MtlsMode::Permissive, http(Some(&web), &get, "/admin"), false),
            ("namespace wildcard, TCP has no method", MtlsMode::Permissive, tcp(Some(&web), 8080), false),
            ("namespace list, port 9090 over TCP", MtlsMode::Permissive, tcp(Some(&billing), 9090), true),
            ("namespace list, other port", MtlsMode::Permissive, tcp(Some(&billing), 8080), false),
            ("anyone to /healthz, even plaintext", MtlsMode::Permissive, http(None, &get, "/healthz"), true),
            ("plaintext elsewhere", MtlsMode::Permissive, http(None, &get, "/pay"), false),
            ("strict: plaintext never", MtlsMode::Strict, http(None, &get, "/healthz"), false),
            ("strict: mesh identity allowed", MtlsMode::Strict, http(Some(&orders), &get, "/x"), true),
            ("an identity no rule names", MtlsMode::Permissive, http(Some(&stranger), &get, "/"), false),
        ];
        for (what, mode, call, allowed) in cases {
            let got = decide(mode, Some(&a), &call);
            assert_eq!(got == Decision::Allow, allowed, "{what}: {got:?}");
        }
        // Path rules match segment-wise and only canonical paths: no way around a prefix with dot segments or
        // encoded slashes.
        let paths = policy(
            r#"{targetRef: {kind: Service, name: payments}, defaultAction: deny, allow: [{to: {paths: [/public, /static/]}}]}"#,
        );
        let p = Authorization::compile(&[&paths]);
        for (path, allowed) in [
            ("/public", true),
            ("/public/a/b", true),
            ("/publicity", false),
            ("/static/x.css", true),
            ("/static", false),
            ("/public/../admin", false),
            ("/public/./x", false),
            ("/public/..", false),
            ("/public%2F..%2Fadmin", false),
            ("/public/%2e%2e/admin", false),
            ("/public//x", false),
            ("/public\\..\\admin", false),
            ("/admin", false),
        ] {
            let got = decide(MtlsMode::Permissive, Some(&p), &http(None, &get, path));
            assert_eq!(got == Decision::Allow, allowed, "{path}: {got:?}");
        }
        // Where rules match on paths, a path servers resolve differently is refused as such (400), before any rule.
        for path in ["/public/..;/admin", "/public/%252e%252e/admin", "/public/..%3b/admin", "/public/../admin"] {
            let got = decide(MtlsMode::Permissive, Some(&p), &http(None, &get, path));
            assert!(matches!(got, Decision::Ambiguous(_)), "{path}: {got:?}");
        }
        // Without path rules the path is the app's business.
        let no_paths = Authorization::compile(&[&policy(
            r#"{targetRef: {kind: Service, name: payments}, defaultAction: deny, allow: [{to: {methods: [GET]}}]}"#,
        )]);
        assert_eq!(decide(MtlsMode::Permissive, Some(&no_paths), &http(None, &get, "/a;b")), Decision::Allow);
        // Without a policy every call is allowed, unless strict mode refuses plaintext.
        assert_eq!(decide(MtlsMode::Permissive, None, &http(None, &get, "/")), Decision::Allow);
        assert!(matches!(decide(MtlsMode::Strict, None, &tcp(None, 1)), Decision::Deny(m) if m.contains("strict")));
        // Default allow: nothing denied; merged with a default-deny policy: deny wins for calls no rule allows.
        let open = policy("{targetRef: {kind: Service, name: payments}, defaultAction: allow}");
        assert_eq!(
            decide(MtlsMode::Permissive, Some(&Authorization::compile(&[&open])), &tcp(None, 1)),
            Decision::Allow
        );
        let merged = Authorization::compile(&[&open, &rules]);
        assert!(
            matches!(decide(MtlsMode::Permissive, Some(&merged), &tcp(None, 1)), Decision::Deny(m) if m.contains("shop/p"))
        );
        assert_eq!(decide(MtlsMode::Permissive, Some(&merged), &tcp(Some(&orders), 1)), Decision::Allow);
    }

    #[tokio::test]
    async fn the_layer_checks_an_upgrade_from_a_peer_as_the_get_it_was() {
        use tower::{Layer, Service, ServiceExt};
        let rule = policy(
            r#"{targetRef: {kind: Service, name: payments}, defaultAction: deny, allow: [{from: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}, to: {methods: [GET]}}]}"#,
        );
        let inbound = InboundPolicy {
            mode: MtlsMode::Permissive,
            authorization: Some(Arc::new(Authorization::compile(&[&rule]))),
            rate_limits: Arc::new([]),
            service: "payments.shop".into(),
            opaque: false,
            declared_http: false,
            tcp_idle_timeout: None,
        };
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let peer = Some(Arc::new(Identity::new("shop", "orders")));
        let inner = tower::service_fn(|_req: Request<ProxyBody>| async {
            Ok::<_, ProxyError>(Response::new(ProxyBody::full("reached")))
        });
        let inbound = Arc::new(inbound);
        let layer = crate::policy::Layer::new(Authz::new(metrics.clone()), move |_| {
            Some((inbound.clone(), peer.clone(), 8080))
        });
        let mut svc = layer.layer(inner);
        let reached = |r: Response<ProxyBody>| matches!(r.body(), ProxyBody::Full(Some(b)) if b == "reached");
        let mut upgrade = Request::connect("http://payments/ws").body(ProxyBody::empty()).unwrap();
        upgrade.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(reached(svc.ready().await.unwrap().call(upgrade).await.unwrap()));
        let post = Request::post("http://payments/").body(ProxyBody::empty()).unwrap();
        let denied = svc.ready().await.unwrap().call(post).await.unwrap_err();
        assert_eq!(denied.reason(), "unauthorized");
        // A plain CONNECT (no upgrade protocol) is no GET.
        let connect = Request::connect("http://payments/").body(ProxyBody::empty()).unwrap();
        assert!(svc.ready().await.unwrap().call(connect).await.is_err());
        assert_eq!(metrics.authz_decisions.with_label_values(&["payments.shop", "deny"]).get(), 2);
    }
}
