//! Where the proxy's config comes from and what it becomes: the immutable snapshot, the file source, the xDS client.

pub mod destination;
pub mod file;
pub mod on_demand;
pub mod snapshot;
pub mod xds;
