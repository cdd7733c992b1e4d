//! Route splits: each try of a request that an HTTPRoute rule sends to weighted backends picks one of them (a retry
//! picks again), and the layers under it (breaker, caps, balancer) and the upstream act for that backend Service.

use std::sync::Arc;

use http::{Request, Response};

use super::Mechanism;
use crate::body::ProxyBody;
use crate::discovery::destination::{Destination, Split};
use crate::errors::{ProxyError, ResponseFuture};
use crate::policy::balance::Tried;

/// The backend one try picked, on that try's request.
#[derive(Clone)]
pub struct Backend(pub Arc<Destination>);

/// Picks each try's backend (`Config`: the rule's backends, and the request's tries, where the pick is recorded for
/// the `backend` metric label).
pub struct Splitting;

impl Mechanism for Splitting {
    type Config = (Arc<Split>, Tried);

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
        Box::pin(inner.call(req))
    }
}
