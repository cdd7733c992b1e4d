//! Ferry's per-pod sidecar proxy: listeners, protocol detection, forwarding, config snapshot, health and admin.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod direction;
pub mod discovery;
pub mod errors;
pub mod identity;
pub mod init;
pub mod listen;
pub mod policy;
pub mod settings;
pub mod stack;
pub mod telemetry;
pub mod util;
