//! The model: everything the control plane serves, per type, at one generation — each resource encoded once and
//! versioned by its content, each Service's endpoints extended by the registrations its identities allow, and what
//! each Workload resource binds its proxy to (the Services selecting it, its pod).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sha2::{Digest, Sha256};

use super::registry::Registration;
use ferry_api::config::{Document, Endpoint};
use ferry_api::hex;
use ferry_api::protocol::{self, Alias, TYPES};
use ferry_api::workload::{PodBinding, SelectingService, WorkloadRecord};

/// One published resource.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) version: Arc<str>,
    /// The xDS `Resource` message (name, version, `Any`), encoded once per generation and shared by every push.
    pub(super) encoded: Bytes,
    /// The `namespace/name` of the Service it is for: an AuthorizationPolicy's (only that Service's proxies get
    /// it), a TrafficPolicy's, a route set's (on-demand proxies get them with the Service).
    pub(super) target: Option<Arc<str>>,
}

impl Entry {
    fn new(name: &str, any: Any, target: Option<Arc<str>>) -> Entry {
        let version = version_of(&any);
        let resource = Resource {
            name: name.to_string(),
            version: version.to_string(),
            resource: Some(any),
            ..Default::default()
        };
        Entry { version, encoded: resource.encode_to_vec().into(), target }
    }
}

/// Indexes in [`TYPES`]: policies, route sets, the trust bundle, and the Workload type (each proxy gets only its own).
pub(super) const SERVICES: usize = 0;
pub(super) const TRAFFIC: usize = 1;
pub(super) const AUTHZ: usize = 2;
pub(super) const ROUTES: usize = 3;
pub(super) const TRUST: usize = 4;
pub(super) const WORKLOAD: usize = 5;

/// What a stream's proxy is bound to in the model: the Services it serves (it gets their AuthorizationPolicies) and,
/// for a pod, the pod's uid and IPs.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Bound {
    pub(super) services: BTreeSet<String>,
    pub(super) pod: Option<PodBinding>,
}

/// The Workload resource name of a local-mode proxy declaring `services` (`namespace/name` each).
pub(super) fn local_workload_name(services: &[String]) -> String {
    let mut sorted = services.to_vec();
    sorted.sort();
    sorted.dedup();
    format!("local/{}", sorted.join(","))
}

/// Everything the control plane serves, per type, at one generation.
#[derive(Debug, Default)]
pub struct Model {
    pub generation: u64,
    pub(super) types: [BTreeMap<Arc<str>, Entry>; protocol::TYPE_COUNT],
    pub(super) bound: BTreeMap<Arc<str>, Bound>,
    pub(super) index: Index,
}

/// What an on-demand proxy's subscriptions resolve through, built with the model.
#[derive(Debug, Default)]
pub(super) struct Index {
    /// Service names by an IP among their `addresses` (a VIP) or an endpoint's IP.
    pub(super) by_ip: HashMap<IpAddr, BTreeSet<Arc<str>>>,
    /// Service names by host: their `addresses`' hosts, `name.namespace`, `name.namespace.svc.cluster.local`.
    pub(super) by_host: HashMap<String, BTreeSet<Arc<str>>>,
    /// Per type, the names of the resources for each Service (`namespace/name`): TrafficPolicies, AuthorizationPolicies
    /// and route sets by their `target`.
    pub(super) by_target: [HashMap<Arc<str>, Vec<Arc<str>>>; protocol::TYPE_COUNT],
    /// The Services each route set sends to (its rules' backends and mirrors).
    pub(super) backends: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// Per type, the raw resources of the overlay (tests only): every proxy subscribed to the type gets them.
    pub(super) overlaid: [Vec<Arc<str>>; protocol::TYPE_COUNT],
}

impl Index {
    /// The Services an alias names (none: the answer is "no such destination").
    pub(super) fn resolve(&self, alias: &Alias) -> Option<&BTreeSet<Arc<str>>> {
        match alias {
            Alias::Ip(ip) => self.by_ip.get(ip),
            Alias::Host(host) => self.by_host.get(host.as_str()),
        }
    }

    /// `services` with everything they depend on: the Services their route sets send to, transitively.
    pub(super) fn closure(&self, services: &mut BTreeSet<Arc<str>>) {
        let mut queue: Vec<Arc<str>> = services.iter().cloned().collect();
        while let Some(service) = queue.pop() {
            for set in self.by_target[ROUTES].get(&service).into_iter().flatten() {
                for backend in self.backends.get(set).into_iter().flatten() {
                    if services.insert(backend.clone()) {
                        queue.push(backend.clone());
                    }
                }
            }
        }
    }

    fn add_service(&mut self, name: &Arc<str>, svc: &ferry_api::config::Service) {
        let (ns, short) = (&svc.metadata.namespace, &svc.metadata.name);
        let implicit = [format!("{short}.{ns}"), format!("{short}.{ns}.svc.cluster.local")];
        for address in &svc.spec.addresses {
            match Alias::of_host(ferry_api::config::split_host_port(address).0) {
                Alias::Ip(ip) => self.by_ip.entry(ip).or_default().insert(name.clone()),
                Alias::Host(host) => self.by_host.entry(host).or_default().insert(name.clone()),
            };
        }
        for host in implicit {
            self.by_host.entry(host).or_default().insert(name.clone());
        }
        // An endpoint's IP, parsed as the proxy dials it (the port does not matter here).
        for ip in svc.spec.endpoints.iter().filter_map(|e| e.socket_addr(0)).map(|a| a.ip()) {
            self.by_ip.entry(ip).or_default().insert(name.clone());
        }
    }
}

