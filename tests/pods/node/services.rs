//! The node's Services, as kube-proxy, the endpoint-slice controller and cluster DNS would make them: Pod objects,
//! EndpointSlices, ClusterIP → pod DNAT rules in the node's chain, and each pod's `/etc/hosts`.

use std::process::{Command, Output};

use serde_json::{Value, json};

use super::*;

/// Whether a pod's labels satisfy a Service's selector.
fn selects(service: &Value, member: &Member) -> bool {
    let selector = service["spec"]["selector"].as_object();
    service["metadata"]["namespace"] == member.namespace.as_str()
        && selector.is_some_and(|s| {
            !s.is_empty() && s.iter().all(|(k, v)| &member.spec["metadata"]["labels"][k.as_str()] == v)
        })
}

/// A Service port's target on one pod: a number, or a named port among the pod's containers.
fn target_port(port: &Value, member: &Member) -> Option<u64> {
    match &port["targetPort"] {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => member.spec["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => port["port"].as_u64(),
    }
}

/// Writes what follows from the node's state: Pod objects, EndpointSlices, kube-proxy's rules and each pod's
/// `/etc/hosts` (each only when it changed).
pub(super) fn sync(cluster: &mut Cluster, chain: &str) {
    let mut writes: Vec<(String, crate::apiserver::Kind, Value)> = Vec::new();
    let mut rules = Vec::new();
    let mut names: Vec<(String, String)> = cluster.hosts.clone();
    for (name, m) in &cluster.pods {
        let mut object = m.spec.clone();
        object["metadata"]["name"] = json!(name);
        object["metadata"]["namespace"] = json!(m.namespace);
        if m.terminating {
            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let ready = if m.ready() && !m.terminating { "True" } else { "False" };
        object["status"] = json!({"phase": if m.running { "Running" } else { "Pending" }, "podIP": m.ip,
            "podIPs": [{"ip": m.ip}], "conditions": [{"type": "Ready", "status": ready}]});
        writes.push((format!("pod/{}/{name}", m.namespace), PODS, object));
    }
    for service in &cluster.services {
        let (svc, ns) =
            (service["metadata"]["name"].as_str().unwrap(), service["metadata"]["namespace"].as_str().unwrap());
        let members: Vec<(&String, &Member)> =
            cluster.pods.iter().filter(|(_, m)| m.running && selects(service, m)).collect();
        let ports = service["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let endpoints: Vec<Value> = members
            .iter()
            .map(|(name, m)| {
                json!({"addresses": [m.ip], "conditions": {"ready": m.ready() && !m.terminating,
                       "serving": m.ready(), "terminating": m.terminating},
                       "targetRef": {"kind": "Pod", "name": name, "namespace": ns, "uid": m.uid}})
            })
            .collect();
        let slice_ports: Vec<Value> = ports
            .iter()
            .filter_map(|p| {
                let target = members.iter().find_map(|(_, m)| target_port(p, m))?;
                Some(json!({"name": p["name"].as_str().unwrap_or(""), "port": target, "protocol": "TCP"}))
            })
            .collect();
        if service["spec"]["selector"].is_object() {
            let slice = json!({"metadata": {"name": format!("{svc}-node"), "namespace": ns,
                    "labels": {"kubernetes.io/service-name": svc,
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                "addressType": "IPv4", "ports": slice_ports, "endpoints": endpoints});
            writes.push((format!("slice/{ns}/{svc}"), SLICES, slice));
        }
        // kube-proxy: the ready endpoints, or those still serving while terminating when none is ready.
        let ready: Vec<&Member> =
            members.iter().filter(|(_, m)| m.ready() && !m.terminating).map(|(_, m)| *m).collect();
        let chosen =
            if ready.is_empty() { members.iter().filter(|(_, m)| m.ready()).map(|(_, m)| *m).collect() } else { ready };
        let vip = service["spec"]["clusterIP"].as_str().unwrap_or("None");
        if vip == "None" {
            if let Some(first) = chosen.first() {
                names.push((format!("{svc}.{ns}"), first.ip.clone()));
            }
            continue;
        }
        names.push((format!("{svc}.{ns}"), vip.to_string()));
        for port in &ports {
            let n = chosen.len();
            for (i, m) in chosen.iter().enumerate() {
                let Some(target) = target_port(port, m) else { continue };
                let mut rule = format!("-A {chain} -d {vip}/32 -p tcp --dport {}", port["port"]);
                if i + 1 < n {
                    rule.push_str(&format!(" -m statistic --mode random --probability {:.5}", 1.0 / (n - i) as f64));
                }
                rule.push_str(&format!(" -j DNAT --to-destination {}:{target}", m.ip));
                rules.push(rule);
            }
        }
    }
    let Some(api) = cluster.api.clone() else { return };
    for (key, kind, object) in writes {
        if cluster.written.get(&key) != Some(&object) {
            api.apply(kind, object.clone());
            cluster.written.insert(key, object);
        }
    }
    let restore = format!("*nat\n:{chain} - [0:0]\n{}\nCOMMIT\n", rules.join("\n"));
    if cluster.written.get("rules") != Some(&json!(restore)) {
        let mut child = Command::new("iptables-restore")
            .args(["--noflush", "-w"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(restore.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "iptables-restore:\n{restore}");
        cluster.written.insert("rules".into(), json!(restore));
    }
    let mut written = Vec::new();
    for m in cluster.pods.values() {
        let mut hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
            m.ip,
            m.spec["metadata"]["name"].as_str().unwrap_or_default()
        );
        for (name, ip) in &names {
            let mut aliases = vec![name.clone()];
            if let Some((svc, ns)) = name.split_once('.').filter(|(_, ns)| !ns.contains('.')) {
                aliases.extend([format!("{name}.svc"), format!("{name}.svc.cluster.local")]);
                if ns == m.namespace {
                    aliases.push(svc.to_string());
                }
            }
            hosts.push_str(&format!("{ip}\t{}\n", aliases.join(" ")));
        }
        // In place (the file is bind-mounted into the pod's containers), only when it changed, in one write before
        // the truncation, so a resolver never reads it empty.
        let key = format!("hosts/{}", m.hosts_path.display());
        if cluster.written.get(&key) != Some(&json!(hosts)) {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new().write(true).open(&m.hosts_path).unwrap();
            file.write_all(hosts.as_bytes()).unwrap();
            file.set_len(hosts.len() as u64).unwrap();
            written.push((key, json!(hosts)));
        }
    }
    cluster.written.extend(written);
}

pub(super) fn iptables(args: &[&str]) -> Output {
    // `-w`: Docker writes its own rules at the same time.
    Command::new("iptables").arg("-w").args(args).output().expect("iptables")
}

pub(super) fn iptables_must(args: &[&str]) {
    let out = iptables(args);
    assert!(out.status.success(), "iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
