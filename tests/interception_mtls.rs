//! Transparent interception with identities, as in a pod: `ferry init` rules in two network namespaces, both
//! sidecars joined to a real `ferry-control`; an unmodified client's call to the server's address is mTLS between the
//! sidecars (the SNI names the target port), and the server app learns the caller's identity. HTTP and opaque TCP.

use ferry_test_support::{self as support, control};

use std::time::{Duration, Instant};

use support::TempDir;
use support::backend::half_close_backend_on;
use support::netns::{self, CLIENT_V4, NetNs, Pair, SERVER_V4};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The server's apps: HTTP on 8080 answering with the `ferry-client-id` it got, a TCP echo on 9000.
async fn server_apps() {
    let listener = tokio::net::TcpListener::bind(("::", 8080)).await.unwrap();
    let _echo = half_close_backend_on(tokio::net::TcpListener::bind(("::", 9000)).await.unwrap());
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let caller = req.headers().get("ferry-client-id").and_then(|v| v.to_str().ok()).unwrap_or("none");
                let body = format!("caller {caller}\n");
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                    body,
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `ferry init` (unless done already: `None`) then `ferry run` (UID 1337) in `ns`, joined to the control plane with a
/// token for `account`.
fn start_sidecar(ns: &NetNs, dir: &TempDir, account: &str, init: Option<&[&str]>, env: &[(&str, String)]) {
    if let Some(init) = init {
        let mut args = vec!["init"];
        args.extend_from_slice(init);
        ns.must(FERRY, &args);
    }
    let log = std::fs::File::create(dir.path().join(format!("{account}.log"))).unwrap();
    let mut envs = vec![("FERRY_LOG_FORMAT", "json".to_string()), ("FERRY_WORKERS", "1".to_string())];
    envs.extend(env.iter().cloned());
    ns.spawn("setpriv", &["--reuid", "1337", "--regid", "1337", "--clear-groups", "--", FERRY, "run"], &envs, log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ns.run("curl", &["-sf", "-m", "1", "http://127.0.0.1:15020/health/ready"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "{account} sidecar not ready: {}",
            std::fs::read_to_string(dir.path().join(format!("{account}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn transparent_calls_between_namespaces_are_mtls_with_identities() {
    if !netns::available("transparent_calls_between_namespaces_are_mtls_with_identities") {
        return;
    }
    let pair = Pair::new("m");
    let dir = TempDir::new("interception-mtls");
    let _apps = pair.server.background(server_apps);
    // The client's rules go in before anything connects there: connections that predate NAT rules get their NAT
    // binding on their next packet (ferry-control's replies would be redirected), as in a pod, where `ferry init`
    // runs before the app.
    pair.client.must(FERRY, &["init", "--exclude-inbound-ports", "15010"]);
    // ferry-control runs in the client's namespace: the client's sidecar reaches it on loopback, the server's over
    // the veth pair (so its endpoint is registered at the server's own address). Port 15010 is kept out of the
    // client's inbound interception.
    let state = dir.path().join("control");
    let log = std::fs::File::create(dir.path().join("control.log")).unwrap();
    let control_bin = control::control_bin();
    // The mesh's ranges: a Service range, and the server pod's address (a pod range of one here).
    let args = ["serve", "--state-dir", state.to_str().unwrap(), "--xds-addr", "0.0.0.0:15010"];
    let ranges = ["--service-cidr", "10.96.0.0/12", "--pod-cidr", &format!("{SERVER_V4}/32")];
    let control = pair.client.spawn(control_bin.to_str().unwrap(), &[&args[..], &ranges].concat(), &[], log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !state.join("admin.token").exists()
        || !pair.client.run("curl", &["-s", "-m", "1", "http://127.0.0.1:15014/health/ready"]).status.success()
    {
        assert!(Instant::now() < deadline, "ferry-control did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin = std::fs::read_to_string(state.join("admin.token")).unwrap().trim().to_string();
    let ctl = |args: &[&str]| {
        let mut full = vec![format!("FERRY_TOKEN={admin}"), control::ctl_bin().display().to_string()];
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        pair.client.must("env", &full).trim().to_string()
    };
    let service = dir.path().join("web.yaml");
    std::fs::write(
        &service,
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 8080, protocol: http}, {port: 9000, protocol: tcp}]\n  addresses: [web]\n  identities: [web]\n",
    )
    .unwrap();
    ctl(&["apply", "-f", service.to_str().unwrap()]);
    // The state directory is 0700 (root's); the sidecars run as UID 1337 and read a copy of the root.
    let root = dir.path().join("ca.crt");
    std::fs::copy(state.join("ca.crt"), &root).unwrap();
    let root = root.display().to_string();
    let common = |token: String, addr: String| {
        vec![
            ("FERRY_CONTROL_ADDR", addr),
            ("FERRY_CONTROL_SERVER_NAME", "ferry-control".to_string()),
            ("FERRY_CA_ROOT", root.clone()),
            ("FERRY_JOIN_TOKEN", token),
        ]
    };
    let mut server_env =
        common(ctl(&["token", "create", "-n", "default", "--service-account", "web"]), format!("{CLIENT_V4}:15010"));
    server_env.push(("FERRY_SERVICE", "web".to_string()));
    start_sidecar(&pair.server, &dir, "web", Some(&[]), &server_env);
    let client_env =
        common(ctl(&["token", "create", "-n", "default", "--service-account", "client"]), "127.0.0.1:15010".into());
    start_sidecar(&pair.client, &dir, "client", None, &client_env);

    // An unmodified client calls the server's address: the sidecars speak mTLS, the app sees who called.
    let url = format!("http://{SERVER_V4}:8080/");
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        let out = pair.client.run("curl", &["-sS", "-m", "5", &url]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if body.starts_with("caller spiffe://") || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(body.trim(), "caller spiffe://cluster.local/ns/default/sa/client", "{body}");
    // Opaque TCP (a `protocol: tcp` port) rides `ferry/tcp` between the sidecars; half-close still works.
    let echoed = pair.client.block_on(|| async {
        let mut s = tokio::net::TcpStream::connect((SERVER_V4, 9000)).await.unwrap();
        s.write_all(b"opaque through mtls").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
        out
    });
    assert!(echoed.starts_with("echo ") && echoed.ends_with(": opaque through mtls"), "{echoed}");
    let server_metrics = pair.server.must("curl", &["-s", "-m", "5", "http://127.0.0.1:15020/metrics"]);
    let client_metrics = pair.client.must("curl", &["-s", "-m", "5", "http://127.0.0.1:15020/metrics"]);
    assert!(support::metric_value(&server_metrics, r#"ferry_tls_handshakes_total{direction="inbound"}"#) >= 2.0);
    assert!(support::metric_value(&client_metrics, r#"ferry_tls_handshakes_total{direction="outbound"}"#) >= 2.0);
    // The server's inbound saw TLS (not plaintext) on its redirected port.
    assert!(
        support::metric_value(
            &server_metrics,
            r#"ferry_protocol_detections_total{direction="inbound",protocol="tls",reason="detected"}"#
        ) >= 2.0,
        "{server_metrics}"
    );
    let status = ctl(&["status"]);
    let logs = |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
    assert!(
        status.contains("spiffe://cluster.local/ns/default/sa/web") && status.contains(SERVER_V4),
        "{status}\n--- web ---\n{}\n--- control ---\n{}",
        logs("web"),
        logs("control")
    );
    // The client's proxy subscribed on demand to what it called (the server pod's address), nothing else.
    let dump = pair.client.must("curl", &["-s", "-m", "5", "http://127.0.0.1:15000/config_dump"]);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["onDemand"]["subscriptions"][0]["name"], format!("ip/{SERVER_V4}"), "{}", dump["onDemand"]);
    assert_eq!(dump["onDemand"]["subscriptions"][0]["answer"], "found");

    // The control plane goes down. A destination the client holds is still served; an address inside the mesh's
    // ranges it has no answer for is refused (never sent in plaintext); one outside them passes through.
    pair.server.must("ip", &["addr", "add", "198.18.0.3/32", "dev", "lo"]);
    pair.client.must("ip", &["route", "add", "10.96.0.0/12", "via", SERVER_V4]);
    pair.client.kill(control);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = pair.client.must("curl", &["-s", "-m", "5", "http://127.0.0.1:15020/metrics"]);
        if support::metric_value(&metrics, "ferry_xds_connected") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the client's proxy still counts the stream as up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let known = pair.client.must("curl", &["-sS", "-m", "5", &url]);
    assert_eq!(known.trim(), "caller spiffe://cluster.local/ns/default/sa/client", "a known destination");
    let refused = pair.client.run("curl", &["-sS", "-m", "5", "-D", "-", "http://10.96.0.77:8080/"]);
    let refused = String::from_utf8_lossy(&refused.stdout).to_lowercase();
    assert!(
        refused.starts_with("http/1.1 503") && refused.contains("ferry-proxy-error: undiscovered"),
        "an unknown address in the Service range: {refused}"
    );
    let outside = pair.client.must("curl", &["-sS", "-m", "5", "http://198.18.0.3:8080/"]);
    assert_eq!(outside.trim(), "caller none", "an address outside the mesh passes through, in plaintext");
}
