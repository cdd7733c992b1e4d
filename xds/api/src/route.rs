//! Gateway API `HTTPRoute` attached to Services (GAMMA), pinned to Gateway API v1.4.0's standard channel: the
//! document and its validation, and the pure choice of a rule and a backend for one request.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{FieldError, Metadata};

/// The Gateway API release whose standard-channel `HTTPRoute` Ferry implements.
pub const GATEWAY_API_RELEASE: &str = "v1.4.0";
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const HTTP_ROUTE_API_VERSION: &str = "gateway.networking.k8s.io/v1";
pub const REFERENCE_GRANT_API_VERSION: &str = "gateway.networking.k8s.io/v1beta1";

/// The most rules a route may have, matches a rule may have, and matches in all (the upstream CRD's bounds).
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_MATCHES_TOTAL: usize = 128;
/// Headers and query parameters per match, backends per rule, parents per route (the CRD's bounds).
const MAX_CONDITIONS: usize = 16;
const MAX_BACKENDS: usize = 16;
const MAX_PARENTS: usize = 32;
/// A regular expression's source, and its compiled program (the `regex` crate matches in linear time; this bounds
/// its memory).
pub const MAX_REGEX_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// An `HTTPRoute` as accepted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpRoute {
    pub metadata: Metadata,
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Ignored for Service parents (GAMMA): kept as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default = "default_rules")]
    pub rules: Vec<HttpRouteRule>,
}

fn default_rules() -> Vec<HttpRouteRule> {
    vec![HttpRouteRule {
        name: None,
        matches: default_matches(),
        filters: Vec::new(),
        backend_refs: Vec::new(),
        timeouts: None,
        retry: None,
    }]
}

/// A parent: for a mesh route, a Service (`group: ""`, `kind: Service`), optionally one of its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// `""` (the core group) for a Service; the upstream default is the Gateway API group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service` for a mesh route; the upstream default is `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The route's own namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// Only requests to this port of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl ParentRef {
    /// Whether this parent is a Service (group `""` or `core`, kind `Service`), the only parent a mesh route has.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), Some("" | "core")) && self.kind.as_deref() == Some("Service")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one of them selects the rule; none written means every request (`PathPrefix /`).
    #[serde(default = "default_matches")]
    pub matches: Vec<HttpRouteMatch>,
    /// Applied once to each request the rule takes (not per try), and to its response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// GEP-1742: they replace the Service's TrafficPolicy `timeout` and `retries.perTryTimeout` for this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// GEP-1731 (Gateway API's experimental channel in v1.4.0): replaces the Service's TrafficPolicy `retries` for
    /// this rule, still spending the Service's retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRouteRetry>,
}

/// `HTTPRouteRetry` (GEP-1731): a try that fails to connect, is refused or reset, or answers one of `codes` is
/// retried, up to `attempts` times, at least `backoff` apart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    /// HTTP status codes (400-599) whose responses are retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Retries after the first try (1 when unset; 0 turns retries off for the rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The least wait between tries (a Gateway API duration); the Service's backoff when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// The most retries a rule may ask for (as a TrafficPolicy's `retries.attempts`).
const MAX_RETRY_ATTEMPTS: u32 = 10;

/// Validates a rule's `retry` (`path` = `spec.rules[i].retry`).
pub(crate) fn validate_retry(path: &str, r: &HttpRouteRetry, errors: &mut Vec<FieldError>) {
    for (i, code) in r.codes.iter().enumerate() {
        if !(400..=599).contains(code) {
            errors.push(field(format!("{path}.codes[{i}]"), format!("{code} must be 400-599")));
        }
    }
    if r.codes.len() > MAX_CONDITIONS {
        errors.push(field(format!("{path}.codes"), format!("at most {MAX_CONDITIONS}")));
    }
    if let Some(a) = r.attempts.filter(|a| *a > MAX_RETRY_ATTEMPTS) {
        errors.push(field(format!("{path}.attempts"), format!("{a} must be 0-{MAX_RETRY_ATTEMPTS}")));
    }
    if let Some(b) = r.backoff.as_deref().filter(|b| gateway_duration(b).is_none()) {
        errors.push(field(format!("{path}.backoff"), format!("`{b}` is not a Gateway API duration (1s, 500ms)")));
    }
}

/// `HTTPRouteTimeouts` (GEP-1742), Gateway API durations (GEP-2257: `1h`, `30s`, `500ms`, `1m30s`); `0s` turns the
/// timeout off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// The whole request, retries and the response body included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Each try to a backend, until its response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// A rule's timeouts, parsed: `None` leaves the Service's; `Some(ZERO)` turns it off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleTimeouts {
    pub request: Option<std::time::Duration>,
    pub backend_request: Option<std::time::Duration>,
}

impl HttpRouteTimeouts {
    /// Parsed (validated values; one that does not parse is left unset).
    pub fn parsed(&self) -> RuleTimeouts {
        let parse = |t: &Option<String>| t.as_deref().and_then(gateway_duration);
        RuleTimeouts { request: parse(&self.request), backend_request: parse(&self.backend_request) }
    }
}

/// Pure: whether `text` is a Gateway API duration (GEP-2257): 1 to 4 groups of 1 to 5 digits and a unit (`h`, `m`,
/// `s`, `ms`).
pub fn is_gateway_duration(text: &str) -> bool {
    let mut rest = text;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "h", "m", "s"].into_iter().find(|u| rest.starts_with(u));
        let Some(unit) = unit else { return false };
        rest = &rest[unit.len()..];
        groups += 1;
    }
    (1..=4).contains(&groups)
}

/// A Gateway API duration's value (`None`: not one, or out of range).
pub fn gateway_duration(text: &str) -> Option<std::time::Duration> {
    is_gateway_duration(text).then(|| crate::parse_duration(text).ok()).flatten()
}

/// Validates a rule's `timeouts` (`path` = `spec.rules[i].timeouts`).
pub(crate) fn validate_timeouts(path: &str, t: &HttpRouteTimeouts, errors: &mut Vec<FieldError>) {
    for (name, value) in [("request", &t.request), ("backendRequest", &t.backend_request)] {
        if let Some(v) = value.as_deref().filter(|v| gateway_duration(v).is_none()) {
            errors.push(field(
                format!("{path}.{name}"),
                format!("`{v}` is not a Gateway API duration (1h, 30s, 500ms, 1m30s)"),
            ));
        }
    }
    let parsed = t.parsed();
    if let (Some(request), Some(backend)) = (parsed.request, parsed.backend_request)
        && !request.is_zero()
        && backend > request
    {
        errors.push(field(format!("{path}.backendRequest"), "must not be longer than request"));
    }
}

/// A rule's filter (`HTTPRouteFilter`); Ferry supports the header modifiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

/// `HTTPRequestMirrorFilter`: a copy of each request (or of `percent` or `fraction` of them) goes to another
/// Service, fire and forget: its answer is dropped, and it never delays or fails the request itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    pub backend_ref: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

impl RequestMirror {
    /// The share of requests copied, as (numerator, denominator): every one when neither is set.
    pub fn share(&self) -> (u32, u32) {
        match (&self.percent, &self.fraction) {
            (Some(p), _) => (*p, 100),
            (None, Some(f)) => (f.numerator, f.denominator.unwrap_or(100)),
            (None, None) => (1, 1),
        }
    }
}

/// `Fraction`: `numerator` of every `denominator` (100 when unset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denominator: Option<u32>,
}

/// `BackendObjectReference`: a Service (the only kind Ferry resolves), with the port requests go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// The route's namespace when unset; another one needs a ReferenceGrant there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Required for a Service (the upstream CRD's rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl ObjectRef {
    /// Whether it names a Service.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), None | Some("" | "core"))
            && matches!(self.kind.as_deref(), None | Some("Service"))
    }
}

/// `HTTPRequestRedirectFilter`: the proxy answers with a redirect (the rule has no backends); what is unset is the
/// request's own (a `scheme` without a `port` drops the port: the scheme's well-known one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 302 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

/// `HTTPURLRewriteFilter`: the request goes on with another host and/or path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// `HTTPPathModifier`: the whole path, or the part the rule's `PathPrefix` match matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

impl PathModifier {
    /// Pure: `path` modified; `prefix` is the `PathPrefix` value the request matched (without a trailing `/`).
    pub fn apply(&self, path: &str, prefix: Option<&str>) -> String {
        match self.kind {
            PathModifierType::ReplaceFullPath => self.replace_full_path.clone().unwrap_or_else(|| "/".into()),
            PathModifierType::ReplacePrefixMatch => {
                let with = self.replace_prefix_match.as_deref().unwrap_or("/").trim_end_matches('/');
                let rest = prefix.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
                let joined = format!("{with}{rest}");
                if joined.is_empty() { "/".into() } else { joined }
            }
        }
    }
}

/// What a rule's matches and backends are, for the filters that depend on them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleShape {
    /// Every match is a `PathPrefix` (`ReplacePrefixMatch` needs one).
    pub all_prefix: bool,
    pub backends: usize,
}

