//! The policy kinds of `ferry.dev/v1alpha1`: `TrafficPolicy` (caller side) and `AuthorizationPolicy` (destination side).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;
use crate::meta::{FieldError, Metadata};

// ===== durations and target references =====

/// A duration written with units (`250ms`, `2s`, `1m30s`); keeps the text it was written as. Two durations are equal
/// when they are as long (`90s` == `1m30s`).
#[derive(Debug, Clone)]
pub struct Duration {
    pub value: std::time::Duration,
    text: String,
}

impl PartialEq for Duration {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for Duration {}

impl Duration {
    pub fn as_std(&self) -> std::time::Duration {
        self.value
    }

    /// From whole milliseconds, written in the largest unit that is exact (`2s`, `1m`, `250ms`).
    pub fn from_millis(ms: u64) -> Duration {
        let text = match ms {
            0 => "0s".to_string(),
            ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        Duration { value: std::time::Duration::from_millis(ms), text }
    }

    pub fn as_millis(&self) -> u64 {
        u64::try_from(self.value.as_millis()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let value = parse_duration(s).map_err(|e| e.to_string())?;
        Ok(Duration { value, text: s.trim().to_string() })
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The CRD schema of a duration: the same grammar as [`parse_duration`], which CEL's `duration()` also reads.
#[cfg(feature = "kubernetes")]
impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": bounds::DURATION,
            "pattern": DURATION_PATTERN,
            "description": "A duration with units: 250ms, 2s, 1m30s, 1h.",
        })
    }
}

/// Durations as the CRD schema matches them (the same grammar as [`parse_duration`]).
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

/// Bounds of the policies' strings and lists, checked by the store's validation and carried by the CRD schema (so
/// that the API server can bound the cost of the CEL rules that read them).
pub mod bounds {
    /// A duration's text.
    pub const DURATION: usize = crate::duration::MAX_DURATION_TEXT;
    /// A Service or namespace name.
    pub const NAME: usize = 253;
    /// A SPIFFE ID.
    pub const IDENTITY: usize = 512;
    /// A path prefix.
    pub const PATH: usize = 1024;
    /// An HTTP method.
    pub const METHOD: usize = 32;
    /// `spec.allow` rules, and the entries of any list in a rule or in `retries.on`.
    pub const LIST: usize = 64;
}

/// The `status` of a policy object in Kubernetes mode: an `Accepted` condition (`False` with the error, naming the
/// field, when the control plane refused it).
#[cfg(feature = "kubernetes")]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default)]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// What a policy applies to: a Service in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[cfg_attr(feature = "kubernetes", schemars(extend("enum" = ["Service"])))]
    pub kind: String,
    #[cfg_attr(feature = "kubernetes", schemars(length(min = 1, max = bounds::NAME)))]
    pub name: String,
}

// ===== TrafficPolicy =====

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficPolicy {
    pub metadata: Metadata,
    pub spec: TrafficPolicySpec,
}

