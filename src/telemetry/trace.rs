//! Trace context per hop: W3C `traceparent`/`tracestate` and B3 (multi-header `x-b3-*` and single `b3`) extracted and
//! propagated (pure, table-tested), a span per hop whose parent is the incoming context (a trace started, sampled at
//! `FERRY_TRACE_SAMPLING`, when there is none), exported over OTLP/gRPC in batches by a bounded, never-blocking queue
//! whose drops are counted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use tokio::sync::mpsc;

use ferry_api::{hex, write_hex};

use crate::telemetry::metrics::Metrics;

// Header names as `HeaderName`s: a lookup by `&str` parses and checks the name again on every call.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Spans waiting for export at most; beyond, new ones are dropped (and counted).
const QUEUE: usize = 4096;
/// Spans per export request at most.
const BATCH: usize = 512;
/// A batch is sent at least this often.
const FLUSH: Duration = Duration::from_secs(1);
/// An export that takes longer is abandoned (its spans counted as dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The identity of one span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// The propagation formats a request carried (the same are written on; `traceparent` always).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    /// One valid `traceparent` came: its `tracestate` goes on with the trace; otherwise the trace restarts here and
    /// a `tracestate` that came is dropped, as W3C Trace Context requires.
    pub w3c: bool,
    pub b3_single: bool,
    pub b3_multi: bool,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    hex_bytes(s.as_bytes())
}

/// `N` bytes from `2N` hex digits of either case; all zeros is no ID.
fn hex_bytes<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    (out != [0u8; N]).then_some(out)
}

fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A 64-bit (16 hex) or 128-bit (32 hex) trace ID; the short form is padded on the left, as B3 specifies.
fn trace_id(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        16 => hex_to::<8>(s).map(|low| {
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }),
        _ => hex_to::<16>(s),
    }
}

/// Pure: a W3C `traceparent`: `version-traceid-parentid-flags`, 2/32/16/2 lower-case hex digits, with optional
/// spaces and tabs around; version `ff`, all-zero IDs and anything else are refused. Version `00` is exactly that; a
/// later version is read by the same first fields and may go on only after a `-` (Trace Context level 1, §3.2 and
/// "Versioning of traceparent").
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    // Every request between proxies carries one: read by position, not split and parsed digit by digit.
    let value = value.trim_matches([' ', '\t']).as_bytes();
    let (head, rest) = (value.get(..55)?, &value[55..]);
    let (version, trace, span, flags) = (&head[..2], &head[3..35], &head[36..52], &head[53..]);
    let lower_hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let dashes = head[2] == b'-' && head[35] == b'-' && head[52] == b'-';
    if !dashes || ![version, trace, span, flags].into_iter().all(lower_hex) || version == b"ff" {
        return None;
    }
    if !rest.is_empty() && (version == b"00" || rest[0] != b'-') {
        return None;
    }
    let flags = hex_bytes::<1>(flags).map_or(0, |f| f[0]);
    Some(SpanContext { trace_id: hex_bytes(trace)?, span_id: hex_bytes(span)?, sampled: flags & 1 == 1 })
}

/// Pure: a single `b3` header, `<trace>-<span>[-<sampling>[-<parent>]]` (a bare sampling decision carries no
/// context).
pub fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (trace, span) = (parts.next()?, parts.next()?);
    let sampled = matches!(parts.next(), Some("1" | "d"));
    Some(SpanContext { trace_id: trace_id(trace)?, span_id: hex_to(span)?, sampled })
}

/// Pure: the multi-header B3 form.
pub fn parse_b3_multi(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let (trace_id, span_id) = (trace_id(get(B3_TRACE_ID)?)?, hex_to(get(B3_SPAN_ID)?)?);
    let sampled = matches!(get(B3_SAMPLED), Some("1" | "true")) || get(B3_FLAGS) == Some("1");
    Some(SpanContext { trace_id, span_id, sampled })
}

