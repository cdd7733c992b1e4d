//! The endpoint registry: the endpoints proxies register (local mode: each Service a proxy declares in its node
//! metadata, checked against the Service's identities), live while their streams are and retained a while after — a
//! disconnect lingers, and what `endpoints.json` held before a restart stays for the grace period — so that a
//! reconnect does not flap them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use serde::{Deserialize, Serialize};

use super::Xds;
use ferry_api::config::Document;
use ferry_api::identity::Identity;
use ferry_api::protocol::{NODE_INBOUND_PORT, NODE_SERVICE};

/// A proxy whose stream ended keeps its endpoint this long, so a reconnect does not flap it.
pub const DISCONNECT_LINGER: Duration = Duration::from_secs(5);

/// One endpoint a proxy registered: which Service, where (its connection's source IP and its inbound port, or port 0
/// for the bare IP), as whom.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Registration {
    /// `namespace/name`.
    pub service: String,
    pub address: SocketAddr,
    pub identity: Identity,
}

/// Live and retained registrations. Retained ones (from before a restart, or of a proxy that just disconnected)
/// stay until their deadline or until a proxy registers the same Service and address again.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) live: BTreeMap<u64, Vec<Registration>>,
    pub(super) retained: Vec<(Registration, Instant)>,
    pub(super) persisted: Vec<Registration>,
}

impl Registry {
    pub(super) fn current(&self) -> Vec<Registration> {
        let mut all: Vec<Registration> =
            self.live.values().flatten().cloned().chain(self.retained.iter().map(|(r, _)| r.clone())).collect();
        all.sort();
        all.dedup();
        all
    }
    pub(super) fn expire(&mut self, now: Instant) {
        self.retained.retain(|(_, deadline)| *deadline > now);
    }
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.retained.iter().map(|(_, d)| *d).min()
    }
}

/// What a proxy's node metadata asks for (local mode): registration as an endpoint of each of `services` on
/// `inbound_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NodeClaim {
    pub(super) services: Vec<String>,
    pub(super) inbound_port: Option<u16>,
}

impl NodeClaim {
    pub(super) fn of(node: &Node) -> Option<NodeClaim> {
        let fields = &node.metadata.as_ref()?.fields;
        let services: Vec<String> = match fields.get(NODE_SERVICE)?.kind.as_ref()? {
            Kind::StringValue(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
            _ => return None,
        };
        if services.is_empty() {
            return None;
        }
        let inbound_port = match fields.get(NODE_INBOUND_PORT).and_then(|v| v.kind.as_ref()) {
            Some(Kind::NumberValue(n)) if *n >= 1.0 && *n <= 65535.0 && n.fract() == 0.0 => Some(*n as u16),
            Some(Kind::StringValue(s)) => s.parse().ok().filter(|p| *p != 0),
            _ => None,
        };
        Some(NodeClaim { services, inbound_port })
    }
}

impl Xds {
    /// Checks a proxy's claim to serve each of its declared Services and registers `peer_ip:inbound_port` for them;
    /// returns their `namespace/name` keys.
    pub(super) fn register(
        &self,
        id: u64,
        identity: &Identity,
        peer: SocketAddr,
        claim: &NodeClaim,
    ) -> Result<Vec<String>, String> {
        let mut registrations = Vec::new();
        for declared in &claim.services {
            let (ns, name) = match declared.split_once('/') {
                Some((ns, name)) => (ns.to_string(), name.to_string()),
                None => (identity.namespace.clone(), declared.clone()),
            };
            let key = crate::store::Key { kind: "Service".into(), namespace: ns.clone(), name: name.clone() };
            let allowed = match self.store.lock().expect("store lock").get(&key).map(|s| &s.document) {
                Some(Document::Service(svc)) => {
                    ns == identity.namespace && svc.spec.identities.contains(&identity.service_account)
                }
                _ => return Err(format!("Service {ns}/{name} does not exist")),
            };
            if !allowed {
                return Err(format!("Service {ns}/{name} does not list identity {}", identity.spiffe()));
            }
            // Without an inbound port the endpoint is the bare IP: callers dial the service port, interception
            // delivers.
            let address = SocketAddr::new(peer.ip(), claim.inbound_port.unwrap_or(0));
            registrations.push(Registration { service: format!("{ns}/{name}"), address, identity: identity.clone() });
        }
        let services: Vec<String> = registrations.iter().map(|r| r.service.clone()).collect();
        let mut registry = self.registry.lock().expect("registry lock");
        registry
            .retained
            .retain(|(r, _)| !registrations.iter().any(|n| n.service == r.service && n.address == r.address));
        registry.live.insert(id, registrations);
        drop(registry);
        self.changed();
        Ok(services)
    }

    /// The stream ended; its endpoint lingers briefly (a reconnect does not flap it), unless its credential was
    /// revoked.
    pub(super) fn disconnect(&self, id: u64, revoked: bool) {
        // Runs from a Drop, possibly while unwinding: a poisoned lock is still used rather than panicking again.
        self.proxies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.metrics.xds_connected.dec();
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let registered = registry.live.remove(&id);
        let had_registrations = registered.as_ref().is_some_and(|r| !r.is_empty());
        if let Some(registrations) = registered
            && !revoked
        {
            let until = Instant::now() + DISCONNECT_LINGER;
            registry.retained.extend(registrations.into_iter().map(|r| (r, until)));
        }
        drop(registry);
        // Its registrations, and (local mode) the workload of its set of declared Services, may be gone; in
        // Kubernetes mode a proxy leaving changes nothing in the model.
        if had_registrations || self.source.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            self.changed();
        }
    }
}
