//! Transparent interception end to end: `ferry init` rules and `ferry run` (as UID 1337) in two network namespaces
//! joined by a veth pair; unmodified clients (curl, a gRPC client, a TCP client) talk to the server's address.

use ferry_test_support as support;

use std::time::{Duration, Instant};

use ferry::init::{Family, InitConfig, rules};
use support::backend::half_close_backend_on;
use support::netns::{self, CLIENT_V4, NetNs, Pair, SERVER_V4, SERVER_V6};
use support::{TempDir, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The client side's config: the server's endpoints (IPv4 and IPv6) for each service it calls.
fn client_config() -> String {
    let mut out = String::new();
    for (name, port, protocol) in [("web", 8080, "http"), ("echo-grpc", 50051, "grpc"), ("tcp-echo", 9000, "tcp")] {
        out += &format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: {port}, protocol: {protocol}}}]\n  endpoints: [{{address: \"{SERVER_V4}:{port}\"}}, {{address: \"[{SERVER_V6}]:{port}\"}}]\n---\n"
        );
    }
    // A VIP whose only endpoint is this proxy's own inbound listener: must be refused, never looped.
    out += &format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: loop}}\nspec:\n  ports: [{{port: 80}}]\n  addresses: [\"198.18.0.99\"]\n  endpoints: [{{address: \"{CLIENT_V4}:15006\"}}]\n"
    );
    out
}

