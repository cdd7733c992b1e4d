//! Kubernetes mode: the CRDs, sidecar injection (CLI and admission webhook), and discovery through the API server.

pub mod crd;
pub mod inject;
pub mod webhook;
