//! Bad input at a real `ferry` process: each gets a clean 4xx + close or a GOAWAY, is counted, and harms no one else.

use ferry_test_support as support;

use std::time::Duration;

use http::{Request, StatusCode};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::backend::{self, TestBody, full};
use support::{Ferry, service_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes` (optionally leaving the connection open) and reads everything until the proxy closes it.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the proxy must close the connection")
        .ok();
    out
}

fn status_line(out: &[u8]) -> String {
    String::from_utf8_lossy(out).lines().next().unwrap_or_default().to_string()
}

async fn healthy_request(tx: &mut http1::SendRequest<TestBody>) {
    tx.ready().await.expect("the other connection is still open");
    let resp = tx.send_request(Request::get("/").header("host", "echo").body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_cleanly_and_counted() {
    let app = backend::http_backend().await;
    let ferry = Ferry::start(
        Some(&service_yaml("echo", 80, &[app.addr])),
        &[("FERRY_MAX_HEADER_BYTES", "16384"), ("FERRY_HEADER_READ_TIMEOUT", "1s")],
    );
    // A connection opened before, used between the bad inputs: it must not notice them.
    let stream = TcpStream::connect(ferry.outbound).await.unwrap();
    let (mut tx, conn) = http1::handshake::<_, TestBody>(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    healthy_request(&mut tx).await;

    // 1. Malformed request line.
    let out = exchange(ferry.outbound, b"GET /a b c HTTP/1.1\r\nHost: echo\r\n\r\n").await;
    assert_eq!(status_line(&out), "HTTP/1.1 400 Bad Request");
    healthy_request(&mut tx).await;

    // 2. Headers over the configured limit.
    let big = format!("GET / HTTP/1.1\r\nHost: echo\r\nX-Big: {}\r\n\r\n", "a".repeat(32 * 1024));
    let out = exchange(ferry.outbound, big.as_bytes()).await;
    assert_eq!(status_line(&out), "HTTP/1.1 431 Request Header Fields Too Large");
    healthy_request(&mut tx).await;

    // 3. A client that never finishes its headers: closed at the header-read timeout.
    let out = exchange(ferry.outbound, b"GET / HTTP/1.1\r\nHost: echo\r\nX-Slow: ").await;
    let line = status_line(&out);
    assert!(line.is_empty() || line.starts_with("HTTP/1.1 408"), "got {line:?}");
    healthy_request(&mut tx).await;

    // 4. An HTTP/2 preface followed by garbage: a GOAWAY (frame type 7), then close.
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(b"\x00\x00\x05\xff\xff\x00\x00\x00\x00garbagegarbage garbage");
    let out = exchange(ferry.outbound, &bytes).await;
    assert!(frame_types(&out).contains(&7), "no GOAWAY in {out:?}");
    healthy_request(&mut tx).await;

    let counted = ferry.metric(r#"ferry_proxy_errors_total{direction="outbound",reason="bad-request"}"#);
    assert_eq!(counted, 4.0, "{}", ferry.metrics());
}

/// The types of the HTTP/2 frames in `bytes` (9-byte header: 24-bit length, type, flags, stream id).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_on_the_health_and_admin_ports_are_cut_off() {
    // The health port is never intercepted (the kubelet and Prometheus need it): it must bound a slow client as the
    // listeners do, and so must the admin port.
    let ferry = Ferry::start(None, &[("FERRY_HEADER_READ_TIMEOUT", "1s")]);
    for (port, addr) in [("health", ferry.health), ("admin", ferry.admin)] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(closed.is_ok(), "the {port} port kept a connection with unfinished headers for 10 s");
        // And a complete request on a new connection is still answered.
        let out = exchange(addr, b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(status_line(&out).starts_with("HTTP/1.1 "), "{port}: {}", status_line(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    // No bytes either way for FERRY_IDLE_TIMEOUT: an h2c connection that only sent its preface, an HTTP/1 keep-alive
    // connection after its response, an opaque connection after the app's greeting — each is closed.
    let app = backend::http_backend().await;
    let greeting = backend::greeting_backend(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
    let ferry = Ferry::start(
        Some(&service_yaml("echo", 80, &[app.addr])),
        &[("FERRY_IDLE_TIMEOUT", "1s"), ("FERRY_APP_ADDR", &greeting.addr.to_string())],
    );
    let closed_within = |s: TcpStream, what: &'static str| async move {
        let mut s = s;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "{what}: still open after 10 s of idleness");
        out
    };
    // h2c: the preface and an empty SETTINGS frame, then nothing.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let mut s = TcpStream::connect(ferry.outbound).await.unwrap();
    s.write_all(preface).await.unwrap();
    closed_within(s, "h2c preface only").await;
    // h2c: the preface, then only PINGs (bytes move, no request ever does): idle all the same.
    let s = TcpStream::connect(ferry.outbound).await.unwrap();
    let (mut read, mut write) = s.into_split();
    write.write_all(preface).await.unwrap();
    let pinger = tokio::spawn(async move {
        for _ in 0..50 {
            let ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00pingping";
            if write.write_all(ping).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "h2c with PINGs only: still open after 10 s without a request");
    pinger.abort();
    // HTTP/1 keep-alive: one request, its response, then nothing.
    let mut s = TcpStream::connect(ferry.outbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n").await.unwrap();
    let out = closed_within(s, "HTTP/1 keep-alive").await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    // Opaque (inbound, bytes that are not HTTP to a server-first app): its greeting, then nothing.
    let mut s = TcpStream::connect(ferry.inbound).await.unwrap();
    s.write_all(b"\x00\x01").await.unwrap();
    let out = closed_within(s, "opaque").await;
    assert!(out.starts_with(b"220 ferry-test ready"), "{}", String::from_utf8_lossy(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_on_a_keep_alive_connection_has_a_header_deadline() {
    // After one request and its response, the next request's headers trickle in a byte at a time: the connection is
    // closed at the header-read timeout (1 s), not kept until the idle timeout (1 h by default).
    let app = backend::http_backend().await;
    let app_addr = app.addr.to_string();
    let env = [("FERRY_HEADER_READ_TIMEOUT", "1s"), ("FERRY_APP_ADDR", app_addr.as_str())];
    let ferry = Ferry::start(Some(&service_yaml("echo", 80, &[app.addr])), &env);
    for addr in [ferry.outbound, ferry.inbound] {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = s.into_split();
        write.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n").await.unwrap();
        let mut first = [0u8; 12];
        read.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        let trickle = tokio::spawn(async move {
            for byte in b"GET / HTTP/1.1\r\nHost: echo\r\nX-Slow: ".iter().cycle().take(100) {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(15), read.read_to_end(&mut rest)).await;
        trickle.abort();
        assert!(closed.is_ok(), "{addr}: a second request trickled for 15 s kept the connection open");
    }
    for direction in ["outbound", "inbound"] {
        let counted =
            ferry.metric(&format!(r#"ferry_proxy_errors_total{{direction="{direction}",reason="bad-request"}}"#));
        assert_eq!(counted, 1.0, "{direction}: {}", ferry.metrics());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_tcp_idle_timeout_closes_its_opaque_connections() {
    // The proxy's idle timeout stays at its default (1 h); the Service's TrafficPolicy says 1 s for opaque TCP.
    let greeting = backend::greeting_backend(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
    let policy = "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: db}\nspec: {targetRef: {kind: Service, name: db}, tcpIdleTimeout: 1s}\n";
    let config = format!("{}{policy}", service_yaml("db", 5432, &[greeting.addr]));
    let ferry = Ferry::start(
        Some(&config),
        &[("FERRY_SERVICE", "db"), ("FERRY_APP_ADDR", &greeting.addr.to_string()), ("FERRY_HEADER_READ_TIMEOUT", "1s")],
    );
    let mut s = TcpStream::connect(ferry.inbound).await.unwrap();
    s.write_all(b"\x00\x01").await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "an opaque connection idle past the Service's tcpIdleTimeout is still open after 10 s");
    assert!(out.starts_with(b"220 ferry-test ready"), "{}", String::from_utf8_lossy(&out));
}
