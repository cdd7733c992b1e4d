//! Per-proxy status, as `ferryctl status` shows it: for each connected proxy, who and where it is and, per type,
//! the generation last sent, ACKed or NACKed, how long a push has waited, and whether the proxy is stale.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Xds;
use ferry_api::identity::Identity;
use ferry_api::protocol::short_type;

/// A push not ACKed within this long marks the proxy stale.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

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
    pub(super) pending_since: Option<Instant>,
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
    pub(super) types: Mutex<BTreeMap<&'static str, TypeStatus>>,
}

impl ProxyStatus {
    pub(super) fn update(&self, type_url: &'static str, f: impl FnOnce(&mut TypeStatus)) {
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

impl Xds {
    /// The connected proxies, as `ferryctl status` shows them.
    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let proxies: Vec<_> = self.proxies.lock().expect("proxies lock").values().map(|p| p.to_json(now)).collect();
        serde_json::json!({ "generation": self.generation(), "proxies": proxies })
    }
}
