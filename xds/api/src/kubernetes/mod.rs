//! Kubernetes mode: the CRDs, sidecar injection (CLI and admission webhook), and discovery through the API server.

pub mod cluster;
pub mod crd;
pub mod ctl;
pub mod discovery;
pub mod inject;
pub mod webhook;
