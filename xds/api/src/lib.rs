//! What the proxy, the control plane and the CLI share: the `ferry.dev/v1alpha1` documents and their validation, the
//! `ferry.v1` protos, identities and certificates, the HTTP API's limits; with `kubernetes`, the pure Kubernetes
//! transformations (CRDs, injection, discovery's object → model mapping).
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
pub mod grpc_route;
pub mod http_api;
pub mod identity;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod meta;
pub mod policy;
pub mod protocol;
pub mod resources;
pub mod route;
pub mod workload;

pub use config::{
    API_VERSION, ConfigError, Document, Endpoint, FieldError, KINDS, Metadata, PortProtocol, Service, ServicePort,
    ServiceSpec, canonical_kind, document_json, is_dns_label, one_traffic_policy_error, parse_documents, parse_value,
    port_number, split_host_port,
};
pub use duration::{DurationError, parse_duration};

/// Lower-case hex of `bytes`, as digests, versions and trace IDs are written.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The SPIFFE trust domain of local mode: identities are `spiffe://cluster.local/ns/<namespace>/sa/<account>`.
pub const TRUST_DOMAIN: &str = "cluster.local";
