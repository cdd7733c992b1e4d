//! The control plane's HTTP API as both ends see it: its limits.

/// The largest request body the API reads (and `ferryctl` sends): 4 MiB.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
