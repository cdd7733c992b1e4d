//! Identity and mTLS with real `ferry-control` and `ferry` processes: meshed calls are TLS 1.3 on the wire and tell
//! the app who called, a peer with an identity the destination does not list is refused, the CSR service refuses bad
//! credentials and ignores what a CSR asks for, and certificates rotate under load without a failed request.

use ferry_test_support::{self as support, control, mesh};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::{ControlPlane, state_dir};
use mesh::{ClientCert, Probe, certify, proxy, service};
use support::backend;
use support::{Ferry, Load, http_exchange_full, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP relay that records every byte each way (the test's wire capture between two proxies).
struct Relay {
    addr: SocketAddr,
    to_server: Arc<Mutex<Vec<u8>>>,
    to_client: Arc<Mutex<Vec<u8>>>,
}

async fn relay(target: SocketAddr) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (to_server, to_client) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let (ts, tc) = (to_server.clone(), to_client.clone());
    tokio::spawn(async move {
        while let Ok((downstream, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(target).await else { continue };
            let (mut dr, mut dw) = downstream.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            let (ts, tc) = (ts.clone(), tc.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = dr.read(&mut buf).await {
                    ts.lock().unwrap().extend_from_slice(&buf[..n]);
                    if uw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = uw.shutdown().await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = ur.read(&mut buf).await {
                    tc.lock().unwrap().extend_from_slice(&buf[..n]);
                    if dw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = dw.shutdown().await;
            });
        }
    });
    Relay { addr, to_server, to_client }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn random_marker() -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&Instant::now(), &mut h);
    format!("marker-{:016x}-{}", std::hash::Hasher::finish(&h), std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_calls_are_tls13_on_the_wire_and_the_app_learns_the_caller() {
    let app = backend::http_backend().await;
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("mtls-wire")));
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "api.local", "")));
    // The api proxy's inbound listener, and a relay in front of it that the proxy advertises as its endpoint.
    let inbound = support::loopback(support::free_port());
    let relay = relay(inbound).await;
    let api = tokio::task::block_in_place(|| {
        proxy(
            &cp,
            "api",
            Some(app.addr),
            &[
                ("FERRY_INBOUND_ADDR", inbound.to_string()),
                ("FERRY_ADVERTISE_PORT", relay.addr.port().to_string()),
                // Short, so that the slow-request case below outlasts detection.
                ("FERRY_DETECT_TIMEOUT", "500ms".to_string()),
            ],
        )
    });
    let web = tokio::task::block_in_place(|| proxy(&cp, "web", None, &[]));
    let marker = random_marker();
    let spoofed = "spiffe://cluster.local/ns/default/sa/admin";
    let resp = tokio::task::block_in_place(|| {
        let mut resp = None;
        wait_until("web reaches api over the mesh", Duration::from_secs(10), || {
            resp = http_exchange_full(
                web.outbound,
                "POST",
                "/echo",
                &[("Host", "api.local"), ("ferry-client-id", spoofed)],
                &marker,
            )
            .filter(|r| r.status == 200);
            resp.is_some()
        });
        resp.unwrap()
    });
    assert_eq!(resp.body, marker, "the app echoed the body");
    // The app sees the caller's verified identity (never the header the caller's app set), and its own protocol.
    assert_eq!(resp.header("x-seen-client-id"), Some("spiffe://cluster.local/ns/default/sa/web"), "{resp:?}");
    assert_eq!(resp.header("x-seen-version"), Some("HTTP/1.1"), "HTTP/1 restored after HTTP/2 between proxies");
    assert_eq!(resp.header("x-seen-host"), Some("api.local"));

    let to_server = relay.to_server.lock().unwrap().clone();
    let to_client = relay.to_client.lock().unwrap().clone();
    assert!(!to_server.is_empty() && !to_client.is_empty(), "the call went through the relay");
    // A TLS handshake record opens the connection, offering the mesh ALPN and naming the target port in SNI ...
    assert_eq!(&to_server[..2], &[0x16, 0x03], "a TLS handshake record first");
    assert!(contains(&to_server, b"ferry/h2"), "ALPN ferry/h2 offered");
    assert!(contains(&to_server, b"80.api.default.ferry.internal"), "target port in SNI");
    // ... the server picks TLS 1.3 (ServerHello's supported_versions extension: 0x002b, length 2, 0x0304) ...
    assert_eq!(to_client[0], 0x16, "a ServerHello first");
    assert!(contains(&to_client, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]), "TLS 1.3 negotiated");
    // ... and neither direction ever carries the body in the clear.
    assert!(!contains(&to_server, marker.as_bytes()) && !contains(&to_client, marker.as_bytes()));
    assert!(web.metric("ferry_tls_handshakes_total{direction=\"outbound\"}") >= 1.0);
    assert!(api.metric("ferry_tls_handshakes_total{direction=\"inbound\"}") >= 1.0);

    // A client from outside the mesh (plaintext, straight to the inbound listener) cannot claim an identity.
    let resp = http_exchange_full(inbound, "GET", "/", &[("ferry-client-id", spoofed)], "").unwrap();
    assert_eq!((resp.status, resp.header("x-seen-client-id")), (200, Some("none")), "{resp:?}");
    // Nor under the underscore spelling, which CGI, WSGI and Rack read as the same variable (any case).
    for name in ["ferry_client_id", "Ferry_Client-ID"] {
        let resp = http_exchange_full(inbound, "GET", "/", &[(name, spoofed)], "").unwrap();
        assert_eq!(resp.header("x-seen-client-id-underscore"), Some("none"), "{name}: {resp:?}");
    }
    // Nor by hiding the request from protocol detection behind empty lines (any number), a lower-case method, or by
    // sending it slowly.
    let cases = [
        ("\r\nGE", Duration::ZERO),
        ("\r\n\r\n\r\n\r\nGE", Duration::ZERO),
        ("\n\n\n\n\n\n\n\n\n\nGE", Duration::ZERO),
        ("ge", Duration::ZERO),
        ("GE", Duration::from_millis(1500)),
        ("", Duration::from_millis(1500)), // the first byte after the detection timeout
    ];
    for (lead, pause) in cases {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(inbound).unwrap();
        s.write_all(lead.as_bytes()).unwrap();
        std::thread::sleep(pause);
        write!(s, "T / HTTP/1.1\r\nHost: api\r\nferry-client-id: {spoofed}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(!out.contains("sa/admin"), "a spoofed identity reached the app ({lead:?}, {pause:?}):\n{out}");
    }
    // `ferryctl check`: the root (10 years) and both 24 h certificates are fine at the default horizons; a horizon
    // beyond their expiry reports them and fails.
    let ok = tokio::task::block_in_place(|| cp.ok(&["check"], None));
    assert_eq!(ok.matches("ok  ").count(), 3, "one root, two proxies:\n{ok}");
    let roots_due = tokio::task::block_in_place(|| cp.ctl(&["check", "--horizon", "3651d"], None));
    let text = String::from_utf8_lossy(&roots_due.stdout);
    assert!(!roots_due.status.success() && text.contains("WARN signing root"), "{text}");
    let leaves_due = tokio::task::block_in_place(|| cp.ctl(&["check", "--leaf-horizon", "25h"], None));
    let text = String::from_utf8_lossy(&leaves_due.stdout);
    assert!(!leaves_due.status.success() && text.matches("WARN proxy").count() == 2, "{text}");
    // An h2 (gRPC-style) caller keeps HTTP/2 end to end.
    let resp = h2_get(web.outbound, "api.local").await;
    assert_eq!(resp, ("HTTP/2.0".to_string(), "spiffe://cluster.local/ns/default/sa/web".to_string()));
    drop(app);
}

