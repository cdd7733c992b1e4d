//! One stream's delta-xDS protocol, without I/O: what the proxy subscribed to and holds of each type, its ACKs and
//! NACKs, and the pushes due — at most one un-ACKed per type, in an order that never makes a Service live without
//! its policies — each built from the model's shared encodings and framed for the wire.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::Status;

use super::model::{AUTHZ, Bound, Entry, Model, ROUTES, SERVICES, TRAFFIC, TRUST, WORKLOAD, type_index};
use super::status::{Nack, ProxyStatus};
use crate::metrics::ControlMetrics;
use ferry_api::protocol::{Alias, TYPES, short_type};

/// Named subscriptions per type and stream beyond this are refused (a proxy wanting more subscribes with `*`).
pub(super) const MAX_SUBSCRIBED_NAMES: usize = 10_000;
/// The longest resource name or version a request may carry (names are `namespace/name`, versions a generation).
pub(super) const MAX_NAME_BYTES: usize = 512;
/// How much of a NACK's message is kept (in `/status`) and logged.
pub(super) const MAX_NACK_MESSAGE_BYTES: usize = 1024;

/// One response to one proxy: the pre-encoded resources it lacks and the names it must drop.
#[derive(Debug, Clone)]
pub struct Push {
    pub type_url: &'static str,
    pub generation: u64,
    pub nonce: String,
    resources: Vec<Bytes>,
    pub removed: Vec<String>,
}

impl Push {
    /// The `DeltaDiscoveryResponse` as a gRPC frame (flag byte, length, message), built from the shared resource
    /// encodings without decoding or re-encoding them.
    pub fn framed(&self) -> Bytes {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len, string};
        let version = self.generation.to_string();
        let type_url = self.type_url.to_string();
        let len = string::encoded_len(1, &version)
            + self.resources.iter().map(|r| key_len(2) + encoded_len_varint(r.len() as u64) + r.len()).sum::<usize>()
            + string::encoded_len(4, &type_url)
            + string::encoded_len(5, &self.nonce)
            + string::encoded_len_repeated(6, &self.removed);
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        string::encode(1, &version, &mut buf);
        for r in &self.resources {
            encode_key(2, WireType::LengthDelimited, &mut buf);
            encode_varint(r.len() as u64, &mut buf);
            buf.put_slice(r);
        }
        string::encode(4, &type_url, &mut buf);
        string::encode(5, &self.nonce, &mut buf);
        string::encode_repeated(6, &self.removed, &mut buf);
        buf.freeze()
    }
}

/// A push awaiting its answer, and how to take it back from `known` if the proxy NACKs it.
struct Pending {
    nonce: String,
    generation: u64,
    /// Each name the push changed, with the version the proxy held before (`None`: it held none).
    undo: Vec<(Arc<str>, Option<Arc<str>>)>,
    /// The subscribed names it answered: a refused push leaves them to be answered again.
    answering: Vec<String>,
}

/// Per type: what the proxy subscribed to, what it holds, and the push awaiting its ACK.
#[derive(Default)]
pub(super) struct TypeState {
    pub(super) wildcard: bool,
    /// Wildcard only because the first request named nothing (legacy form): naming resources later ends it.
    pub(super) legacy_wildcard: bool,
    names: HashSet<String>,
    /// Names just subscribed: each is answered in the next push, as a resource or (if absent) a removal.
    unanswered: HashSet<String>,
    /// name → version the proxy holds (or was last sent).
    known: HashMap<Arc<str>, Arc<str>>,
    pending: Option<Pending>,
    /// The generation the proxy is at for this type; `None` until the first response.
    synced: Option<u64>,
    /// A subscription changed: recompute even if the generation did not.
    dirty: bool,
}

pub(super) struct Session {
    pub(super) id: u64,
    /// The name of the proxy's Workload resource (its pod, or its declared Services).
    pub(super) workload: Arc<str>,
    /// The Services of the Workload last sent to the proxy: their AuthorizationPolicies stay until a Workload without
    /// them has been sent (a proxy applies responses in order, so a Service never selects its port without its
    /// policies, on the way in or out).
    pub(super) served: BTreeSet<String>,
    pub(super) types: HashMap<&'static str, TypeState>,
    pub(super) nonces: u64,
}

