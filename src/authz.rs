//! Inbound authorization: the destination's proxy decides whether a caller may make a call to its Service, from the
//! Service's mTLS mode (strict refuses callers without a mesh identity) and its AuthorizationPolicies. Applied per
//! HTTP request (`AuthzLayer`) and per opaque connection; metrics: `ferry_authz_decisions_total`; a denial is
//! `ProxyError::Unauthorized` (403 `unauthorized`, gRPC PERMISSION_DENIED) or a closed connection.

use std::sync::Arc;
use std::task::{Context, Poll};

use ferry_xds::identity::Identity;
use ferry_xds::policy::{Action, AuthorizationPolicy, MtlsMode};
use futures_util::future::Either;
use http::{Method, Request};

use crate::errors::ProxyError;

/// The compiled AuthorizationPolicies of one Service (several merge: any rule of any policy may allow; a call no
/// rule allows is denied when any policy's default is deny).
#[derive(Debug, Clone, PartialEq)]
pub struct Authorization {
    default_allow: bool,
    rules: Vec<Rule>,
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
            rules,
            policies: policies.iter().map(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name)).collect(),
        }
    }

    fn allows(&self, call: &Call<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(call))
    }
}

/// A policy's identity pattern; one outside this mesh's trust domain never matches.
fn caller(pattern: &str) -> Option<Caller> {
    let rest = pattern.strip_prefix(&format!("spiffe://{}/", ferry_xds::TRUST_DOMAIN))?;
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
        let path =
            self.paths.is_empty() || call.path.is_some_and(|p| self.paths.iter().any(|prefix| p.starts_with(prefix)));
        let port = self.ports.is_empty() || self.ports.contains(&call.port);
        from && method && path && port
    }
}

/// Pure: may `call` reach a Service in `mode` with `authorization` (None: no policy, so allowed)?
pub fn decide(mode: MtlsMode, authorization: Option<&Authorization>, call: &Call<'_>) -> Decision {
    if mode == MtlsMode::Strict && call.peer.is_none() {
        return Decision::Deny("mTLS is required (strict mode): the caller presented no mesh identity".into());
    }
    match authorization {
        None => Decision::Allow,
        Some(a) if a.allows(call) || a.default_allow => Decision::Allow,
        Some(a) => Decision::Deny(format!(
            "{} may not call this service ({} allows no such call)",
            call.peer.map(Identity::spiffe).unwrap_or_else(|| "a caller without a mesh identity".into()),
            a.policies.join(", ")
        )),
    }
}

/// What the inbound side enforces for its Service, from the live snapshot.
#[derive(Debug, Clone)]
pub struct InboundPolicy {
    pub mode: MtlsMode,
    pub authorization: Option<Arc<Authorization>>,
    /// The `service` label of the decision metric.
    pub service: Arc<str>,
}

impl InboundPolicy {
    /// Decides and counts.
    pub fn check(&self, call: &Call<'_>, metrics: &crate::metrics::Metrics) -> Decision {
        let decision = decide(self.mode, self.authorization.as_deref(), call);
        let label = if decision == Decision::Allow { "allow" } else { "deny" };
        metrics.authz_decisions.with_label_values(&[&self.service, label]).inc();
        decision
    }
}

// ===== layer =====

/// Authorizes each inbound HTTP request before it goes on; a denied request never reaches the app.
#[derive(Clone)]
pub struct AuthzLayer {
    policy: InboundPolicy,
    peer: Option<Arc<Identity>>,
    port: u16,
    metrics: Arc<crate::metrics::Metrics>,
}

impl AuthzLayer {
    pub fn new(
        policy: InboundPolicy,
        peer: Option<Arc<Identity>>,
        port: u16,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        AuthzLayer { policy, peer, port, metrics }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz { layer: self.clone(), inner }
    }
}

#[derive(Clone)]
pub struct Authz<S> {
    layer: AuthzLayer,
    inner: S,
}

// ===== impl Authz =====

impl<S, B, R> tower::Service<Request<B>> for Authz<S>
where
    S: tower::Service<Request<B>, Response = R, Error = ProxyError>,
{
    type Response = R;
    type Error = ProxyError;
    type Future = Either<S::Future, std::future::Ready<Result<R, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let l = &self.layer;
        let call =
            Call { peer: l.peer.as_deref(), method: Some(req.method()), path: Some(req.uri().path()), port: l.port };
        match l.policy.check(&call, &l.metrics) {
            Decision::Allow => Either::Left(self.inner.call(req)),
            Decision::Deny(why) => Either::Right(std::future::ready(Err(ProxyError::Unauthorized(why)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_xds::Document;

    fn policy(yaml_spec: &str) -> AuthorizationPolicy {
        let doc = format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {yaml_spec}\n"
        );
        match ferry_xds::parse_documents(&doc).unwrap().remove(0) {
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
}
