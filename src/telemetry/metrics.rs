//! The proxy's Prometheus metrics; label sets are bounded (no paths, no IDs, no endpoint IPs).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::direction::Direction;
use crate::util::FastMap;

/// Latency buckets from 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Message size buckets, 0 bytes to 64 MiB.
pub const SIZE_BUCKETS: &[f64] =
    &[0.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0];

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `route` label of a request no HTTPRoute rule routed.
pub const DEFAULT_ROUTE: &str = "default";

/// The labels of one request's series besides direction and service (all bounded: Services, identities, route
/// rules and fixed vocabularies; never paths, IDs or endpoint addresses).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// The calling Service: outbound, this proxy's own; inbound, the one the caller's identity serves (`unknown`).
    pub source: Arc<str>,
    /// Inbound over mTLS: the caller's verified SPIFFE ID (the label is empty otherwise).
    pub peer_identity: Option<Arc<str>>,
    /// `http1`, `http2` or `grpc`, as the caller spoke.
    pub protocol: &'static str,
    pub status: u16,
    /// gRPC calls: the `grpc-status` of the response (headers or trailers), as [`GrpcStatus::of`] bounds it.
    pub grpc_status: Option<GrpcStatus>,
    /// The `ferry-proxy-error` reason of a proxy-made response (empty for the app's own).
    pub error: &'static str,
    /// The HTTPRoute rule the request matched, `namespace/name/index` (`default`: no route applied).
    pub route: Option<Arc<str>>,
    /// The Service the last try went to when a route chose it (else the `service` itself).
    pub backend: Option<Arc<str>>,
}

/// The `grpc_status` label: one of gRPC's 17 codes, or `other` for anything else an upstream sends (its value must
/// not mint series: a `u16` alone would allow 65,536 per label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrpcStatus(u8);

impl GrpcStatus {
    const OTHER: u8 = 17;
    const LABELS: [&'static str; 18] =
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "other"];

    /// The `grpc-status` of `headers` (a response's, or its trailers), if it has one.
    pub fn of(headers: &http::HeaderMap) -> Option<GrpcStatus> {
        let value = headers.get(crate::errors::GRPC_STATUS)?;
        let code = value.to_str().ok().and_then(|v| v.parse::<u8>().ok()).filter(|c| *c < Self::OTHER);
        Some(GrpcStatus(code.unwrap_or(Self::OTHER)))
    }

    pub fn as_str(self) -> &'static str {
        Self::LABELS[usize::from(self.0)]
    }
}

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    request_size: HistogramVec,
    response_size: HistogramVec,
    /// Labelled handles per direction (inbound, outbound) and service, so the request path does not hash label values.
    request_handles: [RwLock<FastMap<String, Arc<RequestHandles>>>; 2],
    pub proxy_errors: IntCounterVec,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_failed: IntCounterVec,
    pub tcp_evicted: IntCounterVec,
    pub tcp_open: IntGaugeVec,
    pub tcp_received_bytes: IntCounterVec,
    pub tcp_sent_bytes: IntCounterVec,
    pub detections: IntCounterVec,
    pub detection_duration: HistogramVec,
    config_updates: IntCounterVec,
    config_version: IntGauge,
    /// When a config was last applied; `ferry_config_last_update_age_seconds` is computed from it at scrape time.
    last_update: std::sync::Mutex<Option<std::time::Instant>>,
    config_age: prometheus::Gauge,
    pub xds_connected: IntGauge,
    pub xds_updates: IntCounterVec,
    pub discovery_lookups: IntCounterVec,
    pub xds_version: IntGaugeVec,
    pub identity_renewals: IntCounterVec,
    pub identity_expiry: IntGauge,
    pub tls_handshakes: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub authz_decisions: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions: IntCounterVec,
    pub upstream_active: IntGaugeVec,
    pub upstream_pending: IntGaugeVec,
    pub upstream_limit: IntGaugeVec,
    pub retries: IntCounterVec,
    pub mirrors: IntCounterVec,
    pub outlier_ejections: IntCounterVec,
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounterVec,
}

