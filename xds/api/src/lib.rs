//! Shared between the proxy and the control plane: the `ferry.dev/v1alpha1` documents and their validation.
#![forbid(unsafe_code)]

#[cfg(feature = "server")]
pub mod ads;
#[cfg(feature = "server")]
pub mod ads_transport;
#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod ca;
#[cfg(feature = "server")]
pub mod certify;
pub mod config;
pub mod duration;
pub mod identity;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod policy;
pub mod protocol;
pub mod resources;
#[cfg(feature = "server")]
pub mod rotation;
#[cfg(feature = "server")]
pub mod serving;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tokens;
pub mod workload;

pub use config::{
    API_VERSION, ConfigError, Document, Endpoint, FieldError, KINDS, Metadata, PortProtocol, Service, ServicePort,
    ServiceSpec, canonical_kind, document_json, is_dns_label, one_traffic_policy_error, parse_documents, parse_value,
    split_host_port,
};
pub use duration::{DurationError, parse_duration};

/// The SPIFFE trust domain of local mode: identities are `spiffe://cluster.local/ns/<namespace>/sa/<account>`.
pub const TRUST_DOMAIN: &str = "cluster.local";
