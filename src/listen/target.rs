//! Where a connection or request goes: explicit routing by authority, transparent routing by original
//! destination (a Service match or a pass-through), then the Service's HTTPRoutes; the local app inbound; never one
//! of the proxy's own listeners.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;
use tokio::net::TcpStream;

use super::Listeners;
use crate::direction::Direction;
use crate::discovery::destination::Destination;
use crate::discovery::on_demand::Discovered;
use crate::discovery::snapshot::{Route, RouteError, Snapshot};
use crate::errors::ProxyError;
use crate::identity::tls::PeerTls;
use crate::policy::retry::Policy;
use crate::policy::split::{Split, SplitBackend, SplitMirror};
use ferry_api::protocol::Alias;
use ferry_api::route::{Backend, HttpRouteFilter, RequestView};

/// The `service` label of outbound requests that matched no Service in explicit mode.
pub const UNKNOWN_SERVICE: &str = "unknown";
/// The `service` label of intercepted traffic to a destination no Service claims (sent on unchanged).
pub const PASSTHROUGH_SERVICE: &str = "passthrough";

/// How a connection reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Addressed to the listener itself (the app called 127.0.0.1:15001, or a peer proxy called :15006).
    Explicit,
    /// Redirected by `ferry init`'s iptables rules; the original destination is known.
    Transparent,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Explicit => "explicit",
            Mode::Transparent => "transparent",
        }
    }
}

