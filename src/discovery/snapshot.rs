//! The live config: an immutable snapshot behind `ArcSwap`, filled by a config source, and the pure route decision.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ferry_api::identity::Identity;
use ferry_api::policy::MtlsMode;

pub use crate::discovery::destination::{Destination, Outbound, Target};
use crate::policy::balance::Endpoint;
use crate::policy::split::Split;

use crate::policy::authz::{Authorization, InboundPolicy};
use crate::util::FastMap;
use ferry_api::route::{RouteSet, RouteTable, applicable};
use ferry_api::workload::{DefaultInbound, SelectingService, Workload};
use ferry_api::{Document, PortProtocol, ServicePort, ServiceSpec, split_host_port};
use serde::Serialize;

/// A Service port's route rules, and each rule's resolved split (its backends' and mirrors' destinations, its
/// retry policy), made by the first request it takes and shared by the rest while this snapshot lasts.
pub struct PortRoutes {
    pub table: RouteTable,
    /// By [`ferry_api::route::RuleInfo::index`]: the split, and whether it was made for mesh (mTLS) destinations.
    splits: Vec<std::sync::OnceLock<(bool, Arc<Split<Destination>>)>>,
}

impl std::fmt::Debug for PortRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortRoutes").field("table", &self.table).finish_non_exhaustive()
    }
}

impl PortRoutes {
    fn new(table: RouteTable) -> PortRoutes {
        let splits = (0..table.rules()).map(|_| std::sync::OnceLock::new()).collect();
        PortRoutes { table, splits }
    }

    /// Rule `rule`'s split for `mesh` destinations: the one kept, else `make`'s (kept when it is the first).
    pub fn split(&self, rule: usize, mesh: bool, make: impl Fn() -> Split<Destination>) -> Arc<Split<Destination>> {
        match self.splits.get(rule).map(|slot| slot.get_or_init(|| (mesh, Arc::new(make())))) {
            Some((made_for, split)) if *made_for == mesh => split.clone(),
            _ => Arc::new(make()),
        }
    }
}

/// Everything the data path needs to route, as one immutable value.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub version: u64,
    /// Where it came from: `none` or `file:<path>` (later `xds:<addr>`).
    pub source: String,
    pub services: Vec<Arc<ServiceEntry>>,
    /// TrafficPolicy and AuthorizationPolicy documents, as accepted.
    pub policies: Vec<Document>,
    #[serde(skip)]
    by_host: FastMap<String, Vec<(Option<u16>, usize)>>,
    /// IP-literal addresses (VIPs), for transparent routing by original destination.
    #[serde(skip)]
    by_ip: FastMap<IpAddr, Vec<(Option<u16>, usize)>>,
    /// Endpoint socket addresses (per service port), for transparent traffic addressed to an endpoint.
    #[serde(skip)]
    by_endpoint: FastMap<SocketAddr, (usize, u16, bool)>,
    /// Meshed endpoints' IPs, with a Service listing them: traffic to such an IP on a port no Service declares is
    /// still mTLS to that pod.
    #[serde(skip)]
    meshed_ips: FastMap<IpAddr, usize>,
    /// Service ports declared `protocol: tcp` (looked up once per connection).
    #[serde(skip)]
    opaque_ports: HashSet<u16>,
    /// The mTLS mode of Services whose TrafficPolicy sets none.
    pub default_mtls: MtlsMode,
    /// What this pod serves: the Services selecting it, with the pod ports each selects, and the default inbound
    /// policy of its other ports.
    pub workload: Workload,
    /// The inbound policy of each of the pod's ports, compiled from the workload and the policies.
    #[serde(skip)]
    inbound: Inbound,
    /// Which Service each workload identity serves (the first Service listing it), for the `source` metric label.
    #[serde(skip)]
    by_identity: FastMap<Identity, Arc<str>>,
    /// Each Service by its qualified name (`name.namespace`): route backends are found by name.
    #[serde(skip)]
    by_name: FastMap<Arc<str>, usize>,
    /// This proxy's namespace: it decides which HTTPRoutes apply (GAMMA consumer routes).
    #[serde(skip)]
    namespace: String,
    /// The HTTPRoute route sets held (`<service ns>/<service>/<route ns>`).
    pub route_sets: Vec<String>,
    /// This pod's Service (`name.namespace`, the first its workload has) as a calling proxy names it to a mesh peer
    /// (`ferry-source`), made once per snapshot.
    #[serde(skip)]
    pub source_header: Option<http::HeaderValue>,
    /// The route rules of each Service port that has routes for this proxy, compiled: the Service's qualified name →
    /// port → table. Absent: no route applies; requests go to the Service itself.
    #[serde(skip)]
    routes: FastMap<Arc<str>, FastMap<u16, Arc<PortRoutes>>>,
}

