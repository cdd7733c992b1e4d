//! The local demo mesh: ferry-control plus sample services behind Ferry sidecars on loopback, configured over
//! xDS, every hop between sidecars mTLS with identities from ferry-control's CA; an AuthorizationPolicy that lets
//! `web` call `api` and refuses a third workload; a short load during which `ferryctl apply` changes routing; a flaky
//! service made reliable by a retry policy, and its circuit breaker tripping and recovering; a report.
//!
//! Run: `cargo run --release --example demo` (builds `ferry`, `ferry-control` and `ferryctl` first; `FERRY_BIN`,
//! `FERRY_CONTROL_BIN` and `FERRYCTL_BIN` override them). With `-- --prometheus`, it then starts Prometheus (Debian's
//! `prometheus`) scraping every sidecar and the control plane, for the dashboards in `deploy/grafana/`, and keeps the
//! mesh up until Enter.
//!
//! ```text
//! load ──► sidecar(web) inbound ──► web app ──► sidecar(web) outbound ──► sidecar(api) inbound ──► api app
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};

// Free ports as the tests pick them (below the ephemeral range); the demo is an example of this package, whose
// dev-dependencies it shares.
use ferry_test_support::free_addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const REQUESTS: usize = 300;
const CONCURRENCY: usize = 8;

/// A sidecar process and its addresses.
struct Sidecar {
    name: &'static str,
    child: Child,
    outbound: SocketAddr,
    inbound: SocketAddr,
    health: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary of this workspace: `$env_var` when set (tests), else built now with cargo (release).
fn binary(name: &str, package: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env_var) {
        return Ok(bin.into());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building {name} (cargo build --release -p {package} --bin {name}) ...");
    let status = Command::new(&cargo).args(["build", "--release", "-p", package, "--bin", name, "--quiet"]).status()?;
    anyhow::ensure!(status.success(), "building {name} failed");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join(name))
}

/// The demo's services and policies, applied to the control plane with ferryctl.
const POLICIES: &str = "\
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: api, namespace: default}
spec: {ports: [{port: 80, protocol: http}], addresses: [api.demo.local], identities: [api]}
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: web, namespace: default}
spec: {ports: [{port: 80, protocol: http}], addresses: [web.demo.local], identities: [web]}
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: quotes, namespace: default}
spec: {ports: [{port: 80, protocol: http}], addresses: [quotes.demo.local], identities: [quotes]}
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: default}
spec:
  targetRef: {kind: Service, name: api}
  timeout: 2s
  retries: {attempts: 2, perTryTimeout: 500ms, on: [connect-failure, gateway-error], budget: {percent: 20, minPerSecond: 10}}
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api, namespace: default}
spec:
  targetRef: {kind: Service, name: api}
  defaultAction: deny
  allow: [{from: {identities: [\"spiffe://cluster.local/ns/default/sa/web\"]}}]
";

/// The canary of `api`: its own Service, and the HTTPRoute that splits api's traffic (weights W1/W2 filled in).
const CANARY_SERVICE: &str = "\
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: api-v2, namespace: default}
spec: {ports: [{port: 80, protocol: http}], addresses: [api-v2.demo.local], identities: [api-v2]}
";
const CANARY_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-canary, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: api}]
  rules: [{backendRefs: [{name: api, weight: W1}, {name: api-v2, weight: W2}]}]
";

/// After the shift: a header routes to api-v2, everything else goes to api and is mirrored to api-v2 (shadow traffic).
const HEADER_AND_MIRROR_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-canary, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: api}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: api-v2}]
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api-v2, port: 80}}}]
    backendRefs: [{name: api}]
";

/// Applied to the flaky `quotes` service during the demo: two retries on gateway errors, and a breaker that opens
/// after 5 failures in a row for 2 s.
const QUOTES_POLICY: &str = "\
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: quotes, namespace: default}
spec:
  targetRef: {kind: Service, name: quotes}
  retries: {attempts: 2, on: [gateway-error], backoff: {base: 5ms, max: 50ms}}
  circuitBreaker: {consecutiveFailures: 5, openFor: 2s, halfOpenRequests: 1}
";

