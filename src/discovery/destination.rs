//! What a route resolves to for one connection or request: the Service it is counted under, its endpoint or the
//! endpoints to balance over, mTLS to a meshed endpoint, and the policies that apply (outbound and inbound).

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_api::policy::LoadBalancer;

use crate::identity::tls::PeerTls;
use crate::policy::authz::InboundPolicy;
use crate::policy::balance::{Choice, Endpoint};
use crate::policy::split::Split;

/// The caller-side settings for a destination Service, compiled for the outbound stack from its TrafficPolicy, with
/// the defaults (README, "Defaults") for every field the policy leaves out, or for a Service no policy targets.
/// `Outbound::default()` (all off) is for destinations that are not Services (pass-through, inbound).
#[derive(Debug, Default)]
pub struct Outbound {
    pub timeout: Option<std::time::Duration>,
    pub retry: Option<Arc<crate::policy::retry::Policy>>,
    pub breaker: Option<Arc<crate::policy::breaker::Config>>,
    pub caps: Option<crate::policy::concurrency::Caps>,
    pub balancer: LoadBalancer,
    pub outlier: Option<Arc<crate::policy::outlier::Config>>,
    /// Opaque TCP to the Service: closed after this long without bytes (else `FERRY_IDLE_TIMEOUT`).
    pub tcp_idle_timeout: Option<std::time::Duration>,
}

impl Outbound {
    pub fn for_service(spec: Option<&ferry_api::policy::TrafficPolicySpec>) -> Outbound {
        let breaker = spec.and_then(|s| s.circuit_breaker.as_ref());
        Outbound {
            // No request timeout: it would cover the body, cutting long downloads, streams and long polls.
            timeout: spec.and_then(|s| s.timeout.as_ref()).map(|t| t.as_std()),
            retry: Some(Arc::new(match spec.and_then(|s| s.retries.as_ref()) {
                Some(r) => crate::policy::retry::Policy::from_policy(r),
                // One retry when the request cannot have reached the app (idempotent requests only).
                None => crate::policy::retry::Policy::default_for_unconfigured(),
            })),
            breaker: breaker.map(|b| Arc::new(crate::policy::breaker::Config::from_policy(b))),
            caps: Some(crate::policy::concurrency::Caps::from_policy(breaker)),
            balancer: spec.and_then(|s| s.load_balancer).unwrap_or_default(),
            outlier: spec
                .and_then(|s| s.outlier_detection.as_ref())
                .map(|o| Arc::new(crate::policy::outlier::Config::from_policy(o))),
            tcp_idle_timeout: spec.and_then(|s| s.tcp_idle_timeout.as_ref().map(|d| d.as_std())),
        }
    }
}

/// Where a routed request or connection may go.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// This endpoint (the app dialled an endpoint's own address).
    Endpoint(Endpoint),
    /// One of the Service port's endpoints, chosen by the load balancer for each try (never empty).
    Balanced(Arc<[Endpoint]>),
}

/// Where a request or connection goes and under which service it is counted.
#[derive(Clone)]
pub struct Destination {
    pub service: Arc<str>,
    /// The Service port (the load balancer's state is kept per Service port), else the port dialled.
    pub port: u16,
    pub target: Target,
    /// To a meshed endpoint: mTLS with this SNI, to one of these identities.
    pub tls: Option<PeerTls>,
    /// Outbound: what the caller's proxy applies for the destination Service (timeout, retries, breaker, caps).
    pub outbound: Arc<Outbound>,
    /// Inbound: the policy of the port the connection is delivered to (its `service` is this destination's), found
    /// once with the destination, from the same snapshot.
    pub inbound: Option<Arc<InboundPolicy>>,
    /// Outbound to a Service with HTTPRoutes: the backends of the rule the request matched; each try picks one (its
    /// breaker, caps, balancer and endpoints), while this destination's own timeout and retries cover the request.
    pub split: Option<Arc<Split<Destination>>>,
}

impl Destination {
    /// A destination of one fixed address, not meshed.
    pub fn fixed(service: Arc<str>, addr: SocketAddr) -> Destination {
        let target = Target::Endpoint(Endpoint { addr, meshed: false });
        let outbound = Default::default();
        Destination { service, port: addr.port(), target, tls: None, outbound, inbound: None, split: None }
    }

    /// The whole request's timeout: its HTTPRoute rule's `timeouts.request` where set (`0s`: none), else the
    /// Service's TrafficPolicy `timeout`.
    pub fn request_timeout(&self) -> Option<std::time::Duration> {
        match self.split.as_ref().and_then(|s| s.timeouts.request) {
            Some(t) => (!t.is_zero()).then_some(t),
            None => self.outbound.timeout,
        }
    }

    /// Its retries: its HTTPRoute rule's `retry` where set, else the Service's TrafficPolicy `retries`.
    pub fn retry(&self) -> Option<&Arc<crate::policy::retry::Policy>> {
        self.split.as_ref().and_then(|s| s.retry.as_ref()).or(self.outbound.retry.as_ref())
    }

    /// Each try's timeout: its HTTPRoute rule's `timeouts.backendRequest` where set (`0s`: none), else the Service's
    /// `retries.perTryTimeout`.
    pub fn per_try_timeout(&self) -> Option<std::time::Duration> {
        match self.split.as_ref().and_then(|s| s.timeouts.backend_request) {
            Some(t) => (!t.is_zero()).then_some(t),
            None => self.outbound.retry.as_ref()?.per_try_timeout,
        }
    }

    /// The fixed endpoint, when the load balancer has no choice to make.
    pub fn fixed_endpoint(&self) -> Option<Endpoint> {
        match &self.target {
            Target::Endpoint(e) => Some(*e),
            Target::Balanced(_) => None,
        }
    }

    /// The fixed endpoint's address.
    pub fn fixed_addr(&self) -> Option<SocketAddr> {
        self.fixed_endpoint().map(|e| e.addr)
    }

    /// How to reach `endpoint`: mTLS when it is meshed.
    pub fn tls_for(&self, endpoint: &Endpoint) -> Option<&PeerTls> {
        self.tls.as_ref().filter(|_| endpoint.meshed)
    }

    /// The one endpoint, or what the load balancer chooses among.
    pub fn fixed_or_choice(&self) -> Result<Endpoint, Choice> {
        match &self.target {
            Target::Endpoint(e) => Ok(*e),
            Target::Balanced(list) => Err(Choice {
                service: self.service.clone(),
                port: self.port,
                endpoints: list.clone(),
                kind: self.outbound.balancer,
                outlier: self.outbound.outlier.clone(),
            }),
        }
    }
}
