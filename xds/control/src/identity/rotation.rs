//! Root rotation end to end: a new root joins the trust bundle, signs once every connected proxy has ACKed that
//! bundle (so no proxy meets a certificate it cannot verify), and the old root leaves the bundle once nothing it
//! signed can be alive. The xDS port's own certificate and client roots follow each step.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::ca::{MeshCa, RotationError};
use crate::identity::serving::ServingTls;

/// What a CA change needs of the xDS server (`ads::Xds` implements it; a trait, so that `identity` does not depend
/// on `ads`, which authenticates its streams with `identity`).
pub trait BundlePublisher: Send + Sync {
    /// The mesh's roots changed (rotation): every proxy gets the new bundle.
    fn set_trust_bundle(&self, roots: Vec<String>);

    /// Whether `roots` is the published trust bundle and every connected proxy has ACKed it.
    fn bundle_trusted_by_all(&self, roots: &[String]) -> bool;
}

/// Everything a CA change must reach.
pub struct Authority {
    pub ca: Arc<MeshCa>,
    pub xds: Arc<dyn BundlePublisher>,
    pub serving: Arc<ServingTls>,
    pub state_dir: PathBuf,
    pub server_names: Vec<String>,
    pub server_ips: Vec<IpAddr>,
    /// Workload certificate lifetime: how long a retired signer's certificates may live.
    pub lifetime: Duration,
    pub metrics: Arc<crate::metrics::ControlMetrics>,
    /// A staged root signs only after it has been in the trust bundle this long (the endpoint grace period), and
    /// this long after a start: a proxy between reconnects, or connected before a restart, is back by then and has
    /// the bundle ("every connected proxy" alone could be nobody right after a restart).
    pub min_overlap: Duration,
    /// When the staged root joined the bundle (or the control plane started, for one staged before).
    pub staged_at: std::sync::Mutex<std::time::Instant>,
}

impl Authority {
    /// `ferryctl ca rotate`: stage a new root (trusted now, signing once every proxy trusts it).
    pub fn rotate(&self) -> Result<(), RotationError> {
        self.ca.rotate()?;
        *self.staged_at.lock().expect("rotation lock") = std::time::Instant::now();
        tracing::info!("new root staged: in the trust bundle now, signing once every connected proxy has ACKed it");
        self.publish()
    }

    /// `ferryctl ca retire`: drop the previous root from the trust bundle.
    pub fn retire(&self, force: bool) -> Result<(), RotationError> {
        self.ca.retire(force)?;
        tracing::info!(force, "previous root retired from the trust bundle");
        self.publish()
    }

    /// Promotes a staged root once the bundle holding it is ACKed by every connected proxy; call it periodically.
    pub fn tick(&self) -> Result<(), RotationError> {
        let settled = self.staged_at.lock().expect("rotation lock").elapsed() >= self.min_overlap;
        if settled && self.ca.has_next() && self.xds.bundle_trusted_by_all(&self.ca.trust_bundle()) {
            self.ca.promote(self.lifetime)?;
            tracing::info!("the new root signs from now on; the previous one stays trusted until retired");
            self.publish()?;
        }
        Ok(())
    }

    /// Sets the root expiry gauges from the roots held now.
    pub fn observe(&self) {
        let status = self.ca.status_json();
        self.metrics.ca_root_expiry.reset();
        for root in status["roots"].as_array().into_iter().flatten() {
            let role = root["role"].as_str().unwrap_or_default();
            self.metrics.ca_root_expiry.with_label_values(&[role]).set(root["notAfter"].as_i64().unwrap_or(0));
        }
    }

    /// Pushes the trust bundle to proxies and re-signs the xDS port's certificate with the signing root.
    fn publish(&self) -> Result<(), RotationError> {
        self.observe();
        let roots = self.ca.trust_bundle();
        self.xds.set_trust_bundle(roots.clone());
        let names: Vec<&str> = self.server_names.iter().map(String::as_str).collect();
        let (cert, key) = self.ca.signing().write_serving_certificate(&self.state_dir, &names, &self.server_ips)?;
        self.serving.update(&cert, &key, &roots).map_err(|e| RotationError::Refused(e.to_string()))
    }

    /// The roots with their roles and expiry, and the workload certificate lifetime.
    pub fn status_json(&self) -> serde_json::Value {
        let mut status = self.ca.status_json();
        status["certificateLifetimeSeconds"] = self.lifetime.as_secs().into();
        status
    }

    /// Runs `tick` every second for the life of the process.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.tick()).await {
                Ok(Err(e)) => tracing::error!(error = %e, "root rotation step failed"),
                Err(e) => tracing::error!(error = %e, "root rotation task failed"),
                Ok(Ok(())) => {}
            }
        }
    }
}