/// Enforced by the caller's proxy (timeouts, retries, breaker, outlier detection, load balancing) and, for
/// `rateLimit`, by the destination's proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kubernetes",
    derive(kube_derive::CustomResource, schemars::JsonSchema),
    kube(
        crates(kube_core = "::kube_core"),
        group = "ferry.dev",
        version = "v1alpha1",
        kind = "TrafficPolicy",
        root = "TrafficPolicyResource",
        namespaced,
        status = "PolicyStatus",
        shortname = "tp",
        category = "ferry",
        doc = "Timeouts, retries, circuit breaking, outlier detection and load balancing for calls to a Service \
               (enforced by the callers' proxies), and its rate limit (enforced by its own proxies).",
        printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
        printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
    ),
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.timeout) || !has(self.retries) || !has(self.retries.perTryTimeout) || duration(self.retries.perTryTimeout) <= duration(self.timeout)",
        "message": "retries.perTryTimeout is longer than timeout",
    }]))
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// The printcolumns repeat `type_ = "string"`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
pub struct TrafficPolicySpec {
    pub target_ref: TargetRef,
    /// The whole request, including retries and the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// An opaque TCP connection to the Service with no bytes either way this long is closed, by the caller's proxy
    /// and by the Service's own (Istio's `connectionPool.tcp.idleTimeout`); default the proxy's `FERRY_IDLE_TIMEOUT`
    /// (1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try.
    #[cfg_attr(feature = "kubernetes", schemars(range(max = 10)))]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// When to retry: `connect-failure`, `refused-stream`, `reset`, `5xx`, `gateway-error`, a status code such as
    /// `"503"`, or a gRPC code (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`).
    #[serde(default)]
    #[cfg_attr(
        feature = "kubernetes",
        schemars(
            length(max = bounds::LIST),
            inner(
                regex(
                    pattern = "^(connect-failure|refused-stream|reset|5xx|gateway-error|cancelled|deadline-exceeded|internal|resource-exhausted|unavailable|[1-5][0-9][0-9])$"
                ),
                length(max = bounds::METHOD)
            )
        )
    )]
    pub on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "kubernetes",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self.max) >= duration(self.base)", "message": "max is less than base",
    }]))
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries as a percentage of requests over a 10 s window (0-100).
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 0, max = 100)))]
    pub percent: f64,
    /// Retries per second always allowed.
    #[serde(default)]
    pub min_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Trip when this share of requests (0-1) failed over `interval`, with at least `minRequests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 0, max = 1), extend("exclusiveMinimum" = true)))]
    pub failure_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub min_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Or trip after this many failures in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub consecutive_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub half_open_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub max_requests: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xx")]
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub consecutive_5xx: u32,
    pub base_ejection_time: Duration,
    /// At most this share of endpoints (0-100) ejected at once.
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 0, max = 100)))]
    pub max_ejection_percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 0), extend("exclusiveMinimum" = true)))]
    pub requests_per_second: f64,
    #[cfg_attr(feature = "kubernetes", schemars(range(min = 1)))]
    pub burst: u32,
    /// One bucket per calling identity instead of one for the Service.
    #[serde(default)]
    pub per_client_identity: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency (the default).
    #[default]
    P2cEwma,
    RoundRobin,
    /// The endpoint with the fewest requests in flight.
    LeastRequest,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
// Ordered from laxest to strictest: the strictest of several Services selecting one port wins.
pub enum MtlsMode {
    /// The Service's proxies also accept plaintext from clients outside the mesh (the default).
    #[default]
    Permissive,
    /// Only mutual TLS from mesh proxies.
    Strict,
}

// ===== AuthorizationPolicy =====

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthorizationPolicy {
    pub metadata: Metadata,
    pub spec: AuthorizationPolicySpec,
}

/// Enforced by the destination's proxy: who may call the target Service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kubernetes",
    derive(kube_derive::CustomResource, schemars::JsonSchema),
    kube(
        crates(kube_core = "::kube_core"),
        group = "ferry.dev",
        version = "v1alpha1",
        kind = "AuthorizationPolicy",
        root = "AuthorizationPolicyResource",
        namespaced,
        status = "PolicyStatus",
        shortname = "ap",
        category = "ferry",
        doc = "Who may call a Service (enforced by the Service's own proxies).",
        printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
        printcolumn(name = "Default", type_ = "string", json_path = ".spec.defaultAction"),
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        ),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// The printcolumns repeat `type_ = "string"`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
pub struct AuthorizationPolicySpec {
    pub target_ref: TargetRef,
    /// What happens to a call no rule allows.
    pub default_action: Action,
    #[serde(default)]
    #[cfg_attr(feature = "kubernetes", schemars(length(max = bounds::LIST)))]
    pub allow: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One allow rule: it matches a call from one of `from` (absent: any caller, even one without an identity) to one of
/// `to` (absent: anything).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "kubernetes",
    schemars(extend("x-kubernetes-validations" = [{"rule": "has(self.from) || has(self.to)", "message": "needs `from`, `to` or both"}]))
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Operation>,
}

/// What a call does: HTTP methods, path prefixes, target ports; an empty list matches anything. An opaque TCP
/// connection has no method or path, so only rules without them can allow it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "kubernetes",
        schemars(length(max = bounds::LIST), inner(regex(pattern = "^[A-Z]+$"), length(max = bounds::METHOD)))
    )]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "kubernetes",
        schemars(length(max = bounds::LIST), inner(regex(pattern = "^/"), length(max = bounds::PATH)))
    )]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "kubernetes", schemars(length(max = bounds::LIST), inner(range(min = 1))))]
    pub ports: Vec<u16>,
}

/// Callers, by SPIFFE identity or by namespace; a rule matches a caller that matches any entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "kubernetes",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "(has(self.identities) && size(self.identities) > 0) || (has(self.namespaces) && size(self.namespaces) > 0)",
        "message": "names no identities and no namespaces",
    }]))
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    #[cfg_attr(
        feature = "kubernetes",
        schemars(
            length(max = bounds::LIST),
            inner(regex(pattern = "^spiffe://[^/]+/ns/[^/]+/sa/[^/]+$"), length(max = bounds::IDENTITY))
        )
    )]
    pub identities: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "kubernetes", schemars(length(max = bounds::LIST), inner(length(min = 1, max = bounds::NAME))))]
    pub namespaces: Vec<String>,
}

// ===== validation =====

/// The `retries.on` words besides status codes.
pub const RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

struct Check<'a>(&'a mut Vec<FieldError>);

impl Check<'_> {
    fn fail(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(FieldError { path: path.to_string(), message: message.into() });
    }
    fn percent(&mut self, path: &str, v: f64) {
        if !(0.0..=100.0).contains(&v) {
            self.fail(path, format!("must be 0-100, got {v}"));
        }
    }
    fn at_least(&mut self, path: &str, v: u32, min: u32) {
        if v < min {
            self.fail(path, format!("must be at least {min}, got {v}"));
        }
    }
    fn at_most_chars(&mut self, path: &str, s: &str, max: usize) {
        if s.len() > max {
            self.fail(path, format!("must be at most {max} characters, got {}", s.len()));
        }
    }
    fn at_most_items<T>(&mut self, path: &str, list: &[T], max: usize) {
        if list.len() > max {
            self.fail(path, format!("must have at most {max} entries, got {}", list.len()));
        }
    }
    fn positive(&mut self, path: &str, d: &Duration) {
        if d.value.is_zero() {
            self.fail(path, format!("must be more than 0s, got {d}"));
        }
    }
}

fn check_target(c: &mut Check, t: &TargetRef) {
    if t.kind != "Service" {
        c.fail("spec.targetRef.kind", format!("must be Service, got `{}`", t.kind));
    }
    if t.name.is_empty() {
        c.fail("spec.targetRef.name", "required");
    }
    c.at_most_chars("spec.targetRef.name", &t.name, bounds::NAME);
}

pub(crate) fn validate_traffic_policy(spec: &TrafficPolicySpec, errors: &mut Vec<FieldError>) {
    let c = &mut Check(errors);
    check_target(c, &spec.target_ref);
    if let Some(t) = &spec.timeout {
        c.positive("spec.timeout", t);
    }
    if let Some(t) = &spec.tcp_idle_timeout {
        c.positive("spec.tcpIdleTimeout", t);
    }
    if let Some(r) = &spec.retries {
        if r.attempts > 10 {
            c.fail("spec.retries.attempts", format!("must be 0-10, got {}", r.attempts));
        }
        if let Some(t) = &r.per_try_timeout {
            c.positive("spec.retries.perTryTimeout", t);
            if let Some(total) = &spec.timeout
                && t.value > total.value
            {
                c.fail("spec.retries.perTryTimeout", format!("{t} is longer than spec.timeout {total}"));
            }
        }
        c.at_most_items("spec.retries.on", &r.on, bounds::LIST);
        for (i, on) in r.on.iter().enumerate() {
            let code_ok = on.len() == 3 && on.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
            if !code_ok && !RETRY_ON.contains(&on.as_str()) {
                c.fail(
                    &format!("spec.retries.on[{i}]"),
                    format!(
                        "`{on}` is not a retry condition ({}, or a status code such as \"503\")",
                        RETRY_ON.join(", ")
                    ),
                );
            }
        }
        if let Some(b) = &r.backoff {
            c.positive("spec.retries.backoff.base", &b.base);
            if b.max.value < b.base.value {
                c.fail("spec.retries.backoff.max", format!("{} is less than base {}", b.max, b.base));
            }
        }
        if let Some(b) = &r.budget {
            c.percent("spec.retries.budget.percent", b.percent);
        }
    }
    if let Some(cb) = &spec.circuit_breaker {
        if let Some(r) = cb.failure_ratio
            && !(r > 0.0 && r <= 1.0)
        {
            c.fail("spec.circuitBreaker.failureRatio", format!("must be more than 0 and at most 1, got {r}"));
        }
        for (path, v) in [
            ("spec.circuitBreaker.minRequests", cb.min_requests),
            ("spec.circuitBreaker.consecutiveFailures", cb.consecutive_failures),
            ("spec.circuitBreaker.halfOpenRequests", cb.half_open_requests),
            ("spec.circuitBreaker.maxConnections", cb.max_connections),
            ("spec.circuitBreaker.maxPendingRequests", cb.max_pending_requests),
            ("spec.circuitBreaker.maxRequests", cb.max_requests),
        ] {
            if let Some(v) = v {
                c.at_least(path, v, 1);
            }
        }
        for (path, d) in [("spec.circuitBreaker.interval", &cb.interval), ("spec.circuitBreaker.openFor", &cb.open_for)]
        {
            if let Some(d) = d {
                c.positive(path, d);
            }
        }
    }
    if let Some(o) = &spec.outlier_detection {
        c.at_least("spec.outlierDetection.consecutive5xx", o.consecutive_5xx, 1);
        c.positive("spec.outlierDetection.baseEjectionTime", &o.base_ejection_time);
        c.percent("spec.outlierDetection.maxEjectionPercent", o.max_ejection_percent);
    }
    if let Some(r) = &spec.rate_limit {
        if !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite()) {
            c.fail("spec.rateLimit.requestsPerSecond", format!("must be more than 0, got {}", r.requests_per_second));
        }
        c.at_least("spec.rateLimit.burst", r.burst, 1);
    }
}

pub(crate) fn validate_authorization_policy(spec: &AuthorizationPolicySpec, errors: &mut Vec<FieldError>) {
    let c = &mut Check(errors);
    check_target(c, &spec.target_ref);
    c.at_most_items("spec.allow", &spec.allow, bounds::LIST);
    for (i, rule) in spec.allow.iter().enumerate() {
        if rule.from.is_none() && rule.to.is_none() {
            c.fail(&format!("spec.allow[{i}]"), "needs `from`, `to` or both");
        }
        if let Some(from) = &rule.from {
            if from.identities.is_empty() && from.namespaces.is_empty() {
                c.fail(&format!("spec.allow[{i}].from"), "names no identities and no namespaces");
            }
            c.at_most_items(&format!("spec.allow[{i}].from.identities"), &from.identities, bounds::LIST);
            c.at_most_items(&format!("spec.allow[{i}].from.namespaces"), &from.namespaces, bounds::LIST);
            for (j, ns) in from.namespaces.iter().enumerate() {
                let path = format!("spec.allow[{i}].from.namespaces[{j}]");
                if ns.is_empty() {
                    c.fail(&path, "must not be empty");
                }
                c.at_most_chars(&path, ns, bounds::NAME);
            }
            for (j, id) in from.identities.iter().enumerate() {
                c.at_most_chars(&format!("spec.allow[{i}].from.identities[{j}]"), id, bounds::IDENTITY);
                if !is_spiffe_id(id) {
                    c.fail(
                        &format!("spec.allow[{i}].from.identities[{j}]"),
                        format!("`{id}` must be spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (`*` as the account: any in the namespace)"),
                    );
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.methods.is_empty() && to.paths.is_empty() && to.ports.is_empty() {
                c.fail(&format!("spec.allow[{i}].to"), "names no methods, paths or ports");
            }
            c.at_most_items(&format!("spec.allow[{i}].to.methods"), &to.methods, bounds::LIST);
            c.at_most_items(&format!("spec.allow[{i}].to.paths"), &to.paths, bounds::LIST);
            c.at_most_items(&format!("spec.allow[{i}].to.ports"), &to.ports, bounds::LIST);
            for (j, m) in to.methods.iter().enumerate() {
                c.at_most_chars(&format!("spec.allow[{i}].to.methods[{j}]"), m, bounds::METHOD);
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    c.fail(
                        &format!("spec.allow[{i}].to.methods[{j}]"),
                        format!("`{m}` is not an HTTP method (GET, POST, ...)"),
                    );
                }
            }
            for (j, p) in to.paths.iter().enumerate() {
                c.at_most_chars(&format!("spec.allow[{i}].to.paths[{j}]"), p, bounds::PATH);
                if !p.starts_with('/') {
                    c.fail(&format!("spec.allow[{i}].to.paths[{j}]"), format!("`{p}` must start with /"));
                }
            }
            for (j, p) in to.ports.iter().enumerate() {
                if *p == 0 {
                    c.fail(&format!("spec.allow[{i}].to.ports[{j}]"), "must be 1-65535");
                }
            }
        }
    }
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` (`*` allowed as namespace or service account).
pub fn is_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else { return false };
    let parts: Vec<&str> = rest.split('/').collect();
    matches!(parts.as_slice(), [domain, "ns", ns, "sa", sa] if !domain.is_empty() && !ns.is_empty() && !sa.is_empty())
}

