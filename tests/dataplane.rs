//! Forwarding through a real `ferry` process: HTTP/1.1, h2c, upgrades, large streamed bodies, opaque TCP.

use ferry_test_support as support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::backend::{self, TestBody, full};
use support::{Ferry, service_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn h1(addr: std::net::SocketAddr) -> http1::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    tx
}

async fn h2(addr: std::net::SocketAddr) -> http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    tx
}

/// A mesh of one: service `echo` (port 80) is the backend, which is also this sidecar's app.
async fn setup() -> (backend::Backend, Ferry) {
    let app = backend::http_backend().await;
    let ferry =
        Ferry::start(Some(&service_yaml("echo", 80, &[app.addr])), &[("FERRY_APP_ADDR", &app.addr.to_string())]);
    (app, ferry)
}

/// A pooled upstream connection whose response is still streaming takes no second request: the second goes out on a
/// connection of its own and completes while the first is open; after both, the pool reuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_upstream_connection_takes_no_second_request() {
    let (app, ferry) = setup().await;
    let (chunks, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok::<_, backend::BoxError>(Frame::data(b)));
    let mut first = h1(ferry.outbound).await;
    let req = Request::post("/echo").header("host", "echo").body(BodyExt::boxed(StreamBody::new(stream))).unwrap();
    chunks.send(Bytes::from_static(b"one;")).await.unwrap();
    let resp = first.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut echoed = resp.into_body();
    let frame = echoed.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&frame[..], b"one;", "the first response streams");

    // The first upstream connection is busy: a second request must not queue behind it.
    let mut second = h1(ferry.outbound).await;
    let req = Request::get("/hello").header("host", "echo").body(full("")).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), second.send_request(req))
        .await
        .expect("the second request waited for the first one's connection")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();

    chunks.send(Bytes::from_static(b"two;")).await.unwrap();
    drop(chunks);
    let rest = echoed.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"two;");
    assert_eq!(app.connections.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Both are idle now and listed: more requests reuse them.
    for _ in 0..3 {
        second.ready().await.unwrap();
        let req = Request::get("/hello").header("host", "echo").body(full("")).unwrap();
        let resp = second.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(app.connections.load(std::sync::atomic::Ordering::SeqCst), 2, "the pool reuses idle connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_and_chunked_through_outbound_and_inbound() {
    let (app, ferry) = setup().await;
    for (listener, expect_host) in [(ferry.outbound, "echo"), (ferry.inbound, "echo")] {
        let mut tx = h1(listener).await;
        // Three requests on one client connection: keep-alive across the proxy.
        for i in 0..3 {
            tx.ready().await.unwrap();
            let req = Request::get("/hello").header("host", "echo").body(full("")).unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "request {i} via {listener}");
            assert_eq!(resp.headers()["x-seen-host"], expect_host);
            assert_eq!(resp.headers()["x-seen-version"], "HTTP/1.1");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello from backend");
        }
        // A chunked request body (no content-length) streamed in pieces, echoed back.
        tx.ready().await.unwrap();
        let parts: Vec<Result<Frame<Bytes>, backend::BoxError>> =
            (0..5).map(|i| Ok(Frame::data(Bytes::from(format!("part{i};"))))).collect();
        let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(parts)));
        let req = Request::post("/echo").header("host", "echo").body(body).unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"part0;part1;part2;part3;part4;");
    }
    // Eight requests reached the app over pooled upstream connections (allowing a second one per listener), not one
    // connection each.
    let upstream = app.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(upstream <= 3, "{upstream} upstream connections for 8 sequential requests: the pool is not reused");
    // Absolute-form (explicit proxy style) routes by the URI's authority.
    let mut tx = h1(ferry.outbound).await;
    let req = Request::get("http://echo/x").header("host", "echo").body(full("")).unwrap();
    assert_eq!(tx.send_request(req).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        ferry.metric(r#"ferry_requests_total{direction="outbound",service="echo.default",status_class="2xx"}"#),
        5.0
    );
    assert_eq!(
        ferry.metric(r#"ferry_requests_total{direction="inbound",service="unselected",status_class="2xx"}"#),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_upload_and_download_stream_without_buffering() {
    const SIZE: u64 = 50 * 1024 * 1024;
    let (_app, ferry) = setup().await;
    let expected = backend::pattern_sha256(SIZE);
    let (rss_before, _) = ferry.rss_kib();
    let mut peak = rss_before;

    // Upload: the app hashes what arrives.
    let mut tx = h1(ferry.outbound).await;
    let req = Request::post("/sha256").header("host", "echo").body(backend::pattern_body(SIZE)).unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), format!("{SIZE} {expected}"));
    peak = peak.max(ferry.rss_kib().0);

    // Download: we hash what arrives, sampling the proxy's RSS while the body is in flight.
    tx.ready().await.unwrap();
    let req = Request::get(format!("/download?bytes={SIZE}")).header("host", "echo").body(full("")).unwrap();
    let mut body = tx.send_request(req).await.unwrap().into_body();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len() as u64;
            sha2::Digest::update(&mut hasher, &data);
            if n % (8 * 1024 * 1024) < data.len() as u64 {
                peak = peak.max(ferry.rss_kib().0);
            }
        }
    }
    assert_eq!((n, ferry_api::hex(&sha2::Digest::finalize(hasher))), (SIZE, expected.clone()));

    // The same through h2c.
    let mut tx2 = h2(ferry.outbound).await;
    let req = Request::post("http://echo/sha256").body(backend::pattern_body(SIZE)).unwrap();
    let body = tx2.send_request(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), format!("{SIZE} {expected}"));
    peak = peak.max(ferry.rss_kib().0);

    let growth_mib = (peak.saturating_sub(rss_before)) as f64 / 1024.0;
    eprintln!("ferry RSS before {rss_before} KiB, peak {peak} KiB, growth {growth_mib:.1} MiB for 3 x 50 MiB bodies");
    assert!(growth_mib < 16.0, "RSS grew {growth_mib:.1} MiB: bodies must stream, not buffer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue() {
    let (_app, ferry) = setup().await;
    let mut s = TcpStream::connect(ferry.outbound).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    // The interim response comes before we send any body byte.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n =
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("no 100 Continue").unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"), "got {:?}", String::from_utf8_lossy(&got));
    s.write_all(b"hello world").await.unwrap();
    while !String::from_utf8_lossy(&got).contains("hello world") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text["HTTP/1.1 100 Continue\r\n\r\n".len()..].starts_with("HTTP/1.1 200 OK\r\n"), "got {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_an_upgrade() {
    let ws_app = backend::websocket_backend().await;
    let ferry = Ferry::start(Some(&service_yaml("chat", 80, &[ws_app.addr])), &[]);
    let stream = TcpStream::connect(ferry.outbound).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://chat/socket", stream).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..10 {
        let msg = format!("message {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), msg);
    }
    let big = vec![7u8; 1 << 20];
    ws.send(tokio_tungstenite::tungstenite::Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_keeps_http2_and_authority() {
    let (_app, ferry) = setup().await;
    let mut tx = h2(ferry.outbound).await;
    // Concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            tx.ready().await.unwrap();
            let req = Request::post("http://echo/echo").body(full(format!("stream {i}"))).unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
            assert_eq!(resp.headers()["x-seen-host"], "echo");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("stream {i}"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Through the inbound listener too.
    let mut tx_in = h2(ferry.inbound).await;
    let resp = tx_in.send_request(Request::get("http://echo/").body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
    tx.ready().await.unwrap();
    assert!(
        ferry.metric(r#"ferry_protocol_detections_total{direction="outbound",protocol="h2",reason="detected"}"#) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_keeps_half_close() {
    let app = backend::half_close_backend().await;
    let ferry = Ferry::start(None, &[("FERRY_APP_ADDR", &app.addr.to_string())]);
    let mut s = TcpStream::connect(ferry.inbound).await.unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap(); // half-close: we still read the answer
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(&answer[..12], b"echo 100000:");
    assert_eq!(&answer[13..], &payload[..], "every byte relayed both ways");
    assert_eq!(
        ferry.metric(r#"ferry_protocol_detections_total{direction="inbound",protocol="tcp",reason="detected"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_on_an_opaque_port() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = backend::greeting_backend(listener).await;
    // Opaque port: the greeting must come long before the (30 s) detection timeout.
    let ferry = Ferry::start(
        None,
        &[
            ("FERRY_APP_ADDR", &app.addr.to_string()),
            ("FERRY_OPAQUE_PORTS", &format!("3306,{port}")),
            ("FERRY_DETECT_TIMEOUT", "30s"),
        ],
    );
    let mut s = TcpStream::connect(ferry.inbound).await.unwrap();
    let mut buf = [0u8; 64];
    let n =
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("greeting not relayed").unwrap();
    assert_eq!(&buf[..n], b"220 ferry-test ready\r\n");
    s.write_all(b"PING\r\n").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"PING\r\n");
    assert_eq!(
        ferry.metric(r#"ferry_protocol_detections_total{direction="inbound",protocol="tcp",reason="opaque-port"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_on_a_detected_inbound_port_is_closed_not_forwarded() {
    // A server-first app on a port not declared opaque: inbound, nothing reaches it because bytes came late (a
    // request sent after the detection timeout must not pass unparsed); the connection ends at the header timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = backend::greeting_backend(listener).await;
    let ferry = Ferry::start(
        None,
        &[
            ("FERRY_APP_ADDR", &app.addr.to_string()),
            ("FERRY_DETECT_TIMEOUT", "300ms"),
            ("FERRY_HEADER_READ_TIMEOUT", "1s"),
        ],
    );
    let mut s = TcpStream::connect(ferry.inbound).await.unwrap();
    let mut buf = [0u8; 64];
    let n =
        tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await.expect("connection kept").unwrap_or(0);
    assert_eq!(n, 0, "closed, no greeting relayed: {:?}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(
        ferry.metric(r#"ferry_protocol_detections_total{direction="inbound",protocol="tcp",reason="timeout"}"#),
        1.0
    );
    assert_eq!(ferry.metric(r#"ferry_tcp_connections_failed_total{direction="inbound",reason="detect-timeout"}"#), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_are_labelled() {
    // No config at all: ready, and explicit requests for unknown hosts get 502 no-route.
    let ferry = Ferry::start(None, &[]);
    let mut tx = h1(ferry.outbound).await;
    let resp =
        tx.send_request(Request::get("/").header("host", "nowhere.example").body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["ferry-proxy-error"], "no-route");
    drop(ferry);

    // A service whose endpoint refuses connections.
    let dead = support::loopback(support::free_port());
    let ferry = Ferry::start(Some(&service_yaml("dead", 80, &[dead])), &[]);
    let mut tx = h1(ferry.outbound).await;
    let resp = tx.send_request(Request::get("/").header("host", "dead").body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["ferry-proxy-error"], "connect-refused");
    // gRPC callers get Trailers-Only with grpc-status UNAVAILABLE (14), never a bare HTTP error.
    let mut tx2 = h2(ferry.outbound).await;
    let req = Request::post("http://dead/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(""))
        .unwrap();
    let resp = tx2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()["ferry-proxy-error"], "connect-refused");
    assert_eq!(ferry.metric(r#"ferry_proxy_errors_total{direction="outbound",reason="connect-refused"}"#), 2.0);
    // CONNECT tunnels are refused with a clear proxy error.
    let mut s = TcpStream::connect(ferry.outbound).await.unwrap();
    s.write_all(b"CONNECT dead:443 HTTP/1.1\r\nHost: dead:443\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 400") && head.contains("ferry-proxy-error: bad-request"), "{head}");
}

/// IPv6 loopback listeners work; an IPv6 address the host does not have is logged and skipped, never fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listeners() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI needs IPv6 on loopback for this test");
        eprintln!("skipped: no IPv6 on loopback here");
        return;
    }
    let app = backend::http_backend().await;
    let v6 = format!("[::1]:{}", support::free_port());
    // 2001:db8::/32 is the documentation range: never assigned to this host, so binding it fails.
    let outbound = format!("{v6},[2001:db8::1]:15001");
    let ferry = Ferry::start(Some(&service_yaml("echo", 80, &[app.addr])), &[("FERRY_OUTBOUND_ADDR", &outbound)]);
    let mut tx = h1(v6.parse().unwrap()).await;
    let resp = tx.send_request(Request::get("/").header("host", "echo").body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(ferry.logs().contains("2001:db8::1"), "the skipped address is logged");
}

/// A route whose endpoint is one of the proxy's own listeners is refused (502 no-route), not looped; other routes
/// on the same proxy keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_own_listeners_are_refused() {
    let app = backend::http_backend().await;
    let outbound = support::loopback(support::free_port());
    let config = format!("{}{}", service_yaml("echo", 80, &[app.addr]), service_yaml("itself", 80, &[outbound]));
    let ferry = Ferry::start(Some(&config), &[("FERRY_OUTBOUND_ADDR", &outbound.to_string())]);
    let mut tx = h1(outbound).await;
    let resp = tx.send_request(Request::get("/").header("host", "itself").body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["ferry-proxy-error"], "no-route");
    tx.ready().await.unwrap();
    let resp = tx.send_request(Request::get("/").header("host", "echo").body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(ferry.logs().contains("one of this proxy's own listeners"));
}