impl RuleShape {
    pub(crate) fn of(matches: &[HttpRouteMatch], backends: usize) -> RuleShape {
        RuleShape { all_prefix: matches.iter().all(|m| m.path.kind == PathMatchType::PathPrefix), backends }
    }
}

/// `HTTPHeaderFilter`: headers set (replacing any of the name), added (after any of the name) and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderPair>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderPair>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderPair {
    pub name: String,
    pub value: String,
}

/// Headers only Ferry writes (the caller's verified identity, the caller's HTTP version between proxies): no filter
/// may set, add or remove them, in any spelling an app could read as the same name.
pub const FERRY_OWNED_HEADERS: [&str; 2] = ["ferry-client-id", "ferry-orig-proto"];

/// Headers that belong to the connection or the request line, not to what a filter may change (`Host` is changed
/// by `URLRewrite`).
const UNMODIFIABLE_HEADERS: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "host", "content-length"];

/// The upstream CRD's bounds: 16 entries per list, names up to 256 characters, values up to 4,096.
const MAX_HEADER_ENTRIES: usize = 16;
const MAX_HEADER_NAME: usize = 256;
const MAX_HEADER_VALUE: usize = 4096;

/// Validates one rule's `filters` (`path` = `spec.rules[i].filters`).
pub(crate) fn validate_filters(path: &str, filters: &[HttpRouteFilter], rule: RuleShape, errors: &mut Vec<FieldError>) {
    if filters.len() > MAX_RULES {
        errors.push(field(path.to_string(), format!("at most {MAX_RULES}")));
    }
    let mut seen = BTreeMap::new();
    for (i, f) in filters.iter().enumerate() {
        let path = format!("{path}[{i}]");
        let present = [
            ("requestHeaderModifier", f.request_header_modifier.is_some()),
            ("responseHeaderModifier", f.response_header_modifier.is_some()),
            ("requestRedirect", f.request_redirect.is_some()),
            ("urlRewrite", f.url_rewrite.is_some()),
            ("requestMirror", f.request_mirror.is_some()),
        ];
        let expected = match f.kind.as_str() {
            "RequestHeaderModifier" => "requestHeaderModifier",
            "ResponseHeaderModifier" => "responseHeaderModifier",
            "RequestRedirect" => "requestRedirect",
            "URLRewrite" => "urlRewrite",
            "RequestMirror" => "requestMirror",
            other => {
                let why = format!(
                    "`{other}` is not a filter Ferry supports (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)"
                );
                errors.push(field(format!("{path}.type"), why));
                continue;
            }
        };
        if !present.iter().all(|(name, set)| *set == (*name == expected)) {
            errors.push(field(format!("{path}.{expected}"), format!("required with type {} (and only it)", f.kind)));
            continue;
        }
        // Each type at most once, but for RequestMirror: a request may be copied to several Services.
        if let Some(first) = seen.insert(f.kind.clone(), i)
            && f.kind != "RequestMirror"
        {
            errors.push(field(
                format!("{path}.type"),
                format!("{} is also filters[{first}]: at most one of each", f.kind),
            ));
        }
        if let Some(m) = &f.request_header_modifier {
            validate_header_modifier(&format!("{path}.requestHeaderModifier"), m, errors);
        }
        if let Some(m) = &f.response_header_modifier {
            validate_header_modifier(&format!("{path}.responseHeaderModifier"), m, errors);
        }
        if let Some(r) = &f.request_redirect {
            let path = format!("{path}.requestRedirect");
            if rule.backends > 0 {
                errors.push(field(
                    path.clone(),
                    "a redirect is answered by the proxy: the rule's backendRefs must be empty",
                ));
            }
            if let Some(scheme) = r.scheme.as_deref().filter(|s| !matches!(*s, "http" | "https")) {
                errors.push(field(format!("{path}.scheme"), format!("`{scheme}` must be http or https")));
            }
            if r.port == Some(0) {
                errors.push(field(format!("{path}.port"), "must be 1-65535"));
            }
            if let Some(code) = r.status_code.filter(|c| ![301, 302, 303, 307, 308].contains(c)) {
                errors.push(field(format!("{path}.statusCode"), format!("{code} must be 301, 302, 303, 307 or 308")));
            }
            validate_rewrite_parts(&path, r.hostname.as_deref(), r.path.as_ref(), rule, errors);
        }
        if let Some(r) = &f.url_rewrite {
            validate_rewrite_parts(&format!("{path}.urlRewrite"), r.hostname.as_deref(), r.path.as_ref(), rule, errors);
        }
        if let Some(m) = &f.request_mirror {
            validate_mirror(&format!("{path}.requestMirror"), m, errors);
        }
    }
    if seen.contains_key("RequestRedirect") && seen.contains_key("URLRewrite") {
        errors.push(field(path.to_string(), "RequestRedirect and URLRewrite cannot be used together"));
    }
}

fn validate_mirror(path: &str, m: &RequestMirror, errors: &mut Vec<FieldError>) {
    let b = &m.backend_ref;
    validate_service_ref(
        &format!("{path}.backendRef"),
        b.is_service(),
        &b.name,
        b.namespace.as_deref(),
        b.port,
        errors,
    );
    if b.port.is_none() {
        errors.push(field(format!("{path}.backendRef.port"), "required for a Service"));
    }
    if m.percent.is_some() && m.fraction.is_some() {
        errors.push(field(path.to_string(), "percent and fraction cannot both be set"));
    }
    if let Some(p) = m.percent.filter(|p| *p > 100) {
        errors.push(field(format!("{path}.percent"), format!("{p} must be 0-100")));
    }
    if let Some(f) = &m.fraction {
        let denominator = f.denominator.unwrap_or(100);
        if denominator == 0 || denominator > 1_000_000 {
            errors.push(field(format!("{path}.fraction.denominator"), "must be 1-1000000"));
        } else if f.numerator > denominator {
            errors.push(field(format!("{path}.fraction.numerator"), "must not be above the denominator"));
        }
    }
}

/// A reference to a Service (a backend or a mirror): what the upstream CRD and Ferry require of it.
fn validate_service_ref(
    path: &str,
    is_service: bool,
    name: &str,
    namespace: Option<&str>,
    port: Option<u16>,
    errors: &mut Vec<FieldError>,
) {
    if !is_service {
        errors.push(field(path.to_string(), "Ferry resolves Service backends only (`group: \"\"`, `kind: Service`)"));
    }
    if !crate::meta::is_dns_label(name) {
        errors.push(field(format!("{path}.name"), format!("`{name}` must be a Service name")));
    }
    if let Some(ns) = namespace
        && !crate::meta::is_dns_label(ns)
    {
        errors.push(field(format!("{path}.namespace"), format!("`{ns}` must be a namespace name")));
    }
    if port == Some(0) {
        errors.push(field(format!("{path}.port"), "must be 1-65535"));
    }
}

/// A redirect's or a rewrite's `hostname` (a DNS name, no port) and `path`.
fn validate_rewrite_parts(
    path: &str,
    hostname: Option<&str>,
    modifier: Option<&PathModifier>,
    rule: RuleShape,
    errors: &mut Vec<FieldError>,
) {
    if let Some(h) = hostname {
        let labels_ok = h.split('.').all(|l| !l.is_empty() && l.len() <= 63 && crate::meta::is_dns_label(l));
        if h.len() > 253 || !labels_ok {
            errors.push(field(format!("{path}.hostname"), format!("`{h}` must be a DNS name (lower case, no port)")));
        }
    }
    let Some(m) = modifier else { return };
    let (want, value, other) = match m.kind {
        PathModifierType::ReplaceFullPath => ("replaceFullPath", &m.replace_full_path, &m.replace_prefix_match),
        PathModifierType::ReplacePrefixMatch => ("replacePrefixMatch", &m.replace_prefix_match, &m.replace_full_path),
    };
    match value {
        None => errors.push(field(format!("{path}.path.{want}"), format!("required with type {:?}", m.kind))),
        Some(v) => {
            if let Err(why) = check_literal_path(v) {
                errors.push(field(format!("{path}.path.{want}"), why));
            }
        }
    }
    if other.is_some() {
        errors.push(field(format!("{path}.path"), format!("only {want} goes with type {:?}", m.kind)));
    }
    if m.kind == PathModifierType::ReplacePrefixMatch && !rule.all_prefix {
        errors.push(field(format!("{path}.path"), "ReplacePrefixMatch needs the rule's matches to be PathPrefix"));
    }
}

