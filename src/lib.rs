//! Ferry's per-pod sidecar proxy: listeners, protocol detection, forwarding, config snapshot, health and admin.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod bootstrap;
pub mod detect;
pub mod drain;
pub mod errors;
pub mod init;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod snapshot;
pub mod source;
pub mod xds_client;
