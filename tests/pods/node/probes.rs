//! Readiness as the kubelet judges it: each container's readiness probe (the rewritten `/app-health/...` ones
//! included) run from the host on the pod's IP, with the spec's period and failure threshold.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// A probe's address and path on the pod's IP; a named port is looked up among `container`'s ports.
pub(super) fn probe_target(ip: &str, container: &Value, probe: &Value) -> (SocketAddr, String) {
    let port = match &probe["httpGet"]["port"] {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(name) => container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port named {name} in {container}")),
        other => panic!("probe port {other}"),
    };
    let path = probe["httpGet"]["path"].as_str().unwrap_or("/").to_string();
    (format!("{ip}:{port}").parse().unwrap(), path)
}

/// The readiness probes of a pod's native sidecars and app containers: (address, path, period, failure threshold).
pub(super) fn readiness_probes(pod: &Pod) -> Vec<(SocketAddr, String, Duration, u32)> {
    let sidecars = pod.init_containers().into_iter().filter(|c| c["restartPolicy"] == "Always");
    let apps = pod.spec["spec"]["containers"].as_array().cloned().unwrap_or_default();
    sidecars
        .chain(apps)
        .filter(|c| c["readinessProbe"]["httpGet"].is_object())
        .map(|c| {
            let probe = &c["readinessProbe"];
            let (addr, path) = probe_target(&pod.ip, &c, probe);
            let period = Duration::from_secs(probe["periodSeconds"].as_u64().unwrap_or(10)).min(Duration::from_secs(1));
            (addr, path, period, probe["failureThreshold"].as_u64().unwrap_or(3) as u32)
        })
        .collect()
}

/// Runs the readiness probes that are due (outside the lock), terminating pods' too (their endpoints stay
/// `serving` only while they pass); whether any pod's readiness changed.
pub(super) fn probe_all(cluster: &Mutex<Cluster>) -> bool {
    let due: Vec<(String, usize, SocketAddr, String)> = {
        let cluster = cluster.lock().unwrap();
        let now = Instant::now();
        cluster
            .pods
            .iter()
            .filter(|(_, m)| m.running)
            .flat_map(|(name, m)| {
                m.probes
                    .iter()
                    .zip(&m.state)
                    .enumerate()
                    .filter(move |(_, ((_, _, period, _), (_, _, last)))| now.duration_since(*last) >= *period)
                    .map(move |(i, ((addr, path, ..), _))| (name.clone(), i, *addr, path.clone()))
            })
            .collect()
    };
    let results: Vec<(String, usize, bool)> = due
        .into_iter()
        .map(|(name, i, addr, path)| {
            let passed = crate::support::http_get(addr, &path).is_some_and(|(s, _)| (200..400).contains(&s));
            (name, i, passed)
        })
        .collect();
    let mut cluster = cluster.lock().unwrap();
    let mut changed = false;
    for (name, i, passed) in results {
        let Some(member) = cluster.pods.get_mut(&name) else { continue };
        let before = member.ready();
        let threshold = member.probes[i].3;
        let state = &mut member.state[i];
        state.2 = Instant::now();
        if passed {
            *state = (true, 0, state.2);
        } else {
            state.1 += 1;
            if state.1 >= threshold {
                state.0 = false;
            }
        }
        changed |= member.ready() != before;
    }
    changed
}
