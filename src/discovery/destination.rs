//! What a route resolves to for one connection or request: the Service it is counted under, its endpoint or the
//! endpoints to balance over, mTLS to a meshed endpoint, and the policies that apply (outbound and inbound).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::discovery::snapshot::{Outbound, Target};
use crate::identity::tls::PeerTls;
use crate::policy::authz::InboundPolicy;
use crate::policy::balance::{Choice, Endpoint};
use crate::policy::split::Split;

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
