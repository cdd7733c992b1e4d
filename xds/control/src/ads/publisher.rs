//! The publisher: after each change (debounced and coalesced) and when a retained endpoint expires, rebuilds the
//! model from the documents (the store's, or the Kubernetes source's), the registrations, the local workloads and
//! the mesh settings; persists the registrations to `endpoints.json`; and publishes a new generation only when the
//! content changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::model::{Model, local_workload_name};
use super::{Sourced, Xds};
use crate::store::write_atomic;
use ferry_api::config::Document;
use ferry_api::workload::{SelectingService, Workload, WorkloadRecord};

/// Changes arriving within this window are pushed together.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

impl Xds {
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

    pub(super) fn rebuild(&self) {
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
}
