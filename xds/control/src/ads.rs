//! The delta-ADS server: authenticates proxies by their workload certificate, registers their endpoints, and pushes the `ferry.v1`
//! model with versions, nonces, ACK/NACK and at most one un-ACKed push per type per proxy.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::protobuf::value::Kind;
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, watch};
use tonic::{Status, Streaming};

use crate::ads_transport::Incoming;
use crate::api::ControlMetrics;
use crate::certify::{Authenticated, by_certificate};
use crate::store::{Store, write_atomic};
use crate::tokens::Tokens;
use ferry_api::config::{Document, Endpoint};
use ferry_api::hex;
pub use ferry_api::identity::Identity;
use ferry_api::identity::unix_now;
use ferry_api::protocol::{self, NODE_INBOUND_PORT, NODE_SERVICE, TYPES, short_type};
use ferry_api::workload::{DefaultInbound, PodBinding, SelectingService, Workload, WorkloadRecord, pod_workload_name};

/// Changes arriving within this window are pushed together.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A proxy whose stream ended keeps its endpoint this long, so a reconnect does not flap it.
pub const DISCONNECT_LINGER: Duration = Duration::from_secs(5);
/// Named subscriptions per type and stream beyond this are refused (a proxy wanting more subscribes with `*`).
const MAX_SUBSCRIBED_NAMES: usize = 10_000;
/// A new stream must send its first request within this long.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A proxy that has not taken a push for this long (its connection is up but it does not read) is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A connected proxy's stream; dropping it disconnects the proxy (see `Xds::disconnect`).
struct Connected {
    xds: Arc<Xds>,
    id: u64,
    revoked: bool,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.xds.disconnect(self.id, self.revoked);
    }
}

/// How a stream's push loop ended early.
enum Ended {
    Closed,
    Stuck,
    Revoked,
}

/// What authenticated a stream: the identity and certificate, and a view of token revocations since the check.
struct Credential {
    authenticated: Authenticated,
    revocations: watch::Receiver<u64>,
}

/// A push not ACKed within this long marks the proxy stale.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// One endpoint a proxy registered: which Service, where (its connection's source IP and its inbound port, or port 0
/// for the bare IP), as whom.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Registration {
    /// `namespace/name`.
    pub service: String,
    pub address: SocketAddr,
    pub identity: Identity,
}

/// One published resource.
#[derive(Debug, Clone)]
struct Entry {
    version: Arc<str>,
    /// The xDS `Resource` message (name, version, `Any`), encoded once per generation and shared by every push.
    encoded: Bytes,
    /// AuthorizationPolicy: the `namespace/name` of the Service it protects (only that Service's proxies get it).
    target: Option<Arc<str>>,
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

/// Index of the Workload type in [`TYPES`] (each proxy gets only its own).
const WORKLOAD: usize = 4;

/// What a stream's proxy is bound to in the model: the Services it serves (it gets their AuthorizationPolicies) and,
/// for a pod, the pod's uid and IPs.
#[derive(Debug, Clone, PartialEq)]
struct Bound {
    services: BTreeSet<String>,
    pod: Option<PodBinding>,
}

/// The Workload resource name of a local-mode proxy declaring `services` (`namespace/name` each).
fn local_workload_name(services: &[String]) -> String {
    let mut sorted = services.to_vec();
    sorted.sort();
    sorted.dedup();
    format!("local/{}", sorted.join(","))
}

/// Everything the control plane serves, per type, at one generation.
#[derive(Debug, Default)]
pub struct Model {
    pub generation: u64,
    types: [BTreeMap<Arc<str>, Entry>; 5],
    bound: BTreeMap<Arc<str>, Bound>,
}

fn type_index(type_url: &str) -> Option<usize> {
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
            model.types[3].insert(name.into(), Entry::new(name, protocol::encode_mesh(mesh), None));
        }
        for mut doc in documents {
            let name = protocol::resource_name(&doc);
            let mut target = None;
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
                Document::TrafficPolicy(_) => {}
            }
            let any = protocol::encode(&doc);
            let index = type_index(&any.type_url).expect("every document kind has a type");
            model.types[index].insert(name.as_str().into(), Entry::new(&name, any, target));
        }
        model
    }

    /// Puts a raw resource in place of (or beside) the validated ones (the overlay; see [`Xds::overlay`]).
    fn overlay(&mut self, name: &str, any: Any) {
        if let Some(index) = type_index(&any.type_url) {
            self.types[index].insert(name.into(), Entry::new(name, any, None));
        }
    }

    fn same_content(&self, other: &Model) -> bool {
        self.bound == other.bound
            && self.types.iter().zip(&other.types).all(|(a, b)| {
                a.len() == b.len() && a.iter().zip(b).all(|((n1, e1), (n2, e2))| n1 == n2 && e1.version == e2.version)
            })
    }

    /// Resource counts per type (for logs).
    pub fn counts(&self) -> [usize; 5] {
        std::array::from_fn(|i| self.types[i].len())
    }
}

/// Live and retained registrations. Retained ones (from before a restart, or of a proxy that just disconnected)
/// stay until their deadline or until a proxy registers the same Service and address again.
#[derive(Default)]
struct Registry {
    live: BTreeMap<u64, Vec<Registration>>,
    retained: Vec<(Registration, Instant)>,
    persisted: Vec<Registration>,
}

impl Registry {
    fn current(&self) -> Vec<Registration> {
        let mut all: Vec<Registration> =
            self.live.values().flatten().cloned().chain(self.retained.iter().map(|(r, _)| r.clone())).collect();
        all.sort();
        all.dedup();
        all
    }
    fn expire(&mut self, now: Instant) {
        self.retained.retain(|(_, deadline)| *deadline > now);
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.retained.iter().map(|(_, d)| *d).min()
    }
}

/// What `ferryctl status` shows of one type on one proxy.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// The model generation of the last push (or the generation the proxy was found in sync with, nothing to send).
    pub sent: u64,
    pub acked: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nacked: Option<Nack>,
    /// Seconds the current push has waited for its ACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_seconds: Option<f64>,
    #[serde(skip)]
    pending_since: Option<Instant>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub version: u64,
    pub message: String,
}