/// Pure: the incoming context (W3C first, then single then multi B3) and every format the request carried.
/// Two `traceparent` headers are none (the W3C test suite's `test_traceparent_duplicated`).
pub fn extract(headers: &HeaderMap) -> (Option<SpanContext>, Formats) {
    let value = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    // One pass over the names, then lookups of only those present: a request carries one format or none, and a
    // lookup of an absent name costs as much as of a present one.
    let (mut traceparent, mut b3_single, mut b3_multi) = (false, false, false);
    for name in headers.keys() {
        match name.as_str() {
            "traceparent" => traceparent = true,
            "b3" => b3_single = true,
            "x-b3-traceid" => b3_multi = true,
            _ => {}
        }
    }
    let w3c =
        traceparent.then(|| headers.get_all(TRACEPARENT).iter()).and_then(|mut all| match (all.next(), all.next()) {
            (Some(one), None) => one.to_str().ok().and_then(parse_traceparent),
            _ => None,
        });
    let formats = Formats { w3c: w3c.is_some(), b3_single, b3_multi };
    let context = w3c
        .or_else(|| value(B3).and_then(parse_b3_single))
        .or_else(|| formats.b3_multi.then(|| parse_b3_multi(headers)).flatten());
    (context, formats)
}

/// Pure: writes `ctx` (this hop's span) as the parent for the next hop: `traceparent` always (`tracestate` is left as
/// it came with a valid `traceparent`, dropped otherwise), and each B3 form the request carried (with `parent` as the
/// B3 parent span).
pub fn inject(headers: &mut HeaderMap, ctx: &SpanContext, parent: Option<[u8; 8]>, formats: Formats) {
    let sampled = if ctx.sampled { "1" } else { "0" };
    // `00-<trace>-<span>-0<sampled>`, written into one buffer (every request writes it), which B3's trace and span
    // IDs share.
    let mut written = [0u8; 55];
    written[..3].copy_from_slice(b"00-");
    write_hex(&mut written[3..35], &ctx.trace_id);
    written[35] = b'-';
    write_hex(&mut written[36..52], &ctx.span_id);
    written[52..54].copy_from_slice(b"-0");
    written[54] = sampled.as_bytes()[0];
    // Sensitive: between proxies HPACK sends it as a literal that is never indexed. Each request's value is new, so
    // indexing it would only evict the fields that do repeat from the HTTP/2 header table.
    let value = |b: bytes::Bytes| {
        let mut v = HeaderValue::from_maybe_shared(b).expect("hex is a valid header value");
        v.set_sensitive(true);
        v
    };
    if formats.b3_single {
        // `<trace>-<span>-<sampled>`: the traceparent without its version, with a one-digit flag.
        headers.insert(B3, value([&written[3..53], sampled.as_bytes()].concat().into()));
    }
    let traceparent = bytes::Bytes::copy_from_slice(&written);
    let (trace, span) = (traceparent.slice(3..35), traceparent.slice(36..52));
    if formats.b3_multi {
        headers.insert(B3_TRACE_ID, value(trace));
        headers.insert(B3_SPAN_ID, value(span));
        headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
        match parent {
            Some(p) => headers.insert(B3_PARENT_SPAN_ID, value(hex(&p).into())),
            None => headers.remove(B3_PARENT_SPAN_ID),
        };
        headers.remove(B3_FLAGS);
    }
    headers.insert(TRACEPARENT, value(traceparent));
    if !formats.w3c {
        headers.remove(TRACESTATE);
    }
}

/// Pure: this hop's span: a child of `parent` (its trace and sampling decision), else the root of a new trace sampled
/// when `draw` < `ratio`. `ids`: fresh random bytes for the IDs.
pub fn child(parent: Option<&SpanContext>, ratio: f64, draw: f64, ids: [u8; 24]) -> SpanContext {
    let mut span_id = [0u8; 8];
    span_id.copy_from_slice(&ids[16..]);
    span_id[0] |= 1; // never all zeros
    match parent {
        Some(p) => SpanContext { trace_id: p.trace_id, span_id, sampled: p.sampled },
        None => {
            let mut trace_id = [0u8; 16];
            trace_id.copy_from_slice(&ids[..16]);
            trace_id[0] |= 1;
            SpanContext { trace_id, span_id, sampled: draw < ratio }
        }
    }
}