fn validate_header_modifier(path: &str, m: &HeaderModifier, errors: &mut Vec<FieldError>) {
    let names = m.set.iter().map(|h| ("set", h.name.as_str())).chain(m.add.iter().map(|h| ("add", h.name.as_str())));
    let names = names.chain(m.remove.iter().map(|n| ("remove", n.as_str())));
    let mut per_list: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (list, name) in names {
        let i = index.entry(list).or_default();
        let at = format!("{path}.{list}[{i}]{}", if list == "remove" { "" } else { ".name" });
        *i += 1;
        let lower = name.to_ascii_lowercase();
        let spelled = lower.replace('_', "-");
        if !is_token(name) || name.len() > MAX_HEADER_NAME {
            errors.push(field(
                at,
                format!("`{name}` is not a header name (an HTTP token of at most {MAX_HEADER_NAME} characters)"),
            ));
        } else if FERRY_OWNED_HEADERS.contains(&spelled.as_str()) {
            errors.push(field(at, format!("`{name}` is Ferry's own header: a filter may not change it")));
        } else if UNMODIFIABLE_HEADERS.contains(&lower.as_str()) {
            errors.push(field(
                at,
                format!("`{name}` belongs to the connection or the request line: a filter may not change it"),
            ));
        } else if per_list.entry(list).or_default().contains(&lower) {
            errors.push(field(at, format!("`{name}` is listed twice")));
        } else {
            per_list.entry(list).or_default().push(lower);
        }
    }
    // A name both changed and removed would depend on the order they are applied in: refused.
    let removed = per_list.get("remove").cloned().unwrap_or_default();
    for (list, pairs) in [("set", &m.set), ("add", &m.add)] {
        for (i, h) in pairs.iter().enumerate() {
            if removed.contains(&h.name.to_ascii_lowercase()) {
                errors.push(field(format!("{path}.{list}[{i}].name"), format!("`{}` is also in remove", h.name)));
            }
        }
    }
    for (list, len) in [("set", m.set.len()), ("add", m.add.len()), ("remove", m.remove.len())] {
        if len > MAX_HEADER_ENTRIES {
            errors.push(field(format!("{path}.{list}"), format!("at most {MAX_HEADER_ENTRIES}")));
        }
    }
    for (list, pairs) in [("set", &m.set), ("add", &m.add)] {
        for (i, h) in pairs.iter().enumerate() {
            let ok =
                h.value.len() <= MAX_HEADER_VALUE && h.value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
            if !ok {
                errors.push(field(
                    format!("{path}.{list}[{i}].value"),
                    format!("at most {MAX_HEADER_VALUE} visible ASCII characters, spaces and tabs"),
                ));
            }
        }
    }
}

fn default_matches() -> Vec<HttpRouteMatch> {
    vec![HttpRouteMatch::default()]
}

/// All of its conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(default = "default_path")]
    pub path: PathMatch,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

fn default_path() -> PathMatch {
    PathMatch::default()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    #[serde(default = "root")]
    pub value: String,
}

fn root() -> String {
    "/".to_string()
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch { kind: PathMatchType::PathPrefix, value: root() }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header or query-parameter condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

/// A GRPCRoute match (the document and its validation: [`crate::grpc_route`]); the table runs it as a path match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Unset: every method of every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
}

/// `GRPCMethodMatch`: the service (`package.Service`) and/or the method, exactly or as regular expressions; an unset
/// one matches any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl GrpcRouteMatch {
    /// Pure: the same match on the request path: service and method → `Exact /service/method`; a service alone →
    /// `PathPrefix /service`; a method alone, or expressions → a `RegularExpression` over `/service/method`; neither
    /// → every path. Headers are kept.
    pub fn to_http(&self) -> HttpRouteMatch {
        let path = match &self.method {
            None => PathMatch::default(),
            Some(m) => match (m.kind, m.service.as_deref(), m.method.as_deref()) {
                (ValueMatchType::Exact, Some(s), Some(m)) => {
                    PathMatch { kind: PathMatchType::Exact, value: format!("/{s}/{m}") }
                }
                (ValueMatchType::Exact, Some(s), None) => {
                    PathMatch { kind: PathMatchType::PathPrefix, value: format!("/{s}") }
                }
                (ValueMatchType::Exact, None, m) => PathMatch {
                    kind: PathMatchType::RegularExpression,
                    value: format!("/[^/]+/{}", m.map(regex::escape).unwrap_or_else(|| "[^/]+".into())),
                },
                (ValueMatchType::RegularExpression, s, m) => PathMatch {
                    kind: PathMatchType::RegularExpression,
                    value: format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+")),
                },
            },
        };
        HttpRouteMatch { path, headers: self.headers.clone(), query_params: Vec::new(), method: None }
    }

    /// Sort key per the GRPCRoute spec: the longer service, then the longer method, then more headers; then the
    /// older route, `namespace/name`, rule order and match order (as HTTPRoute's).
    pub fn precedence(&self, created: i64, key: &str, rule: usize, index: usize) -> Precedence {
        let len = |s: Option<&String>| s.map_or(0, String::len);
        let (service, method) =
            self.method.as_ref().map_or((0, 0), |m| (len(m.service.as_ref()), len(m.method.as_ref())));
        (
            0,
            Reverse(service),
            false,
            Reverse(method),
            Reverse(self.headers.len()),
            created,
            key.to_string(),
            rule,
            index,
        )
    }
}

/// A backend: a Service (the rule's traffic split), with a weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// The route's namespace when unset; another one needs a ReferenceGrant there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The backend Service's port; the request's port when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "one")]
    pub weight: u32,
    /// Applied only to the tries sent to this backend (header modifiers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
}

fn one() -> u32 {
    1
}

impl BackendRef {
    /// Whether it names a Service (the only backend kind Ferry resolves).
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), None | Some("" | "core"))
            && matches!(self.kind.as_deref(), None | Some("Service"))
    }
}

/// A `ReferenceGrant` (`gateway.networking.k8s.io/v1beta1`): lets routes of the `from` namespaces name Services of
/// its own namespace as backends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferenceGrant {
    pub metadata: Metadata,
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantTo {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether it lets a route of kind `from_kind` (`HTTPRoute`, `GRPCRoute`) of `from_namespace` name the Service
    /// `service` (of the grant's namespace).
    pub fn permits(&self, from_kind: &str, from_namespace: &str, service: &str) -> bool {
        self.spec.from.iter().any(|f| f.group == GATEWAY_GROUP && f.kind == from_kind && f.namespace == from_namespace)
            && self.spec.to.iter().any(|t| {
                matches!(t.group.as_str(), "" | "core")
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == service)
            })
    }
}

// ===== validation =====

pub(crate) fn field(path: String, message: impl Into<String>) -> FieldError {
    FieldError { path, message: message.into() }
}

/// A regular expression as routes take it: bounded in length and compiled size (the `regex` crate's syntax, which
/// runs in time linear in the input).
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(format!("at most {MAX_REGEX_LEN} characters"));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("not a valid regular expression: {}", e.to_string().lines().last().unwrap_or("")))
}

/// An HTTP token (a header name, a method).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The upstream CRD's path rules for `Exact` and `PathPrefix`: absolute, no `//`, `/./`, `/../`, `%2f`, `#`, not
/// ending in `/.` or `/..`, and only the characters of a path.
fn check_literal_path(path: &str) -> Result<(), &'static str> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@%".contains(&b);
    if !path.starts_with('/') {
        return Err("must be an absolute path (start with `/`)");
    }
    if path.contains("//")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
    {
        return Err("must not contain `//`, `/./` or `/../`, nor end with `/.` or `/..`");
    }
    if path.to_ascii_lowercase().contains("%2f") || !path.bytes().all(allowed) {
        return Err("must hold only path characters (no `#`, no `%2F`)");
    }
    Ok(())
}

pub fn validate_http_route(spec: &HttpRouteSpec, errors: &mut Vec<FieldError>) {
    let rules: Vec<(Option<&str>, usize)> = spec.rules.iter().map(|r| (r.name.as_deref(), r.matches.len())).collect();
    validate_route(&spec.parent_refs, &rules, errors);
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            validate_match(&format!("{path}.matches[{j}]"), m, errors);
        }
        let shape = RuleShape::of(&rule.matches, rule.backend_refs.len());
        validate_filters(&format!("{path}.filters"), &rule.filters, shape, errors);
        if let Some(t) = &rule.timeouts {
            validate_timeouts(&format!("{path}.timeouts"), t, errors);
        }
        if let Some(r) = &rule.retry {
            validate_retry(&format!("{path}.retry"), r, errors);
        }
        validate_backends(&format!("{path}.backendRefs"), &rule.backend_refs, errors);
    }
}