/// The request metrics of one (direction, service): message sizes, and per label set a counter and a latency
/// histogram, created on first use and then found with one read-locked lookup.
pub struct RequestHandles {
    direction: &'static str,
    service: String,
    pub request_size: Histogram,
    pub response_size: Histogram,
    series: RwLock<FastMap<RequestLabels, (IntCounter, Histogram)>>,
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl RequestHandles {
    /// Counts one request with its outcome; `elapsed`: until the response headers were sent.
    pub fn record(&self, labels: RequestLabels, elapsed: Duration) {
        let handles = self.series.read().expect("metrics lock").get(&labels).cloned();
        let (counter, histogram) = match handles {
            Some(h) => h,
            None => {
                let class = STATUS_CLASSES[usize::from(labels.status / 100).clamp(1, 5) - 1];
                let grpc = labels.grpc_status.map_or("", GrpcStatus::as_str);
                let route = labels.route.as_deref().unwrap_or(DEFAULT_ROUTE);
                let backend = labels.backend.as_deref().unwrap_or(&self.service);
                let counter = self.requests.with_label_values(&[
                    self.direction,
                    &self.service,
                    route,
                    backend,
                    &labels.source,
                    labels.peer_identity.as_deref().unwrap_or(""),
                    labels.protocol,
                    class,
                    grpc,
                    labels.error,
                ]);
                let histogram = self.duration.with_label_values(&[
                    self.direction,
                    &self.service,
                    route,
                    backend,
                    &labels.source,
                    labels.protocol,
                    class,
                ]);
                let mut series = self.series.write().expect("metrics lock");
                series.entry(labels).or_insert((counter, histogram)).clone()
            }
        };
        counter.inc();
        histogram.observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let m = Metrics {
            requests: counter(
                "ferry_requests_total",
                "HTTP/gRPC requests handled, by direction, destination service, HTTPRoute rule, backend service, source service, peer identity (inbound mTLS), protocol, response status class, gRPC status and ferry-proxy-error reason.",
                &[
                    "direction",
                    "service",
                    "route",
                    "backend",
                    "source",
                    "peer_identity",
                    "protocol",
                    "status_class",
                    "grpc_status",
                    "error",
                ],
            ),
            request_duration: histogram(
                "ferry_request_duration_seconds",
                "Time from request received to response headers sent, by direction, destination service, HTTPRoute rule, backend service, source service, protocol and status class.",
                &["direction", "service", "route", "backend", "source", "protocol", "status_class"],
                LATENCY_BUCKETS,
            ),
            request_size: histogram(
                "ferry_request_size_bytes",
                "Request body sizes, by direction and destination service.",
                &["direction", "service"],
                SIZE_BUCKETS,
            ),
            response_size: histogram(
                "ferry_response_size_bytes",
                "Response body sizes, by direction and destination service.",
                &["direction", "service"],
                SIZE_BUCKETS,
            ),
            request_handles: Default::default(),
            proxy_errors: counter(
                "ferry_proxy_errors_total",
                "Errors made by the proxy (not the app), by ferry-proxy-error reason.",
                &["direction", "reason"],
            ),
            tcp_opened: counter(
                "ferry_tcp_connections_opened_total",
                "Accepted connections, by how they arrived (explicit or transparent).",
                &["direction", "mode"],
            ),
            tcp_closed: counter(
                "ferry_tcp_connections_closed_total",
                "Closed accepted connections.",
                &["direction", "mode"],
            ),
            tcp_failed: counter(
                "ferry_tcp_connections_failed_total",
                "Opaque connections not forwarded, and accepted connections refused, by direction and ferry-proxy-error reason (no route, connect refused or timed out, TLS failed, unauthorized, rate-limited, detect-timeout; declared-http: an opaque stream to a port declared HTTP; overloaded: the listener at its connection cap with every connection busy).",
                &["direction", "reason"],
            ),
            tcp_evicted: counter(
                "ferry_tcp_connections_evicted_total",
                "Connections closed to make room for a new one at the listener's cap (FERRY_MAX_CONNECTIONS): the oldest that had not sent a request, else the oldest with none in flight.",
                &["direction"],
            ),
            tcp_open: gauge_vec("ferry_tcp_connections_open", "Accepted connections now open.", &["direction", "mode"]),
            tcp_received_bytes: counter(
                "ferry_tcp_received_bytes_total",
                "Bytes received from downstream peers on accepted connections.",
                &["direction", "mode"],
            ),
            tcp_sent_bytes: counter(
                "ferry_tcp_sent_bytes_total",
                "Bytes sent to downstream peers on accepted connections.",
                &["direction", "mode"],
            ),
            detections: counter(
                "ferry_protocol_detections_total",
                "Protocol detection outcomes per accepted connection.",
                &["direction", "protocol", "reason"],
            ),
            detection_duration: histogram(
                "ferry_protocol_detection_duration_seconds",
                "Time spent detecting the protocol of a connection.",
                &["direction"],
                LATENCY_BUCKETS,
            ),
            config_updates: counter(
                "ferry_config_updates_total",
                "Config updates from the config source, applied or rejected.",
                &["source", "result"],
            ),
            config_version: IntGauge::new("ferry_config_version", "Version of the live config snapshot.")
                .expect("valid metric"),
            last_update: std::sync::Mutex::new(None),
            config_age: prometheus::Gauge::new(
                "ferry_config_last_update_age_seconds",
                "Seconds since a config was last applied (-1 before the first).",
            )
            .expect("valid metric"),
            xds_connected: IntGauge::new("ferry_xds_connected", "1 while the xDS stream to the control plane is up.")
                .expect("valid metric"),
            discovery_lookups: counter(
                "ferry_discovery_lookups_total",
                "On-demand lookups of a destination this proxy did not know, by answer: found, absent (the control \
                 plane knows no Service there), cached (absent, answered earlier), unavailable (no answer: the \
                 control plane is down or slow).",
                &["result"],
            ),
            xds_updates: counter(
                "ferry_xds_updates_total",
                "xDS responses answered, by resource type and result (ack, nack).",
                &["type", "result"],
            ),
            xds_version: gauge_vec(
                "ferry_xds_version",
                "Control-plane generation of the last ACKed xDS response, by resource type.",
                &["type"],
            ),
            identity_renewals: counter(
                "ferry_identity_certificate_requests_total",
                "Workload certificate requests to the control plane (first and renewals), by result (ok, error).",
                &["result"],
            ),
            identity_expiry: IntGauge::new(
                "ferry_identity_certificate_expiry_timestamp_seconds",
                "Unix time at which the proxy's current workload certificate expires (0 before the first).",
            )
            .expect("valid metric"),
            tls_handshakes: counter(
                "ferry_tls_handshakes_total",
                "Completed mesh TLS handshakes, by direction (inbound: as server; outbound: as client).",
                &["direction"],
            ),
            tls_handshake_failures: counter(
                "ferry_tls_handshake_failures_total",
                "Failed mesh TLS handshakes and refused peers, by direction and reason.",
                &["direction", "reason"],
            ),
            authz_decisions: counter(
                "ferry_authz_decisions_total",
                "Inbound authorization decisions (mTLS mode and AuthorizationPolicy), by local service and decision.",
                &["service", "decision"],
            ),
            rate_limited: counter(
                "ferry_rate_limited_total",
                "Inbound requests refused by the local Service's rate limit (429 rate-limited), by local service.",
                &["service"],
            ),
            breaker_state: gauge_vec(
                "ferry_circuit_breaker_state",
                "Circuit breaker of each destination Service: 0 closed, 1 open, 2 half-open.",
                &["service"],
            ),
            breaker_transitions: counter(
                "ferry_circuit_breaker_transitions_total",
                "Circuit breaker transitions, by destination Service and the state entered.",
                &["service", "to"],
            ),
            upstream_active: gauge_vec(
                "ferry_upstream_requests_active",
                "Requests in flight to each destination Service under a maxRequests limit.",
                &["service"],
            ),
            upstream_pending: gauge_vec(
                "ferry_upstream_requests_pending",
                "Requests waiting for a slot under each destination Service's maxRequests limit.",
                &["service"],
            ),
            upstream_limit: gauge_vec(
                "ferry_upstream_requests_limit",
                "Each destination Service's maxRequests limit (set once a request met it).",
                &["service"],
            ),
            retries: counter(
                "ferry_retries_total",
                "Retries by destination Service and result (attempted, exhausted: the policy's attempts used up, budget-denied).",
                &["service", "result"],
            ),
            mirrors: counter(
                "ferry_request_mirrors_total",
                "Copies of requests made by HTTPRoute RequestMirror filters, by rule (route), mirror Service and outcome: mirrored (the mirror answered, not 5xx), failed (no answer in time, a 5xx, or a mirror that does not resolve), dropped (not sent: the copies in flight were at their cap, or the body was over the copy buffer or not read to its end).",
                &["route", "mirror", "outcome"],
            ),
            trace_spans_exported: IntCounter::new(
                "ferry_trace_spans_exported_total",
                "Spans accepted by the OTLP collector (FERRY_OTLP_ENDPOINT).",
            )
            .expect("valid metric"),
            trace_spans_dropped: counter(
                "ferry_trace_spans_dropped_total",
                "Sampled spans not exported, by reason: queue-full (the export queue of 4,096 was full), export-failed (the collector refused the batch, was unreachable or took over 5 s).",
                &["reason"],
            ),
            outlier_ejections: counter(
                "ferry_outlier_ejections_total",
                "Outlier detection events by destination Service: ejected, skipped (the maximum share of endpoints was already ejected), recovered (a readmitted endpoint answered).",
                &["service", "event"],
            ),
            registry,
        };
        m.registry.register(Box::new(m.identity_expiry.clone())).expect("unique metric");
        for result in ["ok", "error"] {
            m.identity_renewals.with_label_values(&[result]);
        }
        m.registry.register(Box::new(m.config_version.clone())).expect("unique metric");
        m.registry.register(Box::new(m.config_age.clone())).expect("unique metric");
        m.registry.register(Box::new(m.xds_connected.clone())).expect("unique metric");
        m.registry.register(Box::new(m.trace_spans_exported.clone())).expect("unique metric");
        for reason in ["queue-full", "export-failed"] {
            m.trace_spans_dropped.with_label_values(&[reason]);
        }
        m.config_age.set(-1.0);
        for t in ["Service", "TrafficPolicy", "AuthorizationPolicy", "TrustBundle"] {
            for result in ["ack", "nack"] {
                m.xds_updates.with_label_values(&[t, result]);
            }
        }
        // Series exist from the start, so dashboards and rate() see zeros rather than nothing.
        for d in ["inbound", "outbound"] {
            for mode in ["explicit", "transparent"] {
                for c in [&m.tcp_opened, &m.tcp_closed, &m.tcp_received_bytes, &m.tcp_sent_bytes] {
                    c.with_label_values(&[d, mode]);
                }
                m.tcp_open.with_label_values(&[d, mode]);
            }
            m.tls_handshakes.with_label_values(&[d]);
        }
        let build = IntGaugeVec::new(Opts::new("ferry_build_info", "Build of the running proxy."), &["version"])
            .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(build)).expect("unique metric");
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("unique metric");
        m
    }

