//! What the proxy tells about itself: Prometheus metrics, trace context and span export, the access log, logging.

pub mod access_log;
pub mod logging;
pub mod metrics;
pub mod trace;