/// Then a rate limit on quotes, enforced by quotes' own sidecar.
const QUOTES_RATE_LIMIT: &str = "  rateLimit: {requestsPerSecond: 5, burst: 5}\n";

/// The quotes app: every 5th answer is a 503; while `down`, every answer is.
#[derive(Default)]
struct Flaky {
    answered: std::sync::atomic::AtomicUsize,
    down: std::sync::atomic::AtomicBool,
}

/// Sends `n` GETs for `host` through `proxy`, one after another: (ok, failed, the distinct failure bodies).
async fn run(proxy: SocketAddr, host: &str, n: usize) -> anyhow::Result<(usize, usize, Vec<String>)> {
    let (mut ok, mut failed, mut reasons) = (0, 0, Vec::new());
    for _ in 0..n {
        let (status, body) = get(proxy, host, "/").await?;
        if status == StatusCode::OK {
            ok += 1;
        } else {
            failed += 1;
            let reason = format!("{status} {}", String::from_utf8_lossy(&body).split(':').next().unwrap_or("").trim());
            if !reasons.contains(&reason) {
                reasons.push(reason);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((ok, failed, reasons))
}

/// One series of a sidecar's /metrics (0 when absent).
async fn metric(s: &Sidecar, series: &str) -> anyhow::Result<f64> {
    let (_, metrics) = get(s.health, "localhost", "/metrics").await?;
    Ok(String::from_utf8_lossy(&metrics)
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0))
}

/// The running control plane and what ferryctl needs to reach it.
struct ControlPlane {
    child: Child,
    ctl: PathBuf,
    api: SocketAddr,
    xds: SocketAddr,
    metrics: SocketAddr,
    state: PathBuf,
    token: String,
}

impl ControlPlane {
    /// Starts ferry-control on free loopback ports (its xDS port serves TLS with a certificate from its own CA).
    fn start(dir: &std::path::Path) -> anyhow::Result<ControlPlane> {
        let (control, ctl) = (
            binary("ferry-control", "ferry-control", "FERRY_CONTROL_BIN")?,
            binary("ferryctl", "ferryctl", "FERRYCTL_BIN")?,
        );
        let (api, xds, metrics) = (free_addr(), free_addr(), free_addr());
        let state = dir.join("control-state");
        let log = std::fs::File::create(dir.join("ferry-control.log"))?;
        let child = Command::new(&control)
            .args(["serve", "--state-dir", &state.display().to_string(), "--api-addr", &api.to_string()])
            .args(["--xds-addr", &xds.to_string(), "--metrics-addr", &metrics.to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(api).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "ferry-control did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let token = std::fs::read_to_string(state.join("admin.token"))?.trim().to_string();
        Ok(ControlPlane { child, ctl, api, xds, metrics, state, token })
    }

    /// Runs `ferryctl ARGS`, echoing the command and (when `show`) its output.
    fn ctl(&self, args: &[&str], show: bool) -> anyhow::Result<String> {
        let out = Command::new(&self.ctl)
            .args(args)
            .env("FERRY_TOKEN", &self.token)
            .env("FERRY_CONTROL_API", format!("http://{}", self.api))
            .output()?;
        anyhow::ensure!(out.status.success(), "ferryctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if show {
            println!("$ ferryctl {}", args.join(" "));
            print!("{stdout}");
        }
        Ok(stdout)
    }
}

fn start_sidecar(
    bin: &std::path::Path,
    name: &'static str,
    control: &ControlPlane,
    app: Option<SocketAddr>,
    logs: &std::path::Path,
) -> anyhow::Result<Sidecar> {
    // Each sidecar's bootstrap credential: a join token bound to its identity (default/<name>).
    let join_token = control.ctl(&["token", "create", "--namespace", "default", "--service-account", name], false)?;
    spawn_sidecar(bin, name, control, app, join_token.trim(), logs)
}

/// A sidecar with a join token the control plane never issued (its certificate request is refused).
fn start_sidecar_with_token(
    bin: &std::path::Path,
    name: &'static str,
    control: &ControlPlane,
    join_token: &str,
    logs: &std::path::Path,
) -> anyhow::Result<Sidecar> {
    spawn_sidecar(bin, name, control, None, join_token, logs)
}

fn spawn_sidecar(
    bin: &std::path::Path,
    name: &'static str,
    control: &ControlPlane,
    app: Option<SocketAddr>,
    join_token: &str,
    logs: &std::path::Path,
) -> anyhow::Result<Sidecar> {
    // A port that was free when picked can be taken before the sidecar binds it (as the source port of some other
    // connection): start again on new ports, a few times.
    for _ in 0..3 {
        let mut sidecar = spawn_sidecar_once(bin, name, control, app, join_token, logs)?;
        let started = Instant::now();
        // The health listener is bound last: once it accepts, every port is the sidecar's.
        while started.elapsed() < Duration::from_secs(5) && sidecar.child.try_wait()?.is_none() {
            if std::net::TcpStream::connect(sidecar.health).is_ok() {
                return Ok(sidecar);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
        if sidecar.child.try_wait()?.is_some() && log.contains("Address already in use") {
            continue;
        }
        return Ok(sidecar);
    }
    anyhow::bail!("sidecar {name} could not bind its ports three times in a row")
}

fn spawn_sidecar_once(
    bin: &std::path::Path,
    name: &'static str,
    control: &ControlPlane,
    app: Option<SocketAddr>,
    join_token: &str,
    logs: &std::path::Path,
) -> anyhow::Result<Sidecar> {
    let (outbound, inbound, admin, health) = (free_addr(), free_addr(), free_addr(), free_addr());
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let mut command = Command::new(bin);
    // A sidecar with an app registers it as the endpoint of its Service; one without only calls out.
    if let Some(app) = app {
        command.env("FERRY_SERVICE", name).env("FERRY_APP_ADDR", app.to_string());
    }
    let child = command
        .env("FERRY_OUTBOUND_ADDR", outbound.to_string())
        .env("FERRY_INBOUND_ADDR", inbound.to_string())
        .env("FERRY_ADMIN_ADDR", admin.to_string())
        .env("FERRY_HEALTH_ADDR", health.to_string())
        .env("FERRY_CONTROL_ADDR", control.xds.to_string())
        .env("FERRY_CA_ROOT", control.state.join("ca.crt"))
        .env("FERRY_JOIN_TOKEN", join_token)
        .env("FERRY_NODE_ID", name)
        .env("FERRY_WORKERS", "1")
        .env("FERRY_LOG_FORMAT", "json")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(Sidecar { name, child, outbound, inbound, health })
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    get_with(addr, host, path, &[]).await
}

async fn get_with(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", host);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = tx.send_request(req.body(Full::<Bytes>::default())?).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// A loopback port for a sample app, bound now (a port only picked could be taken before the app binds it).
fn app_listener() -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Serves `handler` on `listener` (a sample app).
async fn serve<F, Fut>(listener: std::net::TcpListener, handler: F) -> anyhow::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send,
{
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(())
}

async fn wait_ready(s: &Sidecar) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((StatusCode::OK, _)) = get(s.health, "localhost", "/health/ready").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("sidecar {} not ready", s.name)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = binary("ferry", "ferry", "FERRY_BIN")?;
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut control = ControlPlane::start(&dir)?;
    let policies = dir.join("policies.yaml");
    std::fs::write(&policies, POLICIES)?;
    control.ctl(&["apply", "-f", policies.to_str().unwrap()], true)?;
    control.ctl(&["get", "services"], true)?;
    let ((web_listener, web_app), (api_listener, api_app)) = (app_listener()?, app_listener()?);

    // Both sidecars connect to ferry-control over xDS; each registers its inbound address as an endpoint of its
    // Service (the Service lists the sidecar's identity), and receives every Service with its endpoints.
    let api = start_sidecar(&bin, "api", &control, Some(api_app), &dir)?;
    let web = start_sidecar(&bin, "web", &control, Some(web_app), &dir)?;
    // A third workload with no app of its own: the AuthorizationPolicy on api does not list it.
    let batch = start_sidecar(&bin, "batch", &control, None, &dir)?;
    // A flaky service.
    let (quotes_listener, quotes_app) = app_listener()?;
    let quotes = start_sidecar(&bin, "quotes", &control, Some(quotes_app), &dir)?;
    let flaky = Arc::new(Flaky::default());
    let state = flaky.clone();
    serve(quotes_listener, move |_req| {
        let state = state.clone();
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            let n = state.answered.fetch_add(1, SeqCst);
            let mut r = Response::new(Full::new(Bytes::from_static(b"quote of the day\n")));
            if state.down.load(SeqCst) || n % 5 == 4 {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
    })
    .await?;

    // The sample apps: api answers with JSON, naming the caller its sidecar verified (ferry-client-id); web calls
    // api through its own sidecar (explicit outbound).
    serve(api_listener, |req| async move {
        let caller = req.headers().get("ferry-client-id").and_then(|v| v.to_str().ok()).unwrap_or("unknown");
        Response::new(Full::new(Bytes::from(format!(r#"{{"price": 42, "currency": "EUR", "caller": "{caller}"}}"#))))
    })
    .await?;
    let web_outbound = web.outbound;
    serve(web_listener, move |_req| async move {
        match get(web_outbound, "api", "/price").await {
            Ok((status, body)) if status.is_success() => {
                Response::new(Full::new(Bytes::from(format!("web got from api: {}", String::from_utf8_lossy(&body)))))
            }
            other => {
                // Pass the api's (or the proxy's) error status on; the body says which hop failed.
                let status = other.map(|(s, _)| s).unwrap_or(StatusCode::BAD_GATEWAY);
                let mut r = Response::new(Full::new(Bytes::from_static(b"api call failed")));
                *r.status_mut() = status;
                r
            }
        }
    })
    .await?;
    wait_ready(&api).await?;
    wait_ready(&web).await?;
    wait_ready(&batch).await?;
    wait_ready(&quotes).await?;
    println!(
        "mesh up: web app {web_app} + sidecar (inbound {}), api app {api_app} + sidecar (inbound {})",
        web.inbound, api.inbound
    );
    control.ctl(&["status"], true)?;
    // Endpoint registrations reach web's sidecar a moment after api's sidecar connects.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = get(web.inbound, "web", "/").await?;
        if status == StatusCode::OK || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("one request: {status} {}", String::from_utf8_lossy(&body));
    // Identity-based authorization: the AuthorizationPolicy on api allows only web's identity.
    let (status, body) = get(batch.outbound, "api", "/price").await?;
    println!(
        "batch -> api (AuthorizationPolicy api allows only spiffe://cluster.local/ns/default/sa/web): {status} {}",
        String::from_utf8_lossy(&body).trim()
    );
    anyhow::ensure!(status == StatusCode::FORBIDDEN, "the AuthorizationPolicy must refuse batch");

    // A short load: REQUESTS requests, CONCURRENCY at a time, through both sidecars.
    let latencies = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(REQUESTS)));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let (latencies, failures, target) = (latencies.clone(), failures.clone(), web.inbound);
        tasks.push(tokio::spawn(async move {
            for _ in (w..REQUESTS).step_by(CONCURRENCY) {
                let t = Instant::now();
                match get(target, "web", "/").await {
                    Ok((StatusCode::OK, _)) => latencies.lock().await.push(t.elapsed()),
                    _ => {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                // Paced, so that the routing change below happens while requests flow.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // While the load runs: a routing change with ferryctl apply. The new name routes once the sidecars have it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, _) = get(web.outbound, "prices.demo.local", "/price").await?;
    let change = dir.join("change.yaml");
    std::fs::write(
        &change,
        POLICIES.replacen("addresses: [api.demo.local]", "addresses: [api.demo.local, prices.demo.local]", 1),
    )?;
    let applied = Instant::now();
    control.ctl(&["apply", "-f", change.to_str().unwrap()], true)?;
    let after = loop {
        let (status, _) = get(web.outbound, "prices.demo.local", "/price").await?;
        if status == StatusCode::OK || applied.elapsed() > Duration::from_secs(10) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "routing change under load: prices.demo.local answered {before} before the apply, {after} {:.0?} after it started",
        applied.elapsed()
    );
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();
    let mut lat = latencies.lock().await.clone();
    lat.sort();
    let failed = failures.load(std::sync::atomic::Ordering::Relaxed);
    println!("\nload: {REQUESTS} requests, {CONCURRENCY} concurrent, {elapsed:.2?}: {} ok, {failed} failed", lat.len());
    if !lat.is_empty() {
        println!(
            "latency (two sidecar hops, new connection per request): p50 {:.2?}  p90 {:.2?}  p99 {:.2?}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99)
        );
    }

    // Resilience: the quotes app fails every 5th request. Without a policy, web's sidecar retries only what cannot have
    // reached the app (connect failures, refused streams, resets): the app's 503s reach the caller.
    let (reliable, breaker_ok) = {
        println!("\nquotes: its app answers every 5th request with 503");
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(web.outbound, "quotes.demo.local", "/").await?.0 != StatusCode::OK && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (ok, failed, reasons) = run(web.outbound, "quotes.demo.local", 100).await?;
        println!("quotes without a retry policy: {ok} ok, {failed} failed {reasons:?}");
        let acked = r#"ferry_xds_updates_total{result="ack",type="TrafficPolicy"} "#;
        let before = metric(&web, acked).await?;
        let policy = dir.join("quotes-policy.yaml");
        std::fs::write(&policy, QUOTES_POLICY)?;
        control.ctl(&["apply", "-f", policy.to_str().unwrap()], true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&web, acked).await? <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let retries = r#"ferry_retries_total{result="attempted",service="quotes.default"} "#;
        let retried_before = metric(&web, retries).await?;
        let (ok, failed, reasons) = run(web.outbound, "quotes.demo.local", 100).await?;
        let retried = metric(&web, retries).await? - retried_before;
        println!(
            "quotes with retries (2 on gateway-error): {ok} ok, {failed} failed {reasons:?}; web's sidecar retried {retried} times"
        );
        let reliable = failed == 0;

        // The app goes down: the breaker opens after 5 failures in a row and fails fast; the app sees no attempts.
        flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let (_, failed, reasons) = run(web.outbound, "quotes.demo.local", 10).await?;
        let seen = flaky.answered.load(std::sync::atomic::Ordering::SeqCst);
        let (_, more, _) = run(web.outbound, "quotes.demo.local", 10).await?;
        let reached = flaky.answered.load(std::sync::atomic::Ordering::SeqCst) - seen;
        println!(
            "quotes down: {failed} of 10 failed {reasons:?}; 10 more failed ({more}) with {reached} reaching the app: the breaker is open"
        );
        // It recovers: after openFor a probe goes through, succeeds, and the breaker closes.
        flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let (ok, failed, _) = run(web.outbound, "quotes.demo.local", 3).await?;
        let mut transitions = Vec::new();
        for to in ["open", "half-open", "closed"] {
            let series = format!(r#"ferry_circuit_breaker_transitions_total{{service="quotes.default",to="{to}"}} "#);
            transitions.push(format!("{to} {}", metric(&web, &series).await?));
        }
        println!("quotes back: {ok} ok, {failed} failed; breaker transitions: {}", transitions.join(", "));
        (reliable, reached == 0 && transitions.iter().all(|t| !t.ends_with(" 0")))
    };

    // Rate limiting: quotes' own sidecar admits 5 requests per second (burst 5); a burst of 30 gets 429s.
    let acked = r#"ferry_xds_updates_total{result="ack",type="TrafficPolicy"} "#;
    let policy = dir.join("quotes-policy.yaml");
    let before = metric(&quotes, acked).await?;
    std::fs::write(&policy, format!("{QUOTES_POLICY}{QUOTES_RATE_LIMIT}"))?;
    control.ctl(&["apply", "-f", policy.to_str().unwrap()], true)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&quotes, acked).await? <= before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut limited = 0;
    for _ in 0..30 {
        limited += usize::from(get(web.outbound, "quotes.demo.local", "/").await?.0 == StatusCode::TOO_MANY_REQUESTS);
    }
    println!("quotes rate limit (5/s, burst 5): {limited} of a burst of 30 answered 429 Too Many Requests");

    // A canary: api-v2 is its own Service (own sidecar, identity, endpoints); an HTTPRoute on api shifts its traffic
    // 90/10 -> 50/50 -> 0/100 with ferryctl apply while web keeps calling api.
    let (canary_failed, api_v2) = {
        println!("\ncanary: api-v2 next to api, traffic shifted by an HTTPRoute (Gateway API) under load");
        let service = dir.join("api-v2.yaml");
        std::fs::write(&service, CANARY_SERVICE)?;
        control.ctl(&["apply", "-f", service.to_str().unwrap()], true)?;
        let (v2_listener, v2_app) = app_listener()?;
        let api_v2 = start_sidecar(&bin, "api-v2", &control, Some(v2_app), &dir)?;
        serve(v2_listener, |_req| async move {
            Response::new(Full::new(Bytes::from_static(br#"{"price": 40, "currency": "EUR", "version": "v2"}"#)))
        })
        .await?;
        wait_ready(&api_v2).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(web.outbound, "api-v2.demo.local", "/price").await?.0 != StatusCode::OK && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Constant load through web's sidecar for the whole shift.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let (stop, target) = (stop.clone(), web.outbound);
            tokio::spawn(async move {
                let (mut sent, mut failed) = (0usize, 0usize);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 20_000 {
                    sent += 1;
                    if !matches!(get(target, "api.demo.local", "/price").await, Ok((StatusCode::OK, _))) {
                        failed += 1;
                    }
                }
                (sent, failed)
            })
        };
        let acked = r#"ferry_xds_updates_total{result="ack",type="RouteSet"} "#;
        let route = dir.join("canary-route.yaml");
        for (w1, w2) in [(90, 10), (50, 50), (0, 100)] {
            let before = metric(&web, acked).await?;
            std::fs::write(&route, CANARY_ROUTE.replace("W1", &w1.to_string()).replace("W2", &w2.to_string()))?;
            control.ctl(&["apply", "-f", route.to_str().unwrap()], false)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while metric(&web, acked).await? <= before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (mut v1, mut v2, mut failed) = (0, 0, 0);
            for _ in 0..200 {
                match get(web.outbound, "api.demo.local", "/price").await? {
                    (StatusCode::OK, body) if body.windows(4).any(|w| w == b"\"v2\"") => v2 += 1,
                    (StatusCode::OK, _) => v1 += 1,
                    _ => failed += 1,
                }
            }
            println!("canary weights {w1}/{w2}: of 200 requests api answered {v1}, api-v2 {v2}, {failed} failed");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, failed) = load.await?;
        println!("canary shift under load: {sent} requests during the shift, {failed} failed");

        // Then a header picks the version, and api's traffic is mirrored to api-v2 (its answers dropped).
        let before = metric(&web, acked).await?;
        std::fs::write(&route, HEADER_AND_MIRROR_ROUTE)?;
        control.ctl(&["apply", "-f", route.to_str().unwrap()], true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&web, acked).await? <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, body) = get_with(web.outbound, "api.demo.local", "/price", &[("x-version", "v2")]).await?;
        println!("GET api /price with x-version: v2 -> {status} {}", String::from_utf8_lossy(&body));
        let mirrored =
            r#"ferry_request_mirrors_total{mirror="api-v2.default",outcome="mirrored",route="default/api-canary/1"} "#;
        let (status, body) = get(web.outbound, "api.demo.local", "/price").await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&web, mirrored).await? < 1.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, text) = get(web.health, "localhost", "/metrics").await?;
        for line in String::from_utf8_lossy(&text).lines().filter(|l| l.starts_with("ferry_request_mirrors_total")) {
            println!("web  {line}");
        }
        println!(
            "GET api /price -> {status} {} (api), and a copy to api-v2: mirrored copies {}",
            String::from_utf8_lossy(&body),
            metric(&web, mirrored).await?
        );
        (failed, api_v2)
    };

    // A workload with a join token the control plane never issued: its certificate request is refused.
    let mut intruder = start_sidecar_with_token(&bin, "intruder", &control, "not-a-token", &dir)?;
    let refused = "ferry_control_certificate_requests_refused_total";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refusals = 0.0;
    while refusals < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, text) = get(control.metrics, "localhost", "/metrics").await?;
        refusals = String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.starts_with(refused))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
    }
    let _ = intruder.child.kill();
    let _ = intruder.child.wait();
    println!("a proxy with an unknown join token: {refusals} certificate request(s) refused ({refused})");

    println!("\nwhat the sidecars counted (their /metrics):");
    for s in [&web, &api] {
        let (_, metrics) = get(s.health, "localhost", "/metrics").await?;
        for line in String::from_utf8_lossy(&metrics).lines() {
            let interesting = [
                "ferry_requests_total",
                "ferry_proxy_errors_total",
                "ferry_tls_handshakes_total",
                "ferry_authz_decisions_total",
                "ferry_retries_total",
                "ferry_circuit_breaker_transitions_total",
            ]
            .iter()
            .any(|m| line.starts_with(m));
            if interesting && !line.ends_with(" 0") {
                println!("  {:<4} {line}", s.name);
            }
        }
    }

    println!();
    control.ctl(&["status"], true)?;
    control.ctl(&["check"], true)?;

    // The scrape targets of every sidecar and the control plane (Prometheus file_sd format), for `--prometheus` and
    // the dashboard test (FERRY_DEMO_HOLD: wait until told to go on).
    let proxies: Vec<String> = [&web, &api, &api_v2, &quotes, &batch].iter().map(|s| s.health.to_string()).collect();
    let targets = serde_json::json!([
        {"targets": proxies, "labels": {"job": "ferry-proxy"}},
        {"targets": [control.metrics.to_string()], "labels": {"job": "ferry-control"}},
    ]);
    if std::env::args().any(|a| a == "--prometheus") {
        let file = dir.join("targets.json");
        std::fs::write(&file, targets.to_string())?;
        let port = free_addr().port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 5s}}\nscrape_configs:\n  - job_name: ferry\n    file_sd_configs: [{{files: [\"{}\"]}}]\n",
                file.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let mut prometheus = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting prometheus (Debian package `prometheus`): {e}"))?;
        println!(
            "\nPrometheus: http://127.0.0.1:{port} scraping the 5 sidecars and ferry-control every 5 s.\n\
             Point Grafana at it and import deploy/grafana/*.json. Press Enter to stop the mesh."
        );
        let mut line = String::new();
        tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await??;
        let _ = prometheus.kill();
        let _ = prometheus.wait();
    }
    if let Some(hold) = std::env::var_os("FERRY_DEMO_HOLD").map(PathBuf::from) {
        let info = serde_json::json!({"api": control.api.to_string(), "token": control.token});
        std::fs::write(hold.join("control.json"), info.to_string())?;
        std::fs::write(hold.join("targets.json.tmp"), targets.to_string())?;
        std::fs::rename(hold.join("targets.json.tmp"), hold.join("targets.json"))?;
        println!("\nholding for the dashboard test (until {} exists)", hold.join("done").display());
        // A light load through api's route meanwhile (20/s, at most 6,000), so the panels show live rates.
        let target = web.outbound;
        let load = tokio::spawn(async move {
            for _ in 0..6_000 {
                let _ = get(target, "api.demo.local", "/price").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        while !hold.join("done").exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        load.abort();
    }
    drop(api_v2);

    drop(batch);
    drop(quotes);
    println!("\nSIGTERM to both sidecars: they drain and exit");
    let mut sidecars = vec![web, api];
    for s in &sidecars {
        Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status()?;
    }
    for s in &mut sidecars {
        let status = s.child.wait()?;
        println!("  {} exited: {status}", s.name);
    }
    let _ = control.child.kill();
    let _ = control.child.wait();
    println!("\nlogs (one JSON access-log line per request): {}", dir.display());
    println!(
        "\nThis demo used explicit mode: the web app called its sidecar at {web_outbound} with `Host: api`.\n\
         In a pod, `ferry init` adds iptables rules instead (transparent mode): the app calls api's address as it\n\
         would without a mesh, and both sidecars see the call by its original destination. That needs root and\n\
         network namespaces; `cargo test --test interception -- --nocapture` (as root) shows it end to end."
    );
    anyhow::ensure!(failed == 0, "{failed} requests failed");
    anyhow::ensure!(canary_failed == 0, "{canary_failed} requests failed during the canary shift");
    anyhow::ensure!(reliable, "the retry policy must make quotes reliable");
    anyhow::ensure!(breaker_ok, "the breaker must open, fail fast and close again");
    Ok(())
}