/// One connected proxy, for `ferryctl status`.
#[derive(Debug)]
pub struct ProxyStatus {
    pub node: String,
    pub identity: Identity,
    /// The expiry of the certificate the stream was opened with (Unix seconds).
    pub certificate_expiry: Option<i64>,
    pub address: Option<SocketAddr>,
    /// The Services it declared (local mode), comma-separated.
    pub service: Option<String>,
    /// The Workload resource it is bound to: its pod, or its declared Services.
    pub workload: Arc<str>,
    pub connected_since: i64,
    types: Mutex<BTreeMap<&'static str, TypeStatus>>,
}

impl ProxyStatus {
    fn update(&self, type_url: &'static str, f: impl FnOnce(&mut TypeStatus)) {
        f(self.types.lock().expect("status lock").entry(short_type(type_url)).or_default());
    }

    /// The JSON row; stale when a push waits too long for its ACK or the last answer was a NACK.
    pub fn to_json(&self, now: Instant) -> serde_json::Value {
        let mut stale = false;
        let mut types = serde_json::Map::new();
        for (name, t) in self.types.lock().expect("status lock").iter() {
            let mut t = t.clone();
            t.pending_seconds = t.pending_since.map(|s| now.duration_since(s).as_secs_f64());
            // A proxy behind the current generation always has a push waiting (one per type at a time), so the
            // wait covers it.
            stale |= t.nacked.is_some() || t.pending_since.is_some_and(|s| now.duration_since(s) > STALE_AFTER);
            types.insert(name.to_string(), serde_json::to_value(&t).expect("serializable"));
        }
        serde_json::json!({
            "node": self.node,
            "identity": self.identity.spiffe(),
            "certificateExpiry": self.certificate_expiry,
            "address": self.address.map(|a| a.to_string()),
            "service": self.service,
            "workload": &*self.workload,
            "connectedSince": self.connected_since,
            "types": types,
            "stale": stale,
        })
    }
}

/// The xDS server's shared state: the published model, registrations, connected proxies.
pub struct Xds {
    store: Arc<Mutex<Store>>,
    tokens: Arc<Mutex<Tokens>>,
    metrics: Arc<ControlMetrics>,
    changed: Notify,
    published: watch::Sender<Arc<Model>>,
    /// Bumped on every token revocation: streams authenticated by a revoked token are closed.
    revocations: watch::Sender<u64>,
    registry: Mutex<Registry>,
    /// The mesh-wide settings sent as the TrustBundle resource.
    mesh: Mutex<protocol::Mesh>,
    /// The trust bundle last published, and the generation it was first published in.
    published_bundle: Mutex<(Vec<String>, u64)>,
    proxies: Mutex<BTreeMap<u64, Arc<ProxyStatus>>>,
    next_id: AtomicU64,
    endpoints_file: PathBuf,
    /// Kubernetes mode: where the documents and workloads come from instead of the store (the cluster's watched
    /// objects).
    source: Mutex<Option<DocumentSource>>,
    /// Local mode: who may call the ports no declared Service selects.
    default_inbound: DefaultInbound,
    /// Raw resources published over the model as they are, unvalidated; empty unless the test-only `testing`
    /// module sets some (to make proxies NACK).
    overlay: Mutex<BTreeMap<String, Any>>,
}

/// What a document source gives at each rebuild: the documents, and what each meshed pod serves (by Workload name).
#[derive(Debug, Default)]
pub struct Sourced {
    pub documents: Vec<Document>,
    pub workloads: BTreeMap<String, WorkloadRecord>,
}

/// The documents (and workloads) to serve, read at each rebuild.
pub type DocumentSource = Arc<dyn Fn() -> Sourced + Send + Sync>;

impl Xds {
    /// Loads the endpoints registered before a restart (kept for `grace`) and builds the first model.
    pub fn new(
        store: Arc<Mutex<Store>>,
        tokens: Arc<Mutex<Tokens>>,
        metrics: Arc<ControlMetrics>,
        state_dir: &std::path::Path,
        grace: Duration,
        mesh: protocol::Mesh,
        default_inbound: DefaultInbound,
    ) -> Arc<Xds> {
        let endpoints_file = state_dir.join("endpoints.json");
        let retained: Vec<Registration> = match std::fs::read(&endpoints_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %endpoints_file.display(), error = %e, "ignoring unreadable endpoint registrations");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        if !retained.is_empty() {
            tracing::info!(
                endpoints = retained.len(),
                grace_seconds = grace.as_secs(),
                "keeping endpoints registered before the restart until their proxies reconnect"
            );
        }
        let deadline = Instant::now() + grace;
        let registry = Registry {
            retained: retained.iter().cloned().map(|r| (r, deadline)).collect(),
            persisted: retained,
            ..Default::default()
        };
        let (published, _) = watch::channel(Arc::new(Model::default()));
        let xds = Arc::new(Xds {
            store,
            tokens,
            metrics,
            changed: Notify::new(),
            published,
            revocations: watch::channel(0).0,
            registry: Mutex::new(registry),
            mesh: Mutex::new(mesh),
            published_bundle: Mutex::new((Vec::new(), 0)),
            proxies: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            endpoints_file,
            source: Mutex::new(None),
            default_inbound,
            overlay: Mutex::new(BTreeMap::new()),
        });
        xds.rebuild();
        xds
    }

    /// Serves the documents `source` gives (Kubernetes mode) instead of the store's. The model is rebuilt from it
    /// before this returns, so a proxy that connects afterwards never sees the store's (empty) one.
    pub fn set_source(&self, source: DocumentSource) {
        *self.source.lock().expect("source lock") = Some(source);
        self.rebuild();
    }

    /// Something the model depends on changed; the publisher rebuilds after the debounce window.
    pub fn changed(&self) {
        self.changed.notify_one();
    }

    /// A token was revoked: streams that authenticated with it end now (UNAUTHENTICATED).
    pub fn token_revoked(&self) {
        self.revocations.send_modify(|n| *n += 1);
    }

    /// The mesh's roots changed (rotation): every proxy gets the new bundle.
    pub fn set_trust_bundle(&self, roots: Vec<String>) {
        self.mesh.lock().expect("mesh lock").roots_pem = roots;
        self.changed();
    }

    /// Whether `roots` is the published trust bundle and every connected proxy has ACKed it.
    pub fn bundle_trusted_by_all(&self, roots: &[String]) -> bool {
        let (published, since) = self.published_bundle.lock().expect("bundle lock").clone();
        if published != roots {
            return false;
        }
        let bundle = short_type(protocol::TRUST_BUNDLE_TYPE);
        self.proxies.lock().expect("proxies lock").values().all(|p| {
            p.types.lock().expect("status lock").get(bundle).is_some_and(|t| t.acked >= since && t.nacked.is_none())
        })
    }

