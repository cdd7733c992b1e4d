//! The control plane's Prometheus metrics, served on its metrics port: one registry that the API, the store gauges,
//! the xDS server, the CSR service, the xDS port's TLS and root rotation all record into.

use crate::store::Store;

/// The control plane's metrics (on its metrics port).
pub struct ControlMetrics {
    pub registry: prometheus::Registry,
    pub api_requests: prometheus::IntCounterVec,
    pub store_objects: prometheus::IntGaugeVec,
    pub xds_connected: prometheus::IntGauge,
    pub xds_generation: prometheus::IntGauge,
    pub xds_pushes: prometheus::IntCounterVec,
    pub xds_acks: prometheus::IntCounterVec,
    pub xds_nacks: prometheus::IntCounterVec,
    pub xds_refused: prometheus::IntCounterVec,
    pub xds_ack_seconds: prometheus::Histogram,
    pub certificates_issued: prometheus::IntCounterVec,
    pub certificates_refused: prometheus::IntCounterVec,
    pub token_reviews: prometheus::IntCounterVec,
    pub ca_root_expiry: prometheus::IntGaugeVec,
}

impl ControlMetrics {
    pub fn new() -> Self {
        let registry = prometheus::Registry::new();
        let api_requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new("ferry_control_api_requests_total", "API requests, by response status code."),
            &["code"],
        )
        .expect("valid metric");
        let store_objects = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("ferry_control_store_objects", "Objects in the store, by kind."),
            &["kind"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str, label: &str| {
            let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), &[label]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let xds_pushes = counter("ferry_control_xds_pushes_total", "xDS responses sent to proxies, by type.", "type");
        let xds_acks = counter("ferry_control_xds_acks_total", "xDS pushes ACKed by proxies, by type.", "type");
        let xds_nacks =
            counter("ferry_control_xds_nacks_total", "xDS pushes NACKed (rejected) by proxies, by type.", "type");
        let xds_refused = counter(
            "ferry_control_xds_refused_total",
            "Connections to the xDS port refused, by reason (tls: a failed handshake; missing, certificate, expired, revoked: no usable client certificate; service: a false claim; superseded: a stream closed for newer ones with the same certificate).",
            "reason",
        );
        let certificates_issued = counter(
            "ferry_control_certificates_issued_total",
            "Workload certificates signed, by credential (join-token: a first certificate; certificate: a renewal).",
            "credential",
        );
        let certificates_refused = counter(
            "ferry_control_certificate_requests_refused_total",
            "Certificate requests refused, by reason (missing, malformed, unknown, expired, revoked token; bad-request; Kubernetes: unauthenticated, audience, not-a-service-account, unbound, no-pod, mismatch, unavailable).",
            "reason",
        );
        let token_reviews = counter(
            "ferry_control_token_reviews_total",
            "Kubernetes: ServiceAccount tokens of certificate requests, by result (accepted, refused, unavailable: a TokenReview was sent; cached: an accepted token reused; rate-limited: its address had too many refused; busy: too many reviews in flight).",
            "result",
        );
        let ca_root_expiry = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "ferry_control_ca_root_expiry_timestamp_seconds",
                "Unix time at which each root of the trust bundle expires, by role (signing, next, previous).",
            ),
            &["role"],
        )
        .expect("valid metric");
        registry.register(Box::new(ca_root_expiry.clone())).expect("unique metric");
        let xds_connected =
            prometheus::IntGauge::new("ferry_control_xds_connected_proxies", "Proxies with an open xDS stream.")
                .expect("valid metric");
        let xds_generation =
            prometheus::IntGauge::new("ferry_control_xds_generation", "Generation of the published xDS model.")
                .expect("valid metric");
        let xds_ack_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("ferry_control_xds_ack_seconds", "Time from an xDS push to its ACK.")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        registry.register(Box::new(api_requests.clone())).expect("unique metric");
        registry.register(Box::new(store_objects.clone())).expect("unique metric");
        registry.register(Box::new(xds_connected.clone())).expect("unique metric");
        registry.register(Box::new(xds_generation.clone())).expect("unique metric");
        registry.register(Box::new(xds_ack_seconds.clone())).expect("unique metric");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("unique metric");
        ControlMetrics {
            registry,
            api_requests,
            store_objects,
            xds_connected,
            xds_generation,
            xds_pushes,
            xds_acks,
            xds_nacks,
            xds_refused,
            xds_ack_seconds,
            certificates_issued,
            certificates_refused,
            token_reviews,
            ca_root_expiry,
        }
    }

    /// Refreshes the store gauges (after each change and at start).
    pub fn observe_store(&self, store: &Store) {
        for kind in ferry_api::config::KINDS {
            self.store_objects.with_label_values(&[kind]).set(0);
        }
        for (kind, n) in store.counts() {
            self.store_objects.with_label_values(&[&kind]).set(n as i64);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &self.registry.gather(), &mut out)
            .expect("text encoding");
        out
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}