/// GET over h2c prior knowledge; returns what the app saw: (version, client id).
async fn h2_get(proxy: SocketAddr, host: &str) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://{host}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (h("x-seen-version"), h("x-seen-client-id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_identity_the_service_does_not_list_is_refused_by_the_caller() {
    let app = backend::http_backend().await;
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("mtls-wrong-id")));
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "api.local", "")));
    let inbound = support::loopback(support::free_port());
    let api = tokio::task::block_in_place(|| {
        proxy(&cp, "api", Some(app.addr), &[("FERRY_INBOUND_ADDR", inbound.to_string())])
    });
    // Service billing lists only `billing`, yet names the api proxy (a valid mesh certificate for `api`) as its
    // endpoint: the caller must refuse it.
    let billing =
        service("billing", "billing.local", &format!("  endpoints: [{{address: \"{inbound}\", identity: billing}}]\n"));
    cp.ok(&["apply", "-f", "-"], Some(&billing));
    let web = tokio::task::block_in_place(|| proxy(&cp, "web", None, &[]));
    tokio::task::block_in_place(|| {
        wait_until("api.local works", Duration::from_secs(10), || {
            http_exchange_full(web.outbound, "GET", "/", &[("Host", "api.local")], "").is_some_and(|r| r.status == 200)
        })
    });
    let resp = http_exchange_full(web.outbound, "GET", "/", &[("Host", "billing.local")], "").unwrap();
    assert_eq!((resp.status, resp.header("ferry-proxy-error")), (502, Some("tls-failed")), "{resp:?}");
    // Both tries fail the check: the first and the default retry on connection failures (there is no other endpoint).
    assert_eq!(web.metric("ferry_tls_handshake_failures_total{direction=\"outbound\",reason=\"wrong-identity\"}"), 2.0);
    let log = web.logs();
    assert!(
        log.contains("presented spiffe://cluster.local/ns/default/sa/api, which service billing.default does not list"),
        "{log}"
    );
    drop((api, app));
}

