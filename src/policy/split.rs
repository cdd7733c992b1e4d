//! Route splits: each try of a request that an HTTPRoute rule sends to weighted backends picks one of them (a retry
//! picks again), and the layers under it (breaker, caps, balancer) and the upstream act for that backend Service.

use std::marker::PhantomData;
use std::sync::Arc;

use http::{Request, Response};

use super::Mechanism;
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};
use crate::policy::balance::Tried;
use crate::policy::headers::{self, Side};

/// Why a route's backend cannot take a try: the error it answers with, and why.
pub type Unusable = (fn(String) -> ProxyError, String);

/// The backends of one HTTPRoute rule, each a destination `D`.
#[derive(Clone)]
pub struct Split<D> {
    /// The rule, `namespace/name/index` (the `route` metric label).
    pub route: Arc<str>,
    /// Its filters (applied once to the request and its response, not per try).
    pub filters: Arc<[ferry_api::route::HttpRouteFilter]>,
    /// Its timeouts, which replace the Service's where set.
    pub timeouts: ferry_api::route::RuleTimeouts,
    /// The `PathPrefix` value the request matched, when a redirect or rewrite of the rule replaces it.
    pub matched_prefix: Option<String>,
    /// Its retries (GEP-1731) over the Service's policy, which they replace for the rule.
    pub retry: Option<Arc<crate::policy::retry::Policy>>,
    /// The backends with a weight above 0.
    pub backends: Vec<SplitBackend<D>>,
    /// Where its RequestMirror filters send copies.
    pub mirrors: Vec<SplitMirror<D>>,
}

/// A RequestMirror filter's Service: copies of `numerator` of every `denominator` requests go there.
#[derive(Clone)]
pub struct SplitMirror<D> {
    /// Its Service's qualified name (the `mirror` metric label).
    pub name: Arc<str>,
    pub numerator: u32,
    pub denominator: u32,
    /// Resolved, or why copies cannot go there.
    pub dest: Result<Arc<D>, String>,
}

#[derive(Clone)]
pub struct SplitBackend<D> {
    pub weight: u32,
    /// Its backendRef's filters (header modifiers), for the tries that pick it.
    pub filters: Arc<[ferry_api::route::HttpRouteFilter]>,
    /// Its Service's qualified name (the `backend` metric label).
    pub name: Arc<str>,
    /// Resolved, or the refusal a try that picks it gets.
    pub dest: Result<Arc<D>, Unusable>,
}

impl<D> Split<D> {
    /// The backend of one try, by weight (from `draw`, uniform over `u64`).
    pub fn pick(&self, draw: u64) -> Result<&SplitBackend<D>, ProxyError> {
        ferry_api::route::pick(&self.backends, |b| b.weight, draw).ok_or_else(|| {
            ProxyError::BackendNotFound(format!("HTTPRoute rule {} has no backend with a weight", self.route))
        })
    }
}

/// The backend one try picked, on that try's request.
pub struct Backend<D>(pub Arc<D>);

impl<D> Clone for Backend<D> {
    fn clone(&self) -> Self {
        Backend(self.0.clone())
    }
}

/// Picks each try's backend (`Config`: the rule's backends, and the request's tries, where the pick is recorded for
/// the `backend` metric label).
pub struct Splitting<D>(PhantomData<fn() -> D>);

impl<D> Default for Splitting<D> {
    fn default() -> Self {
        Splitting(PhantomData)
    }
}

impl<D: Send + Sync + 'static> Mechanism for Splitting<D> {
    type Config = (Arc<Split<D>>, Tried);

    fn call<S>(&self, (split, tried): Self::Config, inner: &mut S, mut req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let backend = match split.pick(crate::util::random_u64()) {
            Ok(backend) => backend,
            Err(e) => return super::refuse(e),
        };
        tried.lock().expect("tried lock").backend = Some(backend.name.clone());
        match &backend.dest {
            Ok(dest) => req.extensions_mut().insert(Backend(dest.clone())),
            Err((error, why)) => return super::refuse(error(why.clone())),
        };
        if backend.filters.is_empty() {
            return Box::pin(inner.call(req));
        }
        // The backendRef's own filters act on this try alone: its request, and the response it gets.
        let filters = backend.filters.clone();
        headers::apply(&filters, Side::Request, req.headers_mut());
        let response = inner.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            headers::apply(&filters, Side::Response, response.headers_mut());
            Ok(response)
        })
    }
}
