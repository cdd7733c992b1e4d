//! The delta-ADS server's public face: [`Xds`], the state its parts share (the published model, the endpoint
//! registry, the connected proxies, the trust bundle), how it is built, and the calls the rest of the control plane
//! makes on it. Its parts: the model (`model`), the endpoint registry (`registry`), the publisher (`publisher`),
//! per-proxy status (`status`), one stream's delta protocol (`session`) and life (`stream`), and the gRPC endpoint
//! (`transport`).

pub mod model;
pub mod publisher;
pub mod registry;
pub mod session;
pub mod status;
mod stream;
#[cfg(test)]
mod tests;
pub mod transport;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{Notify, watch};

use crate::identity::rotation::BundlePublisher;
use crate::identity::tokens::Tokens;
use crate::metrics::ControlMetrics;
use crate::store::Store;
use ferry_api::config::Document;
pub use ferry_api::identity::Identity;
use ferry_api::protocol::{self, short_type};
use ferry_api::workload::{DefaultInbound, WorkloadRecord};
use model::Model;
use registry::{Registration, Registry};
use status::ProxyStatus;

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
    /// Raw resources published over the model as they are, unvalidated; empty unless the test-only `api::testing`
    /// module sets some (to make proxies NACK).
    overlay: Mutex<BTreeMap<String, Any>>,
    /// The open streams of each client certificate (by the SHA-256 of its DER), oldest first (`stream::StreamSlot`).
    by_certificate: Mutex<std::collections::HashMap<[u8; 32], stream::CertificateStreams>>,
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
            by_certificate: Mutex::default(),
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

    pub fn generation(&self) -> u64 {
        self.published.borrow().generation
    }

    /// Publishes `any` as resource `name` without validation, over the model, until [`Xds::clear_overlay`]. For the
    /// test-only `api::testing` module: nothing else calls it.
    pub fn overlay(&self, name: String, any: Any) {
        self.overlay.lock().expect("overlay lock").insert(name, any);
        self.changed();
    }

    pub fn clear_overlay(&self) {
        self.overlay.lock().expect("overlay lock").clear();
        self.changed();
    }
}

impl BundlePublisher for Xds {
    /// The mesh's roots changed (rotation): every proxy gets the new bundle.
    fn set_trust_bundle(&self, roots: Vec<String>) {
        self.mesh.lock().expect("mesh lock").roots_pem = roots;
        self.changed();
    }

    /// Whether `roots` is the published trust bundle and every connected proxy has ACKed it.
    fn bundle_trusted_by_all(&self, roots: &[String]) -> bool {
        let (published, since) = self.published_bundle.lock().expect("bundle lock").clone();
        if published != roots {
            return false;
        }
        let bundle = short_type(protocol::TRUST_BUNDLE_TYPE);
        self.proxies.lock().expect("proxies lock").values().all(|p| {
            p.types.lock().expect("status lock").get(bundle).is_some_and(|t| t.acked >= since && t.nacked.is_none())
        })
    }
}
