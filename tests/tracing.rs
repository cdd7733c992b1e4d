//! Trace context and span export with real `ferry-control` and `ferry` processes and a real OTLP/gRPC receiver (the
//! official protos, served here): client → Ferry → Ferry → server gives two spans with the right parent/child links
//! and the server app sees the trace in `traceparent`; B3-only and context-free requests; a receiver that is down
//! costs no request and the drop counter rises.

use ferry_test_support::{self as support, control, mesh};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::hex;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use support::backend;
use support::{http_exchange_full, wait_until};

/// Every span received, in order.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    fn of_trace(&self, trace: &[u8]) -> Vec<Span> {
        self.0.lock().unwrap().iter().filter(|s| s.trace_id == trace).cloned().collect()
    }
}

/// A receiver on a fresh loopback port; sending on the returned channel stops it (the listener closes and its
/// connections are told to go away).
async fn receiver() -> (Receiver, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Receiver::default();
    let service = TraceServiceServer::new(r.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let shutdown = async {
            let _ = stopped.await;
        };
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
    });
    (r, addr, stop)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// The (client span, server span) of one trace, once both have arrived.
fn spans_of(r: &Receiver, trace: &str) -> (Span, Span) {
    let trace = unhex(trace);
    wait_until("both hops' spans", Duration::from_secs(10), || r.of_trace(&trace).len() >= 2);
    let spans = r.of_trace(&trace);
    assert_eq!(spans.len(), 2, "one span per hop: {spans:?}");
    let kind = |k: SpanKind| spans.iter().find(|s| s.kind == k as i32).cloned().expect("a span of each kind");
    (kind(SpanKind::Client), kind(SpanKind::Server))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_link_across_two_proxies_and_the_app_sees_the_trace() {
    let app = backend::http_backend().await;
    let (spans, otlp, stop) = receiver().await;
    tokio::task::block_in_place(|| {
        let cp = control::ControlPlane::start(&control::state_dir("tracing"));
        cp.ok(&["apply", "-f", "-"], Some(&mesh::service("api", "api.local", "")));
        let env = [("FERRY_OTLP_ENDPOINT", format!("http://{otlp}")), ("FERRY_TRACE_SAMPLING", "1".to_string())];
        let api = mesh::proxy(&cp, "api", Some(app.addr), &env);
        let web = mesh::proxy(&cp, "web", None, &env);
        let get = |headers: &[(&str, &str)]| {
            let mut all = vec![("Host", "api.local")];
            all.extend_from_slice(headers);
            http_exchange_full(web.outbound, "GET", "/price", &all, "").expect("an answer")
        };
        wait_until("web routes api.local", Duration::from_secs(10), || get(&[]).status == 200);

        // W3C: the caller's context is the client span's parent; the server span is the client span's child; the app
        // sees the trace with the server span as its parent.
        let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let r = get(&[("traceparent", &format!("00-{trace}-{parent}-01")), ("tracestate", "vendor=x")]);
        assert_eq!(r.status, 200);
        let (client, server) = spans_of(&spans, trace);
        assert_eq!(hex(&client.parent_span_id), parent);
        assert_eq!(server.parent_span_id, client.span_id, "the server span is the client span's child");
        let seen = r.header("x-seen-traceparent").unwrap();
        assert_eq!(seen, format!("00-{trace}-{}-01", hex(&server.span_id)), "the app's parent is the server span");
        assert_eq!(client.trace_state, "vendor=x");
        let attr = |s: &Span, k: &str| {
            s.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()).and_then(|v| v.value)
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        assert_eq!(attr(&client, "http.request.method"), Some(Value::StringValue("GET".into())));
        assert_eq!(attr(&server, "url.path"), Some(Value::StringValue("/price".into())));
        assert_eq!(attr(&server, "http.response.status_code"), Some(Value::IntValue(200)));
        assert_eq!(
            attr(&server, "ferry.peer_identity"),
            Some(Value::StringValue("spiffe://cluster.local/ns/default/sa/web".into()))
        );
        assert!(client.start_time_unix_nano <= server.start_time_unix_nano);
        assert!(server.end_time_unix_nano <= client.end_time_unix_nano);

        // B3 only (single header): the same links, the B3 header rewritten for the app, and a traceparent added.
        let (trace, parent) = ("a3ce929d0e0e47364bf92f3577b34da6", "b7ad6b7169203331");
        let r = get(&[("b3", &format!("{trace}-{parent}-1"))]);
        let (client, server) = spans_of(&spans, trace);
        assert_eq!(hex(&client.parent_span_id), parent);
        assert_eq!(server.parent_span_id, client.span_id);
        assert_eq!(r.header("x-seen-b3").unwrap(), format!("{trace}-{}-1", hex(&server.span_id)));
        assert!(r.header("x-seen-traceparent").unwrap().contains(trace));

        // No context: the caller's proxy starts a trace (sampling 1 here), the client span is its root.
        let r = get(&[]);
        let seen = r.header("x-seen-traceparent").unwrap().to_string();
        let trace = seen.split('-').nth(1).unwrap().to_string();
        let (client, server) = spans_of(&spans, &trace);
        assert!(client.parent_span_id.is_empty(), "a root span");
        assert_eq!(server.parent_span_id, client.span_id);
        assert_eq!(web.metric("ferry_trace_spans_dropped_total"), 0.0);
        assert!(web.metric("ferry_trace_spans_exported_total") >= 3.0);

        // The receiver goes away: requests are unaffected, and the spans are counted as dropped.
        let _ = stop.send(());
        std::thread::sleep(Duration::from_millis(500));
        let received = spans.0.lock().unwrap().len();
        for _ in 0..20 {
            assert_eq!(get(&[]).status, 200);
        }
        wait_until("dropped spans counted", Duration::from_secs(15), || {
            web.metric(r#"ferry_trace_spans_dropped_total{reason="export-failed"}"#) >= 20.0
                && api.metric(r#"ferry_trace_spans_dropped_total{reason="export-failed"}"#) >= 20.0
        });
        assert_eq!(spans.0.lock().unwrap().len(), received, "nothing reached the stopped receiver");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_trace_is_propagated_but_not_exported() {
    let app = backend::http_backend().await;
    let (spans, otlp, _task) = receiver().await;
    let env = [("FERRY_OTLP_ENDPOINT", format!("http://{otlp}")), ("FERRY_TRACE_SAMPLING", "0".to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ferry = tokio::task::block_in_place(|| {
        support::Ferry::start(Some(&support::service_yaml("api", 80, &[app.addr])), &env)
    });
    tokio::task::block_in_place(|| {
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let r = http_exchange_full(
            ferry.outbound,
            "GET",
            "/",
            &[("Host", "api"), ("traceparent", &format!("00-{trace}-b7ad6b7169203331-00"))],
            "",
        )
        .unwrap();
        let seen = r.header("x-seen-traceparent").unwrap();
        assert!(seen.starts_with(&format!("00-{trace}-")) && seen.ends_with("-00"), "{seen}");
        assert!(!seen.contains("b7ad6b7169203331"), "the proxy's own span is the app's parent: {seen}");
        // Sampling 0 and no context: a trace is still started (the next hop has a parent), not sampled.
        let r = http_exchange_full(ferry.outbound, "GET", "/", &[("Host", "api")], "").unwrap();
        assert!(r.header("x-seen-traceparent").unwrap().ends_with("-00"));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(spans.0.lock().unwrap().is_empty(), "nothing sampled, nothing exported");
    });
}