    /// Request metrics of one (direction, service), created on first use.
    pub fn requests(&self, direction: Direction, service: &str) -> Arc<RequestHandles> {
        let map = &self.request_handles[direction as usize];
        if let Some(h) = map.read().expect("metrics lock").get(service) {
            return h.clone();
        }
        let labels = [direction.as_str(), service];
        let handles = Arc::new(RequestHandles {
            direction: direction.as_str(),
            service: service.to_string(),
            request_size: self.request_size.with_label_values(&labels),
            response_size: self.response_size.with_label_values(&labels),
            series: Default::default(),
            requests: self.requests.clone(),
            duration: self.request_duration.clone(),
        });
        map.write().expect("metrics lock").entry(service.to_string()).or_insert(handles).clone()
    }

    pub fn proxy_error(&self, direction: Direction, reason: &str) {
        self.proxy_errors.with_label_values(&[direction.as_str(), reason]).inc();
    }

    /// Records that config source `source` (`file`, `xds`) applied snapshot `version` now.
    pub fn config_applied(&self, source: &str, version: u64) {
        self.config_version.set(version as i64);
        self.config_updates.with_label_values(&[source, "applied"]).inc();
        *self.last_update.lock().expect("metrics lock") = Some(std::time::Instant::now());
    }

    /// Records that config source `source` refused an update (the live snapshot stays).
    pub fn config_rejected(&self, source: &str) {
        self.config_updates.with_label_values(&[source, "rejected"]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        if let Some(at) = *self.last_update.lock().expect("metrics lock") {
            self.config_age.set(at.elapsed().as_secs_f64());
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