/// What every route kind checks alike: its parents (Services), its rules' number and names (`(name, matches)` per
/// rule), and the matches in all.
pub(crate) fn validate_route(parent_refs: &[ParentRef], rules: &[(Option<&str>, usize)], errors: &mut Vec<FieldError>) {
    if parent_refs.is_empty() {
        errors.push(field("spec.parentRefs".into(), "at least one parent (a Service: group \"\", kind Service)"));
    }
    if parent_refs.len() > MAX_PARENTS {
        errors.push(field("spec.parentRefs".into(), format!("at most {MAX_PARENTS}")));
    }
    for (i, p) in parent_refs.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        if !p.is_service() {
            errors.push(field(
                path.clone(),
                "a mesh route's parent is a Service (`group: \"\"`, `kind: Service`); Ferry has no Gateway",
            ));
        }
        if !crate::meta::is_dns_label(&p.name) {
            errors.push(field(format!("{path}.name"), format!("`{}` must be a Service name", p.name)));
        }
        if p.port == Some(0) {
            errors.push(field(format!("{path}.port"), "must be 1-65535"));
        }
        if p.section_name.is_some() {
            errors.push(field(format!("{path}.sectionName"), "not supported for Service parents (use `port`)"));
        }
    }
    if rules.is_empty() {
        errors.push(field("spec.rules".into(), "at least one rule"));
    }
    if rules.len() > MAX_RULES {
        errors.push(field("spec.rules".into(), format!("at most {MAX_RULES}")));
    }
    let total: usize = rules.iter().map(|(_, matches)| matches).sum();
    if total > MAX_MATCHES_TOTAL {
        errors.push(field("spec.rules".into(), format!("at most {MAX_MATCHES_TOTAL} matches in all, got {total}")));
    }
    let mut names = BTreeMap::new();
    for (i, (name, matches)) in rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        if let Some(name) = name {
            if !crate::meta::is_dns_label(name) {
                errors.push(field(format!("{path}.name"), format!("`{name}` must be a DNS label")));
            } else if let Some(first) = names.insert(*name, i) {
                errors.push(field(format!("{path}.name"), format!("`{name}` is also the name of rules[{first}]")));
            }
        }
        if *matches > MAX_MATCHES {
            errors.push(field(format!("{path}.matches"), format!("at most {MAX_MATCHES}")));
        }
    }
}

/// A rule's `backendRefs` (`path` = `spec.rules[i].backendRefs`).
pub(crate) fn validate_backends(path: &str, backends: &[BackendRef], errors: &mut Vec<FieldError>) {
    if backends.len() > MAX_BACKENDS {
        errors.push(field(path.to_string(), format!("at most {MAX_BACKENDS}")));
    }
    for (j, b) in backends.iter().enumerate() {
        let path = format!("{path}[{j}]");
        validate_service_ref(&path, b.is_service(), &b.name, b.namespace.as_deref(), b.port, errors);
        if b.weight > 1_000_000 {
            errors.push(field(format!("{path}.weight"), "must be 0-1000000"));
        }
        validate_backend_filters(&format!("{path}.filters"), &b.filters, errors);
    }
}

/// The filters a backendRef may have: those that act on one try's request and response.
const BACKEND_FILTERS: [&str; 2] = ["RequestHeaderModifier", "ResponseHeaderModifier"];

/// A backendRef's `filters` (`path` = `spec.rules[i].backendRefs[j].filters`).
pub(crate) fn validate_backend_filters(path: &str, filters: &[HttpRouteFilter], errors: &mut Vec<FieldError>) {
    let shape = RuleShape { all_prefix: false, backends: 1 };
    validate_filter_subset(path, filters, &BACKEND_FILTERS, "a backendRef filter", shape, errors);
}

/// Filters where only the types `allowed` may stand (`what` names the place in the error): each other type refused
/// at its `type`; when none is, the rest checked as a rule's filters.
pub(crate) fn validate_filter_subset(
    path: &str,
    filters: &[HttpRouteFilter],
    allowed: &[&str],
    what: &str,
    shape: RuleShape,
    errors: &mut Vec<FieldError>,
) {
    let before = errors.len();
    for (k, f) in filters.iter().enumerate() {
        if !allowed.contains(&f.kind.as_str()) {
            let why = format!("`{}` is not {what} Ferry supports ({})", f.kind, allowed.join(", "));
            errors.push(field(format!("{path}[{k}].type"), why));
        }
    }
    if errors.len() == before {
        validate_filters(path, filters, shape, errors);
    }
}

pub(crate) fn validate_match(path: &str, m: &HttpRouteMatch, errors: &mut Vec<FieldError>) {
    let value_path = format!("{path}.path.value");
    match m.path.kind {
        PathMatchType::Exact | PathMatchType::PathPrefix => {
            if m.path.value.len() > MAX_REGEX_LEN {
                errors.push(field(value_path, format!("at most {MAX_REGEX_LEN} characters")));
            } else if let Err(e) = check_literal_path(&m.path.value) {
                errors.push(field(value_path, e));
            }
        }
        PathMatchType::RegularExpression => {
            if let Err(e) = compile_regex(&m.path.value) {
                errors.push(field(value_path, e));
            }
        }
    }
    for (list, what) in [(&m.headers, "headers"), (&m.query_params, "queryParams")] {
        if list.len() > MAX_CONDITIONS {
            errors.push(field(format!("{path}.{what}"), format!("at most {MAX_CONDITIONS}")));
        }
        let mut seen = BTreeMap::new();
        for (k, c) in list.iter().enumerate() {
            let at = format!("{path}.{what}[{k}]");
            if !is_token(&c.name) || c.name.len() > 256 {
                errors.push(field(format!("{at}.name"), format!("`{}` must be a header or parameter name", c.name)));
            }
            // Header names compare case-insensitively, parameters exactly; a repeated name is refused rather than
            // silently ignored after the first (the upstream rule).
            let key = if what == "headers" { c.name.to_ascii_lowercase() } else { c.name.clone() };
            if let Some(first) = seen.insert(key, k) {
                errors.push(field(format!("{at}.name"), format!("`{}` is also matched by {what}[{first}]", c.name)));
            }
            match c.kind {
                ValueMatchType::Exact if c.value.len() > 4096 => {
                    errors.push(field(format!("{at}.value"), "at most 4096 characters"))
                }
                ValueMatchType::Exact => {}
                ValueMatchType::RegularExpression => {
                    if let Err(e) = compile_regex(&c.value) {
                        errors.push(field(format!("{at}.value"), e));
                    }
                }
            }
        }
    }
    if let Some(method) = &m.method
        && !matches!(
            method.as_str(),
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
        )
    {
        errors.push(field(
            format!("{path}.method"),
            format!("`{method}` must be one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH"),
        ));
    }
}

pub fn validate_reference_grant(spec: &ReferenceGrantSpec, errors: &mut Vec<FieldError>) {
    if spec.from.is_empty() {
        errors.push(field("spec.from".into(), "at least one"));
    }
    if spec.to.is_empty() {
        errors.push(field("spec.to".into(), "at least one"));
    }
    for (i, f) in spec.from.iter().enumerate() {
        if !crate::meta::is_dns_label(&f.namespace) {
            errors.push(field(format!("spec.from[{i}].namespace"), format!("`{}` must be a namespace", f.namespace)));
        }
    }
}

// ===== matching =====

/// The parts of a request a route matches on.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// A header's value by (lower-case) name; repeated headers joined with `,` (as RFC 9110 allows).
    pub header: &'a dyn Fn(&str) -> Option<std::borrow::Cow<'a, str>>,
}

/// One match, compiled, with what orders it.
#[derive(Debug, Clone)]
struct CompiledMatch {
    path: CompiledPath,
    /// By index into the table's header names (each looked up once per request), exact values first.
    headers: Vec<(usize, CompiledValue)>,
    query: Vec<(String, CompiledValue)>,
    method: Option<String>,
    /// Where it came from: (route index, rule index).
    rule: (usize, usize),
}

#[derive(Debug, Clone)]
enum CompiledPath {
    Exact(String),
    /// Without a trailing `/` (`/` itself is the empty prefix).
    Prefix(String),
    /// An index into the table's path expressions (each evaluated at most once per request, however many rules
    /// share it).
    Regex(usize),
}

#[derive(Debug, Clone)]
enum CompiledValue {
    Exact(String),
    Regex(regex::Regex),
}

impl CompiledValue {
    fn matches(&self, value: &str) -> bool {
        match self {
            CompiledValue::Exact(v) => v == value,
            CompiledValue::Regex(r) => r.is_match(value),
        }
    }
}

impl CompiledPath {
    /// Whether a literal path matches (`None` for a regular expression, which the table evaluates, memoized).
    fn literal_matches(&self, path: &str) -> Option<bool> {
        match self {
            CompiledPath::Exact(p) => Some(p == path),
            // Element by element: `/abc` matches `/abc`, `/abc/` and `/abc/def`, not `/abcd`.
            CompiledPath::Prefix(p) => {
                Some(path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
            }
            CompiledPath::Regex(_) => None,
        }
    }
}

/// What one request's selection has found out so far: each distinct header's value and each distinct path
/// expression's result, filled in when first needed.
struct Memo<'a> {
    headers: smallvec::SmallVec<[Option<Option<std::borrow::Cow<'a, str>>>; MEMO_INLINE]>,
    paths: smallvec::SmallVec<[Option<bool>; MEMO_INLINE]>,
}

/// How many distinct header names and path expressions a request's memo holds without allocating.
const MEMO_INLINE: usize = 8;

/// The value of query parameter `name` (the first occurrence), as written.
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

impl CompiledMatch {
    /// Cheap conditions first (method, a literal path, exact values), a path expression last.
    fn matches<'a>(&self, table: &RouteTable, req: &RequestView<'a>, memo: &mut Memo<'a>) -> bool {
        if self.method.as_deref().is_some_and(|m| m != req.method) || self.path.literal_matches(req.path) == Some(false)
        {
            return false;
        }
        for (i, v) in &self.headers {
            let value = memo.headers[*i].get_or_insert_with(|| (req.header)(&table.header_names[*i]));
            if !value.as_deref().is_some_and(|h| v.matches(h)) {
                return false;
            }
        }
        if !self.query.iter().all(|(name, v)| query_param(req.query, name).is_some_and(|q| v.matches(q))) {
            return false;
        }
        match self.path {
            CompiledPath::Regex(i) => *memo.paths[i].get_or_insert_with(|| table.path_regexes[i].is_match(req.path)),
            _ => true,
        }
    }
}

