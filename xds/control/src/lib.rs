//! The control plane (`ferry-control`): policy store, mesh CA and CSR service, delta-xDS server, HTTP API, injection
//! webhook and Kubernetes discovery.
#![forbid(unsafe_code)]

pub mod ads;
pub mod ads_transport;
pub mod api;
pub mod ca;
pub mod certify;
pub mod kubernetes;
pub mod rotation;
pub mod serving;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokens;
