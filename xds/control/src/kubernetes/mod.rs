//! Kubernetes mode of the control plane: the watchers, TokenReview and CA Secret (`cluster`), and the admission
//! webhook (`webhook`); the transformations they apply are `ferry_api::kubernetes`'s.

pub mod cluster;
pub mod webhook;