    pub fn generation(&self) -> u64 {
        self.published.borrow().generation
    }

    /// Rebuilds the model after each change (debounced and coalesced) and when a retained endpoint expires.
    pub async fn run_publisher(self: Arc<Self>) {
        loop {
            let deadline = self.registry.lock().expect("registry lock").next_deadline();
            tokio::select! {
                _ = self.changed.notified() => tokio::time::sleep(DEBOUNCE).await,
                _ = async { match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                } } => {}
            }
            let this = self.clone();
            // The store lock and the endpoints file write are blocking work.
            let _ = tokio::task::spawn_blocking(move || this.rebuild()).await;
        }
    }

    fn rebuild(&self) {
        let registrations = {
            let mut registry = self.registry.lock().expect("registry lock");
            registry.expire(Instant::now());
            let current = registry.current();
            if current != registry.persisted {
                match serde_json::to_vec(&current).map(|b| write_atomic(&self.endpoints_file, &b)) {
                    Ok(Ok(())) => registry.persisted = current.clone(),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot persist endpoint registrations"),
                    Err(e) => tracing::error!(error = %e, "cannot encode endpoint registrations"),
                }
            }
            current
        };
        let source = self.source.lock().expect("source lock").clone();
        let Sourced { documents, workloads } = match source {
            Some(source) => source(),
            None => {
                let store = self.store.lock().expect("store lock");
                let documents: Vec<Document> =
                    ferry_api::KINDS.iter().flat_map(|k| store.list(k, None)).map(|s| s.document.clone()).collect();
                drop(store);
                let workloads = self.local_workloads(&documents);
                Sourced { documents, workloads }
            }
        };
        let previous = self.published.borrow().clone();
        let mesh = self.mesh.lock().expect("mesh lock").clone();
        let mut model = Model::build(previous.generation + 1, documents, &registrations, Some(&mesh), &workloads);
        for (name, any) in self.overlay.lock().expect("overlay lock").iter() {
            model.overlay(name, any.clone());
        }
        if previous.generation > 0 && model.same_content(&previous) {
            return;
        }
        {
            let mut published = self.published_bundle.lock().expect("bundle lock");
            if published.0 != mesh.roots_pem {
                *published = (mesh.roots_pem.clone(), model.generation);
            }
        }
        tracing::info!(generation = model.generation, resources = ?model.counts(), endpoints = registrations.len(), "model published");
        self.metrics.xds_generation.set(model.generation as i64);
        self.published.send_replace(Arc::new(model));
    }

    /// Local mode: the workloads of the connected proxies, one per set of declared Services (none declared: every
    /// port is unselected), from those Services' ports.
    fn local_workloads(&self, documents: &[Document]) -> BTreeMap<String, WorkloadRecord> {
        let mut declared: BTreeSet<Vec<String>> = BTreeSet::from([Vec::new()]);
        for proxy in self.proxies.lock().expect("proxies lock").values() {
            if proxy.workload.starts_with("local/") {
                let services = proxy.workload["local/".len()..].split(',').filter(|s| !s.is_empty());
                declared.insert(services.map(str::to_string).collect());
            }
        }
        let ports: BTreeMap<String, Vec<(u16, ferry_api::PortProtocol)>> = documents
            .iter()
            .filter_map(|d| match d {
                Document::Service(svc) => Some((
                    format!("{}/{}", svc.metadata.namespace, svc.metadata.name),
                    svc.spec.ports.iter().map(|p| (p.target_port.unwrap_or(p.port), p.protocol)).collect(),
                )),
                _ => None,
            })
            .collect();
        declared
            .into_iter()
            .map(|services| {
                let selecting = services
                    .iter()
                    .filter_map(|key| {
                        let (namespace, name) = key.split_once('/')?;
                        Some(SelectingService {
                            namespace: namespace.into(),
                            name: name.into(),
                            ports: ports.get(key)?.clone(),
                        })
                    })
                    .collect();
                let record = WorkloadRecord { workload: Workload::new(selecting, self.default_inbound), pod: None };
                (local_workload_name(&services), record)
            })
            .collect()
    }

    /// Publishes `any` as resource `name` without validation, over the model, until [`Xds::clear_overlay`]. For the
    /// test-only `testing` module: nothing else calls it.
    pub fn overlay(&self, name: String, any: Any) {
        self.overlay.lock().expect("overlay lock").insert(name, any);
        self.changed();
    }

    pub fn clear_overlay(&self) {
        self.overlay.lock().expect("overlay lock").clear();
        self.changed();
    }

    /// The connected proxies, as `ferryctl status` shows them.
    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let proxies: Vec<_> = self.proxies.lock().expect("proxies lock").values().map(|p| p.to_json(now)).collect();
        serde_json::json!({ "generation": self.generation(), "proxies": proxies })
    }

    fn refuse(&self, reason: &str, peer: Option<SocketAddr>, message: &str) {
        tracing::warn!(peer = ?peer, reason, "xDS connection refused: {message}");
        self.metrics.xds_refused.with_label_values(&[reason]).inc();
    }

    /// Authenticates a new stream and starts serving it; the receiver yields its responses.
    pub fn open_stream(self: &Arc<Self>, incoming: Incoming) -> Result<mpsc::Receiver<Result<Push, Status>>, Status> {
        // Subscribed before the check, so a revocation after it is never missed.
        let revocations = self.revocations.subscribe();
        let chain = incoming.peer_certs.as_deref().map(Vec::as_slice).unwrap_or_default();
        let authenticated = by_certificate(&self.tokens, chain).map_err(|r| {
            let message = match r.reason {
                "missing" => "no client certificate: get a workload certificate from the CSR service first".to_string(),
                _ => r.message,
            };
            self.refuse(r.reason, incoming.peer, &message);
            Status::unauthenticated(message)
        })?;
        let (tx, rx) = mpsc::channel(1);
        let credential = Credential { authenticated, revocations };
        tokio::spawn(self.clone().serve_stream(credential, incoming.peer, incoming.requests, tx));
        Ok(rx)
    }

    /// Checks a proxy's claim to serve each of its declared Services and registers `peer_ip:inbound_port` for them;
    /// returns their `namespace/name` keys.
    fn register(
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
    fn disconnect(&self, id: u64, revoked: bool) {
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

    /// One proxy's stream, from its first request to its end.
    async fn serve_stream(
        self: Arc<Self>,
        credential: Credential,
        peer: Option<SocketAddr>,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<Push, Status>>,
    ) {
        let Credential { authenticated, mut revocations } = credential;
        let identity = authenticated.identity.clone();
        let token_id = authenticated.token_id.clone();
        let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Err(status)) => {
                let _ = tx.try_send(Err(status));
                return;
            }
            Ok(Ok(None)) => return,
            Err(_) => {
                let _ = tx.try_send(Err(Status::deadline_exceeded("no request within 30 s of opening the stream")));
                return;
            }
        };
        if let Some(token_id) = &token_id
            && self.tokens.lock().expect("tokens lock").is_revoked(token_id)
        {
            let message = format!("token {token_id} was revoked");
            self.refuse("revoked", peer, &message);
            let _ = tx.try_send(Err(Status::unauthenticated(message)));
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let node = first.node.clone().unwrap_or_default();
        let claim = NodeClaim::of(&node);
        let kubernetes = self.source.lock().expect("source lock").is_some();
        let pod = authenticated.pod.clone();
        // Which Workload the stream is bound to: the pod its certificate was issued for (Kubernetes mode: never a
        // claim of the proxy's), or the Services it declared (local mode, each checked against its identities).
        let (service, workload) = match (&pod, kubernetes) {
            (Some(pod), _) => {
                if let Some(claim) = &claim {
                    tracing::info!(node = %node.id, declared = ?claim.services, "ignoring the Services a pod's proxy declares: the pod's Services are those that select it");
                }
                (None, pod_workload_name(&identity.namespace, &pod.name))
            }
            (None, true) => {
                let message = "the certificate names no pod: request one with the pod's ServiceAccount token";
                self.refuse("no-pod", peer, &format!("{} ({}): {message}", node.id, identity.spiffe()));
                let _ = tx.send(Err(Status::unauthenticated(message))).await;
                return;
            }
            (None, false) => {
                let registered = match (&claim, peer) {
                    (None, _) => Ok(Vec::new()),
                    (Some(claim), Some(peer)) => self.register(id, &identity, peer, claim),
                    (Some(_), None) => Err("the connection has no peer address".to_string()),
                };
                match registered {
                    Ok(services) => {
                        let name = local_workload_name(&services);
                        ((!services.is_empty()).then(|| services.join(",")), name)
                    }
                    Err(message) => {
                        self.refuse("service", peer, &format!("{} ({}): {message}", node.id, identity.spiffe()));
                        let _ = tx.send(Err(Status::permission_denied(message))).await;
                        return;
                    }
                }
            }
        };
        let workload: Arc<str> = workload.into();
        let status = Arc::new(ProxyStatus {
            node: node.id.clone(),
            identity: identity.clone(),
            certificate_expiry: authenticated.not_after,
            address: peer,
            service: service.clone(),
            workload: workload.clone(),
            connected_since: unix_now(),
            types: Mutex::new(BTreeMap::new()),
        });
        self.proxies.lock().expect("proxies lock").insert(id, status.clone());
        self.metrics.xds_connected.inc();
        if !kubernetes {
            // Local mode: a new set of declared Services needs its workload in the model.
            self.changed();
        }
        // From here on, however the task ends (even by a panic), the proxy is unlisted and its endpoint released.
        let mut connected = Connected { xds: self.clone(), id, revoked: false };
        tracing::info!(node = %node.id, identity = %identity.spiffe(), peer = ?peer, service = ?service, "proxy connected");

        // A stream lives no longer than the certificate that opened it (the proxy reconnects with its renewed one).
        let left = authenticated.not_after.map(|t| t.saturating_sub(unix_now()).max(0) as u64);
        let expiry = tokio::time::sleep(left.map_or(Duration::MAX / 4, Duration::from_secs));
        tokio::pin!(expiry);
        let mut model_rx = self.published.subscribe();
        let mut session = Session { id, workload, served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
        let mut next = Some(first);
        // A pod-bound stream waits this long for its pod to appear in the model (a watch event behind the TokenReview's
        // own lookup); a pod that never appears, or that leaves, ends the stream.
        let mut pod_seen = false;
        let mut unbound_reason: Option<String> = None;
        let unknown_pod = tokio::time::sleep(POD_UNKNOWN_TIMEOUT);
        tokio::pin!(unknown_pod);
        loop {
            if let Some(request) = next.take()
                && let Err(refused) = session.on_request(request, &status, &self.metrics, &node.id)
            {
                tracing::warn!(node = %node.id, error = %refused.message(), "closing an xDS stream");
                let _ = tx.try_send(Err(refused));
                break;
            }
            let model = model_rx.borrow_and_update().clone();
            if let Some(pod) = &pod {
                match model.bound.get(&session.workload).map(|b| check_pod(b, pod, peer)) {
                    Some(Ok(())) => pod_seen = true,
                    // Seen before: the pod was replaced or moved. Never seen: the model may lag the pod watcher (a
                    // pod recreated under the same name); the stream waits, bounded, as for an unknown pod.
                    Some(Err(message)) if pod_seen => {
                        self.close_stream("no-pod", &node.id, &identity, peer, &message, &tx);
                        break;
                    }
                    Some(Err(message)) => unbound_reason = Some(message),
                    None if pod_seen => {
                        let message = format!("pod {}/{} was deleted", identity.namespace, pod.name);
                        self.close_stream("no-pod", &node.id, &identity, peer, &message, &tx);
                        break;
                    }
                    None => {}
                }
            }
            let mut end = None;
            for response in session.due(&model, &status) {
                self.metrics.xds_pushes.with_label_values(&[short_type(response.type_url)]).inc();
                // A proxy that stops reading must not pin this task: wait for room, but not past a revocation or
                // SEND_TIMEOUT.
                let permit = tokio::select! {
                    permit = tokio::time::timeout(SEND_TIMEOUT, tx.reserve()) => permit,
                    _ = self.revoked(token_id.as_deref(), &mut revocations) => {
                        end = Some(Ended::Revoked);
                        break;
                    }
                };
                match permit {
                    Ok(Ok(permit)) => permit.send(Ok(response)),
                    Ok(Err(_)) => end = Some(Ended::Closed),
                    Err(_) => end = Some(Ended::Stuck),
                }
                if end.is_some() {
                    break;
                }
            }
            match end {
                None => {}
                Some(Ended::Closed) => break,
                Some(Ended::Stuck) => {
                    tracing::warn!(node = %node.id, "proxy has not read a push for {SEND_TIMEOUT:?}; closing its stream");
                    break;
                }
                Some(Ended::Revoked) => {
                    self.close_revoked(token_id.as_deref().unwrap_or_default(), peer, &node.id, &identity, &tx);
                    connected.revoked = true;
                    break;
                }
            }
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(request)) => next = Some(request),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %node.id, error = %status, "xDS stream error");
                        let _ = tx.try_send(Err(status));
                        break;
                    }
                },
                r = model_rx.changed() => if r.is_err() { break },
                _ = &mut unknown_pod, if pod.is_some() && !pod_seen => {
                    let message = unbound_reason.take().unwrap_or_else(|| format!(
                        "pod {}/{} is not a meshed pod the control plane knows",
                        identity.namespace,
                        pod.as_ref().map_or("", |p| p.name.as_str())
                    ));
                    self.close_stream("no-pod", &node.id, &identity, peer, &message, &tx);
                    break;
                }
                _ = &mut expiry => {
                    let message = "the certificate this stream was opened with expired; reconnect with the renewed one";
                    tracing::info!(node = %node.id, identity = %identity.spiffe(), "{message}");
                    let _ = tx.try_send(Err(Status::unauthenticated(message)));
                    break;
                }
                _ = self.revoked(token_id.as_deref(), &mut revocations) => {
                    self.close_revoked(token_id.as_deref().unwrap_or_default(), peer, &node.id, &identity, &tx);
                    connected.revoked = true;
                    break;
                }
            }
        }
        tracing::info!(node = %node.id, identity = %identity.spiffe(), "proxy disconnected");
    }

    /// Resolves when `token_id` is revoked (checked at each revocation anywhere); never without a token.
    async fn revoked(&self, token_id: Option<&str>, revocations: &mut watch::Receiver<u64>) {
        let Some(token_id) = token_id else { return std::future::pending().await };
        loop {
            if revocations.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.tokens.lock().expect("tokens lock").is_revoked(token_id) {
                return;
            }
        }
    }

    /// Ends a stream whose credential no longer holds (`reason`, the refusal metric's label): logged, counted, and
    /// answered UNAUTHENTICATED with `message`.
    fn close_stream(
        &self,
        reason: &'static str,
        node: &str,
        identity: &Identity,
        peer: Option<SocketAddr>,
        message: &str,
        tx: &mpsc::Sender<Result<Push, Status>>,
    ) {
        self.refuse(reason, peer, &format!("{node} ({}): {message}; closing its stream", identity.spiffe()));
        let _ = tx.try_send(Err(Status::unauthenticated(message.to_string())));
    }

    fn close_revoked(
        &self,
        token_id: &str,
        peer: Option<SocketAddr>,
        node: &str,
        identity: &Identity,
        tx: &mpsc::Sender<Result<Push, Status>>,
    ) {
        self.close_stream("revoked", node, identity, peer, &format!("token {token_id} was revoked"), tx);
    }
}