impl Session {
    pub(super) fn on_request(
        &mut self,
        r: DeltaDiscoveryRequest,
        status: &ProxyStatus,
        metrics: &ControlMetrics,
        node: &str,
    ) -> Result<(), Status> {
        let Some(index) = type_index(&r.type_url) else {
            tracing::debug!(node, type_url = %r.type_url, "ignoring a request for an unknown type");
            return Ok(());
        };
        // Bounded per field, before anything is kept: what a stream holds stays proportional to what it may subscribe.
        if r.initial_resource_versions.len() > MAX_SUBSCRIBED_NAMES {
            return Err(Status::resource_exhausted(format!(
                "initial_resource_versions: over {MAX_SUBSCRIBED_NAMES} entries"
            )));
        }
        let too_long = |s: &String| s.len() > MAX_NAME_BYTES;
        if r.resource_names_subscribe.iter().chain(&r.resource_names_unsubscribe).any(too_long)
            || r.initial_resource_versions.iter().any(|(n, v)| too_long(n) || too_long(v))
        {
            return Err(Status::invalid_argument(format!("a resource name or version over {MAX_NAME_BYTES} bytes")));
        }
        let type_url = TYPES[index];
        if index == SERVICES && !(r.resource_names_subscribe.is_empty() && r.resource_names_unsubscribe.is_empty()) {
            // What an on-demand proxy gets of the other types follows the Services it subscribes to.
            for other in [TRAFFIC, ROUTES] {
                if let Some(t) = self.types.get_mut(TYPES[other]) {
                    t.dirty = true;
                }
            }
        }
        let first = !self.types.contains_key(type_url);
        let t = self.types.entry(type_url).or_default();
        // Only a subscription change calls for a new diff at the same generation (not an ACK).
        t.dirty |= first || !r.resource_names_subscribe.is_empty() || !r.resource_names_unsubscribe.is_empty();
        if first {
            // A first request with no names is a (legacy) wildcard subscription.
            t.wildcard = r.resource_names_subscribe.is_empty();
            t.legacy_wildcard = t.wildcard;
            t.known = r.initial_resource_versions.into_iter().map(|(n, v)| (n.into(), v.into())).collect();
        } else if t.legacy_wildcard && !r.resource_names_subscribe.is_empty() {
            // Naming resources ends a legacy wildcard, unless `*` is among them.
            t.legacy_wildcard = false;
            t.wildcard = r.resource_names_subscribe.iter().any(|n| n == "*");
        }
        for name in r.resource_names_subscribe {
            if name == "*" {
                t.wildcard = true;
                t.legacy_wildcard = false;
            } else {
                // The protocol says: always send what was just subscribed, even if the proxy seems to have it.
                t.known.remove(name.as_str());
                t.unanswered.insert(name.clone());
                t.names.insert(name);
            }
        }
        if t.names.len() > MAX_SUBSCRIBED_NAMES {
            return Err(Status::resource_exhausted(format!(
                "over {MAX_SUBSCRIBED_NAMES} resource names subscribed for {}; subscribe with `*`",
                short_type(type_url)
            )));
        }
        for name in r.resource_names_unsubscribe {
            if name == "*" {
                t.wildcard = false;
            } else {
                t.names.remove(&name);
                t.known.remove(name.as_str());
            }
        }
        if r.response_nonce.is_empty() {
            return Ok(());
        }
        match t.pending.take() {
            Some(pending) if pending.nonce == r.response_nonce => {
                let generation = pending.generation;
                let label = short_type(type_url);
                match r.error_detail {
                    Some(mut error) => {
                        if error.message.len() > MAX_NACK_MESSAGE_BYTES {
                            let mut end = MAX_NACK_MESSAGE_BYTES;
                            while !error.message.is_char_boundary(end) {
                                end -= 1;
                            }
                            error.message.truncate(end);
                            error.message.push('…');
                        }
                        // The proxy kept what it had: diff the next generation against that, so the refused change
                        // (or a fixed version of it) is sent again rather than assumed applied.
                        for (name, previous) in pending.undo {
                            match previous {
                                Some(version) => t.known.insert(name, version),
                                None => t.known.remove(&name),
                            };
                        }
                        // What it answered is answered again with it (the proxy's lookups still wait for it).
                        t.unanswered.extend(pending.answering);
                        tracing::warn!(node, type_url = label, generation, error = %error.message, "proxy NACKed a push");
                        metrics.xds_nacks.with_label_values(&[label]).inc();
                        status.update(type_url, |s| {
                            s.pending_since = None;
                            s.nacked = Some(Nack { version: generation, message: error.message });
                        });
                    }
                    None => {
                        metrics.xds_acks.with_label_values(&[label]).inc();
                        status.update(type_url, |s| {
                            if let Some(since) = s.pending_since.take() {
                                metrics.xds_ack_seconds.observe(since.elapsed().as_secs_f64());
                            }
                            s.acked = generation;
                            s.nacked = None;
                        });
                    }
                }
            }
            // An answer to an older push (a proxy answers every push in order, so this does not happen with one in
            // flight), or a nonce we never sent: nothing to record.
            other => t.pending = other,
        }
        Ok(())
    }

