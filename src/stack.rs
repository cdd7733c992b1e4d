//! The one place where the request stacks are composed, outermost first, each layer with why it is there. A stack
//! is built once per proxy and serves every destination: the listener finds a request's destination once and
//! attaches it as a [`Call`]; each layer reads its own config from it, and passes the request through when the
//! destination does not configure it. Metrics, the access log and the error responder wrap the stacks (in
//! `listen/http.rs`, `forward`).

use std::sync::Arc;

use ferry_api::identity::Identity;
use http::{Request, Response};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::body::ProxyBody;
use crate::discovery::destination::Destination;
use crate::errors::ProxyError;
use crate::policy::Layer;
use crate::policy::authz::Authz;
use crate::policy::balance::{Balance, Balancers, Tried};
use crate::policy::breaker::{Breakers, Breaking};
use crate::policy::concurrency::{Concurrency, Limits};
use crate::policy::mirror::{self, Mirrored, Mirroring};
use crate::policy::ratelimit::{RateLimited, RateLimits};
use crate::policy::retry::{Budgets, Retrying};
use crate::policy::split::{Backend, Splitting};
use crate::policy::timeout::{PerTryTimeout, RequestTimeout};
use crate::telemetry::metrics::Metrics;

/// What the layers of a stack know of one request: found once by the listener, attached to the request (and to each
/// try's copy of it) as an `Arc<Call<U>>` extension.
pub struct Call<U> {
    /// Where it goes; inbound, `dest.inbound` is the policy of the port it is delivered to.
    pub dest: Destination,
    /// The caller's verified identity (inbound, from a mesh peer).
    pub caller: Option<Arc<Identity>>,
    /// The endpoints of its tries so far (the load balancer adds them).
    pub tried: Tried,
    /// What the innermost service needs besides (the listener's own).
    pub upstream: U,
}

impl<U: Send + Sync + 'static> Call<U> {
    /// The call attached to `req` (the listener attaches one to every request before the stack sees it).
    pub fn of(req: &Request<ProxyBody>) -> &Call<U> {
        req.extensions().get::<Arc<Call<U>>>().expect("the listener attaches a Call to every request")
    }

    /// The call of a mirrored copy of this call's request, to `dest`: no caller, no tries yet, the same upstream.
    fn copy_to(call: &Arc<Call<U>>, dest: &Arc<Destination>) -> Arc<Call<U>>
    where
        U: Clone,
    {
        let (caller, tried, upstream) = (None, Tried::default(), call.upstream.clone());
        Arc::new(Call { dest: (**dest).clone(), caller, tried, upstream })
    }

    /// Where one try goes: the route backend it picked, else the request's destination.
    pub fn backend(req: &Request<ProxyBody>) -> &Destination {
        match req.extensions().get::<Backend<Destination>>() {
            Some(Backend(dest)) => dest,
            None => &Self::of(req).dest,
        }
    }
}

/// The state of the policies that outlives config swaps, kept per Service (or Service port) and owned by the proxy.
pub struct Registries {
    pub breakers: Arc<Breakers>,
    pub limits: Arc<Limits>,
    pub budgets: Arc<Budgets>,
    pub balancers: Arc<Balancers>,
    pub rate_limits: Arc<RateLimits>,
    /// Mirrored copies in flight at once (`FERRY_MIRROR_MAX_IN_FLIGHT`).
    pub mirrors_in_flight: usize,
}

impl Default for Registries {
    fn default() -> Self {
        Registries {
            breakers: Default::default(),
            limits: Default::default(),
            budgets: Default::default(),
            balancers: Default::default(),
            rate_limits: Default::default(),
            mirrors_in_flight: crate::settings::defaults::MIRROR_MAX_IN_FLIGHT,
        }
    }
}

/// A composed stack: one request (with its `Call`) in, the response or the proxy's error out.
pub type Stack = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;

/// The innermost service of a stack: sends each request (each try) on. Any service of the stacks' types is one.
pub trait Innermost:
    tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Innermost for S where
    S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The outbound HTTP stack over `send`, which sends each try to the endpoint chosen for it.
