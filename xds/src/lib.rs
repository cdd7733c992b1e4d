//! Shared between the proxy and the control plane: the `ferry.dev/v1alpha1` documents and their validation.
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
pub mod policy;

pub use config::{
    API_VERSION, ConfigError, Document, Endpoint, FieldError, KINDS, Metadata, PortProtocol, Service, ServicePort,
    ServiceSpec, one_traffic_policy_error, parse_documents, split_host_port,
};
pub use duration::{DurationError, parse_duration};
