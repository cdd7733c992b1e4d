//! `ferry-control`: the control plane. `serve` runs the policy store, its API and the metrics/health port.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;

/// mimalloc, as the proxy: per connected proxy, the buffers that are written only in part (h2's write buffer, the
/// TLS deframer's) stay partly out of RSS on its size-segregated pages, which glibc's heap interleaves with small
/// objects (52.7-55 KiB per connected proxy with glibc's malloc, benches/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use ferry_control::ads::Xds;
use ferry_control::ads::transport::AdsService;
use ferry_control::api::Api;
use ferry_control::identity::ca::{CaFiles, MeshCa};
use ferry_control::identity::rotation::Authority;
use ferry_control::identity::serving::ServingTls;
use ferry_control::identity::tokens::Tokens;
use ferry_control::metrics::ControlMetrics;
use ferry_control::store::Store;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(name = "ferry-control", version, about = "Ferry's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: the durable policy store and its API (ferryctl talks to it), metrics and health.
    Serve(ServeArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Discovery {
    /// The embedded default: policies and Services in the state directory (ferryctl apply), endpoints registered by
    /// the proxies, join tokens.
    Local,
    /// Services, EndpointSlices, Pods and the policy CRDs from the API server (in-cluster or KUBECONFIG); the CA root
    /// in the Secret ferry-ca; ServiceAccount tokens checked by TokenReview. No admin API, no join tokens: the state
    /// directory holds only scratch files, so replicas are stateless.
    Kubernetes,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where Services, endpoints and policies come from.
    #[arg(long, env = "FERRY_DISCOVERY", value_enum, default_value_t = Discovery::Local)]
    discovery: Discovery,
    /// Kubernetes mode: the control plane's own namespace (the Secret ferry-ca lives there).
    #[arg(long, env = "FERRY_CONTROL_NAMESPACE", default_value = "ferry-system")]
    namespace: String,
    /// Where accepted objects and the admin token live (created 0700 at first start).
    #[arg(long, env = "FERRY_STATE_DIR", default_value = "./ferry-state")]
    state_dir: PathBuf,
    /// The HTTP/JSON API that ferryctl uses; keep it on loopback. Kubernetes mode serves only the read-only
    /// `GET /v1/status` there (no token; loopback required), reached through `pods/portforward`.
    #[arg(long, env = "FERRY_CONTROL_API_ADDR", default_value = "127.0.0.1:15011")]
    api_addr: SocketAddr,
    /// The xDS port (delta ADS over gRPC with TLS) that proxies connect to.
    #[arg(long, env = "FERRY_CONTROL_XDS_ADDR", default_value = "0.0.0.0:15010")]
    xds_addr: SocketAddr,
    /// After a restart, endpoints registered before it are kept this long for their proxies to reconnect.
    #[arg(long, env = "FERRY_ENDPOINT_GRACE", default_value = "60s", value_parser = duration_arg)]
    endpoint_grace: std::time::Duration,
    /// `/metrics` and `/health/ready`.
    #[arg(long, env = "FERRY_CONTROL_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// Bring your own root (or intermediate): its certificate (PEM). Default: generated into the state directory.
    #[arg(long, env = "FERRY_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key (PEM, mode 0600) of --ca-cert.
    #[arg(long, env = "FERRY_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates; proxies renew at half of it.
    #[arg(long, env = "FERRY_CERT_LIFETIME", default_value = "24h", value_parser = lifetime)]
    cert_lifetime: std::time::Duration,
    /// The mesh-wide mTLS mode of Services whose TrafficPolicy sets none: `permissive` (also accept plaintext and
    /// unmeshed clients' own TLS) or `strict` (mesh mTLS only).
    #[arg(long, env = "FERRY_MTLS_MODE", default_value = "permissive", value_parser = mtls_mode)]
    mtls_mode: ferry_api::policy::MtlsMode,
    /// Who may call a pod port that no Service selects: `allow` (anyone, as without a mesh; Linkerd's
    /// all-unauthenticated), `mesh-only` (callers with a mesh identity) or `deny`. A pod's
    /// `ferry.dev/default-inbound-policy` annotation overrides it; `--mtls-mode` still decides those ports' mTLS.
    #[arg(long, env = "FERRY_DEFAULT_INBOUND_POLICY", default_value = "allow")]
    default_inbound_policy: ferry_api::workload::DefaultInbound,
    /// The cluster's Service address range(s) (`10.96.0.0/12`; repeat or separate with commas). Proxies subscribe to
    /// the destinations they call on first use; an address in a mesh range they have no answer for (the control
    /// plane down or slow) is refused with `ferry-proxy-error: undiscovered` rather than called in plaintext.
    #[arg(long = "service-cidr", env = "FERRY_SERVICE_CIDRS", value_delimiter = ',')]
    service_cidrs: Vec<ferry_api::cidr::Cidr>,
    /// The cluster's pod address range(s) (`10.244.0.0/16`), as `--service-cidr`: a pod's own address counts (headless
    /// Services are called by pod IP).
    #[arg(long = "pod-cidr", env = "FERRY_POD_CIDRS", value_delimiter = ',')]
    pod_cidrs: Vec<ferry_api::cidr::Cidr>,
    /// Extra DNS names for the serving certificate of the xDS port (besides ferry-control and localhost).
    #[arg(long = "server-name", env = "FERRY_CONTROL_SERVER_NAMES", value_delimiter = ',')]
    server_names: Vec<String>,
    /// The sidecar-injection admission webhook (HTTPS, the xDS serving certificate; `POST /inject`). Kubernetes mode
    /// listens on 0.0.0.0:15017; elsewhere it is off unless given (to test it, or to inject from outside a cluster).
    #[arg(long, env = "FERRY_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,
    /// Kubernetes: refused ServiceAccount tokens (TokenReviews that said no) allowed per second per source address,
    /// after a burst of 10; beyond, the address's requests are refused without a review.
    #[arg(long, env = "FERRY_REVIEW_REFUSALS_PER_SECOND", default_value_t = 1.0)]
    review_refusals_per_second: f64,
    /// Kubernetes: TokenReviews in flight at once.
    #[arg(long, env = "FERRY_REVIEWS_IN_FLIGHT", default_value_t = 16)]
    reviews_in_flight: usize,
    /// Kubernetes: while the Gateway API's CRDs are not installed, how often to look for them (HTTPRoutes are
    /// watched from then on).
    #[arg(long, env = "FERRY_GATEWAY_API_POLL", default_value = "30s", value_parser = poll_arg)]
    gateway_api_poll: std::time::Duration,
    #[command(flatten)]
    inject: InjectSettings,
}

/// What the webhook injects (the same settings as `ferryctl inject`).
#[derive(clap::Args)]
struct InjectSettings {
    /// The proxy image the webhook injects (it also runs the `ferry init` step).
    #[arg(long, env = "FERRY_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// The control plane's xDS address as injected pods reach it.
    #[arg(long, env = "FERRY_INJECT_CONTROL_ADDR", default_value = ferry_api::kubernetes::inject::DEFAULT_CONTROL_ADDR)]
    inject_control_addr: String,
    /// Inject the proxy as a native sidecar (Kubernetes 1.29+); `false`: a regular container listed first.
    #[arg(long, env = "FERRY_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecar: bool,
}

impl InjectSettings {
    fn settings(&self) -> ferry_api::kubernetes::inject::Settings {
        ferry_api::kubernetes::inject::Settings::new(
            self.proxy_image.clone(),
            self.inject_control_addr.clone(),
            self.native_sidecar,
        )
    }
}

fn duration_arg(text: &str) -> Result<std::time::Duration, String> {
    ferry_api::parse_duration(text).map_err(|e| e.to_string())
}

/// At least a second: each look is an API-server call.
fn poll_arg(text: &str) -> Result<std::time::Duration, String> {
    let d = duration_arg(text)?;
    if d < std::time::Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn lifetime(text: &str) -> Result<std::time::Duration, String> {
    let d = ferry_api::parse_duration(text).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(2) || d > ferry_control::identity::certify::MAX_LIFETIME {
        return Err("must be between 2s and 168h".into());
    }
    Ok(d)
}

fn mtls_mode(text: &str) -> Result<ferry_api::policy::MtlsMode, String> {
    match text {
        "permissive" => Ok(ferry_api::policy::MtlsMode::Permissive),
        "strict" => Ok(ferry_api::policy::MtlsMode::Strict),
        other => Err(format!("`{other}`: expected permissive or strict")),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Command::Serve(args) = cli.command;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    match runtime.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-control: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reads the admin token, or creates it (32 random bytes, hex) with mode 0600 at first start.
fn admin_token(path: &Path) -> anyhow::Result<String> {
    if path.exists() {
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        anyhow::ensure!(
            mode & 0o077 == 0,
            "{}: mode {mode:o} lets others read the admin token; chmod 600 it",
            path.display()
        );
        let token = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(!token.trim().is_empty(), "{} is empty", path.display());
        return Ok(token.trim().to_string());
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for the admin token: {e}"))?;
    let token = ferry_api::hex(&bytes);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(token)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if matches!(args.discovery, Discovery::Kubernetes) && !args.api_addr.ip().is_loopback() {
        anyhow::bail!(
            "--api-addr {}: in Kubernetes mode it serves /v1/status without a token, so it must be a loopback \
             address (ferryctl --kubernetes status reaches it through pods/portforward)",
            args.api_addr
        );
    }
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    std::fs::set_permissions(&args.state_dir, std::fs::Permissions::from_mode(0o700))?;
    let kube_client = match args.discovery {
        Discovery::Local => None,
        Discovery::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API server (in-cluster service account, or KUBECONFIG)")?;
            ferry_control::kubernetes::cluster::ensure_ca_secret(&client, &args.namespace, &args.state_dir).await?;
            Some(client)
        }
    };
    let token = admin_token(&args.state_dir.join("admin.token"))?;
    let supplied = args.ca_cert.clone().zip(args.ca_key.clone()).map(|(cert, key)| CaFiles { cert, key });
    let ca = Arc::new(MeshCa::open(&args.state_dir, supplied)?);
    let mut names = vec!["ferry-control", "localhost"];
    names.extend(args.server_names.iter().map(String::as_str));
    let ips = [std::net::IpAddr::from([127, 0, 0, 1]), std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)];
    let (cert, key) = ca.signing().write_serving_certificate(&args.state_dir, &names, &ips)?;
    tracing::info!(names = ?names, "serving certificate for the xDS port signed by the mesh root");
    let store = Store::open(&args.state_dir)?;
    let metrics = Arc::new(ControlMetrics::new());
    metrics.observe_store(&store);
    tracing::info!(state_dir = %args.state_dir.display(), revision = store.revision(), objects = ?store.counts(), "store loaded");
    let tokens = Arc::new(Mutex::new(Tokens::open(&args.state_dir)?));
    let store = Arc::new(Mutex::new(store));
    let xds = Xds::new(
        store.clone(),
        tokens.clone(),
        metrics.clone(),
        &args.state_dir,
        args.endpoint_grace,
        ferry_api::protocol::Mesh {
            roots_pem: ca.trust_bundle(),
            default_mtls: args.mtls_mode,
            mesh_cidrs: args.service_cidrs.iter().chain(&args.pod_cidrs).copied().collect(),
        },
        args.default_inbound_policy,
    );
    let cluster = kube_client.clone().map(|client| {
        let xds = xds.clone();
        ferry_control::kubernetes::cluster::Cluster::start(client, Arc::new(move || xds.changed()))
    });
    if let Some(cluster) = &cluster {
        tracing::info!("Kubernetes discovery: listing Services, EndpointSlices, Pods, Namespaces and policies");
        cluster.wait_until_synced().await;
        // The Gateway API's CRDs may be installed later: looked for every --gateway-api-poll until found.
        if !cluster.detect_gateway_api().await {
            if !cluster.routes_watched() {
                tracing::info!("Gateway API not installed (no HTTPRoute): routing by HTTPRoute is off until it is");
            }
            tokio::spawn(cluster.clone().await_gateway_api(args.gateway_api_poll));
        }
        let (verdicts, mut changed) = tokio::sync::watch::channel(Default::default());
        let source = cluster.clone();
        let default_inbound = args.default_inbound_policy;
        // Served from the first model on: nothing before the cluster has been listed once.
        xds.set_source(Arc::new(move || {
            let (sourced, v) = source.documents(default_inbound);
            verdicts.send_replace(v);
            sourced
        }));
        let (writer, ca, client) = (cluster.clone(), ca.clone(), kube_client.clone().expect("a client"));
        tokio::spawn(async move {
            let mut webhook_ca_set = false;
            loop {
                let current = changed.borrow_and_update().clone();
                writer.write_statuses(current).await;
                writer.publish_bundle(&ca.trust_bundle()).await;
                if !webhook_ca_set {
                    match ferry_control::kubernetes::cluster::patch_webhook_ca(&client, &ca.trust_bundle()).await {
                        Ok(()) => {
                            webhook_ca_set = true;
                            tracing::info!("the injector webhook's caBundle is the mesh root");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "setting the injector webhook's caBundle failed; retrying")
                        }
                    }
                }
                let retry = tokio::time::sleep(std::time::Duration::from_secs(if webhook_ca_set { 300 } else { 10 }));
                tokio::select! {
                    r = changed.changed() => if r.is_err() { break },
                    _ = retry => {}
                }
            }
        });
        tracing::info!(generation = xds.generation(), "Kubernetes discovery synced");
    }
    let certify = ferry_control::identity::certify::CertifyService {
        ca: ca.clone(),
        tokens: tokens.clone(),
        bearer: cluster.clone().map(|c| {
            use ferry_control::identity::reviews::{Guarded, Limits};
            let limits = Limits {
                refusals_per_second: args.review_refusals_per_second,
                in_flight: args.reviews_in_flight,
                ..Limits::default()
            };
            let guarded = Guarded::new(c, limits, metrics.token_reviews.clone());
            Arc::new(guarded) as Arc<dyn ferry_control::identity::certify::BearerCheck>
        }),
        metrics: metrics.clone(),
        lifetime: args.cert_lifetime,
        renewals: Default::default(),
    };
    tokio::spawn(xds.clone().run_publisher());
    let serving = ServingTls::new(&cert, &key, &ca.trust_bundle())?;
    let authority = Arc::new(Authority {
        ca: ca.clone(),
        xds: xds.clone(),
        serving: serving.clone(),
        state_dir: args.state_dir.clone(),
        server_names: names.iter().map(|n| n.to_string()).collect(),
        server_ips: ips.to_vec(),
        lifetime: args.cert_lifetime,
        metrics: metrics.clone(),
        min_overlap: args.endpoint_grace,
        staged_at: std::sync::Mutex::new(std::time::Instant::now()),
    });
    authority.observe();
    tokio::spawn(authority.clone().run());
    // Local mode: `/status` on the metrics port (every proxy's identity, address and certificate expiry) takes the
    // admin token, as the API does.
    let status_token = matches!(args.discovery, Discovery::Local).then(|| token.clone());
    let api = Arc::new(Api::new(store, tokens, token, Some(metrics.clone()), Some(xds.clone()), Some(authority)));

    let xds_listener = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("binding xDS on {}", args.xds_addr))?;
    // TLS is terminated by `ServingTls` (certificate and client roots change with a root rotation); client
    // certificates are optional at that layer (a first CSR comes with a join token), xDS streams require one.
    let xds_server = tonic::transport::Server::builder()
        // Dead proxies are noticed (and their streams freed) without waiting for TCP timeouts.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // A proxy needs one ADS stream and, now and then, a certificate call: a connection gets a few streams, not
        // unlimited ones (README, "Control plane limits").
        .max_concurrent_streams(XDS_MAX_STREAMS)
        // Rapid reset (CVE-2023-44487) and MadeYouReset: hyper's defaults, which tonic turns off unless set.
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_max_header_list_size(XDS_MAX_HEADER_LIST)
        .add_service(AdsService(xds.clone()))
        .add_service(ferry_api::resources::pb::identity_server::IdentityServer::new(certify));
    let xds_status = xds;
    let incoming = serving.clone().incoming(xds_listener, metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = xds_server.serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "the xDS server stopped");
        }
    });

    let webhook_addr = match args.discovery {
        Discovery::Kubernetes => Some(args.webhook_addr.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 15017)))),
        Discovery::Local => args.webhook_addr,
    };
    if let Some(addr) = webhook_addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the webhook on {addr}"))?;
        tracing::info!(webhook = %addr, "sidecar-injection webhook listening (POST /inject)");
        ferry_control::kubernetes::webhook::serve(listener, serving.clone(), args.inject.settings());
    }

    // Kubernetes mode has no admin API (policies are the CRDs, written through the API server): its address serves
    // only the read-only `GET /v1/status`, on loopback, which `ferryctl --kubernetes status` reaches through
    // `pods/portforward` (the caller's RBAC decides; no token can be checked behind the API server).
    let api_listener = tokio::net::TcpListener::bind(args.api_addr)
        .await
        .with_context(|| format!("binding the API on {}", args.api_addr))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding metrics on {}", args.metrics_addr))?;
    tracing::info!(api = %args.api_addr, xds = %args.xds_addr, metrics = %args.metrics_addr, "ferry-control ready");

    match args.discovery {
        Discovery::Local => spawn_http1(api_listener, move |req| api.clone().handle(req)),
        Discovery::Kubernetes => {
            let xds = xds_status.clone();
            spawn_http1(api_listener, move |req: http::Request<hyper::body::Incoming>| {
                let xds = xds.clone();
                async move {
                    let (status, body) = match (req.method(), req.uri().path()) {
                        (&http::Method::GET, "/v1/status") => {
                            (200, serde_json::to_vec(&xds.status_json()).expect("serializable"))
                        }
                        _ => (404, b"{\"error\":\"Kubernetes mode: only GET /v1/status is served here\"}".to_vec()),
                    };
                    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = http::StatusCode::from_u16(status).expect("valid status");
                    resp.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                }
            });
        }
    }
    spawn_http1(metrics_listener, move |req: http::Request<hyper::body::Incoming>| {
        let (metrics, xds, status_token) = (metrics.clone(), xds_status.clone(), status_token.clone());
        async move {
            let (status, body) = match req.uri().path() {
                "/metrics" => (200, metrics.encode()),
                // Local mode: the connected proxies and their sync state, read-only, with the admin token.
                // Kubernetes mode: on loopback only (the API address, above).
                "/status" => match &status_token {
                    Some(t) if ferry_control::api::bearer_is(req.headers(), t) => {
                        (200, serde_json::to_vec(&xds.status_json()).expect("serializable"))
                    }
                    Some(_) => return Ok(ferry_control::api::Api::unauthorized()),
                    None => (
                        404,
                        b"Kubernetes mode: /v1/status is served on loopback (ferryctl --kubernetes status)\n".to_vec(),
                    ),
                },
                "/health/ready" | "/health/live" => (200, b"ready\n".to_vec()),
                _ => (404, b"try /metrics or /health/ready\n".to_vec()),
            };
            let mut resp = http::Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = http::StatusCode::from_u16(status).expect("valid status");
            Ok::<_, Infallible>(resp)
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting"),
    }
    Ok(())
}

/// Concurrent streams per connection on the xDS port.
const XDS_MAX_STREAMS: u32 = 16;
/// Request header list on the xDS port (a proxy sends a few hundred bytes).
const XDS_MAX_HEADER_LIST: u32 = 16 * 1024;
/// The API's and the metrics port's header timeout (also how long an idle keep-alive connection stays).
const HTTP_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `handler` over HTTP/1 on every connection `listener` accepts, for the life of the process: headers within
/// `HTTP_HEADER_TIMEOUT` (slow clients are cut), and a failing `accept` (typically EMFILE) backs off instead of
/// spinning.
fn spawn_http1<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<http::Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handler);
                let _ = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HTTP_HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