#[derive(Debug, Serialize)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    /// `name.namespace`: the `service` label of metrics and logs.
    pub qualified_name: Arc<str>,
    pub spec: ServiceSpec,
    /// The SPIFFE IDs its `identities` name: a mesh peer serving it must present one of them.
    #[serde(skip)]
    pub identities: Arc<[Identity]>,
    /// What the caller's proxy applies to requests for it (its TrafficPolicy's timeout, retries, breaker, caps).
    #[serde(skip)]
    pub outbound: Arc<Outbound>,
    /// Its endpoints per service port, as the load balancer chooses among them.
    #[serde(skip)]
    by_port: FastMap<u16, Arc<[Endpoint]>>,
    /// The SNI a caller's proxy sends to reach each service port (`tls::sni`), made once per snapshot.
    #[serde(skip)]
    snis: FastMap<u16, Arc<str>>,
    /// The usage clock's tick when a request last routed to it (`on_demand::tick`), shared with the same Service in
    /// the snapshots that follow: an on-demand subscription is released when its Services go unused.
    #[serde(skip)]
    used: Arc<std::sync::atomic::AtomicU64>,
}

impl ServiceEntry {
    /// Marks it used now (a relaxed load, and a store only when the tick moved on).
    pub fn touch(&self) {
        let now = crate::discovery::on_demand::tick();
        if self.used.load(std::sync::atomic::Ordering::Relaxed) != now {
            self.used.store(now, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The `source` label of a caller whose Service is not known (one shared value: no allocation per request).
pub fn unknown_source() -> Arc<str> {
    static UNKNOWN: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

/// Why a request could not be given a destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no service has the address {0}")]
    NoRoute(String),
    #[error("service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
}

/// The decision for one request: which service and port, and where it may go.
#[derive(Debug, Clone)]
pub struct Route {
    pub service: Arc<ServiceEntry>,
    pub port: ServicePort,
    pub target: Target,
}

impl ServiceEntry {
    /// The SNI that names `port` (one of its ports) to a serving proxy.
    pub fn sni(&self, port: &ServicePort) -> Arc<str> {
        let made = || crate::identity::tls::sni(port.target_port.unwrap_or(port.port), &self.name, &self.namespace);
        self.snis.get(&port.port).cloned().unwrap_or_else(|| made().into())
    }

    /// Every endpoint address for a request to `port`.
    pub fn endpoints(&self, port: u16) -> impl Iterator<Item = SocketAddr> + '_ {
        self.spec.endpoints.iter().filter_map(move |e| e.socket_addr(port))
    }

    /// The endpoints a request to `port` is balanced over (`None`: it has none).
    fn balanced(&self, port: u16) -> Option<Target> {
        self.by_port.get(&port).filter(|list| !list.is_empty()).map(|list| Target::Balanced(list.clone()))
    }
}

impl Snapshot {
    /// Builds a snapshot from accepted documents. Besides each Service's `addresses`, `name.namespace` and
    /// `name.namespace.svc.cluster.local` always match, and the bare `name` matches in the proxy's own namespace.
    pub fn build(
        version: u64,
        source: String,
        documents: Vec<Document>,
        local_namespace: &str,
        default_mtls: MtlsMode,
        workload: Workload,
    ) -> Self {
        let mut services = Vec::new();
        let mut by_host: FastMap<String, Vec<(Option<u16>, usize)>> = FastMap::default();
        let mut by_ip: FastMap<IpAddr, Vec<(Option<u16>, usize)>> = FastMap::default();
        let mut by_endpoint = FastMap::default();
        let mut meshed_ips = FastMap::default();
        let mut policies = Vec::new();
        let mut opaque_ports = HashSet::new();
        let mut implicit = Vec::new();
        // What the caller's proxy applies per destination, from each Service's TrafficPolicy (compiled once here).
        let unconfigured = Arc::new(Outbound::for_service(None));
        let outbound: FastMap<String, Arc<Outbound>> = documents
            .iter()
            .filter_map(|d| match d {
                Document::TrafficPolicy(p) => {
                    let target = format!("{}/{}", p.metadata.namespace, p.spec.target_ref.name);
                    Some((target, Arc::new(Outbound::for_service(Some(&p.spec)))))
                }
                _ => None,
            })
            .collect();
        for doc in documents {
            let svc = match doc {
                Document::Service(svc) => svc,
                // Policies are validated and shown by /config_dump; their enforcement lands with the policy layers.
                policy => {
                    policies.push(policy);
                    continue;
                }
            };
            let index = services.len();
            for address in &svc.spec.addresses {
                let (host, port) = split_host_port(address);
                let port = port.and_then(|p| p.parse().ok());
                by_host.entry(normalize_host(host)).or_default().push((port, index));
                if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                    by_ip.entry(ip).or_default().push((port, index));
                }
            }
            opaque_ports.extend(svc.spec.ports.iter().filter(|p| p.protocol == PortProtocol::Tcp).map(|p| p.port));
            for port in &svc.spec.ports {
                for e in &svc.spec.endpoints {
                    if let Some(addr) = e.socket_addr(port.port) {
                        // A Service listing the address with an identity takes it from one listing it without:
                        // another Service cannot make calls to a meshed endpoint plaintext.
                        let meshed = e.identity.is_some();
                        let entry = by_endpoint.entry(addr).or_insert((index, port.port, meshed));
                        if meshed && !entry.2 {
                            *entry = (index, port.port, true);
                        }
                        if meshed {
                            meshed_ips.entry(addr.ip()).or_insert(index);
                        }
                    }
                }
            }
            let (name, ns) = (&svc.metadata.name, &svc.metadata.namespace);
            implicit.push((format!("{name}.{ns}"), index));
            implicit.push((format!("{name}.{ns}.svc.cluster.local"), index));
            if ns == local_namespace {
                implicit.push((name.clone(), index));
            }
            let identities = svc
                .spec
                .identities
                .iter()
                .filter_map(|entry| Identity::of_service_entry(entry, ns).ok())
                .collect::<Vec<_>>()
                .into();
            let sni = |p: &ServicePort| crate::identity::tls::sni(p.target_port.unwrap_or(p.port), name, ns).into();
            let snis = svc.spec.ports.iter().map(|p| (p.port, sni(p))).collect();
            services.push(Arc::new(ServiceEntry {
                identities,
                outbound: outbound.get(&format!("{ns}/{name}")).cloned().unwrap_or_else(|| unconfigured.clone()),
                qualified_name: format!("{name}.{ns}").into(),
                name: svc.metadata.name,
                namespace: svc.metadata.namespace,
                by_port: svc
                    .spec
                    .ports
                    .iter()
                    .map(|p| {
                        let list = svc.spec.endpoints.iter().filter_map(|e| {
                            Some(Endpoint { addr: e.socket_addr(p.port)?, meshed: e.identity.is_some() })
                        });
                        (p.port, list.collect())
                    })
                    .collect(),
                snis,
                spec: svc.spec,
                used: Arc::new(crate::discovery::on_demand::tick().into()),
            }));
        }
        for (host, index) in implicit {
            by_host.entry(host).or_insert_with(|| vec![(None, index)]);
        }
        let mut traffic = FastMap::default();
        let mut authz_docs: FastMap<String, Vec<&ferry_api::policy::AuthorizationPolicy>> = FastMap::default();
        for doc in &policies {
            match doc {
                Document::TrafficPolicy(p) => {
                    traffic.insert(format!("{}/{}", p.metadata.namespace, p.spec.target_ref.name), &p.spec);
                }
                Document::AuthorizationPolicy(p) => {
                    let target = format!("{}/{}", p.metadata.namespace, p.spec.target_ref.name);
                    authz_docs.entry(target).or_default().push(p);
                }
                Document::Service(_)
                | Document::HttpRoute(_)
                | Document::GrpcRoute(_)
                | Document::ReferenceGrant(_) => {}
            }
        }
        let inbound = Inbound::compile(&workload, &traffic, &authz_docs, default_mtls);
        let source_header = workload
            .services
            .first()
            .and_then(|s| http::HeaderValue::from_str(&format!("{}.{}", s.name, s.namespace)).ok());
        let mut by_identity = FastMap::default();
        let by_name = services.iter().enumerate().map(|(i, s)| (s.qualified_name.clone(), i)).collect();
        for svc in &services {
            for id in svc.identities.iter() {
                by_identity.entry(id.clone()).or_insert_with(|| svc.qualified_name.clone());
            }
        }
        Snapshot {
            version,
            source,
            services,
            policies,
            by_host,
            by_ip,
            by_endpoint,
            meshed_ips,
            opaque_ports,
            default_mtls,
            workload,
            inbound,
            by_identity,
            by_name,
            namespace: local_namespace.to_string(),
            route_sets: Vec::new(),
            source_header,
            routes: FastMap::default(),
        }
    }

    /// Takes the HTTPRoute route sets: for each Service port they attach to, the rules that apply to callers in this
    /// proxy's namespace (its consumer routes, else the producer routes), compiled once.
    pub fn with_routes(mut self, sets: Vec<RouteSet>) -> Self {
        self.route_sets = sets.iter().map(RouteSet::name).collect();
        let mut by_service: FastMap<(String, String), Vec<RouteSet>> = FastMap::default();
        for set in sets {
            by_service.entry((set.service_namespace.clone(), set.service.clone())).or_default().push(set);
        }
        for (key, sets) in by_service {
            let Some(service) = self.services.iter().find(|s| s.namespace == key.0 && s.name == key.1) else {
                continue;
            };
            let mut ports = FastMap::default();
            for port in service.spec.ports.iter().map(|p| p.port) {
                let routes = applicable(&sets, &self.namespace, port);
                if !routes.is_empty() {
                    ports.insert(port, Arc::new(PortRoutes::new(RouteTable::build(&routes))));
                }
            }
            if !ports.is_empty() {
                self.routes.insert(service.qualified_name.clone(), ports);
            }
        }
        self
    }

    /// Keeps the usage stamps of the Services `previous` also held (call right after `build`).
    pub fn carry_usage(mut self, previous: &Snapshot) -> Self {
        for entry in &mut self.services {
            let held = previous.by_name.get(&entry.qualified_name).and_then(|i| previous.services.get(*i));
            if let (Some(held), Some(entry)) = (held, Arc::get_mut(entry)) {
                entry.used = held.used.clone();
            }
        }
        self
    }

    /// The usage tick of the Service `namespace/name` (`None`: not held).
    pub fn service_used(&self, name: &str) -> Option<u64> {
        let (namespace, short) = name.split_once('/')?;
        let i = self.by_name.get(&*format!("{short}.{namespace}"))?;
        Some(self.services[*i].used.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Pure route decision for a route's backend: port `port` of the Service `namespace/name`.
    pub fn route_to(&self, namespace: &str, name: &str, port: u16) -> Result<Route, RouteError> {
        let qualified = format!("{name}.{namespace}");
        let found = self.by_name.get(&*qualified).and_then(|i| self.services.get(*i));
        // A name with a dot is not a DNS label: `a.b` + `c` must not find `a` + `b.c`.
        let service = found
            .filter(|s| s.namespace == namespace && s.name == name)
            .ok_or_else(|| RouteError::NoRoute(qualified.clone()))?;
        let service_port = service
            .spec
            .ports
            .iter()
            .find(|p| p.port == port)
            .cloned()
            .ok_or_else(|| RouteError::NoPort { service: qualified.clone(), port })?;
        let target = service.balanced(port).ok_or(RouteError::NoEndpoints(qualified))?;
        Ok(Route { service: service.clone(), port: service_port, target })
    }

    /// The route rules for requests to `port` of `service`, when routes attach to it for this proxy (looked up on
    /// every HTTP request: no allocation).
    pub fn route_table(&self, service: &ServiceEntry, port: u16) -> Option<&Arc<PortRoutes>> {
        self.routes.get(&*service.qualified_name)?.get(&port)
    }

    /// The Service a workload identity serves (`unknown` when no Service lists it), for metrics.
    pub fn service_of(&self, identity: &Identity) -> Arc<str> {
        self.by_identity.get(identity).cloned().unwrap_or_else(unknown_source)
    }

    /// Pure route decision for an authority (`host`, `host:port`, `[v6]:port`); a missing or empty port means 80
    /// (RFC 3986 §3.2.3), and a port is digits only.
    pub fn route(&self, authority: &str) -> Result<Route, RouteError> {
        let (host, port) = split_host_port(authority);
        let port: u16 = match port {
            None | Some("") => 80,
            Some(p) => ferry_api::port_number(p).ok_or_else(|| RouteError::NoRoute(authority.to_string()))?,
        };
        let candidates =
            self.by_host.get(&normalize_host(host)).ok_or_else(|| RouteError::NoRoute(authority.to_string()))?;
        let index = candidates
            .iter()
            .find(|(p, _)| *p == Some(port))
            .or_else(|| candidates.iter().find(|(p, _)| p.is_none()))
            .map(|(_, i)| *i)
            .ok_or_else(|| RouteError::NoRoute(authority.to_string()))?;
        let service = &self.services[index];
        let service_port = service
            .spec
            .ports
            .iter()
            .find(|p| p.port == port)
            .or_else(|| candidates.iter().any(|(p, _)| *p == Some(port)).then(|| &service.spec.ports[0]))
            .cloned()
            .ok_or_else(|| RouteError::NoPort { service: service.qualified_name.to_string(), port })?;
        let target = service
            .balanced(service_port.port)
            .ok_or_else(|| RouteError::NoEndpoints(service.qualified_name.to_string()))?;
        Ok(Route { service: service.clone(), port: service_port, target })
    }

    /// Pure route decision for intercepted traffic by its original destination: a Service VIP (`addresses` holding
    /// an IP, with that port or one of the Service's ports) is balanced over the Service's endpoints; an endpoint's
    /// own address keeps that endpoint (the app chose it) under its Service. `None`: no Service claims it.
    pub fn route_original(&self, original: SocketAddr) -> Option<Route> {
        if let Some(candidates) = self.by_ip.get(&original.ip()) {
            let port = original.port();
            let found = candidates.iter().find(|(p, _)| *p == Some(port)).or_else(|| {
                candidates
                    .iter()
                    .find(|(p, i)| p.is_none() && self.services[*i].spec.ports.iter().any(|sp| sp.port == port))
            });
            if let Some((_, index)) = found {
                let service = &self.services[*index];
                let service_port =
                    service.spec.ports.iter().find(|p| p.port == port).unwrap_or(&service.spec.ports[0]).clone();
                if let Some(target) = service.balanced(service_port.port) {
                    return Some(Route { service: service.clone(), port: service_port, target });
                }
            }
        }
        if let Some((index, port, meshed)) = self.by_endpoint.get(&original) {
            let service = &self.services[*index];
            let service_port = service.spec.ports.iter().find(|p| p.port == *port)?.clone();
            let target = Target::Endpoint(Endpoint { addr: original, meshed: *meshed });
            return Some(Route { service: service.clone(), port: service_port, target });
        }
        // A meshed pod's own address on a port no Service declares (a metrics or debug port): mTLS to that pod, with
        // the port named in the SNI; the pod's proxy applies that port's policy.
        let index = self.meshed_ips.get(&original.ip())?;
        let service = &self.services[*index];
        let port =
            ServicePort { port: original.port(), protocol: PortProtocol::Detected, name: None, target_port: None };
        let target = Target::Endpoint(Endpoint { addr: original, meshed: true });
        Some(Route { service: service.clone(), port, target })
    }

    /// What the inbound side enforces on the pod port `port`: the policy of the Services selecting it, else the
    /// default inbound policy. `None` (an explicit connection with no port to go by, local mode's one app address):
    /// every selecting Service's at once, so that no caller gets a laxer Service's policy by how it connects.
    pub fn inbound_policy(&self, port: Option<u16>) -> &Arc<InboundPolicy> {
        match port {
            Some(port) => self.inbound.by_port.get(&port).unwrap_or(&self.inbound.unselected),
            None => &self.inbound.all,
        }
    }

    /// The pod ports some Service selects.
    pub fn selected_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.inbound.by_port.keys().copied()
    }

    /// Whether a port of a known service is declared opaque (`protocol: tcp`).
    pub fn is_opaque_port(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
    }
}

/// The `service` label of inbound traffic on ports no Service selects.
pub const UNSELECTED_SERVICE: &str = "unselected";

/// The inbound policies of one pod's ports.
#[derive(Debug)]
struct Inbound {
    by_port: FastMap<u16, Arc<InboundPolicy>>,
    all: Arc<InboundPolicy>,
    unselected: Arc<InboundPolicy>,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound::compile(&Workload::default(), &FastMap::default(), &FastMap::default(), MtlsMode::Permissive)
    }
}

impl Inbound {
    /// Per port, from every Service selecting it (`traffic`: TrafficPolicies by `namespace/name` of their Service):
    /// the strictest mTLS mode (a Service without one has the mesh's), the union of their AuthorizationPolicies (a
    /// deny default from any of them denies), each one's rate limit, the shortest TCP idle timeout, opaque when they
    /// disagree on the protocol (or say `tcp`). Ports no Service selects: the mesh's mTLS mode and the workload's
    /// default inbound policy.
    fn compile(
        workload: &Workload,
        traffic: &FastMap<String, &ferry_api::policy::TrafficPolicySpec>,
        authz: &FastMap<String, Vec<&ferry_api::policy::AuthorizationPolicy>>,
        default_mtls: MtlsMode,
    ) -> Inbound {
        let policy = |services: &[&SelectingService], protocols: &[PortProtocol]| -> Arc<InboundPolicy> {
            let keys: Vec<String> = services.iter().map(|s| s.key()).collect();
            let specs: Vec<&ferry_api::policy::TrafficPolicySpec> =
                keys.iter().filter_map(|k| traffic.get(k).copied()).collect();
            let mode = keys
                .iter()
                .map(|k| traffic.get(k).and_then(|t| t.mtls).unwrap_or(default_mtls))
                .max()
                .unwrap_or(default_mtls);
            let docs: Vec<&ferry_api::policy::AuthorizationPolicy> =
                keys.iter().flat_map(|k| authz.get(k).into_iter().flatten().copied()).collect();
            let label = |s: &SelectingService| -> Arc<str> { format!("{}.{}", s.name, s.namespace).into() };
            let first = protocols.first().map(|p| p.handled_as());
            let opaque = protocols.iter().any(|p| Some(p.handled_as()) != first || *p == PortProtocol::Tcp);
            Arc::new(InboundPolicy {
                mode,
                authorization: (!docs.is_empty()).then(|| Arc::new(Authorization::compile(&docs))),
                rate_limits: services
                    .iter()
                    .filter_map(|s| traffic.get(&s.key()).and_then(|t| t.rate_limit.clone()).map(|l| (label(s), l)))
                    .collect(),
                tcp_idle_timeout: specs.iter().filter_map(|t| t.tcp_idle_timeout.as_ref().map(|d| d.as_std())).min(),
                service: services.first().map_or_else(|| UNSELECTED_SERVICE.into(), |s| label(s)),
                opaque,
                declared_http: !opaque && protocols.iter().any(PortProtocol::is_declared_http),
            })
        };
        let mut ports: FastMap<u16, (Vec<&SelectingService>, Vec<PortProtocol>)> = FastMap::default();
        for service in &workload.services {
            for (port, protocol) in &service.ports {
                let entry = ports.entry(*port).or_default();
                if !entry.0.contains(&service) {
                    entry.0.push(service);
                }
                entry.1.push(*protocol);
            }
        }
        let every: Vec<&SelectingService> = workload.services.iter().collect();
        let unselected = Arc::new(InboundPolicy {
            mode: default_mtls,
            authorization: Authorization::for_unselected(workload.default_inbound).map(Arc::new),
            rate_limits: Arc::new([]),
            tcp_idle_timeout: None,
            service: UNSELECTED_SERVICE.into(),
            opaque: false,
            declared_http: false,
        });
        Inbound {
            by_port: ports
                .into_iter()
                .map(|(port, (services, protocols))| (port, policy(&services, &protocols)))
                .collect(),
            all: if every.is_empty() { unselected.clone() } else { policy(&every, &[]) },
            unselected,
        }
    }
}

/// The workload of a proxy that declares its Services (`FERRY_SERVICE`, file source): those of `documents` it names,
/// each selecting its ports' target ports; other ports are allowed, as before there were default inbound policies.
pub fn declared_workload(declared: &[(String, String)], documents: &[Document]) -> Workload {
    let services = documents
        .iter()
        .filter_map(|d| match d {
            Document::Service(svc)
                if declared.iter().any(|(ns, n)| *ns == svc.metadata.namespace && *n == svc.metadata.name) =>
            {
                Some(SelectingService {
                    namespace: svc.metadata.namespace.clone(),
                    name: svc.metadata.name.clone(),
                    ports: svc.spec.ports.iter().map(|p| (p.target_port.unwrap_or(p.port), p.protocol)).collect(),
                })
            }
            _ => None,
        })
        .collect();
    Workload::new(services, DefaultInbound::Allow)
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Holds the live snapshot; sources store into it, the data path only loads.
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    applied: tokio::sync::watch::Sender<bool>,
    /// Set when the xDS source subscribes on demand: the data path asks it about destinations the snapshot lacks.
    pub on_demand: std::sync::OnceLock<Arc<crate::discovery::on_demand::OnDemand>>,
}

impl ConfigStore {
    pub fn new() -> Self {
        ConfigStore {
            current: ArcSwap::from_pointee(Snapshot { source: "none".into(), ..Default::default() }),
            applied: tokio::sync::watch::Sender::new(false),
            on_demand: std::sync::OnceLock::new(),
        }
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn store(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.applied.send_replace(true);
    }

    /// Whether a config source has delivered a config at least once.
    pub fn applied(&self) -> bool {
        *self.applied.borrow()
    }

    /// Until a config source has delivered a config, at most `limit`; whether one has.
    pub async fn wait_applied(&self, limit: std::time::Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(limit, applied.wait_for(|a| *a)).await.is_ok_and(|r| r.is_ok())
    }
}

impl Default for ConfigStore {
    fn default() -> Self {
        Self::new()
    }
}

impl From<RouteError> for crate::errors::ProxyError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NoEndpoints(_) => crate::errors::ProxyError::NoHealthyEndpoints(e.to_string()),
            RouteError::NoRoute(_) | RouteError::NoPort { .. } => crate::errors::ProxyError::NoRoute(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let yaml = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: shop}
spec:
  ports: [{port: 8080}, {port: 9090, protocol: grpc}]
  addresses: [payments.example.com, "10.96.0.7", "pay.internal:80"]
  endpoints: [{address: "127.0.0.1:18001"}, {address: "127.0.0.2"}]
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: default}
spec: {ports: [{port: 80}, {port: 5432, protocol: tcp}]}
"#;
        let docs = ferry_api::parse_documents(yaml).unwrap();
        Snapshot::build(1, "test".into(), docs, "default", MtlsMode::Permissive, Workload::default())
    }

