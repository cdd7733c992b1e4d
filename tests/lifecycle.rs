//! A real `ferry` process's life: drain on SIGTERM under load, config reloads, start-up errors, admin endpoints.

use ferry_test_support as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::backend::{self, TestBody, full};
use support::{Ferry, http_get, http_request, service_yaml};
use tokio::net::TcpStream;

async fn h1(addr: std::net::SocketAddr) -> std::io::Result<http1::SendRequest<TestBody>> {
    let stream = TcpStream::connect(addr).await?;
    let (tx, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(tx)
}

async fn get(addr: std::net::SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
    let mut tx = h1(addr).await.unwrap();
    let resp = tx.send_request(Request::get(path).header("host", host).body(full("")).unwrap()).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    not_accepted: AtomicUsize,
}

/// Sends `/delay?ms=500` requests on keep-alive connections until the listener refuses connections
/// (or 30 s pass). A request that was sent and did not get its 200 is a failure.
async fn load_worker(addr: std::net::SocketAddr, tally: Arc<Tally>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(mut tx) = h1(addr).await else {
            tally.not_accepted.fetch_add(1, Ordering::SeqCst);
            return;
        };
        while tx.ready().await.is_ok() && Instant::now() < deadline {
            let req = Request::get("/delay?ms=500").header("host", "app").body(full("")).unwrap();
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    // RFC 9112 §9.6: after `Connection: close` a client sends nothing more on the connection (hyper's
                    // client can still report itself ready for a moment after such a response: not relied on).
                    let close =
                        resp.headers().get("connection").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                    if status == StatusCode::OK && body.as_deref().ok() == Some(&b"delayed"[..]) {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        eprintln!("bad answer: {status} {body:?}");
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                    }
                    if close {
                        break;
                    }
                }
                Err(mut e) => {
                    if e.take_message().is_some() {
                        tally.not_accepted.fetch_add(1, Ordering::SeqCst);
                    } else {
                        eprintln!("request failed after it was sent: {}", e.error());
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                    }
                    break;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_idle_at_sigterm_still_gets_its_next_request_answered() {
    // An HTTP/1 client may be sending its next request just as the drain starts: closing its idle connection at once
    // would lose that request. It is answered, with `Connection: close`.
    let app = backend::http_backend().await;
    let mut ferry = Ferry::start(None, &[("FERRY_APP_ADDR", &app.addr.to_string()), ("FERRY_DRAIN_SECONDS", "10")]);
    let mut tx = h1(ferry.inbound).await.expect("connected");
    let get = || Request::get("/").header("host", "app").body(full("")).unwrap();
    let first = tx.send_request(get()).await.expect("first answer");
    assert_eq!(first.status(), StatusCode::OK);
    let _ = first.into_body().collect().await;
    ferry.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = tx.send_request(get()).await.expect("the request sent during the drain is answered");
    assert_eq!(
        (second.status(), second.headers().get("connection").and_then(|v| v.to_str().ok())),
        (StatusCode::OK, Some("close"))
    );
    let exit = tokio::task::spawn_blocking(move || ferry.wait_exit(Duration::from_secs(15))).await.unwrap();
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_accepted_request() {
    let app = backend::http_backend().await;
    let mut ferry = Ferry::start(None, &[("FERRY_APP_ADDR", &app.addr.to_string()), ("FERRY_DRAIN_SECONDS", "10")]);
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..16).map(|_| tokio::spawn(load_worker(ferry.inbound, tally.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let before = tally.ok.load(Ordering::SeqCst);
    ferry.signal("TERM");
    let signalled = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = ferry.wait_exit(Duration::from_secs(15));
        (status, ferry)
    });
    for w in workers {
        w.await.unwrap();
    }
    let (status, ferry) = status.await.unwrap();
    let status =
        status.unwrap_or_else(|| panic!("ferry did not exit within the drain deadline; log:\n{}", ferry.logs()));
    let took = signalled.elapsed();
    let (ok, failed, refused) = (
        tally.ok.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
        tally.not_accepted.load(Ordering::SeqCst),
    );
    eprintln!(
        "ok {ok} (before SIGTERM {before}), failed {failed}, not accepted {refused}, exit {status:?} after {took:?}"
    );
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(failed, 0, "accepted requests failed during the drain");
    assert!(ok > before, "requests in flight at SIGTERM completed");
    assert!(took < Duration::from_secs(11), "exited after the 10 s drain deadline: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_inbound_keeps_outbound_and_finishes_in_flight() {
    let app = backend::http_backend().await;
    let mut ferry = Ferry::start(
        Some(&service_yaml("app", 80, &[app.addr])),
        &[("FERRY_APP_ADDR", &app.addr.to_string()), ("FERRY_DRAIN_SECONDS", "20")],
    );
    let inbound = ferry.inbound;
    let slow = tokio::spawn(async move { get(inbound, "app", "/delay?ms=3000").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    ferry.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http_get(ferry.health, "/health/ready").unwrap().0, 503, "not ready while draining");
    assert_eq!(http_get(ferry.health, "/health/live").unwrap().0, 200);
    assert!(TcpStream::connect(ferry.inbound).await.is_err(), "inbound listener closed");
    // The app may still call out while it shuts down.
    assert_eq!(get(ferry.outbound, "app", "/").await.0, StatusCode::OK);
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "delayed".to_string()));
    let status = tokio::task::spawn_blocking(move || ferry.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert!(status.expect("exits once nothing is in flight").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_keeps_connections_and_rejects_bad_files() {
    let app = backend::http_backend().await;
    let ferry = Ferry::start(Some(&service_yaml("alpha", 80, &[app.addr])), &[]);
    assert_eq!(get(ferry.outbound, "alpha", "/").await.0, StatusCode::OK);
    assert_eq!(get(ferry.outbound, "beta", "/").await.0, StatusCode::BAD_GATEWAY);

    // A keep-alive connection opened before any change must survive every change.
    let mut kept = h1(ferry.outbound).await.unwrap();
    let mut use_kept = async |host: &str| {
        kept.ready().await.expect("kept connection still open");
        kept.send_request(Request::get("/").header("host", host).body(full("")).unwrap()).await.unwrap().status()
    };
    assert_eq!(use_kept("alpha").await, StatusCode::OK);

    let both = format!("{}{}", service_yaml("alpha", 80, &[app.addr]), service_yaml("beta", 80, &[app.addr]));
    ferry.write_config(&both);
    wait_for(|| async { get(ferry.outbound, "beta", "/").await.0 == StatusCode::OK }).await;
    assert_eq!(use_kept("beta").await, StatusCode::OK);

    // Invalid content: reported with the field, old snapshot kept.
    ferry.write_config(
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: alpha}\nspec: {ports: [{port: 0}]}\n",
    );
    wait_for(|| async { ferry.metric(r#"ferry_config_updates_total{result="rejected",source="file"}"#) >= 1.0 }).await;
    assert_eq!(get(ferry.outbound, "beta", "/").await.0, StatusCode::OK);
    assert!(ferry.logs().contains("spec.ports[0].port: must be 1-65535"), "log names the field");
    let dump: serde_json::Value = serde_json::from_str(&http_get(ferry.admin, "/config_dump").unwrap().1).unwrap();
    assert_eq!(dump["snapshot"]["version"], 2);
    assert_eq!(dump["snapshot"]["services"].as_array().unwrap().len(), 2);

    // SIGHUP re-reads even when nothing changed on disk.
    ferry.write_config(&service_yaml("alpha", 80, &[app.addr]));
    wait_for(|| async { get(ferry.outbound, "beta", "/").await.0 == StatusCode::BAD_GATEWAY }).await;
    let applied = ferry.metric(r#"ferry_config_updates_total{result="applied",source="file"}"#);
    ferry.signal("HUP");
    wait_for(|| async { ferry.metric(r#"ferry_config_updates_total{result="applied",source="file"}"#) > applied })
        .await;
    assert_eq!(use_kept("alpha").await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_initial_config_is_not_started_until_fixed() {
    let app = backend::http_backend().await;
    let ferry = Ferry::spawn(
        Some("apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 99999}]}\n"),
        &[],
    );
    wait_for(|| async { http_get(ferry.health, "/health/live").map(|r| r.0) == Some(200) }).await;
    assert_eq!(http_get(ferry.health, "/health/startup").unwrap().0, 503);
    assert_eq!(http_get(ferry.health, "/health/ready").unwrap().0, 503);
    ferry.write_config(&service_yaml("a", 80, &[app.addr]));
    ferry.wait_ready();
    assert_eq!(http_get(ferry.health, "/health/startup").unwrap().0, 200);
    assert_eq!(get(ferry.outbound, "a", "/").await.0, StatusCode::OK);
}

#[test]
fn bad_settings_stop_startup_naming_the_variable() {
    let cases = [
        ("FERRY_WORKERS", "zero"),
        ("FERRY_DRAIN_SECONDS", "-1"),
        ("FERRY_DETECT_TIMEOUT", "10"),
        ("FERRY_INBOUND_ADDR", "0.0.0.0"),
        ("FERRY_LOG_FORMAT", "yaml"),
    ];
    for (var, value) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry")).env(var, value).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} must stop start-up");
        assert!(stderr.contains(var), "{var}={value}: stderr does not name it: {stderr}");
    }
    // A taken IPv4 listener address is fatal and named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env("FERRY_OUTBOUND_ADDR", &addr)
        .env("FERRY_INBOUND_ADDR", format!("127.0.0.1:{}", support::free_port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FERRY_OUTBOUND_ADDR"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let mut ferry = Ferry::start(None, &[]);
    let (status, body) = http_get(ferry.admin, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["bootstrap"]["outbound_addrs"][0], ferry.outbound.to_string());
    assert_eq!(dump["bootstrap"]["drain"], "25s");
    assert_eq!(dump["snapshot"]["source"], "none");
    assert_eq!(http_request(ferry.admin, "PUT", "/log_level", "debug").unwrap().0, 200);
    let (status, body) = http_request(ferry.admin, "PUT", "/log_level", "ferry=loudest").unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(http_request(ferry.admin, "GET", "/shutdown", "").unwrap().0, 405);
    let metrics = ferry.metrics();
    for name in ["ferry_build_info", "process_resident_memory_bytes", "ferry_tcp_connections_opened_total"] {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert_eq!(http_request(ferry.admin, "POST", "/shutdown", "").unwrap().0, 202);
    let status = tokio::task::spawn_blocking(move || ferry.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert!(status.expect("exits after POST /shutdown").success());
}

/// Polls `check` every 50 ms for up to 10 s.
async fn wait_for<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within 10 s");
}
