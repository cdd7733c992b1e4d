//! Control-plane scale benchmark: one real `ferry-control` (100 Services x 10 endpoints) and N simulated proxies, each
//! a real delta-xDS client on its own TLS connection, subscribed as a proxy is — on demand: each calls 10 Services
//! (by host alias; Service 0 is called by 1 % of the proxies, Service 1 by all of them), decoding and validating
//! every resource and ACKing. Reports control-plane RSS per connected proxy and apply-to-last-ACK time over
//! `ferryctl apply`s of (a) a change to the Service 1 % of the proxies call and (b) one to the Service all call.
//! `--proxy-rss 100,1000,10000 --ferry-bin PATH`: instead, one real proxy (`ferry`) calling 10 Services of a mesh of
//! that many, its VmRSS on demand and with `FERRY_ON_DEMAND=off`.
//!
//! Run: `benches/xds_scale.sh` (or `cargo bench --bench xds_scale -- --proxies 1000,10000 --control-bin PATH
//! --ctl-bin PATH`). Traffic stays on 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ferry_api::Document;
use ferry_api::protocol::{self, Received, TYPES};
use ferry_api::resources::pb;
use ferry_test_support::free_addr;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The fixed config of the issue; `XDS_SCALE_SERVICES` changes it only to look at where memory goes.
static SERVICES_OVERRIDE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
fn services() -> usize {
    *SERVICES_OVERRIDE
        .get_or_init(|| std::env::var("XDS_SCALE_SERVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(100))
}
const ENDPOINTS: usize = 10;
/// Connections opened at once while the simulated proxies join.
const CONNECT_BATCH: usize = 100;

struct Args {
    proxies: Vec<usize>,
    applies: usize,
    control_bin: PathBuf,
    ctl_bin: PathBuf,
    out: PathBuf,
    /// Mesh sizes (Services) for the proxy RSS measurement; empty: the control-plane benchmark.
    proxy_rss: Vec<usize>,
    ferry_bin: PathBuf,
}

/// Services each simulated proxy calls.
const CALLED: usize = 10;

/// The Services proxy `id` of `n` calls (by index): Service 0 if it is one of the 1 % (every 100th), Service 1
/// always, and the rest spread over the others.
fn called(id: usize) -> Vec<usize> {
    let mut out = vec![1];
    if id.is_multiple_of(100) {
        out.push(0);
    }
    let mut k = 0;
    while out.len() < CALLED {
        let s = 2 + (id * 7 + k * 13) % (services() - 2);
        if !out.contains(&s) {
            out.push(s);
        }
        k += 1;
    }
    out
}

fn args() -> Args {
    let mut a = Args {
        proxies: vec![1000, 10000],
        applies: 10,
        control_bin: "target/release/ferry-control".into(),
        ctl_bin: "target/release/ferryctl".into(),
        out: "target/bench/xds_scale.json".into(),
        proxy_rss: Vec::new(),
        ferry_bin: "target/release/ferry".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--proxies" => a.proxies = value().split(',').map(|n| n.parse().expect("--proxies N,M")).collect(),
            "--applies" => a.applies = value().parse().expect("--applies N"),
            "--control-bin" => a.control_bin = value().into(),
            "--ctl-bin" => a.ctl_bin = value().into(),
            "--out" => a.out = value().into(),
            "--proxy-rss" => a.proxy_rss = value().split(',').map(|n| n.parse().expect("--proxy-rss N,M")).collect(),
            "--ferry-bin" => a.ferry_bin = value().into(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of a process (`self` for this one), from /proc (100 ticks per second on Linux).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The fixed config: 100 Services with ENDPOINTS static endpoints each, in namespace `bench`.
fn config(extra: Option<(usize, &str)>) -> String {
    mesh_config(0..services(), None, extra)
}

/// Services `range`, each with ENDPOINTS endpoints (or the one plaintext `backend`), `extra` adding an address.
fn mesh_config(range: std::ops::Range<usize>, backend: Option<SocketAddr>, extra: Option<(usize, &str)>) -> String {
    let mut out = String::new();
    for s in range {
        let endpoints: Vec<String> = match backend {
            Some(addr) => vec![format!("{{address: \"{addr}\"}}")],
            None => (0..ENDPOINTS)
                .map(|e| format!("{{address: \"10.{}.{}.{e}:8080\", identity: svc-{s}}}", 1 + s / 256, s % 256))
                .collect(),
        };
        let mut addresses = vec![format!("svc-{s}.bench.local")];
        if let Some((i, name)) = extra
            && i == s
        {
            addresses.push(name.to_string());
        }
        out.push_str(&format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: bench}}\nspec:\n  ports: [{{port: 8080, protocol: http}}]\n  addresses: [{}]\n  identities: [svc-{s}]\n  endpoints: [{}]\n---\n",
            addresses.join(", "),
            endpoints.join(", ")
        ));
    }
    out
}

struct ControlPlane {
    child: Child,
    xds: SocketAddr,
    state: PathBuf,
    ctl: Ferryctl,
}

/// `ferryctl` pointed at one control plane with its admin token (cheap to clone into a blocking task).
#[derive(Clone)]
struct Ferryctl {
    bin: PathBuf,
    api: SocketAddr,
    token: String,
}

impl Ferryctl {
    /// Runs `ferryctl ARGS` as a process (as an operator would), feeding `stdin`; returns its stdout.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("FERRY_TOKEN", &self.token)
            .env("FERRY_CONTROL_API", format!("http://{}", self.api))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "ferryctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl ControlPlane {
    fn start(bin: &Path, ctl: &Path, tag: &str) -> ControlPlane {
        let state = std::env::temp_dir().join(format!("ferry-xds-scale-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let (api, xds, metrics) = (free_addr(), free_addr(), free_addr());
        // One fd per proxy connection: raise the soft limit for the control plane (the hard limit allows it here).
        let script = format!(
            "ulimit -n $(ulimit -Hn); exec {} serve --state-dir {} --api-addr {api} --xds-addr {xds} --metrics-addr {metrics}",
            bin.display(),
            state.display()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .env("FERRY_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ferry-control");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(api).is_err() {
            assert!(Instant::now() < deadline, "ferry-control did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let token = std::fs::read_to_string(state.join("admin.token")).unwrap().trim().to_string();
        ControlPlane { child, xds, state, ctl: Ferryctl { bin: ctl.to_path_buf(), api, token } }
    }

    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.ctl.run(args, stdin)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// What the simulated proxies report back.
#[derive(Default)]
struct Shared {
    /// Proxies that have received, validated and ACKed all of the fixed config.
    synced: AtomicUsize,
    /// The address marking the current apply; a proxy ACKing a Service that carries it counts once.
    marker: Mutex<String>,
    marker_id: AtomicU64,
    acked_current: AtomicUsize,
    ack_times: Mutex<Vec<Instant>>,
    resources_decoded: AtomicU64,
    errors: AtomicUsize,
    /// Per type (`TYPES` order): proxies that have had their first response of it (what a stall waits for).
    first_of_type: [AtomicUsize; TYPES.len()],
}

/// One simulated proxy's own workload certificate, as a real proxy gets it: a fresh key, a CSR with the join token.
async fn certificate(xds: &str, tls: &ClientTlsConfig, token: &str) -> Result<ClientTlsConfig, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .map_err(|e| e.to_string())?;
    let channel = Endpoint::from_shared(format!("https://{xds}"))
        .and_then(|e| e.tls_config(tls.clone()))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(pb::CertifyRequest { csr_pem: csr });
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    let issued = pb::identity_client::IdentityClient::new(channel)
        .certify(request)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok(tls.clone().identity(tonic::transport::Identity::from_pem(issued.chain_pem.concat(), key.serialize_pem())))
}

/// One simulated proxy: its own certificate by CSR, a TLS connection authenticated by it, a delta-ADS stream with
/// wildcard subscriptions to every type, every resource decoded and validated as the proxy does, then ACKed (or
/// NACKed, which counts as an error).
async fn simulated_proxy(
    id: usize,
    calls: Vec<usize>,
    xds: Arc<str>,
    tls: ClientTlsConfig,
    token: Arc<str>,
    shared: Arc<Shared>,
    connected: tokio::sync::oneshot::Sender<()>,
) {
    let endpoint = match certificate(&xds, &tls, &token).await.and_then(|tls| {
        Endpoint::from_shared(format!("https://{xds}")).and_then(|e| e.tls_config(tls)).map_err(|e| e.to_string())
    }) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("proxy {id}: certificate: {e}");
            shared.errors.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy {id}: connect: {e}");
            shared.errors.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let _ = connected.send(());
    let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(TYPES.len() + 4);
    for (i, t) in TYPES.iter().enumerate() {
        let node = Node { id: format!("sim-{id}"), ..Default::default() };
        // Services on demand, as a proxy asks for them: the hosts it calls; the other types wildcard.
        let (subscribe, unsubscribe) = match *t == protocol::SERVICE_TYPE {
            true => (calls.iter().map(|s| format!("host/svc-{s}.bench.local")).collect(), vec!["*".into()]),
            false => (vec!["*".into()], vec![]),
        };
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then_some(node),
            type_url: t.to_string(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let request = tonic::Request::new(ReceiverStream::new(rx));
    let mut stream = match client.delta_aggregated_resources(request).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            eprintln!("proxy {id}: {e}");
            shared.errors.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let mut held: HashMap<String, Received> = HashMap::new();
    let mut first = [false; TYPES.len()];
    let mut counted_marker = 0u64;
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            // A stream the control plane ends is a failed proxy, not a silent one.
            Ok(None) => {
                eprintln!("proxy {id}: the stream ended");
                shared.errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Err(status) => {
                eprintln!("proxy {id}: {status}");
                shared.errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        let index = TYPES.iter().position(|t| *t == response.type_url).unwrap_or(0);
        let mut error = None;
        let mut carries_marker = false;
        let marker_id = shared.marker_id.load(Ordering::SeqCst);
        let marker = shared.marker.lock().unwrap().clone();
        for r in &response.resources {
            match r.resource.as_ref().map(|any| protocol::decode(&r.name, any)) {
                Some(Ok(doc)) => {
                    if let Received::Document(Document::Service(s)) = &doc
                        && !marker.is_empty()
                        && s.spec.addresses.contains(&marker)
                    {
                        carries_marker = true;
                    }
                    held.insert(r.name.clone(), doc);
                }
                Some(Err(e)) => error = Some(e.to_string()),
                None => error = Some(format!("{}: empty", r.name)),
            }
        }
        for name in &response.removed_resources {
            held.remove(name);
        }
        shared.resources_decoded.fetch_add(response.resources.len() as u64, Ordering::Relaxed);
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: error.clone().map(|message| envoy_types::pb::google::rpc::Status {
                code: 3,
                message,
                details: vec![],
            }),
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
        if let Some(e) = error {
            eprintln!("proxy {id}: NACK {e}");
            shared.errors.fetch_add(1, Ordering::SeqCst);
        }
        if !first[index] {
            first[index] = true;
            shared.first_of_type[index].fetch_add(1, Ordering::SeqCst);
            if first.iter().all(|f| *f) {
                shared.synced.fetch_add(1, Ordering::SeqCst);
            }
        }
        if carries_marker && counted_marker != marker_id {
            counted_marker = marker_id;
            shared.ack_times.lock().unwrap().push(Instant::now());
            shared.acked_current.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(n: usize, a: &Args) -> serde_json::Value {
    let cp = ControlPlane::start(&a.control_bin, &a.ctl_bin, &n.to_string());
    cp.ctl(&["apply", "-f", "-"], Some(&config(None)));
    let token: Arc<str> =
        cp.ctl(&["token", "create", "--namespace", "bench", "--service-account", "sim"], None).trim().into();
    std::thread::sleep(Duration::from_millis(500));
    let pid = cp.child.id();
    let baseline = rss_kib(pid);
    let root = std::fs::read(cp.state.join("ca.crt")).unwrap();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name("ferry-control");
    let xds: Arc<str> = cp.xds.to_string().into();
    let shared = Arc::new(Shared::default());

    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for batch in (0..n).collect::<Vec<_>>().chunks(CONNECT_BATCH) {
        let mut waits = Vec::new();
        for &id in batch {
            let (done, wait) = tokio::sync::oneshot::channel();
            waits.push(wait);
            let task = simulated_proxy(id, called(id), xds.clone(), tls.clone(), token.clone(), shared.clone(), done);
            tasks.push(tokio::spawn(task));
        }
        for w in waits {
            let _ = w.await;
        }
    }
    let connect_time = started.elapsed();
    let deadline = Instant::now()
        + Duration::from_secs(std::env::var("XDS_SCALE_SYNC_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600));
    while shared.synced.load(Ordering::SeqCst) + shared.errors.load(Ordering::SeqCst) < n {
        let firsts: Vec<usize> = shared.first_of_type.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert!(
            Instant::now() < deadline,
            "not all proxies synced within 10 minutes: {} synced, {} failed, first responses per type {firsts:?} ({TYPES:?})",
            shared.synced.load(Ordering::SeqCst),
            shared.errors.load(Ordering::SeqCst),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sync_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected_rss = rss_kib(pid);
    let per_proxy_kib = (connected_rss.saturating_sub(baseline)) as f64 / n as f64;
    eprintln!(
        "N={n}: connected in {connect_time:.1?}, synced in {sync_time:.1?}; ferry-control RSS {baseline} KiB -> {connected_rss} KiB ({per_proxy_kib:.1} KiB/proxy)"
    );

    // (a) Service 0, called by 1 % of the proxies; (b) Service 1, called by all of them. Each apply adds a new
    // address to the Service; a proxy counts when it ACKs the Service carrying it.
    let callers = |service: usize| (0..n).filter(|id| called(*id).contains(&service)).count();
    let mut results = serde_json::Map::new();
    let (control_cpu_before, bench_cpu_before) = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    for (label, service) in [("onePercent", 0), ("all", 1)] {
        let expected = callers(service);
        let mut to_last = Vec::new();
        let mut to_median = Vec::new();
        for i in 0..a.applies {
            let marker = format!("change-{label}-{i}.bench.local");
            *shared.marker.lock().unwrap() = marker.clone();
            shared.ack_times.lock().unwrap().clear();
            shared.acked_current.store(0, Ordering::SeqCst);
            shared.marker_id.fetch_add(1, Ordering::SeqCst);
            let yaml = config(Some((service, &marker)));
            let t0 = Instant::now();
            let ctl = cp.ctl.clone();
            let apply = tokio::task::spawn_blocking(move || ctl.run(&["apply", "-f", "-"], Some(&yaml)));
            let deadline = Instant::now() + Duration::from_secs(120);
            while shared.acked_current.load(Ordering::SeqCst)
                < expected.saturating_sub(shared.errors.load(Ordering::SeqCst))
            {
                assert!(Instant::now() < deadline, "apply {label} {i}: not every caller ACKed within 120 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            apply.await.unwrap();
            // Anyone else receiving it would show as more ACKs than callers.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let acked = shared.acked_current.load(Ordering::SeqCst);
            assert_eq!(acked, expected, "apply {label} {i}: {acked} proxies received the change, {expected} call it");
            let mut times: Vec<f64> =
                shared.ack_times.lock().unwrap().iter().map(|t| t.duration_since(t0).as_secs_f64()).collect();
            times.sort_by(f64::total_cmp);
            to_last.push(*times.last().unwrap());
            to_median.push(percentile(&times, 0.5));
            eprintln!(
                "  apply {label} {i} ({expected} callers): half ACKed after {:.3} s, the last after {:.3} s",
                to_median[i], to_last[i]
            );
        }
        let mut sorted = to_last.clone();
        sorted.sort_by(f64::total_cmp);
        results.insert(label.into(), serde_json::json!({
            "service": format!("svc-{service}"),
            "callers": expected,
            "applyToLastAckSeconds": { "p50": percentile(&sorted, 0.5), "p99": percentile(&sorted, 0.99), "max": sorted.last(), "runs": to_last },
            "applyToHalfAckedSeconds": to_median,
        }));
    }
    let final_rss = rss_kib(pid);
    // CPU per apply, including the 300 ms pause after each (idle but for keepalives).
    let applies = 2.0 * a.applies as f64;
    let control_cpu = (cpu_seconds(&pid.to_string()) - control_cpu_before) / applies;
    let bench_cpu = (cpu_seconds("self") - bench_cpu_before) / applies;
    eprintln!("  CPU per apply: ferry-control {control_cpu:.3} s, the simulated proxies {bench_cpu:.3} s");
    let status: serde_json::Value = serde_json::from_str(&cp.ctl(&["status", "-o", "json"], None)).unwrap();
    let listed = status["proxies"].as_array().map(Vec::len).unwrap_or(0);
    let stale = status["proxies"].as_array().into_iter().flatten().filter(|p| p["stale"] == true).count();
    for t in tasks {
        t.abort();
    }
    serde_json::json!({
        "proxies": n,
        "services": services(),
        "endpointsPerService": ENDPOINTS,
        "connectSeconds": connect_time.as_secs_f64(),
        "syncSeconds": sync_time.as_secs_f64(),
        "resourcesDecoded": shared.resources_decoded.load(Ordering::SeqCst),
        "errors": shared.errors.load(Ordering::SeqCst),
        "controlRssKiB": { "baseline": baseline, "connected": connected_rss, "afterApplies": final_rss },
        "rssPerProxyKiB": per_proxy_kib,
        "changes": results,
        "cpuSecondsPerApply": { "control": control_cpu, "simulatedProxies": bench_cpu },
        "statusListed": listed,
        "statusStale": stale,
    })
}

/// One real proxy in a mesh of `count` Services, calling CALLED of them (a local backend answers): its VmRSS
/// (KiB) 2 s after the calls, with `on_demand` or subscribed to the whole mesh.
async fn proxy_rss(count: usize, on_demand: bool, a: &Args) -> u64 {
    let backend = ferry_test_support::backend::http_backend().await;
    let cp = ControlPlane::start(&a.control_bin, &a.ctl_bin, &format!("rss-{count}-{on_demand}"));
    // (ferryctl takes at most 1,024 documents an apply)
    for start in (0..count).step_by(1000) {
        let yaml = mesh_config(start..(start + 1000).min(count), Some(backend.addr), None);
        let ctl = cp.ctl.clone();
        tokio::task::spawn_blocking(move || ctl.run(&["apply", "-f", "-"], Some(&yaml))).await.unwrap();
    }
    let token = cp.ctl(&["token", "create", "--namespace", "bench", "--service-account", "caller"], None);
    let outbound = free_addr();
    /// Killed when dropped, a failed measurement included.
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Command::new(&a.ferry_bin)
        .env("FERRY_CONTROL_ADDR", cp.xds.to_string())
        .env("FERRY_CA_ROOT", cp.state.join("ca.crt"))
        .env("FERRY_JOIN_TOKEN", token.trim())
        .env("FERRY_NAMESPACE", "bench")
        .env("FERRY_WORKERS", "1")
        .env("FERRY_ACCESS_LOG", "off")
        .env("FERRY_LOG_LEVEL", "warn")
        .env("FERRY_ON_DEMAND", if on_demand { "on" } else { "off" })
        .env("FERRY_OUTBOUND_ADDR", outbound.to_string())
        .env("FERRY_INBOUND_ADDR", free_addr().to_string())
        .env("FERRY_ADMIN_ADDR", free_addr().to_string())
        .env("FERRY_HEALTH_ADDR", free_addr().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Killed)
        .expect("start ferry");
    let call = |s: usize| {
        let request = format!("GET / HTTP/1.1\r\nHost: svc-{s}.bench.local:8080\r\nConnection: close\r\n\r\n");
        let mut stream = std::net::TcpStream::connect(outbound).ok()?;
        use std::io::{Read, Write};
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        match answer.split_whitespace().nth(1) {
            Some("200") => Some("200".to_string()),
            _ => Some(answer.chars().take(400).collect()),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    // Ready once the first call is answered 200 (the proxy has its certificate and config).
    loop {
        let status = tokio::task::block_in_place(|| call(0));
        if status.as_deref() == Some("200") {
            break;
        }
        assert!(Instant::now() < deadline, "ferry did not answer 200 for svc-0 within 120 s (last: {status:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in (0..count).step_by((count / CALLED).max(1)).take(CALLED) {
        let status = tokio::task::block_in_place(|| call(s));
        assert_eq!(status.as_deref(), Some("200"), "svc-{s}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(child.0.id())
}

fn main() {
    let a = args();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if !a.proxy_rss.is_empty() {
        let mut rows = Vec::new();
        println!(
            "\n| Services in the mesh | proxy VmRSS on demand, calling {CALLED} (KiB) | subscribed to the whole mesh (KiB) |"
        );
        println!("|---|---|---|");
        for &count in &a.proxy_rss {
            let on_demand = runtime.block_on(proxy_rss(count, true, &a));
            let whole = runtime.block_on(proxy_rss(count, false, &a));
            println!("| {count} | {on_demand} | {whole} |");
            rows.push(serde_json::json!({"services": count, "onDemandKiB": on_demand, "wholeMeshKiB": whole}));
        }
        let out = a.out.with_file_name("xds_scale_proxy_rss.json");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        println!("\nraw: {}", out.display());
        return;
    }
    let mut results = Vec::new();
    for &n in &a.proxies {
        results.push(runtime.block_on(run(n, &a)));
    }
    println!(
        "\n| proxies | RSS per proxy (KiB) | control-plane RSS connected (MiB) | (a) 1 % call it: apply→last ACK p50 / p99 / max (s) | (b) all call it: p50 / p99 / max (s) | connect+sync (s) | errors |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let t = |label: &str, q: &str| r["changes"][label]["applyToLastAckSeconds"][q].as_f64().unwrap();
        println!(
            "| {} | {:.1} | {:.1} | {:.3} / {:.3} / {:.3} ({} callers) | {:.3} / {:.3} / {:.3} | {:.1} | {} |",
            r["proxies"],
            r["rssPerProxyKiB"].as_f64().unwrap(),
            r["controlRssKiB"]["connected"].as_f64().unwrap() / 1024.0,
            t("onePercent", "p50"),
            t("onePercent", "p99"),
            t("onePercent", "max"),
            r["changes"]["onePercent"]["callers"],
            t("all", "p50"),
            t("all", "p99"),
            t("all", "max"),
            r["syncSeconds"].as_f64().unwrap(),
            r["errors"]
        );
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("\nraw: {}", a.out.display());
}
