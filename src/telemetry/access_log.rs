//! The access log: one structured line per request (target `ferry::access`) for the share of requests
//! `FERRY_ACCESS_LOG` asks for, with the request's ID and trace context so a line can be joined to its trace.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Version};

use crate::direction::Direction;

/// What the access log and an exported span need of a request, read before it is sent (only when one of them is on).
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub version: Version,
    pub authority: String,
}

impl Seen {
    /// The HTTP version as OpenTelemetry writes it (`network.protocol.version`).
    pub fn protocol_version(&self) -> &'static str {
        match self.version {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            _ => "1.1",
        }
    }
}

/// Whether this request is logged: `share` of requests, at random.
pub fn sampled(share: f64) -> bool {
    share >= 1.0 || (share > 0.0 && crate::util::random_fraction() < share)
}

/// One line of the access log.
pub struct Entry<'a> {
    pub direction: Direction,
    pub mode: &'a str,
    pub client: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    pub peer_identity: &'a str,
    pub seen: &'a Seen,
    pub service: &'a str,
    pub upstream: Option<SocketAddr>,
    pub status: u16,
    pub elapsed: Duration,
    pub request_id: &'a str,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The proxy's error: its `reason` label and its message.
    pub error: Option<(&'static str, String)>,
}

/// Writes `entry` as one line.
pub fn write(entry: Entry<'_>) {
    let (reason, detail) = entry.error.unwrap_or_default();
    tracing::info!(
        target: "ferry::access",
        direction = entry.direction.as_str(),
        mode = entry.mode,
        client = %entry.client,
        original_dst = entry.original_dst.map(|a| a.to_string()).unwrap_or_default(),
        peer_identity = entry.peer_identity,
        method = %entry.seen.method,
        authority = %entry.seen.authority,
        path = %entry.seen.path,
        version = ?entry.seen.version,
        service = %entry.service,
        upstream = entry.upstream.map(|a| a.to_string()).unwrap_or_default(),
        status = entry.status,
        duration_ms = entry.elapsed.as_secs_f64() * 1000.0,
        request_id = entry.request_id,
        trace_id = %ferry_api::hex(&entry.trace_id),
        span_id = %ferry_api::hex(&entry.span_id),
        error = reason,
        detail = detail,
    );
}
