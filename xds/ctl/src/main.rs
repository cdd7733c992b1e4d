//! `ferryctl`: apply, get, delete and validate Ferry's policies through the control plane's API.

mod kubernetes;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use ferry_api::identity::unix_now;
use ferry_api::{canonical_kind, parse_documents};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(
    name = "ferryctl",
    version,
    about = "Manage Ferry's policies. Talks to FERRY_CONTROL_API (default http://127.0.0.1:15011) with the admin token in FERRY_TOKEN."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Kubernetes mode: apply/delete write the policy CRDs through the API server with your kubeconfig; status and
    /// check read the cluster and the control plane's replicas there. No admin token.
    #[arg(long, global = true, env = "FERRYCTL_KUBERNETES")]
    kubernetes: bool,
    /// Kubernetes mode: the control plane's namespace.
    #[arg(long, global = true, env = "FERRY_CONTROL_NAMESPACE", default_value = "ferry-system")]
    control_namespace: String,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update the objects in FILE, every YAML/JSON file of DIR, or stdin (-): all of them or none.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Validate on the server and report what would change, storing nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show objects of a kind (Service, TrafficPolicy, AuthorizationPolicy; case-insensitive, singular or plural).
    Get {
        kind: String,
        name: Option<String>,
        /// Namespace (default: all namespaces when listing, `default` for one object).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete one object.
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Check FILE offline with the same rules as the control plane.
    Validate {
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// Join tokens: the bootstrap credential of a proxy in local mode (bound to a namespace + service account).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Every proxy connected over xDS: identity, address, and per type the generation sent, ACKed and NACKed.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The mesh CA: its roots, and root rotation.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Report roots and workload certificates that expire soon (exit status 1 when any does).
    Check {
        /// Roots expiring within this are reported.
        #[arg(long, default_value = "30d", value_parser = duration)]
        horizon: std::time::Duration,
        /// Workload certificates expiring within this are reported (default: a quarter of their lifetime; a healthy
        /// proxy renews at half).
        #[arg(long, value_parser = duration)]
        leaf_horizon: Option<std::time::Duration>,
    },
    /// Add the Ferry sidecar to every workload in FILE or stdin (-): Deployments, StatefulSets, DaemonSets,
    /// ReplicaSets, Jobs, CronJobs, Pods and Lists, multi-document YAML or JSON; prints the result on stdout and what
    /// happened to each object on stderr. Objects already injected are left as they are.
    Inject {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[command(flatten)]
        settings: InjectArgs,
    },
    /// Remove what `inject` added (containers, volumes, label) and restore the app's probes.
    Uninject {
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// Print the CustomResourceDefinitions of Ferry's policies (generated from the same types the control plane
    /// validates with), or write one file per CRD into a directory (`deploy/crds`).
    Crds {
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Print ferryctl's version.
    Version,
}

#[derive(clap::Args)]
struct InjectArgs {
    /// The proxy image (it also runs the `ferry init` step).
    #[arg(long, env = "FERRY_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// The control plane's xDS address as pods reach it.
    #[arg(long, default_value = ferry_api::kubernetes::inject::DEFAULT_CONTROL_ADDR)]
    control_addr: String,
    /// Inject the proxy as a native sidecar (Kubernetes 1.29+); `false`: a regular container listed first.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecar: bool,
}

impl InjectArgs {
    fn settings(self) -> ferry_api::kubernetes::inject::Settings {
        ferry_api::kubernetes::inject::Settings::new(self.proxy_image, self.control_addr, self.native_sidecar)
    }
}

/// One stderr line per object, as `kubectl` names them.
fn print_report(report: &ferry_api::kubernetes::inject::Report) {
    use ferry_api::kubernetes::inject::Outcome;
    for (object, outcome) in report {
        let what = match outcome {
            Outcome::Injected => "injected".to_string(),
            Outcome::AlreadyInjected => "already injected, left as it is".to_string(),
            Outcome::Skipped(why) => format!("skipped: {why}"),
            Outcome::NotAWorkload => "no pods, passed through".to_string(),
            Outcome::Uninjected => "uninjected".to_string(),
            Outcome::NotInjected => "not injected, left as it is".to_string(),
        };
        eprintln!("{object} {what}");
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// The roots (signing, next, previous) and their expiry.
    Status,
    /// Start a root rotation: a new root joins the trust bundle at once and starts signing once every connected
    /// proxy has ACKed it; the old root stays trusted until `ferryctl ca retire`.
    Rotate,
    /// Remove the previous root from the trust bundle (refused while certificates it signed may be alive).
    Retire {
        /// Retire even though certificates it signed may still be alive (their holders fail handshakes).
        #[arg(long)]
        force: bool,
    },
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    match text.strip_suffix('d').and_then(|d| d.parse::<u64>().ok()) {
        Some(days) => Ok(std::time::Duration::from_secs(days * 86_400)),
        None => ferry_api::parse_duration(text).map_err(|e| e.to_string()),
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a token; it is printed once on stdout and never stored (only its digest is).
    Create {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// How long it may be used for a first certificate (e.g. 1h, 24h).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// List tokens (without secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let result = if cli.kubernetes {
        runtime.block_on(run_kubernetes(cli.command, &cli.control_namespace))
    } else {
        runtime.block_on(run(cli.command))
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryctl: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reads FILE, every .yaml/.yml/.json file of DIR (sorted), or stdin.
fn read_input(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    let path = Path::new(file);
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"))
            .collect();
        files.sort();
        let texts: anyhow::Result<Vec<String>> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())))
            .collect();
        return Ok(texts?.join("\n---\n"));
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {file}"))
}

/// The commands that reach a cluster in Kubernetes mode; the offline ones (inject, validate, crds) run as usual.
async fn run_kubernetes(command: Command, namespace: &str) -> anyhow::Result<()> {
    use crate::kubernetes as ctl;
    match command {
        Command::Apply { file, dry_run } => {
            // The control plane's own rules first (the CRD schema holds most, not all, of them).
            let docs = parse_documents(&read_input(&file)?).map_err(|e| anyhow::anyhow!("{e}"))?;
            for line in ctl::apply(&ctl::client().await?, &docs, dry_run).await? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Delete { kind, name, namespace: ns } => {
            let Some(kind) = canonical_kind(&kind) else {
                bail!("unknown kind `{kind}` (TrafficPolicy, AuthorizationPolicy)")
            };
            ctl::delete(&ctl::client().await?, kind, &ns, &name).await?;
            println!("{} deleted", object_name(kind, &name));
            Ok(())
        }
        Command::Status { output } => {
            let reply = ctl::status(&ctl::client().await?, namespace).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&reply)?),
                Output::Yaml => print!("{}", serde_saphyr::to_string(&reply)?),
                Output::Table => print_status(&reply),
            }
            Ok(())
        }
        Command::Check { horizon, leaf_horizon } => {
            let client = ctl::client().await?;
            // As in local mode: a quarter of the default 24 h lifetime (a healthy proxy renews at half).
            let leaf = Some(leaf_horizon.map_or(6 * 3600, |h| h.as_secs() as i64));
            let checks = ctl::check(&client, namespace, horizon.as_secs() as i64, leaf).await;
            for c in &checks {
                let mark = match (c.ok, c.warning) {
                    (true, false) => "\u{2714}",
                    (true, true) => "\u{203c}",
                    (false, _) => "\u{2718}",
                };
                println!("{mark} {}", c.what);
                if let Some(hint) = &c.hint {
                    println!("    hint: {hint}");
                }
            }
            let failed = checks.iter().filter(|c| !c.ok).count();
            if failed > 0 {
                bail!("{failed} of {} checks failed", checks.len());
            }
            match checks.iter().filter(|c| c.warning).count() {
                0 => println!("all {} checks passed", checks.len()),
                w => println!("all {} checks passed ({w} with a warning)", checks.len()),
            }
            Ok(())
        }
        Command::Get { .. } => bail!(
            "in Kubernetes mode: kubectl get trafficpolicies,authorizationpolicies -A (the ACCEPTED column is the control plane's verdict)"
        ),
        Command::Token(_) | Command::Ca(_) => bail!(
            "join tokens and CA rotation are local mode only (Kubernetes mode: ServiceAccount tokens, the root in the Secret ferry-ca)"
        ),
        other => run(other).await,
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Version => {
            println!("ferryctl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Inject { file, settings } => {
            let (yaml, report) = ferry_api::kubernetes::inject::inject_yaml(&read_input(&file)?, &settings.settings())?;
            print!("{yaml}");
            print_report(&report);
            Ok(())
        }
        Command::Uninject { file } => {
            let (yaml, report) = ferry_api::kubernetes::inject::uninject_yaml(&read_input(&file)?)?;
            print!("{yaml}");
            print_report(&report);
            Ok(())
        }
        Command::Crds { output_dir } => {
            for (file, crd) in ferry_api::kubernetes::crd::crds() {
                let yaml = ferry_api::kubernetes::crd::to_yaml(&crd);
                match &output_dir {
                    Some(dir) => {
                        let path = dir.join(file);
                        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                        eprintln!("wrote {}", path.display());
                    }
                    None => print!("---\n{yaml}"),
                }
            }
            Ok(())
        }
        Command::Validate { file } => {
            let docs = parse_documents(&read_input(&file)?).map_err(|e| anyhow::anyhow!("{e}"))?;
            for d in &docs {
                println!("{} valid", d.display_name());
            }
            Ok(())
        }
        Command::Apply { file, dry_run } => {
            let text = read_input(&file)?;
            let path = if dry_run { "/v1/apply?dryRun=true" } else { "/v1/apply" };
            let reply = call("POST", path, Some(text)).await?;
            for r in reply["results"].as_array().into_iter().flatten() {
                let kind = r["kind"].as_str().unwrap_or_default();
                let suffix = if dry_run { " (dry run)" } else { "" };
                println!(
                    "{} {}{suffix}",
                    object_name(kind, r["name"].as_str().unwrap_or_default()),
                    r["outcome"].as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Get { kind, name, namespace, output } => {
            let Some(kind) = canonical_kind(&kind) else {
                bail!("unknown kind `{kind}` ({})", ferry_api::KINDS.join(", "))
            };
            let reply = match &name {
                Some(name) => {
                    call("GET", &format!("/v1/{kind}/{}/{name}", namespace.as_deref().unwrap_or("default")), None)
                        .await?
                }
                None => {
                    let query = namespace.map(|ns| format!("?namespace={ns}")).unwrap_or_default();
                    call("GET", &format!("/v1/{kind}{query}"), None).await?
                }
            };
            let items: Vec<serde_json::Value> = match name {
                Some(_) => vec![reply.clone()],
                None => reply["items"].as_array().cloned().unwrap_or_default(),
            };
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(if name_given(&reply) { &reply } else { &reply["items"] })?
                ),
                Output::Yaml => {
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            println!("---");
                        }
                        print!("{}", serde_saphyr::to_string(item)?);
                    }
                }
                Output::Table => {
                    println!("{:<16} {:<32} {:>10} {:>16}", "NAMESPACE", "NAME", "GENERATION", "RESOURCEVERSION");
                    for item in &items {
                        let m = &item["metadata"];
                        println!(
                            "{:<16} {:<32} {:>10} {:>16}",
                            m["namespace"].as_str().unwrap_or_default(),
                            m["name"].as_str().unwrap_or_default(),
                            m["generation"],
                            m["resourceVersion"].as_str().unwrap_or_default()
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Status { output } => {
            let reply = call("GET", "/v1/status", None).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&reply)?),
                Output::Yaml => print!("{}", serde_saphyr::to_string(&reply)?),
                Output::Table => print_status(&reply),
            }
            Ok(())
        }
        Command::Ca(CaCommand::Status) => {
            print_ca(&call("GET", "/v1/ca", None).await?);
            Ok(())
        }
        Command::Ca(CaCommand::Rotate) => {
            let reply = call("POST", "/v1/ca/rotate", None).await?;
            println!("new root staged: trusted now, signing once every connected proxy has ACKed the bundle");
            print_ca(&reply);
            Ok(())
        }
        Command::Ca(CaCommand::Retire { force }) => {
            let reply = call("POST", &format!("/v1/ca/retire{}", if force { "?force=true" } else { "" }), None).await?;
            println!("previous root retired from the trust bundle");
            print_ca(&reply);
            Ok(())
        }
        Command::Check { horizon, leaf_horizon } => {
            let ca = call("GET", "/v1/ca", None).await?;
            let status = call("GET", "/v1/status", None).await?;
            let problems = check(&ca, &status, horizon, leaf_horizon, unix_now());
            if problems > 0 {
                bail!("{problems} problem(s) found");
            }
            Ok(())
        }
        Command::Token(TokenCommand::Create { namespace, service_account, ttl }) => {
            let body = serde_json::json!({ "namespace": namespace, "serviceAccount": service_account, "ttl": ttl });
            let reply = call("POST", "/v1/tokens", Some(body.to_string())).await?;
            eprintln!(
                "token {} for {namespace}/{service_account}, expires at {} (unix seconds); shown only now:",
                reply["id"].as_str().unwrap_or_default(),
                reply["expiresAt"]
            );
            println!("{}", reply["token"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Token(TokenCommand::List) => {
            let reply = call("GET", "/v1/tokens", None).await?;
            println!("{:<18} {:<16} {:<24} {:>12} {:>8}", "ID", "NAMESPACE", "SERVICEACCOUNT", "EXPIRES", "REVOKED");
            for t in reply["items"].as_array().into_iter().flatten() {
                println!(
                    "{:<18} {:<16} {:<24} {:>12} {:>8}",
                    t["id"].as_str().unwrap_or_default(),
                    t["namespace"].as_str().unwrap_or_default(),
                    t["serviceAccount"].as_str().unwrap_or_default(),
                    t["expiresAt"],
                    t["revoked"]
                );
            }
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            call("DELETE", &format!("/v1/tokens/{id}"), None).await?;
            println!("token {id} revoked");
            Ok(())
        }
        Command::Delete { kind, name, namespace } => {
            let Some(kind) = canonical_kind(&kind) else {
                bail!("unknown kind `{kind}` ({})", ferry_api::KINDS.join(", "))
            };
            call("DELETE", &format!("/v1/{kind}/{namespace}/{name}"), None).await?;
            println!("{} deleted", object_name(kind, &name));
            Ok(())
        }
    }
}

/// Time left until `t` (Unix seconds), or `EXPIRED`.
fn left(t: i64, now: i64) -> String {
    if t <= now { "EXPIRED".into() } else { format!("in {}", human_duration((t - now) as u64)) }
}

fn print_ca(ca: &serde_json::Value) {
    let now = unix_now();
    println!("{:<10} {:<14} SUBJECT", "ROLE", "EXPIRES");
    for r in ca["roots"].as_array().into_iter().flatten() {
        let expires = left(r["notAfter"].as_i64().unwrap_or(0), now);
        println!(
            "{:<10} {:<14} {}",
            r["role"].as_str().unwrap_or_default(),
            expires,
            r["subject"].as_str().unwrap_or_default()
        );
    }
    if let Some(after) = ca["previousRetireAfter"].as_i64() {
        println!(
            "the previous root can be retired {}",
            if after <= now { "now".to_string() } else { left(after, now) }
        );
    }
}

/// Prints one line per root and per connected proxy's certificate; returns how many expire within their horizon.
fn check(
    ca: &serde_json::Value,
    status: &serde_json::Value,
    horizon: std::time::Duration,
    leaf_horizon: Option<std::time::Duration>,
    now: i64,
) -> usize {
    let mut problems = 0;
    let mut line = |ok: bool, what: String| {
        if !ok {
            problems += 1;
        }
        println!("{} {what}", if ok { "ok  " } else { "WARN" });
    };
    for r in ca["roots"].as_array().into_iter().flatten() {
        let t = r["notAfter"].as_i64().unwrap_or(0);
        let role = r["role"].as_str().unwrap_or_default();
        let subject = r["subject"].as_str().unwrap_or_default();
        line(t - now > horizon.as_secs() as i64, format!("{role} root {subject} expires {}", left(t, now)));
    }
    let lifetime = ca["certificateLifetimeSeconds"].as_i64().unwrap_or(86_400);
    let leaf_horizon = leaf_horizon.map_or(lifetime / 4, |h| h.as_secs() as i64);
    for p in status["proxies"].as_array().into_iter().flatten() {
        let node = p["node"].as_str().unwrap_or_default();
        let identity = p["identity"].as_str().unwrap_or_default();
        match p["certificateExpiry"].as_i64() {
            Some(t) => {
                line(t - now > leaf_horizon, format!("proxy {node} ({identity}) certificate expires {}", left(t, now)))
            }
            None => line(false, format!("proxy {node} ({identity}) has no certificate on record")),
        }
    }
    problems
}

/// `1d2h`, `3h4m`, `5m6s`, `7s`: the two largest units.
fn human_duration(seconds: u64) -> String {
    let (d, h, m, s) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60, seconds % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// `kind.group/name`, as kubectl names an object (`trafficpolicy.ferry.dev/payments`,
/// `httproute.gateway.networking.k8s.io/canary`).
fn object_name(kind: &str, name: &str) -> String {
    let group = ferry_api::config::api_version_of(kind).split('/').next().unwrap_or_default();
    format!("{}.{group}/{name}", kind.to_ascii_lowercase())
}

/// One row per proxy, like `istioctl proxy-status`: per type `SYNCED`, `STALE (sent N, acked M)` or `NACKED`, and
/// each NACK's message underneath.
fn print_status(reply: &serde_json::Value) {
    let generation = &reply["generation"];
    println!("control plane generation {generation}");
    let types = ["Service", "TrafficPolicy", "AuthorizationPolicy", "RouteSet", "TrustBundle"];
    let columns: String = types.iter().map(|t| format!("{t:<20} ")).collect();
    println!("{:<28} {:<44} {:<22} {:>8} {:<12} {columns}STATUS", "NODE", "IDENTITY", "ADDRESS", "AGE", "CERT EXPIRY");
    let now = unix_now().max(0) as u64;
    let mut nacks = Vec::new();
    for p in reply["proxies"].as_array().into_iter().flatten() {
        let cell = |t: &str| {
            let s = &p["types"][t];
            if s.is_null() {
                return "-".to_string();
            }
            if !s["nacked"].is_null() {
                return format!("NACKED {}", s["nacked"]["version"]);
            }
            if s["acked"] == s["sent"] && s["pendingSeconds"].is_null() {
                format!("SYNCED {}", s["acked"])
            } else {
                format!("SENT {} ACK {}", s["sent"], s["acked"])
            }
        };
        let age = now.saturating_sub(p["connectedSince"].as_u64().unwrap_or(now));
        let expiry = p["certificateExpiry"].as_i64().map_or("-".to_string(), |t| left(t, now as i64));
        let cells: String = types.iter().map(|t| format!("{:<20} ", cell(t))).collect();
        println!(
            "{:<28} {:<44} {:<22} {:>7}s {:<12} {cells}{}",
            p["node"].as_str().unwrap_or_default(),
            p["identity"].as_str().unwrap_or_default(),
            p["address"].as_str().unwrap_or("-"),
            age,
            expiry,
            if p["stale"] == true { "STALE" } else { "OK" }
        );
        // Every type's NACK, the columns' and the others' (Workload).
        for (t, s) in p["types"].as_object().into_iter().flatten() {
            if let Some(m) = s["nacked"]["message"].as_str() {
                nacks.push(format!("{} {t}: {m}", p["node"].as_str().unwrap_or_default()));
            }
        }
    }
    for n in nacks {
        println!("NACK {n}");
    }
}

fn name_given(reply: &serde_json::Value) -> bool {
    reply.get("items").is_none()
}

/// One API call; a non-2xx answer becomes an error carrying the server's message.
async fn call(method: &str, path: &str, body: Option<String>) -> anyhow::Result<serde_json::Value> {
    // The server refuses these too (413), but closes before a large body is sent whole: say so up front.
    if body.as_ref().is_some_and(|b| b.len() > ferry_api::http_api::MAX_BODY_BYTES) {
        bail!(
            "request body over {} MiB: the control plane refuses it (413)",
            ferry_api::http_api::MAX_BODY_BYTES / (1024 * 1024)
        );
    }
    let token =
        std::env::var("FERRY_TOKEN").context("FERRY_TOKEN is not set (the admin token: <state-dir>/admin.token)")?;
    let base = std::env::var("FERRY_CONTROL_API").unwrap_or_else(|_| "http://127.0.0.1:15011".into());
    let authority =
        base.strip_prefix("http://").with_context(|| format!("FERRY_CONTROL_API={base}: must be http://host:port"))?;
    let authority = authority.trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot reach the control plane at {base} (FERRY_CONTROL_API)"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .header(http::header::CONTENT_TYPE, "application/yaml")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&bytes) }));
    if !status.is_success() {
        bail!("{} ({status})", value["error"].as_str().unwrap_or("request failed"));
    }
    Ok(value)
}
