//! The control plane's doors under attack: a real `ferry-control` process, hostile clients on real sockets, each attack
//! bounded in time, while legitimate proxies and `ferryctl` keep working.

use ferry_test_support::control as support;

use std::time::Duration;

use ferry_test_support::h2raw;
use support::{ControlPlane, state_dir, xds_tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate request's stream, opened and never finished (the service waits for its message).
fn open_certify(stream: u32) -> Vec<u8> {
    let block = h2raw::request(
        true,
        true,
        "/ferry.v1.Identity/Certify",
        "localhost",
        &[("content-type", "application/grpc"), ("te", "trailers")],
    );
    h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS, stream, &block)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_floods_and_rapid_resets_on_the_xds_port_are_refused_and_proxies_still_sync() {
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("attack-streams")));
    // 10,000 streams on one connection: at most 16 are taken, the rest refused.
    let flood = tokio::spawn({
        let tls = xds_tls(&cp).await;
        h2raw::attack(tls, true, Duration::from_secs(3), |i| (i < 10_000).then(|| open_certify(2 * i as u32 + 1)))
    });
    // Meanwhile a proxy gets its certificate and its config.
    let service = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 8080}], identities: [web]}\n";
    cp.ok(&["apply", "-f", "-"], Some(service));
    let proxy = tokio::task::block_in_place(|| ferry_test_support::mesh::proxy(&cp, "web", None, &[]));
    let flooded = flood.await.unwrap();
    eprintln!("stream flood: {flooded:?}");
    assert!(
        flooded.refused >= 10_000 - 16 || flooded.goaway.is_some(),
        "streams past the limit were taken: {flooded:?}"
    );
    assert!(proxy.metric(r#"ferry_xds_connected"#) >= 1.0, "the proxy synced during the flood");

    // Rapid reset: streams opened and cancelled at once.
    let tls = xds_tls(&cp).await;
    let reset = h2raw::attack(tls, true, Duration::from_secs(3), |i| {
        let stream = 2 * i as u32 + 1;
        let mut f = open_certify(stream);
        f.extend(h2raw::frame(h2raw::RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        (stream < 1 << 30).then_some(f)
    })
    .await;
    eprintln!("rapid reset: {reset:?}");
    assert_eq!(reset.goaway, Some(h2raw::ENHANCE_YOUR_CALM), "rapid resets were taken without end: {reset:?}");
    // The control plane still serves: a new proxy syncs.
    let again = tokio::task::block_in_place(|| ferry_test_support::mesh::proxy(&cp, "web", None, &[]));
    assert!(again.metric("ferry_xds_connected") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_to_the_api_and_metrics_ports_are_cut_at_the_header_timeout() {
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("attack-slow")));
    let mut held = tokio::task::JoinSet::new();
    for addr in [cp.api, cp.metrics] {
        for _ in 0..500 {
            held.spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
                let mut out = Vec::new();
                // Closed by the header timeout (10 s); 20 s bounds the wait.
                tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await.is_ok()
            });
        }
    }
    // While they are held, ferryctl still answers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = tokio::task::block_in_place(|| cp.ok(&["status"], None));
    assert!(!status.is_empty());
    let closed = held.join_all().await.into_iter().filter(|c| *c).count();
    assert_eq!(closed, 1000, "half-sent requests left open past the header timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_holds_a_few_ads_streams_and_the_newest_is_served() {
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("attack-ads")));
    let token = tokio::task::block_in_place(|| cp.join_token("default", "web", "1h"));
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    let issued = ferry_test_support::mesh::certify(&cp, csr.pem().unwrap(), Some(&token), None).await.unwrap();
    let client = Some((issued.chain_pem.join(""), key.serialize_pem()));
    let root = cp.state.join("ca.crt");
    // 100 streams with the one certificate, opened one after another, each on its own connection.
    let mut streams = Vec::new();
    for i in 0..100 {
        let channel = ferry_test_support::mesh::identity_channel(cp.xds, &root, client.clone(), None).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node: Some(envoy_types::pb::envoy::config::core::v3::Node { id: format!("dup-{i}"), ..Default::default() }),
            type_url: ferry_api::protocol::TRUST_BUNDLE_TYPE.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut answers = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(request)
            .await
            .expect("a stream is never refused")
            .into_inner();
        // Each is served when it opens.
        let first = tokio::time::timeout(Duration::from_secs(10), answers.message()).await.unwrap();
        assert!(matches!(first, Ok(Some(_))), "stream {i}: {first:?}");
        streams.push((tx, answers));
    }
    // The older ones were closed as newer ones came: all but the last few end with ABORTED.
    let mut closed = 0;
    let count = streams.len();
    for (i, (_tx, answers)) in streams.iter_mut().enumerate() {
        match tokio::time::timeout(Duration::from_millis(300), answers.message()).await {
            Ok(Err(status)) if status.code() == tonic::Code::Aborted => closed += 1,
            Ok(other) => panic!("stream {i}: {other:?}"),
            Err(_) => assert!(i >= count - 4, "stream {i} of {count} is still open"),
        }
    }
    assert_eq!(closed, 96, "all but the newest 4 closed");
    let superseded =
        ferry_test_support::metric_value(&cp.metrics_text(), r#"ferry_control_xds_refused_total{reason="superseded"}"#);
    assert_eq!(superseded, 96.0);
}

#[test]
fn status_on_the_metrics_port_takes_the_admin_token_in_local_mode() {
    // Every proxy's identity, address and certificate expiry: not for anyone who reaches the port.
    let cp = ControlPlane::start(&state_dir("attack-status"));
    let anonymous = ferry_test_support::http_exchange_full(cp.metrics, "GET", "/status", &[], "").unwrap();
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let wrong =
        ferry_test_support::http_exchange_full(cp.metrics, "GET", "/status", &[("Authorization", "Bearer x")], "");
    assert_eq!(wrong.unwrap().status, 401);
    let bearer = format!("Bearer {}", cp.token());
    let with = ferry_test_support::http_exchange_full(cp.metrics, "GET", "/status", &[("Authorization", &bearer)], "");
    let with = with.unwrap();
    assert_eq!(with.status, 200, "{with:?}");
    assert!(with.body.contains("proxies"), "{}", with.body);
    // The metrics themselves stay open to Prometheus.
    assert_eq!(support::get(cp.metrics, "/metrics").map(|r| r.0), Some(200));
}

#[test]
fn kubernetes_mode_serves_status_on_loopback_only() {
    // Nothing there checks a token (the API server's port-forward decides who reaches it), so an address others
    // reach is refused before anything starts.
    let state = state_dir("attack-status-kubernetes");
    let out = std::process::Command::new(support::control_bin())
        .args(["serve", "--discovery", "kubernetes", "--state-dir", state.to_str().unwrap()])
        .args(["--api-addr", "0.0.0.0:15011"])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--api-addr 0.0.0.0:15011") && err.contains("must be a loopback address"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_are_throttled_per_lineage_not_per_certificate() {
    // Ten certificates of one join token, each renewed in a chain (every renewal with the certificate the previous
    // one gave), the ten chains at once: minting new certificates must not get around the limits that hold per
    // certificate. A join token's lineage: a burst of 50, then 5 a second, whatever the machine's speed.
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("attack-renewals")));
    let token = tokio::task::block_in_place(|| cp.join_token("default", "web", "1h"));
    let cp = std::sync::Arc::new(cp);
    let csr = |key: &rcgen::KeyPair| {
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(key).unwrap().pem().unwrap()
    };
    let started = std::time::Instant::now();
    let mut chains = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let key = rcgen::KeyPair::generate().unwrap();
        let issued = ferry_test_support::mesh::certify(&cp, csr(&key), Some(&token), None).await.unwrap();
        let mut current = (issued.chain_pem.join(""), key.serialize_pem());
        let cp = cp.clone();
        chains.spawn(async move {
            let (mut renewed, mut limited) = (0, 0);
            for _ in 0..20 {
                let key = rcgen::KeyPair::generate().unwrap();
                match ferry_test_support::mesh::certify(&cp, csr(&key), None, Some(current.clone())).await {
                    Ok(issued) => {
                        renewed += 1;
                        current = (issued.chain_pem.join(""), key.serialize_pem());
                    }
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                        limited += 1;
                    }
                }
            }
            (renewed, limited)
        });
    }
    let (renewed, limited) = chains.join_all().await.into_iter().fold((0, 0), |(r, l), (cr, cl)| (r + cr, l + cl));
    let allowed = 50.0 + 5.0 * started.elapsed().as_secs_f64().ceil();
    assert!((renewed as f64) <= allowed, "{renewed} renewals (allowed {allowed})");
    assert!(limited > 0, "no renewal was throttled");
    let counted = ferry_test_support::metric_value(
        &cp.metrics_text(),
        r#"ferry_control_certificate_requests_refused_total{reason="rate-limited"}"#,
    );
    assert_eq!(counted, limited as f64);
}