    #[test]
    fn route_table() {
        let s = snapshot();
        // (authority, Ok((service, service port)) or the error)
        type Case<'a> = (&'a str, Result<(&'a str, u16), RouteError>);
        let cases: &[Case] = &[
            ("payments.example.com:8080", Ok(("payments", 8080))),
            ("PAYMENTS.example.com.:9090", Ok(("payments", 9090))),
            ("payments.shop:8080", Ok(("payments", 8080))),
            ("payments.shop.svc.cluster.local:8080", Ok(("payments", 8080))),
            ("10.96.0.7:8080", Ok(("payments", 8080))),
            ("pay.internal", Ok(("payments", 8080))), // an address with a port maps to the first service port
            ("payments.shop", Err(RouteError::NoPort { service: "payments.shop".into(), port: 80 })),
            ("payments:8080", Err(RouteError::NoRoute("payments:8080".into()))), // other namespace: no bare name
            ("orders", Err(RouteError::NoEndpoints("orders.default".into()))),
            ("unknown.example:80", Err(RouteError::NoRoute("unknown.example:80".into()))),
            ("payments.shop:http", Err(RouteError::NoRoute("payments.shop:http".into()))),
            // Found by `route_reads_authorities_as_http_does`: an empty port is the default one (RFC 3986), and a
            // port is digits only (Rust's `u16::from_str` takes a leading `+`).
            ("pay.internal:", Ok(("payments", 8080))),
            ("payments.shop:+8080", Err(RouteError::NoRoute("payments.shop:+8080".into()))),
        ];
        for (authority, want) in cases {
            let got = s.route(authority).map(|r| (r.service.name.clone(), r.port.port));
            let want = want.clone().map(|(n, p)| (n.to_string(), p));
            assert_eq!(got, want, "{authority}");
        }
    }

    /// What routing by authority should answer, read with `http`'s `Authority` (what hyper hands over) as the
    /// reference: its host (case-insensitive, a trailing dot ignored) and port (none: 80), and no userinfo (RFC 9110
    /// §4.2.4: an error in an http URI).
    fn reference_route(authority: &str) -> Option<(String, u16)> {
        let parsed: http::uri::Authority = authority.parse().ok()?;
        if parsed.as_str().contains('@') {
            return None;
        }
        // RFC 3986 §3.2.3: `port = *DIGIT`, an empty one meaning the scheme's default.
        let port = match parsed.as_str().strip_prefix(parsed.host())? {
            "" | ":" => 80,
            p => p.strip_prefix(':').filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?.parse::<u16>().ok()?,
        };
        let host = parsed.host().to_ascii_lowercase();
        match (host.trim_end_matches('.'), port) {
            ("pay.internal", 80) => Some(("payments".into(), 8080)),
            (
                "payments.example.com" | "payments.shop" | "payments.shop.svc.cluster.local" | "10.96.0.7",
                8080 | 9090,
            ) => Some(("payments".into(), port)),
            _ => None,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// Routing by authority agrees with `http`'s reading of any authority it accepts.
        #[test]
        fn route_reads_authorities_as_http_does(
            userinfo in "(|user@|a:b@|@)",
            host in proptest::sample::select(vec![
                "payments.example.com", "PAYMENTS.Example.COM.", "payments.shop", "payments.shop.svc.cluster.local",
                "10.96.0.7", "pay.internal", "pay.internal.", "orders", "unknown", "payments", "[::1]", "[fe80::1%25eth0]",
                "10.96.0.7.", "payments.shop..", "",
            ]),
            port in "(|:|:8080|:08080|:9090|:80|:080|:65536|:99999999999|:+80|:-1|:0|: 80|:8080:80|:http)",
            junk in "(|[ /#?\\\\]|x)",
        ) {
            let authority = format!("{userinfo}{host}{port}{junk}");
            static SNAPSHOT: std::sync::LazyLock<Snapshot> = std::sync::LazyLock::new(snapshot);
            let got = SNAPSHOT.route(&authority).ok().map(|r| (r.service.name.clone(), r.port.port));
            let want = reference_route(&authority);
            // Where http refuses an authority hyper never hands it over: only what http accepts is compared.
            if authority.parse::<http::uri::Authority>().is_ok() {
                proptest::prop_assert_eq!(got, want, "{:?}", authority);
            }
        }
    }

    /// The endpoints a route may go to, comma-separated.
    fn endpoints(route: &Route) -> String {
        match &route.target {
            Target::Endpoint(e) => e.addr.to_string(),
            Target::Balanced(list) => list.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>().join(","),
        }
    }

    #[test]
    fn route_by_original_destination_table() {
        let s = snapshot();
        // (original destination, Some((service, endpoint)) when a Service claims it)
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("10.96.0.7:8080", Some(("payments", "127.0.0.1:18001,127.0.0.2:8080"))), // VIP + a service port: balanced
            ("10.96.0.7:9090", Some(("payments", "127.0.0.1:18001,127.0.0.2:9090"))),
            ("10.96.0.7:22", None), // VIP, but not a service port
            ("127.0.0.1:18001", Some(("payments", "127.0.0.1:18001"))), // an endpoint: kept
            ("127.0.0.2:8080", Some(("payments", "127.0.0.2:8080"))),
            ("127.0.0.2:9090", Some(("payments", "127.0.0.2:9090"))),
            ("127.0.0.2:7000", None),
            ("192.0.2.1:80", None), // nobody's: passed through unchanged
        ];
        for (original, want) in cases {
            let got = s.route_original(original.parse().unwrap()).map(|r| (r.service.name.clone(), endpoints(&r)));
            assert_eq!(got, want.map(|(n, e)| (n.to_string(), e.to_string())), "{original}");
        }
    }

    #[test]
    fn endpoints_take_the_service_port() {
        let s = snapshot();
        assert_eq!(endpoints(&s.route("payments.shop:8080").unwrap()), "127.0.0.1:18001,127.0.0.2:8080");
        assert_eq!(endpoints(&s.route("payments.shop:9090").unwrap()), "127.0.0.1:18001,127.0.0.2:9090");
        assert!(s.is_opaque_port(5432));
        assert!(!s.is_opaque_port(80));
    }

    #[test]
    fn inbound_policy_per_port_table() {
        let yaml = r#"
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: strict, namespace: shop}
spec: {targetRef: {kind: Service, name: strict}, mtls: strict, rateLimit: {requestsPerSecond: 5, burst: 5}}
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: lax, namespace: shop}
spec: {targetRef: {kind: Service, name: lax}, rateLimit: {requestsPerSecond: 50, burst: 50}}
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: strict, namespace: shop}
spec: {targetRef: {kind: Service, name: strict}, defaultAction: deny, allow: [{from: {namespaces: [shop]}}]}
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: lax, namespace: shop}
spec: {targetRef: {kind: Service, name: lax}, defaultAction: allow}
"#;
        let service = |name: &str, ports: &[(u16, PortProtocol)]| SelectingService {
            namespace: "shop".into(),
            name: name.into(),
            ports: ports.to_vec(),
        };
        let workload = Workload::new(
            vec![
                // `strict` and `lax` both select 8080; `lax` alone selects 9090 (and says grpc where `other` says
                // tcp: the port is opaque); `other` has no policies.
                // 6060: one Service declares http, the other nothing (detected): HTTP, not opaque.
                service("strict", &[(8080, PortProtocol::Http), (6060, PortProtocol::Detected)]),
                service("lax", &[(8080, PortProtocol::Http), (9090, PortProtocol::Grpc), (6060, PortProtocol::Http)]),
                service("other", &[(9090, PortProtocol::Tcp), (7070, PortProtocol::Detected)]),
            ],
            DefaultInbound::Deny,
        );
        let docs = ferry_api::parse_documents(yaml).unwrap();
        let s = Snapshot::build(1, "test".into(), docs, "shop", MtlsMode::Permissive, workload);
        let (web, stranger) = (Identity::new("shop", "web"), Identity::new("elsewhere", "x"));
        fn allowed(p: &InboundPolicy, peer: Option<&Identity>, port: u16) -> bool {
            let call = crate::policy::authz::Call { peer, method: None, path: None, port };
            crate::policy::authz::decide(p.mode, p.authorization.as_deref(), &call)
                == crate::policy::authz::Decision::Allow
        }
        // (port, label, mode, rate-limited Services, opaque, shop caller allowed, other namespace allowed,
        // plaintext allowed)
        type Row<'a> = (Option<u16>, &'a str, MtlsMode, &'a [&'a str], bool, bool, bool, bool);
        let rows: &[Row] = &[
            // Both Services: the stricter mode and the deny default win; a token from each bucket.
            (Some(8080), "lax.shop", MtlsMode::Strict, &["lax.shop", "strict.shop"], false, true, false, false),
            (Some(9090), "lax.shop", MtlsMode::Permissive, &["lax.shop"], true, true, true, true),
            (Some(7070), "other.shop", MtlsMode::Permissive, &[], false, true, true, true),
            // No Service selects it: the default inbound policy (deny) and the mesh's mode.
            (Some(22), UNSELECTED_SERVICE, MtlsMode::Permissive, &[], false, false, false, false),
            // No port to go by (one app address): every Service at once.
            (None, "lax.shop", MtlsMode::Strict, &["lax.shop", "strict.shop"], false, true, false, false),
        ];
        for (port, label, mode, limited, opaque, shop, elsewhere, plaintext) in rows {
            let p = s.inbound_policy(*port);
            let what = format!("{port:?}");
            assert_eq!((&*p.service, p.mode, p.opaque), (*label, *mode, *opaque), "{what}");
            let mut names: Vec<&str> = p.rate_limits.iter().map(|(n, _)| &**n).collect();
            names.sort();
            assert_eq!(names, *limited, "{what}");
            let n = port.unwrap_or(8080);
            assert_eq!(allowed(p, Some(&web), n), *shop, "{what}: a shop caller");
            assert_eq!(allowed(p, Some(&stranger), n), *elsewhere, "{what}: another namespace");
            assert_eq!(allowed(p, None, n), *plaintext, "{what}: plaintext");
        }
        // Declared HTTP (no opaque stream may reach it): 8080 and 6060; 7070 is only detected, 9090 opaque.
        for (port, declared) in [(8080, true), (6060, true), (7070, false), (9090, false), (22, false)] {
            let p = s.inbound_policy(Some(port));
            assert_eq!(p.declared_http, declared, "{port}");
            assert!(port == 9090 || !p.opaque, "{port}");
        }
        let mut ports: Vec<u16> = s.selected_ports().collect();
        ports.sort();
        assert_eq!(ports, [6060, 7070, 8080, 9090]);
        // mesh-only admits any mesh identity and no plaintext; allow admits everyone.
        for (default, mesh, plain) in [(DefaultInbound::MeshOnly, true, false), (DefaultInbound::Allow, true, true)] {
            let s =
                Snapshot::build(1, "t".into(), vec![], "shop", MtlsMode::Permissive, Workload::new(vec![], default));
            let p = s.inbound_policy(Some(22));
            assert_eq!((allowed(p, Some(&stranger), 22), allowed(p, None, 22)), (mesh, plain), "{default}");
        }
    }

    #[test]
    fn an_endpoint_listed_with_an_identity_anywhere_stays_meshed() {
        // `grab` lists the address first, without an identity; `api` lists it as a meshed endpoint.
        let yaml = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: grab, namespace: evil}
spec: {ports: [{port: 8080}], endpoints: [{address: "10.1.0.5"}]}
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: api, namespace: shop}
spec: {ports: [{port: 8080}], identities: [api], endpoints: [{address: "10.1.0.5", identity: api}]}
"#;
        let docs = ferry_api::parse_documents(yaml).unwrap();
        let s = Snapshot::build(1, "t".into(), docs, "shop", MtlsMode::Permissive, Workload::default());
        let route = s.route_original("10.1.0.5:8080".parse().unwrap()).unwrap();
        assert_eq!(route.target, Target::Endpoint(Endpoint { addr: "10.1.0.5:8080".parse().unwrap(), meshed: true }));
        assert_eq!(route.service.name, "api", "the Service that names its identity");
        // Another port of the meshed pod: still mTLS to it, under that Service, naming the port.
        let other = s.route_original("10.1.0.5:9102".parse().unwrap()).unwrap();
        assert_eq!((other.service.name.as_str(), other.port.port), ("api", 9102));
        assert_eq!(other.target, Target::Endpoint(Endpoint { addr: "10.1.0.5:9102".parse().unwrap(), meshed: true }));
    }
}
