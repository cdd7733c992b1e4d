//! The file source: a multi-document YAML file re-read on SIGHUP and on change; a bad file never replaces a good snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::discovery::snapshot::{ConfigStore, Snapshot};
use crate::telemetry::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: ferry_api::ConfigError },
}

/// Validates the file's content into a snapshot; the pod serves the `declared` Services (`FERRY_SERVICE`).
pub fn parse(
    path: &Path,
    bytes: &[u8],
    version: u64,
    local_namespace: &str,
    declared: &[(String, String)],
) -> Result<Snapshot, SourceError> {
    let text = String::from_utf8_lossy(bytes);
    let documents =
        ferry_api::parse_documents(&text).map_err(|source| SourceError::Invalid { path: path.into(), source })?;
    // No control plane, no identity: nothing is mTLS, so nothing can be strict.
    let mode = ferry_api::policy::MtlsMode::Permissive;
    let workload = crate::discovery::snapshot::declared_workload(declared, &documents);
    let routes = ferry_api::config::route_sets(&documents);
    Ok(Snapshot::build(version, format!("file:{}", path.display()), documents, local_namespace, mode, workload)
        .with_routes(routes))
}

/// Watches `path`: loads it now, then again on SIGHUP and whenever its content changes (checked every `poll`).
pub async fn run_file_source(
    path: PathBuf,
    poll: Duration,
    namespace: String,
    declared: Vec<(String, String)>,
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGHUP; the config file is still polled"))
        .ok();
    let mut version = 0u64;
    // What was last looked at (file identity + content, good or bad) and the last error, so each is reported once.
    let mut last_stamp: Option<Stamp> = None;
    let mut last: Option<Vec<u8>> = None;
    let mut last_error: Option<String> = None;
    let mut forced = true;
    loop {
        if !forced {
            forced = tokio::select! {
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
                _ = tokio::time::sleep(poll) => false,
            };
        }
        // A stat per poll; the file is read only when its identity, size or mtime changed (a ConfigMap update swaps
        // a symlink, which changes all three), or on SIGHUP.
        let stamp = Stamp::of(&path);
        if !forced && stamp.is_some() && stamp == last_stamp {
            continue;
        }
        last_stamp = stamp;
        let result = match std::fs::read(&path) {
            Err(source) => Err(SourceError::Read { path: path.clone(), source }),
            Ok(bytes) if !forced && last.as_ref() == Some(&bytes) => Ok(None),
            Ok(bytes) => {
                let parsed = parse(&path, &bytes, version + 1, &namespace, &declared);
                last = Some(bytes);
                parsed.map(Some)
            }
        };
        forced = false;
        match result {
            Ok(None) => {}
            Ok(Some(snapshot)) => {
                version += 1;
                tracing::info!(path = %path.display(), version, services = snapshot.services.len(), "config applied");
                metrics.config_applied("file", version);
                store.store(snapshot);
                last_error = None;
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::error!(error = %message, kept_version = version, "config rejected; keeping the last good config");
                    metrics.config_rejected("file");
                    last_error = Some(message);
                }
            }
        }
    }
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<std::time::SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp { dev: m.dev(), ino: m.ino(), len: m.len(), mtime: m.modified().ok() })
    }
}