/// The `ferry init` arguments injection writes into the `ferry-init` container of a pod with these annotations
/// (`ferryctl inject`'s transformation itself, on a Pod).
fn injected_init_args(annotations: &[(&str, &str)]) -> Vec<String> {
    let notes: serde_json::Map<String, serde_json::Value> =
        annotations.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "namespace": "default", "annotations": notes},
        "spec": {"containers": [{"name": "app", "image": "app"}]}});
    let settings = ferry_api::kubernetes::inject::Settings::default();
    let (out, _) = ferry_api::kubernetes::inject::inject_yaml(&pod.to_string(), &settings).unwrap();
    let pod: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "ferry-init");
    init["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

/// `ferry init` (exactly as injected for a pod with `annotations`) then `ferry run` as UID 1337 inside `ns`, waiting
/// until it is ready.
fn start_sidecar(ns: &NetNs, dir: &TempDir, name: &str, config: &str, annotations: &[(&str, &str)], service: &str) {
    start_sidecar_with(ns, dir, name, config, annotations, service, &[]);
}

fn start_sidecar_with(
    ns: &NetNs,
    dir: &TempDir,
    name: &str,
    config: &str,
    annotations: &[(&str, &str)],
    service: &str,
    env: &[(&str, String)],
) {
    let args = injected_init_args(annotations);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.must(FERRY, &args);
    let config_path = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&config_path, config).unwrap();
    let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
    let mut envs = vec![
        ("FERRY_CONFIG_FILE", config_path.display().to_string()),
        ("FERRY_SERVICE", service.to_string()),
        ("FERRY_LOG_FORMAT", "json".to_string()),
        ("FERRY_WORKERS", "1".to_string()),
    ];
    envs.extend(env.iter().cloned());
    ns.spawn("setpriv", &["--reuid", "1337", "--regid", "1337", "--clear-groups", "--", FERRY, "run"], &envs, log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ns.run("curl", &["-sf", "-m", "1", "http://127.0.0.1:15020/health/ready"]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{name} sidecar not ready: {}",
        std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default()
    );
}

fn metrics(ns: &NetNs) -> String {
    ns.must("curl", &["-s", "-m", "5", "http://127.0.0.1:15020/metrics"])
}

/// The server side's apps, all dual-stack on [::]: HTTP on 8080 and 8081, gRPC echo on 50051, TCP echo on 9000 and 9001.
async fn server_apps() {
    let http = |port: u16| async move {
        let listener = tokio::net::TcpListener::bind(("::", port)).await.unwrap();
        loop {
            let Ok((stream, from)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                    let (path, from) = (req.uri().path(), from.ip().to_canonical());
                    let body = format!("hello from the server app on port {port}, path {path}, from {from}\n");
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(body),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    let grpc = support::grpc::grpc_backend_on(tokio::net::TcpListener::bind(("::", 50051)).await.unwrap());
    let echo = |port: u16| async move { tokio::net::TcpListener::bind(("::", port)).await.unwrap() };
    let tcp = [half_close_backend_on(echo(9000).await), half_close_backend_on(echo(9001).await)];
    // What the app keeps to itself: a listener on loopback only (a debug or admin port).
    let private = [
        half_close_backend_on(tokio::net::TcpListener::bind(("127.0.0.1", 9999)).await.unwrap()),
        half_close_backend_on(tokio::net::TcpListener::bind(("::1", 9999)).await.unwrap()),
    ];
    tokio::join!(http(8080), http(8081));
    drop((grpc, tcp, private));
}

/// Sends `payload`, half-closes, reads the answer.
async fn tcp_exchange(addr: &str, payload: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

#[test]
fn transparent_interception_between_two_namespaces() {
    if !netns::available("transparent_interception_between_two_namespaces") {
        return;
    }
    let pair = Pair::new("a");
    let dir = TempDir::new("interception");
    let _apps = pair.server.background(server_apps);
    // Port 9001 is excluded on both sides: it must bypass both proxies.
    // The server pod's Service `web` selects its HTTP and gRPC ports (the inbound metrics label names it there).
    let server_config = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 8080}, {port: 8081}, {port: 50051, protocol: grpc}]}\n";
    start_sidecar(&pair.server, &dir, "server", server_config, &[("ferry.dev/skip-inbound-ports", "9001")], "web");
    let client_notes = [("ferry.dev/skip-outbound-ports", "9001")];
    start_sidecar(&pair.client, &dir, "client", &client_config(), &client_notes, "client");

    // Outbound and inbound HTTP with an unmodified client (curl), over IPv4 and IPv6.
    for url in [format!("http://{SERVER_V4}:8080/page"), format!("http://[{SERVER_V6}]:8080/page6")] {
        let body = pair.client.must("curl", &["-sS", "-g", "-m", "10", &url]);
        assert!(body.starts_with("hello from the server app on port 8080"), "{url}: {body}");
    }
    let client_metrics = metrics(&pair.client);
    let server_metrics = metrics(&pair.server);
    let series = |m: &str, s: &str| metric_value(m, s);
    assert_eq!(
        series(
            &client_metrics,
            r#"ferry_requests_total{direction="outbound",service="web.default",status_class="2xx"}"#
        ),
        2.0,
        "{client_metrics}"
    );
    assert_eq!(
        series(
            &server_metrics,
            r#"ferry_requests_total{direction="inbound",service="web.default",status_class="2xx"}"#
        ),
        2.0,
        "{server_metrics}"
    );
    assert!(
        series(&client_metrics, r#"ferry_tcp_connections_opened_total{direction="outbound",mode="transparent"}"#)
            >= 2.0
    );
    assert!(
        series(&server_metrics, r#"ferry_tcp_connections_opened_total{direction="inbound",mode="transparent"}"#) >= 2.0
    );
    let client_log = std::fs::read_to_string(dir.path().join("client.log")).unwrap();
    let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        client_log.contains(&format!(r#""original_dst":"{SERVER_V4}:8080""#))
            && client_log.contains(r#""path":"/page""#),
        "client access log:\n{client_log}"
    );
    assert!(
        client_log.contains(&format!(r#""original_dst":"[{SERVER_V6}]:8080""#)),
        "client access log:\n{client_log}"
    );
    assert!(
        server_log.contains(r#""direction":"inbound""#) && server_log.contains(r#""path":"/page6""#),
        "server access log:\n{server_log}"
    );
    assert!(
        server_log.contains(&format!(r#""client":"{CLIENT_V4}:"#)),
        "the server sees the client's address:\n{server_log}"
    );

    // Inbound is delivered to the pod's own address the client dialled, from the proxy's reserved source (ferry init
    // put ::6 on lo for IPv6), so what the app binds only on loopback stays private to the pod.
    for (url, source) in [
        (format!("http://{SERVER_V4}:8080/source"), "from 127.0.0.6"),
        (format!("http://[{SERVER_V6}]:8080/source"), "from ::6"),
    ] {
        let body = pair.client.must("curl", &["-sS", "-g", "-m", "10", &url]);
        assert!(body.trim_end().ends_with(source), "{url}: {body}");
    }
    assert!(pair.server.must("ip", &["-6", "addr", "show", "dev", "lo"]).contains("inet6 ::6/128"));
    for addr in [format!("{SERVER_V4}:9999"), format!("[{SERVER_V6}]:9999")] {
        let url = format!("http://{addr}/debug");
        let out = pair.client.must("curl", &["-sS", "-g", "-m", "10", "-D", "-", "-o", "/dev/null", &url]);
        assert!(out.starts_with("HTTP/1.1 502") && out.contains("ferry-proxy-error: connect-refused"), "{url}: {out}");
        let target = addr.clone();
        let tcp = pair.client.block_on(|| async move {
            let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
            let _ = s.write_all(b"opaque").await;
            let _ = s.shutdown().await;
            let mut out = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
            out
        });
        assert_eq!(tcp, "", "{addr}: the loopback-only listener answered");
    }
    // Traffic routed to the pod for another address (a neighbour's packet for 198.51.100.7) is never relayed.
    pair.client.must("ip", &["route", "add", "198.51.100.7/32", "via", SERVER_V4]);
    let out = pair.client.must("curl", &["-sS", "-m", "10", "-D", "-", "-o", "/dev/null", "http://198.51.100.7:8080/"]);
    assert!(out.starts_with("HTTP/1.1 502") && out.contains("ferry-proxy-error: no-route"), "{out}");
    let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(server_log.contains("which is not this pod's address"), "{server_log}");
    // Inside the pod, the app still reaches its own loopback listener.
    let inside = pair.server.block_on(|| async { tcp_exchange("127.0.0.1:9999", b"self").await });
    assert_eq!(inside, "echo 4: self");

    // A port no Service claims is passed through unchanged (still detected and counted).
    let body = pair.client.must("curl", &["-sS", "-m", "10", &format!("http://{SERVER_V4}:8081/other")]);
    assert!(body.starts_with("hello from the server app on port 8081"));
    assert_eq!(
        series(
            &metrics(&pair.client),
            r#"ferry_requests_total{direction="outbound",service="passthrough",status_class="2xx"}"#
        ),
        1.0
    );

    // Loop protection: a route to the proxy's own listener is refused; explicit requests still work alongside.
    let looped =
        pair.client.must("curl", &["-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://198.18.0.99/"]);
    assert_eq!(looped, "502");
    assert!(
        std::fs::read_to_string(dir.path().join("client.log")).unwrap().contains("one of this proxy's own listeners")
    );
    let explicit =
        pair.client.must("curl", &["-sS", "-m", "10", "-H", "Host: web:8080", "http://127.0.0.1:15001/explicit"]);
    assert!(explicit.starts_with("hello from the server app on port 8080"), "{explicit}");

    // /config_dump lists open connections with the mode each came in by: hold one transparent TCP connection open.
    let dump = pair.client.block_on(|| async {
        let mut held = tokio::net::TcpStream::connect(format!("{SERVER_V4}:9000")).await.unwrap();
        held.write_all(b"held").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut admin = tokio::net::TcpStream::connect("127.0.0.1:15000").await.unwrap();
        admin.write_all(b"GET /config_dump HTTP/1.0\r\nHost: admin\r\n\r\n").await.unwrap();
        let mut dump = String::new();
        admin.read_to_string(&mut dump).await.unwrap();
        dump
    });
    let json: serde_json::Value = serde_json::from_str(dump.split_once("\r\n\r\n").unwrap().1).unwrap();
    let open = json["connections"].as_array().unwrap();
    assert!(
        open.iter().any(|c| c["mode"] == "transparent"
            && c["original_dst"] == format!("{SERVER_V4}:9000")
            && c["protocol"] == "tcp"),
        "{open:?}"
    );

    // gRPC and opaque TCP, from clients running inside the client namespace.
    let (echoed, end, tcp, tcp_v6) = pair.client.block_on(|| async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{SERVER_V4}:50051"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (echoed, end) = support::grpc::bidi_roundtrip(tonic::client::Grpc::new(channel), 5).await;
        let channel6 = tonic::transport::Endpoint::from_shared(format!("http://[{SERVER_V6}]:50051"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (echoed6, _) = support::grpc::bidi_roundtrip(tonic::client::Grpc::new(channel6), 3).await;
        assert_eq!(echoed6, 3, "gRPC over IPv6");
        let tcp = tcp_exchange(&format!("{SERVER_V4}:9000"), b"opaque bytes\x00\x01").await;
        let tcp_v6 = tcp_exchange(&format!("[{SERVER_V6}]:9000"), b"six").await;
        (echoed, end, tcp, tcp_v6)
    });
    assert_eq!((echoed, end.code()), (5, tonic::Code::Aborted));
    assert_eq!(end.metadata().get("x-echo-count").unwrap(), "5");
    assert_eq!(tcp, "echo 14: opaque bytes\u{0}\u{1}");
    assert_eq!(tcp_v6, "echo 3: six");
    let client_metrics = metrics(&pair.client);
    let server_metrics = metrics(&pair.server);
    assert_eq!(
        series(
            &client_metrics,
            r#"ferry_requests_total{direction="outbound",service="echo-grpc.default",status_class="2xx"}"#
        ),
        2.0
    );
    // Inbound so far: two curls, two source checks, the pass-through, the explicit request and two gRPC calls (IPv4,
    // IPv6).
    assert_eq!(
        series(
            &server_metrics,
            r#"ferry_requests_total{direction="inbound",service="web.default",status_class="2xx"}"#
        ),
        8.0
    );
    // Port 9000 is `protocol: tcp` in the client's config: the held connection and two exchanges skip detection.
    assert_eq!(
        series(
            &client_metrics,
            r#"ferry_protocol_detections_total{direction="outbound",protocol="tcp",reason="opaque-port"}"#
        ),
        3.0
    );

    // The excluded port bypasses both proxies: their connection counts do not move.
    let opened = |m: &str, d: &str| {
        series(m, &format!(r#"ferry_tcp_connections_opened_total{{direction="{d}",mode="transparent"}}"#))
    };
    let (client_before, server_before) = (opened(&client_metrics, "outbound"), opened(&server_metrics, "inbound"));
    let excluded = pair.client.block_on(|| async { tcp_exchange(&format!("{SERVER_V4}:9001"), b"direct").await });
    assert_eq!(excluded, "echo 6: direct");
    assert_eq!(opened(&metrics(&pair.client), "outbound"), client_before, "client proxy saw the excluded port");
    assert_eq!(opened(&metrics(&pair.server), "inbound"), server_before, "server proxy saw the excluded port");
    for (side, m) in [("client", metrics(&pair.client)), ("server", metrics(&pair.server))] {
        for line in m
            .lines()
            .filter(|l| l.starts_with("ferry_requests_total") || l.starts_with("ferry_tcp_connections_opened_total"))
        {
            if !line.ends_with(" 0") {
                eprintln!("{side}: {line}");
            }
        }
    }
}

/// The `FERRY_APP_PROBES` value the injector writes for an app with an HTTP liveness probe on 8080, a TCP readiness
/// probe on 9000 and a startup probe on its loopback-only port 9999.
fn injected_app_probes() -> String {
    let pod = "apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: app
    image: example.com/web:1
    livenessProbe: {httpGet: {path: /healthz, port: 8080}}
    readinessProbe: {tcpSocket: {port: 9000}}
    startupProbe: {tcpSocket: {port: 9999}}
";
    let (out, _) = ferry_api::kubernetes::inject::inject_yaml(pod, &Default::default()).unwrap();
    let pod: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    let proxy = pod["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "ferry-proxy").unwrap();
    let env = proxy["env"].as_array().unwrap().iter().find(|e| e["name"] == "FERRY_APP_PROBES").unwrap();
    env["value"].as_str().unwrap().to_string()
}

/// The app's rewritten probes under strict mTLS, with the real rules and the pod's real address, over IPv4 and (in a
/// second pair of namespaces whose pod address is IPv6) IPv6: the proxy dials the app from its reserved source,
/// which the rules let through, while a plaintext call from outside is refused and the app's loopback-only port
/// stays unreachable even to the probe (as it would be to the kubelet).
#[test]
fn rewritten_app_probes_pass_under_strict_mtls_with_the_real_rules() {
    if !netns::available("rewritten_app_probes_pass_under_strict_mtls_with_the_real_rules") {
        return;
    }
    let config = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 8080}, {port: 9000, protocol: tcp}]}\n---\napiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {targetRef: {kind: Service, name: web}, mtls: strict}\n";
    for (tag, pod_ip) in [("p4", SERVER_V4), ("p6", SERVER_V6)] {
        let pair = Pair::new(tag);
        let dir = TempDir::new(&format!("interception-probes-{tag}"));
        let _apps = pair.server.background(server_apps);
        let env = [("FERRY_POD_IP", pod_ip.to_string()), ("FERRY_APP_PROBES", injected_app_probes())];
        start_sidecar_with(&pair.server, &dir, "server", config, &[], "web", &env);
        let host = if tag == "p6" { format!("[{pod_ip}]") } else { pod_ip.to_string() };
        let plain = pair.client.must(
            "curl",
            &["-sS", "-g", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{host}:8080/")],
        );
        assert_eq!(plain, "403", "{tag}: strict mTLS refuses a plaintext caller");
        let probe = |kind: &str| {
            let url = format!("http://127.0.0.1:15020/app-health/app/{kind}");
            let out = pair.server.must("curl", &["-sS", "-m", "10", "-w", "\n%{http_code}", &url]);
            let (body, code) = out.rsplit_once('\n').unwrap();
            (code.to_string(), body.to_string())
        };
        let logs = || std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        let (code, body) = probe("live");
        assert_eq!(code, "200", "{tag}: {body}\n{}", logs());
        let (code, body) = probe("ready");
        assert_eq!(code, "200", "{tag}: {body}\n{}", logs());
        let (code, body) = probe("startup");
        assert_eq!(code, "503", "{tag}: the loopback-only port is not the pod's: {body}");
        assert!(body.contains(&format!("app probe to {host}:9999 failed")), "{tag}: {body}");
    }
}

/// iptables-save output of the nat table, without comments and counters, for comparison.
fn nat_rules(ns: &NetNs, save: &str) -> String {
    ns.must(save, &["-t", "nat"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| if l.starts_with(':') { l.split(" [").next().unwrap().to_string() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn init_is_idempotent_and_cleanup_restores_the_table() {
    if !netns::available("init_is_idempotent_and_cleanup_restores_the_table") {
        return;
    }
    for mode in ["nft", "legacy"] {
        let ns = NetNs::new(&format!("ferry-{}-init-{mode}", std::process::id() % 100_000));
        // A rule that is not Ferry's must survive everything.
        ns.must(
            &format!("iptables-{mode}"),
            &["-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN"],
        );
        let init = |extra: &[&str]| {
            let mut args = vec!["init", "--ipv6", "on", "--iptables-mode", mode];
            args.extend_from_slice(extra);
            ns.must(FERRY, &args);
        };
        for save in [format!("iptables-{mode}-save"), format!("ip6tables-{mode}-save")] {
            let before = nat_rules(&ns, &save);
            init(&["--exclude-inbound-ports", "22"]);
            let once = nat_rules(&ns, &save);
            assert!(once.contains("-A FERRY_INBOUND -p tcp -m tcp --dport 22 -j RETURN"), "{save}:\n{once}");
            init(&["--exclude-inbound-ports", "22"]);
            let twice = nat_rules(&ns, &save);
            assert_eq!(once, twice, "{save}: a second init changed the rules");
            assert_eq!(twice.matches("-j FERRY_INBOUND").count(), 1, "{save}: one jump into FERRY_INBOUND");
            init(&["--cleanup"]);
            assert_eq!(nat_rules(&ns, &save), before, "{save}: cleanup must restore the table");
        }
        assert!(nat_rules(&ns, &format!("iptables-{mode}-save")).contains("--dport 53 -j RETURN"));
    }
    // Auto mode follows the implementation that already holds rules: legacy here, and nft stays untouched.
    let ns = NetNs::new(&format!("ferry-{}-init-auto", std::process::id() % 100_000));
    ns.must("iptables-legacy", &["-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN"]);
    ns.must(FERRY, &["init", "--ipv6", "off"]);
    assert!(nat_rules(&ns, "iptables-legacy-save").contains("-j FERRY_OUTBOUND"));
    assert!(!nat_rules(&ns, "iptables-nft-save").contains("FERRY"));
}

#[test]
fn init_reports_missing_iptables_clearly() {
    // With PATH holding no iptables at all, init fails naming the tool (no root needed to see this).
    let out = std::process::Command::new(FERRY)
        .args(["init", "--iptables-mode", "nft", "--ipv6", "off"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("iptables-nft") && err.contains("not found"), "{err}");
}

#[test]
fn init_reports_missing_permission_clearly() {
    if !netns::available("init_reports_missing_permission_clearly") {
        return;
    }
    // As the unprivileged proxy UID: nothing changes, and the error says why.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "1337", "--regid", "1337", "--clear-groups", "--", FERRY, "init", "--ipv6", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not permitted") && err.contains("CAP_NET_ADMIN"), "{err}");
}

#[test]
fn init_dry_run_prints_the_exact_rules() {
    let out = std::process::Command::new(FERRY).args(["init", "--dry-run", "--ipv6", "on"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // Exactly the library's rules (whose text a unit test pins), with a header per family.
    let want_v4 = format!("# iptables (iptables-restore --noflush)\n{}", rules(&InitConfig::default(), Family::V4));
    let want_v6 = format!("# ip6tables (iptables-restore --noflush)\n{}", rules(&InitConfig::default(), Family::V6));
    assert!(text.starts_with(&want_v4), "got:\n{text}");
    assert!(text.contains(&want_v6), "got:\n{text}");
    assert!(text.contains("-A FERRY_INBOUND -p tcp --dport 15020 -j RETURN\n"), "the health port is exempt");
    assert!(text.contains("-A FERRY_OUTBOUND -d ::1/128 -j RETURN\n"), "{text}");

    // Exclusions from flags and from the environment (as the Kubernetes annotations will set them).
    let out = std::process::Command::new(FERRY)
        .args(["init", "--dry-run", "--ipv6", "off", "--exclude-inbound-ports", "22,2222"])
        .env("FERRY_EXCLUDE_OUTBOUND_PORTS", "3306")
        .env("FERRY_EXCLUDE_OUTBOUND_CIDRS", "169.254.169.254/32")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "-A FERRY_INBOUND -p tcp --dport 22 -j RETURN\n",
        "-A FERRY_INBOUND -p tcp --dport 2222 -j RETURN\n",
        "-A FERRY_OUTBOUND -p tcp --dport 3306 -j RETURN\n",
        "-A FERRY_OUTBOUND -d 169.254.169.254/32 -j RETURN\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("ip6tables"), "--ipv6 off writes no IPv6 rules");
    // Bad values are refused naming the flag.
    let out = std::process::Command::new(FERRY)
        .args(["init", "--dry-run", "--exclude-outbound-cidrs", "10.0.0.0/99"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--exclude-outbound-cidrs"));
}
