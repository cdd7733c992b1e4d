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
    let proxy = tokio::task::block_in_place(|| {
        let token = cp.join_token("default", "web", "1h");
        let env = cp.proxy_env(&token);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ferry_test_support::Ferry::start(None, &env)
    });
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
    let again = tokio::task::block_in_place(|| {
        let token = cp.join_token("default", "web", "1h");
        let env = cp.proxy_env(&token);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ferry_test_support::Ferry::start(None, &env)
    });
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
