//! mTLS modes and AuthorizationPolicy with real `ferry-control` and `ferry` processes: strict refuses plaintext,
//! unmeshed TLS and certificates from another CA, permissive accepts them and still uses mTLS between proxies; an
//! AuthorizationPolicy lets listed callers through and answers the rest 403 (gRPC PERMISSION_DENIED, TCP closed).

use ferry_test_support::{self as support, control, mesh};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::{ControlPlane, state_dir};
use mesh::{ClientCert, Probe, proxy, service};
use support::{Ferry, backend, http_exchange_full, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn traffic_policy(name: &str, mode: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec: {{targetRef: {{kind: Service, name: {name}}}, mtls: {mode}}}\n"
    )
}

/// The app's own TLS (an unmeshed workload's server): a TLS echo server with a self-signed `tlsapp.test` certificate.
async fn tls_echo_app() -> SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["tlsapp.test".to_string()]).unwrap().self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `data` in the clear and reads until the peer closes (or 5 s pass).
async fn plaintext_exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(data).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

fn inbound(p: &Ferry) -> SocketAddr {
    p.inbound
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_what_is_not_mesh_mtls_and_permissive_accepts_it() {
    let app = backend::http_backend().await;
    let legacy_app = backend::http_backend().await;
    let tls_app = tls_echo_app().await;
    // Strict is the mesh-wide default here; two Services opt back into permissive.
    let cp = tokio::task::block_in_place(|| {
        let addrs = [support::free_addr(), support::free_addr(), support::free_addr()];
        ControlPlane::start_on(&state_dir("authz-modes"), addrs, &["--mtls-mode", "strict"])
    });
    for (name, permissive) in [("api", false), ("legacy", true), ("tlsapp", true)] {
        cp.ok(&["apply", "-f", "-"], Some(&service(name, &format!("{name}.local"), "")));
        if permissive {
            cp.ok(&["apply", "-f", "-"], Some(&traffic_policy(name, "permissive")));
        }
    }
    let (api, legacy, tlsapp, web) = tokio::task::block_in_place(|| {
        (
            proxy(&cp, "api", Some(app.addr), &[]),
            proxy(&cp, "legacy", Some(legacy_app.addr), &[]),
            proxy(&cp, "tlsapp", Some(tls_app), &[]),
            proxy(&cp, "web", None, &[]),
        )
    });
    tokio::task::block_in_place(|| {
        wait_until("web reaches api and legacy over the mesh", Duration::from_secs(10), || {
            ["api.local", "legacy.local"].iter().all(|host| {
                http_exchange_full(web.outbound, "GET", "/", &[("Host", host)], "").is_some_and(|r| r.status == 200)
            })
        })
    });
    let via_mesh = http_exchange_full(web.outbound, "GET", "/", &[("Host", "api.local")], "").unwrap();
    assert_eq!(via_mesh.header("x-seen-client-id"), Some("spiffe://cluster.local/ns/default/sa/web"));
    let app_requests = app.requests.load(std::sync::atomic::Ordering::SeqCst);

    // Strict (the mesh default): plaintext HTTP gets 403, plaintext bytes and an unmeshed client's own TLS a closed
    // connection, a certificate from another CA a failed handshake; the app sees none of them.
    let resp = http_exchange_full(inbound(&api), "GET", "/", &[], "").unwrap();
    assert_eq!((resp.status, resp.header("ferry-proxy-error")), (403, Some("unauthorized")), "{resp:?}");
    assert!(resp.body.contains("mTLS is required"), "{}", resp.body);
    assert!(plaintext_exchange(inbound(&api), b"hello opaque\n").await.is_empty(), "opaque plaintext refused");
    let unmeshed = Probe::new(&cp, ClientCert::None, b"http/1.1").await;
    let answer = unmeshed.exchange(inbound(&api), "api.local", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.map_or(true, |b| b.is_empty()), "an unmeshed client's TLS is refused");
    let foreign = Probe::new(&cp, ClientCert::Foreign("web"), b"ferry/h2").await;
    let answer =
        foreign.exchange(inbound(&api), "80.api.default.ferry.internal", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(answer.map_or(true, |b| b.is_empty()), "a certificate from another CA is refused");
    let failures = "ferry_tls_handshake_failures_total{direction=\"inbound\",reason=\"unknown-ca\"}";
    tokio::task::block_in_place(|| {
        wait_until("the refusal is counted", Duration::from_secs(5), || api.metric(failures) >= 1.0)
    });
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), app_requests, "the app saw none of it");
    assert!(api.metric("ferry_authz_decisions_total{decision=\"deny\",service=\"api.default\"}") >= 3.0);

    // Permissive: plaintext from an unmeshed client is served, an unmeshed client's own TLS is passed through to the
    // app untouched (the app's certificate answers), and proxies still talk mTLS to each other.
    let resp = http_exchange_full(inbound(&legacy), "GET", "/", &[], "").unwrap();
    assert_eq!((resp.status, resp.header("x-seen-client-id")), (200, Some("none")), "{resp:?}");
    let handshakes = web.metric("ferry_tls_handshakes_total{direction=\"outbound\"}");
    let resp = http_exchange_full(web.outbound, "GET", "/", &[("Host", "legacy.local")], "").unwrap();
    assert_eq!(resp.header("x-seen-client-id"), Some("spiffe://cluster.local/ns/default/sa/web"), "{resp:?}");
    assert!(web.metric("ferry_tls_handshakes_total{direction=\"outbound\"}") >= handshakes);
    assert!(legacy.metric("ferry_tls_handshakes_total{direction=\"inbound\"}") >= 1.0);
    let tls = unmeshed.connect(inbound(&tlsapp), "tlsapp.test").await.expect("passed through to the app's TLS");
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&served).unwrap();
    assert!(format!("{:?}", cert.subject_alternative_name()).contains("tlsapp.test"), "the app's own certificate");
    drop(tls);
    let echoed = unmeshed.exchange(inbound(&tlsapp), "tlsapp.test", b"through as tcp").await.unwrap();
    assert_eq!(echoed, b"through as tcp");
    drop((api, legacy, tlsapp, app, legacy_app));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_policy_lets_listed_callers_through_and_refuses_the_rest() {
    let app = backend::http_backend().await;
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("authz-policy")));
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "api.local", "")));
    // web may GET, and open opaque connections to the app's port; anyone may reach /healthz.
    let policy = format!(
        r#"apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: api}}
spec:
  targetRef: {{kind: Service, name: api}}
  defaultAction: deny
  allow:
    - from: {{identities: ["spiffe://cluster.local/ns/default/sa/web"]}}
      to: {{methods: [GET]}}
    - from: {{identities: ["spiffe://cluster.local/ns/default/sa/web"]}}
      to: {{ports: [{}]}}
    - to: {{paths: [/healthz]}}
"#,
        app.addr.port()
    );
    cp.ok(&["apply", "-f", "-"], Some(&policy));
    let (api, web, other) = tokio::task::block_in_place(|| {
        (proxy(&cp, "api", Some(app.addr), &[]), proxy(&cp, "web", None, &[]), proxy(&cp, "other", None, &[]))
    });
    let call = |p: &Ferry, method: &str, path: &str| {
        http_exchange_full(p.outbound, method, path, &[("Host", "api.local")], "").expect("an answer")
    };
    tokio::task::block_in_place(|| {
        wait_until("web is allowed", Duration::from_secs(10), || call(&web, "GET", "/").status == 200)
    });
    let denied = |r: &support::RawResponse| (r.status, r.header("ferry-proxy-error")) == (403, Some("unauthorized"));
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    let r = call(&other, "GET", "/");
    assert!(denied(&r), "{r:?}");
    assert!(r.body.contains("spiffe://cluster.local/ns/default/sa/other may not call"), "{}", r.body);
    let r = call(&web, "POST", "/echo");
    assert_eq!(r.status, 200, "the port rule allows web any call to the app's port: {r:?}");
    assert_eq!(call(&other, "GET", "/healthz").status, 200, "anyone may reach /healthz");
    // Not by a path an app would resolve elsewhere: Tomcat/Spring drop `;` parameters, some apps decode twice.
    for path in ["/healthz/..;/admin", "/healthz/%252e%252e/admin", "/healthz/..%3b/admin"] {
        let r = call(&other, "GET", path);
        assert_eq!((r.status, r.header("ferry-proxy-error")), (400, Some("bad-request")), "{path}: {r:?}");
    }
    let plaintext = http_exchange_full(api.inbound, "GET", "/", &[], "").unwrap();
    assert!(denied(&plaintext), "a caller without an identity matches no identity rule: {plaintext:?}");
    // A denied gRPC call is a Trailers-Only PERMISSION_DENIED.
    let tcp = tokio::net::TcpStream::connect(other.outbound).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://api.local/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("grpc-status").map(|v| v.to_str().unwrap()), Some("7"), "{resp:?}");
    // Opaque TCP: the web identity's connection reaches the app; another identity's is closed.
    let request = b"GET / HTTP/1.1\r\nHost: api.local\r\nConnection: close\r\n\r\n";
    let web_probe = Probe::new(&cp, ClientCert::Mesh("web"), b"ferry/tcp").await;
    let answer = web_probe.exchange(api.inbound, "80.api.default.ferry.internal", request).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    let other_probe = Probe::new(&cp, ClientCert::Mesh("other"), b"ferry/tcp").await;
    let answer = other_probe.exchange(api.inbound, "80.api.default.ferry.internal", request).await;
    assert!(answer.map_or(true, |b| b.is_empty()), "closed for an identity no rule allows");
    // Only allowed calls reached the app: web's POST, the healthz call and the request in web's TCP connection.
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), before + 3);
    assert_eq!(api.metric("ferry_authz_decisions_total{decision=\"deny\",service=\"api.default\"}"), 4.0);
    // The policy is live config: once deleted, everyone is allowed again.
    cp.ok(&["delete", "authorizationpolicy", "api"], None);
    tokio::task::block_in_place(|| {
        wait_until("the deletion reaches the api proxy", Duration::from_secs(10), || {
            call(&other, "GET", "/").status == 200
        })
    });
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sni_may_name_only_a_port_the_service_declares() {
    // The workload's app (its port's protocol detected), a second app port declared HTTP, and a debug server kept on
    // loopback that no peer may reach.
    let app = backend::http_backend().await;
    let http_app = backend::http_backend().await;
    let debug = backend::http_backend().await;
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("authz-sni")));
    let declared = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: local}}\nspec:\n  ports: [{{port: {}}}, {{port: {}, protocol: http}}]\n  identities: [local]\n",
        app.addr.port(),
        http_app.addr.port()
    );
    cp.ok(&["apply", "-f", "-"], Some(&declared));
    // Without FERRY_APP_ADDR the SNI's port selects the app's port on 127.0.0.1.
    let local = tokio::task::block_in_place(|| {
        let token = cp.join_token("default", "local", "1h");
        let mut env = cp.proxy_env(&token);
        env.push(("FERRY_SERVICE".into(), "local".into()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Ferry::start(None, &env)
    });
    let probe = Probe::new(&cp, ClientCert::Mesh("web"), b"ferry/tcp").await;
    let request = b"GET / HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n";
    let sni = |port: u16| format!("{port}.local.default.ferry.internal");
    let answer = probe.exchange(local.inbound, &sni(app.addr.port()), request).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    let answer = probe.exchange(local.inbound, &sni(debug.addr.port()), request).await;
    assert!(answer.map_or(true, |b| b.is_empty()), "a port the Service does not declare is refused");
    assert_eq!(debug.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "the debug server was never reached");
    assert!(local.logs().contains("which no Service selecting this pod declares"), "{}", local.logs());
    // An opaque stream to a port declared HTTP would carry requests past header stripping, rate limits and path
    // rules: refused. (To the detected port above it is how a caller whose detection timed out gets through.)
    let answer = probe.exchange(local.inbound, &sni(http_app.addr.port()), request).await;
    assert!(answer.map_or(true, |b| b.is_empty()), "ferry/tcp to a port declared http is refused");
    assert_eq!(http_app.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "the declared-HTTP app was not reached");
    let refused = local.metric(r#"ferry_tcp_connections_failed_total{direction="inbound",reason="declared-http"}"#);
    assert_eq!(refused, 1.0, "{}", local.metrics());
}

/// A control plane holding Service `api` (`api.local`) with `rate_limit` as its TrafficPolicy's `rateLimit`.
fn rate_limited_api(state: &str, rate_limit: &str) -> ControlPlane {
    let cp = ControlPlane::start(&state_dir(state));
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "api.local", "")));
    let limit = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api}}\nspec: {{targetRef: {{kind: Service, name: api}}, rateLimit: {rate_limit}}}\n"
    );
    cp.ok(&["apply", "-f", "-"], Some(&limit));
    cp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_never_admits_more_than_rate_times_seconds_plus_burst() {
    let app = backend::http_backend().await;
    let cp = tokio::task::block_in_place(|| rate_limited_api("authz-rate", "{requestsPerSecond: 20, burst: 5}"));
    let (api, web) =
        tokio::task::block_in_place(|| (proxy(&cp, "api", Some(app.addr), &[]), proxy(&cp, "web", None, &[])));
    let call = || http_exchange_full(web.outbound, "GET", "/", &[("Host", "api.local")], "");
    tokio::task::block_in_place(|| {
        wait_until("web reaches api", Duration::from_secs(10), || call().is_some_and(|r| r.status != 502))
    });
    // Let the bucket fill again, then send as fast as one client can for 2 s (at most 2,000 requests).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = app.requests.load(std::sync::atomic::Ordering::SeqCst);
    let (admitted, limited, seconds) = tokio::task::block_in_place(|| {
        let started = std::time::Instant::now();
        let (mut admitted, mut limited) = (0u64, 0u64);
        for _ in 0..2_000 {
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
            let r = call().expect("an answer");
            match r.status {
                200 => admitted += 1,
                429 => {
                    assert_eq!(r.header("ferry-proxy-error"), Some("rate-limited"), "{r:?}");
                    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)), "{r:?}");
                    limited += 1;
                }
                other => panic!("unexpected status {other}: {r:?}"),
            }
        }
        (admitted, limited, started.elapsed().as_secs_f64())
    });
    eprintln!("rate limit 20/s burst 5: {admitted} admitted, {limited} limited in {seconds:.2} s");
    assert!(limited > 0, "the client sent faster than the limit");
    assert!((admitted as f64) <= 20.0 * seconds + 5.0, "{admitted} admitted in {seconds:.2} s");
    assert_eq!(
        app.requests.load(std::sync::atomic::Ordering::SeqCst) - before,
        admitted as usize,
        "only admitted calls reached the app"
    );
    assert_eq!(api.metric("ferry_rate_limited_total{service=\"api.default\"}"), limited as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_connection_spends_a_token_as_a_request_does() {
    let app = backend::http_backend().await;
    let cp =
        tokio::task::block_in_place(|| rate_limited_api("authz-rate-opaque", "{requestsPerSecond: 0.01, burst: 1}"));
    let api = tokio::task::block_in_place(|| proxy(&cp, "api", Some(app.addr), &[]));
    // Requests until the limit is in force and the bucket is empty (a 429).
    tokio::task::block_in_place(|| {
        wait_until("api's rate limit is in force", Duration::from_secs(10), || {
            http_exchange_full(api.inbound, "GET", "/", &[], "").is_some_and(|r| r.status == 429)
        })
    });
    // Bytes that are not HTTP go to the app as opaque TCP, once admitted: this one is not.
    let mut s = tokio::net::TcpStream::connect(api.inbound).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"\x00\x01 not http\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("closed");
    assert!(out.is_empty(), "an opaque connection over the limit reached the app: {}", String::from_utf8_lossy(&out));
    assert_eq!(api.metric(r#"ferry_tcp_connections_failed_total{direction="inbound",reason="rate-limited"}"#), 1.0);
}