    /// An on-demand proxy subscribes to Services by name or by address ([`Alias`]), not with `*`: it gets only
    /// those, the Services its pod serves and the backends of their routes, with their TrafficPolicies and route sets.
    fn on_demand(&self) -> bool {
        self.types.get(TYPES[SERVICES]).is_some_and(|t| !t.wildcard)
    }

    /// The Services an on-demand proxy gets at this generation.
    fn wanted_services(&self, model: &Model, bound: Option<&Bound>) -> BTreeSet<Arc<str>> {
        let mut wanted = BTreeSet::new();
        let known = |name: &str| model.types[SERVICES].get_key_value(name).map(|(key, _)| key.clone());
        for name in self.types.get(TYPES[SERVICES]).into_iter().flat_map(|t| &t.names) {
            match Alias::parse(name) {
                Some(alias) => wanted.extend(model.index.resolve(&alias).into_iter().flatten().cloned()),
                None => wanted.extend(known(name)),
            }
        }
        for served in bound.map(|b| &b.services).into_iter().flatten().chain(&self.served) {
            wanted.extend(known(served));
        }
        model.index.closure(&mut wanted);
        wanted
    }

    /// The pushes due now: per type with no push in flight, what changed since the proxy's state.
    pub(super) fn due(&mut self, model: &Model, status: &ProxyStatus) -> Vec<Push> {
        let mut out = Vec::new();
        // Within one generation the trust bundle goes first (a new root is trusted before anything relies on it),
        // and policies go before the Workload and Services: a Service the pod starts to serve, or a new Service, is
        // never live without its policies (a policy for a Service the proxy does not serve yet is harmless). Route
        // sets go last: a new backend Service (a canary) is known before a route sends traffic to it.
        let bound = model.bound.get(&self.workload);
        let wanted = self.on_demand().then(|| self.wanted_services(model, bound));
        // A subscription change: the route sets (and, as always, the TrafficPolicies) of the Services it brings go
        // before them, so that the answer to a first call (the Service carrying the alias) finds its routes and
        // policies in place (a route set whose Service the proxy does not hold yet is inert; its backends come with
        // the Service). Should a new generation change a route to a new backend in the same round, that route
        // reaches the proxy just before the backend's Service (the next frame of the same stream).
        let services = self.types.get(TYPES[SERVICES]);
        let subscribed = wanted.is_some() && services.is_some_and(|t| t.dirty && t.pending.is_none());
        // (a route set or policy push already in flight would bring the new ones after the Services: those wait)
        let routes_pending =
            [ROUTES, TRAFFIC].iter().any(|&i| self.types.get(TYPES[i]).is_some_and(|t| t.pending.is_some()));
        let order = if subscribed {
            [TRUST, AUTHZ, TRAFFIC, WORKLOAD, ROUTES, SERVICES]
        } else {
            [TRUST, AUTHZ, TRAFFIC, WORKLOAD, SERVICES, ROUTES]
        };
        for index in order {
            let type_url = &TYPES[index];
            // A new Workload waits while a policy push is in flight (or was refused): it would otherwise reach the
            // proxy before the policies of a Service it adds.
            let policies_unsettled = index == WORKLOAD
                && [TRAFFIC, AUTHZ].iter().any(|&i| {
                    self.types.get(TYPES[i]).is_some_and(|t| t.pending.is_some())
                        || status
                            .types
                            .lock()
                            .expect("status lock")
                            .get(short_type(TYPES[i]))
                            .is_some_and(|s| s.nacked.is_some())
                });
            let served = &self.served;
            let Some(t) = self.types.get_mut(type_url) else { continue };
            if t.pending.is_some() || (subscribed && index == SERVICES && routes_pending) {
                continue;
            }
            // What the pod serves is answered only once the control plane knows it: until then the proxy is not
            // ready and serves no inbound traffic (never with "no policy").
            if index == WORKLOAD && (bound.is_none() || policies_unsettled) {
                continue;
            }
            if t.synced == Some(model.generation) && !t.dirty {
                continue;
            }
            t.dirty = false;
            // Only the candidates are looked at: a proxy's own Workload, and for an on-demand proxy the resources
            // of the Services it gets (a change elsewhere in the mesh costs its stream a few lookups).
            let overlaid = model.index.overlaid[index].iter().filter_map(|n| model.types[index].get_key_value(n));
            let candidates: Vec<(&Arc<str>, &Entry)> = match (index, &wanted) {
                (WORKLOAD, _) => model.types[index].get_key_value(&*self.workload).into_iter().collect(),
                (SERVICES, Some(wanted)) => {
                    wanted.iter().filter_map(|n| model.types[index].get_key_value(n)).chain(overlaid).collect()
                }
                (TRAFFIC | ROUTES | AUTHZ, Some(wanted)) => {
                    let services: Box<dyn Iterator<Item = &str>> = match index {
                        AUTHZ => {
                            Box::new(bound.into_iter().flat_map(|b| &b.services).chain(served).map(String::as_str))
                        }
                        _ => Box::new(wanted.iter().map(|s| &**s)),
                    };
                    let mut names: Vec<&Arc<str>> =
                        services.flat_map(|s| model.index.by_target[index].get(s).into_iter().flatten()).collect();
                    names.sort_unstable();
                    names.dedup();
                    names.into_iter().filter_map(|n| model.types[index].get_key_value(n)).chain(overlaid).collect()
                }
                _ => model.types[index].iter().collect(),
            };
            let mut resources: Vec<(Arc<str>, Bytes)> = Vec::new();
            let mut undo = Vec::new();
            let mut wanted_here = HashSet::new();
            for (name, entry) in candidates {
                if !(t.wildcard || t.names.contains(&**name) || (index == SERVICES && wanted.is_some())) {
                    continue;
                }
                // An AuthorizationPolicy goes to the proxies of the pods its Service selects (or selected in the
                // Workload they were last sent).
                if index == AUTHZ
                    && let Some(target) = &entry.target
                    && !bound.is_some_and(|b| b.services.contains(&**target))
                    && !served.contains(&**target)
                {
                    continue;
                }
                if !wanted_here.insert(name.clone()) {
                    continue;
                }
                if t.known.get(name) != Some(&entry.version) {
                    undo.push((name.clone(), t.known.insert(name.clone(), entry.version.clone())));
                    resources.push((name.clone(), entry.encoded.clone()));
                }
            }
            let mut removed: Vec<String> =
                t.known.keys().filter(|n| !wanted_here.contains(*n)).map(|n| n.to_string()).collect();
            // A subscribed name is answered even if nothing changed: an alias by the Services it names, each carrying
            // it among its aliases (sent again if the proxy holds it), and any name that names nothing as removed
            // (the proxy then knows it is absent: a negative answer).
            let mut aliased: BTreeMap<Arc<str>, Vec<String>> = BTreeMap::new();
            let answering: Vec<String> = t.unanswered.drain().collect();
            for name in answering.iter().cloned() {
                let alias = if index == SERVICES { Alias::parse(&name) } else { None };
                let named = alias.as_ref().and_then(|a| model.index.resolve(a)).filter(|s| !s.is_empty());
                match named {
                    Some(services) => {
                        for service in services.iter().filter(|s| wanted_here.contains(*s)) {
                            aliased.entry(service.clone()).or_default().push(name.clone());
                        }
                    }
                    None if !wanted_here.contains(name.as_str()) && !removed.contains(&name) => removed.push(name),
                    None => {}
                }
            }
            for (service, mut aliases) in aliased {
                aliases.sort();
                let entry = &model.types[SERVICES][&service];
                let encoded = with_aliases(&entry.encoded, &aliases);
                match resources.iter_mut().find(|(n, _)| *n == service) {
                    Some(sent) => sent.1 = encoded,
                    None => resources.push((service, encoded)),
                }
            }
            let resources: Vec<Bytes> = resources.into_iter().map(|(_, bytes)| bytes).collect();
            for name in &removed {
                if let Some((name, version)) = t.known.remove_entry(name.as_str()) {
                    undo.push((name, Some(version)));
                }
            }
            let first = t.synced.is_none();
            t.synced = Some(model.generation);
            if resources.is_empty() && removed.is_empty() && !first {
                // The proxy holds exactly what this generation has for it (nothing changed for it, or a refused
                // change was withdrawn): it is in sync, and an earlier NACK no longer applies.
                status.update(type_url, |s| {
                    s.sent = model.generation;
                    s.acked = s.acked.max(model.generation);
                    s.nacked = None;
                });
                continue;
            }
            self.nonces += 1;
            let nonce = format!("{}-{}", self.id, self.nonces);
            t.pending = Some(Pending { nonce: nonce.clone(), generation: model.generation, undo, answering });
            if index == WORKLOAD
                && let Some(b) = bound
            {
                // The policies of Services this Workload drops are withdrawn next, after it.
                self.served = b.services.clone();
                if let Some(authz) = self.types.get_mut(TYPES[AUTHZ]) {
                    authz.dirty = true;
                }
            }
            status.update(type_url, |s| {
                s.sent = model.generation;
                s.pending_since = Some(Instant::now());
            });
            out.push(Push { type_url, generation: model.generation, nonce, resources, removed });
        }
        out
    }
}

/// A resource's encoding with `aliases` added (field 4 of `Resource`, appended: protobuf merges repeated fields).
fn with_aliases(encoded: &Bytes, aliases: &[String]) -> Bytes {
    let mut buf = BytesMut::from(&encoded[..]);
    prost::encoding::string::encode_repeated(4, aliases, &mut buf);
    buf.freeze()
}