/// The rules of the routes that apply to one Service port for one caller, compiled once, their matches in
/// precedence order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// By (route, rule).
    rules: Vec<Vec<RuleInfo>>,
    matches: Vec<CompiledMatch>,
    /// The distinct (lower-case) header names and path expressions the matches use.
    header_names: Vec<String>,
    path_regexes: Vec<regex::Regex>,
    /// Per header that some match needs an exact value of: the matches (positions in `matches`, ascending) keyed by
    /// that value, each match under its first exact header condition only.
    exact: Vec<ExactIndex>,
    /// The positions of the matches without an exact header condition (ascending).
    unindexed: Vec<u32>,
}

/// The matches whose first exact header condition is on one header, by the value it requires: a request is tried
/// only against those its own value names (and the unindexed ones), in precedence order, however many rules differ
/// by that header alone.
#[derive(Debug, Clone, Default)]
struct ExactIndex {
    header: usize,
    by_value: std::collections::HashMap<String, Vec<u32>>,
}

/// Interns what several matches share while a table is built.
#[derive(Default)]
struct Interner {
    header_names: Vec<String>,
    path_regexes: Vec<(String, regex::Regex)>,
}

impl Interner {
    fn header(&mut self, name: &str) -> usize {
        let name = name.to_ascii_lowercase();
        match self.header_names.iter().position(|n| *n == name) {
            Some(i) => i,
            None => {
                self.header_names.push(name);
                self.header_names.len() - 1
            }
        }
    }

    fn path_regex(&mut self, pattern: &str) -> Option<usize> {
        if let Some(i) = self.path_regexes.iter().position(|(p, _)| p == pattern) {
            return Some(i);
        }
        self.path_regexes.push((pattern.to_string(), compile_regex(pattern).ok()?));
        Some(self.path_regexes.len() - 1)
    }
}

/// What a request that matched a rule is told: which rule, and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// Its place among the table's rules (0..[`RouteTable::rules`]), for what a proxy keeps per rule.
    pub index: usize,
    /// `namespace/name/index`, the metrics' `route` label.
    pub label: std::sync::Arc<str>,
    /// Its filters (shared by the requests it takes).
    pub filters: std::sync::Arc<[HttpRouteFilter]>,
    pub timeouts: RuleTimeouts,
    /// Its retries (GEP-1731), which replace the Service's.
    pub retry: Option<HttpRouteRetry>,
    pub backends: Vec<Backend>,
    /// Its RequestMirror filters, resolved.
    pub mirrors: Vec<Mirror>,
}

/// A RequestMirror filter as the control plane resolved it: where copies go, and the share of requests copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub backend: Backend,
    pub numerator: u32,
    pub denominator: u32,
}

/// A backend as the control plane resolved it: a Service, or why not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    /// The backend Service's port; the request's port when unset.
    pub port: Option<u16>,
    pub weight: u32,
    /// Why it cannot be used (`None`: resolved); requests that pick it get 500 `backend-not-found`.
    pub unresolved: Option<String>,
    /// Its own filters (header modifiers), for the tries that pick it (shared by the requests that use it).
    pub filters: std::sync::Arc<[HttpRouteFilter]>,
}

/// One route as proxies receive it: its rules' matches and resolved backends.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedRoute {
    pub namespace: String,
    pub name: String,
    /// Seconds since the epoch (the older route wins a precedence tie); 0 unknown.
    pub created: i64,
    /// The Service ports it attaches to; empty: every port.
    pub ports: Vec<u16>,
    pub rules: Vec<AttachedRule>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttachedRule {
    pub name: Option<String>,
    /// An HTTPRoute rule's matches (empty for a GRPCRoute's).
    pub matches: Vec<HttpRouteMatch>,
    /// A GRPCRoute rule's matches (empty for an HTTPRoute's).
    pub grpc_matches: Vec<GrpcRouteMatch>,
    pub filters: Vec<HttpRouteFilter>,
    pub timeouts: HttpRouteTimeouts,
    pub retry: Option<HttpRouteRetry>,
    pub backends: Vec<Backend>,
    /// The backends of its RequestMirror filters, resolved, in the filters' order.
    pub mirrors: Vec<Backend>,
}

impl AttachedRule {
    /// Its RequestMirror filters, each with its resolved backend.
    pub fn mirrors(&self) -> impl Iterator<Item = Mirror> + '_ {
        let shares = self.filters.iter().filter_map(|f| f.request_mirror.as_ref()).map(RequestMirror::share);
        shares.zip(&self.mirrors).map(|((numerator, denominator), backend)| Mirror {
            backend: backend.clone(),
            numerator,
            denominator,
        })
    }
}

/// The routes of one namespace attached to one Service: the xDS resource `<service ns>/<service>/<route ns>`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSet {
    pub service_namespace: String,
    pub service: String,
    pub route_namespace: String,
    pub routes: Vec<AttachedRoute>,
}

impl RouteSet {
    /// Its xDS resource name.
    pub fn name(&self) -> String {
        format!("{}/{}/{}", self.service_namespace, self.service, self.route_namespace)
    }
}

/// Sort key of a match, per the HTTPRoute spec's precedence: Exact path, then (Ferry's choice for the
/// implementation-specific regular expressions, as Envoy Gateway) RegularExpression, then PathPrefix, longer first;
/// then a method; then more headers; then more query parameters; then the older route; then `namespace/name`; then
/// rule order, then match order.
pub(crate) type Precedence = (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>, i64, String, usize, usize);

fn precedence(m: &HttpRouteMatch, created: i64, key: &str, rule: usize, index: usize) -> Precedence {
    let kind = match m.path.kind {
        PathMatchType::Exact => 0,
        PathMatchType::RegularExpression => 1,
        PathMatchType::PathPrefix => 2,
    };
    (
        kind,
        Reverse(m.path.value.trim_end_matches('/').len()),
        m.method.is_none(),
        Reverse(m.headers.len()),
        Reverse(m.query_params.len()),
        created,
        key.to_string(),
        rule,
        index,
    )
}

