//! The policy layers of the request stacks, one file per layer: each knows requests, its own config and the
//! leaves, never how connections are accepted, where config comes from or how the stacks are composed.
//!
//! Every layer is a [`Mechanism`] under the one [`Layer`] here: the stack gives each layer a function that reads the
//! request's own config (its destination's, found once per request by the listener), and a request whose
//! destination does not configure the mechanism passes through untouched. So a stack is built once per proxy and
//! serves every destination, and the tower scaffolding is written once, not per layer.

pub mod authz;
pub mod balance;
pub mod breaker;
pub mod concurrency;
pub mod headers;
pub mod mirror;
pub mod outlier;
pub mod path;
pub mod ratelimit;
pub mod retry;
pub mod rewrite;
pub mod split;
pub mod timeout;

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};

use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};

/// What one policy does to a request whose destination configures it.
pub trait Mechanism: Send + Sync + 'static {
    /// What the mechanism needs of one request's destination (its config, the Service it is kept for).
    type Config: Send + 'static;

    /// Runs one request through the mechanism; `inner` has been polled ready.
    fn call<S>(&self, config: Self::Config, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static;
}

/// Reads a mechanism's config from a request (`None`: the mechanism is off for it).
pub type Select<C> = Arc<dyn Fn(&Request<ProxyBody>) -> Option<C> + Send + Sync>;

/// The layer of any mechanism: on for a request when `select` finds its config, a pass-through otherwise.
pub struct Layer<M: Mechanism> {
    mechanism: Arc<M>,
    select: Select<M::Config>,
}

impl<M: Mechanism> Layer<M> {
    pub fn new(
        mechanism: M,
        select: impl Fn(&Request<ProxyBody>) -> Option<M::Config> + Send + Sync + 'static,
    ) -> Self {
        Layer { mechanism: Arc::new(mechanism), select: Arc::new(select) }
    }
}

impl<M: Mechanism> Clone for Layer<M> {
    fn clone(&self) -> Self {
        Layer { mechanism: self.mechanism.clone(), select: self.select.clone() }
    }
}

impl<M: Mechanism, S> tower::Layer<S> for Layer<M> {
    type Service = Layered<M, S>;

    fn layer(&self, inner: S) -> Layered<M, S> {
        Layered { layer: self.clone(), inner }
    }
}

/// A service under a mechanism's layer.
pub struct Layered<M: Mechanism, S> {
    layer: Layer<M>,
    inner: S,
}

impl<M: Mechanism, S: Clone> Clone for Layered<M, S> {
    fn clone(&self) -> Self {
        Layered { layer: self.layer.clone(), inner: self.inner.clone() }
    }
}

impl<M, S> tower::Service<Request<ProxyBody>> for Layered<M, S>
where
    M: Mechanism,
    S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, ResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        match (self.layer.select)(&req) {
            None => Either::Left(self.inner.call(req)),
            Some(config) => Either::Right(self.layer.mechanism.call(config, &mut self.inner, req)),
        }
    }
}

/// A future that fails at once (a refusal by a mechanism).
pub fn refuse(e: ProxyError) -> ResponseFuture {
    Box::pin(std::future::ready(Err(e)))
}
