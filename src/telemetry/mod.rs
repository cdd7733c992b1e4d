//! What the proxy tells about itself: Prometheus metrics, trace context and span export, logging.

pub mod logging;
pub mod metrics;
pub mod trace;