/// What the proxy knows about an accepted connection (before reading from it, and after a mesh TLS handshake).
#[derive(Debug, Clone, Serialize)]
pub struct ConnInfo {
    pub direction: Direction,
    pub mode: Mode,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST`, when the connection was redirected.
    pub original_dst: Option<SocketAddr>,
    /// Inbound mTLS: the peer proxy's verified identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<Arc<ferry_api::identity::Identity>>,
    /// Its SPIFFE ID, formatted once per connection (metrics, `ferry-client-id`).
    #[serde(skip)]
    pub peer_spiffe: Option<Arc<str>>,
    /// Inbound mTLS: the target port the SNI names (it wins over the original destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni_port: Option<u16>,
    /// Inbound mTLS: when the peer's certificate expires (Unix seconds); the connection ends then.
    #[serde(skip)]
    pub peer_not_after: Option<i64>,
    /// What the accepted stream's `ConnIo` reports, for the idle and header timers.
    #[serde(skip)]
    pub activity: Arc<super::io::Activity>,
}

impl ConnInfo {
    /// Reads the original destination: a connection redirected by iptables has one that differs from the listener's
    /// own address. Without conntrack (no iptables rules at all) there is none, and the connection is explicit.
    pub fn of(stream: &TcpStream, peer: SocketAddr, direction: Direction) -> std::io::Result<ConnInfo> {
        let local = stream.local_addr()?;
        let sock = socket2::SockRef::from(stream);
        let original = if local.is_ipv4() { sock.original_dst_v4() } else { sock.original_dst_v6() };
        let original_dst = original.ok().and_then(|a| a.as_socket()).filter(|o| *o != local);
        let mode = if original_dst.is_some() { Mode::Transparent } else { Mode::Explicit };
        Ok(ConnInfo {
            direction,
            mode,
            peer,
            local,
            original_dst,
            peer_identity: None,
            peer_spiffe: None,
            sni_port: None,
            peer_not_after: None,
            activity: Default::default(),
        })
    }

    /// How long until the mesh peer's certificate expires (a connection must not outlive it).
    pub fn peer_expires_in(&self) -> Option<std::time::Duration> {
        let now = ferry_api::identity::unix_now();
        self.peer_not_after.map(|t| std::time::Duration::from_secs(t.saturating_sub(now).max(0) as u64))
    }
}

/// A hostname a Service address can be (`ferry_api::config::is_hostname`), short enough that a bare name with the
/// namespace appended stays within the control plane's name limit (190 bytes leave room for it).
fn is_dns_name(host: &str) -> bool {
    host.len() <= 190 && ferry_api::config::is_hostname(host)
}

/// A failed decision, with the service label to count it under.
pub type Refusal = (Arc<str>, ProxyError);

impl Listeners {
    /// Asks the control plane about a destination the snapshot lacks (on-demand proxies only) and waits for the
    /// answer, at most `on_demand::FIRST_CALL_WAIT`; the decision that follows reads the snapshot again.
    pub(super) async fn discover(&self, alias: Alias) {
        let Some(od) = self.store.on_demand.get() else { return };
        let result = match od.discover(alias).await {
            Discovered::Found => "found",
            Discovered::Absent { cached: true } => "cached",
            Discovered::Absent { cached: false } => "absent",
            Discovered::Unavailable => "unavailable",
        };
        self.metrics.discovery_lookups.with_label_values(&[result]).inc();
    }

    /// What an explicit request names, to subscribe to: its host, a bare name qualified with this proxy's namespace
    /// (as routing takes it). `None` without on-demand discovery, or for a request not routed by its host.
    pub(super) fn host_alias(&self, conn: &ConnInfo, authority: Option<&str>) -> Option<Alias> {
        self.store.on_demand.get()?;
        if conn.direction != Direction::Outbound || conn.original_dst.is_some() {
            return None;
        }
        match Alias::of_host(ferry_api::config::split_host_port(authority?).0) {
            // Only a DNS name is asked about (the control plane refuses over-long names, and a request's Host must
            // not cost the proxy its stream).
            Alias::Host(host) if !is_dns_name(&host) => None,
            Alias::Host(host) if !host.contains('.') => {
                Some(Alias::Host(format!("{host}.{}", self.settings.namespace)))
            }
            alias => Some(alias),
        }
    }

    /// The destination for a connection (`authority` = None: opaque TCP) or one request on it (`request`: what its
    /// HTTPRoutes match on, when the Service has any).
    pub(super) fn destination(
        &self,
        conn: &ConnInfo,
        authority: Option<&str>,
        request: Option<&RequestView<'_>>,
    ) -> Result<Destination, Refusal> {
        let dest = match (conn.direction, conn.original_dst) {
            (Direction::Outbound, None) => {
                let authority = authority.ok_or_else(|| {
                    let why =
                        "an explicit connection carries no destination for opaque bytes (only HTTP is routed by Host)";
                    (Arc::from(UNKNOWN_SERVICE), ProxyError::NoRoute(why.into()))
                })?;
                let snapshot = self.store.load();
                let route = snapshot.route(authority).map_err(|e| (Arc::from(UNKNOWN_SERVICE), e.into()))?;
                self.routed(&snapshot, route, request)?
            }
            (Direction::Outbound, Some(original)) => {
                let snapshot = self.store.load();
                match snapshot.route_original(original) {
                    Some(route) => self.routed(&snapshot, route, request)?,
                    None if self.store.on_demand.get().is_some_and(|od| od.refuses(original.ip())) => {
                        let why = format!(
                            "{original} is inside the mesh's address ranges and the control plane has not answered \
                             what it is (down or slow): not sent in plaintext"
                        );
                        return Err((Arc::from(UNKNOWN_SERVICE), ProxyError::Undiscovered(why)));
                    }
                    None => Destination::fixed(PASSTHROUGH_SERVICE.into(), original),
                }
            }
            (Direction::Inbound, original) => {
                // The label of a connection refused before its port is settled: the policy of the port it names.
                let port = conn.sni_port.or(original.map(|o| o.port()));
                let label = || self.inbound_policy(port.unwrap_or(0)).service.clone();
                // Redirected inbound traffic is for this pod: an original destination that is not one of its own
                // addresses (a packet routed to the pod for someone else) is never relayed.
                // (The common case, the pod's primary address, is the connection's own local address: no syscall.)
                if let Some(original) = original.filter(|o| o.ip() != conn.local.ip() && !is_local_ip(o.ip())) {
                    let why = format!("inbound traffic for {original}, which is not this pod's address");
                    return Err((label(), ProxyError::NoRoute(why)));
                }
                let addr = match (conn.sni_port, original, self.settings.app_addr) {
                    // Local mode: the one app address.
                    (Some(_), _, Some(app)) => app,
                    // The target port a mesh peer names in its SNI, else the original port, selects the app's port;
                    // the SNI may name only the port the connection was for or one the local Service declares
                    // (never, say, a debug port the app keeps on loopback).
                    // Transparent mode delivers to the pod's own address the caller dialled (the original
                    // destination), as a caller without a mesh would reach the app: what the app binds only on
                    // loopback stays private to the pod.
                    (Some(port), original, None) => {
                        if original.is_none_or(|o| o.port() != port) && !self.local_target_ports().contains(&port) {
                            let why = format!(
                                "the peer's SNI names port {port}, which no Service selecting this pod declares"
                            );
                            return Err((label(), ProxyError::NoRoute(why)));
                        }
                        SocketAddr::new(original.map_or(self.app_ip(), |o| o.ip()), port)
                    }
                    (None, Some(original), None) => original,
                    (None, Some(original), Some(app)) => SocketAddr::new(app.ip(), original.port()),
                    (None, None, _) => self.inbound_target().ok_or_else(|| {
                        (label(), ProxyError::NoRoute("no app address is configured (FERRY_APP_ADDR)".into()))
                    })?,
                };
                let policy = self.inbound_policy(addr.port());
                let mut dest = Destination::fixed(policy.service.clone(), addr);
                dest.inbound = Some(policy);
                dest
            }
        };
        if let Some(addr) = dest.fixed_addr() {
            not_own_listener(&self.own_listeners, addr).map_err(|e| (dest.service.clone(), e))?;
        }
        Ok(dest)
    }

    /// A request to a Service that HTTPRoutes attach to (for this proxy's namespace) goes where the rule it matches
    /// sends it: to its backends, one picked by weight for each try, with that backend's endpoints, identities and
    /// policy, under the Service's own timeout and retries. No rule matching is 404 `route-not-found` (GAMMA); weights
    /// all 0, 500 `backend-not-found`, as is a try that picks an unresolved backend. Without routes, or for opaque
    /// bytes (`request` = None), the Service itself.
    fn routed(
        &self,
        snapshot: &Snapshot,
        route: Route,
        request: Option<&RequestView<'_>>,
    ) -> Result<Destination, Refusal> {
        // In use: an on-demand subscription that brought it stays.
        route.service.touch();
        let Some((request, routes)) = request.zip(snapshot.route_table(&route.service, route.port.port)) else {
            return Ok(self.outbound_destination(&route));
        };
        let parent = route.service.qualified_name.clone();
        let Some((rule, prefix)) = routes.table.select_with_prefix(request) else {
            let why = format!("no HTTPRoute rule for {parent} matches {} {}", request.method, request.path);
            return Err((parent, ProxyError::RouteNotFound(why)));
        };
        // Resolved once per rule and snapshot: its backends' and mirrors' destinations, its retry policy.
        let mut split = routes.split(rule.index, self.mesh(), || self.split(snapshot, &route, rule));
        // A redirect is answered by the proxy (`Listeners::call_stack`): its rule has no backends.
        if split.backends.is_empty() && !rule.filters.iter().any(|f| f.request_redirect.is_some()) {
            let why = format!("HTTPRoute rule {} has no backend with a weight", rule.label);
            return Err((parent, ProxyError::BackendNotFound(why)));
        }
        // What a redirect or rewrite replaces: the `PathPrefix` this request matched (the filters looked at only
        // when the request matched a prefix).
        let rewrites = |f: &HttpRouteFilter| f.request_redirect.is_some() || f.url_rewrite.is_some();
        if let Some(prefix) = prefix.filter(|_| rule.filters.iter().any(rewrites)) {
            split = Arc::new(Split { matched_prefix: Some(prefix.to_string()), ..(*split).clone() });
        }
        Ok(Destination {
            service: parent,
            port: route.port.port,
            target: route.target,
            tls: None,
            outbound: route.service.outbound.clone(),
            inbound: None,
            split: Some(split),
        })
    }

    /// The split of rule `rule` of a route to `route`'s Service, resolved in `snapshot`.
    fn split(&self, snapshot: &Snapshot, route: &Route, rule: &ferry_api::route::RuleInfo) -> Split<Destination> {
        let port = route.port.port;
        let backends: Vec<SplitBackend<Destination>> = rule
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .map(|b| self.split_backend(snapshot, &rule.label, b, port))
            .collect();
        let mirrors = rule
            .mirrors
            .iter()
            .map(|m| {
                let SplitBackend { name, dest, .. } = self.split_backend(snapshot, &rule.label, &m.backend, port);
                let dest = dest.map_err(|(_, why)| why);
                SplitMirror { name, numerator: m.numerator, denominator: m.denominator, dest }
            })
            .collect();
        let retry =
            rule.retry.as_ref().map(|r| Arc::new(Policy::for_route(r, route.service.outbound.retry.as_deref())));
        Split {
            route: rule.label.clone(),
            filters: rule.filters.clone(),
            timeouts: rule.timeouts,
            matched_prefix: None,
            retry,
            backends,
            mirrors,
        }
    }

    /// A weighted backend of HTTPRoute rule `rule`, resolved in `snapshot` (on the request's `port` when it names
    /// none), or the refusal of the tries that pick it.
    fn split_backend(
        &self,
        snapshot: &Snapshot,
        rule: &str,
        backend: &Backend,
        port: u16,
    ) -> SplitBackend<Destination> {
        let weight = backend.weight;
        let unusable = |error: fn(String) -> ProxyError, why: String| (error, format!("HTTPRoute rule {rule}: {why}"));
        let port = backend.port.unwrap_or(port);
        let route = match &backend.unresolved {
            Some(why) => Err(unusable(ProxyError::BackendNotFound, why.clone())),
            None => snapshot.route_to(&backend.namespace, &backend.name, port).map_err(|e| match e {
                RouteError::NoEndpoints(_) => unusable(ProxyError::NoHealthyEndpoints, e.to_string()),
                e => unusable(ProxyError::BackendNotFound, e.to_string()),
            }),
        };
        let filters = backend.filters.clone();
        match route {
            Ok(route) => {
                let dest = Ok(Arc::new(self.outbound_destination(&route)));
                SplitBackend { weight, filters, name: route.service.qualified_name.clone(), dest }
            }
            Err(e) => {
                let name = format!("{}.{}", backend.name, backend.namespace).into();
                SplitBackend { weight, filters, name, dest: Err(e) }
            }
        }
    }

    /// Whether meshed endpoints are reached over mTLS: always with a control plane (before the first certificate
    /// the connection fails with `tls-failed`); without one (file source) there is no identity, so plaintext.
    fn mesh(&self) -> bool {
        self.tls.current().is_some() || self.settings.control.is_some()
    }

    /// An outbound route's destination: mTLS to a meshed endpoint once this proxy holds an identity.
    fn outbound_destination(&self, route: &Route) -> Destination {
        let svc = &route.service;
        let tls = self.mesh().then(|| PeerTls {
            sni: svc.sni(&route.port),
            service: svc.qualified_name.clone(),
            identities: svc.identities.clone(),
        });
        Destination {
            service: svc.qualified_name.clone(),
            port: route.port.port,
            target: route.target.clone(),
            tls,
            outbound: svc.outbound.clone(),
            inbound: None,
            split: None,
        }
    }

    /// The pod ports the Services selecting this pod select (their `targetPort`s).
    fn local_target_ports(&self) -> Vec<u16> {
        self.store.load().selected_ports().collect()
    }

    /// Where inbound traffic goes without an original destination: `FERRY_APP_ADDR`, else the one pod port the
    /// Services selecting this pod select, on localhost.
    pub fn inbound_target(&self) -> Option<SocketAddr> {
        if let Some(addr) = self.settings.app_addr {
            return Some(addr);
        }
        match self.local_target_ports().as_slice() {
            [port] => Some(SocketAddr::new(self.app_ip(), *port)),
            _ => None,
        }
    }

    /// The app's IP when no original destination says it: that of `FERRY_APP_ADDR`, else the pod's own
    /// (`FERRY_POD_IP`, 127.0.0.1 by default), so that an explicit connection to the inbound listener reaches only
    /// what the app serves to other pods, never a listener it keeps on loopback.
    fn app_ip(&self) -> IpAddr {
        self.settings.app_addr.map(|a| a.ip()).unwrap_or(self.settings.pod_ip)
    }
}

/// Refuses to dial one of this proxy's own `listeners` (a loop); a listener on `0.0.0.0`/`::` counts on every local
/// address.
pub(super) fn not_own_listener(listeners: &[SocketAddr], addr: SocketAddr) -> Result<(), ProxyError> {
    let own = listeners.iter().any(|l| {
        l.port() == addr.port() && (l.ip() == addr.ip() || (l.ip().is_unspecified() && is_local_ip(addr.ip())))
    });
    if own {
        let why = format!("refusing to dial {addr}: it is one of this proxy's own listeners (a loop)");
        tracing::warn!("{why}");
        return Err(ProxyError::NoRoute(why));
    }
    Ok(())
}

/// Whether `ip` belongs to this host: loopback, or an address a socket can bind to.
pub(crate) fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::is_dns_name;

    #[test]
    fn only_dns_names_are_looked_up() {
        let long_label = "a".repeat(64);
        let long_name = format!("{}.b", "a.".repeat(95));
        let cases = [
            ("api", true),
            ("api.shop.svc.cluster.local", true),
            ("my-api.shop", true),
            ("", false),
            ("api..shop", false),
            ("api_v2.shop", false),
            ("api shop", false),
            (long_label.as_str(), false),
            (long_name.as_str(), false),
        ];
        for (host, ok) in cases {
            assert_eq!(is_dns_name(host), ok, "{host:?}");
        }
    }
}