impl RouteTable {
    /// Compiles `routes` (validated, so their regular expressions compile).
    pub fn build(routes: &[&AttachedRoute]) -> RouteTable {
        let mut keyed: Vec<(Precedence, CompiledMatch)> = Vec::new();
        let mut rules = Vec::new();
        let mut interner = Interner::default();
        for (r, route) in routes.iter().enumerate() {
            let key = format!("{}/{}", route.namespace, route.name);
            let mut infos = Vec::new();
            for (i, rule) in route.rules.iter().enumerate() {
                infos.push(RuleInfo {
                    index: rules.iter().map(Vec::len).sum::<usize>() + infos.len(),
                    label: format!("{key}/{i}").into(),
                    filters: rule.filters.clone().into(),
                    timeouts: rule.timeouts.parsed(),
                    retry: rule.retry.clone(),
                    backends: rule.backends.clone(),
                    mirrors: rule.mirrors().collect(),
                });
                for (j, m) in rule.matches.iter().enumerate() {
                    let Some(compiled) = compile_match(m, (r, i), &mut interner) else { continue };
                    keyed.push((precedence(m, route.created, &key, i, j), compiled));
                }
                for (j, m) in rule.grpc_matches.iter().enumerate() {
                    let Some(compiled) = compile_match(&m.to_http(), (r, i), &mut interner) else { continue };
                    keyed.push((m.precedence(route.created, &key, i, j), compiled));
                }
            }
            rules.push(infos);
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let matches: Vec<CompiledMatch> = keyed.into_iter().map(|(_, m)| m).collect();
        let (mut exact, mut unindexed) = (Vec::<ExactIndex>::new(), Vec::new());
        for (position, m) in matches.iter().enumerate() {
            let position = u32::try_from(position).expect("at most 128 matches per route");
            // Exact header conditions sort first: the first one, if any, keys the match.
            let Some((header, CompiledValue::Exact(value))) = m.headers.first() else {
                unindexed.push(position);
                continue;
            };
            let index = match exact.iter().position(|x| x.header == *header) {
                Some(i) => &mut exact[i],
                None => {
                    exact.push(ExactIndex { header: *header, ..ExactIndex::default() });
                    exact.last_mut().expect("just pushed")
                }
            };
            index.by_value.entry(value.clone()).or_default().push(position);
        }
        RouteTable {
            rules,
            matches,
            header_names: interner.header_names,
            path_regexes: interner.path_regexes.into_iter().map(|(_, r)| r).collect(),
            exact,
            unindexed,
        }
    }

    /// How many rules it has (each [`RuleInfo::index`] is below).
    pub fn rules(&self) -> usize {
        self.rules.iter().map(Vec::len).sum()
    }

    /// Pure: the rule a request goes to (`None`: no rule matches, which GAMMA rejects with 404).
    pub fn select(&self, req: &RequestView<'_>) -> Option<&RuleInfo> {
        self.select_with_prefix(req).map(|(rule, _)| rule)
    }

    /// As [`RouteTable::select`], with the `PathPrefix` value the request matched (without a trailing `/`), which
    /// `ReplacePrefixMatch` replaces.
    pub fn select_with_prefix(&self, req: &RequestView<'_>) -> Option<(&RuleInfo, Option<&str>)> {
        let mut memo = Memo {
            headers: smallvec::smallvec![None; self.header_names.len()],
            paths: smallvec::smallvec![None; self.path_regexes.len()],
        };
        // The candidates: the unindexed matches, and those whose exact header value the request carries; tried in
        // precedence order (every list ascending: each step takes the least head).
        let mut lists: smallvec::SmallVec<[&[u32]; 4]> = smallvec::smallvec![&self.unindexed[..]];
        for index in &self.exact {
            let value =
                memo.headers[index.header].get_or_insert_with(|| (req.header)(&self.header_names[index.header]));
            if let Some(list) = value.as_deref().and_then(|v| index.by_value.get(v)) {
                lists.push(list);
            }
        }
        let m = loop {
            let (list, &position) =
                lists.iter().enumerate().filter_map(|(i, l)| Some((i, l.first()?))).min_by_key(|(_, p)| **p)?;
            lists[list] = &lists[list][1..];
            let m = &self.matches[position as usize];
            if m.matches(self, req, &mut memo) {
                break m;
            }
        };
        let prefix = match &m.path {
            CompiledPath::Prefix(p) => Some(p.as_str()),
            _ => None,
        };
        Some((self.rules.get(m.rule.0)?.get(m.rule.1)?, prefix))
    }
}

/// Pure (GAMMA): of one Service's route sets, the routes for a request from a caller in `caller_ns` to `port`: the
/// consumer routes (the caller's namespace, when not the Service's) if any attach to that port, else the producer
/// routes (the Service's namespace). Routes of other namespaces never apply to this caller.
pub fn applicable<'s>(sets: &'s [RouteSet], caller_ns: &str, port: u16) -> Vec<&'s AttachedRoute> {
    let of = |ns: &str| -> Vec<&'s AttachedRoute> {
        sets.iter()
            .filter(|s| s.route_namespace == ns)
            .flat_map(|s| &s.routes)
            .filter(|r| r.ports.is_empty() || r.ports.contains(&port))
            .collect()
    };
    let service_ns = sets.first().map(|s| s.service_namespace.as_str()).unwrap_or_default();
    let consumer = if caller_ns != service_ns { of(caller_ns) } else { Vec::new() };
    if consumer.is_empty() { of(service_ns) } else { consumer }
}

fn compile_match(m: &HttpRouteMatch, rule: (usize, usize), interner: &mut Interner) -> Option<CompiledMatch> {
    let path = match m.path.kind {
        PathMatchType::Exact => CompiledPath::Exact(m.path.value.clone()),
        PathMatchType::PathPrefix => CompiledPath::Prefix(m.path.value.trim_end_matches('/').to_string()),
        PathMatchType::RegularExpression => CompiledPath::Regex(interner.path_regex(&m.path.value)?),
    };
    let value = |v: &ValueMatch| -> Option<CompiledValue> {
        Some(match v.kind {
            ValueMatchType::Exact => CompiledValue::Exact(v.value.clone()),
            ValueMatchType::RegularExpression => CompiledValue::Regex(compile_regex(&v.value).ok()?),
        })
    };
    let mut headers: Vec<(usize, CompiledValue)> =
        m.headers.iter().map(|h| Some((interner.header(&h.name), value(h)?))).collect::<Option<_>>()?;
    // Exact values first: a request that fails one is not matched against an expression.
    headers.sort_by_key(|(_, v)| matches!(v, CompiledValue::Regex(_)));
    Some(CompiledMatch {
        path,
        headers,
        query: m.query_params.iter().map(|q| Some((q.name.clone(), value(q)?))).collect::<Option<_>>()?,
        method: m.method.clone(),
        rule,
    })
}

