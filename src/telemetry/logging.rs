//! `tracing` set-up: JSON lines when not on a terminal, human-readable on one; the level can change at run time.

use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt};

use crate::settings::LogFormat;

/// Changes the log filter of the running process (admin `PUT /log_level`).
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    pub fn set_level(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber; `level` was validated with the other settings.
pub fn init(format: LogFormat, level: &str) -> LogHandle {
    let (filter, handle) = reload::Layer::new(EnvFilter::new(level));
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer().json().flatten_event(true).with_current_span(false).with_span_list(false)
    });
    let text = (format == LogFormat::Text).then(tracing_subscriber::fmt::layer);
    tracing_subscriber::registry().with(filter).with(json).with(text).init();
    LogHandle(handle)
}
