//! What one proxy's pod serves — the Services that select it, with the pod ports each selects — and who may call the
//! ports no Service selects; the control plane sends it to that proxy alone as its `Workload` resource.

use std::fmt;
use std::str::FromStr;

use prost::Message;
use serde::Serialize;

use crate::config::PortProtocol;
use crate::resources::{pb, protocol_from_pb, protocol_to_pb};

/// Who may call a pod port no Service selects (`ferry-control --default-inbound-policy`, or the pod's
/// `ferry.dev/default-inbound-policy` annotation). Its mTLS mode is the mesh's (`--mtls-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultInbound {
    /// Any caller, with or without a mesh identity (Linkerd's `all-unauthenticated`; without a mesh the port was
    /// open to every pod too).
    #[default]
    Allow,
    /// Callers with a mesh identity only (Linkerd's `all-authenticated`).
    MeshOnly,
    /// Nobody.
    Deny,
}

impl DefaultInbound {
    pub const VALUES: [&'static str; 3] = ["allow", "mesh-only", "deny"];

    pub fn as_str(self) -> &'static str {
        match self {
            DefaultInbound::Allow => "allow",
            DefaultInbound::MeshOnly => "mesh-only",
            DefaultInbound::Deny => "deny",
        }
    }
}

impl fmt::Display for DefaultInbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DefaultInbound {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(DefaultInbound::Allow),
            "mesh-only" => Ok(DefaultInbound::MeshOnly),
            "deny" => Ok(DefaultInbound::Deny),
            other => Err(format!("`{other}` is not one of {}", DefaultInbound::VALUES.join(", "))),
        }
    }
}

/// One Service that selects the pod: the pod ports (the Service ports' target ports) with the protocol the Service
/// gives each.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SelectingService {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<(u16, PortProtocol)>,
}

impl SelectingService {
    /// `namespace/name`, the key policies are found by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What one pod serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Sorted by namespace and name.
    pub services: Vec<SelectingService>,
    pub default_inbound: DefaultInbound,
}

impl Workload {
    pub fn new(mut services: Vec<SelectingService>, default_inbound: DefaultInbound) -> Workload {
        for s in &mut services {
            s.ports.sort();
            s.ports.dedup();
        }
        services.sort();
        services.dedup();
        Workload { services, default_inbound }
    }

    /// The protobuf message (deterministic bytes: the control plane's versions are digests of them).
    pub fn encode(&self) -> Vec<u8> {
        pb::Workload {
            services: self
                .services
                .iter()
                .map(|s| pb::WorkloadService {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    ports: s
                        .ports
                        .iter()
                        .map(|(port, protocol)| pb::Port {
                            port: (*port).into(),
                            protocol: protocol_to_pb(*protocol) as i32,
                            ..Default::default()
                        })
                        .collect(),
                })
                .collect(),
            default_inbound_policy: match self.default_inbound {
                DefaultInbound::Allow => pb::DefaultInboundPolicy::InboundAllow,
                DefaultInbound::MeshOnly => pb::DefaultInboundPolicy::InboundMeshOnly,
                DefaultInbound::Deny => pb::DefaultInboundPolicy::InboundDeny,
            } as i32,
        }
        .encode_to_vec()
    }

    /// Decodes and checks a received message; the error names the field.
    pub fn decode(bytes: &[u8]) -> Result<Workload, String> {
        let w = pb::Workload::decode(bytes).map_err(|e| format!("not a valid protobuf message: {e}"))?;
        let default_inbound = match pb::DefaultInboundPolicy::try_from(w.default_inbound_policy) {
            Ok(pb::DefaultInboundPolicy::InboundAllow) => DefaultInbound::Allow,
            Ok(pb::DefaultInboundPolicy::InboundMeshOnly) => DefaultInbound::MeshOnly,
            Ok(pb::DefaultInboundPolicy::InboundDeny) => DefaultInbound::Deny,
            _ => return Err(format!("default_inbound_policy: unknown value {}", w.default_inbound_policy)),
        };
        let mut services = Vec::new();
        for (i, s) in w.services.into_iter().enumerate() {
            if !crate::is_dns_label(&s.namespace) || !crate::is_dns_label(&s.name) {
                return Err(format!("services[{i}]: `{}/{}` is not a Service name", s.namespace, s.name));
            }
            let mut ports = Vec::new();
            for (j, p) in s.ports.into_iter().enumerate() {
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("services[{i}].ports[{j}].port: must be 1-65535"))?;
                ports.push((port, protocol_from_pb(p.protocol)));
            }
            services.push(SelectingService { namespace: s.namespace, name: s.name, ports });
        }
        Ok(Workload::new(services, default_inbound))
    }
}

/// What one pod (Kubernetes) or one set of declared Services (local mode) serves, as the model publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadRecord {
    pub workload: Workload,
    /// Kubernetes: the pod's uid and IPs; a stream bound to the pod is checked against them.
    pub pod: Option<PodBinding>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodBinding {
    pub uid: String,
    pub ips: Vec<std::net::IpAddr>,
}

/// The Workload resource name of a pod.
pub fn pod_workload_name(namespace: &str, name: &str) -> String {
    format!("pod/{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let w = Workload::new(
            vec![
                SelectingService {
                    namespace: "shop".into(),
                    name: "web".into(),
                    ports: vec![(8080, PortProtocol::Http), (9000, PortProtocol::Tcp)],
                },
                SelectingService {
                    namespace: "shop".into(),
                    name: "api".into(),
                    ports: vec![(8080, PortProtocol::Grpc)],
                },
            ],
            DefaultInbound::MeshOnly,
        );
        assert_eq!(w.services[0].name, "api", "sorted");
        assert_eq!(Workload::decode(&w.encode()).unwrap(), w);
        assert_eq!(w.encode(), w.clone().encode());
        let bad_port = pb::Workload {
            services: vec![pb::WorkloadService {
                namespace: "shop".into(),
                name: "web".into(),
                ports: vec![pb::Port { port: 70000, ..Default::default() }],
            }],
            default_inbound_policy: 1,
        };
        assert!(Workload::decode(&bad_port.encode_to_vec()).unwrap_err().contains("services[0].ports[0].port"));
        let unset = pb::Workload { default_inbound_policy: 0, ..Default::default() };
        assert!(Workload::decode(&unset.encode_to_vec()).unwrap_err().contains("default_inbound_policy"));
        let bad_name = pb::Workload {
            services: vec![pb::WorkloadService { namespace: "Shop!".into(), name: "web".into(), ports: vec![] }],
            default_inbound_policy: 1,
        };
        assert!(Workload::decode(&bad_name.encode_to_vec()).unwrap_err().contains("services[0]"));
        for v in DefaultInbound::VALUES {
            assert_eq!(v.parse::<DefaultInbound>().unwrap().as_str(), v);
        }
        assert!("open".parse::<DefaultInbound>().is_err());
    }
}