/// Pure: of `items` weighted by `weight`, the one `draw` (uniform over `u64`) falls on; `None` when every weight is
/// 0. A request's backend, picked again for each try.
pub fn pick<T>(items: &[T], weight: impl Fn(&T) -> u32, draw: u64) -> Option<&T> {
    let total: u64 = items.iter().map(|i| u64::from(weight(i))).sum();
    if total == 0 {
        return None;
    }
    // Multiply-shift keeps the draw uniform over [0, total) without a modulo bias worth noticing.
    let mut point = ((u128::from(draw) * u128::from(total)) >> 64) as u64;
    for item in items {
        let w = u64::from(weight(item));
        if point < w {
            return Some(item);
        }
        point -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Document, parse_documents, route_sets};

    const SERVICES: &str = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
        spec: {ports: [{port: 8080}, {port: 9090}]}\n";

    /// An HTTPRoute document in `ns` named `name` with `spec` (YAML, flow or block).
    fn route_doc(ns: &str, name: &str, spec: &str) -> String {
        let spec = spec.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n");
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
        )
    }

    /// The rule tables of Service shop/api port 8080 for a caller in `caller`, with `created` per route name.
    fn table(yaml: &str, caller: &str, created: &[(&str, i64)]) -> RouteTable {
        let mut sets = route_sets(&parse_documents(&format!("{SERVICES}{yaml}")).unwrap());
        for set in &mut sets {
            for r in &mut set.routes {
                r.created = created.iter().find(|(n, _)| *n == r.name).map_or(0, |(_, c)| *c);
            }
        }
        sets.retain(|s| s.service == "api" && s.service_namespace == "shop");
        RouteTable::build(&applicable(&sets, caller, 8080))
    }

    /// The label of the rule `method path?query` with `headers` selects.
    fn select(t: &RouteTable, method: &str, target: &str, headers: &[(&str, &str)]) -> Option<String> {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let lookup = |name: &str| -> Option<std::borrow::Cow<'_, str>> {
            let values: Vec<&str> =
                headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v).collect();
            (!values.is_empty()).then(|| values.join(",").into())
        };
        let req = RequestView { method, path, query, header: &lookup };
        t.select(&req).map(|r| r.label.to_string())
    }

    const PARENT: &str = "parentRefs: [{group: '', kind: Service, name: api}]";

    /// The exact-header index changes which matches are tried, never which one wins: over rules keyed by two headers,
    /// by an expression and by nothing, every request selects what trying every match in order selects.
    #[test]
    fn the_exact_header_index_selects_what_a_linear_scan_selects() {
        let mut rules = String::from("rules:\n");
        for i in 0..12 {
            let (name, value) = if i % 2 == 0 { ("x-a", i % 4) } else { ("x-b", i % 3) };
            let path = ["/", "/p", "/p/q"][i % 3];
            rules +=
                &format!("- matches: [{{path: {{value: {path}}}, headers: [{{name: {name}, value: 'v{value}'}}]}}]\n");
        }
        rules += "- matches: [{path: {value: /p}, headers: [{type: RegularExpression, name: x-a, value: 'v[13]'}, {name: x-b, value: v1}]}]\n";
        rules += "- matches: [{path: {type: Exact, value: /p/q}}]\n- matches: [{method: POST}]\n";
        let t = table(&route_doc("shop", "r", &format!("{PARENT}\n{rules}")), "shop", &[]);
        assert_eq!(t.exact.len(), 2, "two headers key matches");
        let linear = |method: &str, path: &str, headers: &[(&str, &str)]| {
            let lookup = |name: &str| -> Option<std::borrow::Cow<'_, str>> {
                headers.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).into())
            };
            let req = RequestView { method, path, query: None, header: &lookup };
            let mut memo = Memo {
                headers: smallvec::smallvec![None; t.header_names.len()],
                paths: smallvec::smallvec![None; t.path_regexes.len()],
            };
            let m = t.matches.iter().find(|m| m.matches(&t, &req, &mut memo))?;
            Some(t.rules[m.rule.0][m.rule.1].label.to_string())
        };
        let mut checked = 0;
        for method in ["GET", "POST"] {
            for path in ["/", "/p", "/p/q", "/z"] {
                for a in [None, Some("v0"), Some("v1"), Some("v2"), Some("v3")] {
                    for b in [None, Some("v0"), Some("v1"), Some("v2")] {
                        let headers: Vec<(&str, &str)> =
                            [("x-a", a), ("x-b", b)].into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
                        assert_eq!(
                            select(&t, method, path, &headers),
                            linear(method, path, &headers),
                            "{method} {path} {headers:?}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 160);
    }

    #[test]
    fn match_table() {
        let rules = "rules:
- name: exact
  matches: [{path: {type: Exact, value: /v1/orders}}]
- matches: [{path: {type: PathPrefix, value: /v1}}]
- matches: [{path: {type: PathPrefix, value: /v1/orders/}}]
- matches: [{path: {type: RegularExpression, value: '/v1/items/[0-9]+'}}]
- matches: [{path: {value: /h}, headers: [{name: X-Canary, value: 'yes'}]}, {path: {value: /h}, headers: [{type: RegularExpression, name: x-user, value: 'adm.*'}]}]
- matches: [{path: {value: /q}, queryParams: [{name: v, value: '2'}]}]
- matches: [{path: {value: /m}, method: POST}]
- backendRefs: [{name: api}]";
        let t = table(&route_doc("shop", "api", &format!("{PARENT}\n{rules}")), "shop", &[]);
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            ("GET", "/v1/orders", &[], Some("shop/api/0")),
            ("GET", "/v1/orders/", &[], Some("shop/api/2")), // not Exact; the longer prefix (trailing / ignored)
            ("GET", "/v1/orders/7", &[], Some("shop/api/2")),
            ("GET", "/v1/ordersx", &[], Some("shop/api/1")), // element by element: not /v1/orders
            ("GET", "/v1", &[], Some("shop/api/1")),
            ("GET", "/v1/", &[], Some("shop/api/1")),
            ("GET", "/v10", &[], Some("shop/api/7")),
            ("GET", "/v1/items/42", &[], Some("shop/api/3")), // regex before prefix (Ferry's order)
            ("GET", "/v1/items/x", &[], Some("shop/api/1")),
            ("GET", "/v1/items/42/more", &[], Some("shop/api/1")), // anchored
            ("GET", "/h", &[("x-canary", "yes")], Some("shop/api/4")), // names compare case-insensitively
            ("GET", "/h", &[("X-User", "admin")], Some("shop/api/4")),
            ("GET", "/h", &[("x-canary", "YES")], Some("shop/api/7")), // values exactly
            ("GET", "/h", &[], Some("shop/api/7")),
            ("GET", "/q?a=1&v=2", &[], Some("shop/api/5")),
            ("GET", "/q?v=22", &[], Some("shop/api/7")),
            ("GET", "/q", &[], Some("shop/api/7")),
            ("POST", "/m", &[], Some("shop/api/6")),
            ("GET", "/m", &[], Some("shop/api/7")),
        ];
        for (method, target, headers, want) in cases {
            assert_eq!(select(&t, method, target, headers).as_deref(), *want, "{method} {target} {headers:?}");
        }
        // Without a catch-all rule, what matches nothing has no rule (GAMMA: rejected).
        let t = table(
            &route_doc("shop", "api", &format!("{PARENT}\nrules: [{{matches: [{{path: {{value: /a}}}}]}}]")),
            "shop",
            &[],
        );
        assert_eq!(select(&t, "GET", "/b", &[]), None);
        assert_eq!(select(&t, "GET", "/a", &[]).as_deref(), Some("shop/api/0"));
    }

    #[test]
    fn rules_that_share_a_header_or_an_expression_look_it_up_once() {
        // Ten rules alike but for the header value: one header name and one expression in the table, and each request
        // looks the header up once (counted) whichever rule it ends at.
        let rules: String = (0..10)
            .map(|i| format!("- matches: [{{path: {{type: RegularExpression, value: '/api/v[0-9]+'}}, headers: [{{name: X-Bench, value: r{i}}}]}}]\n"))
            .collect();
        let t = table(&route_doc("shop", "api", &format!("{PARENT}\nrules:\n{rules}")), "shop", &[]);
        assert_eq!((t.header_names.len(), t.path_regexes.len()), (1, 1));
        for (value, path, want) in [
            ("r9", "/api/v2", Some("shop/api/9")),
            ("r3", "/api/v2", Some("shop/api/3")),
            ("r3", "/x", None),
            ("r10", "/api/v1", None),
        ] {
            let lookups = std::cell::Cell::new(0);
            let lookup = |name: &str| -> Option<std::borrow::Cow<'_, str>> {
                lookups.set(lookups.get() + 1);
                (name == "x-bench").then(|| value.into())
            };
            let req = RequestView { method: "GET", path, query: None, header: &lookup };
            assert_eq!(t.select(&req).map(|r| r.label.to_string()).as_deref(), want, "{value} {path}");
            assert_eq!(lookups.get(), 1, "{value} {path}");
        }
    }

    #[test]
    fn precedence_ties_follow_the_spec() {
        // The method wins, then more headers, then more query parameters; then the older route; then
        // namespace/name; then the first rule.
        let a = route_doc(
            "shop",
            "a",
            &format!(
                "{PARENT}\nrules:\n- matches: [{{path: {{value: /x}}, headers: [{{name: h1, value: '1'}}]}}]\n- matches: [{{path: {{value: /x}}, headers: [{{name: h1, value: '1'}}]}}]"
            ),
        );
        let b = route_doc(
            "shop",
            "b",
            &format!(
                "{PARENT}\nrules:\n- matches: [{{path: {{value: /x}}, method: GET}}]\n- matches: [{{path: {{value: /x}}, headers: [{{name: h1, value: '1'}}, {{name: h2, value: '2'}}]}}]"
            ),
        );
        let t = table(&format!("{a}{b}"), "shop", &[("a", 10), ("b", 20)]);
        assert_eq!(select(&t, "GET", "/x", &[("h1", "1"), ("h2", "2")]).as_deref(), Some("shop/b/0"), "method first");
        assert_eq!(select(&t, "PUT", "/x", &[("h1", "1"), ("h2", "2")]).as_deref(), Some("shop/b/1"), "more headers");
        assert_eq!(select(&t, "PUT", "/x", &[("h1", "1")]).as_deref(), Some("shop/a/0"), "first rule of a");
        let c = route_doc("shop", "c", &format!("{PARENT}\nrules: [{{matches: [{{path: {{value: /y}}}}]}}]"));
        let d = route_doc("shop", "d", &format!("{PARENT}\nrules: [{{matches: [{{path: {{value: /y}}}}]}}]"));
        let both = format!("{c}{d}");
        assert_eq!(select(&table(&both, "shop", &[("d", 1), ("c", 2)]), "GET", "/y", &[]).as_deref(), Some("shop/d/0"));
        assert_eq!(select(&table(&both, "shop", &[("d", 5), ("c", 5)]), "GET", "/y", &[]).as_deref(), Some("shop/c/0"));
    }

    #[test]
    fn producer_and_consumer_routes() {
        let to_api = "parentRefs: [{group: '', kind: Service, name: api, namespace: shop}]";
        let yaml = [
            route_doc("shop", "p", PARENT),
            route_doc("web", "c", to_api),
            route_doc("other", "o", to_api),
            route_doc("shop", "port", "parentRefs: [{group: '', kind: Service, name: api, port: 9090}]"),
            route_doc("shop", "ghost", "parentRefs: [{group: '', kind: Service, name: ghost}]"),
        ]
        .concat();
        let sets = route_sets(&parse_documents(&format!("{SERVICES}{yaml}")).unwrap());
        let names: Vec<String> = sets.iter().map(RouteSet::name).collect();
        assert_eq!(
            names,
            ["shop/api/other", "shop/api/shop", "shop/api/web"],
            "no set for a Service that does not exist"
        );
        let of = |caller: &str, port: u16| -> Vec<String> {
            applicable(&sets, caller, port).iter().map(|r| r.name.clone()).collect()
        };
        // A caller in web: its namespace's consumer route, instead of the producer's.
        assert_eq!(of("web", 8080), ["c"]);
        // In shop itself, or in a namespace without one: the producer routes (the port-bound one on its port only).
        assert_eq!(of("shop", 8080), ["p"]);
        assert_eq!(of("billing", 9090), ["p", "port"]);
    }

    #[test]
    fn backends_are_resolved_against_services_and_grants() {
        let yaml = "---\napiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: invoices, namespace: billing}\nspec: {ports: [{port: 80}]}\n---\napiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: api-v2, namespace: shop}\nspec: {ports: [{port: 8080}]}\n";
        let route = route_doc(
            "shop",
            "split",
            &format!(
                "{PARENT}\nrules:\n- backendRefs: [{{name: api, weight: 90}}, {{name: api-v2, weight: 10}}, {{name: nope}}, {{name: invoices, namespace: billing}}, {{name: api, port: 1234}}]"
            ),
        );
        let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: shop-routes, namespace: billing}\nspec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}], to: [{group: '', kind: Service, name: invoices}]}\n";
        let reasons = |yaml: &str| -> Vec<Option<String>> {
            let sets = route_sets(&parse_documents(yaml).unwrap());
            sets[0].routes[0].rules[0].backends.iter().map(|b| b.unresolved.clone()).collect()
        };
        let without = reasons(&format!("{SERVICES}{yaml}{route}"));
        assert_eq!(without[..2], [None, None]);
        assert!(without[2].as_deref().unwrap().starts_with("BackendNotFound: Service shop/nope"), "{without:?}");
        assert!(without[3].as_deref().unwrap().starts_with("RefNotPermitted"), "{without:?}");
        assert!(without[4].as_deref().unwrap().contains("has no port 1234"), "{without:?}");
        let with = reasons(&format!("{SERVICES}{yaml}{route}{grant}"));
        assert_eq!(with[3], None, "the ReferenceGrant permits it");
    }

    fn backend(name: &str, weight: u32) -> Backend {
        Backend { namespace: "shop".into(), name: name.into(), weight, ..Backend::default() }
    }

    #[test]
    fn weights() {
        let backends = [backend("v1", 90), backend("v2", 10), backend("drained", 0)];
        let mut counts = BTreeMap::new();
        for i in 0..1000u64 {
            let draw = (2 * i + 1) * (u64::MAX / 2000); // the middle of each thousandth
            *counts.entry(pick(&backends, |b| b.weight, draw).unwrap().name.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts.get("v1"), Some(&900));
        assert_eq!(counts.get("v2"), Some(&100));
        assert_eq!(counts.get("drained"), None, "weight 0 drains");
        assert_eq!(pick(&[backend("a", 0)], |b| b.weight, 7), None);
        assert_eq!(pick(&[], |b: &Backend| b.weight, 7), None);
        assert_eq!(pick(&[backend("a", 1)], |b| b.weight, u64::MAX).unwrap().name, "a");
    }

    #[test]
    fn path_modifiers_replace_the_whole_path_or_the_matched_prefix() {
        let full = PathModifier {
            kind: PathModifierType::ReplaceFullPath,
            replace_full_path: Some("/x".into()),
            replace_prefix_match: None,
        };
        let prefix = |with: &str| PathModifier {
            kind: PathModifierType::ReplacePrefixMatch,
            replace_full_path: None,
            replace_prefix_match: Some(with.into()),
        };
        // (modifier, path, matched prefix, result)
        let cases = [
            (full.clone(), "/a/b", Some("/a"), "/x"),
            (prefix("/new"), "/old/a", Some("/old"), "/new/a"),
            (prefix("/new/"), "/old", Some("/old"), "/new"),
            (prefix("/"), "/old/a", Some("/old"), "/a"),
            (prefix("/"), "/old", Some("/old"), "/"),
            (prefix("/v2"), "/a", Some(""), "/v2/a"),
        ];
        for (m, path, matched, want) in cases {
            assert_eq!(m.apply(path, matched), want, "{m:?} {path}");
        }
    }

    #[test]
    fn gateway_api_durations_are_gep_2257() {
        for ok in ["1h", "30s", "500ms", "1m30s", "0s", "1h2m3s4ms", "99999ms"] {
            assert!(is_gateway_duration(ok), "{ok}");
        }
        for bad in ["", "1", "1.5s", "1d", "100000s", "1h2m3s4ms5s", " 1s", "1s ", "-1s", "1S"] {
            assert!(!is_gateway_duration(bad), "{bad:?}");
        }
        let t = HttpRouteTimeouts { request: Some("0s".into()), backend_request: Some("250ms".into()) };
        let want = RuleTimeouts {
            request: Some(std::time::Duration::ZERO),
            backend_request: Some(std::time::Duration::from_millis(250)),
        };
        assert_eq!(t.parsed(), want);
    }

    #[test]
    fn invalid_routes_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("parentRefs: [{name: api}]", "spec.parentRefs[0]: a mesh route's parent is a Service"),
            ("rules: [{}]", "spec.parentRefs: at least one parent"),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{matches: [{path: {type: RegularExpression, value: '(('}}]}]",
                "spec.rules[0].matches[0].path.value: not a valid regular expression",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{matches: [{path: {value: 'v1'}}]}]",
                "spec.rules[0].matches[0].path.value: must be an absolute path",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{matches: [{path: {value: '/a//b'}}]}]",
                "spec.rules[0].matches[0].path.value: must not contain `//`",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{matches: [{method: FETCH}]}]",
                "spec.rules[0].matches[0].method: `FETCH` must be one of",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{matches: [{headers: [{name: a, value: '1'}, {name: A, value: '2'}]}]}]",
                "spec.rules[0].matches[0].headers[1].name: `A` is also matched by headers[0]",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{backendRefs: [{kind: ServiceImport, name: api}]}]",
                "spec.rules[0].backendRefs[0]: Ferry resolves Service backends only",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{name: a}, {name: a}]",
                "spec.rules[1].name: `a` is also the name of rules[0]",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestHeaderModifier}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier: required with type RequestHeaderModifier",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestMirror}]}]",
                "spec.rules[0].filters[0].requestMirror: required with type RequestMirror",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}]}]",
                "spec.rules[0].filters[0].requestMirror.backendRef.port: required for a Service",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, percent: 101}}]}]",
                "spec.rules[0].filters[0].requestMirror.percent: 101 must be 0-100",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, percent: 5, fraction: {numerator: 1}}}]}]",
                "spec.rules[0].filters[0].requestMirror: percent and fraction cannot both be set",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 3, denominator: 2}}}]}]",
                "spec.rules[0].filters[0].requestMirror.fraction.numerator: must not be above the denominator",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {kind: Pod, name: shadow, port: 80}}}]}]",
                "spec.rules[0].filters[0].requestMirror.backendRef: Ferry resolves Service backends only",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{retry: {codes: [503, 200]}}]",
                "spec.rules[0].retry.codes[1]: 200 must be 400-599",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{retry: {attempts: 11}}]",
                "spec.rules[0].retry.attempts: 11 must be 0-10",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{retry: {backoff: 1.5s}}]",
                "spec.rules[0].retry.backoff: `1.5s` is not a Gateway API duration",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}], backendRefs: [{name: api}]}]",
                "spec.rules[0].filters[0].requestRedirect: a redirect is answered by the proxy",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 404, scheme: ftp}}]}]",
                "spec.rules[0].filters[0].requestRedirect.scheme: `ftp` must be http or https",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]",
                "spec.rules[0].filters[0].urlRewrite.path: ReplacePrefixMatch needs the rule's matches to be PathPrefix",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: URLRewrite, urlRewrite: {hostname: 'Api:80'}}]}]",
                "spec.rules[0].filters[0].urlRewrite.hostname: `Api:80` must be a DNS name",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: URLRewrite, urlRewrite: {}}, {type: RequestRedirect, requestRedirect: {}}]}]",
                "spec.rules[0].filters: RequestRedirect and URLRewrite cannot be used together",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{backendRefs: [{name: api, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api, port: 80}}}]}]}]",
                "spec.rules[0].backendRefs[0].filters[0].type: `RequestMirror` is not a backendRef filter Ferry supports",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{backendRefs: [{name: api, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Ferry-Client-Id, value: x}]}}]}]}]",
                "spec.rules[0].backendRefs[0].filters[0].requestHeaderModifier.set[0].name: `Ferry-Client-Id` is Ferry's own header",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {remove: [ferry_orig_proto]}}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier.remove[0]: `ferry_orig_proto` is Ferry's own header",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: Connection, value: close}]}}]}]",
                "spec.rules[0].filters[0].responseHeaderModifier.add[0].name: `Connection` belongs to the connection",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: '1'}], remove: [X-A]}}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name: `x-a` is also in remove",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: 'x a', value: '1'}]}}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name: `x a` is not a header name",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: \"a\\nb\"}]}}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].value: at most 4096 visible ASCII",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}]}]",
                "spec.rules[0].filters[1].type: RequestHeaderModifier is also filters[0]",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{timeouts: {request: 1.5s}}]",
                "spec.rules[0].timeouts.request: `1.5s` is not a Gateway API duration",
            ),
            (
                "parentRefs: [{group: '', kind: Service, name: api}]\nrules: [{timeouts: {request: 1s, backendRequest: 2s}}]",
                "spec.rules[0].timeouts.backendRequest: must not be longer than request",
            ),
        ];
        for (spec, want) in cases {
            let err = parse_documents(&route_doc("shop", "r", spec)).unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
            assert!(err.starts_with("HTTPRoute shop/r"), "{err}");
        }
        let err = parse_documents("apiVersion: ferry.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}\n");
        assert!(err.unwrap_err().to_string().contains("apiVersion: must be gateway.networking.k8s.io/v1"));
        let long = format!("a{}", "b".repeat(MAX_REGEX_LEN));
        assert!(compile_regex(&long).unwrap_err().contains("at most"));
        assert!(compile_regex("(a{1000}){1000}").unwrap_err().contains("regular expression"), "compiled size bounded");
        // A route round-trips through its document form.
        let docs = parse_documents(&route_doc(
            "shop",
            "r",
            &format!("{PARENT}\nrules: [{{backendRefs: [{{name: api, weight: 3}}]}}]"),
        ))
        .unwrap();
        let Document::HttpRoute(r) = &docs[0] else { panic!() };
        assert_eq!(r.spec.rules[0].matches, vec![HttpRouteMatch::default()], "no matches: PathPrefix /");
        let again = crate::config::parse_value(crate::config::document_json(&docs[0])).unwrap();
        assert_eq!(again, docs[0]);
    }
}