#[cfg(test)]
mod tests {
    use crate::{Document, parse_documents};

    const TRAFFIC: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: payments, namespace: default}
spec:
  targetRef: {kind: Service, name: payments}
  timeout: 2s
  retries: {attempts: 2, perTryTimeout: 500ms, on: [connect-failure, refused-stream, "503"],
            backoff: {base: 25ms, max: 250ms}, budget: {percent: 20, minPerSecond: 10}}
  circuitBreaker:
    {failureRatio: 0.6, minRequests: 3, interval: 60s, consecutiveFailures: 5, openFor: 10s,
     halfOpenRequests: 3, maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 1024}
  outlierDetection: {consecutive5xx: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}
  rateLimit: {requestsPerSecond: 100, burst: 200, perClientIdentity: false}
  loadBalancer: p2c-ewma
  mtls: permissive
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments, namespace: default}
spec: {targetRef: {kind: Service, name: payments}, defaultAction: deny,
       allow: [{from: {identities: ["spiffe://cluster.local/ns/default/sa/orders"]}}]}
"#;

    #[test]
    fn design_examples_parse() {
        let docs = parse_documents(TRAFFIC).unwrap();
        let Document::TrafficPolicy(tp) = &docs[0] else { panic!("a TrafficPolicy") };
        let retries = tp.spec.retries.as_ref().unwrap();
        assert_eq!(retries.per_try_timeout.as_ref().unwrap().as_std(), std::time::Duration::from_millis(500));
        assert_eq!(tp.spec.outlier_detection.as_ref().unwrap().consecutive_5xx, 5);
        assert!(matches!(&docs[1], Document::AuthorizationPolicy(_)));
        // Durations keep the text they were written as.
        assert_eq!(serde_json::to_value(&tp.spec).unwrap()["timeout"], "2s");
    }

    /// Each change to the valid TrafficPolicy above and the field path its error must name.
    #[test]
    fn invalid_traffic_policies_name_the_field() {
        let cases = [
            ("timeout: 2s", "timeout: banana", "spec.timeout: `banana`"),
            ("timeout: 2s", "timeout: -5s", "spec.timeout: `-5s`"),
            ("timeout: 2s", "timeout: 0s", "spec.timeout: must be more than 0s"),
            ("  timeout: 2s", "  timeout: 2s\n  tcpIdleTimeout: 0s", "spec.tcpIdleTimeout: must be more than 0s"),
            ("percent: 20", "percent: 150", "spec.retries.budget.percent: must be 0-100, got 150"),
            (
                "failureRatio: 0.6",
                "failureRatio: 1.5",
                "spec.circuitBreaker.failureRatio: must be more than 0 and at most 1",
            ),
            ("burst: 200", "burst: 0", "spec.rateLimit.burst: must be at least 1, got 0"),
            ("attempts: 2", "attempts: -1", "spec.retries.attempts"),
            ("attempts: 2", "attempts: 11", "spec.retries.attempts: must be 0-10"),
            ("\"503\"", "\"999\"", "spec.retries.on[2]: `999` is not a retry condition"),
            ("refused-stream", "sometimes", "spec.retries.on[1]"),
            ("maxEjectionPercent: 50", "maxEjectionPercent: 101", "spec.outlierDetection.maxEjectionPercent"),
            ("max: 250ms", "max: 10ms", "spec.retries.backoff.max: 10ms is less than base 25ms"),
            (
                "perTryTimeout: 500ms",
                "perTryTimeout: 5s",
                "spec.retries.perTryTimeout: 5s is longer than spec.timeout 2s",
            ),
            ("loadBalancer: p2c-ewma", "loadBalancer: fastest", "spec.loadBalancer"),
            ("mtls: permissive", "mtls: sometimes", "spec.mtls"),
            (
                "targetRef: {kind: Service, name: payments}",
                "targetRef: {kind: Pod, name: payments}",
                "spec.targetRef.kind: must be Service",
            ),
            ("  targetRef: {kind: Service, name: payments}\n", "", "spec: missing field `targetRef`"),
            ("  timeout: 2s", "  timeout: 2s\n  colour: red", "spec.colour: unknown field `colour`"),
            ("requestsPerSecond: 100", "requestsPerSecond: 0", "spec.rateLimit.requestsPerSecond: must be more than 0"),
        ];
        for (from, to, want) in cases {
            let yaml = TRAFFIC.split("---").next().unwrap().replacen(from, to, 1);
            assert_ne!(yaml, TRAFFIC.split("---").next().unwrap(), "case {from:?} did not apply");
            let err = parse_documents(&yaml).expect_err(want).to_string();
            assert!(err.contains("TrafficPolicy default/payments (document 1)"), "{to:?}: names the document: {err}");
            assert!(err.contains(want), "\n  got: {err}\n want: {want}");
        }
    }

    #[test]
    fn invalid_authorization_policies_name_the_field() {
        let base = TRAFFIC.split("---").nth(1).unwrap();
        let cases = [
            (
                "spiffe://cluster.local/ns/default/sa/orders",
                "orders",
                "spec.allow[0].from.identities[0]: `orders` must be spiffe://",
            ),
            ("defaultAction: deny", "defaultAction: maybe", "spec.defaultAction"),
            (
                "{identities: [\"spiffe://cluster.local/ns/default/sa/orders\"]}",
                "{}",
                "spec.allow[0].from: names no identities",
            ),
        ];
        for (from, to, want) in cases {
            let yaml = base.replacen(from, to, 1);
            let err = parse_documents(&yaml).expect_err(want).to_string();
            assert!(err.contains(want), "\n  got: {err}\n want: {want}");
        }
    }

    #[test]
    fn one_traffic_policy_per_service() {
        let first = TRAFFIC.split("---").next().unwrap();
        let second = first.replace("metadata: {name: payments,", "metadata: {name: payments-v2,");
        let err = parse_documents(&format!("{first}---{second}")).unwrap_err().to_string();
        assert!(err.contains("TrafficPolicy default/payments-v2"), "{err}");
        assert!(err.contains("Service `payments` already has TrafficPolicy `payments`"), "{err}");
    }

    #[test]
    fn collects_every_error() {
        let yaml = TRAFFIC
            .split("---")
            .next()
            .unwrap()
            .replace("percent: 20", "percent: 150")
            .replace("burst: 200", "burst: 0");
        let err = parse_documents(&yaml).unwrap_err();
        assert_eq!(err.documents[0].1.len(), 2, "{err}");
    }

    #[test]
    fn spiffe_ids() {
        assert!(super::is_spiffe_id("spiffe://cluster.local/ns/default/sa/orders"));
        for bad in ["orders", "spiffe://cluster.local/ns/default", "spiffe:///ns/a/sa/b", "http://x/ns/a/sa/b"] {
            assert!(!super::is_spiffe_id(bad), "{bad}");
        }
    }
}
