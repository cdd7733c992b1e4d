//! The control plane (`ferry-control`): policy store, mesh CA and CSR service, delta-xDS server, HTTP API, injection
//! webhook and Kubernetes discovery.
#![forbid(unsafe_code)]

pub mod ads;
pub mod api;
pub mod buckets;
pub mod identity;
pub mod kubernetes;
pub mod metrics;
pub mod store;
