//! Config delivery over delta xDS with real `ferry-control` and `ferry` processes: changes enforced by every proxy and
//! ACKed once each, long-lived streams untouched by 20 pushes under load, NACKs visible in `ferryctl status`, a
//! SIGKILLed control plane costing no request, and refused credentials.

use ferry_test_support::{self as support, control};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use control::{ControlPlane, state_dir};
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use support::backend::{self, Backend};
use support::grpc::{Chunk, Codec, grpc_backend, tokio_stream_from};
use support::{Ferry, Load, http_exchange, http_get, wait_until};

const ACK_SERVICE: &str = r#"ferry_xds_updates_total{result="ack",type="Service"}"#;
const NACK_SERVICE: &str = r#"ferry_xds_updates_total{result="nack",type="Service"}"#;

fn service(name: &str, protocol: &str, addresses: &[String]) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80, protocol: {protocol}}}]\n  addresses: [{}]\n  identities: [{name}]\n",
        addresses.join(", ")
    )
}

/// A proxy connected to `cp` as `default/<account>`, registering as an endpoint of `account`'s Service when `app`
/// (where its app listens) is given.
fn proxy(cp: &ControlPlane, account: &str, app: Option<SocketAddr>) -> Ferry {
    let token = cp.join_token("default", account, "1h");
    let mut env = cp.proxy_env(&token);
    env.push(("FERRY_NODE_ID".into(), account.into()));
    if let Some(app) = app {
        env.push(("FERRY_SERVICE".into(), account.into()));
        env.push(("FERRY_APP_ADDR".into(), app.to_string()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Ferry::start(None, &env)
}

/// Status of a plain GET for `host` sent to a proxy's outbound listener (explicit mode), on a fresh connection.
fn get(proxy: SocketAddr, host: &str) -> Option<u16> {
    http_exchange(proxy, "GET", "/", &[("Host", host)], "").map(|(status, _)| status)
}

/// A call to the control plane's API with its admin token: (status, body).
fn api(cp: &ControlPlane, method: &str, path: &str, body: &str) -> (u16, String) {
    let bearer = format!("Bearer {}", cp.token().trim());
    http_exchange(cp.api, method, path, &[("Authorization", &bearer)], body).expect("the API answers")
}

struct Mesh {
    _backend: Backend,
    cp: ControlPlane,
    web: Ferry,
    api: Ferry,
}

/// ferry-control with Service `api` (address `api.v0.local`), its proxy in front of an HTTP app, and a caller `web`.
/// Blocks: call it from a multi-thread runtime's test through this wrapper.
fn mesh(tag: &str) -> Mesh {
    tokio::task::block_in_place(|| mesh_blocking(tag))
}

fn mesh_blocking(tag: &str) -> Mesh {
    let backend = tokio::runtime::Handle::current().block_on(backend::http_backend());
    let cp = ControlPlane::start(&state_dir(tag));
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "http", &["api.v0.local".into()])));
    let api = proxy(&cp, "api", Some(backend.addr));
    let web = proxy(&cp, "web", None);
    wait_until("web routes api.v0.local to the api proxy", Duration::from_secs(10), || {
        get(web.outbound, "api.v0.local") == Some(200)
    });
    // Both proxies have ACKed everything so far, so counters read from here on move only with the test's changes.
    wait_until("2 proxies x 4 types in sync", Duration::from_secs(10), || {
        cp.ok(&["status"], None).matches("SYNCED").count() == 10
    });
    Mesh { _backend: backend, cp, web, api }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_enforced_by_every_proxy_and_acked_once() {
    tokio::task::block_in_place(change_is_enforced);
}

fn change_is_enforced() {
    let m = mesh_blocking("enforce");
    let mut addresses = vec!["api.v0.local".to_string()];
    for i in 1..=3 {
        let host = format!("api.v{i}.local");
        // (web asks the control plane about the unknown host first: that answer is a push of its own.)
        assert_eq!(get(m.web.outbound, &host), Some(502), "{host} is not routable before the change");
        std::thread::sleep(Duration::from_millis(300));
        let before = [m.web.metric(ACK_SERVICE), m.api.metric(ACK_SERVICE)];
        addresses.push(host.clone());
        let started = Instant::now();
        let out = m.cp.ok(&["apply", "-f", "-"], Some(&service("api", "http", &addresses)));
        assert!(out.contains("configured"), "{out}");
        wait_until(&format!("{host} routable through web"), Duration::from_secs(5), || {
            get(m.web.outbound, &host) == Some(200)
        });
        eprintln!("change {i}: enforced {:?} after ferryctl apply started", started.elapsed());
        for (name, p, b) in [("web", &m.web, before[0]), ("api", &m.api, before[1])] {
            wait_until(&format!("{name} ACKs change {i}"), Duration::from_secs(5), || p.metric(ACK_SERVICE) > b);
        }
        std::thread::sleep(Duration::from_millis(300));
        for (name, p, b) in [("web", &m.web, before[0]), ("api", &m.api, before[1])] {
            assert_eq!(p.metric(ACK_SERVICE), b + 1.0, "{name}: exactly one Service ACK per change");
            let (_, dump) = http_get(p.admin, "/config_dump").unwrap();
            assert!(dump.contains(&host) && dump.contains("xds:"), "{name} holds the change: {dump}");
        }
    }
    let status = m.cp.ok(&["status"], None);
    assert_eq!(status.matches("SYNCED").count(), 10, "two proxies, five types each, all in sync:\n{status}");
    assert!(status.contains("spiffe://cluster.local/ns/default/sa/api") && status.contains("127.0.0.1:"), "{status}");
    let text = m.cp.metrics_text();
    assert_eq!(support::metric_value(&text, "ferry_control_xds_connected_proxies"), 2.0, "{text}");
    assert_eq!(m.web.metric("ferry_xds_connected"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_twenty_changes_under_load() {
    let m = mesh("streams");
    let grpc_app = grpc_backend().await;
    let ws_app = backend::websocket_backend().await;
    m.cp.ok(&["apply", "-f", "-"], Some(&service("grpc", "grpc", &["grpc.local".into()])));
    m.cp.ok(&["apply", "-f", "-"], Some(&service("ws", "http", &["ws.local".into()])));
    let grpc_proxy = tokio::task::block_in_place(|| proxy(&m.cp, "grpc", Some(grpc_app.addr)));
    let ws_proxy = tokio::task::block_in_place(|| proxy(&m.cp, "ws", Some(ws_app.addr)));
    let web = m.web.outbound;
    tokio::task::block_in_place(|| {
        wait_until("web knows the grpc and ws endpoints", Duration::from_secs(10), || {
            // Web learns of a destination when it first calls it.
            get(web, "grpc.local");
            get(web, "ws.local");
            let dump = http_get(m.web.admin, "/config_dump").unwrap().1;
            dump.contains(&grpc_proxy.inbound.to_string()) && dump.contains(&ws_proxy.inbound.to_string())
        })
    });

    // A gRPC bidi stream and a WebSocket, both open across every change.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{web}"))
        .unwrap()
        .origin(http::Uri::from_static("http://grpc.local"))
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Bidi");
    let mut replies =
        grpc.streaming(tonic::Request::new(tokio_stream_from(rx)), path, Codec::default()).await.unwrap().into_inner();
    tx.send(Chunk { seq: 0, data: b"before".to_vec() }).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().seq, 0);
    let stream = tokio::net::TcpStream::connect(web).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.local/socket", stream).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "before");

    let proxies = [&m.web, &m.api, &grpc_proxy, &ws_proxy];
    // Every proxy has ACKed the registrations' pushes before the counting starts.
    tokio::task::block_in_place(|| {
        wait_until("4 proxies x 4 types in sync", Duration::from_secs(10), || {
            m.cp.ok(&["status"], None).matches("SYNCED").count() == 20
        })
    });
    let before: Vec<f64> = proxies.iter().map(|p| p.metric(ACK_SERVICE)).collect();
    let load = Load::start(web, "api.v0.local");
    let mut addresses = vec!["api.v0.local".to_string()];
    for i in 1..=20 {
        let host = format!("api.c{i}.local");
        addresses.push(host.clone());
        tokio::task::block_in_place(|| {
            m.cp.ok(&["apply", "-f", "-"], Some(&service("api", "http", &addresses)));
            // The proxies that hold api (web calls it, api serves it) get each change; the others, which never
            // call it, get none (below).
            wait_until(&format!("change {i} on the proxies holding api"), Duration::from_secs(10), || {
                proxies.iter().zip(&before).take(2).all(|(p, b)| p.metric(ACK_SERVICE) >= b + i as f64)
            });
        });
        // Both long-lived streams still carry traffic between changes.
        tx.send(Chunk { seq: i, data: vec![i as u8; 32] }).await.unwrap();
        assert_eq!(replies.message().await.unwrap().expect("gRPC stream open").seq, i);
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!("change {i}"))).await.unwrap();
        let echoed = ws.next().await.expect("websocket open").unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("change {i}"));
    }
    let (ok, failed, failures) = tokio::task::block_in_place(|| load.finish());
    eprintln!("load during 20 changes: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {failures:?}");
    assert!(ok > 50, "the load ran ({ok} requests)");
    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(300)));
    for (i, (p, b)) in proxies.iter().zip(&before).enumerate() {
        let expected = if i < 2 { b + 20.0 } else { *b };
        assert_eq!(
            p.metric(ACK_SERVICE),
            expected,
            "proxy {i}: one Service ACK per change, and none for a Service it does not call"
        );
        assert_eq!(p.metric(NACK_SERVICE), 0.0);
    }
    assert_eq!(get(web, "api.c20.local"), Some(200));
    drop(tx);
    let end = replies.message().await.expect_err("the echo ends with its status");
    assert_eq!(end.code(), tonic::Code::Aborted, "{end:?}");
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_resource_is_nacked_and_the_old_config_kept() {
    tokio::task::block_in_place(invalid_resource_is_nacked);
}