pub(super) fn type_index(type_url: &str) -> Option<usize> {
    TYPES.iter().position(|t| *t == type_url)
}

fn version_of(any: &Any) -> Arc<str> {
    hex(&Sha256::digest(&any.value)[..8]).into()
}

impl Model {
    /// The model for `documents`, with each Service's endpoints extended by the registrations its `identities` allow,
    /// and the trust bundle.
    pub fn build(
        generation: u64,
        documents: Vec<Document>,
        registrations: &[Registration],
        mesh: Option<&protocol::Mesh>,
        workloads: &BTreeMap<String, WorkloadRecord>,
    ) -> Model {
        let mut model = Model { generation, ..Default::default() };
        for (name, record) in workloads {
            let any = protocol::encode_workload(&record.workload);
            model.types[WORKLOAD].insert(name.as_str().into(), Entry::new(name, any, None));
            let services = record.workload.services.iter().map(SelectingService::key).collect();
            model.bound.insert(name.as_str().into(), Bound { services, pod: record.pod.clone() });
        }
        if let Some(mesh) = mesh {
            let name = protocol::TRUST_BUNDLE_NAME;
            model.types[TRUST].insert(name.into(), Entry::new(name, protocol::encode_mesh(mesh), None));
        }
        // HTTPRoutes travel as route sets (per Service and route namespace), their backends resolved here.
        for set in ferry_api::config::route_sets(&documents) {
            let name: Arc<str> = set.name().into();
            let target: Arc<str> = format!("{}/{}", set.service_namespace, set.service).into();
            let rules = set.routes.iter().flat_map(|r| &r.rules);
            let mut backends: Vec<Arc<str>> = rules
                .flat_map(|rule| rule.backends.iter().chain(&rule.mirrors))
                .filter(|b| b.unresolved.is_none())
                .map(|b| format!("{}/{}", b.namespace, b.name).into())
                .collect();
            backends.sort();
            backends.dedup();
            model.index.backends.insert(name.clone(), backends);
            model.index.by_target[ROUTES].entry(target.clone()).or_default().push(name.clone());
            let entry = Entry::new(&name, protocol::encode_routes(&set), Some(target));
            model.types[ROUTES].insert(name, entry);
        }
        for mut doc in documents {
            let name = protocol::resource_name(&doc);
            let mut target: Option<Arc<str>> = None;
            match &mut doc {
                Document::Service(svc) => {
                    let mut endpoints: Vec<Endpoint> = registrations
                        .iter()
                        .filter(|r| {
                            r.service == name
                                && r.identity.namespace == svc.metadata.namespace
                                && svc.spec.identities.contains(&r.identity.service_account)
                        })
                        .map(|r| Endpoint {
                            address: match r.address.port() {
                                0 => r.address.ip().to_string(),
                                _ => r.address.to_string(),
                            },
                            identity: Some(r.identity.service_account.clone()),
                        })
                        .collect();
                    endpoints.sort_by(|a, b| a.address.cmp(&b.address));
                    endpoints.dedup_by(|a, b| a.address == b.address);
                    for e in endpoints {
                        if !svc.spec.endpoints.iter().any(|x| x.address == e.address) {
                            svc.spec.endpoints.push(e);
                        }
                    }
                }
                Document::AuthorizationPolicy(p) => {
                    target = Some(format!("{}/{}", p.metadata.namespace, p.spec.target_ref.name).into());
                }
                Document::TrafficPolicy(p) => {
                    target = Some(format!("{}/{}", p.metadata.namespace, p.spec.target_ref.name).into());
                }
                Document::HttpRoute(_) | Document::GrpcRoute(_) | Document::ReferenceGrant(_) => continue,
            }
            let Some(any) = protocol::encode(&doc) else { continue };
            let index = type_index(&any.type_url).expect("every document kind has a type");
            let key: Arc<str> = name.as_str().into();
            if let Document::Service(svc) = &doc {
                model.index.add_service(&key, svc);
            }
            if let Some(target) = &target {
                model.index.by_target[index].entry(target.clone()).or_default().push(key.clone());
            }
            model.types[index].insert(key, Entry::new(&name, any, target));
        }
        model
    }

    /// Puts a raw resource in place of (or beside) the validated ones (the overlay; see
    /// [`Xds::overlay`](super::Xds::overlay)).
    pub(super) fn overlay(&mut self, name: &str, any: Any) {
        if let Some(index) = type_index(&any.type_url) {
            self.index.overlaid[index].push(name.into());
            self.types[index].insert(name.into(), Entry::new(name, any, None));
        }
    }

    pub(super) fn same_content(&self, other: &Model) -> bool {
        self.bound == other.bound
            && self.types.iter().zip(&other.types).all(|(a, b)| {
                a.len() == b.len() && a.iter().zip(b).all(|((n1, e1), (n2, e2))| n1 == n2 && e1.version == e2.version)
            })
    }

    /// Resource counts per type (for logs).
    pub fn counts(&self) -> [usize; protocol::TYPE_COUNT] {
        std::array::from_fn(|i| self.types[i].len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_indexes_name_their_types() {
        let named = [(SERVICES, protocol::SERVICE_TYPE), (TRAFFIC, protocol::TRAFFIC_POLICY_TYPE)];
        let more = [(AUTHZ, protocol::AUTHORIZATION_POLICY_TYPE), (ROUTES, protocol::ROUTE_SET_TYPE)];
        let rest = [(TRUST, protocol::TRUST_BUNDLE_TYPE), (WORKLOAD, protocol::WORKLOAD_TYPE)];
        for (index, url) in named.into_iter().chain(more).chain(rest) {
            assert_eq!(TYPES[index], url);
        }
    }
}