pub fn outbound<U: Clone + Send + Sync + 'static>(
    r: &Registries,
    metrics: &Arc<Metrics>,
    send: impl Innermost,
) -> Stack {
    let m = metrics.clone();
    let stack = ServiceBuilder::new()
        // A request an HTTPRoute rule mirrors is copied to the mirror Services beside it, through the layers below
        // with the mirror's destination (its timeout, breaker, caps, endpoints; no retries), in tasks of their own:
        // the request never waits on its copies, which are capped in flight.
        .layer(Layer::new(Mirroring::new(r.mirrors_in_flight, m.clone(), Call::<U>::copy_to), |req| {
            let call = req.extensions().get::<Arc<Call<U>>>()?;
            let split = call.dest.split.as_ref().filter(|s| !s.mirrors.is_empty())?;
            let targets = split.mirrors.iter().map(|mirror| mirror::Target {
                name: mirror.name.clone(),
                numerator: mirror.numerator,
                denominator: mirror.denominator,
                timeout: mirror.dest.as_ref().ok().and_then(|d| d.request_timeout()).unwrap_or(mirror::COPY_TIMEOUT),
                dest: mirror.dest.clone(),
            });
            Some((split.route.clone(), call.clone(), targets.collect()))
        }))
        // The destination's request timeout (its HTTPRoute rule's, else its Service's) covers everything under it,
        // the response body included, and a gRPC caller's own deadline when shorter.
        .layer(Layer::new(RequestTimeout, |req| Some(Call::<U>::of(req).dest.request_timeout())))
        // Retries within the policy and the budget (each try passes the breaker and caps below; under a route split,
        // a try its backend refused is retried, the next try picking again).
        // A rule's own `retry` replaces the Service's, still spending the Service's budget; a mirrored copy is not
        // retried.
        .layer(Layer::new(Retrying::new(r.budgets.clone(), m.clone()), |req| {
            if req.extensions().get::<Mirrored>().is_some() {
                return None;
            }
            let dest = &Call::<U>::of(req).dest;
            Some((dest.retry()?.clone(), dest.service.clone(), dest.split.is_some()))
        }))
        // A request an HTTPRoute rule splits goes to a backend picked by weight for each try; the layers below act
        // for that backend Service (its breaker, caps, endpoints), the ones above for the Service the caller named.
        .layer(Layer::new(Splitting::<Destination>::default(), |req| {
            let call = Call::<U>::of(req);
            Some((call.dest.split.clone()?, call.tried.clone()))
        }))
        // A failing destination is given a rest: while its breaker is open, calls fail fast without an attempt.
        .layer(Layer::new(Breaking::new(r.breakers.clone(), m.clone()), |req| {
            let dest = Call::<U>::backend(req);
            Some((dest.outbound.breaker.clone()?, dest.service.clone()))
        }))
        // And it is never sent more than its caps allow at once (a queue of bounded length, then `overloaded`).
        .layer(Layer::new(Concurrency::new(r.limits.clone(), m.clone()), |req| {
            let dest = Call::<U>::backend(req);
            Some((dest.outbound.caps?, dest.service.clone()))
        }))
        // Each try must answer in time, so that a retry can still fit in the request timeout.
        .layer(Layer::new(PerTryTimeout, |req| Call::<U>::of(req).dest.per_try_timeout()))
        // Each try to the endpoint with the least expected latency (another one than the failed try's when it can),
        // never to one outlier detection has ejected. A destination of one fixed endpoint has no choice to make.
        .layer(Layer::new(Balance::new(r.balancers.clone(), m), |req| {
            let choice = Call::<U>::backend(req).fixed_or_choice().err()?;
            Some((choice, Call::<U>::of(req).tried.clone()))
        }))
        .service(send);
    BoxCloneSyncService::new(stack)
}

/// The inbound HTTP stack over `send`, which delivers each request to the app.
pub fn inbound<U: Send + Sync + 'static>(r: &Registries, metrics: &Arc<Metrics>, send: impl Innermost) -> Stack {
    let stack = ServiceBuilder::new()
        // Authorization first: a call the Service does not allow (or plaintext under strict mTLS) never reaches the
        // app, and never spends the rate limit of callers that are allowed.
        .layer(Layer::new(Authz::new(metrics.clone()), |req| {
            let call = Call::<U>::of(req);
            let policy = call.dest.inbound.clone().expect("an inbound destination carries its port's policy");
            Some((policy, call.caller.clone(), call.dest.port))
        }))
        // The Service's own protection against overload: admitted calls within its rate (per caller if asked).
        .layer(Layer::new(RateLimited::new(r.rate_limits.clone(), metrics.clone()), |req| {
            let call = Call::<U>::of(req);
            let limits = &call.dest.inbound.as_ref()?.rate_limits;
            (!limits.is_empty()).then(|| (limits.clone(), call.caller.clone()))
        }))
        .service(send);
    BoxCloneSyncService::new(stack)
}