/// Pure: whether the pod a stream's certificate names is the one the model holds (same uid) and, when both are
/// known, the stream comes from one of its IPs.
fn check_pod(bound: &Bound, pod: &ferry_api::identity::PodRef, peer: Option<SocketAddr>) -> Result<(), String> {
    let Some(binding) = &bound.pod else { return Err("the Workload is not a pod's".into()) };
    if binding.uid != pod.uid {
        return Err(format!("pod {} was replaced (uid {} is not {})", pod.name, binding.uid, pod.uid));
    }
    match peer {
        Some(peer) if !binding.ips.is_empty() && !binding.ips.contains(&peer.ip().to_canonical()) => {
            Err(format!("the stream comes from {}, and pod {} has the IPs {:?}", peer.ip(), pod.name, binding.ips))
        }
        _ => Ok(()),
    }
}

/// How long a pod-bound stream may wait for its pod to appear in the model.
const POD_UNKNOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a proxy's node metadata asks for (local mode): registration as an endpoint of each of `services` on
/// `inbound_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeClaim {
    services: Vec<String>,
    inbound_port: Option<u16>,
}

impl NodeClaim {
    fn of(node: &Node) -> Option<NodeClaim> {
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

/// A push awaiting its answer, and how to take it back from `known` if the proxy NACKs it.
struct Pending {
    nonce: String,
    generation: u64,
    /// Each name the push changed, with the version the proxy held before (`None`: it held none).
    undo: Vec<(Arc<str>, Option<Arc<str>>)>,
}

/// Per type: what the proxy subscribed to, what it holds, and the push awaiting its ACK.
#[derive(Default)]
struct TypeState {
    wildcard: bool,
    /// Wildcard only because the first request named nothing (legacy form): naming resources later ends it.
    legacy_wildcard: bool,
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

struct Session {
    id: u64,
    /// The name of the proxy's Workload resource (its pod, or its declared Services).
    workload: Arc<str>,
    /// The Services of the Workload last sent to the proxy: their AuthorizationPolicies stay until a Workload without
    /// them has been sent (a proxy applies responses in order, so a Service never selects its port without its
    /// policies, on the way in or out).
    served: BTreeSet<String>,
    types: HashMap<&'static str, TypeState>,
    nonces: u64,
}

impl Session {
    fn on_request(
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
        let type_url = TYPES[index];
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
                    Some(error) => {
                        // The proxy kept what it had: diff the next generation against that, so the refused change
                        // (or a fixed version of it) is sent again rather than assumed applied.
                        for (name, previous) in pending.undo {
                            match previous {
                                Some(version) => t.known.insert(name, version),
                                None => t.known.remove(&name),
                            };
                        }
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

    /// The pushes due now: per type with no push in flight, what changed since the proxy's state.
    fn due(&mut self, model: &Model, status: &ProxyStatus) -> Vec<Push> {
        let mut out = Vec::new();
        // Within one generation the trust bundle goes first (a new root is trusted before anything relies on it),
        // and policies go before the Workload and Services: a Service the pod starts to serve, or a new Service, is
        // never live without its policies (a policy for a Service the proxy does not serve yet is harmless).
        let bound = model.bound.get(&self.workload);
        for index in [3, 2, 1, WORKLOAD, 0] {
            let type_url = &TYPES[index];
            // A new Workload waits while a policy push is in flight (or was refused): it would otherwise reach the
            // proxy before the policies of a Service it adds.
            let policies_unsettled = index == WORKLOAD
                && [1, 2].iter().any(|&i| {
                    self.types.get(TYPES[i]).is_some_and(|t| t.pending.is_some())
                        || status
                            .types
                            .lock()
                            .expect("status lock")
                            .get(short_type(TYPES[i]))
                            .is_some_and(|s| s.nacked.is_some())
                });
            let Some(t) = self.types.get_mut(type_url) else { continue };
            if t.pending.is_some() {
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
            let mut resources = Vec::new();
            let mut undo = Vec::new();
            let mut wanted = HashSet::new();
            for (name, entry) in &model.types[index] {
                if !(t.wildcard || t.names.contains(&**name)) {
                    continue;
                }
                if index == WORKLOAD && *name != self.workload {
                    continue;
                }
                // An AuthorizationPolicy goes to the proxies of the pods its Service selects (or selected in the
                // Workload they were last sent).
                if let Some(target) = &entry.target
                    && !bound.is_some_and(|b| b.services.contains(&**target))
                    && !self.served.contains(&**target)
                {
                    continue;
                }
                wanted.insert(name.clone());
                if t.known.get(name) != Some(&entry.version) {
                    undo.push((name.clone(), t.known.insert(name.clone(), entry.version.clone())));
                    resources.push(entry.encoded.clone());
                }
            }
            let mut removed: Vec<String> =
                t.known.keys().filter(|n| !wanted.contains(*n)).map(|n| n.to_string()).collect();
            // A subscribed name that does not exist is answered as removed (the proxy then knows it is absent).
            for name in t.unanswered.drain() {
                if !wanted.contains(name.as_str()) && !removed.contains(&name) {
                    removed.push(name);
                }
            }
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
            t.pending = Some(Pending { nonce: nonce.clone(), generation: model.generation, undo });
            if index == WORKLOAD
                && let Some(b) = bound
            {
                // The policies of Services this Workload drops are withdrawn next, after it.
                self.served = b.services.clone();
                if let Some(authz) = self.types.get_mut(TYPES[2]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;

    const DOCS: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: api, namespace: demo}
spec: {ports: [{port: 80}], identities: [api]}
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api, namespace: demo}
spec: {targetRef: {kind: Service, name: api}, defaultAction: deny}
"#;

    fn test_mesh() -> protocol::Mesh {
        protocol::Mesh { roots_pem: vec![], default_mtls: ferry_api::policy::MtlsMode::Permissive }
    }

    fn reg(service: &str, addr: &str, ns: &str, sa: &str) -> Registration {
        Registration {
            service: service.into(),
            address: addr.parse().unwrap(),
            identity: Identity { namespace: ns.into(), service_account: sa.into() },
        }
    }

    fn endpoints(model: &Model) -> Vec<String> {
        let resource = Resource::decode(model.types[0].get("demo/api").unwrap().encoded.clone()).unwrap();
        match protocol::decode("demo/api", resource.resource.as_ref().unwrap()).unwrap() {
            protocol::Received::Document(Document::Service(s)) => {
                s.spec.endpoints.into_iter().map(|e| e.address).collect()
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn endpoints_only_for_listed_identities() {
        let docs = ferry_api::parse_documents(DOCS).unwrap();
        let regs = [
            reg("demo/api", "127.0.0.1:1001", "demo", "api"),
            reg("demo/api", "127.0.0.1:1001", "demo", "api"),
            reg("demo/api", "127.0.0.2:1002", "demo", "web"),
            reg("demo/api", "127.0.0.3:1003", "other", "api"),
            reg("demo/web", "127.0.0.4:1004", "demo", "api"),
        ];
        let model = Model::build(1, docs.clone(), &regs, None, &BTreeMap::new());
        assert_eq!(endpoints(&model), ["127.0.0.1:1001"]);
        assert_eq!(model.counts(), [1, 0, 1, 0, 0]);
        assert!(model.same_content(&Model::build(2, docs.clone(), &regs, None, &BTreeMap::new())));
        assert!(!model.same_content(&Model::build(2, docs, &regs[..0], None, &BTreeMap::new())));
    }

    /// What a proxy decodes from a push: the framed bytes through the standard message type.
    fn wire(push: &Push) -> DeltaDiscoveryResponse {
        let framed = push.framed();
        assert_eq!(framed[0], 0, "uncompressed");
        assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize, framed.len() - 5);
        DeltaDiscoveryResponse::decode(&framed[5..]).unwrap()
    }

    /// The status row of a proxy `demo/<account>`, registered for `service`.
    fn proxy_status(account: &str, service: Option<&str>) -> ProxyStatus {
        ProxyStatus {
            certificate_expiry: None,
            node: "n".into(),
            identity: Identity { namespace: "demo".into(), service_account: account.into() },
            address: None,
            service: service.map(str::to_string),
            workload: local_workload_name(&service.map(str::to_string).into_iter().collect::<Vec<_>>()).into(),
            connected_since: 0,
            types: Mutex::default(),
        }
    }

    #[test]
    fn named_subscriptions() {
        let metrics = ControlMetrics::new();
        let status = proxy_status("api", Some("demo/api"));
        let model = Model::build(1, ferry_api::parse_documents(DOCS).unwrap(), &[], None, &BTreeMap::new());
        let mut s = Session {
            id: 1,
            workload: status.workload.clone(),
            served: BTreeSet::new(),
            types: HashMap::new(),
            nonces: 0,
        };
        // Named: only what is named; a name that does not exist comes back as removed.
        s.on_request(request(protocol::SERVICE_TYPE, &["demo/api", "demo/nope"], "", None), &status, &metrics, "n")
            .unwrap();
        let out: Vec<DeltaDiscoveryResponse> = s.due(&model, &status).iter().map(wire).collect();
        assert_eq!(out[0].resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["demo/api"]);
        assert_eq!(out[0].removed_resources, ["demo/nope"]);
        // Legacy wildcard (first request names nothing) ends when names are subscribed without `*`.
        s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &[], "", None), &status, &metrics, "n").unwrap();
        let t = &s.types[protocol::AUTHORIZATION_POLICY_TYPE];
        assert!(t.wildcard && t.legacy_wildcard);
        s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &["demo/x"], "", None), &status, &metrics, "n")
            .unwrap();
        assert!(!s.types[protocol::AUTHORIZATION_POLICY_TYPE].wildcard);
        s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &["*"], "", None), &status, &metrics, "n").unwrap();
        assert!(s.types[protocol::AUTHORIZATION_POLICY_TYPE].wildcard);
        // Subscriptions are bounded.
        let many: Vec<String> = (0..=MAX_SUBSCRIBED_NAMES).map(|i| format!("demo/s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let refused = s.on_request(request(protocol::TRAFFIC_POLICY_TYPE, &many, "", None), &status, &metrics, "n");
        assert_eq!(refused.unwrap_err().code(), tonic::Code::ResourceExhausted);
    }

    /// Changes that arrive within the debounce window make one generation; a change after it makes the next.
    #[tokio::test(start_paused = true)]
    async fn changes_are_debounced_and_coalesced() {
        let dir = std::env::temp_dir().join(format!("ferry-ads-debounce-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Arc::new(Mutex::new(Store::open(&dir).unwrap()));
        let tokens = Arc::new(Mutex::new(Tokens::open(&dir).unwrap()));
        let xds = Xds::new(
            store.clone(),
            tokens,
            Arc::new(ControlMetrics::new()),
            &dir,
            Duration::from_secs(60),
            test_mesh(),
            DefaultInbound::Allow,
        );
        assert_eq!(xds.generation(), 1);
        tokio::spawn(xds.clone().run_publisher());
        let service = |name: &str| {
            ferry_api::parse_documents(&format!(
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 80}}]}}\n"
            ))
            .unwrap()
        };
        for i in 0..5 {
            store.lock().unwrap().apply(service(&format!("s{i}")), false).unwrap();
            xds.changed();
            tokio::time::sleep(DEBOUNCE / 10).await;
        }
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert_eq!(xds.generation(), 2, "five changes inside the window: one push");
        assert_eq!(xds.published.borrow().counts(), [5, 0, 0, 1, 1], "and the workload of proxies declaring nothing");
        // Nothing changed: a notification publishes nothing new.
        xds.changed();
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert_eq!(xds.generation(), 2);
        store.lock().unwrap().apply(service("s5"), false).unwrap();
        xds.changed();
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert_eq!(xds.generation(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn request(type_url: &str, subscribe: &[&str], nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| envoy_types::pb::google::rpc::Status {
                code: 3,
                message: m.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn session_protocol() {
        let metrics = ControlMetrics::new();
        let status = proxy_status("web", None);
        let docs = ferry_api::parse_documents(DOCS).unwrap();
        let m1 = Model::build(1, docs.clone(), &[], None, &BTreeMap::new());
        let mut s = Session {
            id: 7,
            workload: status.workload.clone(),
            served: BTreeSet::new(),
            types: HashMap::new(),
            nonces: 0,
        };
        // Wildcard subscription to Services and AuthorizationPolicies.
        s.on_request(request(protocol::SERVICE_TYPE, &[], "", None), &status, &metrics, "n").unwrap();
        s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &["*"], "", None), &status, &metrics, "n").unwrap();
        let out: Vec<DeltaDiscoveryResponse> = s.due(&m1, &status).iter().map(wire).collect();
        assert_eq!(out.len(), 2, "the first response per type is sent even when empty");
        assert_eq!(out[0].type_url, protocol::AUTHORIZATION_POLICY_TYPE, "policies before Services");
        assert!(out[0].resources.is_empty(), "an AuthorizationPolicy goes only to its target's proxies");
        let out = [out[1].clone(), out[0].clone()];
        assert_eq!(out[0].resources.len(), 1);
        assert_eq!(out[0].resources[0].name, "demo/api");
        assert_eq!(out[0].type_url, protocol::SERVICE_TYPE);
        assert!(protocol::decode("demo/api", out[0].resources[0].resource.as_ref().unwrap()).is_ok());
        // At most one push in flight: a new generation waits for the ACK.
        let m2 =
            Model::build(2, docs.clone(), &[reg("demo/api", "127.0.0.1:1", "demo", "api")], None, &BTreeMap::new());
        assert!(s.due(&m2, &status).is_empty());
        s.on_request(request(protocol::SERVICE_TYPE, &[], &out[0].nonce, None), &status, &metrics, "n").unwrap();
        s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &[], &out[1].nonce, None), &status, &metrics, "n")
            .unwrap();
        let out2: Vec<DeltaDiscoveryResponse> = s.due(&m2, &status).iter().map(wire).collect();
        assert_eq!(out2.len(), 1, "only the changed type is pushed");
        assert_eq!(out2[0].system_version_info, "2");
        // A NACK is recorded with its message; the stale nonce of an old push is ignored.
        s.on_request(request(protocol::SERVICE_TYPE, &[], "7-1", Some("old")), &status, &metrics, "n").unwrap();
        s.on_request(request(protocol::SERVICE_TYPE, &[], &out2[0].nonce, Some("bad port")), &status, &metrics, "n")
            .unwrap();
        let json = status.to_json(Instant::now());
        assert_eq!(json["types"]["Service"]["nacked"]["message"], "bad port");
        assert_eq!(json["types"]["Service"]["acked"], 1);
        assert_eq!(json["stale"], true);
        // Nothing is resent at the same generation; the next one resends what the proxy refused (it kept the old).
        assert!(s.due(&m2, &status).is_empty());
        let m2b =
            Model::build(3, docs.clone(), &[reg("demo/api", "127.0.0.1:1", "demo", "api")], None, &BTreeMap::new());
        let again: Vec<DeltaDiscoveryResponse> = s.due(&m2b, &status).iter().map(wire).collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].resources[0].version, out2[0].resources[0].version, "the refused version, again");
        s.on_request(request(protocol::SERVICE_TYPE, &[], &again[0].nonce, None), &status, &metrics, "n").unwrap();
        assert_eq!(status.to_json(Instant::now())["stale"], false, "an ACK of the whole difference clears it");
        // Deleting the Service is a removal.
        let m3 = Model::build(4, docs[1..].to_vec(), &[], None, &BTreeMap::new());
        let out3: Vec<DeltaDiscoveryResponse> = s.due(&m3, &status).iter().map(wire).collect();
        assert_eq!(out3[0].removed_resources, ["demo/api"]);
        assert_eq!(metrics.xds_acks.with_label_values(&["Service"]).get(), 2);
        assert_eq!(metrics.xds_nacks.with_label_values(&["Service"]).get(), 1);
    }

    #[test]
    fn each_proxy_gets_its_own_workload_and_the_policies_of_the_services_selecting_it() {
        let metrics = ControlMetrics::new();
        let docs = ferry_api::parse_documents(DOCS).unwrap();
        let record = |services: &[&str]| WorkloadRecord {
            workload: Workload::new(
                services
                    .iter()
                    .map(|n| SelectingService {
                        namespace: "demo".into(),
                        name: n.to_string(),
                        ports: vec![(8080, ferry_api::PortProtocol::Http)],
                    })
                    .collect(),
                DefaultInbound::MeshOnly,
            ),
            pod: Some(PodBinding { uid: "u1".into(), ips: vec!["10.0.0.5".parse().unwrap()] }),
        };
        let workloads = BTreeMap::from([
            (pod_workload_name("demo", "api-1"), record(&["api"])),
            (pod_workload_name("demo", "web-1"), record(&[])),
        ]);
        let model = Model::build(1, docs, &[], None, &workloads);
        // (the proxy's Workload name, the AuthorizationPolicies it gets, whether its Workload is answered)
        for (workload, policies, answered) in [
            ("pod/demo/api-1", vec!["demo/api"], true),
            ("pod/demo/web-1", vec![], true),
            ("pod/demo/unknown-1", vec![], false),
        ] {
            let mut status = proxy_status("x", None);
            status.workload = workload.into();
            let mut s =
                Session { id: 1, workload: workload.into(), served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
            for t in [protocol::AUTHORIZATION_POLICY_TYPE, protocol::WORKLOAD_TYPE] {
                s.on_request(request(t, &[], "", None), &status, &metrics, "n").unwrap();
            }
            let first: Vec<DeltaDiscoveryResponse> = s.due(&model, &status).iter().map(wire).collect();
            // The policies go first; the Workload waits for their ACK (it must never arrive before them).
            assert!(first.iter().all(|r| r.type_url != protocol::WORKLOAD_TYPE), "{workload}");
            let nonce = first.iter().find(|r| r.type_url == protocol::AUTHORIZATION_POLICY_TYPE).unwrap().nonce.clone();
            s.on_request(request(protocol::AUTHORIZATION_POLICY_TYPE, &[], &nonce, None), &status, &metrics, "n")
                .unwrap();
            let out: Vec<DeltaDiscoveryResponse> =
                first.into_iter().chain(s.due(&model, &status).iter().map(wire)).collect();
            let names = |t: &str| -> Option<Vec<String>> {
                out.iter().find(|r| r.type_url == t).map(|r| r.resources.iter().map(|x| x.name.clone()).collect())
            };
            assert_eq!(
                names(protocol::AUTHORIZATION_POLICY_TYPE),
                Some(policies.iter().map(|p| p.to_string()).collect()),
                "{workload}"
            );
            let own = names(protocol::WORKLOAD_TYPE);
            assert_eq!(own, answered.then(|| vec![workload.to_string()]), "{workload}: only its own, once known");
            if answered {
                let r = &out.iter().find(|r| r.type_url == protocol::WORKLOAD_TYPE).unwrap().resources[0];
                let Ok(protocol::Received::Workload(w)) = protocol::decode(&r.name, r.resource.as_ref().unwrap())
                else {
                    panic!("not a Workload")
                };
                assert_eq!(w.default_inbound, DefaultInbound::MeshOnly);
            }
        }
        // The Service stops selecting api-1: the Workload without it goes out before its policy is withdrawn (a
        // proxy applies responses in order, so the port never keeps the Service without its policy).
        let mut status = proxy_status("x", None);
        status.workload = "pod/demo/api-1".into();
        let mut s = Session {
            id: 2,
            workload: "pod/demo/api-1".into(),
            served: BTreeSet::new(),
            types: HashMap::new(),
            nonces: 0,
        };
        for t in [protocol::AUTHORIZATION_POLICY_TYPE, protocol::WORKLOAD_TYPE] {
            s.on_request(request(t, &[], "", None), &status, &metrics, "n").unwrap();
        }
        let exchange = |s: &mut Session, model: &Model| -> Vec<(String, Vec<String>, Vec<String>)> {
            let mut seen = Vec::new();
            loop {
                let out: Vec<DeltaDiscoveryResponse> = s.due(model, &status).iter().map(wire).collect();
                if out.is_empty() {
                    return seen;
                }
                for r in out {
                    let names = r.resources.iter().map(|x| x.name.clone()).collect();
                    seen.push((short_type(&r.type_url).to_string(), names, r.removed_resources.clone()));
                    s.on_request(request(&r.type_url, &[], &r.nonce, None), &status, &metrics, "n").unwrap();
                }
            }
        };
        exchange(&mut s, &model);
        let dropped = BTreeMap::from([(pod_workload_name("demo", "api-1"), record(&[]))]);
        let model2 = Model::build(2, ferry_api::parse_documents(DOCS).unwrap(), &[], None, &dropped);
        let order = exchange(&mut s, &model2);
        let workload_at = order.iter().position(|(t, _, _)| t == "Workload").expect("a new Workload");
        let withdrawn = order.iter().position(|(t, _, removed)| t == "AuthorizationPolicy" && removed == &["demo/api"]);
        assert!(withdrawn.is_some_and(|w| w > workload_at), "{order:?}");

        // A stream is bound to the pod its certificate names: same uid, from one of its IPs.
        let bound = &model.bound[&*pod_workload_name("demo", "api-1")];
        let pod = |uid: &str| ferry_api::identity::PodRef { name: "api-1".into(), uid: uid.into() };
        let from = |ip: &str| Some(SocketAddr::new(ip.parse().unwrap(), 40000));
        assert_eq!(check_pod(bound, &pod("u1"), from("10.0.0.5")), Ok(()));
        assert_eq!(check_pod(bound, &pod("u1"), from("::ffff:10.0.0.5")), Ok(()));
        assert!(check_pod(bound, &pod("u0"), from("10.0.0.5")).unwrap_err().contains("replaced"));
        assert!(check_pod(bound, &pod("u1"), from("10.0.0.9")).unwrap_err().contains("comes from 10.0.0.9"));
    }
}