/// Client (the caller's proxy) or server (the destination's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Client,
    Server,
}

/// A hop's span in flight.
#[derive(Debug, Clone)]
pub struct Hop {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    pub tracestate: String,
    pub kind: Kind,
    pub start: SystemTime,
}

/// What a finished hop records (OpenTelemetry HTTP semantic conventions, plus `ferry.*`).
pub struct Finished<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub protocol_version: &'a str,
    pub status: u16,
    pub error: &'a str,
    pub service: &'a str,
    pub peer_identity: &'a str,
    pub upstream: Option<std::net::SocketAddr>,
}

/// Starts and exports spans: the sampling ratio for new traces, and the export queue when an OTLP endpoint is set.
pub struct Tracer {
    ratio: f64,
    queue: Option<mpsc::Sender<Span>>,
    metrics: std::sync::Arc<Metrics>,
}

impl Tracer {
    /// A tracer for `service` (the resource's `service.name`); with `endpoint`, exporting to it from a background
    /// task (spawned here: call within the runtime).
    pub fn new(ratio: f64, endpoint: Option<String>, service: String, metrics: std::sync::Arc<Metrics>) -> Tracer {
        let queue = endpoint.map(|endpoint| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(export(endpoint, service, rx, metrics.clone()));
            tx
        });
        Tracer { ratio, queue, metrics }
    }

    /// This hop's span for a request with `headers`, which are rewritten to carry it to the next hop.
    pub fn start(&self, headers: &mut HeaderMap, kind: Kind) -> Hop {
        let (parent, formats) = extract(headers);
        let mut ids = [0u8; 24];
        crate::util::random_bytes(&mut ids);
        let context = child(parent.as_ref(), self.ratio, crate::util::random_fraction(), ids);
        let parent_id = parent.map(|p| p.span_id);
        inject(headers, &context, parent_id, formats);
        // Only an exported span needs its own copy of the tracestate.
        let tracestate = if self.exports_context(&context) {
            headers.get(TRACESTATE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
        } else {
            String::new()
        };
        Hop { context, parent: parent_id, tracestate, kind, start: SystemTime::now() }
    }

    /// Whether `hop` will be exported (sampled, with an endpoint set).
    pub fn exports(&self, hop: &Hop) -> bool {
        self.exports_context(&hop.context)
    }

    fn exports_context(&self, context: &SpanContext) -> bool {
        self.queue.is_some() && context.sampled
    }

    /// Ends `hop` (at the response headers) and queues it for export when sampled; never waits.
    pub fn finish(&self, hop: Hop, done: Finished<'_>) {
        let Some(queue) = &self.queue else { return };
        if !hop.context.sampled {
            return;
        }
        let span = to_span(hop, &done, SystemTime::now());
        if queue.try_send(span).is_err() {
            self.metrics.trace_spans_dropped.with_label_values(&["queue-full"]).inc();
        }
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn string(key: &str, value: &str) -> KeyValue {
    attribute(key, any_value::Value::StringValue(value.to_string()))
}

/// Pure: the OTLP span of a finished hop.
pub fn to_span(hop: Hop, done: &Finished<'_>, end: SystemTime) -> Span {
    let (host, port) = ferry_api::split_host_port(done.authority);
    let mut attributes = vec![
        string("http.request.method", done.method),
        string("url.path", done.path),
        string("server.address", host),
        attribute("http.response.status_code", any_value::Value::IntValue(i64::from(done.status))),
        string("network.protocol.version", done.protocol_version),
        string("ferry.service", done.service),
    ];
    if let Some(port) = port.and_then(|p| p.parse::<i64>().ok()) {
        attributes.push(attribute("server.port", any_value::Value::IntValue(port)));
    }
    if !done.peer_identity.is_empty() {
        attributes.push(string("ferry.peer_identity", done.peer_identity));
    }
    if let Some(upstream) = done.upstream {
        attributes.push(string("network.peer.address", &upstream.ip().to_string()));
        attributes.push(attribute("network.peer.port", any_value::Value::IntValue(i64::from(upstream.port()))));
    }
    // Server spans are errors on 5xx only; client spans on any failure to get an answer or a 5xx.
    let error_type = match (done.error, done.status) {
        ("", s) if s >= 500 => s.to_string(),
        ("", _) => String::new(),
        (reason, _) => reason.to_string(),
    };
    let status = if error_type.is_empty() {
        None
    } else {
        attributes.push(string("error.type", &error_type));
        Some(Status { code: status::StatusCode::Error as i32, message: error_type })
    };
    Span {
        trace_id: hop.context.trace_id.to_vec(),
        span_id: hop.context.span_id.to_vec(),
        parent_span_id: hop.parent.map(|p| p.to_vec()).unwrap_or_default(),
        trace_state: hop.tracestate,
        flags: u32::from(hop.context.sampled) | 0x100, // sampled; bit 8: the parent's remoteness is known
        name: done.method.to_string(),
        kind: match hop.kind {
            Kind::Client => span::SpanKind::Client as i32,
            Kind::Server => span::SpanKind::Server as i32,
        },
        start_time_unix_nano: nanos(hop.start),
        end_time_unix_nano: nanos(end),
        attributes,
        status,
        ..Default::default()
    }
}

/// The export task: batches of up to `BATCH` spans, at least every `FLUSH`, one request at a time; a failed or timed
/// out export drops its batch (counted), and the queue in front of it keeps the request path from ever waiting.
async fn export(endpoint: String, service: String, mut rx: mpsc::Receiver<Span>, metrics: std::sync::Arc<Metrics>) {
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(2)).connect_lazy(),
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "FERRY_OTLP_ENDPOINT is not a valid URI; spans are dropped");
            while rx.recv().await.is_some() {
                metrics.trace_spans_dropped.with_label_values(&["export-failed"]).inc();
            }
            return;
        }
    };
    let mut client = TraceServiceClient::new(channel);
    let resource = Resource {
        attributes: vec![string("service.name", &service), string("telemetry.sdk.name", "ferry")],
        ..Default::default()
    };
    let scope =
        InstrumentationScope { name: "ferry".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH {
                            break;
                        }
                    }
                    None if batch.is_empty() => return,
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let spans = std::mem::take(&mut batch);
        let count = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans { scope: Some(scope.clone()), spans, ..Default::default() }],
                ..Default::default()
            }],
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await {
            Ok(Ok(_)) => metrics.trace_spans_exported.inc_by(count),
            outcome => {
                metrics.trace_spans_dropped.with_label_values(&["export-failed"]).inc_by(count);
                let why = match outcome {
                    Ok(Err(status)) => status.to_string(),
                    _ => "timed out".into(),
                };
                tracing::debug!(%endpoint, spans = count, error = %why, "span export failed; the batch is dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn extraction_table() {
        let ctx = |sampled| Some((TRACE.to_string(), SPAN.to_string(), sampled));
        // (headers, expected (trace, span, sampled), formats w3c/b3 single/b3 multi)
        type Case<'a> = (Vec<(&'a str, String)>, Option<(String, String, bool)>, (bool, bool, bool));
        let cases: Vec<Case> = vec![
            (vec![("traceparent", format!("00-{TRACE}-{SPAN}-01"))], ctx(true), (true, false, false)),
            (vec![("traceparent", format!("00-{TRACE}-{SPAN}-00"))], ctx(false), (true, false, false)),
            // A future version with more fields is read; version ff and extra fields on 00 are not.
            (vec![("traceparent", format!("01-{TRACE}-{SPAN}-01-extra"))], ctx(true), (true, false, false)),
            (vec![("traceparent", format!("ff-{TRACE}-{SPAN}-01"))], None, (false, false, false)),
            (vec![("traceparent", format!("00-{TRACE}-{SPAN}-01-x"))], None, (false, false, false)),
            (vec![("traceparent", format!("00-{}-{SPAN}-01", "0".repeat(32)))], None, (false, false, false)),
            (vec![("traceparent", format!("00-{TRACE}-{}-01", "0".repeat(16)))], None, (false, false, false)),
            (vec![("traceparent", "00-xyz".into())], None, (false, false, false)),
            (vec![("b3", format!("{TRACE}-{SPAN}-1"))], ctx(true), (false, true, false)),
            (vec![("b3", format!("{TRACE}-{SPAN}-d-{SPAN}"))], ctx(true), (false, true, false)),
            (vec![("b3", format!("{TRACE}-{SPAN}"))], ctx(false), (false, true, false)),
            (vec![("b3", "1".into())], None, (false, true, false)),
            (
                vec![("x-b3-traceid", TRACE.into()), ("x-b3-spanid", SPAN.into()), ("x-b3-sampled", "1".into())],
                ctx(true),
                (false, false, true),
            ),
            (
                vec![("x-b3-traceid", TRACE.into()), ("x-b3-spanid", SPAN.into()), ("x-b3-flags", "1".into())],
                ctx(true),
                (false, false, true),
            ),
            // A 64-bit B3 trace ID is padded to 128 bits.
            (
                vec![("x-b3-traceid", "a3ce929d0e0e4736".into()), ("x-b3-spanid", SPAN.into())],
                Some(("0000000000000000a3ce929d0e0e4736".into(), SPAN.into(), false)),
                (false, false, true),
            ),
            // W3C wins over B3.
            (
                vec![("traceparent", format!("00-{TRACE}-{SPAN}-00")), ("b3", format!("{}-{SPAN}-1", "1".repeat(32)))],
                ctx(false),
                (true, true, false),
            ),
            (vec![], None, (false, false, false)),
        ];
        for (pairs, want, (w3c, b3_single, b3_multi)) in cases {
            let h = headers(&pairs.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>());
            let (got, formats) = extract(&h);
            let got = got.map(|c| (hex(&c.trace_id), hex(&c.span_id), c.sampled));
            assert_eq!(got, want, "{pairs:?}");
            assert_eq!(formats, Formats { w3c, b3_single, b3_multi }, "{pairs:?}");
        }
    }

    /// The W3C Trace Context test suite's `traceparent` cases (w3c/trace-context `test/test.py`): the header as sent,
    /// and whether a vendor continues its trace (`true`) or restarts it.
    #[test]
    fn w3c_test_suite_traceparents() {
        let (t, p) = ("12345678901234567890123456789012", "1234567890123456");
        let cases: &[(&str, bool)] = &[
            ("00-12345678901234567890123456789012-1234567890123456-01", true),
            ("00-12345678901234567890123456789012-1234567890123456-01.", false),
            ("00-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like", false),
            ("cc-12345678901234567890123456789012-1234567890123456-01", true),
            ("cc-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like", true),
            ("cc-12345678901234567890123456789012-1234567890123456-01.what-the-future-will-be-like", false),
            ("ff-12345678901234567890123456789012-1234567890123456-01", false),
            (".0-12345678901234567890123456789012-1234567890123456-01", false),
            ("0.-12345678901234567890123456789012-1234567890123456-01", false),
            ("000-12345678901234567890123456789012-1234567890123456-01", false),
            ("0000-12345678901234567890123456789012-1234567890123456-01", false),
            ("0-12345678901234567890123456789012-1234567890123456-01", false),
            ("00-00000000000000000000000000000000-1234567890123456-01", false),
            ("00-.2345678901234567890123456789012-1234567890123456-01", false),
            ("00-1234567890123456789012345678901.-1234567890123456-01", false),
            ("00-123456789012345678901234567890123-1234567890123456-01", false),
            ("00-1234567890123456789012345678901-1234567890123456-01", false),
            ("00-12345678901234567890123456789012-0000000000000000-01", false),
            ("00-12345678901234567890123456789012-.234567890123456-01", false),
            ("00-12345678901234567890123456789012-123456789012345.-01", false),
            ("00-12345678901234567890123456789012-12345678901234567-01", false),
            ("00-12345678901234567890123456789012-123456789012345-01", false),
            ("00-12345678901234567890123456789012-1234567890123456-.0", false),
            ("00-12345678901234567890123456789012-1234567890123456-0.", false),
            ("00-12345678901234567890123456789012-1234567890123456-001", false),
            ("00-12345678901234567890123456789012-1234567890123456-1", false),
            (" 00-12345678901234567890123456789012-1234567890123456-01", true),
            ("\t00-12345678901234567890123456789012-1234567890123456-01", true),
            ("00-12345678901234567890123456789012-1234567890123456-01 ", true),
            ("00-12345678901234567890123456789012-1234567890123456-01\t", true),
            ("\t 00-12345678901234567890123456789012-1234567890123456-01 \t", true),
        ];
        for (value, continued) in cases {
            let got = parse_traceparent(value).map(|c| (hex(&c.trace_id), hex(&c.span_id)));
            assert_eq!(got, continued.then(|| (t.to_string(), p.to_string())), "{value:?}");
        }
        // Two traceparent headers: restarted; the header's name in any case: continued.
        let one = "00-12345678901234567890123456789012-1234567890123456-01";
        let two = "00-12345678901234567890123456789011-1234567890123456-01";
        let mut h = headers(&[("traceparent", one)]);
        h.append("traceparent", HeaderValue::from_static(two));
        assert_eq!(extract(&h), (None, Formats::default()));
        assert!(extract(&headers(&[("TrAcEpArEnT", one)])).0.is_some());
    }

    /// The grammar of W3C Trace Context level 1 §3.2 written out directly (OWS, then `version "-" trace-id "-"
    /// parent-id "-" trace-flags` in lower-case hex; version 00 ends there, a later one may go on after a `-`).
    fn reference(value: &str) -> Option<(String, String, bool)> {
        let v = value.trim_matches(|c| c == ' ' || c == '\t').as_bytes();
        let lower_hex =
            |r: std::ops::Range<usize>| v[r].iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        let zero = |r: std::ops::Range<usize>| v[r].iter().all(|b| *b == b'0');
        let ok = v.len() >= 55
            && lower_hex(0..2)
            && &v[0..2] != b"ff"
            && [2, 35, 52].iter().all(|i| v[*i] == b'-')
            && lower_hex(3..35)
            && !zero(3..35)
            && lower_hex(36..52)
            && !zero(36..52)
            && lower_hex(53..55)
            && (v.len() == 55 || (&v[0..2] != b"00" && v[55] == b'-'));
        let text = |r: std::ops::Range<usize>| String::from_utf8(v[r].to_vec()).unwrap();
        ok.then(|| (text(3..35), text(36..52), u8::from_str_radix(&text(53..55), 16).unwrap() & 1 == 1))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// Any traceparent built from the grammar's parts (each part sometimes wrong: other lengths, upper case,
        /// separators, zeros, tails, whitespace) is read as the grammar reads it.
        #[test]
        fn traceparent_matches_the_grammar(
            ows in "[ \t]{0,2}",
            version in "(00|01|cc|fe|ff|0|000|0A|.0|zz)",
            trace in "([0-9a-f]{32}|0{32}|[0-9a-fA-F]{30,34}|[0-9a-f.]{32})",
            span in "([0-9a-f]{16}|0{16}|[0-9a-fA-F]{15,17}|[0-9a-f.]{16})",
            flags in "([0-9a-f]{2}|[0-9a-fA-F.x]{1,3})",
            seps in "(---|[-_.]{3})",
            tail in "(|-|-[a-z0-9-]{0,12}|[.x][a-z0-9-]{0,12})",
            ows2 in "[ \t]{0,2}",
        ) {
            let s = seps.as_bytes();
            let value = format!("{ows}{version}{}{trace}{}{span}{}{flags}{tail}{ows2}", s[0] as char, s[1] as char, s[2] as char);
            let got = parse_traceparent(&value).map(|c| (hex(&c.trace_id), hex(&c.span_id), c.sampled));
            proptest::prop_assert_eq!(got, reference(&value), "{:?}", value);
        }
    }

    #[test]
    fn children_and_injection() {
        let parent = parse_traceparent(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
        let ids = [7u8; 24];
        let c = child(Some(&parent), 0.0, 0.9, ids);
        assert_eq!((c.trace_id, c.sampled), (parent.trace_id, true), "a child keeps the trace and its sampling");
        assert_ne!(c.span_id, parent.span_id);
        // No parent: a new trace, sampled when the draw is under the ratio.
        assert!(child(None, 0.01, 0.005, ids).sampled);
        assert!(!child(None, 0.01, 0.5, ids).sampled);
        assert!(child(None, 1.0, 0.999, ids).sampled);
        assert!(!child(None, 0.0, 0.0, ids).sampled);
        let root = child(None, 1.0, 0.0, [0u8; 24]);
        assert!(root.trace_id != [0; 16] && root.span_id != [0; 8], "IDs are never all zeros");
        // Injection: traceparent always; each B3 form that came; tracestate untouched after a valid traceparent.
        let mut h = headers(&[("b3", "x"), ("x-b3-traceid", "x"), ("x-b3-flags", "1"), ("tracestate", "a=b")]);
        let formats = Formats { w3c: true, b3_single: true, b3_multi: true };
        inject(&mut h, &c, Some(parent.span_id), formats);
        let (t, s) = (hex(&c.trace_id), hex(&c.span_id));
        assert_eq!(h["traceparent"], format!("00-{t}-{s}-01").as_str());
        assert!(h["traceparent"].is_sensitive(), "never indexed by HPACK");
        assert_eq!(h["b3"], format!("{t}-{s}-1").as_str());
        assert_eq!((h["x-b3-traceid"].to_str().unwrap(), h["x-b3-spanid"].to_str().unwrap()), (t.as_str(), s.as_str()));
        assert_eq!(h["x-b3-parentspanid"], SPAN);
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-flags"));
        assert_eq!(h["tracestate"], "a=b");
        // What was injected reads back as the same context.
        assert_eq!(extract(&h).0, Some(c));
        // A trace restarted here (no valid traceparent came) does not carry on the tracestate that came.
        inject(&mut h, &c, None, Formats::default());
        assert!(!h.contains_key("tracestate"), "{h:?}");
        let mut plain = HeaderMap::new();
        inject(&mut plain, &c, None, Formats::default());
        assert_eq!(plain.len(), 1, "only traceparent: {plain:?}");
    }

    #[test]
    fn a_finished_hop_becomes_an_otlp_span() {
        let parent = parse_traceparent(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
        let context = child(Some(&parent), 0.0, 0.0, [3u8; 24]);
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let hop = Hop { context, parent: Some(parent.span_id), tracestate: "a=b".into(), kind: Kind::Client, start };
        let done = Finished {
            method: "GET",
            path: "/price",
            authority: "api.local:8080",
            protocol_version: "1.1",
            status: 502,
            error: "connect-refused",
            service: "api.default",
            peer_identity: "",
            upstream: Some("127.0.0.1:9000".parse().unwrap()),
        };
        let span = to_span(hop, &done, start + Duration::from_millis(5));
        assert_eq!(
            (span.trace_id.as_slice(), span.parent_span_id.as_slice()),
            (&parent.trace_id[..], &parent.span_id[..])
        );
        assert_eq!(span.kind, span::SpanKind::Client as i32);
        assert_eq!(span.end_time_unix_nano - span.start_time_unix_nano, 5_000_000);
        assert_eq!(span.trace_state, "a=b");
        let attr = |k: &str| span.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()?.value);
        assert_eq!(attr("http.request.method"), Some(any_value::Value::StringValue("GET".into())));
        assert_eq!(attr("server.address"), Some(any_value::Value::StringValue("api.local".into())));
        assert_eq!(attr("server.port"), Some(any_value::Value::IntValue(8080)));
        assert_eq!(attr("http.response.status_code"), Some(any_value::Value::IntValue(502)));
        assert_eq!(attr("error.type"), Some(any_value::Value::StringValue("connect-refused".into())));
        assert_eq!(span.status.map(|s| s.code), Some(status::StatusCode::Error as i32));
    }
}