fn invalid_resource_is_nacked() {
    let m = mesh_blocking("nack");
    // Past validation, as only the test build can: Service default/api with port 70000.
    let bad = ferry_api::resources::pb::Service {
        meta: Some(ferry_api::resources::pb::Meta {
            name: "api".into(),
            namespace: "default".into(),
            ..Default::default()
        }),
        ports: vec![ferry_api::resources::pb::Port { port: 70000, ..Default::default() }],
        addresses: vec!["api.v0.local".into(), "api.bad.local".into()],
        identities: vec!["api".into()],
        ..Default::default()
    };
    let hex = ferry_api::hex(&bad.encode_to_vec());
    let body =
        serde_json::json!({ "typeUrl": ferry_api::protocol::SERVICE_TYPE, "name": "default/api", "valueHex": hex });
    let (status, reply) = api(&m.cp, "POST", "/v1/testing/inject", &body.to_string());
    assert_eq!(status, 200, "the test build has the injection route: {reply}");
    wait_until("both proxies NACK", Duration::from_secs(5), || {
        m.web.metric(NACK_SERVICE) == 1.0 && m.api.metric(NACK_SERVICE) == 1.0
    });
    let status = m.cp.ok(&["status"], None);
    assert!(status.contains("NACKED") && status.contains("STALE"), "{status}");
    assert!(status.contains("spec.ports[0].port"), "the NACK message names the field:\n{status}");
    let json: serde_json::Value = serde_json::from_str(&m.cp.ok(&["status", "-o", "json"], None)).unwrap();
    for p in json["proxies"].as_array().unwrap() {
        let message = p["types"]["Service"]["nacked"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("Service default/api: spec.ports[0].port: must be 1-65535"), "{message}");
    }
    // The old config keeps serving, and the rejected one is not half-applied.
    assert_eq!(get(m.web.outbound, "api.v0.local"), Some(200));
    assert_eq!(get(m.web.outbound, "api.bad.local"), Some(502));
    assert!(m.web.logs().contains("config rejected (NACK)"));
    // Withdrawn: the valid resource comes back, is ACKed, and the NACK clears.
    let (status, _) = api(&m.cp, "DELETE", "/v1/testing/inject", "");
    assert_eq!(status, 200);
    wait_until("status back in sync", Duration::from_secs(5), || {
        let s = m.cp.ok(&["status"], None);
        !s.contains("NACKED") && s.matches("SYNCED").count() == 10
    });
    assert_eq!(get(m.web.outbound, "api.v0.local"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_control_plane_loses_no_request_and_no_policy() {
    let mut m = mesh("sigkill");
    let policy = "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api}\nspec: {targetRef: {kind: Service, name: api}, timeout: 3s}\n";
    m.cp.ok(&["apply", "-f", "-"], Some(policy));
    let load = Load::start(m.web.outbound, "api.v0.local");
    tokio::task::block_in_place(|| {
        std::thread::sleep(Duration::from_millis(500));
        m.cp.child.kill().unwrap();
        m.cp.child.wait().unwrap();
        wait_until("proxies notice the control plane is gone", Duration::from_secs(10), || {
            m.web.metric("ferry_xds_connected") == 0.0
        });
        // The mesh keeps serving on its last good config.
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(http_get(m.web.health, "/health/ready").unwrap().0, 200);
        let (state, addrs) = (m.cp.state.clone(), m.cp.addrs());
        m.cp = ControlPlane::start_on(&state, addrs, &[]);
        wait_until("both proxies reconnect and resync", Duration::from_secs(20), || {
            let s = m.cp.ok(&["status"], None);
            s.matches("SYNCED").count() == 10
        });
    });
    let (ok, failed, failures) = tokio::task::block_in_place(|| load.finish());
    eprintln!("load across SIGKILL + restart: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {failures:?}");
    assert!(m.cp.logs().contains("keeping endpoints registered before the restart"), "{}", m.cp.logs());
    // Every accepted object is still there, and new changes reach the proxies again.
    let out = m.cp.ok(&["get", "trafficpolicy", "api", "-o", "json"], None);
    assert!(out.contains("\"timeout\": \"3s\""), "{out}");
    m.cp.ok(&["apply", "-f", "-"], Some(&service("api", "http", &["api.v0.local".into(), "api.after.local".into()])));
    tokio::task::block_in_place(|| {
        wait_until("a change after the restart is enforced", Duration::from_secs(5), || {
            get(m.web.outbound, "api.after.local") == Some(200)
        })
    });
    assert_eq!(m.api.metric("ferry_xds_connected"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_false_claims_are_refused() {
    let app = backend::http_backend().await;
    let cp = tokio::task::block_in_place(|| ControlPlane::start(&state_dir("refuse")));
    cp.ok(&["apply", "-f", "-"], Some(&service("api", "http", &["api.local".into()])));
    let expired = cp.join_token("default", "api", "1s");
    let revoked = cp.join_token("default", "api", "1h");
    let id = revoked.split('.').next().unwrap().to_string();
    cp.ok(&["token", "revoke", &id], None);
    let impostor = cp.join_token("default", "web", "1h");
    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(1500)));
    let cases = [
        ("unknown", "0123456789abcdef.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".to_string()),
        ("expired", expired),
        ("revoked", revoked),
        ("service", impostor),
    ];
    for (reason, token) in cases {
        let mut env = cp.proxy_env(&token);
        env.push(("FERRY_SERVICE".into(), "api".into()));
        env.push(("FERRY_APP_ADDR".into(), app.addr.to_string()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let p = Ferry::spawn(None, &env);
        // A bad token gets no certificate; a certificate whose identity the Service does not list gets no stream.
        let (series, logged) = match reason {
            "service" => ("ferry_control_xds_refused_total", "xDS stream failed"),
            _ => ("ferry_control_certificate_requests_refused_total", "certificate request failed"),
        };
        let series = format!("{series}{{reason=\"{reason}\"}}");
        tokio::task::block_in_place(|| {
            wait_until(&format!("refusal `{reason}` counted"), Duration::from_secs(10), || {
                support::metric_value(&cp.metrics_text(), &series) >= 1.0
            });
            wait_until("the proxy logs the refusal", Duration::from_secs(5), || p.logs().contains(logged));
        });
        assert_eq!(http_get(p.health, "/health/ready").unwrap().0, 503, "{reason}: never ready without config");
        let log = p.logs();
        let expected = match reason {
            "service" => "does not list identity spiffe://cluster.local/ns/default/sa/web",
            "unknown" => "unknown token",
            other => other,
        };
        assert!(log.contains(expected), "{reason}: proxy log lacks {expected:?}:\n{log}");
    }
    // Revoking the token of a connected proxy closes its stream; it keeps serving its last config, refused on retry.
    let web_token = cp.join_token("default", "web", "1h");
    let mut env = cp.proxy_env(&web_token);
    env.push(("FERRY_NODE_ID".into(), "web".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let web = tokio::task::block_in_place(|| Ferry::start(None, &env));
    assert_eq!(web.metric("ferry_xds_connected"), 1.0);
    let revoked_before =
        support::metric_value(&cp.metrics_text(), "ferry_control_xds_refused_total{reason=\"revoked\"}");
    cp.ok(&["token", "revoke", web_token.split('.').next().unwrap()], None);
    tokio::task::block_in_place(|| {
        wait_until("the revoked proxy's stream is closed", Duration::from_secs(10), || {
            web.metric("ferry_xds_connected") == 0.0
        });
        wait_until("its reconnect refused", Duration::from_secs(10), || {
            support::metric_value(&cp.metrics_text(), "ferry_control_xds_refused_total{reason=\"revoked\"}")
                >= revoked_before + 2.0
        });
    });
    assert_eq!(http_get(web.health, "/health/ready").unwrap().0, 200, "still serving its last good config");
    assert!(web.logs().contains("was revoked"), "{}", web.logs());
    drop(web);
    let logs = cp.logs();
    assert!(logs.matches("certificate request refused").count() >= 3, "{logs}");
    assert!(logs.matches("xDS connection refused").count() >= 3, "{logs}");
    tokio::task::block_in_place(|| {
        wait_until("no refused proxy is listed", Duration::from_secs(5), || {
            let status = cp.ok(&["status"], None);
            !status.contains("sa/api") && !status.contains("sa/web")
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_kept_over_a_restart_expire_after_the_grace_period() {
    tokio::task::block_in_place(endpoints_expire_after_grace);
}

fn endpoints_expire_after_grace() {
    let mut m = mesh_blocking("grace");
    let api_endpoint = m.api.inbound.to_string();
    // The control plane goes down, and so does the api proxy: after the restart nobody re-registers its endpoint.
    m.cp.child.kill().unwrap();
    m.cp.child.wait().unwrap();
    drop(m.api);
    let (state, addrs) = (m.cp.state.clone(), m.cp.addrs());
    m.cp = ControlPlane::start_on(&state, addrs, &["--endpoint-grace", "3s"]);
    assert!(m.cp.logs().contains("keeping endpoints registered before the restart"), "{}", m.cp.logs());
    wait_until("web reconnects and resyncs", Duration::from_secs(20), || {
        m.cp.ok(&["status"], None).matches("SYNCED").count() == 5
    });
    wait_until("the endpoint is withdrawn once the grace period ends", Duration::from_secs(20), || {
        !http_get(m.web.admin, "/config_dump").unwrap().1.contains(&api_endpoint)
    });
    assert_eq!(get(m.web.outbound, "api.v0.local"), Some(503), "api has no endpoint left");
    assert!(!std::fs::read_to_string(state.join("endpoints.json")).unwrap().contains(&api_endpoint));
}

/// On-demand discovery, explicit mode: a proxy holds only the Services it calls. Its first call to a new host
/// succeeds (the lookup is answered within the call), a host nobody has is answered "absent" once and then from the
/// cache, and a destination unused for `FERRY_SUBSCRIPTION_IDLE` is released (and found again on the next call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_subscribes_to_what_it_calls_and_releases_what_it_stops_calling() {
    tokio::task::block_in_place(|| {
        let m = mesh_blocking("ondemand");
        m.cp.ok(&["apply", "-f", "-"], Some(&service("other", "http", &["other.local".into()])));
        let token = m.cp.join_token("default", "caller", "1h");
        let mut env = m.cp.proxy_env(&token);
        env.push(("FERRY_NODE_ID".into(), "caller".into()));
        // (3 s: each check of a held destination comes well within it, even on a loaded machine)
        env.push(("FERRY_SUBSCRIPTION_IDLE".into(), "3s".into()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let caller = Ferry::start(None, &env);
        let holds = |host: &str| {
            let dump = http_get(caller.admin, "/config_dump").unwrap().1;
            let snapshot: serde_json::Value = serde_json::from_str(&dump).unwrap();
            snapshot["snapshot"]["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["spec"]["addresses"].as_array().is_some_and(|a| a.iter().any(|a| a == host)))
        };
        let lookups = |result: &str| caller.metric(&format!(r#"ferry_discovery_lookups_total{{result="{result}"}}"#));
        assert!(!holds("api.v0.local") && !holds("other.local"), "nothing is held before it is called");
        // A host nobody has: one lookup, then the cached answer.
        assert_eq!(get(caller.outbound, "nobody.local"), Some(502));
        assert_eq!(get(caller.outbound, "nobody.local"), Some(502));
        assert_eq!((lookups("absent"), lookups("cached")), (1.0, 1.0));
        // The first call: answered within it.
        assert_eq!(get(caller.outbound, "api.v0.local"), Some(200), "the first request to a new destination");
        assert_eq!(lookups("found"), 1.0);
        assert!(holds("api.v0.local") && !holds("other.local"), "only what it called");
        assert_eq!(get(caller.outbound, "api.v0.local"), Some(200));
        assert_eq!(lookups("found"), 1.0, "a held destination is not looked up again");
        let subscriptions = || {
            let dump: serde_json::Value =
                serde_json::from_str(&http_get(caller.admin, "/config_dump").unwrap().1).unwrap();
            let rows = dump["onDemand"]["subscriptions"].as_array().unwrap().clone();
            rows.iter()
                .map(|r| format!("{} {}", r["name"].as_str().unwrap(), r["answer"].as_str().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(subscriptions(), ["host/api.v0.local found", "host/nobody.local absent"]);
        // Unused for the idle period: released, and the control plane stops sending it.
        wait_until("api released after 3s unused", Duration::from_secs(15), || !holds("api.v0.local"));
        assert_eq!(subscriptions(), ["host/nobody.local absent"], "the subscription is gone");
        // Called again: found again.
        assert_eq!(get(caller.outbound, "api.v0.local"), Some(200));
        assert_eq!(lookups("found"), 2.0);
        // The web proxy of the mesh holds api (it calls it) but never other.
        assert!(!http_get(m.web.admin, "/config_dump").unwrap().1.contains("other.local"));
    });
}