/// A CSR for a fresh key that asks for more than it may get: two SPIFFE IDs, a DNS name, CA:TRUE.
fn greedy_csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI("spiffe://cluster.local/ns/kube-system/sa/admin".to_string().try_into().unwrap()));
    params
        .subject_alt_names
        .push(rcgen::SanType::URI("spiffe://cluster.local/ns/default/sa/payments".to_string().try_into().unwrap()));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csr_service_issues_only_what_the_credential_proves() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("mtls-csr")));
    let token = tokio::task::block_in_place(|| cp.join_token("default", "api", "1h"));
    let (key, csr) = greedy_csr();
    let issued = certify(&cp, csr.clone(), Some(&token), None).await.unwrap();
    let der = ferry_api::identity::pem_certificates(&issued.chain_pem[0]).unwrap().remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let sans: Vec<String> =
        cert.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|n| n.to_string()).collect();
    assert_eq!(sans, ["URI(spiffe://cluster.local/ns/default/sa/api)"], "exactly the entitled SPIFFE ID");
    assert!(!cert.is_ca(), "CA:FALSE whatever the CSR asked");
    assert_eq!(cert.basic_constraints().unwrap().map(|b| b.value.ca), Some(false));
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
        "the CSR's key, nothing else"
    );
    let life = cert.validity().not_after.timestamp() - ferry_now();
    assert!((86_000..=86_400).contains(&life), "24 h by default, got {life} s");
    assert_eq!(issued.not_after, cert.validity().not_after.timestamp());
    assert!(!issued.trust_bundle_pem.is_empty());
    // `openssl verify` agrees that the leaf chains to the mesh root.
    let leaf_file = cp.state.with_extension("leaf.pem");
    std::fs::write(&leaf_file, &issued.chain_pem[0]).unwrap();
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile", cp.state.join("ca.crt").to_str().unwrap(), leaf_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));

    // Renewal: the current certificate over mTLS, no token; the identity comes from the certificate.
    let (_, csr2) = greedy_csr();
    let client = (issued.chain_pem.concat(), key.serialize_pem());
    let renewed = certify(&cp, csr2, None, Some(client)).await.unwrap();
    let info = ferry_api::identity::inspect(&ferry_api::identity::pem_certificates(&renewed.chain_pem[0]).unwrap()[0])
        .unwrap();
    assert_eq!(info.identity.spiffe(), "spiffe://cluster.local/ns/default/sa/api");
    assert_ne!(info.serial, ferry_api::identity::inspect(&der).unwrap().serial, "a new serial");

    // Refusals: no credential, unknown, expired and revoked tokens, and a request that is not a CSR.
    let expired = tokio::task::block_in_place(|| cp.join_token("default", "api", "1s"));
    let revoked = tokio::task::block_in_place(|| cp.join_token("default", "api", "1h"));
    tokio::task::block_in_place(|| cp.ok(&["token", "revoke", revoked.split('.').next().unwrap()], None));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let unknown = "0123456789abcdef.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let cases = [
        (None, "no credential", tonic::Code::Unauthenticated, "missing"),
        (Some(unknown), "unknown token", tonic::Code::Unauthenticated, "unknown"),
        (Some(expired.as_str()), "expired", tonic::Code::Unauthenticated, "expired"),
        (Some(revoked.as_str()), "revoked", tonic::Code::Unauthenticated, "revoked"),
    ];
    for (token, message, code, reason) in cases {
        let err = certify(&cp, csr.clone(), token, None).await.unwrap_err();
        assert_eq!(err.code(), code, "{message}: {err:?}");
        assert!(err.message().contains(message), "{message}: {}", err.message());
        let series = format!("ferry_control_certificate_requests_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(support::metric_value(&cp.metrics_text(), &series), 1.0, "{series}");
    }
    let err = certify(&cp, "not a csr".into(), Some(&token), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // A renewal presenting a certificate whose token was since revoked is refused too.
    tokio::task::block_in_place(|| cp.ok(&["token", "revoke", token.split('.').next().unwrap()], None));
    let (_, csr3) = greedy_csr();
    let err = certify(&cp, csr3, None, Some((issued.chain_pem.concat(), key.serialize_pem()))).await.unwrap_err();
    assert!(err.message().contains("was revoked"), "{err:?}");
    let metrics = cp.metrics_text();
    assert_eq!(
        support::metric_value(&metrics, "ferry_control_certificates_issued_total{credential=\"join-token\"}"),
        1.0
    );
    assert_eq!(
        support::metric_value(&metrics, "ferry_control_certificates_issued_total{credential=\"certificate\"}"),
        1.0
    );
}

fn ferry_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The serials a proxy logged as "workload certificate in use", in order.
fn logged_serials(p: &Ferry) -> Vec<String> {
    p.logs()
        .lines()
        .filter(|l| l.contains("workload certificate in use"))
        .filter_map(|l| l.split("\"serial\":\"").nth(1)?.split('"').next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let app = backend::http_backend().await;
    let ws_app = backend::websocket_backend().await;
    // Certificates live 4 s: each proxy renews about every 2 s.
    let cp = tokio::task::block_in_place(|| {
        ControlPlane::start_on(
            &state_dir("mtls-rotate"),
            [support::free_addr(), support::free_addr(), support::free_addr()],
            &["--cert-lifetime", "4s"],
        )
    });
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "api.local", "")));
    cp.ok(&["apply", "-f", "-"], Some(&service("ws", "ws.local", "")));
    let api = tokio::task::block_in_place(|| proxy(&cp, "api", Some(app.addr), &[]));
    let ws_proxy = tokio::task::block_in_place(|| proxy(&cp, "ws", Some(ws_app.addr), &[]));
    let web = tokio::task::block_in_place(|| proxy(&cp, "web", None, &[]));
    tokio::task::block_in_place(|| {
        wait_until("web reaches api and ws", Duration::from_secs(10), || {
            http_exchange_full(web.outbound, "GET", "/", &[("Host", "api.local")], "").is_some_and(|r| r.status == 200)
                && http_exchange_full(web.outbound, "GET", "/", &[("Host", "ws.local")], "").is_some()
        })
    });
    // A WebSocket through the mesh, open across every renewal.
    let stream = tokio::net::TcpStream::connect(web.outbound).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.local/socket", stream).await.unwrap();
    let probe = Probe::new(&cp, ClientCert::Mesh("probe"), b"ferry/tcp").await;
    let handshakes_before = web.metric("ferry_tls_handshakes_total{direction=\"outbound\"}");
    let load = Load::start(web.outbound, "api.local");
    let mut served = Vec::new();
    let started = Instant::now();
    // At least 3 renewals of the api proxy's certificate (about 9 s at 4 s lifetimes), with a probe every 250 ms.
    while started.elapsed() < Duration::from_secs(30) && logged_serials(&api).len() < 5 {
        let serial = probe.served_serial(api.inbound).await;
        if served.last() != Some(&serial) {
            served.push(serial);
        }
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(ws.next().await.expect("websocket open").unwrap().into_text().unwrap().as_str(), "ping");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ok, failed, failures) = tokio::task::block_in_place(|| load.finish());
    eprintln!("load across rotations: {ok} ok, {failed} failed; served serials {served:?}");
    assert_eq!(failed, 0, "failed requests: {failures:?}");
    assert!(ok > 100, "the load ran ({ok} requests)");
    let logged = logged_serials(&api);
    assert!(logged.len() >= 4, "at least 3 renewals after the first certificate: {logged:?}");
    let distinct: std::collections::HashSet<_> = logged.iter().collect();
    assert_eq!(distinct.len(), logged.len(), "every certificate has its own serial: {logged:?}");
    // New handshakes presented each new certificate in turn.
    assert!(served.len() >= 3, "the probe saw at least 3 certificates: {served:?}");
    assert!(served.iter().all(|s| logged.contains(s)), "served {served:?} vs logged {logged:?}");
    // The caller's pooled mesh connections moved to new handshakes as its own certificate rotated.
    assert!(web.metric("ferry_tls_handshakes_total{direction=\"outbound\"}") >= handshakes_before + 3.0);
    assert!(api.metric("ferry_identity_certificate_requests_total{result=\"ok\"}") >= 4.0);
    assert!(api.metric("ferry_identity_certificate_expiry_timestamp_seconds") > ferry_now() as f64);
    // The xDS streams follow: each proxy reconnects with its renewed certificate, and status shows a live expiry.
    assert!(api.logs().contains("reconnecting to the control plane with the renewed certificate"), "{}", api.logs());
    let status = tokio::task::block_in_place(|| cp.ok(&["status"], None));
    assert!(status.contains("spiffe://cluster.local/ns/default/sa/api") && !status.contains("EXPIRED"), "{status}");
    assert!(status.matches(" in ").count() >= 3, "each proxy's certificate expiry:\n{status}");
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "after");
    ws.close(None).await.unwrap();
    drop((ws_proxy, app, ws_app));
}

