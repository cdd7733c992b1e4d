//! The policy layers of the request stacks, one file per layer: each knows requests, its own config and the
//! leaves, never how connections are accepted, where config comes from or how the stacks are composed.

pub mod authz;
pub mod balance;
pub mod breaker;
pub mod concurrency;
pub mod outlier;
pub mod ratelimit;
pub mod retry;
pub mod timeout;