/// The roots `GET /v1/ca` lists: (role, subject).
fn roots(cp: &ControlPlane) -> Vec<(String, String)> {
    let bearer = format!("Bearer {}", cp.token().trim());
    let (status, body) = support::http_exchange(cp.api, "GET", "/v1/ca", &[("Authorization", &bearer)], "").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["role"].as_str().unwrap().to_string(), r["subject"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_with_overlap_and_no_failed_request() {
    let app = backend::http_backend().await;
    let cp = tokio::task::block_in_place(|| {
        ControlPlane::start_on(
            &state_dir("mtls-root"),
            [support::free_addr(), support::free_addr(), support::free_addr()],
            // A staged root signs no sooner than the endpoint grace after it joined the bundle.
            &["--cert-lifetime", "4s", "--endpoint-grace", "2s"],
        )
    });
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "api.local", "")));
    let (api, web) =
        tokio::task::block_in_place(|| (proxy(&cp, "api", Some(app.addr), &[]), proxy(&cp, "web", None, &[])));
    tokio::task::block_in_place(|| {
        wait_until("web reaches api", Duration::from_secs(10), || {
            http_exchange_full(web.outbound, "GET", "/", &[("Host", "api.local")], "").is_some_and(|r| r.status == 200)
        })
    });
    let old = roots(&cp);
    assert_eq!(old.len(), 1);
    let old_root = old[0].1.clone();
    let probe = Probe::new(&cp, ClientCert::Mesh("probe"), b"ferry/tcp").await;
    assert_eq!(probe.served_issuer(api.inbound).await, old_root);
    let load = Load::start(web.outbound, "api.local");

    // Step 1: a new root joins the bundle; it signs once both proxies (and the probe's none) have ACKed it.
    let out = tokio::task::block_in_place(|| cp.ok(&["ca", "rotate"], None));
    assert!(out.contains("next"), "{out}");
    tokio::task::block_in_place(|| {
        wait_until("the new root signs", Duration::from_secs(15), || {
            let r = roots(&cp);
            r.len() == 2 && r[0] == ("previous".to_string(), old_root.clone()) && r[1].0 == "signing"
        })
    });
    let new_root = roots(&cp)[1].1.clone();
    assert_ne!(new_root, old_root);
    // Proxies renew onto the new root; handshakes meanwhile mix old and new certificates, all trusted.
    let started = Instant::now();
    while probe.served_issuer(api.inbound).await != new_root {
        assert!(started.elapsed() < Duration::from_secs(15), "the api proxy never got a certificate of the new root");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Step 2: retiring the old root is refused while certificates it signed may be alive, then done.
    let refused = tokio::task::block_in_place(|| cp.fails(&["ca", "retire"], None));
    assert!(refused.contains("may live") && refused.contains("--force"), "{refused}");
    tokio::task::block_in_place(|| {
        wait_until("the old root can be retired", Duration::from_secs(15), || {
            cp.ctl(&["ca", "retire"], None).status.success()
        })
    });
    assert_eq!(roots(&cp), [("signing".to_string(), new_root.clone())]);
    // The proxies take the one-root bundle and go on: new connections, renewals and config changes all work.
    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_secs(5)));
    let (ok, failed, failures) = tokio::task::block_in_place(|| load.finish());
    eprintln!("load across a root rotation: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {failures:?}");
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert_eq!(probe_after_rotation(&cp, api.inbound).await, new_root);
    let status = tokio::task::block_in_place(|| cp.ok(&["status"], None));
    assert_eq!(status.matches("SYNCED").count(), 10, "{status}");
    assert!(!status.contains("EXPIRED"), "{status}");
    drop(app);
}

/// A fresh mesh client (its certificate from the new root) still reaches the api proxy after the rotation.
async fn probe_after_rotation(cp: &ControlPlane, inbound: std::net::SocketAddr) -> String {
    Probe::new(cp, ClientCert::Mesh("late"), b"ferry/tcp").await.served_issuer(inbound).await
}
